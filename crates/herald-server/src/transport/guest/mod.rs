//! The guest chat (`[guest]`, off by default): GoChat's dialect over
//! WebSocket at `guest.path` (the first room) and `guest.path/{room}`. A
//! guest connects without credentials and names itself in its first
//! message; it can only read and write its room, which is the channel
//! `{namespace}:{room}` that token users share (a guest's message is
//! published there through the hub, so it reaches every node).
//!
//! The upgrade, admission (total and per-IP limits), the socket reader
//! and the close are the WebSocket transport's (`transport::ws`); what is
//! the guest chat's own is `rooms` (`Guests`: the rooms and the names
//! taken), `dialect` (frames, username rules, how a delivery is shown)
//! and `connection` (naming, membership, the loop).

mod connection;
mod dialect;
mod rooms;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::http_error::json_error;
use crate::hub::Hub;
use crate::transport::ws::{Upgrade, admit};

pub use rooms::Guests;

/// `GET {guest.path}`: a guest joining the first room.
pub async fn lobby(
    State(hub): State<Hub>,
    Extension(guests): Extension<Arc<Guests>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, Response>,
) -> Response {
    accept(hub, guests, 0, peer, &headers, upgrade)
}

/// `GET {guest.path}/{room}`: a guest joining a configured room.
pub async fn room(
    State(hub): State<Hub>,
    Extension(guests): Extension<Arc<Guests>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, Response>,
) -> Response {
    let Some(index) = guests.config.rooms.iter().position(|r| *r == room) else {
        return json_error(StatusCode::NOT_FOUND, "unknown_room", "no such guest chat room");
    };
    accept(hub, guests, index, peer, &headers, upgrade)
}

/// The guest chat's path when it is disabled: says so, rather than a bare 404.
pub async fn disabled() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "guest_chat_disabled",
        "the guest chat is not enabled on this server (set guest.enabled = true)",
    )
}

fn accept(
    hub: Hub,
    guests: Arc<Guests>,
    room: usize,
    peer: SocketAddr,
    headers: &HeaderMap,
    upgrade: Result<Upgrade, Response>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection,
    };
    let admission = match admit(&hub, peer, headers) {
        Ok(admission) => admission,
        Err(refused) => return refused,
    };
    let served = hub.clone();
    upgrade.accept_with(&served, move |stream, early| {
        connection::run(stream, early, hub, guests, room, admission)
    })
}
