//! Messaging for a user's own token: direct messages (`POST
//! /api/v1/messages`) and group chat messages (`POST
//! /api/v1/groups/{id}/messages`), published as `new_message`.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use herald_core::frame::{self, MsgType};
use herald_core::view::chat_message;
use herald_core::{ChannelName, Payload};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::request::{ApiResult, bad_request, policy_error, read_json, require_user};
use crate::auth::Identity;
use crate::http_error::ApiError;
use crate::hub::{Hub, PublishRequest, Source};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectMessageBody {
    #[serde(deserialize_with = "frame::string_or_number")]
    to_user_id: String,
    content: Box<RawValue>,
    #[serde(default)]
    msg_type: MsgType,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupMessageBody {
    content: Box<RawValue>,
    #[serde(default)]
    msg_type: MsgType,
}

/// `POST /api/v1/messages` (user token): a direct message to another user,
/// delivered on their personal channel as `new_message`.
pub async fn direct_message(State(hub): State<Hub>, headers: HeaderMap, body: Body) -> ApiResult {
    let sender = require_user(&hub, &headers)?;
    let request: DirectMessageBody = read_json(&hub, body).await?;
    request.msg_type.validate().map_err(|m| bad_request(&m))?;
    let channel = ChannelName::user(&request.to_user_id).map_err(|e| bad_request(&format!("`to_user_id`: {e}")))?;
    check_publish(&hub, &sender, &channel)?;
    #[derive(serde::Serialize)]
    struct DirectMessage<'a> {
        from_user_id: &'a str,
        to_user_id: &'a str,
        msg_type: &'a MsgType,
        content: &'a RawValue,
    }
    let data = serde_json::to_string(&DirectMessage {
        from_user_id: &sender.user_id,
        to_user_id: &request.to_user_id,
        msg_type: &request.msg_type,
        content: &request.content,
    })
    .expect("a direct message serializes");
    let payload = Payload::Json(RawValue::from_string(data).expect("serde_json output is valid JSON"));
    let publish = PublishRequest {
        channel,
        message_type: Some("new_message".into()),
        message_id: None,
        payload,
        from: Some(sender.user_id.clone()),
        exclude_user: None,
        exclude_connection: None,
        ephemeral: false,
    };
    let receipt = hub.publish(publish, Source::Http).await?;
    Ok(Json(receipt).into_response())
}

/// `POST /api/v1/groups/{id}/messages` (user token): a chat message to a
/// group, delivered to the other members as `new_message`.
pub async fn group_message(
    State(hub): State<Hub>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let sender = require_user(&hub, &headers)?;
    let Path(group_id) = path.map_err(|e| bad_request(&e.body_text()))?;
    let request: GroupMessageBody = read_json(&hub, body).await?;
    request.msg_type.validate().map_err(|m| bad_request(&m))?;
    let channel = ChannelName::group(&group_id).map_err(|e| bad_request(&format!("group id: {e}")))?;
    check_publish(&hub, &sender, &channel)?;
    let data = chat_message(&group_id, &sender.user_id, &request.msg_type, &request.content);
    let publish = PublishRequest {
        channel,
        message_type: Some("new_message".into()),
        message_id: None,
        payload: Payload::Json(data),
        from: Some(sender.user_id.clone()),
        exclude_user: Some(sender.user_id.clone()),
        exclude_connection: None,
        ephemeral: false,
    };
    let receipt = hub.publish(publish, Source::Http).await?;
    Ok(Json(receipt).into_response())
}

fn check_publish(hub: &Hub, sender: &Identity, channel: &ChannelName) -> Result<(), ApiError> {
    use herald_core::policy::Subject;
    let subject = Subject {
        user_id: &sender.user_id,
        granted: &sender.channels,
    };
    hub.policies()
        .check_client_publish(&subject, channel)
        .map_err(policy_error)
}
