//! Property tests against a live connection: arbitrary text and arbitrary
//! JSON frames never panic the server or close the connection, and every
//! frame that is not a valid command gets an `error`.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::harness::TestServer;

const TYPES: &[&str] = &[
    "auth",
    "ping",
    "subscribe",
    "unsubscribe",
    "publish",
    "history",
    "presence",
    "refresh",
    "join_group",
    "leave_group",
    "send_message",
    "mark_read",
    "bogus",
    "",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z:*0-9 ]{0,12}".prop_map(Value::from),
        "group:[0-9]{1,3}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    Just("channel".to_owned()),
                    Just("group_id".to_owned()),
                    Just("data".to_owned()),
                    Just("token".to_owned()),
                    Just("content".to_owned()),
                    Just("message_id".to_owned()),
                    Just("offset".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..4
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn frame() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(TYPES),
        json_value(),
        prop::option::of(json_value()),
    )
        .prop_map(|(kind, data, id)| {
            let mut frame = json!({"type": kind, "data": data});
            if let Some(id) = id {
                frame["message_id"] = id;
            }
            frame
        })
}

/// Sends `text` and reads until the sentinel pong; returns the replies
/// (`ack`, `error`, `pong`) that came before it.
async fn exchange(client: &mut crate::harness::Client, text: &str) -> Vec<Value> {
    client.send_text(text).await;
    client
        .send(json!({"type": "ping", "message_id": "sentinel-7f3a"}))
        .await;
    let mut replies = Vec::new();
    loop {
        let frame = client.next_frame().await;
        if frame["type"] == "pong" && frame["message_id"] == "sentinel-7f3a" {
            return replies;
        }
        if ["ack", "error", "pong"].contains(&frame["type"].as_str().unwrap_or("")) {
            replies.push(frame);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const GENEROUS_LIMITS: &str = "[limits]\ncommands_per_second = 100000\ncommand_burst = 100000";

#[test]
fn arbitrary_json_frames_each_get_exactly_one_reply() {
    let runtime = runtime();
    let (server, client) = runtime.block_on(async {
        let server = TestServer::start_with(GENEROUS_LIMITS).await;
        let client = server.connect("fuzzer").await;
        (server, std::cell::RefCell::new(client))
    });
    proptest!(ProptestConfig::with_cases(256), |(frame in frame())| {
        let replies = runtime.block_on(exchange(&mut client.borrow_mut(), &frame.to_string()));
        prop_assert_eq!(replies.len(), 1, "frame {} got {:?}", frame, replies);
    });
    drop(server);
}

#[test]
fn arbitrary_text_never_breaks_the_connection() {
    let runtime = runtime();
    let (server, client) = runtime.block_on(async {
        let server = TestServer::start_with(GENEROUS_LIMITS).await;
        let client = server.connect("fuzzer").await;
        (server, std::cell::RefCell::new(client))
    });
    proptest!(ProptestConfig::with_cases(256), |(text in any::<String>())| {
        let replies = runtime.block_on(exchange(&mut client.borrow_mut(), &text));
        // Valid commands typed by chance are fine; anything else is an error.
        let parsed = herald_core::frame::parse_client_frame(&text);
        prop_assert_eq!(replies.len(), 1, "text {:?} got {:?}", text, replies);
        if parsed.is_err() {
            prop_assert_eq!(&replies[0]["type"], "error");
        }
    });
    drop(server);
}
