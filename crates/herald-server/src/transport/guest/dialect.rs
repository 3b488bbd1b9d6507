//! The guest chat's dialect (the GoChat seed): what a guest sends
//! (`{"username": …, "content": …}`, then `{"content": …}`), the username
//! rules, and how a delivery of the room's channel is shown to a guest
//! (`{"username": …, "content": …}`, and `System` notices for joins and
//! leaves). Pure functions: the connection (`connection.rs`) does the I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The name the server speaks under; no guest may take it.
pub(super) const SYSTEM: &str = "System";

/// A frame from a guest: either field may be absent.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GuestFrame {
    pub(super) username: Option<String>,
    pub(super) content: Option<String>,
}

/// What a guest is told when a frame is refused: a `System` message with
/// a machine-readable `error` beside it (clients of the seed show
/// `username: content` and ignore the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    InvalidFrame,
    NotNamed,
    InvalidUsername,
    UsernameTaken,
    RateLimited,
    Unavailable,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::InvalidFrame => "invalid_frame",
            Refusal::NotNamed => "not_named",
            Refusal::InvalidUsername => "invalid_username",
            Refusal::UsernameTaken => "username_taken",
            Refusal::RateLimited => "rate_limited",
            Refusal::Unavailable => "unavailable",
        }
    }
}

#[derive(Serialize)]
struct Chat<'a> {
    username: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// `{"username": …, "content": …}`: a chat message as every guest sees it
/// (and the data token users receive on the room's channel).
pub(super) fn chat(username: &str, content: &str) -> String {
    let chat = Chat {
        username,
        content,
        error: None,
    };
    serde_json::to_string(&chat).expect("strings always serialize")
}

/// A refusal, in the dialect: `{"username": "System", "content": …, "error": code}`.
pub(super) fn refusal(refusal: Refusal, content: &str) -> String {
    let chat = Chat {
        username: SYSTEM,
        content,
        error: Some(refusal.code()),
    };
    serde_json::to_string(&chat).expect("strings always serialize")
}

/// `alice joined the chat` / `alice left the chat`, from `System`.
pub(super) fn notice(username: &str, joined: bool) -> String {
    let what = if joined { "joined" } else { "left" };
    chat(SYSTEM, &format!("{username} {what} the chat"))
}

/// Reads a guest's text frame.
pub(super) fn parse(text: &str) -> Result<GuestFrame, String> {
    const SHAPE: &str = r#"send {"username": "alice", "content": "…"} first, then {"content": "…"}"#;
    let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text) else {
        return Err(format!("not a JSON object: {SHAPE}"));
    };
    if let Some(kind) = object.get("type") {
        return Err(format!(
            "this is the guest chat: commands such as {kind} are not served here; {SHAPE}"
        ));
    }
    let mut field = |name: &str| match object.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("`{name}` must be a string")),
    };
    Ok(GuestFrame {
        username: field("username")?,
        content: field("content")?,
    })
}

/// The username rules: 1 to `max_length` characters of `A-Z a-z 0-9 _ - .`,
/// and not `System`.
pub(super) fn check_username(name: &str, max_length: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("the username is empty".into());
    }
    if name.chars().count() > max_length {
        return Err(format!("the username is longer than {max_length} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("a username is letters, digits, `_`, `-` and `.` only".into());
    }
    if name.eq_ignore_ascii_case(SYSTEM) {
        return Err("`System` is the server's name".into());
    }
    Ok(())
}

/// The parts of a delivered frame the guest view needs.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    from: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// A delivery (a complete, unmasked server WebSocket frame, as fan-out
/// shares it) shown to a guest: `join`/`leave` events become `System`
/// notices; a message shows as its sender and content. The sender is
/// the publishing token user (`from`), so that nobody can speak under
/// another name; without `from` (guests, the server API) it is the data's
/// `username`. Content is the data's `content` text, or the data itself.
/// `None` for a frame that is not a delivery (never the case in practice).
pub(super) fn render(frame: &[u8]) -> Option<String> {
    let (opcode, payload) = frame_payload(frame)?;
    if opcode == herald_core::websocket::OP_BINARY {
        let header_end = payload.iter().position(|&b| b == b'\n')?;
        let envelope: Envelope<'_> = serde_json::from_slice(&payload[..header_end]).ok()?;
        let size = payload.len() - header_end - 1;
        return Some(chat(
            envelope.from.unwrap_or(SYSTEM),
            &format!("(a binary message of {size} bytes)"),
        ));
    }
    let envelope: Envelope<'_> = serde_json::from_slice(payload).ok()?;
    let data: Value = envelope.data.map_or(Value::Null, |raw| {
        serde_json::from_str(raw.get()).unwrap_or(Value::Null)
    });
    match envelope.kind {
        "join" | "leave" => {
            let user = data.get("user_id").and_then(Value::as_str)?;
            return Some(notice(user, envelope.kind == "join"));
        }
        _ => {}
    }
    let claimed = data.get("username").and_then(Value::as_str);
    let username = envelope.from.or(claimed).unwrap_or(SYSTEM);
    let content = match (&data, data.get("content")) {
        (_, Some(Value::String(text))) => text.clone(),
        (Value::String(text), None) => text.clone(),
        _ => envelope.data.map_or_else(String::new, |raw| raw.get().to_owned()),
    };
    Some(chat(username, &content))
}

/// The opcode and payload of an unmasked, unfragmented WebSocket frame
/// without extension bits.
fn frame_payload(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (&first, rest) = frame.split_first()?;
    if first & 0xF0 != 0x80 {
        return None;
    }
    let (&length, rest) = rest.split_first()?;
    let start = match length & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    rest.get(start..).map(|payload| (first & 0x0F, payload))
}

#[cfg(test)]
mod tests {
    use herald_core::websocket;

    use super::*;

    fn check_parse(input: &str, expected: Result<(Option<&str>, Option<&str>), &str>) {
        let got = parse(input).map(|f| (f.username, f.content));
        let expected = expected
            .map(|(u, c)| (u.map(str::to_owned), c.map(str::to_owned)))
            .map_err(str::to_owned);
        match (&got, &expected) {
            (Err(got), Err(fragment)) => assert!(got.contains(fragment.as_str()), "{input}: {got}"),
            _ => assert_eq!(got, expected, "{input}"),
        }
    }

    #[test]
    fn parses_the_seed_frames() {
        check_parse(
            r#"{"username": "alice", "content": "Hello everyone!"}"#,
            Ok((Some("alice"), Some("Hello everyone!"))),
        );
        check_parse(r#"{"content": "hi"}"#, Ok((None, Some("hi"))));
        check_parse(r#"{"username": "alice"}"#, Ok((Some("alice"), None)));
        check_parse(r#"{"content": 3}"#, Err("`content` must be a string"));
        check_parse("hello", Err("not a JSON object"));
        check_parse("[1]", Err("not a JSON object"));
        check_parse(r#"{"type": "subscribe"}"#, Err("not served here"));
    }

    #[test]
    fn username_rules() {
        let check = |name: &str, ok: bool| assert_eq!(check_username(name, 8).is_ok(), ok, "{name}");
        check("alice", true);
        check("a.b-c_9", true);
        check("", false);
        check("abcdefghi", false);
        check("al ice", false);
        check("<b>", false);
        check("system", false);
        check("élise", false);
    }

    fn delivery(frame: &str) -> Option<String> {
        render(&websocket::text(frame))
    }

    #[test]
    fn renders_deliveries() {
        let check = |frame: &str, expected: &str| assert_eq!(delivery(frame).as_deref(), Some(expected), "{frame}");
        check(
            r#"{"type":"message","channel":"chat:lobby","data":{"username":"alice","content":"hi"}}"#,
            r#"{"username":"alice","content":"hi"}"#,
        );
        check(
            r#"{"type":"message","from":"bob","data":{"username":"System","content":"hi"}}"#,
            r#"{"username":"bob","content":"hi"}"#,
        );
        check(
            r#"{"type":"message","from":"bob","data":"hey"}"#,
            r#"{"username":"bob","content":"hey"}"#,
        );
        check(
            r#"{"type":"message","data":{"n":1}}"#,
            r#"{"username":"System","content":"{\"n\":1}"}"#,
        );
        check(
            r#"{"type":"join","data":{"user_id":"bob"}}"#,
            r#"{"username":"System","content":"bob joined the chat"}"#,
        );
        check(
            r#"{"type":"leave","data":{"user_id":"bob"}}"#,
            r#"{"username":"System","content":"bob left the chat"}"#,
        );
        let long = format!(
            r#"{{"type":"message","data":{{"username":"a","content":"{}"}}}}"#,
            "x".repeat(70_000)
        );
        assert!(delivery(&long).is_some_and(|text| text.len() > 70_000));
        let binary = websocket::encode(
            websocket::OP_BINARY,
            b"{\"type\":\"message\",\"from\":\"bob\"}\n\x01\x02",
        );
        assert_eq!(
            render(&binary).as_deref(),
            Some(r#"{"username":"bob","content":"(a binary message of 2 bytes)"}"#)
        );
        assert_eq!(render(b"\x81"), None);
    }
}
