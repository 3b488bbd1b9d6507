//! The in-process broker of the embedded default: a publish is handed to
//! this node's fan-out before `publish` returns. Nothing leaves the process.
//!
//! Channels whose namespace keeps history get a [`ChannelHistory`]; the
//! append and the hand-over happen under that channel's lock (and a channel
//! always goes to the same fan-out lane), so offsets and delivery order
//! always agree.
//!
//! Bounded by time, not by trust: a sweep every [`SWEEP_INTERVAL`] expires
//! messages past their namespace's `history_ttl` in every channel (not only
//! in channels someone touches), and forgets a channel once it keeps no
//! message, nothing was published or read in it for `history_ttl` (so no
//! client holds a fresher position in it), and it has no subscriber on
//! this node. A forgotten channel starts
//! again with a new epoch (each channel's epoch is unique for its life in
//! this process), so an old position in it is reported unrecoverable rather
//! than misread. Read cursors are kept at most [`MAX_READ_CURSORS`] per
//! user (the least recently moved goes first) and forgotten after
//! [`READ_CURSOR_TTL`] without a move, as in Redis.
//!
//! Presence is the registry itself. Where join/leave events are announced,
//! each user's connections per channel are also counted here, one change at
//! a time, so that simultaneous joins (or leaves) of one user announce
//! exactly once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_core::history::{ChannelHistory, Position};
use herald_core::policy::Policies;
use herald_core::{ChannelName, Publication};

use super::{BoxFuture, Broker, BrokerError, HistoryPage, Placement, ReadCursor};
use crate::fanout::Fanout;
use crate::util::{lock, unix_millis};
use herald_core::registry::Presence;

const SHARDS: usize = 64;

/// How often expired messages and forgotten channels are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Read cursors kept per user; at the bound the least recently moved one
/// is forgotten.
pub const MAX_READ_CURSORS: usize = 1_000;
/// A user's read cursors are forgotten this long after the last move (the
/// same lifetime Redis gives them).
pub const READ_CURSOR_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One user's read cursors by channel name, each with when it last moved.
type UserCursors = HashMap<String, (ReadCursor, Instant)>;

pub struct MemoryBroker {
    fanout: Arc<Fanout>,
    policies: Policies,
    /// This process's epoch; each channel's epoch is it plus a number from
    /// `next_channel`.
    epoch: String,
    next_channel: std::sync::atomic::AtomicU64,
    histories: Box<[Mutex<HashMap<ChannelName, ChannelHistory>>]>,
    hasher: RandomState,
    /// Read cursors by user, then channel.
    cursors: Mutex<HashMap<String, UserCursors>>,
    /// Connections per channel and user, in channels that announce join/leave.
    members: Mutex<HashMap<(ChannelName, String), usize>>,
}

impl MemoryBroker {
    pub fn new(fanout: Arc<Fanout>, policies: Policies) -> Self {
        MemoryBroker {
            fanout,
            policies,
            epoch: crate::util::random_token(6),
            next_channel: std::sync::atomic::AtomicU64::new(1),
            histories: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            cursors: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, ChannelHistory>> {
        &self.histories[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// A new channel's history, in an epoch no earlier life of it had.
    fn new_history(&self) -> ChannelHistory {
        let number = self.next_channel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ChannelHistory::new(format!("{}-{number}", self.epoch))
    }

    /// One sweep (see the module docs); returns the channels and messages
    /// kept afterwards.
    pub fn sweep(&self, now: Instant) -> (usize, usize) {
        let now_ms = unix_millis();
        let (mut channels, mut messages) = (0, 0);
        for shard in &self.histories {
            let mut histories = lock(shard);
            histories.retain(|channel, history| {
                let ttl_ms = self
                    .policies
                    .policy(channel)
                    .map_or(0, |p| p.history_ttl.as_millis() as u64);
                history.expire(ttl_ms, now_ms);
                // Quiet for a whole retention: a position taken in it (a
                // subscribe's, before any message) is that old too.
                !history.is_quiet(ttl_ms, now_ms) || self.fanout.registry.subscriber_count(channel) > 0
            });
            channels += histories.len();
            messages += histories.values().map(ChannelHistory::len).sum::<usize>();
        }
        lock(&self.cursors).retain(|_, cursors| {
            cursors.retain(|_, (_, moved)| now.duration_since(*moved) < READ_CURSOR_TTL);
            !cursors.is_empty()
        });
        (channels, messages)
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `stopped`, reporting what is
    /// kept in `herald_history_channels` / `herald_history_messages`.
    pub async fn sweep_loop(
        self: Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
        stopped: tokio_util::sync::CancellationToken,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (channels, messages) = self.sweep(Instant::now());
            metrics.history_channels.store(channels as i64, Relaxed);
            metrics.history_messages.store(messages as i64, Relaxed);
        }
    }
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        mut publication: Publication,
        _claim: Option<Duration>,
    ) -> BoxFuture<'_, Result<Placement, BrokerError>> {
        let accepted_at = Instant::now();
        let policy = self.policies.history_for(&publication).copied();
        // With history, the append and the hand-over to fan-out happen under
        // the channel's lock, so offsets and delivery order agree.
        let mut guard = None;
        if let Some(policy) = policy {
            let histories = guard.insert(lock(self.shard(&publication.channel)));
            let history = histories
                .entry(publication.channel.clone())
                .or_insert_with(|| self.new_history());
            let max_age = policy.history_ttl.as_millis() as u64;
            history.append(&mut publication, policy.history_size, max_age, unix_millis());
        }
        let placement = Placement {
            offset: publication.offset,
            epoch: publication.epoch.clone(),
            duplicate: false,
        };
        self.fanout.deliver(publication, accepted_at);
        drop(guard);
        Box::pin(std::future::ready(Ok(placement)))
    }

    fn channel_added(&self, _channel: &ChannelName) {}

    fn channel_removed(&self, _channel: &ChannelName) {}

    fn is_ready(&self) -> bool {
        true
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let ttl_ms = self
            .policies
            .policy(channel)
            .map_or(0, |p| p.history_ttl.as_millis() as u64);
        let mut histories = lock(self.shard(channel));
        // A channel nothing was published to yet reads as an empty history,
        // in the epoch its first publish will have (the sweep forgets it
        // again if nothing comes and nobody here subscribes).
        let now_ms = unix_millis();
        let history = histories.entry(channel.clone()).or_insert_with(|| self.new_history());
        // A position read now is held by a client: the channel stays (and
        // keeps its epoch) for at least a retention.
        history.touch(now_ms);
        history.expire(ttl_ms, now_ms);
        let current = history.position();
        let page = match since {
            None => {
                let first = current.offset.saturating_sub(limit as u64);
                HistoryPage {
                    publications: history.after(first, limit),
                    current,
                    recovered: true,
                }
            }
            Some(since) => HistoryPage::from_recovery(history.recover(&since, limit), current),
        };
        Box::pin(std::future::ready(Ok(page)))
    }

    fn set_read_cursor(
        &self,
        user: &str,
        channel: &ChannelName,
        cursor: ReadCursor,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let mut users = lock(&self.cursors);
        let cursors = users.entry(user.to_owned()).or_default();
        let channel = channel.to_string();
        if cursors.len() >= MAX_READ_CURSORS && !cursors.contains_key(&channel) {
            let oldest = cursors
                .iter()
                .min_by_key(|(_, (_, moved))| *moved)
                .map(|(channel, _)| channel.clone());
            if let Some(oldest) = oldest {
                cursors.remove(&oldest);
            }
        }
        cursors.insert(channel, (cursor, Instant::now()));
        Box::pin(std::future::ready(Ok(())))
    }

    fn read_cursors(&self, user: &str) -> BoxFuture<'_, Result<HashMap<String, ReadCursor>, BrokerError>> {
        let cursors = lock(&self.cursors)
            .get(user)
            .map(|cursors| {
                cursors
                    .iter()
                    .map(|(channel, (cursor, _))| (channel.clone(), cursor.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(cursors)))
    }

    fn presence_track(
        &self,
        channel: &ChannelName,
        user: &str,
        _connection: u64,
        joined: bool,
        event: Option<Publication>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        // Presence is the registry itself; only the count is kept here, and
        // the event is handed to fan-out under the same lock as the count.
        if let Some(event) = event {
            let mut members = lock(&self.members);
            let key = (channel.clone(), user.to_owned());
            let connections = members.entry(key.clone()).or_default();
            *connections = if joined {
                *connections + 1
            } else {
                connections.saturating_sub(1)
            };
            let now = *connections;
            if now == 0 {
                members.remove(&key);
            }
            if (joined && now == 1) || (!joined && now == 0) {
                self.fanout.deliver(event, Instant::now());
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn presence(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Presence, BrokerError>> {
        Box::pin(std::future::ready(Ok(self.fanout.registry.presence(channel))))
    }

    fn users_online(&self, users: &[String]) -> BoxFuture<'_, Result<Vec<bool>, BrokerError>> {
        let online = users
            .iter()
            .map(|user| ChannelName::user(user).is_ok_and(|c| self.fanout.registry.subscriber_count(&c) > 0))
            .collect();
        Box::pin(std::future::ready(Ok(online)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn join_and_leave_are_announced_on_each_users_edges_only() {
        let fanout = Arc::new(Fanout::new(Arc::default(), 1));
        let broker = MemoryBroker::new(fanout.clone(), Policies::default());
        let room = ChannelName::parse("room:1").unwrap();
        let event = |kind: &str| {
            Some(Publication {
                channel: room.clone(),
                message_type: kind.into(),
                message_id: kind.into(),
                timestamp_ms: 0,
                offset: None,
                epoch: None,
                payload: herald_core::Payload::Json(serde_json::value::RawValue::from_string("{}".into()).unwrap()),
                from: None,
                exclude_user: None,
                exclude_connection: None,
                ephemeral: true,
            })
        };
        for joined in [true, true, false, false] {
            let kind = if joined { "join" } else { "leave" };
            broker
                .presence_track(&room, "alice", 1, joined, event(kind))
                .await
                .unwrap();
        }
        // Two joins then two leaves of one user: counted 1, 2, 1, 0 whatever
        // the registry holds at the time of each call.
        assert!(lock(&broker.members).is_empty(), "nothing kept for users who left");
        broker.presence_track(&room, "bob", 2, true, None).await.unwrap();
        assert!(lock(&broker.members).is_empty(), "nothing kept where no one counts");
    }

    #[tokio::test]
    async fn read_cursors_are_bounded_per_user_and_expire() {
        let broker = MemoryBroker::new(Arc::new(Fanout::new(Arc::default(), 1)), Policies::default());
        let cursor = |id: usize| ReadCursor {
            message_id: id.to_string(),
            offset: None,
            epoch: None,
        };
        for id in 0..=MAX_READ_CURSORS {
            let channel = ChannelName::parse(&format!("room:{id}")).unwrap();
            broker.set_read_cursor("alice", &channel, cursor(id)).await.unwrap();
        }
        let cursors = broker.read_cursors("alice").await.unwrap();
        assert_eq!(cursors.len(), MAX_READ_CURSORS);
        assert!(!cursors.contains_key("room:0"), "the least recently moved went first");
        assert!(cursors.contains_key(&format!("room:{MAX_READ_CURSORS}")));
        broker.sweep(Instant::now() + READ_CURSOR_TTL);
        assert!(broker.read_cursors("alice").await.unwrap().is_empty());
        assert!(lock(&broker.cursors).is_empty(), "nothing kept for the user");
    }
}
