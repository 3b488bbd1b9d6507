//! The end-to-end probe: proof that this node still hears Redis.
//!
//! Each connection's health check ([`crate::redis::link::Health`]) shows that Redis
//! answers, not that messages published now reach this node: a Pub/Sub
//! connection can answer `PING` and still miss what it should hear. So the
//! node publishes a sequence number on its own probe channel,
//! `{prefix}probe:{node_id}`, through the command link like any publish,
//! and listens for it on its Pub/Sub connection. A probe not heard back
//! within [`TIMEOUT`] makes the node not ready (`/ready` 503) and is counted
//! in `herald_broker_probe_failures_total`; the next probe heard makes it
//! ready again. After its Pub/Sub connection was re-established a node is
//! ready only once a probe has come back through it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::redis::link::RedisLink;
use crate::redis::pubsub::PubSub;

/// A probe is published this often while the node is ready.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// While the node is not ready, probes go this often, so that it is ready
/// again soon after Redis is.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// A probe not heard back within this is a failure. With [`INTERVAL`] it
/// bounds how long a deaf node reports ready: about 3 s.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe task and the Pub/Sub handler share.
pub struct Probe {
    /// The node's probe channel.
    pub key: Bytes,
    /// The highest sequence number heard back.
    heard: AtomicU64,
    /// Whether the node hears its probes: false until the first comes back,
    /// after one was not heard in time, and while a connection is down.
    ok: AtomicBool,
}

impl Probe {
    pub fn new(key: Bytes) -> Self {
        Probe {
            key,
            heard: AtomicU64::new(0),
            ok: AtomicBool::new(false),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    /// A message arrived on the probe channel. Anything but a sequence
    /// number (someone else publishing there) proves nothing and is ignored.
    pub fn heard(&self, payload: &[u8]) {
        let Some(sequence) = std::str::from_utf8(payload).ok().and_then(|text| text.parse().ok()) else {
            return;
        };
        self.heard.fetch_max(sequence, Ordering::Relaxed);
        self.ok.store(true, Ordering::Relaxed);
    }

    /// Publishes probes and judges them until `shutdown`. At most one
    /// publish is in flight, and probes awaiting judgement are fewer than
    /// `TIMEOUT / RETRY_INTERVAL + 2`: older ones are judged and dropped.
    pub async fn run(
        self: Arc<Self>,
        link: RedisLink,
        pubsub: PubSub,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut sequence = 0u64;
        // Probes sent and not yet heard back, oldest first.
        let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut last_sent: Option<Instant> = None;
        let mut publishing: Option<futures_util::future::BoxFuture<'static, ()>> = None;
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = async { publishing.as_mut().expect("polled only while publishing").await }, if publishing.is_some() => {
                    publishing = None;
                    continue;
                }
            }
            let heard = self.heard.load(Ordering::Relaxed);
            while outstanding.front().is_some_and(|(sent, _)| *sent <= heard) {
                outstanding.pop_front();
            }
            while let Some((_, sent_at)) = outstanding.front()
                && sent_at.elapsed() >= TIMEOUT
            {
                outstanding.pop_front();
                metrics.broker_probe_failures.fetch_add(1, Ordering::Relaxed);
                if self.ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(timeout = ?TIMEOUT, "redis probe not heard back in time; reporting not ready");
                }
            }
            if !(link.is_up() && pubsub.is_up()) {
                // Not ready anyway; once both are back, a probe must prove
                // the (new) Pub/Sub connection hears.
                self.ok.store(false, Ordering::Relaxed);
                continue;
            }
            let interval = if self.is_ok() { INTERVAL } else { RETRY_INTERVAL };
            if publishing.is_some() || last_sent.is_some_and(|at| at.elapsed() < interval) {
                continue;
            }
            sequence += 1;
            let now = Instant::now();
            outstanding.push_back((sequence, now));
            last_sent = Some(now);
            let (link, key, payload) = (link.clone(), self.key.clone(), sequence.to_string());
            publishing = Some(Box::pin(async move {
                // A failed publish is judged like a lost one: by its timeout.
                let _ = link.call(&[&b"PUBLISH"[..], &key, payload.as_bytes()]).await;
            }));
        }
    }
}
