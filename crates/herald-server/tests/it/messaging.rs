//! Delivery: user channels on many tabs, groups and chat, policies,
//! presence, read events, client publishes and bad frames.

use futures_util::SinkExt;
use serde_json::json;

use crate::harness::{TestServer, expect_only_marker};

#[tokio::test]
async fn every_connection_of_a_user_receives_its_notifications() {
    let server = TestServer::start().await;
    let mut tabs = vec![
        server.connect("alice").await,
        server.connect("alice").await,
        server.connect("alice").await,
    ];
    let mut bob = server.connect("bob").await;
    let receipt = server
        .publish(json!({"channel": "user:alice", "type": "notification", "data": {"title": "Hello", "n": [1, 2]}}))
        .await
        .1;
    for tab in &mut tabs {
        let frame = tab.next_frame().await;
        assert_eq!(frame["type"], "notification");
        assert_eq!(frame["channel"], "user:alice");
        assert_eq!(frame["data"], json!({"title": "Hello", "n": [1, 2]}));
        assert_eq!(frame["message_id"], receipt["message_id"]);
        assert!(frame["timestamp"].as_u64().unwrap() > 0);
        assert!(frame.get("offset").is_none(), "no history, no offset");
    }
    expect_only_marker(&server, &mut bob, "user:bob").await;
}

#[tokio::test]
async fn group_chat_acks_the_sender_and_reaches_the_others() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    for (client, id) in [(&mut alice, "a"), (&mut bob, "b"), (&mut carol, "c")] {
        let ack = client.command("join_group", id, json!({"group_id": 42})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["data"]["channel"], "group:42");
    }
    let ack = alice
        .command(
            "send_message",
            "m1",
            json!({"group_id": "42", "msg_type": "text", "content": "hi all"}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let message_id = ack["data"]["message_id"].clone();
    for other in [&mut bob, &mut carol] {
        let frame = other.expect_type("new_message").await;
        assert_eq!(frame["channel"], "group:42");
        assert_eq!(frame["message_id"], message_id);
        assert_eq!(
            frame["data"],
            json!({"group_id": "42", "from_user_id": "alice", "msg_type": "text", "content": "hi all"})
        );
    }
    // No echo: the next thing alice sees is the marker.
    expect_only_marker(&server, &mut alice, "group:42").await;
    bob.next_frame().await;
    carol.next_frame().await;

    let ack = bob.command("leave_group", "l1", json!({"group_id": "42"})).await;
    assert_eq!(ack["type"], "ack");
    alice
        .command("send_message", "m2", json!({"group_id": 42, "content": {"rich": true}}))
        .await;
    let frame = carol.expect_type("new_message").await;
    assert_eq!(frame["data"]["content"], json!({"rich": true}));
    assert_eq!(frame["data"]["msg_type"], "text");
    expect_only_marker(&server, &mut bob, "user:bob").await;
    let error = bob.command("leave_group", "l2", json!({"group_id": "42"})).await;
    assert_eq!(error["data"]["code"], "not_subscribed");
}

#[tokio::test]
async fn policies_refuse_what_they_do_not_allow() {
    let server = TestServer::start_with(
        "[namespaces.group]\nsubscribe = \"claim\"\n[namespaces.team]\nsubscribe = \"authenticated\"\nclient_publish = false",
    )
    .await;
    let mut member = server
        .connect_token(&server.token_with("alice", &["group:7", "group:9*"], 600))
        .await;
    let mut outsider = server.connect("mallory").await;
    assert_eq!(
        member.command("join_group", "j", json!({"group_id": 7})).await["type"],
        "ack"
    );
    assert_eq!(
        member.command("join_group", "j", json!({"group_id": 91})).await["type"],
        "ack"
    );
    let refused = outsider.command("join_group", "j", json!({"group_id": 7})).await;
    assert_eq!(refused["data"]["code"], "forbidden", "{refused}");
    let refused = outsider
        .command("send_message", "s", json!({"group_id": 7, "content": "spam"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden");
    let refused = outsider
        .command("subscribe", "u", json!({"channel": "user:alice"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden");
    let refused = outsider
        .command("unsubscribe", "u", json!({"channel": "user:mallory"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden");
    assert_eq!(
        outsider.command("subscribe", "t", json!({"channel": "team:red"})).await["type"],
        "ack"
    );
    let refused = outsider
        .command("publish", "p", json!({"channel": "team:red", "data": 1}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden");
    let refused = outsider.command("subscribe", "n", json!({"channel": "nope:x"})).await;
    assert_eq!(refused["data"]["code"], "unknown_namespace");
    // The refused user got nothing of the group's traffic.
    member
        .command("send_message", "m", json!({"group_id": 7, "content": "secret"}))
        .await;
    expect_only_marker(&server, &mut outsider, "user:mallory").await;
}

#[tokio::test]
async fn client_publish_carries_the_sender_and_direct_messages_work() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    bob.subscribe("group:5").await;
    let ack = alice
        .command(
            "publish",
            "p",
            json!({"channel": "group:5", "type": "poke", "data": {"x": 1}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let frame = bob.expect_type("poke").await;
    assert_eq!(
        (frame["from"].clone(), frame["data"].clone()),
        (json!("alice"), json!({"x": 1}))
    );
    // A publish into another user's personal channel is a direct message.
    alice
        .command("publish", "dm", json!({"channel": "user:bob", "data": "psst"}))
        .await;
    let frame = bob.expect_type("message").await;
    assert_eq!(
        (frame["channel"].clone(), frame["from"].clone()),
        (json!("user:bob"), json!("alice"))
    );
}

#[tokio::test]
async fn presence_lists_users_and_connections() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut alice2 = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for client in [&mut alice, &mut alice2, &mut bob] {
        client.subscribe("group:1").await;
    }
    let reply = bob.command("presence", "pr", json!({"channel": "group:1"})).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(reply["data"]["connections"], 3);
    assert_eq!(
        reply["data"]["users"],
        json!([{"user_id": "alice", "connections": 2}, {"user_id": "bob", "connections": 1}])
    );
    let refused = bob.command("presence", "pu", json!({"channel": "user:alice"})).await;
    assert_eq!(refused["type"], "error");
}

#[tokio::test]
async fn mark_read_reaches_the_users_other_tabs() {
    let server = TestServer::start().await;
    let mut tab1 = server.connect("alice").await;
    let mut tab2 = server.connect("alice").await;
    let ack = tab1
        .command("mark_read", "r", json!({"group_id": 3, "message_id": "m-77"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let event = tab2.expect_type("read").await;
    assert_eq!(event["data"], json!({"channel": "group:3", "message_id": "m-77"}));
    expect_only_marker(&server, &mut tab1, "user:alice").await;
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    let cases = [
        ("not json", "invalid_json", None),
        ("[]", "invalid_json", None),
        (r#"{"message_id":"x1"}"#, "invalid_frame", Some("x1")),
        (r#"{"type":"dance","message_id":"x2"}"#, "unknown_type", Some("x2")),
        (
            r#"{"type":"subscribe","message_id":"x3","data":{}}"#,
            "invalid_data",
            Some("x3"),
        ),
        (
            r#"{"type":"subscribe","message_id":"x4","data":{"channel":"bad name"}}"#,
            "invalid_channel",
            Some("x4"),
        ),
        (
            r#"{"type":"auth","message_id":"x5","data":{"token":"t"}}"#,
            "already_authenticated",
            Some("x5"),
        ),
        (
            r#"{"type":"history","message_id":"x6","data":{"channel":"group:1"}}"#,
            "not_available",
            Some("x6"),
        ),
    ];
    for (text, code, id) in cases {
        client.send_text(text).await;
        let error = client.expect_type("error").await;
        assert_eq!(error["data"]["code"], code, "{text}: {error}");
        assert_eq!(error["message_id"].as_str(), id, "{text}");
        assert!(!error["data"]["message"].as_str().unwrap().is_empty());
    }
    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(client.expect_type("error").await["data"]["code"], "invalid_frame");
    client.round_trip().await;
    let ack = client
        .command(
            "subscribe",
            "rec",
            json!({"channel": "group:1", "offset": 5, "epoch": "e"}),
        )
        .await;
    assert_eq!(
        ack["data"]["recovered"], false,
        "no history: recovery is refused explicitly"
    );
}

/// Issue 9.10: the seed group-chat client sends `msg_type` as a number and
/// reads `online_users` from `/stats`.
#[tokio::test]
async fn seed_clients_send_numeric_msg_types_and_read_online_users() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    for (client, id) in [(&mut alice, "a"), (&mut bob, "b")] {
        let ack = client.command("join_group", id, json!({"group_id": 42})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let ack = alice
        .command(
            "send_message",
            "m1",
            json!({"group_id": 42, "msg_type": 1, "content": "hi"}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let frame = bob.expect_type("new_message").await;
    assert_eq!(
        frame["data"],
        json!({"group_id": "42", "from_user_id": "alice", "msg_type": 1, "content": "hi"}),
        "delivered as sent"
    );
    let refused = alice
        .command(
            "send_message",
            "m2",
            json!({"group_id": 42, "msg_type": true, "content": "hi"}),
        )
        .await;
    assert_eq!(refused["data"]["code"], "invalid_data", "{refused}");
    assert!(
        refused["data"]["message"].as_str().unwrap().contains("msg_type"),
        "{refused}"
    );

    // The HTTP chat endpoints take the same.
    let token = server.token("alice");
    let body = json!({"content": "hi group", "msg_type": 2}).to_string();
    let (status, text) = server
        .http("POST", "/api/v1/groups/42/messages", Some(&token), Some(body))
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(bob.expect_type("new_message").await["data"]["msg_type"], 2);
    let body = json!({"to_user_id": "bob", "content": "hi bob", "msg_type": 3}).to_string();
    let (status, text) = server.http("POST", "/api/v1/messages", Some(&token), Some(body)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(bob.expect_type("new_message").await["data"]["msg_type"], 3);

    let (_, stats) = server.http("GET", "/stats", None, None).await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["online_users"], 2, "{stats}");
    assert_eq!(stats["users_online"], 2, "{stats}");
}

/// Issue 9.11: by default a group is members-only. Membership comes from the
/// token's `channels` claim or from the server API; an open namespace is one
/// line of configuration away.
#[tokio::test]
async fn groups_are_members_only_by_default() {
    let server = TestServer::start_plain("").await;
    let mut outsider = server.connect("mallory").await;
    for (kind, data) in [
        ("join_group", json!({"group_id": 7})),
        ("subscribe", json!({"channel": "group:7"})),
        ("send_message", json!({"group_id": 7, "content": "spam"})),
        ("presence", json!({"channel": "group:7"})),
        ("history", json!({"channel": "group:7"})),
    ] {
        let refused = outsider.command(kind, kind, data).await;
        assert_eq!(refused["data"]["code"], "forbidden", "{kind}: {refused}");
    }
    let mallory = server.token("mallory");
    let (status, body) = server
        .http(
            "POST",
            "/api/v1/groups/7/messages",
            Some(&mallory),
            Some(json!({"content": "spam"}).to_string()),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    // A member by claim, and one the server API subscribed.
    let mut alice = server
        .connect_token(&server.token_with("alice", &["group:7"], 600))
        .await;
    assert_eq!(
        alice.command("join_group", "j", json!({"group_id": 7})).await["type"],
        "ack"
    );
    let mut bob = server.connect("bob").await;
    let (status, body) = server
        .http(
            "POST",
            "/api/v1/users/bob/subscriptions",
            Some(crate::harness::API_KEY),
            Some(json!({"channel": "group:7"}).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(bob.expect_type("subscribed").await["data"]["channel"], "group:7");
    let ack = alice
        .command("send_message", "a", json!({"group_id": 7, "content": "to members"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(bob.expect_type("new_message").await["data"]["content"], "to members");
    let ack = bob
        .command("send_message", "b", json!({"group_id": 7, "content": "from bob"}))
        .await;
    assert_eq!(ack["type"], "ack", "a member the server API added may post: {ack}");
    assert_eq!(alice.expect_type("new_message").await["data"]["content"], "from bob");
    // A member is a member for every command that needs one.
    let presence = bob.command("presence", "p", json!({"channel": "group:7"})).await;
    assert_eq!(presence["type"], "ack", "{presence}");
    assert_eq!(presence["data"]["connections"], 2, "{presence}");
    let read = bob
        .command("mark_read", "r", json!({"group_id": 7, "message_id": "m-1"}))
        .await;
    assert_eq!(read["type"], "ack", "{read}");
    let refused = outsider
        .command("mark_read", "r", json!({"group_id": 7, "message_id": "m-1"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden", "{refused}");
    // The outsider saw none of it.
    expect_only_marker(&server, &mut outsider, "user:mallory").await;

    // Open groups are one line of configuration away.
    let open = TestServer::start_plain("[namespaces.group]\nsubscribe = \"authenticated\"").await;
    let mut anyone = open.connect("mallory").await;
    assert_eq!(
        anyone.command("join_group", "j", json!({"group_id": 7})).await["type"],
        "ack"
    );
}

/// A command's `message_id` comes back exactly as sent, whatever a number
/// parser would make of it, in acks and errors alike.
#[tokio::test]
async fn message_ids_are_echoed_as_sent() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    for id in [
        "1e2",
        "-0",
        "1e400",
        "123456789012345678901234567890",
        "0.1000",
        r#""x\u0079""#,
    ] {
        client
            .send_text(&format!(r#"{{"type":"ping","message_id":{id}}}"#))
            .await;
        let reply = client.next_text().await;
        assert!(reply.contains(&format!(r#""message_id":{id}"#)), "{id}: {reply}");
    }
    client.send_text(r#"{"type":"dance","message_id":1e400}"#).await;
    let reply = client.next_text().await;
    assert!(
        reply.contains(r#""message_id":1e400"#) && reply.contains("unknown_type"),
        "{reply}"
    );
}
