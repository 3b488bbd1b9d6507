//! The native protocol: parsing client frames and encoding server frames.
//!
//! Every frame is one JSON object with a `type`. Client commands may carry a
//! `message_id` (a string or a number, echoed back in the one `ack` or `error`
//! that answers the command), a `timestamp`, and a `data` object holding the
//! command's fields. `docs/protocol.md` is the reference; this module is the
//! implementation, and its tests are the executable examples.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::channel::{ChannelError, ChannelName};

/// The longest client `message_id` echoed back, in bytes of its JSON form.
pub const MAX_CLIENT_MESSAGE_ID: usize = 128;

/// A parsed client frame.
#[derive(Debug)]
pub struct ClientFrame {
    /// The client's id for this command, echoed in the reply.
    pub message_id: Option<MessageId>,
    pub command: Command,
}

/// A client's `message_id`: the JSON text of a string or a number exactly
/// as the client sent it, echoed back byte for byte (`1e2` stays `1e2`, a
/// 30-digit integer keeps its digits), so that a client can always match
/// the answer to its command.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct MessageId(Box<RawValue>);

impl MessageId {
    /// Takes the JSON text of an envelope's `message_id`: a string or a
    /// number of at most [`MAX_CLIENT_MESSAGE_ID`] bytes; `null` is none.
    fn from_json(raw: &RawValue) -> Result<Option<MessageId>, &'static str> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'n') => Ok(None),
            Some(b'"' | b'-' | b'0'..=b'9') if text.len() > MAX_CLIENT_MESSAGE_ID => Err("too long"),
            Some(b'"' | b'-' | b'0'..=b'9') => Ok(Some(MessageId(raw.to_owned()))),
            _ => Err("not a string or a number"),
        }
    }

    /// The id's JSON text, as sent.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for MessageId {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

/// A position in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: Option<String>,
}

#[derive(Debug)]
pub enum Command {
    Auth {
        token: String,
    },
    Ping,
    Subscribe {
        channel: ChannelName,
        recover: Option<StreamPosition>,
    },
    Unsubscribe {
        channel: ChannelName,
    },
    Publish {
        channel: ChannelName,
        message_type: Option<String>,
        data: Box<RawValue>,
    },
    History {
        channel: ChannelName,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    },
    Presence {
        channel: ChannelName,
    },
    Refresh {
        token: String,
    },
    JoinGroup {
        group_id: String,
    },
    LeaveGroup {
        group_id: String,
    },
    SendMessage {
        group_id: String,
        msg_type: MsgType,
        content: Box<RawValue>,
    },
    MarkRead {
        channel: ChannelName,
        read_message_id: String,
        offset: Option<u64>,
    },
}

impl Command {
    /// The command's `type`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Auth { .. } => "auth",
            Command::Ping => "ping",
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { .. } => "publish",
            Command::History { .. } => "history",
            Command::Presence { .. } => "presence",
            Command::Refresh { .. } => "refresh",
            Command::JoinGroup { .. } => "join_group",
            Command::LeaveGroup { .. } => "leave_group",
            Command::SendMessage { .. } => "send_message",
            Command::MarkRead { .. } => "mark_read",
        }
    }
}

/// The `code` of an `error` frame. The strings are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not JSON, or not a JSON object.
    InvalidJson,
    /// The frame lacks `type` or has a badly typed envelope field.
    InvalidFrame,
    UnknownType,
    /// `data` is missing, lacks a field, or has a field of the wrong type.
    InvalidData,
    InvalidChannel,
    UnknownNamespace,
    Forbidden,
    NotAuthenticated,
    AlreadyAuthenticated,
    /// A `refresh` token that is invalid or belongs to another user.
    InvalidToken,
    RateLimited,
    TooLarge,
    NotSubscribed,
    /// A per-connection limit (e.g. subscriptions) is reached.
    LimitExceeded,
    /// The feature is not enabled for this channel (e.g. history).
    NotAvailable,
    /// The broker cannot take the message right now; retry later.
    Unavailable,
    /// The publish was sent to the broker and no answer came: it may have
    /// been published (the message names the id to retry with).
    PublishOutcomeUnknown,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidData => "invalid_data",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::UnknownNamespace => "unknown_namespace",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::PublishOutcomeUnknown => "publish_outcome_unknown",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A frame that could not be served, with what to tell the client.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The offending command's `message_id`, when it could be read.
    pub message_id: Option<MessageId>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(message_id: Option<MessageId>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            message_id,
            code,
            message: message.into(),
        }
    }

    /// The `error` frame for this failure.
    pub fn to_frame(&self) -> String {
        error_frame(self.message_id.as_ref(), self.code, &self.message)
    }
}

/// The envelope's fields are read as raw JSON text, so that any valid JSON
/// value in them (even a number no `f64` holds) leaves the frame readable
/// and its `message_id` nameable.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Parses one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    if !text.trim_start().starts_with('{') {
        return Err(FrameError::new(
            None,
            ErrorCode::InvalidJson,
            "frame must be a JSON object",
        ));
    }
    let envelope: Envelope<'_> = serde_json::from_str(text)
        .map_err(|e| FrameError::new(None, ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    let message_id = match envelope.message_id.map(MessageId::from_json) {
        None => None,
        Some(Ok(id)) => id,
        Some(Err("too long")) => {
            return Err(FrameError::new(
                None,
                ErrorCode::InvalidFrame,
                format!("`message_id` is longer than {MAX_CLIENT_MESSAGE_ID} bytes"),
            ));
        }
        Some(Err(_)) => {
            return Err(FrameError::new(
                None,
                ErrorCode::InvalidFrame,
                "`message_id` must be a string or a number",
            ));
        }
    };
    let fail = |code, message: String| FrameError::new(message_id.clone(), code, message);
    let kind = match envelope.kind.map(|raw| serde_json::from_str::<String>(raw.get())) {
        Some(Ok(kind)) => kind,
        Some(Err(_)) => return Err(fail(ErrorCode::InvalidFrame, "`type` must be a string".into())),
        None => return Err(fail(ErrorCode::InvalidFrame, "missing `type`".into())),
    };
    let data = envelope.data;
    let command = match kind.as_str() {
        "ping" => Command::Ping,
        "auth" => {
            let d: TokenData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            Command::Auth { token: d.token }
        }
        "refresh" => {
            let d: TokenData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            Command::Refresh { token: d.token }
        }
        "subscribe" => {
            let d: SubscribeData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            let recover = d.offset.map(|offset| StreamPosition { offset, epoch: d.epoch });
            Command::Subscribe {
                channel: channel(&d.channel).map_err(|m| fail(ErrorCode::InvalidChannel, m))?,
                recover,
            }
        }
        "unsubscribe" | "presence" => {
            let d: ChannelData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            let channel = channel(&d.channel).map_err(|m| fail(ErrorCode::InvalidChannel, m))?;
            if kind == "presence" {
                Command::Presence { channel }
            } else {
                Command::Unsubscribe { channel }
            }
        }
        "publish" => {
            let d: PublishData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            let message_type = d.message_type;
            if let Some(t) = &message_type {
                validate_client_message_type(t).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            }
            Command::Publish {
                channel: channel(&d.channel).map_err(|m| fail(ErrorCode::InvalidChannel, m))?,
                message_type,
                data: d.data,
            }
        }
        "history" => {
            let d: HistoryData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            let since = d.offset.map(|offset| StreamPosition { offset, epoch: d.epoch });
            Command::History {
                channel: channel(&d.channel).map_err(|m| fail(ErrorCode::InvalidChannel, m))?,
                since,
                limit: d.limit,
            }
        }
        "join_group" | "leave_group" => {
            let d: GroupData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            group_channel(&d.group_id).map_err(|m| fail(ErrorCode::InvalidChannel, m))?;
            if kind == "join_group" {
                Command::JoinGroup { group_id: d.group_id }
            } else {
                Command::LeaveGroup { group_id: d.group_id }
            }
        }
        "send_message" => {
            let d: SendMessageData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            group_channel(&d.group_id).map_err(|m| fail(ErrorCode::InvalidChannel, m))?;
            d.msg_type.validate().map_err(|m| fail(ErrorCode::InvalidData, m))?;
            Command::SendMessage {
                group_id: d.group_id,
                msg_type: d.msg_type,
                content: d.content,
            }
        }
        "mark_read" => {
            let d: MarkReadData = fields(&kind, data).map_err(|m| fail(ErrorCode::InvalidData, m))?;
            let channel = match (d.channel, d.group_id) {
                (Some(name), None) => channel(&name),
                (None, Some(group_id)) => group_channel(&group_id),
                _ => Err("`mark_read` needs exactly one of `data.group_id` and `data.channel`".to_owned()),
            }
            .map_err(|m| fail(ErrorCode::InvalidData, m))?;
            Command::MarkRead {
                channel,
                read_message_id: d.message_id,
                offset: d.offset,
            }
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(fail(ErrorCode::UnknownType, format!("unknown frame type `{shown}`")));
        }
    };
    Ok(ClientFrame { message_id, command })
}

/// The longest publisher-chosen `type`.
pub const MAX_MESSAGE_TYPE_LENGTH: usize = 64;

/// The `type`s of the server's own frames; a publication may not use them,
/// so a client can always tell a delivery from a control frame.
pub const SERVER_FRAME_TYPES: &[&str] = &[
    "auth_success",
    "auth_failed",
    "ack",
    "error",
    "pong",
    "disconnect",
    "subscribed",
    "unsubscribed",
    "resync",
];

/// Types whose `data` carries identities the server vouches for
/// (`from_user_id`); only the server and API-key publishers may use them.
pub const SERVER_VOUCHED_TYPES: &[&str] = &["new_message", "read", "join", "leave"];

/// A publisher-chosen `type`: 1–64 of `a-z A-Z 0-9 _ - .`, not starting
/// with `_` (reserved for the hub's internal control messages) and not the
/// name of a server frame.
pub fn validate_message_type(message_type: &str) -> Result<(), String> {
    let well_formed = !message_type.is_empty()
        && message_type.len() <= MAX_MESSAGE_TYPE_LENGTH
        && !message_type.starts_with('_')
        && message_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if !well_formed {
        return Err("message `type` must be 1-64 of a-z A-Z 0-9 _ - . and not start with _".to_owned());
    }
    if SERVER_FRAME_TYPES.contains(&message_type) {
        return Err(format!("message `type` `{message_type}` is reserved for server frames"));
    }
    Ok(())
}

/// A `type` chosen by a client in a `publish` frame: as above, and not one of
/// the [`SERVER_VOUCHED_TYPES`], which clients could otherwise forge.
pub fn validate_client_message_type(message_type: &str) -> Result<(), String> {
    validate_message_type(message_type)?;
    if SERVER_VOUCHED_TYPES.contains(&message_type) {
        return Err(format!("clients may not publish `type` `{message_type}`"));
    }
    Ok(())
}

fn fields<'a, T: Deserialize<'a>>(kind: &str, data: Option<&'a RawValue>) -> Result<T, String> {
    let data = data.ok_or_else(|| format!("`{kind}` needs a `data` object"))?;
    serde_json::from_str(data.get()).map_err(|e| format!("invalid `data` for `{kind}`: {e}"))
}

fn channel(name: &str) -> Result<ChannelName, String> {
    ChannelName::parse(name).map_err(|e: ChannelError| e.to_string())
}

fn group_channel(group_id: &str) -> Result<ChannelName, String> {
    ChannelName::group(group_id).map_err(|e| format!("invalid `group_id`: {e}"))
}

#[derive(Deserialize)]
struct TokenData {
    token: String,
}

#[derive(Deserialize)]
struct ChannelData {
    channel: String,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    offset: Option<u64>,
    epoch: Option<String>,
}

#[derive(Deserialize)]
struct PublishData {
    channel: String,
    #[serde(rename = "type")]
    message_type: Option<String>,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
struct HistoryData {
    channel: String,
    offset: Option<u64>,
    epoch: Option<String>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
struct GroupData {
    #[serde(deserialize_with = "string_or_number")]
    group_id: String,
}

#[derive(Deserialize)]
struct SendMessageData {
    #[serde(deserialize_with = "string_or_number")]
    group_id: String,
    #[serde(default)]
    msg_type: MsgType,
    content: Box<RawValue>,
}

/// A chat message's `msg_type`: a name (`"text"`, the default) or a number
/// (the seed group-chat client sends `1`). Delivered as the client sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MsgType {
    Name(String),
    Number(serde_json::Number),
}

impl Default for MsgType {
    fn default() -> Self {
        MsgType::Name("text".to_owned())
    }
}

impl MsgType {
    /// A name follows the rules of a message `type`; any number will do.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            MsgType::Name(name) => validate_message_type(name).map_err(|e| format!("`msg_type`: {e}")),
            MsgType::Number(_) => Ok(()),
        }
    }
}

impl<'de> Deserialize<'de> for MsgType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(name) => Ok(MsgType::Name(name)),
            Value::Number(number) => Ok(MsgType::Number(number)),
            other => Err(de::Error::custom(format!(
                "`msg_type` must be a string or a number, found {other}"
            ))),
        }
    }
}

#[derive(Deserialize)]
struct MarkReadData {
    #[serde(default, deserialize_with = "optional_string_or_number")]
    group_id: Option<String>,
    channel: Option<String>,
    #[serde(deserialize_with = "string_or_number")]
    message_id: String,
    /// The read message's offset, when the client has it (saves a lookup).
    offset: Option<u64>,
}

/// Seed clients send ids as strings or numbers; both mean the same id.
/// For `#[serde(deserialize_with = ...)]`.
pub fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

fn optional_string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    string_or_number(deserializer).map(Some)
}

// ---- server frames ----

#[derive(Serialize)]
struct ServerFrame<'a, D: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a MessageId>,
    data: D,
}

/// Encodes a server frame `{"type", "message_id"?, "data"}`.
pub fn server_frame(kind: &str, message_id: Option<&MessageId>, data: impl Serialize) -> String {
    serde_json::to_string(&ServerFrame { kind, message_id, data }).expect("server frames always serialize")
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: &'a str,
    message: &'a str,
}

pub fn error_frame(message_id: Option<&MessageId>, code: ErrorCode, message: &str) -> String {
    server_frame(
        "error",
        message_id,
        ErrorData {
            code: code.as_str(),
            message,
        },
    )
}

pub fn ack_frame(message_id: Option<&MessageId>, data: impl Serialize) -> String {
    server_frame("ack", message_id, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parses `input` and compares a compact rendering of the outcome:
    /// `ok <type> <id>` or `err <code> <id> <message fragment>`.
    fn check(input: &str, expected: &str) {
        let got = match parse_client_frame(input) {
            Ok(frame) => format!("ok {} {}", frame.command.name(), id_text(&frame.message_id)),
            Err(e) => format!("err {} {} {}", e.code.as_str(), id_text(&e.message_id), e.message),
        };
        assert!(
            got.starts_with(expected),
            "input {input}\n got: {got}\nwant: {expected}…"
        );
    }

    fn id_text(id: &Option<MessageId>) -> String {
        id.as_ref().map_or("-".into(), |id| id.as_json().to_owned())
    }

    #[test]
    fn valid_commands() {
        check(r#"{"type":"ping"}"#, "ok ping -");
        check(r#"{"type":"ping","message_id":7}"#, "ok ping 7");
        // Ids come back as sent, whatever a number parser would make of them.
        check(r#"{"type":"ping","message_id":1e2}"#, "ok ping 1e2");
        check(r#"{"type":"ping","message_id":-0}"#, "ok ping -0");
        check(r#"{"type":"ping","message_id":1e400}"#, "ok ping 1e400");
        check(
            r#"{"type":"ping","message_id":123456789012345678901234567890}"#,
            "ok ping 123456789012345678901234567890",
        );
        check(r#"{"type":"ping","message_id":"a\u0062"}"#, r#"ok ping "a\u0062""#);
        check(
            r#"{"type":1e400,"message_id":5}"#,
            "err invalid_frame 5 `type` must be a string",
        );
        check(r#"{"type":"ping","message_id":null}"#, "ok ping -");
        check(r#"{"type":"auth","data":{"token":"t"}}"#, "ok auth -");
        check(
            r#"{"type":"subscribe","message_id":"a","data":{"channel":"group:1"}}"#,
            "ok subscribe \"a\"",
        );
        check(
            r#"{"type":"subscribe","data":{"channel":"news","offset":5,"epoch":"x"}}"#,
            "ok subscribe",
        );
        check(r#"{"type":"unsubscribe","data":{"channel":"news"}}"#, "ok unsubscribe");
        check(
            r#"{"type":"publish","data":{"channel":"news","data":{"a":1},"type":"alert"}}"#,
            "ok publish",
        );
        check(
            r#"{"type":"history","data":{"channel":"news","limit":10}}"#,
            "ok history",
        );
        check(r#"{"type":"presence","data":{"channel":"group:1"}}"#, "ok presence");
        check(r#"{"type":"refresh","data":{"token":"t"}}"#, "ok refresh");
        check(r#"{"type":"join_group","data":{"group_id":42}}"#, "ok join_group");
        check(r#"{"type":"leave_group","data":{"group_id":"42"}}"#, "ok leave_group");
        check(
            r#"{"type":"send_message","data":{"group_id":1,"content":"hi"}}"#,
            "ok send_message",
        );
        check(
            r#"{"type":"send_message","data":{"group_id":1,"msg_type":1,"content":"hi"}}"#,
            "ok send_message",
        );
        check(
            r#"{"type":"mark_read","data":{"group_id":1,"message_id":"m9"}}"#,
            "ok mark_read",
        );
        check(
            r#"{"type":"mark_read","data":{"channel":"news","message_id":3}}"#,
            "ok mark_read",
        );
        check(r#" {"type":"ping","timestamp":1,"extra":true} "#, "ok ping");
    }

    #[test]
    fn bad_frames_name_the_problem() {
        check("", "err invalid_json - frame must be a JSON object");
        check("[1]", "err invalid_json - frame must be a JSON object");
        check("{", "err invalid_json - invalid JSON");
        check(r#"{"message_id":1}"#, "err invalid_frame 1 missing `type`");
        check(r#"{"type":5}"#, "err invalid_frame - `type` must be a string");
        check(
            r#"{"type":"ping","message_id":{}}"#,
            "err invalid_frame - `message_id` must be",
        );
        check(
            r#"{"type":"dance","message_id":"x"}"#,
            "err unknown_type \"x\" unknown frame type `dance`",
        );
        check(
            r#"{"type":"subscribe","message_id":2}"#,
            "err invalid_data 2 `subscribe` needs a `data` object",
        );
        check(
            r#"{"type":"subscribe","data":{}}"#,
            "err invalid_data - invalid `data` for `subscribe`: missing field `channel`",
        );
        check(
            r#"{"type":"subscribe","data":{"channel":"a b"}}"#,
            "err invalid_channel - channel name has a character",
        );
        check(
            r#"{"type":"subscribe","data":{"channel":7}}"#,
            "err invalid_data - invalid `data` for `subscribe`: invalid type",
        );
        check(
            r#"{"type":"publish","data":{"channel":"news"}}"#,
            "err invalid_data - invalid `data` for `publish`: missing field `data`",
        );
        check(
            r#"{"type":"publish","data":{"channel":"n","data":1,"type":"a b"}}"#,
            "err invalid_data - message `type`",
        );
        for (message_type, fragment) in [
            ("", "message `type`"),
            ("_x", "message `type`"),
            ("ack", "message `type` `ack` is reserved"),
            ("resync", "message `type` `resync` is reserved"),
            ("new_message", "clients may not publish"),
            ("join", "clients may not publish"),
            ("leave", "clients may not publish"),
        ] {
            let frame = format!(r#"{{"type":"publish","data":{{"channel":"n","data":1,"type":"{message_type}"}}}}"#);
            check(&frame, &format!("err invalid_data - {fragment}"));
        }
        check(
            r#"{"type":"join_group","data":{"group_id":true}}"#,
            "err invalid_data - invalid `data` for `join_group`: expected a string or a number",
        );
        check(
            r#"{"type":"join_group","data":{"group_id":"a b"}}"#,
            "err invalid_channel - invalid `group_id`",
        );
        check(
            r#"{"type":"mark_read","data":{"message_id":"m"}}"#,
            "err invalid_data - `mark_read` needs exactly one",
        );
        let long_id = format!(r#"{{"type":"ping","message_id":"{}"}}"#, "x".repeat(200));
        check(&long_id, "err invalid_frame - `message_id` is longer");
    }

    #[test]
    fn server_frames() {
        let frame = parse_client_frame(r#"{"type":"ping","message_id":"abc"}"#).unwrap();
        assert_eq!(
            error_frame(frame.message_id.as_ref(), ErrorCode::Forbidden, "no"),
            r#"{"type":"error","message_id":"abc","data":{"code":"forbidden","message":"no"}}"#
        );
        let frame = parse_client_frame(r#"{"type":"ping","message_id":1e400}"#).unwrap();
        assert_eq!(
            ack_frame(frame.message_id.as_ref(), json!({})),
            r#"{"type":"ack","message_id":1e400,"data":{}}"#
        );
        assert_eq!(ack_frame(None, json!({})), r#"{"type":"ack","data":{}}"#);
    }
}
