//! A worker holds a share of the subscriber connections and accounts for
//! what they receive. It runs as a subprocess of the coordinator (the hidden
//! `worker` subcommand), so that no process holds more sockets than the
//! per-process file limit allows, and talks to it in JSON lines:
//!
//! ```text
//! coordinator → worker   {"type":"config", …}
//! worker → coordinator   {"type":"ready", …}      every connection is up (or failed)
//! coordinator → worker   {"type":"start"}         publishing begins
//! coordinator → worker   {"type":"stop", …}       what was published
//! worker → coordinator   {"type":"result", …}     then the worker exits
//! ```
//!
//! Nothing else is written to the worker's stdout; diagnostics go to stderr.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _, Lines};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accounting::{self, DeliveryTally};
use crate::config::{Scenario, Target, is_slow, render_template};
use crate::net::unix_nanos_now;
use crate::process_stats;
use crate::publisher::Published;
use crate::subscriber::{self, Deliveries, Protocol, ReceiveOutcome, SubscriberSpec};
use crate::token;

/// How often a draining worker checks whether everything has arrived.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// A message from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    Config(Box<WorkerConfig>),
    Start,
    Stop(Published),
}

/// A message to the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    Ready(WorkerReady),
    Result(WorkerResult),
}

/// One worker's share of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub scenario: Scenario,
    pub target: Target,
    /// The connection indices this worker holds.
    pub connections: Range<usize>,
    /// Connections in the whole run (slow subscribers are spread over it).
    pub total_connections: usize,
    pub slow_count: usize,
    pub source_ips: Vec<IpAddr>,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// Sequence numbers at or above this were never published.
    pub sequence_limit: u64,
    /// `exp` of the minted tokens, Unix seconds.
    pub token_expires_at: u64,
}

/// The connect phase of one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReady {
    pub connected: usize,
    /// Connected per node (see [`Target::node_of`]).
    pub connected_per_node: Vec<usize>,
    pub failed: usize,
    /// Slow subscribers among the connected.
    pub slow: usize,
    pub first_error: Option<String>,
    /// Connect latencies, microseconds (see [`accounting::encode_histogram`]).
    pub connect_histogram: String,
    pub connect_started_unix_nanos: u64,
    pub connect_finished_unix_nanos: u64,
}

/// What one worker's subscribers received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResult {
    pub tally: DeliveryTally,
    /// Delivery latencies, microseconds.
    pub latency_histogram: String,
    /// 0 when nothing arrived.
    pub last_receive_unix_nanos: u64,
    /// Subscribers (not slow ones) whose connection ended before the stop.
    pub disconnects: u64,
    pub first_disconnect: Option<String>,
    /// CPU the worker process used in all.
    pub cpu_seconds: f64,
}

/// How one connection task ended.
enum ConnectionOutcome {
    Failed,
    Slow,
    Received(ReceiveOutcome),
}

/// What a connection task tells the worker once its connect is over.
struct ConnectReport {
    index: usize,
    result: Result<Duration, String>,
}

/// Runs a worker: reads messages from `input`, writes to `output`.
pub async fn run<R, W>(input: R, mut output: W) -> anyhow::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = input.lines();
    let config = match next_message(&mut input).await? {
        ToWorker::Config(config) => *config,
        other => bail!("expected the config first, got {other:?}"),
    };
    let specs = subscriber_specs(&config)?;
    let channels: BTreeMap<usize, Vec<String>> = specs.iter().map(|spec| (spec.index, spec.channels.clone())).collect();
    let node_count = config.target.node_count();
    let slow: BTreeSet<usize> = specs.iter().filter(|spec| spec.slow).map(|spec| spec.index).collect();

    let deliveries = Arc::new(Deliveries::default());
    let stop = CancellationToken::new();
    let readers_alive = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(Semaphore::new(config.connect_concurrency));
    let (report_sender, mut reports) = mpsc::unbounded_channel();
    let connect_started_unix_nanos = unix_nanos_now();
    let mut tasks = JoinSet::new();
    for spec in specs {
        let task = ConnectionTask {
            spec,
            permits: permits.clone(),
            connect_timeout: config.connect_timeout,
            report: report_sender.clone(),
            deliveries: deliveries.clone(),
            stop: stop.clone(),
            readers_alive: readers_alive.clone(),
            sequence_limit: config.sequence_limit,
        };
        tasks.spawn(task.run());
    }
    drop(report_sender);

    let mut connect_histogram = accounting::new_histogram();
    let mut connected = Vec::new();
    let (mut failed, mut first_error) = (0, None);
    for _ in config.connections.clone() {
        let report: ConnectReport = reports
            .recv()
            .await
            .ok_or_else(|| anyhow!("a connection task ended without reporting"))?;
        match report.result {
            Ok(latency) => {
                accounting::record_micros(&mut connect_histogram, latency.as_micros() as u64);
                connected.push(report.index);
            }
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(format!("connection {}: {error}", report.index));
            }
        }
    }
    let connect_finished_unix_nanos = unix_nanos_now();
    let mut connected_per_node = vec![0; node_count];
    for &index in &connected {
        connected_per_node[config.target.node_of(index)] += 1;
    }
    let slow_connected = connected.iter().filter(|index| slow.contains(*index)).count();
    send_message(
        &mut output,
        &FromWorker::Ready(WorkerReady {
            connected: connected.len(),
            connected_per_node,
            failed,
            slow: slow_connected,
            first_error,
            connect_histogram: accounting::encode_histogram(&connect_histogram),
            connect_started_unix_nanos,
            connect_finished_unix_nanos,
        }),
    )
    .await?;

    let published = loop {
        match next_message(&mut input).await? {
            ToWorker::Start => continue,
            ToWorker::Stop(published) => break published,
            ToWorker::Config(_) => bail!("config sent twice"),
        }
    };

    // Wait for deliveries still in flight: until everything expected has
    // arrived, every reader is gone, or the drain timeout passes.
    let expected: u64 = connected
        .iter()
        .filter(|index| !slow.contains(*index))
        .flat_map(|index| &channels[index])
        .map(|channel| expected_on(&published, channel))
        .sum();
    let deadline = Instant::now() + config.drain_timeout;
    while deliveries.distinct.load(Ordering::Relaxed) < expected
        && readers_alive.load(Ordering::Relaxed) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    stop.cancel();

    let mut tally = DeliveryTally::default();
    let (mut disconnects, mut first_disconnect) = (0, None);
    while let Some(outcome) = tasks.join_next().await {
        let ConnectionOutcome::Received(outcome) = outcome.context("a connection task failed")? else {
            continue;
        };
        for (channel, tracker) in &outcome.trackers {
            let failed = published.failed.get(channel).map_or(&[][..], Vec::as_slice);
            let count = published.published.get(channel).copied().unwrap_or(0);
            tally.add_sequences(&tracker.finish(count, failed));
        }
        tally.malformed += outcome.malformed;
        if let Some(reason) = outcome.ended_early {
            disconnects += 1;
            first_disconnect.get_or_insert(reason);
        }
    }
    let latency = deliveries
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    send_message(
        &mut output,
        &FromWorker::Result(WorkerResult {
            tally,
            latency_histogram: accounting::encode_histogram(&latency),
            last_receive_unix_nanos: deliveries.last_receive_unix_nanos.load(Ordering::Relaxed),
            disconnects,
            first_disconnect,
            cpu_seconds: process_stats::own_cpu_seconds(),
        }),
    )
    .await
}

/// Messages published on `channel` that did not fail.
fn expected_on(published: &Published, channel: &str) -> u64 {
    let count = published.published.get(channel).copied().unwrap_or(0);
    let failed = published.failed.get(channel).map_or(0, Vec::len) as u64;
    count.saturating_sub(failed)
}

/// One connection's life: connect (within the worker's concurrency bound),
/// report, then read until the stop.
struct ConnectionTask {
    spec: SubscriberSpec,
    permits: Arc<Semaphore>,
    connect_timeout: Duration,
    report: mpsc::UnboundedSender<ConnectReport>,
    deliveries: Arc<Deliveries>,
    stop: CancellationToken,
    /// Subscribers (not slow ones) still reading.
    readers_alive: Arc<AtomicUsize>,
    sequence_limit: u64,
}

impl ConnectionTask {
    async fn run(self) -> ConnectionOutcome {
        let permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let connected = match tokio::time::timeout(self.connect_timeout, subscriber::connect(&self.spec)).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(error)) => Err(format!("{error:#}")),
            Err(_) => Err(format!("not connected within {:?}", self.connect_timeout)),
        };
        drop(permit);
        let connected = match connected {
            Ok(connected) => connected,
            Err(error) => {
                let _ = self.report.send(ConnectReport {
                    index: self.spec.index,
                    result: Err(error),
                });
                return ConnectionOutcome::Failed;
            }
        };
        if !self.spec.slow {
            self.readers_alive.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.report.send(ConnectReport {
            index: self.spec.index,
            result: Ok(connected.connect_latency),
        });
        if self.spec.slow {
            // Never read again: the server's writes back up until it gives up.
            self.stop.cancelled().await;
            drop(connected.socket);
            return ConnectionOutcome::Slow;
        }
        let outcome = subscriber::receive(
            connected.socket,
            self.spec.protocol,
            &self.spec.channels,
            self.sequence_limit,
            &self.deliveries,
            &self.stop,
        )
        .await;
        self.readers_alive.fetch_sub(1, Ordering::Relaxed);
        ConnectionOutcome::Received(outcome)
    }
}

/// The connections worker `config` opens.
fn subscriber_specs(config: &WorkerConfig) -> anyhow::Result<Vec<SubscriberSpec>> {
    config
        .connections
        .clone()
        .map(|index| {
            let source_ip = (!config.source_ips.is_empty()).then(|| config.source_ips[index % config.source_ips.len()]);
            let slow = is_slow(index, config.total_connections, config.slow_count);
            let spec = match &config.target {
                Target::Herald { nodes, secret, .. } => {
                    let base = &nodes[config.target.node_of(index)];
                    let user = Scenario::user(index);
                    let token = token::mint(secret.as_bytes(), &user, config.token_expires_at);
                    let subscribe = config.scenario.extra_channels(index);
                    let mut channels = vec![Scenario::personal_channel(index)];
                    channels.extend(subscribe.iter().cloned());
                    SubscriberSpec {
                        index,
                        protocol: Protocol::Herald,
                        address: base.address,
                        request_url: format!("ws://{}{}/ws?token={token}", base.authority, base.base_path()),
                        subscribe,
                        channels,
                        source_ip,
                        slow,
                    }
                }
                Target::Peer { sub_url, .. } => {
                    let channel = config.scenario.primary_channel(index);
                    let url = render_template(sub_url, &channel)?;
                    SubscriberSpec {
                        index,
                        protocol: Protocol::Peer,
                        address: url.address,
                        request_url: format!("ws://{}{}", url.authority, url.path_and_query),
                        subscribe: Vec::new(),
                        channels: vec![channel],
                        source_ip,
                        slow,
                    }
                }
            };
            Ok(spec)
        })
        .collect()
}

/// Reads one JSON-line message.
pub async fn next_message<R, M>(lines: &mut Lines<R>) -> anyhow::Result<M>
where
    R: AsyncBufRead + Unpin,
    M: serde::de::DeserializeOwned,
{
    let line = lines
        .next_line()
        .await
        .context("reading the pipe")?
        .ok_or_else(|| anyhow!("the other end closed the pipe"))?;
    serde_json::from_str(&line).with_context(|| format!("invalid message: {line}"))
}

/// Writes one JSON-line message.
pub async fn send_message<W, M>(output: &mut W, message: &M) -> anyhow::Result<()>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    output.write_all(&line).await.context("writing the pipe")?;
    output.flush().await.context("writing the pipe")?;
    Ok(())
}
