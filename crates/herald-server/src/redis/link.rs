//! A pipelined, self-reconnecting connection to Redis for request/reply
//! commands.
//!
//! One task owns the socket. Callers send encoded commands through a bounded
//! channel; the task writes everything waiting in one go and matches replies
//! to requests in order. While Redis is unreachable every request fails at
//! once with [`RedisError::Unavailable`] (never queued to be lost later), and
//! the task reconnects with exponential backoff and jitter.
//!
//! A request that was written to Redis but got no reply (its deadline
//! passed, or the connection broke while it was in flight) fails with
//! [`RedisError::NoReply`]: Redis may or may not have run it, and callers
//! that promise "not done" on failure must not treat it as `Unavailable`.
//!
//! A connection is checked, not trusted: [`Health`] sends a `PING` when it
//! has been idle for [`HEALTH_INTERVAL`], a reply awaited longer than
//! [`UNRESPONSIVE_AFTER`] marks it unresponsive (the link reports down, so
//! `/ready` is 503 and new requests fail at once instead of waiting on a
//! hung Redis), and one that answers nothing for [`DEAD_AFTER`] is replaced.
//! TCP keepalive covers a peer that vanished while nothing was asked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_core::resp::{self, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long one request may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the connection task; beyond it callers wait.
const REQUEST_QUEUE: usize = 4096;
/// Requests written in one batch at most.
const MAX_PIPELINE: usize = 512;
/// How long opening a connection (TCP, AUTH/SELECT and a first `PING`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection with nothing awaited for this long is sent a `PING`.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// A reply awaited this long marks the connection unresponsive: the node
/// reports not-ready until Redis answers again. Short, so that `/ready`
/// turns 503 within a few seconds of Redis hanging; a blocking command
/// (the Streams read blocks 1 s) must block for less.
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);
/// A connection that has answered nothing for this long (a half-open socket,
/// a stopped Redis) is closed and replaced.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
/// How often the connection tasks look at [`Health`].
pub const HEALTH_TICK: Duration = Duration::from_millis(250);
/// TCP keepalive: first probe after this much silence, then every
/// [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] times.
const KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// Retryable: the request was not sent (no connection).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The request was (or may have been) sent, and no reply came: Redis
    /// may have run it.
    #[error("no reply from redis: {0}")]
    NoReply(String),
    /// Redis answered with an error reply.
    #[error("redis error: {0}")]
    Reply(String),
}

pub use herald_core::resp::RedisAddress;

/// Opens a TCP connection, runs AUTH/SELECT as configured and a `PING`,
/// all within `CONNECT_TIMEOUT`: a connection is handed out only once
/// Redis has answered on it.
pub async fn connect(address: &RedisAddress) -> Result<TcpStream, RedisError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_unbounded(address))
        .await
        .map_err(|_| RedisError::Unavailable("connecting timed out".into()))?
}

async fn connect_unbounded(address: &RedisAddress) -> Result<TcpStream, RedisError> {
    let unavailable = |e: std::io::Error| RedisError::Unavailable(e.to_string());
    let mut stream = TcpStream::connect(&address.host_port).await.map_err(unavailable)?;
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    let mut setup: Vec<Vec<String>> = Vec::new();
    if let Some(password) = &address.password {
        let mut auth = vec!["AUTH".to_owned()];
        auth.extend(address.username.clone());
        auth.push(password.clone());
        setup.push(auth);
    }
    if address.database != 0 {
        setup.push(vec!["SELECT".into(), address.database.to_string()]);
    }
    // Proves that Redis answers (and that this connection may run commands).
    setup.push(vec!["PING".into()]);
    let mut buffer = BytesMut::new();
    for command in &setup {
        let mut out = BytesMut::new();
        resp::encode_command(command, &mut out);
        stream.write_all(&out).await.map_err(unavailable)?;
        match read_value(&mut stream, &mut buffer).await? {
            Value::Error(message) => return Err(RedisError::Reply(message)),
            _ => continue,
        }
    }
    Ok(stream)
}

/// Reads one complete value, buffering partial input in `buffer`.
pub async fn read_value(stream: &mut TcpStream, buffer: &mut BytesMut) -> Result<Value, RedisError> {
    loop {
        if let Some(value) = take_value(buffer)? {
            return Ok(value);
        }
        let read = stream
            .read_buf(buffer)
            .await
            .map_err(|e| RedisError::Unavailable(e.to_string()))?;
        if read == 0 {
            return Err(RedisError::Unavailable("connection closed by redis".into()));
        }
    }
}

/// Parses one value off the front of `buffer`, if complete.
pub fn take_value(buffer: &mut BytesMut) -> Result<Option<Value>, RedisError> {
    match resp::parse(buffer) {
        Ok(Some((value, used))) => {
            let _ = buffer.split_to(used);
            Ok(Some(value))
        }
        Ok(None) => Ok(None),
        Err(error) => Err(RedisError::Unavailable(error.to_string())),
    }
}

/// Exponential backoff with ±50% jitter, so nodes do not reconnect in step.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    /// Short, because until every node's subscriber is back, messages for
    /// its clients are lost (Pub/Sub is at-most-once).
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let mut random = [0u8; 2];
        let _ = getrandom::fill(&mut random);
        let fraction = f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX);
        base.mul_f64(0.5 + fraction)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a connection still answers: the clock runs while a reply is
/// awaited and restarts with every reply.
pub struct Health {
    /// Since when a reply has been awaited without any arriving; `None` while
    /// nothing is awaited.
    waiting_since: Option<Instant>,
    /// When something was last sent or received.
    last_activity: Instant,
    /// Set once the wait passed [`UNRESPONSIVE_AFTER`], until a reply comes.
    unresponsive: bool,
}

/// What [`Health::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheck {
    Fine,
    /// Idle for [`HEALTH_INTERVAL`]: send a `PING`.
    Ping,
    /// A reply has been awaited for [`UNRESPONSIVE_AFTER`] (reported once
    /// per episode).
    BecameUnresponsive,
    /// Nothing answered for [`DEAD_AFTER`]: replace the connection.
    Dead,
}

impl Health {
    pub fn new(now: Instant) -> Self {
        Health {
            waiting_since: None,
            last_activity: now,
            unresponsive: false,
        }
    }

    /// Something that expects a reply was sent.
    pub fn expect_reply(&mut self, now: Instant) {
        self.last_activity = now;
        self.waiting_since.get_or_insert(now);
    }

    /// Something arrived that is not a reply (a Pub/Sub message).
    pub fn activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// A reply arrived; `more` says whether others are still awaited. True
    /// when the connection had been unresponsive: it answers again.
    pub fn replied(&mut self, now: Instant, more: bool) -> bool {
        self.last_activity = now;
        self.waiting_since = more.then_some(now);
        std::mem::take(&mut self.unresponsive)
    }

    pub fn check(&mut self, now: Instant) -> HealthCheck {
        match self.waiting_since {
            Some(since) if now.duration_since(since) >= DEAD_AFTER => HealthCheck::Dead,
            Some(since) if now.duration_since(since) >= UNRESPONSIVE_AFTER && !self.unresponsive => {
                self.unresponsive = true;
                HealthCheck::BecameUnresponsive
            }
            Some(_) => HealthCheck::Fine,
            None if now.duration_since(self.last_activity) >= HEALTH_INTERVAL => HealthCheck::Ping,
            None => HealthCheck::Fine,
        }
    }
}

/// A Lua script, run with `EVALSHA` once Redis knows it, so that its text
/// is not sent with every call. After Redis lost its script cache (a
/// restart) the call falls back to `EVAL`, which loads it again.
pub struct Script {
    source: &'static str,
    sha: std::sync::OnceLock<String>,
}

impl Script {
    pub const fn new(source: &'static str) -> Self {
        Script {
            source,
            sha: std::sync::OnceLock::new(),
        }
    }
}

struct Request {
    command: BytesMut,
    reply: oneshot::Sender<Result<Value, RedisError>>,
}

/// A handle to the link; cheap to clone.
#[derive(Clone)]
pub struct RedisLink {
    requests: mpsc::Sender<Request>,
    up: Arc<Up>,
}

/// Whether the link is connected and answering, and a wake-up for those
/// who wait until it is.
#[derive(Default)]
struct Up {
    up: AtomicBool,
    came_up: Notify,
}

impl Up {
    fn get(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        if up {
            self.came_up.notify_waiters();
        }
    }
}

impl RedisLink {
    /// Starts the connection task. `name` labels its log lines.
    pub fn start(
        name: &'static str,
        address: RedisAddress,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (requests, receiver) = mpsc::channel(REQUEST_QUEUE);
        let up = Arc::new(Up::default());
        tracker.spawn(run(name, address, receiver, up.clone(), metrics, shutdown));
        RedisLink { requests, up }
    }

    pub fn is_up(&self) -> bool {
        self.up.get()
    }

    /// Resolves once the link is up (at once if it is). Callers bound the
    /// wait themselves.
    pub async fn until_up(&self) {
        loop {
            let came_up = self.up.came_up.notified();
            tokio::pin!(came_up);
            // Registered before looking, so that a change in between wakes it.
            came_up.as_mut().enable();
            if self.is_up() {
                return;
            }
            came_up.await;
        }
    }

    /// Runs `script` with its keys (the first `keys` of `args`) and arguments.
    pub async fn eval<A: AsRef<[u8]>>(&self, script: &Script, keys: usize, args: &[A]) -> Result<Value, RedisError> {
        let sha = match script.sha.get() {
            Some(sha) => sha,
            None => {
                let reply = self.call(&["SCRIPT", "LOAD", script.source]).await?;
                let sha = reply
                    .as_str()
                    .ok_or_else(|| RedisError::Reply("SCRIPT LOAD gave no digest".into()))?;
                script.sha.get_or_init(|| sha.to_owned())
            }
        };
        let keys = keys.to_string();
        let mut command: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
        command.extend([&b"EVALSHA"[..], sha.as_bytes(), keys.as_bytes()]);
        command.extend(args.iter().map(AsRef::as_ref));
        match self.call(&command).await {
            Err(RedisError::Reply(message)) if message.starts_with("NOSCRIPT") => {
                command[0] = b"EVAL";
                command[1] = script.source.as_bytes();
                self.call(&command).await
            }
            other => other,
        }
    }

    /// Sends one command and waits for its reply. An error reply is
    /// [`RedisError::Reply`].
    pub async fn call<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Value, RedisError> {
        if !self.is_up() {
            return Err(RedisError::Unavailable("not connected".into()));
        }
        let mut command = BytesMut::new();
        resp::encode_command(args, &mut command);
        let (reply, receiver) = oneshot::channel();
        self.requests
            .send(Request { command, reply })
            .await
            .map_err(|_| RedisError::Unavailable("link stopped".into()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, receiver).await {
            Ok(Ok(Ok(Value::Error(message)))) => Err(RedisError::Reply(message)),
            Ok(Ok(result)) => result,
            // The link answers every request it wrote; a dropped sender
            // means the request was never written.
            Ok(Err(_)) => Err(RedisError::Unavailable("connection lost".into())),
            Err(_) => Err(RedisError::NoReply(format!(
                "no reply within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }
}

async fn run(
    name: &'static str,
    address: RedisAddress,
    mut requests: mpsc::Receiver<Request>,
    up: Arc<Up>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut first = true;
    // Connections in a row that Redis closed at once (see `STABLE`).
    let mut quick_drops = 0u32;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = connect(&address) => connected,
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                if first {
                    tracing::warn!(link = name, %error, "cannot reach redis; retrying");
                    first = false;
                }
                if !pause(backoff.next_delay(), &mut requests, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if !first {
            metrics.broker_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        if quick_drops == 0 {
            tracing::info!(link = name, address = %address.host_port, "connected to redis");
        }
        first = false;
        up.set(true);
        let connected_at = tokio::time::Instant::now();
        let error = serve(name, &mut stream, &mut requests, &up, &metrics, &shutdown).await;
        up.set(false);
        let Some(error) = error else { return };
        if connected_at.elapsed() >= STABLE {
            tracing::warn!(link = name, %error, "redis connection lost; reconnecting");
            quick_drops = 0;
            backoff.reset();
            continue;
        }
        // Redis accepted and closed at once (`maxclients` reached, a proxy
        // without a backend): back off like a failed connect, warn once.
        if quick_drops == 0 {
            tracing::warn!(link = name, %error, "redis closes the connection at once; retrying with back-off");
        }
        quick_drops = quick_drops.saturating_add(1);
        if !pause(backoff.next_delay(), &mut requests, &shutdown).await {
            return;
        }
    }
}

/// A connection that lasted less than this before breaking does not reset
/// the back-off: the next attempt waits as after a failed connect.
pub const STABLE: Duration = Duration::from_secs(1);

/// Waits `delay` before the next connection attempt, failing the requests
/// that arrive meanwhile rather than holding them. False when the node is
/// stopping.
async fn pause(delay: Duration, requests: &mut mpsc::Receiver<Request>, shutdown: &CancellationToken) -> bool {
    let delay = tokio::time::sleep(delay);
    tokio::pin!(delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = &mut delay => return true,
            request = requests.recv() => match request {
                Some(request) => { let _ = request.reply.send(Err(RedisError::Unavailable("not connected".into()))); }
                None => return false,
            },
        }
    }
}

/// Serves requests on one connection until it fails (`Some(error)`) or the
/// node shuts down (`None`). Requests in flight when it fails are answered
/// with the error, a [`RedisError::NoReply`]: they were written.
/// [`Health`] is looked at all along, also while a write waits for a
/// Redis that stopped reading.
async fn serve(
    name: &'static str,
    stream: &mut TcpStream,
    requests: &mut mpsc::Receiver<Request>,
    up: &Up,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<RedisError> {
    // Requests written and not answered yet. Bounded by what callers send
    // while Redis answers: once a reply is overdue the link reports down
    // and `call` refuses new requests.
    let mut in_flight: VecDeque<oneshot::Sender<Result<Value, RedisError>>> = VecDeque::new();
    let mut read_buffer = BytesMut::with_capacity(16 * 1024);
    let mut write_buffer = BytesMut::new();
    let (mut reader, mut writer) = stream.split();
    let mut health = Health::new(Instant::now());
    let mut tick = tokio::time::interval(HEALTH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let error = loop {
        write_buffer.clear();
        tokio::select! {
            _ = shutdown.cancelled(), if in_flight.is_empty() => return None,
            request = requests.recv() => {
                // A closed request channel means the node is stopping.
                let first = request?;
                let mut batch = Some(first);
                let mut taken = 0;
                while let Some(request) = batch.take() {
                    taken += 1;
                    // A caller that gave up (its deadline passed) is told
                    // "no reply"; not running its command at all keeps
                    // that answer as true as it can be.
                    if !request.reply.is_closed() {
                        write_buffer.extend_from_slice(&request.command);
                        in_flight.push_back(request.reply);
                    }
                    if taken < MAX_PIPELINE {
                        batch = requests.try_recv().ok();
                    }
                }
            }
            read = reader.read_buf(&mut read_buffer) => {
                match read {
                    Ok(0) => break RedisError::NoReply("connection closed by redis".into()),
                    Err(error) => break RedisError::NoReply(error.to_string()),
                    Ok(_) => {}
                }
                loop {
                    match take_value(&mut read_buffer) {
                        Ok(Some(value)) => {
                            if health.replied(Instant::now(), in_flight.len() > 1) {
                                tracing::info!(link = name, "redis answers again");
                                up.set(true);
                            }
                            match in_flight.pop_front() {
                                Some(reply) => { let _ = reply.send(Ok(value)); }
                                None => break,
                            }
                        }
                        Ok(None) => break,
                        Err(error) => return Some(fail_all(&mut in_flight, error)),
                    }
                }
            }
            _ = tick.tick() => match look(name, &mut health, up, metrics) {
                Ok(HealthCheck::Ping) => {
                    resp::encode_command(&["PING"], &mut write_buffer);
                    // The reply is only proof of life: nobody waits for it.
                    let (reply, _) = oneshot::channel();
                    in_flight.push_back(reply);
                }
                Ok(_) => {}
                Err(error) => break error,
            },
        }
        if write_buffer.is_empty() {
            continue;
        }
        health.expect_reply(Instant::now());
        let write = writer.write_all(&write_buffer);
        tokio::pin!(write);
        let written = loop {
            tokio::select! {
                written = &mut write => break written.map_err(|error| RedisError::NoReply(error.to_string())),
                _ = tick.tick() => if let Err(error) = look(name, &mut health, up, metrics) {
                    break Err(error);
                },
            }
        };
        if let Err(error) = written {
            break error;
        }
    };
    Some(fail_all(&mut in_flight, error))
}

/// Acts on a [`Health::check`]: an unresponsive connection marks the link
/// down (counted, logged once) and a dead one is an error.
fn look(name: &'static str, health: &mut Health, up: &Up, metrics: &Metrics) -> Result<HealthCheck, RedisError> {
    let check = health.check(Instant::now());
    match check {
        HealthCheck::BecameUnresponsive => {
            up.set(false);
            metrics.broker_unresponsive.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(link = name, waited = ?UNRESPONSIVE_AFTER, "redis does not answer; reporting not ready");
        }
        HealthCheck::Dead => {
            return Err(RedisError::Unavailable(format!(
                "redis answered nothing for {}s",
                DEAD_AFTER.as_secs()
            )));
        }
        HealthCheck::Fine | HealthCheck::Ping => {}
    }
    Ok(check)
}

fn fail_all(in_flight: &mut VecDeque<oneshot::Sender<Result<Value, RedisError>>>, error: RedisError) -> RedisError {
    let (RedisError::Unavailable(message) | RedisError::NoReply(message) | RedisError::Reply(message)) = &error;
    let unanswered = RedisError::NoReply(message.clone());
    for reply in in_flight.drain(..) {
        let _ = reply.send(Err(unanswered.clone()));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(25) && delays[0] <= Duration::from_millis(75));
        assert!(delays.iter().all(|d| *d <= Backoff::MAX.mul_f64(1.5)));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(75));
    }

    #[test]
    fn health_pings_when_idle_reports_silence_once_and_gives_up() {
        let start = Instant::now();
        let mut health = Health::new(start);
        assert_eq!(health.check(start), HealthCheck::Fine);
        let pinged = start + HEALTH_INTERVAL;
        assert_eq!(health.check(pinged), HealthCheck::Ping);
        health.expect_reply(pinged);
        assert_eq!(
            health.check(pinged + HEALTH_INTERVAL),
            HealthCheck::Fine,
            "waiting, not idle"
        );
        let late = pinged + UNRESPONSIVE_AFTER;
        assert_eq!(health.check(late), HealthCheck::BecameUnresponsive);
        assert_eq!(health.check(late), HealthCheck::Fine, "reported once");
        assert!(health.replied(late, false), "answers again");
        assert!(!health.replied(late, false));
        health.expect_reply(late);
        health.expect_reply(late + HEALTH_INTERVAL);
        assert_eq!(
            health.check(late + DEAD_AFTER),
            HealthCheck::Dead,
            "the oldest wait counts"
        );
    }
}
