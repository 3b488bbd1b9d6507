//! Configuration: a TOML file, overridden by `HERALD_*` environment variables,
//! overridden by command-line flags, validated once into a typed [`Config`].
//!
//! `raw` mirrors the file; every field is optional so that the layers can
//! be merged. [`Config::from_raw`] (`validated`) turns it into settings that
//! the rest of the server uses without re-checking, section by section (one
//! file each); an invalid value is reported with the name of its key
//! (`check`). Configuration depends on no part of the server it configures.

mod check;
mod guest;
mod jwt;
mod limits;
mod namespaces;
mod raw;
mod redis;
mod validated;

pub use check::ConfigError;
pub use guest::{DEFAULT_GUEST_PATH, GuestConfig};
pub use jwt::JwtConfig;
pub use limits::{Idempotency, Keepalive, Limits, ShutdownConfig};
pub use namespaces::MAX_HISTORY_SIZE;
pub use raw::{
    RawApi, RawConfig, RawGuest, RawIdempotency, RawJwt, RawKeepalive, RawLimits, RawLog, RawNamespace, RawOrigins,
    RawRedis, RawShutdown,
};
pub use redis::{MIN_CLAIM_IDLE, MIN_NODE_TIMEOUT, RedisConfig, StreamsConfig};
pub use validated::{Config, DEFAULT_LISTEN, LogConfig, LogFormat, OriginPolicy};
