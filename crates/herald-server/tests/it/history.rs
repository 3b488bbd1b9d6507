//! History and recovery, for both backends and for one and two nodes:
//! sequence-numbered payloads, exact recovery, explicit refusal, gap repair.

use serde_json::{Value, json};

use crate::harness::{API_KEY, Client, RedisServer, TestServer, expect_only_marker, ready_status, wait_until};

const FEED: &str = "[namespaces.feed]\nsubscribe = \"authenticated\"\nhistory_size = 5000\nhistory_ttl = \"10m\"";

#[derive(Clone, Copy, Debug)]
enum Setup {
    Memory,
    RedisOneNode,
    RedisTwoNodes,
}

/// The publishing node and the subscribing node (the same one unless two).
struct Nodes {
    publisher: TestServer,
    subscriber: Option<TestServer>,
    redis: Option<RedisServer>,
}

impl Nodes {
    async fn start(setup: Setup, extra: &str) -> Nodes {
        match setup {
            Setup::Memory => Nodes {
                publisher: TestServer::start_with(&format!("{FEED}\n{extra}")).await,
                subscriber: None,
                redis: None,
            },
            Setup::RedisOneNode | Setup::RedisTwoNodes => {
                let redis = RedisServer::start().await;
                let config = format!("{FEED}\n{extra}\n{}", redis.toml(""));
                let publisher = TestServer::start_with(&config).await;
                let subscriber = match setup {
                    Setup::RedisTwoNodes => Some(TestServer::start_with(&config).await),
                    _ => None,
                };
                for node in std::iter::once(&publisher).chain(subscriber.iter()) {
                    node.wait_ready().await;
                }
                Nodes {
                    publisher,
                    subscriber,
                    redis: Some(redis),
                }
            }
        }
    }

    fn subscriber(&self) -> &TestServer {
        self.subscriber.as_ref().unwrap_or(&self.publisher)
    }
}

async fn publish_seq(server: &TestServer, channel: &str, seq: u64) -> Value {
    server.publish_ok(channel, json!({"seq": seq})).await
}

/// Reads deliveries on `channel` until `last` arrives; returns their seqs.
async fn read_until(client: &mut Client, channel: &str, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let frame = client.next_frame().await;
        assert_ne!(frame["type"], "resync", "unexpected resync {frame}");
        if frame["channel"] != channel {
            continue;
        }
        let seq = frame["data"]["seq"].as_u64().unwrap();
        seqs.push(seq);
        if seq == last {
            return seqs;
        }
    }
}

/// A client that saw the first messages goes away; 1,000 are published (and
/// more keep coming while it reconnects); it recovers with its position and
/// receives every missed message exactly once, in order, then the live ones.
async fn recovers_exactly_what_was_missed(setup: Setup) {
    let nodes = Nodes::start(setup, "").await;
    let channel = "feed:news";
    let mut client = nodes.subscriber().connect("reader").await;
    let ack = client.command("subscribe", "s", json!({"channel": channel})).await;
    assert_eq!(ack["data"]["offset"], 0, "{ack}");
    for seq in 0..5 {
        publish_seq(&nodes.publisher, channel, seq).await;
    }
    let mut last = Value::Null;
    for _ in 0..5 {
        last = client.next_frame().await;
    }
    let (offset, epoch) = (
        last["offset"].as_u64().unwrap(),
        last["epoch"].as_str().unwrap().to_owned(),
    );
    assert_eq!(offset, 5);
    drop(client);

    for seq in 5..1_005 {
        publish_seq(&nodes.publisher, channel, seq).await;
    }
    // Publishing continues while the client reconnects and recovers.
    let url = format!("http://{}/api/v1/publish", nodes.publisher.addr);
    let background = tokio::spawn(async move {
        for seq in 1_005..1_205 {
            let body = json!({"channel": channel, "data": {"seq": seq}}).to_string();
            let (status, _) = herald_server::http_client::request("POST", &url, Some(API_KEY), Some(body))
                .await
                .unwrap();
            assert_eq!(status, 200);
        }
    });
    let mut client = nodes.subscriber().connect("reader").await;
    let ack = client
        .command(
            "subscribe",
            "r",
            json!({"channel": channel, "offset": offset, "epoch": epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(ack["data"]["epoch"], epoch.as_str());
    background.await.unwrap();
    publish_seq(&nodes.publisher, channel, 1_205).await;
    let seqs = read_until(&mut client, channel, 1_205).await;
    assert_eq!(
        seqs,
        (5..=1_205).collect::<Vec<_>>(),
        "{setup:?}: every missed message once, in order, then live"
    );
    // Nothing more is pending: the next frame is the next live message.
    publish_seq(&nodes.publisher, channel, 1_206).await;
    assert_eq!(client.next_frame().await["data"]["seq"], 1_206);
}

#[tokio::test]
async fn recovery_is_exact_in_memory() {
    recovers_exactly_what_was_missed(Setup::Memory).await;
}

#[tokio::test]
async fn recovery_is_exact_with_redis() {
    recovers_exactly_what_was_missed(Setup::RedisOneNode).await;
}

#[tokio::test]
async fn recovery_is_exact_across_two_nodes() {
    recovers_exactly_what_was_missed(Setup::RedisTwoNodes).await;
}

async fn beyond_retention_is_refused(setup: Setup) {
    let nodes = Nodes::start(
        setup,
        "[namespaces.short]\nsubscribe = \"authenticated\"\nhistory_size = 10",
    )
    .await;
    let channel = "short:x";
    publish_seq(&nodes.publisher, channel, 0).await;
    let mut client = nodes.subscriber().connect("reader").await;
    let ack = client.command("subscribe", "s", json!({"channel": channel})).await;
    let epoch = ack["data"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(ack["data"]["offset"], 1);
    for seq in 1..50 {
        publish_seq(&nodes.publisher, channel, seq).await;
    }
    let mut late = nodes.subscriber().connect("late").await;
    let ack = late
        .command(
            "subscribe",
            "r",
            json!({"channel": channel, "offset": 1, "epoch": epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], false, "{setup:?}: {ack}");
    assert_eq!(ack["data"]["offset"], 50, "told where the channel is now");
    let ack = late
        .command(
            "subscribe",
            "r2",
            json!({"channel": channel, "offset": 45, "epoch": epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(read_until(&mut late, channel, 49).await, (45..50).collect::<Vec<_>>());
    let ack = late
        .command(
            "subscribe",
            "r3",
            json!({"channel": channel, "offset": 45, "epoch": "another"}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], false, "another epoch");
}

#[tokio::test]
async fn beyond_retention_is_refused_in_memory() {
    beyond_retention_is_refused(Setup::Memory).await;
}

#[tokio::test]
async fn beyond_retention_is_refused_with_redis() {
    beyond_retention_is_refused(Setup::RedisTwoNodes).await;
}

#[tokio::test]
async fn a_redis_restart_without_persistence_starts_a_new_epoch() {
    let mut nodes = Nodes::start(Setup::RedisOneNode, "").await;
    let channel = "feed:epochs";
    let first = publish_seq(&nodes.publisher, channel, 0).await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();
    let redis = nodes.redis.as_mut().unwrap();
    redis.kill();
    redis.restart().await;
    let addr = nodes.publisher.addr;
    wait_until(
        "the node is ready again",
        || async move { ready_status(addr).await == 200 },
    )
    .await;
    let after = publish_seq(&nodes.publisher, channel, 1).await;
    assert_ne!(after["epoch"], old_epoch.as_str(), "history was lost: new epoch");
    assert_eq!(after["offset"], 1);
    let mut client = nodes.publisher.connect("reader").await;
    let ack = client
        .command(
            "subscribe",
            "r",
            json!({"channel": channel, "offset": 1, "epoch": old_epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], false);
    assert_eq!(ack["data"]["epoch"], after["epoch"]);
}

/// A message lost between Redis and a node is noticed by the gap in
/// offsets and filled from history: the subscriber sees every message
/// exactly once, in order. The loss is made exact by running the history
/// script with its PUBLISH aimed at a channel no node listens to: stored and
/// numbered, never delivered.
#[tokio::test]
async fn a_message_lost_on_the_way_to_a_node_is_recovered() {
    let nodes = Nodes::start(Setup::RedisTwoNodes, "").await;
    let channel = "feed:gaps";
    let mut client = nodes.subscriber().connect("reader").await;
    client.subscribe(channel).await;
    let redis = nodes.redis.as_ref().unwrap();
    let prefix = redis.prefix();
    for seq in 0..3 {
        publish_seq(&nodes.publisher, channel, seq).await;
    }
    for seq in 3..5 {
        let wire = json!({"type": "message", "message_id": format!("lost-{seq}"), "timestamp": herald_server::util::unix_millis(), "data": {"seq": seq}});
        let reply = redis.store_in_history(None, channel, &wire, 5000, &format!("{prefix}nowhere"));
        assert!(
            reply.starts_with(&(seq + 1).to_string()),
            "stored as offset {}: {reply}",
            seq + 1
        );
    }
    publish_seq(&nodes.publisher, channel, 5).await;
    let seqs = read_until(&mut client, channel, 5).await;
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5], "the lost messages were recovered, in order");
    assert_eq!(nodes.subscriber().metric("herald_gaps_recovered_total").await, 1.0);
    publish_seq(&nodes.publisher, channel, 6).await;
    assert_eq!(client.next_frame().await["data"]["seq"], 6);
}

#[tokio::test]
async fn history_pages_through_the_command_and_the_api() {
    let nodes = Nodes::start(Setup::Memory, "").await;
    let channel = "feed:paged";
    for seq in 0..30 {
        publish_seq(&nodes.publisher, channel, seq).await;
    }
    let mut client = nodes.publisher.connect("reader").await;
    let page = client
        .command("history", "h", json!({"channel": channel, "limit": 5}))
        .await;
    let data = &page["data"];
    assert_eq!(data["offset"], 30);
    let seqs: Vec<u64> = data["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [25, 26, 27, 28, 29], "the latest, oldest first");
    let epoch = data["epoch"].as_str().unwrap();
    let page = client
        .command(
            "history",
            "h2",
            json!({"channel": channel, "offset": 10, "epoch": epoch, "limit": 3}),
        )
        .await;
    let offsets: Vec<u64> = page["data"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [11, 12, 13]);
    let refused = client.command("history", "h3", json!({"channel": "group:1"})).await;
    assert_eq!(refused["data"]["code"], "not_available");

    let path = format!("/api/v1/channels/{channel}/history?offset=28&epoch={epoch}");
    let (status, body) = nodes.publisher.http("GET", &path, Some(API_KEY), None).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["publications"].as_array().unwrap().len(), 2);
    let (status, _) = nodes.publisher.http("GET", &path, None, None).await;
    assert_eq!(status, 401);
}

const INBOX: &str =
    "[namespaces.user]\nhistory_size = 1000\nhistory_ttl = \"7d\"\n[namespaces.group]\nhistory_size = 100";

async fn inbox_returns_what_an_offline_user_missed(setup: Setup) {
    let nodes = Nodes::start(setup, INBOX).await;
    for seq in 0..50 {
        let body = json!({"channel": "user:alice", "type": "notification", "data": {"seq": seq}});
        assert_eq!(nodes.publisher.publish(body).await.0, 200);
    }
    let token = nodes.subscriber().token("alice");
    let (status, body) = nodes
        .subscriber()
        .http("GET", "/api/v1/inbox", Some(&token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let seqs: Vec<u64> = body["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>(), "{setup:?}: all 50 with one call");
    assert_eq!((body["next"].clone(), body["more"].clone()), (json!(50), json!(false)));

    // Paging: since an offset, a limited page, then the rest.
    let epoch = body["epoch"].as_str().unwrap();
    let (_, page) = nodes
        .subscriber()
        .http(
            "GET",
            &format!("/api/v1/inbox?since=10&epoch={epoch}&limit=15"),
            Some(&token),
            None,
        )
        .await;
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["publications"].as_array().unwrap().len(), 15);
    assert_eq!((page["next"].clone(), page["more"].clone()), (json!(25), json!(true)));
    let (status, _) = nodes
        .subscriber()
        .http("GET", "/api/v1/inbox", Some(API_KEY), None)
        .await;
    assert_eq!(status, 401, "a user token, not the API key");
}

#[tokio::test]
async fn inbox_in_memory() {
    inbox_returns_what_an_offline_user_missed(Setup::Memory).await;
}

#[tokio::test]
async fn inbox_with_redis() {
    inbox_returns_what_an_offline_user_missed(Setup::RedisTwoNodes).await;
}

async fn unread(server: &TestServer, token: &str) -> Value {
    let (status, body) = server
        .http("GET", "/api/v1/unread?channels=group:1", Some(token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["channels"][0]["unread"].clone()
}

async fn read_cursors_follow_the_user(setup: Setup) {
    let nodes = Nodes::start(setup, INBOX).await;
    let mut ids = Vec::new();
    for seq in 0..10 {
        ids.push(
            nodes.publisher.publish_ok("group:1", json!({"seq": seq})).await["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut tab1 = nodes.publisher.connect("alice").await;
    let mut tab2 = nodes.subscriber().connect("alice").await;
    let token = nodes.subscriber().token("alice");
    assert_eq!(unread(nodes.subscriber(), &token).await, 10);
    // Marked by message id alone: the server finds its offset.
    let ack = tab1
        .command("mark_read", "m", json!({"group_id": 1, "message_id": ids[3]}))
        .await;
    assert_eq!(ack["data"]["offset"], 4, "{ack}");
    let event = tab2.expect_type("read").await;
    assert_eq!(
        event["data"],
        json!({"channel": "group:1", "message_id": ids[3], "offset": 4})
    );
    assert_eq!(unread(nodes.subscriber(), &token).await, 6, "{setup:?}");
    tab2.command(
        "mark_read",
        "m2",
        json!({"group_id": 1, "message_id": ids[9], "offset": 10}),
    )
    .await;
    assert_eq!(tab1.expect_type("read").await["data"]["offset"], 10);
    assert_eq!(unread(nodes.subscriber(), &token).await, 0);
    // Read receipts are not messages: the inbox does not keep them.
    let (_, inbox) = nodes
        .subscriber()
        .http("GET", "/api/v1/inbox", Some(&token), None)
        .await;
    let inbox: Value = serde_json::from_str(&inbox).unwrap();
    assert_eq!(inbox["publications"], json!([]), "{inbox}");
}

#[tokio::test]
async fn read_cursors_in_memory() {
    read_cursors_follow_the_user(Setup::Memory).await;
}

#[tokio::test]
async fn read_cursors_with_redis() {
    read_cursors_follow_the_user(Setup::RedisTwoNodes).await;
}

/// Chat in a group with history: a sender never gets its own message back,
/// neither through gap repair nor through recovery.
async fn senders_never_get_their_own_messages_back(setup: Setup) {
    let nodes = Nodes::start(setup, INBOX).await;
    let mut alice = nodes.publisher.connect("alice").await;
    let mut bob = nodes.subscriber().connect("bob").await;
    alice.subscribe("group:h").await;
    let ack = bob.command("subscribe", "s", json!({"channel": "group:h"})).await;
    let epoch = ack["data"]["epoch"].as_str().unwrap().to_owned();
    alice
        .command("send_message", "a1", json!({"group_id": "h", "content": "from alice"}))
        .await;
    assert_eq!(bob.expect_type("new_message").await["data"]["content"], "from alice");
    bob.command("send_message", "b1", json!({"group_id": "h", "content": "from bob"}))
        .await;
    let frame = alice.expect_type("new_message").await;
    assert_eq!(
        frame["data"]["content"], "from bob",
        "{setup:?}: alice must not get her own message"
    );
    // Recovering from before both messages replays only bob's to alice.
    let mut alice_again = nodes.subscriber().connect("alice").await;
    let ack = alice_again
        .command(
            "subscribe",
            "r",
            json!({"channel": "group:h", "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(
        alice_again.expect_type("new_message").await["data"]["content"],
        "from bob"
    );
    expect_only_marker(&nodes.publisher, &mut alice_again, "group:h").await;
    assert_eq!(nodes.subscriber().metric("herald_gaps_unrecovered_total").await, 0.0);
}

#[tokio::test]
async fn senders_never_get_their_own_messages_back_in_memory() {
    senders_never_get_their_own_messages_back(Setup::Memory).await;
}

#[tokio::test]
async fn senders_never_get_their_own_messages_back_with_redis() {
    senders_never_get_their_own_messages_back(Setup::RedisTwoNodes).await;
}

#[tokio::test]
async fn resubscribing_keeps_the_position_and_loses_nothing() {
    let nodes = Nodes::start(Setup::Memory, "").await;
    let mut client = nodes.publisher.connect("reader").await;
    client.subscribe("feed:again").await;
    for seq in 0..3 {
        publish_seq(&nodes.publisher, "feed:again", seq).await;
    }
    // Subscribing again before reading must not skip what is queued.
    client
        .send(json!({"type": "subscribe", "message_id": "again", "data": {"channel": "feed:again"}}))
        .await;
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let frame = client.next_frame().await;
        if frame["channel"] == "feed:again" {
            seqs.push(frame["data"]["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, [0, 1, 2]);
}

#[tokio::test]
async fn server_managed_subscriptions_track_positions_and_limits() {
    let nodes = Nodes::start(Setup::Memory, "[limits]\nmax_subscriptions = 2").await;
    let mut client = nodes.publisher.connect("alice").await;
    let body = json!({"channel": "feed:managed"}).to_string();
    let (status, _) = nodes
        .publisher
        .http("POST", "/api/v1/users/alice/subscriptions", Some(API_KEY), Some(body))
        .await;
    assert_eq!(status, 200);
    client.expect_type("subscribed").await;
    for seq in 0..3 {
        publish_seq(&nodes.publisher, "feed:managed", seq).await;
    }
    assert_eq!(read_until(&mut client, "feed:managed", 2).await, [0, 1, 2]);
    let body = json!({"channel": "feed:other"}).to_string();
    nodes
        .publisher
        .http("POST", "/api/v1/users/alice/subscriptions", Some(API_KEY), Some(body))
        .await;
    let error = client.expect_type("error").await;
    assert_eq!(error["data"]["code"], "limit_exceeded", "{error}");
}

#[tokio::test]
async fn presence_over_http_names_what_is_wrong() {
    let nodes = Nodes::start(Setup::Memory, "").await;
    let (status, _) = nodes
        .publisher
        .http("GET", "/api/v1/channels/nope:x/presence", Some(API_KEY), None)
        .await;
    assert_eq!(status, 400, "unknown namespace");
    let (status, body) = nodes
        .publisher
        .http("GET", "/api/v1/channels/feed:x/presence", Some(API_KEY), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = nodes
        .publisher
        .http("GET", "/api/v1/channels/secret/presence", Some(API_KEY), None)
        .await;
    assert_eq!(status, 200, "bare names have presence by default: {body}");
}
