//! The lanes: `Fanout::deliver` hands a publication, encoded once, to its
//! channel's lane, and the lane's task walks the channel's subscribers and
//! offers it to each (`ConnectionHandle::offer_all`). A lane's inbox is
//! bounded (`LaneLimits`).

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use herald_core::Publication;
use herald_core::publication::Control;
use herald_core::registry::{Registry, Subscriber};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{ConnectionHandle, Offers};
use super::outbound::{Delivery, Outbound};
use crate::metrics::Metrics;
use crate::util::lock;

/// Subscribers a lane serves between two yields to the runtime.
const YIELD_EVERY: usize = 2_048;

/// A publication on its way to a lane, with its encoded entry.
struct Pending {
    publication: Publication,
    entry: Outbound,
    accepted_at: Instant,
}

/// One fan-out task's inbox. A channel always maps to the same lane, so its
/// publications are delivered in the order they were handed over.
#[derive(Default)]
struct Lane {
    inbox: Mutex<Inbox>,
    wake: Notify,
}

/// What waits for a lane's task. Bounded by [`LaneLimits`]: it grows only
/// while publications arrive (from the Redis reader or local publishers)
/// faster than the lane delivers them.
#[derive(Default)]
struct Inbox {
    pending: Vec<Pending>,
    /// The encoded size of `pending`, against `LaneLimits::bytes`.
    bytes: usize,
}

/// How much may wait for one lane. At the bound the arriving publication is
/// dropped and counted, once per local subscriber, in
/// `herald_messages_dropped_total{reason="lane_full"}`: in a channel with
/// history the next delivery shows each connection the gap, which is filled
/// from history; elsewhere the loss is that of Pub/Sub (at most once).
/// Waiting instead would stall the Redis reader (and Redis would cut it off
/// at its output buffer limit) or a publisher holding a channel's lock.
#[derive(Debug, Clone, Copy)]
pub struct LaneLimits {
    pub messages: usize,
    pub bytes: usize,
}

impl Default for LaneLimits {
    /// Far above what a lane delivers in a second, far below what would
    /// exhaust memory: 65,536 publications or 256 MiB per lane.
    fn default() -> Self {
        LaneLimits {
            messages: 65_536,
            bytes: 256 << 20,
        }
    }
}

/// The node's subscription registry and the fan-out over it.
///
/// Publications are handed to a lane (one per runtime worker, chosen by
/// channel) and delivered by its task. When a lane falls behind, what
/// waits is taken together and consecutive publications to one channel go
/// to each subscriber in a single write: the busier the node, the fewer
/// syscalls per delivery.
pub struct Fanout {
    pub registry: Registry<ConnectionHandle>,
    metrics: Arc<Metrics>,
    lanes: Box<[Lane]>,
    lane_limits: LaneLimits,
    hasher: RandomState,
}

impl Fanout {
    /// A fan-out with `lanes` lanes (at least one); [`start`](Self::start)
    /// runs them.
    pub fn new(metrics: Arc<Metrics>, lanes: usize) -> Self {
        Self::with_lane_limits(metrics, lanes, LaneLimits::default())
    }

    /// The same, with `lane_limits` bounding each lane's inbox.
    pub fn with_lane_limits(metrics: Arc<Metrics>, lanes: usize, lane_limits: LaneLimits) -> Self {
        Fanout {
            registry: Registry::default(),
            metrics,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            lane_limits,
            hasher: RandomState::new(),
        }
    }

    /// Spawns one task per lane, until `stopped`.
    pub fn start(self: &Arc<Self>, stopped: &CancellationToken, tasks: &TaskTracker) {
        for index in 0..self.lanes.len() {
            tasks.spawn(self.clone().run_lane(index, stopped.clone()));
        }
    }

    /// Hands `publication` to its channel's lane, for every local subscriber
    /// of the channel. `accepted_at` feeds the latency histogram. Never
    /// waits: a full lane drops it (see [`LaneLimits`]).
    pub fn deliver(&self, publication: Publication, accepted_at: Instant) {
        let entry = match publication.control() {
            Some(Control::Subscribe(channel)) => Outbound::Subscribe(channel),
            Some(Control::Unsubscribe(channel)) => Outbound::Unsubscribe(channel),
            None => Outbound::Delivery(Arc::new(Delivery::new(&publication))),
        };
        let lane = &self.lanes[self.hasher.hash_one(&publication.channel) as usize % self.lanes.len()];
        let pending = Pending {
            publication,
            entry,
            accepted_at,
        };
        let size = pending.entry.len();
        let mut inbox = lock(&lane.inbox);
        if inbox.pending.len() >= self.lane_limits.messages || inbox.bytes + size > self.lane_limits.bytes {
            drop(inbox);
            let subscribers = self.registry.subscriber_count(&pending.publication.channel);
            self.metrics.messages_dropped.add("lane_full", subscribers as u64);
            return;
        }
        inbox.pending.push(pending);
        inbox.bytes += size;
        if inbox.pending.len() == 1 {
            drop(inbox);
            lane.wake.notify_one();
        }
    }

    async fn run_lane(self: Arc<Self>, index: usize, stopped: CancellationToken) {
        let lane = &self.lanes[index];
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = lane.wake.notified() => {}
                _ = stopped.cancelled() => return,
            }
            // Let the publishers that are ready run first: whatever they hand
            // over joins this batch.
            tokio::task::yield_now().await;
            {
                let mut inbox = lock(&lane.inbox);
                std::mem::swap(&mut batch, &mut inbox.pending);
                inbox.bytes = 0;
            }
            for run in batch.chunk_by(|a, b| a.publication.channel == b.publication.channel) {
                self.deliver_run(run).await;
            }
            batch.clear();
        }
    }

    /// Delivers consecutive publications to one channel: each subscriber
    /// gets those meant for it in one offer. Every [`YIELD_EVERY`]
    /// subscribers the lane lets the other tasks of its worker run: a
    /// channel with 100,000 subscribers would otherwise hold the worker for
    /// well over 100 ms.
    async fn deliver_run(&self, run: &[Pending]) {
        let mut totals = Offers::default();
        let mut entries: Vec<&Outbound> = Vec::with_capacity(run.len());
        let subscribers = self.registry.snapshot(&run[0].publication.channel);
        let subscribers = subscribers.as_deref().unwrap_or_default();
        for (index, chunk) in subscribers.chunks(YIELD_EVERY).enumerate() {
            if index > 0 {
                tokio::task::yield_now().await;
            }
            for connection in chunk {
                entries.clear();
                let (id, user) = (connection.connection_id(), connection.user_id());
                entries.extend(run.iter().filter(|p| p.publication.is_for(id, user)).map(|p| &p.entry));
                if entries.is_empty() {
                    continue;
                }
                let offers = connection.offer_all(&entries);
                totals.queued += offers.queued;
                totals.dropped += offers.dropped;
                totals.gone += offers.gone;
            }
        }
        self.metrics
            .messages_delivered
            .fetch_add(totals.queued, Ordering::Relaxed);
        if totals.dropped > 0 {
            self.metrics.messages_dropped.add("slow_client", totals.dropped);
        }
        if totals.gone > 0 {
            self.metrics.messages_dropped.add("disconnected", totals.gone);
        }
        for pending in run {
            self.metrics.fanout_latency.observe(pending.accepted_at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::connection::tests::{pair, pair_with_id};
    use crate::fanout::connection::{ConnectionSocket, connection_socket};
    use herald_core::ChannelName;
    use tokio::net::TcpStream;

    fn publication(channel: &str, data: &str) -> Publication {
        Publication {
            channel: ChannelName::parse(channel).unwrap(),
            message_type: "message".into(),
            message_id: "m".into(),
            timestamp_ms: 0,
            offset: None,
            epoch: None,
            payload: herald_core::Payload::Json(serde_json::value::RawValue::from_string(data.into()).unwrap()),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        }
    }

    #[tokio::test]
    async fn a_full_lane_drops_what_arrives_and_counts_it_per_subscriber() {
        let metrics = Arc::new(Metrics::default());
        let limits = LaneLimits {
            messages: 3,
            bytes: 1_000,
        };
        let fanout = Fanout::with_lane_limits(metrics.clone(), 1, limits);
        let (_first, first, _c1) = pair_with_id(1, 10, 10_000).await;
        let (_second, second, _c2) = pair_with_id(2, 10, 10_000).await;
        let news = ChannelName::parse("news").unwrap();
        fanout.registry.subscribe(&news, first);
        fanout.registry.subscribe(&news, second);
        // The lane's task is not running: what arrives waits.
        for _ in 0..5 {
            fanout.deliver(publication("news", "1"), Instant::now());
        }
        assert_eq!(lock(&fanout.lanes[0].inbox).pending.len(), 3, "the message bound");
        assert_eq!(
            metrics.messages_dropped.get("lane_full"),
            2 * 2,
            "two publications, two subscribers"
        );
        // The byte bound: room for three frames.
        let frame_len = Delivery::new(&publication("news", "1")).frame.len();
        let limits = LaneLimits {
            messages: 1_000,
            bytes: 3 * frame_len,
        };
        let fanout = Fanout::with_lane_limits(metrics.clone(), 1, limits);
        for _ in 0..4 {
            fanout.deliver(publication("news", "1"), Instant::now());
        }
        let inbox = lock(&fanout.lanes[0].inbox);
        assert_eq!((inbox.pending.len(), inbox.bytes), (3, 3 * frame_len), "the byte bound");
    }

    /// A lane lets the other tasks of its worker run between every
    /// [`YIELD_EVERY`] subscribers of a run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_big_run_yields_to_the_other_tasks_of_the_worker() {
        let fanout = Arc::new(Fanout::new(Arc::default(), 1));
        let news = ChannelName::parse("news").unwrap();
        // One socket, shared (duplicated descriptors): only the queues matter.
        let (socket, _, _client) = pair(10, 10_000).await;
        let subscriber_count = YIELD_EVERY + 10;
        let mut sockets = Vec::new();
        for id in 0..subscriber_count as u64 {
            let std_stream = socket2::SockRef::from(socket.stream()).try_clone().unwrap();
            let stream = std::net::TcpStream::from(std_stream);
            let connection = connection_socket(id, TcpStream::from_std(stream).unwrap(), 10, 10_000);
            // Held: fan-out queues for the task, writing nothing.
            connection.hold();
            fanout.registry.subscribe(&news, connection.handle("alice"));
            sockets.push(connection);
        }
        let queued = |sockets: &[ConnectionSocket]| {
            sockets
                .iter()
                .filter(|connection| !lock(&connection.shared.state).entries.is_empty())
                .count()
        };
        let sockets = Arc::new(sockets);
        // Runs as soon as the lane yields, and sees how far it got.
        let probe = tokio::spawn({
            let sockets = sockets.clone();
            async move { queued(&sockets) }
        });
        let entry = Outbound::Delivery(Arc::new(Delivery::new(&publication("news", "1"))));
        let run = [Pending {
            publication: publication("news", "1"),
            entry,
            accepted_at: Instant::now(),
        }];
        fanout.deliver_run(&run).await;
        assert_eq!(probe.await.unwrap(), YIELD_EVERY, "the probe ran after the first chunk");
        assert_eq!(queued(&sockets), subscriber_count, "every subscriber got it");
    }
}
