//! Presence, join/leave events and online status, across nodes.

use std::process::Stdio;

use serde_json::{Value, json};

use crate::harness::{
    API_KEY, Client, RedisServer, TestServer, configured_env, expect_only_marker, ready_status, spawn, view, wait_until,
};

const ROOM: &str = "[namespaces.room]\nsubscribe = \"authenticated\"\npresence = true\njoin_leave = true";

async fn ready_node(redis: &RedisServer) -> TestServer {
    let server = TestServer::start_with(&format!("{ROOM}\n{}", redis.toml("node_timeout = \"3s\""))).await;
    server.wait_ready().await;
    server
}

/// A node in a child process of its own (so that it can be killed
/// outright), sharing `redis`, with `namespaces` TOML and a 3 s node
/// timeout; ready. Returns the process, a view of it, and its config file.
async fn killable_node(
    redis: &RedisServer,
    namespaces: &str,
    name: &str,
) -> (crate::harness::Process, TestServer, std::path::PathBuf) {
    let config = std::env::temp_dir().join(format!("herald-{name}-{}.toml", redis.port));
    std::fs::write(
        &config,
        format!("{namespaces}\n{}", redis.toml("node_timeout = \"3s\"")),
    )
    .unwrap();
    let process = spawn(
        &["--config", config.to_str().unwrap()],
        &configured_env(),
        Stdio::null(),
    )
    .await;
    let view = view(&process.addr);
    let addr = view.addr;
    wait_until(
        "the second node is ready",
        || async move { ready_status(addr).await == 200 },
    )
    .await;
    (process, view, config)
}

/// The users in `channel`'s presence, as seen by `server`.
async fn present(server: &TestServer, channel: &str) -> Vec<String> {
    let (status, body) = server
        .http(
            "GET",
            &format!("/api/v1/channels/{channel}/presence"),
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The next `join` or `leave` on `channel`, skipping other frames.
async fn next_event(client: &mut Client) -> (String, String) {
    loop {
        let frame = client.next_frame().await;
        if let Some(kind @ ("join" | "leave")) = frame["type"].as_str() {
            return (kind.to_owned(), frame["data"]["user_id"].as_str().unwrap().to_owned());
        }
    }
}

#[tokio::test]
async fn presence_and_join_leave_are_right_across_two_nodes() {
    let redis = RedisServer::start().await;
    let (a, b) = (ready_node(&redis).await, ready_node(&redis).await);
    let mut alice = a.connect("alice").await;
    alice.subscribe("room:1").await;
    let mut bob_on_b = b.connect("bob").await;
    bob_on_b.subscribe("room:1").await;
    assert_eq!(next_event(&mut alice).await, ("join".into(), "bob".into()));
    expect_only_marker(&a, &mut bob_on_b, "room:1").await; // no echo of his own join
    alice.next_frame().await;
    for node in [&a, &b] {
        assert_eq!(present(node, "room:1").await, ["alice", "bob"]);
    }
    let reply = alice.command("presence", "p", json!({"channel": "room:1"})).await;
    assert_eq!(reply["data"]["connections"], 2, "{reply}");

    // A second tab is not a second join; closing one of two is not a leave.
    let mut bob_on_a = a.connect("bob").await;
    bob_on_a.subscribe("room:1").await;
    bob_on_b.command("unsubscribe", "u", json!({"channel": "room:1"})).await;
    expect_only_marker(&a, &mut alice, "room:1").await;
    drop(bob_on_a);
    assert_eq!(next_event(&mut alice).await, ("leave".into(), "bob".into()));

    let (status, body) = a
        .http("GET", "/api/v1/presence/users?ids=alice,bob,zed", Some(API_KEY), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let online: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        online["users"],
        json!({"alice": true, "bob": true, "zed": false}),
        "bob still has a tab on b"
    );
    // Cluster totals come from the nodes' heartbeats (every second).
    wait_until("/stats shows both nodes and both connections", || async {
        let (_, stats) = b.http("GET", "/stats", None, None).await;
        let stats: Value = serde_json::from_str(&stats).unwrap();
        stats["cluster"]["nodes"] == 2 && stats["cluster"]["connections"] == 2
    })
    .await;
}

#[tokio::test]
async fn a_killed_nodes_users_leave_within_the_node_timeout() {
    let redis = RedisServer::start().await;
    let a = ready_node(&redis).await;
    let mut alice = a.connect("alice").await;
    alice.subscribe("room:9").await;

    // A second node in its own process, so that it can be killed outright.
    let (mut second, view, config) = killable_node(&redis, ROOM, "presence").await;
    let mut carol = view.connect("carol").await;
    carol.subscribe("room:9").await;
    assert_eq!(next_event(&mut alice).await, ("join".into(), "carol".into()));

    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
    let killed_at = std::time::Instant::now();
    // Detected within node_timeout (3 s) plus a heartbeat (1 s) of margin.
    assert_eq!(next_event(&mut alice).await, ("leave".into(), "carol".into()));
    assert!(
        killed_at.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(present(&a, "room:9").await, ["alice"]);
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn join_leave_and_presence_in_memory() {
    let server = TestServer::start_with(ROOM).await;
    let mut alice = server.connect("alice").await;
    alice.subscribe("room:2").await;
    let mut bob = server.connect("bob").await;
    bob.subscribe("room:2").await;
    assert_eq!(next_event(&mut alice).await, ("join".into(), "bob".into()));
    assert_eq!(present(&server, "room:2").await, ["alice", "bob"]);
    drop(bob);
    assert_eq!(next_event(&mut alice).await, ("leave".into(), "bob".into()));
    let (_, body) = server
        .http("GET", "/api/v1/presence/users?ids=alice,bob", Some(API_KEY), None)
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["users"],
        json!({"alice": true, "bob": false})
    );
}

/// Users who reconnect quickly, over and over, many at once, are announced
/// in order: each user's joins and leaves alternate and the last one is a
/// join, because each is published in the same step that counts the user's
/// connections (a separate publish after the count let a join overtake the
/// leave before it).
#[tokio::test]
async fn quick_reconnects_announce_join_and_leave_in_order() {
    const USERS: usize = 20;
    const ROUNDS: usize = 15;
    let redis = RedisServer::start().await;
    let (a, b) = (ready_node(&redis).await, ready_node(&redis).await);
    let mut alice = a.connect("alice").await;
    alice.subscribe("room:9").await;
    let reconnecting = (0..USERS).map(|user| {
        let b = &b;
        async move {
            let name = format!("u{user}");
            let mut client = b.connect(&name).await;
            client.subscribe("room:9").await;
            for _ in 0..ROUNDS {
                // The next tab opens, then the last one closes as the next
                // one joins the room: the leave and the join race.
                let mut next = b.connect(&name).await;
                drop(client);
                next.subscribe("room:9").await;
                client = next;
            }
            client
        }
    });
    let _clients = futures_util::future::join_all(reconnecting).await;
    // Every departure is recorded once presence holds each user's last tab.
    wait_until("only the last connections are present", || async {
        let (_, body) = a
            .http("GET", "/api/v1/channels/room:9/presence", Some(API_KEY), None)
            .await;
        serde_json::from_str::<Value>(&body).unwrap()["connections"] == USERS + 1
    })
    .await;
    a.publish_ok("room:9", json!({"marker": true})).await;
    let mut events: std::collections::HashMap<String, Vec<String>> = Default::default();
    loop {
        let frame = alice.next_frame().await;
        if frame["data"] == json!({"marker": true}) {
            break;
        }
        if let Some(kind @ ("join" | "leave")) = frame["type"].as_str() {
            let user = frame["data"]["user_id"].as_str().unwrap().to_owned();
            events.entry(user).or_default().push(kind.to_owned());
        }
    }
    assert_eq!(events.len(), USERS, "{events:?}");
    for (user, kinds) in &events {
        for (index, kind) in kinds.iter().enumerate() {
            let expected = if index % 2 == 0 { "join" } else { "leave" };
            assert_eq!(kind, expected, "{user}'s events out of order: {kinds:?}");
        }
        assert_eq!(kinds.last().map(String::as_str), Some("join"), "{user}: {kinds:?}");
    }
}

/// A killed node leaves no presence entry behind in Redis, in channels
/// without join/leave events and with no subscriber on a live node too:
/// the node that finds it dead walks every presence hash.
#[tokio::test]
async fn a_killed_nodes_presence_entries_are_all_deleted() {
    let redis = RedisServer::start().await;
    let seen = "[namespaces.seen]\nsubscribe = \"authenticated\"\npresence = true";
    let _a = ready_node(&redis).await;
    let (mut second, view, config) = killable_node(&redis, seen, "presence-gc").await;
    let mut carol = view.connect("carol").await;
    carol.subscribe("seen:1").await;
    let keys = [
        format!("{}presence:user:carol", redis.prefix()),
        format!("{}presence:seen:1", redis.prefix()),
    ];
    for key in &keys {
        assert_eq!(redis.cli(&["EXISTS", key]), "1", "{key}");
    }
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
    wait_until("the dead node's presence entries are gone", || async {
        keys.iter().all(|key| redis.cli(&["EXISTS", key]) == "0")
    })
    .await;
    let _ = std::fs::remove_file(config);
}

/// A TCP proxy in front of Redis whose Redis → node direction can be held:
/// commands still reach Redis and run, but their replies wait until
/// released, as on a congested path.
struct ReplyHoldingProxy {
    addr: std::net::SocketAddr,
    held: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyHoldingProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection goes with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((node, _)) = listener.accept().await {
                let Ok(redis) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                let (node_read, node_write) = node.into_split();
                let (redis_read, redis_write) = redis.into_split();
                connections.spawn(forward(node_read, redis_write, None));
                connections.spawn(forward(redis_read, node_write, Some(watch.clone())));
            }
        });
        ReplyHoldingProxy { addr, held, task }
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

impl Drop for ReplyHoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either ends; with `held`, each chunk waits
/// while it is set.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: Option<tokio::sync::watch::Receiver<bool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if let Some(held) = &mut held
            && held.wait_for(|held| !held).await.is_err()
        {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// The leave is announced in the step that counts it, not after its reply
/// travels back: bob's last tab closes on node b while b's replies from
/// Redis are held back; the leave must reach alice all the same, before bob
/// joins again on node a. (When the node published the leave after reading
/// the count, the join on a overtook it and alice saw bob leave last.)
#[tokio::test]
async fn a_leave_is_announced_when_counted_not_when_its_reply_arrives() {
    let redis = RedisServer::start().await;
    // Long enough that no node is declared dead (and its users swept out
    // of presence) while replies are held.
    let a = TestServer::start_with(&format!("{ROOM}\n{}", redis.toml("node_timeout = \"30s\""))).await;
    a.wait_ready().await;
    let proxy = ReplyHoldingProxy::start(redis.port).await;
    let b = TestServer::start_with(&format!(
        "{ROOM}\n[redis]\nurl = \"redis://{}\"\nprefix = \"{}\"\nnode_timeout = \"30s\"",
        proxy.addr,
        redis.prefix()
    ))
    .await;
    b.wait_ready().await;
    let mut alice = a.connect("alice").await;
    alice.subscribe("room:7").await;
    let mut bob = b.connect("bob").await;
    bob.subscribe("room:7").await;
    assert_eq!(next_event(&mut alice).await, ("join".into(), "bob".into()));

    proxy.hold(true);
    drop(bob);
    let key = format!("{}presence:room:7", redis.prefix());
    wait_until("bob's departure is recorded in redis", || async {
        redis.cli(&["HLEN", &key]) == "1"
    })
    .await;
    // Published by the step that counted it: in milliseconds, whatever
    // happens to the reply (held here for as long as the test runs).
    let leave = tokio::time::timeout(std::time::Duration::from_secs(1), next_event(&mut alice)).await;
    assert_eq!(leave.ok(), Some(("leave".into(), "bob".into())));
    let mut bob = a.connect("bob").await;
    bob.subscribe("room:7").await;
    assert_eq!(next_event(&mut alice).await, ("join".into(), "bob".into()));
    proxy.hold(false);
    b.wait_ready().await;
    // Nothing about bob follows: he is present, and alice's view says so.
    expect_only_marker(&b, &mut alice, "room:7").await;
    assert_eq!(present(&a, "room:7").await, ["alice", "bob"]);
    bob.round_trip().await;
}

/// However long a sweep takes, the node keeps its heartbeat: a dead node
/// left 30,000 users in a join/leave channel, and the node that sweeps them
/// out announces 30,000 leaves, one publish each; its heartbeat in Redis
/// never gets older than two heartbeats meanwhile, so no other node could
/// take it for dead. (When the heartbeat waited for the sweep, it went
/// stale for as long as the sweep took.)
#[tokio::test]
async fn a_long_sweep_does_not_delay_the_heartbeat() {
    const USERS: usize = 30_000;
    let redis = RedisServer::start().await;
    let a = TestServer::start_with(&format!(
        "{ROOM}\n[limits]\nqueue_messages = 100000\nqueue_bytes = 100000000\n{}",
        redis.toml("node_timeout = \"3s\"")
    ))
    .await;
    a.wait_ready().await;
    let mut watcher = a.connect("watcher").await;
    watcher.subscribe("room:crowd").await;
    let (_, stats) = a.http("GET", "/stats", None, None).await;
    let node_id = serde_json::from_str::<Value>(&stats).unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A node that is gone ("ghost", never in the heartbeat set) left its
    // users in the channel.
    let key = format!("{}presence:room:crowd", redis.prefix());
    let fill = "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'ghost:' .. i, 'u' .. i) end return 1";
    assert_eq!(redis.cli(&["EVAL", fill, "1", &key, &USERS.to_string()]), "1");
    wait_until("the sweep removed the ghost's entries", || async {
        redis.cli(&["HLEN", &key]) == "1"
    })
    .await;

    // The leaves are being announced now; watch the heartbeat meanwhile.
    let nodes = format!("{}nodes", redis.prefix());
    let watch_until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut stalest = 0;
    // Sampled every 100 ms over a fixed window (an observation, not a wait).
    let mut sample = tokio::time::interval(std::time::Duration::from_millis(100));
    while std::time::Instant::now() < watch_until {
        sample.tick().await;
        let score: u64 = redis.cli(&["ZSCORE", &nodes, &node_id]).parse().unwrap_or(0);
        stalest = stalest.max(herald_server::util::unix_millis().saturating_sub(score));
    }
    assert!(
        stalest < 2_500,
        "the heartbeat went {stalest} ms stale during the sweep"
    );
    // The sweep was still announcing when the watch ended, or it finished:
    // either way the leaves reach the watcher.
    assert_eq!(
        watcher.expect_type("leave").await["data"]["user_id"]
            .as_str()
            .map(|u| u.starts_with('u')),
        Some(true)
    );
}
