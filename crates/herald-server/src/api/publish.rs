//! Publishing, for the API key: `POST /api/v1/publish` (one channel or a
//! broadcast) and server-managed subscriptions (a user's connections, on
//! every node, subscribed to or unsubscribed from a channel).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use herald_core::frame::validate_message_type;
use herald_core::publication::{CONTROL_SUBSCRIBE, CONTROL_UNSUBSCRIBE};
use herald_core::{ChannelName, Payload, Publication};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::request::{ApiResult, bad_request, read_json, require_api_key};
use crate::http_error::ApiError;
use crate::hub::{Hub, PublishError, PublishRequest, Source};

/// The most channels one broadcast may name.
pub const MAX_BROADCAST_CHANNELS: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    /// Any JSON, `null` included (hence not a plain `Option`, which would
    /// read `null` as absent).
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    /// A binary payload, base64-encoded; delivered in a binary frame.
    data_base64: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    message_id: Option<String>,
}

/// `POST /api/v1/publish`: one channel (`channel`) or a broadcast (`channels`).
pub async fn publish(State(hub): State<Hub>, headers: HeaderMap, body: Body) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let request: PublishBody = read_json(&hub, body).await?;
    let payload = match (request.data, request.data_base64) {
        (Some(data), None) => Payload::Json(data),
        (None, Some(encoded)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|_| bad_request("`data_base64` is not valid base64"))?;
            Payload::Binary(bytes.into())
        }
        _ => return Err(bad_request("give exactly one of `data` and `data_base64`")),
    };
    if let Some(message_type) = &request.message_type {
        validate_message_type(message_type).map_err(|m| bad_request(&m))?;
    }
    if let Some(id) = &request.message_id
        && (id.is_empty() || id.len() > 128)
    {
        return Err(bad_request("`message_id` must be 1-128 bytes"));
    }
    let too_large = hub.limits().max_message_size;
    if payload.len() > too_large {
        return Err(PublishError::TooLarge(too_large).into());
    }
    let broadcast = request.channels.is_some();
    let names = match (request.channel, request.channels) {
        (Some(channel), None) => vec![channel],
        (None, Some(channels)) if !channels.is_empty() && channels.len() <= MAX_BROADCAST_CHANNELS => channels,
        (None, Some(_)) => {
            return Err(bad_request(&format!(
                "`channels` must list 1-{MAX_BROADCAST_CHANNELS} channels"
            )));
        }
        _ => return Err(bad_request("give exactly one of `channel` and `channels`")),
    };
    let channels = names
        .iter()
        .map(|name| ChannelName::parse(name).map_err(|e| bad_request(&format!("channel `{name}`: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    for channel in &channels {
        hub.policies()
            .policy(channel)
            .map_err(|e| bad_request(&e.to_string()))?;
    }
    if !broadcast {
        let publish = PublishRequest {
            channel: channels.into_iter().next().expect("one channel was given"),
            message_type: request.message_type,
            message_id: request.message_id,
            payload,
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        };
        let receipt = hub.publish(publish, Source::Http).await?;
        return Ok(Json(receipt).into_response());
    }
    // A broadcast publishes every channel it can and reports each one, so
    // that a partial failure says exactly what to retry.
    let mut results = Vec::with_capacity(channels.len());
    let mut status = StatusCode::OK;
    for channel in channels {
        let publish = PublishRequest {
            channel: channel.clone(),
            message_type: request.message_type.clone(),
            message_id: request.message_id.clone(),
            payload: payload.clone(),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        };
        let mut result = match hub.publish(publish, Source::Http).await {
            Ok(receipt) => serde_json::to_value(receipt).expect("receipts serialize"),
            Err(error) => {
                let error = ApiError::from(error);
                // "Not published" outranks "unknown" for the whole answer.
                if status != StatusCode::SERVICE_UNAVAILABLE {
                    status = error.status;
                }
                json!({"error": error.error_object()})
            }
        };
        result["channel"] = json!(channel);
        results.push(result);
    }
    Ok((status, Json(json!({"results": results}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionBody {
    channel: String,
}

/// `POST /api/v1/users/{user_id}/subscriptions` (API key): subscribes every
/// live connection of the user, on every node, to `channel`.
pub async fn subscribe_user(
    State(hub): State<Hub>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let Path(user_id) = path.map_err(|e| bad_request(&e.body_text()))?;
    let request: SubscriptionBody = read_json(&hub, body).await?;
    let channel = ChannelName::parse(&request.channel).map_err(|e| bad_request(&format!("`channel`: {e}")))?;
    manage_subscription(&hub, &user_id, channel, CONTROL_SUBSCRIBE).await
}

/// `DELETE /api/v1/users/{user_id}/subscriptions/{channel}` (API key).
pub async fn unsubscribe_user(
    State(hub): State<Hub>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let Path((user_id, channel)) = path.map_err(|e| bad_request(&e.body_text()))?;
    let channel = ChannelName::parse(&channel).map_err(|e| bad_request(&format!("channel: {e}")))?;
    manage_subscription(&hub, &user_id, channel, CONTROL_UNSUBSCRIBE).await
}

async fn manage_subscription(hub: &Hub, user_id: &str, channel: ChannelName, control: &str) -> ApiResult {
    let user_channel = ChannelName::user(user_id).map_err(|e| bad_request(&format!("user id: {e}")))?;
    if channel.namespace() == Some("user") {
        return Err(bad_request("personal channels cannot be subscribed to by others"));
    }
    hub.policies()
        .policy(&channel)
        .map_err(|e| bad_request(&e.to_string()))?;
    let publish = PublishRequest {
        channel: user_channel,
        message_type: Some(control.to_owned()),
        message_id: None,
        payload: Publication::control_payload(&channel),
        from: None,
        exclude_user: None,
        exclude_connection: None,
        ephemeral: true,
    };
    hub.publish(publish, Source::Http).await?;
    Ok(Json(json!({"user_id": user_id, "channel": channel})).into_response())
}

/// Deserializes a field that is present, whatever its JSON value.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}
