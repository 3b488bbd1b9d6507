//! The validated configuration: [`Config`], assembled from each section's
//! checks (`jwt`, `limits`, `namespaces`, `redis`, `guest`) plus the small
//! top-level settings (listen address, origins, log), and the embedded
//! default's ephemeral secrets.

use std::net::SocketAddr;

use herald_core::policy::Policies;

use super::check::{ConfigError, invalid};
use super::guest::{GuestConfig, guest_config};
use super::jwt::JwtConfig;
use super::limits::{Idempotency, Keepalive, Limits, ShutdownConfig};
use super::namespaces::policies;
use super::raw::RawConfig;
use super::redis::{RedisConfig, redis_config};

/// The address the embedded default listens on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

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
    /// The guest chat, when enabled.
    pub guest: Option<GuestConfig>,
    /// True when the secret and API key were generated for this run.
    pub ephemeral_secrets: bool,
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

        let jwt = JwtConfig::from_raw(raw.jwt)?;
        if let Some(key) = &raw.api.key
            && key.len() < 16
        {
            return Err(invalid("api.key", "must be at least 16 bytes"));
        }
        let limits = Limits::from_raw(raw.limits)?;
        let keepalive = Keepalive::from_raw(raw.keepalive)?;
        let shutdown = ShutdownConfig::from_raw(raw.shutdown)?;

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

        let idempotency = Idempotency::from_raw(raw.idempotency)?;
        let mut namespaces = raw.namespaces;
        let guest = guest_config(raw.guest, &mut namespaces)?;
        let policies = policies(raw.default_namespace.as_ref(), &namespaces)?;
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
            guest,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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

    #[test]
    fn the_guest_chat_is_off_by_default_and_checked_when_on() {
        assert!(load("", &[]).unwrap().guest.is_none());
        let config = load(
            "",
            &[("HERALD_GUEST_ENABLED", "true"), ("HERALD_GUEST_ROOMS", "lobby, games")],
        )
        .unwrap();
        let guest = config.guest.expect("enabled");
        assert_eq!((guest.path.as_str(), guest.rooms.len()), ("/chat", 2));
        let room = herald_core::ChannelName::parse("chat:lobby").unwrap();
        assert!(
            config
                .policies
                .policy(&room)
                .is_ok_and(|p| p.join_leave && p.client_publish)
        );
        check_error("[guest]\nenabled = true\npath = \"/ws\"", "`guest.path`");
        check_error("[guest]\nenabled = true\nrooms = []", "`guest.rooms`");
        check_error("[guest]\nenabled = true\nrooms = [\"a b\"]", "`guest.rooms`");
        check_error(
            "[guest]\nenabled = true\nmax_username_length = 0",
            "`guest.max_username_length`",
        );
        check_error(
            "[guest]\nenabled = true\n[namespaces.chat]\njoin_leave = false",
            "`namespaces.chat.join_leave`",
        );
        let env_error = load("", &[("HERALD_GUEST_ENABLED", "yes")]).unwrap_err();
        assert!(env_error.contains("HERALD_GUEST_ENABLED"), "{env_error}");
    }
}
