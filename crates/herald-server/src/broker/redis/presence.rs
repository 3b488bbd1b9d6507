//! Presence in Redis, correct across nodes.
//!
//! Each connection in a presence-tracked channel is one field of
//! `{prefix}presence:{channel}`: `{node_id}:{connection_id}` → user id.
//! Every node records a heartbeat in `{prefix}nodes` (a sorted set scored by
//! time) every [`HEARTBEAT`]; an entry counts only while its node's heartbeat
//! is younger than `node_timeout`. So a node that crashes has its users leave
//! presence within `node_timeout`, and the sweep removes its entries
//! (publishing `leave` events exactly once: the script that deletes an entry
//! reports it to one caller only). The loops that run the heartbeat and the
//! sweep over the hub live in `crate::cluster`.

use std::time::Duration;

use crate::redis::link::Script;

/// How often a node records its heartbeat and sweeps dead nodes' entries.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

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
