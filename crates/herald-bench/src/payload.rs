//! The bench payload and how deliveries are read back.
//!
//! Every published payload is the JSON object
//! `{"seq": N, "t": UNIX_NANOS, "pad": "xxx…"}`: `seq` numbers the messages of
//! one channel from 0, `t` is the moment the message was *meant* to be sent
//! (open loop), and `pad` brings the object to the requested size. The same
//! bytes go to every target, so Herald and a peer carry equal payloads.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The stamp a receiver reads back from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    /// The message's sequence number on its channel.
    #[serde(rename = "seq")]
    pub sequence: u64,
    /// Intended send time, Unix nanoseconds.
    #[serde(rename = "t")]
    pub intended_unix_nanos: u64,
}

/// Builds the payload for `sequence`, padded to `size` bytes. A `size` below
/// the unpadded object gives the unpadded object.
pub fn build(sequence: u64, intended_unix_nanos: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{sequence},\"t\":{intended_unix_nanos},\"pad\":\"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut payload = String::with_capacity(head.len() + pad + tail.len());
    payload.push_str(&head);
    payload.extend(std::iter::repeat_n('x', pad));
    payload.push_str(tail);
    payload
}

/// Reads the stamp of a payload, `None` if it is not a bench payload.
pub fn parse(payload: &str) -> Option<Stamp> {
    serde_json::from_str(payload).ok()
}

/// What one text frame from Herald is.
#[derive(Debug, PartialEq, Eq)]
pub enum HeraldFrame<'a> {
    /// A delivery on `channel` whose data carries a bench payload.
    Delivery { channel: Cow<'a, str>, stamp: Stamp },
    /// A delivery whose data is not a bench payload.
    ForeignDelivery { channel: Cow<'a, str> },
    /// A control frame (`ack`, `error`, `auth_success`, `disconnect`, …).
    Control { kind: Cow<'a, str> },
    /// Not a JSON object with a string `type`.
    Malformed,
}

/// The envelope fields a receiver needs; the others are skipped unparsed.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Classifies a text frame from Herald. Every delivery has a top-level
/// `channel`; control frames never do (docs/protocol.md, "The envelope").
pub fn parse_herald_frame(text: &str) -> HeraldFrame<'_> {
    let Ok(envelope) = serde_json::from_str::<Envelope<'_>>(text) else {
        return HeraldFrame::Malformed;
    };
    match envelope.channel {
        None => HeraldFrame::Control { kind: envelope.kind },
        Some(channel) => match envelope.data.and_then(|data| parse(data.get())) {
            Some(stamp) => HeraldFrame::Delivery { channel, stamp },
            None => HeraldFrame::ForeignDelivery { channel },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_requested_size_and_read_back() {
        for size in [0, 10, 47, 100, 1_000, 65_536] {
            let payload = build(12, 1_732_240_000_123_456_789, size);
            if size > 60 {
                assert_eq!(payload.len(), size);
            }
            let value: serde_json::Value = serde_json::from_str(&payload).expect("valid JSON");
            assert!(value["pad"].is_string());
            assert_eq!(
                parse(&payload),
                Some(Stamp {
                    sequence: 12,
                    intended_unix_nanos: 1_732_240_000_123_456_789
                })
            );
        }
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(r#"{"seq":-1,"t":0}"#), None);
    }

    fn check(text: &str, expected: HeraldFrame<'_>) {
        assert_eq!(parse_herald_frame(text), expected, "{text}");
    }

    #[test]
    fn herald_frames() {
        let stamp = Stamp {
            sequence: 3,
            intended_unix_nanos: 99,
        };
        check(
            r#"{"type":"message","channel":"group:bench","message_id":"n-1","timestamp":1,"data":{"seq":3,"t":99,"pad":"xx"}}"#,
            HeraldFrame::Delivery {
                channel: "group:bench".into(),
                stamp,
            },
        );
        check(
            r#"{"data":{"t":99,"seq":3},"channel":"user:u1","type":"notification"}"#,
            HeraldFrame::Delivery {
                channel: "user:u1".into(),
                stamp,
            },
        );
        check(
            r#"{"type":"message","channel":"user:u1","data":{"hello":"world"}}"#,
            HeraldFrame::ForeignDelivery {
                channel: "user:u1".into(),
            },
        );
        check(
            r#"{"type":"ack","message_id":"s","data":{"channel":"group:bench"}}"#,
            HeraldFrame::Control { kind: "ack".into() },
        );
        check("not json", HeraldFrame::Malformed);
        check(r#"{"channel":"x"}"#, HeraldFrame::Malformed);
        check(r#"[1,2]"#, HeraldFrame::Malformed);
    }
}
