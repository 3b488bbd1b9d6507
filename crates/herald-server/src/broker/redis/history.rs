//! Channel history in Redis, for namespaces that keep it.
//!
//! Per channel: `{prefix}hist:{channel}` (a Stream whose entry ids are
//! `{offset}-1`), `{prefix}off:{channel}` (the latest offset) and
//! `{prefix}epoch:{channel}`. Appending, numbering and publishing happen in
//! one Lua script, so offsets, history and Pub/Sub order always agree. When
//! Redis loses the keys (a restart without persistence, or a channel idle
//! past its retention) the next publish starts a new epoch, and old
//! positions are reported unrecoverable.

use herald_core::ChannelName;
use herald_core::history::{Position, recover};
use herald_core::resp::Value;

use super::wire::decode_wire;
use crate::broker::{HistoryPage, Placement};
use crate::redis::link::Script;
use crate::util::unix_millis;

/// KEYS: history, offset, epoch, pubsub channel, message-id claim. ARGV:
/// wire message (a JSON object), max length, retention in ms, a fresh epoch
/// in case none exists, how long the offset and epoch outlive a quiet
/// channel (ms), how long the message id stays claimed (ms; '' for no
/// claim). The offset and epoch outlive the messages so that a channel
/// quiet past its retention keeps its epoch: connected clients see no
/// false gap, and old positions are still judged. The published message
/// is the wire message with `offset` and `epoch` added.
///
/// With a claim, a message id already claimed publishes nothing and
/// returns `{'dup', 'offset:epoch'}` of the first publish; claim and
/// publish are one step, so a claim exists exactly when the publish ran.
pub const PUBLISH_SCRIPT: &str = r#"
if ARGV[6] ~= '' then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {'dup', seen} end
end
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[3], epoch)
end
local offset = redis.call('INCR', KEYS[2])
local message = '{"offset":' .. offset .. ',"epoch":"' .. epoch .. '",' .. string.sub(ARGV[1], 2)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-1', 'm', message)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', KEYS[4], message)
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[5], offset .. ':' .. epoch, 'PX', ARGV[6])
end
return {offset, epoch}
"#;

/// KEYS: pubsub channel, message-id claim. ARGV: wire message, how long the
/// id stays claimed (ms). Publishes unless the id is claimed (then returns
/// `{'dup', ''}`), and claims it in the same step; see [`PUBLISH_SCRIPT`].
pub const PUBLISH_ONCE_SCRIPT: &str = r#"
if not redis.call('SET', KEYS[2], '', 'NX', 'PX', ARGV[2]) then
  return {'dup', redis.call('GET', KEYS[2]) or ''}
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return {'ok'}
"#;

/// How long a channel's offset and epoch outlive its last message.
pub const POSITION_TTL_MS: &str = "2592000000"; // 30 days

/// KEYS: history, offset, epoch. ARGV: a fresh epoch, its lifetime in ms,
/// the offset to read after ('' for the latest entries), count.
/// Returns {latest offset, epoch, entries}.
pub const READ_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[3], epoch, 'PX', ARGV[2])
end
local offset = tonumber(redis.call('GET', KEYS[2]) or '0')
local entries
if ARGV[3] == '' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[4])
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3] .. '-1', '+', 'COUNT', ARGV[4])
end
return {offset, epoch, entries}
"#;

pub static PUBLISH_LUA: Script = Script::new(PUBLISH_SCRIPT);
pub static PUBLISH_ONCE_LUA: Script = Script::new(PUBLISH_ONCE_SCRIPT);
pub static READ_LUA: Script = Script::new(READ_SCRIPT);

/// Reads the reply of [`PUBLISH_SCRIPT`] or [`PUBLISH_ONCE_SCRIPT`].
pub fn placement(reply: &Value) -> Option<Placement> {
    let items = reply.as_array()?;
    let first = items.first()?;
    if first.as_str() == Some("dup") {
        // The first publish's position, when its channel keeps history.
        let (offset, epoch) = items
            .get(1)?
            .as_str()?
            .split_once(':')
            .and_then(|(offset, epoch)| Some((offset.parse().ok()?, epoch.to_owned())))
            .unzip();
        return Some(Placement {
            offset,
            epoch,
            duplicate: true,
        });
    }
    if first.as_str() == Some("ok") {
        return Some(Placement::default());
    }
    let offset = u64::try_from(first.as_integer()?).ok()?;
    let epoch = items.get(1)?.as_str()?.to_owned();
    Some(Placement {
        offset: Some(offset),
        epoch: Some(epoch),
        duplicate: false,
    })
}

/// Turns the reply of [`READ_SCRIPT`] into a page. `since` is what the
/// caller asked to recover from (`None`: the latest messages).
pub fn page(
    channel: &ChannelName,
    reply: &Value,
    since: Option<Position>,
    limit: usize,
    ttl_ms: u64,
    node_id: &str,
) -> Result<HistoryPage, String> {
    let items = reply.as_array().ok_or("unexpected history reply")?;
    let offset = items
        .first()
        .and_then(Value::as_integer)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or("no offset")?;
    let epoch = items.get(1).and_then(Value::as_str).ok_or("no epoch")?.to_owned();
    let current = Position { offset, epoch };
    let now = unix_millis();
    let mut kept = Vec::new();
    for entry in items.get(2).and_then(Value::as_array).unwrap_or_default() {
        let message = entry
            .as_array()
            .and_then(|e| e.get(1))
            .and_then(Value::as_array)
            .and_then(|fields| fields.get(1))
            .and_then(Value::as_bytes)
            .ok_or("malformed history entry")?;
        let publication = decode_wire(channel.clone(), message, node_id, String::new)?;
        if publication.timestamp_ms.saturating_add(ttl_ms) >= now {
            kept.push(publication);
        }
    }
    Ok(match since {
        None => {
            kept.reverse();
            HistoryPage {
                publications: kept,
                current,
                recovered: true,
            }
        }
        Some(since) => HistoryPage::from_recovery(recover(&since, current.clone(), kept, limit), current),
    })
}
