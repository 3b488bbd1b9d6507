//! The hub: the node's shared state behind one cheap handle, and the
//! operations every transport uses — admit a connection, subscribe,
//! publish. Transports (WebSocket, HTTP API) translate their input into these
//! calls; nothing here knows about sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use herald_core::dedup::{Claim, Dedup};
use herald_core::policy::Policies;
use herald_core::publication::DEFAULT_MESSAGE_TYPE;
use herald_core::registry::{Change, Presence};
use herald_core::{ChannelName, Payload, Publication};
use serde::Serialize;

use crate::auth::TokenVerifier;
use crate::broker::{Broker, BrokerError, HistoryPage, ReadCursor};
use crate::config::{Config, Limits};
use crate::fanout::{ConnectionHandle, Fanout};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::util::{lock, unix_millis};

/// A cheap, cloneable handle to the node's shared state.
#[derive(Clone)]
pub struct Hub(Arc<HubInner>);

/// The node's shared state. The broker and fan-out are private: the hub's
/// methods are the one way from the session, the transports and the API to
/// them (history reads, presence, read cursors included). What stays public
/// is read-only configuration and handles.
pub struct HubInner {
    pub config: Arc<Config>,
    fanout: Arc<Fanout>,
    broker: Arc<dyn Broker>,
    pub verifier: Arc<dyn TokenVerifier>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Random per process; prefixes generated message ids.
    pub node_id: String,
    /// When the node started (`/stats` reports the uptime).
    pub started: Instant,
    dedup: Mutex<Dedup<Receipt>>,
    /// Woken whenever a claim in `dedup` completes or is released, for
    /// repeats waiting on a publish in flight.
    claims_settled: tokio::sync::Notify,
    next_connection_id: AtomicU64,
    next_message_id: AtomicU64,
    connections_per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Users with at least one connection on this node (maintained from the
    /// registry's edges on `user:` channels).
    users_online: AtomicUsize,
    /// The live nodes' stats from the last heartbeat (Redis mode).
    cluster: Mutex<Option<ClusterStats>>,
}

/// Totals over the live nodes of a cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStats {
    pub nodes: usize,
    pub connections: i64,
    /// Summed per node: a user connected to two nodes counts twice.
    pub users_online: i64,
}

impl std::ops::Deref for Hub {
    type Target = HubInner;
    fn deref(&self) -> &HubInner {
        &self.0
    }
}

/// What a publisher asks for.
#[derive(Debug)]
pub struct PublishRequest {
    pub channel: ChannelName,
    pub message_type: Option<String>,
    /// The publisher's id, for idempotency; generated when absent.
    pub message_id: Option<String>,
    pub payload: Payload,
    /// The publishing user, for client-originated messages.
    pub from: Option<String>,
    pub exclude_user: Option<String>,
    pub exclude_connection: Option<u64>,
    /// See [`Publication::ephemeral`].
    pub ephemeral: bool,
}

/// The answer to a publish.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Receipt {
    pub message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// True when this `message_id` was published before within the window
    /// and this publish was not delivered again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("message is larger than {0} bytes")]
    TooLarge(usize),
    /// Not published: retrying later is safe.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Sent to the broker without an answer: it may have been published. A
    /// retry with `message_id` is published at most once.
    #[error("publish outcome unknown ({reason}); retry with message_id `{message_id}`")]
    OutcomeUnknown { message_id: String, reason: String },
}

/// How long a publish whose id is claimed by an earlier publish still in
/// flight waits for that one's outcome: longer than a broker request may
/// take, so that the wait normally ends with the outcome.
const PENDING_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// A publisher-chosen id claimed in this node's window. Dropped without
/// [`complete`](Self::complete) (the publish failed, or its future was
/// dropped), it releases the id so that a retry is not answered
/// "duplicate" for a message that was never published.
struct LocalClaim {
    hub: Hub,
    channel: ChannelName,
    message_id: String,
    completed: bool,
}

impl LocalClaim {
    fn complete(mut self, receipt: Receipt) {
        lock(&self.hub.dedup).complete(&self.channel, &self.message_id, receipt);
        self.completed = true;
        self.hub.claims_settled.notify_waiters();
    }
}

impl Drop for LocalClaim {
    fn drop(&mut self) {
        if !self.completed {
            lock(&self.hub.dedup).release(&self.channel, &self.message_id);
            self.hub.claims_settled.notify_waiters();
        }
    }
}

/// Where a publish came from, for metrics.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Http,
    Client,
    Stream,
}

/// Why a new connection is refused before it is upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MaxConnections,
    MaxPerIp,
    Draining,
}

/// Holds a connection's place in the total and per-IP counts until dropped.
pub struct Admission {
    hub: Hub,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.hub.metrics.connections_current.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = lock(&self.hub.connections_per_ip);
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        fanout: Arc<Fanout>,
        broker: Arc<dyn Broker>,
        verifier: Arc<dyn TokenVerifier>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        node_id: String,
    ) -> Self {
        let dedup = Dedup::new(config.idempotency.window, config.idempotency.capacity);
        Hub(Arc::new(HubInner {
            config,
            fanout,
            broker,
            verifier,
            metrics,
            shutdown,
            node_id,
            started: Instant::now(),
            dedup: Mutex::new(dedup),
            claims_settled: tokio::sync::Notify::new(),
            next_connection_id: AtomicU64::new(1),
            next_message_id: AtomicU64::new(1),
            connections_per_ip: Mutex::new(HashMap::new()),
            users_online: AtomicUsize::new(0),
            cluster: Mutex::new(None),
        }))
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    pub fn policies(&self) -> &Policies {
        &self.config.policies
    }

    /// Takes a place for a new connection from `ip`, or says which limit is hit.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Rejection> {
        if self.shutdown.is_draining() {
            return Err(Rejection::Draining);
        }
        let limits = self.limits();
        // The gauge is the count: one number, released by `Admission::drop`.
        let previous = self.metrics.connections_current.fetch_add(1, Ordering::Relaxed).max(0) as usize;
        let admission = Admission { hub: self.clone(), ip };
        // From here on, dropping `admission` undoes the count.
        let mut per_ip = lock(&self.connections_per_ip);
        let count = per_ip.entry(ip).or_default();
        *count += 1;
        let over_ip = *count > limits.max_connections_per_ip;
        drop(per_ip);
        if previous >= limits.max_connections {
            return Err(Rejection::MaxConnections);
        }
        if over_ip {
            return Err(Rejection::MaxPerIp);
        }
        Ok(admission)
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a local subscription and tells the broker about a new channel.
    pub fn subscribe(&self, channel: &ChannelName, connection: ConnectionHandle) -> Change {
        let change = self.fanout.registry.subscribe(channel, connection);
        if change == Change::ChannelEdge {
            self.channel_gained(channel);
        }
        change
    }

    /// The first local subscriber of `channel` arrived.
    fn channel_gained(&self, channel: &ChannelName) {
        if channel.namespace() == Some("user") {
            self.users_online.fetch_add(1, Ordering::Relaxed);
        }
        self.broker.channel_added(channel);
    }

    /// `channel`'s current position in its history (offset 0 before the
    /// first message); only for channels that keep history.
    pub async fn position(&self, channel: &ChannelName) -> Result<herald_core::history::Position, BrokerError> {
        Ok(self.broker.history(channel, None, 0).await?.current)
    }

    /// A client's position in `channel`: an offset in the epoch it names, or
    /// in the current one when it names none.
    pub async fn resolve(
        &self,
        channel: &ChannelName,
        since: herald_core::frame::StreamPosition,
    ) -> Result<herald_core::history::Position, BrokerError> {
        let epoch = match since.epoch {
            Some(epoch) => epoch,
            None => self.position(channel).await?.epoch,
        };
        Ok(herald_core::history::Position {
            offset: since.offset,
            epoch,
        })
    }

    /// A page of `channel`'s history: what follows `since` (see
    /// [`resolve`](Self::resolve)), or the oldest kept messages.
    pub async fn history(
        &self,
        channel: &ChannelName,
        since: Option<herald_core::frame::StreamPosition>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let since = match since {
            Some(since) => Some(self.resolve(channel, since).await?),
            None => None,
        };
        self.broker.history(channel, since, limit).await
    }

    /// A page of `channel`'s history after a position already resolved
    /// (a replay's next page).
    pub async fn history_after(
        &self,
        channel: &ChannelName,
        since: herald_core::history::Position,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        self.broker.history(channel, Some(since), limit).await
    }

    /// Stores `user`'s read cursor for `channel`.
    pub async fn set_read_cursor(
        &self,
        user: &str,
        channel: &ChannelName,
        cursor: ReadCursor,
    ) -> Result<(), BrokerError> {
        self.broker.set_read_cursor(user, channel, cursor).await
    }

    /// `user`'s read cursors, by channel name.
    pub async fn read_cursors(&self, user: &str) -> Result<HashMap<String, ReadCursor>, BrokerError> {
        self.broker.read_cursors(user).await
    }

    /// Who is in `channel`, cluster-wide.
    pub async fn presence(&self, channel: &ChannelName) -> Result<Presence, BrokerError> {
        self.broker.presence(channel).await
    }

    /// Whether each of `users` has a live connection anywhere in the cluster.
    pub async fn online_status(&self, users: &[String]) -> Result<Vec<bool>, BrokerError> {
        self.broker.users_online(users).await
    }

    /// Resolves once messages published to `channel` from now on will reach
    /// this node; a subscribe is acknowledged to the client after it.
    pub async fn subscribed(&self, channel: &ChannelName) {
        self.broker.subscribed(channel).await
    }

    /// Whether publishes can succeed now (`/ready`).
    pub fn broker_ready(&self) -> bool {
        self.broker.is_ready()
    }

    /// Resolves once requests can be sent to the broker again (at once for
    /// a broker that is always reachable); callers bound the wait.
    pub async fn broker_reachable(&self) {
        self.broker.reachable().await
    }

    /// The channels with subscribers on this node.
    pub fn local_channels(&self) -> Vec<ChannelName> {
        self.fanout.registry.channels()
    }

    /// How many channels have subscribers on this node.
    pub fn local_channel_count(&self) -> usize {
        self.fanout.registry.channel_count()
    }

    /// The live nodes' totals from the last heartbeat (Redis mode).
    pub fn cluster_stats(&self) -> Option<ClusterStats> {
        lock(&self.cluster).clone()
    }

    /// Records the live nodes' totals (the heartbeat, Redis mode).
    pub fn set_cluster_stats(&self, stats: ClusterStats) {
        *lock(&self.cluster) = Some(stats);
    }

    /// Subscribes a new connection to its personal channel, unless the user
    /// already has `limits.max_connections_per_user` connections here.
    pub fn subscribe_user(&self, user_channel: &ChannelName, connection: ConnectionHandle) -> Option<Change> {
        let max = self.limits().max_connections_per_user;
        let change = self.fanout.registry.subscribe_bounded(user_channel, connection, max)?;
        if change == Change::ChannelEdge {
            self.channel_gained(user_channel);
        }
        Some(change)
    }

    pub fn unsubscribe(&self, channel: &ChannelName, connection_id: u64) -> Change {
        let change = self.fanout.registry.unsubscribe(channel, connection_id);
        if change == Change::ChannelEdge {
            if channel.namespace() == Some("user") {
                self.users_online.fetch_sub(1, Ordering::Relaxed);
            }
            self.broker.channel_removed(channel);
        }
        change
    }

    pub fn users_online(&self) -> usize {
        self.users_online.load(Ordering::Relaxed)
    }

    /// Whether presence is recorded for `channel`: personal channels (for
    /// online status) and namespaces with presence or join/leave events.
    pub fn tracks_presence(&self, channel: &ChannelName) -> bool {
        channel.namespace() == Some("user")
            || self
                .policies()
                .policy(channel)
                .is_ok_and(|p| p.presence || p.join_leave)
    }

    /// Records a connection joining or leaving `channel` (already applied to
    /// the registry); on the user's first or last connection in the channel
    /// cluster-wide, the broker announces `join` or `leave` in the same step
    /// where the namespace asks for them (so events keep their order).
    pub async fn presence_changed(&self, channel: ChannelName, user: String, connection: u64, joined: bool) {
        let announces = self.policies().policy(&channel).is_ok_and(|p| p.join_leave);
        let event = announces.then(|| self.presence_event(&channel, &user, joined));
        if let Err(error) = self
            .broker
            .presence_track(&channel, &user, connection, joined, event)
            .await
        {
            tracing::debug!(%channel, %error, "presence not recorded");
        }
    }

    /// Publishes a `join` or `leave` event if `channel`'s namespace wants
    /// them (for users whose node died, found by the sweep).
    pub async fn announce(&self, channel: &ChannelName, user: &str, joined: bool) {
        if !self.policies().policy(channel).is_ok_and(|p| p.join_leave) {
            return;
        }
        let event = self.presence_event(channel, user, joined);
        if let Err(error) = self.broker.publish(event, None).await {
            tracing::debug!(%channel, %error, "presence event not published");
        }
    }

    /// The `join`/`leave` publication for `user` in `channel`: ephemeral,
    /// and not sent to the user's own connections.
    fn presence_event(&self, channel: &ChannelName, user: &str, joined: bool) -> Publication {
        let data = serde_json::json!({"user_id": user}).to_string();
        Publication {
            channel: channel.clone(),
            message_type: if joined { "join" } else { "leave" }.to_owned(),
            message_id: self.generate_message_id(),
            timestamp_ms: unix_millis(),
            offset: None,
            epoch: None,
            payload: Payload::Json(serde_json::value::RawValue::from_string(data).expect("json! is valid JSON")),
            from: None,
            exclude_user: Some(user.to_owned()),
            exclude_connection: None,
            ephemeral: true,
        }
    }

    /// Publishes through the broker, once per `(channel, message_id)` within
    /// the idempotency window.
    ///
    /// A publisher-chosen id is claimed on this node first (a repeat while
    /// the first publish is still in flight waits for its outcome, so that
    /// "duplicate" always means "the first one was published"), then, in
    /// Redis mode, cluster-wide in the same step as the publish itself. The
    /// node's claim is released when the publish fails, or when the
    /// publishing future is dropped before it finished (a client that gave
    /// up): the broker's own claim then decides a retry.
    pub async fn publish(&self, request: PublishRequest, source: Source) -> Result<Receipt, PublishError> {
        let max = self.limits().max_message_size;
        if request.payload.len() > max {
            return Err(PublishError::TooLarge(max));
        }
        let given_id = request.message_id.is_some();
        let message_id = request.message_id.unwrap_or_else(|| self.generate_message_id());
        let local_claim = if given_id {
            match self.claim_locally(&request.channel, &message_id).await? {
                Ok(claim) => Some(claim),
                Err(receipt) => {
                    self.metrics.duplicates_suppressed.fetch_add(1, Ordering::Relaxed);
                    return Ok(receipt);
                }
            }
        } else {
            None
        };
        // Every publish a caller may retry is claimed in the broker, the
        // ones with generated ids too: an "outcome unknown" answer names
        // the id, and a retry with it must be published at most once.
        let broker_claim = (!request.ephemeral).then_some(self.config.idempotency.window);
        let publication = Publication {
            channel: request.channel,
            message_type: request.message_type.unwrap_or_else(|| DEFAULT_MESSAGE_TYPE.to_owned()),
            message_id: message_id.clone(),
            timestamp_ms: unix_millis(),
            offset: None,
            epoch: None,
            payload: request.payload,
            from: request.from,
            exclude_user: request.exclude_user,
            exclude_connection: request.exclude_connection,
            ephemeral: request.ephemeral,
        };
        let placement = match self.broker.publish(publication, broker_claim).await {
            Ok(placement) => placement,
            // Dropping `local_claim` releases it: a retry goes to the broker.
            Err(BrokerError::OutcomeUnknown(reason)) => {
                return Err(PublishError::OutcomeUnknown { message_id, reason });
            }
            Err(error) => return Err(error.into()),
        };
        let receipt = Receipt {
            message_id,
            offset: placement.offset,
            epoch: placement.epoch,
            duplicate: placement.duplicate,
        };
        if let Some(claim) = local_claim {
            claim.complete(Receipt {
                duplicate: false,
                ..receipt.clone()
            });
        }
        if receipt.duplicate {
            self.metrics.duplicates_suppressed.fetch_add(1, Ordering::Relaxed);
        } else {
            let source = match source {
                Source::Http => "http",
                Source::Client => "client",
                Source::Stream => "stream",
            };
            self.metrics.messages_published.add(source, 1);
        }
        Ok(receipt)
    }

    /// Claims `message_id` on `channel` in this node's window: the claim, or
    /// the receipt of the publish that holds it (marked duplicate). While
    /// that publish is in flight this waits for it, at most
    /// [`PENDING_CLAIM_WAIT`], then answers that the outcome is unknown.
    async fn claim_locally(
        &self,
        channel: &ChannelName,
        message_id: &str,
    ) -> Result<Result<LocalClaim, Receipt>, PublishError> {
        let deadline = tokio::time::Instant::now() + PENDING_CLAIM_WAIT;
        loop {
            // Registered before the check, so a settle in between is not missed.
            let settled = self.claims_settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match lock(&self.dedup).claim(Instant::now(), channel, message_id) {
                Claim::New => {
                    return Ok(Ok(LocalClaim {
                        hub: self.clone(),
                        channel: channel.clone(),
                        message_id: message_id.to_owned(),
                        completed: false,
                    }));
                }
                Claim::Duplicate(Some(receipt)) => {
                    return Ok(Err(Receipt {
                        duplicate: true,
                        ..receipt
                    }));
                }
                Claim::Duplicate(None) => {}
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return Err(PublishError::OutcomeUnknown {
                    message_id: message_id.to_owned(),
                    reason: "a publish with this id is still in flight".into(),
                });
            }
        }
    }

    fn generate_message_id(&self) -> String {
        let sequence = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        format!("{}-{sequence}", self.node_id)
    }
}
