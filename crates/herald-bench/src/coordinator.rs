//! The coordinator: starts the workers, samples the server, publishes, and
//! merges what the workers report into one [`Report`].
//!
//! Phases: connect (workers open their connections; the server's CPU and
//! RSS are sampled before and after) → measure (publish on schedule, or hold
//! for `idle`) → drain (workers wait for outstanding deliveries) → report.

use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufRead, AsyncWrite, BufReader, Lines};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::accounting::{self, DeliveryTally, Percentiles};
use crate::config::{BenchConfig, Scenario, Target};
use crate::process_stats::{self, ProcessSample};
use crate::publisher::{self, ChannelChoice, PublishOutcome, PublishPlan, PublishTarget};
use crate::redis;
use crate::report::{
    ConnectSummary, DeliverySummary, NodeSummary, ProcessSummary, PublishSummary, Report, ServerSummary, SlowSummary,
};
use crate::worker::{self, FromWorker, ToWorker, WorkerConfig, WorkerReady, WorkerResult};

/// The Herald metric that counts slow-client disconnects.
const SLOW_CLIENT_SERIES: &str = "herald_disconnects_total{reason=\"slow_client\"}";
/// How long a finished worker may take to exit before it is killed.
const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Minted tokens outlive the run by this much.
const TOKEN_MARGIN: Duration = Duration::from_secs(3_600);

/// How workers are started.
#[derive(Debug, Clone)]
pub enum WorkerLauncher {
    /// As `EXE worker` subprocesses: the real thing.
    Subprocess(PathBuf),
    /// As tasks in this process, over in-memory pipes: for tests.
    InProcess,
}

/// Runs one benchmark.
pub async fn run(config: &BenchConfig, launcher: &WorkerLauncher) -> anyhow::Result<Report> {
    config.validate()?;
    let own_cpu_start = process_stats::own_cpu_seconds();
    let server_sample = || -> anyhow::Result<Option<Vec<ProcessSample>>> {
        if config.server_pids.is_empty() {
            return Ok(None);
        }
        config
            .server_pids
            .iter()
            .map(|pid| process_stats::sample(&pid.to_string()).context("--server-pid"))
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    };
    let before_connect = server_sample()?;
    if let (Some(target), true) = (
        &config.redis,
        config.publish_via.uses_redis() && config.scenario.publishes(),
    ) {
        // Fail before opening thousands of connections, not after.
        redis::ping(&target.url).await.context("--redis-url")?;
    }

    let mut workers = Vec::with_capacity(config.workers);
    for index in 0..config.workers {
        let mut link = WorkerLink::launch(launcher).await?;
        link.send(&ToWorker::Config(Box::new(worker_config(config, index))))
            .await?;
        workers.push(link);
    }
    let mut readies = Vec::with_capacity(workers.len());
    for link in &mut workers {
        match link.receive().await? {
            FromWorker::Ready(ready) => readies.push(ready),
            other => bail!("expected ready from a worker, got {other:?}"),
        }
    }
    if readies.iter().all(|ready| ready.connected == 0) {
        let first_error = readies.iter().find_map(|ready| ready.first_error.clone());
        bail!(
            "no connection succeeded: {}",
            first_error.as_deref().unwrap_or("no error reported")
        );
    }
    let after_connect = server_sample()?;
    let slow_before = slow_client_disconnects(config).await;

    for link in &mut workers {
        link.send(&ToWorker::Start).await?;
    }
    let publish = match config.scenario {
        Scenario::Broadcast | Scenario::Notify | Scenario::Slow => {
            let plan = PublishPlan {
                rate: config.rate,
                total: config.total_messages(),
                payload_bytes: config.payload_bytes,
                channels: ChannelChoice::for_scenario(config.scenario, config.connections),
                connections: config.publish_connections,
            };
            publisher::publish(&PublishTarget::from_config(config)?, &plan).await?
        }
        Scenario::Idle => {
            tokio::time::sleep(config.duration).await;
            PublishOutcome::default()
        }
        Scenario::Connect => PublishOutcome::default(),
    };
    for link in &mut workers {
        link.send(&ToWorker::Stop(publish.counts.clone())).await?;
    }
    let mut results = Vec::with_capacity(workers.len());
    for link in &mut workers {
        match link.receive().await? {
            FromWorker::Result(result) => results.push(result),
            other => bail!("expected a result from a worker, got {other:?}"),
        }
    }
    let end = server_sample()?;
    let slow_after = slow_client_disconnects(config).await;
    let subprocesses = matches!(launcher, WorkerLauncher::Subprocess(_));
    for link in workers {
        link.finish().await;
    }

    let samples = ServerSamples {
        before_connect,
        after_connect,
        end,
    };
    let mut report = build_report(config, &readies, &results, &publish, &samples)?;
    report.bench_cpu_s = process_stats::own_cpu_seconds() - own_cpu_start
        + if subprocesses {
            results.iter().map(|result| result.cpu_seconds).sum()
        } else {
            0.0
        };
    if let Some(slow) = &mut report.slow {
        slow.slow_client_disconnects = match (slow_before, slow_after) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
    }
    Ok(report)
}

/// Worker `index`'s share of `config`.
fn worker_config(config: &BenchConfig, index: usize) -> WorkerConfig {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    WorkerConfig {
        scenario: config.scenario,
        target: config.target.clone(),
        connections: config.worker_range(index),
        total_connections: config.connections,
        slow_count: config.slow_count(),
        source_ips: config.source_ips.clone(),
        connect_concurrency: config.connect_concurrency,
        connect_timeout: config.connect_timeout,
        drain_timeout: config.drain_timeout,
        sequence_limit: config.total_messages(),
        token_expires_at: (now + config.duration + TOKEN_MARGIN).as_secs(),
    }
}

/// Herald's slow-client disconnect count summed over the nodes, for the
/// slow scenario; `None` elsewhere or when a node's `/metrics` cannot be
/// read (a warning says why).
async fn slow_client_disconnects(config: &BenchConfig) -> Option<u64> {
    let Target::Herald { nodes, .. } = &config.target else {
        return None;
    };
    if config.scenario != Scenario::Slow {
        return None;
    }
    let mut total = 0;
    for node in nodes {
        match publisher::get(node, "/metrics").await {
            Ok((_, text)) => total += process_stats::metric_value(&text, SLOW_CLIENT_SERIES).unwrap_or(0.0) as u64,
            Err(error) => {
                eprintln!("herald-bench: cannot read {}/metrics: {error:#}", node.base_url());
                return None;
            }
        }
    }
    Some(total)
}

/// The servers' cost at the phase boundaries (with `--server-pid`), one
/// sample per pid.
struct ServerSamples {
    before_connect: Option<Vec<ProcessSample>>,
    after_connect: Option<Vec<ProcessSample>>,
    end: Option<Vec<ProcessSample>>,
}

fn build_report(
    config: &BenchConfig,
    readies: &[WorkerReady],
    results: &[WorkerResult],
    publish: &PublishOutcome,
    samples: &ServerSamples,
) -> anyhow::Result<Report> {
    let connected: usize = readies.iter().map(|ready| ready.connected).sum();
    let mut connect_histogram = accounting::new_histogram();
    for ready in readies {
        accounting::merge_histogram(
            &mut connect_histogram,
            &accounting::decode_histogram(&ready.connect_histogram)?,
        )?;
    }
    let connect_started = readies
        .iter()
        .map(|ready| ready.connect_started_unix_nanos)
        .min()
        .unwrap_or(0);
    let connect_finished = readies
        .iter()
        .map(|ready| ready.connect_finished_unix_nanos)
        .max()
        .unwrap_or(0);
    let connect_wall_s = seconds_between(connect_started, connect_finished);

    let mut latency_histogram = accounting::new_histogram();
    let mut tally = DeliveryTally::default();
    for result in results {
        accounting::merge_histogram(
            &mut latency_histogram,
            &accounting::decode_histogram(&result.latency_histogram)?,
        )?;
        tally.add(&result.tally);
    }
    let last_receive = results
        .iter()
        .map(|result| result.last_receive_unix_nanos)
        .max()
        .unwrap_or(0);
    let window_s = seconds_between(publish.started_unix_nanos, last_receive);

    let server = match (&samples.before_connect, &samples.after_connect, &samples.end) {
        (Some(before), Some(connected_samples), Some(end)) => {
            let per_pid: Vec<ProcessSummary> = config
                .server_pids
                .iter()
                .zip(before.iter().zip(connected_samples).zip(end))
                .map(|(&pid, ((before, connected), end))| ProcessSummary {
                    pid,
                    cpu_connect_s: connected.cpu_seconds - before.cpu_seconds,
                    cpu_measured_s: end.cpu_seconds - connected.cpu_seconds,
                    rss_before_kib: before.rss_kib,
                    rss_after_connect_kib: connected.rss_kib,
                    rss_end_kib: end.rss_kib,
                    rss_growth_kib: connected.rss_kib as i64 - before.rss_kib as i64,
                })
                .collect();
            let cpu_measured_s: f64 = per_pid.iter().map(|process| process.cpu_measured_s).sum();
            let rss_growth_kib: i64 = per_pid.iter().map(|process| process.rss_growth_kib).sum();
            Some(ServerSummary {
                pids: config.server_pids.clone(),
                cpu_connect_s: per_pid.iter().map(|process| process.cpu_connect_s).sum(),
                cpu_measured_s,
                deliveries_per_cpu_s: (config.scenario.publishes() && cpu_measured_s > 0.0)
                    .then(|| tally.received as f64 / cpu_measured_s),
                rss_before_kib: per_pid.iter().map(|process| process.rss_before_kib).sum(),
                rss_after_connect_kib: per_pid.iter().map(|process| process.rss_after_connect_kib).sum(),
                rss_end_kib: per_pid.iter().map(|process| process.rss_end_kib).sum(),
                rss_growth_kib,
                kib_per_connection: if connected > 0 {
                    rss_growth_kib as f64 / connected as f64
                } else {
                    0.0
                },
                per_pid,
            })
        }
        _ => None,
    };

    let nodes = match &config.target {
        Target::Herald { nodes, .. } => nodes
            .iter()
            .enumerate()
            .map(|(node, url)| NodeSummary {
                url: url.base_url(),
                connections: (0..config.connections)
                    .filter(|&index| config.target.node_of(index) == node)
                    .count(),
                connected: readies
                    .iter()
                    .map(|ready| ready.connected_per_node.get(node).copied().unwrap_or(0))
                    .sum(),
                http_publishes: publish.per_node.get(node).copied().unwrap_or(0),
            })
            .collect(),
        Target::Peer { .. } => Vec::new(),
    };

    Ok(Report {
        scenario: config.scenario.name().to_owned(),
        target: config.target.name().to_owned(),
        nodes,
        connections: config.connections,
        connected,
        connect_errors: readies.iter().map(|ready| ready.failed).sum(),
        first_connect_error: readies.iter().find_map(|ready| ready.first_error.clone()),
        workers: config.workers,
        rate: if config.scenario.publishes() { config.rate } else { 0.0 },
        duration_s: config.duration.as_secs_f64(),
        payload_bytes: config.payload_bytes,
        publishes: PublishSummary {
            via: config.publish_via.name().to_owned(),
            redis_url: config
                .redis
                .as_ref()
                .filter(|_| config.publish_via.uses_redis())
                .map(|redis| redis.url.to_string()),
            zero_receivers: publish.zero_receivers,
            sent: publish.sent,
            errors: publish.errors,
            first_error: publish.first_error.clone(),
            max_lag_ms: publish.max_lag.as_secs_f64() * 1_000.0,
        },
        deliveries: DeliverySummary {
            tally,
            per_second: if window_s > 0.0 {
                tally.received as f64 / window_s
            } else {
                0.0
            },
            disconnects: results.iter().map(|result| result.disconnects).sum(),
            first_disconnect: results.iter().find_map(|result| result.first_disconnect.clone()),
        },
        latency_ms: Percentiles::from_micros(&latency_histogram),
        connect: ConnectSummary {
            rate_per_s: if connect_wall_s > 0.0 {
                connected as f64 / connect_wall_s
            } else {
                0.0
            },
            wall_s: connect_wall_s,
            latency_ms: Percentiles::from_micros(&connect_histogram),
        },
        server,
        slow: (config.scenario == Scenario::Slow).then(|| SlowSummary {
            subscribers: readies.iter().map(|ready| ready.slow).sum(),
            slow_client_disconnects: None,
        }),
        bench_cpu_s: 0.0,
    })
}

fn seconds_between(start_unix_nanos: u64, end_unix_nanos: u64) -> f64 {
    if start_unix_nanos == 0 || end_unix_nanos <= start_unix_nanos {
        return 0.0;
    }
    (end_unix_nanos - start_unix_nanos) as f64 / 1e9
}

/// The coordinator's end of one worker's pipes.
struct WorkerLink {
    input: Pin<Box<dyn AsyncWrite + Send>>,
    output: Lines<Pin<Box<dyn AsyncBufRead + Send>>>,
    /// The subprocess, killed if the coordinator gives up on it.
    child: Option<Child>,
    /// The in-process worker.
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl WorkerLink {
    async fn launch(launcher: &WorkerLauncher) -> anyhow::Result<WorkerLink> {
        use tokio::io::AsyncBufReadExt as _;
        match launcher {
            WorkerLauncher::Subprocess(exe) => {
                let mut child = Command::new(exe)
                    .arg("worker")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting worker {}", exe.display()))?;
                let input = child.stdin.take().expect("stdin is piped");
                let output = child.stdout.take().expect("stdout is piped");
                let output: Pin<Box<dyn AsyncBufRead + Send>> = Box::pin(BufReader::new(output));
                Ok(WorkerLink {
                    input: Box::pin(input),
                    output: output.lines(),
                    child: Some(child),
                    task: None,
                })
            }
            WorkerLauncher::InProcess => {
                const PIPE_BUFFER: usize = 64 * 1_024;
                let (input, worker_input) = tokio::io::duplex(PIPE_BUFFER);
                let (worker_output, output) = tokio::io::duplex(PIPE_BUFFER);
                let task = tokio::spawn(worker::run(BufReader::new(worker_input), worker_output));
                let output: Pin<Box<dyn AsyncBufRead + Send>> = Box::pin(BufReader::new(output));
                Ok(WorkerLink {
                    input: Box::pin(input),
                    output: output.lines(),
                    child: None,
                    task: Some(task),
                })
            }
        }
    }

    async fn send(&mut self, message: &ToWorker) -> anyhow::Result<()> {
        worker::send_message(&mut self.input, message)
            .await
            .context("a worker stopped listening")
    }

    async fn receive(&mut self) -> anyhow::Result<FromWorker> {
        match worker::next_message(&mut self.output).await {
            Ok(message) => Ok(message),
            Err(error) => {
                // An in-process worker's own error says more than the pipe's.
                if let Some(task) = self.task.take()
                    && let Ok(Err(worker_error)) = task.await
                {
                    return Err(worker_error.context("worker failed"));
                }
                Err(error.context("a worker ended early (see its messages above)"))
            }
        }
    }

    /// Waits for the worker to exit, killing it after a while.
    async fn finish(mut self) {
        drop(self.input);
        if let Some(mut child) = self.child.take()
            && tokio::time::timeout(WORKER_EXIT_TIMEOUT, child.wait()).await.is_err()
        {
            let _ = child.kill().await;
        }
        if let Some(task) = self.task.take()
            && let Ok(Err(error)) = task.await
        {
            eprintln!("herald-bench: worker: {error:#}");
        }
    }
}
