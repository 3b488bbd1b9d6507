//! The Pub/Sub connection: subscribes to exactly the channels (and route
//! patterns) this node needs, and hands every message to a callback.
//!
//! The task keeps the *desired* set and reconciles it with what Redis has
//! *confirmed*: changes that pile up are sent as one SUBSCRIBE and one
//! UNSUBSCRIBE, and after a reconnect everything desired is subscribed again
//! (client libraries have lost subscriptions exactly there). Callers may
//! wait until a channel is confirmed, so that "subscribed" means messages
//! published from then on arrive.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_core::resp::{self, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::link::{Backoff, RedisAddress, RedisError, connect, take_value};
use crate::metrics::Metrics;

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1_000;

/// A message from Redis: the Redis channel and the payload.
pub type Handler = Arc<dyn Fn(&[u8], Bytes) + Send + Sync>;

enum Change {
    Subscribe(Bytes),
    Unsubscribe(Bytes),
    /// Resolves the sender once the channel is confirmed.
    Wait(Bytes, oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct PubSub {
    changes: mpsc::UnboundedSender<Change>,
    up: Arc<AtomicBool>,
}

impl PubSub {
    /// Starts the subscriber task. `patterns` are PSUBSCRIBEd for the node's
    /// lifetime (inbound routes).
    pub fn start(
        address: RedisAddress,
        patterns: Vec<Bytes>,
        handler: Handler,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (changes, receiver) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(false));
        let task = Task {
            address,
            patterns,
            handler,
            metrics,
            up: up.clone(),
            desired: HashSet::new(),
            confirmed: HashSet::new(),
            sent: HashSet::new(),
            dirty: HashSet::new(),
            waiters: HashMap::new(),
        };
        tracker.spawn(task.run(receiver, shutdown));
        PubSub { changes, up }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self, channel: Bytes) {
        let _ = self.changes.send(Change::Subscribe(channel));
    }

    pub fn unsubscribe(&self, channel: Bytes) {
        let _ = self.changes.send(Change::Unsubscribe(channel));
    }

    /// Resolves once Redis confirmed the subscription to `channel` (or the
    /// task stopped). Callers bound the wait themselves.
    pub async fn confirmed(&self, channel: Bytes) {
        let (sender, receiver) = oneshot::channel();
        if self.changes.send(Change::Wait(channel, sender)).is_ok() {
            let _ = receiver.await;
        }
    }
}

struct Task {
    address: RedisAddress,
    patterns: Vec<Bytes>,
    handler: Handler,
    metrics: Arc<Metrics>,
    up: Arc<AtomicBool>,
    /// What this node needs.
    desired: HashSet<Bytes>,
    /// What Redis has acknowledged on the current connection.
    confirmed: HashSet<Bytes>,
    /// What has been asked of Redis on the current connection.
    sent: HashSet<Bytes>,
    /// Channels whose desired state changed since the last reconcile.
    dirty: HashSet<Bytes>,
    waiters: HashMap<Bytes, Vec<oneshot::Sender<()>>>,
}

impl Task {
    async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut connected_before = false;
        // Set after a failed connect or a connection Redis closed at once.
        let mut delay: Option<Duration> = None;
        // Connections in a row that Redis closed at once (see `link::STABLE`).
        let mut quick_drops = 0u32;
        loop {
            if let Some(delay) = delay.take() {
                let delay = tokio::time::sleep(delay);
                tokio::pin!(delay);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = &mut delay => break,
                        change = changes.recv() => match change {
                            Some(change) => self.apply(change),
                            None => return,
                        },
                    }
                }
            }
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = connect(&self.address) => connected,
            };
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(_) => {
                    delay = Some(backoff.next_delay());
                    continue;
                }
            };
            if connected_before {
                self.metrics.broker_reconnects.fetch_add(1, Ordering::Relaxed);
                if quick_drops == 0 {
                    tracing::info!(
                        channels = self.desired.len(),
                        "redis pub/sub reconnected; resubscribing"
                    );
                }
            }
            connected_before = true;
            let connected_at = tokio::time::Instant::now();
            self.sent.clear();
            self.confirmed.clear();
            // A new connection has nothing: everything desired must be sent.
            self.dirty.extend(self.desired.iter().cloned());
            let error = self.serve(&mut stream, &mut changes, &shutdown).await;
            self.up.store(false, Ordering::Relaxed);
            let Some(error) = error else { return };
            if connected_at.elapsed() >= super::link::STABLE {
                tracing::warn!(%error, "redis pub/sub connection lost; reconnecting");
                quick_drops = 0;
                backoff.reset();
                continue;
            }
            // Redis accepted and closed at once (`maxclients` reached, a
            // proxy without a backend): back off like a failed connect.
            if quick_drops == 0 {
                tracing::warn!(%error, "redis closes the pub/sub connection at once; retrying with back-off");
            }
            quick_drops = quick_drops.saturating_add(1);
            delay = Some(backoff.next_delay());
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Subscribe(channel) => {
                self.desired.insert(channel.clone());
                self.dirty.insert(channel);
            }
            Change::Unsubscribe(channel) => {
                self.desired.remove(&channel);
                self.dirty.insert(channel);
            }
            Change::Wait(channel, sender) => {
                if self.confirmed.contains(&channel) || !self.desired.contains(&channel) {
                    let _ = sender.send(());
                } else {
                    self.waiters.entry(channel).or_default().push(sender);
                }
            }
        }
    }

    async fn serve(
        &mut self,
        stream: &mut tokio::net::TcpStream,
        changes: &mut mpsc::UnboundedReceiver<Change>,
        shutdown: &CancellationToken,
    ) -> Option<RedisError> {
        let (mut reader, mut writer) = stream.split();
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        let mut out = BytesMut::new();
        if !self.patterns.is_empty() {
            let mut command: Vec<&[u8]> = vec![b"PSUBSCRIBE"];
            command.extend(self.patterns.iter().map(|p| &p[..]));
            resp::encode_command(&command, &mut out);
        }
        // Confirmation of the patterns (or a PING) marks the link usable.
        resp::encode_command(&["PING"], &mut out);
        self.reconcile(&mut out);
        if let Err(error) = writer.write_all(&out).await {
            return Some(RedisError::Unavailable(error.to_string()));
        }
        loop {
            out.clear();
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                change = changes.recv() => {
                    // A closed change channel means the node is stopping.
                    let change = change?;
                    self.apply(change);
                    while let Ok(change) = changes.try_recv() {
                        self.apply(change);
                    }
                    self.reconcile(&mut out);
                }
                read = reader.read_buf(&mut buffer) => {
                    match read {
                        Ok(0) => return Some(RedisError::Unavailable("connection closed by redis".into())),
                        Err(error) => return Some(RedisError::Unavailable(error.to_string())),
                        Ok(_) => {}
                    }
                    loop {
                        match take_value(&mut buffer) {
                            Ok(Some(value)) => self.on_value(value),
                            Ok(None) => break,
                            Err(error) => return Some(error),
                        }
                    }
                }
            }
            if !out.is_empty()
                && let Err(error) = writer.write_all(&out).await
            {
                return Some(RedisError::Unavailable(error.to_string()));
            }
        }
    }

    /// Encodes the commands that move Redis from `sent` to `desired`.
    fn reconcile(&mut self, out: &mut BytesMut) {
        // Only channels changed since the last call can differ: the work is
        // proportional to the changes, not to every channel the node holds.
        let (mut to_subscribe, mut to_unsubscribe) = (Vec::new(), Vec::new());
        for channel in self.dirty.drain() {
            let desired = self.desired.contains(&channel);
            if !desired {
                // Whoever waits for a channel no longer wanted need not wait.
                for sender in self.waiters.remove(&channel).into_iter().flatten() {
                    let _ = sender.send(());
                }
            }
            match (desired, self.sent.contains(&channel)) {
                (true, false) => to_subscribe.push(channel),
                (false, true) => to_unsubscribe.push(channel),
                _ => {}
            }
        }
        for (verb, channels) in [
            (&b"SUBSCRIBE"[..], &to_subscribe),
            (&b"UNSUBSCRIBE"[..], &to_unsubscribe),
        ] {
            for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
                let mut command: Vec<&[u8]> = vec![verb];
                command.extend(chunk.iter().map(|c| &c[..]));
                resp::encode_command(&command, out);
            }
        }
        for channel in to_subscribe {
            self.sent.insert(channel);
        }
        for channel in &to_unsubscribe {
            self.sent.remove(channel);
            self.confirmed.remove(channel);
        }
    }

    fn on_value(&mut self, value: Value) {
        // PING answers `+PONG` outside subscribe mode and `["pong", ""]` in it.
        if let Value::Simple(text) = &value
            && text.eq_ignore_ascii_case("pong")
        {
            self.up.store(true, Ordering::Relaxed);
            return;
        }
        let Some(items) = value.as_array() else { return };
        let kind = items.first().and_then(Value::as_bytes).unwrap_or_default();
        match kind {
            b"message" if items.len() == 3 => {
                if let (Some(channel), Value::Bulk(Some(payload))) = (items[1].as_bytes(), &items[2]) {
                    (self.handler)(channel, payload.clone());
                }
            }
            b"pmessage" if items.len() == 4 => {
                if let (Some(channel), Value::Bulk(Some(payload))) = (items[2].as_bytes(), &items[3]) {
                    (self.handler)(channel, payload.clone());
                }
            }
            b"subscribe" => {
                if let Some(channel) = items.get(1).and_then(Value::as_bytes) {
                    let channel = Bytes::copy_from_slice(channel);
                    if let Some(waiters) = self.waiters.remove(&channel) {
                        for waiter in waiters {
                            let _ = waiter.send(());
                        }
                    }
                    self.confirmed.insert(channel);
                }
            }
            b"pong" | b"PONG" => self.up.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}
