//! The broker carries publications between publishers and every node's
//! fan-out. Embedded mode uses [`memory::MemoryBroker`] (this process only);
//! the Redis broker (multi-node) implements the same trait.
//!
//! The broker also learns which channels have local subscribers
//! ([`Broker::channel_added`] / [`Broker::channel_removed`]), so that a
//! networked broker subscribes upstream only to what this node needs.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_core::history::Position;
use herald_core::registry::Presence;
use herald_core::{ChannelName, Publication};

use crate::redis::link::RedisError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a publication landed in its channel's history, when it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub offset: Option<u64>,
    pub epoch: Option<String>,
    /// True when the broker found the message id already claimed (see
    /// [`Broker::publish`]) and did not publish again; `offset`/`epoch`
    /// are then the first publish's, where known.
    pub duplicate: bool,
}

/// How far a user has read in one channel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadCursor {
    pub message_id: String,
    /// The read message's offset and epoch, when the channel keeps history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// The most messages one history read returns.
pub const MAX_HISTORY_PAGE: usize = 1_000;

pub use herald_core::history::HistoryPage;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Retryable: the broker cannot be reached right now; nothing was done.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request reached (or may have reached) the broker and no answer
    /// came: it may have been carried out. A publish in this state is
    /// retried safely only with the same message id.
    #[error("broker did not answer: {0}")]
    OutcomeUnknown(String),
}

impl From<RedisError> for BrokerError {
    fn from(error: RedisError) -> Self {
        match error {
            RedisError::NoReply(message) => BrokerError::OutcomeUnknown(message),
            other => BrokerError::Unavailable(other.to_string()),
        }
    }
}

pub trait Broker: Send + Sync + 'static {
    /// Publishes to every node (this one included). Resolves once the broker
    /// has accepted the message.
    ///
    /// With `claim`, the publication's message id is claimed cluster-wide
    /// for that long, atomically with the publish: if it is already claimed
    /// nothing is published and the placement says `duplicate`. So a
    /// duplicate always means that an earlier publish with this id was
    /// carried out, and a retry after [`BrokerError::OutcomeUnknown`] is
    /// published at most once. The memory broker has no other nodes and
    /// ignores `claim` (the hub's own window is the authority there).
    fn publish(
        &self,
        publication: Publication,
        claim: Option<Duration>,
    ) -> BoxFuture<'_, Result<Placement, BrokerError>>;

    /// The first local subscriber of `channel` arrived.
    fn channel_added(&self, channel: &ChannelName);

    /// The last local subscriber of `channel` left.
    fn channel_removed(&self, channel: &ChannelName);

    /// Resolves once messages published to `channel` from now on will reach
    /// this node (a networked broker waits for its upstream subscription,
    /// within a bound). A subscribe is acknowledged to the client after it.
    fn subscribed(&self, _channel: &ChannelName) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Whether publishes can succeed now (`/ready`).
    fn is_ready(&self) -> bool;

    /// Resolves once requests can be sent to the broker again (a networked
    /// broker's command connection is back after a reconnect); at once for
    /// a broker that is always reachable. Callers bound the wait themselves.
    fn reachable(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Reads `channel`'s history: the messages after `since` (exactly, or
    /// `recovered: false`), or without `since` the latest ones; at most
    /// `limit`. Only for channels whose namespace keeps history.
    fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>>;

    /// Stores `user`'s read cursor for `channel`.
    fn set_read_cursor(
        &self,
        user: &str,
        channel: &ChannelName,
        cursor: ReadCursor,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// All of `user`'s read cursors, by channel name.
    fn read_cursors(&self, user: &str) -> BoxFuture<'_, Result<HashMap<String, ReadCursor>, BrokerError>>;

    /// Records that connection `connection` of `user` joined (or left)
    /// `channel`'s presence (the registry already holds this node's change).
    ///
    /// With `event` (a namespace that announces join/leave), the broker
    /// publishes it in the same step when this change is the user's first
    /// connection in the channel cluster-wide (a join) or its last (a
    /// leave): counting and announcing are one atomic step, so every node
    /// sees a user's joins and leaves in the order they happened, whichever
    /// task or node recorded them. Counting walks the channel's members, so
    /// it happens only where an event is given.
    fn presence_track(
        &self,
        channel: &ChannelName,
        user: &str,
        connection: u64,
        joined: bool,
        event: Option<Publication>,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Who is in `channel`, cluster-wide.
    fn presence(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Presence, BrokerError>>;

    /// Whether each user has at least one live connection, cluster-wide.
    fn users_online(&self, users: &[String]) -> BoxFuture<'_, Result<Vec<bool>, BrokerError>>;
}
