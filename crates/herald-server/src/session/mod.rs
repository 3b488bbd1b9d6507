//! The session: what an authenticated connection's commands mean, whatever
//! carries them — subscribe with recovery, gap repair, read cursors,
//! `refresh`, the chat payload — and why a connection ends. It sits above
//! the hub and below the transports: it reads no socket, and a transport
//! (today `transport::ws`) drives it.
//!
//! `state` holds `Session` and `Recovery` (a replay under way) and opens a
//! session; `commands` is what each command means; `recovery` takes what
//! fan-out queued and replays history behind a recovering subscribe or into
//! a gap; `close` is every close code and `Ending`.

pub mod close;
mod commands;
mod recovery;
mod state;

pub use close::Ending;
pub(crate) use commands::rate_limited_frame;
pub(crate) use state::Session;
