//! Every scenario at a tiny size against a real in-process Herald node (and
//! the publishing scenarios against the mini peer): nothing may be lost and
//! every report field must be filled in. No performance bars.

use std::path::PathBuf;
use std::time::Duration;

use herald_bench::config::{PublishVia, Scenario, Target, Url};
use herald_bench::{BenchConfig, Report, WorkerLauncher};
use herald_server::config::{Config, RawConfig};
use herald_server::server::RunningServer;

use crate::DEADLINE;
use crate::peer::MiniPeer;

pub const SECRET: &str = "bench-smoke-test-secret-0123456789";
pub const API_KEY: &str = "bench-smoke-test-api-key-0123456789";
pub const CONNECTIONS: usize = 20;
const RATE: f64 = 50.0;
/// `RATE` for one second.
pub const MESSAGES: u64 = 50;

/// Starts a Herald node on port 0; the returned target points at it.
async fn herald() -> (RunningServer, Target) {
    let toml = format!("listen = \"127.0.0.1:0\"\n[jwt]\nsecret = \"{SECRET}\"\n[api]\nkey = \"{API_KEY}\"\n");
    let raw = RawConfig::from_toml(&toml).expect("test config parses");
    let config = Config::from_raw(raw).expect("test config is valid");
    let running = herald_server::server::start(config).await.expect("server starts");
    let target = Target::Herald {
        nodes: vec![Url::parse(&format!("http://{}", running.local_addr)).expect("loopback URL")],
        secret: SECRET.into(),
        api_key: API_KEY.into(),
    };
    (running, target)
}

pub fn config(scenario: Scenario, target: Target) -> BenchConfig {
    BenchConfig {
        scenario,
        target,
        connections: CONNECTIONS,
        rate: RATE,
        duration: Duration::from_secs(1),
        payload_bytes: 200,
        // Two workers, so that merging their results is exercised too.
        workers: 2,
        source_ips: Vec::new(),
        server_pids: Vec::new(),
        publish_via: PublishVia::Http,
        redis: None,
        slow_fraction: 0.0,
        connect_concurrency: 8,
        connect_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        publish_connections: 2,
    }
}

/// Runs `config` with real worker subprocesses (this package's binary).
pub async fn run(config: &BenchConfig) -> Report {
    let launcher = WorkerLauncher::Subprocess(PathBuf::from(env!("CARGO_BIN_EXE_herald-bench")));
    let report = tokio::time::timeout(DEADLINE, herald_bench::run(config, &launcher))
        .await
        .expect("the run ends within the deadline")
        .expect("the run succeeds");
    // The JSON form is what scripts read: it must hold every field.
    let json = serde_json::to_value(&report).expect("reports serialize");
    for field in ["deliveries", "latency_ms", "connect", "publishes", "bench_cpu_s"] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
    assert!(!report.table().is_empty());
    report
}

pub fn assert_connected(report: &Report) {
    assert_eq!(report.connected, CONNECTIONS, "{:?}", report.first_connect_error);
    assert_eq!(report.connect_errors, 0);
    assert_eq!(report.connect.latency_ms.count, CONNECTIONS as u64);
    assert!(report.connect.latency_ms.p50 > 0.0, "{:?}", report.connect);
    assert!(report.connect.latency_ms.max >= report.connect.latency_ms.p99);
    assert!(
        report.connect.rate_per_s > 0.0 && report.connect.wall_s > 0.0,
        "{:?}",
        report.connect
    );
    assert!(report.bench_cpu_s > 0.0);
}

pub fn assert_delivered(report: &Report, expected: u64) {
    assert_eq!(report.publishes.sent, MESSAGES);
    assert_eq!(report.publishes.errors, 0, "{:?}", report.publishes.first_error);
    let deliveries = &report.deliveries;
    assert_eq!(deliveries.tally.expected, expected, "{deliveries:?}");
    assert_eq!(deliveries.tally.received, expected, "{deliveries:?}");
    assert_eq!(
        (
            deliveries.tally.lost,
            deliveries.tally.duplicated,
            deliveries.tally.out_of_range,
            deliveries.tally.malformed
        ),
        (0, 0, 0, 0),
        "{deliveries:?}"
    );
    assert_eq!(deliveries.disconnects, 0, "{:?}", deliveries.first_disconnect);
    assert!(deliveries.per_second > 0.0);
    let latency = &report.latency_ms;
    assert_eq!(latency.count, expected);
    assert!(
        latency.p50 > 0.0 && latency.p90 >= latency.p50 && latency.p99 >= latency.p90,
        "{latency:?}"
    );
    assert!(
        latency.p999 >= latency.p99 && latency.max >= latency.p999,
        "{latency:?}"
    );
}

/// The server here is this test process, which also runs the coordinator:
/// the numbers mean little, but every field must be there.
fn assert_server_sampled(report: &Report) {
    let server = report.server.as_ref().expect("server stats with --server-pid");
    assert_eq!(server.pids, vec![std::process::id()]);
    assert_eq!(server.per_pid.len(), 1);
    assert_eq!(server.per_pid[0].rss_end_kib, server.rss_end_kib);
    assert!(server.rss_before_kib > 0 && server.rss_after_connect_kib > 0 && server.rss_end_kib > 0);
    assert!(server.cpu_connect_s >= 0.0 && server.cpu_measured_s >= 0.0);
    assert!(server.kib_per_connection.is_finite());
}

#[tokio::test]
async fn broadcast_against_herald() {
    let (_herald, target) = herald().await;
    let mut config = config(Scenario::Broadcast, target);
    config.server_pids = vec![std::process::id()];
    let report = run(&config).await;
    assert_eq!(
        (report.scenario.as_str(), report.target.as_str()),
        ("broadcast", "herald")
    );
    assert_connected(&report);
    assert_delivered(&report, MESSAGES * CONNECTIONS as u64);
    assert_server_sampled(&report);
    let server = report.server.as_ref().expect("sampled");
    assert!(server.deliveries_per_cpu_s.is_some() || server.cpu_measured_s == 0.0);
    assert!(report.slow.is_none());
}

#[tokio::test]
async fn notify_against_herald() {
    let (_herald, target) = herald().await;
    let report = run(&config(Scenario::Notify, target)).await;
    assert_connected(&report);
    assert_delivered(&report, MESSAGES);
    assert!(report.server.is_none(), "no --server-pid, no server stats");
    assert_eq!(report.nodes.len(), 1);
    assert_eq!(
        (report.nodes[0].connected, report.nodes[0].http_publishes),
        (CONNECTIONS, MESSAGES)
    );
    assert_eq!(report.publishes.via, "http");
    assert_eq!(report.publishes.zero_receivers, None);
}

#[tokio::test]
async fn slow_against_herald() {
    let (_herald, target) = herald().await;
    let mut config = config(Scenario::Slow, target);
    config.slow_fraction = 0.1;
    let report = run(&config).await;
    assert_connected(&report);
    let slow = report
        .slow
        .as_ref()
        .expect("the slow scenario reports its slow subscribers");
    assert_eq!(slow.subscribers, 2);
    assert!(slow.slow_client_disconnects.is_some(), "read from Herald's /metrics");
    assert_delivered(&report, MESSAGES * (CONNECTIONS as u64 - 2));
}

#[tokio::test]
async fn idle_against_herald() {
    let (_herald, target) = herald().await;
    let mut config = config(Scenario::Idle, target);
    config.duration = Duration::from_millis(200);
    config.server_pids = vec![std::process::id()];
    let report = run(&config).await;
    assert_connected(&report);
    assert_server_sampled(&report);
    assert_eq!(report.publishes.sent, 0);
    assert_eq!(report.deliveries.tally.expected, 0);
    assert_eq!(report.deliveries.tally.malformed, 0);
}

#[tokio::test]
async fn connect_against_herald() {
    let (_herald, target) = herald().await;
    let mut config = config(Scenario::Connect, target);
    config.connections = 50;
    let report = run(&config).await;
    assert_eq!(report.connected, 50, "{:?}", report.first_connect_error);
    assert_eq!(report.connect.latency_ms.count, 50);
    assert!(report.connect.rate_per_s > 0.0);
}

fn peer_target(peer: &MiniPeer) -> Target {
    Target::Peer {
        sub_url: peer.sub_url(),
        pub_url: peer.pub_url(),
    }
}

#[tokio::test]
async fn broadcast_against_a_peer() {
    let peer = MiniPeer::start().await;
    let report = run(&config(Scenario::Broadcast, peer_target(&peer))).await;
    assert_eq!(report.target, "peer");
    assert!(report.nodes.is_empty());
    assert_connected(&report);
    assert_delivered(&report, MESSAGES * CONNECTIONS as u64);
}

#[tokio::test]
async fn notify_against_a_peer() {
    let peer = MiniPeer::start().await;
    let report = run(&config(Scenario::Notify, peer_target(&peer))).await;
    assert_connected(&report);
    assert_delivered(&report, MESSAGES);
}
