//! `[jwt]`: how connection tokens are verified.

use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::check::{ConfigError, duration, invalid, non_empty};
use super::raw::RawJwt;

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

impl JwtConfig {
    pub(crate) fn from_raw(raw: RawJwt) -> Result<JwtConfig, ConfigError> {
        let algorithms = raw
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
        if let Some(secret) = &raw.secret
            && secret.len() < 16
        {
            return Err(invalid("jwt.secret", "must be at least 16 bytes"));
        }
        Ok(JwtConfig {
            secret: raw.secret,
            algorithms,
            user_claim: non_empty("jwt.user_claim", raw.user_claim, "sub")?,
            channels_claim: non_empty("jwt.channels_claim", raw.channels_claim, "channels")?,
            issuer: raw.issuer,
            audience: raw.audience,
            leeway: duration("jwt.leeway", raw.leeway, "5s")?,
        })
    }
}
