//! The HTTP upgrade to `/ws`: the handshake checks, the accept key, and
//! admission with its rejections.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::connection::run;
use crate::http_error::json_error;
use crate::hub::{Admission, Hub, Rejection};
use crate::transport::origin;

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
}

/// A valid WebSocket upgrade request (RFC 6455 §4.2.1); anything else is
/// answered with a JSON error naming what is wrong.
pub struct Upgrade {
    accept: String,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let reject = |status, message| json_error(status, "not_websocket", message);
        if parts.method != Method::GET {
            return Err(reject(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET request",
            ));
        }
        let has_token = |name, token: &str| {
            parts.headers.get_all(name).iter().any(|value: &HeaderValue| {
                value
                    .to_str()
                    .is_ok_and(|value| value.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
            })
        };
        if !has_token(header::CONNECTION, "upgrade") {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "`Connection` header did not include `upgrade`",
            ));
        }
        if !has_token(header::UPGRADE, "websocket") {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include `websocket`",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|version| version != "13")
        {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header must be `13`",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(reject(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` header missing"));
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(reject(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Upgrade { accept, on_upgrade })
    }
}

pub async fn handler(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<Upgrade, Response>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection,
    };
    let Ok(Query(params)) = params else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the query string is malformed",
        );
    };
    let admission = match admit(&hub, peer, &headers) {
        Ok(admission) => admission,
        Err(refused) => return refused,
    };
    let served = hub.clone();
    upgrade.accept_with(&served, move |stream, early| {
        run(stream, early, hub, admission, params.token)
    })
}

/// What every dialect over WebSocket checks before it takes a connection:
/// the `Origin`, then admission (total and per-IP counts). A refusal is
/// counted and answered.
// The refusal is the response itself: built once, on a path that ends there.
#[allow(clippy::result_large_err)]
pub(crate) fn admit(hub: &Hub, peer: SocketAddr, headers: &HeaderMap) -> Result<Admission, Response> {
    if !origin::is_allowed(&hub.config.origins, headers) {
        hub.metrics.connections_rejected.add("origin", 1);
        return Err(json_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not connect",
        ));
    }
    hub.admit(peer.ip()).map_err(|rejection| refusal(hub, rejection))
}

/// The answer to an upgrade that admission refused (counted).
fn refusal(hub: &Hub, rejection: Rejection) -> Response {
    let (status, code, label, message) = match rejection {
        Rejection::MaxConnections => (
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections",
            "max_connections",
            "the server is at its connection limit",
        ),
        Rejection::MaxPerIp => (
            StatusCode::TOO_MANY_REQUESTS,
            "max_connections_per_ip",
            "max_per_ip",
            "too many connections from this address",
        ),
        Rejection::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "other",
            "the server is shutting down; connect to another node",
        ),
    };
    hub.metrics.connections_rejected.add(label, 1);
    json_error(status, code, message)
}

impl Upgrade {
    /// Answers the upgrade (no extensions) and serves the socket with
    /// `serve` in a task the shutdown tracker waits for: how every dialect
    /// over WebSocket (the native protocol, the guest chat) takes the
    /// connection.
    pub(crate) fn accept_with<F, Fut>(self, hub: &Hub, serve: F) -> Response
    where
        F: FnOnce(TcpStream, bytes::Bytes) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let tracker_token = hub.shutdown.tracker.token();
        let Upgrade { accept, on_upgrade } = self;
        tokio::spawn(async move {
            match on_upgrade
                .await
                .map(|upgraded| upgraded.downcast::<TokioIo<TcpStream>>())
            {
                Ok(Ok(parts)) => serve(parts.io.into_inner(), parts.read_buf).await,
                Ok(Err(_)) => tracing::error!("an upgraded connection is not a TCP stream"),
                Err(error) => tracing::debug!(%error, "the WebSocket upgrade failed"),
            }
            drop(tracker_token);
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(Body::empty())
            .expect("a valid response")
    }
}
