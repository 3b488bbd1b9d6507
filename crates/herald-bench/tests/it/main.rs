//! Integration tests of herald-bench: its receivers against scripted
//! WebSocket servers (`accounting`), and every scenario end to end against a
//! real in-process Herald node and a small in-process peer (`smoke`).
//! Every wait has a deadline; nothing synchronises with a sleep.

mod accounting;
mod peer;
mod smoke;

use std::time::Duration;

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);
