//! Streams ingest: entries `XADD`ed to `{prefix}publish` are published into
//! the cluster, at least once.
//!
//! The nodes share the consumer group `herald`; each reads new entries as
//! its own consumer, publishes them, and `XACK`s only after the publish
//! succeeded. An entry whose publish failed for a broker error stays pending
//! and is retried. Entries left pending by a node that died are claimed by
//! the others after `claim_idle` (`XAUTOCLAIM`). Because the group remembers
//! its position, entries added while every node was down are delivered when
//! one starts.
//!
//! An entry that can never be published (no or an invalid `channel`, `data`
//! that is not JSON, a payload over `limits.max_message_size`, …) is copied
//! to the dead-letter stream `{prefix}publish:dead` (capped at
//! `redis.dead_letter_max_len` entries), acknowledged, counted in
//! `herald_stream_entries_invalid_total{reason}` and logged once: retrying it
//! would only hold up the entries behind it.
//!
//! Entry fields: `channel` (required), `data` (JSON text) or `data_base64`,
//! and optionally `type` and `message_id` (default: the entry id, so a
//! re-delivered entry is recognised as a repeat within the idempotency
//! window).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_core::ChannelName;
use herald_core::frame::validate_message_type;
use herald_core::resp::Value;

use super::link::{Backoff, RedisError, RedisLink};
use crate::hub::{Hub, PublishError, PublishRequest, Source};

/// The consumer group all nodes share.
pub const GROUP: &str = "herald";
/// Entries read per request.
const BATCH: usize = 100;
/// How long one blocking read waits for new entries.
const BLOCK_MS: &str = "1000";

#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// Entries pending this long on another consumer are claimed.
    pub claim_idle: Duration,
    /// The dead-letter stream keeps at most this many entries (exact
    /// `MAXLEN`: dead letters are rare, and an exact cap is what operators
    /// configure); older ones are trimmed.
    pub dead_letter_max_len: usize,
}

/// The Redis keys of Streams ingest, built by `RedisConfig::stream_keys`.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The stream publishers `XADD` to.
    pub stream: String,
    /// Where invalid entries are copied before they are acknowledged.
    pub dead: String,
}

/// Why an entry can never be published. A fixed set: the `reason` label of
/// `herald_stream_entries_invalid_total` and the `dead.reason` field of its
/// dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The payload is over `limits.max_message_size`.
    TooLarge,
    /// No `channel` field, or not a valid channel name.
    Channel,
    /// No usable `data` / `data_base64`.
    Data,
    /// A `type` that is not allowed.
    Type,
    /// Not an entry with readable fields at all.
    Malformed,
}

impl Invalid {
    /// Every label, in the order `/metrics` lists them.
    pub const LABELS: [&'static str; 5] = ["too_large", "channel", "data", "type", "malformed"];

    pub fn label(self) -> &'static str {
        match self {
            Invalid::TooLarge => "too_large",
            Invalid::Channel => "channel",
            Invalid::Data => "data",
            Invalid::Type => "type",
            Invalid::Malformed => "malformed",
        }
    }
}

/// The consumer's retry state. Every failed step waits a growing, jittered
/// delay ([`Backoff`]) before it is tried again, and is logged at `warn` only
/// when it is news (the first failure, or a different error): a lasting
/// error reply (`WRONGTYPE`, `NOPERM`, …) costs one request and at most one
/// log line per back-off step, never a spinning core.
struct Retry {
    backoff: Backoff,
    /// The failure being retried (step and error), until a step succeeds.
    failing: Option<String>,
}

impl Retry {
    fn new() -> Self {
        Retry {
            backoff: Backoff::new(),
            failing: None,
        }
    }

    /// Records a failure of `step`; returns how long to wait before retrying.
    fn failed(&mut self, step: &'static str, error: &dyn std::fmt::Display) -> Duration {
        let text = format!("{step}: {error}");
        if self.failing.as_deref() == Some(text.as_str()) {
            tracing::debug!(step, %error, "stream ingest still failing");
        } else {
            tracing::warn!(step, %error, "stream ingest failed; retrying with back-off");
            self.failing = Some(text);
        }
        self.backoff.next_delay()
    }

    /// A read went through: the next failure starts from the shortest delay.
    fn succeeded(&mut self) {
        self.backoff.reset();
        if self.failing.take().is_some() {
            tracing::info!("stream ingest works again");
        }
    }
}

/// Runs the consumer until shutdown. It uses its own link, because a
/// blocking read would stall every command pipelined behind it.
pub async fn run(hub: Hub, link: RedisLink, keys: Keys, config: StreamsConfig) {
    let stream_key = keys.stream.clone();
    let consumer = hub.node_id.clone();
    let draining = hub.shutdown.draining.clone();
    let mut group_ready = false;
    let mut retry = Retry::new();
    // Set by a failed step: how long to wait before the next attempt.
    let mut pause: Option<Duration> = None;
    let mut last_claim = tokio::time::Instant::now();
    // Start by re-reading our own pending entries (id 0), then new ones (>).
    let mut read_from = "0".to_owned();
    loop {
        if draining.is_cancelled() {
            return;
        }
        if let Some(delay) = pause.take() {
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if !link.is_up() {
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        if !group_ready {
            match link
                .call(&["XGROUP", "CREATE", &stream_key, GROUP, "0", "MKSTREAM"])
                .await
            {
                Ok(_) => group_ready = true,
                Err(RedisError::Reply(message)) if message.starts_with("BUSYGROUP") => group_ready = true,
                Err(error) => {
                    pause = Some(retry.failed("create the consumer group", &error));
                    continue;
                }
            }
        }
        if last_claim.elapsed() >= config.claim_idle / 2 {
            last_claim = tokio::time::Instant::now();
            let idle = config.claim_idle.as_millis().to_string();
            let count = BATCH.to_string();
            let claimed = link
                .call(&[
                    "XAUTOCLAIM",
                    &stream_key,
                    GROUP,
                    &consumer,
                    &idle,
                    "0-0",
                    "COUNT",
                    &count,
                ])
                .await;
            if let Ok(Value::Array(Some(parts))) = claimed
                && let Some(entries) = parts.get(1)
            {
                process(&hub, &link, &keys, &config, entries).await;
            }
        }
        let count = BATCH.to_string();
        let command = [
            "XREADGROUP",
            "GROUP",
            GROUP,
            &consumer,
            "COUNT",
            &count,
            "BLOCK",
            BLOCK_MS,
            "STREAMS",
            &stream_key,
            &read_from,
        ];
        let read = tokio::select! {
            _ = draining.cancelled() => return,
            read = link.call(&command) => read,
        };
        match read {
            Ok(Value::Array(Some(streams))) => {
                let entries = streams.first().and_then(|s| s.as_array()).and_then(|s| s.get(1));
                let (processed, failed) = match entries {
                    Some(entries) => process(&hub, &link, &keys, &config, entries).await,
                    None => (0, 0),
                };
                if failed > 0 {
                    // The cluster cannot take messages right now; pause before retrying.
                    read_from = "0".to_owned();
                    pause = Some(retry.failed("publish entries", &"the broker refused them"));
                    continue;
                }
                retry.succeeded();
                // Our pending list is drained once a read of it comes back empty.
                if read_from == "0" && processed == 0 {
                    read_from = ">".to_owned();
                }
            }
            Ok(_) => {
                retry.succeeded();
                if read_from == "0" {
                    read_from = ">".to_owned();
                }
            }
            Err(error) => {
                if matches!(&error, RedisError::Reply(message) if message.starts_with("NOGROUP")) {
                    group_ready = false;
                }
                pause = Some(retry.failed("read entries", &error));
                // After a failure, go back over what may be pending on us.
                read_from = "0".to_owned();
            }
        }
    }
}

/// An entry that can never be published, on its way to the dead-letter stream.
struct DeadLetter<'a> {
    id: &'a str,
    reason: Invalid,
    problem: String,
    /// The entry's fields as they were, so that it can be inspected and re-added.
    fields: &'a [Value],
}

/// Publishes and acknowledges a list of `[id, [field, value, …]]` entries;
/// returns how many entries there were and how many could not be published
/// (broker errors: those stay pending, to be retried). The publishes go out
/// together (the link pipelines them, in order); invalid entries are copied
/// to the dead-letter stream; then one `XACK` covers every entry that was
/// published or dead-lettered.
async fn process(hub: &Hub, link: &RedisLink, keys: &Keys, config: &StreamsConfig, entries: &Value) -> (usize, usize) {
    let Some(entries) = entries.as_array() else {
        return (0, 0);
    };
    let mut acknowledged: Vec<&str> = Vec::with_capacity(entries.len());
    let mut dead: Vec<DeadLetter<'_>> = Vec::new();
    let mut publishes = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some([id, fields]) = entry.as_array().and_then(|e| <&[Value; 2]>::try_from(e).ok()) else {
            continue;
        };
        let Some(id) = id.as_str() else { continue };
        // A deleted entry still pending reads as `[id, nil]`: no fields.
        let fields = fields.as_array().unwrap_or_default();
        match request(id, fields) {
            Ok(request) => publishes.push(async move { (id, fields, hub.publish(request, Source::Stream).await) }),
            Err((reason, problem)) => dead.push(DeadLetter {
                id,
                reason,
                problem,
                fields,
            }),
        }
    }
    let mut failed = 0;
    for (id, fields, outcome) in futures_util::future::join_all(publishes).await {
        match outcome {
            Ok(_) => {
                acknowledged.push(id);
                hub.metrics.stream_entries.fetch_add(1, Ordering::Relaxed);
            }
            Err(PublishError::TooLarge(max)) => dead.push(DeadLetter {
                id,
                reason: Invalid::TooLarge,
                problem: format!("the payload is larger than {max} bytes"),
                fields,
            }),
            // Stays pending: retried after a pause or claimed by another
            // node. Its id is its message_id, so a publish that did reach
            // Redis is suppressed as a repeat.
            Err(PublishError::Broker(error)) => {
                tracing::debug!(entry = id, %error, "stream entry not published yet");
                failed += 1;
            }
        }
    }
    let dead_lettered = dead_letter(link, keys, config, &dead).await;
    for (letter, copied) in dead.iter().zip(&dead_lettered) {
        if *copied {
            acknowledged.push(letter.id);
        } else {
            // Not copied (Redis refused): it stays pending like a broker error.
            failed += 1;
        }
    }
    if !acknowledged.is_empty() {
        let mut command = vec!["XACK", keys.stream.as_str(), GROUP];
        command.extend(acknowledged);
        if link.call(&command).await.is_ok() {
            // Counted and logged once, when it leaves the pending list.
            for letter in dead.iter().zip(&dead_lettered).filter(|(_, c)| **c).map(|(l, _)| l) {
                hub.metrics.stream_entries_invalid.add(letter.reason.label(), 1);
                hub.metrics.messages_dropped.add("invalid", 1);
                tracing::warn!(
                    entry = letter.id,
                    reason = letter.reason.label(),
                    problem = %letter.problem,
                    "invalid stream entry acknowledged and moved to the dead-letter stream"
                );
            }
        }
    }
    (entries.len(), failed)
}

/// Copies invalid entries to the dead-letter stream (pipelined); says for
/// each whether Redis took it.
async fn dead_letter(link: &RedisLink, keys: &Keys, config: &StreamsConfig, dead: &[DeadLetter<'_>]) -> Vec<bool> {
    let max_len = config.dead_letter_max_len.to_string();
    let copies = dead.iter().map(|letter| {
        let mut command: Vec<&[u8]> = vec![
            b"XADD",
            keys.dead.as_bytes(),
            b"MAXLEN",
            max_len.as_bytes(),
            b"*",
            b"dead.entry",
            letter.id.as_bytes(),
            b"dead.reason",
            letter.reason.label().as_bytes(),
            b"dead.error",
            letter.problem.as_bytes(),
        ];
        // Field/value pairs; an odd trailing item cannot come from Redis.
        let pairs = letter.fields.len() / 2 * 2;
        command.extend(letter.fields[..pairs].iter().map(|v| v.as_bytes().unwrap_or_default()));
        async move {
            let copied = link.call(&command).await;
            if let Err(error) = &copied {
                tracing::debug!(entry = letter.id, %error, "cannot dead-letter a stream entry yet");
            }
            copied.is_ok()
        }
    });
    futures_util::future::join_all(copies).await
}

/// The publish an entry asks for, or why it can never be published.
fn request(id: &str, fields: &[Value]) -> Result<PublishRequest, (Invalid, String)> {
    let fields: HashMap<&str, &str> = fields
        .chunks(2)
        .filter_map(|pair| Some((pair.first()?.as_str()?, pair.get(1)?.as_str()?)))
        .collect();
    if fields.is_empty() {
        return Err((Invalid::Malformed, "no readable fields".into()));
    }
    let channel = fields
        .get("channel")
        .ok_or((Invalid::Channel, "no `channel` field".to_owned()))?;
    let channel = ChannelName::parse(channel).map_err(|e| (Invalid::Channel, format!("channel: {e}")))?;
    let payload = super::payload(fields.get("data").copied(), fields.get("data_base64").copied())
        .map_err(|problem| (Invalid::Data, problem))?;
    let message_type = fields.get("type").map(|t| (*t).to_owned());
    if let Some(t) = &message_type {
        validate_message_type(t).map_err(|problem| (Invalid::Type, problem))?;
    }
    Ok(PublishRequest {
        channel,
        message_type,
        message_id: Some(fields.get("message_id").copied().unwrap_or(id).to_owned()),
        payload,
        from: None,
        exclude_user: None,
        exclude_connection: None,
        ephemeral: false,
    })
}
