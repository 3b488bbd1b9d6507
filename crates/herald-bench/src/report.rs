//! The result of a run: one struct, printed as JSON (`--json`, for scripts
//! such as `bench/compare.sh`) or as a table for people.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::accounting::{DeliveryTally, Percentiles};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// `herald` or `peer`.
    pub target: String,
    /// Per Herald node (one for a single node; empty for a peer): how
    /// connections and HTTP publishes were spread.
    pub nodes: Vec<NodeSummary>,
    /// Connections asked for.
    pub connections: usize,
    /// Connections that connected (and subscribed).
    pub connected: usize,
    pub connect_errors: usize,
    pub first_connect_error: Option<String>,
    pub workers: usize,
    /// Publishes per second asked for.
    pub rate: f64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    pub publishes: PublishSummary,
    pub deliveries: DeliverySummary,
    /// Receive time minus intended send time, first deliveries only.
    pub latency_ms: Percentiles,
    pub connect: ConnectSummary,
    /// With `--server-pid` only: summed over the listed processes.
    pub server: Option<ServerSummary>,
    /// In the slow scenario only.
    pub slow: Option<SlowSummary>,
    /// CPU the bench used (coordinator and workers): a bench near one full
    /// core per process measured itself, not the server.
    pub bench_cpu_s: f64,
}

/// One Herald node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The node's base URL.
    pub url: String,
    /// Subscriber connections assigned to it (round-robin).
    pub connections: usize,
    /// Of those, connected and subscribed.
    pub connected: usize,
    /// HTTP publishes sent to it (0 when publishing into Redis).
    pub http_publishes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishSummary {
    /// `http`, `redis-pubsub` or `redis-stream`.
    pub via: String,
    /// The Redis published into (without credentials), for the Redis paths.
    pub redis_url: Option<String>,
    pub sent: u64,
    /// Transport failures, non-2xx answers, Redis error replies and
    /// messages in flight on a Redis connection that broke.
    pub errors: u64,
    pub first_error: Option<String>,
    /// The largest delay between a message's due time and its send: how far
    /// the open-loop schedule slipped.
    pub max_lag_ms: f64,
    /// redis-pubsub only: `PUBLISH`es that reached no Redis subscriber (no
    /// node listened on the channel). Not errors; their messages are lost.
    pub zero_receivers: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliverySummary {
    /// The counts over subscribers that read (slow subscribers are
    /// excluded), as keys of this object itself (`deliveries.lost`).
    #[serde(flatten)]
    pub tally: DeliveryTally,
    /// Received deliveries per second of the measured window (first
    /// publish due to last delivery).
    pub per_second: f64,
    /// Reading subscribers whose connection ended early.
    pub disconnects: u64,
    pub first_disconnect: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSummary {
    /// Connections per second over the connect phase's wall time.
    pub rate_per_s: f64,
    pub wall_s: f64,
    /// From starting the TCP connect to `auth_success` (Herald) or to the
    /// completed upgrade (peer).
    pub latency_ms: Percentiles,
}

/// The cost of the server processes (`--server-pid`), summed over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSummary {
    pub pids: Vec<u32>,
    /// CPU the server used while the connections were opened.
    pub cpu_connect_s: f64,
    /// CPU the server used in the measured phase (publishing and draining,
    /// or holding for idle).
    pub cpu_measured_s: f64,
    /// Received deliveries per CPU-second of the measured phase.
    pub deliveries_per_cpu_s: Option<f64>,
    pub rss_before_kib: u64,
    pub rss_after_connect_kib: u64,
    pub rss_end_kib: u64,
    /// RSS after connecting minus before.
    pub rss_growth_kib: i64,
    pub kib_per_connection: f64,
    /// The same per process, in `pids` order.
    pub per_pid: Vec<ProcessSummary>,
}

/// The cost of one server process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub cpu_connect_s: f64,
    pub cpu_measured_s: f64,
    pub rss_before_kib: u64,
    pub rss_after_connect_kib: u64,
    pub rss_end_kib: u64,
    pub rss_growth_kib: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowSummary {
    /// Connected subscribers that stopped reading.
    pub subscribers: usize,
    /// Herald only: the rise of `herald_disconnects_total{reason="slow_client"}`.
    pub slow_client_disconnects: Option<u64>,
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |label: &str, value: String| {
            let _ = writeln!(out, "  {label:<18} {value}");
        };
        let header = format!(
            "herald-bench {} -> {}: {} connections, {} worker(s)",
            self.scenario, self.target, self.connections, self.workers
        );
        row(
            "connections",
            format!("{} connected, {} failed", self.connected, self.connect_errors),
        );
        if let Some(error) = &self.first_connect_error {
            row("first failure", error.clone());
        }
        if self.nodes.len() > 1 {
            let nodes: Vec<String> = self
                .nodes
                .iter()
                .map(|node| {
                    format!(
                        "{}: {}/{} connected, {} HTTP publishes",
                        node.url, node.connected, node.connections, node.http_publishes
                    )
                })
                .collect();
            row("nodes", nodes.join("; "));
        }
        let connect = &self.connect;
        row(
            "connect",
            format!(
                "{:.0} conn/s over {:.2} s; latency p50 {} ms, p99 {} ms, max {} ms",
                connect.rate_per_s,
                connect.wall_s,
                ms(connect.latency_ms.p50),
                ms(connect.latency_ms.p99),
                ms(connect.latency_ms.max)
            ),
        );
        if self.publishes.sent > 0 {
            row(
                "publishes",
                format!(
                    "{} sent at {}/s for {} s, {} errors, max lag {} ms, payload {} B",
                    self.publishes.sent,
                    self.rate,
                    self.duration_s,
                    self.publishes.errors,
                    ms(self.publishes.max_lag_ms),
                    self.payload_bytes
                ),
            );
            let redis = self
                .publishes
                .redis_url
                .as_ref()
                .map_or_else(String::new, |url| format!(" ({url})"));
            let zero = self
                .publishes
                .zero_receivers
                .map_or_else(String::new, |count| format!("; {count} reached no subscriber"));
            row("published via", format!("{}{redis}{zero}", self.publishes.via));
            if let Some(error) = &self.publishes.first_error {
                row("first error", error.clone());
            }
            let tally = &self.deliveries.tally;
            row(
                "deliveries",
                format!(
                    "{} expected, {} received, {} lost, {} duplicated, {} out of range, {} malformed",
                    tally.expected, tally.received, tally.lost, tally.duplicated, tally.out_of_range, tally.malformed
                ),
            );
            row("delivery rate", format!("{:.0} /s", self.deliveries.per_second));
            let latency = &self.latency_ms;
            row(
                "latency",
                format!(
                    "p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
                    ms(latency.p50),
                    ms(latency.p90),
                    ms(latency.p99),
                    ms(latency.p999),
                    ms(latency.max)
                ),
            );
        }
        if self.deliveries.disconnects > 0 {
            row(
                "disconnects",
                format!(
                    "{} ({})",
                    self.deliveries.disconnects,
                    self.deliveries.first_disconnect.as_deref().unwrap_or("")
                ),
            );
        }
        if let Some(slow) = &self.slow {
            let disconnects = slow.slow_client_disconnects.map_or_else(String::new, |count| {
                format!("; server disconnected {count} as slow_client")
            });
            row("slow subscribers", format!("{}{disconnects}", slow.subscribers));
        }
        if let Some(server) = &self.server {
            let per_cpu = server
                .deliveries_per_cpu_s
                .map_or_else(String::new, |rate| format!("; {rate:.0} deliveries per CPU-second"));
            row(
                "server CPU",
                format!(
                    "{:.2} s measured, {:.2} s connecting{per_cpu}",
                    server.cpu_measured_s, server.cpu_connect_s
                ),
            );
            row(
                "server RSS",
                format!(
                    "{} KiB before, {} KiB connected, {} KiB at end; {:.1} KiB per connection",
                    server.rss_before_kib, server.rss_after_connect_kib, server.rss_end_kib, server.kib_per_connection
                ),
            );
            if server.per_pid.len() > 1 {
                let processes: Vec<String> = server
                    .per_pid
                    .iter()
                    .map(|process| {
                        format!(
                            "{}: {:.2} s CPU, {} KiB",
                            process.pid, process.cpu_measured_s, process.rss_end_kib
                        )
                    })
                    .collect();
                row("per process", processes.join("; "));
            }
        }
        row("bench CPU", format!("{:.2} s", self.bench_cpu_s));
        format!("{header}\n{out}")
    }
}

/// Milliseconds with precision that suits their size.
fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scripts read `deliveries.lost` and friends: the tally's counts are keys
    /// of `deliveries` itself, in their old order, and read back the same.
    #[test]
    fn delivery_summary_json_is_flat() {
        let summary = DeliverySummary {
            tally: DeliveryTally {
                expected: 6,
                received: 5,
                lost: 1,
                duplicated: 2,
                out_of_range: 3,
                malformed: 4,
            },
            per_second: 2.5,
            disconnects: 1,
            first_disconnect: Some("closed".to_owned()),
        };
        let json = serde_json::to_string(&summary).unwrap();
        assert_eq!(
            json,
            r#"{"expected":6,"received":5,"lost":1,"duplicated":2,"out_of_range":3,"malformed":4,"per_second":2.5,"disconnects":1,"first_disconnect":"closed"}"#
        );
        let back: DeliverySummary = serde_json::from_str(&json).unwrap();
        assert_eq!(back.tally, summary.tally);
        assert_eq!(back.first_disconnect, summary.first_disconnect);
    }
}
