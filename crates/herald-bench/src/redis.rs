//! Publishing straight into the Redis that Herald nodes share, the way a
//! backend would (README.md, "Redis mode"):
//!
//! - Pub/Sub: `PUBLISH {prefix}ch:{channel} '{"data": PAYLOAD}'`, the HTTP
//!   publish body without `channel`. The reply counts the Redis subscribers
//!   (nodes) that got it; 0 is not an error, but nobody could deliver it.
//! - Streams: `XADD {prefix}publish * channel {channel} data PAYLOAD`, which
//!   the nodes' shared consumer group publishes into the cluster.
//!
//! Commands go over a few pipelined connections (plain TCP and Herald's own
//! RESP codec, [`herald_core::resp`]): message `i` goes to connection
//! `i % connections`, which writes whatever is queued in one go and matches
//! replies to commands in order. An error reply fails its message; a broken
//! connection fails every message in flight on it, and the next message
//! opens a new connection (or fails too, if Redis cannot be reached).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Buf as _, Bytes, BytesMut};
use herald_core::resp::{self, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::accounting::{REQUEST_TIMEOUT, SharedFailures, lock_failures};
use crate::config::{PublishVia, RedisTarget, RedisUrl};
use crate::net::tcp_connect;

/// Messages queued per connection before the schedule waits (and so lags).
const QUEUE: usize = 8_192;
/// Commands written in one go at most.
const MAX_BATCH: usize = 512;
/// How long opening a connection (with AUTH and SELECT) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which command a publish is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisCommand {
    /// `PUBLISH {prefix}ch:{channel} '{"data": PAYLOAD}'`.
    Publish,
    /// `XADD {prefix}publish * channel {channel} data PAYLOAD`.
    Xadd,
}

impl RedisCommand {
    /// The command of a publish path; `None` for HTTP.
    pub fn for_via(via: PublishVia) -> Option<RedisCommand> {
        match via {
            PublishVia::Http => None,
            PublishVia::RedisPubsub => Some(RedisCommand::Publish),
            PublishVia::RedisStream => Some(RedisCommand::Xadd),
        }
    }

    /// Appends the command publishing `payload` (a JSON text) on `channel`.
    pub fn encode(self, prefix: &str, channel: &str, payload: &str, out: &mut BytesMut) {
        match self {
            RedisCommand::Publish => {
                let key = format!("{prefix}ch:{channel}");
                let body = format!("{{\"data\":{payload}}}");
                resp::encode_command(&["PUBLISH", &key, &body], out);
            }
            RedisCommand::Xadd => {
                let key = format!("{prefix}publish");
                resp::encode_command(&["XADD", &key, "*", "channel", channel, "data", payload], out);
            }
        }
    }
}

/// One message waiting for its connection.
pub(crate) struct Queued {
    command: Bytes,
    channel: String,
    sequence: u64,
}

/// Room for one message in its connection's queue.
pub(crate) struct Permit(mpsc::OwnedPermit<Queued>);

/// What the connections record into.
struct Shared {
    failures: SharedFailures,
    zero_receivers: AtomicU64,
}

impl Shared {
    fn fail(&self, channel: &str, sequence: u64, error: String) {
        lock_failures(&self.failures).record(channel, sequence, error);
    }

    fn record(&self, command: RedisCommand, channel: &str, sequence: u64, reply: Value) {
        match (command, reply) {
            (_, Value::Error(message)) => self.fail(channel, sequence, format!("Redis error reply: {message}")),
            (RedisCommand::Publish, Value::Integer(0)) => {
                self.zero_receivers.fetch_add(1, Ordering::Relaxed);
            }
            (RedisCommand::Publish, Value::Integer(_)) | (RedisCommand::Xadd, Value::Bulk(Some(_))) => {}
            (_, other) => self.fail(channel, sequence, format!("unexpected Redis reply {other:?}")),
        }
    }
}

/// The publisher's pipelined Redis connections.
pub(crate) struct RedisPool {
    prefix: String,
    command: RedisCommand,
    queues: Vec<mpsc::Sender<Queued>>,
    connections: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RedisPool {
    /// Opens `connections` connections (at least one) to `target`; failures
    /// are recorded into `failures`.
    pub(crate) async fn open(
        target: &RedisTarget,
        command: RedisCommand,
        connections: usize,
        failures: SharedFailures,
    ) -> anyhow::Result<RedisPool> {
        let shared = Arc::new(Shared {
            failures,
            zero_receivers: AtomicU64::new(0),
        });
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..connections.max(1) {
            let stream = connect(&target.url).await.context("publisher connection")?;
            let (sender, receiver) = mpsc::channel(QUEUE);
            queues.push(sender);
            tasks.push(tokio::spawn(run_connection(
                target.url.clone(),
                stream,
                receiver,
                command,
                shared.clone(),
            )));
        }
        Ok(RedisPool {
            prefix: target.prefix.clone(),
            command,
            queues,
            connections: tasks,
            shared,
        })
    }

    /// Waits for room in message `index`'s connection queue.
    pub(crate) async fn reserve(&self, index: u64) -> Permit {
        let queue = &self.queues[(index % self.queues.len() as u64) as usize];
        Permit(
            queue
                .clone()
                .reserve_owned()
                .await
                .expect("a connection task lives while the pool does"),
        )
    }

    /// Queues the publish of `payload` as message `sequence` of `channel`.
    pub(crate) fn send(&self, permit: Permit, channel: String, sequence: u64, payload: &str) {
        let mut command = BytesMut::new();
        self.command.encode(&self.prefix, &channel, payload, &mut command);
        permit.0.send(Queued {
            command: command.freeze(),
            channel,
            sequence,
        });
    }

    /// Waits until every queued message was answered (or failed); returns
    /// how many `PUBLISH`es reached no subscriber (`None` for `XADD`).
    pub(crate) async fn finish(self) -> Option<u64> {
        drop(self.queues);
        for task in self.connections {
            let _ = task.await;
        }
        (self.command == RedisCommand::Publish).then(|| self.shared.zero_receivers.load(Ordering::Relaxed))
    }
}

/// A message written and waiting for its reply.
struct InFlight {
    channel: String,
    sequence: u64,
}

/// One TCP connection: this end writes, a reader task matches replies.
struct Session {
    writer: OwnedWriteHalf,
    in_flight: mpsc::UnboundedSender<InFlight>,
    /// Cancelled once the connection failed: it is not written to again.
    broken: CancellationToken,
    reader: JoinHandle<()>,
}

impl Session {
    fn start(stream: TcpStream, command: RedisCommand, shared: Arc<Shared>) -> Session {
        let (reader, writer) = stream.into_split();
        let (in_flight, receiver) = mpsc::unbounded_channel();
        let broken = CancellationToken::new();
        let reader = tokio::spawn(read_replies(reader, receiver, broken.clone(), command, shared));
        Session {
            writer,
            in_flight,
            broken,
            reader,
        }
    }

    /// Waits for the replies to everything written, then closes.
    async fn finish(self) {
        drop(self.in_flight);
        let _ = self.reader.await;
        drop(self.writer);
    }
}

/// One connection's writer: sends what is queued, reconnecting when the
/// connection broke, until the queue closes and every reply is in.
async fn run_connection(
    url: RedisUrl,
    stream: TcpStream,
    mut queue: mpsc::Receiver<Queued>,
    command: RedisCommand,
    shared: Arc<Shared>,
) {
    let mut session = Some(Session::start(stream, command, shared.clone()));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut out = BytesMut::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if let Some(broken) = session.take_if(|session| session.broken.is_cancelled()) {
            broken.finish().await;
        }
        if session.is_none() {
            match connect(&url).await {
                Ok(stream) => session = Some(Session::start(stream, command, shared.clone())),
                Err(error) => {
                    let error = format!("{error:#}");
                    for queued in batch.drain(..) {
                        shared.fail(&queued.channel, queued.sequence, error.clone());
                    }
                    continue;
                }
            }
        }
        let current = session.as_mut().expect("connected above");
        out.clear();
        for queued in batch.drain(..) {
            out.extend_from_slice(&queued.command);
            // The reader lives until this sender is dropped.
            let _ = current.in_flight.send(InFlight {
                channel: queued.channel,
                sequence: queued.sequence,
            });
        }
        if current.writer.write_all(&out).await.is_err() {
            // The reader fails what is in flight.
            current.broken.cancel();
        }
    }
    if let Some(session) = session {
        session.finish().await;
    }
}

/// Matches replies to the messages in flight, in order. After a failure
/// every message still in flight on this connection fails with it.
async fn read_replies(
    mut reader: OwnedReadHalf,
    mut in_flight: mpsc::UnboundedReceiver<InFlight>,
    broken: CancellationToken,
    command: RedisCommand,
    shared: Arc<Shared>,
) {
    let mut buffer = BytesMut::with_capacity(16 * 1_024);
    let mut failure: Option<String> = None;
    while let Some(sent) = in_flight.recv().await {
        if let Some(error) = &failure {
            shared.fail(&sent.channel, sent.sequence, error.clone());
            continue;
        }
        match next_reply(&mut reader, &mut buffer, &broken).await {
            Ok(reply) => shared.record(command, &sent.channel, sent.sequence, reply),
            Err(error) => {
                broken.cancel();
                shared.fail(&sent.channel, sent.sequence, error.clone());
                failure = Some(error);
            }
        }
    }
}

/// The next reply on the connection.
async fn next_reply(
    reader: &mut OwnedReadHalf,
    buffer: &mut BytesMut,
    broken: &CancellationToken,
) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        if let Some(value) = take_value(buffer).map_err(|error| format!("{error:#}"))? {
            return Ok(value);
        }
        tokio::select! {
            _ = broken.cancelled() => return Err("Redis connection broke while writing".into()),
            _ = tokio::time::sleep_until(deadline) => return Err(format!("no Redis reply within {REQUEST_TIMEOUT:?}")),
            read = reader.read_buf(buffer) => match read {
                Ok(0) => return Err("Redis closed the connection".into()),
                Ok(_) => {}
                Err(error) => return Err(format!("Redis connection: {error}")),
            },
        }
    }
}

/// Takes one complete value off the front of `buffer`, if there is one.
fn take_value(buffer: &mut BytesMut) -> anyhow::Result<Option<Value>> {
    match resp::parse(buffer)? {
        Some((value, used)) => {
            buffer.advance(used);
            Ok(Some(value))
        }
        None => Ok(None),
    }
}

/// Opens a connection to `url`, authenticating and selecting its database
/// as the URL says.
pub async fn connect(url: &RedisUrl) -> anyhow::Result<TcpStream> {
    let opening = async {
        let mut stream = tcp_connect(url.address, None, None)
            .await
            .with_context(|| format!("connect to Redis at {url}"))?;
        let mut buffer = BytesMut::new();
        if let Some(password) = &url.password {
            let mut auth = vec!["AUTH"];
            auth.extend(url.username.as_deref());
            auth.push(password);
            expect_ok(call(&mut stream, &mut buffer, &auth).await?, "AUTH")?;
        }
        if url.database != 0 {
            let database = url.database.to_string();
            expect_ok(call(&mut stream, &mut buffer, &["SELECT", &database]).await?, "SELECT")?;
        }
        anyhow::Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .map_err(|_| anyhow::anyhow!("Redis at {url} did not answer within {CONNECT_TIMEOUT:?}"))?
}

fn expect_ok(reply: Value, command: &str) -> anyhow::Result<()> {
    match reply {
        Value::Error(message) => bail!("Redis refused {command}: {message}"),
        _ => Ok(()),
    }
}

/// Sends one command and reads its reply (no pipelining). `buffer` keeps
/// bytes read past the reply.
pub async fn call<A: AsRef<[u8]>>(stream: &mut TcpStream, buffer: &mut BytesMut, args: &[A]) -> anyhow::Result<Value> {
    let mut out = BytesMut::new();
    resp::encode_command(args, &mut out);
    stream.write_all(&out).await.context("writing to Redis")?;
    loop {
        if let Some(value) = take_value(buffer)? {
            return Ok(value);
        }
        if stream.read_buf(buffer).await.context("reading from Redis")? == 0 {
            bail!("Redis closed the connection");
        }
    }
}

/// Checks that Redis at `url` answers `PING`, so that a run can fail before
/// it opens its subscriber connections.
pub async fn ping(url: &RedisUrl) -> anyhow::Result<()> {
    let mut stream = connect(url).await?;
    let reply = tokio::time::timeout(CONNECT_TIMEOUT, call(&mut stream, &mut BytesMut::new(), &["PING"]))
        .await
        .map_err(|_| anyhow::anyhow!("Redis at {url} did not answer PING within {CONNECT_TIMEOUT:?}"))??;
    match reply {
        Value::Simple(text) if text == "PONG" => Ok(()),
        other => bail!("Redis at {url} answered PING with {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_args(command: RedisCommand) -> Vec<String> {
        let mut out = BytesMut::new();
        command.encode("herald:", "user:u7", r#"{"seq":1}"#, &mut out);
        let (value, used) = resp::parse(&out).expect("valid RESP").expect("complete");
        assert_eq!(used, out.len());
        value
            .as_array()
            .expect("an array")
            .iter()
            .map(|arg| arg.as_str().expect("a string").to_owned())
            .collect()
    }

    #[test]
    fn commands_follow_herald_s_documented_formats() {
        assert_eq!(
            command_args(RedisCommand::Publish),
            ["PUBLISH", "herald:ch:user:u7", r#"{"data":{"seq":1}}"#]
        );
        assert_eq!(
            command_args(RedisCommand::Xadd),
            [
                "XADD",
                "herald:publish",
                "*",
                "channel",
                "user:u7",
                "data",
                r#"{"seq":1}"#
            ]
        );
        assert_eq!(RedisCommand::for_via(PublishVia::Http), None);
        assert_eq!(RedisCommand::for_via(PublishVia::RedisStream), Some(RedisCommand::Xadd));
    }

    #[test]
    fn replies_are_judged_per_command() {
        let shared = Shared {
            failures: SharedFailures::default(),
            zero_receivers: AtomicU64::new(0),
        };
        shared.record(RedisCommand::Publish, "c", 0, Value::Integer(2));
        shared.record(RedisCommand::Publish, "c", 1, Value::Integer(0));
        shared.record(
            RedisCommand::Xadd,
            "c",
            2,
            Value::Bulk(Some(Bytes::from_static(b"1-0"))),
        );
        assert_eq!(lock_failures(&shared.failures).errors, 0);
        assert_eq!(shared.zero_receivers.load(Ordering::Relaxed), 1);
        shared.record(RedisCommand::Xadd, "c", 3, Value::Error("WRONGTYPE".into()));
        shared.record(RedisCommand::Publish, "c", 4, Value::Simple("OK".into()));
        let failures = lock_failures(&shared.failures);
        assert_eq!(failures.errors, 2);
        assert_eq!(failures.failed["c"], vec![3, 4]);
        assert!(failures.samples[0].contains("WRONGTYPE"));
    }
}
