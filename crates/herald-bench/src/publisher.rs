//! The open-loop publisher: message `i` is due at `t0 + i / rate` whatever
//! happened to the messages before it, and carries that intended time in its
//! payload, so a publisher that stalls shows up as latency instead of hiding
//! it. Requests go over a small pool of keep-alive HTTP/1.1 connections per
//! node (message `i` to node `i % nodes`), or straight into Redis over a
//! few pipelined connections ([`crate::redis`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::accounting::{REQUEST_TIMEOUT, SharedFailures, lock_failures};
use crate::config::{BenchConfig, PublishVia, RedisTarget, Scenario, Target, Url, render_template};
use crate::net::{tcp_connect, unix_nanos_now};
use crate::payload;
use crate::redis::{RedisCommand, RedisPool};

/// How far ahead of the first message the schedule starts, so that the
/// first messages are not already late.
const START_DELAY: Duration = Duration::from_millis(20);

/// One keep-alive HTTP/1.1 connection.
pub type HttpConnection = SendRequest<Full<Bytes>>;

/// Where the publisher sends messages.
#[derive(Debug, Clone)]
pub enum PublishTarget {
    Herald {
        /// Publishes go round-robin to these nodes.
        nodes: Vec<Url>,
        api_key: String,
    },
    Peer {
        /// The `--pub-url` template.
        pub_url: String,
        /// The template's server (the same for every channel).
        server: Url,
    },
    /// Straight into the Redis that Herald nodes share.
    Redis { redis: RedisTarget, command: RedisCommand },
}

impl PublishTarget {
    /// Where `config` publishes.
    pub fn from_config(config: &BenchConfig) -> anyhow::Result<Self> {
        if let Some(command) = RedisCommand::for_via(config.publish_via) {
            let redis = config
                .redis
                .clone()
                .with_context(|| format!("--publish-via {} needs --redis-url", config.publish_via.name()))?;
            return Ok(PublishTarget::Redis { redis, command });
        }
        debug_assert_eq!(config.publish_via, PublishVia::Http);
        Self::from_target(&config.target)
    }

    /// HTTP publishing to `target`.
    fn from_target(target: &Target) -> anyhow::Result<Self> {
        Ok(match target {
            Target::Herald { nodes, api_key, .. } => PublishTarget::Herald {
                nodes: nodes.clone(),
                api_key: api_key.clone(),
            },
            Target::Peer { pub_url, .. } => PublishTarget::Peer {
                pub_url: pub_url.clone(),
                server: render_template(pub_url, "x")?,
            },
        })
    }

    /// The HTTP servers publishes go to, round-robin.
    fn http_servers(&self) -> Vec<SocketAddr> {
        match self {
            PublishTarget::Herald { nodes, .. } => nodes.iter().map(|node| node.address).collect(),
            PublishTarget::Peer { server, .. } => vec![server.address],
            PublishTarget::Redis { .. } => Vec::new(),
        }
    }
}

/// Which channel each message goes to.
#[derive(Debug, Clone)]
pub enum ChannelChoice {
    /// Every message to one channel.
    Fixed(String),
    /// Each message to `user:u{K}` for a random K below `users`.
    RandomUser { users: usize },
}

impl ChannelChoice {
    pub fn for_scenario(scenario: Scenario, connections: usize) -> Self {
        match scenario {
            Scenario::Notify => ChannelChoice::RandomUser { users: connections },
            _ => ChannelChoice::Fixed(crate::config::BROADCAST_CHANNEL.to_owned()),
        }
    }
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub rate: f64,
    pub total: u64,
    pub payload_bytes: usize,
    pub channels: ChannelChoice,
    /// Size of the connection pool: HTTP connections in all (at least one
    /// per node), or Redis connections.
    pub connections: usize,
}

/// What was published: what receivers must be held to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Per channel, how many messages were sent (sequence numbers `0..n`).
    pub published: BTreeMap<String, u64>,
    /// Per channel, the sequence numbers the server refused or that failed:
    /// not expected at the receivers.
    pub failed: BTreeMap<String, Vec<u64>>,
}

/// How the publishing went.
#[derive(Debug, Clone, Default)]
pub struct PublishOutcome {
    pub counts: Published,
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// When message 0 was due, Unix nanoseconds.
    pub started_unix_nanos: u64,
    /// The largest delay between a message's due time and its send.
    pub max_lag: Duration,
    /// HTTP publishes sent to each node (empty when publishing into Redis).
    pub per_node: Vec<u64>,
    /// Redis Pub/Sub only: publishes that `PUBLISH` said reached no
    /// subscriber (not errors, but nobody could deliver them).
    pub zero_receivers: Option<u64>,
}

type SlotSender = mpsc::Sender<Option<HttpConnection>>;
type SlotReceiver = mpsc::Receiver<Option<HttpConnection>>;

/// HTTP connection pools, one per server; a slot is a connection (or
/// `None`: open a new one when used).
struct HttpPools {
    servers: Vec<SocketAddr>,
    idle: Vec<(SlotSender, SlotReceiver)>,
    /// Slots per server.
    sizes: Vec<usize>,
}

impl HttpPools {
    /// Opens `connections` connections in all, connection `j` to server
    /// `j % servers`, at least one per server.
    async fn open(servers: Vec<SocketAddr>, connections: usize) -> anyhow::Result<HttpPools> {
        let total = connections.max(servers.len());
        let sizes: Vec<usize> = (0..servers.len())
            .map(|server| (server..total).step_by(servers.len()).count())
            .collect();
        let mut idle = Vec::with_capacity(servers.len());
        for (address, &size) in servers.iter().zip(&sizes) {
            let (sender, receiver) = mpsc::channel(size);
            for _ in 0..size {
                let connection = connect(*address)
                    .await
                    .with_context(|| format!("publisher connection to {address}"))?;
                sender
                    .send(Some(connection))
                    .await
                    .expect("the pool has room for every connection");
            }
            idle.push((sender, receiver));
        }
        Ok(HttpPools { servers, idle, sizes })
    }

    /// Waits until every slot is back: nothing is in flight any more.
    async fn drain(&mut self) {
        for ((_, receiver), &size) in self.idle.iter_mut().zip(&self.sizes) {
            for _ in 0..size {
                receiver.recv().await.expect("the pool holds a sender");
            }
        }
    }
}

/// Publishes `plan` to `target` on its schedule and waits for every request
/// to be answered.
pub async fn publish(target: &PublishTarget, plan: &PublishPlan) -> anyhow::Result<PublishOutcome> {
    let failures = SharedFailures::default();
    let mut http = None;
    let mut redis = None;
    match target {
        PublishTarget::Redis { redis: server, command } => {
            redis = Some(RedisPool::open(server, *command, plan.connections, failures.clone()).await?);
        }
        _ => http = Some(HttpPools::open(target.http_servers(), plan.connections).await?),
    }
    let mut per_node = vec![0u64; http.as_ref().map_or(0, |pools| pools.servers.len())];
    let mut sequences = ChannelSequences::new(&plan.channels);
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    let mut max_lag = Duration::ZERO;
    let start = Instant::now() + START_DELAY;
    let started_unix_nanos = unix_nanos_now() + START_DELAY.as_nanos() as u64;
    for index in 0..plan.total {
        let offset = Duration::from_secs_f64(index as f64 / plan.rate);
        tokio::time::sleep_until((start + offset).into()).await;
        let intended = started_unix_nanos + offset.as_nanos() as u64;
        if let Some(pool) = &redis {
            // Waits only while the connection's queue is full.
            let permit = pool.reserve(index).await;
            max_lag = max_lag.max(Instant::now().saturating_duration_since(start + offset));
            let (channel, sequence) = sequences.next();
            let body = payload::build(sequence, intended, plan.payload_bytes);
            pool.send(permit, channel, sequence, &body);
            continue;
        }
        let pools = http.as_mut().expect("HTTP when not Redis");
        let node = (index % pools.servers.len() as u64) as usize;
        let address = pools.servers[node];
        let slot = pools.idle[node].1.recv().await.expect("the publisher holds a sender");
        max_lag = max_lag.max(Instant::now().saturating_duration_since(start + offset));
        per_node[node] += 1;
        let (channel, sequence) = sequences.next();
        let body = payload::build(sequence, intended, plan.payload_bytes);
        let request = build_request(target, node, &channel, body, &mut paths)?;
        let idle_sender = pools.idle[node].0.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let (connection, result) = send(slot, address, request).await;
            if let Err(error) = result {
                lock_failures(&failures).record(&channel, sequence, error);
            }
            // The pool holds exactly its size in slots, so this never waits.
            let _ = idle_sender.send(connection).await;
        });
    }
    // Every request gives its slot back when answered (every Redis
    // connection ends once its replies are in): then none is in flight.
    let zero_receivers = match redis {
        Some(pool) => pool.finish().await,
        None => {
            http.as_mut().expect("HTTP when not Redis").drain().await;
            None
        }
    };
    let failures = std::mem::take(&mut *lock_failures(&failures));
    Ok(PublishOutcome {
        counts: Published {
            published: sequences.published(),
            failed: failures.failed,
        },
        sent: plan.total,
        errors: failures.errors,
        first_error: failures.samples.into_iter().next(),
        started_unix_nanos,
        max_lag,
        per_node,
        zero_receivers,
    })
}

/// Sends one request on `slot`'s connection (opening a new one if it is
/// missing or closed); gives back the connection to reuse, if it is healthy.
async fn send(
    slot: Option<HttpConnection>,
    address: SocketAddr,
    request: Request<Full<Bytes>>,
) -> (Option<HttpConnection>, Result<(), String>) {
    let mut connection = match slot {
        Some(connection) if !connection.is_closed() => connection,
        _ => match connect(address).await {
            Ok(connection) => connection,
            Err(error) => return (None, Err(format!("{error:#}"))),
        },
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut connection, request)).await {
        Ok(Ok((status, _))) if status.is_success() => (Some(connection), Ok(())),
        Ok(Ok((status, body))) => {
            let body = String::from_utf8_lossy(&body);
            (Some(connection), Err(format!("HTTP {status}: {}", body.trim())))
        }
        Ok(Err(error)) => (None, Err(format!("{error:#}"))),
        Err(_) => (None, Err(format!("no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

fn build_request(
    target: &PublishTarget,
    node: usize,
    channel: &str,
    payload: String,
    paths: &mut BTreeMap<String, String>,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let request = match target {
        PublishTarget::Herald { nodes, api_key } => {
            Request::post(format!("{}/api/v1/publish", nodes[node].base_path()))
                .header(HOST, &nodes[node].authority)
                .header(AUTHORIZATION, format!("Bearer {api_key}"))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(format!(
                    "{{\"channel\":\"{channel}\",\"data\":{payload}}}"
                ))))
        }
        PublishTarget::Peer { pub_url, server } => {
            if !paths.contains_key(channel) {
                let url = render_template(pub_url, channel)?;
                paths.insert(channel.to_owned(), url.path_and_query);
            }
            Request::post(&paths[channel])
                .header(HOST, &server.authority)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(payload)))
        }
        PublishTarget::Redis { .. } => bail!("Redis publishes are not HTTP requests"),
    };
    request.context("building a publish request")
}

/// Opens a keep-alive HTTP/1.1 connection.
pub async fn connect(address: SocketAddr) -> anyhow::Result<HttpConnection> {
    let stream = tcp_connect(address, None, None)
        .await
        .with_context(|| format!("connect to {address}"))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the server closes or every sender is dropped; the error,
        // if any, surfaces on the next request.
        let _ = connection.await;
    });
    Ok(sender)
}

/// One request and its whole answer.
pub async fn exchange(
    connection: &mut HttpConnection,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    connection.ready().await?;
    let response = connection.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `GET path` on `url`'s server, with the body as text.
pub async fn get(url: &Url, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let mut connection = connect(url.address).await?;
    let request = Request::get(format!("{}{path}", url.base_path()))
        .header(HOST, &url.authority)
        .body(Full::new(Bytes::new()))?;
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut connection, request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))??;
    if !status.is_success() {
        bail!("GET {path}: HTTP {status}");
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The next (channel, sequence number) of the plan.
struct ChannelSequences {
    choice: ChannelChoice,
    /// Next sequence number per channel: one entry for a fixed channel, one
    /// per user otherwise.
    next: Vec<u64>,
    random: fastrand::Rng,
}

impl ChannelSequences {
    fn new(choice: &ChannelChoice) -> Self {
        let slots = match choice {
            ChannelChoice::Fixed(_) => 1,
            ChannelChoice::RandomUser { users } => *users,
        };
        ChannelSequences {
            choice: choice.clone(),
            next: vec![0; slots.max(1)],
            random: fastrand::Rng::new(),
        }
    }

    fn next(&mut self) -> (String, u64) {
        let (slot, channel) = match &self.choice {
            ChannelChoice::Fixed(channel) => (0, channel.clone()),
            ChannelChoice::RandomUser { users } => {
                let user = self.random.usize(..(*users).max(1));
                (user, Scenario::personal_channel(user))
            }
        };
        let sequence = self.next[slot];
        self.next[slot] += 1;
        (channel, sequence)
    }

    fn published(&self) -> BTreeMap<String, u64> {
        self.next
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(slot, count)| {
                let channel = match &self.choice {
                    ChannelChoice::Fixed(channel) => channel.clone(),
                    ChannelChoice::RandomUser { .. } => Scenario::personal_channel(slot),
                };
                (channel, *count)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_count_per_channel() {
        let mut fixed = ChannelSequences::new(&ChannelChoice::Fixed("group:bench".into()));
        assert_eq!(fixed.next(), ("group:bench".into(), 0));
        assert_eq!(fixed.next(), ("group:bench".into(), 1));
        assert_eq!(fixed.published(), BTreeMap::from([("group:bench".to_owned(), 2)]));

        let mut random = ChannelSequences::new(&ChannelChoice::RandomUser { users: 5 });
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..100 {
            let (channel, sequence) = random.next();
            let expected = seen.entry(channel).or_default();
            assert_eq!(sequence, *expected, "per-channel numbering from 0");
            *expected += 1;
        }
        assert_eq!(random.published(), seen);
        assert_eq!(random.published().values().sum::<u64>(), 100);
    }
}
