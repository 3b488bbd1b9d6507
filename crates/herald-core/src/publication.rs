//! The message model: one [`Publication`] travels from a publisher through the
//! broker to every node, and is encoded once per node into the frame that all
//! of that node's subscribers share.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::ChannelName;

/// The default `type` of a delivered message.
pub const DEFAULT_MESSAGE_TYPE: &str = "message";

/// What a publisher sent: JSON (delivered in a text frame, byte for byte) or
/// binary (delivered in a binary frame, see [`EncodedFrame::Binary`]).
#[derive(Debug, Clone)]
pub enum Payload {
    Json(Box<RawValue>),
    Binary(Bytes),
}

impl Payload {
    /// The payload size that limits are checked against.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.get().len(),
            Payload::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The internal `type` that subscribes every connection of the user whose
/// channel carries it to `data.channel` (the server API's managed
/// membership). Travels through the broker like any message, so it reaches
/// every node; never delivered as a frame.
pub const CONTROL_SUBSCRIBE: &str = "_subscribe";
/// The same, unsubscribing.
pub const CONTROL_UNSUBSCRIBE: &str = "_unsubscribe";

/// A control message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Subscribe(ChannelName),
    Unsubscribe(ChannelName),
}

/// One published message.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: ChannelName,
    /// The delivered frame's `type` (`message`, `notification`, `new_message`, …).
    pub message_type: String,
    /// Unique per message; the publisher's own id when given, so that
    /// repeated publishes can be recognised.
    pub message_id: String,
    /// Milliseconds since the Unix epoch, set when the hub accepted it.
    pub timestamp_ms: u64,
    /// Position in the channel's history, when the channel keeps history.
    pub offset: Option<u64>,
    /// Identifies one unbroken history of the channel; changes when history was lost.
    pub epoch: Option<String>,
    pub payload: Payload,
    /// The user who published from a client connection or with a user token;
    /// set by the server, never by the client, so receivers can trust it.
    pub from: Option<String>,
    /// Connections of this user do not receive the message (a chat sender
    /// gets an `ack`, not an echo).
    pub exclude_user: Option<String>,
    /// This one connection does not receive the message.
    pub exclude_connection: Option<u64>,
    /// Delivered live but never kept in history (read receipts, join/leave
    /// events, control messages): an inbox holds messages, not chatter.
    pub ephemeral: bool,
}

/// A frame ready to be written to any number of sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodedFrame {
    /// A WebSocket text frame (always valid UTF-8).
    Text(String),
    /// A WebSocket binary frame: the JSON header (the same envelope as a text
    /// delivery, without `data`), one `\n`, then the payload bytes.
    Binary(Bytes),
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        match self {
            EncodedFrame::Text(text) => text.len(),
            EncodedFrame::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A publication in the shape of a delivered frame, borrowing its fields.
/// `data` is the stored JSON text as it was published, never parsed again;
/// a binary payload travels outside it (after the header in a binary frame,
/// or as `data_base64` in JSON answers such as history pages).
#[derive(Serialize)]
pub struct DeliveryView<'a> {
    #[serde(rename = "type")]
    pub message_type: &'a str,
    pub channel: &'a str,
    pub message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<&'a str>,
    pub timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

impl Publication {
    /// Encodes the frame every subscriber receives. Called once per message
    /// per node; the result is shared, never re-encoded per subscriber.
    pub fn encode(&self) -> EncodedFrame {
        let mut header = self.view();
        match &self.payload {
            Payload::Json(raw) => {
                header.data = Some(raw);
                EncodedFrame::Text(serde_json::to_string(&header).expect("a delivery header always serializes"))
            }
            Payload::Binary(bytes) => {
                let mut out = serde_json::to_vec(&header).expect("a delivery header always serializes");
                out.reserve(1 + bytes.len());
                out.push(b'\n');
                out.extend_from_slice(bytes);
                EncodedFrame::Binary(Bytes::from(out))
            }
        }
    }

    /// This publication's delivery fields, without its payload (`data` and
    /// `data_base64` are the caller's to fill).
    pub fn view(&self) -> DeliveryView<'_> {
        DeliveryView {
            message_type: &self.message_type,
            channel: self.channel.as_str(),
            message_id: &self.message_id,
            offset: self.offset,
            epoch: self.epoch.as_deref(),
            timestamp: self.timestamp_ms,
            from: self.from.as_deref(),
            data: None,
            data_base64: None,
        }
    }

    /// The control action this publication carries, if it is one.
    pub fn control(&self) -> Option<Control> {
        #[derive(Deserialize)]
        struct ControlData {
            channel: String,
        }
        let make = match self.message_type.as_str() {
            CONTROL_SUBSCRIBE => Control::Subscribe,
            CONTROL_UNSUBSCRIBE => Control::Unsubscribe,
            _ => return None,
        };
        let Payload::Json(raw) = &self.payload else { return None };
        let data: ControlData = serde_json::from_str(raw.get()).ok()?;
        ChannelName::parse(&data.channel).ok().map(make)
    }

    /// A control publication for `user_channel`.
    pub fn control_payload(channel: &ChannelName) -> Payload {
        let json = serde_json::json!({"channel": channel.as_str()}).to_string();
        Payload::Json(RawValue::from_string(json).expect("json! output is valid JSON"))
    }

    /// Whether the connection `connection_id` of `user_id` receives this message.
    pub fn is_for(&self, connection_id: u64, user_id: &str) -> bool {
        self.exclude_connection != Some(connection_id) && self.exclude_user.as_deref() != Some(user_id)
    }
}

/// The header of a binary delivery, as a client parses it back.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct BinaryHeader {
    #[serde(rename = "type")]
    pub message_type: String,
    pub channel: String,
    pub message_id: String,
    pub offset: Option<u64>,
    pub epoch: Option<String>,
    pub timestamp: u64,
    pub from: Option<String>,
}

/// Splits a binary delivery into its header and payload.
pub fn decode_binary_delivery(frame: &[u8]) -> Option<(BinaryHeader, &[u8])> {
    let newline = frame.iter().position(|&b| b == b'\n')?;
    let header = serde_json::from_slice(&frame[..newline]).ok()?;
    Some((header, &frame[newline + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(payload: Payload) -> Publication {
        Publication {
            channel: ChannelName::parse("group:7").unwrap(),
            message_type: "notification".into(),
            message_id: "m1".into(),
            timestamp_ms: 1_700_000_000_000,
            offset: Some(3),
            epoch: None,
            payload,
            from: None,
            exclude_user: Some("bob".into()),
            exclude_connection: Some(9),
            ephemeral: false,
        }
    }

    #[test]
    fn json_delivery_keeps_data_byte_for_byte() {
        let raw = RawValue::from_string(r#"{"b": 1,  "a":[1,2]}"#.into()).unwrap();
        let frame = publication(Payload::Json(raw)).encode();
        assert_eq!(
            frame,
            EncodedFrame::Text(
                r#"{"type":"notification","channel":"group:7","message_id":"m1","offset":3,"timestamp":1700000000000,"data":{"b": 1,  "a":[1,2]}}"#
                    .into()
            )
        );
    }

    #[test]
    fn binary_delivery_round_trips() {
        let payload = Bytes::from_static(b"\x00\xffhello\n");
        let EncodedFrame::Binary(bytes) = publication(Payload::Binary(payload.clone())).encode() else {
            panic!("binary payloads give binary frames")
        };
        let (header, body) = decode_binary_delivery(&bytes).unwrap();
        assert_eq!(header.channel, "group:7");
        assert_eq!(header.offset, Some(3));
        assert_eq!(body, &payload[..]);
    }

    #[test]
    fn exclusions() {
        let p = publication(Payload::Binary(Bytes::new()));
        assert!(p.is_for(1, "alice"));
        assert!(!p.is_for(1, "bob"));
        assert!(!p.is_for(9, "alice"));
    }
}
