//! The in-process broker of the embedded default: a publish is delivered to
//! this node's subscribers before `publish` returns. Nothing leaves the process.
//!
//! Channels whose namespace keeps history get a [`ChannelHistory`]; the
//! append and the delivery happen under that channel's lock, so offsets and
//! delivery order always agree. There is one epoch per process: memory
//! history is lost exactly when the process restarts.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use herald_core::history::{ChannelHistory, Position, Recovery};
use herald_core::policy::Policies;
use herald_core::{ChannelName, Publication};

use super::{BoxFuture, Broker, BrokerError, HistoryPage, Placement, ReadCursor};
use crate::fanout::Fanout;
use crate::hub::{lock, unix_millis};
use herald_core::registry::Presence;

const SHARDS: usize = 64;

pub struct MemoryBroker {
    fanout: Arc<Fanout>,
    policies: Policies,
    epoch: String,
    histories: Box<[Mutex<HashMap<ChannelName, ChannelHistory>>]>,
    hasher: RandomState,
    /// Read cursors by user, then channel.
    cursors: Mutex<HashMap<String, HashMap<String, ReadCursor>>>,
}

impl MemoryBroker {
    pub fn new(fanout: Arc<Fanout>, policies: Policies) -> Self {
        MemoryBroker {
            fanout,
            policies,
            epoch: crate::config::random_token(6),
            histories: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            cursors: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, ChannelHistory>> {
        &self.histories[self.hasher.hash_one(channel) as usize % SHARDS]
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, mut publication: Publication) -> BoxFuture<'_, Result<Placement, BrokerError>> {
        let accepted_at = Instant::now();
        let policy = self.policies.history_for(&publication).copied();
        match policy {
            None => {
                self.fanout.deliver(&publication, accepted_at);
            }
            Some(policy) => {
                let mut histories = lock(self.shard(&publication.channel));
                let history = histories
                    .entry(publication.channel.clone())
                    .or_insert_with(|| ChannelHistory::new(self.epoch.clone()));
                let max_age = policy.history_ttl.as_millis() as u64;
                history.append(&mut publication, policy.history_size, max_age, unix_millis());
                self.fanout.deliver(&publication, accepted_at);
            }
        }
        Box::pin(std::future::ready(Ok(Placement {
            offset: publication.offset,
            epoch: publication.epoch,
        })))
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
        let page = match histories.get_mut(channel) {
            None => {
                let current = Position {
                    offset: 0,
                    epoch: self.epoch.clone(),
                };
                let recovered = since.is_none_or(|since| since == current);
                HistoryPage {
                    publications: Vec::new(),
                    current,
                    recovered,
                }
            }
            Some(history) => {
                history.expire(ttl_ms, unix_millis());
                match since {
                    None => {
                        let current = history.position();
                        let first = current.offset.saturating_sub(limit as u64);
                        HistoryPage {
                            publications: history.after(first, limit),
                            current,
                            recovered: true,
                        }
                    }
                    Some(since) => match history.recover(&since, limit) {
                        Recovery::Recovered(publications) => HistoryPage {
                            publications,
                            current: history.position(),
                            recovered: true,
                        },
                        Recovery::Unrecoverable { current } => HistoryPage {
                            publications: Vec::new(),
                            current,
                            recovered: false,
                        },
                    },
                }
            }
        };
        Box::pin(std::future::ready(Ok(page)))
    }

    fn set_read_cursor(
        &self,
        user: &str,
        channel: &ChannelName,
        cursor: ReadCursor,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        lock(&self.cursors)
            .entry(user.to_owned())
            .or_default()
            .insert(channel.to_string(), cursor);
        Box::pin(std::future::ready(Ok(())))
    }

    fn read_cursors(&self, user: &str) -> BoxFuture<'_, Result<HashMap<String, ReadCursor>, BrokerError>> {
        let cursors = lock(&self.cursors).get(user).cloned().unwrap_or_default();
        Box::pin(std::future::ready(Ok(cursors)))
    }

    fn presence_track(
        &self,
        channel: &ChannelName,
        user: &str,
        _connection: u64,
        _joined: bool,
        count: bool,
    ) -> BoxFuture<'_, Result<Option<usize>, BrokerError>> {
        // Presence is the registry itself; only the count costs anything.
        let count = count.then(|| self.fanout.registry.user_connections(channel, user));
        Box::pin(std::future::ready(Ok(count)))
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
