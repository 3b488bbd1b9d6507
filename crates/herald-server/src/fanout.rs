//! Local fan-out: from one publication to the outgoing queue of every local
//! subscriber.
//!
//! The frame is encoded once; each subscriber's queue receives a clone of the
//! same buffer (a reference-count increment). Queues are bounded in messages
//! and bytes; a subscriber whose queue is full is marked slow and its
//! connection closes with 4008. Fan-out never waits on a subscriber.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use herald_core::publication::{Control, EncodedFrame};
use herald_core::registry::{Registry, Subscriber};
use herald_core::{ChannelName, Publication};
use tokio::sync::Notify;

use crate::hub::lock;
use crate::metrics::Metrics;

/// An encoded frame, ready for any number of sockets.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl From<EncodedFrame> for Frame {
    fn from(frame: EncodedFrame) -> Self {
        match frame {
            EncodedFrame::Text(text) => Frame::Text(text.into()),
            EncodedFrame::Binary(bytes) => Frame::Binary(bytes),
        }
    }
}

/// A publication as every subscriber of a node receives it: encoded once,
/// with what a connection needs to keep its place in the channel.
#[derive(Debug)]
pub struct Delivery {
    pub frame: Frame,
    pub channel: ChannelName,
    pub offset: Option<u64>,
    pub epoch: Option<String>,
}

impl Delivery {
    pub fn new(publication: &Publication) -> Self {
        Delivery {
            frame: Frame::from(publication.encode()),
            channel: publication.channel.clone(),
            offset: publication.offset,
            epoch: publication.epoch.clone(),
        }
    }
}

/// An entry in a connection's outgoing queue. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Delivery(Arc<Delivery>),
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
            Outbound::Delivery(delivery) => match &delivery.frame {
                Frame::Text(text) => text.len(),
                Frame::Binary(bytes) => bytes.len(),
            },
            Outbound::Subscribe(_) | Outbound::Unsubscribe(_) => CONTROL_SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the fan-out side and the connection task share.
struct ConnectionShared {
    id: u64,
    user_id: Arc<str>,
    queue: Mutex<QueueState>,
    /// Wakes the connection task when a frame arrives or it falls behind.
    wake: Notify,
    max_messages: usize,
    max_bytes: usize,
}

/// The outgoing queue. A plain deque: it allocates only while frames wait
/// (an idle connection holds no buffer) and is shrunk after a burst.
#[derive(Default)]
struct QueueState {
    frames: VecDeque<Outbound>,
    /// Bytes in `frames`, against `max_bytes`.
    bytes: usize,
    /// Set when a frame did not fit: the connection must be closed.
    slow: bool,
    /// Set when the connection task is gone; offers are refused.
    closed: bool,
}

/// A cheap handle to a live connection, stored in the registry.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

/// The connection task's end of the outgoing queue.
pub struct ConnectionQueue {
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

/// What the connection task takes from its queue.
#[derive(Debug)]
pub enum Next {
    Frame(Outbound),
    /// The client fell behind and must be disconnected.
    FellBehind,
}

/// A queue that held more than this many frames is shrunk once drained.
const SHRINK_ABOVE: usize = 64;

/// Creates the two ends of a connection's bounded outgoing queue.
pub fn connection_queue(
    id: u64,
    user_id: &str,
    max_messages: usize,
    max_bytes: usize,
) -> (ConnectionHandle, ConnectionQueue) {
    let shared = Arc::new(ConnectionShared {
        id,
        user_id: Arc::from(user_id),
        queue: Mutex::new(QueueState::default()),
        wake: Notify::new(),
        max_messages,
        max_bytes,
    });
    (ConnectionHandle(shared.clone()), ConnectionQueue { shared })
}

impl ConnectionHandle {
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Queues `frame` without waiting. A full queue (in messages or bytes)
    /// marks the connection slow; it is closed rather than allowed to lag.
    pub fn offer(&self, frame: &Outbound) -> Offer {
        let shared = &self.0;
        let size = frame.len();
        let mut queue = lock(&shared.queue);
        if queue.closed {
            return Offer::Closed;
        }
        if queue.slow {
            return Offer::Dropped;
        }
        if queue.frames.len() >= shared.max_messages || queue.bytes + size > shared.max_bytes {
            queue.slow = true;
            drop(queue);
            shared.wake.notify_one();
            return Offer::Dropped;
        }
        queue.frames.push_back(frame.clone());
        queue.bytes += size;
        let was_empty = queue.frames.len() == 1;
        drop(queue);
        // Only the first frame of a burst needs to wake the task; it drains
        // everything queued before it sleeps again.
        if was_empty {
            shared.wake.notify_one();
        }
        Offer::Queued
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
    /// Waits for the next frame, or for the news that the client fell behind.
    pub async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            // A wake-up sent between the check above and this wait is kept
            // as a permit by `Notify`, so none is lost.
            self.shared.wake.notified().await;
        }
    }

    /// The next frame if one is queued (or `FellBehind`), without waiting.
    pub fn try_next(&self) -> Option<Next> {
        let mut queue = lock(&self.shared.queue);
        if queue.slow {
            return Some(Next::FellBehind);
        }
        let frame = queue.frames.pop_front()?;
        queue.bytes -= frame.len();
        if queue.frames.is_empty() && queue.frames.capacity() > SHRINK_ABOVE {
            queue.frames = VecDeque::new();
        }
        Some(Next::Frame(frame))
    }

    /// Resolves once fan-out has found this connection too slow.
    pub async fn fell_behind(&self) {
        loop {
            if lock(&self.shared.queue).slow {
                return;
            }
            self.shared.wake.notified().await;
        }
    }
}

impl Drop for ConnectionQueue {
    fn drop(&mut self) {
        let mut queue = lock(&self.shared.queue);
        queue.closed = true;
        queue.frames = VecDeque::new();
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
            None => Outbound::Delivery(Arc::new(Delivery::new(publication))),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &'static str) -> Outbound {
        Outbound::Delivery(Arc::new(Delivery {
            frame: Frame::Text(text.into()),
            channel: ChannelName::parse("news").unwrap(),
            offset: None,
            epoch: None,
        }))
    }

    #[tokio::test]
    async fn a_full_queue_marks_the_connection_slow() {
        let (handle, queue) = connection_queue(1, "alice", 2, 1_000);
        assert_eq!(handle.offer(&frame("12345")), Offer::Queued);
        assert_eq!(handle.offer(&frame("12345")), Offer::Queued);
        assert_eq!(handle.offer(&frame("12345")), Offer::Dropped);
        assert!(matches!(queue.next().await, Next::FellBehind));
        tokio::time::timeout(std::time::Duration::from_secs(1), queue.fell_behind())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_byte_bound_counts_too() {
        let (handle, queue) = connection_queue(1, "alice", 100, 10);
        assert_eq!(handle.offer(&frame("123456")), Offer::Queued);
        assert_eq!(handle.offer(&frame("123456")), Offer::Dropped, "12 bytes exceed 10");
        assert!(
            matches!(queue.try_next(), Some(Next::FellBehind)),
            "slow wins over queued frames"
        );
        assert_eq!(handle.offer(&frame("1")), Offer::Dropped, "slow stays slow");
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_wake_the_waiter() {
        let (handle, queue) = connection_queue(1, "alice", 100, 1_000);
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 3 {
                match queue.next().await {
                    Next::Frame(Outbound::Delivery(delivery)) => match &delivery.frame {
                        Frame::Text(text) => got.push(text.to_string()),
                        Frame::Binary(_) => panic!("text expected"),
                    },
                    other => panic!("unexpected {other:?}"),
                }
            }
            got
        });
        for text in ["a", "b", "c"] {
            assert_eq!(handle.offer(&frame(text)), Offer::Queued);
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn a_dropped_queue_refuses_offers() {
        let (handle, queue) = connection_queue(1, "alice", 100, 1_000);
        drop(queue);
        assert_eq!(handle.offer(&frame("x")), Offer::Closed);
    }
}
