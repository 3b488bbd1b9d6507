//! `[redis]`: Redis mode, its address and key prefix, Streams ingest, the
//! routes that adopt existing publishers, and the node timeout of presence.

use std::time::Duration;

use herald_core::resp::RedisAddress;
use herald_core::route::Route;

use super::check::{ConfigError, duration, invalid, positive};
use super::raw::RawRedis;

/// The shortest `redis.claim_idle` (the lease time): a third of it is how
/// often the reader renews and the others poll, so it must not approach 0.
pub const MIN_CLAIM_IDLE: Duration = Duration::from_millis(300);

/// The shortest `redis.node_timeout` accepted: a few missed heartbeats.
pub const MIN_NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// Validated `[redis]` settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub address: RedisAddress,
    /// Prepended to every key and channel, so deployments can share a Redis.
    pub prefix: String,
    /// How long a subscribe waits for Redis to confirm before it is acked anyway.
    pub subscribe_timeout: Duration,
    /// Streams ingest, when enabled.
    pub streams: Option<StreamsConfig>,
    pub routes: Vec<Route>,
    /// A node whose heartbeat is older than this counts as gone: its
    /// connections leave presence.
    pub node_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// How long the reader's lease lasts without renewal: a node that died
    /// while reading is replaced, and its pending entries claimed, after
    /// this long.
    pub claim_idle: Duration,
    /// The dead-letter stream keeps at most this many entries (exact
    /// `MAXLEN`: dead letters are rare, and an exact cap is what operators
    /// configure); older ones are trimmed.
    pub dead_letter_max_len: usize,
}

pub(crate) fn redis_config(raw: RawRedis) -> Result<Option<RedisConfig>, ConfigError> {
    let Some(url) = raw.url else {
        if !raw.routes.is_empty() {
            return Err(invalid("redis.routes", "routes need redis.url"));
        }
        return Ok(None);
    };
    let address = RedisAddress::parse(&url).map_err(|problem| invalid("redis.url", problem))?;
    let prefix = raw.prefix.unwrap_or_else(|| "herald:".to_owned());
    if prefix.contains(['*', '?', '[', ']', ' ']) {
        return Err(invalid("redis.prefix", "must not contain glob characters or spaces"));
    }
    let routes = raw
        .routes
        .into_iter()
        .enumerate()
        .map(|(index, route)| {
            Route::from_raw(route, index).map_err(|problem| ConfigError::Invalid {
                key: "redis.routes".into(),
                problem,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let streams = match raw.streams.unwrap_or(true) {
        true => Some(StreamsConfig {
            claim_idle: match duration("redis.claim_idle", raw.claim_idle, "30s")? {
                // The reader renews its lease every third of it and the others poll for it.
                idle if idle < MIN_CLAIM_IDLE => {
                    return Err(invalid("redis.claim_idle", "must be at least 300ms"));
                }
                idle => idle,
            },
            dead_letter_max_len: positive("redis.dead_letter_max_len", raw.dead_letter_max_len, 10_000)?,
        }),
        false => None,
    };
    Ok(Some(RedisConfig {
        address,
        prefix,
        subscribe_timeout: duration("redis.subscribe_timeout", raw.subscribe_timeout, "2s")?,
        streams,
        routes,
        node_timeout: match duration("redis.node_timeout", raw.node_timeout, "10s")? {
            timeout if timeout < MIN_NODE_TIMEOUT => {
                return Err(invalid(
                    "redis.node_timeout",
                    "must be at least 3s (nodes heartbeat every second)",
                ));
            }
            timeout => timeout,
        },
    }))
}
