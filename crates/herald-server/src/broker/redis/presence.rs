//! Presence in Redis, correct across nodes.
//!
//! Each connection in a presence-tracked channel is one field of
//! `{prefix}presence:{channel}`: `{node_id}:{connection_id}` → user id.
//! Every node records a heartbeat in `{prefix}nodes` (a sorted set scored by
//! time) every [`HEARTBEAT`]; an entry counts only while its node's heartbeat
//! is younger than `node_timeout`. So a node that crashes has its users leave
//! presence within `node_timeout`, and the sweep below removes its entries
//! (publishing `leave` events exactly once: the script that deletes an entry
//! reports it to one caller only).

use std::time::Duration;

use super::link::Script;

/// How often a node records its heartbeat and sweeps dead nodes' entries.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The shortest `redis.node_timeout` accepted: a few missed heartbeats.
pub const MIN_NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// KEYS: presence hash, nodes zset, pubsub channel. ARGV: field, user, '1'
/// join / '0' leave, now ms, node timeout ms, the join/leave event as a wire
/// message ('' when the namespace announces nothing). With an event, counts
/// the user's live connections afterwards (a walk of the channel's members)
/// and publishes the event when that count is 1 after a join or 0 after a
/// leave: counting and announcing in one step keep every node's view of a
/// user's joins and leaves in the order they happened.
pub const TRACK_SCRIPT: &str = r#"
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if ARGV[6] == '' then return 0 end
local live = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], tonumber(ARGV[4]) - tonumber(ARGV[5]), '+inf')) do
  live[node] = true
end
local entries = redis.call('HGETALL', KEYS[1])
local count = 0
for i = 1, #entries, 2 do
  local node = string.match(entries[i], '^(.*):%d+$')
  if node and live[node] and entries[i + 1] == ARGV[2] then count = count + 1 end
end
if (ARGV[3] == '1' and count == 1) or (ARGV[3] == '0' and count == 0) then
  redis.call('PUBLISH', KEYS[3], ARGV[6])
end
return count
"#;

/// KEYS: presence hash, nodes zset. ARGV: now ms, node timeout ms, '1' to
/// delete dead nodes' entries (the sweep) or '0' to only skip them (reads,
/// so that a read never swallows the `leave` the sweep announces).
/// Returns {live entries as field, user, …; users whose last live entry
/// was just deleted}.
pub const QUERY_SCRIPT: &str = r#"
local live = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], tonumber(ARGV[1]) - tonumber(ARGV[2]), '+inf')) do
  live[node] = true
end
local entries = redis.call('HGETALL', KEYS[1])
local kept, dead, alive_users = {}, {}, {}
for i = 1, #entries, 2 do
  local node = string.match(entries[i], '^(.*):%d+$')
  if node and live[node] then
    table.insert(kept, entries[i]); table.insert(kept, entries[i + 1])
    alive_users[entries[i + 1]] = true
    elseif ARGV[3] == '1' then
    redis.call('HDEL', KEYS[1], entries[i])
    dead[entries[i + 1]] = true
  end
end
local gone = {}
for user, _ in pairs(dead) do
  if not alive_users[user] then table.insert(gone, user) end
end
return {kept, gone}
"#;

pub static TRACK_LUA: Script = Script::new(TRACK_SCRIPT);
pub static QUERY_LUA: Script = Script::new(QUERY_SCRIPT);
pub static HEARTBEAT_LUA: Script = Script::new(HEARTBEAT_SCRIPT);

/// KEYS: nodes zset, node stats hash. ARGV: node id, now ms, stats JSON,
/// node timeout ms. Records the heartbeat; returns {the stats of live
/// nodes, the nodes this call found dead and removed}. A dead node is
/// removed by exactly one caller, which then sweeps its presence entries.
pub const HEARTBEAT_SCRIPT: &str = r#"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[4])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
for _, node in ipairs(dead) do
  redis.call('HDEL', KEYS[2], node)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
return {redis.call('HVALS', KEYS[2]), dead}
"#;

/// Records this node's heartbeat every [`HEARTBEAT`], keeping the cluster
/// totals of `/stats` fresh. It does nothing else, so that no amount of
/// sweeping can delay it past `node_timeout` (other nodes would declare this
/// one dead). A node it finds dead is handed to [`sweep_loop`].
pub async fn heartbeat_loop(
    hub: crate::hub::Hub,
    broker: std::sync::Arc<super::RedisBroker>,
    found_dead: tokio::sync::mpsc::Sender<()>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let stopped = hub.shutdown.stopped.clone();
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = serde_json::json!({
            "connections": hub.metrics.connections_current.load(Relaxed),
            "users_online": hub.users_online(),
        });
        if let Ok((nodes, dead)) = broker.heartbeat(&stats).await {
            let total = |key: &str| nodes.iter().filter_map(|n| n[key].as_i64()).sum();
            let cluster = crate::hub::ClusterStats {
                nodes: nodes.len(),
                connections: total("connections"),
                users_online: total("users_online"),
            };
            *crate::util::lock(&hub.cluster) = Some(cluster);
            if !dead.is_empty() {
                tracing::info!(nodes = ?dead, "nodes stopped heartbeating; sweeping their presence");
                // A full channel means a sweep is already due.
                let _ = found_dead.try_send(());
            }
        }
    }
}

/// Removes dead nodes' presence entries and announces their users' `leave`.
///
/// Every [`HEARTBEAT`] it sweeps the join/leave channels this node serves
/// (cheap, and it covers a sweeper that died mid-sweep). When the heartbeat
/// found a node dead, it walks every presence hash in Redis (`SCAN`), so that
/// a dead node leaves no entry behind, in channels without join/leave events
/// or without subscribers on this node too: what a dead node left is
/// bounded by this walk, not by who happens to look.
pub async fn sweep_loop(
    hub: crate::hub::Hub,
    broker: std::sync::Arc<super::RedisBroker>,
    mut found_dead: tokio::sync::mpsc::Receiver<()>,
) {
    let stopped = hub.shutdown.stopped.clone();
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        let channels = tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => hub
                .fanout
                .registry
                .channels()
                .into_iter()
                .filter(|channel| hub.policies().policy(channel).is_ok_and(|p| p.join_leave))
                .collect(),
            Some(()) = found_dead.recv() => match broker.presence_channels().await {
                Ok(channels) => channels,
                Err(error) => {
                    tracing::warn!(%error, "presence sweep could not list channels; the next death retries");
                    continue;
                }
            },
        };
        for channel in channels {
            if stopped.is_cancelled() {
                return;
            }
            if let Ok((_, gone)) = broker.presence_sweep(&channel, true).await {
                for user in gone {
                    hub.announce(&channel, &user, false).await;
                }
            }
        }
    }
}
