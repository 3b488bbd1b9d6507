//! Process metrics, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: no registry crate, no allocation when counting. Labels are
//! small fixed sets (reasons, sources) and never a user id or channel name.
//! Hot loops count locally and add once (see `fanout`).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A counter per value of one fixed label.
pub struct Family<const N: usize> {
    label: &'static str,
    values: [&'static str; N],
    counts: [AtomicU64; N],
}

impl<const N: usize> Family<N> {
    const fn new(label: &'static str, values: [&'static str; N]) -> Self {
        Family {
            label,
            values,
            counts: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Adds `n` to the counter of `value`; an unknown value is a bug, counted
    /// under the last label value rather than lost.
    pub fn add(&self, value: &str, n: u64) {
        let index = self.values.iter().position(|v| *v == value).unwrap_or(N - 1);
        self.counts[index].fetch_add(n, Relaxed);
    }

    pub fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counts[i].load(Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (value, count) in self.values.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {}", self.label, count.load(Relaxed));
        }
    }
}

/// A histogram of durations with fixed bucket bounds, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(index) = self.bounds.iter().position(|bound| seconds <= *bound) {
            self.buckets[index].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(duration.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

pub struct Metrics {
    pub connections_current: AtomicI64,
    pub connections_accepted: AtomicU64,
    /// Upgrades or authentications refused by a limit or a check.
    pub connections_rejected: Family<5>,
    pub auth_failures: Family<10>,
    /// Why connections ended.
    pub disconnects: Family<12>,
    pub messages_published: Family<4>,
    /// Frames queued to subscribers (one per subscriber per message).
    pub messages_delivered: AtomicU64,
    /// Messages a subscriber did not get, by reason: `slow_client` (refused
    /// by a full queue, or discarded with a connection cut off as slow; it
    /// is told with 4008), `disconnected` (discarded with a connection that
    /// ended otherwise, or offered to one that was ending), `lane_full`
    /// (a fan-out lane's inbox was full, see `fanout::LaneLimits`).
    pub messages_dropped: Family<5>,
    pub duplicates_suppressed: AtomicU64,
    pub commands: AtomicU64,
    pub command_errors: AtomicU64,
    /// HTTP requests answered 408 because the body did not arrive within
    /// `limits.body_timeout`.
    pub http_body_timeouts: AtomicU64,
    /// Time from accepting a publish to having queued it for every local subscriber.
    pub fanout_latency: Histogram,
    pub broker_up: AtomicI64,
    /// Reconnections to the broker after a lost connection.
    pub broker_reconnects: AtomicU64,
    /// Times a Redis connection awaited a reply for
    /// `link::UNRESPONSIVE_AFTER` (the command and Pub/Sub connections then
    /// make the node report not-ready until Redis answers).
    pub broker_unresponsive: AtomicU64,
    /// End-to-end probes (published on the node's own probe channel) not
    /// heard back on its Pub/Sub connection in time.
    pub broker_probe_failures: AtomicU64,
    /// Stream entries published and acknowledged.
    pub stream_entries: AtomicU64,
    /// Stream entries refused as invalid (acknowledged and dead-lettered), by
    /// reason (the labels of `cluster::streams::Invalid`).
    pub stream_entries_invalid: Family<5>,
    /// 1 while this node holds the lease that makes it the one reader of
    /// the publish stream.
    pub stream_reader: AtomicI64,
    /// Gaps in a channel's offsets filled from history for a connection.
    pub gaps_recovered: AtomicU64,
    /// Gaps that history could not fill (the client got `resync`).
    pub gaps_unrecovered: AtomicU64,
    /// Channels and messages the memory broker keeps in history, as of its
    /// last sweep (0 in Redis mode, where Redis keeps them).
    pub history_channels: AtomicI64,
    pub history_messages: AtomicI64,
    /// Gap repairs that found the broker unreachable and waited for it.
    pub gap_repair_waits: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_current: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_rejected: Family::new(
                "reason",
                ["max_connections", "max_per_ip", "max_per_user", "origin", "other"],
            ),
            auth_failures: Family::new(
                "reason",
                [
                    "malformed",
                    "algorithm",
                    "signature",
                    "expired",
                    "not_yet_valid",
                    "issuer",
                    "audience",
                    "claims",
                    "no_token",
                    "timeout",
                ],
            ),
            disconnects: Family::new(
                "reason",
                [
                    "client",
                    "auth_failed",
                    "auth_timeout",
                    "token_expired",
                    "slow_client",
                    "pong_timeout",
                    "rate_limited",
                    "too_large",
                    "invalid_utf8",
                    "protocol_error",
                    "max_per_user",
                    "shutdown",
                ],
            ),
            messages_published: Family::new("source", ["http", "client", "stream", "other"]),
            messages_delivered: AtomicU64::new(0),
            messages_dropped: Family::new(
                "reason",
                ["slow_client", "disconnected", "lane_full", "invalid", "other"],
            ),
            duplicates_suppressed: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            command_errors: AtomicU64::new(0),
            http_body_timeouts: AtomicU64::new(0),
            fanout_latency: Histogram::new(LATENCY_BOUNDS),
            broker_up: AtomicI64::new(1),
            broker_reconnects: AtomicU64::new(0),
            broker_unresponsive: AtomicU64::new(0),
            broker_probe_failures: AtomicU64::new(0),
            stream_entries: AtomicU64::new(0),
            stream_entries_invalid: Family::new("reason", ["too_large", "channel", "data", "type", "malformed"]),
            stream_reader: AtomicI64::new(0),
            gaps_recovered: AtomicU64::new(0),
            gaps_unrecovered: AtomicU64::new(0),
            history_channels: AtomicI64::new(0),
            history_messages: AtomicI64::new(0),
            gap_repair_waits: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        gauge(
            &mut out,
            "herald_connections",
            "Open WebSocket connections.",
            self.connections_current.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_connections_accepted_total",
            "WebSocket connections upgraded.",
            self.connections_accepted.load(Relaxed),
        );
        self.connections_rejected.render(
            &mut out,
            "herald_connections_rejected_total",
            "Connections refused by a limit or check.",
        );
        self.auth_failures
            .render(&mut out, "herald_auth_failures_total", "Failed authentications.");
        self.disconnects
            .render(&mut out, "herald_disconnects_total", "Closed connections by reason.");
        self.messages_published.render(
            &mut out,
            "herald_messages_published_total",
            "Messages accepted for publishing.",
        );
        counter(
            &mut out,
            "herald_messages_delivered_total",
            "Frames queued to subscribers.",
            self.messages_delivered.load(Relaxed),
        );
        self.messages_dropped.render(
            &mut out,
            "herald_messages_dropped_total",
            "Messages not delivered to a subscriber.",
        );
        counter(
            &mut out,
            "herald_duplicates_suppressed_total",
            "Publishes recognised as repeats of a message_id.",
            self.duplicates_suppressed.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_commands_total",
            "Client commands received.",
            self.commands.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_command_errors_total",
            "Client commands answered with an error.",
            self.command_errors.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_http_body_timeouts_total",
            "HTTP requests answered 408: the body did not arrive within limits.body_timeout.",
            self.http_body_timeouts.load(Relaxed),
        );
        self.fanout_latency.render(
            &mut out,
            "herald_fanout_seconds",
            "Time from accepting a publish to queueing it for every local subscriber.",
        );
        gauge(
            &mut out,
            "herald_broker_up",
            "1 when the broker is reachable.",
            self.broker_up.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_broker_reconnects_total",
            "Reconnections to the broker after a lost connection.",
            self.broker_reconnects.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_broker_unresponsive_total",
            "Times a Redis connection awaited a reply for over 2 s.",
            self.broker_unresponsive.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_broker_probe_failures_total",
            "Probes published on the node's own channel and not heard back on its Pub/Sub connection in time.",
            self.broker_probe_failures.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_stream_entries_total",
            "Stream entries published and acknowledged.",
            self.stream_entries.load(Relaxed),
        );
        self.stream_entries_invalid.render(
            &mut out,
            "herald_stream_entries_invalid_total",
            "Stream entries acknowledged as invalid and copied to the dead-letter stream.",
        );
        gauge(
            &mut out,
            "herald_stream_reader",
            "1 while this node is the one that reads the publish stream.",
            self.stream_reader.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_gaps_recovered_total",
            "Gaps in a channel's offsets filled from history for a connection.",
            self.gaps_recovered.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_gaps_unrecovered_total",
            "Gaps history could not fill (the client was sent resync).",
            self.gaps_unrecovered.load(Relaxed),
        );
        gauge(
            &mut out,
            "herald_history_channels",
            "Channels with history kept in memory (memory broker, as of its last sweep).",
            self.history_channels.load(Relaxed),
        );
        gauge(
            &mut out,
            "herald_history_messages",
            "Messages kept in memory history (memory broker, as of its last sweep).",
            self.history_messages.load(Relaxed),
        );
        counter(
            &mut out,
            "herald_gap_repair_waits_total",
            "Gap repairs that found the broker unreachable and waited for it before reading history.",
            self.gap_repair_waits.load(Relaxed),
        );
        out
    }
}
