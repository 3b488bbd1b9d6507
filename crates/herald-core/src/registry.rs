//! The subscription registry: which local connections listen to which channel.
//!
//! It is sharded by channel so that subscribes on unrelated channels do not
//! contend. Fan-out walks a snapshot of one channel's subscribers, taken
//! under that shard's lock and walked outside it, so that writing to
//! thousands of sockets never holds up subscribes (or other fan-outs) in the
//! shard. The snapshot is made on the first delivery after a change and
//! shared until the next change, so a stable channel costs one
//! reference-count increment per delivery.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::channel::ChannelName;

/// What the registry needs to know of a subscriber.
pub trait Subscriber: Clone {
    /// Unique among live connections on this node.
    fn connection_id(&self) -> u64;
    fn user_id(&self) -> &str;
}

/// How a subscribe or unsubscribe changed the channel on this node; the
/// broker follows these to hold upstream subscriptions only while needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first local subscriber arrived (or the last one left).
    ChannelEdge,
    /// The channel had (or still has) other local subscribers.
    Unchanged,
    /// The connection was already subscribed (or was not subscribed).
    NoOp,
}

/// Users and connection counts in one channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Each user with the number of their connections, sorted by user id.
    pub users: Vec<(String, usize)>,
    pub connections: usize,
}

/// One channel's local subscribers by connection id, and the snapshot
/// fan-out walks (`None` after a change, until the next delivery).
struct Listeners<S> {
    by_id: HashMap<u64, S>,
    snapshot: Option<Arc<[S]>>,
}

impl<S> Default for Listeners<S> {
    fn default() -> Self {
        Listeners {
            by_id: HashMap::new(),
            snapshot: None,
        }
    }
}

/// One lock's worth of channels.
type Shard<S> = HashMap<ChannelName, Listeners<S>>;

pub struct Registry<S> {
    shards: Box<[Mutex<Shard<S>>]>,
    hasher: RandomState,
}

impl<S: Subscriber> Default for Registry<S> {
    fn default() -> Self {
        Self::new(64)
    }
}

impl<S: Subscriber> Registry<S> {
    /// A registry with `shards` independently locked parts (at least one).
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect();
        Registry {
            shards,
            hasher: RandomState::new(),
        }
    }

    pub fn subscribe(&self, channel: &ChannelName, subscriber: S) -> Change {
        let mut shard = self.shard(channel);
        let listeners = shard.entry(channel.clone()).or_default();
        let was_empty = listeners.by_id.is_empty();
        listeners.snapshot = None;
        match listeners.by_id.insert(subscriber.connection_id(), subscriber) {
            Some(_) => Change::NoOp,
            None if was_empty => Change::ChannelEdge,
            None => Change::Unchanged,
        }
    }

    /// Subscribes unless `channel` already has `max` local subscribers
    /// (checked and updated under one lock); `None` when it is full.
    pub fn subscribe_bounded(&self, channel: &ChannelName, subscriber: S, max: usize) -> Option<Change> {
        let mut shard = self.shard(channel);
        let listeners = shard.entry(channel.clone()).or_default();
        if listeners.by_id.len() >= max && !listeners.by_id.contains_key(&subscriber.connection_id()) {
            if listeners.by_id.is_empty() {
                shard.remove(channel);
            }
            return None;
        }
        let was_empty = listeners.by_id.is_empty();
        listeners.snapshot = None;
        Some(match listeners.by_id.insert(subscriber.connection_id(), subscriber) {
            Some(_) => Change::NoOp,
            None if was_empty => Change::ChannelEdge,
            None => Change::Unchanged,
        })
    }

    pub fn unsubscribe(&self, channel: &ChannelName, connection_id: u64) -> Change {
        let mut shard = self.shard(channel);
        let Some(listeners) = shard.get_mut(channel) else {
            return Change::NoOp;
        };
        if listeners.by_id.remove(&connection_id).is_none() {
            return Change::NoOp;
        }
        listeners.snapshot = None;
        if listeners.by_id.is_empty() {
            shard.remove(channel);
            Change::ChannelEdge
        } else {
            Change::Unchanged
        }
    }

    /// Calls `visit` for every subscriber of `channel`, outside the shard's
    /// lock; returns how many there were.
    pub fn for_each(&self, channel: &ChannelName, mut visit: impl FnMut(&S)) -> usize {
        let Some(subscribers) = self.snapshot(channel) else {
            return 0;
        };
        subscribers.iter().for_each(&mut visit);
        subscribers.len()
    }

    /// The subscribers of `channel` as of now, to walk without the lock.
    pub fn snapshot(&self, channel: &ChannelName) -> Option<Arc<[S]>> {
        let mut shard = self.shard(channel);
        let Listeners { by_id, snapshot } = shard.get_mut(channel)?;
        Some(
            snapshot
                .get_or_insert_with(|| by_id.values().cloned().collect())
                .clone(),
        )
    }

    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        self.shard(channel)
            .get(channel)
            .map_or(0, |listeners| listeners.by_id.len())
    }

    pub fn is_subscribed(&self, channel: &ChannelName, connection_id: u64) -> bool {
        self.shard(channel)
            .get(channel)
            .is_some_and(|listeners| listeners.by_id.contains_key(&connection_id))
    }

    /// The number of channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Every channel with at least one local subscriber.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.shards
            .iter()
            .flat_map(|shard| lock(shard).keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    pub fn presence(&self, channel: &ChannelName) -> Presence {
        let shard = self.shard(channel);
        let Some(subscribers) = shard.get(channel).map(|listeners| &listeners.by_id) else {
            return Presence::default();
        };
        let mut users: HashMap<&str, usize> = HashMap::new();
        for subscriber in subscribers.values() {
            *users.entry(subscriber.user_id()).or_default() += 1;
        }
        let mut users: Vec<(String, usize)> = users.into_iter().map(|(user, n)| (user.to_owned(), n)).collect();
        users.sort();
        Presence {
            users,
            connections: subscribers.len(),
        }
    }

    fn shard(&self, channel: &ChannelName) -> MutexGuard<'_, Shard<S>> {
        let index = self.hasher.hash_one(channel) as usize % self.shards.len();
        lock(&self.shards[index])
    }
}

/// Locks a shard. The sections under these locks never panic midway (they
/// only touch hash maps), so a poisoned lock still guards consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug)]
    struct Conn(u64, &'static str);

    impl Subscriber for Conn {
        fn connection_id(&self) -> u64 {
            self.0
        }
        fn user_id(&self) -> &str {
            self.1
        }
    }

    #[test]
    fn fan_out_walks_a_snapshot_renewed_after_each_change() {
        let registry = Registry::new(1);
        let news = ChannelName::parse("news").unwrap();
        registry.subscribe(&news, Conn(1, "a"));
        let first = registry.snapshot(&news).unwrap();
        assert!(
            Arc::ptr_eq(&first, &registry.snapshot(&news).unwrap()),
            "shared while nothing changes"
        );
        registry.subscribe(&news, Conn(2, "b"));
        assert_eq!(registry.snapshot(&news).unwrap().len(), 2);
        assert_eq!(first.len(), 1, "a snapshot being walked does not change");
        registry.unsubscribe(&news, 1);
        let ids: Vec<u64> = registry.snapshot(&news).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(ids, [2]);
        registry.unsubscribe(&news, 2);
        assert!(registry.snapshot(&news).is_none());
    }

    #[test]
    fn edges_follow_first_and_last_subscriber() {
        let registry = Registry::new(4);
        let news = ChannelName::parse("news").unwrap();
        assert_eq!(registry.subscribe(&news, Conn(1, "a")), Change::ChannelEdge);
        assert_eq!(registry.subscribe(&news, Conn(2, "b")), Change::Unchanged);
        assert_eq!(registry.subscribe(&news, Conn(2, "b")), Change::NoOp);
        assert_eq!(registry.unsubscribe(&news, 1), Change::Unchanged);
        assert_eq!(registry.unsubscribe(&news, 1), Change::NoOp);
        assert_eq!(registry.unsubscribe(&news, 2), Change::ChannelEdge);
        assert_eq!(registry.channel_count(), 0);
    }

    #[test]
    fn fan_out_and_presence() {
        let registry = Registry::new(2);
        let room = ChannelName::parse("group:1").unwrap();
        for (id, user) in [(1, "alice"), (2, "alice"), (3, "bob")] {
            registry.subscribe(&room, Conn(id, user));
        }
        let mut seen = Vec::new();
        assert_eq!(registry.for_each(&room, |c| seen.push(c.0)), 3);
        seen.sort();
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(
            registry.presence(&room),
            Presence {
                users: vec![("alice".into(), 2), ("bob".into(), 1)],
                connections: 3
            }
        );
        assert!(registry.is_subscribed(&room, 3));
        assert!(!registry.is_subscribed(&room, 4));
        assert_eq!(registry.subscribe_bounded(&room, Conn(4, "carol"), 3), None, "full");
        assert_eq!(registry.subscribe_bounded(&room, Conn(3, "bob"), 3), Some(Change::NoOp));
        assert_eq!(
            registry.subscribe_bounded(&room, Conn(4, "carol"), 4),
            Some(Change::Unchanged)
        );
        assert!(registry.is_subscribed(&room, 4));
    }
}
