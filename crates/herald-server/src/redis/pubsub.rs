//! The Pub/Sub connection: subscribes to exactly the channels (and route
//! patterns) this node needs, and hands every message to a callback.
//!
//! The task keeps the *desired* set and reconciles it with what Redis has
//! *confirmed*: changes that pile up are sent as one SUBSCRIBE and one
//! UNSUBSCRIBE, and after a reconnect everything desired is subscribed again
//! (client libraries have lost subscriptions exactly there). Callers may
//! wait until a channel is confirmed, so that "subscribed" means messages
//! published from then on arrive.
//!
//! Callers hand changes over in `Pending`, not a queue: one entry per
//! channel, the latest change winning, so that what waits for the task
//! (busy writing to a slow Redis, or reconnecting) is bounded by the
//! channels changed meanwhile, never by how often they changed.
//!
//! The connection is health-checked like the command link (see
//! [`super::link::Health`]): a `PING` when idle, not-ready while a reply is
//! overdue, replaced when it stays silent. That catches a hung Redis; a
//! connection that answers `PING` but has lost its subscriptions is caught
//! by the broker's end-to-end probe (`broker::redis::probe`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use herald_core::resp::{self, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::link::{
    Backoff, DEAD_AFTER, HEALTH_TICK, Health, HealthCheck, RedisAddress, RedisError, UNRESPONSIVE_AFTER, connect,
    take_value,
};
use crate::metrics::Metrics;
use crate::util::lock;

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1_000;

/// A message from Redis: the Redis channel and the payload.
pub type Handler = Arc<dyn Fn(&[u8], Bytes) + Send + Sync>;

#[derive(Clone)]
pub struct PubSub {
    shared: Arc<Shared>,
}

/// What the handles and the task share.
struct Shared {
    up: AtomicBool,
    pending: Mutex<Pending>,
    /// Wakes the task when `pending` gained something.
    wake: Notify,
}

/// What callers ask of the task, until it takes it.
#[derive(Default)]
struct Pending {
    /// Per channel, whether it is wanted (true) or not, as last asked. One
    /// entry per channel however often it changed: bounded by the distinct
    /// channels changed since the task last looked, which it does between
    /// any two writes to Redis (a write waits at most `DEAD_AFTER`).
    changes: HashMap<Bytes, bool>,
    /// Callers waiting for a channel's confirmation. Waits their callers
    /// gave up on are dropped whenever one is added, so at most the
    /// subscribes in progress wait here.
    waits: Vec<(Bytes, oneshot::Sender<()>)>,
    /// Set when the task stopped: nothing will be confirmed any more.
    stopped: bool,
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
        let shared = Arc::new(Shared {
            up: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        });
        let task = Task {
            address,
            patterns,
            handler,
            metrics,
            shared: shared.clone(),
            desired: HashSet::new(),
            confirmed: HashSet::new(),
            sent: HashSet::new(),
            dirty: HashSet::new(),
            waiters: HashMap::new(),
        };
        tracker.spawn(task.run(shutdown));
        PubSub { shared }
    }

    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self, channel: Bytes) {
        self.change(channel, true);
    }

    pub fn unsubscribe(&self, channel: Bytes) {
        self.change(channel, false);
    }

    fn change(&self, channel: Bytes, wanted: bool) {
        lock(&self.shared.pending).changes.insert(channel, wanted);
        self.shared.wake.notify_one();
    }

    /// Resolves once Redis confirmed the subscription to `channel` (or the
    /// task stopped). Callers bound the wait themselves.
    pub async fn confirmed(&self, channel: Bytes) {
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = lock(&self.shared.pending);
            if pending.stopped {
                return;
            }
            pending.waits.retain(|(_, waiting)| !waiting.is_closed());
            pending.waits.push((channel, sender));
        }
        self.shared.wake.notify_one();
        let _ = receiver.await;
    }

    /// How many channel changes and confirmation waits wait for the task.
    #[cfg(test)]
    fn pending(&self) -> (usize, usize) {
        let pending = lock(&self.shared.pending);
        (pending.changes.len(), pending.waits.len())
    }
}

struct Task {
    address: RedisAddress,
    patterns: Vec<Bytes>,
    handler: Handler,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// What this node needs.
    desired: HashSet<Bytes>,
    /// What Redis has acknowledged on the current connection.
    confirmed: HashSet<Bytes>,
    /// What has been asked of Redis on the current connection.
    sent: HashSet<Bytes>,
    /// Channels whose desired state changed since the last reconcile.
    dirty: HashSet<Bytes>,
    /// Callers waiting for a desired channel's confirmation (see
    /// [`Pending::waits`] for the bound).
    waiters: HashMap<Bytes, Vec<oneshot::Sender<()>>>,
}

impl Drop for Task {
    fn drop(&mut self) {
        // Whoever waits for a confirmation is answered (the senders drop).
        let mut pending = lock(&self.shared.pending);
        pending.stopped = true;
        pending.waits.clear();
    }
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
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
                        _ = self.shared.wake.notified() => self.take_pending(),
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
            let error = self.serve(&mut stream, &shutdown).await;
            self.shared.up.store(false, Ordering::Relaxed);
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

    /// Takes what callers handed over: changes first, then waits (a wait
    /// follows the subscribe it waits for).
    fn take_pending(&mut self) {
        let (changes, waits) = {
            let mut pending = lock(&self.shared.pending);
            (std::mem::take(&mut pending.changes), std::mem::take(&mut pending.waits))
        };
        for (channel, wanted) in changes {
            if wanted {
                self.desired.insert(channel.clone());
            } else {
                self.desired.remove(&channel);
            }
            self.dirty.insert(channel);
        }
        for (channel, sender) in waits {
            if self.confirmed.contains(&channel) || !self.desired.contains(&channel) {
                let _ = sender.send(());
            } else {
                let waiters = self.waiters.entry(channel).or_default();
                waiters.retain(|waiting| !waiting.is_closed());
                waiters.push(sender);
            }
        }
    }

    async fn serve(&mut self, stream: &mut tokio::net::TcpStream, shutdown: &CancellationToken) -> Option<RedisError> {
        let (mut reader, mut writer) = stream.split();
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        let mut out = BytesMut::new();
        if !self.patterns.is_empty() {
            let mut command: Vec<&[u8]> = vec![b"PSUBSCRIBE"];
            command.extend(self.patterns.iter().map(|p| &p[..]));
            resp::encode_command(&command, &mut out);
        }
        self.reconcile(&mut out);
        // Redis answers in order: the reply to this PING, behind every
        // (re)subscription, marks the link usable.
        resp::encode_command(&["PING"], &mut out);
        // Whether `out` holds a PING, whose reply the health check awaits.
        let mut pinged = true;
        let mut health = Health::new(Instant::now());
        let mut tick = tokio::time::interval(HEALTH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !out.is_empty() {
                if std::mem::take(&mut pinged) {
                    health.expect_reply(Instant::now());
                }
                // A Redis that stopped reading must not hold the task forever.
                match tokio::time::timeout(DEAD_AFTER, writer.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Some(RedisError::Unavailable(error.to_string())),
                    Err(_) => return Some(RedisError::Unavailable("redis stopped reading".into())),
                }
            }
            out.clear();
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.shared.wake.notified() => {
                    self.take_pending();
                    self.reconcile(&mut out);
                }
                read = reader.read_buf(&mut buffer) => {
                    match read {
                        Ok(0) => return Some(RedisError::Unavailable("connection closed by redis".into())),
                        Err(error) => return Some(RedisError::Unavailable(error.to_string())),
                        Ok(_) => {}
                    }
                    health.activity(Instant::now());
                    loop {
                        match take_value(&mut buffer) {
                            Ok(Some(value)) => {
                                if self.on_value(value) && health.replied(Instant::now(), false) {
                                    tracing::info!("redis pub/sub answers again");
                                }
                            }
                            Ok(None) => break,
                            Err(error) => return Some(error),
                        }
                    }
                }
                _ = tick.tick() => match health.check(Instant::now()) {
                    HealthCheck::Fine => {}
                    HealthCheck::Ping => {
                        resp::encode_command(&["PING"], &mut out);
                        pinged = true;
                    }
                    HealthCheck::BecameUnresponsive => {
                        self.shared.up.store(false, Ordering::Relaxed);
                        self.metrics.broker_unresponsive.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(waited = ?UNRESPONSIVE_AFTER, "redis pub/sub does not answer; reporting not ready");
                    }
                    HealthCheck::Dead => {
                        return Some(RedisError::Unavailable(format!(
                            "redis answered nothing for {}s",
                            DEAD_AFTER.as_secs()
                        )));
                    }
                },
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

    /// Handles one value from Redis; true when it answered a `PING` (which
    /// marks the link up).
    fn on_value(&mut self, value: Value) -> bool {
        // PING answers `+PONG` outside subscribe mode and `["pong", ""]` in it.
        if let Value::Simple(text) = &value
            && text.eq_ignore_ascii_case("pong")
        {
            self.shared.up.store(true, Ordering::Relaxed);
            return true;
        }
        let Some(items) = value.as_array() else { return false };
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
            b"pong" | b"PONG" => {
                self.shared.up.store(true, Ordering::Relaxed);
                return true;
            }
            _ => {}
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// While the task cannot take them (here: connecting to a peer that
    /// never answers), changes and abandoned waits do not pile up: one entry
    /// per channel, the latest winning, and only waits someone still awaits.
    #[tokio::test]
    async fn what_waits_for_the_task_is_bounded_by_channels_not_changes() {
        // Accepts connections (the kernel does) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = RedisAddress::parse(&format!("redis://{}", silent.local_addr().unwrap())).unwrap();
        let (shutdown, tracker) = (CancellationToken::new(), tokio_util::task::TaskTracker::new());
        let handler: Handler = Arc::new(|_: &[u8], _: Bytes| {});
        let pubsub = PubSub::start(
            address,
            Vec::new(),
            handler,
            Arc::new(Metrics::default()),
            shutdown.clone(),
            &tracker,
        );
        let (hot, other) = (Bytes::from_static(b"hot"), Bytes::from_static(b"other"));
        for _ in 0..100_000 {
            pubsub.subscribe(hot.clone());
            pubsub.unsubscribe(hot.clone());
        }
        pubsub.subscribe(other.clone());
        for _ in 0..10_000 {
            // Polled once (registered), then given up on.
            assert!(pubsub.confirmed(hot.clone()).now_or_never().is_none());
        }
        let (changes, waits) = pubsub.pending();
        assert!(changes <= 2, "{changes} pending changes for 2 channels");
        assert!(waits <= 1, "{waits} waits kept, none awaited");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(
            pubsub.confirmed(other).now_or_never(),
            Some(()),
            "a stopped task confirms nothing: nobody waits forever"
        );
    }
}
