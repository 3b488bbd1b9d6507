//! Queries: history, the inbox, unread counts, presence and online status,
//! for the API key or a user's own token.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use herald_core::ChannelName;
use herald_core::frame::StreamPosition;
use herald_core::view::{HistoryAnswer, presence_json};
use serde::Deserialize;
use serde_json::json;

use super::request::{ApiResult, bad_request, policy_error, require_api_key, require_user, unavailable};
use crate::http_error::ApiError;
use crate::hub::Hub;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Return what follows this offset (`since` is the inbox's name for it).
    #[serde(alias = "since")]
    offset: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/channels/{channel}/history` (API key).
pub async fn channel_history(
    State(hub): State<Hub>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let Path(channel) = path.map_err(|e| bad_request(&e.body_text()))?;
    let Query(query) = query.map_err(|e| bad_request(&e.body_text()))?;
    let channel = ChannelName::parse(&channel).map_err(|e| bad_request(&format!("channel: {e}")))?;
    read_history(&hub, &channel, query).await
}

/// `GET /api/v1/inbox?since=OFFSET&epoch=E&limit=N` (user token): what
/// arrived on the user's personal channel after `since`, oldest first;
/// `next` is the offset to ask from for the following page.
pub async fn inbox(
    State(hub): State<Hub>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult {
    let user = require_user(&hub, &headers)?;
    let Query(query) = query.map_err(|e| bad_request(&e.body_text()))?;
    let channel = ChannelName::user(&user.user_id).map_err(|e| bad_request(&e.to_string()))?;
    read_history(&hub, &channel, query).await
}

/// The most channels one unread-counts request may name.
pub const MAX_UNREAD_CHANNELS: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnreadQuery {
    /// Comma-separated channels; default: those with a read cursor, and the
    /// user's personal channel.
    channels: Option<String>,
}

/// `GET /api/v1/unread` (user token): per channel, how many messages arrived
/// after the user's read cursor (channels that keep history).
pub async fn unread(
    State(hub): State<Hub>,
    query: Result<Query<UnreadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult {
    use herald_core::policy::Subject;
    let user = require_user(&hub, &headers)?;
    let Query(query) = query.map_err(|e| bad_request(&e.body_text()))?;
    let cursors = hub.read_cursors(&user.user_id).await.map_err(unavailable)?;
    let mut names: Vec<String> = match &query.channels {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
        None => {
            let mut names: Vec<String> = cursors.keys().cloned().collect();
            let own = ChannelName::user(&user.user_id).expect("the verifier checks the user id");
            names.push(own.to_string());
            names
        }
    };
    names.sort();
    names.dedup();
    if names.len() > MAX_UNREAD_CHANNELS {
        return Err(bad_request(&format!(
            "at most {MAX_UNREAD_CHANNELS} channels per request"
        )));
    }
    let subject = Subject {
        user_id: &user.user_id,
        granted: &user.channels,
    };
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        let channel = ChannelName::parse(&name).map_err(|e| bad_request(&format!("channel `{name}`: {e}")))?;
        hub.policies()
            .check_subscribe(&subject, &channel)
            .map_err(policy_error)?;
        let cursor = cursors.get(channel.as_str());
        let mut entry = json!({"channel": channel, "last_read": cursor});
        if hub.policies().policy(&channel).is_ok_and(|p| p.keeps_history()) {
            let current = hub.position(&channel).await.map_err(unavailable)?;
            let read = cursor
                .filter(|c| c.epoch.as_deref() == Some(current.epoch.as_str()))
                .and_then(|c| c.offset);
            entry["unread"] = json!(current.offset.saturating_sub(read.unwrap_or(0)));
            entry["offset"] = json!(current.offset);
            entry["epoch"] = json!(current.epoch);
        } else {
            entry["unread"] = serde_json::Value::Null;
        }
        results.push(entry);
    }
    Ok(Json(json!({"channels": results})).into_response())
}

async fn read_history(hub: &Hub, channel: &ChannelName, query: HistoryQuery) -> ApiResult {
    let policy = hub
        .policies()
        .policy(channel)
        .map_err(|e| bad_request(&e.to_string()))?;
    if !policy.keeps_history() {
        let message = format!("history is not enabled for `{channel}`");
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_available", message));
    }
    // A limit of 0 reads only the position, as over WebSocket.
    let limit = query.limit.unwrap_or(100).min(crate::broker::MAX_HISTORY_PAGE);
    let since = query.offset.map(|offset| StreamPosition {
        offset,
        epoch: query.epoch,
    });
    let page = hub.history(channel, since, limit).await.map_err(unavailable)?;
    Ok(Json(HistoryAnswer::with_paging(channel.clone(), page)).into_response())
}

/// `GET /api/v1/channels/{channel}/presence` (API key): who is in a
/// channel, cluster-wide.
pub async fn channel_presence(
    State(hub): State<Hub>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let Path(channel) = path.map_err(|e| bad_request(&e.body_text()))?;
    let channel = ChannelName::parse(&channel).map_err(|e| bad_request(&format!("channel: {e}")))?;
    hub.policies()
        .policy(&channel)
        .map_err(|e| bad_request(&e.to_string()))?;
    if !hub.tracks_presence(&channel) {
        let message = format!("presence is not enabled for `{channel}`");
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_available", message));
    }
    let presence = hub.presence(&channel).await.map_err(unavailable)?;
    Ok(Json(presence_json(&channel, &presence)).into_response())
}

/// The most users one online-status request may name.
pub const MAX_STATUS_USERS: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersQuery {
    /// Comma-separated user ids.
    ids: String,
}

/// `GET /api/v1/presence/users?ids=a,b,c` (API key): whether each user has
/// a live connection anywhere in the cluster.
pub async fn users_online(
    State(hub): State<Hub>,
    query: Result<Query<UsersQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult {
    require_api_key(&hub, &headers)?;
    let Query(query) = query.map_err(|e| bad_request(&e.body_text()))?;
    let users: Vec<String> = query
        .ids
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if users.is_empty() || users.len() > MAX_STATUS_USERS {
        return Err(bad_request(&format!("`ids` must list 1-{MAX_STATUS_USERS} users")));
    }
    let online = hub.online_status(&users).await.map_err(unavailable)?;
    let map: serde_json::Map<String, serde_json::Value> = users
        .into_iter()
        .zip(online)
        .map(|(user, online)| (user, json!(online)))
        .collect();
    Ok(Json(json!({"users": map})).into_response())
}
