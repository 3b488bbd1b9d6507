//! `GET /ws`: the WebSocket transport.
//!
//! The upgrade is answered here and the socket taken over from hyper: the
//! server speaks the framing itself (`herald_core::websocket`), so that
//! fan-out can write one shared, pre-encoded frame straight to every
//! subscriber's socket (see `fanout`).
//!
//! One task per connection, spawned on the shutdown tracker. The task reads
//! the socket (client commands), writes what fan-out could not, answers
//! commands, and watches the keepalive ping and its pong deadline, the
//! token's expiry, and the drain signal. Queued bytes that make no progress
//! for `limits.write_timeout`, or a full queue, end the connection with
//! 4008, so a stalled peer never pins memory or the task.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use herald_core::frame::{self, Command, ErrorCode, FrameError, StreamPosition, ack_frame, error_frame, server_frame};
use herald_core::history::Position;
use herald_core::policy::Subject;
use herald_core::rate_limit::{CommandGate, Verdict};
use herald_core::websocket::{self, DecodeError, Decoder, Message};
use herald_core::{ChannelName, Payload};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::close::Ending;
use super::origin;
use crate::auth::{AuthError, Identity, unix_now};
use crate::broker::{HistoryPage, MAX_HISTORY_PAGE, ReadCursor};
use crate::fanout::{
    ConnectionHandle, ConnectionSocket, Delivery, Judgement, Next, Outbound, Room, connection_socket, wire_frame,
};
use crate::http_error::json_error;
use crate::hub::{Admission, Hub, PublishError, PublishRequest, Rejection, Source};
use herald_core::view::{HistoryAnswer, presence_json};

/// Bytes read from the socket at a time: commands are small.
const READ_CHUNK: usize = 4096;
/// The most queue entries taken in one turn before the socket is read again.
const MAX_BATCH: usize = 64;
/// Messages a `history` command returns when it names no limit.
const DEFAULT_HISTORY_PAGE: usize = 100;
/// How long gap repair waits for history to be readable (after a Redis
/// restart the Pub/Sub connection may be back before the command
/// connection) before it gives up with `resync`. The connection is held
/// meanwhile: fan-out queues for it, within its queue bounds.
const GAP_REPAIR_WAIT: Duration = Duration::from_secs(5);
/// The least time between two history reads of one gap repair, so that a
/// broker that is reachable but failing is not asked in a loop.
const GAP_REPAIR_RETRY: Duration = Duration::from_millis(100);
/// How long a close frame may take to send before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the close frame, how long the client's input is read (and
/// discarded) while the client reads the close frame and closes its side.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// The most input discarded while lingering: a client that keeps sending
/// past it is not reading either, and the socket is closed.
const LINGER_MAX_BYTES: usize = 1 << 20;

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
    if !origin::is_allowed(&hub.config.origins, &headers) {
        hub.metrics.connections_rejected.add("origin", 1);
        return json_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not connect",
        );
    }
    let admission = match hub.admit(peer.ip()) {
        Ok(admission) => admission,
        Err(rejection) => {
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
            return json_error(status, code, message);
        }
    };
    let tracker_token = hub.shutdown.tracker.token();
    let Upgrade { accept, on_upgrade } = upgrade;
    tokio::spawn(async move {
        match on_upgrade
            .await
            .map(|upgraded| upgraded.downcast::<TokioIo<TcpStream>>())
        {
            Ok(Ok(parts)) => run(parts.io.into_inner(), parts.read_buf, hub, admission, params.token).await,
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

/// The reading half of a connection: bytes from the socket, decoded into
/// messages. Buffers only while a message is incomplete.
struct Reader {
    decoder: Decoder,
    buffer: BytesMut,
}

impl Reader {
    fn new(max_message: usize, early: Bytes) -> Self {
        Reader {
            decoder: Decoder::new(max_message),
            buffer: BytesMut::from(&early[..]),
        }
    }

    /// The next message. Cancel-safe: what was read stays buffered.
    async fn recv(&mut self, stream: &TcpStream) -> Result<Message, Ending> {
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(message)) => {
                    if self.buffer.is_empty() {
                        // An idle connection keeps no read buffer.
                        self.buffer = BytesMut::new();
                    }
                    return Ok(message);
                }
                Ok(None) => {}
                Err(DecodeError::TooLarge) => return Err(Ending::TooLarge),
                Err(DecodeError::InvalidUtf8) => return Err(Ending::InvalidUtf8),
                Err(DecodeError::Protocol(what)) => {
                    tracing::debug!(what, "WebSocket protocol error");
                    return Err(Ending::ProtocolError);
                }
            }
            stream.readable().await.map_err(|_| Ending::ClientGone)?;
            // Read on the stack and keep only what arrived: a buffer sized
            // for the read would stay with the connection.
            let mut chunk = [0u8; READ_CHUNK];
            match stream.try_read(&mut chunk) {
                Ok(0) => return Err(Ending::ClientGone),
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Ending::ClientGone),
            }
        }
    }
}

/// Writes everything queued, waiting for the socket as needed.
async fn flush_all(socket: &ConnectionSocket) -> io::Result<()> {
    loop {
        socket.flush()?;
        if socket.stalled_since().is_none() {
            return Ok(());
        }
        socket.stream().writable().await?;
    }
}

/// Runs one connection from upgrade to close.
async fn run(stream: TcpStream, early: Bytes, hub: Hub, admission: Admission, query_token: Option<String>) {
    use std::sync::atomic::Ordering::Relaxed;
    hub.metrics.connections_accepted.fetch_add(1, Relaxed);
    let limits = hub.limits();
    let socket = connection_socket(
        hub.next_connection_id(),
        stream,
        limits.queue_messages,
        limits.queue_bytes,
    );
    let mut reader = Reader::new(limits.max_message_size, early);
    let mut gate = CommandGate::new(limits.commands_per_second, limits.command_burst, Instant::now().into());
    let ending = match authenticate(&socket, &mut reader, &hub, query_token, &mut gate).await {
        Ok(identity) => Session::start(&socket, &mut reader, &hub, identity, gate).await,
        Err(ending) => ending,
    };
    hub.metrics.disconnects.add(ending.metric_label(), 1);
    if let Some((code, reason)) = ending.close_frame() {
        // Nothing more from fan-out: the close frame is the last one.
        socket.hold();
        if ending == Ending::SlowClient {
            // A client cut off as slow reads the close frame next: the
            // backlog it could not keep up with would hold it back (and
            // outlast the close timeout).
            let discarded = socket.discard_backlog();
            hub.metrics.messages_dropped.add(ending.drop_label(), discarded);
        }
        socket.send(websocket::close(code, reason));
        let mut input = Lingering::default();
        let flushed = flush_discarding_input(&socket, &mut input).await;
        // Whatever did not go out is lost with the connection: counted,
        // however the connection ended.
        hub.metrics.messages_dropped.add(ending.drop_label(), socket.finish());
        if flushed {
            linger(&socket, &mut input).await;
        }
    } else {
        hub.metrics.messages_dropped.add(ending.drop_label(), socket.finish());
    }
    drop(admission);
}

/// The client's input once the connection is closing: read only to be
/// discarded, within bounds.
#[derive(Default)]
struct Lingering {
    /// Bytes discarded so far, against `LINGER_MAX_BYTES`.
    discarded: usize,
    /// The client closed its side (or the socket failed): nothing more to read.
    ended: bool,
}

impl Lingering {
    /// Reads and discards what the client sent, once it is readable.
    async fn discard(&mut self, stream: &TcpStream) {
        if stream.readable().await.is_err() {
            self.ended = true;
            return;
        }
        let mut chunk = [0u8; READ_CHUNK];
        match stream.try_read(&mut chunk) {
            Ok(0) => self.ended = true,
            Ok(read) => self.discarded += read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.ended = true,
        }
    }

    fn done(&self) -> bool {
        self.ended || self.discarded >= LINGER_MAX_BYTES
    }
}

/// Writes what is queued, the close frame last, within `CLOSE_TIMEOUT`,
/// reading (and discarding) the client's input meanwhile, so that a client
/// blocked sending is not deadlocked with a server blocked sending. True
/// when everything went out.
async fn flush_discarding_input(socket: &ConnectionSocket, input: &mut Lingering) -> bool {
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    loop {
        if socket.flush().is_err() {
            return false;
        }
        if socket.stalled_since().is_none() {
            return true;
        }
        tokio::select! {
            _ = sleep_until(deadline) => return false,
            ready = socket.stream().writable() => if ready.is_err() {
                return false;
            },
            _ = input.discard(socket.stream()), if !input.done() => {}
        }
    }
}

/// Closes the way RFC 6455 §7.1.1 asks, once the close frame is out: shut
/// down the write side, then read and discard until the client closes its
/// side too (bounded by `LINGER_TIMEOUT` and `LINGER_MAX_BYTES`). Closing a
/// socket whose input is unread resets the connection: the kernel discards
/// what it has not transmitted yet (the close frame, when the client's
/// window is full), some client stacks discard what they received but did
/// not read yet, and a client still writing fails before it reads.
async fn linger(socket: &ConnectionSocket, input: &mut Lingering) {
    let _ = socket2::SockRef::from(socket.stream()).shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIMEOUT;
    while !input.done() {
        tokio::select! {
            _ = sleep_until(deadline) => return,
            _ = input.discard(socket.stream()) => {}
        }
    }
}

/// Waits for a valid token: from the query string, or from the first `auth`
/// frame within the auth timeout. Other commands are answered with
/// `not_authenticated` and not served.
async fn authenticate(
    socket: &ConnectionSocket,
    reader: &mut Reader,
    hub: &Hub,
    query_token: Option<String>,
    gate: &mut CommandGate,
) -> Result<Identity, Ending> {
    if let Some(token) = query_token {
        return verify(socket, hub, &token).await;
    }
    let deadline = Instant::now() + hub.limits().auth_timeout;
    loop {
        let incoming = tokio::select! {
            _ = sleep_until(deadline) => {
                hub.metrics.auth_failures.add("timeout", 1);
                let frame = server_frame("auth_failed", None, json!({"message": "authentication timed out"}));
                let _ = send_now(socket, hub, frame).await;
                return Err(Ending::AuthTimeout);
            }
            _ = hub.shutdown.draining.cancelled() => return Err(Ending::Shutdown),
            incoming = reader.recv(socket.stream()) => incoming?,
        };
        let text = match incoming {
            Message::Close(_) => return Err(Ending::ClientClosed),
            Message::Ping(payload) => {
                answer_ping(socket, gate, &payload)?;
                continue;
            }
            Message::Pong => continue,
            Message::Binary(_) => None,
            Message::Text(text) => Some(text),
        };
        let parsed = text.as_deref().map(frame::parse_client_frame);
        let reply = match gate.check(Instant::now().into()) {
            Verdict::Disconnect => return Err(Ending::RateLimited),
            Verdict::Refuse => rate_limited_frame(parsed.as_ref()),
            Verdict::Serve => match parsed {
                None => error_frame(None, ErrorCode::InvalidFrame, "send `auth` as a text frame"),
                Some(Ok(parsed)) => match parsed.command {
                    Command::Auth { token } => return verify(socket, hub, &token).await,
                    other => {
                        let message = format!("`{}` before authentication; send `auth` first", other.name());
                        error_frame(parsed.message_id.as_ref(), ErrorCode::NotAuthenticated, &message)
                    }
                },
                Some(Err(error)) => error.to_frame(),
            },
        };
        send_now(socket, hub, reply).await?;
    }
}

/// Answers a client's ping with a pong. Pings pass the command rate gate
/// like any other frame: a refused one goes unanswered.
fn answer_ping(socket: &ConnectionSocket, gate: &mut CommandGate, payload: &[u8]) -> Result<(), Ending> {
    match gate.check(Instant::now().into()) {
        Verdict::Serve => socket.send(websocket::encode(websocket::OP_PONG, payload)),
        Verdict::Refuse => {}
        Verdict::Disconnect => return Err(Ending::RateLimited),
    }
    Ok(())
}

/// The `rate_limited` error for a refused frame, naming its `message_id`
/// when the frame had a readable one.
fn rate_limited_frame(parsed: Option<&Result<frame::ClientFrame, FrameError>>) -> String {
    let message_id = match parsed {
        Some(Ok(frame)) => frame.message_id.as_ref(),
        Some(Err(error)) => error.message_id.as_ref(),
        None => None,
    };
    error_frame(message_id, ErrorCode::RateLimited, "command rate limit exceeded")
}

async fn verify(socket: &ConnectionSocket, hub: &Hub, token: &str) -> Result<Identity, Ending> {
    match hub.verifier.verify(token) {
        Ok(identity) => Ok(identity),
        Err(error) => {
            hub.metrics.auth_failures.add(error.reason(), 1);
            tracing::debug!(reason = error.reason(), "authentication failed");
            let frame = server_frame("auth_failed", None, json!({"message": error.to_string()}));
            let _ = send_now(socket, hub, frame).await;
            Err(Ending::AuthFailed)
        }
    }
}

/// Sends one frame (and anything queued before it) within the write timeout.
async fn send_now(socket: &ConnectionSocket, hub: &Hub, frame: String) -> Result<(), Ending> {
    socket.send(websocket::text(&frame));
    match tokio::time::timeout(hub.limits().write_timeout, flush_all(socket)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::ClientGone),
        Err(_) => Err(Ending::SlowClient),
    }
}

/// An authenticated connection.
struct Session<'a> {
    hub: &'a Hub,
    socket: &'a ConnectionSocket,
    identity: Identity,
    user_channel: ChannelName,
    handle: ConnectionHandle,
    /// Channels this connection is subscribed to (the user channel included).
    subscriptions: HashSet<ChannelName>,
    /// The subset of `subscriptions` made by the server API, which no token
    /// change revokes.
    granted_by_server: HashSet<ChannelName>,
    gate: CommandGate,
    /// Set when the token was replaced by `refresh`.
    expiry_changed: bool,
    /// Recovering subscribes whose missed messages are still being queued,
    /// in the order they were asked; at most one per subscription.
    recoveries: VecDeque<Recovery>,
}

/// A replay from history: a recovering subscribe's missed messages, queued
/// behind its ack, or a gap's, queued before the live message that showed
/// it; queued as the socket drains, a page at a time. Replay keeps the
/// outgoing queue at most half full (see `ConnectionSocket::replay_room`),
/// so that a long absence does not fill the queue at once and live messages
/// and replies have room. While a replay is under way the connection stays
/// held: live messages wait in the queue and are judged against the
/// position once the replay has caught up.
struct Recovery {
    channel: ChannelName,
    epoch: String,
    /// Read from history, not yet queued, with their offsets (`None`: not
    /// for this connection, the position moves past it): at most one page,
    /// of at most as many messages as the queue had room for when it was read.
    pending: VecDeque<(u64, Option<Bytes>)>,
    /// The offset of the last message read from history.
    last: u64,
    /// A page came back short: history keeps nothing after `last`; for a
    /// gap, `until` was reached.
    caught_up: bool,
    /// For a gap: the last missing offset, and the live message that showed
    /// the gap, queued once the gap is filled or reported.
    gap: Option<(u64, Arc<Delivery>)>,
    /// History could not fill the gap: `resync` precedes the live message.
    failed: bool,
}

impl Recovery {
    /// Takes a page read after `last`, of at most `limit` messages, for
    /// connection `id` of `user`.
    fn add_page(&mut self, publications: Vec<herald_core::Publication>, limit: usize, id: u64, user: &str) {
        self.caught_up = publications.len() < limit;
        if let Some((until, _)) = &self.gap {
            // A short page leaves the gap open: history no longer has it.
            self.failed = publications.len() < limit;
            self.caught_up = self.failed || publications.last().and_then(|p| p.offset) >= Some(*until);
        }
        for publication in publications {
            let Some(offset) = publication.offset else { continue };
            self.last = offset;
            let frame = publication.is_for(id, user).then(|| wire_frame(publication.encode()));
            self.pending.push_back((offset, frame));
        }
    }
}

/// Unsubscribes everything when the session ends, however it ends.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        let id = self.socket.id();
        for channel in &self.subscriptions {
            self.hub.unsubscribe(channel, id);
        }
        // Presence lives in the broker (maybe Redis): record the departures
        // in a task of their own.
        let tracked: Vec<ChannelName> = self
            .subscriptions
            .drain()
            .filter(|channel| self.hub.tracks_presence(channel))
            .collect();
        if !tracked.is_empty() {
            let (hub, user) = (self.hub.clone(), self.identity.user_id.clone());
            // All at once (one pipelined write in Redis mode): a channel's
            // leave does not wait for another channel's reply.
            self.hub.shutdown.services.spawn(async move {
                let leaves = tracked
                    .into_iter()
                    .map(|channel| hub.presence_changed(channel, user.clone(), id, false));
                futures_util::future::join_all(leaves).await;
            });
        }
    }
}

#[derive(Serialize)]
struct AuthSuccess<'a> {
    user_id: &'a str,
    connection_id: u64,
    expires_at: u64,
    channel: &'a str,
    node_id: &'a str,
}

impl<'a> Session<'a> {
    async fn start(
        socket: &'a ConnectionSocket,
        reader: &mut Reader,
        hub: &'a Hub,
        identity: Identity,
        gate: CommandGate,
    ) -> Ending {
        let user_channel = ChannelName::user(&identity.user_id).expect("the verifier checks the user id");
        let id = socket.id();
        // `auth_success` goes first: fan-out queues behind it until it is sent.
        socket.hold();
        let handle = socket.handle(&identity.user_id);
        match hub.subscribe_user(&user_channel, handle.clone()) {
            Some(_) => {}
            None => {
                hub.metrics.connections_rejected.add("max_per_user", 1);
                let frame = error_frame(None, ErrorCode::LimitExceeded, "too many connections for this user");
                let _ = send_now(socket, hub, frame).await;
                return Ending::TooManyConnections;
            }
        }
        let success = AuthSuccess {
            user_id: &identity.user_id,
            connection_id: id,
            expires_at: identity.expires_at,
            channel: user_channel.as_str(),
            node_id: &hub.node_id,
        };
        let success = server_frame("auth_success", None, success);
        let mut session = Session {
            hub,
            socket,
            user_channel: user_channel.clone(),
            handle,
            subscriptions: HashSet::from([user_channel]),
            granted_by_server: HashSet::new(),
            identity,
            gate,
            expiry_changed: false,
            recoveries: VecDeque::new(),
        };
        tracing::debug!(user_id = %session.identity.user_id, connection_id = id, "connection authenticated");
        // `auth_success` goes out once the personal channel is live.
        hub.broker.subscribed(&session.user_channel).await;
        let (user_channel, user) = (session.user_channel.clone(), session.identity.user_id.clone());
        hub.presence_changed(user_channel, user, id, true).await;
        session.reply(success);
        session.serve(reader).await
    }

    async fn serve(&mut self, reader: &mut Reader) -> Ending {
        let hub = self.hub;
        let socket = self.socket;
        let keepalive = &hub.config.keepalive;
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        // One timer for both halves of keepalive: when the next ping is due,
        // or, while a ping is unanswered, when the peer counts as dead.
        let keepalive_timer = tokio::time::sleep_until(Instant::now() + keepalive.ping_interval);
        tokio::pin!(keepalive_timer);
        let mut awaiting_pong = false;
        // What had been sent when the peer last sent anything.
        let mut messages_at_sign_of_life = socket.messages_out();
        let expiry = tokio::time::sleep_until(self.expiry_instant());
        tokio::pin!(expiry);
        let drain = tokio::time::sleep_until(far_future);
        tokio::pin!(drain);
        let mut draining = false;
        // Created once: a fresh `cancelled()` per loop turn would register
        // with the token (a lock) on every message.
        let drain_signal = hub.shutdown.draining.clone().cancelled_owned();
        tokio::pin!(drain_signal);
        // Whatever queued behind `auth_success` goes now.
        if let Some(ending) = self.take_entries().await {
            return ending;
        }

        loop {
            if socket.flush().is_err() {
                return Ending::ClientGone;
            }
            if !self.recoveries.is_empty() {
                if let Err(ending) = self.replay().await {
                    return ending;
                }
                if socket.flush().is_err() {
                    return Ending::ClientGone;
                }
                // The socket took all of it: more at once, after a look at
                // the socket (otherwise its draining brings the task back).
                if !self.recoveries.is_empty() && socket.stalled_since().is_none() {
                    socket.wake();
                }
            }
            let stalled = socket
                .stalled_since()
                .map(|since| Instant::from_std(since) + hub.limits().write_timeout);
            if self.expiry_changed {
                self.expiry_changed = false;
                expiry.as_mut().reset(self.expiry_instant());
            }
            tokio::select! {
                biased;
                _ = &mut drain_signal, if !draining => {
                    draining = true;
                    drain.as_mut().reset(Instant::now() + drain_delay(hub.config.shutdown.drain_window));
                }
                _ = &mut drain, if draining => {
                    let data = json!({"reason": "shutdown", "reconnect": true});
                    self.reply(server_frame("disconnect", None, data));
                    return Ending::Shutdown;
                }
                _ = &mut expiry => return Ending::TokenExpired,
                _ = &mut keepalive_timer => {
                    if awaiting_pong {
                        // Messages went to a peer that has shown no sign of
                        // reading since: it stalled with them (a slow
                        // client), it did not merely go quiet.
                        if socket.messages_out() > messages_at_sign_of_life {
                            return Ending::SlowClient;
                        }
                        return Ending::PongTimeout;
                    }
                    socket.send(websocket::encode(websocket::OP_PING, &[]));
                    awaiting_pong = true;
                    keepalive_timer.as_mut().reset(Instant::now() + keepalive.pong_timeout);
                }
                // Queued bytes that make no progress for the write timeout.
                _ = sleep_until(stalled.unwrap_or(far_future)), if stalled.is_some() => return Ending::SlowClient,
                ready = socket.stream().writable(), if stalled.is_some() => {
                    if ready.is_err() {
                        return Ending::ClientGone;
                    }
                }
                // The socket comes before the queue: a busy channel must not
                // starve the client's commands and pongs. Commands are rate
                // limited, so they cannot starve the queue in turn.
                incoming = reader.recv(socket.stream()) => {
                    // Any frame proves the peer is alive.
                    messages_at_sign_of_life = socket.messages_out();
                    if awaiting_pong {
                        awaiting_pong = false;
                        keepalive_timer.as_mut().reset(Instant::now() + keepalive.ping_interval);
                    }
                    let text = match incoming {
                        Err(ending) => return ending,
                        Ok(Message::Close(_)) => return Ending::ClientClosed,
                        Ok(Message::Ping(payload)) => {
                            if let Err(ending) = answer_ping(socket, &mut self.gate, &payload) {
                                return ending;
                            }
                            continue;
                        }
                        Ok(Message::Pong) => continue,
                        Ok(Message::Binary(_)) => None,
                        Ok(Message::Text(text)) => Some(text),
                    };
                    // The reply goes before anything published meanwhile.
                    socket.hold();
                    // Boxed: the command path (publish included) is large and
                    // rarely running; inline, every idle connection would carry it.
                    if let Some(ending) = Box::pin(self.command(text.as_deref())).await {
                        return ending;
                    }
                    if let Some(ending) = self.take_entries().await {
                        return ending;
                    }
                }
                _ = socket.changed() => {
                    if let Some(ending) = self.take_entries().await {
                        return ending;
                    }
                }
            }
        }
    }

    /// Takes what fan-out queued for this task, a batch at a time; the hold
    /// ends once nothing is left.
    async fn take_entries(&mut self) -> Option<Ending> {
        if !self.recoveries.is_empty() {
            // Live messages wait until the replay has caught up.
            return None;
        }
        for _ in 0..MAX_BATCH {
            match self.socket.next() {
                None => return None,
                Some(Next::Entry(entry)) => {
                    self.take(entry).await;
                    if !self.recoveries.is_empty() {
                        // A gap is being filled: what follows waits for it.
                        return None;
                    }
                }
                Some(Next::FellBehind) => return Some(Ending::SlowClient),
                Some(Next::Failed) => return Some(Ending::ClientGone),
            }
        }
        // More waits: come back to it after a look at the socket.
        self.socket.wake();
        None
    }

    /// Takes one entry from the queue. For channels with history it keeps
    /// the stream exact: a message already delivered (overlap with a
    /// recovery) is skipped, and a gap (a message lost on its way to this
    /// node) is filled from history, or reported with `resync`.
    async fn take(&mut self, entry: Outbound) {
        let verdict = self.socket.judge(&entry);
        let notice = match entry {
            Outbound::Delivery(delivery) => match verdict {
                Judgement::Skip => return,
                Judgement::Write => return self.socket.send_message(delivery.frame.clone()),
                Judgement::Task => {
                    // A gap or a new epoch: only deliveries with a position get here.
                    let (Some(offset), Some(epoch)) = (delivery.offset, &delivery.epoch) else {
                        return;
                    };
                    match self.socket.position(&delivery.channel) {
                        // A gap: filled from history as the socket drains,
                        // this message after it.
                        Some(position) if position.epoch == *epoch && offset > position.offset + 1 => {
                            self.recoveries.push_back(Recovery {
                                channel: delivery.channel.clone(),
                                epoch: position.epoch,
                                pending: VecDeque::new(),
                                last: position.offset,
                                caught_up: false,
                                gap: Some((offset - 1, delivery.clone())),
                                failed: false,
                            });
                        }
                        // A new epoch: what came before it cannot be replayed.
                        Some(_) => self.close_gap(&delivery.channel, true, offset - 1, &delivery),
                        None => {
                            let position = Position {
                                offset,
                                epoch: epoch.clone(),
                            };
                            self.socket.set_position(&delivery.channel, position);
                            self.socket.send_message(delivery.frame.clone());
                        }
                    }
                    return;
                }
            },
            Outbound::Subscribe(channel) => {
                let limit = self.hub.limits().max_subscriptions;
                if !self.subscriptions.contains(&channel) && self.subscriptions.len() >= limit {
                    let message =
                        format!("cannot add `{channel}`: a connection may hold at most {limit} subscriptions");
                    self.reply(error_frame(None, ErrorCode::LimitExceeded, &message));
                    return;
                }
                // As a plain subscribe: the position is read before registering.
                let keeps_history = self.hub.policies().policy(&channel).is_ok_and(|p| p.keeps_history());
                if keeps_history
                    && self.socket.position(&channel).is_none()
                    && let Ok(position) = self.read_position(&channel).await
                {
                    self.socket.set_position(&channel, position);
                }
                self.granted_by_server.insert(channel.clone());
                self.add_subscription(&channel).await;
                websocket::text(&server_frame("subscribed", None, json!({"channel": channel})))
            }
            Outbound::Unsubscribe(channel) => {
                if channel == self.user_channel || !self.remove_subscription(&channel).await {
                    return;
                }
                let data = json!({"channel": channel, "reason": "server"});
                websocket::text(&server_frame("unsubscribed", None, data))
            }
        };
        self.socket.send(notice);
    }

    /// Advances the position past a message this connection will not
    /// receive (its own, excluded), when it is the next one.
    fn step_over(&mut self, channel: &ChannelName, offset: Option<u64>, epoch: Option<&str>) {
        if let (Some(offset), Some(epoch)) = (offset, epoch) {
            self.socket.step_over(channel, offset, epoch);
        }
    }

    /// Ends a gap before `live`: counts it as recovered, or (`failed`)
    /// tells the client with `resync` that what came before `live` cannot be
    /// replayed; then queues `live` and moves the position to it.
    fn close_gap(&mut self, channel: &ChannelName, failed: bool, until: u64, live: &Delivery) {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(offset), Some(epoch)) = (live.offset, &live.epoch) else {
            return;
        };
        let counter = match failed {
            true => &self.hub.metrics.gaps_unrecovered,
            false => &self.hub.metrics.gaps_recovered,
        };
        counter.fetch_add(1, Relaxed);
        if failed {
            let data = json!({"channel": channel, "recovered": false, "epoch": epoch, "offset": until});
            self.reply(server_frame("resync", None, data));
        }
        let position = Position {
            offset,
            epoch: epoch.clone(),
        };
        self.socket.set_position(channel, position);
        self.socket.send_message(live.frame.clone());
    }

    fn reply(&mut self, frame: String) {
        self.socket.send(websocket::text(&frame));
    }

    fn expiry_instant(&self) -> Instant {
        // A token may claim any `exp`; cap it so the instant cannot overflow.
        const TEN_YEARS: u64 = 10 * 365 * 86_400;
        let remaining = self.identity.expires_at.saturating_sub(unix_now()).min(TEN_YEARS);
        Instant::now() + Duration::from_secs(remaining) + self.hub.config.jwt.leeway
    }

    /// Handles one client data frame (`None` for a binary frame); `Some`
    /// ends the connection. Every frame passes the rate gate first, valid or
    /// not, so that garbage cannot be sent faster than commands.
    async fn command(&mut self, text: Option<&str>) -> Option<Ending> {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &self.hub.metrics;
        metrics.commands.fetch_add(1, Relaxed);
        let parsed = text.map(frame::parse_client_frame);
        match self.gate.check(Instant::now().into()) {
            Verdict::Serve => {}
            Verdict::Refuse => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(rate_limited_frame(parsed.as_ref()));
                return None;
            }
            Verdict::Disconnect => return Some(Ending::RateLimited),
        }
        let parsed = match parsed {
            Some(Ok(parsed)) => parsed,
            Some(Err(error)) => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(error.to_frame());
                return None;
            }
            None => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(error_frame(
                    None,
                    ErrorCode::InvalidFrame,
                    "clients send commands as text frames",
                ));
                return None;
            }
        };
        let message_id = parsed.message_id;
        let outcome = match parsed.command {
            Command::Ping => Ok(server_frame("pong", message_id.as_ref(), json!({}))),
            Command::Auth { .. } => Err(err(
                ErrorCode::AlreadyAuthenticated,
                "this connection is already authenticated",
            )),
            Command::Subscribe { channel, recover } => self
                .subscribe(&channel, recover)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Unsubscribe { channel } => self
                .unsubscribe(&channel)
                .await
                .map(|()| ack(&message_id, json!({"channel": channel}))),
            Command::JoinGroup { group_id } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                self.subscribe(&channel, None).await.map(|mut data| {
                    data["group_id"] = json!(group_id);
                    ack(&message_id, data)
                })
            }
            Command::LeaveGroup { group_id } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                self.unsubscribe(&channel)
                    .await
                    .map(|()| ack(&message_id, json!({"group_id": group_id, "channel": channel})))
            }
            Command::Publish {
                channel,
                message_type,
                data,
            } => self
                .publish(channel, message_type, data, None)
                .await
                .map(|receipt| ack(&message_id, receipt)),
            Command::SendMessage {
                group_id,
                msg_type,
                content,
            } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                let data = herald_core::view::chat_message(&group_id, &self.identity.user_id, &msg_type, &content);
                let exclude = Some(self.identity.user_id.clone());
                let published = self
                    .publish(channel.clone(), Some("new_message".into()), data, exclude)
                    .await;
                if let Ok(receipt) = &published {
                    // The sender is excluded from its own message: step over
                    // its offset here rather than repair a "gap" later.
                    self.step_over(&channel, receipt.offset, receipt.epoch.as_deref());
                }
                published.map(|receipt| ack(&message_id, receipt))
            }
            Command::MarkRead {
                channel,
                read_message_id,
                offset,
            } => self
                .mark_read(channel, read_message_id, offset)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Presence { channel } => self.presence(&channel).await.map(|data| ack(&message_id, data)),
            Command::History { channel, since, limit } => self
                .history(&channel, since, limit)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Refresh { token } => self.refresh(&token).await.map(|data| ack(&message_id, data)),
        };
        match outcome {
            Ok(frame) => {
                self.reply(frame);
                // A recovering subscribe's missed messages follow its ack.
                if !self.recoveries.is_empty()
                    && let Err(ending) = self.replay().await
                {
                    return Some(ending);
                }
            }
            Err((code, message)) => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(FrameError::new(message_id, code, message).to_frame());
            }
        }
        None
    }

    /// A policy decision for this connection. A channel the server API
    /// subscribed it to is one it is a member of (membership the backend
    /// decided, e.g. a members-only group): "may not subscribe" does not
    /// apply there, every other refusal does.
    fn permit(
        &self,
        channel: &ChannelName,
        decision: Result<(), herald_core::policy::PolicyError>,
    ) -> Result<(), (ErrorCode, String)> {
        match decision {
            Err(herald_core::policy::PolicyError::SubscribeForbidden(_))
                if self.granted_by_server.contains(channel) =>
            {
                Ok(())
            }
            other => other.map_err(policy_error),
        }
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            user_id: &self.identity.user_id,
            granted: &self.identity.channels,
        }
    }

    /// Subscribes; for a channel with history, also establishes the
    /// connection's position (and with `recover`, queues what was missed in
    /// `replay`). Returns the ack's data.
    async fn subscribe(
        &mut self,
        channel: &ChannelName,
        recover: Option<StreamPosition>,
    ) -> Result<serde_json::Value, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_subscribe(&self.subject(), channel))?;
        if !self.subscriptions.contains(channel) && self.subscriptions.len() >= self.hub.limits().max_subscriptions {
            let limit = self.hub.limits().max_subscriptions;
            return Err(err(
                ErrorCode::LimitExceeded,
                &format!("a connection may hold at most {limit} subscriptions"),
            ));
        }
        let keeps_history = self.hub.policies().policy(channel).is_ok_and(|p| p.keeps_history());
        // Subscribed already and not asking to recover: nothing changes, and
        // the position stands (resetting it could skip queued messages).
        if recover.is_none()
            && let Some(position) = self.socket.position(channel)
        {
            return Ok(json!({"channel": channel, "epoch": position.epoch, "offset": position.offset}));
        }
        // Without recovery the client starts from "now": read "now" before
        // registering, so a message published in between is either queued
        // or repaired as a gap. With recovery, register first; the overlap
        // between history and queue is skipped by offset.
        let baseline = match (keeps_history, &recover) {
            (true, None) => Some(self.read_position(channel).await?),
            _ => None,
        };
        self.add_subscription(channel).await;
        // Ack only once messages published from now on will arrive here.
        self.hub.broker.subscribed(channel).await;
        let mut data = json!({"channel": channel});
        if !keeps_history {
            if recover.is_some() {
                data["recovered"] = json!(false);
            }
            return Ok(data);
        }
        let position = match (baseline, recover) {
            (Some(baseline), _) => baseline,
            (None, Some(recover)) => {
                // The first page only: the rest is read as the socket drains.
                let limit = self.socket.replay_room().clamp(1, MAX_HISTORY_PAGE);
                let read = async {
                    let since = self.hub.resolve(channel, recover).await.map_err(broker_error)?;
                    let page = self.hub.broker.history(channel, Some(since.clone()), limit).await;
                    Ok((since, page.map_err(broker_error)?))
                };
                let (since, page) = match read.await {
                    Ok(read) => read,
                    Err(error) => {
                        // Not half-subscribed: the client is told, and may retry.
                        self.remove_subscription(channel).await;
                        return Err(error);
                    }
                };
                data["recovered"] = json!(page.recovered);
                // A new recovery of the channel replaces one under way.
                self.recoveries.retain(|recovery| recovery.channel != *channel);
                if page.recovered {
                    let mut recovery = Recovery {
                        channel: channel.clone(),
                        epoch: since.epoch.clone(),
                        pending: VecDeque::new(),
                        last: since.offset,
                        caught_up: false,
                        gap: None,
                        failed: false,
                    };
                    let (id, user) = (self.socket.id(), &self.identity.user_id);
                    recovery.add_page(page.publications, limit, id, user);
                    // The ack's position: the last missed message, or, when
                    // more pages follow, the channel's latest when read.
                    let acked = match recovery.caught_up {
                        true => recovery.last,
                        false => page.current.offset,
                    };
                    self.recoveries.push_back(recovery);
                    // The kept position moves as the replay is queued.
                    self.socket.set_position(channel, since);
                    data["epoch"] = json!(page.current.epoch);
                    data["offset"] = json!(acked);
                    return Ok(data);
                }
                page.current
            }
            (None, None) => unreachable!("a baseline is read whenever recovery is not asked"),
        };
        data["epoch"] = json!(position.epoch);
        data["offset"] = json!(position.offset);
        self.socket.set_position(channel, position);
        Ok(data)
    }

    /// Queues what recovering subscribes replay, as far as the queue has
    /// room, reading the next page of history when one is used up. Once
    /// every replay has caught up, the live messages that waited are taken.
    /// `Err` when live messages alone fill the queue: the client cannot keep up.
    async fn replay(&mut self) -> Result<(), Ending> {
        let (id, user) = (self.socket.id(), self.identity.user_id.clone());
        while let Some(recovery) = self.recoveries.front_mut() {
            while let Some((offset, frame)) = recovery.pending.front() {
                if let Some(frame) = frame {
                    match self.socket.replay_fits(frame.len()) {
                        Room::Now => self.socket.send_message(frame.clone()),
                        // The socket drains first; the task comes back.
                        Room::Later => return Ok(()),
                        Room::Never => return Err(Ending::SlowClient),
                    }
                }
                let position = Position {
                    offset: *offset,
                    epoch: recovery.epoch.clone(),
                };
                self.socket.set_position(&recovery.channel, position);
                recovery.pending.pop_front();
            }
            if !recovery.caught_up {
                let mut limit = self.socket.replay_room().clamp(1, MAX_HISTORY_PAGE);
                if let Some((until, _)) = &recovery.gap {
                    limit = limit.min(until.saturating_sub(recovery.last) as usize).max(1);
                }
                let since = Position {
                    offset: recovery.last,
                    epoch: recovery.epoch.clone(),
                };
                match read_history(self.hub, &recovery.channel, since, limit).await {
                    Some(page) if page.recovered => {
                        recovery.add_page(page.publications, limit, id, &user);
                        continue;
                    }
                    // History moved on (it was trimmed meanwhile) or could
                    // not be read: the replay ends here. A gap is reported
                    // with `resync`; after a subscribe's replay, the next
                    // live message shows the gap, dealt with like any other.
                    _ => recovery.failed = true,
                }
            }
            let Some(recovery) = self.recoveries.pop_front() else {
                break;
            };
            if let Some((until, live)) = recovery.gap {
                self.close_gap(&recovery.channel, recovery.failed, until, &live);
            }
        }
        match self.take_entries().await {
            Some(ending) => Err(ending),
            None => Ok(()),
        }
    }

    /// The channel's current position.
    async fn read_position(&self, channel: &ChannelName) -> Result<Position, (ErrorCode, String)> {
        self.hub.position(channel).await.map_err(broker_error)
    }

    /// Stores the user's read cursor for `channel` and tells the user's
    /// other connections (`read`).
    async fn mark_read(
        &self,
        channel: ChannelName,
        read_message_id: String,
        offset: Option<u64>,
    ) -> Result<serde_json::Value, (ErrorCode, String)> {
        // One may mark as read only what one may read.
        self.permit(&channel, self.hub.policies().check_subscribe(&self.subject(), &channel))?;
        let keeps_history = self.hub.policies().policy(&channel).is_ok_and(|p| p.keeps_history());
        let (offset, epoch) = match (keeps_history, offset) {
            (false, _) => (None, None),
            (true, Some(offset)) => (Some(offset), Some(self.read_position(&channel).await?.epoch)),
            (true, None) => {
                // Find the message's position among the kept ones.
                let page = self
                    .hub
                    .broker
                    .history(&channel, None, MAX_HISTORY_PAGE)
                    .await
                    .map_err(broker_error)?;
                let found = page.publications.iter().find(|p| p.message_id == read_message_id);
                (found.and_then(|p| p.offset), found.and_then(|p| p.epoch.clone()))
            }
        };
        let cursor = ReadCursor {
            message_id: read_message_id,
            offset,
            epoch,
        };
        self.hub
            .broker
            .set_read_cursor(&self.identity.user_id, &channel, cursor.clone())
            .await
            .map_err(broker_error)?;
        let mut event = json!({"channel": channel, "message_id": cursor.message_id});
        if let Some(offset) = cursor.offset {
            event["offset"] = json!(offset);
        }
        let data = RawValue::from_string(event.to_string()).expect("json! output is valid JSON");
        let request = PublishRequest {
            channel: self.user_channel.clone(),
            message_type: Some("read".into()),
            message_id: None,
            payload: Payload::Json(data),
            from: Some(self.identity.user_id.clone()),
            exclude_user: None,
            exclude_connection: Some(self.socket.id()),
            ephemeral: true,
        };
        self.hub.publish(request, Source::Client).await.map_err(publish_error)?;
        Ok(event)
    }

    /// The `history` command: a page of the channel's history.
    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<HistoryAnswer, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_subscribe(&self.subject(), channel))?;
        if !self.hub.policies().policy(channel).is_ok_and(|p| p.keeps_history()) {
            return Err(err(
                ErrorCode::NotAvailable,
                &format!("history is not enabled for `{channel}`"),
            ));
        }
        let limit = limit.map_or(DEFAULT_HISTORY_PAGE, |l| l as usize).min(MAX_HISTORY_PAGE);
        let page = self.hub.history(channel, since, limit).await.map_err(broker_error)?;
        Ok(HistoryAnswer::new(channel.clone(), page))
    }

    async fn unsubscribe(&mut self, channel: &ChannelName) -> Result<(), (ErrorCode, String)> {
        if *channel == self.user_channel {
            return Err(err(ErrorCode::Forbidden, "the personal channel cannot be left"));
        }
        if !self.remove_subscription(channel).await {
            return Err(err(ErrorCode::NotSubscribed, &format!("not subscribed to `{channel}`")));
        }
        Ok(())
    }

    /// Registers a subscription and its presence; false if it existed.
    async fn add_subscription(&mut self, channel: &ChannelName) -> bool {
        if !self.subscriptions.insert(channel.clone()) {
            // Re-subscribing (e.g. to recover) keeps the registration.
            return false;
        }
        self.hub.subscribe(channel, self.handle.clone());
        if self.hub.tracks_presence(channel) {
            let user = self.identity.user_id.clone();
            self.hub
                .presence_changed(channel.clone(), user, self.socket.id(), true)
                .await;
        }
        true
    }

    /// Removes a subscription and its presence; false if there was none.
    async fn remove_subscription(&mut self, channel: &ChannelName) -> bool {
        if !self.subscriptions.remove(channel) {
            return false;
        }
        self.socket.forget_position(channel);
        self.recoveries.retain(|recovery| recovery.channel != *channel);
        self.granted_by_server.remove(channel);
        self.hub.unsubscribe(channel, self.socket.id());
        if self.hub.tracks_presence(channel) {
            let user = self.identity.user_id.clone();
            self.hub
                .presence_changed(channel.clone(), user, self.socket.id(), false)
                .await;
        }
        true
    }

    async fn publish(
        &self,
        channel: ChannelName,
        message_type: Option<String>,
        data: Box<RawValue>,
        exclude_user: Option<String>,
    ) -> Result<crate::hub::Receipt, (ErrorCode, String)> {
        self.permit(
            &channel,
            self.hub.policies().check_client_publish(&self.subject(), &channel),
        )?;
        let request = PublishRequest {
            channel,
            message_type,
            message_id: None,
            payload: Payload::Json(data),
            from: Some(self.identity.user_id.clone()),
            exclude_user,
            exclude_connection: None,
            ephemeral: false,
        };
        self.hub.publish(request, Source::Client).await.map_err(publish_error)
    }

    async fn presence(&self, channel: &ChannelName) -> Result<serde_json::Value, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_presence(&self.subject(), channel))?;
        let presence = self.hub.broker.presence(channel).await.map_err(broker_error)?;
        Ok(presence_json(channel, &presence))
    }

    async fn refresh(&mut self, token: &str) -> Result<serde_json::Value, (ErrorCode, String)> {
        let identity = self
            .hub
            .verifier
            .verify(token)
            .map_err(|e: AuthError| err(ErrorCode::InvalidToken, &e.to_string()))?;
        if identity.user_id != self.identity.user_id {
            return Err(err(ErrorCode::InvalidToken, "the new token belongs to another user"));
        }
        let expires_at = identity.expires_at;
        self.identity = identity;
        self.expiry_changed = true;
        // The new token may grant less: drop what it no longer allows
        // (subscriptions the server API made are not the token's to judge).
        let revoked: Vec<ChannelName> = self
            .subscriptions
            .iter()
            .filter(|channel| !self.granted_by_server.contains(*channel))
            .filter(|channel| self.hub.policies().check_subscribe(&self.subject(), channel).is_err())
            .cloned()
            .collect();
        for channel in &revoked {
            self.remove_subscription(channel).await;
        }
        if revoked.is_empty() {
            Ok(json!({"expires_at": expires_at}))
        } else {
            Ok(json!({"expires_at": expires_at, "unsubscribed": revoked}))
        }
    }
}

fn err(code: ErrorCode, message: &str) -> (ErrorCode, String) {
    (code, message.to_owned())
}

fn ack(message_id: &Option<herald_core::frame::MessageId>, data: impl Serialize) -> String {
    ack_frame(message_id.as_ref(), data)
}

fn broker_error(error: crate::broker::BrokerError) -> (ErrorCode, String) {
    (ErrorCode::Unavailable, error.to_string())
}

fn policy_error(error: herald_core::policy::PolicyError) -> (ErrorCode, String) {
    use herald_core::policy::PolicyError;
    let code = match error {
        PolicyError::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
        PolicyError::PresenceDisabled(_) => ErrorCode::NotAvailable,
        PolicyError::SubscribeForbidden(_) | PolicyError::PublishForbidden(_) => ErrorCode::Forbidden,
    };
    (code, error.to_string())
}

fn publish_error(error: PublishError) -> (ErrorCode, String) {
    let code = match error {
        PublishError::TooLarge(_) => ErrorCode::TooLarge,
        PublishError::Broker(_) => ErrorCode::Unavailable,
        PublishError::OutcomeUnknown { .. } => ErrorCode::PublishOutcomeUnknown,
    };
    (code, error.to_string())
}

/// Reads `limit` messages of `channel`'s history after `since`, for a
/// replay. A broker that cannot be reached (after a Redis restart the
/// Pub/Sub connection may be back before the command connection) is waited
/// for and the read retried, within [`GAP_REPAIR_WAIT`]: `None` only when
/// history could not be read in that time.
async fn read_history(hub: &Hub, channel: &ChannelName, since: Position, limit: usize) -> Option<HistoryPage> {
    let deadline = Instant::now() + GAP_REPAIR_WAIT;
    let mut waited = false;
    loop {
        let error = match hub.broker.history(channel, Some(since.clone()), limit).await {
            Ok(page) => return Some(page),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            tracing::debug!(%channel, %error, "replay gave up waiting for history");
            return None;
        }
        if !std::mem::replace(&mut waited, true) {
            hub.metrics
                .gap_repair_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let pause = tokio::time::sleep(GAP_REPAIR_RETRY);
        let _ = tokio::time::timeout_at(deadline, async {
            hub.broker.reachable().await;
            pause.await;
        })
        .await;
    }
}

/// A random moment within the drain window, so that a node's clients do not
/// all reconnect to the other nodes at once.
fn drain_delay(window: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    let millis = window.as_millis().max(1) as u64;
    Duration::from_millis(u64::from_le_bytes(bytes) % millis)
}
