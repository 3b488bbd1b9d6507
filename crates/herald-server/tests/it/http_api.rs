//! The HTTP API: publishing with the API key, user-token messaging,
//! idempotency, and the operational endpoints.

use serde_json::{Value, json};

use crate::harness::{API_KEY, Event, TestServer, wait_until};

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| panic!("JSON body expected, got {text}"))
}

#[tokio::test]
async fn publish_needs_the_api_key() {
    let server = TestServer::start().await;
    let body = json!({"channel": "news", "data": 1}).to_string();
    for key in [None, Some("wrong-key-wrong-key"), Some("")] {
        let (status, text) = server.http("POST", "/api/v1/publish", key, Some(body.clone())).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(parse(&text)["error"]["code"], "unauthorized");
    }
}

#[tokio::test]
async fn malformed_publishes_get_400_with_a_json_error() {
    let server = TestServer::start().await;
    let cases = [
        ("not json", "invalid JSON body"),
        ("{}", "exactly one of `data` and `data_base64`"),
        (r#"{"channel":"news"}"#, "exactly one of `data`"),
        (r#"{"data":1}"#, "exactly one of `channel` and `channels`"),
        (
            r#"{"channel":"news","channels":["a"],"data":1}"#,
            "exactly one of `channel`",
        ),
        (
            r#"{"channel":"news","data":1,"colour":"red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"channel":"bad name","data":1}"#, "channel `bad name`"),
        (r#"{"channel":"nope:x","data":1}"#, "unknown namespace"),
        (r#"{"channel":"news","data":1,"type":"has space"}"#, "message `type`"),
        (
            r#"{"channel":"news","data":1,"type":"ack"}"#,
            "reserved for server frames",
        ),
        (r#"{"channel":"news","data":1,"type":"_subscribe"}"#, "not start with _"),
        (r#"{"channel":"news","data_base64":"***"}"#, "not valid base64"),
        (r#"{"channels":[],"data":1}"#, "`channels` must list"),
        (r#"{"channel":"news","data":1,"message_id":""}"#, "`message_id`"),
    ];
    for (body, fragment) in cases {
        let (status, text) = server
            .http("POST", "/api/v1/publish", Some(API_KEY), Some(body.into()))
            .await;
        assert_eq!(status, 400, "{body}: {text}");
        let error = parse(&text);
        assert_eq!(error["error"]["code"], "bad_request");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(fragment),
            "{body}: {text}"
        );
    }
    let (status, text) = server.http("GET", "/api/v1/publish", Some(API_KEY), None).await;
    assert_eq!(status, 405, "{text}");
    let (status, text) = server.http("GET", "/nowhere", None, None).await;
    assert_eq!(
        (status, parse(&text)["error"]["code"].clone()),
        (404, json!("not_found"))
    );
}

#[tokio::test]
async fn oversized_data_gets_413() {
    let server = TestServer::start().await;
    let big = "x".repeat(65_536);
    let (status, body) = server.publish(json!({"channel": "news", "data": big})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_large");
    let huge = "x".repeat(1_000_000);
    let (status, body) = server.publish(json!({"channel": "news", "data": huge})).await;
    assert_eq!((status, body["error"]["code"].clone()), (413, json!("too_large")));
    // Just under the limit goes through.
    let fits = "x".repeat(65_536 - 2);
    assert_eq!(server.publish(json!({"channel": "news", "data": fits})).await.0, 200);
}

#[tokio::test]
async fn a_repeated_message_id_is_delivered_once() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let first = server
        .publish(json!({"channel": "user:alice", "data": 1, "message_id": "order-1"}))
        .await
        .1;
    let again = server
        .publish(json!({"channel": "user:alice", "data": 1, "message_id": "order-1"}))
        .await
        .1;
    assert_eq!(first["message_id"], "order-1");
    assert!(first.get("duplicate").is_none());
    assert_eq!(again["duplicate"], true);
    assert_eq!(alice.next_frame().await["message_id"], "order-1");
    server.publish_ok("user:alice", json!("marker")).await;
    assert_eq!(
        alice.next_frame().await["data"],
        "marker",
        "the repeat was not delivered"
    );
    assert_eq!(server.metric("herald_duplicates_suppressed_total").await, 1.0);
}

#[tokio::test]
async fn broadcast_publishes_to_every_listed_channel() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let (status, body) = server
        .publish(json!({"channels": ["user:alice", "user:bob"], "type": "alert", "data": {"level": 3}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["channel"], "user:bob");
    for client in [&mut alice, &mut bob] {
        let frame = client.expect_type("alert").await;
        assert_eq!(frame["data"], json!({"level": 3}));
    }
}

#[tokio::test]
async fn binary_payloads_arrive_in_binary_frames() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let (status, body) = server
        .publish(json!({"channel": "user:alice", "data_base64": "AAH/aGk="}))
        .await;
    assert_eq!(status, 200, "{body}");
    let Event::Binary(bytes) = alice.next_event().await else {
        panic!("expected a binary frame")
    };
    let (header, payload) = herald_core::publication::decode_binary_delivery(&bytes).expect("header, newline, payload");
    assert_eq!(header.channel, "user:alice");
    assert_eq!(header.message_id, body["message_id"]);
    assert_eq!(payload, b"\x00\x01\xffhi");
}

#[tokio::test]
async fn user_token_endpoints_send_direct_and_group_messages() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    carol.subscribe("group:9").await;
    bob.subscribe("group:9").await;
    let alice = server.token("alice");

    let body = json!({"to_user_id": "bob", "content": "hello bob"}).to_string();
    let (status, text) = server.http("POST", "/api/v1/messages", Some(&alice), Some(body)).await;
    assert_eq!(status, 200, "{text}");
    let frame = bob.expect_type("new_message").await;
    assert_eq!(frame["channel"], "user:bob");
    assert_eq!(
        frame["data"],
        json!({"from_user_id": "alice", "to_user_id": "bob", "msg_type": "text", "content": "hello bob"})
    );

    let body = json!({"content": "hi group", "msg_type": "text"}).to_string();
    let (status, text) = server
        .http("POST", "/api/v1/groups/9/messages", Some(&alice), Some(body.clone()))
        .await;
    assert_eq!(status, 200, "{text}");
    for client in [&mut bob, &mut carol] {
        let frame = client.expect_type("new_message").await;
        assert_eq!(frame["data"]["from_user_id"], "alice");
        assert_eq!(frame["data"]["group_id"], "9");
    }
    // The sender is excluded: bob posting to the group does not reach bob.
    let bob_token = server.token("bob");
    server
        .http(
            "POST",
            "/api/v1/groups/9/messages",
            Some(&bob_token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(carol.expect_type("new_message").await["data"]["from_user_id"], "bob");
    server.publish_ok("user:bob", json!("marker")).await;
    assert_eq!(bob.next_frame().await["data"], "marker");

    let (status, text) = server
        .http("POST", "/api/v1/messages", Some("bad-token"), Some(body.clone()))
        .await;
    assert_eq!(
        (status, parse(&text)["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let (status, _) = server.http("POST", "/api/v1/messages", Some(API_KEY), Some(body)).await;
    assert_eq!(status, 401, "the API key is not a user token");
}

#[tokio::test]
async fn operational_endpoints_answer_as_documented() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.subscribe("group:1").await;
    let _alice2 = server.connect("alice").await;
    server.publish_ok("user:alice", json!(1)).await;
    alice.next_frame().await;
    // Fan-out counts a delivery once it has offered it to every subscriber.
    wait_until("both deliveries are counted", || async {
        server.metric("herald_messages_delivered_total").await == 2.0
    })
    .await;

    let (status, text) = server.http("GET", "/health", None, None).await;
    assert_eq!((status, parse(&text)), (200, json!({"status": "ok"})));
    let (status, text) = server.http("GET", "/ready", None, None).await;
    assert_eq!((status, parse(&text)), (200, json!({"ready": true})));
    let (status, text) = server.http("GET", "/stats", None, None).await;
    assert_eq!(status, 200);
    let stats = parse(&text);
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["users_online"], 1);
    assert_eq!(stats["channels"], 2, "user:alice and group:1");
    assert_eq!(stats["messages_published"], 1);
    assert_eq!(stats["messages_delivered"], 2);

    let metrics = server.metrics().await;
    for series in [
        "herald_connections 2",
        "herald_messages_published_total{source=\"http\"} 1",
        "herald_messages_delivered_total 2",
        "herald_fanout_seconds_count 1",
        "herald_broker_up 1",
    ] {
        assert!(
            metrics.lines().any(|line| line == series),
            "missing `{series}` in\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("alice") && !metrics.contains("group:1"),
        "no user ids or channels as labels"
    );
}

#[tokio::test]
async fn null_is_a_payload_like_any_other() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let (status, body) = server.publish(json!({"channel": "user:alice", "data": null})).await;
    assert_eq!(status, 200, "{body}");
    let frame = alice.next_frame().await;
    assert!(frame.get("data").is_some_and(Value::is_null), "{frame}");
}

/// Server-managed membership: the API subscribes every connection of a user,
/// in a namespace clients cannot subscribe to themselves.
#[tokio::test]
async fn the_server_api_subscribes_and_unsubscribes_all_of_a_users_connections() {
    let server = TestServer::start_with("[namespaces.alerts]\nsubscribe = \"server\"").await;
    let mut tabs = [server.connect("alice").await, server.connect("alice").await];
    let mut bob = server.connect("bob").await;
    let refused = tabs[0]
        .command("subscribe", "s", json!({"channel": "alerts:ops"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden");

    let body = json!({"channel": "alerts:ops"}).to_string();
    let (status, text) = server
        .http(
            "POST",
            "/api/v1/users/alice/subscriptions",
            Some(API_KEY),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    for tab in &mut tabs {
        assert_eq!(tab.expect_type("subscribed").await["data"]["channel"], "alerts:ops");
    }
    server.publish_ok("alerts:ops", json!("disk full")).await;
    for tab in &mut tabs {
        assert_eq!(tab.next_frame().await["data"], "disk full");
    }
    server.publish_ok("user:bob", json!("marker")).await;
    assert_eq!(bob.next_frame().await["data"], "marker", "bob was not subscribed");

    let (status, text) = server
        .http(
            "DELETE",
            "/api/v1/users/alice/subscriptions/alerts:ops",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    for tab in &mut tabs {
        assert_eq!(tab.expect_type("unsubscribed").await["data"]["channel"], "alerts:ops");
    }
    server.publish_ok("alerts:ops", json!("after")).await;
    server.publish_ok("user:alice", json!("marker")).await;
    for tab in &mut tabs {
        assert_eq!(tab.next_frame().await["data"], "marker");
    }
    let (status, _) = server
        .http("POST", "/api/v1/users/alice/subscriptions", None, Some(body))
        .await;
    assert_eq!(status, 401);
    let (status, text) = server
        .http(
            "POST",
            "/api/v1/users/alice/subscriptions",
            Some(API_KEY),
            Some(json!({"channel": "user:bob"}).to_string()),
        )
        .await;
    assert_eq!(status, 400, "{text}");
}
