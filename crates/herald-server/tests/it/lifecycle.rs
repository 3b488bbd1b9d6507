//! The `herald` binary as a user runs it: the embedded default, the CLI
//! helpers, SIGTERM, configuration errors, and tokens kept out of logs.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::{API_KEY, BIN, DEADLINE, SECRET, configured_env, spawn, view};

/// The next line a child process printed, within the deadline.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> String {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("a line within the deadline")
        .expect("the pipe is readable")
        .expect("the process printed a line before exiting")
}

/// Starts `herald listen` against the node at `addr` with `token` and
/// `extra` arguments; returns the child and its stdout, line by line.
fn spawn_listen(addr: &str, token: &str, extra: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut listener = Command::new(BIN)
        .args(["listen", "--url", &format!("ws://{addr}/ws"), "--token", token])
        .args(extra)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(listener.stdout.take().unwrap()).lines();
    (listener, lines)
}

fn terminate(child: &Child) {
    let pid = child.id().expect("the child is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn embedded_default_prints_a_token_and_publish_line_that_work() {
    let mut server = spawn(&[], &[], Stdio::piped()).await;
    let banner = server.banner.join("\n");
    let token = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("demo token:"))
        .expect("a demo token line");
    let token = token.split_whitespace().next().unwrap().to_owned();
    let publish_line = banner
        .lines()
        .find(|l| l.trim().starts_with("publish:"))
        .expect("a publish line");
    let api_key = publish_line
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    assert!(publish_line.contains(&format!("http://{}/api/v1/publish", server.addr)));

    let (mut listener, mut listener_out) = spawn_listen(&server.addr, &token, &["--count", "1"]);
    let hello = next_line(&mut listener_out).await;
    assert!(hello.contains("auth_success"), "{hello}");
    // The printed curl line's request, sent with the printed key.
    let (status, body) = herald_server::http_client::request(
        "POST",
        &format!("http://{}/api/v1/publish", server.addr),
        Some(&api_key),
        Some(json!({"channel": "user:demo", "data": {"hello": "world"}}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let delivered = next_line(&mut listener_out).await;
    let frame: serde_json::Value = serde_json::from_str(&delivered).unwrap();
    assert_eq!(frame["data"], json!({"hello": "world"}));
    let status = tokio::time::timeout(DEADLINE, listener.wait()).await.unwrap().unwrap();
    assert!(status.success(), "listen --count 1 exits cleanly");
    // The demo page is served.
    let (status, page) = herald_server::http_client::request("GET", &format!("http://{}/", server.addr), None, None)
        .await
        .unwrap();
    assert!(status == 200 && page.contains("<title>Herald demo</title>"));
    terminate(&server.child);
    assert!(
        tokio::time::timeout(DEADLINE, server.child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn cli_token_publish_and_listen_work_together() {
    let mut server = spawn(&[], &configured_env(), Stdio::piped()).await;
    let token = Command::new(BIN)
        .args(["token", "--user", "alice", "--groups", "g1", "--ttl", "10m"])
        .env("HERALD_JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();

    let (mut listener, mut out) = spawn_listen(&server.addr, &token, &["--subscribe", "group:g1", "--count", "1"]);
    assert!(next_line(&mut out).await.contains("auth_success"));
    let ack = next_line(&mut out).await;
    assert!(ack.contains("\"ack\""), "subscribed: {ack}");
    let published = Command::new(BIN)
        .args([
            "publish",
            "group:g1",
            r#"{"a":1}"#,
            "--type",
            "update",
            "--url",
            &format!("http://{}", server.addr),
        ])
        .env("HERALD_API_KEY", API_KEY)
        .output()
        .await
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stdout)
    );
    let frame: serde_json::Value = serde_json::from_str(&next_line(&mut out).await).unwrap();
    assert_eq!(
        (frame["type"].clone(), frame["data"].clone()),
        (json!("update"), json!({"a": 1}))
    );
    assert!(
        tokio::time::timeout(DEADLINE, listener.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
    terminate(&server.child);
    tokio::time::timeout(DEADLINE, server.child.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn sigterm_sends_going_away_and_exits_in_time() {
    let config = std::env::temp_dir().join(format!("herald-sigterm-{}.toml", std::process::id()));
    std::fs::write(&config, "[shutdown]\ndrain_window = \"500ms\"\ntimeout = \"3s\"\n").unwrap();
    let mut server = spawn(
        &["--config", config.to_str().unwrap()],
        &configured_env(),
        Stdio::piped(),
    )
    .await;
    let view = view(&server.addr);
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(view.connect(user).await);
    }
    let started = Instant::now();
    terminate(&server.child);
    for client in &mut clients {
        let frame = client.expect_type("disconnect").await;
        assert_eq!(frame["data"]["reconnect"], true);
        assert_eq!(client.expect_close().await.0, 1001);
    }
    let status = tokio::time::timeout(Duration::from_secs(5), server.child.wait())
        .await
        .expect("exits within the shutdown timeout")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    // Refuses new connections while draining is covered by the exit itself.
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn query_tokens_never_reach_the_logs() {
    let mut env = configured_env();
    env.push(("RUST_LOG", "trace"));
    let mut server = spawn(&[], &env, Stdio::piped()).await;
    let view = view(&server.addr);
    let token = view.token("alice");
    let mut client = view.connect_token(&token).await;
    client.round_trip().await;
    let mut refused = view.connect_raw(&format!("?token={token}x")).await.unwrap();
    refused.expect_type("auth_failed").await;
    terminate(&server.child);
    let mut stderr = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(stderr.contains("herald listening"), "logs were captured:\n{stderr}");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!stderr.contains(signature), "a token leaked into the logs:\n{stderr}");
}

#[tokio::test]
async fn configuration_errors_name_the_key_and_exit_non_zero() {
    let bad = std::env::temp_dir().join(format!("herald-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "[limits]\nauth_timeout = \"soon\"\n").unwrap();
    let output = Command::new(BIN)
        .args(["config", "check", "--config", bad.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.auth_timeout"), "{stderr}");
    let _ = std::fs::remove_file(bad);

    let output = Command::new(BIN)
        .args(["config", "check"])
        .env_remove("HERALD_JWT_SECRET")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "the empty configuration is valid");

    let output = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("HERALD_JWT_SECRET")
        .env_remove("HERALD_API_KEY")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to listen on non-loopback"), "{stderr}");
}

/// Issue 9.11: groups are members-only by default, and the embedded demo
/// still works: its tokens make their users members of the demo room.
#[tokio::test]
async fn the_embedded_demo_room_works_with_members_only_groups() {
    let mut server = spawn(&[], &[], Stdio::null()).await;
    let view = crate::harness::view(&server.addr);
    let mut clients = Vec::new();
    for user in ["alice", "bob"] {
        let (status, body) = herald_server::http_client::request(
            "GET",
            &format!("http://{}/demo/token?user={user}", server.addr),
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let token: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut client = view.connect_token(token["token"].as_str().unwrap()).await;
        let ack = client.command("join_group", "j", json!({"group_id": "demo"})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        clients.push(client);
    }
    let ack = clients[0]
        .command("send_message", "m", json!({"group_id": "demo", "content": "hi"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(clients[1].expect_type("new_message").await["data"]["content"], "hi");
    // Other groups stay members-only.
    let refused = clients[0]
        .command("join_group", "o", json!({"group_id": "other"}))
        .await;
    assert_eq!(refused["data"]["code"], "forbidden", "{refused}");
    terminate(&server.child);
    let _ = tokio::time::timeout(DEADLINE, server.child.wait()).await;
}
