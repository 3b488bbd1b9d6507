//! The validated settings of a run, and what each scenario means: which
//! user each connection is, which channels it listens on, where publishes go.
//!
//! Settings are checked once here (targets and source addresses must be
//! loopback, sizes must make sense) and then passed around as plain data; a
//! worker receives its share as JSON.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

/// A worker process holds at most this many sockets, under the machine's
/// cap of 20,000 open files per process.
pub const MAX_SOCKETS_PER_WORKER: usize = 15_000;
/// The channel of the broadcast and slow scenarios.
pub const BROADCAST_CHANNEL: &str = "group:bench";
/// How many groups the idle scenario spreads its connections over.
const IDLE_GROUPS: usize = 100;
/// What `{channel}` stands for in the peer URL templates.
pub const CHANNEL_PLACEHOLDER: &str = "{channel}";

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect and subscribe, then hold without publishing: memory per connection.
    Idle,
    /// Every connection on one channel; publish to it.
    Broadcast,
    /// One connection per user; publish to random users.
    Notify,
    /// Connect as fast as possible, then close.
    Connect,
    /// Broadcast with some subscribers that stop reading.
    Slow,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
            Scenario::Notify => "notify",
            Scenario::Connect => "connect",
            Scenario::Slow => "slow",
        }
    }

    pub fn publishes(self) -> bool {
        matches!(self, Scenario::Broadcast | Scenario::Notify | Scenario::Slow)
    }

    /// The user id of connection `index`.
    pub fn user(index: usize) -> String {
        format!("u{index}")
    }

    /// The personal channel of connection `index` (Herald subscribes every
    /// connection to it).
    pub fn personal_channel(index: usize) -> String {
        format!("user:{}", Self::user(index))
    }

    /// The channels connection `index` subscribes to beyond its personal one.
    pub fn extra_channels(self, index: usize) -> Vec<String> {
        match self {
            Scenario::Idle => vec![format!("group:g{}", index % IDLE_GROUPS)],
            Scenario::Broadcast | Scenario::Slow => vec![BROADCAST_CHANNEL.to_owned()],
            Scenario::Notify | Scenario::Connect => Vec::new(),
        }
    }

    /// The one channel a peer connection listens on (a peer socket carries
    /// one channel): the group if the scenario has one, else the personal one.
    pub fn primary_channel(self, index: usize) -> String {
        self.extra_channels(index)
            .into_iter()
            .next()
            .unwrap_or_else(|| Self::personal_channel(index))
    }
}

/// A peer's channel id for a Herald channel name: the part after the
/// namespace, restricted to `[A-Za-z0-9_-]` (`group:bench` → `bench`).
pub fn peer_channel_name(channel: &str) -> String {
    let name = channel.split_once(':').map_or(channel, |(_, name)| name);
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The server under test.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// Herald: `/ws?token=` and `POST /api/v1/publish` under each node's
    /// base URL. Connection `i` goes to node `i % nodes.len()`.
    Herald {
        /// At least one; several are nodes of one Redis-backed cluster.
        nodes: Vec<Url>,
        /// Signs the connections' JWTs.
        secret: String,
        /// Authorizes publishes.
        api_key: String,
    },
    /// A server with plain per-channel subscribe and publish URLs (nchan).
    Peer {
        /// WebSocket URL with `{channel}`.
        sub_url: String,
        /// HTTP URL with `{channel}`; the raw payload is POSTed to it.
        pub_url: String,
    },
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Herald { .. } => "herald",
            Target::Peer { .. } => "peer",
        }
    }

    /// How many servers the subscriber connections are spread over (a peer
    /// counts as one).
    pub fn node_count(&self) -> usize {
        match self {
            Target::Herald { nodes, .. } => nodes.len().max(1),
            Target::Peer { .. } => 1,
        }
    }

    /// The node connection `index` goes to.
    pub fn node_of(&self, index: usize) -> usize {
        index % self.node_count()
    }
}

/// How the publisher gets messages into Herald.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishVia {
    /// `POST /api/v1/publish` (or a peer's publish URL), round-robin over the nodes.
    #[default]
    Http,
    /// `PUBLISH {prefix}ch:{channel} '{"data": PAYLOAD}'` straight into Redis.
    RedisPubsub,
    /// `XADD {prefix}publish * channel CHANNEL data PAYLOAD` (Streams ingest).
    RedisStream,
}

impl PublishVia {
    pub fn name(self) -> &'static str {
        match self {
            PublishVia::Http => "http",
            PublishVia::RedisPubsub => "redis-pubsub",
            PublishVia::RedisStream => "redis-stream",
        }
    }

    pub fn uses_redis(self) -> bool {
        self != PublishVia::Http
    }
}

/// The Redis the Herald nodes share, for publishing straight into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisTarget {
    pub url: RedisUrl,
    /// Herald's `redis.prefix` (default `herald:`).
    pub prefix: String,
}

/// A parsed `redis://[[user]:password@]host[:port][/db]` URL on a loopback
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisUrl {
    pub address: SocketAddr,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: u32,
}

impl RedisUrl {
    /// Parses `text`; the host must be a loopback IP address or localhost,
    /// the port defaults to 6379.
    pub fn parse(text: &str) -> anyhow::Result<RedisUrl> {
        let parsed = herald_core::resp::RedisAddress::parse(text)
            .map_err(|problem| anyhow::anyhow!("Redis URL `{text}` {problem}"))?;
        // The loopback check and the address itself come from the same
        // parser as every other URL the bench accepts.
        let url = Url::parse(&format!("http://{}", parsed.host_port)).with_context(|| format!("Redis URL `{text}`"))?;
        Ok(RedisUrl {
            address: url.address,
            username: parsed.username,
            password: parsed.password,
            database: parsed.database,
        })
    }
}

impl std::fmt::Display for RedisUrl {
    /// The URL without its credentials.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "redis://{}", self.address)?;
        if self.database != 0 {
            write!(formatter, "/{}", self.database)?;
        }
        Ok(())
    }
}

/// A parsed `http://` or `ws://` URL on a loopback address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Url {
    /// `http` or `ws`.
    pub scheme: String,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// Where to connect.
    pub address: SocketAddr,
    /// Path and query, at least `/`.
    pub path_and_query: String,
}

impl Url {
    /// Parses `text`, refusing schemes other than `http`/`ws` (this bench
    /// speaks no TLS) and any host that is not a loopback address.
    pub fn parse(text: &str) -> anyhow::Result<Url> {
        let uri: http::Uri = text.parse().with_context(|| format!("invalid URL `{text}`"))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
        ensure!(
            scheme == "http" || scheme == "ws",
            "URL `{text}`: only http:// and ws:// are supported"
        );
        let authority = uri.authority().with_context(|| format!("URL `{text}` has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse()
                .with_context(|| format!("URL `{text}`: the host must be an IP address or localhost"))?
        };
        ensure!(
            ip.is_loopback(),
            "URL `{text}`: only loopback addresses may be targeted"
        );
        let port = authority.port_u16().unwrap_or(80);
        let path_and_query = uri.path_and_query().map_or("/", |path| path.as_str());
        Ok(Url {
            scheme,
            authority: authority.as_str().to_owned(),
            address: SocketAddr::new(ip, port),
            path_and_query: if path_and_query.is_empty() {
                "/".into()
            } else {
                path_and_query.into()
            },
        })
    }

    /// The base path without a trailing slash, to append `/ws` and friends.
    pub fn base_path(&self) -> &str {
        let path = self.path_and_query.split('?').next().unwrap_or_default();
        path.trim_end_matches('/')
    }

    /// The base URL as text, `http://host:port/base`.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path())
    }
}

/// Parses a comma-separated list of Herald base URLs (the nodes).
pub fn parse_url_list(text: &str) -> anyhow::Result<Vec<Url>> {
    let nodes = text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(Url::parse)
        .collect::<anyhow::Result<Vec<Url>>>()?;
    ensure!(!nodes.is_empty(), "no URL given");
    Ok(nodes)
}

/// Fills `{channel}` into a URL template and parses the result.
pub fn render_template(template: &str, channel: &str) -> anyhow::Result<Url> {
    Url::parse(&template.replace(CHANNEL_PLACEHOLDER, &peer_channel_name(channel)))
}

/// Everything a run needs, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    pub scenario: Scenario,
    pub target: Target,
    pub connections: usize,
    /// Publishes per second (open loop).
    pub rate: f64,
    /// How long to publish (broadcast, notify, slow) or hold (idle).
    pub duration: Duration,
    /// Size of each published payload object, bytes.
    pub payload_bytes: usize,
    pub workers: usize,
    /// Local addresses client sockets bind to, round-robin; empty: the OS picks.
    pub source_ips: Vec<IpAddr>,
    /// Processes whose CPU and memory are sampled (and summed): typically
    /// one per node.
    pub server_pids: Vec<u32>,
    /// How messages are published.
    pub publish_via: PublishVia,
    /// Where to publish with `publish_via` redis-pubsub or redis-stream.
    pub redis: Option<RedisTarget>,
    /// Share of slow subscribers (slow scenario only, else 0).
    pub slow_fraction: f64,
    /// In-flight connects per worker.
    pub connect_concurrency: usize,
    /// Longest one connection may take to connect and subscribe.
    pub connect_timeout: Duration,
    /// After the last publish, how long workers wait for outstanding deliveries.
    pub drain_timeout: Duration,
    /// Keep-alive HTTP connections (in all, spread over the nodes) or
    /// pipelined Redis connections the publisher uses.
    pub publish_connections: usize,
}

impl BenchConfig {
    /// Checks the settings that the command line cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.connections > 0, "--connections must be at least 1");
        ensure!(self.workers > 0, "--workers must be at least 1");
        ensure!(
            self.connections.div_ceil(self.workers) <= MAX_SOCKETS_PER_WORKER,
            "{} workers would hold more than {MAX_SOCKETS_PER_WORKER} sockets each; use --workers {} or more",
            self.workers,
            self.connections.div_ceil(MAX_SOCKETS_PER_WORKER)
        );
        ensure!(
            self.rate.is_finite() && self.rate >= 0.0,
            "--rate must be a number of publishes per second"
        );
        ensure!(
            !self.scenario.publishes() || self.rate > 0.0,
            "--rate must be above 0 for {}",
            self.scenario.name()
        );
        ensure!(
            (0.0..=1.0).contains(&self.slow_fraction),
            "--slow-fraction must be between 0 and 1"
        );
        ensure!(self.connect_concurrency > 0, "--connect-concurrency must be at least 1");
        ensure!(self.publish_connections > 0, "--publish-connections must be at least 1");
        for ip in &self.source_ips {
            ensure!(ip.is_loopback(), "--source-ips: {ip} is not a loopback address");
        }
        if let Target::Herald { nodes, .. } = &self.target {
            ensure!(!nodes.is_empty(), "--url must name at least one node");
        }
        if self.publish_via.uses_redis() {
            ensure!(
                matches!(self.target, Target::Herald { .. }),
                "--publish-via {} needs --target herald",
                self.publish_via.name()
            );
            let redis = self.redis.as_ref().with_context(|| {
                format!(
                    "--publish-via {} needs --redis-url (or HERALD_REDIS_URL)",
                    self.publish_via.name()
                )
            })?;
            ensure!(
                redis.url.address.ip().is_loopback(),
                "--redis-url: only loopback addresses may be targeted"
            );
            ensure!(
                !redis.prefix.contains([' ', '*', '?', '[', ']']),
                "--redis-prefix must not contain spaces or glob characters"
            );
        }
        if let Target::Peer { sub_url, pub_url } = &self.target {
            for (flag, template) in [("--sub-url", sub_url), ("--pub-url", pub_url)] {
                ensure!(
                    template.contains(CHANNEL_PLACEHOLDER),
                    "{flag} must contain {CHANNEL_PLACEHOLDER}"
                );
                render_template(template, "x").context(flag)?;
            }
        }
        Ok(())
    }

    /// How many messages the publisher sends in all.
    pub fn total_messages(&self) -> u64 {
        if self.scenario.publishes() {
            (self.rate * self.duration.as_secs_f64()).floor() as u64
        } else {
            0
        }
    }

    /// How many subscribers are slow.
    pub fn slow_count(&self) -> usize {
        if self.scenario != Scenario::Slow || self.slow_fraction <= 0.0 {
            return 0;
        }
        ((self.connections as f64 * self.slow_fraction).round() as usize).clamp(1, self.connections)
    }

    /// The connection indices worker `worker` holds.
    pub fn worker_range(&self, worker: usize) -> std::ops::Range<usize> {
        (worker * self.connections / self.workers)..((worker + 1) * self.connections / self.workers)
    }
}

/// Whether connection `index` of `total` is one of the `slow_count` slow
/// ones, spread evenly over the indices (and so over the workers).
pub fn is_slow(index: usize, total: usize, slow_count: usize) -> bool {
    (index + 1) * slow_count / total != index * slow_count / total
}

/// The default worker count: enough that none holds more than
/// [`MAX_SOCKETS_PER_WORKER`] sockets.
pub fn default_workers(connections: usize) -> usize {
    connections.div_ceil(MAX_SOCKETS_PER_WORKER).max(1)
}

/// Parses `500ms`, `10s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("invalid duration `{text}`"))?;
    let seconds = match unit {
        "ms" => number / 1_000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3_600.0,
        _ => bail!("invalid duration `{text}`: the unit must be ms, s, m or h"),
    };
    Duration::try_from_secs_f64(seconds).with_context(|| format!("invalid duration `{text}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_channels() {
        assert_eq!(Scenario::Idle.extra_channels(117), vec!["group:g17"]);
        assert_eq!(Scenario::Broadcast.extra_channels(3), vec!["group:bench"]);
        assert!(Scenario::Notify.extra_channels(3).is_empty());
        assert_eq!(Scenario::Notify.primary_channel(3), "user:u3");
        assert_eq!(Scenario::Slow.primary_channel(3), "group:bench");
    }

    #[test]
    fn peer_channel_names() {
        assert_eq!(peer_channel_name("group:bench"), "bench");
        assert_eq!(peer_channel_name("user:u17"), "u17");
        assert_eq!(peer_channel_name("team:a:b.c"), "a_b_c");
        assert_eq!(peer_channel_name("plain"), "plain");
    }

    #[test]
    fn urls_must_be_loopback() {
        let url = Url::parse("http://127.0.0.1:8081").expect("valid");
        assert_eq!(url.address, "127.0.0.1:8081".parse().expect("address"));
        assert_eq!(url.authority, "127.0.0.1:8081");
        assert_eq!(url.base_path(), "");
        let url = Url::parse("ws://localhost:8090/sub/x?a=1").expect("valid");
        assert_eq!(url.path_and_query, "/sub/x?a=1");
        assert_eq!(url.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(Url::parse("http://[::1]:9/base/").expect("valid").base_path(), "/base");
        assert!(Url::parse("http://127.0.0.2:80").is_ok());
        assert!(Url::parse("http://10.0.0.1:80").is_err());
        assert!(Url::parse("http://example.com").is_err());
        assert!(Url::parse("https://127.0.0.1").is_err());
        let url = render_template("ws://127.0.0.1:8090/sub/{channel}", "user:u17").expect("valid");
        assert_eq!(url.path_and_query, "/sub/u17");
        assert_eq!(
            Url::parse("http://127.0.0.1:9/base/").expect("valid").base_url(),
            "http://127.0.0.1:9/base"
        );
    }

    #[test]
    fn url_lists_name_the_nodes() {
        let nodes = parse_url_list("http://127.0.0.1:18201, http://127.0.0.1:18202").expect("valid");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].address.port(), 18202);
        assert_eq!(parse_url_list("http://127.0.0.1:1").expect("valid").len(), 1);
        assert!(parse_url_list("http://127.0.0.1:1,http://10.0.0.1:2").is_err());
        assert!(parse_url_list(" , ").is_err());
    }

    #[test]
    fn redis_urls() {
        let url = RedisUrl::parse("redis://127.0.0.1:16400").expect("valid");
        assert_eq!(url.address, "127.0.0.1:16400".parse().expect("address"));
        assert_eq!((url.username, url.password, url.database), (None, None, 0));
        assert_eq!(
            RedisUrl::parse("redis://localhost").expect("valid").address.port(),
            6379
        );
        let url = RedisUrl::parse("redis://:pw@127.0.0.1:1/3").expect("valid");
        assert_eq!((url.password.as_deref(), url.database), (Some("pw"), 3));
        assert_eq!(url.to_string(), "redis://127.0.0.1:1/3", "no credentials in the text");
        let url = RedisUrl::parse("redis://bench:pw@[::1]").expect("valid");
        assert_eq!((url.username.as_deref(), url.address.port()), (Some("bench"), 6379));
        assert!(RedisUrl::parse("http://127.0.0.1:6379").is_err());
        assert!(RedisUrl::parse("redis://10.0.0.1:6379").is_err());
        assert!(RedisUrl::parse("redis://127.0.0.1:6379/x").is_err());
    }

    #[test]
    fn slow_subscribers_are_spread_evenly() {
        let slow: Vec<usize> = (0..20).filter(|&index| is_slow(index, 20, 2)).collect();
        assert_eq!(slow, vec![9, 19]);
        assert_eq!((0..1000).filter(|&index| is_slow(index, 1000, 10)).count(), 10);
        assert_eq!((0..10).filter(|&index| is_slow(index, 10, 0)).count(), 0);
        assert_eq!((0..10).filter(|&index| is_slow(index, 10, 10)).count(), 10);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").expect("valid"), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").expect("valid"), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").expect("valid"), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").expect("valid"), Duration::from_millis(1_500));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn workers_split_connections() {
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(15_000), 1);
        assert_eq!(default_workers(15_001), 2);
        assert_eq!(default_workers(100_000), 7);
    }
}
