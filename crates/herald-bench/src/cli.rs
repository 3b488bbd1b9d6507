//! The command line: one subcommand per scenario, sharing the options that
//! say what to target and how hard; turned into a validated [`BenchConfig`].

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    self, BenchConfig, PublishVia, RedisTarget, RedisUrl, Scenario, Target, parse_duration, parse_url_list,
};

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator for Herald and peer pub/sub servers (loopback only)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect and subscribe (each connection also joins one of 100 groups),
    /// then hold for --duration without publishing: memory per connection.
    Idle(CommonArgs),
    /// Every connection subscribes to group:bench; publish to it at --rate.
    Broadcast(CommonArgs),
    /// One connection per user u0..uN; publish to random user:uK at --rate.
    Notify(CommonArgs),
    /// Connect as fast as --connect-concurrency allows, report, close.
    Connect(CommonArgs),
    /// Broadcast where --slow-fraction of subscribers stop reading.
    Slow(SlowArgs),
    /// Internal: one worker process, driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    Herald,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishViaArg {
    /// POST /api/v1/publish, round-robin over the nodes.
    Http,
    /// PUBLISH {prefix}ch:{channel} '{"data": PAYLOAD}' into Redis.
    RedisPubsub,
    /// XADD {prefix}publish * channel CHANNEL data PAYLOAD into Redis.
    RedisStream,
}

impl From<PublishViaArg> for PublishVia {
    fn from(value: PublishViaArg) -> Self {
        match value {
            PublishViaArg::Http => PublishVia::Http,
            PublishViaArg::RedisPubsub => PublishVia::RedisPubsub,
            PublishViaArg::RedisStream => PublishVia::RedisStream,
        }
    }
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Which kind of server to drive.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: TargetKind,
    /// Herald's base URL, or a comma-separated list of nodes' base URLs:
    /// subscribers and HTTP publishes are spread over them round-robin.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Herald's JWT secret (HS256 tokens are minted in-process).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Herald's API key for publishing.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Peer subscribe URL template (WebSocket).
    #[arg(long, default_value = "ws://127.0.0.1:8090/sub/{channel}")]
    pub sub_url: String,
    /// Peer publish URL template (the raw payload is POSTed to it).
    #[arg(long, default_value = "http://127.0.0.1:8090/pub/{channel}")]
    pub pub_url: String,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1_000)]
    pub connections: usize,
    /// Publishes per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long to publish (or, for idle, to hold), e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Size in bytes of each published payload (the JSON object subscribers
    /// receive), padded.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Worker processes holding the connections [default: enough that none
    /// holds more than 15,000 sockets].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Local loopback addresses to bind client sockets to, round-robin
    /// (e.g. 127.0.0.1,127.0.0.2), so ephemeral ports do not run out.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// The server's process id, or a comma-separated list (one per node):
    /// report their CPU and memory, summed (and per process in --json).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// How messages are published: Herald's HTTP API, or straight into
    /// Redis (Pub/Sub or the Streams ingest) for nodes in Redis mode.
    #[arg(long, value_enum, default_value = "http")]
    pub publish_via: PublishViaArg,
    /// The Redis the nodes share, for --publish-via redis-pubsub|redis-stream.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,
    /// The nodes' redis.prefix.
    #[arg(long, env = "HERALD_REDIS_PREFIX", default_value = "herald:")]
    pub redis_prefix: String,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Connects in flight per worker.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Longest one connection may take to connect, authenticate and subscribe.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// After the last publish, how long to wait for outstanding deliveries.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Publisher connections: keep-alive HTTP connections in all, spread
    /// over the nodes [default: one per 250 publishes/s, between 2 and 64,
    /// at least one per node]; or pipelined Redis connections [default: 2].
    #[arg(long)]
    pub publish_connections: Option<usize>,
}

#[derive(Debug, Args)]
pub struct SlowArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Share of subscribers that open a 4 KiB receive buffer and never read
    /// after subscribing (at least one).
    #[arg(long, default_value_t = 0.01)]
    pub slow_fraction: f64,
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| format!("{error:#}"))
}

impl CommonArgs {
    /// The validated configuration for `scenario`.
    pub fn into_config(self, scenario: Scenario, slow_fraction: f64) -> anyhow::Result<BenchConfig> {
        let target = match self.target {
            TargetKind::Herald => Target::Herald {
                nodes: parse_url_list(&self.url).context("--url")?,
                secret: self
                    .secret
                    .context("Herald needs its JWT secret: --secret or HERALD_JWT_SECRET")?,
                api_key: self
                    .api_key
                    .context("Herald needs its API key: --api-key or HERALD_API_KEY")?,
            },
            TargetKind::Peer => Target::Peer {
                sub_url: self.sub_url,
                pub_url: self.pub_url,
            },
        };
        let publish_via = PublishVia::from(self.publish_via);
        let redis = match (&self.redis_url, publish_via.uses_redis()) {
            (Some(url), true) => Some(RedisTarget {
                url: RedisUrl::parse(url).context("--redis-url")?,
                prefix: self.redis_prefix.clone(),
            }),
            _ => None,
        };
        let publish_connections = self.publish_connections.unwrap_or_else(|| {
            if publish_via.uses_redis() {
                2
            } else {
                ((self.rate / 250.0).ceil() as usize)
                    .clamp(2, 64)
                    .max(target.node_count())
            }
        });
        let config = BenchConfig {
            scenario,
            target,
            connections: self.connections,
            rate: self.rate,
            duration: self.duration,
            payload_bytes: self.payload,
            workers: self
                .workers
                .unwrap_or_else(|| config::default_workers(self.connections)),
            source_ips: self.source_ips,
            server_pids: self.server_pid,
            publish_via,
            redis,
            slow_fraction,
            connect_concurrency: self.connect_concurrency,
            connect_timeout: self.connect_timeout,
            drain_timeout: self.drain_timeout,
            publish_connections,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Command {
    /// The scenario's configuration and whether to print JSON; `None` for
    /// the worker subcommand.
    pub fn into_config(self) -> Option<anyhow::Result<(BenchConfig, bool)>> {
        let (scenario, common, slow_fraction) = match self {
            Command::Idle(common) => (Scenario::Idle, common, 0.0),
            Command::Broadcast(common) => (Scenario::Broadcast, common, 0.0),
            Command::Notify(common) => (Scenario::Notify, common, 0.0),
            Command::Connect(common) => (Scenario::Connect, common, 0.0),
            Command::Slow(slow) => (Scenario::Slow, slow.common, slow.slow_fraction),
            Command::Worker => return None,
        };
        let json = common.json;
        Some(common.into_config(scenario, slow_fraction).map(|config| (config, json)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<(BenchConfig, bool)> {
        let cli = Cli::try_parse_from(std::iter::once("herald-bench").chain(args.iter().copied()))?;
        cli.command.into_config().expect("a scenario")
    }

    #[test]
    fn herald_needs_its_secrets() {
        let error = parse(&["broadcast", "--api-key", "k"])
            .err()
            .map(|error| format!("{error:#}"));
        // The environment may provide the secret; only check when it does not.
        if std::env::var_os("HERALD_JWT_SECRET").is_none() {
            assert!(error.expect("an error").contains("secret"));
        }
    }

    #[test]
    fn options_become_a_config() {
        let (config, json) = parse(&[
            "slow",
            "--secret",
            "s",
            "--api-key",
            "k",
            "--connections",
            "40000",
            "--rate",
            "1000",
            "--duration",
            "5s",
            "--source-ips",
            "127.0.0.1,127.0.0.2",
            "--slow-fraction",
            "0.05",
            "--json",
        ])
        .expect("valid");
        assert!(json);
        assert_eq!(config.scenario, Scenario::Slow);
        assert_eq!(config.workers, 3);
        assert_eq!(config.total_messages(), 5_000);
        assert_eq!(config.slow_count(), 2_000);
        assert_eq!(config.publish_connections, 4);
        assert_eq!(config.source_ips.len(), 2);
        assert_eq!(config.worker_range(2), 26_666..40_000);
    }

    #[test]
    fn peer_targets_and_limits() {
        let (config, _) = parse(&["notify", "--target", "peer", "--connections", "10"]).expect("valid");
        assert_eq!(config.target.name(), "peer");
        assert!(
            parse(&[
                "notify",
                "--target",
                "peer",
                "--pub-url",
                "http://10.1.2.3/pub/{channel}"
            ])
            .is_err()
        );
        assert!(parse(&["notify", "--target", "peer", "--sub-url", "ws://127.0.0.1/sub/fixed"]).is_err());
        assert!(parse(&["idle", "--target", "peer", "--source-ips", "192.168.1.1"]).is_err());
        assert!(parse(&["idle", "--target", "peer", "--connections", "30000", "--workers", "1"]).is_err());
    }

    #[test]
    fn nodes_pids_and_redis_paths() {
        let (config, _) = parse(&[
            "notify",
            "--secret",
            "s",
            "--api-key",
            "k",
            "--url",
            "http://127.0.0.1:18201,http://127.0.0.1:18202",
            "--server-pid",
            "11,12",
            "--publish-via",
            "redis-stream",
            "--redis-url",
            "redis://127.0.0.1:16400",
            "--redis-prefix",
            "bench:",
        ])
        .expect("valid");
        let Target::Herald { nodes, .. } = &config.target else {
            panic!("a Herald target")
        };
        assert_eq!(nodes.len(), 2);
        assert_eq!((config.target.node_of(0), config.target.node_of(3)), (0, 1));
        assert_eq!(config.server_pids, vec![11, 12]);
        assert_eq!(config.publish_via, PublishVia::RedisStream);
        let redis = config.redis.as_ref().expect("redis target");
        assert_eq!((redis.url.address.port(), redis.prefix.as_str()), (16400, "bench:"));
        assert_eq!(config.publish_connections, 2);

        let (config, _) = parse(&["notify", "--secret", "s", "--api-key", "k"]).expect("valid");
        assert_eq!(config.publish_via, PublishVia::Http);
        assert!(config.server_pids.is_empty());
        let (config, _) = parse(&[
            "broadcast",
            "--secret",
            "s",
            "--api-key",
            "k",
            "--rate",
            "100",
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
        ])
        .expect("valid");
        assert_eq!(config.publish_connections, 3, "at least one per node");
        if std::env::var_os("HERALD_REDIS_URL").is_none() {
            assert!(
                parse(&[
                    "notify",
                    "--secret",
                    "s",
                    "--api-key",
                    "k",
                    "--publish-via",
                    "redis-pubsub"
                ])
                .is_err(),
                "redis paths need a Redis URL"
            );
        }
        assert!(
            parse(&[
                "notify",
                "--target",
                "peer",
                "--publish-via",
                "redis-pubsub",
                "--redis-url",
                "redis://127.0.0.1:1"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "notify",
                "--secret",
                "s",
                "--api-key",
                "k",
                "--publish-via",
                "redis-pubsub",
                "--redis-url",
                "redis://192.168.0.1:6379"
            ])
            .is_err()
        );
    }
}
