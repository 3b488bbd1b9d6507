//! What grows per channel is given back: memory history forgets expired
//! messages and quiet channels on its own, not only when someone looks.

use std::time::Duration;

use serde_json::json;

use crate::harness::{TestServer, wait_until, wait_within};

/// The feed namespace's `history_ttl`. The keepalive waits longer, since
/// the test's clients read nothing (and so answer no ping) meanwhile.
const RETENTION: Duration = Duration::from_secs(30);
const FEED: &str = "[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 10\nhistory_ttl = \"30s\"\n[keepalive]\nping_interval = \"300s\"";

#[tokio::test]
async fn history_of_100_000_channels_is_given_back_after_retention() {
    let server = TestServer::start_with(FEED).await;
    let mut keeper = server.connect("keeper").await;
    keeper.subscribe("feed:kept").await;
    let mut first_receipt = None;
    let started = std::time::Instant::now();
    for batch in 0..100 {
        let channels: Vec<String> = (0..1_000).map(|i| format!("feed:{}", batch * 1_000 + i)).collect();
        let (status, body) = server.publish(json!({"channels": channels, "data": {"n": 1}})).await;
        assert_eq!(status, 200, "{body}");
        first_receipt.get_or_insert(body["results"][0].clone());
    }
    server.publish_ok("feed:kept", json!({"n": 1})).await;
    // Publishing took well under the retention (20 s), so every channel
    // is there at once.
    assert!(
        started.elapsed() < RETENTION / 2,
        "publishing took {:?}",
        started.elapsed()
    );
    // The two gauges are set one after the other by each sweep.
    wait_until("the sweep counts every channel and message", || async {
        server.metric("herald_history_channels").await >= 100_001.0
            && server.metric("herald_history_messages").await >= 100_001.0
    })
    .await;

    // Past retention every message is gone, and so is every channel but
    // the one a connection still subscribes to.
    let limit = (started + RETENTION + Duration::from_secs(15)).saturating_duration_since(std::time::Instant::now());
    wait_within(limit, "the history is given back", || async {
        server.metric("herald_history_channels").await == 1.0 && server.metric("herald_history_messages").await == 0.0
    })
    .await;

    // A forgotten channel starts again in a new epoch: an old position in
    // it is reported, not misread.
    let receipt = first_receipt.expect("a receipt");
    assert_eq!(receipt["channel"], "feed:0", "{receipt}");
    let mut reader = server.connect("reader").await;
    let ack = reader
        .command(
            "subscribe",
            "s",
            json!({"channel": "feed:0", "offset": receipt["offset"], "epoch": receipt["epoch"]}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], false, "{ack}");
    assert_ne!(ack["data"]["epoch"], receipt["epoch"], "{ack}");
    // The subscribed channel kept its epoch: its next message follows on.
    let next = server.publish_ok("feed:kept", json!({"n": 2})).await;
    assert_eq!(next["offset"], 2, "{next}");
}

/// A channel read before its first message (a subscribe's position) is
/// not forgotten while that position is fresh: the client that subscribed,
/// left, and comes back after the first messages recovers them.
#[tokio::test]
async fn a_position_taken_before_the_first_message_stays_recoverable() {
    let server = TestServer::start_with(FEED).await;
    let mut client = server.connect("reader").await;
    let ack = client.command("subscribe", "s", json!({"channel": "feed:new"})).await;
    let epoch = ack["data"]["epoch"].as_str().unwrap().to_owned();
    drop(client);
    // A sweep has seen the channel with no message and no subscriber.
    wait_until("a sweep keeps the fresh channel", || async {
        server.metric("herald_history_channels").await == 1.0 && server.metric("herald_connections").await == 0.0
    })
    .await;
    wait_until("another sweep keeps it", || async {
        server.metric("herald_history_channels").await == 1.0
    })
    .await;
    server.publish_ok("feed:new", json!({"n": 1})).await;
    let mut client = server.connect("reader").await;
    let ack = client
        .command(
            "subscribe",
            "r",
            json!({"channel": "feed:new", "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(client.next_frame().await["data"]["n"], 1);
}
