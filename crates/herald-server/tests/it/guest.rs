//! The guest chat (`[guest]`): a raw WebSocket client speaking exactly the
//! GoChat seed's frames, token users in the same room, the username
//! rules, the limits, shutdown, and two nodes sharing a Redis.

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Client, RedisServer, TestServer};

const GUEST: &str = "[guest]\nenabled = true\nrooms = [\"lobby\", \"games\"]";

async fn guest(server: &TestServer, path: &str) -> Client {
    let request = format!("ws://{}{path}", server.addr).into_client_request().unwrap();
    server
        .connect_request(request)
        .await
        .expect("the guest upgrade succeeds")
}

/// Connects to the lobby and names the guest with the seed's first message.
async fn named(server: &TestServer, name: &str, content: &str) -> Client {
    let mut client = guest(server, "/chat").await;
    client.send(json!({"username": name, "content": content})).await;
    expect(&mut client, "System", &format!("{name} joined the chat")).await;
    expect(&mut client, name, content).await;
    client
}

async fn expect(client: &mut Client, username: &str, content: &str) {
    assert_eq!(
        client.next_frame().await,
        json!({"username": username, "content": content})
    );
}

/// The next frame is a refusal with this `error` code; returns its content.
async fn refused(client: &mut Client, code: &str) -> String {
    let frame = client.next_frame().await;
    assert_eq!(
        (&frame["username"], &frame["error"]),
        (&json!("System"), &json!(code)),
        "{frame}"
    );
    frame["content"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_seed_session_names_joins_chats_and_leaves() {
    let server = TestServer::start_with(GUEST).await;
    let mut alice = named(&server, "alice", "Hello everyone!").await;
    let mut bob = guest(&server, "/chat").await;
    bob.send_text(r#"{"username": "bob", "content": "hi alice"}"#).await;
    expect(&mut bob, "System", "bob joined the chat").await;
    expect(&mut bob, "bob", "hi alice").await;
    expect(&mut alice, "System", "bob joined the chat").await;
    expect(&mut alice, "bob", "hi alice").await;
    alice.send_text(r#"{"content": "welcome, bob"}"#).await;
    expect(&mut alice, "alice", "welcome, bob").await;
    expect(&mut bob, "alice", "welcome, bob").await;
    // A name alone joins without saying anything; the same name again is fine.
    bob.send(json!({"username": "bob", "content": "again"})).await;
    expect(&mut alice, "bob", "again").await;
    drop(bob);
    expect(&mut alice, "System", "bob left the chat").await;
}

#[tokio::test]
async fn usernames_follow_the_rules_and_bad_input_is_answered() {
    let server = TestServer::start_with(&format!("{GUEST}\nmax_username_length = 8")).await;
    let _alice = named(&server, "alice", "first").await;
    let mut client = guest(&server, "/chat").await;
    client.send(json!({"content": "who am I?"})).await;
    assert!(refused(&mut client, "not_named").await.contains("username"));
    client.send(json!({"username": "abcdefghi", "content": "x"})).await;
    assert!(refused(&mut client, "invalid_username").await.contains("longer than 8"));
    client.send(json!({"username": "al ice", "content": "x"})).await;
    refused(&mut client, "invalid_username").await;
    client.send(json!({"username": "System", "content": "x"})).await;
    refused(&mut client, "invalid_username").await;
    client.send(json!({"username": "ALICE", "content": "x"})).await;
    assert!(refused(&mut client, "username_taken").await.contains("taken"));
    client.send_text("not json").await;
    refused(&mut client, "invalid_frame").await;
    client.send(json!({"username": 7})).await;
    refused(&mut client, "invalid_frame").await;
    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2].into()))
        .await
        .unwrap();
    refused(&mut client, "invalid_frame").await;
    // Still open: a valid name now joins.
    client.send(json!({"username": "carol", "content": "made it"})).await;
    expect(&mut client, "System", "carol joined the chat").await;
    expect(&mut client, "carol", "made it").await;
    client.send(json!({"username": "dave", "content": "x"})).await;
    refused(&mut client, "invalid_username").await;
    client.send(json!({"content": ""})).await;
    refused(&mut client, "invalid_frame").await;
}

#[tokio::test]
async fn a_guest_reaches_nothing_but_its_room() {
    let server = TestServer::start_with(GUEST).await;
    let mut alice = named(&server, "alice", "hi").await;
    alice
        .send(json!({"type": "subscribe", "data": {"channel": "group:secret"}}))
        .await;
    assert!(refused(&mut alice, "invalid_frame").await.contains("not served here"));
    alice
        .send(json!({"type": "publish", "data": {"channel": "group:secret", "data": 1}}))
        .await;
    refused(&mut alice, "invalid_frame").await;
    alice
        .send(json!({"type": "auth", "data": {"token": server.token("x")}}))
        .await;
    refused(&mut alice, "invalid_frame").await;
    let mut gamer = guest(&server, "/chat/games").await;
    gamer.send(json!({"username": "gamer", "content": "gg"})).await;
    expect(&mut gamer, "System", "gamer joined the chat").await;
    expect(&mut gamer, "gamer", "gg").await;
    server.publish_ok("group:secret", json!({"content": "no"})).await;
    server.publish_ok("user:alice", json!({"content": "no"})).await;
    server
        .publish_ok("chat:lobby", json!({"username": "Server", "content": "marker"}))
        .await;
    expect(&mut alice, "Server", "marker").await;
    server
        .publish_ok("chat:games", json!({"username": "Server", "content": "marker"}))
        .await;
    expect(&mut gamer, "Server", "marker").await;
    let (status, body) = server.http("GET", "/chat/nope", None, None).await;
    assert_eq!(status, 404);
    assert!(body.contains("unknown_room"), "{body}");
}

#[tokio::test]
async fn guests_and_token_users_share_a_room() {
    let server = TestServer::start_with(GUEST).await;
    let mut alice = named(&server, "alice", "Hello everyone!").await;
    let mut carol = server.connect("carol").await;
    carol.subscribe("chat:lobby").await;
    expect(&mut alice, "System", "carol joined the chat").await;
    let ack = carol
        .command(
            "publish",
            "p",
            json!({"channel": "chat:lobby", "data": {"content": "hi guests"}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    expect(&mut alice, "carol", "hi guests").await;
    // A token user cannot speak under another name.
    carol
        .command(
            "publish",
            "q",
            json!({"channel": "chat:lobby", "data": {"username": "alice", "content": "x"}}),
        )
        .await;
    expect(&mut alice, "carol", "x").await;
    alice.send(json!({"content": "hi carol"})).await;
    expect(&mut alice, "alice", "hi carol").await;
    let frame = next_delivery(&mut carol).await;
    assert_eq!(frame["channel"], "chat:lobby");
    assert_eq!(frame["data"], json!({"username": "alice", "content": "hi carol"}));
    // A token user's name is taken for guests too.
    let mut impostor = guest(&server, "/chat").await;
    impostor.send(json!({"username": "carol", "content": "x"})).await;
    refused(&mut impostor, "username_taken").await;
    drop(alice);
    let leave = next_delivery(&mut carol).await;
    assert_eq!(
        (leave["type"].clone(), leave["data"]["user_id"].clone()),
        (json!("leave"), json!("alice"))
    );
}

/// The next frame that is neither an `ack` nor carol's own publish coming back.
async fn next_delivery(client: &mut Client) -> Value {
    loop {
        let frame = client.next_frame().await;
        if frame["type"] != "ack" && frame["from"] != "carol" {
            return frame;
        }
    }
}

#[tokio::test]
async fn the_guest_chat_is_off_by_default() {
    let server = TestServer::start().await;
    let (status, body) = server.http("GET", "/chat", None, None).await;
    assert_eq!(status, 404);
    assert!(body.contains("guest_chat_disabled"), "{body}");
    let request = format!("ws://{}/chat", server.addr).into_client_request().unwrap();
    assert!(server.connect_request(request).await.is_err());
    // `/ws` without a token still wants `auth`, not a guest's name.
    let mut client = server.connect_raw("").await.unwrap();
    client.send(json!({"username": "alice", "content": "hi"})).await;
    assert_eq!(client.next_frame().await["type"], "error");
}

#[tokio::test]
async fn guest_limits_answer_clearly() {
    let server = TestServer::start_with(&format!(
        "[limits]\nmax_connections_per_ip = 2\ncommands_per_second = 1\ncommand_burst = 3\nauth_timeout = \"300ms\"\n{GUEST}"
    ))
    .await;
    let mut alice = named(&server, "alice", "1").await;
    let mut idle = guest(&server, "/chat").await;
    let request = format!("ws://{}/chat", server.addr).into_client_request().unwrap();
    match server.connect_request(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected HTTP 429, got {:?}", other.map(|_| ())),
    }
    // A guest that never names itself is closed after the auth timeout.
    refused(&mut idle, "not_named").await;
    assert_eq!(idle.expect_close().await.0, 4002);
    for i in 2..4 {
        alice.send(json!({"content": i.to_string()})).await;
    }
    expect(&mut alice, "alice", "2").await;
    expect(&mut alice, "alice", "3").await;
    alice.send(json!({"content": "over"})).await;
    refused(&mut alice, "rate_limited").await;
    for _ in 0..10 {
        let frame = json!({"content": "spam"}).to_string();
        if alice
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Text(frame.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(alice.expect_close().await.0, 4029);
}

#[tokio::test]
async fn shutdown_closes_guests_with_going_away() {
    let mut server = TestServer::start_with(&format!(
        "[shutdown]\ndrain_window = \"100ms\"\ntimeout = \"3s\"\n{GUEST}"
    ))
    .await;
    let mut alice = named(&server, "alice", "hi").await;
    let running = server.running.take().expect("an in-process node");
    let stopping = tokio::spawn(running.stop());
    assert_eq!(alice.expect_close().await.0, 1001);
    assert!(stopping.await.unwrap(), "the node stops in time");
}

#[tokio::test]
async fn guests_on_two_nodes_share_the_room_through_redis() {
    let redis = RedisServer::start().await;
    let a = TestServer::start_with(&redis.toml(GUEST)).await;
    let b = TestServer::start_with(&redis.toml(GUEST)).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut alice = named(&a, "alice", "from a").await;
    let mut bob = guest(&b, "/chat").await;
    bob.send(json!({"username": "bob", "content": "from b"})).await;
    expect(&mut bob, "System", "bob joined the chat").await;
    expect(&mut bob, "bob", "from b").await;
    expect(&mut alice, "System", "bob joined the chat").await;
    expect(&mut alice, "bob", "from b").await;
    alice.send(json!({"content": "hello b"})).await;
    expect(&mut alice, "alice", "hello b").await;
    expect(&mut bob, "alice", "hello b").await;
    // The name is taken across nodes.
    let mut other = guest(&b, "/chat").await;
    other.send(json!({"username": "alice", "content": "x"})).await;
    refused(&mut other, "username_taken").await;
    drop(bob);
    expect(&mut alice, "System", "bob left the chat").await;
}
