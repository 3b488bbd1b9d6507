//! Test harness: a real node on port 0, real WebSocket clients, a real HTTP
//! client. Every wait has a deadline; nothing synchronises with a sleep.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_server::config::{Config, RawConfig};
use herald_server::server::RunningServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const API_KEY: &str = "integration-test-api-key-0123456789";
/// Groups are members-only by default; most tests use `group:…` as any
/// channel that every test user may join, so the harness opens the
/// namespace (one line of configuration, as an operator would) unless a
/// test starts with [`TestServer::start_plain`] or sets its own
/// `subscribe`.
pub const OPEN_GROUPS: &str = "[namespaces.group]\nsubscribe = \"authenticated\"";
/// How long any single expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestServer {
    /// Keeps an in-process node alive for the test; `None` for a view of a
    /// node running in a child process.
    #[allow(dead_code)]
    pub running: Option<RunningServer>,
    pub addr: std::net::SocketAddr,
    pub config: Config,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts a node with the test secret and key, an open `group`
    /// namespace ([`OPEN_GROUPS`]) and `extra` TOML (which may override it).
    pub async fn start_with(extra: &str) -> Self {
        Self::start_plain(&format!("{OPEN_GROUPS}\n{extra}")).await
    }

    /// Starts a node with the test secret and key plus `extra` TOML, and
    /// otherwise the server's own defaults.
    pub async fn start_plain(extra: &str) -> Self {
        let toml = format!(
            "listen = \"127.0.0.1:0\"\n{}\n[jwt]\nsecret = \"{SECRET}\"\n[api]\nkey = \"{API_KEY}\"\n",
            extra.trim()
        );
        let toml = merge_sections(&toml);
        let raw = RawConfig::from_toml(&toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let config = Config::from_raw(raw).expect("test config is valid");
        let running = herald_server::server::start(config.clone())
            .await
            .expect("server starts");
        let addr = running.local_addr;
        TestServer {
            running: Some(running),
            addr,
            config,
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.token_with(user, &[], 3_600)
    }

    pub fn token_with(&self, user: &str, channels: &[&str], ttl_seconds: u64) -> String {
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        herald_server::auth::mint(&self.config.jwt, user, &channels, ttl_seconds)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects with a query token and waits for `auth_success`.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_token(&self.token(user)).await
    }

    pub async fn connect_token(&self, token: &str) -> Client {
        let mut client = self
            .connect_raw(&format!("?token={token}"))
            .await
            .expect("upgrade succeeds");
        let success = client.expect_type("auth_success").await;
        assert!(success["data"]["user_id"].is_string(), "{success}");
        client
    }

    /// Connects (and authenticates) with a 4 KiB receive buffer: for a
    /// client that will stop reading, so that the kernel does not absorb
    /// megabytes on its behalf.
    pub async fn connect_small_window(&self, user: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        let request = format!("{}?token={}", self.ws_url(), self.token(user))
            .into_client_request()
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        let mut client = Client { ws };
        client.expect_type("auth_success").await;
        client
    }

    /// Opens `/ws{query}` without waiting for anything.
    pub async fn connect_raw(&self, query: &str) -> Result<Client, tungstenite::Error> {
        let request = format!("{}{query}", self.ws_url()).into_client_request()?;
        self.connect_request(request).await
    }

    pub async fn connect_request(
        &self,
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, tungstenite::Error> {
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect within the deadline")?;
        Ok(Client { ws })
    }

    pub async fn http(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<String>) -> (u16, String) {
        let url = format!("http://{}{path}", self.addr);
        tokio::time::timeout(
            DEADLINE,
            herald_server::http_client::request(method, &url, bearer, body),
        )
        .await
        .expect("HTTP answer within the deadline")
        .expect("HTTP request succeeds")
    }

    /// `POST /api/v1/publish` with the API key; returns status and JSON body.
    pub async fn publish(&self, body: Value) -> (u16, Value) {
        let (status, text) = self
            .http("POST", "/api/v1/publish", Some(API_KEY), Some(body.to_string()))
            .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body expected, got {text}")),
        )
    }

    /// Publishes and asserts success.
    pub async fn publish_ok(&self, channel: &str, data: Value) -> Value {
        let (status, body) = self.publish(json!({"channel": channel, "data": data})).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn metrics(&self) -> String {
        self.http("GET", "/metrics", None, None).await.1
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Waits until `/ready` answers 200, failing the test after `DEADLINE`.
    pub async fn wait_ready(&self) {
        let addr = self.addr;
        wait_until("the node is ready", || async move { ready_status(addr).await == 200 }).await;
    }
}

/// The status `/ready` answers with, 0 when the request fails.
pub async fn ready_status(addr: std::net::SocketAddr) -> u16 {
    herald_server::http_client::request("GET", &format!("http://{addr}/ready"), None, None)
        .await
        .map(|(status, _)| status)
        .unwrap_or(0)
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().unwrap_or(0.0))
}

/// TOML forbids repeating a table header or a key; tests pass fragments
/// like `[limits]\nx = 1` that may collide with the harness's own tables, so
/// fragments are merged by header, and a key set again replaces the earlier
/// value (a test's fragment overrides the harness's defaults).
fn merge_sections(toml: &str) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut sections: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current = String::new();
    for line in toml.lines() {
        let trimmed = line.trim();
        let is_header = trimmed.starts_with('[') && trimmed.ends_with(']');
        if is_header {
            current = trimmed.to_owned();
            // Each `[[array]]` entry is its own table: never merge those.
            if trimmed.starts_with("[[") {
                current = format!("{current}#{}", order.len());
            }
        }
        if !order.contains(&current) {
            order.push(current.clone());
        }
        if !is_header && !trimmed.is_empty() {
            let lines = sections.entry(current.clone()).or_default();
            if let Some(key) = toml_key(trimmed) {
                lines.retain(|earlier| toml_key(earlier.trim()) != Some(key));
            }
            lines.push(line.to_owned());
        }
    }
    let mut out = String::new();
    for header in order {
        if !header.is_empty() {
            out.push_str(header.split('#').next().unwrap_or_default());
            out.push('\n');
        }
        for line in sections.get(&header).into_iter().flatten() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The key a `key = value` line sets (`None` for a continuation line).
fn toml_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    bare.then_some(key)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next event on a connection was.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Binary(Vec<u8>),
    Closed(Option<(u16, String)>),
}

impl Client {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send succeeds");
    }

    /// The next frame or close, skipping pings and pongs.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("an event within the deadline");
            match message {
                None => return Event::Closed(None),
                Some(Err(_)) => return Event::Closed(None),
                Some(Ok(Message::Text(text))) => {
                    return Event::Frame(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Some(Ok(Message::Binary(bytes))) => return Event::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    return Event::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame as sent, unparsed (skipping pings and pongs).
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline");
            match message {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn next_frame(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame, asserting its `type`.
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        let frame = self.next_frame().await;
        assert_eq!(frame["type"], kind, "unexpected frame {frame}");
        frame
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_event().await {
                Event::Closed(Some(close)) => return close,
                Event::Closed(None) => panic!("connection ended without a close frame"),
                Event::Frame(_) | Event::Binary(_) => continue,
            }
        }
    }

    /// Reads until the connection ends, one event per `pace`; the close
    /// code, `None` when it ended without a close frame (an EOF or a reset).
    pub async fn read_to_end(&mut self, pace: Duration) -> Option<u16> {
        loop {
            tokio::time::sleep(pace).await;
            match self.next_event().await {
                Event::Closed(close) => return close.map(|(code, _)| code),
                Event::Frame(_) | Event::Binary(_) => continue,
            }
        }
    }

    /// Sends a command and returns its reply (`ack`, `error` or `pong`),
    /// skipping unrelated frames such as deliveries.
    pub async fn command(&mut self, kind: &str, id: &str, data: Value) -> Value {
        self.send(json!({"type": kind, "message_id": id, "data": data})).await;
        loop {
            let frame = self.next_frame().await;
            if frame["message_id"] == id && ["ack", "error", "pong"].contains(&frame["type"].as_str().unwrap_or("")) {
                return frame;
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .command("subscribe", &format!("sub-{channel}"), json!({"channel": channel}))
            .await;
        assert_eq!(reply["type"], "ack", "{reply}");
    }

    /// Proves the connection is alive and everything before was read.
    pub async fn round_trip(&mut self) {
        let reply = self.command("ping", "round-trip", json!({})).await;
        assert_eq!(reply["type"], "pong");
    }
}

/// Publishes a marker to `channel` and asserts it is the next frame `client`
/// sees: proof that nothing else was delivered before it.
pub async fn expect_only_marker(server: &TestServer, client: &mut Client, channel: &str) {
    server.publish_ok(channel, json!({"marker": true})).await;
    let frame = client.next_frame().await;
    assert_eq!(
        frame["data"],
        json!({"marker": true}),
        "expected only the marker, got {frame}"
    );
}

/// How often `wait_until` re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits until `condition` holds, failing the test after `DEADLINE`.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A real `redis-server` on its own port, killed on drop. It can be killed
/// with SIGKILL and restarted on the same port, with or without AOF.
pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    append_only: bool,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    pub async fn start_with(append_only: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = RedisServer {
            port,
            dir,
            append_only,
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `[redis]` TOML for a node, with a key prefix of its own.
    pub fn toml(&self, extra: &str) -> String {
        format!(
            "[redis]\nurl = \"{}\"\nprefix = \"t{}:\"\n{extra}",
            self.url(),
            self.port
        )
    }

    pub fn prefix(&self) -> String {
        format!("t{}:", self.port)
    }

    /// (Re)starts the server on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = std::process::Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args([
                "--appendonly",
                if self.append_only { "yes" } else { "no" },
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.child = Some(command.spawn().expect("redis-server runs (scripts/test installs it)"));
        let port = self.port;
        wait_until("redis answers PING", || async move {
            redis_cli_port(port, &["PING"]).is_ok_and(|out| out == "PONG")
        })
        .await;
    }

    /// SIGKILL: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: Redis hangs (connections stay open, nothing is answered)
    /// until [`resume`](Self::resume).
    pub fn hang(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`hang`](Self::hang).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server runs");
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Runs a command through `redis-cli`; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli_port(self.port, args).expect("redis-cli runs")
    }

    /// [`cli`](Self::cli) authenticated with `password` (after `CONFIG SET
    /// requirepass`).
    pub fn cli_with_password(&self, password: &str, args: &[&str]) -> String {
        let mut full = vec!["-a", password, "--no-auth-warning"];
        full.extend_from_slice(args);
        self.cli(&full)
    }

    /// Runs the history script a node's publish runs, by hand: `wire` is
    /// stored and numbered in `channel`'s history (at most `max_len` kept)
    /// and published on the Redis channel `to`; one that no node listens
    /// to makes the message lost on its way to the nodes. Returns the
    /// reply, which starts with the new offset.
    pub fn store_in_history(
        &self,
        password: Option<&str>,
        channel: &str,
        wire: &Value,
        max_len: usize,
        to: &str,
    ) -> String {
        let prefix = self.prefix();
        let (history, offset, epoch) = (
            format!("{prefix}hist:{channel}"),
            format!("{prefix}off:{channel}"),
            format!("{prefix}epoch:{channel}"),
        );
        let (wire, max_len) = (wire.to_string(), max_len.to_string());
        let args = [
            "EVAL",
            herald_server::broker::redis::history::PUBLISH_SCRIPT,
            "5",
            &history,
            &offset,
            &epoch,
            to,
            "", // no message-id claim
            &wire,
            &max_len,
            "600000",
            "unused-epoch",
            herald_server::broker::redis::history::POSITION_TTL_MS,
            "",
        ];
        match password {
            Some(password) => self.cli_with_password(password, &args),
            None => self.cli(&args),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_cli_port(port: u16, args: &[&str]) -> std::io::Result<String> {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Waits until `condition` holds, failing the test after `limit`; returns
/// how long it took. For tests whose point is a time bound.
pub async fn wait_within<F, Fut>(limit: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !condition().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    start.elapsed()
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// `herald serve` in a child process.

pub const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// A `herald serve` child process, its address and the banner it printed.
pub struct Process {
    pub child: Child,
    pub addr: String,
    pub banner: Vec<String>,
}

/// Starts `herald serve` on a free port and reads its banner. `stderr` is
/// the caller's: piped only by a test that reads it, so that nothing blocks
/// on a full pipe.
pub async fn spawn(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Process {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr);
    command
        .env_remove("HERALD_JWT_SECRET")
        .env_remove("HERALD_API_KEY")
        .env_remove("RUST_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    command.kill_on_drop(true);
    let mut child = command.spawn().expect("the herald binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .expect("banner in time")
        .unwrap()
        .expect("a banner line");
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("address in banner")
        .to_owned();
    let mut banner = vec![first];
    let embedded = !env.iter().any(|(name, _)| *name == "HERALD_JWT_SECRET");
    if embedded {
        while let Ok(Ok(Some(line))) = tokio::time::timeout(DEADLINE, stdout.next_line()).await {
            let last = line.starts_with("Set jwt.secret");
            banner.push(line);
            if last {
                break;
            }
        }
    }
    Process { child, addr, banner }
}

/// The environment of a configured (not embedded-default) node.
pub fn configured_env() -> Vec<(&'static str, &'static str)> {
    vec![("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEY", API_KEY)]
}

/// A `TestServer`-like view of a child process for token minting and clients.
pub fn view(addr: &str) -> TestServer {
    let raw = herald_server::config::RawConfig::from_toml(&format!(
        "listen = \"{addr}\"\n[jwt]\nsecret = \"{SECRET}\"\n[api]\nkey = \"{API_KEY}\"\n"
    ))
    .unwrap();
    let config = herald_server::config::Config::from_raw(raw).unwrap();
    TestServer {
        running: None,
        addr: addr.parse().unwrap(),
        config,
    }
}
