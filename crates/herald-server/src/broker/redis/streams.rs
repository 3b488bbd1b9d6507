//! Streams ingest: entries `XADD`ed to `{prefix}publish` are published into
//! the cluster, at least once.
//!
//! The nodes share the consumer group `herald`; each reads new entries as
//! its own consumer, publishes them, and `XACK`s only after the publish
//! succeeded. An entry whose publish failed stays pending and is retried.
//! Entries left pending by a node that died are claimed by the others after
//! `claim_idle` (`XAUTOCLAIM`). Because the group remembers its position,
//! entries added while every node was down are delivered when one starts.
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

use super::link::{RedisError, RedisLink};
use crate::hub::{Hub, PublishRequest, Source};

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
}

/// Runs the consumer until shutdown. It uses its own link, because a
/// blocking read would stall every command pipelined behind it.
pub async fn run(hub: Hub, link: RedisLink, stream_key: String, config: StreamsConfig) {
    let consumer = hub.node_id.clone();
    let draining = hub.shutdown.draining.clone();
    let mut group_ready = false;
    let mut last_claim = tokio::time::Instant::now();
    // Start by re-reading our own pending entries (id 0), then new ones (>).
    let mut read_from = "0".to_owned();
    loop {
        if draining.is_cancelled() {
            return;
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
                    tracing::warn!(%error, "cannot create the stream consumer group");
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
                process(&hub, &link, &stream_key, entries).await;
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
                    Some(entries) => process(&hub, &link, &stream_key, entries).await,
                    None => (0, 0),
                };
                if failed > 0 {
                    // The cluster cannot take messages right now; pause before retrying.
                    read_from = "0".to_owned();
                    tokio::select! {
                        _ = draining.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
                // Our pending list is drained once a read of it comes back empty.
                if read_from == "0" && processed == 0 {
                    read_from = ">".to_owned();
                }
            }
            Ok(_) => {
                if read_from == "0" {
                    read_from = ">".to_owned();
                }
            }
            Err(RedisError::Reply(message)) if message.starts_with("NOGROUP") => group_ready = false,
            Err(error) => {
                tracing::debug!(%error, "stream read failed");
                // After a failure, go back over what may be pending on us.
                read_from = "0".to_owned();
            }
        }
    }
}

/// Publishes and acknowledges a list of `[id, [field, value, …]]` entries;
/// returns how many entries there were and how many could not be published.
/// The publishes go out together (the link pipelines them, in order), then
/// one `XACK` covers every entry that was published or was invalid.
async fn process(hub: &Hub, link: &RedisLink, stream_key: &str, entries: &Value) -> (usize, usize) {
    let Some(entries) = entries.as_array() else {
        return (0, 0);
    };
    let mut acknowledged: Vec<&str> = Vec::with_capacity(entries.len());
    let mut publishes = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some([id, fields]) = entry.as_array().and_then(|e| <&[Value; 2]>::try_from(e).ok()) else {
            continue;
        };
        let Some(id) = id.as_str() else { continue };
        let fields: HashMap<&str, &str> = fields
            .as_array()
            .unwrap_or_default()
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?.as_str()?, pair.get(1)?.as_str()?)))
            .collect();
        match request(id, &fields) {
            Ok(request) => publishes.push(async move { (id, hub.publish(request, Source::Stream).await) }),
            Err(problem) => {
                hub.metrics.messages_dropped.add("invalid", 1);
                tracing::warn!(entry = id, %problem, "dropped an invalid stream entry");
                acknowledged.push(id);
            }
        }
    }
    let mut failed = 0;
    for (id, outcome) in futures_util::future::join_all(publishes).await {
        match outcome {
            Ok(_) => {
                acknowledged.push(id);
                hub.metrics.stream_entries.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                // Stays pending: retried after a reconnect or claimed by another node.
                tracing::debug!(entry = id, %error, "stream entry not published yet");
                failed += 1;
            }
        }
    }
    if !acknowledged.is_empty() {
        let mut command = vec!["XACK", stream_key, GROUP];
        command.extend(acknowledged);
        let _ = link.call(&command).await;
    }
    (entries.len(), failed)
}

fn request(id: &str, fields: &HashMap<&str, &str>) -> Result<PublishRequest, String> {
    let channel = fields.get("channel").ok_or("no `channel` field")?;
    let channel = ChannelName::parse(channel).map_err(|e| format!("channel: {e}"))?;
    let payload = super::payload(fields.get("data").copied(), fields.get("data_base64").copied())?;
    let message_type = fields.get("type").map(|t| (*t).to_owned());
    if let Some(t) = &message_type {
        validate_message_type(t)?;
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
