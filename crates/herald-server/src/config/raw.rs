//! The raw layer of configuration: `RawConfig` mirrors the TOML file with
//! every field optional, so that the file, `HERALD_*` environment variables
//! and flags can be merged before anything is validated (in `config`).

use std::collections::HashMap;
use std::path::Path;

use herald_core::policy::SubscribePolicy;
use serde::Deserialize;

use super::check::{ConfigError, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    #[serde(default)]
    pub jwt: RawJwt,
    #[serde(default)]
    pub api: RawApi,
    #[serde(default)]
    pub redis: RawRedis,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub keepalive: RawKeepalive,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub origins: RawOrigins,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub idempotency: RawIdempotency,
    #[serde(default)]
    pub namespaces: HashMap<String, RawNamespace>,
    /// The policy of bare channel names (no namespace).
    pub default_namespace: Option<RawNamespace>,
    pub demo_page: Option<bool>,
    #[serde(default)]
    pub guest: RawGuest,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub secret: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub user_claim: Option<String>,
    pub channels_claim: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub prefix: Option<String>,
    pub subscribe_timeout: Option<String>,
    pub streams: Option<bool>,
    pub claim_idle: Option<String>,
    pub dead_letter_max_len: Option<usize>,
    pub node_timeout: Option<String>,
    #[serde(default)]
    pub routes: Vec<herald_core::route::RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_connections_per_user: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_message_size: Option<usize>,
    pub handshake_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub auth_timeout: Option<String>,
    pub commands_per_second: Option<u32>,
    pub command_burst: Option<u32>,
    pub queue_messages: Option<usize>,
    pub queue_bytes: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub send_buffer: Option<usize>,
    pub write_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub ping_interval: Option<String>,
    pub pong_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_window: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigins {
    pub allowed: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    pub window: Option<String>,
    pub capacity: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuest {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    pub namespace: Option<String>,
    pub rooms: Option<Vec<String>>,
    pub max_username_length: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNamespace {
    pub subscribe: Option<SubscribePolicy>,
    pub client_publish: Option<bool>,
    pub presence: Option<bool>,
    pub history_size: Option<usize>,
    pub history_ttl: Option<String>,
    pub join_leave: Option<bool>,
}

impl RawConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: shown, message })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies `HERALD_*` variables from `lookup` (the process environment in
    /// production, a map in tests). The table is the documented list.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let text = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let number = |name: &str| -> Result<Option<usize>, ConfigError> {
            text(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| invalid(name, format!("`{v}` is not a whole number")))
                })
                .transpose()
        };
        let set = |slot: &mut Option<String>, name: &str| {
            if let Some(value) = text(name) {
                *slot = Some(value);
            }
        };
        set(&mut self.listen, "HERALD_LISTEN");
        set(&mut self.jwt.secret, "HERALD_JWT_SECRET");
        set(&mut self.jwt.issuer, "HERALD_JWT_ISSUER");
        set(&mut self.jwt.audience, "HERALD_JWT_AUDIENCE");
        set(&mut self.api.key, "HERALD_API_KEY");
        set(&mut self.redis.url, "HERALD_REDIS_URL");
        set(&mut self.redis.prefix, "HERALD_REDIS_PREFIX");
        set(&mut self.log.format, "HERALD_LOG_FORMAT");
        set(&mut self.log.level, "HERALD_LOG_LEVEL");
        set(&mut self.shutdown.timeout, "HERALD_SHUTDOWN_TIMEOUT");
        set(&mut self.shutdown.drain_window, "HERALD_SHUTDOWN_DRAIN_WINDOW");
        set(&mut self.guest.path, "HERALD_GUEST_PATH");
        if let Some(value) = text("HERALD_GUEST_ENABLED") {
            let enabled = match value.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(invalid(
                        "HERALD_GUEST_ENABLED",
                        format!("`{value}` is not true or false"),
                    ));
                }
            };
            self.guest.enabled = Some(enabled);
        }
        if let Some(list) = text("HERALD_GUEST_ROOMS") {
            self.guest.rooms = Some(list.split(',').map(|s| s.trim().to_owned()).collect());
        }
        if let Some(list) = text("HERALD_JWT_ALGORITHMS") {
            self.jwt.algorithms = Some(list.split(',').map(|s| s.trim().to_owned()).collect());
        }
        if let Some(list) = text("HERALD_ORIGINS_ALLOWED") {
            self.origins.allowed = Some(list.split(',').map(|s| s.trim().to_owned()).collect());
        }
        if let Some(n) = number("HERALD_MAX_CONNECTIONS")? {
            self.limits.max_connections = Some(n);
        }
        if let Some(n) = number("HERALD_MAX_CONNECTIONS_PER_USER")? {
            self.limits.max_connections_per_user = Some(n);
        }
        if let Some(n) = number("HERALD_MAX_CONNECTIONS_PER_IP")? {
            self.limits.max_connections_per_ip = Some(n);
        }
        if let Some(n) = number("HERALD_MAX_MESSAGE_SIZE")? {
            self.limits.max_message_size = Some(n);
        }
        Ok(())
    }
}
