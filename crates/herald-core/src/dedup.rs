//! Idempotent publishing: a publish that repeats a `message_id` on the same
//! channel within the window is delivered once.
//!
//! Bounded twice: entries older than the window are forgotten, and at most
//! `capacity` entries are kept (the oldest go first), so a flood of unique
//! ids cannot grow memory without limit. Past either bound a repeat is
//! delivered again; that is the documented limit of the guarantee. The
//! claim order keeps at most twice `capacity` places: released claims leave
//! stale places behind, which are swept out when that bound is reached.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::channel::ChannelName;

type Key = (ChannelName, String);

/// What a publish with a given id should do.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim<T> {
    /// First time seen: publish, then [`Dedup::complete`] or [`Dedup::release`].
    New,
    /// Seen within the window; carries the first publish's receipt once known.
    Duplicate(Option<T>),
}

pub struct Dedup<T> {
    window: Duration,
    capacity: usize,
    /// Each claimed key with its claim time (which identifies the claim in
    /// `order`) and, once known, the receipt.
    entries: HashMap<Key, (Instant, Option<T>)>,
    /// Keys in the order they were claimed, with the claim time.
    order: VecDeque<(Instant, Key)>,
}

impl<T: Clone> Dedup<T> {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Dedup {
            window,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn claim(&mut self, now: Instant, channel: &ChannelName, message_id: &str) -> Claim<T> {
        self.expire(now);
        let key = (channel.clone(), message_id.to_owned());
        if let Some((_, receipt)) = self.entries.get(&key) {
            return Claim::Duplicate(receipt.clone());
        }
        while self.entries.len() >= self.capacity {
            let Some((claimed_at, oldest)) = self.order.pop_front() else {
                break;
            };
            self.forget(claimed_at, &oldest);
        }
        self.entries.insert(key.clone(), (now, None));
        self.order.push_back((now, key));
        Claim::New
    }

    /// Records the receipt of a claimed publish, for later duplicates.
    pub fn complete(&mut self, channel: &ChannelName, message_id: &str, receipt: T) {
        if let Some((_, slot)) = self.entries.get_mut(&(channel.clone(), message_id.to_owned())) {
            *slot = Some(receipt);
        }
    }

    /// Forgets a claim whose publish failed, so that a retry goes through.
    pub fn release(&mut self, channel: &ChannelName, message_id: &str) {
        self.entries.remove(&(channel.clone(), message_id.to_owned()));
        if self.order.len() >= 2 * self.capacity {
            // At most `capacity` places are live, so this frees at least
            // half of the order and runs at most once per `capacity`
            // releases.
            let entries = &self.entries;
            self.order
                .retain(|(claimed_at, key)| entries.get(key).is_some_and(|(time, _)| time == claimed_at));
        }
    }

    /// Places kept in the claim order (live claims and released ones not
    /// yet swept out).
    pub fn order_len(&self) -> usize {
        self.order.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((claimed_at, _)) = self.order.front() {
            if now.duration_since(*claimed_at) < self.window {
                break;
            }
            let (claimed_at, key) = self.order.pop_front().expect("front exists");
            self.forget(claimed_at, &key);
        }
    }

    /// Removes `key` if it is still the claim made at `claimed_at`; a key
    /// released and claimed again has a newer claim that must survive.
    fn forget(&mut self, claimed_at: Instant, key: &Key) {
        if self.entries.get(key).is_some_and(|(time, _)| *time == claimed_at) {
            self.entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_window_are_duplicates() {
        let start = Instant::now();
        let news = ChannelName::parse("news").unwrap();
        let other = ChannelName::parse("other").unwrap();
        let mut dedup = Dedup::new(Duration::from_secs(10), 100);
        assert_eq!(dedup.claim(start, &news, "a"), Claim::New);
        assert_eq!(dedup.claim(start, &news, "a"), Claim::Duplicate(None));
        dedup.complete(&news, "a", 7u64);
        assert_eq!(dedup.claim(start, &news, "a"), Claim::Duplicate(Some(7)));
        assert_eq!(dedup.claim(start, &other, "a"), Claim::New, "ids are per channel");
        let later = start + Duration::from_secs(10);
        assert_eq!(dedup.claim(later, &news, "a"), Claim::New, "window passed");
    }

    #[test]
    fn released_claims_can_be_retried() {
        let now = Instant::now();
        let news = ChannelName::parse("news").unwrap();
        let mut dedup = Dedup::<u64>::new(Duration::from_secs(10), 100);
        assert_eq!(dedup.claim(now, &news, "a"), Claim::New);
        dedup.release(&news, "a");
        let retry = now + Duration::from_secs(5);
        assert_eq!(dedup.claim(retry, &news, "a"), Claim::New);
        // The retry's window counts from the retry, not the failed attempt.
        let after_first_window = now + Duration::from_secs(12);
        assert_eq!(dedup.claim(after_first_window, &news, "a"), Claim::Duplicate(None));
    }

    #[test]
    fn released_claims_do_not_grow_the_order() {
        let now = Instant::now();
        let news = ChannelName::parse("news").unwrap();
        let mut dedup = Dedup::<u64>::new(Duration::from_secs(60), 10);
        dedup.claim(now, &news, "kept");
        for id in 0..1_000 {
            let id = id.to_string();
            assert_eq!(dedup.claim(now, &news, &id), Claim::New);
            dedup.release(&news, &id);
            assert!(dedup.order_len() <= 20, "{} places after {id}", dedup.order_len());
        }
        assert_eq!(
            dedup.claim(now, &news, "kept"),
            Claim::Duplicate(None),
            "a live claim survives the sweep"
        );
    }

    #[test]
    fn capacity_bounds_memory() {
        let now = Instant::now();
        let news = ChannelName::parse("news").unwrap();
        let mut dedup = Dedup::<u64>::new(Duration::from_secs(10), 3);
        for id in 0..10 {
            assert_eq!(dedup.claim(now, &news, &id.to_string()), Claim::New);
        }
        assert_eq!(dedup.len(), 3);
        assert_eq!(dedup.claim(now, &news, "9"), Claim::Duplicate(None));
        assert_eq!(dedup.claim(now, &news, "0"), Claim::New, "the oldest were evicted");
    }
}
