//! Cluster services: tasks that run over the hub in Redis mode. They sit
//! above both the hub and the Redis broker, so that the broker never calls
//! back into the hub.
//!
//! - `heartbeat`: the node's heartbeat, and the sweep that removes dead
//!   nodes' presence entries and announces their users leaving.
//! - `streams`: Streams ingest, which publishes what backends `XADD` to
//!   `{prefix}publish` through the hub, like any other publisher.

pub mod heartbeat;
pub mod streams;

pub use heartbeat::{heartbeat_loop, sweep_loop};
