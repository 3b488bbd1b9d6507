//! A guest's connection: naming (the first message, within
//! `limits.auth_timeout`), membership of its room (`Member`: the name's
//! claim, the subscription and presence, all undone in `Drop`), and the
//! loop: the guest's frames in, the room's deliveries out re-framed in the
//! guest dialect, keepalive, the write stall and the drain.
//!
//! The connection is held for good (`ConnectionSocket::hold_for_good`):
//! fan-out queues the room's shared frames for this task instead of
//! writing them, and the task writes each in the guest's shape. That is
//! one small re-encoding per guest and message, the price of the seed's
//! dialect; token users in the room still share one frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::rate_limit::{CommandGate, Verdict};
use herald_core::websocket::{self, Message};
use herald_core::{ChannelName, Payload};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::dialect::{self, Refusal};
use super::rooms::Guests;
use crate::fanout::{ConnectionSocket, Next, Outbound, connection_socket};
use crate::hub::{Admission, Hub, PublishRequest, Source};
use crate::session::Ending;
use crate::transport::ws::{Reader, answer_ping, close, drain_delay};
use crate::util::lock;

/// Deliveries re-framed in one turn before the socket is read again.
const MAX_BATCH: usize = 64;

/// Runs one guest connection from upgrade to close.
pub(super) async fn run(
    stream: TcpStream,
    early: Bytes,
    hub: Hub,
    guests: Arc<Guests>,
    room: usize,
    admission: Admission,
) {
    use std::sync::atomic::Ordering::Relaxed;
    hub.metrics.connections_accepted.fetch_add(1, Relaxed);
    let limits = hub.limits();
    let socket = connection_socket(
        hub.next_connection_id(),
        stream,
        limits.queue_messages,
        limits.queue_bytes,
    );
    socket.hold_for_good();
    let mut guest = Guest {
        hub: &hub,
        guests: &guests,
        socket: &socket,
        room,
        member: None,
        gate: CommandGate::new(limits.commands_per_second, limits.command_burst, Instant::now().into()),
    };
    let mut reader = Reader::new(limits.max_message_size, early);
    let ending = guest.serve(&mut reader).await;
    // The room hears the guest leave before the close goes out.
    drop(guest);
    close(&socket, &hub, ending).await;
    drop(admission);
}

/// A guest connection's state.
struct Guest<'a> {
    hub: &'a Hub,
    guests: &'a Guests,
    socket: &'a ConnectionSocket,
    /// The room's index in `guest.rooms`.
    room: usize,
    /// Set once the guest has named itself and joined.
    member: Option<Member<'a>>,
    gate: CommandGate,
}

/// A named guest in its room. Dropping it leaves: the subscription and
/// presence go (the room is told), and the name is free again.
struct Member<'a> {
    hub: &'a Hub,
    guests: &'a Guests,
    room: usize,
    name: String,
    connection_id: u64,
    /// Subscribed to the room's channel (after the name was claimed).
    subscribed: bool,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let channel = self.guests.channels[self.room].clone();
        if self.subscribed {
            self.hub.unsubscribe(&channel, self.connection_id);
            let (hub, name, id) = (self.hub.clone(), self.name.clone(), self.connection_id);
            self.hub.shutdown.services.spawn(async move {
                hub.presence_changed(channel, name, id, false).await;
            });
        }
        lock(&self.guests.names).remove(&(self.room, self.name.to_ascii_lowercase()));
    }
}

impl<'a> Guest<'a> {
    fn channel(&self) -> &'a ChannelName {
        &self.guests.channels[self.room]
    }

    fn reply(&self, frame: &str) {
        self.socket.send(websocket::text(frame));
    }

    /// The loop: the guest's frames, the room's deliveries, and the timers.
    async fn serve(&mut self, reader: &mut Reader) -> Ending {
        let hub = self.hub;
        let socket = self.socket;
        let keepalive = &hub.config.keepalive;
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        let naming = sleep_until(Instant::now() + hub.limits().auth_timeout);
        tokio::pin!(naming);
        let keepalive_timer = sleep_until(Instant::now() + keepalive.ping_interval);
        tokio::pin!(keepalive_timer);
        let mut awaiting_pong = false;
        let drain = sleep_until(far_future);
        tokio::pin!(drain);
        let mut draining = false;
        let drain_signal = hub.shutdown.draining.clone().cancelled_owned();
        tokio::pin!(drain_signal);
        loop {
            if socket.flush().is_err() {
                return Ending::ClientGone;
            }
            let stalled = socket
                .stalled_since()
                .map(|since| Instant::from_std(since) + hub.limits().write_timeout);
            tokio::select! {
                biased;
                _ = &mut drain_signal, if !draining => {
                    draining = true;
                    drain.as_mut().reset(Instant::now() + drain_delay(hub.config.shutdown.drain_window));
                }
                _ = &mut drain, if draining => return Ending::Shutdown,
                _ = &mut naming, if self.member.is_none() => {
                    hub.metrics.auth_failures.add("timeout", 1);
                    self.reply(&dialect::refusal(Refusal::NotNamed, "no username given in time"));
                    return Ending::AuthTimeout;
                }
                _ = &mut keepalive_timer => {
                    if awaiting_pong {
                        return Ending::PongTimeout;
                    }
                    socket.send(websocket::encode(websocket::OP_PING, &[]));
                    awaiting_pong = true;
                    keepalive_timer.as_mut().reset(Instant::now() + keepalive.pong_timeout);
                }
                _ = sleep_until(stalled.unwrap_or(far_future)), if stalled.is_some() => return Ending::SlowClient,
                ready = socket.stream().writable(), if stalled.is_some() => {
                    if ready.is_err() {
                        return Ending::ClientGone;
                    }
                }
                incoming = reader.recv(socket.stream()) => {
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
                    if let Some(ending) = Box::pin(self.frame(text.as_deref())).await {
                        return ending;
                    }
                    if let Some(ending) = self.take_entries() {
                        return ending;
                    }
                }
                _ = socket.changed() => {
                    if let Some(ending) = self.take_entries() {
                        return ending;
                    }
                }
            }
        }
    }

    /// One frame from the guest (`None`: a binary frame); `Some` ends the
    /// connection. Every frame passes the rate gate first.
    async fn frame(&mut self, text: Option<&str>) -> Option<Ending> {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &self.hub.metrics;
        metrics.commands.fetch_add(1, Relaxed);
        match self.gate.check(Instant::now().into()) {
            Verdict::Serve => {}
            Verdict::Refuse => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(&dialect::refusal(
                    Refusal::RateLimited,
                    "rate limit exceeded, slow down",
                ));
                return None;
            }
            Verdict::Disconnect => return Some(Ending::RateLimited),
        }
        if let Err((refusal, message)) = self.serve_frame(text).await {
            metrics.command_errors.fetch_add(1, Relaxed);
            self.reply(&dialect::refusal(refusal, &message));
        }
        None
    }

    async fn serve_frame(&mut self, text: Option<&str>) -> Result<(), (Refusal, String)> {
        let text = text.ok_or((Refusal::InvalidFrame, "send text frames".to_owned()))?;
        let frame = dialect::parse(text).map_err(|message| (Refusal::InvalidFrame, message))?;
        let names_itself = frame.username.is_some();
        let name = match (&self.member, frame.username) {
            (Some(member), Some(username)) if username != member.name => {
                let message = format!("you are `{}` in this chat; a connection keeps its name", member.name);
                return Err((Refusal::InvalidUsername, message));
            }
            (Some(member), _) => member.name.clone(),
            (None, None) => {
                let message = r#"name yourself first: {"username": "alice", "content": "Hello everyone!"}"#;
                return Err((Refusal::NotNamed, message.to_owned()));
            }
            (None, Some(username)) => {
                self.join(username.clone()).await?;
                username
            }
        };
        match frame.content {
            Some(content) if !content.is_empty() => self.say(&name, &content).await,
            // A name alone joins; an empty message says nothing.
            _ if names_itself => Ok(()),
            _ => Err((Refusal::InvalidFrame, r#"send {"content": "…"}"#.to_owned())),
        }
    }

    /// Claims `name` in the room (on this node, then against the room's
    /// presence, which covers every node), subscribes and announces the
    /// guest; the guest's own notice is sent to it directly (the room's
    /// join event skips the user who joined).
    async fn join(&mut self, name: String) -> Result<(), (Refusal, String)> {
        let (hub, guests, socket) = (self.hub, self.guests, self.socket);
        dialect::check_username(&name, guests.config.max_username_length)
            .map_err(|message| (Refusal::InvalidUsername, message))?;
        let taken = || {
            (
                Refusal::UsernameTaken,
                format!("the username `{name}` is taken in this room"),
            )
        };
        if !lock(&guests.names).insert((self.room, name.to_ascii_lowercase())) {
            return Err(taken());
        }
        let mut member = Member {
            hub,
            guests,
            room: self.room,
            name: name.clone(),
            connection_id: socket.id(),
            subscribed: false,
        };
        let channel = self.channel();
        match hub.presence(channel).await {
            Ok(presence) if presence.users.iter().any(|(user, _)| user.eq_ignore_ascii_case(&name)) => {
                return Err(taken());
            }
            Ok(_) => {}
            Err(error) => return Err((Refusal::Unavailable, format!("cannot join now: {error}"))),
        }
        hub.subscribe(channel, socket.handle(&name));
        member.subscribed = true;
        hub.subscribed(channel).await;
        hub.presence_changed(channel.clone(), name.clone(), socket.id(), true)
            .await;
        tracing::debug!(connection_id = socket.id(), %channel, "guest joined");
        self.member = Some(member);
        self.reply(&dialect::notice(&name, true));
        Ok(())
    }

    /// Publishes a message to the room, through the hub (so every node's
    /// guests and token users get it; the guest gets it back too, as in
    /// the seed).
    async fn say(&self, name: &str, content: &str) -> Result<(), (Refusal, String)> {
        let payload = serde_json::value::RawValue::from_string(dialect::chat(name, content))
            .expect("the dialect writes valid JSON");
        let request = PublishRequest {
            channel: self.channel().clone(),
            message_type: None,
            message_id: None,
            payload: Payload::Json(payload),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        };
        match self.hub.publish(request, Source::Client).await {
            Ok(_) => Ok(()),
            Err(error) => Err((Refusal::Unavailable, format!("not sent: {error}"))),
        }
    }

    /// Re-frames what fan-out queued for this guest, a batch at a time.
    fn take_entries(&self) -> Option<Ending> {
        for _ in 0..MAX_BATCH {
            match self.socket.next() {
                None => return None,
                Some(Next::Entry(Outbound::Delivery(delivery))) => match dialect::render(&delivery.frame) {
                    Some(text) => self.socket.send_message(websocket::text(&text)),
                    None => tracing::warn!(channel = %delivery.channel, "a delivery the guest chat cannot show"),
                },
                // Server-made subscription changes target users' channels,
                // which guests never have.
                Some(Next::Entry(_)) => {}
                Some(Next::FellBehind) => return Some(Ending::SlowClient),
                Some(Next::Failed) => return Some(Ending::ClientGone),
            }
        }
        self.socket.wake();
        None
    }
}
