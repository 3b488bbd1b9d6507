//! Property tests: the parser never panics and always explains a refusal;
//! encoding round-trips.

use bytes::Bytes;
use herald_core::frame::parse_client_frame;
use herald_core::publication::{EncodedFrame, decode_binary_delivery};
use herald_core::{ChannelName, Payload, Publication};
use proptest::prelude::*;
use serde_json::Value;
use serde_json::value::RawValue;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::hash_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames shaped like commands, with arbitrary field values.
fn command_like() -> impl Strategy<Value = Value> {
    let kinds = prop::sample::select(vec![
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
        "x",
    ]);
    (kinds, json_value(), json_value())
        .prop_map(|(kind, data, id)| serde_json::json!({"type": kind, "data": data, "message_id": id}))
}

fn assert_explained(text: &str) {
    if let Err(error) = parse_client_frame(text) {
        assert!(!error.message.is_empty());
        let frame: Value = serde_json::from_str(&error.to_frame()).expect("error frames are JSON");
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["data"]["code"], error.code.as_str());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        assert_explained(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        assert_explained(&value.to_string());
    }

    #[test]
    fn command_shaped_json_never_panics(value in command_like()) {
        assert_explained(&value.to_string());
    }

    #[test]
    fn channel_parsing_never_panics(text in ".{0,140}") {
        if let Ok(channel) = ChannelName::parse(&text) {
            prop_assert!(channel.as_str().len() <= herald_core::channel::MAX_CHANNEL_LENGTH);
            prop_assert_eq!(channel.as_str(), text.as_str());
        }
    }

    #[test]
    fn json_deliveries_round_trip(
        channel in "[a-z]{1,8}:[A-Za-z0-9_.@|+~-]{1,20}",
        message_type in "[a-z_]{1,12}",
        message_id in "[A-Za-z0-9-]{1,20}",
        offset in prop::option::of(any::<u64>()),
        timestamp in any::<u64>(),
        data in json_value(),
    ) {
        let data_text = data.to_string();
        let publication = Publication {
            channel: ChannelName::parse(&channel).unwrap(),
            message_type: message_type.clone(),
            message_id: message_id.clone(),
            timestamp_ms: timestamp,
            offset,
            epoch: None,
            payload: Payload::Json(RawValue::from_string(data_text.clone()).unwrap()),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        };
        let EncodedFrame::Text(text) = publication.encode() else { panic!("JSON gives text") };
        // `data` is carried byte for byte, and is the last field.
        let expected_tail = format!(",\"data\":{data_text}}}");
        prop_assert!(text.ends_with(&expected_tail), "{}", text);
        let frame: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&frame["type"], &Value::from(message_type));
        prop_assert_eq!(&frame["channel"], &Value::from(channel));
        prop_assert_eq!(&frame["message_id"], &Value::from(message_id));
        prop_assert_eq!(frame.get("offset").and_then(Value::as_u64), offset);
        prop_assert_eq!(frame["timestamp"].as_u64(), Some(timestamp));
    }

    #[test]
    fn resp_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = herald_core::resp::parse(&bytes);
    }

    #[test]
    fn resp_commands_round_trip(args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..8)) {
        let mut out = bytes::BytesMut::new();
        herald_core::resp::encode_command(&args, &mut out);
        let (value, used) = herald_core::resp::parse(&out).unwrap().unwrap();
        prop_assert_eq!(used, out.len());
        let items = value.as_array().unwrap();
        let parsed: Vec<&[u8]> = items.iter().map(|item| item.as_bytes().unwrap()).collect();
        let expected: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn binary_deliveries_round_trip(payload in prop::collection::vec(any::<u8>(), 0..1024)) {
        let publication = Publication {
            channel: ChannelName::parse("files:x").unwrap(),
            message_type: "blob".into(),
            message_id: "m".into(),
            timestamp_ms: 1,
            offset: Some(2),
            epoch: Some("e".into()),
            payload: Payload::Binary(Bytes::from(payload.clone())),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        };
        let EncodedFrame::Binary(bytes) = publication.encode() else { panic!("binary gives binary") };
        let (header, body) = decode_binary_delivery(&bytes).unwrap();
        prop_assert_eq!(body, &payload[..]);
        prop_assert_eq!(header.epoch.as_deref(), Some("e"));
    }
}
