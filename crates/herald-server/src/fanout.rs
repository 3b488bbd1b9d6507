//! Local fan-out: from one publication to the outgoing queue of every local
//! subscriber.
//!
//! The frame is encoded once; each subscriber's queue receives a clone of the
//! same buffer (a reference-count increment). Queues are bounded in messages
//! and bytes; a subscriber whose queue is full is marked slow and its
//! connection closes with 4008. Fan-out never waits on a subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use herald_core::publication::{Control, EncodedFrame};
use herald_core::registry::{Registry, Subscriber};
use herald_core::{ChannelName, Publication};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A frame waiting in a connection's outgoing queue. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// The server API subscribes this connection to a channel.
    Subscribe(ChannelName),
    /// The server API unsubscribes this connection from a channel.
    Unsubscribe(ChannelName),
}

/// What a control entry counts for in the queue's byte bound.
const CONTROL_SIZE: usize = 64;

impl Outbound {
    pub fn len(&self) -> usize {
        match self {
            Outbound::Text(text) => text.len(),
            Outbound::Binary(bytes) => bytes.len(),
            Outbound::Subscribe(_) | Outbound::Unsubscribe(_) => CONTROL_SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<EncodedFrame> for Outbound {
    fn from(frame: EncodedFrame) -> Self {
        match frame {
            EncodedFrame::Text(text) => Outbound::Text(text.into()),
            EncodedFrame::Binary(bytes) => Outbound::Binary(bytes),
        }
    }
}

/// What the fan-out side holds of a connection.
struct ConnectionShared {
    id: u64,
    user_id: Arc<str>,
    queue: mpsc::Sender<Outbound>,
    /// Bytes in `queue` not yet taken by the connection task.
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// Cancelled when the connection fell behind and must be closed.
    slow: CancellationToken,
}

/// A cheap handle to a live connection, stored in the registry.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

/// The connection task's end of the outgoing queue.
pub struct ConnectionQueue {
    receiver: mpsc::Receiver<Outbound>,
    shared: Arc<ConnectionShared>,
}

/// The outcome of offering a frame to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The queue was full: the frame is dropped and the connection is closing.
    Dropped,
    /// The connection is already gone.
    Closed,
}

/// Creates the two ends of a connection's bounded outgoing queue.
pub fn connection_queue(
    id: u64,
    user_id: &str,
    max_messages: usize,
    max_bytes: usize,
) -> (ConnectionHandle, ConnectionQueue) {
    let (sender, receiver) = mpsc::channel(max_messages);
    let shared = Arc::new(ConnectionShared {
        id,
        user_id: Arc::from(user_id),
        queue: sender,
        queued_bytes: AtomicUsize::new(0),
        max_queued_bytes: max_bytes,
        slow: CancellationToken::new(),
    });
    (ConnectionHandle(shared.clone()), ConnectionQueue { receiver, shared })
}

impl ConnectionHandle {
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Queues `frame` without waiting. A full queue (in messages or bytes)
    /// marks the connection slow; it is closed rather than allowed to lag.
    pub fn offer(&self, frame: &Outbound) -> Offer {
        let shared = &self.0;
        if shared.slow.is_cancelled() {
            return Offer::Dropped;
        }
        let size = frame.len();
        let before = shared.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > shared.max_queued_bytes {
            shared.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            shared.slow.cancel();
            return Offer::Dropped;
        }
        match shared.queue.try_send(frame.clone()) {
            Ok(()) => Offer::Queued,
            Err(error) => {
                shared.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                match error {
                    mpsc::error::TrySendError::Full(_) => {
                        shared.slow.cancel();
                        Offer::Dropped
                    }
                    mpsc::error::TrySendError::Closed(_) => Offer::Closed,
                }
            }
        }
    }
}

impl Subscriber for ConnectionHandle {
    fn connection_id(&self) -> u64 {
        self.0.id
    }

    fn user_id(&self) -> &str {
        &self.0.user_id
    }
}

impl ConnectionQueue {
    /// The next queued frame; `None` only if every handle is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let frame = self.receiver.recv().await?;
        self.shared.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// A frame that is already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let frame = self.receiver.try_recv().ok()?;
        self.shared.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// Cancelled when fan-out finds this connection too slow.
    pub fn slow_signal(&self) -> CancellationToken {
        self.shared.slow.clone()
    }
}

/// The node's subscription registry and the fan-out over it.
pub struct Fanout {
    pub registry: Registry<ConnectionHandle>,
    metrics: Arc<Metrics>,
}

impl Fanout {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Fanout {
            registry: Registry::default(),
            metrics,
        }
    }

    /// Queues `publication` for every local subscriber of its channel and
    /// returns how many received it. `accepted_at` feeds the latency histogram.
    pub fn deliver(&self, publication: &Publication, accepted_at: Instant) -> usize {
        let frame = match publication.control() {
            Some(Control::Subscribe(channel)) => Outbound::Subscribe(channel),
            Some(Control::Unsubscribe(channel)) => Outbound::Unsubscribe(channel),
            None => Outbound::from(publication.encode()),
        };
        let (mut queued, mut dropped) = (0u64, 0u64);
        self.registry.for_each(&publication.channel, |connection| {
            if !publication.is_for(connection.connection_id(), connection.user_id()) {
                return;
            }
            match connection.offer(&frame) {
                Offer::Queued => queued += 1,
                Offer::Dropped => dropped += 1,
                Offer::Closed => {}
            }
        });
        self.metrics.messages_delivered.fetch_add(queued, Ordering::Relaxed);
        if dropped > 0 {
            self.metrics.messages_dropped.add("slow_client", dropped);
        }
        self.metrics.fanout_latency.observe(accepted_at.elapsed());
        queued as usize
    }

    /// Sends `frame` to every local connection of `channel` except `except`;
    /// used for events that are not publications (e.g. `read`).
    pub fn send_to_channel(&self, channel: &ChannelName, frame: Outbound, except: Option<u64>) {
        self.registry.for_each(channel, |connection| {
            if Some(connection.id()) != except {
                connection.offer(&frame);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_marks_the_connection_slow() {
        let (handle, mut queue) = connection_queue(1, "alice", 2, 1_000);
        let frame = Outbound::Text("12345".into());
        assert_eq!(handle.offer(&frame), Offer::Queued);
        assert_eq!(handle.offer(&frame), Offer::Queued);
        assert_eq!(handle.offer(&frame), Offer::Dropped);
        assert!(queue.slow_signal().is_cancelled());
        assert!(queue.try_recv().is_some());
    }

    #[tokio::test]
    async fn the_byte_bound_counts_too() {
        let (handle, mut queue) = connection_queue(1, "alice", 100, 10);
        let frame = Outbound::Text("123456".into());
        assert_eq!(handle.offer(&frame), Offer::Queued);
        assert_eq!(handle.offer(&frame), Offer::Dropped, "12 bytes exceed 10");
        assert_eq!(queue.recv().await.unwrap().len(), 6);
        assert_eq!(handle.offer(&frame), Offer::Dropped, "slow stays slow");
    }
}
