//! Errors as HTTP answers: [`ApiError`] is the one mapping from a failure
//! to an HTTP status and the JSON body `{"error": {"code", "message"}}`,
//! for the HTTP API and for the WebSocket upgrade's refusals alike.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::hub::PublishError;

/// An API failure: the one place where errors become HTTP statuses and the
/// JSON body `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    code: &'static str,
    message: String,
    /// The id to retry with, when a publish's outcome is unknown.
    message_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            message_id: None,
        }
    }

    /// The `{"code", "message", "message_id"?}` object of the body.
    pub(crate) fn error_object(&self) -> serde_json::Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(id) = &self.message_id {
            error["message_id"] = json!(id);
        }
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.error_object()}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be on its way: the connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        response
    }
}

/// 503 means "not published, retry"; 504 means "sent, no answer: retry
/// with the `message_id` given", which is published at most once.
impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        match &error {
            PublishError::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", error.to_string()),
            PublishError::Broker(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()),
            PublishError::OutcomeUnknown { message_id, .. } => ApiError {
                message_id: Some(message_id.clone()),
                ..ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "publish_outcome_unknown",
                    error.to_string(),
                )
            },
        }
    }
}

/// A JSON error response.
pub fn json_error(status: StatusCode, code: &'static str, message: &str) -> Response {
    ApiError::new(status, code, message).into_response()
}
