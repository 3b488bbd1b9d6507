//! The read paths (history over HTTP and WebSocket, the inbox, recovery)
//! return what was published byte for byte, whatever JSON it was: numbers
//! `serde_json::Value` cannot hold, nesting deeper than its recursion limit.
//! Frames are read here as raw text, since the test's own JSON parser has
//! the same limits.

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{API_KEY, Client, DEADLINE, RedisServer, TestServer};

const CONFIG: &str = "[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 100\n\
                      [namespaces.user]\nhistory_size = 100";

/// JSON that is valid but that a `serde_json::Value` cannot represent (or
/// would not give back unchanged).
fn awkward_payloads() -> Vec<String> {
    vec![
        r#"{"x": 1e400}"#.to_owned(),
        format!("{}{}", "[".repeat(200), "]".repeat(200)),
        r#"{"big": 123456789012345678901234567890, "tiny": 1e-400, "neg": -0, "f": 1.50}"#.to_owned(),
        format!("{{\"deep\": {}1e999{}}}", "{\"a\":".repeat(150), "}".repeat(150)),
    ]
}

/// Any server frame, with the parts this file looks at kept raw.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    message_id: Option<String>,
    data: Option<Box<RawValue>>,
}

/// A history page: the publications' `data` kept raw.
#[derive(Deserialize)]
struct RawPage {
    epoch: String,
    offset: u64,
    publications: Vec<RawPublication>,
}

#[derive(Deserialize)]
struct RawPublication {
    offset: u64,
    data: Box<RawValue>,
}

/// The `data` of a direct message (`new_message`), its content raw.
#[derive(Deserialize)]
struct RawDirectMessage {
    content: Box<RawValue>,
}

/// The next text frame, parsed with raw `data`.
async fn next_raw(client: &mut Client) -> RawFrame {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("the connection stays open")
            .expect("the connection stays open");
        match message {
            Message::Text(text) => {
                return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            }
            Message::Close(close) => panic!("connection closed: {close:?}"),
            _ => continue,
        }
    }
}

/// Sends a command and returns its raw `ack` data.
async fn raw_command(client: &mut Client, kind: &str, data: serde_json::Value) -> Box<RawValue> {
    client
        .send(json!({"type": kind, "message_id": kind, "data": data}))
        .await;
    loop {
        let frame = next_raw(client).await;
        if frame.message_id.as_deref() == Some(kind) {
            assert_eq!(
                frame.kind,
                "ack",
                "{}",
                frame.data.map(|d| d.get().to_owned()).unwrap_or_default()
            );
            return frame.data.expect("an ack has data");
        }
    }
}

async fn stored_bytes_go_out_as_they_came_in(server: &TestServer) {
    let payloads = awkward_payloads();
    let bob = server.token("bob");
    for payload in &payloads {
        let body = format!(r#"{{"channel": "feed:awkward", "data": {payload}}}"#);
        let (status, answer) = server.http("POST", "/api/v1/publish", Some(API_KEY), Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        let body = format!(r#"{{"to_user_id": "alice", "content": {payload}}}"#);
        let (status, answer) = server.http("POST", "/api/v1/messages", Some(&bob), Some(body)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let expected: Vec<&str> = payloads.iter().map(String::as_str).collect();

    // History over HTTP.
    let (status, body) = server
        .http(
            "GET",
            "/api/v1/channels/feed:awkward/history?offset=0",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let page: RawPage = serde_json::from_str(&body).unwrap();
    let got: Vec<&str> = page.publications.iter().map(|p| p.data.get()).collect();
    assert_eq!(got, expected);

    // The inbox.
    let alice = server.token("alice");
    let (status, body) = server.http("GET", "/api/v1/inbox?since=0", Some(&alice), None).await;
    assert_eq!(status, 200, "{body}");
    let inbox: RawPage = serde_json::from_str(&body).unwrap();
    let contents: Vec<String> = inbox
        .publications
        .iter()
        .map(|p| {
            let message: RawDirectMessage = serde_json::from_str(p.data.get()).unwrap();
            message.content.get().to_owned()
        })
        .collect();
    assert_eq!(contents, expected);

    // History over WebSocket.
    let mut client = server.connect("alice").await;
    let ack = raw_command(&mut client, "history", json!({"channel": "feed:awkward"})).await;
    let page: RawPage = serde_json::from_str(ack.get()).unwrap();
    let got: Vec<&str> = page.publications.iter().map(|p| p.data.get()).collect();
    assert_eq!(got, expected);

    // Recovery: a subscribe from offset 0 replays every message.
    let recover = json!({"channel": "feed:awkward", "offset": 0, "epoch": page.epoch});
    raw_command(&mut client, "subscribe", recover).await;
    let mut replayed = Vec::new();
    while replayed.len() < expected.len() {
        let frame = next_raw(&mut client).await;
        assert_eq!(frame.kind, "message");
        replayed.push(frame.data.expect("a delivery has data").get().to_owned());
    }
    assert_eq!(replayed, expected);
    assert_eq!(page.offset, page.publications.last().map_or(0, |p| p.offset));

    // The connection is still served.
    client.round_trip().await;
}

/// Issue 9.1: a publish cannot poison a channel's history.
#[tokio::test]
async fn stored_bytes_go_out_as_they_came_in_memory() {
    let server = TestServer::start_with(CONFIG).await;
    stored_bytes_go_out_as_they_came_in(&server).await;
}

#[tokio::test]
async fn stored_bytes_go_out_as_they_came_in_redis() {
    let redis = RedisServer::start().await;
    let server = TestServer::start_with(&format!("{CONFIG}\n{}", redis.toml(""))).await;
    server.wait_ready().await;
    stored_bytes_go_out_as_they_came_in(&server).await;
}
