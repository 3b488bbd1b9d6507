//! One subscriber connection: connect (TCP, WebSocket upgrade, and for Herald
//! authentication and subscribes), then read deliveries into the accounting
//! until told to stop.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::accounting::{self, Recorded, SequenceTracker};
use crate::net::{tcp_connect, unix_nanos_now};
use crate::payload::{self, HeraldFrame};

/// The receive buffer a slow subscriber asks for: small, so that the
/// server's writes back up after a few messages.
const SLOW_RECEIVE_BUFFER: u32 = 4_096;
/// The WebSocket read buffer per connection. tungstenite allocates it
/// eagerly (128 KiB by default), which would cost the bench gigabytes at
/// tens of thousands of connections, and zeroes this much room before every
/// read: deliveries are small, so a small buffer keeps the bench's own CPU
/// (and so the latency it adds) low.
const READ_BUFFER: usize = 4 * 1_024;

pub type Socket = WebSocketStream<TcpStream>;

/// How a server frames deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Herald: JSON envelopes, the payload in `data`; `auth_success` first.
    Herald,
    /// A peer: each text frame is the raw payload of the socket's one channel.
    Peer,
}

/// Everything needed to open one subscriber connection.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    /// The connection's index in the whole run.
    pub index: usize,
    pub protocol: Protocol,
    pub address: SocketAddr,
    /// The `ws://` URL of the upgrade request (with the token for Herald).
    pub request_url: String,
    /// Channels to subscribe to after authenticating (Herald only).
    pub subscribe: Vec<String>,
    /// The channels deliveries arrive on: the accounting's keys.
    pub channels: Vec<String>,
    pub source_ip: Option<IpAddr>,
    /// Opens with a tiny receive buffer and never reads after subscribing.
    pub slow: bool,
}

/// An open, authenticated, subscribed connection.
pub struct Connected {
    pub socket: Socket,
    /// From starting the TCP connect to `auth_success` (Herald) or to the
    /// completed upgrade (peer).
    pub connect_latency: Duration,
}

/// Opens the connection described by `spec`. Publishing starts only once
/// every connection is ready, so a delivery cannot arrive in the middle.
pub async fn connect(spec: &SubscriberSpec) -> anyhow::Result<Connected> {
    let started = Instant::now();
    let receive_buffer = spec.slow.then_some(SLOW_RECEIVE_BUFFER);
    let stream = tcp_connect(spec.address, spec.source_ip, receive_buffer)
        .await
        .with_context(|| format!("TCP connect to {}", spec.address))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(spec.request_url.as_str(), stream, Some(config))
        .await
        .map_err(upgrade_error)?;
    if spec.protocol == Protocol::Herald {
        let success = next_control_frame(&mut socket).await?;
        match success["type"].as_str() {
            Some("auth_success") => {}
            Some("auth_failed") => bail!("authentication failed: {}", success["data"]["message"]),
            _ => bail!("expected auth_success, got {success}"),
        }
    }
    let connect_latency = started.elapsed();
    for (number, channel) in spec.subscribe.iter().enumerate() {
        let message_id = if number == 0 {
            "s".to_owned()
        } else {
            format!("s{number}")
        };
        let frame = json!({"type": "subscribe", "message_id": message_id, "data": {"channel": channel}});
        socket
            .send(Message::text(frame.to_string()))
            .await
            .context("send subscribe")?;
        let answer = next_control_frame(&mut socket).await?;
        if answer["type"] != "ack" || answer["message_id"] != message_id.as_str() {
            bail!("subscribing to {channel} was refused: {answer}");
        }
    }
    Ok(Connected {
        socket,
        connect_latency,
    })
}

fn upgrade_error(error: tungstenite::Error) -> anyhow::Error {
    match error {
        tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow!("upgrade refused with HTTP {}: {}", response.status(), body.trim())
        }
        other => anyhow!("WebSocket upgrade: {other}"),
    }
}

/// The next JSON text frame, skipping pings; a close or a non-JSON frame is
/// an error.
async fn next_control_frame(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).with_context(|| format!("invalid JSON frame: {text}"));
            }
            Some(Ok(Message::Close(frame))) => bail!("closed by the server: {}", describe_close(frame.as_ref())),
            Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error).context("reading a frame"),
            None => bail!("connection closed"),
        }
    }
}

fn describe_close(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    frame.map_or_else(
        || "no close code".to_owned(),
        |frame| format!("{} {}", u16::from(frame.code), frame.reason),
    )
}

/// What all the subscribers of one worker record into, shared.
pub struct Deliveries {
    /// Latency of every first delivery of a message, microseconds.
    pub latency: Mutex<Histogram<u64>>,
    /// First deliveries so far: the worker compares it with what it expects
    /// to know when outstanding deliveries have all arrived.
    pub distinct: AtomicU64,
    /// When the latest delivery arrived, Unix nanoseconds.
    pub last_receive_unix_nanos: AtomicU64,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries {
            latency: Mutex::new(accounting::new_histogram()),
            distinct: AtomicU64::new(0),
            last_receive_unix_nanos: AtomicU64::new(0),
        }
    }
}

/// One subscriber's accounting once it stopped reading.
#[derive(Debug)]
pub struct ReceiveOutcome {
    /// One tracker per channel, including channels nothing arrived on.
    pub trackers: Vec<(String, SequenceTracker)>,
    /// Frames that were neither control frames nor bench deliveries.
    pub malformed: u64,
    /// Why the connection ended before it was told to stop, if it did.
    pub ended_early: Option<String>,
}

/// Reads deliveries from `socket` on `channels` until `stop` is cancelled or
/// the connection ends. Sequence numbers at or above `sequence_limit` are
/// counted out of range.
pub async fn receive(
    mut socket: Socket,
    protocol: Protocol,
    channels: &[String],
    sequence_limit: u64,
    deliveries: &Deliveries,
    stop: &CancellationToken,
) -> ReceiveOutcome {
    let mut outcome = ReceiveOutcome {
        trackers: channels
            .iter()
            .map(|channel| (channel.clone(), SequenceTracker::new(sequence_limit)))
            .collect(),
        malformed: 0,
        ended_early: None,
    };
    // Made once: a fresh `cancelled()` per message registers with the token
    // (a lock) every time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break,
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => outcome.handle_text(text.as_str(), protocol, deliveries),
            Some(Ok(Message::Binary(_))) => outcome.malformed += 1,
            Some(Ok(Message::Close(frame))) => {
                outcome.ended_early = Some(format!("closed by the server: {}", describe_close(frame.as_ref())));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                outcome.ended_early = Some(format!("read error: {error}"));
                break;
            }
            None => {
                outcome.ended_early = Some("connection ended".to_owned());
                break;
            }
        }
    }
    outcome
}

impl ReceiveOutcome {
    fn handle_text(&mut self, text: &str, protocol: Protocol, deliveries: &Deliveries) {
        match protocol {
            Protocol::Herald => match payload::parse_herald_frame(text) {
                HeraldFrame::Delivery { channel, stamp } => self.record(&channel, stamp, deliveries),
                HeraldFrame::ForeignDelivery { .. } | HeraldFrame::Malformed => self.malformed += 1,
                HeraldFrame::Control { .. } => {}
            },
            Protocol::Peer => match payload::parse(text) {
                Some(stamp) => {
                    let channel = self
                        .trackers
                        .first()
                        .map(|(channel, _)| channel.clone())
                        .unwrap_or_default();
                    self.record(&channel, stamp, deliveries);
                }
                None => self.malformed += 1,
            },
        }
    }

    fn record(&mut self, channel: &str, stamp: payload::Stamp, deliveries: &Deliveries) {
        let now = unix_nanos_now();
        let tracker = match self.trackers.iter_mut().position(|(name, _)| name == channel) {
            Some(position) => &mut self.trackers[position].1,
            None => {
                // A channel this connection never subscribed to: a tracker
                // with limit 0 counts everything on it out of range.
                self.trackers.push((channel.to_owned(), SequenceTracker::new(0)));
                &mut self.trackers.last_mut().expect("just pushed").1
            }
        };
        if tracker.record(stamp.sequence) != Recorded::New {
            return;
        }
        let micros = now.saturating_sub(stamp.intended_unix_nanos) / 1_000;
        accounting::record_micros(
            &mut deliveries.latency.lock().unwrap_or_else(PoisonError::into_inner),
            micros,
        );
        deliveries.distinct.fetch_add(1, Ordering::Relaxed);
        deliveries.last_receive_unix_nanos.fetch_max(now, Ordering::Relaxed);
    }
}
