//! The demo page at `/` and, in the embedded default only, `/demo/token`,
//! which mints short-lived tokens so that the page works with no setup.
//! `/demo/token` exists only when the secret was generated for this run on a
//! loopback address; a configured deployment never exposes it.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::http_error::json_error;
use crate::hub::Hub;

/// The group the demo page chats in (`assets/demo.html` joins `demo`).
pub const DEMO_ROOM: &str = "group:demo";

pub async fn page() -> Html<&'static str> {
    Html(include_str!("../assets/demo.html"))
}

#[derive(Deserialize)]
pub struct TokenParams {
    user: String,
}

pub async fn token(
    State(hub): State<Hub>,
    params: Result<Query<TokenParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return json_error(StatusCode::BAD_REQUEST, "bad_request", "give ?user=NAME");
    };
    if herald_core::ChannelName::user(&params.user).is_err() || params.user.len() > 64 {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "user names are 1-64 of A-Z a-z 0-9 _ - .",
        );
    }
    // Groups are members-only: a demo token makes its user a member of the
    // page's room, and of no other group.
    let token = crate::auth::mint(&hub.config.jwt, &params.user, &[DEMO_ROOM.to_owned()], 3_600);
    Json(json!({"token": token})).into_response()
}
