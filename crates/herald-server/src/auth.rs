//! Token verification and minting.
//!
//! [`TokenVerifier`] is the seam the transport and API call: today a shared
//! secret (HS256/384/512); public keys and JWKS plug in behind the same trait
//! without touching callers. The accepted algorithms are pinned by
//! configuration: the token's header never chooses, and `none` is refused
//! before any key is consulted.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::JwtConfig;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// Unix seconds after which the token is no longer valid.
    pub expires_at: u64,
    /// Extra channels and `prefix*` patterns this user may subscribe to.
    pub channels: Vec<String>,
}

/// Why a token was refused. The messages go to clients: they say what is
/// wrong without echoing the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm `{0}` is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token has no `{0}` claim")]
    MissingClaim(String),
    #[error("token claim `{0}` is invalid")]
    InvalidClaim(String),
    #[error("no token was given")]
    NoToken,
}

impl AuthError {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::AlgorithmNotAllowed(_) => "algorithm",
            AuthError::BadSignature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "issuer",
            AuthError::WrongAudience => "audience",
            AuthError::MissingClaim(_) | AuthError::InvalidClaim(_) => "claims",
            AuthError::NoToken => "no_token",
        }
    }
}

/// The library refuses only an empty HMAC key; configuration refuses any
/// secret shorter than 16 bytes before a key is built.
const NON_EMPTY_SECRET: &str = "jwt.secret is validated to be at least 16 bytes";

/// Verifies bearer tokens.
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> Result<Identity, AuthError>;
}

/// JWT verification with a shared secret.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    /// Names of the allowed algorithms, compared with the token header first.
    allowed: Vec<Algorithm>,
    user_claim: String,
    channels_claim: String,
}

impl JwtVerifier {
    /// Builds a verifier; `config.secret` must be set (the embedded default
    /// fills it before this is called).
    pub fn new(config: &JwtConfig) -> Self {
        install_crypto_provider();
        let secret = config
            .secret
            .as_deref()
            .expect("jwt.secret is set before the verifier is built");
        let mut validation = Validation::new(config.algorithms[0]);
        validation.algorithms = config.algorithms.clone();
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked when
        // present: the library compares a claim only if the token has it.
        let mut required = vec!["exp"];
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        JwtVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()).expect(NON_EMPTY_SECRET),
            validation,
            allowed: config.algorithms.clone(),
            user_claim: config.user_claim.clone(),
            channels_claim: config.channels_claim.clone(),
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
}

impl TokenVerifier for JwtVerifier {
    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::NoToken);
        }
        // Read `alg` ourselves so that `none` and unknown names get a precise
        // answer and never reach the library's key selection.
        let header_b64 = token.split('.').next().ok_or(AuthError::Malformed)?;
        let header_json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Malformed)?;
        let header: RawHeader = serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed)?;
        let alg = header.alg.ok_or(AuthError::Malformed)?;
        if !self.allowed.iter().any(|allowed| format!("{allowed:?}") == alg) {
            let shown: String = alg.chars().take(16).collect();
            return Err(AuthError::AlgorithmNotAllowed(shown));
        }

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(|e| {
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed(alg.clone()),
                ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
                // A registered claim of the wrong JSON type (`"exp": "…"`).
                ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim.clone()),
                _ => AuthError::Malformed,
            }
        })?;
        let claims = data.claims;
        let user_id = match claims.get(&self.user_claim) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(AuthError::InvalidClaim(self.user_claim.clone())),
            None => return Err(AuthError::MissingClaim(self.user_claim.clone())),
        };
        if herald_core::ChannelName::user(&user_id).is_err() {
            return Err(AuthError::InvalidClaim(self.user_claim.clone()));
        }
        let expires_at = match claims.get("exp") {
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| AuthError::InvalidClaim("exp".into()))?,
            _ => return Err(AuthError::InvalidClaim("exp".into())),
        };
        let channels = match claims.get(&self.channels_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| AuthError::InvalidClaim(self.channels_claim.clone()))?,
            Some(_) => return Err(AuthError::InvalidClaim(self.channels_claim.clone())),
        };
        Ok(Identity {
            user_id,
            expires_at,
            channels,
        })
    }
}

/// Claims of a token minted by `herald token` and the embedded demo.
#[derive(Debug, Serialize)]
pub struct MintClaims<'a> {
    pub sub: &'a str,
    pub iat: u64,
    pub exp: u64,
    /// `jwt.issuer` and `jwt.audience` when configured: the verifier
    /// requires them, so a minted token carries them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub channels: &'a [String],
}

/// Signs a token with the configured secret and first configured algorithm.
pub fn mint(config: &JwtConfig, user_id: &str, channels: &[String], ttl_seconds: u64) -> String {
    install_crypto_provider();
    let secret = config.secret.as_deref().expect("jwt.secret is set before minting");
    let now = unix_now();
    let claims = MintClaims {
        sub: user_id,
        iat: now,
        exp: now + ttl_seconds,
        iss: config.issuer.as_deref(),
        aud: config.audience.as_deref(),
        channels,
    };
    jsonwebtoken::encode(
        &Header::new(config.algorithms[0]),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).expect(NON_EMPTY_SECRET),
    )
    .expect("HMAC signing with a valid secret cannot fail")
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn install_crypto_provider() {
    // An error means a provider is installed already, which is what we want.
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RawConfig};

    fn jwt_config(extra: &str) -> JwtConfig {
        let raw = RawConfig::from_toml(&format!("[jwt]\nsecret = \"unit-test-secret-0123456789\"\n{extra}")).unwrap();
        Config::from_raw(raw).unwrap().jwt
    }

    fn sign(claims: Value, alg: Algorithm, secret: &str) -> String {
        install_crypto_provider();
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn unsigned(claims: Value) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            engine.encode(br#"{"alg":"none","typ":"JWT"}"#),
            engine.encode(claims.to_string())
        )
    }

    #[test]
    fn verification_outcomes() {
        let config = jwt_config("issuer = \"auth\"\nalgorithms = [\"HS256\", \"HS512\"]");
        let verifier = JwtVerifier::new(&config);
        let secret = "unit-test-secret-0123456789";
        let exp = unix_now() + 60;
        let good = serde_json::json!({"sub": "alice", "exp": exp, "iss": "auth", "channels": ["team:*"]});
        let cases: Vec<(String, Result<&str, AuthError>)> = vec![
            (sign(good.clone(), Algorithm::HS256, secret), Ok("alice")),
            (sign(good.clone(), Algorithm::HS512, secret), Ok("alice")),
            (
                sign(good.clone(), Algorithm::HS384, secret),
                Err(AuthError::AlgorithmNotAllowed("HS384".into())),
            ),
            (
                sign(good.clone(), Algorithm::HS256, "another-secret-0123456789"),
                Err(AuthError::BadSignature),
            ),
            (
                unsigned(good.clone()),
                Err(AuthError::AlgorithmNotAllowed("none".into())),
            ),
            (
                sign(
                    serde_json::json!({"sub": "a", "exp": 1_000, "iss": "auth"}),
                    Algorithm::HS256,
                    secret,
                ),
                Err(AuthError::Expired),
            ),
            (
                sign(serde_json::json!({"sub": "a", "iss": "auth"}), Algorithm::HS256, secret),
                Err(AuthError::MissingClaim("exp".into())),
            ),
            (
                sign(serde_json::json!({"exp": exp, "iss": "auth"}), Algorithm::HS256, secret),
                Err(AuthError::MissingClaim("sub".into())),
            ),
            (
                sign(
                    serde_json::json!({"sub": "a", "exp": exp, "iss": "evil"}),
                    Algorithm::HS256,
                    secret,
                ),
                Err(AuthError::WrongIssuer),
            ),
            (
                sign(
                    serde_json::json!({"sub": "a b", "exp": exp, "iss": "auth"}),
                    Algorithm::HS256,
                    secret,
                ),
                Err(AuthError::InvalidClaim("sub".into())),
            ),
            ("garbage".into(), Err(AuthError::Malformed)),
            (String::new(), Err(AuthError::NoToken)),
        ];
        for (token, expected) in cases {
            let got = verifier.verify(&token).map(|identity| identity.user_id);
            assert_eq!(got.as_deref().map_err(Clone::clone), expected, "token {token}");
        }
    }

    #[test]
    fn minted_tokens_verify() {
        for extra in ["", "issuer = \"auth\"\naudience = \"herald\""] {
            let config = jwt_config(extra);
            let token = mint(&config, "bob", &["group:1".into()], 60);
            let identity = JwtVerifier::new(&config).verify(&token).unwrap();
            assert_eq!(identity.user_id, "bob");
            assert_eq!(identity.channels, ["group:1"]);
        }
    }
}
