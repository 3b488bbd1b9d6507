//! The read paths (history over HTTP and WebSocket, the inbox, recovery)
//! return what was published byte for byte, whatever JSON it was: numbers
//! `serde_json::Value` cannot hold, nesting deeper than its recursion limit.
//! A named regression test, then a property test from arbitrary published
//! data (HTTP and client publishes, direct messages) to every read, on both
//! brokers. Frames are read here as raw text, since the test's own JSON
//! parser has the same limits.

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{API_KEY, Client, DEADLINE, RedisServer, TestServer};

const CONFIG: &str = "[namespaces.feed]\nsubscribe = \"authenticated\"\nclient_publish = true\n\
                      history_size = 100\n[namespaces.user]\nhistory_size = 100";

/// JSON that is valid but that a `serde_json::Value` cannot represent (or
/// would not give back unchanged).
fn awkward_payloads() -> Vec<String> {
    vec![
        r#"{"x": 1e400}"#.to_owned(),
        format!("{}{}", "[".repeat(200), "]".repeat(200)),
        r#"{"big": 123456789012345678901234567890, "tiny": 1e-400, "neg": -0, "f": 1.50}"#.to_owned(),
        format!("{{\"deep\": {}1e999{}}}", "{\"a\":".repeat(150), "}".repeat(150)),
        // A payload too (through Redis it once read as "no data").
        "null".to_owned(),
    ]
}

/// Any server frame, with the parts this file looks at kept raw.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    message_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
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
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    data_base64: Option<String>,
}

impl RawPublication {
    /// The JSON text of `data`; panics for a binary publication.
    fn text(&self) -> &str {
        self.data.as_deref().map(RawValue::get).expect("a JSON publication")
    }
}

/// A field that is present, whatever its JSON value (`null` included,
/// which a plain `Option` would read as absent).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// The `data` of a direct message (`new_message`), its content raw.
#[derive(Deserialize)]
struct RawDirectMessage {
    content: Box<RawValue>,
}

/// A frame from the server: text parsed with raw `data`, or binary.
enum RawEvent {
    Text(RawFrame),
    Binary(Vec<u8>),
}

/// The next text or binary frame.
async fn next_event(client: &mut Client) -> RawEvent {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("the connection stays open")
            .expect("the connection stays open");
        match message {
            Message::Text(text) => {
                return RawEvent::Text(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")));
            }
            Message::Binary(bytes) => return RawEvent::Binary(bytes.to_vec()),
            Message::Close(close) => panic!("connection closed: {close:?}"),
            _ => continue,
        }
    }
}

/// The next text frame, parsed with raw `data`.
async fn next_raw(client: &mut Client) -> RawFrame {
    loop {
        if let RawEvent::Text(frame) = next_event(client).await {
            return frame;
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
    let got: Vec<&str> = page.publications.iter().map(RawPublication::text).collect();
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
            let message: RawDirectMessage = serde_json::from_str(p.text()).unwrap();
            message.content.get().to_owned()
        })
        .collect();
    assert_eq!(contents, expected);

    // History over WebSocket.
    let mut client = server.connect("alice").await;
    let ack = raw_command(&mut client, "history", json!({"channel": "feed:awkward"})).await;
    let page: RawPage = serde_json::from_str(ack.get()).unwrap();
    let got: Vec<&str> = page.publications.iter().map(RawPublication::text).collect();
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

// ------------------------------------------------------------ property test
//
// Arbitrary published data, through storage, to every read: whatever a
// publish accepted is read back byte for byte by HTTP history, the
// `history` command, recovery and the inbox; whatever it refused (400) is
// not stored.

use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What one publish sends.
#[derive(Debug, Clone)]
enum Published {
    /// JSON text, valid or not (serde_json decides which; the server must agree).
    Json(String),
    Binary(Vec<u8>),
}

/// JSON whitespace, as a publisher may put it between tokens.
const WS: &str = "[ \t\n\r]{0,2}";

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).expect("strings serialize")),
        Just(r#""\ud83d\ude00 \u0000 \" \\ \/ \b\f\n\r\t é""#.to_owned()),
        "\"[a-z]{0,8}\"",
    ]
}

/// JSON text as publishers write it: any layout, numbers of any size and
/// precision (`1e400`, 40-digit integers, `-0`), strings with any escapes,
/// repeated object keys.
fn json_text() -> impl Strategy<Value = String> {
    let number = "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?";
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number,
        json_string(),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec((WS, inner.clone(), WS), 0..5).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((prop_oneof![json_string(), Just("\"k\"".to_owned())], WS, inner), 0..5).prop_map(
                |members| {
                    let members: Vec<String> = members.into_iter().map(|(k, w, v)| format!("{k}{w}:{w}{v}")).collect();
                    format!("{{{}}}", members.join(","))
                }
            ),
        ]
    })
}

/// Nesting far past `serde_json::Value`'s recursion limit of 128.
fn deep_text() -> impl Strategy<Value = String> {
    (100usize..400, any::<bool>(), json_text()).prop_map(|(depth, arrays, leaf)| {
        if arrays {
            format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}{leaf}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        }
    })
}

/// Valid JSON with one character inserted or removed: usually invalid.
fn damaged_text() -> impl Strategy<Value = String> {
    (json_text(), any::<prop::sample::Index>(), any::<bool>(), any::<char>()).prop_map(|(text, at, insert, extra)| {
        let mut chars: Vec<char> = text.chars().collect();
        let at = at.index(chars.len() + 1);
        if insert {
            chars.insert(at, extra);
        } else if at < chars.len() {
            chars.remove(at);
        }
        chars.into_iter().collect()
    })
}

fn published() -> impl Strategy<Value = Published> {
    prop_oneof![
        4 => json_text().prop_map(Published::Json),
        1 => deep_text().prop_map(Published::Json),
        2 => damaged_text().prop_map(Published::Json),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Published::Binary),
    ]
}

/// Whether `text` is one JSON value: what the server must accept as `data`.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<Box<RawValue>>(text).is_ok()
}

/// What a read gives back of one publication, to compare.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Json(String),
    Binary(Vec<u8>),
}

impl Read {
    fn of_page(publication: &RawPublication) -> Read {
        use base64::Engine;
        match (&publication.data, &publication.data_base64) {
            (Some(data), None) => Read::Json(data.get().to_owned()),
            (None, Some(encoded)) => Read::Binary(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("data_base64 is base64"),
            ),
            _ => panic!("a publication has exactly one of data and data_base64"),
        }
    }
}

/// Channels and users are fresh for every case, so cases do not interfere.
static CASE: AtomicUsize = AtomicUsize::new(0);

/// Publishes `batch` and reads it back through every read path.
async fn round_trip(server: &TestServer, batch: &[Published]) -> Result<(), TestCaseError> {
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let channel = format!("feed:p{case}");
    let reader = format!("r{case}");
    let sender = server.token("sender");
    let mut publisher = server.connect("sender").await;
    let mut expected = Vec::new();
    let mut expected_inbox = Vec::new();
    for item in batch {
        let body = match item {
            Published::Json(text) => format!(r#"{{"channel": "{channel}", "data": {text}}}"#),
            Published::Binary(bytes) => {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                json!({"channel": channel, "data_base64": encoded}).to_string()
            }
        };
        let (status, answer) = server.http("POST", "/api/v1/publish", Some(API_KEY), Some(body)).await;
        let accepted = match item {
            Published::Json(text) => is_json(text),
            Published::Binary(_) => true,
        };
        prop_assert_eq!(status, if accepted { 200 } else { 400 }, "{:?}: {}", item, answer);
        match item {
            Published::Json(text) if accepted => {
                // Whitespace around the value belongs to the request body.
                let text = text.trim_matches([' ', '\t', '\n', '\r']).to_owned();
                expected.push(Read::Json(text.clone()));
                // The same data published by a client, in a `publish` frame.
                let frame = format!(
                    r#"{{"type": "publish", "message_id": "p", "data": {{"channel": "{channel}", "data": {text}}}}}"#
                );
                publisher.send_text(&frame).await;
                let reply = next_raw(&mut publisher).await;
                prop_assert_eq!(reply.message_id.as_deref(), Some("p"));
                prop_assert_eq!(&reply.kind, "ack", "{:?}", reply.data.map(|d| d.get().to_owned()));
                expected.push(Read::Json(text.clone()));
                let body = format!(r#"{{"to_user_id": "{reader}", "content": {text}}}"#);
                let (status, answer) = server.http("POST", "/api/v1/messages", Some(&sender), Some(body)).await;
                prop_assert_eq!(status, 200, "{}", answer);
                expected_inbox.push(text);
            }
            Published::Binary(bytes) => expected.push(Read::Binary(bytes.clone())),
            Published::Json(_) => {}
        }
    }

    // HTTP history: everything accepted, nothing refused.
    let path = format!("/api/v1/channels/{channel}/history?offset=0");
    let (status, body) = server.http("GET", &path, Some(API_KEY), None).await;
    prop_assert_eq!(status, 200, "{}", body);
    let page: RawPage = serde_json::from_str(&body).expect("a history page");
    let got: Vec<Read> = page.publications.iter().map(Read::of_page).collect();
    prop_assert_eq!(&got, &expected);
    prop_assert_eq!(page.offset, expected.len() as u64);

    // The inbox.
    let (status, body) = server
        .http("GET", "/api/v1/inbox?since=0", Some(&server.token(&reader)), None)
        .await;
    prop_assert_eq!(status, 200, "{}", body);
    let inbox: RawPage = serde_json::from_str(&body).expect("an inbox page");
    let contents: Vec<String> = inbox
        .publications
        .iter()
        .map(|p| {
            let message: RawDirectMessage = serde_json::from_str(p.text()).expect("a direct message");
            message.content.get().to_owned()
        })
        .collect();
    prop_assert_eq!(contents, expected_inbox);

    // The `history` command, then recovery from offset 0.
    let mut client = server.connect(&reader).await;
    let ack = raw_command(&mut client, "history", json!({"channel": channel})).await;
    let page: RawPage = serde_json::from_str(ack.get()).expect("a history page");
    let got: Vec<Read> = page.publications.iter().map(Read::of_page).collect();
    prop_assert_eq!(&got, &expected);
    let recover = json!({"channel": channel, "offset": 0, "epoch": page.epoch});
    raw_command(&mut client, "subscribe", recover).await;
    let mut replayed = Vec::new();
    while replayed.len() < expected.len() {
        replayed.push(match next_event(&mut client).await {
            RawEvent::Text(frame) => Read::Json(frame.data.expect("a delivery has data").get().to_owned()),
            RawEvent::Binary(frame) => {
                let (_, payload) = herald_core::publication::decode_binary_delivery(&frame).expect("a binary delivery");
                Read::Binary(payload.to_vec())
            }
        });
    }
    prop_assert_eq!(&replayed, &expected);
    client.round_trip().await;
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
}

fn published_round_trips(config: &str, redis: bool, cases: u32) {
    let runtime = runtime();
    let (server, _redis) = runtime.block_on(async {
        let redis = if redis { Some(RedisServer::start().await) } else { None };
        let toml = match &redis {
            Some(redis) => format!("{config}\n{}", redis.toml("")),
            None => config.to_owned(),
        };
        let server = TestServer::start_with(&toml).await;
        server.wait_ready().await;
        (server, redis)
    });
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(batch in prop::collection::vec(published(), 1..6))| {
        runtime.block_on(round_trip(&server, &batch))?;
    });
}

#[test]
fn arbitrary_published_data_reads_back_byte_for_byte_memory() {
    published_round_trips(CONFIG, false, 256);
}

#[test]
fn arbitrary_published_data_reads_back_byte_for_byte_redis() {
    published_round_trips(CONFIG, true, 128);
}
