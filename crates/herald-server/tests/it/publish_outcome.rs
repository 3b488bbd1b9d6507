//! What a publish's answer promises when Redis stalls: 200 and "duplicate"
//! mean published, 503 means not published, 504 `publish_outcome_unknown`
//! means "maybe; retry with this id", and such a retry is delivered at most
//! once. Real redis-server, paused with `CLIENT PAUSE` or frozen with
//! SIGSTOP.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{API_KEY, Client, RedisServer, TestServer, expect_only_marker};

async fn node(redis: &RedisServer) -> TestServer {
    let server = TestServer::start_with(&redis.toml("")).await;
    server.wait_ready().await;
    server
}

/// The next `{"n": …}` frames `client` receives on `channel`, until the
/// marker: each message's `n`, in order.
async fn delivered(server: &TestServer, client: &mut Client, channel: &str, count: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let frame = client.next_frame().await;
        assert_eq!(frame["channel"], channel, "{frame}");
        seen.push(frame["data"]["n"].clone());
    }
    // Nothing else (a second copy) follows.
    expect_only_marker(server, client, channel).await;
    seen
}

#[tokio::test]
async fn a_retry_after_the_client_gave_up_is_delivered_once() {
    let redis = RedisServer::start().await;
    let server = node(&redis).await;
    let mut alice = server.connect("alice").await;
    let body = json!({"channel": "user:alice", "data": {"n": 1}, "message_id": "retry-1"}).to_string();
    let url = format!("http://{}/api/v1/publish", server.addr);

    // Redis holds every command for 2 s; the client gives up after 300 ms.
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "2000", "ALL"]), "OK");
    let first = tokio::time::timeout(
        Duration::from_millis(300),
        herald_server::http_client::request("POST", &url, Some(API_KEY), Some(body.clone())),
    )
    .await;
    assert!(first.is_err(), "the first attempt was meant to time out: {first:?}");

    // The retry is answered once Redis answers: published, or a duplicate
    // of the first attempt, which then must have been published.
    let (status, answer) = server.publish(serde_json::from_str(&body).unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["message_id"], "retry-1");
    assert_eq!(delivered(&server, &mut alice, "user:alice", 1).await, vec![json!(1)]);
}

#[tokio::test]
async fn a_publish_redis_never_answered_is_504_and_its_retry_is_delivered_at_most_once() {
    let redis = RedisServer::start().await;
    let server = node(&redis).await;
    let mut alice = server.connect("alice").await;

    redis.hang();
    let with_id = server.publish(json!({"channel": "user:alice", "data": {"n": 1}, "message_id": "stalled-1"}));
    let without_id = server.publish(json!({"channel": "user:alice", "data": {"n": 2}}));
    let ((status_1, answer_1), (status_2, answer_2)) = tokio::join!(with_id, without_id);
    redis.resume();

    for (status, answer) in [(status_1, &answer_1), (status_2, &answer_2)] {
        assert_eq!(status, 504, "{answer}");
        assert_eq!(answer["error"]["code"], "publish_outcome_unknown", "{answer}");
    }
    assert_eq!(answer_1["error"]["message_id"], "stalled-1");
    let generated = answer_2["error"]["message_id"]
        .as_str()
        .expect("the answer names the generated id")
        .to_owned();

    // Retried with the ids the answers named, once the node is ready again
    // (until then a retry is refused with 503): each message arrives once,
    // whether the stalled attempt ran when Redis woke up or not.
    server.wait_ready().await;
    for (n, id) in [(1, "stalled-1"), (2, generated.as_str())] {
        let (status, answer) = server
            .publish(json!({"channel": "user:alice", "data": {"n": n}, "message_id": id}))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut seen = delivered(&server, &mut alice, "user:alice", 2).await;
    seen.sort_by_key(|n| n.as_u64());
    assert_eq!(seen, vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn a_publish_while_redis_is_down_is_503_and_not_delivered() {
    let mut redis = RedisServer::start().await;
    let server = node(&redis).await;
    let mut alice = server.connect("alice").await;
    redis.kill();
    let (status, answer) = server
        .publish(json!({"channel": "user:alice", "data": {"n": 1}, "message_id": "down-1"}))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable");
    redis.restart().await;
    server.wait_ready().await;
    // 503 released the id: the retry is published, not a "duplicate".
    let (status, answer) = server
        .publish(json!({"channel": "user:alice", "data": {"n": 1}, "message_id": "down-1"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer.get("duplicate"), None, "{answer}");
    assert_eq!(delivered(&server, &mut alice, "user:alice", 1).await, vec![json!(1)]);
}
