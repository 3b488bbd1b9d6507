//! Two in-process Herald nodes in Redis mode, sharing a real `redis-server`
//! (scripts/test installs it), driven by `notify` at a tiny size through
//! each publish path: nothing may be lost and every report field must be
//! filled in. Then the Redis publisher's accounting on its own: error
//! replies, publishes nobody received, and a connection that breaks.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use herald_bench::config::{PublishVia, RedisTarget, RedisUrl, Scenario, Target, Url};
use herald_bench::publisher::{self, ChannelChoice, PublishPlan, PublishTarget};
use herald_bench::redis::{self, RedisCommand};
use herald_bench::{BenchConfig, Report};
use herald_server::config::{Config, RawConfig};
use herald_server::server::RunningServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::DEADLINE;
use crate::smoke::{API_KEY, CONNECTIONS, MESSAGES, SECRET, assert_connected, assert_delivered, config, run};

const PREFIX: &str = "bench:";
/// How often a wait re-checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// A `redis-server` on a free port, killed on drop.
struct Redis {
    url: RedisUrl,
    child: Child,
}

impl Redis {
    async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test installs it)");
        let redis = Redis {
            url: RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).expect("valid"),
            child,
        };
        wait_until("redis answers PING", || redis::ping(&redis.url)).await;
        redis
    }

    fn target(&self, prefix: &str) -> RedisTarget {
        RedisTarget {
            url: self.url.clone(),
            prefix: prefix.to_owned(),
        }
    }

    /// Runs one command on a fresh connection.
    async fn call(&self, args: &[&str]) -> herald_core::resp::Value {
        let mut stream = redis::connect(&self.url).await.expect("connect to redis");
        redis::call(&mut stream, &mut BytesMut::new(), args)
            .await
            .expect("redis answers")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `condition` succeeds, failing the test after `DEADLINE`.
async fn wait_until<F, Fut, T>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Err(error) = condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {error:#}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Two Herald nodes sharing `redis`, ready; the target names both.
async fn two_nodes(redis: &Redis) -> (Vec<RunningServer>, Target) {
    let mut nodes = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let toml = format!(
            "listen = \"127.0.0.1:0\"\n[jwt]\nsecret = \"{SECRET}\"\n[api]\nkey = \"{API_KEY}\"\n\
             [redis]\nurl = \"redis://{}\"\nprefix = \"{PREFIX}\"\n",
            redis.url.address
        );
        let raw = RawConfig::from_toml(&toml).expect("test config parses");
        let config = Config::from_raw(raw).expect("test config is valid");
        let running = herald_server::server::start(config).await.expect("node starts");
        let url = Url::parse(&format!("http://{}", running.local_addr)).expect("loopback URL");
        wait_until("the node is ready", || publisher::get(&url, "/ready")).await;
        nodes.push(running);
        urls.push(url);
    }
    let target = Target::Herald {
        nodes: urls,
        secret: SECRET.into(),
        api_key: API_KEY.into(),
    };
    (nodes, target)
}

/// `notify` over two nodes, published via `via`.
async fn notify_over_two_nodes(via: PublishVia, sample_pids: bool) -> Report {
    let redis = Redis::start().await;
    let (_nodes, target) = two_nodes(&redis).await;
    let mut config: BenchConfig = config(Scenario::Notify, target);
    config.publish_via = via;
    config.redis = Some(redis.target(PREFIX));
    if sample_pids {
        config.server_pids = vec![std::process::id(), redis.child.id()];
    }
    let report = run(&config).await;
    assert_connected(&report);
    assert_delivered(&report, MESSAGES);
    assert_eq!(report.publishes.via, via.name());
    assert_eq!(report.nodes.len(), 2);
    for node in &report.nodes {
        assert_eq!(node.connections, CONNECTIONS / 2, "{:?}", report.nodes);
        assert_eq!(node.connected, CONNECTIONS / 2, "{:?}", report.nodes);
        assert!(node.url.starts_with("http://127.0.0.1:"), "{}", node.url);
    }
    assert_ne!(report.nodes[0].url, report.nodes[1].url);
    report
}

#[tokio::test]
async fn notify_over_two_nodes_via_http() {
    let report = notify_over_two_nodes(PublishVia::Http, true).await;
    let publishes: Vec<u64> = report.nodes.iter().map(|node| node.http_publishes).collect();
    assert_eq!(publishes, vec![MESSAGES / 2, MESSAGES / 2], "round-robin");
    assert_eq!(
        (report.publishes.redis_url.as_ref(), report.publishes.zero_receivers),
        (None, None)
    );
    // Summed over this process (coordinator and both nodes) and redis-server.
    let server = report.server.as_ref().expect("sampled");
    assert_eq!(server.per_pid.len(), 2);
    assert_eq!(server.pids, server.per_pid.iter().map(|p| p.pid).collect::<Vec<_>>());
    let rss: u64 = server.per_pid.iter().map(|p| p.rss_end_kib).sum();
    assert_eq!(server.rss_end_kib, rss);
    let cpu: f64 = server.per_pid.iter().map(|p| p.cpu_measured_s).sum();
    assert!((server.cpu_measured_s - cpu).abs() < 1e-9);
    assert!(server.per_pid.iter().all(|p| p.rss_before_kib > 0 && p.rss_end_kib > 0));
    let table = report.table();
    assert!(table.contains("nodes") && table.contains("per process"), "{table}");
}

#[tokio::test]
async fn notify_over_two_nodes_via_redis_pubsub() {
    let report = notify_over_two_nodes(PublishVia::RedisPubsub, false).await;
    assert!(report.nodes.iter().all(|node| node.http_publishes == 0));
    assert!(report.publishes.redis_url.is_some());
    assert_eq!(
        report.publishes.zero_receivers,
        Some(0),
        "every user channel has a node"
    );
    assert!(report.table().contains("0 reached no subscriber"));
}

#[tokio::test]
async fn notify_over_two_nodes_via_redis_stream() {
    let report = notify_over_two_nodes(PublishVia::RedisStream, false).await;
    assert!(report.nodes.iter().all(|node| node.http_publishes == 0));
    assert!(report.publishes.redis_url.is_some());
    assert_eq!(report.publishes.zero_receivers, None);
}

fn plan(total: u64, connections: usize, channel: &str) -> PublishPlan {
    PublishPlan {
        rate: 1_000.0,
        total,
        payload_bytes: 100,
        channels: ChannelChoice::Fixed(channel.to_owned()),
        connections,
    }
}

#[tokio::test]
async fn redis_errors_and_unheard_publishes_are_counted() {
    let redis = Redis::start().await;
    // Nobody subscribes: every PUBLISH reaches 0 receivers, which is no error.
    let target = PublishTarget::Redis {
        redis: redis.target(PREFIX),
        command: RedisCommand::Publish,
    };
    let outcome = publisher::publish(&target, &plan(40, 2, "group:nobody"))
        .await
        .expect("publishes");
    assert_eq!((outcome.sent, outcome.errors), (40, 0), "{:?}", outcome.first_error);
    assert_eq!(outcome.zero_receivers, Some(40));
    assert_eq!(outcome.counts.published["group:nobody"], 40);

    // The stream key holds a string: every XADD gets an error reply.
    redis.call(&["SET", "broken:publish", "not a stream"]).await;
    let target = PublishTarget::Redis {
        redis: redis.target("broken:"),
        command: RedisCommand::Xadd,
    };
    let outcome = publisher::publish(&target, &plan(30, 2, "group:x"))
        .await
        .expect("publishes");
    assert_eq!(outcome.errors, 30);
    assert_eq!(outcome.counts.failed["group:x"].len(), 30);
    assert!(
        outcome.first_error.as_deref().is_some_and(|e| e.contains("WRONGTYPE")),
        "{:?}",
        outcome.first_error
    );
    assert_eq!(outcome.zero_receivers, None);

    // And the entries that succeed are in the stream, with Herald's fields.
    let target = PublishTarget::Redis {
        redis: redis.target(PREFIX),
        command: RedisCommand::Xadd,
    };
    let outcome = publisher::publish(&target, &plan(10, 1, "user:u1"))
        .await
        .expect("publishes");
    assert_eq!(outcome.errors, 0, "{:?}", outcome.first_error);
    let length = redis.call(&["XLEN", "bench:publish"]).await;
    assert_eq!(length.as_integer(), Some(10));
    let entry = redis.call(&["XRANGE", "bench:publish", "-", "+", "COUNT", "1"]).await;
    let fields: Vec<&str> = entry.as_array().expect("entries")[0].as_array().expect("an entry")[1]
        .as_array()
        .expect("fields")
        .iter()
        .map(|field| field.as_str().expect("text"))
        .collect();
    assert_eq!(&fields[..3], ["channel", "user:u1", "data"]);
    assert!(fields[3].starts_with(r#"{"seq":0,"t":"#), "{}", fields[3]);
}

/// A RESP server that answers `:1` to the first `answered` commands of its
/// first connection and then closes it; later connections get `:1` always.
async fn flaky_redis(answered: usize) -> RedisUrl {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let limit = if first { Some(answered) } else { None };
            first = false;
            tokio::spawn(async move {
                let mut buffer = BytesMut::new();
                let mut replied = 0;
                loop {
                    while let Ok(Some((_, used))) = herald_core::resp::parse(&buffer) {
                        let _ = buffer.split_to(used);
                        if limit == Some(replied) {
                            return;
                        }
                        if stream.write_all(b":1\r\n").await.is_err() {
                            return;
                        }
                        replied += 1;
                    }
                    match stream.read_buf(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    RedisUrl::parse(&format!("redis://{address}")).expect("valid")
}

#[tokio::test]
async fn a_broken_redis_connection_fails_what_was_in_flight_and_reconnects() {
    let url = flaky_redis(3).await;
    let target = PublishTarget::Redis {
        redis: RedisTarget {
            url,
            prefix: PREFIX.into(),
        },
        command: RedisCommand::Publish,
    };
    let mut plan = plan(40, 1, "group:x");
    plan.rate = 400.0;
    let outcome = tokio::time::timeout(DEADLINE, publisher::publish(&target, &plan))
        .await
        .expect("finishes")
        .expect("publishes");
    assert_eq!(outcome.sent, 40);
    assert!(
        (1..37).contains(&outcome.errors),
        "the message(s) in flight when the connection closed fail, later ones go through: {outcome:?}"
    );
    let failed = &outcome.counts.failed["group:x"];
    assert_eq!(failed.len() as u64, outcome.errors);
    assert!(failed.iter().all(|&sequence| sequence >= 3), "{failed:?}");
    assert!(
        !failed.contains(&39),
        "a new connection carried the last message: {failed:?}"
    );
    assert_eq!(outcome.zero_receivers, Some(0));
}
