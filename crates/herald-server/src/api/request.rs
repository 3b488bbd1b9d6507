//! What every endpoint does with a request: its credentials (the API key
//! or a user's token), its body (bounded in size and time, strict JSON),
//! and the common refusals.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::de::DeserializeOwned;

use crate::auth::Identity;
use crate::http_error::ApiError;
use crate::hub::Hub;

/// Request bytes allowed beyond `max_message_size` for the envelope
/// (channel list, ids, base64 overhead).
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn unavailable(error: crate::broker::BrokerError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string())
}

pub(super) fn bad_request(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub(super) fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(super) fn require_api_key(hub: &Hub, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = hub.config.api_key.as_deref().expect("api.key is set before serving");
    match bearer(headers) {
        None => Err(unauthorized("missing `Authorization: Bearer <api key>`")),
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("invalid API key")),
    }
}

pub(super) fn require_user(hub: &Hub, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let token = bearer(headers).ok_or_else(|| unauthorized("missing `Authorization: Bearer <user token>`"))?;
    hub.verifier.verify(token).map_err(|e| {
        hub.metrics.auth_failures.add(e.reason(), 1);
        unauthorized(&e.to_string())
    })
}

/// A refused policy check: 400 for an unknown namespace, 403 otherwise.
pub(super) fn policy_error(error: herald_core::policy::PolicyError) -> ApiError {
    match error {
        herald_core::policy::PolicyError::UnknownNamespace(_) => bad_request(&error.to_string()),
        _ => ApiError::new(StatusCode::FORBIDDEN, "forbidden", error.to_string()),
    }
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guessed key was right. (The length is not secret.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads and parses a request body, bounded in size and in time (a body
/// that trickles in would otherwise hold the connection and its task for as
/// long as the client likes).
pub(super) async fn read_json<T: DeserializeOwned>(hub: &Hub, body: Body) -> Result<T, ApiError> {
    let limit = hub.limits().max_message_size + ENVELOPE_ALLOWANCE;
    let timeout = hub.limits().body_timeout;
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body is larger than {limit} bytes"),
            ));
        }
        Err(_elapsed) => {
            hub.metrics
                .http_body_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "request body did not arrive within {}",
                    herald_core::duration::format_duration(timeout)
                ),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| bad_request(&format!("invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
