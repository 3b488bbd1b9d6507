//! Herald's core: the parts of the hub that do no I/O.
//!
//! Everything here is plain data and decisions, so that it can be tested
//! exhaustively and fuzzed without a runtime: the wire protocol (`frame`),
//! channel names and namespace policies (`channel`, `policy`), the message
//! model (`publication`), channel history and recovery (`history`), the
//! subscription registry and fan-out filter
//! (`registry`), idempotency (`dedup`), the command rate limiter
//! (`rate_limit`), human-readable durations (`duration`), the Redis wire
//! protocol (`resp`), routes that adopt existing Redis publishers (`route`) and WebSocket framing (`websocket`).

pub mod channel;
pub mod dedup;
pub mod duration;
pub mod frame;
pub mod history;
pub mod policy;
pub mod publication;
pub mod rate_limit;
pub mod registry;
pub mod resp;
pub mod route;
pub mod view;
pub mod websocket;

pub use channel::{ChannelError, ChannelName};
pub use publication::{Payload, Publication};
