//! Configuration: a TOML file, overridden by `HERALD_*` environment variables,
//! overridden by command-line flags, validated once into a typed [`Config`].
//!
//! `RawConfig` mirrors the file; every field is optional so that the layers can
//! be merged. [`Config::from_raw`] turns it into settings that the rest of the
//! server uses without re-checking; an invalid value is reported with the
//! name of its key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use herald_core::duration::parse_duration;
use herald_core::policy::{NamespacePolicy, Policies, SubscribePolicy, default_policy};
use jsonwebtoken::Algorithm;

use crate::broker::redis::RedisConfig;
use crate::broker::redis::streams::StreamsConfig;
use crate::redis::link::RedisAddress;
use herald_core::route::Route;

mod raw;

pub use raw::{
    RawApi, RawConfig, RawIdempotency, RawJwt, RawKeepalive, RawLimits, RawLog, RawNamespace, RawOrigins, RawRedis,
    RawShutdown,
};

/// The address the embedded default listens on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

/// A `log.level` is a level, or `RUST_LOG`-style directives
/// (`info,herald_server::hub=debug`). A bare word must be a level: the
/// logger would read `debugg` as "everything from a module named debugg"
/// and log nothing else, so a typo stops the start instead.
fn validate_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '[']) && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` is not a level (trace, debug, info, warn, error, off) or a `target=level` directive"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|error| format!("`{filter}` is not a log filter: {error}"))
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------- validated layer

/// Validated settings. Built once at start-up and handed out by parts.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub jwt: JwtConfig,
    /// `None` until [`Config::fill_ephemeral_secrets`] in the embedded default.
    pub api_key: Option<String>,
    /// Redis mode when set; the in-process broker otherwise.
    pub redis: Option<RedisConfig>,
    pub limits: Limits,
    pub keepalive: Keepalive,
    pub shutdown: ShutdownConfig,
    pub origins: OriginPolicy,
    pub log: LogConfig,
    pub idempotency: Idempotency,
    pub policies: Policies,
    pub demo_page: bool,
    /// True when the secret and API key were generated for this run.
    pub ephemeral_secrets: bool,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret: Option<String>,
    /// The only algorithms a token may use; the token's header never chooses.
    pub algorithms: Vec<Algorithm>,
    /// The claim that holds the user id (`sub` by default).
    pub user_claim: String,
    /// The claim that lists extra channels and patterns (`channels` by default).
    pub channels_claim: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_connections_per_ip: usize,
    /// The largest WebSocket frame or message, and the largest published `data`.
    pub max_message_size: usize,
    /// From TCP accept to the end of the HTTP request head.
    pub handshake_timeout: Duration,
    /// How long an HTTP request body may take to arrive once its handler
    /// reads it; slower, it is answered 408 and the connection closed (so a
    /// trickling body cannot hold a connection and a task forever).
    pub body_timeout: Duration,
    /// From the WebSocket upgrade to a successful `auth` frame.
    pub auth_timeout: Duration,
    pub commands_per_second: u32,
    pub command_burst: u32,
    /// Each connection's outgoing queue, in messages and in bytes; a client
    /// that lets either fill up is disconnected (close code 4008).
    pub queue_messages: usize,
    pub queue_bytes: usize,
    /// Channels one connection may be subscribed to (its personal channel included).
    pub max_subscriptions: usize,
    /// The kernel's send buffer per connection (SO_SNDBUF), when set. The
    /// kernel otherwise grows it to megabytes, which a client that stopped
    /// reading fills before Herald's own queue (and its 4008) comes into play.
    pub send_buffer: Option<usize>,
    /// How long one write to a socket may take before the client counts as slow.
    pub write_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Keepalive {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Connections are closed at random moments spread over this window.
    pub drain_window: Duration,
    /// The process exits at the latest this long after the signal.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// The `Origin` must name the host the request was sent to.
    SameOrigin,
    /// Exactly these origins (`scheme://host[:port]`).
    AllowList(Vec<String>),
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    pub window: Duration,
    pub capacity: usize,
}

impl Config {
    /// Validates a merged raw configuration.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address:port like 127.0.0.1:8081"),
            )
        })?;

        let algorithms = raw
            .jwt
            .algorithms
            .unwrap_or_else(|| vec!["HS256".into()])
            .iter()
            .map(|name| match name.as_str() {
                "HS256" => Ok(Algorithm::HS256),
                "HS384" => Ok(Algorithm::HS384),
                "HS512" => Ok(Algorithm::HS512),
                other => Err(invalid(
                    "jwt.algorithms",
                    format!("`{other}` is not supported (HS256, HS384, HS512 with jwt.secret)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(invalid("jwt.algorithms", "must list at least one algorithm"));
        }
        if let Some(secret) = &raw.jwt.secret
            && secret.len() < 16
        {
            return Err(invalid("jwt.secret", "must be at least 16 bytes"));
        }
        if let Some(key) = &raw.api.key
            && key.len() < 16
        {
            return Err(invalid("api.key", "must be at least 16 bytes"));
        }
        let jwt = JwtConfig {
            secret: raw.jwt.secret,
            algorithms,
            user_claim: non_empty("jwt.user_claim", raw.jwt.user_claim, "sub")?,
            channels_claim: non_empty("jwt.channels_claim", raw.jwt.channels_claim, "channels")?,
            issuer: raw.jwt.issuer,
            audience: raw.jwt.audience,
            leeway: duration("jwt.leeway", raw.jwt.leeway, "5s")?,
        };

        let l = raw.limits;
        let limits = Limits {
            max_connections: positive("limits.max_connections", l.max_connections, 100_000)?,
            max_connections_per_user: positive("limits.max_connections_per_user", l.max_connections_per_user, 100)?,
            max_connections_per_ip: positive("limits.max_connections_per_ip", l.max_connections_per_ip, 100_000)?,
            max_message_size: positive("limits.max_message_size", l.max_message_size, 64 * 1024)?,
            handshake_timeout: duration("limits.handshake_timeout", l.handshake_timeout, "10s")?,
            body_timeout: duration("limits.body_timeout", l.body_timeout, "10s")?,
            auth_timeout: duration("limits.auth_timeout", l.auth_timeout, "10s")?,
            commands_per_second: positive(
                "limits.commands_per_second",
                l.commands_per_second.map(|n| n as usize),
                50,
            )? as u32,
            command_burst: positive("limits.command_burst", l.command_burst.map(|n| n as usize), 100)? as u32,
            queue_messages: positive("limits.queue_messages", l.queue_messages, 1024)?,
            queue_bytes: positive("limits.queue_bytes", l.queue_bytes, 4 * 1024 * 1024)?,
            max_subscriptions: positive("limits.max_subscriptions", l.max_subscriptions, 256)?,
            send_buffer: match l.send_buffer {
                Some(size) if size < 4096 => return Err(invalid("limits.send_buffer", "must be at least 4096 bytes")),
                other => other,
            },
            write_timeout: duration("limits.write_timeout", l.write_timeout, "10s")?,
        };
        if limits.queue_bytes < limits.max_message_size {
            return Err(invalid(
                "limits.queue_bytes",
                "must be at least limits.max_message_size",
            ));
        }

        let keepalive = Keepalive {
            ping_interval: duration("keepalive.ping_interval", raw.keepalive.ping_interval, "25s")?,
            pong_timeout: duration("keepalive.pong_timeout", raw.keepalive.pong_timeout, "10s")?,
        };
        let shutdown = ShutdownConfig {
            drain_window: duration("shutdown.drain_window", raw.shutdown.drain_window, "5s")?,
            timeout: duration("shutdown.timeout", raw.shutdown.timeout, "15s")?,
        };
        if shutdown.drain_window >= shutdown.timeout {
            return Err(invalid(
                "shutdown.drain_window",
                "must be shorter than shutdown.timeout",
            ));
        }

        let origins = match raw.origins.allowed {
            None => OriginPolicy::SameOrigin,
            Some(list) if list.iter().any(|o| o == "*") => OriginPolicy::Any,
            Some(list) => {
                for origin in &list {
                    if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                        return Err(invalid(
                            "origins.allowed",
                            format!("`{origin}` must look like https://host[:port] (no path), or be \"*\""),
                        ));
                    }
                }
                OriginPolicy::AllowList(list)
            }
        };

        let log = LogConfig {
            format: match raw.log.format.as_deref().unwrap_or("text") {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(invalid("log.format", format!("`{other}` is not `text` or `json`"))),
            },
            level: {
                let level = raw.log.level.unwrap_or_else(|| "info".into());
                validate_log_level(&level).map_err(|problem| invalid("log.level", problem))?;
                level
            },
        };

        let idempotency = Idempotency {
            window: duration("idempotency.window", raw.idempotency.window, "2m")?,
            capacity: positive("idempotency.capacity", raw.idempotency.capacity, 100_000)?,
        };

        let bare = merge_namespace(
            "default_namespace",
            raw.default_namespace.as_ref(),
            default_policy(None),
        )?;
        let mut namespaces = HashMap::new();
        for (name, policy) in &raw.namespaces {
            if !herald_core::channel::is_valid_namespace(name) {
                return Err(invalid(
                    &format!("namespaces.{name}"),
                    "a namespace name is 1-32 of a-z 0-9 _ -",
                ));
            }
            let defaults = default_policy(Some(name));
            if name == "user" && policy.subscribe.is_some_and(|s| s != SubscribePolicy::Owner) {
                return Err(invalid(
                    "namespaces.user.subscribe",
                    "personal channels are always `owner`",
                ));
            }
            if name != "user" && policy.subscribe == Some(SubscribePolicy::Owner) {
                return Err(invalid(
                    &format!("namespaces.{name}.subscribe"),
                    "`owner` applies only to `user`",
                ));
            }
            namespaces.insert(
                name.clone(),
                merge_namespace(&format!("namespaces.{name}"), Some(policy), defaults)?,
            );
        }
        let policies = Policies::new(namespaces, bare);
        let redis = redis_config(raw.redis)?;

        Ok(Config {
            listen,
            jwt,
            api_key: raw.api.key,
            redis,
            limits,
            keepalive,
            shutdown,
            origins,
            log,
            idempotency,
            policies,
            demo_page: raw.demo_page.unwrap_or(true),
            ephemeral_secrets: false,
        })
    }

    /// The embedded default: with no configured secret, a loopback server
    /// generates a JWT secret and an API key for this run. Anything reachable
    /// from other machines must be given a secret explicitly.
    pub fn fill_ephemeral_secrets(&mut self) -> Result<(), ConfigError> {
        if self.jwt.secret.is_some() && self.api_key.is_some() {
            return Ok(());
        }
        if !self.listen.ip().is_loopback() {
            let missing = if self.jwt.secret.is_none() {
                "jwt.secret"
            } else {
                "api.key"
            };
            return Err(invalid(
                missing,
                format!(
                    "refusing to listen on non-loopback {} without an explicit {missing} (set it in the config file or HERALD_{})",
                    self.listen,
                    missing.replace('.', "_").to_uppercase()
                ),
            ));
        }
        if self.jwt.secret.is_none() {
            self.jwt.secret = Some(crate::util::random_token(32));
            self.ephemeral_secrets = true;
        }
        if self.api_key.is_none() {
            self.api_key = Some(crate::util::random_token(24));
            self.ephemeral_secrets = true;
        }
        Ok(())
    }
}

fn redis_config(raw: RawRedis) -> Result<Option<RedisConfig>, ConfigError> {
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
                idle if idle < crate::broker::redis::streams::MIN_CLAIM_IDLE => {
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
            timeout if timeout < crate::broker::redis::presence::MIN_NODE_TIMEOUT => {
                return Err(invalid(
                    "redis.node_timeout",
                    "must be at least 3s (nodes heartbeat every second)",
                ));
            }
            timeout => timeout,
        },
    }))
}

fn merge_namespace(
    key: &str,
    raw: Option<&RawNamespace>,
    defaults: NamespacePolicy,
) -> Result<NamespacePolicy, ConfigError> {
    let Some(raw) = raw else { return Ok(defaults) };
    let history_size = raw.history_size.unwrap_or(defaults.history_size);
    if history_size > MAX_HISTORY_SIZE {
        return Err(invalid(
            &format!("{key}.history_size"),
            format!("must be at most {MAX_HISTORY_SIZE}"),
        ));
    }
    let history_ttl = match &raw.history_ttl {
        Some(text) => parse_duration(text).map_err(|problem| invalid(&format!("{key}.history_ttl"), problem))?,
        None if history_size > 0 => Duration::from_secs(300),
        None => defaults.history_ttl,
    };
    if history_size > 0 && history_ttl.is_zero() {
        return Err(invalid(
            &format!("{key}.history_ttl"),
            "must be positive when history_size is set",
        ));
    }
    Ok(NamespacePolicy {
        subscribe: raw.subscribe.unwrap_or(defaults.subscribe),
        client_publish: raw.client_publish.unwrap_or(defaults.client_publish),
        presence: raw.presence.unwrap_or(defaults.presence),
        history_size,
        history_ttl,
        join_leave: raw.join_leave.unwrap_or(defaults.join_leave),
    })
}

/// The most messages kept per channel.
pub const MAX_HISTORY_SIZE: usize = 100_000;

fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(value.as_deref().unwrap_or(default)).map_err(|problem| invalid(key, problem))
}

fn positive(key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(invalid(key, "must be greater than 0")),
        n => Ok(n),
    }
}

fn non_empty(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    match value {
        Some(v) if v.is_empty() => Err(invalid(key, "must not be empty")),
        Some(v) => Ok(v),
        None => Ok(default.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let mut raw = RawConfig::from_toml(toml)?;
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        raw.apply_env(|name| env.get(name).cloned())
            .map_err(|e| e.to_string())?;
        Config::from_raw(raw).map_err(|e| e.to_string())
    }

    fn check_error(toml: &str, fragment: &str) {
        let error = load(toml, &[]).expect_err(toml);
        assert!(error.contains(fragment), "{toml:?}: {error}");
    }

    #[test]
    fn empty_config_is_the_embedded_default() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.limits.max_message_size, 65_536);
        assert_eq!(config.origins, OriginPolicy::SameOrigin);
        assert!(config.jwt.secret.is_none());
    }

    #[test]
    fn env_overrides_file() {
        let config = load(
            "listen = \"127.0.0.1:1\"\n[jwt]\nsecret = \"from-the-file-0123456789\"",
            &[
                ("HERALD_LISTEN", "127.0.0.1:2"),
                ("HERALD_API_KEY", "from-the-environment"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.jwt.secret.as_deref(), Some("from-the-file-0123456789"));
        assert_eq!(config.api_key.as_deref(), Some("from-the-environment"));
    }

    #[test]
    fn errors_name_the_key() {
        check_error("listen = \"nowhere\"", "`listen`");
        check_error("[redis]\nurl = \"http://x\"", "`redis.url`: must start with redis://");
        check_error("[redis]\nurl = \"redis://h\"\nprefix = \"a*\"", "`redis.prefix`");
        check_error(
            "[[redis.routes]]\nredis_channel = \"a\"\nherald_channel = \"b\"",
            "routes need redis.url",
        );
        check_error(
            "[redis]\nurl = \"redis://h\"\n[[redis.routes]]\nredis_channel = \"a\"",
            "`redis.routes`: `redis.routes[0]` needs exactly one",
        );
        check_error(
            "[limits]\nauth_timeout = \"10\"",
            "`limits.auth_timeout`: `10` has no unit",
        );
        check_error(
            "[limits]\nmax_connections = 0",
            "`limits.max_connections`: must be greater than 0",
        );
        check_error(
            "[limits]\nsend_buffer = 100",
            "`limits.send_buffer`: must be at least 4096 bytes",
        );
        check_error(
            "[jwt]\nalgorithms = [\"none\"]",
            "`jwt.algorithms`: `none` is not supported",
        );
        check_error("[jwt]\nsecret = \"short\"", "`jwt.secret`: must be at least 16 bytes");
        check_error(
            "[redis]\nurl = \"redis://h\"\nclaim_idle = \"299ms\"",
            "`redis.claim_idle`: must be at least 300ms",
        );
        check_error(
            "[redis]\nurl = \"redis://h\"\ndead_letter_max_len = 0",
            "`redis.dead_letter_max_len`: must be greater than 0",
        );
        check_error("[origins]\nallowed = [\"example.com\"]", "`origins.allowed`");
        check_error("[log]\nlevel = \"debugg\"", "`log.level`: `debugg` is not a level");
        check_error(
            "[log]\nlevel = \"info,herald=loud\"",
            "`log.level`: `info,herald=loud` is not a log filter",
        );
        for fine in ["info", "WARN", "info,herald_server::hub=debug", "herald_server=trace"] {
            load(&format!("[log]\nlevel = \"{fine}\""), &[]).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
        check_error("[limitz]\nx = 1", "unknown field `limitz`");
        check_error(
            "[namespaces.user]\nsubscribe = \"authenticated\"",
            "`namespaces.user.subscribe`",
        );
        check_error("[namespaces.Bad]\npresence = true", "`namespaces.Bad`");
        check_error(
            "[namespaces.team]\nsubscribe = \"everyone\"",
            "unknown variant `everyone`",
        );
        check_error(
            "[shutdown]\ndrain_window = \"20s\"\ntimeout = \"10s\"",
            "`shutdown.drain_window`",
        );
        let env_error = load("", &[("HERALD_MAX_CONNECTIONS", "many")]).unwrap_err();
        assert!(env_error.contains("HERALD_MAX_CONNECTIONS"), "{env_error}");
    }

    #[test]
    fn non_loopback_needs_a_secret() {
        let mut config = load("listen = \"0.0.0.0:8081\"", &[]).unwrap();
        let error = config.fill_ephemeral_secrets().unwrap_err().to_string();
        assert!(error.contains("refusing to listen on non-loopback"), "{error}");
        let mut config = load("", &[]).unwrap();
        config.fill_ephemeral_secrets().unwrap();
        assert!(config.ephemeral_secrets && config.jwt.secret.is_some() && config.api_key.is_some());
    }
}
