//! The inter-node wire format: a publication as it travels through Redis
//! (Pub/Sub, history entries, Streams payloads), and the one encoder and
//! decoder for it.

use base64::Engine;
use herald_core::frame::validate_message_type;
use herald_core::publication::{CONTROL_SUBSCRIBE, CONTROL_UNSUBSCRIBE, DEFAULT_MESSAGE_TYPE};
use herald_core::{ChannelName, Payload, Publication};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::util::unix_millis;

/// A publication as it travels through Redis. Backends may publish this
/// shape directly (only `data` or `data_base64` is required): it is the
/// HTTP publish body without `channel`.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMessage<'a> {
    /// Set by the history script for channels that keep history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_user: Option<&'a str>,
    /// `node_id:connection_id`: a connection is only unique on its node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_connection: Option<String>,
    /// Any JSON, `null` included (a plain `Option` reads `null` as absent,
    /// which refused the message).
    #[serde(
        borrow,
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

/// Deserializes a field that is present, whatever its JSON value.
fn present<'de: 'a, 'a, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'a RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Encodes a publication for `PUBLISH`.
pub fn encode_wire(publication: &Publication, node_id: &str) -> Vec<u8> {
    let (data, data_base64) = match &publication.payload {
        Payload::Json(raw) => (Some(&**raw), None),
        Payload::Binary(bytes) => (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes))),
    };
    let wire = WireMessage {
        offset: None,
        epoch: None,
        message_type: Some(&publication.message_type),
        message_id: Some(&publication.message_id),
        timestamp: Some(publication.timestamp_ms),
        from: publication.from.as_deref(),
        exclude_user: publication.exclude_user.as_deref(),
        exclude_connection: publication.exclude_connection.map(|id| format!("{node_id}:{id}")),
        data,
        data_base64,
    };
    serde_json::to_vec(&wire).expect("a wire message always serializes")
}

/// The payload of a message that came through Redis (Pub/Sub or Streams):
/// exactly one of JSON text and base64.
pub fn payload(data: Option<&str>, data_base64: Option<&str>) -> Result<Payload, String> {
    match (data, data_base64) {
        (Some(data), None) => Ok(Payload::Json(
            RawValue::from_string(data.to_owned()).map_err(|e| format!("`data` is not JSON: {e}"))?,
        )),
        (None, Some(encoded)) => Ok(Payload::Binary(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| "`data_base64` is not base64")?
                .into(),
        )),
        _ => Err("needs exactly one of `data` and `data_base64`".into()),
    }
}

/// Decodes a message received on `channel`. `next_id` numbers messages
/// that arrive without an id (published straight into Redis).
pub fn decode_wire(
    channel: ChannelName,
    payload: &[u8],
    node_id: &str,
    next_id: impl FnOnce() -> String,
) -> Result<Publication, String> {
    let wire: WireMessage<'_> = serde_json::from_slice(payload).map_err(|e| format!("not a Herald message: {e}"))?;
    let payload = self::payload(wire.data.map(RawValue::get), wire.data_base64.as_deref())?;
    let message_type = wire.message_type.unwrap_or(DEFAULT_MESSAGE_TYPE);
    if ![CONTROL_SUBSCRIBE, CONTROL_UNSUBSCRIBE].contains(&message_type) {
        validate_message_type(message_type)?;
    }
    let exclude_connection = wire
        .exclude_connection
        .as_deref()
        .and_then(|text| text.split_once(':'))
        .filter(|(node, _)| *node == node_id)
        .and_then(|(_, id)| id.parse().ok());
    Ok(Publication {
        channel,
        message_type: message_type.to_owned(),
        message_id: wire.message_id.map_or_else(next_id, str::to_owned),
        timestamp_ms: wire.timestamp.unwrap_or_else(unix_millis),
        offset: wire.offset,
        epoch: wire.epoch,
        payload,
        from: wire.from.map(str::to_owned),
        exclude_user: wire.exclude_user.map(str::to_owned),
        exclude_connection,
        ephemeral: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publication(payload: Payload) -> Publication {
        Publication {
            channel: ChannelName::parse("group:1").unwrap(),
            message_type: "chat".into(),
            message_id: "m1".into(),
            timestamp_ms: 5,
            offset: None,
            epoch: None,
            payload,
            from: Some("alice".into()),
            exclude_user: Some("alice".into()),
            exclude_connection: Some(7),
            ephemeral: false,
        }
    }

    #[test]
    fn wire_round_trip_keeps_everything_and_scopes_the_connection_to_its_node() {
        for payload in [
            Payload::Json(RawValue::from_string(r#"{"a": [1, 2]}"#.into()).unwrap()),
            Payload::Binary(Bytes::from_static(b"\x00\xff")),
        ] {
            let original = publication(payload);
            let wire = encode_wire(&original, "nodeA");
            let channel = original.channel.clone();
            let same_node = decode_wire(channel.clone(), &wire, "nodeA", || unreachable!()).unwrap();
            assert_eq!(same_node.encode(), original.encode());
            assert_eq!(same_node.exclude_connection, Some(7));
            assert_eq!(same_node.exclude_user.as_deref(), Some("alice"));
            let other_node = decode_wire(channel, &wire, "nodeB", || unreachable!()).unwrap();
            assert_eq!(other_node.exclude_connection, None);
        }
    }

    #[test]
    fn backends_may_publish_the_minimal_shape() {
        let channel = ChannelName::parse("user:u1").unwrap();
        let decoded = decode_wire(channel.clone(), br#"{"data":{"x":1}}"#, "n", || "gen-1".into()).unwrap();
        assert_eq!(
            (decoded.message_type.as_str(), decoded.message_id.as_str()),
            ("message", "gen-1")
        );
        // `null` is a payload too.
        let decoded = decode_wire(channel.clone(), br#"{"data":null}"#, "n", || "gen-2".into()).unwrap();
        assert!(matches!(&decoded.payload, Payload::Json(raw) if raw.get() == "null"));
        for bad in [
            &br#"{"x":1}"#[..],
            b"not json",
            br#"{"data":1,"type":"ack"}"#,
            br#"{"data":1,"data_base64":"AA=="}"#,
        ] {
            assert!(
                decode_wire(channel.clone(), bad, "n", || "g".into()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
