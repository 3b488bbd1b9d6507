//! A connection's life: the socket reader (`Reader`), the authentication
//! phase, the connection loop and its timers, and the lingering close.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_core::frame::{self, Command, ErrorCode, error_frame, server_frame};
use herald_core::rate_limit::{CommandGate, Verdict};
use herald_core::websocket::{self, DecodeError, Decoder, Message};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use crate::auth::Identity;
use crate::fanout::{ConnectionSocket, connection_socket};
use crate::hub::{Admission, Hub};
use crate::session::{Ending, Session, rate_limited_frame};

/// Bytes read from the socket at a time: commands are small.
const READ_CHUNK: usize = 4096;
/// How long a close frame may take to send before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the close frame, how long the client's input is read (and
/// discarded) while the client reads the close frame and closes its side.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// The most input discarded while lingering: a client that keeps sending
/// past it is not reading either, and the socket is closed.
const LINGER_MAX_BYTES: usize = 1 << 20;

/// The reading half of a connection: bytes from the socket, decoded into
/// messages. Buffers only while a message is incomplete.
pub(crate) struct Reader {
    decoder: Decoder,
    buffer: BytesMut,
}

impl Reader {
    pub(crate) fn new(max_message: usize, early: Bytes) -> Self {
        Reader {
            decoder: Decoder::new(max_message),
            buffer: BytesMut::from(&early[..]),
        }
    }

    /// The next message. Cancel-safe: what was read stays buffered.
    pub(crate) async fn recv(&mut self, stream: &TcpStream) -> Result<Message, Ending> {
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
pub(super) async fn run(stream: TcpStream, early: Bytes, hub: Hub, admission: Admission, query_token: Option<String>) {
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
        Ok(identity) => start(&socket, &mut reader, &hub, identity, gate).await,
        Err(ending) => ending,
    };
    close(&socket, &hub, ending).await;
    drop(admission);
}

/// Ends a connection the way `ending` says: counted, the close frame (if
/// any) sent last, then the lingering close.
pub(crate) async fn close(socket: &ConnectionSocket, hub: &Hub, ending: Ending) {
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
        let flushed = flush_discarding_input(socket, &mut input).await;
        // Whatever did not go out is lost with the connection: counted,
        // however the connection ended.
        hub.metrics.messages_dropped.add(ending.drop_label(), socket.finish());
        if flushed {
            linger(socket, &mut input).await;
        }
    } else {
        hub.metrics.messages_dropped.add(ending.drop_label(), socket.finish());
    }
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
pub(crate) fn answer_ping(socket: &ConnectionSocket, gate: &mut CommandGate, payload: &[u8]) -> Result<(), Ending> {
    match gate.check(Instant::now().into()) {
        Verdict::Serve => socket.send(websocket::encode(websocket::OP_PONG, payload)),
        Verdict::Refuse => {}
        Verdict::Disconnect => return Err(Ending::RateLimited),
    }
    Ok(())
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

/// Opens the session of an authenticated connection and serves it until
/// the connection ends.
async fn start(
    socket: &ConnectionSocket,
    reader: &mut Reader,
    hub: &Hub,
    identity: Identity,
    gate: CommandGate,
) -> Ending {
    // The session is served where `open` left it (`ref mut`): moving it out
    // would keep a second copy of it in this future, the memory of every
    // connection.
    match Session::open(socket, hub, identity, gate).await {
        Ok(ref mut session) => serve(session, reader).await,
        Err((ending, refusal)) => {
            let _ = send_now(socket, hub, refusal).await;
            ending
        }
    }
}

/// The connection loop: the socket's commands, fan-out's entries, replays,
/// and the timers (keepalive, token expiry, write stall, drain).
async fn serve(session: &mut Session<'_>, reader: &mut Reader) -> Ending {
    let hub = session.hub;
    let socket = session.socket;
    let keepalive = &hub.config.keepalive;
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    // One timer for both halves of keepalive: when the next ping is due,
    // or, while a ping is unanswered, when the peer counts as dead.
    let keepalive_timer = tokio::time::sleep_until(Instant::now() + keepalive.ping_interval);
    tokio::pin!(keepalive_timer);
    let mut awaiting_pong = false;
    // What had been sent when the peer last sent anything.
    let mut messages_at_sign_of_life = socket.messages_out();
    let expiry = tokio::time::sleep_until(session.expiry_instant());
    tokio::pin!(expiry);
    let drain = tokio::time::sleep_until(far_future);
    tokio::pin!(drain);
    let mut draining = false;
    // Created once: a fresh `cancelled()` per loop turn would register
    // with the token (a lock) on every message.
    let drain_signal = hub.shutdown.draining.clone().cancelled_owned();
    tokio::pin!(drain_signal);
    // Whatever queued behind `auth_success` goes now.
    if let Some(ending) = session.take_entries().await {
        return ending;
    }

    loop {
        if socket.flush().is_err() {
            return Ending::ClientGone;
        }
        if session.replaying() {
            if let Err(ending) = session.replay().await {
                return ending;
            }
            if socket.flush().is_err() {
                return Ending::ClientGone;
            }
            // The socket took all of it: more at once, after a look at
            // the socket (otherwise its draining brings the task back).
            if session.replaying() && socket.stalled_since().is_none() {
                socket.wake();
            }
        }
        let stalled = socket
            .stalled_since()
            .map(|since| Instant::from_std(since) + hub.limits().write_timeout);
        if session.expiry_changed {
            session.expiry_changed = false;
            expiry.as_mut().reset(session.expiry_instant());
        }
        tokio::select! {
            biased;
            _ = &mut drain_signal, if !draining => {
                draining = true;
                drain.as_mut().reset(Instant::now() + drain_delay(hub.config.shutdown.drain_window));
            }
            _ = &mut drain, if draining => {
                let data = json!({"reason": "shutdown", "reconnect": true});
                session.reply(server_frame("disconnect", None, data));
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
                        if let Err(ending) = answer_ping(socket, &mut session.gate, &payload) {
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
                if let Some(ending) = Box::pin(session.command(text.as_deref())).await {
                    return ending;
                }
                if let Some(ending) = session.take_entries().await {
                    return ending;
                }
            }
            _ = socket.changed() => {
                if let Some(ending) = session.take_entries().await {
                    return ending;
                }
            }
        }
    }
}

/// A random moment within the drain window, so that a node's clients do not
/// all reconnect to the other nodes at once.
pub(crate) fn drain_delay(window: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    let millis = window.as_millis().max(1) as u64;
    Duration::from_millis(u64::from_le_bytes(bytes) % millis)
}
