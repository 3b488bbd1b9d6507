//! Local fan-out: from one publication to the socket of every local
//! subscriber.
//!
//! A publication is encoded once, as a complete WebSocket frame, and handed
//! to its channel's lane; the lane's task walks the channel's subscribers
//! and gives each the same buffer (a reference-count increment). When
//! nothing waits ahead of it, the frame is written straight to the
//! connection's socket with one non-blocking `write`: a delivery to a
//! connection that keeps up wakes no connection task. A lane that falls
//! behind takes what waits together, and consecutive publications to one
//! channel reach each subscriber in one (vectored) write.
//!
//! Whatever the socket does not take at once waits, in order, in the
//! connection's queue for its task, which writes it as the socket drains.
//! A connection keeps its position in channels with history here, so that
//! fan-out itself skips repeats and writes in-order messages; a gap (or a
//! new epoch) and subscriptions made by the server API go to the task, and
//! while the task holds the connection (answering a command,
//! working through such entries) fan-out queues behind it instead of writing
//! around it.
//!
//! Queues are bounded in messages and bytes; a subscriber whose queue is
//! full is marked slow and its connection closes with 4008. Fan-out never
//! waits on a subscriber.

mod connection;
mod lane;
mod outbound;
mod position;
mod queue;

pub use connection::{ConnectionHandle, ConnectionSocket, Next, Offers, Room, connection_socket};
pub use lane::{Fanout, LaneLimits};
pub use outbound::{Delivery, Outbound, wire_frame};
pub use position::Judgement;
