//! Every limit, hit on purpose, with its documented answer.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{self, DEADLINE, Event, TestServer, wait_until};

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    let data = "x".repeat(70_000);
    client
        .send(json!({"type": "publish", "data": {"channel": "group:1", "data": data}}))
        .await;
    assert_eq!(client.expect_close().await.0, 1009);
    assert_eq!(
        server.metric("herald_disconnects_total{reason=\"too_large\"}").await,
        1.0
    );
}

#[tokio::test]
async fn too_many_connections_for_one_user_closes_with_4009() {
    let server = TestServer::start_with("[limits]\nmax_connections_per_user = 2").await;
    let _first = server.connect("alice").await;
    let _second = server.connect("alice").await;
    let mut third = server
        .connect_raw(&format!("?token={}", server.token("alice")))
        .await
        .unwrap();
    let error = third.expect_type("error").await;
    assert_eq!(error["data"]["code"], "limit_exceeded");
    assert_eq!(third.expect_close().await.0, 4009);
    assert_eq!(
        server.metric("herald_disconnects_total{reason=\"max_per_user\"}").await,
        1.0
    );
    // Another user is unaffected.
    server.connect("bob").await;
}

#[tokio::test]
async fn total_and_per_ip_limits_refuse_the_upgrade() {
    for (limit, status, code) in [
        ("max_connections", 503, "max_connections"),
        ("max_connections_per_ip", 429, "max_connections_per_ip"),
    ] {
        let server = TestServer::start_with(&format!("[limits]\n{limit} = 1")).await;
        let _first = server.connect("alice").await;
        match server.connect_raw(&format!("?token={}", server.token("bob"))).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), status, "{limit}");
                let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
                assert!(body.contains(code), "{body}");
            }
            other => panic!("{limit}: expected HTTP {status}, got {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn the_command_rate_limit_answers_then_disconnects() {
    let server = TestServer::start_with("[limits]\ncommands_per_second = 1\ncommand_burst = 3").await;
    let mut client = server.connect("alice").await;
    for i in 0..3 {
        client.send(json!({"type": "ping", "message_id": i})).await;
    }
    for _ in 0..3 {
        client.expect_type("pong").await;
    }
    client.send(json!({"type": "ping", "message_id": "over"})).await;
    let error = client.expect_type("error").await;
    assert_eq!(
        (error["message_id"].clone(), error["data"]["code"].clone()),
        (json!("over"), json!("rate_limited"))
    );
    // Keep hammering: the client is disconnected with 4029.
    for i in 0..10 {
        if client
            .ws
            .send(Message::Text(
                json!({"type": "ping", "message_id": i}).to_string().into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(client.expect_close().await.0, 4029);
}

#[tokio::test]
async fn subscriptions_per_connection_are_limited() {
    let server = TestServer::start_with("[limits]\nmax_subscriptions = 3").await;
    let mut client = server.connect("alice").await;
    client.subscribe("group:1").await;
    client.subscribe("group:2").await;
    let error = client.command("subscribe", "s3", json!({"channel": "group:3"})).await;
    assert_eq!(error["data"]["code"], "limit_exceeded", "{error}");
    client.subscribe("group:2").await; // Re-subscribing is not a new subscription.
}

/// A subscriber that never reads is disconnected when its queue fills,
/// while a normal subscriber on the same channel receives every message.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_off_without_hurting_others() {
    // A small kernel send buffer, so the stalled client is found quickly.
    let server =
        TestServer::start_with("[limits]\nqueue_messages = 16\nqueue_bytes = 131072\nsend_buffer = 16384").await;
    let mut slow = server.connect_small_window("slow").await;
    slow.subscribe("group:load").await;

    let mut normal = server.connect("normal").await;
    normal.subscribe("group:load").await;
    let reader = tokio::spawn(async move {
        let mut sequence = Vec::new();
        loop {
            let frame = normal.next_frame().await;
            if frame["data"]["done"] == true {
                return sequence;
            }
            sequence.push(frame["data"]["seq"].as_u64().unwrap());
        }
    });

    let padding = "p".repeat(8 * 1024);
    let mut published = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.metric("herald_disconnects_total{reason=\"slow_client\"}").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled client was never disconnected"
        );
        assert!(
            published < 20_000,
            "published {published} messages without a slow-client disconnect"
        );
        for _ in 0..50 {
            server
                .publish_ok("group:load", json!({"seq": published, "pad": padding}))
                .await;
            published += 1;
        }
    }
    server.publish_ok("group:load", json!({"done": true})).await;
    let sequence = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("reader finishes")
        .unwrap();
    assert_eq!(
        sequence,
        (0..published).collect::<Vec<_>>(),
        "the normal subscriber lost or reordered messages"
    );
    assert!(
        server
            .metric("herald_messages_dropped_total{reason=\"slow_client\"}")
            .await
            >= 1.0
    );
    let stats: serde_json::Value = serde_json::from_str(&server.http("GET", "/stats", None, None).await.1).unwrap();
    assert_eq!(stats["connections"], 1, "only the normal subscriber is left");
    // The stalled client, once it reads, finds its connection ended.
    loop {
        match slow.next_event().await {
            Event::Closed(close) => {
                if let Some((code, _)) = close {
                    assert_eq!(code, 4008);
                }
                break;
            }
            Event::Frame(_) | Event::Binary(_) => continue,
        }
    }
}

/// Queued bytes the socket takes none of for `limits.write_timeout` end the
/// connection with 4008, though the queue is far from full.
#[tokio::test]
async fn a_socket_that_takes_nothing_for_the_write_timeout_is_cut_off() {
    let server = TestServer::start_with("[limits]\nwrite_timeout = \"300ms\"\nsend_buffer = 16384").await;
    let mut stalled = server.connect_small_window("stalled").await;
    stalled.subscribe("group:stall").await;
    // About 320 KiB: more than the kernel holds for this pair, far less
    // than the queue's 1,024 messages and 4 MiB.
    let padding = "p".repeat(8 * 1024);
    for seq in 0..40 {
        server
            .publish_ok("group:stall", json!({"seq": seq, "pad": padding}))
            .await;
    }
    wait_until("the stalled client is cut off", || async {
        server.metric("herald_disconnects_total{reason=\"slow_client\"}").await >= 1.0
    })
    .await;
    // The queue never filled (no message was refused): the write timeout
    // ended it, and the messages still queued were discarded and counted.
    let dropped = server
        .metric("herald_messages_dropped_total{reason=\"slow_client\"}")
        .await;
    assert!((1.0..40.0).contains(&dropped), "{dropped} dropped");
}

#[tokio::test]
async fn malformed_frames_count_against_the_rate_limit() {
    let server = TestServer::start_with("[limits]\ncommands_per_second = 1\ncommand_burst = 3").await;
    let mut client = server.connect("alice").await;
    for _ in 0..3 {
        client.send_text("not json").await;
    }
    for _ in 0..3 {
        assert_eq!(client.expect_type("error").await["data"]["code"], "invalid_json");
    }
    client.ws.send(Message::Binary(vec![0u8; 4].into())).await.unwrap();
    assert_eq!(client.expect_type("error").await["data"]["code"], "rate_limited");
    for _ in 0..5 {
        if client.ws.send(Message::Text("{".into())).await.is_err() {
            break;
        }
    }
    assert_eq!(client.expect_close().await.0, 4029);
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x7b], OpCode::Data(Data::Text), true);
    client.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(client.expect_close().await.0, 1007);
}

/// Issue 9.19: a request body that trickles in is answered 408 once
/// `limits.body_timeout` has passed, and the connection is closed.
#[tokio::test]
async fn a_request_body_that_trickles_in_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with("[limits]\nbody_timeout = \"500ms\"").await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let body = r#"{"channel": "user:alice", "data": {"slow": true}}"#;
    let head = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        crate::harness::API_KEY,
        body.len()
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    // One byte every 100 ms (a pace, not a wait): the whole body would
    // take about 5 s.
    let trickle = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        for byte in body.bytes() {
            pace.tick().await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    // Reads until the server closes the connection.
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer))
        .await
        .expect("answered and closed within the deadline")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the body could have arrived"
    );
    trickle.abort();
    assert_eq!(server.metric("herald_http_body_timeouts_total").await, 1.0);
}

/// A client that keeps reading, only slower than the stream, is cut off as
/// slow: its backlog is dropped and the 4008 close frame is what it reads
/// next, instead of a backlog it cannot read before the server gives up.
#[tokio::test]
async fn a_slow_reader_reads_4008_next_instead_of_its_backlog() {
    let server = TestServer::start_with("[limits]\nqueue_messages = 256\nsend_buffer = 16384").await;
    let mut slow = server.connect_small_window("slow").await;
    slow.subscribe("group:fast").await;
    let reader = tokio::spawn(async move {
        let mut read = 0u64;
        // The pace of a slow reader: one frame every 20 ms, slower than the
        // publisher below.
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            pace.tick().await;
            match slow.next_event().await {
                Event::Frame(_) | Event::Binary(_) => read += 1,
                Event::Closed(close) => return (read, close),
            }
        }
    });
    let padding = "p".repeat(8 * 1024);
    let mut published = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.metric("herald_disconnects_total{reason=\"slow_client\"}").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline && published < 20_000,
            "published {published} messages without a slow-client disconnect"
        );
        for _ in 0..50 {
            server
                .publish_ok("group:fast", json!({"seq": published, "pad": padding}))
                .await;
            published += 1;
        }
    }
    let (read, close) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader finishes")
        .unwrap();
    assert_eq!(
        close,
        Some((4008, "client too slow".to_owned())),
        "after {read} of {published} messages"
    );
    assert!(read < published, "the backlog was dropped");
}

/// A client that stops reading while messages flow to it is a slow client
/// (4008) even when the keepalive notices first, and the messages that were
/// waiting for it are counted as dropped.
#[tokio::test]
async fn a_stalled_client_found_by_the_keepalive_is_cut_as_slow_and_its_messages_counted() {
    let server = TestServer::start_with(
        "[limits]\nsend_buffer = 16384\n[keepalive]\nping_interval = \"1s\"\npong_timeout = \"1s\"",
    )
    .await;
    let mut stalled = server.connect_small_window("stalled").await;
    stalled.subscribe("group:stall").await;
    // About 320 KiB: more than the kernel holds for this pair, far less than
    // the queue's bounds; the write timeout (10 s) is far off.
    let padding = "p".repeat(8 * 1024);
    for seq in 0..40 {
        server
            .publish_ok("group:stall", json!({"seq": seq, "pad": padding}))
            .await;
    }
    wait_until("the stalled client is cut off", || async {
        let metrics = server.metrics().await;
        harness::metric_value(&metrics, "herald_disconnects_total{reason=\"slow_client\"}")
            + harness::metric_value(&metrics, "herald_disconnects_total{reason=\"pong_timeout\"}")
            >= 1.0
    })
    .await;
    let metrics = server.metrics().await;
    assert_eq!(
        harness::metric_value(&metrics, "herald_disconnects_total{reason=\"slow_client\"}"),
        1.0,
        "{metrics}"
    );
    let dropped = harness::metric_value(&metrics, "herald_messages_dropped_total{reason=\"slow_client\"}");
    assert!((1.0..=40.0).contains(&dropped), "{dropped} dropped\n{metrics}");
}

/// A client that floods without reading, then reads (at a modest pace),
/// finds the close frame of the limit it hit behind the answers it had not
/// read, every time: the
/// server sends it, shuts down its side and reads (discarding) until the
/// client closes. Closing with the client's input unread would reset the
/// connection, and the kernel would discard what the client had not yet
/// taken, the close frame included (RFC 6455 §7.1.1).
#[tokio::test]
async fn a_flooding_client_reads_the_close_frame_behind_its_unread_answers() {
    // Small windows on both sides, so that the answers back up in the kernels.
    let server = TestServer::start_with(
        "[limits]\ncommands_per_second = 1\ncommand_burst = 100\nmax_message_size = 1000\nsend_buffer = 4096",
    )
    .await;
    const PACE: Duration = Duration::from_millis(2);
    for round in 0..3 {
        // Each invalid frame is answered with an error: 100 of them (more
        // than the kernels hold), then 100 refusals and 4029, with more than
        // a thousand frames still unread.
        let mut client = server.connect_small_window("alice").await;
        for _ in 0..1_500 {
            if client.ws.send(Message::Text("x".into())).await.is_err() {
                break;
            }
        }
        assert_eq!(client.read_to_end(PACE).await, Some(4029), "rate limit, round {round}");
        // 90 errors, then an oversized frame and more behind it: 1009.
        let mut client = server.connect_small_window("bob").await;
        let mut frames = vec!["x".to_owned(); 90];
        frames.push("x".repeat(2_000));
        frames.extend(vec!["x".to_owned(); 100]);
        for frame in frames {
            if client.ws.send(Message::Text(frame.into())).await.is_err() {
                break;
            }
        }
        assert_eq!(client.read_to_end(PACE).await, Some(1009), "too large, round {round}");
    }
}

/// A recovering subscribe replays what was missed as the socket drains,
/// within the connection's queue bounds, however much was missed.
#[tokio::test]
async fn a_recovery_larger_than_the_queue_is_replayed_within_its_bounds() {
    let server = TestServer::start_with(
        "[limits]\nqueue_messages = 16\n[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 1000",
    )
    .await;
    let channel = "feed:news";
    let mut client = server.connect("reader").await;
    let ack = client.command("subscribe", "s", json!({"channel": channel})).await;
    let epoch = ack["data"]["epoch"].as_str().unwrap().to_owned();
    drop(client);
    for seq in 0..300 {
        server.publish_ok(channel, json!({"seq": seq})).await;
    }
    let mut client = server.connect("reader").await;
    let recover = json!({"channel": channel, "offset": 0, "epoch": epoch});
    let ack = client.command("subscribe", "r", recover).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    // A live message, published while the replay is under way, follows it.
    server.publish_ok(channel, json!({"seq": 300})).await;
    for seq in 0..=300 {
        let frame = client.next_frame().await;
        assert_eq!(frame["data"]["seq"], seq, "{frame}");
    }
    client.round_trip().await;
    assert_eq!(
        server.metric("herald_disconnects_total{reason=\"slow_client\"}").await,
        0.0
    );
}

/// A client that goes away with messages still queued for it: they are
/// counted as dropped (`disconnected`), not lost silently.
#[tokio::test]
async fn messages_queued_for_a_client_that_goes_away_are_counted() {
    let server = TestServer::start_with("[limits]\nsend_buffer = 16384").await;
    let mut client = server.connect_small_window("leaver").await;
    client.subscribe("group:left").await;
    // About 320 KiB: more than the kernel holds for this pair, far less
    // than the queue's bounds.
    let padding = "p".repeat(8 * 1024);
    for seq in 0..40 {
        server
            .publish_ok("group:left", json!({"seq": seq, "pad": padding}))
            .await;
    }
    drop(client);
    wait_until("the server notices the client is gone", || async {
        server.metric("herald_disconnects_total{reason=\"client\"}").await >= 1.0
    })
    .await;
    let dropped = server
        .metric("herald_messages_dropped_total{reason=\"disconnected\"}")
        .await;
    assert!((1.0..40.0).contains(&dropped), "{dropped} dropped");
}

/// A gap larger than the connection's queue (messages a node missed) is
/// filled from history as the socket drains, within the queue's bounds.
#[tokio::test]
async fn a_gap_larger_than_the_queue_is_filled_within_its_bounds() {
    let redis = crate::harness::RedisServer::start().await;
    let config = format!(
        "[limits]\nqueue_messages = 16\n[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 1000\n{}",
        redis.toml("")
    );
    let server = TestServer::start_with(&config).await;
    server.wait_ready().await;
    let channel = "feed:gaps";
    let mut client = server.connect("reader").await;
    client.subscribe(channel).await;
    server.publish_ok(channel, json!({"seq": 0})).await;
    assert_eq!(client.next_frame().await["data"]["seq"], 0);
    // Stored and numbered in history, published where no node listens: lost
    // on the way to the node, as in a Pub/Sub outage.
    let nowhere = format!("{}nowhere", redis.prefix());
    for seq in 1..=100 {
        let wire = json!({"type": "message", "message_id": format!("lost-{seq}"), "timestamp": herald_server::util::unix_millis(), "data": {"seq": seq}});
        redis.store_in_history(None, channel, &wire, 1000, &nowhere);
    }
    server.publish_ok(channel, json!({"seq": 101})).await;
    for seq in 1..=101 {
        let frame = client.next_frame().await;
        assert_eq!(frame["data"]["seq"], seq, "{frame}");
    }
    client.round_trip().await;
    assert_eq!(server.metric("herald_gaps_recovered_total").await, 1.0);
    assert_eq!(
        server.metric("herald_disconnects_total{reason=\"slow_client\"}").await,
        0.0
    );
}
