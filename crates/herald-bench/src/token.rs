//! HS256 JWTs minted in-process, so that thousands of connections need no
//! round trip to an auth service (and no dependency on the server's crate).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `{"alg":"HS256","typ":"JWT"}`, base64url-encoded.
const HS256_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// A token for user `subject` that expires at `expires_at` (Unix seconds),
/// a member of every group (Herald's groups are members-only by default, and
/// the scenarios subscribe to `group:…` channels).
pub fn mint(secret: &[u8], subject: &str, expires_at: u64) -> String {
    let claims = serde_json::json!({ "sub": subject, "exp": expires_at, "channels": ["group:*"] });
    sign(secret, &claims.to_string())
}

/// Signs `claims` (a JSON object's text) with HS256.
pub fn sign(secret: &[u8], claims: &str) -> String {
    let signing_input = format!("{HS256_HEADER}.{}", URL_SAFE_NO_PAD.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_token() {
        // jwt.io's example HS256 token, signed with its example secret.
        let token = sign(
            b"your-256-bit-secret",
            r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
        );
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
             SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
        );
    }

    #[test]
    fn minted_claims_read_back() {
        let token = mint(b"secret", "u7", 2_000_000_000);
        let claims = token.split('.').nth(1).expect("three parts");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("base64url")).expect("JSON");
        assert_eq!(
            claims,
            serde_json::json!({"sub": "u7", "exp": 2_000_000_000u64, "channels": ["group:*"]})
        );
    }
}
