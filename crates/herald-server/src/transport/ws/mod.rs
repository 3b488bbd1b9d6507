//! `GET /ws`: the WebSocket transport.
//!
//! The upgrade is answered here and the socket taken over from hyper: the
//! server speaks the framing itself (`herald_core::websocket`), so that
//! fan-out can write one shared, pre-encoded frame straight to every
//! subscriber's socket (see `fanout`).
//!
//! One task per connection, spawned on the shutdown tracker. The task reads
//! the socket (client commands), writes what fan-out could not, answers
//! commands, and watches the keepalive ping and its pong deadline, the
//! token's expiry, and the drain signal. Queued bytes that make no progress
//! for `limits.write_timeout`, or a full queue, end the connection with
//! 4008, so a stalled peer never pins memory or the task.
//!
//! `upgrade` answers the upgrade and admits the connection; `connection`
//! reads the socket, runs the authentication phase and the connection loop
//! with its timers, and closes. What commands mean is the session's
//! (`crate::session`).

mod connection;
mod upgrade;

pub(crate) use connection::{Reader, answer_ping, close, drain_delay};
pub(crate) use upgrade::admit;
pub use upgrade::{Upgrade, WsParams, handler};
