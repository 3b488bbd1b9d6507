//! The Redis broker: many nodes share one Redis deployment.
//!
//! - A publication is `PUBLISH`ed on `{prefix}ch:{channel}` as a JSON
//!   [`WireMessage`] and reaches every node subscribed to that channel,
//!   the publishing node included (one path for everyone, in Redis order).
//! - Each node subscribes only to the channels that have local subscribers
//!   (see [`crate::redis::pubsub`]); routes (`herald_core::route`) adopt existing publishers' Redis
//!   channels and payloads.
//! - Streams ingest (`crate::cluster::streams`, a service over the hub)
//!   consumes `{prefix}publish` with a consumer
//!   group shared by the nodes, read by one node at a time (a lease).
//!
//! - Readiness is proven, not assumed: every connection is health-checked
//!   ([`crate::redis::link::Health`]) and the node hears its own probes ([`probe`]).
//!
//! Pub/Sub is at-most-once: a message published while a node is
//! disconnected from Redis does not reach that node's clients. Publishing
//! while Redis is unreachable fails (HTTP 503), it is never accepted and lost.

pub mod history;
pub mod keys;
pub mod presence;
pub mod probe;
pub mod wire;

pub use wire::{WireMessage, decode_wire, encode_wire, payload};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::policy::Policies;
use herald_core::registry::Presence;
use herald_core::resp::Value;
use herald_core::{ChannelName, Publication};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::keys::Keys;
use super::{BoxFuture, Broker, BrokerError, Placement, ReadCursor};
use crate::config::RedisConfig;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::redis::link::RedisLink;
use crate::redis::pubsub::{self, PubSub};
use crate::util::unix_millis;

pub struct RedisBroker {
    config: Arc<RedisConfig>,
    keys: Keys,
    /// Set by the first successful heartbeat: until then this node's
    /// connections would not count in presence.
    heartbeat_ok: std::sync::atomic::AtomicBool,
    policies: Policies,
    node_id: String,
    link: RedisLink,
    pubsub: PubSub,
    probe: Arc<probe::Probe>,
}

impl RedisBroker {
    /// Connects (in the background) and starts the Pub/Sub task, which
    /// delivers what arrives to `fanout`.
    pub fn start(
        config: RedisConfig,
        policies: Policies,
        node_id: String,
        fanout: Arc<Fanout>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let config = Arc::new(config);
        let link = RedisLink::start(
            "commands",
            config.address.clone(),
            metrics.clone(),
            shutdown.clone(),
            tracker,
        );
        let patterns = config
            .routes
            .iter()
            .map(|route| Bytes::from(route.pattern.clone()))
            .collect();
        let keys = Keys::new(&config.prefix);
        let probe = Arc::new(probe::Probe::new(keys.probe(&node_id)));
        let handler = inbound_handler(
            config.clone(),
            &keys,
            node_id.clone(),
            probe.clone(),
            fanout,
            metrics.clone(),
        );
        let pubsub = PubSub::start(
            config.address.clone(),
            patterns,
            handler,
            metrics.clone(),
            shutdown.clone(),
            tracker,
        );
        pubsub.subscribe(probe.key.clone());
        tracker.spawn(probe.clone().run(link.clone(), pubsub.clone(), metrics, shutdown));
        RedisBroker {
            config,
            keys,
            heartbeat_ok: std::sync::atomic::AtomicBool::new(false),
            policies,
            node_id,
            link,
            pubsub,
            probe,
        }
    }
}

/// Turns Redis messages into local deliveries.
fn inbound_handler(
    config: Arc<RedisConfig>,
    keys: &Keys,
    node_id: String,
    probe: Arc<probe::Probe>,
    fanout: Arc<Fanout>,
    metrics: Arc<Metrics>,
) -> pubsub::Handler {
    let channel_prefix = keys.channel_prefix();
    let counter = Arc::new(AtomicU64::new(1));
    Arc::new(move |redis_channel: &[u8], payload: Bytes| {
        // Before routes: a route pattern may match the probe channel too.
        if redis_channel == probe.key {
            probe.heard(&payload);
            return;
        }
        let received_at = Instant::now();
        let next_id = || format!("{node_id}-r{}", counter.fetch_add(1, Ordering::Relaxed));
        let name = String::from_utf8_lossy(redis_channel);
        let publications = match name.strip_prefix(channel_prefix.as_str()) {
            Some(channel) => ChannelName::parse(channel)
                .map_err(|e| e.to_string())
                .and_then(|channel| decode_wire(channel, &payload, &node_id, next_id))
                .map(|publication| vec![publication]),
            None => match config
                .routes
                .iter()
                .find_map(|route| Some((route, route.matches(&name)?)))
            {
                Some((route, captures)) => route.publications(&captures, &payload, next_id, crate::util::unix_millis()),
                None => Ok(Vec::new()),
            },
        };
        match publications {
            Ok(publications) => {
                for publication in publications {
                    fanout.deliver(publication, received_at);
                }
            }
            Err(error) => {
                metrics.messages_dropped.add("invalid", 1);
                tracing::debug!(redis_channel = %name, %error, "dropped an invalid message from redis");
            }
        }
    })
}

/// How long a user's read cursors outlive their last move (30 days).
const READ_CURSOR_TTL_MS: &str = "2592000000";

impl RedisBroker {
    fn node_timeout_ms(&self) -> String {
        self.config.node_timeout.as_millis().to_string()
    }

    /// Live presence entries of `channel` as (field, user), and the users
    /// whose last entry this call removed because their node died.
    pub async fn presence_sweep(
        &self,
        channel: &ChannelName,
        delete_dead: bool,
    ) -> Result<(Vec<(String, String)>, Vec<String>), BrokerError> {
        let key = self.keys.presence(channel);
        let (nodes, now, timeout) = (self.keys.nodes(), unix_millis().to_string(), self.node_timeout_ms());
        let delete = if delete_dead { "1" } else { "0" };
        let args: Vec<&str> = vec![&key, &nodes, &now, &timeout, delete];
        let reply = self.link.eval(&presence::QUERY_LUA, 2, &args).await?;
        let parts = reply.as_array().unwrap_or_default();
        let strings = |value: Option<&Value>| -> Vec<String> {
            value
                .and_then(Value::as_array)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let flat = strings(parts.first());
        let entries = flat
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
            .collect();
        Ok((entries, strings(parts.get(1))))
    }

    /// Records this node's heartbeat with its stats; returns every live
    /// node's stats and the nodes this call found dead.
    pub async fn heartbeat(
        &self,
        stats: &serde_json::Value,
    ) -> Result<(Vec<serde_json::Value>, Vec<String>), BrokerError> {
        let stats_key = self.keys.node_stats();
        let (nodes, now, timeout) = (self.keys.nodes(), unix_millis().to_string(), self.node_timeout_ms());
        let stats = stats.to_string();
        let args: Vec<&str> = vec![&nodes, &stats_key, &self.node_id, &now, &stats, &timeout];
        let reply = self.link.eval(&presence::HEARTBEAT_LUA, 2, &args).await?;
        self.heartbeat_ok.store(true, Ordering::Relaxed);
        let parts = reply.as_array().unwrap_or_default();
        let live = parts
            .first()
            .and_then(Value::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|v| serde_json::from_slice(v.as_bytes()?).ok())
            .collect();
        let dead = parts
            .get(1)
            .and_then(Value::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        Ok((live, dead))
    }

    /// Every channel with a presence hash in Redis, walked with `SCAN` (a
    /// few keys per round trip, never one blocking `KEYS`).
    pub async fn presence_channels(&self) -> Result<Vec<ChannelName>, BrokerError> {
        let prefix = self.keys.presence_prefix();
        let pattern = format!("{prefix}*");
        let mut cursor = "0".to_owned();
        let mut channels = Vec::new();
        loop {
            let reply = self
                .link
                .call(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .await?;
            let parts = reply.as_array().unwrap_or_default();
            cursor = parts.first().and_then(Value::as_str).unwrap_or("0").to_owned();
            for key in parts.get(1).and_then(Value::as_array).unwrap_or_default() {
                if let Some(channel) = key
                    .as_str()
                    .and_then(|key| key.strip_prefix(prefix.as_str()))
                    .and_then(|name| ChannelName::parse(name).ok())
                {
                    channels.push(channel);
                }
            }
            if cursor == "0" {
                return Ok(channels);
            }
        }
    }
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        publication: Publication,
        claim: Option<Duration>,
    ) -> BoxFuture<'_, Result<Placement, BrokerError>> {
        let key = self.keys.channel(&publication.channel);
        let payload = encode_wire(&publication, &self.node_id);
        let policy = self.policies.history_for(&publication).copied();
        // The claim's key and lifetime; a history publish without a claim
        // passes an empty key that the script never touches.
        let (claim_key, claim_ms) = match claim {
            Some(window) => (
                self.keys.dedup(&publication.channel, &publication.message_id),
                Some(window.as_millis().max(1).to_string()),
            ),
            None => (String::new(), None),
        };
        Box::pin(async move {
            let unexpected = || BrokerError::Unavailable("unexpected publish reply".into());
            let Some(policy) = policy else {
                let Some(claim_ms) = claim_ms else {
                    self.link.call(&[&b"PUBLISH"[..], &key, &payload]).await?;
                    return Ok(Placement::default());
                };
                let args: Vec<&[u8]> = vec![&key, claim_key.as_bytes(), &payload, claim_ms.as_bytes()];
                let reply = self.link.eval(&history::PUBLISH_ONCE_LUA, 2, &args).await?;
                return history::placement(&reply).ok_or_else(unexpected);
            };
            let [history, offset, epoch] = self.keys.history(&publication.channel);
            let (max_len, ttl) = (
                policy.history_size.to_string(),
                policy.history_ttl.as_millis().to_string(),
            );
            let fresh_epoch = crate::util::random_token(6);
            let args: Vec<&[u8]> = vec![
                history.as_bytes(),
                offset.as_bytes(),
                epoch.as_bytes(),
                &key,
                claim_key.as_bytes(),
                &payload,
                max_len.as_bytes(),
                ttl.as_bytes(),
                fresh_epoch.as_bytes(),
                history::POSITION_TTL_MS.as_bytes(),
                claim_ms.as_deref().unwrap_or_default().as_bytes(),
            ];
            let reply = self.link.eval(&history::PUBLISH_LUA, 5, &args).await?;
            history::placement(&reply).ok_or_else(unexpected)
        })
    }

    fn channel_added(&self, channel: &ChannelName) {
        self.pubsub.subscribe(self.keys.channel(channel));
    }

    fn channel_removed(&self, channel: &ChannelName) {
        self.pubsub.unsubscribe(self.keys.channel(channel));
    }

    fn subscribed(&self, channel: &ChannelName) -> BoxFuture<'_, ()> {
        let key = self.keys.channel(channel);
        Box::pin(async move {
            let _ = tokio::time::timeout(self.config.subscribe_timeout, self.pubsub.confirmed(key)).await;
        })
    }

    fn is_ready(&self) -> bool {
        self.link.is_up() && self.pubsub.is_up() && self.heartbeat_ok.load(Ordering::Relaxed) && self.probe.is_ok()
    }

    fn reachable(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.link.until_up())
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: Option<herald_core::history::Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<super::HistoryPage, BrokerError>> {
        let channel = channel.clone();
        let ttl = self.policies.policy(&channel).map_or(Duration::ZERO, |p| p.history_ttl);
        Box::pin(async move {
            let [history, offset, epoch] = self.keys.history(&channel);
            let fresh_epoch = crate::util::random_token(6);
            let ttl_ms = history::POSITION_TTL_MS.to_owned();
            let after = since.as_ref().map(|s| s.offset.to_string()).unwrap_or_default();
            let count = limit.to_string();
            let args: Vec<&str> = vec![&history, &offset, &epoch, &fresh_epoch, &ttl_ms, &after, &count];
            let reply = self.link.eval(&history::READ_LUA, 3, &args).await?;
            history::page(&channel, &reply, since, limit, ttl.as_millis() as u64, &self.node_id)
                .map_err(BrokerError::Unavailable)
        })
    }

    fn set_read_cursor(
        &self,
        user: &str,
        channel: &ChannelName,
        cursor: ReadCursor,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let key = self.keys.read_cursors(user);
        let (field, value) = (
            channel.to_string(),
            serde_json::to_string(&cursor).expect("cursors serialize"),
        );
        Box::pin(async move {
            // Issued together (one pipelined write): a user's cursors live
            // READ_CURSOR_TTL after the last move, then Redis forgets them.
            let ttl = READ_CURSOR_TTL_MS;
            let (set, expire) = futures_util::future::join(
                self.link.call(&["HSET", &key, &field, &value]),
                self.link.call(&["PEXPIRE", &key, ttl]),
            )
            .await;
            set?;
            expire?;
            Ok(())
        })
    }

    fn read_cursors(&self, user: &str) -> BoxFuture<'_, Result<HashMap<String, ReadCursor>, BrokerError>> {
        let key = self.keys.read_cursors(user);
        Box::pin(async move {
            let reply = self.link.call(&["HGETALL", &key]).await?;
            let items = reply.as_array().unwrap_or_default();
            Ok(items
                .chunks(2)
                .filter_map(|pair| {
                    let channel = pair.first()?.as_str()?.to_owned();
                    let cursor = serde_json::from_slice(pair.get(1)?.as_bytes()?).ok()?;
                    Some((channel, cursor))
                })
                .collect())
        })
    }

    fn presence_track(
        &self,
        channel: &ChannelName,
        user: &str,
        connection: u64,
        joined: bool,
        event: Option<Publication>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let key = self.keys.presence(channel);
        let pubsub_key = self.keys.channel(channel);
        let field = format!("{}:{connection}", self.node_id);
        let user = user.to_owned();
        let event = event
            .map(|event| encode_wire(&event, &self.node_id))
            .unwrap_or_default();
        Box::pin(async move {
            let nodes = self.keys.nodes();
            let (now, timeout) = (unix_millis().to_string(), self.node_timeout_ms());
            let joined: &[u8] = if joined { b"1" } else { b"0" };
            let args: Vec<&[u8]> = vec![
                key.as_bytes(),
                nodes.as_bytes(),
                &pubsub_key,
                field.as_bytes(),
                user.as_bytes(),
                joined,
                now.as_bytes(),
                timeout.as_bytes(),
                &event,
            ];
            self.link.eval(&presence::TRACK_LUA, 3, &args).await?;
            Ok(())
        })
    }

    fn presence(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Presence, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let (entries, _) = self.presence_sweep(&channel, false).await?;
            let mut users: HashMap<String, usize> = HashMap::new();
            for (_, user) in &entries {
                *users.entry(user.clone()).or_default() += 1;
            }
            let mut users: Vec<(String, usize)> = users.into_iter().collect();
            users.sort();
            Ok(Presence {
                users,
                connections: entries.len(),
            })
        })
    }

    fn users_online(&self, users: &[String]) -> BoxFuture<'_, Result<Vec<bool>, BrokerError>> {
        let channels: Vec<Option<ChannelName>> = users.iter().map(|u| ChannelName::user(u).ok()).collect();
        Box::pin(async move {
            // Issued together, the reads share one pipelined write.
            let reads = channels.iter().map(|channel| async move {
                match channel {
                    Some(channel) => self
                        .presence_sweep(channel, false)
                        .await
                        .map(|(entries, _)| !entries.is_empty()),
                    None => Ok(false),
                }
            });
            futures_util::future::join_all(reads).await.into_iter().collect()
        })
    }
}
