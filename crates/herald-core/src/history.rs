//! A channel's history: its last messages with increasing offsets, and the
//! rules of recovery.
//!
//! Offsets start at 1 and increase by one per message, so a subscriber that
//! holds offset `n` is missing exactly the messages after `n`. The epoch
//! names one unbroken history: when history is lost (a restart of an
//! in-memory node, a Redis restart without persistence) the epoch changes,
//! and a position from the old epoch cannot be recovered.
//!
//! [`ChannelHistory`] is the in-memory store; the Redis backend keeps the same
//! shape in Redis and shares [`recover`], the decision.

use std::collections::VecDeque;

use crate::publication::Publication;

/// Where a subscriber is in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// The answer to "what did I miss since `since`?".
#[derive(Debug, Clone)]
pub enum Recovery {
    /// Exactly the messages after the position, in order (possibly none).
    Recovered(Vec<Publication>),
    /// The position cannot be honoured (another epoch, or messages after it
    /// are no longer kept); `current` is where the channel is now.
    Unrecoverable { current: Position },
}

/// Decides a recovery from what a store holds: `kept` are the retained
/// messages after `since.offset` in order, at most `limit` of them (the
/// store may have dropped older ones), `current` the channel's latest
/// position. Recovered means `kept` continues exactly from `since`: every
/// missed message, or a full first page of them.
pub fn recover(since: &Position, current: Position, kept: Vec<Publication>, limit: usize) -> Recovery {
    if since.epoch != current.epoch || since.offset > current.offset {
        return Recovery::Unrecoverable { current };
    }
    let missing = current.offset - since.offset;
    let contiguous = kept
        .iter()
        .zip(since.offset + 1..)
        .all(|(p, expected)| p.offset == Some(expected));
    let enough = kept.len() as u64 == missing || (kept.len() == limit && (limit as u64) < missing);
    if contiguous && enough {
        Recovery::Recovered(kept)
    } else {
        Recovery::Unrecoverable { current }
    }
}

/// One channel's retained messages, in memory.
#[derive(Debug, Clone)]
pub struct ChannelHistory {
    epoch: String,
    /// The offset of the latest message (0 before the first).
    latest: u64,
    messages: VecDeque<Publication>,
    /// When the history was created or last appended to (ms), so that a
    /// keeper can tell a quiet channel from one just made.
    touched_ms: u64,
}

impl ChannelHistory {
    pub fn new(epoch: String) -> Self {
        ChannelHistory {
            touched_ms: 0,
            epoch,
            latest: 0,
            messages: VecDeque::new(),
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.latest,
            epoch: self.epoch.clone(),
        }
    }

    /// Assigns the next offset and the epoch to `publication`, keeps a copy,
    /// and drops what exceeds `max_size` messages or is older than
    /// `max_age_ms` at `now_ms`.
    pub fn append(&mut self, publication: &mut Publication, max_size: usize, max_age_ms: u64, now_ms: u64) {
        self.touched_ms = now_ms;
        self.latest += 1;
        publication.offset = Some(self.latest);
        publication.epoch = Some(self.epoch.clone());
        self.messages.push_back(publication.clone());
        while self.messages.len() > max_size.max(1) {
            self.messages.pop_front();
        }
        self.expire(max_age_ms, now_ms);
    }

    /// Drops messages older than `max_age_ms`.
    pub fn expire(&mut self, max_age_ms: u64, now_ms: u64) {
        while self
            .messages
            .front()
            .is_some_and(|p| p.timestamp_ms.saturating_add(max_age_ms) < now_ms)
        {
            self.messages.pop_front();
        }
    }

    /// The retained messages after `offset`, at most `limit`.
    pub fn after(&self, offset: u64, limit: usize) -> Vec<Publication> {
        let start = self.messages.partition_point(|p| p.offset.unwrap_or(0) <= offset);
        self.messages.range(start..).take(limit).cloned().collect()
    }

    /// Marks the history as in use at `now_ms` (created, or read for a
    /// position that a client will hold).
    pub fn touch(&mut self, now_ms: u64) {
        self.touched_ms = now_ms;
    }

    /// Whether nothing is retained and nothing happened for `quiet_ms`:
    /// every position a client took in it is as old as that.
    pub fn is_quiet(&self, quiet_ms: u64, now_ms: u64) -> bool {
        self.messages.is_empty() && self.touched_ms.saturating_add(quiet_ms) < now_ms
    }

    /// How many messages are retained.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether nothing is retained (offsets and the epoch remain).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// What recovering from `since` yields now, at most `limit` messages.
    pub fn recover(&self, since: &Position, limit: usize) -> Recovery {
        let kept = if since.epoch == self.epoch {
            self.after(since.offset, limit)
        } else {
            Vec::new()
        };
        recover(since, self.position(), kept, limit)
    }
}

/// A read of a channel's history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Messages after the requested position (or the latest ones), oldest first.
    pub publications: Vec<Publication>,
    /// The channel's position now.
    pub current: Position,
    /// False when the requested position could not be honoured (another
    /// epoch, or messages after it are no longer kept); `publications` is
    /// then empty.
    pub recovered: bool,
}

impl HistoryPage {
    /// The page a recovery decision makes; `current` is the channel's
    /// position it was decided against.
    pub fn from_recovery(recovery: Recovery, current: Position) -> Self {
        match recovery {
            Recovery::Recovered(publications) => HistoryPage {
                publications,
                current,
                recovered: true,
            },
            Recovery::Unrecoverable { current } => HistoryPage {
                publications: Vec::new(),
                current,
                recovered: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChannelName, Payload};
    use serde_json::value::RawValue;

    fn message(timestamp_ms: u64) -> Publication {
        Publication {
            channel: ChannelName::parse("news").unwrap(),
            message_type: "message".into(),
            message_id: format!("m{timestamp_ms}"),
            timestamp_ms,
            offset: None,
            epoch: None,
            payload: Payload::Json(RawValue::from_string("1".into()).unwrap()),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        }
    }

    fn offsets(recovery: &Recovery) -> Option<Vec<u64>> {
        match recovery {
            Recovery::Recovered(messages) => Some(messages.iter().map(|p| p.offset.unwrap()).collect()),
            Recovery::Unrecoverable { .. } => None,
        }
    }

    fn history_of(count: u64, max_size: usize) -> ChannelHistory {
        let mut history = ChannelHistory::new("e1".into());
        for n in 1..=count {
            history.append(&mut message(n), max_size, u64::MAX, n);
        }
        history
    }

    #[test]
    fn offsets_and_epoch_are_assigned() {
        let mut history = ChannelHistory::new("e1".into());
        let mut first = message(1);
        history.append(&mut first, 10, u64::MAX, 1);
        assert_eq!((first.offset, first.epoch.as_deref()), (Some(1), Some("e1")));
        assert_eq!(
            history.position(),
            Position {
                offset: 1,
                epoch: "e1".into()
            }
        );
    }

    #[test]
    fn recovery_outcomes() {
        let history = history_of(10, 5); // keeps offsets 6..=10
        let at = |offset: u64, epoch: &str| Position {
            offset,
            epoch: epoch.into(),
        };
        assert_eq!(offsets(&history.recover(&at(7, "e1"), 100)), Some(vec![8, 9, 10]));
        assert_eq!(
            offsets(&history.recover(&at(5, "e1"), 100)),
            Some(vec![6, 7, 8, 9, 10]),
            "just within"
        );
        assert_eq!(
            offsets(&history.recover(&at(10, "e1"), 100)),
            Some(vec![]),
            "nothing missed"
        );
        assert_eq!(offsets(&history.recover(&at(4, "e1"), 100)), None, "beyond retention");
        assert_eq!(offsets(&history.recover(&at(7, "e0"), 100)), None, "another epoch");
        assert_eq!(offsets(&history.recover(&at(11, "e1"), 100)), None, "from the future");
        assert_eq!(
            offsets(&history.recover(&at(5, "e1"), 2)),
            Some(vec![6, 7]),
            "a full first page"
        );
        match history.recover(&at(4, "e1"), 100) {
            Recovery::Unrecoverable { current } => assert_eq!(current, at(10, "e1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn age_retention_drops_old_messages() {
        let mut history = ChannelHistory::new("e".into());
        for n in 1..=5 {
            history.append(&mut message(n * 1_000), 100, 2_500, n * 1_000);
        }
        assert_eq!(history.after(0, 100).len(), 3, "only the last 2.5 s are kept");
        history.expire(2_500, 100_000);
        assert!(history.is_empty());
        assert_eq!(history.position().offset, 5, "offsets survive expiry");
    }

    #[test]
    fn paging() {
        let history = history_of(10, 100);
        let page: Vec<u64> = history.after(3, 4).iter().map(|p| p.offset.unwrap()).collect();
        assert_eq!(page, [4, 5, 6, 7]);
    }
}
