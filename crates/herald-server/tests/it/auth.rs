//! Authentication: both paths, every refusal, expiry and refresh, Origin.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{SECRET, TestServer};

fn now() -> u64 {
    herald_server::auth::unix_now()
}

fn sign(claims: Value, alg: Algorithm, secret: &str) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
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

#[tokio::test]
async fn query_token_authenticates_before_any_other_frame() {
    let server = TestServer::start().await;
    let mut client = server
        .connect_raw(&format!("?token={}", server.token("alice")))
        .await
        .unwrap();
    let success = client.next_frame().await;
    assert_eq!(success["type"], "auth_success");
    assert_eq!(success["data"]["user_id"], "alice");
    assert_eq!(success["data"]["channel"], "user:alice");
    assert!(success["data"]["expires_at"].as_u64().unwrap() > now());
}

#[tokio::test]
async fn first_frame_auth_authenticates() {
    let server = TestServer::start().await;
    let mut client = server.connect_raw("").await.unwrap();
    client
        .send(json!({"type": "auth", "data": {"token": server.token("bob")}}))
        .await;
    let success = client.expect_type("auth_success").await;
    assert_eq!(success["data"]["user_id"], "bob");
    client.round_trip().await;
}

/// Each bad token gets `auth_failed` with a message that names the problem,
/// then close code 4001, on both auth paths.
#[tokio::test]
async fn every_bad_token_is_refused_with_4001() {
    let server = TestServer::start().await;
    let exp = now() + 600;
    let cases = [
        (
            sign(
                json!({"sub": "a", "exp": exp}),
                Algorithm::HS256,
                "not-the-right-secret-0123",
            ),
            "signature",
        ),
        (unsigned(json!({"sub": "a", "exp": exp})), "algorithm `none`"),
        (
            sign(json!({"sub": "a", "exp": exp}), Algorithm::HS512, SECRET),
            "algorithm `HS512`",
        ),
        (
            sign(json!({"sub": "a", "exp": now() - 3_600}), Algorithm::HS256, SECRET),
            "expired",
        ),
        (sign(json!({"exp": exp}), Algorithm::HS256, SECRET), "no `sub` claim"),
        (sign(json!({"sub": "a"}), Algorithm::HS256, SECRET), "no `exp` claim"),
        ("not-a-jwt".to_owned(), "malformed"),
    ];
    for (token, fragment) in cases {
        for via_frame in [false, true] {
            let mut client = if via_frame {
                let mut client = server.connect_raw("").await.unwrap();
                client.send(json!({"type": "auth", "data": {"token": token}})).await;
                client
            } else {
                server.connect_raw(&format!("?token={token}")).await.unwrap()
            };
            let failed = client.expect_type("auth_failed").await;
            let message = failed["data"]["message"].as_str().unwrap();
            assert!(message.contains(fragment), "{fragment}: {failed}");
            assert_eq!(client.expect_close().await.0, 4001, "{fragment}");
        }
    }
    assert!(server.metric("herald_auth_failures_total{reason=\"signature\"}").await >= 2.0);
}

#[tokio::test]
async fn auth_timeout_closes_with_4002() {
    let server = TestServer::start_with("[limits]\nauth_timeout = \"300ms\"").await;
    let mut client = server.connect_raw("").await.unwrap();
    let failed = client.expect_type("auth_failed").await;
    assert!(failed["data"]["message"].as_str().unwrap().contains("timed out"));
    assert_eq!(client.expect_close().await.0, 4002);
}

#[tokio::test]
async fn commands_before_auth_are_not_served() {
    let server = TestServer::start().await;
    let mut client = server.connect_raw("").await.unwrap();
    client
        .send(json!({"type": "subscribe", "message_id": "s1", "data": {"channel": "group:1"}}))
        .await;
    let error = client.expect_type("error").await;
    assert_eq!(error["message_id"], "s1");
    assert_eq!(error["data"]["code"], "not_authenticated");
    client.send(json!({"type": "ping", "message_id": "p1"})).await;
    assert_eq!(client.expect_type("error").await["data"]["code"], "not_authenticated");
    // The connection is still usable: authenticate now.
    client
        .send(json!({"type": "auth", "data": {"token": server.token("alice")}}))
        .await;
    client.expect_type("auth_success").await;
}

#[tokio::test]
async fn expiry_closes_with_4003() {
    let server = TestServer::start_with("[jwt]\nleeway = \"0s\"").await;
    let mut client = server.connect_token(&server.token_with("alice", &[], 1)).await;
    assert_eq!(client.expect_close().await, (4003, "token expired".into()));
}

#[tokio::test]
async fn refresh_keeps_the_connection_past_the_old_expiry() {
    // Round trips pace the wait below, so the rate limit must not interfere.
    let limits = "[limits]\ncommands_per_second = 1000000\ncommand_burst = 1000000";
    let server = TestServer::start_with(&format!("[jwt]\nleeway = \"0s\"\n{limits}")).await;
    let short = server.token_with("alice", &[], 1);
    let old_expiry = now() + 1;
    let mut client = server.connect_token(&short).await;
    let ack = client
        .command("refresh", "r1", json!({"token": server.token_with("alice", &[], 600)}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(ack["data"]["expires_at"].as_u64().unwrap() > old_expiry);
    // Keep talking until the old token is well past its expiry; every round
    // trip proves the connection is still open.
    let deadline = std::time::Instant::now() + crate::harness::DEADLINE;
    while now() <= old_expiry + 1 {
        assert!(std::time::Instant::now() < deadline, "clock did not advance");
        client.round_trip().await;
    }
    client.round_trip().await;
}

#[tokio::test]
async fn refresh_with_another_users_token_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.connect("alice").await;
    let reply = client
        .command("refresh", "r1", json!({"token": server.token("mallory")}))
        .await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["data"]["code"], "invalid_token");
    assert!(reply["data"]["message"].as_str().unwrap().contains("another user"));
    let reply = client.command("refresh", "r2", json!({"token": "garbage"})).await;
    assert_eq!(reply["data"]["code"], "invalid_token");
    client.round_trip().await;
}

#[tokio::test]
async fn origin_is_checked() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let with_origin = |origin: &str| {
        let mut request = format!("{}?token={token}", server.ws_url())
            .into_client_request()
            .unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    let refused = server.connect_request(with_origin("http://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("origin_not_allowed"), "{body}");
        }
        other => panic!("expected HTTP 403, got {:?}", other.map(|_| ())),
    }
    let same_origin = format!("http://{}", server.addr);
    let mut client = server
        .connect_request(with_origin(&same_origin))
        .await
        .expect("same origin is allowed");
    client.expect_type("auth_success").await;

    let listed = TestServer::start_with("[origins]\nallowed = [\"https://app.example.com\"]").await;
    let token = listed.token("alice");
    let mut request = format!("{}?token={token}", listed.ws_url())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://app.example.com".parse().unwrap());
    listed
        .connect_request(request)
        .await
        .expect("a listed origin is allowed");
    let mut request = format!("{}?token={token}", listed.ws_url())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert("origin", same_origin.parse().unwrap());
    assert!(
        listed.connect_request(request).await.is_err(),
        "an unlisted origin is refused"
    );
}

#[tokio::test]
async fn an_absurd_exp_is_served_without_overflow_and_cleaned_up() {
    let server = TestServer::start().await;
    let token = sign(
        json!({"sub": "alice", "exp": 10_000_000_000_000_000_000u64}),
        Algorithm::HS256,
        SECRET,
    );
    let mut client = server.connect_token(&token).await;
    let reply = client.command("refresh", "r", json!({"token": token})).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    client.round_trip().await;
    client.ws.close(None).await.unwrap();
    // The session's subscriptions and the connection count are released.
    let deadline = std::time::Instant::now() + crate::harness::DEADLINE;
    loop {
        let stats: Value = serde_json::from_str(&server.http("GET", "/stats", None, None).await.1).unwrap();
        if stats["connections"] == 0 && stats["channels"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never cleaned up: {stats}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn pre_auth_frames_are_rate_limited_with_an_answer_then_cut_off() {
    let server = TestServer::start_with("[limits]\ncommands_per_second = 1\ncommand_burst = 2").await;
    let mut client = server.connect_raw("").await.unwrap();
    for i in 0..3 {
        client.send(json!({"type": "ping", "message_id": i})).await;
    }
    assert_eq!(client.expect_type("error").await["data"]["code"], "not_authenticated");
    assert_eq!(client.expect_type("error").await["data"]["code"], "not_authenticated");
    let limited = client.expect_type("error").await;
    assert_eq!(
        (limited["message_id"].clone(), limited["data"]["code"].clone()),
        (json!(2), json!("rate_limited"))
    );
    client.send_text("garbage").await;
    assert_eq!(client.expect_close().await.0, 4029);
}

#[tokio::test]
async fn refresh_drops_subscriptions_the_new_token_no_longer_grants() {
    let server = TestServer::start_with("[namespaces.team]\nsubscribe = \"claim\"").await;
    let mut client = server
        .connect_token(&server.token_with("alice", &["team:red", "team:blue"], 600))
        .await;
    client.subscribe("team:red").await;
    client.subscribe("team:blue").await;
    let ack = client
        .command(
            "refresh",
            "r",
            json!({"token": server.token_with("alice", &["team:blue"], 600)}),
        )
        .await;
    assert_eq!(ack["data"]["unsubscribed"], json!(["team:red"]), "{ack}");
    server.publish_ok("team:red", json!("revoked")).await;
    server.publish_ok("team:blue", json!("kept")).await;
    assert_eq!(client.next_frame().await["data"], "kept");
}

/// Signs `claims` under a header given as raw JSON (for headers the library
/// would not build itself).
fn sign_with_header(header: Value, claims: Value) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!(
        "{}.{}",
        engine.encode(header.to_string()),
        engine.encode(claims.to_string())
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

/// Connects with `token` on both auth paths; asserts `auth_failed` naming
/// `fragment`, then close 4001.
async fn assert_refused(server: &TestServer, token: &str, fragment: &str) {
    for via_frame in [false, true] {
        let mut client = if via_frame {
            let mut client = server.connect_raw("").await.unwrap();
            client.send(json!({"type": "auth", "data": {"token": token}})).await;
            client
        } else {
            server.connect_raw(&format!("?token={token}")).await.unwrap()
        };
        let failed = client.expect_type("auth_failed").await;
        let message = failed["data"]["message"].as_str().unwrap();
        assert!(message.contains(fragment), "{fragment}: {failed}");
        assert_eq!(client.expect_close().await.0, 4001, "{fragment}");
    }
    // The user-token HTTP endpoints refuse it the same way.
    let (status, body) = server.http("GET", "/api/v1/unread", Some(token), None).await;
    assert_eq!(status, 401, "{fragment}: {body}");
    assert!(body.contains(fragment), "{fragment}: {body}");
}

/// Issue 9.13: with `jwt.issuer` and `jwt.audience` configured, a token
/// without the claim is refused, not only one with a wrong value.
#[tokio::test]
async fn a_configured_issuer_and_audience_are_required() {
    let server = TestServer::start_with("[jwt]\nissuer = \"https://auth.example\"\naudience = \"herald\"").await;
    let exp = now() + 600;
    let (iss, aud) = ("https://auth.example", "herald");
    let token = |claims: Value| sign(claims, Algorithm::HS256, SECRET);
    assert_refused(
        &server,
        &token(json!({"sub": "a", "exp": exp, "aud": aud})),
        "no `iss` claim",
    )
    .await;
    assert_refused(
        &server,
        &token(json!({"sub": "a", "exp": exp, "iss": iss})),
        "no `aud` claim",
    )
    .await;
    assert_refused(&server, &token(json!({"sub": "a", "exp": exp})), "no `").await;
    assert_refused(
        &server,
        &token(json!({"sub": "a", "exp": exp, "iss": "https://evil.example", "aud": aud})),
        "issuer",
    )
    .await;
    let good = token(json!({"sub": "alice", "exp": exp, "iss": iss, "aud": aud}));
    server.connect_token(&good).await.round_trip().await;
    let (status, body) = server.http("GET", "/api/v1/unread", Some(&good), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(server.metric("herald_auth_failures_total{reason=\"claims\"}").await >= 6.0);
}

/// Issue 9.20: claims of the wrong JSON type and unknown critical header
/// parameters are refused, never skipped.
#[tokio::test]
async fn confused_claim_types_and_unknown_crit_headers_are_refused() {
    let server = TestServer::start_with("[jwt]\nissuer = \"https://auth.example\"").await;
    let exp = now() + 600;
    let iss = "https://auth.example";
    let token = |claims: Value| sign(claims, Algorithm::HS256, SECRET);
    assert_refused(
        &server,
        &token(json!({"sub": "a", "exp": (exp).to_string(), "iss": iss})),
        "`exp`",
    )
    .await;
    assert_refused(&server, &token(json!({"sub": "a", "exp": exp, "iss": 42})), "`iss`").await;
    assert_refused(
        &server,
        &token(json!({"sub": "a", "exp": exp, "iss": iss, "nbf": "0"})),
        "`nbf`",
    )
    .await;
    let crit = sign_with_header(
        json!({"alg": "HS256", "typ": "JWT", "crit": ["x-herald-unknown"], "x-herald-unknown": true}),
        json!({"sub": "a", "exp": exp, "iss": iss}),
    );
    assert_refused(&server, &crit, "malformed").await;
    // The same header without `crit` is fine: the refusal is about `crit`.
    let plain = sign_with_header(
        json!({"alg": "HS256", "typ": "JWT", "x-herald-unknown": true}),
        json!({"sub": "alice", "exp": exp, "iss": iss}),
    );
    server.connect_token(&plain).await.round_trip().await;
}
