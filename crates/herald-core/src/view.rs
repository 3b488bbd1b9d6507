//! The JSON views that several transports render (the HTTP API, the
//! WebSocket `history` and `presence` commands, and transports to come):
//! history pages, presence, the chat payload of the seed protocol. Pure
//! data, no I/O.

use base64::Engine;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::channel::ChannelName;
use crate::frame::MsgType;
use crate::history::HistoryPage;
use crate::publication::{DeliveryView, Payload, Publication};
use crate::registry::Presence;

/// A history page as the HTTP API and the `history` command answer it:
/// `{channel, epoch, offset, recovered, publications}` (plus `next` and
/// `more` over HTTP), each publication in its delivery shape (binary
/// payloads as `data_base64`).
///
/// Serialized straight from the stored payloads: what was accepted goes out
/// byte for byte, and nothing on a read path parses it again. (A payload
/// that `serde_json::Value` cannot hold, such as `1e400` or nesting deeper
/// than its recursion limit, is served like any other.)
pub struct HistoryAnswer {
    channel: ChannelName,
    page: HistoryPage,
    /// Whether to say where the next page starts (`next`, `more`): the HTTP
    /// API pages by offset; the `history` command leaves that to the client.
    paging: bool,
}

impl HistoryAnswer {
    /// The `history` command's answer.
    pub fn new(channel: ChannelName, page: HistoryPage) -> Self {
        HistoryAnswer {
            channel,
            page,
            paging: false,
        }
    }

    /// The HTTP API's answer, with `next` and `more`.
    pub fn with_paging(channel: ChannelName, page: HistoryPage) -> Self {
        HistoryAnswer {
            channel,
            page,
            paging: true,
        }
    }
}

impl Serialize for HistoryAnswer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            channel: &'a ChannelName,
            epoch: &'a str,
            offset: u64,
            recovered: bool,
            publications: Vec<DeliveryView<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            next: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            more: Option<bool>,
        }
        let page = &self.page;
        let next = page
            .publications
            .last()
            .and_then(|p| p.offset)
            .unwrap_or(page.current.offset);
        let paging = self
            .paging
            .then_some((next, next < page.current.offset && page.recovered));
        Shape {
            channel: &self.channel,
            epoch: &page.current.epoch,
            offset: page.current.offset,
            recovered: page.recovered,
            publications: page.publications.iter().map(history_view).collect(),
            next: paging.map(|(next, _)| next),
            more: paging.map(|(_, more)| more),
        }
        .serialize(serializer)
    }
}

/// One publication in its delivery shape: `data` the stored JSON text as
/// is, or `data_base64` for binary.
fn history_view(publication: &Publication) -> DeliveryView<'_> {
    let mut view = publication.view();
    match &publication.payload {
        Payload::Json(raw) => view.data = Some(raw),
        Payload::Binary(bytes) => view.data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
    }
    view
}

/// Presence as JSON: `{channel, users: [{user_id, connections}], connections}`.
pub fn presence_json(channel: &ChannelName, presence: &Presence) -> Value {
    let users: Vec<_> = presence
        .users
        .iter()
        .map(|(user, connections)| json!({"user_id": user, "connections": connections}))
        .collect();
    json!({"channel": channel, "users": users, "connections": presence.connections})
}

/// The `data` of a chat message, the seed protocol's `new_message` shape.
pub fn chat_message(group_id: &str, from_user_id: &str, msg_type: &MsgType, content: &RawValue) -> Box<RawValue> {
    #[derive(Serialize)]
    struct ChatMessage<'a> {
        group_id: &'a str,
        from_user_id: &'a str,
        msg_type: &'a MsgType,
        content: &'a RawValue,
    }
    let json = serde_json::to_string(&ChatMessage {
        group_id,
        from_user_id,
        msg_type,
        content,
    })
    .expect("a chat message always serializes");
    RawValue::from_string(json).expect("serde_json output is valid JSON")
}
