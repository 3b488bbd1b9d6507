//! The node's connections to Redis under faults: a Redis that hangs
//! (SIGSTOP, `CLIENT PAUSE`) is noticed by the health checks and the
//! end-to-end probe, and `/ready` follows it both ways within 5 s.

use std::time::Duration;

use crate::harness::{RedisServer, TestServer, ready_status, wait_within};

/// The bound the issue sets for `/ready` to follow Redis, both ways.
const READY_BOUND: Duration = Duration::from_secs(5);

async fn node(redis: &RedisServer, extra: &str) -> TestServer {
    let server = TestServer::start_with(&redis.toml(extra)).await;
    server.wait_ready().await;
    server
}

/// Redis stops answering (SIGSTOP: sockets stay open, nothing is read or
/// written). The node reports not ready within 5 s, counts the probe it
/// did not hear back, and is ready again within 5 s of Redis running.
#[tokio::test]
async fn a_hung_redis_is_noticed_and_so_is_its_return() {
    let redis = RedisServer::start().await;
    let node = node(&redis, "").await;
    let addr = node.addr;
    let failures_before = node.metric("herald_broker_probe_failures_total").await;

    redis.hang();
    wait_within(READY_BOUND, "not ready after redis hung", || async move {
        ready_status(addr).await == 503
    })
    .await;
    wait_within(READY_BOUND, "the unheard probe is counted", || {
        let node = &node;
        async move { node.metric("herald_broker_probe_failures_total").await > failures_before }
    })
    .await;
    assert_eq!(node.metric("herald_broker_up").await, 0.0);

    redis.resume();
    wait_within(READY_BOUND, "ready after redis resumed", || async move {
        ready_status(addr).await == 200
    })
    .await;
    node.publish_ok("user:alice", serde_json::json!({"after": "resume"}))
        .await;
}

/// The reproduction: `CLIENT PAUSE` (writes, so `PUBLISH` too) for
/// 4 s from another connection. The node is not ready within 5 s of the
/// pause and ready again within 5 s of its end.
#[tokio::test]
async fn a_paused_redis_makes_the_node_not_ready_for_the_pause() {
    let redis = RedisServer::start().await;
    let node = node(&redis, "").await;
    let addr = node.addr;
    let pause = Duration::from_secs(4);
    assert_eq!(
        redis.cli(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "WRITE"]),
        "OK"
    );
    let noticed = wait_within(READY_BOUND, "not ready during the pause", || async move {
        ready_status(addr).await == 503
    })
    .await;
    assert!(noticed < pause, "noticed while paused ({noticed:?})");
    wait_within(
        pause - noticed + READY_BOUND,
        "ready within 5 s of the pause's end",
        || async move { ready_status(addr).await == 200 },
    )
    .await;
    assert!(node.metric("herald_broker_probe_failures_total").await >= 1.0);
}
