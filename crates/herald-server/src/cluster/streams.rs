//! Streams ingest: entries `XADD`ed to `{prefix}publish` are published into
//! the cluster, at least once, and in `XADD` order per channel.
//!
//! One node at a time reads the stream: the holder of the lease
//! `{prefix}publish:reader` (a key with this node's id, `PX claim_idle`,
//! renewed every third of it). Reading with a single consumer is what keeps
//! a channel's entries in order: two readers would publish neighbouring
//! entries concurrently. The others poll for the lease (at most a second
//! apart) and take over when it is released (a draining node releases it)
//! or has expired (a node that died): the new reader first claims, in id
//! order, every entry still pending in the consumer group `herald` (on any
//! consumer: `XAUTOCLAIM` with no idle time), then reads new ones. A node
//! stops reading as soon as its own clock says its lease may have expired,
//! before Redis lets another node take it.
//!
//! The reader publishes a batch with one chain per channel: a channel's
//! entries one after the other, different channels concurrently. It
//! `XACK`s an entry only after its publish succeeded. A broker error stops
//! that channel's chain (the rest of it stays pending, unpublished) and the
//! reader goes back over everything pending, in id order, after a back-off:
//! an entry is retried before anything behind it on its channel. Because
//! the group remembers its position, entries added while every node was
//! down are delivered when one starts. An entry's id is its default
//! `message_id`, so an entry published twice (a hand-over while the old
//! reader was mid-batch, a publish whose reply was lost) is suppressed as a
//! repeat within the idempotency window.
//!
//! An entry that can never be published (no or an invalid `channel`, `data`
//! that is not JSON, a payload over `limits.max_message_size`, …) is copied
//! to the dead-letter stream `{prefix}publish:dead` (capped at
//! `redis.dead_letter_max_len` entries), acknowledged, counted in
//! `herald_stream_entries_invalid_total{reason}` and logged once: retrying it
//! would only hold up the entries behind it.
//!
//! Entry fields: `channel` (required), `data` (JSON text) or `data_base64`,
//! and optionally `type` and `message_id` (default: the entry id).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use herald_core::ChannelName;
use herald_core::frame::validate_message_type;
use herald_core::resp::Value;

use crate::broker::redis::keys::StreamKeys;
use crate::broker::redis::wire;
use crate::config::StreamsConfig;
use crate::hub::{Hub, PublishError, PublishRequest, Source};
use crate::redis::link::{Backoff, RedisError, RedisLink, Script};

/// The consumer group all nodes share.
pub const GROUP: &str = "herald";
/// Entries read per request.
const BATCH: usize = 100;
/// The longest a blocking read waits for new entries (shorter when the
/// lease must be renewed sooner).
const BLOCK: Duration = Duration::from_secs(1);
/// The longest a node waits between attempts to take the lease.
const FOLLOW: Duration = Duration::from_secs(1);
/// How long a draining node tries to give the lease up (within the
/// shutdown's grace for services).
const RELEASE_TIMEOUT: Duration = Duration::from_millis(500);

/// Takes the lease if nobody holds it, or extends it if this node does.
/// KEYS: lease. ARGV: node id, lease time (ms). Returns 2 when taken, 1 when
/// extended, 0 when another node holds it.
const LEASE_SCRIPT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"#;

/// Gives the lease up if this node holds it. KEYS: lease. ARGV: node id.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

static LEASE_LUA: Script = Script::new(LEASE_SCRIPT);
static RELEASE_LUA: Script = Script::new(RELEASE_SCRIPT);

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

/// Runs the consumer until the node drains, then gives the lease up so
/// that another node takes over at once. It uses its own link, because a
/// blocking read would stall every command pipelined behind it; the caller
/// stops that link when this returns (not before: the release needs it).
pub async fn run(hub: Hub, link: RedisLink, keys: StreamKeys, config: StreamsConfig) {
    let mut consumer = Consumer {
        hub: &hub,
        link: &link,
        keys: &keys,
        config: &config,
        lease_until: None,
        renewed_at: Instant::now(),
        catch_up: None,
        group_ready: false,
        retry: Retry::new(),
    };
    consumer.consume().await;
    hub.metrics.stream_reader.store(0, Ordering::Relaxed);
    if consumer.lease_until.is_some() {
        let args = [keys.lease.as_str(), hub.node_id.as_str()];
        let released = tokio::time::timeout(RELEASE_TIMEOUT, link.eval(&RELEASE_LUA, 1, &args)).await;
        if let Err(error) = released.unwrap_or_else(|_| Err(RedisError::Unavailable("timed out".into()))) {
            tracing::debug!(%error, "cannot release the stream lease; it expires by itself");
        }
    }
}

/// The consumer's state.
struct Consumer<'a> {
    hub: &'a Hub,
    link: &'a RedisLink,
    keys: &'a StreamKeys,
    config: &'a StreamsConfig,
    /// While this node holds the lease: when it may expire, by this node's
    /// clock (the lease time counted from before the request that took or
    /// renewed it, so never later than Redis's own expiry).
    lease_until: Option<Instant>,
    renewed_at: Instant,
    /// `Some(cursor)` while pending entries must be claimed and published
    /// (from `cursor` on, in id order) before new ones are read: after
    /// taking the lease, and after any failure.
    catch_up: Option<String>,
    group_ready: bool,
    retry: Retry,
}

impl Consumer<'_> {
    async fn consume(&mut self) {
        let draining = self.hub.shutdown.draining.clone();
        let mut pause: Option<Duration> = None;
        loop {
            if let Some(delay) = pause.take() {
                tokio::select! {
                    _ = draining.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            if draining.is_cancelled() {
                return;
            }
            if !self.link.is_up() {
                // The link reconnects by itself (with back-off); nothing to send meanwhile.
                self.lost_lease();
                pause = Some(Duration::from_millis(100));
                continue;
            }
            pause = self.step().await;
        }
    }

    /// One step: keep (or wait for) the lease, then publish one batch of
    /// entries. Returns how long to wait before the next step, if at all.
    async fn step(&mut self) -> Option<Duration> {
        let lease_time = self.config.claim_idle;
        let now = Instant::now();
        if self.lease_until.is_some_and(|until| now >= until) {
            self.lost_lease();
        }
        if self.lease_until.is_none() || now >= self.renewed_at + lease_time / 3 {
            let lease_ms = lease_time.as_millis().max(1).to_string();
            let args = [self.keys.lease.as_str(), self.hub.node_id.as_str(), &lease_ms];
            let taken = self.link.eval(&LEASE_LUA, 1, &args).await;
            match taken.map(|reply| reply.as_integer()) {
                Ok(Some(granted @ (1 | 2))) => {
                    if granted == 2 || self.lease_until.is_none() {
                        tracing::info!("this node now reads the publish stream");
                        self.hub.metrics.stream_reader.store(1, Ordering::Relaxed);
                        // Whatever the last reader left pending goes first.
                        self.catch_up = Some("0-0".to_owned());
                    }
                    self.lease_until = Some(now + lease_time);
                    self.renewed_at = now;
                }
                Ok(_) => {
                    // Another node reads; this one waits to take over.
                    self.lost_lease();
                    self.retry.succeeded();
                    return Some(FOLLOW.min(lease_time / 3));
                }
                Err(error) => return Some(self.retry.failed("take the stream lease", &error)),
            }
        }
        if !self.group_ready {
            let stream = self.keys.stream.as_str();
            match self
                .link
                .call(&["XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM"])
                .await
            {
                Ok(_) => self.group_ready = true,
                Err(RedisError::Reply(message)) if message.starts_with("BUSYGROUP") => self.group_ready = true,
                Err(error) => return Some(self.retry.failed("create the consumer group", &error)),
            }
        }
        let consumer = self.hub.node_id.as_str();
        let count = BATCH.to_string();
        let read = match &self.catch_up {
            // Everything pending, on any consumer (no idle time): this node
            // holds the lease, so nobody else works on them.
            Some(cursor) => {
                let command = [
                    "XAUTOCLAIM",
                    &self.keys.stream,
                    GROUP,
                    consumer,
                    "0",
                    cursor,
                    "COUNT",
                    &count,
                ];
                self.link.call(&command).await.map(|reply| {
                    let parts = reply.as_array().unwrap_or_default();
                    let next = parts.first().and_then(Value::as_str).unwrap_or("0-0").to_owned();
                    (parts.get(1).cloned(), Some(next))
                })
            }
            None => {
                // Back in time to renew the lease.
                let until_renewal = (self.renewed_at + lease_time / 3).saturating_duration_since(Instant::now());
                let block = BLOCK.min(until_renewal).as_millis().max(1).to_string();
                let command = [
                    "XREADGROUP",
                    "GROUP",
                    GROUP,
                    consumer,
                    "COUNT",
                    &count,
                    "BLOCK",
                    &block,
                    "STREAMS",
                    &self.keys.stream,
                    ">",
                ];
                let draining = self.hub.shutdown.draining.clone();
                let read = tokio::select! {
                    // What this read was given stays pending: the next reader claims it.
                    _ = draining.cancelled() => return None,
                    read = self.link.call(&command) => read,
                };
                read.map(|reply| {
                    let entries = reply
                        .as_array()
                        .and_then(|streams| streams.first())
                        .and_then(Value::as_array)
                        .and_then(|stream| stream.get(1))
                        .cloned();
                    (entries, None)
                })
            }
        };
        let (entries, next_cursor) = match read {
            Ok(read) => read,
            Err(error) => {
                if matches!(&error, RedisError::Reply(message) if message.starts_with("NOGROUP")) {
                    self.group_ready = false;
                }
                self.catch_up = Some("0-0".to_owned());
                return Some(self.retry.failed("read entries", &error));
            }
        };
        if self.lease_until.is_none_or(|until| Instant::now() >= until) {
            // Too late to publish them: they stay pending for the next reader.
            self.lost_lease();
            return None;
        }
        let failed = match &entries {
            Some(entries) => process(self.hub, self.link, self.keys, self.config, entries).await,
            None => 0,
        };
        if failed > 0 {
            // Go back over everything pending, in order, after a pause.
            self.catch_up = Some("0-0".to_owned());
            return Some(self.retry.failed("publish entries", &"the broker did not take them"));
        }
        self.retry.succeeded();
        if let Some(next) = next_cursor {
            self.catch_up = (next != "0-0").then_some(next);
        }
        None
    }

    /// Stops reading until the lease is taken again.
    fn lost_lease(&mut self) {
        if self.lease_until.take().is_some() {
            tracing::info!("this node no longer reads the publish stream");
            self.hub.metrics.stream_reader.store(0, Ordering::Relaxed);
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
/// returns how many could not be published (broker errors: those stay
/// pending, to be retried). Each channel's entries are published one after
/// the other in entry order, channels concurrently (the link pipelines
/// their requests); a broker error ends its channel's chain, so that no
/// entry is published ahead of one before it on its channel. Invalid
/// entries are copied to the dead-letter stream; then one `XACK` covers
/// every entry that was published or dead-lettered.
async fn process(hub: &Hub, link: &RedisLink, keys: &StreamKeys, config: &StreamsConfig, entries: &Value) -> usize {
    let Some(entries) = entries.as_array() else {
        return 0;
    };
    let mut acknowledged: Vec<&str> = Vec::with_capacity(entries.len());
    let mut dead: Vec<DeadLetter<'_>> = Vec::new();
    // Bounded by the batch: at most BATCH entries, so at most BATCH chains.
    let mut chains: Vec<Vec<(&str, &[Value], PublishRequest)>> = Vec::new();
    let mut chain_of: HashMap<ChannelName, usize> = HashMap::new();
    for entry in entries {
        let Some([id, fields]) = entry.as_array().and_then(|e| <&[Value; 2]>::try_from(e).ok()) else {
            continue;
        };
        let Some(id) = id.as_str() else { continue };
        // A deleted entry still pending reads as `[id, nil]`: no fields.
        let fields = fields.as_array().unwrap_or_default();
        match request(id, fields) {
            Ok(request) => {
                let index = *chain_of.entry(request.channel.clone()).or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                });
                chains[index].push((id, fields, request));
            }
            Err((reason, problem)) => dead.push(DeadLetter {
                id,
                reason,
                problem,
                fields,
            }),
        }
    }
    let chains = chains.into_iter().map(|chain| async move {
        let mut outcomes = Vec::with_capacity(chain.len());
        let mut stopped = false;
        for (id, fields, request) in chain {
            if stopped {
                // Left pending, unpublished: it goes after the entry that failed.
                outcomes.push((id, fields, None));
                continue;
            }
            let outcome = hub.publish(request, Source::Stream).await;
            stopped = matches!(
                outcome,
                Err(PublishError::Broker(_) | PublishError::OutcomeUnknown { .. })
            );
            outcomes.push((id, fields, Some(outcome)));
        }
        outcomes
    });
    let mut failed = 0;
    for (id, fields, outcome) in futures_util::future::join_all(chains).await.into_iter().flatten() {
        match outcome {
            Some(Ok(_)) => {
                acknowledged.push(id);
                hub.metrics.stream_entries.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(PublishError::TooLarge(max))) => dead.push(DeadLetter {
                id,
                reason: Invalid::TooLarge,
                problem: format!("the payload is larger than {max} bytes"),
                fields,
            }),
            // Stays pending: retried after a pause or claimed by the next
            // reader. Its id is its message_id, so a publish that did reach
            // Redis is suppressed as a repeat.
            Some(Err(error @ (PublishError::Broker(_) | PublishError::OutcomeUnknown { .. }))) => {
                tracing::debug!(entry = id, %error, "stream entry not published yet");
                failed += 1;
            }
            None => failed += 1,
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
    failed
}

/// Copies invalid entries to the dead-letter stream (pipelined); says for
/// each whether Redis took it.
async fn dead_letter(
    link: &RedisLink,
    keys: &StreamKeys,
    config: &StreamsConfig,
    dead: &[DeadLetter<'_>],
) -> Vec<bool> {
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
    let payload = wire::payload(fields.get("data").copied(), fields.get("data_base64").copied())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// `/metrics` lists the reasons itself: each must be a label of its
    /// own there (an unknown one would be counted under the last label).
    #[test]
    fn every_reason_has_its_own_metric_label() {
        let all = [
            Invalid::TooLarge,
            Invalid::Channel,
            Invalid::Data,
            Invalid::Type,
            Invalid::Malformed,
        ];
        let metrics = Metrics::default();
        for reason in all {
            metrics.stream_entries_invalid.add(reason.label(), 1);
        }
        for reason in all {
            assert_eq!(metrics.stream_entries_invalid.get(reason.label()), 1, "{reason:?}");
        }
    }
}
