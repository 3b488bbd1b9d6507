//! `[limits]`, `[keepalive]`, `[shutdown]` and `[idempotency]`: the bounds
//! and timers of connections, publishes and the drain.

use std::time::Duration;

use super::check::{ConfigError, duration, invalid, positive};
use super::raw::{RawIdempotency, RawKeepalive, RawLimits, RawShutdown};

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_connections_per_ip: usize,
    /// The largest WebSocket frame or message, and the largest published `data`.
    pub max_message_size: usize,
    /// From TCP accept to the end of the HTTP request head.
    pub handshake_timeout: Duration,
    /// How long an HTTP request body may take to arrive once its handler
    /// reads it; slower, it is answered 408 and the connection closed (so a
    /// trickling body cannot hold a connection and a task forever).
    pub body_timeout: Duration,
    /// From the WebSocket upgrade to a successful `auth` frame.
    pub auth_timeout: Duration,
    pub commands_per_second: u32,
    pub command_burst: u32,
    /// Each connection's outgoing queue, in messages and in bytes; a client
    /// that lets either fill up is disconnected (close code 4008).
    pub queue_messages: usize,
    pub queue_bytes: usize,
    /// Channels one connection may be subscribed to (its personal channel included).
    pub max_subscriptions: usize,
    /// The kernel's send buffer per connection (SO_SNDBUF), when set. The
    /// kernel otherwise grows it to megabytes, which a client that stopped
    /// reading fills before Herald's own queue (and its 4008) comes into play.
    pub send_buffer: Option<usize>,
    /// How long one write to a socket may take before the client counts as slow.
    pub write_timeout: Duration,
}

impl Limits {
    pub(crate) fn from_raw(l: RawLimits) -> Result<Limits, ConfigError> {
        let limits = Limits {
            max_connections: positive("limits.max_connections", l.max_connections, 100_000)?,
            max_connections_per_user: positive("limits.max_connections_per_user", l.max_connections_per_user, 100)?,
            max_connections_per_ip: positive("limits.max_connections_per_ip", l.max_connections_per_ip, 100_000)?,
            max_message_size: positive("limits.max_message_size", l.max_message_size, 64 * 1024)?,
            handshake_timeout: duration("limits.handshake_timeout", l.handshake_timeout, "10s")?,
            body_timeout: duration("limits.body_timeout", l.body_timeout, "10s")?,
            auth_timeout: duration("limits.auth_timeout", l.auth_timeout, "10s")?,
            commands_per_second: positive(
                "limits.commands_per_second",
                l.commands_per_second.map(|n| n as usize),
                50,
            )? as u32,
            command_burst: positive("limits.command_burst", l.command_burst.map(|n| n as usize), 100)? as u32,
            queue_messages: positive("limits.queue_messages", l.queue_messages, 1024)?,
            queue_bytes: positive("limits.queue_bytes", l.queue_bytes, 4 * 1024 * 1024)?,
            max_subscriptions: positive("limits.max_subscriptions", l.max_subscriptions, 256)?,
            send_buffer: match l.send_buffer {
                Some(size) if size < 4096 => return Err(invalid("limits.send_buffer", "must be at least 4096 bytes")),
                other => other,
            },
            write_timeout: duration("limits.write_timeout", l.write_timeout, "10s")?,
        };
        if limits.queue_bytes < limits.max_message_size {
            return Err(invalid(
                "limits.queue_bytes",
                "must be at least limits.max_message_size",
            ));
        }
        Ok(limits)
    }
}

#[derive(Debug, Clone)]
pub struct Keepalive {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

impl Keepalive {
    pub(crate) fn from_raw(raw: RawKeepalive) -> Result<Keepalive, ConfigError> {
        Ok(Keepalive {
            ping_interval: duration("keepalive.ping_interval", raw.ping_interval, "25s")?,
            pong_timeout: duration("keepalive.pong_timeout", raw.pong_timeout, "10s")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Connections are closed at random moments spread over this window.
    pub drain_window: Duration,
    /// The process exits at the latest this long after the signal.
    pub timeout: Duration,
}

impl ShutdownConfig {
    pub(crate) fn from_raw(raw: RawShutdown) -> Result<ShutdownConfig, ConfigError> {
        let shutdown = ShutdownConfig {
            drain_window: duration("shutdown.drain_window", raw.drain_window, "5s")?,
            timeout: duration("shutdown.timeout", raw.timeout, "15s")?,
        };
        if shutdown.drain_window >= shutdown.timeout {
            return Err(invalid(
                "shutdown.drain_window",
                "must be shorter than shutdown.timeout",
            ));
        }
        Ok(shutdown)
    }
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    pub window: Duration,
    pub capacity: usize,
}

impl Idempotency {
    pub(crate) fn from_raw(raw: RawIdempotency) -> Result<Idempotency, ConfigError> {
        Ok(Idempotency {
            window: duration("idempotency.window", raw.window, "2m")?,
            capacity: positive("idempotency.capacity", raw.capacity, 100_000)?,
        })
    }
}
