//! Soak and property test (issue 9, done-means 2): a `herald serve` child
//! process with the memory broker, and two sharing a real `redis-server`,
//! are driven for `HERALD_SOAK_SECONDS` (30 by default) by random HTTP
//! publishes (JSON with extreme numbers, deep nesting, unicode and escapes;
//! binary; oversized payloads; bad channels, types and ids; repeated ids;
//! broadcasts), random HTTP history reads, and WebSocket clients that send
//! random batches of commands and disconnect at random. Publishes, reads and
//! clients are spread over the nodes. The inputs come from one seed, printed
//! at the start (`HERALD_SOAK_SEED` replays it).
//!
//! It asserts:
//! - no panic: no node's stderr says `panicked`, `/health` answers
//!   throughout, and the processes are still running at the end;
//! - every command is answered, exactly once, with the expected kind of
//!   answer, within a deadline, and no connection ends while an answer is due;
//! - every accepted message kept in history is readable afterwards on every
//!   node, over HTTP, with the `history` command and by recovery, with the
//!   exact bytes of its `data` as published; every delivery carries those
//!   bytes too, and the offsets a connection receives are contiguous after
//!   its subscribe;
//! - memory is bounded: history never holds more than `history_size` per
//!   channel used (the memory gauges, `XLEN` in Redis), each node's
//!   connection count comes back to its open clients and then to zero, and
//!   each node's resident memory stays under a cap.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    API_KEY, Client, Process, RedisServer, TestServer, configured_env, metric_value, spawn, view, wait_until,
};

/// Kept messages per channel in the `feed` namespace.
const HISTORY_SIZE: u64 = 64;
/// The node's `limits.max_message_size`: small, so that the limit is cheap
/// to hit on purpose.
const MAX_MESSAGE_SIZE: usize = 16_384;
/// WebSocket clients per node.
const CLIENTS: usize = 5;
/// HTTP publishers per node.
const PUBLISHERS: usize = 2;
/// How long a command may wait for its answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// The node's resident memory may not exceed this. A coarse guard against
/// runaway growth (a debug build holds about 18 MiB through a run; what it
/// keeps is bounded: 64 history messages per channel used); the history
/// gauges and the connection count are the precise bounds.
const RSS_CAP_KIB: u64 = 64 * 1024;

const NODE_TOML: &str = "\
[limits]
max_message_size = 16384
commands_per_second = 100000
command_burst = 100000
[namespaces.feed]
subscribe = \"authenticated\"
client_publish = true
presence = true
history_size = 64
history_ttl = \"10m\"
[namespaces.room]
subscribe = \"authenticated\"
client_publish = true
presence = true
join_leave = true
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_the_memory_broker() {
    soak(Broker::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_the_redis_broker() {
    soak(Broker::Redis).await;
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Broker {
    Memory,
    Redis,
}

async fn soak(broker: Broker) {
    let seed = std::env::var("HERALD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let seconds: u64 = std::env::var("HERALD_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    println!("soak {broker:?}: seed {seed} (replay with HERALD_SOAK_SEED={seed}), {seconds} s");

    // Redis mode runs two nodes: what one accepts, the other serves too.
    let redis = match broker {
        Broker::Memory => None,
        Broker::Redis => Some(RedisServer::start().await),
    };
    let mut nodes = Vec::new();
    for _ in 0..if redis.is_some() { 2 } else { 1 } {
        nodes.push(Node::start(redis.as_ref()).await);
    }
    let world = Arc::new(World {
        nodes: nodes.iter().map(|node| node.view.clone()).collect(),
        ledger: Mutex::new(Ledger::default()),
        stats: Stats::default(),
        deadline: Instant::now() + Duration::from_secs(seconds),
    });

    let mut rng = Rng::new(seed);
    let mut publishers = Vec::new();
    for index in 0..PUBLISHERS {
        let world = world.clone();
        let rng = rng.fork();
        publishers.push(tokio::spawn(http_publisher(world, index, rng)));
    }
    let mut sessions = Vec::new();
    for index in 0..CLIENTS {
        let world = world.clone();
        let rng = rng.fork();
        sessions.push(tokio::spawn(async move {
            let mut session = Session::connect(world, index, rng).await;
            session.run().await;
            session
        }));
    }
    let monitors: Vec<_> = nodes
        .iter()
        .map(|node| tokio::spawn(monitor(world.clone(), node.view.clone(), node.pid(), redis.is_none())))
        .collect();

    let mut failures = Vec::new();
    for publisher in publishers {
        if let Err(e) = publisher.await {
            failures.push(format!("an HTTP publisher: {}", panic_message(e)));
        }
    }
    let mut open = Vec::new();
    for session in sessions {
        match session.await {
            Ok(session) => open.push(session),
            Err(e) => failures.push(format!("a WebSocket client: {}", panic_message(e))),
        }
    }
    let mut peak_rss = 0;
    for monitor in monitors {
        match monitor.await {
            Ok(peak) => peak_rss = peak_rss.max(peak),
            Err(e) => failures.push(format!("a monitor: {}", panic_message(e))),
        }
    }
    let stderr: Vec<Vec<String>> = nodes.iter().map(Node::panics).collect();
    assert!(
        failures.is_empty(),
        "seed {seed}: {failures:#?}\nthe nodes' stderr: {stderr:#?}"
    );

    // Quiet now. Every delivery seen during the run carried the bytes its
    // publisher was told were accepted.
    world.ledger().verify_unverified();

    // Each node counts exactly the connections that are open on it.
    for (index, node) in world.nodes.iter().enumerate() {
        let clients = open.iter().filter(|session| Arc::ptr_eq(&session.node, node)).count();
        wait_until("the node counts only the open connections", || async move {
            node.metric("herald_connections").await == clients as f64
        })
        .await;
        println!("soak {broker:?}: node {index} holds {clients} connections");
    }

    for node in &world.nodes {
        verify_history(&world, node).await;
    }
    check_memory_bounds(&world, &nodes, redis.as_ref()).await;

    for mut session in open {
        if let Some(mut client) = session.client.take() {
            let _ = client.ws.close(None).await;
        }
    }
    for node in &world.nodes {
        wait_until("the node counts no connection", || async move {
            node.metric("herald_connections").await == 0.0
        })
        .await;
    }

    for node in nodes {
        node.assert_alive_without_panic().await;
    }
    println!(
        "soak {broker:?} (seed {seed}): {}; peak RSS {} MiB",
        world.stats.summary(),
        peak_rss / 1024
    );
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(error) => error.to_string(),
    }
}

// The node under test.

/// A `herald serve` child process and what its stderr said that looks like
/// a panic.
struct Node {
    process: Process,
    view: Arc<TestServer>,
    panics: Arc<Mutex<Vec<String>>>,
    config_path: std::path::PathBuf,
}

impl Node {
    async fn start(redis: Option<&RedisServer>) -> Node {
        let toml = match redis {
            Some(redis) => format!("{NODE_TOML}{}\n", redis.toml("")),
            None => NODE_TOML.to_owned(),
        };
        let config_path = std::env::temp_dir().join(format!(
            "herald-soak-{}-{}.toml",
            std::process::id(),
            crate::harness::free_port()
        ));
        std::fs::write(&config_path, toml).expect("temp config file");
        let mut env = configured_env();
        env.push(("RUST_LOG", "warn"));
        let mut process = spawn(&["--config", config_path.to_str().unwrap()], &env, Stdio::piped()).await;
        let stderr = process.child.stderr.take().expect("stderr is piped");
        let panics = Arc::new(Mutex::new(Vec::new()));
        let seen = panics.clone();
        tokio::spawn(async move {
            // A panic is reported on two lines: where, then the message.
            let mut lines = BufReader::new(stderr).lines();
            let mut after_panic = false;
            while let Ok(Some(line)) = lines.next_line().await {
                if after_panic || line.contains("panicked") {
                    after_panic = !after_panic;
                    seen.lock().unwrap().push(line);
                }
            }
        });
        let view = Arc::new(view(&process.addr));
        view.wait_ready().await;
        Node {
            process,
            view,
            panics,
            config_path,
        }
    }

    fn pid(&self) -> u32 {
        self.process.child.id().expect("the node is running")
    }

    fn panics(&self) -> Vec<String> {
        self.panics.lock().unwrap().clone()
    }

    async fn assert_alive_without_panic(mut self) {
        let (status, body) = self.view.http("GET", "/health", None, None).await;
        assert_eq!(status, 200, "/health: {body}");
        assert!(
            self.process
                .child
                .try_wait()
                .expect("the child can be polled")
                .is_none(),
            "the node exited"
        );
        let panics = self.panics();
        assert!(panics.is_empty(), "the node panicked: {panics:#?}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}

// What was accepted, and what was seen.

/// A published payload: JSON text exactly as sent, or binary bytes.
#[derive(Clone, Debug, PartialEq)]
enum Payload {
    Json(String),
    Binary(Vec<u8>),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Json(text) => text.len(),
            Payload::Binary(bytes) => bytes.len(),
        }
    }

    fn describe(&self) -> String {
        let text = match self {
            Payload::Json(text) => text.clone(),
            Payload::Binary(bytes) => format!("binary {bytes:?}"),
        };
        if text.len() > 300 {
            let cut = (0..=300).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            format!("{}… ({} bytes)", &text[..cut], text.len())
        } else {
            text
        }
    }
}

#[derive(Clone, Debug)]
struct Accepted {
    message_id: String,
    payload: Payload,
}

/// A message seen on a read path before its publisher's answer was read.
struct Seen {
    channel: String,
    offset: u64,
    message_id: String,
    payload: Payload,
    context: String,
}

#[derive(Default)]
struct Ledger {
    /// Every history message a publisher was told was accepted.
    accepted: HashMap<(String, u64), Accepted>,
    /// The epoch of each history channel, as the first receipt gave it.
    epochs: HashMap<String, String>,
    /// Every channel with history that a publish or command named: each
    /// may be kept by the node, so together they bound its history.
    history_channels: BTreeSet<String>,
    /// Publishes whose connection ended before their answer was read: they
    /// may or may not be in history.
    in_doubt: Vec<(String, Payload)>,
    /// Messages read back at an offset no answer had named yet, checked
    /// once every publisher has its answer.
    unverified: Vec<Seen>,
}

impl Ledger {
    fn accept(&mut self, channel: &str, offset: u64, epoch: &str, message_id: &str, payload: &Payload) {
        let epoch_before = self
            .epochs
            .entry(channel.to_owned())
            .or_insert_with(|| epoch.to_owned());
        assert_eq!(
            epoch_before, epoch,
            "`{channel}` changed epoch during the run (history was lost)"
        );
        let accepted = Accepted {
            message_id: message_id.to_owned(),
            payload: payload.clone(),
        };
        if let Some(before) = self.accepted.insert((channel.to_owned(), offset), accepted) {
            panic!(
                "`{channel}` offset {offset} was given to two publishes: {} and {message_id}",
                before.message_id
            );
        }
    }

    /// Checks a message read back (a delivery, a history page, a recovery)
    /// against what was accepted at that position.
    fn check(&mut self, channel: &str, offset: u64, message_id: &str, payload: Payload, context: &str) {
        match self.accepted.get(&(channel.to_owned(), offset)) {
            Some(accepted) => {
                assert_eq!(
                    accepted.message_id, message_id,
                    "{context}: `{channel}` offset {offset} has another message id"
                );
                assert!(
                    accepted.payload == payload,
                    "{context}: `{channel}` offset {offset} ({message_id}) reads back other bytes\npublished: {}\nread:      {}",
                    accepted.payload.describe(),
                    payload.describe()
                );
            }
            None => self.unverified.push(Seen {
                channel: channel.to_owned(),
                offset,
                message_id: message_id.to_owned(),
                payload,
                context: context.to_owned(),
            }),
        }
    }

    /// Once every publisher has its answer, everything seen early is known.
    fn verify_unverified(&mut self) {
        for seen in std::mem::take(&mut self.unverified) {
            let known = self.accepted.contains_key(&(seen.channel.clone(), seen.offset));
            if known {
                self.check(
                    &seen.channel,
                    seen.offset,
                    &seen.message_id,
                    seen.payload,
                    &seen.context,
                );
            } else {
                let doubt = self
                    .in_doubt
                    .iter()
                    .any(|(channel, payload)| *channel == seen.channel && *payload == seen.payload);
                assert!(
                    doubt,
                    "{}: `{}` offset {} ({}) was read back but no publish was accepted there: {}",
                    seen.context,
                    seen.channel,
                    seen.offset,
                    seen.message_id,
                    seen.payload.describe()
                );
            }
        }
    }

    /// The highest offset accepted in `channel`, 0 before its first message.
    fn last_offset(&self, channel: &str) -> u64 {
        self.accepted
            .keys()
            .filter(|(c, _)| c == channel)
            .map(|(_, offset)| *offset)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Default)]
struct Stats {
    commands: AtomicU64,
    errors: AtomicU64,
    http_publishes: AtomicU64,
    http_refused: AtomicU64,
    duplicates: AtomicU64,
    history_reads: AtomicU64,
    deliveries: AtomicU64,
    disconnects: AtomicU64,
    closed_1009: AtomicU64,
    closed_slow: AtomicU64,
    resyncs: AtomicU64,
    deep: AtomicU64,
    extreme_numbers: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    fn summary(&self) -> String {
        format!(
            "{} commands ({} errors), {} HTTP publishes ({} refused, {} duplicates), {} history reads, {} deliveries, {} resyncs, {} disconnects ({} by 1009, {} as slow), {} deep and {} extreme-number payloads",
            self.commands.load(Relaxed),
            self.errors.load(Relaxed),
            self.http_publishes.load(Relaxed),
            self.http_refused.load(Relaxed),
            self.duplicates.load(Relaxed),
            self.history_reads.load(Relaxed),
            self.deliveries.load(Relaxed),
            self.resyncs.load(Relaxed),
            self.disconnects.load(Relaxed),
            self.closed_1009.load(Relaxed),
            self.closed_slow.load(Relaxed),
            self.deep.load(Relaxed),
            self.extreme_numbers.load(Relaxed),
        )
    }
}

struct World {
    /// The nodes under test: one, or two sharing a Redis.
    nodes: Vec<Arc<TestServer>>,
    ledger: Mutex<Ledger>,
    stats: Stats,
    deadline: Instant,
}

impl World {
    /// The ledger, even after another task failed while holding it: the
    /// first failure is the one to report, not a poisoned lock.
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Any node: publishes and reads go to each.
    fn any_node(&self, rng: &mut Rng) -> &TestServer {
        rng.pick(&self.nodes).as_ref()
    }

    fn running(&self) -> bool {
        Instant::now() < self.deadline
    }
}

// Random inputs.

/// SplitMix64: small, seedable, good enough for choosing inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An independent generator for another task.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, low: u64, high_inclusive: u64) -> u64 {
        low + self.below(high_inclusive - low + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a channel name is, for the answers to expect.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `feed:…`: history, client publish, presence.
    Feed,
    /// `room:…`: no history, client publish, presence, join/leave.
    Room,
    /// The connection's own `user:` channel.
    Own,
    /// Another user's personal channel.
    OtherUser,
    /// A bare name: the default namespace (claim policy, no client publish).
    Bare,
    UnknownNamespace,
    Invalid,
}

const NAME_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.=@|+~:";
const FEEDS: u64 = 8;

fn feed_channel(rng: &mut Rng) -> String {
    if rng.percent(3) {
        // A random, valid name: a new channel with history.
        let length = rng.range(1, 24);
        let name: String = (0..length).map(|_| *rng.pick(NAME_CHARS) as char).collect();
        format!("feed:{name}")
    } else {
        format!("feed:{}", rng.below(FEEDS))
    }
}

fn channel_of(rng: &mut Rng, kind: Kind, user: &str) -> String {
    match kind {
        Kind::Feed => feed_channel(rng),
        Kind::Room => format!("room:{}", rng.below(4)),
        Kind::Own => format!("user:{user}"),
        Kind::OtherUser => match format!("user:u{}", rng.below(3)) {
            own if own == format!("user:{user}") => "user:stranger".to_owned(),
            other => other,
        },
        Kind::Bare => rng.pick(&["lobby", "news", "a.b"]).to_string(),
        Kind::UnknownNamespace => rng.pick(&["nope:x", "team:1", "x_y-z:w"]).to_string(),
        Kind::Invalid => {
            let long = format!("feed:{}", "a".repeat(124));
            let choices = [
                "",
                " ",
                "feed:",
                ":x",
                "feed:a b",
                "feed:*",
                "FEED:x",
                "feed:é",
                "a/b",
                "feed:\n",
                long.as_str(),
            ];
            rng.pick(&choices).to_string()
        }
    }
}

fn random_kind(rng: &mut Rng) -> Kind {
    match rng.below(100) {
        0..=54 => Kind::Feed,
        55..=69 => Kind::Room,
        70..=77 => Kind::Own,
        78..=82 => Kind::OtherUser,
        83..=87 => Kind::Bare,
        88..=93 => Kind::UnknownNamespace,
        _ => Kind::Invalid,
    }
}

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "0.0",
    "-0.0",
    "1e400",
    "-1e400",
    "1e-400",
    "1E+400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "1.7976931348623157e308",
    "5e-324",
    "2.5E+3",
    "3.14159265358979323846264338327950288419716939937510",
    "0.1e1",
];
/// The entries of `NUMBERS` that no `f64` or 64-bit integer holds exactly.
const EXTREME_NUMBERS: std::ops::Range<usize> = 6..12;

const STRINGS: &[&str] = &[
    "\"\"",
    "\"plain\"",
    "\"é漢字😀\"",
    "\"\\u0000\"",
    "\"\\ud83d\\ude00\"",
    "\"tab\\tnew\\nline\\r\"",
    "\"quote\\\" back\\\\ slash\\/\"",
    "\"\\u00e9\\u6F22\"",
    "\"</script><script>\"",
    "\"\u{2028}\u{2029}\"",
    "\"\\b\\f\"",
];

/// Random JSON text, written out as a publisher would: whitespace, escapes
/// and number spellings that a `serde_json::Value` would not keep.
struct JsonWriter<'a> {
    rng: &'a mut Rng,
    out: String,
    extreme: bool,
}

impl JsonWriter<'_> {
    fn space(&mut self) {
        if self.rng.percent(15) {
            let space = *self.rng.pick(&[" ", "\n", "\t", "\r\n  ", "  "]);
            self.out.push_str(space);
        }
    }

    fn leaf(&mut self) {
        match self.rng.below(10) {
            0 => self.out.push_str("null"),
            1 => self.out.push_str(if self.rng.percent(50) { "true" } else { "false" }),
            2..=4 => {
                let index = self.rng.below(NUMBERS.len() as u64) as usize;
                self.extreme |= EXTREME_NUMBERS.contains(&index);
                self.out.push_str(NUMBERS[index]);
            }
            5 => {
                let n = self.rng.next() as i64;
                self.out.push_str(&n.to_string());
            }
            6 => {
                let mantissa = self.rng.below(1_000_000);
                let exponent = self.rng.below(700) as i64 - 350;
                self.out
                    .push_str(&format!("{mantissa}.{}e{exponent}", self.rng.below(1000)));
            }
            _ => {
                if self.rng.percent(60) {
                    let s = *self.rng.pick(STRINGS);
                    self.out.push_str(s);
                } else {
                    let length = self.rng.below(40);
                    let s: String = (0..length).map(|_| *self.rng.pick(NAME_CHARS) as char).collect();
                    self.out.push_str(&serde_json::to_string(&s).unwrap());
                }
            }
        }
    }

    fn value(&mut self, depth: u32) {
        self.space();
        if depth >= 4 || self.rng.percent(45) {
            self.leaf();
        } else if self.rng.percent(50) {
            self.out.push('[');
            let n = self.rng.below(5);
            for i in 0..n {
                if i > 0 {
                    self.out.push(',');
                }
                self.value(depth + 1);
            }
            self.space();
            self.out.push(']');
        } else {
            self.out.push('{');
            let n = self.rng.below(5);
            for i in 0..n {
                if i > 0 {
                    self.out.push(',');
                }
                self.space();
                // Repeated keys now and then: valid JSON text, kept as sent.
                let key = if self.rng.percent(10) {
                    "\"k\"".to_owned()
                } else {
                    format!("\"k{}\"", self.rng.below(1000))
                };
                self.out.push_str(&key);
                self.space();
                self.out.push(':');
                self.value(depth + 1);
            }
            self.space();
            self.out.push('}');
        }
        self.space();
    }
}

/// Random JSON text of at most `max` bytes (unless `oversized`, then just
/// over `MAX_MESSAGE_SIZE`). Returns the text and whether it is deep or has
/// an extreme number.
fn json_payload(rng: &mut Rng, max: usize, stats: &Stats) -> String {
    let mut writer = JsonWriter {
        rng,
        out: String::new(),
        extreme: false,
    };
    let deep = writer.rng.percent(4);
    if deep {
        // 100 to 300 levels: deeper than serde_json's default recursion
        // limit (128) for most.
        let levels = writer.rng.range(100, 300) as usize;
        let object = writer.rng.percent(50);
        for _ in 0..levels {
            writer.out.push_str(if object { "{\"d\":" } else { "[" });
        }
        writer.value(3);
        for _ in 0..levels {
            writer.out.push(if object { '}' } else { ']' });
        }
    } else {
        writer.value(0);
    }
    let extreme = writer.extreme;
    let mut text = writer.out.trim().to_owned();
    if text.len() > max {
        text = "\"too long\"".to_owned();
    }
    if deep {
        Stats::bump(&stats.deep);
    }
    if extreme {
        Stats::bump(&stats.extreme_numbers);
    }
    assert!(
        serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(),
        "the generator wrote invalid JSON: {text}"
    );
    text
}

/// A JSON string payload of exactly `length` bytes.
fn json_of_length(length: usize) -> String {
    format!("\"{}\"", "s".repeat(length - 2))
}

fn binary_payload(rng: &mut Rng, length: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
    // The frame separator inside the payload, now and then.
    if !bytes.is_empty() && rng.percent(50) {
        let at = rng.below(bytes.len() as u64) as usize;
        bytes[at] = b'\n';
    }
    bytes
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Percent-encodes a path segment.
fn encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// Reading what the node sends.

/// `Option<Box<RawValue>>` that keeps a JSON `null` as `Some("null")`.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// Any frame from the node, read without `serde_json::Value` (which cannot
/// hold every payload) for `data`.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message_id: Option<Value>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
}

/// A publication in a history page.
#[derive(Deserialize)]
struct Publication {
    channel: String,
    message_id: String,
    offset: u64,
    epoch: String,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    data_base64: Option<String>,
}

impl Publication {
    fn payload(&self, context: &str) -> Payload {
        match (&self.data, &self.data_base64) {
            (Some(data), None) => Payload::Json(data.get().to_owned()),
            (None, Some(encoded)) => Payload::Binary(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .unwrap_or_else(|e| panic!("{context}: data_base64 is not base64: {e}")),
            ),
            _ => panic!("{context}: a publication needs exactly one of data and data_base64"),
        }
    }
}

/// A history page: the `history` ack's data, or the HTTP answer.
#[derive(Deserialize)]
struct Page {
    channel: String,
    epoch: String,
    offset: u64,
    recovered: bool,
    publications: Vec<Publication>,
    #[serde(default)]
    next: Option<u64>,
}

impl Page {
    fn parse(text: &str, context: &str) -> Page {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{context}: not a history page ({e}): {text:.500}"))
    }

    /// Checks each publication against the ledger; returns their offsets.
    fn check(&self, world: &World, channel: &str, context: &str) -> Vec<u64> {
        assert_eq!(self.channel, channel, "{context}");
        let mut ledger = world.ledger();
        let mut offsets = Vec::new();
        for publication in &self.publications {
            assert_eq!(publication.channel, channel, "{context}");
            assert_eq!(publication.epoch, self.epoch, "{context}: one epoch per page");
            ledger.check(
                channel,
                publication.offset,
                &publication.message_id,
                publication.payload(context),
                context,
            );
            offsets.push(publication.offset);
        }
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{context}: offsets are not increasing: {offsets:?}"
        );
        Stats::bump(&world.stats.history_reads);
        offsets
    }
}

#[derive(Deserialize)]
struct ErrorData {
    code: String,
}

#[derive(Deserialize)]
struct Position {
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    recovered: Option<bool>,
}

#[derive(Deserialize)]
struct PublishReceipt {
    message_id: String,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
}

// HTTP publishers.

/// The statuses a publish may be answered with: a bad channel and an
/// oversized payload together may be named either way.
fn http_statuses(kind: Kind, payload_len: usize) -> &'static [u16] {
    let oversized = payload_len > MAX_MESSAGE_SIZE;
    match kind {
        Kind::UnknownNamespace | Kind::Invalid if oversized => &[400, 413],
        Kind::UnknownNamespace | Kind::Invalid => &[400],
        _ if oversized => &[413],
        _ => &[200],
    }
}

async fn http_publisher(world: Arc<World>, index: usize, mut rng: Rng) {
    // (channel, message_id) → the receipt's offset, for the repeats.
    let mut published: Vec<(String, String, Option<u64>)> = Vec::new();
    let mut counter = 0u64;
    while world.running() {
        counter += 1;
        match rng.below(100) {
            0..=64 => http_single(&world, index, &mut rng, &mut published, counter).await,
            65..=77 => http_broadcast(&world, index, &mut rng, &mut published, counter).await,
            78..=91 => http_history(&world, &mut rng).await,
            _ => http_malformed(&world, &mut rng).await,
        }
    }
}

async fn http_single(
    world: &World,
    index: usize,
    rng: &mut Rng,
    published: &mut Vec<(String, String, Option<u64>)>,
    counter: u64,
) {
    let kind = match random_kind(rng) {
        Kind::Own => Kind::OtherUser,
        other => other,
    };
    let mut channel = channel_of(rng, kind, "nobody");
    let payload = match rng.below(100) {
        0..=79 => Payload::Json(json_payload(rng, MAX_MESSAGE_SIZE, &world.stats)),
        80..=84 => Payload::Json(json_of_length(MAX_MESSAGE_SIZE + rng.below(2) as usize)),
        85..=87 => Payload::Json(json_of_length(MAX_MESSAGE_SIZE + rng.range(2, 20_000) as usize)),
        88..=96 => {
            let length = rng.below(300) as usize;
            Payload::Binary(binary_payload(rng, length))
        }
        _ => {
            let length = MAX_MESSAGE_SIZE + rng.below(3) as usize;
            Payload::Binary(binary_payload(rng, length))
        }
    };
    let repeat = if kind != Kind::Invalid && kind != Kind::UnknownNamespace && !published.is_empty() && rng.percent(12)
    {
        let (c, id, offset) = rng.pick(published).clone();
        channel = c;
        Some((id, offset))
    } else {
        None
    };
    // A repeat goes where its first publish went: with history or without
    // (`Room` stands for any valid channel without history).
    let kind = if repeat.is_some() {
        if channel.starts_with("feed:") {
            Kind::Feed
        } else {
            Kind::Room
        }
    } else {
        kind
    };
    let message_id = match &repeat {
        Some((id, _)) => Some(id.clone()),
        None if rng.percent(50) => Some(match rng.below(10) {
            0 => format!("h{index}-é-{counter}-{}", "x".repeat(rng.below(100) as usize)),
            _ => format!("h{index}-{counter}"),
        }),
        None => None,
    };
    let message_type = if rng.percent(20) {
        Some(*rng.pick(&["notification", "alert.v2", "a-b_c", "new_message"]))
    } else {
        None
    };
    if kind == Kind::Feed {
        world.ledger().history_channels.insert(channel.clone());
    }
    let mut body = format!("{{\"channel\":{}", json_string(&channel));
    match &payload {
        Payload::Json(text) => {
            body.push_str(",\"data\":");
            body.push_str(text);
        }
        Payload::Binary(bytes) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            body.push_str(&format!(",\"data_base64\":\"{encoded}\""));
        }
    }
    if let Some(id) = &message_id {
        body.push_str(&format!(",\"message_id\":{}", json_string(id)));
    }
    if let Some(message_type) = message_type {
        body.push_str(&format!(",\"type\":\"{message_type}\""));
    }
    body.push('}');

    // A repeat is answered with the first receipt, once it is valid.
    let expected = http_statuses(kind, payload.len());
    let context = format!(
        "HTTP publish to `{channel}` (id {message_id:?}, {} bytes)",
        payload.len()
    );
    let (status, answer) = world
        .any_node(rng)
        .http("POST", "/api/v1/publish", Some(API_KEY), Some(body))
        .await;
    Stats::bump(&world.stats.http_publishes);
    assert!(
        expected.contains(&status),
        "{context}: expected {expected:?}, got {status}: {answer}"
    );
    if status != 200 {
        Stats::bump(&world.stats.http_refused);
        return;
    }
    let receipt: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{context}: {e}: {answer}"));
    let parsed: PublishReceipt =
        serde_json::from_value(receipt.clone()).unwrap_or_else(|e| panic!("{context}: {e}: {answer}"));
    if let Some(id) = &message_id {
        assert_eq!(&parsed.message_id, id, "{context}: {answer}");
    }
    match repeat {
        Some((_, first_offset)) => {
            assert_eq!(
                receipt["duplicate"], true,
                "{context}: a repeat is a duplicate: {answer}"
            );
            assert_eq!(parsed.offset, first_offset, "{context}: the first receipt: {answer}");
            Stats::bump(&world.stats.duplicates);
        }
        None => {
            assert!(receipt.get("duplicate").is_none(), "{context}: {answer}");
            record_receipt(world, kind, &channel, &parsed, &payload, &context);
            if let Some(id) = message_id {
                published.push((channel, id, parsed.offset));
            }
        }
    }
}

/// Records an accepted publish; a channel with history gives a position.
fn record_receipt(
    world: &World,
    kind: Kind,
    channel: &str,
    receipt: &PublishReceipt,
    payload: &Payload,
    context: &str,
) {
    if kind == Kind::Feed {
        let (Some(offset), Some(epoch)) = (receipt.offset, receipt.epoch.as_deref()) else {
            panic!("{context}: a channel with history gives offset and epoch");
        };
        world
            .ledger()
            .accept(channel, offset, epoch, &receipt.message_id, payload);
    } else {
        assert!(receipt.offset.is_none(), "{context}: no history, no offset");
    }
}

async fn http_broadcast(
    world: &World,
    index: usize,
    rng: &mut Rng,
    published: &mut Vec<(String, String, Option<u64>)>,
    counter: u64,
) {
    let mut channels: Vec<(String, Kind)> = Vec::new();
    for _ in 0..rng.range(1, 6) {
        let kind = *rng.pick(&[Kind::Feed, Kind::Feed, Kind::Room, Kind::OtherUser, Kind::Bare]);
        let channel = channel_of(rng, kind, "nobody");
        if !channels.iter().any(|(c, _)| *c == channel) {
            channels.push((channel, kind));
        }
    }
    let message_id = rng.percent(50).then(|| format!("b{index}-{counter}"));
    let payload = Payload::Json(json_payload(rng, MAX_MESSAGE_SIZE, &world.stats));
    let Payload::Json(text) = &payload else { unreachable!() };
    let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
    let mut body = format!(
        "{{\"channels\":{},\"data\":{text}",
        serde_json::to_string(&names).unwrap()
    );
    if let Some(id) = &message_id {
        body.push_str(&format!(",\"message_id\":\"{id}\""));
    }
    body.push('}');
    {
        let mut ledger = world.ledger();
        for (channel, kind) in &channels {
            if *kind == Kind::Feed {
                ledger.history_channels.insert(channel.clone());
            }
        }
    }
    let context = format!("HTTP broadcast to {names:?} (id {message_id:?})");
    let (status, answer) = world
        .any_node(rng)
        .http("POST", "/api/v1/publish", Some(API_KEY), Some(body))
        .await;
    Stats::bump(&world.stats.http_publishes);
    assert_eq!(status, 200, "{context}: {answer}");
    #[derive(Deserialize)]
    struct Results {
        results: Vec<Value>,
    }
    let results: Results = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{context}: {e}: {answer}"));
    assert_eq!(results.results.len(), channels.len(), "{context}: {answer}");
    for ((channel, kind), result) in channels.iter().zip(results.results) {
        assert_eq!(result["channel"], channel.as_str(), "{context}: in order: {answer}");
        assert!(result.get("duplicate").is_none(), "{context}: a fresh id: {answer}");
        let receipt: PublishReceipt = serde_json::from_value(result).unwrap_or_else(|e| panic!("{context}: {e}"));
        if let Some(id) = &message_id {
            assert_eq!(&receipt.message_id, id, "{context}");
            published.push((channel.clone(), id.clone(), receipt.offset));
        }
        record_receipt(world, *kind, channel, &receipt, &payload, &context);
    }
}

/// Requests that are wrong in one way each: 400, never a panic.
async fn http_malformed(world: &World, rng: &mut Rng) {
    let channel = format!("feed:{}", rng.below(FEEDS));
    let body = match rng.below(7) {
        0 => format!("{{\"channel\":\"{channel}\",\"data\":1,\"data_base64\":\"AA==\"}}"),
        1 => format!("{{\"channel\":\"{channel}\"}}"),
        2 => format!("{{\"channel\":\"{channel}\",\"data\":1,\"type\":\"_hidden\"}}"),
        3 => format!("{{\"channel\":\"{channel}\",\"data\":1,\"type\":\"ack\"}}"),
        4 => format!("{{\"channel\":\"{channel}\",\"data_base64\":\"not base64!\"}}"),
        5 => format!(
            "{{\"channel\":\"{channel}\",\"data\":1,\"message_id\":\"{}\"}}",
            "i".repeat(129)
        ),
        _ => format!("{{\"channel\":\"{channel}\",\"data\":[1,2"),
    };
    let (status, answer) = world
        .any_node(rng)
        .http("POST", "/api/v1/publish", Some(API_KEY), Some(body.clone()))
        .await;
    assert_eq!(status, 400, "{body:.300}: {answer}");
    Stats::bump(&world.stats.http_refused);
}

/// Reads an HTTP history page; checks what it can while publishes go on.
async fn http_history(world: &World, rng: &mut Rng) {
    let kind = *rng.pick(&[Kind::Feed, Kind::Feed, Kind::Feed, Kind::Room, Kind::UnknownNamespace]);
    let channel = channel_of(rng, kind, "nobody");
    if kind == Kind::Feed {
        world.ledger().history_channels.insert(channel.clone());
    }
    let mut query = format!("limit={}", rng.range(0, 200));
    let since = rng.percent(50).then(|| {
        let last = world.ledger().last_offset(&channel);
        rng.below(last + 2)
    });
    if let Some(offset) = since {
        query.push_str(&format!("&offset={offset}"));
    }
    let path = format!("/api/v1/channels/{}/history?{query}", encode_segment(&channel));
    let context = format!("GET {path}");
    let (status, body) = http_get(world.any_node(rng), &path).await;
    let expected = match kind {
        Kind::Feed => 200,
        Kind::Room => 404,
        _ => 400,
    };
    assert_eq!(status, expected, "{context}: {body:.500}");
    if status == 200 {
        let page = Page::parse(&body, &context);
        let offsets = page.check(world, &channel, &context);
        assert!(
            page.offsets_end_before(&offsets),
            "{context}: {offsets:?} after {}",
            page.offset
        );
    }
}

impl Page {
    fn offsets_end_before(&self, offsets: &[u64]) -> bool {
        offsets.last().is_none_or(|last| *last <= self.offset)
    }
}

/// A GET with the API key; a connection that ends without an answer fails
/// the test with the path in the message.
async fn http_get(node: &TestServer, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", node.addr);
    tokio::time::timeout(
        ANSWER_DEADLINE,
        herald_server::http_client::request("GET", &url, Some(API_KEY), None),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no answer within {ANSWER_DEADLINE:?}"))
    .unwrap_or_else(|e| panic!("GET {path}: the connection ended without an answer: {e:#}"))
}

// WebSocket clients.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Command {
    Subscribe,
    Unsubscribe,
    Publish,
    History,
    Presence,
    Ping,
    Unknown,
    MissingField,
}

#[derive(Clone, Debug)]
enum Expect {
    Ack,
    Pong,
    Error(&'static [&'static str]),
}

#[derive(Debug)]
struct Pending {
    id: Option<Value>,
    command: Command,
    kind: Kind,
    channel: String,
    expect: Expect,
    payload: Option<Payload>,
    recover: Option<(u64, String)>,
    text: String,
}

impl Pending {
    fn describe(&self) -> String {
        format!(
            "{:?} {:?} on `{}` (id {:?})",
            self.command, self.kind, self.channel, self.id
        )
    }
}

/// What a connection knows of a channel it is subscribed to.
#[derive(Debug)]
struct Track {
    /// The last offset received (or the subscribe's position); `None` until
    /// the subscribe is acked, and always for channels without history.
    last: Option<u64>,
}

/// One WebSocket client: its connection, its subscriptions as the server
/// will have them once what was sent is served (`planned`), and as the
/// answers read so far confirm them (`tracks`).
struct Session {
    world: Arc<World>,
    /// The node this client connects to.
    node: Arc<TestServer>,
    index: usize,
    user: String,
    rng: Rng,
    client: Option<Client>,
    planned: HashSet<String>,
    tracks: HashMap<String, Track>,
    /// The last position seen per channel with history, across reconnects.
    positions: HashMap<String, (u64, String)>,
    /// Numbers this client's message ids.
    counter: u64,
    /// Recent message ids, some of which are used again.
    used_ids: Vec<Value>,
}

enum Incoming {
    Frame(Frame, Option<Vec<u8>>),
    Closed(Option<u16>),
    TimedOut,
}

impl Session {
    async fn connect(world: Arc<World>, index: usize, rng: Rng) -> Session {
        // Two connections share a user now and then.
        let user = format!("u{}", index % 3);
        let node = world.nodes[index % world.nodes.len()].clone();
        let mut session = Session {
            world,
            node,
            index,
            user,
            rng,
            client: None,
            planned: HashSet::new(),
            tracks: HashMap::new(),
            positions: HashMap::new(),
            counter: 0,
            used_ids: Vec::new(),
        };
        session.reconnect().await;
        session
    }

    /// Opens a new connection and resubscribes, recovering where it can.
    async fn reconnect(&mut self) {
        let client = self.node.connect(&self.user).await;
        self.client = Some(client);
        self.tracks.clear();
        let own = format!("user:{}", self.user);
        self.tracks.insert(own.clone(), Track { last: None });
        // Sorted: the same seed makes the same choices.
        let mut before: Vec<String> = std::mem::take(&mut self.planned).into_iter().collect();
        before.sort();
        self.planned.insert(own);
        let mut batch = Vec::new();
        for channel in before {
            let kind = if channel.starts_with("feed:") {
                Kind::Feed
            } else if channel.starts_with("room:") {
                Kind::Room
            } else {
                continue;
            };
            let recover = if kind == Kind::Feed && self.rng.percent(80) {
                self.positions.get(&channel).cloned()
            } else {
                None
            };
            batch.push(self.subscribe(kind, channel, recover));
        }
        self.exchange(batch).await;
    }

    async fn run(&mut self) {
        while self.world.running() {
            if self.rng.percent(4) {
                self.disconnect().await;
                self.reconnect().await;
                continue;
            }
            let size = self.rng.range(1, 4);
            let batch: Vec<Pending> = (0..size).map(|_| self.random_command()).collect();
            self.exchange(batch).await;
        }
    }

    fn next_id(&mut self) -> Option<Value> {
        self.counter += 1;
        let id = match self.rng.below(20) {
            0 => return None,
            1 => json!(self.counter + 1_000_000 * self.index as u64),
            2 if !self.used_ids.is_empty() => self.rng.pick(&self.used_ids).clone(),
            _ => json!(format!("c{}-{}", self.index, self.counter)),
        };
        self.used_ids.push(id.clone());
        if self.used_ids.len() > 100 {
            self.used_ids.remove(0);
        }
        Some(id)
    }

    fn frame(&mut self, command: &str, data: &str) -> (Option<Value>, String) {
        let id = self.next_id();
        let text = match &id {
            Some(id) => format!("{{\"type\":\"{command}\",\"message_id\":{id},\"data\":{data}}}"),
            None => format!("{{\"type\":\"{command}\",\"data\":{data}}}"),
        };
        (id, text)
    }

    fn subscribe(&mut self, kind: Kind, channel: String, recover: Option<(u64, String)>) -> Pending {
        let data = match &recover {
            Some((offset, epoch)) => format!(
                "{{\"channel\":{},\"offset\":{offset},\"epoch\":{}}}",
                json_string(&channel),
                json_string(epoch)
            ),
            None => format!("{{\"channel\":{}}}", json_string(&channel)),
        };
        let (id, text) = self.frame("subscribe", &data);
        let expect = match kind {
            Kind::Feed | Kind::Room | Kind::Own => {
                self.planned.insert(channel.clone());
                Expect::Ack
            }
            Kind::OtherUser | Kind::Bare => Expect::Error(&["forbidden"]),
            Kind::UnknownNamespace => Expect::Error(&["unknown_namespace"]),
            Kind::Invalid => Expect::Error(&["invalid_channel"]),
        };
        Pending {
            id,
            command: Command::Subscribe,
            kind,
            channel,
            expect,
            payload: None,
            recover,
            text,
        }
    }

    fn random_command(&mut self) -> Pending {
        let kind = random_kind(&mut self.rng);
        let channel = channel_of(&mut self.rng, kind, &self.user.clone());
        if kind == Kind::Feed {
            // A channel touched by any command may be kept in memory.
            self.world.ledger().history_channels.insert(channel.clone());
        }
        let quoted = json_string(&channel);
        let (command, data, expect, payload) = match self.rng.below(100) {
            0..=24 => {
                let recover = if kind == Kind::Feed && self.rng.percent(40) {
                    let last = self.world.ledger().last_offset(&channel);
                    let epoch = self.positions.get(&channel).map(|(_, e)| e.clone());
                    epoch.map(|e| (self.rng.below(last + 3), e))
                } else {
                    None
                };
                return self.subscribe(kind, channel, recover);
            }
            25..=39 => {
                let expect = match kind {
                    Kind::Feed | Kind::Room if self.planned.remove(&channel) => Expect::Ack,
                    Kind::Feed | Kind::Room => Expect::Error(&["not_subscribed"]),
                    Kind::Own => Expect::Error(&["forbidden"]),
                    Kind::OtherUser | Kind::Bare => Expect::Error(&["not_subscribed", "forbidden"]),
                    Kind::UnknownNamespace => Expect::Error(&["not_subscribed", "unknown_namespace"]),
                    Kind::Invalid => Expect::Error(&["invalid_channel"]),
                };
                (Command::Unsubscribe, format!("{{\"channel\":{quoted}}}"), expect, None)
            }
            40..=69 => {
                let payload = json_payload(&mut self.rng, 8_000, &self.world.stats);
                let (message_type, bad_type) = match self.rng.below(20) {
                    0 => (",\"type\":\"alert\"", false),
                    1 => (",\"type\":\"_private\"", true),
                    2 => (",\"type\":\"new_message\"", true),
                    _ => ("", false),
                };
                // One fault each, except a bad type on a bad channel:
                // either may be named.
                let expect = match (kind, bad_type) {
                    (Kind::Feed | Kind::Room | Kind::Own | Kind::OtherUser, false) => Expect::Ack,
                    (Kind::Feed | Kind::Room | Kind::Own | Kind::OtherUser, true) => Expect::Error(&["invalid_data"]),
                    (Kind::Bare, false) => Expect::Error(&["forbidden"]),
                    (Kind::Bare, true) => Expect::Error(&["forbidden", "invalid_data"]),
                    (Kind::UnknownNamespace, false) => Expect::Error(&["unknown_namespace"]),
                    (Kind::UnknownNamespace, true) => Expect::Error(&["unknown_namespace", "invalid_data"]),
                    (Kind::Invalid, false) => Expect::Error(&["invalid_channel"]),
                    (Kind::Invalid, true) => Expect::Error(&["invalid_channel", "invalid_data"]),
                };
                let data = format!("{{\"channel\":{quoted},\"data\":{payload}{message_type}}}");
                (Command::Publish, data, expect, Some(Payload::Json(payload)))
            }
            70..=81 => {
                let mut data = format!("{{\"channel\":{quoted},\"limit\":{}", self.rng.range(0, 1_200));
                if kind == Kind::Feed && self.rng.percent(50) {
                    let last = self.world.ledger().last_offset(&channel);
                    data.push_str(&format!(",\"offset\":{}", self.rng.below(last + 2)));
                }
                data.push('}');
                let expect = match kind {
                    Kind::Feed => Expect::Ack,
                    Kind::Room | Kind::Own => Expect::Error(&["not_available"]),
                    Kind::OtherUser | Kind::Bare => Expect::Error(&["forbidden", "not_available"]),
                    Kind::UnknownNamespace => Expect::Error(&["unknown_namespace"]),
                    Kind::Invalid => Expect::Error(&["invalid_channel"]),
                };
                (Command::History, data, expect, None)
            }
            82..=89 => {
                let expect = match kind {
                    Kind::Feed | Kind::Room => Expect::Ack,
                    Kind::Own => Expect::Error(&["not_available"]),
                    Kind::OtherUser | Kind::Bare => Expect::Error(&["forbidden", "not_available"]),
                    Kind::UnknownNamespace => Expect::Error(&["unknown_namespace"]),
                    Kind::Invalid => Expect::Error(&["invalid_channel"]),
                };
                (Command::Presence, format!("{{\"channel\":{quoted}}}"), expect, None)
            }
            90..=95 => (Command::Ping, "{}".to_owned(), Expect::Pong, None),
            96..=97 => (
                Command::Unknown,
                "{}".to_owned(),
                Expect::Error(&["unknown_type"]),
                None,
            ),
            _ => (
                Command::MissingField,
                "{}".to_owned(),
                Expect::Error(&["invalid_data"]),
                None,
            ),
        };
        let name = match command {
            Command::Unsubscribe => "unsubscribe",
            Command::Publish => "publish",
            Command::History => "history",
            Command::Presence => "presence",
            Command::Ping => "ping",
            Command::Unknown => "dance",
            Command::MissingField => *self.rng.pick(&["subscribe", "publish", "history", "presence"]),
            Command::Subscribe => unreachable!("returned above"),
        };
        let (id, text) = self.frame(name, &data);
        Pending {
            id,
            command,
            kind,
            channel,
            expect,
            payload,
            recover: None,
            text,
        }
    }

    /// Sends a batch back to back, then reads until every command in it is
    /// answered. A batch is cut where an id repeats, so that each answer
    /// names one command.
    async fn exchange(&mut self, batch: Vec<Pending>) {
        let mut chunk: Vec<Pending> = Vec::new();
        for pending in batch {
            if chunk.iter().any(|p| p.id == pending.id) {
                self.exchange_distinct(std::mem::take(&mut chunk)).await;
            }
            chunk.push(pending);
        }
        self.exchange_distinct(chunk).await;
    }

    async fn exchange_distinct(&mut self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        let client = self.client.as_mut().expect("connected");
        for pending in &batch {
            client
                .ws
                .send(Message::Text(pending.text.clone().into()))
                .await
                .unwrap_or_else(|e| panic!("user {} could not send {}: {e}", self.user, pending.describe()));
            Stats::bump(&self.world.stats.commands);
        }
        let mut pending: Vec<Pending> = batch;
        while !pending.is_empty() {
            match self.receive().await {
                Incoming::Frame(frame, binary) => {
                    if frame.channel.is_some() {
                        self.delivery(frame, binary);
                        continue;
                    }
                    match frame.kind.as_str() {
                        "ack" | "error" | "pong" => {
                            let at = pending
                                .iter()
                                .position(|p| p.id == frame.message_id)
                                .unwrap_or_else(|| {
                                    panic!(
                                        "user {}: an answer {} {:?} that names no command awaiting one; awaiting {:?}",
                                        self.user,
                                        frame.kind,
                                        frame.message_id,
                                        pending.iter().map(Pending::describe).collect::<Vec<_>>()
                                    )
                                });
                            let answered = pending.remove(at);
                            self.answer(answered, frame);
                        }
                        "resync" => {
                            // History could not fill a gap: the connection
                            // starts over on that channel.
                            Stats::bump(&self.world.stats.resyncs);
                            let data = frame.data.as_ref().map_or("{}", |d| d.get());
                            let channel: Value = serde_json::from_str(data).unwrap_or_default();
                            if let Some(track) = channel["channel"].as_str().and_then(|c| self.tracks.get_mut(c)) {
                                track.last = None;
                            }
                        }
                        other => panic!("user {}: unexpected control frame `{other}`", self.user),
                    }
                }
                Incoming::Closed(Some(4008)) => {
                    // Our own client was too slow for the node: allowed,
                    // counted, and its publishes become uncertain.
                    Stats::bump(&self.world.stats.closed_slow);
                    self.give_up(pending);
                    self.reconnect_boxed().await;
                    return;
                }
                Incoming::Closed(code) => panic!(
                    "user {}: the connection ended (close code {code:?}) while answers were due: {:#?}",
                    self.user,
                    pending.iter().map(Pending::describe).collect::<Vec<_>>()
                ),
                Incoming::TimedOut => panic!(
                    "user {}: no answer within {ANSWER_DEADLINE:?} to {:#?}",
                    self.user,
                    pending.iter().map(Pending::describe).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn reconnect_boxed(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.reconnect())
    }

    fn give_up(&mut self, pending: Vec<Pending>) {
        let mut ledger = self.world.ledger();
        for p in pending {
            if let (Command::Publish, Some(payload)) = (p.command, p.payload) {
                ledger.in_doubt.push((p.channel, payload));
            }
        }
    }

    async fn receive(&mut self) -> Incoming {
        let client = self.client.as_mut().expect("connected");
        loop {
            let message = match tokio::time::timeout(ANSWER_DEADLINE, client.ws.next()).await {
                Err(_) => return Incoming::TimedOut,
                Ok(message) => message,
            };
            let (text, binary) = match message {
                None | Some(Err(_)) => return Incoming::Closed(None),
                Some(Ok(Message::Close(frame))) => return Incoming::Closed(frame.map(|f| u16::from(f.code))),
                Some(Ok(Message::Text(text))) => (text.to_string(), None),
                Some(Ok(Message::Binary(bytes))) => {
                    let split = bytes
                        .iter()
                        .position(|b| *b == b'\n')
                        .unwrap_or_else(|| panic!("a binary delivery has a header line: {bytes:?}"));
                    let header = String::from_utf8(bytes[..split].to_vec()).expect("the header is UTF-8");
                    (header, Some(bytes[split + 1..].to_vec()))
                }
                Some(Ok(_)) => continue,
            };
            let frame: Frame = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("user {}: a frame that is not JSON ({e}): {text:.500}", self.user));
            return Incoming::Frame(frame, binary);
        }
    }

    fn delivery(&mut self, frame: Frame, binary: Option<Vec<u8>>) {
        Stats::bump(&self.world.stats.deliveries);
        let channel = frame.channel.clone().expect("a delivery has a channel");
        let context = format!("user {}: delivery on `{channel}`", self.user);
        let Some(offset) = frame.offset else {
            assert!(
                !channel.starts_with("feed:") || frame.kind == "join" || frame.kind == "leave",
                "{context}: a message kept in history has an offset"
            );
            return;
        };
        let epoch = frame
            .epoch
            .clone()
            .unwrap_or_else(|| panic!("{context}: an offset comes with an epoch"));
        let payload = match (binary, &frame.data) {
            (Some(bytes), None) => Payload::Binary(bytes),
            (None, Some(data)) => Payload::Json(data.get().to_owned()),
            _ => panic!("{context}: a delivery has data or a binary payload, not both"),
        };
        if let Some(track) = self.tracks.get_mut(&channel)
            && let Some(last) = track.last
        {
            assert_eq!(
                offset,
                last + 1,
                "{context}: after offset {last} comes {} (a gap or a duplicate)",
                last + 1
            );
            track.last = Some(offset);
        }
        self.positions.insert(channel.clone(), (offset, epoch));
        let message_id = match &frame.message_id {
            Some(Value::String(id)) => id.clone(),
            other => panic!("{context}: a delivery's message_id is a string, not {other:?}"),
        };
        self.world
            .ledger()
            .check(&channel, offset, &message_id, payload, &context);
    }

    fn answer(&mut self, pending: Pending, frame: Frame) {
        let context = format!("user {}: {}", self.user, pending.describe());
        let data = frame.data.as_ref().map_or("{}", |d| d.get());
        match (&pending.expect, frame.kind.as_str()) {
            (Expect::Pong, "pong") => return,
            (Expect::Error(codes), "error") => {
                Stats::bump(&self.world.stats.errors);
                let error: ErrorData = serde_json::from_str(data).unwrap_or_else(|e| panic!("{context}: {e}: {data}"));
                assert!(
                    codes.contains(&error.code.as_str()),
                    "{context}: expected one of {codes:?}, got {data}"
                );
                return;
            }
            (Expect::Ack, "ack") => {}
            (expect, _) => panic!("{context}: expected {expect:?}, got {} {data:.500}", frame.kind),
        }
        match pending.command {
            Command::Subscribe => {
                let position: Position =
                    serde_json::from_str(data).unwrap_or_else(|e| panic!("{context}: {e}: {data}"));
                if pending.kind != Kind::Feed {
                    self.tracks.entry(pending.channel).or_insert(Track { last: None });
                    return;
                }
                let (Some(offset), Some(epoch)) = (position.offset, position.epoch) else {
                    panic!("{context}: a channel with history gives a position: {data}");
                };
                let last = match (&pending.recover, position.recovered) {
                    (Some((from, from_epoch)), Some(true)) => {
                        assert_eq!(*from_epoch, epoch, "{context}: recovered in its epoch: {data}");
                        Some(*from)
                    }
                    (Some(_), Some(false)) => Some(offset),
                    (Some(_), None) => panic!("{context}: a subscribe with offset says whether it recovered"),
                    // Subscribing again keeps the position: nothing changes.
                    (None, _) if self.tracks.contains_key(&pending.channel) => return,
                    (None, _) => Some(offset),
                };
                self.positions.insert(pending.channel.clone(), (offset, epoch));
                self.tracks.insert(pending.channel, Track { last });
            }
            Command::Unsubscribe => {
                self.tracks.remove(&pending.channel);
            }
            Command::Publish => {
                let receipt: PublishReceipt =
                    serde_json::from_str(data).unwrap_or_else(|e| panic!("{context}: {e}: {data}"));
                let payload = pending.payload.expect("a publish has a payload");
                let kind = if pending.kind == Kind::Feed {
                    Kind::Feed
                } else {
                    Kind::Room
                };
                record_receipt(&self.world, kind, &pending.channel, &receipt, &payload, &context);
            }
            Command::History => {
                let page = Page::parse(data, &context);
                page.check(&self.world, &pending.channel, &context);
            }
            Command::Presence => {
                let presence: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{context}: {e}"));
                assert!(presence["connections"].is_u64(), "{context}: {data}");
                assert!(presence["users"].is_array(), "{context}: {data}");
            }
            Command::Ping | Command::Unknown | Command::MissingField => {
                panic!("{context}: expected an error, got an ack")
            }
        }
    }

    /// Ends the connection in one of several rude ways.
    async fn disconnect(&mut self) {
        Stats::bump(&self.world.stats.disconnects);
        let mut client = self.client.take().expect("connected");
        match self.rng.below(4) {
            // Gone without a word: the TCP connection just closes.
            0 => drop(client),
            // A close frame, not waiting for the answer.
            1 => {
                let _ = client.ws.send(Message::Close(None)).await;
                drop(client);
            }
            // Commands in flight, never read (never a publish: its outcome
            // would be unknown).
            2 => {
                for _ in 0..self.rng.range(1, 3) {
                    let text = format!(
                        "{{\"type\":\"history\",\"message_id\":\"gone\",\"data\":{{\"channel\":\"feed:{}\"}}}}",
                        self.rng.below(FEEDS)
                    );
                    let _ = client.ws.send(Message::Text(text.into())).await;
                }
                drop(client);
            }
            // A frame over max_message_size: close 1009.
            _ => {
                let size = MAX_MESSAGE_SIZE + self.rng.range(1, 2_000) as usize;
                let text = format!(
                    "{{\"type\":\"publish\",\"data\":{{\"channel\":\"feed:0\",\"data\":{}}}}}",
                    json_of_length(size)
                );
                let _ = client.ws.send(Message::Text(text.into())).await;
                self.client = Some(client);
                loop {
                    match self.receive().await {
                        Incoming::Frame(frame, binary) => {
                            if frame.channel.is_some() {
                                self.delivery(frame, binary);
                            }
                        }
                        Incoming::Closed(Some(code)) => {
                            assert!(
                                code == 1009 || code == 4008,
                                "an oversized frame closes with 1009, not {code}"
                            );
                            Stats::bump(&self.world.stats.closed_1009);
                            break;
                        }
                        // Issue 9.17: the close frame may be lost to a reset.
                        Incoming::Closed(None) => break,
                        Incoming::TimedOut => panic!("user {}: an oversized frame was never answered", self.user),
                    }
                }
                self.client = None;
            }
        }
    }
}

// Watching the node while it runs.

/// Samples `/health`, `/metrics` and the node's resident memory until the
/// deadline; returns the peak RSS in KiB.
async fn monitor(world: Arc<World>, node: Arc<TestServer>, pid: u32, memory_history: bool) -> u64 {
    let mut peak = 0;
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    while world.running() {
        interval.tick().await;
        let (status, _) = node.http("GET", "/health", None, None).await;
        assert_eq!(status, 200, "/health during the run");
        if memory_history {
            check_history_gauges(&world, &node).await;
        }
        let rss = rss_kib(pid);
        assert!(rss < RSS_CAP_KIB, "the node's RSS is {rss} KiB");
        peak = peak.max(rss);
    }
    peak
}

/// The memory history holds at most `history_size` messages per channel
/// that was published to.
async fn check_history_gauges(world: &World, node: &TestServer) {
    let metrics = node.metrics().await;
    let channels_used = world.ledger().history_channels.len() as f64;
    let channels = metric_value(&metrics, "herald_history_channels");
    let messages = metric_value(&metrics, "herald_history_messages");
    assert!(
        channels <= channels_used,
        "{channels} channels in memory history, {channels_used} used"
    );
    assert!(
        messages <= channels_used * HISTORY_SIZE as f64,
        "{messages} messages in memory history for {channels_used} channels of {HISTORY_SIZE}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn check_memory_bounds(world: &World, nodes: &[Node], redis: Option<&RedisServer>) {
    match redis {
        None => {
            for node in nodes {
                check_history_gauges(world, &node.view).await;
            }
        }
        Some(redis) => {
            let channels: Vec<String> = world.ledger().history_channels.iter().cloned().collect();
            for channel in channels {
                let key = format!("{}hist:{channel}", redis.prefix());
                let length: u64 = redis.cli(&["XLEN", &key]).parse().unwrap_or(0);
                assert!(length <= HISTORY_SIZE, "`{key}` holds {length} entries");
            }
        }
    }
    for node in nodes {
        let rss = rss_kib(node.pid());
        assert!(rss < RSS_CAP_KIB, "the node's RSS is {rss} KiB");
    }
}

// Reading every kept message back.

/// Every channel's kept messages are exactly the latest `HISTORY_SIZE`
/// accepted ones, with their bytes, over HTTP (one page, and paged), the
/// `history` command, and a recovering subscribe.
async fn verify_history(world: &World, node: &TestServer) {
    let channels: Vec<String> = world.ledger().history_channels.iter().cloned().collect();
    let mut reader = node.connect("verifier").await;
    for (n, channel) in channels.iter().enumerate() {
        let (last, epoch) = {
            let ledger = world.ledger();
            let last = ledger.last_offset(channel);
            let holes: Vec<u64> = (1..=last)
                .filter(|offset| !ledger.accepted.contains_key(&(channel.clone(), *offset)))
                .collect();
            let doubts = ledger.in_doubt.iter().filter(|(c, _)| c == channel).count();
            assert!(
                holes.len() <= doubts,
                "`{channel}`: offsets {holes:?} were assigned but no publisher was told so"
            );
            (last, ledger.epochs.get(channel).cloned())
        };
        let Some(epoch) = epoch else { continue };
        let first = last.saturating_sub(HISTORY_SIZE) + 1;
        let expected: Vec<u64> = (first..=last).collect();

        let path = format!("/api/v1/channels/{}/history?limit=1000", encode_segment(channel));
        let context = format!("after the run, GET {path}");
        let (status, body) = http_get(node, &path).await;
        assert_eq!(status, 200, "{context}: {body:.500}");
        let page = Page::parse(&body, &context);
        assert_eq!((page.offset, page.epoch.as_str()), (last, epoch.as_str()), "{context}");
        assert_eq!(page.check(world, channel, &context), expected, "{context}");

        // Paged from before the first kept message, in small pages.
        let mut from = first - 1;
        let mut offsets = Vec::new();
        while from < last {
            let limit = 1 + (n as u64 + from) % 20;
            let path = format!(
                "/api/v1/channels/{}/history?offset={from}&epoch={epoch}&limit={limit}",
                encode_segment(channel)
            );
            let context = format!("after the run, GET {path}");
            let (status, body) = http_get(node, &path).await;
            assert_eq!(status, 200, "{context}: {body:.500}");
            let page = Page::parse(&body, &context);
            assert!(page.recovered, "{context}: {body:.500}");
            offsets.extend(page.check(world, channel, &context));
            let next = page.next.unwrap_or_else(|| panic!("{context}: `next` is given"));
            assert!(next > from, "{context}: paging moves on");
            from = next;
        }
        assert_eq!(offsets, expected, "`{channel}` paged over HTTP");

        let context = format!("after the run, the history command on `{channel}`");
        let text = json!({"type": "history", "message_id": "verify", "data": {"channel": channel, "limit": 1000}});
        let answer = raw_command(&mut reader, &text.to_string(), &context).await;
        let page = Page::parse(&answer, &context);
        assert_eq!(page.check(world, channel, &context), expected, "{context}");

        // Recovery replays the same messages, with the same bytes.
        let context = format!("after the run, recovering `{channel}` from offset {}", first - 1);
        let text = json!({"type": "subscribe", "message_id": "verify", "data": {"channel": channel, "offset": first - 1, "epoch": epoch}});
        let answer = raw_command(&mut reader, &text.to_string(), &context).await;
        let position: Position = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_eq!(position.recovered, Some(true), "{context}: {answer}");
        let mut replayed = Vec::new();
        while replayed.len() < expected.len() {
            let message = tokio::time::timeout(ANSWER_DEADLINE, reader.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{context}: replay stalled after {replayed:?}"));
            let (text, binary) = match message {
                Some(Ok(Message::Text(text))) => (text.to_string(), None),
                Some(Ok(Message::Binary(bytes))) => {
                    let split = bytes.iter().position(|b| *b == b'\n').expect("a header line");
                    (
                        String::from_utf8(bytes[..split].to_vec()).unwrap(),
                        Some(bytes[split + 1..].to_vec()),
                    )
                }
                Some(Ok(_)) => continue,
                other => panic!("{context}: the connection ended: {other:?}"),
            };
            let frame: Frame = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{context}: {e}"));
            if frame.channel.as_deref() != Some(channel.as_str()) {
                continue;
            }
            let offset = frame.offset.expect("an offset");
            let payload = match binary {
                Some(bytes) => Payload::Binary(bytes),
                None => Payload::Json(frame.data.expect("data").get().to_owned()),
            };
            let message_id = frame
                .message_id
                .and_then(|id| id.as_str().map(str::to_owned))
                .expect("an id");
            world.ledger().check(channel, offset, &message_id, payload, &context);
            replayed.push(offset);
        }
        assert_eq!(replayed, expected, "{context}");
        let text = json!({"type": "unsubscribe", "message_id": "verify", "data": {"channel": channel}});
        raw_command(&mut reader, &text.to_string(), &context).await;
    }
    world.ledger().verify_unverified();
    let _ = reader.ws.close(None).await;
}

/// Sends one command and returns its ack's `data` as text, skipping
/// deliveries; an error or a closed connection fails with `context`.
async fn raw_command(client: &mut Client, text: &str, context: &str) -> String {
    client
        .ws
        .send(Message::Text(text.to_owned().into()))
        .await
        .unwrap_or_else(|e| panic!("{context}: send: {e}"));
    loop {
        let message = tokio::time::timeout(ANSWER_DEADLINE, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{context}: no answer within {ANSWER_DEADLINE:?}"));
        let text = match message {
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("{context}: the connection ended without an answer: {other:?}"),
        };
        let frame: Frame = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{context}: {e}"));
        if frame.channel.is_some() {
            continue;
        }
        assert_eq!(frame.kind, "ack", "{context}: {text:.500}");
        return frame.data.map(|d| d.get().to_owned()).unwrap_or_default();
    }
}
