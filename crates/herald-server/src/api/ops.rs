//! Operations: `/health`, `/ready`, `/stats`, `/metrics`, and the JSON
//! answers for unknown endpoints and methods.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::http_error::json_error;
use crate::hub::Hub;

pub async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn ready(State(hub): State<Hub>) -> Response {
    if hub.shutdown.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "draining"})),
        )
            .into_response();
    }
    if !hub.broker_ready() {
        let body = json!({"ready": false, "reason": "broker unavailable"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({"ready": true})).into_response()
}

pub async fn stats(State(hub): State<Hub>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let metrics = &hub.metrics;
    let users_online = hub.users_online();
    Json(json!({
        "node_id": hub.node_id,
        "uptime_seconds": hub.started.elapsed().as_secs(),
        "connections": metrics.connections_current.load(Relaxed),
        "users_online": users_online,
        // The seed's name for the same figure; its dashboards read it.
        "online_users": users_online,
        "channels": hub.local_channel_count(),
                "messages_published": metrics.messages_published.get("http")
            + metrics.messages_published.get("client")
            + metrics.messages_published.get("stream"),
        "messages_delivered": metrics.messages_delivered.load(Relaxed),
                "messages_dropped": metrics.messages_dropped.get("slow_client"),
        "messages_invalid": metrics.messages_dropped.get("invalid"),
        "stream_entries": metrics.stream_entries.load(Relaxed),
                "draining": hub.shutdown.is_draining(),
        "cluster": hub.cluster_stats(),
    }))
    .into_response()
}

pub async fn metrics(State(hub): State<Hub>) -> Response {
    hub.metrics
        .broker_up
        .store(i64::from(hub.broker_ready()), std::sync::atomic::Ordering::Relaxed);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

// ---------------------------------------------------------------- helpers
