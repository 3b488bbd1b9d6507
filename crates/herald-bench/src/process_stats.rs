//! What a process costs: CPU seconds and resident memory, read from `/proc`,
//! for the server under test (`--server-pid`) and for the bench itself.
//! Also reads one series out of a Prometheus `/metrics` text.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One reading of a process's cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProcessSample {
    /// User plus system CPU time since the process started.
    pub cpu_seconds: f64,
    /// Resident set size (`VmRSS`), KiB.
    pub rss_kib: u64,
}

/// Samples process `pid` (`"self"` for this process).
pub fn sample(pid: &str) -> anyhow::Result<ProcessSample> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("parse /proc/{pid}/stat"))?;
    let rss_kib = rss_kib(&status).with_context(|| format!("parse /proc/{pid}/status"))?;
    Ok(ProcessSample {
        cpu_seconds: ticks as f64 / clock_ticks_per_second(),
        rss_kib,
    })
}

/// CPU seconds this process has used.
pub fn own_cpu_seconds() -> f64 {
    sample("self").map_or(0.0, |sample| sample.cpu_seconds)
}

/// `utime + stime` from the text of `/proc/PID/stat`, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself, so fields are counted from the last `)`. After it
    // come field 3 (state) onwards: utime is field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// `VmRSS` from the text of `/proc/PID/status`, in KiB.
fn rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Linux has used 100 on every mainstream architecture for decades.
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The value of `series` (a metric name with its labels, exactly as
/// rendered, e.g. `herald_disconnects_total{reason="slow_client"}`) in a
/// Prometheus text exposition; `None` when absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Raises this process's open-file limit to its hard limit: every socket is
/// a file, and the soft limit is often far below what the machine allows.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\therald\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(rss_kib(status), Some(12_345));
        assert_eq!(rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = sample("self").expect("/proc/self is readable");
        assert!(sample.rss_kib > 0);
        assert!(sample.cpu_seconds >= 0.0);
    }

    #[test]
    fn metric_series_are_matched_exactly() {
        let text = "# TYPE herald_disconnects_total counter\n\
                    herald_disconnects_total{reason=\"slow_client_x\"} 9\n\
                    herald_disconnects_total{reason=\"slow_client\"} 3\n\
                    herald_connections 17\n";
        assert_eq!(
            metric_value(text, "herald_disconnects_total{reason=\"slow_client\"}"),
            Some(3.0)
        );
        assert_eq!(metric_value(text, "herald_connections"), Some(17.0));
        assert_eq!(metric_value(text, "herald_missing"), None);
    }
}
