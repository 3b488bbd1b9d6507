//! What every section's validation shares: [`ConfigError`], which names
//! the key at fault, and the checks of common kinds of value.

use std::time::Duration;

use herald_core::duration::parse_duration;

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

pub(crate) fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

pub(crate) fn duration(key: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(value.as_deref().unwrap_or(default)).map_err(|problem| invalid(key, problem))
}

pub(crate) fn positive(key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(invalid(key, "must be greater than 0")),
        n => Ok(n),
    }
}

pub(crate) fn non_empty(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    match value {
        Some(v) if v.is_empty() => Err(invalid(key, "must not be empty")),
        Some(v) => Ok(v),
        None => Ok(default.to_owned()),
    }
}
