//! Integration tests of herald-bench: its receivers against scripted
//! WebSocket servers (`accounting`), every scenario end to end against a
//! real in-process Herald node and a small in-process peer (`smoke`), and
//! `notify` over two in-process nodes in Redis mode through every publish
//! path, plus the Redis publisher's error accounting (`cluster`).
//! Every wait has a deadline; nothing synchronises with a sleep.

mod accounting;
mod cluster;
mod peer;
mod smoke;

use std::time::Duration;

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);
