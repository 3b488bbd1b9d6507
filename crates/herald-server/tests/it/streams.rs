//! Redis Streams ingest against a real `redis-server`: invalid entries,
//! error replies from Redis, and per-channel order across nodes; and the
//! Redis links' reconnect loops.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_core::resp::encode_command;
use herald_server::redis::link::read_value;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{RedisServer, TestServer, configured_env, expect_only_marker, spawn, wait_until};

async fn node(redis: &RedisServer, extra: &str) -> TestServer {
    let server = TestServer::start_with(&redis.toml(extra)).await;
    server.wait_ready().await;
    server
}

fn stream_key(redis: &RedisServer) -> String {
    format!("{}publish", redis.prefix())
}

/// The consumer group's last delivered entry id ("" before the group exists).
fn last_delivered(redis: &RedisServer) -> String {
    let info = redis.cli(&["XINFO", "GROUPS", &stream_key(redis)]);
    let lines: Vec<&str> = info.lines().collect();
    lines
        .iter()
        .position(|line| *line == "last-delivered-id")
        .and_then(|i| lines.get(i + 1))
        .map_or_else(String::new, |id| (*id).to_owned())
}

/// Entries that are too large, name an invalid channel or carry data that is
/// not JSON are acknowledged, counted, copied to the (capped) dead-letter
/// stream, and do not hold up the entries after them.
#[tokio::test]
async fn invalid_stream_entries_are_dead_lettered_and_ingest_goes_on() {
    let redis = RedisServer::start().await;
    let server = node(&redis, "dead_letter_max_len = 2\n[limits]\nmax_message_size = 200").await;
    let mut reader = server.connect("reader").await;
    reader.subscribe("group:feed").await;
    let stream = stream_key(&redis);
    let big = json!({"pad": "x".repeat(500)}).to_string();
    let bad: [&[&str]; 3] = [
        &["channel", "group:feed", "data", &big],
        &["channel", "no spaces allowed", "data", "{}"],
        &["channel", "group:feed", "data", "not json"],
    ];
    let mut ids = Vec::new();
    for fields in bad {
        let mut command = vec!["XADD", &stream, "*"];
        command.extend(fields);
        let id = redis.cli(&command);
        // Each bad entry is read on its own, before the next is added.
        wait_until("the node read the entry", || async { last_delivered(&redis) == id }).await;
        ids.push(id);
    }
    redis.cli(&["XADD", &stream, "*", "channel", "group:feed", "data", r#"{"good":1}"#]);
    let frame = reader.next_frame().await;
    assert_eq!(frame["data"], json!({"good": 1}), "{frame}");
    wait_until("every entry is acknowledged", || async {
        redis.cli(&["XPENDING", &stream, "herald"]).starts_with('0')
    })
    .await;
    expect_only_marker(&server, &mut reader, "group:feed").await;

    for reason in ["too_large", "channel", "data"] {
        let series = format!("herald_stream_entries_invalid_total{{reason=\"{reason}\"}}");
        assert_eq!(server.metric(&series).await, 1.0, "{series}");
    }
    assert_eq!(server.metric("herald_stream_entries_total").await, 1.0);
    // Capped at 2: the oldest dead letter was trimmed.
    let dead = format!("{stream}:dead");
    assert_eq!(redis.cli(&["XLEN", &dead]), "2");
    let last = redis.cli(&["XREVRANGE", &dead, "+", "-", "COUNT", "1"]);
    let lines: Vec<&str> = last.lines().skip(1).collect();
    let field = |name: &str| lines.chunks(2).find(|pair| pair[0] == name).map_or("", |pair| pair[1]);
    assert_eq!(field("dead.entry"), ids[2], "{last}");
    assert_eq!(field("dead.reason"), "data", "{last}");
    assert_eq!(field("data"), "not json", "the original fields are kept: {last}");
}

/// `XGROUP CREATE` requests Redis has seen (executed or refused).
fn xgroup_creates(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let Some(line) = stats.lines().find(|l| l.starts_with("cmdstat_xgroup|create:")) else {
        return 0;
    };
    line.split([':', ','])
        .filter_map(|field| field.split_once('='))
        .filter(|(name, _)| ["calls", "rejected_calls"].contains(name))
        .map(|(_, value)| value.parse::<u64>().unwrap_or(0))
        .sum()
}

/// Runs `herald serve` against `redis` (as `url`) while creating the
/// consumer group fails, and checks that it backs off and warns once; then
/// `fix` removes the cause and ingest must start working.
async fn backs_off_and_recovers(redis: &RedisServer, url: &str, fix: &[&str]) {
    let mut env = configured_env();
    env.push(("HERALD_REDIS_URL", url));
    let mut server = spawn(&[], &env, Stdio::piped()).await;
    wait_until("a first attempt", || async { xgroup_creates(redis) >= 1 }).await;
    let first = Instant::now();
    wait_until("three more attempts", || async { xgroup_creates(redis) >= 4 }).await;
    // Back-off from 50 ms, doubling, each delay at least half its step:
    // three delays take at least 25 + 50 + 100 ms.
    let elapsed = first.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150),
        "three retries in {elapsed:?}: {} attempts so far",
        xgroup_creates(redis)
    );
    redis.cli(fix);
    wait_until("the consumer group exists", || async {
        redis.cli(&["XINFO", "GROUPS", "herald:publish"]).contains("herald")
    })
    .await;
    let _ = server.child.start_kill();
    let mut stderr = String::new();
    let mut pipe = server.child.stderr.take().expect("stderr is piped");
    tokio::time::timeout(crate::harness::DEADLINE, pipe.read_to_string(&mut stderr))
        .await
        .expect("stderr ends with the process")
        .expect("stderr is text");
    let warnings = stderr.lines().filter(|l| l.contains("stream ingest failed")).count();
    assert_eq!(warnings, 1, "one warning for one lasting error:\n{stderr}");
    assert!(stderr.contains("stream ingest works again"), "{stderr}");
}

/// `{prefix}publish` holding a string: every `XGROUP CREATE` gets `WRONGTYPE`.
#[tokio::test]
async fn a_wrongtype_stream_key_is_retried_with_backoff() {
    let redis = RedisServer::start().await;
    redis.cli(&["SET", "herald:publish", "not a stream"]);
    backs_off_and_recovers(&redis, &redis.url(), &["DEL", "herald:publish"]).await;
}

/// A Redis user without `XGROUP`: every attempt gets `NOPERM`.
#[tokio::test]
async fn a_missing_redis_permission_is_retried_with_backoff() {
    let redis = RedisServer::start().await;
    redis.cli(&[
        "ACL",
        "SETUSER",
        "ingest",
        "on",
        ">ingest-pw",
        "~*",
        "&*",
        "+@all",
        "-xgroup",
    ]);
    let url = format!("redis://ingest:ingest-pw@127.0.0.1:{}", redis.port);
    backs_off_and_recovers(&redis, &url, &["ACL", "SETUSER", "ingest", "+xgroup"]).await;
}

/// Adds `per_channel` entries to each of `channels`, numbered `seq` 0.. per
/// channel, in bursts (one pipelined write of `burst` entries per channel
/// every 10 ms: a few hundred entries a second). Uses a connection of its
/// own: one `redis-cli` per entry would be far too slow.
async fn add_numbered_entries(port: u16, stream: &str, channels: &[&str], per_channel: u64, burst: u64) {
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("redis accepts");
    let (mut out, mut replies) = (BytesMut::new(), BytesMut::new());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for first in (0..per_channel).step_by(burst as usize) {
        tick.tick().await;
        out.clear();
        let mut added = 0;
        // A channel's entries back to back, so that nodes reading in
        // parallel would get neighbours of the same channel.
        for channel in channels {
            for seq in first..(first + burst).min(per_channel) {
                let data = json!({"seq": seq}).to_string();
                encode_command(&["XADD", stream, "*", "channel", channel, "data", &data], &mut out);
                added += 1;
            }
        }
        connection.write_all(&out).await.expect("redis takes the entries");
        for _ in 0..added {
            read_value(&mut connection, &mut replies).await.expect("XADD answered");
        }
    }
}

/// Two nodes share the consumer group; entries of one channel reach its
/// subscribers (on both nodes) in `XADD` order, each once.
#[tokio::test]
async fn two_consuming_nodes_keep_each_channels_stream_order() {
    const CHANNELS: [&str; 2] = ["group:order0", "group:order1"];
    const PER_CHANNEL: u64 = 400;
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis, "").await, node(&redis, "").await);
    let mut readers = Vec::new();
    for server in [&a, &b] {
        for channel in CHANNELS {
            let mut client = server.connect("reader").await;
            client.subscribe(channel).await;
            readers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < PER_CHANNEL as usize {
                    let frame = client.next_frame().await;
                    assert_eq!(frame["channel"], channel, "{frame}");
                    seen.push(frame["data"]["seq"].as_u64().expect("a sequence number"));
                }
                (channel, seen)
            }));
        }
    }
    add_numbered_entries(redis.port, &stream_key(&redis), &CHANNELS, PER_CHANNEL, 4).await;
    for reader in readers {
        let (channel, seen) = reader.await.expect("the reader saw every entry");
        let inversions = seen.windows(2).filter(|pair| pair[1] <= pair[0]).count();
        assert_eq!(inversions, 0, "{channel}: {inversions} entries out of order: {seen:?}");
        assert_eq!(
            seen,
            (0..PER_CHANNEL).collect::<Vec<_>>(),
            "{channel}: every entry once"
        );
    }
}

/// Collects `count` sequence numbers delivered on `channel` to `client`.
fn collect_sequence(
    mut client: crate::harness::Client,
    channel: &'static str,
    count: u64,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < count as usize {
            let frame = client.next_frame().await;
            assert_eq!(frame["channel"], channel, "{frame}");
            seen.push(frame["data"]["seq"].as_u64().expect("a sequence number"));
        }
        seen
    })
}

/// An entry Redis refuses to publish (here the channel's offset key holds a
/// hash, so the publish script fails) is a broker error, not an invalid
/// entry: it stays pending with the entries behind it on its channel, is
/// retried, and they all arrive in order, each once, when Redis takes them.
#[tokio::test]
async fn entries_redis_refuses_are_retried_in_order() {
    const CHANNEL: &str = "feed:a";
    let redis = RedisServer::start().await;
    let server = node(
        &redis,
        "[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 10",
    )
    .await;
    let mut client = server.connect("reader").await;
    client.subscribe(CHANNEL).await;
    let seen = collect_sequence(client, CHANNEL, 6);
    let offset_key = format!("{}off:{CHANNEL}", redis.prefix());
    redis.cli(&["HSET", &offset_key, "broken", "1"]);
    let stream = stream_key(&redis);
    for seq in 0..6 {
        let data = json!({"seq": seq}).to_string();
        redis.cli(&["XADD", &stream, "*", "channel", CHANNEL, "data", &data]);
    }
    wait_until("the first entry was retried", || async {
        let pending = redis.cli(&["XPENDING", &stream, "herald", "-", "+", "1"]);
        pending.lines().nth(3).and_then(|n| n.parse::<u64>().ok()) >= Some(2)
    })
    .await;
    redis.cli(&["DEL", &offset_key]);
    assert_eq!(seen.await.expect("every entry arrives"), (0..6).collect::<Vec<_>>());
    wait_until("everything is acknowledged", || async {
        redis.cli(&["XPENDING", &stream, "herald"]).starts_with('0')
    })
    .await;
    assert_eq!(redis.cli(&["XLEN", &format!("{stream}:dead")]), "0");
}

/// A reader that died holding the lease: after the lease expires
/// (`claim_idle`), the next reader publishes what the dead one left pending
/// before anything newer, in order.
#[tokio::test]
async fn a_dead_readers_entries_are_taken_over_in_order() {
    const CHANNEL: &str = "group:handover";
    let redis = RedisServer::start().await;
    let listener = node(&redis, "streams = false").await;
    let mut client = listener.connect("reader").await;
    client.subscribe(CHANNEL).await;
    let seen = collect_sequence(client, CHANNEL, 20);
    let stream = stream_key(&redis);
    redis.cli(&["SET", &format!("{stream}:reader"), "dead-node", "PX", "1000"]);
    redis.cli(&["XGROUP", "CREATE", &stream, "herald", "0", "MKSTREAM"]);
    let xadd = |seq: u64| {
        let data = json!({"seq": seq}).to_string();
        redis.cli(&["XADD", &stream, "*", "channel", CHANNEL, "data", &data]);
    };
    (0..10).for_each(xadd);
    let read = [
        "XREADGROUP",
        "GROUP",
        "herald",
        "dead-node",
        "COUNT",
        "100",
        "STREAMS",
        &stream,
        ">",
    ];
    redis.cli(&read);
    let reader = node(&redis, "claim_idle = \"1s\"").await;
    (10..20).for_each(xadd);
    assert_eq!(seen.await.expect("every entry arrives"), (0..20).collect::<Vec<_>>());
    assert_eq!(reader.metric("herald_stream_reader").await, 1.0);
    wait_until("everything is acknowledged", || async {
        redis.cli(&["XPENDING", &stream, "herald"]).starts_with('0')
    })
    .await;
}

/// The reading node drains mid-stream: it gives the lease up, the other
/// node takes over, and subscribers see every entry once, in order.
#[tokio::test]
async fn a_draining_reader_hands_over_without_loss_or_reordering() {
    const CHANNEL: &str = "group:relay";
    const COUNT: u64 = 300;
    let redis = RedisServer::start().await;
    let listener = node(&redis, "streams = false").await;
    let mut client = listener.connect("reader").await;
    client.subscribe(CHANNEL).await;
    let seen = collect_sequence(client, CHANNEL, COUNT);
    let mut nodes = vec![node(&redis, "").await, node(&redis, "").await];
    wait_until("one node reads the stream", || async {
        nodes[0].metric("herald_stream_reader").await + nodes[1].metric("herald_stream_reader").await == 1.0
    })
    .await;
    let reader = usize::from(nodes[0].metric("herald_stream_reader").await == 0.0);
    let mut draining = nodes.swap_remove(reader);
    let adding = {
        let (port, stream) = (redis.port, stream_key(&redis));
        tokio::spawn(async move { add_numbered_entries(port, &stream, &[CHANNEL], COUNT, 3).await })
    };
    wait_until("some entries went through", || async {
        draining.metric("herald_stream_entries_total").await >= 30.0
    })
    .await;
    let running = draining.running.take().expect("an in-process node");
    assert!(running.stop().await, "the node stops in time");
    adding.await.expect("every entry was added");
    assert_eq!(seen.await.expect("every entry arrives"), (0..COUNT).collect::<Vec<_>>());
    assert_eq!(nodes[0].metric("herald_stream_reader").await, 1.0);
    assert!(nodes[0].metric("herald_stream_entries_total").await >= 1.0);
}

/// Sends one command on `connection` and returns its reply.
async fn command(connection: &mut tokio::net::TcpStream, args: &[&str]) -> herald_core::resp::Value {
    let (mut out, mut replies) = (BytesMut::new(), BytesMut::new());
    encode_command(args, &mut out);
    connection.write_all(&out).await.expect("redis takes the command");
    read_value(connection, &mut replies).await.expect("redis answers")
}

/// Connections Redis accepted and closed at once because of `maxclients`.
async fn rejected_connections(admin: &mut tokio::net::TcpStream) -> u64 {
    let info = command(admin, &["INFO", "stats"]).await;
    let text = String::from_utf8_lossy(info.as_bytes().unwrap_or_default()).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix("rejected_connections:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (with the harness deadline) until Redis has rejected `count`
/// connections; returns when that was seen.
async fn until_rejected(admin: &tokio::sync::Mutex<tokio::net::TcpStream>, count: u64) -> Instant {
    wait_until(&format!("Redis rejected {count} connections"), || async {
        rejected_connections(&mut *admin.lock().await).await >= count
    })
    .await;
    Instant::now()
}

/// Redis accepting a connection and closing it at once (here: `maxclients`
/// reached) is retried with back-off, like a refused connection, and the
/// node recovers once Redis takes clients again.
#[tokio::test]
async fn a_redis_that_drops_new_connections_is_retried_with_backoff() {
    let redis = RedisServer::start().await;
    let server = node(&redis, "streams = false").await;
    // The test's own connection outlives the limit.
    let mut admin = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .expect("redis accepts");
    let ok = command(&mut admin, &["CONFIG", "SET", "maxclients", "1"]).await;
    assert_eq!(ok.as_str(), Some("OK"), "{ok:?}");
    // Drops the node's two links (command and Pub/Sub: it subscribes to nothing yet).
    command(&mut admin, &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).await;
    let admin = tokio::sync::Mutex::new(admin);
    let first = until_rejected(&admin, 1).await;
    let seventh = until_rejected(&admin, 7).await;
    let mut admin = admin.into_inner();
    // Six more attempts from two links: one of them made three. Back-off
    // from 50 ms, doubling, each delay at least half its step: 25 + 50 + 100 ms.
    let elapsed = seventh - first;
    assert!(
        elapsed >= Duration::from_millis(150),
        "six reconnects in {elapsed:?}: {} rejected so far",
        rejected_connections(&mut admin).await
    );
    command(&mut admin, &["CONFIG", "SET", "maxclients", "10000"]).await;
    server.wait_ready().await;
    expect_only_marker(&server, &mut server.connect("after").await, "user:after").await;
}
