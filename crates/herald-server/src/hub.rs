//! The hub: the node's shared state behind one cheap handle, and the
//! operations every transport uses — admit a connection, subscribe,
//! publish. Transports (WebSocket, HTTP API) translate their input into these
//! calls; nothing here knows about sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use herald_core::dedup::{Claim, Dedup};
use herald_core::policy::Policies;
use herald_core::publication::DEFAULT_MESSAGE_TYPE;
use herald_core::registry::Change;
use herald_core::{ChannelName, Payload, Publication};
use serde::Serialize;

use crate::auth::TokenVerifier;
use crate::broker::{Broker, BrokerError};
use crate::config::{Config, Limits};
use crate::fanout::{ConnectionHandle, Fanout};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A cheap, cloneable handle to the node's shared state.
#[derive(Clone)]
pub struct Hub(Arc<HubInner>);

pub struct HubInner {
    pub config: Arc<Config>,
    pub fanout: Arc<Fanout>,
    pub broker: Arc<dyn Broker>,
    pub verifier: Arc<dyn TokenVerifier>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Random per process; prefixes generated message ids.
    pub node_id: String,
    pub started: Instant,
    dedup: Mutex<Dedup<Receipt>>,
    next_connection_id: AtomicU64,
    next_message_id: AtomicU64,
    connections_per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Users with at least one connection on this node (maintained from the
    /// registry's edges on `user:` channels).
    users_online: AtomicUsize,
    /// The live nodes' stats from the last heartbeat (Redis mode).
    pub cluster: Mutex<Option<ClusterStats>>,
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
    #[error(transparent)]
    Broker(#[from] BrokerError),
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
    ) -> Result<crate::broker::HistoryPage, BrokerError> {
        let since = match since {
            Some(since) => Some(self.resolve(channel, since).await?),
            None => None,
        };
        self.broker.history(channel, since, limit).await
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
    /// the registry) and, on the user's first or last connection in the
    /// channel cluster-wide, publishes `join` or `leave` where the namespace
    /// asks for them.
    pub async fn presence_changed(&self, channel: ChannelName, user: String, connection: u64, joined: bool) {
        let announces = self.policies().policy(&channel).is_ok_and(|p| p.join_leave);
        let count = match self
            .broker
            .presence_track(&channel, &user, connection, joined, announces)
            .await
        {
            Ok(count) => count,
            Err(error) => {
                tracing::debug!(%channel, %error, "presence not recorded");
                return;
            }
        };
        if let Some(count) = count
            && ((joined && count == 1) || (!joined && count == 0))
        {
            self.announce(&channel, &user, joined).await;
        }
    }

    /// Publishes a `join` or `leave` event if `channel`'s namespace wants them.
    pub async fn announce(&self, channel: &ChannelName, user: &str, joined: bool) {
        if !self.policies().policy(channel).is_ok_and(|p| p.join_leave) {
            return;
        }
        let data = serde_json::json!({"user_id": user}).to_string();
        let request = PublishRequest {
            channel: channel.clone(),
            message_type: Some(if joined { "join" } else { "leave" }.to_owned()),
            message_id: None,
            payload: Payload::Json(serde_json::value::RawValue::from_string(data).expect("json! is valid JSON")),
            from: None,
            exclude_user: Some(user.to_owned()),
            exclude_connection: None,
            ephemeral: true,
        };
        let _ = self.publish(request, Source::Client).await;
    }

    /// Publishes through the broker, once per `(channel, message_id)` within
    /// the idempotency window.
    pub async fn publish(&self, request: PublishRequest, source: Source) -> Result<Receipt, PublishError> {
        let max = self.limits().max_message_size;
        if request.payload.len() > max {
            return Err(PublishError::TooLarge(max));
        }
        let given_id = request.message_id.is_some();
        let message_id = request.message_id.unwrap_or_else(|| self.generate_message_id());
        if given_id {
            let claim = lock(&self.dedup).claim(Instant::now(), &request.channel, &message_id);
            if let Claim::Duplicate(receipt) = claim {
                self.metrics.duplicates_suppressed.fetch_add(1, Ordering::Relaxed);
                let mut receipt = receipt.unwrap_or(Receipt {
                    message_id,
                    offset: None,
                    epoch: None,
                    duplicate: false,
                });
                receipt.duplicate = true;
                return Ok(receipt);
            }
            // Other nodes may have taken the same id (a retry sent elsewhere).
            let window = self.config.idempotency.window;
            match self
                .broker
                .claim_message_id(&request.channel, &message_id, window)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    self.metrics.duplicates_suppressed.fetch_add(1, Ordering::Relaxed);
                    return Ok(Receipt {
                        message_id,
                        offset: None,
                        epoch: None,
                        duplicate: true,
                    });
                }
                Err(error) => {
                    lock(&self.dedup).release(&request.channel, &message_id);
                    return Err(error.into());
                }
            }
        }
        let channel = request.channel.clone();
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
        match self.broker.publish(publication).await {
            Ok(placement) => {
                let receipt = Receipt {
                    message_id,
                    offset: placement.offset,
                    epoch: placement.epoch,
                    duplicate: false,
                };
                if given_id {
                    lock(&self.dedup).complete(&channel, &receipt.message_id, receipt.clone());
                }
                let source = match source {
                    Source::Http => "http",
                    Source::Client => "client",
                    Source::Stream => "stream",
                };
                self.metrics.messages_published.add(source, 1);
                Ok(receipt)
            }
            Err(error) => {
                if given_id {
                    lock(&self.dedup).release(&channel, &message_id);
                    self.broker.release_message_id(&channel, &message_id).await;
                }
                Err(error.into())
            }
        }
    }

    fn generate_message_id(&self) -> String {
        let sequence = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        format!("{}-{sequence}", self.node_id)
    }
}

pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Locks a mutex whose sections cannot leave data half-updated.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
