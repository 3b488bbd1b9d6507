//! A session's state: `Session` (an authenticated connection: who it is,
//! what it is subscribed to, its command gate, the replays under way) and
//! `Recovery` (one replay from history); opening a session, and what
//! subscribing and unsubscribing change. `Drop` unsubscribes everything,
//! however the session ends.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::ChannelName;
use herald_core::frame::{ErrorCode, error_frame, server_frame};
use herald_core::rate_limit::CommandGate;
use herald_core::websocket;
use serde::Serialize;
use tokio::time::Instant;

use super::close::Ending;
use crate::auth::{Identity, unix_now};
use crate::fanout::{ConnectionHandle, ConnectionSocket, Delivery, wire_frame};
use crate::hub::Hub;

/// An authenticated connection.
pub(crate) struct Session<'a> {
    pub(crate) hub: &'a Hub,
    pub(crate) socket: &'a ConnectionSocket,
    pub(super) identity: Identity,
    pub(super) user_channel: ChannelName,
    pub(super) handle: ConnectionHandle,
    /// Channels this connection is subscribed to (the user channel included).
    pub(super) subscriptions: HashSet<ChannelName>,
    /// The subset of `subscriptions` made by the server API, which no token
    /// change revokes.
    pub(super) granted_by_server: HashSet<ChannelName>,
    pub(crate) gate: CommandGate,
    /// Set when the token was replaced by `refresh`.
    pub(crate) expiry_changed: bool,
    /// Recovering subscribes whose missed messages are still being queued,
    /// in the order they were asked; at most one per subscription.
    pub(super) recoveries: VecDeque<Recovery>,
}

/// Unsubscribes everything when the session ends, however it ends.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        let id = self.socket.id();
        for channel in &self.subscriptions {
            self.hub.unsubscribe(channel, id);
        }
        // Presence lives in the broker (maybe Redis): record the departures
        // in a task of their own.
        let tracked: Vec<ChannelName> = self
            .subscriptions
            .drain()
            .filter(|channel| self.hub.tracks_presence(channel))
            .collect();
        if !tracked.is_empty() {
            let (hub, user) = (self.hub.clone(), self.identity.user_id.clone());
            // All at once (one pipelined write in Redis mode): a channel's
            // leave does not wait for another channel's reply.
            self.hub.shutdown.services.spawn(async move {
                let leaves = tracked
                    .into_iter()
                    .map(|channel| hub.presence_changed(channel, user.clone(), id, false));
                futures_util::future::join_all(leaves).await;
            });
        }
    }
}

#[derive(Serialize)]
struct AuthSuccess<'a> {
    user_id: &'a str,
    connection_id: u64,
    expires_at: u64,
    channel: &'a str,
    node_id: &'a str,
}

/// A replay from history: a recovering subscribe's missed messages, queued
/// behind its ack, or a gap's, queued before the live message that showed
/// it; queued as the socket drains, a page at a time. Replay keeps the
/// outgoing queue at most half full (see `ConnectionSocket::replay_room`),
/// so that a long absence does not fill the queue at once and live messages
/// and replies have room. While a replay is under way the connection stays
/// held: live messages wait in the queue and are judged against the
/// position once the replay has caught up.
pub(super) struct Recovery {
    pub(super) channel: ChannelName,
    pub(super) epoch: String,
    /// Read from history, not yet queued, with their offsets (`None`: not
    /// for this connection, the position moves past it): at most one page,
    /// of at most as many messages as the queue had room for when it was read.
    pub(super) pending: VecDeque<(u64, Option<Bytes>)>,
    /// The offset of the last message read from history.
    pub(super) last: u64,
    /// A page came back short: history keeps nothing after `last`; for a
    /// gap, `until` was reached.
    pub(super) caught_up: bool,
    /// For a gap: the last missing offset, and the live message that showed
    /// the gap, queued once the gap is filled or reported.
    pub(super) gap: Option<(u64, Arc<Delivery>)>,
    /// History could not fill the gap: `resync` precedes the live message.
    pub(super) failed: bool,
}

impl Recovery {
    /// Takes a page read after `last`, of at most `limit` messages, for
    /// connection `id` of `user`.
    pub(super) fn add_page(&mut self, publications: Vec<herald_core::Publication>, limit: usize, id: u64, user: &str) {
        self.caught_up = publications.len() < limit;
        if let Some((until, _)) = &self.gap {
            // A short page leaves the gap open: history no longer has it.
            self.failed = publications.len() < limit;
            self.caught_up = self.failed || publications.last().and_then(|p| p.offset) >= Some(*until);
        }
        for publication in publications {
            let Some(offset) = publication.offset else { continue };
            self.last = offset;
            let frame = publication.is_for(id, user).then(|| wire_frame(publication.encode()));
            self.pending.push_back((offset, frame));
        }
    }
}

impl<'a> Session<'a> {
    /// Opens the session of a connection whose token was verified: joins
    /// its personal channel (unless the user already has
    /// `limits.max_connections_per_user` connections here: then `Err`, with
    /// the ending and the error frame to send before closing), records its
    /// presence, and queues `auth_success` once the personal channel is live.
    pub(crate) async fn open(
        socket: &'a ConnectionSocket,
        hub: &'a Hub,
        identity: Identity,
        gate: CommandGate,
    ) -> Result<Session<'a>, (Ending, String)> {
        let user_channel = ChannelName::user(&identity.user_id).expect("the verifier checks the user id");
        let id = socket.id();
        // `auth_success` goes first: fan-out queues behind it until it is sent.
        socket.hold();
        let handle = socket.handle(&identity.user_id);
        match hub.subscribe_user(&user_channel, handle.clone()) {
            Some(_) => {}
            None => {
                hub.metrics.connections_rejected.add("max_per_user", 1);
                let frame = error_frame(None, ErrorCode::LimitExceeded, "too many connections for this user");
                return Err((Ending::TooManyConnections, frame));
            }
        }
        let success = AuthSuccess {
            user_id: &identity.user_id,
            connection_id: id,
            expires_at: identity.expires_at,
            channel: user_channel.as_str(),
            node_id: &hub.node_id,
        };
        let success = server_frame("auth_success", None, success);
        let mut session = Session {
            hub,
            socket,
            user_channel: user_channel.clone(),
            handle,
            subscriptions: HashSet::from([user_channel]),
            granted_by_server: HashSet::new(),
            identity,
            gate,
            expiry_changed: false,
            recoveries: VecDeque::new(),
        };
        tracing::debug!(user_id = %session.identity.user_id, connection_id = id, "connection authenticated");
        // `auth_success` goes out once the personal channel is live.
        hub.subscribed(&session.user_channel).await;
        let (user_channel, user) = (session.user_channel.clone(), session.identity.user_id.clone());
        hub.presence_changed(user_channel, user, id, true).await;
        session.reply(success);
        Ok(session)
    }

    pub(crate) fn reply(&mut self, frame: String) {
        self.socket.send(websocket::text(&frame));
    }

    /// Whether a replay from history is under way.
    pub(crate) fn replaying(&self) -> bool {
        !self.recoveries.is_empty()
    }

    /// When the token expires, with the configured leeway.
    pub(crate) fn expiry_instant(&self) -> Instant {
        // A token may claim any `exp`; cap it so the instant cannot overflow.
        const TEN_YEARS: u64 = 10 * 365 * 86_400;
        let remaining = self.identity.expires_at.saturating_sub(unix_now()).min(TEN_YEARS);
        Instant::now() + Duration::from_secs(remaining) + self.hub.config.jwt.leeway
    }

    /// Registers a subscription and its presence; false if it existed.
    pub(super) async fn add_subscription(&mut self, channel: &ChannelName) -> bool {
        if !self.subscriptions.insert(channel.clone()) {
            // Re-subscribing (e.g. to recover) keeps the registration.
            return false;
        }
        self.hub.subscribe(channel, self.handle.clone());
        if self.hub.tracks_presence(channel) {
            let user = self.identity.user_id.clone();
            self.hub
                .presence_changed(channel.clone(), user, self.socket.id(), true)
                .await;
        }
        true
    }

    /// Removes a subscription and its presence; false if there was none.
    pub(super) async fn remove_subscription(&mut self, channel: &ChannelName) -> bool {
        if !self.subscriptions.remove(channel) {
            return false;
        }
        self.socket.forget_position(channel);
        self.recoveries.retain(|recovery| recovery.channel != *channel);
        self.granted_by_server.remove(channel);
        self.hub.unsubscribe(channel, self.socket.id());
        if self.hub.tracks_presence(channel) {
            let user = self.identity.user_id.clone();
            self.hub
                .presence_changed(channel.clone(), user, self.socket.id(), false)
                .await;
        }
        true
    }
}
