//! The receivers' accounting, end to end through a worker: a scripted
//! server drops one message and duplicates another, and the worker must
//! report exactly one lost and one duplicated delivery.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use herald_bench::config::{Scenario, Target, Url};
use herald_bench::publisher::Published;
use herald_bench::worker::{self, FromWorker, ToWorker, WorkerConfig, WorkerResult};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::DEADLINE;

/// What the scripted server sends: sequence numbers 0..10 without 3, with 5 twice.
const SCRIPT: [u64; 10] = [0, 1, 2, 4, 5, 5, 6, 7, 8, 9];
const PUBLISHED: u64 = 10;

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// Herald's envelope after `auth_success` and a subscribe `ack`.
    Herald,
    /// The raw payload, as a peer sends it.
    Peer,
}

/// Serves one WebSocket connection on `listener` that plays `SCRIPT`, then
/// signals `sent` and keeps the connection open until the client leaves.
async fn scripted_server(listener: TcpListener, framing: Framing, sent: oneshot::Sender<()>) {
    let (stream, _) = listener.accept().await.expect("the bench connects");
    let mut socket = tokio_tungstenite::accept_async(stream).await.expect("upgrade");
    if framing == Framing::Herald {
        let success = json!({"type": "auth_success", "data": {"user_id": "u0", "channel": "user:u0"}});
        socket.send(Message::text(success.to_string())).await.expect("send");
        let Some(Ok(Message::Text(text))) = socket.next().await else {
            panic!("expected a subscribe frame");
        };
        let subscribe: Value = serde_json::from_str(text.as_str()).expect("JSON");
        assert_eq!(subscribe["type"], "subscribe");
        assert_eq!(subscribe["data"]["channel"], "group:bench");
        let ack = json!({"type": "ack", "message_id": subscribe["message_id"], "data": {"channel": "group:bench"}});
        socket.send(Message::text(ack.to_string())).await.expect("send");
    }
    for sequence in SCRIPT {
        let payload = herald_bench::payload::build(sequence, herald_bench::net::unix_nanos_now(), 64);
        let frame = match framing {
            Framing::Herald => {
                format!(
                    r#"{{"type":"message","channel":"group:bench","message_id":"m{sequence}","timestamp":1,"data":{payload}}}"#
                )
            }
            Framing::Peer => payload,
        };
        socket.send(Message::text(frame)).await.expect("send");
    }
    let _ = sent.send(());
    while let Some(Ok(_)) = socket.next().await {}
}

/// Runs one worker with one connection against a scripted server and
/// returns its result.
async fn run_worker_against_script(framing: Framing) -> WorkerResult {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (sent, all_sent) = oneshot::channel();
    tokio::spawn(scripted_server(listener, framing, sent));

    let target = match framing {
        Framing::Herald => Target::Herald {
            nodes: vec![Url::parse(&format!("http://{address}")).expect("loopback URL")],
            secret: "scripted-secret".into(),
            api_key: "unused".into(),
        },
        Framing::Peer => Target::Peer {
            sub_url: format!("ws://{address}/sub/{{channel}}"),
            pub_url: format!("http://{address}/pub/{{channel}}"),
        },
    };
    let config = WorkerConfig {
        scenario: Scenario::Broadcast,
        target,
        connections: 0..1,
        total_connections: 1,
        slow_count: 0,
        source_ips: Vec::new(),
        connect_concurrency: 1,
        connect_timeout: DEADLINE,
        // One delivery never comes: the worker waits this long for it.
        drain_timeout: Duration::from_millis(300),
        sequence_limit: PUBLISHED,
        token_expires_at: 4_000_000_000,
    };

    let (mut to_worker, worker_input) = tokio::io::duplex(64 * 1024);
    let (worker_output, from_worker) = tokio::io::duplex(64 * 1024);
    let worker = tokio::spawn(worker::run(BufReader::new(worker_input), worker_output));
    let mut from_worker = BufReader::new(from_worker).lines();

    worker::send_message(&mut to_worker, &ToWorker::Config(Box::new(config)))
        .await
        .expect("send config");
    let ready: FromWorker = tokio::time::timeout(DEADLINE, worker::next_message(&mut from_worker))
        .await
        .expect("ready within the deadline")
        .expect("ready");
    let FromWorker::Ready(ready) = ready else {
        panic!("expected ready, got {ready:?}");
    };
    assert_eq!((ready.connected, ready.failed), (1, 0), "{:?}", ready.first_error);

    worker::send_message(&mut to_worker, &ToWorker::Start)
        .await
        .expect("send start");
    tokio::time::timeout(DEADLINE, all_sent)
        .await
        .expect("the script within the deadline")
        .expect("the server played the script");
    let published = Published {
        published: BTreeMap::from([("group:bench".to_owned(), PUBLISHED)]),
        failed: BTreeMap::new(),
    };
    worker::send_message(&mut to_worker, &ToWorker::Stop(published))
        .await
        .expect("send stop");
    let result: FromWorker = tokio::time::timeout(DEADLINE, worker::next_message(&mut from_worker))
        .await
        .expect("the result within the deadline")
        .expect("result");
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("the worker's exit within the deadline")
        .expect("the worker task does not panic")
        .expect("the worker succeeds");
    match result {
        FromWorker::Result(result) => result,
        other => panic!("expected a result, got {other:?}"),
    }
}

fn assert_one_lost_one_duplicated(result: &WorkerResult) {
    let tally = result.tally;
    assert_eq!(tally.expected, PUBLISHED, "{tally:?}");
    assert_eq!(tally.received, PUBLISHED - 1, "{tally:?}");
    assert_eq!(tally.lost, 1, "{tally:?}");
    assert_eq!(tally.duplicated, 1, "{tally:?}");
    assert_eq!(tally.out_of_range, 0, "{tally:?}");
    assert_eq!(tally.malformed, 0, "{tally:?}");
    assert_eq!(result.disconnects, 0);
    let latency = herald_bench::accounting::decode_histogram(&result.latency_histogram).expect("histogram");
    assert_eq!(latency.len(), PUBLISHED - 1, "one latency per first delivery");
    assert!(result.last_receive_unix_nanos > 0);
}

#[tokio::test]
async fn herald_receivers_count_a_dropped_and_a_duplicated_delivery() {
    assert_one_lost_one_duplicated(&run_worker_against_script(Framing::Herald).await);
}

#[tokio::test]
async fn peer_receivers_count_a_dropped_and_a_duplicated_delivery() {
    assert_one_lost_one_duplicated(&run_worker_against_script(Framing::Peer).await);
}
