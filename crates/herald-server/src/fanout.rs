//! Local fan-out: from one publication to the socket of every local
//! subscriber.
//!
//! A publication is encoded once, as a complete WebSocket frame, and handed
//! to its channel's lane; the lane's task walks the channel's subscribers
//! and gives each the same buffer (a reference-count increment). When
//! nothing waits ahead of it, the frame is written straight to the
//! connection's socket with one non-blocking `write`: a delivery to a
//! connection that keeps up wakes no connection task. A lane that falls
//! behind takes what waits together, and consecutive publications to one
//! channel reach each subscriber in one (vectored) write.
//!
//! Whatever the socket does not take at once waits, in order, in the
//! connection's queue for its task, which writes it as the socket drains.
//! A connection keeps its position in channels with history here, so that
//! fan-out itself skips repeats and writes in-order messages; a gap (or a
//! new epoch) and subscriptions made by the server API go to the task, and
//! while the task holds the connection (answering a command,
//! working through such entries) fan-out queues behind it instead of writing
//! around it.
//!
//! Queues are bounded in messages and bytes; a subscriber whose queue is
//! full is marked slow and its connection closes with 4008. Fan-out never
//! waits on a subscriber.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use herald_core::history::Position;
use herald_core::publication::{Control, EncodedFrame};
use herald_core::registry::{Registry, Subscriber};
use herald_core::{ChannelName, Publication, websocket};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::util::lock;

/// A publication's WebSocket frame, ready for any number of sockets.
pub fn wire_frame(frame: EncodedFrame) -> Bytes {
    match frame {
        EncodedFrame::Text(text) => websocket::encode(websocket::OP_TEXT, text.as_bytes()),
        EncodedFrame::Binary(bytes) => websocket::encode(websocket::OP_BINARY, &bytes),
    }
}

/// A publication as every subscriber of a node receives it: encoded once,
/// with what a connection needs to keep its place in the channel.
#[derive(Debug)]
pub struct Delivery {
    /// The complete WebSocket frame.
    pub frame: Bytes,
    pub channel: ChannelName,
    pub offset: Option<u64>,
    pub epoch: Option<String>,
}

impl Delivery {
    pub fn new(publication: &Publication) -> Self {
        Delivery {
            frame: wire_frame(publication.encode()),
            channel: publication.channel.clone(),
            offset: publication.offset,
            epoch: publication.epoch.clone(),
        }
    }
}

/// An entry for a connection. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Delivery(Arc<Delivery>),
    /// The server API subscribes this connection to a channel.
    Subscribe(ChannelName),
    /// The server API unsubscribes this connection from a channel.
    Unsubscribe(ChannelName),
}

/// What a control entry counts for in the queue's byte bound.
const CONTROL_SIZE: usize = 64;

impl Outbound {
    pub fn len(&self) -> usize {
        match self {
            Outbound::Delivery(delivery) => delivery.frame.len(),
            Outbound::Subscribe(_) | Outbound::Unsubscribe(_) => CONTROL_SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame of a delivery.
    fn frame(&self) -> Option<&Bytes> {
        match self {
            Outbound::Delivery(delivery) => Some(&delivery.frame),
            _ => None,
        }
    }
}

/// What the fan-out side and the connection task share.
struct ConnectionShared {
    id: u64,
    /// Set once the connection has authenticated.
    user_id: OnceLock<Arc<str>>,
    stream: TcpStream,
    state: Mutex<State>,
    /// Wakes the task: entries arrived, bytes wait for the socket, or the
    /// connection fell behind or broke.
    wake: Notify,
    max_messages: usize,
    max_bytes: usize,
}

/// A frame waiting for the socket.
struct Unsent {
    frame: Bytes,
    /// A message (a delivery), as opposed to the task's own frames (replies,
    /// pings, the close frame): what counts as dropped if it is discarded.
    message: bool,
}

/// The queue. Plain deques: they allocate only while something waits (an
/// idle connection holds no buffer) and are shrunk after a burst.
#[derive(Default)]
struct State {
    /// Encoded frames not yet written, in order; the first may be partly
    /// written already (see `front_partial`).
    unsent: VecDeque<Unsent>,
    /// The first of `unsent` is the rest of a frame the socket took part
    /// of: it must be written whole, or the stream breaks mid-frame.
    front_partial: bool,
    /// Entries for the task, in order, all behind `unsent`.
    entries: VecDeque<Outbound>,
    /// Bytes in `unsent` and `entries`, against `max_bytes`.
    bytes: usize,
    /// The task holds the connection: fan-out queues instead of writing.
    held: bool,
    /// When the socket last took bytes (or `unsent` filled), while bytes wait.
    stalled_since: Option<Instant>,
    /// Set when something did not fit: the connection must be closed.
    slow: bool,
    /// Set when a write failed: the peer is gone.
    failed: bool,
    /// Set when the connection has ended (its task is done with it);
    /// offers are refused, and counted as dropped.
    closed: bool,
    /// Messages written or queued here so far: the task compares it across
    /// a keepalive ping to tell a client that stopped reading what was sent
    /// to it from one with nothing at stake.
    messages_out: u64,
    /// For subscribed channels that keep history: the last position
    /// delivered here, to skip repeats and to notice gaps.
    positions: HashMap<ChannelName, Position>,
}

/// What a connection does with an entry, given its position in the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Write the frame as it is (the position, if kept, has advanced).
    Write,
    /// Already delivered here (the overlap of a recovery with the live stream).
    Skip,
    /// For the task: a gap or a new epoch to deal with, or a control entry.
    Task,
}

impl State {
    /// Judges `entry` for this connection; an in-order message in a channel
    /// whose position is kept advances the position.
    fn judge(&mut self, entry: &Outbound) -> Judgement {
        let Outbound::Delivery(delivery) = entry else {
            return Judgement::Task;
        };
        let (Some(offset), Some(epoch)) = (delivery.offset, delivery.epoch.as_deref()) else {
            return Judgement::Write;
        };
        let Some(position) = self.positions.get_mut(&delivery.channel) else {
            return Judgement::Write;
        };
        if position.epoch != epoch {
            return Judgement::Task;
        }
        match offset {
            offset if offset <= position.offset => Judgement::Skip,
            offset if offset == position.offset + 1 => {
                position.offset = offset;
                Judgement::Write
            }
            _ => Judgement::Task,
        }
    }

    fn push_unsent(&mut self, frame: Bytes, message: bool) {
        if self.unsent.is_empty() {
            self.stalled_since = Some(Instant::now());
        }
        self.bytes += frame.len();
        self.unsent.push_back(Unsent { frame, message });
    }

    /// Drops `written` bytes from the front of `unsent`.
    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        self.stalled_since = Some(Instant::now());
        while written > 0 {
            let front = &mut self.unsent.front_mut().expect("written bytes were unsent").frame;
            if written < front.len() {
                *front = front.slice(written..);
                self.front_partial = true;
                return;
            }
            written -= front.len();
            self.unsent.pop_front();
            self.front_partial = false;
        }
    }

    fn over_bounds(&self, size: usize, shared: &ConnectionShared) -> bool {
        self.unsent.len() + self.entries.len() >= shared.max_messages || self.bytes + size > shared.max_bytes
    }
}

/// A cheap handle to a live connection, stored in the registry.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

/// The connection task's end: the socket and the queue.
pub struct ConnectionSocket {
    shared: Arc<ConnectionShared>,
}

/// What a run of entries came to for one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    /// Written or queued.
    pub queued: u64,
    /// Refused because the connection fell behind.
    pub dropped: u64,
    /// Refused because the connection has ended or broken.
    pub gone: u64,
}

/// Whether a replayed message may be queued (see
/// [`ConnectionSocket::replay_fits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Now,
    /// When the socket has taken some of what waits.
    Later,
    /// Never: nothing waits for the socket, yet the queue is full.
    Never,
}

/// What the connection task takes from its queue.
#[derive(Debug)]
pub enum Next {
    Entry(Outbound),
    /// The client fell behind and must be disconnected.
    FellBehind,
    /// A write failed: the client is gone.
    Failed,
}

/// Subscribers a lane serves between two yields to the runtime.
const YIELD_EVERY: usize = 2_048;
/// Frames written in one vectored write at most.
const MAX_WRITE_SLICES: usize = 64;
/// A deque that held more than this many entries is shrunk once drained.
const SHRINK_ABOVE: usize = 64;

/// Writes the first [`MAX_WRITE_SLICES`] of `frames` with one non-blocking
/// (vectored) write; returns how many bytes the socket took.
fn try_write_frames<'a>(stream: &TcpStream, frames: impl Iterator<Item = &'a Bytes>) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_WRITE_SLICES];
    let mut count = 0;
    for (slice, frame) in slices.iter_mut().zip(frames) {
        *slice = IoSlice::new(frame);
        count += 1;
    }
    match count {
        0 => Ok(0),
        1 => stream.try_write(&slices[0]),
        _ => stream.try_write_vectored(&slices[..count]),
    }
}

/// Takes over an upgraded socket: the fan-out end is made with
/// [`ConnectionSocket::handle`].
pub fn connection_socket(id: u64, stream: TcpStream, max_messages: usize, max_bytes: usize) -> ConnectionSocket {
    ConnectionSocket {
        shared: Arc::new(ConnectionShared {
            id,
            user_id: OnceLock::new(),
            stream,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            max_messages,
            max_bytes,
        }),
    }
}

impl ConnectionHandle {
    /// Writes or queues `entries`, in order, without waiting: frames that
    /// can go straight to the socket go in one (vectored) write, the rest
    /// are queued for the task. A full queue (in messages or bytes) marks
    /// the connection slow; it is closed rather than allowed to lag.
    pub fn offer_all(&self, entries: &[&Outbound]) -> Offers {
        static NONE: Bytes = Bytes::new();
        let shared = &*self.0;
        let mut state = lock(&shared.state);
        if state.closed || state.failed {
            let messages = entries.iter().filter(|entry| entry.frame().is_some()).count();
            return Offers {
                gone: messages as u64,
                ..Offers::default()
            };
        }
        let mut offers = Offers::default();
        // Control entries among the queued: not messages.
        let mut controls = 0;
        let mut wake = false;
        let mut next = 0;
        if !state.held && state.unsent.is_empty() && !state.slow {
            // Leading frames the connection takes as they are go straight to
            // the socket, in one write.
            let mut frames = [&NONE; MAX_WRITE_SLICES];
            let mut count = 0;
            while let Some(entry) = entries.get(next)
                && count < MAX_WRITE_SLICES
            {
                match state.judge(entry) {
                    Judgement::Write => {
                        frames[count] = entry.frame().expect("only deliveries are written");
                        count += 1;
                    }
                    Judgement::Skip => {}
                    Judgement::Task => break,
                }
                next += 1;
            }
            let mut written = match try_write_frames(&shared.stream, frames[..count].iter().copied()) {
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    state.failed = true;
                    drop(state);
                    shared.wake.notify_one();
                    let messages = entries.iter().filter(|entry| entry.frame().is_some()).count();
                    return Offers {
                        gone: messages as u64,
                        ..Offers::default()
                    };
                }
            };
            offers.queued = count as u64;
            // What the socket did not take waits for the task, in order.
            for frame in &frames[..count] {
                if written >= frame.len() {
                    written -= frame.len();
                    continue;
                }
                wake |= state.unsent.is_empty();
                state.front_partial = written > 0;
                state.push_unsent(frame.slice(written..), true);
                written = 0;
            }
        }
        for entry in &entries[next..] {
            if state.slow || state.over_bounds(entry.len(), shared) {
                wake |= !state.slow;
                state.slow = true;
                offers.dropped += 1;
                continue;
            }
            let verdict = if state.held {
                Judgement::Task
            } else {
                state.judge(entry)
            };
            match verdict {
                Judgement::Skip => continue,
                Judgement::Write => {
                    // Behind bytes the task writes (woken if they are the first).
                    wake |= state.unsent.is_empty();
                    state.push_unsent(entry.frame().expect("only deliveries are written").clone(), true);
                }
                Judgement::Task => {
                    controls += u64::from(entry.frame().is_none());
                    state.bytes += entry.len();
                    state.entries.push_back((*entry).clone());
                    state.held = true;
                    // Only the first entry of a burst needs to wake the task;
                    // it takes everything queued before it sleeps again.
                    wake |= state.entries.len() == 1;
                }
            }
            offers.queued += 1;
        }
        state.messages_out += offers.queued - controls;
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
        offers
    }
}

impl Subscriber for ConnectionHandle {
    fn connection_id(&self) -> u64 {
        self.0.id
    }

    fn user_id(&self) -> &str {
        self.0.user_id.get().map_or("", |user| user)
    }
}

impl ConnectionSocket {
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    pub fn stream(&self) -> &TcpStream {
        &self.shared.stream
    }

    /// The fan-out end, for the registry, once the user is known.
    pub fn handle(&self, user_id: &str) -> ConnectionHandle {
        let _ = self.shared.user_id.set(Arc::from(user_id));
        ConnectionHandle(self.shared.clone())
    }

    /// Queues one of the task's own frames (a reply, a ping, a close)
    /// behind everything already queued; [`flush`](Self::flush) writes it.
    /// The queue's bounds apply: a client that sends (pings, commands) but
    /// does not read is marked slow like one that falls behind fan-out.
    pub fn send(&self, frame: Bytes) {
        self.push(frame, false);
    }

    /// Queues a message the task delivers itself (one it took from its
    /// entries, or one read from history), like [`send`](Self::send).
    pub fn send_message(&self, frame: Bytes) {
        self.push(frame, true);
    }

    fn push(&self, frame: Bytes, message: bool) {
        let mut state = lock(&self.shared.state);
        if state.over_bounds(frame.len(), &self.shared) && !state.slow {
            state.slow = true;
            self.shared.wake.notify_one();
        }
        state.messages_out += u64::from(message);
        state.push_unsent(frame, message);
    }

    /// How many replayed messages may be queued before the queue is half
    /// full: replay leaves the other half to live messages and replies.
    pub fn replay_room(&self) -> usize {
        let state = lock(&self.shared.state);
        let queued = state.unsent.len() + state.entries.len();
        (self.shared.max_messages / 2).saturating_sub(queued)
    }

    /// Whether a replayed frame of `size` bytes may be queued now: while the
    /// queue is under half its bounds; otherwise once the socket has
    /// drained what waits for it (then within the full bounds, so that even
    /// a message larger than half the byte bound goes through).
    pub fn replay_fits(&self, size: usize) -> Room {
        let state = lock(&self.shared.state);
        let shared = &*self.shared;
        let queued = state.unsent.len() + state.entries.len();
        if queued < shared.max_messages / 2 && state.bytes + size <= shared.max_bytes / 2 {
            Room::Now
        } else if !state.unsent.is_empty() {
            Room::Later
        } else if !state.over_bounds(size, shared) {
            Room::Now
        } else {
            Room::Never
        }
    }

    /// Messages written or queued to this connection so far.
    pub fn messages_out(&self) -> u64 {
        lock(&self.shared.state).messages_out
    }

    /// Ends the connection for fan-out: from now on offers are refused
    /// (and counted as dropped by fan-out), and whatever is still queued is
    /// discarded. Returns how many messages were discarded.
    pub fn finish(&self) -> u64 {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        state.front_partial = false;
        drop(state);
        self.discard_backlog()
    }

    /// Discards everything queued, for a connection cut off as slow: the
    /// close frame queued next is what the client reads next, instead of a
    /// backlog it could not read in time. A frame the socket took part of
    /// is kept, so that the stream stays well-formed. Returns how many
    /// messages were discarded.
    pub fn discard_backlog(&self) -> u64 {
        let mut state = lock(&self.shared.state);
        let keep = usize::from(state.front_partial);
        let mut discarded = 0;
        let mut bytes = 0;
        for unsent in state.unsent.drain(keep..) {
            discarded += u64::from(unsent.message);
            bytes += unsent.frame.len();
        }
        for entry in state.entries.drain(..) {
            discarded += u64::from(matches!(entry, Outbound::Delivery(_)));
            bytes += entry.len();
        }
        state.bytes -= bytes;
        discarded
    }

    /// Writes queued frames until the socket takes no more.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = lock(&self.shared.state);
        while !state.unsent.is_empty() {
            match try_write_frames(&self.shared.stream, state.unsent.iter().map(|unsent| &unsent.frame)) {
                Ok(0) => {
                    state.failed = true;
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(written) => state.advance(written),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => {
                    state.failed = true;
                    return Err(error);
                }
            }
        }
        state.stalled_since = None;
        if state.unsent.capacity() > SHRINK_ABOVE {
            state.unsent = VecDeque::new();
        }
        Ok(())
    }

    /// Since when queued bytes have waited for the socket without progress.
    pub fn stalled_since(&self) -> Option<Instant> {
        let state = lock(&self.shared.state);
        if state.unsent.is_empty() {
            None
        } else {
            state.stalled_since
        }
    }

    /// Holds the connection: until [`next`](Self::next) finds nothing left,
    /// fan-out queues entries for the task instead of writing around it.
    pub fn hold(&self) {
        lock(&self.shared.state).held = true;
    }

    /// The next entry, or the news that the connection fell behind or broke.
    /// `None` means nothing is queued for the task, and releases the hold.
    pub fn next(&self) -> Option<Next> {
        let mut state = lock(&self.shared.state);
        if state.failed {
            return Some(Next::Failed);
        }
        if state.slow {
            return Some(Next::FellBehind);
        }
        match state.entries.pop_front() {
            Some(entry) => {
                state.bytes -= entry.len();
                Some(Next::Entry(entry))
            }
            None => {
                state.held = false;
                if state.entries.capacity() > SHRINK_ABOVE {
                    state.entries = VecDeque::new();
                }
                None
            }
        }
    }

    /// Judges an entry the task took (see [`Judgement`]).
    pub fn judge(&self, entry: &Outbound) -> Judgement {
        lock(&self.shared.state).judge(entry)
    }

    /// The position kept for `channel`, if any.
    pub fn position(&self, channel: &ChannelName) -> Option<Position> {
        lock(&self.shared.state).positions.get(channel).cloned()
    }

    /// Keeps `position` for `channel` from now on.
    pub fn set_position(&self, channel: &ChannelName, position: Position) {
        lock(&self.shared.state).positions.insert(channel.clone(), position);
    }

    /// Stops keeping a position for `channel`.
    pub fn forget_position(&self, channel: &ChannelName) {
        lock(&self.shared.state).positions.remove(channel);
    }

    /// Advances the position past a message this connection will not
    /// receive (its own, excluded), when it is the next one.
    pub fn step_over(&self, channel: &ChannelName, offset: u64, epoch: &str) {
        let mut state = lock(&self.shared.state);
        if let Some(position) = state.positions.get_mut(channel)
            && position.epoch == epoch
            && offset == position.offset + 1
        {
            position.offset = offset;
        }
    }

    /// Makes the next [`changed`](Self::changed) resolve at once.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Resolves when fan-out has news for the task (see [`next`](Self::next)
    /// and [`stalled_since`](Self::stalled_since)). A wake-up sent before
    /// this is awaited is kept, so none is lost.
    pub async fn changed(&self) {
        self.shared.wake.notified().await;
    }
}

impl Drop for ConnectionSocket {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        state.unsent = VecDeque::new();
        state.entries = VecDeque::new();
        // Handles may outlive the task for a moment; the peer learns now.
        let _ = socket2::SockRef::from(&self.shared.stream).shutdown(std::net::Shutdown::Both);
    }
}

/// A publication on its way to a lane, with its encoded entry.
struct Pending {
    publication: Publication,
    entry: Outbound,
    accepted_at: Instant,
}

/// One fan-out task's inbox. A channel always maps to the same lane, so its
/// publications are delivered in the order they were handed over.
#[derive(Default)]
struct Lane {
    inbox: Mutex<Inbox>,
    wake: Notify,
}

/// What waits for a lane's task. Bounded by [`LaneLimits`]: it grows only
/// while publications arrive (from the Redis reader or local publishers)
/// faster than the lane delivers them.
#[derive(Default)]
struct Inbox {
    pending: Vec<Pending>,
    /// The encoded size of `pending`, against `LaneLimits::bytes`.
    bytes: usize,
}

/// How much may wait for one lane. At the bound the arriving publication is
/// dropped and counted, once per local subscriber, in
/// `herald_messages_dropped_total{reason="lane_full"}`: in a channel with
/// history the next delivery shows each connection the gap, which is filled
/// from history; elsewhere the loss is that of Pub/Sub (at most once).
/// Waiting instead would stall the Redis reader (and Redis would cut it off
/// at its output buffer limit) or a publisher holding a channel's lock.
#[derive(Debug, Clone, Copy)]
pub struct LaneLimits {
    pub messages: usize,
    pub bytes: usize,
}

impl Default for LaneLimits {
    /// Far above what a lane delivers in a second, far below what would
    /// exhaust memory: 65,536 publications or 256 MiB per lane.
    fn default() -> Self {
        LaneLimits {
            messages: 65_536,
            bytes: 256 << 20,
        }
    }
}

/// The node's subscription registry and the fan-out over it.
///
/// Publications are handed to a lane (one per runtime worker, chosen by
/// channel) and delivered by its task. When a lane falls behind, what
/// waits is taken together and consecutive publications to one channel go
/// to each subscriber in a single write: the busier the node, the fewer
/// syscalls per delivery.
pub struct Fanout {
    pub registry: Registry<ConnectionHandle>,
    metrics: Arc<Metrics>,
    lanes: Box<[Lane]>,
    lane_limits: LaneLimits,
    hasher: RandomState,
}

impl Fanout {
    /// A fan-out with `lanes` lanes (at least one); [`start`](Self::start)
    /// runs them.
    pub fn new(metrics: Arc<Metrics>, lanes: usize) -> Self {
        Self::with_lane_limits(metrics, lanes, LaneLimits::default())
    }

    /// The same, with `lane_limits` bounding each lane's inbox.
    pub fn with_lane_limits(metrics: Arc<Metrics>, lanes: usize, lane_limits: LaneLimits) -> Self {
        Fanout {
            registry: Registry::default(),
            metrics,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            lane_limits,
            hasher: RandomState::new(),
        }
    }

    /// Spawns one task per lane, until `stopped`.
    pub fn start(self: &Arc<Self>, stopped: &CancellationToken, tasks: &TaskTracker) {
        for index in 0..self.lanes.len() {
            tasks.spawn(self.clone().run_lane(index, stopped.clone()));
        }
    }

    /// Hands `publication` to its channel's lane, for every local subscriber
    /// of the channel. `accepted_at` feeds the latency histogram. Never
    /// waits: a full lane drops it (see [`LaneLimits`]).
    pub fn deliver(&self, publication: Publication, accepted_at: Instant) {
        let entry = match publication.control() {
            Some(Control::Subscribe(channel)) => Outbound::Subscribe(channel),
            Some(Control::Unsubscribe(channel)) => Outbound::Unsubscribe(channel),
            None => Outbound::Delivery(Arc::new(Delivery::new(&publication))),
        };
        let lane = &self.lanes[self.hasher.hash_one(&publication.channel) as usize % self.lanes.len()];
        let pending = Pending {
            publication,
            entry,
            accepted_at,
        };
        let size = pending.entry.len();
        let mut inbox = lock(&lane.inbox);
        if inbox.pending.len() >= self.lane_limits.messages || inbox.bytes + size > self.lane_limits.bytes {
            drop(inbox);
            let subscribers = self.registry.subscriber_count(&pending.publication.channel);
            self.metrics.messages_dropped.add("lane_full", subscribers as u64);
            return;
        }
        inbox.pending.push(pending);
        inbox.bytes += size;
        if inbox.pending.len() == 1 {
            drop(inbox);
            lane.wake.notify_one();
        }
    }

    async fn run_lane(self: Arc<Self>, index: usize, stopped: CancellationToken) {
        let lane = &self.lanes[index];
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = lane.wake.notified() => {}
                _ = stopped.cancelled() => return,
            }
            // Let the publishers that are ready run first: whatever they hand
            // over joins this batch.
            tokio::task::yield_now().await;
            {
                let mut inbox = lock(&lane.inbox);
                std::mem::swap(&mut batch, &mut inbox.pending);
                inbox.bytes = 0;
            }
            for run in batch.chunk_by(|a, b| a.publication.channel == b.publication.channel) {
                self.deliver_run(run).await;
            }
            batch.clear();
        }
    }

    /// Delivers consecutive publications to one channel: each subscriber
    /// gets those meant for it in one offer. Every [`YIELD_EVERY`]
    /// subscribers the lane lets the other tasks of its worker run: a
    /// channel with 100,000 subscribers would otherwise hold the worker for
    /// well over 100 ms.
    async fn deliver_run(&self, run: &[Pending]) {
        let mut totals = Offers::default();
        let mut entries: Vec<&Outbound> = Vec::with_capacity(run.len());
        let subscribers = self.registry.snapshot(&run[0].publication.channel);
        let subscribers = subscribers.as_deref().unwrap_or_default();
        for (index, chunk) in subscribers.chunks(YIELD_EVERY).enumerate() {
            if index > 0 {
                tokio::task::yield_now().await;
            }
            for connection in chunk {
                entries.clear();
                let (id, user) = (connection.connection_id(), connection.user_id());
                entries.extend(run.iter().filter(|p| p.publication.is_for(id, user)).map(|p| &p.entry));
                if entries.is_empty() {
                    continue;
                }
                let offers = connection.offer_all(&entries);
                totals.queued += offers.queued;
                totals.dropped += offers.dropped;
                totals.gone += offers.gone;
            }
        }
        self.metrics
            .messages_delivered
            .fetch_add(totals.queued, Ordering::Relaxed);
        if totals.dropped > 0 {
            self.metrics.messages_dropped.add("slow_client", totals.dropped);
        }
        if totals.gone > 0 {
            self.metrics.messages_dropped.add("disconnected", totals.gone);
        }
        for pending in run {
            self.metrics.fanout_latency.observe(pending.accepted_at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn delivery(text: &str, offset: Option<u64>) -> Outbound {
        Outbound::Delivery(Arc::new(Delivery {
            frame: websocket::text(text),
            channel: ChannelName::parse("news").unwrap(),
            offset,
            epoch: offset.map(|_| "e".to_owned()),
        }))
    }

    /// What offering one entry came to.
    #[derive(Debug, PartialEq, Eq)]
    enum Offer {
        Queued,
        Dropped,
        Closed,
    }

    fn offer(handle: &ConnectionHandle, entry: &Outbound) -> Offer {
        match handle.offer_all(&[entry]) {
            Offers { queued: 1, .. } => Offer::Queued,
            Offers { dropped: 1, .. } => Offer::Dropped,
            Offers { gone: 1, .. } => Offer::Closed,
            other => panic!("one entry offered, got {other:?}"),
        }
    }

    /// A connected pair: the server's end as a connection, and the client.
    async fn pair(max_messages: usize, max_bytes: usize) -> (ConnectionSocket, ConnectionHandle, TcpStream) {
        pair_with_id(1, max_messages, max_bytes).await
    }

    async fn pair_with_id(
        id: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> (ConnectionSocket, ConnectionHandle, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = connection_socket(id, server, max_messages, max_bytes);
        let handle = socket.handle("alice");
        (socket, handle, client)
    }

    /// A pair whose connection keeps position 5 (epoch `e`) in `news`,
    /// writable.
    async fn pair_at_five() -> (ConnectionSocket, ConnectionHandle, TcpStream, ChannelName) {
        let (socket, handle, client) = pair(10, 1_000).await;
        socket.stream().writable().await.unwrap();
        let news = ChannelName::parse("news").unwrap();
        let position = Position {
            offset: 5,
            epoch: "e".into(),
        };
        socket.set_position(&news, position);
        (socket, handle, client, news)
    }

    /// Takes the task's next entries, deliveries of `texts` in order, and
    /// sends them as the task would.
    fn take_deliveries(socket: &ConnectionSocket, texts: &[&str]) {
        for expected in texts {
            match socket.next() {
                Some(Next::Entry(Outbound::Delivery(got))) => assert_eq!(got.frame, websocket::text(expected)),
                other => panic!("unexpected {other:?}"),
            }
            socket.send(websocket::text(expected));
        }
    }

    async fn read_exactly(client: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        tokio::time::timeout(std::time::Duration::from_secs(5), client.read_exact(&mut bytes))
            .await
            .expect("the bytes arrive")
            .unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_plain_delivery_reaches_the_socket_with_no_task() {
        let (socket, handle, mut client) = pair(10, 1_000).await;
        socket.stream().writable().await.unwrap();
        assert_eq!(offer(&handle, &delivery("hello", None)), Offer::Queued);
        // Whether written at once or queued, flushing leaves nothing behind.
        socket.flush().unwrap();
        assert_eq!(read_exactly(&mut client, 7).await, b"\x81\x05hello");
        assert!(socket.next().is_none(), "nothing was queued for the task");
    }

    #[tokio::test]
    async fn held_connections_and_positions_go_through_the_task_in_order() {
        let (socket, handle, mut client) = pair(10, 1_000).await;
        socket.hold();
        assert_eq!(offer(&handle, &delivery("a", None)), Offer::Queued);
        assert_eq!(offer(&handle, &delivery("b", Some(1))), Offer::Queued);
        take_deliveries(&socket, &["a", "b"]);
        assert!(socket.next().is_none(), "released");
        assert_eq!(offer(&handle, &delivery("c", None)), Offer::Queued);
        socket.flush().unwrap();
        assert_eq!(read_exactly(&mut client, 9).await, b"\x81\x01a\x81\x01b\x81\x01c");
    }

    #[tokio::test]
    async fn a_run_goes_out_in_one_write_and_in_order_around_task_entries() {
        let (socket, handle, mut client, _) = pair_at_five().await;
        let (a, b, c, d) = (
            delivery("a", None),
            delivery("b", None),
            delivery("c", Some(7)),
            delivery("d", None),
        );
        let offers = handle.offer_all(&[&a, &b, &c, &d]);
        assert_eq!(
            offers,
            Offers {
                queued: 4,
                ..Offers::default()
            }
        );
        // `c` comes after a gap (6 is missing), so the task takes it; `d`
        // waits behind it.
        take_deliveries(&socket, &["c", "d"]);
        socket.flush().unwrap();
        assert_eq!(
            read_exactly(&mut client, 12).await,
            b"\x81\x01a\x81\x01b\x81\x01c\x81\x01d"
        );
    }

    #[tokio::test]
    async fn fan_out_skips_repeats_and_advances_the_position() {
        let (socket, handle, mut client, news) = pair_at_five().await;
        let (old, next) = (delivery("old", Some(5)), delivery("new", Some(6)));
        let offers = handle.offer_all(&[&old, &next]);
        assert_eq!(
            offers,
            Offers {
                queued: 1,
                ..Offers::default()
            },
            "the repeat is skipped"
        );
        assert_eq!(socket.position(&news).unwrap().offset, 6);
        assert!(socket.next().is_none(), "in order: nothing for the task");
        socket.flush().unwrap();
        assert_eq!(read_exactly(&mut client, 5).await, b"\x81\x03new");
        socket.step_over(&news, 7, "e");
        assert_eq!(socket.position(&news).unwrap().offset, 7);
        let other_epoch = Outbound::Delivery(Arc::new(Delivery {
            frame: websocket::text("x"),
            channel: news.clone(),
            offset: Some(8),
            epoch: Some("f".into()),
        }));
        offer(&handle, &other_epoch);
        assert!(
            matches!(socket.next(), Some(Next::Entry(_))),
            "a new epoch is the task's"
        );
    }

    #[tokio::test]
    async fn a_full_queue_marks_the_connection_slow() {
        let (socket, handle, _client) = pair(2, 1_000).await;
        socket.hold();
        assert_eq!(offer(&handle, &delivery("12345", Some(1))), Offer::Queued);
        assert_eq!(offer(&handle, &delivery("12345", Some(2))), Offer::Queued);
        assert_eq!(offer(&handle, &delivery("12345", Some(3))), Offer::Dropped);
        assert!(
            matches!(socket.next(), Some(Next::FellBehind)),
            "slow wins over queued entries"
        );
        assert_eq!(offer(&handle, &delivery("1", None)), Offer::Dropped, "slow stays slow");
    }

    #[tokio::test]
    async fn the_byte_bound_counts_too() {
        let (socket, handle, _client) = pair(100, 10).await;
        socket.hold();
        assert_eq!(offer(&handle, &delivery("1234", Some(1))), Offer::Queued);
        assert_eq!(
            offer(&handle, &delivery("1234", Some(2))),
            Offer::Dropped,
            "12 bytes exceed 10"
        );
        assert!(matches!(socket.next(), Some(Next::FellBehind)));
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_fills_the_queue_and_wakes_the_task() {
        let (socket, handle, _client) = pair(1_000, 64 * 1024).await;
        let frame = delivery(&"x".repeat(16 * 1024), None);
        let mut offers = 0;
        while offer(&handle, &frame) == Offer::Queued {
            offers += 1;
            assert!(offers < 100_000, "the socket and the queue never filled");
        }
        assert!(socket.stalled_since().is_some(), "bytes wait for the socket");
        tokio::time::timeout(std::time::Duration::from_secs(5), socket.changed())
            .await
            .expect("the task is woken");
        assert!(matches!(socket.next(), Some(Next::FellBehind)));
    }

    #[tokio::test]
    async fn discarding_the_backlog_keeps_the_stream_whole_and_counts_messages() {
        let (socket, handle, mut client) = pair(1_000, 64 * 1024 * 1024).await;
        let frame = delivery(&"x".repeat(16 * 1024), None);
        let mut offered = 0u64;
        // Until the socket takes no more: then frames queue, the first
        // perhaps in part.
        while socket.stalled_since().is_none() {
            assert_eq!(offer(&handle, &frame), Offer::Queued);
            offered += 1;
            assert!(offered < 100_000, "the socket never filled");
        }
        for _ in 0..3 {
            assert_eq!(offer(&handle, &frame), Offer::Queued);
            offered += 1;
        }
        socket.send(websocket::text("a reply"));
        let discarded = socket.discard_backlog();
        assert!(
            (3..=4).contains(&discarded),
            "{discarded} messages discarded, the reply not counted"
        );
        socket.send(websocket::close(4008, "client too slow"));
        let reader = tokio::spawn(async move {
            // Whole frames, then the close frame.
            let mut buffer = Vec::new();
            let mut messages = 0u64;
            loop {
                while buffer.len() >= 4 {
                    let (opcode, short) = (buffer[0] & 0x0F, usize::from(buffer[1] & 0x7F));
                    let (start, len) = match short {
                        126 => (4, usize::from(u16::from_be_bytes([buffer[2], buffer[3]]))),
                        len => (2, len),
                    };
                    if buffer.len() < start + len {
                        break;
                    }
                    if opcode == websocket::OP_CLOSE {
                        return (messages, buffer[start..start + 2].to_vec());
                    }
                    assert_eq!(&buffer[start..start + len], "x".repeat(16 * 1024).as_bytes());
                    messages += 1;
                    buffer.drain(..start + len);
                }
                let mut chunk = [0u8; 65536];
                let read = client.read(&mut chunk).await.unwrap();
                assert!(read > 0, "the close frame arrives");
                buffer.extend_from_slice(&chunk[..read]);
            }
        });
        while socket.stalled_since().is_some() {
            socket.stream().writable().await.unwrap();
            socket.flush().unwrap();
        }
        let (messages, code) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the reader finishes")
            .unwrap();
        assert_eq!(
            messages,
            offered - discarded,
            "every message not discarded arrives whole"
        );
        assert_eq!(code, 4008u16.to_be_bytes());
    }

    #[tokio::test]
    async fn the_tasks_own_frames_count_against_the_bounds() {
        let (socket, _handle, _client) = pair(100, 10).await;
        socket.hold();
        socket.send(websocket::text("12345678"));
        assert!(socket.next().is_none(), "within the bound");
        socket.send(websocket::text("12345678"));
        assert!(
            matches!(socket.next(), Some(Next::FellBehind)),
            "pongs and replies to a client that does not read make it slow"
        );
    }

    fn publication(channel: &str, data: &str) -> Publication {
        Publication {
            channel: ChannelName::parse(channel).unwrap(),
            message_type: "message".into(),
            message_id: "m".into(),
            timestamp_ms: 0,
            offset: None,
            epoch: None,
            payload: herald_core::Payload::Json(serde_json::value::RawValue::from_string(data.into()).unwrap()),
            from: None,
            exclude_user: None,
            exclude_connection: None,
            ephemeral: false,
        }
    }

    #[tokio::test]
    async fn a_full_lane_drops_what_arrives_and_counts_it_per_subscriber() {
        let metrics = Arc::new(Metrics::default());
        let limits = LaneLimits {
            messages: 3,
            bytes: 1_000,
        };
        let fanout = Fanout::with_lane_limits(metrics.clone(), 1, limits);
        let (_first, first, _c1) = pair_with_id(1, 10, 10_000).await;
        let (_second, second, _c2) = pair_with_id(2, 10, 10_000).await;
        let news = ChannelName::parse("news").unwrap();
        fanout.registry.subscribe(&news, first);
        fanout.registry.subscribe(&news, second);
        // The lane's task is not running: what arrives waits.
        for _ in 0..5 {
            fanout.deliver(publication("news", "1"), Instant::now());
        }
        assert_eq!(lock(&fanout.lanes[0].inbox).pending.len(), 3, "the message bound");
        assert_eq!(
            metrics.messages_dropped.get("lane_full"),
            2 * 2,
            "two publications, two subscribers"
        );
        // The byte bound: room for three frames.
        let frame_len = Delivery::new(&publication("news", "1")).frame.len();
        let limits = LaneLimits {
            messages: 1_000,
            bytes: 3 * frame_len,
        };
        let fanout = Fanout::with_lane_limits(metrics.clone(), 1, limits);
        for _ in 0..4 {
            fanout.deliver(publication("news", "1"), Instant::now());
        }
        let inbox = lock(&fanout.lanes[0].inbox);
        assert_eq!((inbox.pending.len(), inbox.bytes), (3, 3 * frame_len), "the byte bound");
    }

    /// A lane lets the other tasks of its worker run between every
    /// [`YIELD_EVERY`] subscribers of a run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_big_run_yields_to_the_other_tasks_of_the_worker() {
        let fanout = Arc::new(Fanout::new(Arc::default(), 1));
        let news = ChannelName::parse("news").unwrap();
        // One socket, shared (duplicated descriptors): only the queues matter.
        let (socket, _, _client) = pair(10, 10_000).await;
        let subscriber_count = YIELD_EVERY + 10;
        let mut sockets = Vec::new();
        for id in 0..subscriber_count as u64 {
            let std_stream = socket2::SockRef::from(socket.stream()).try_clone().unwrap();
            let stream = std::net::TcpStream::from(std_stream);
            let connection = connection_socket(id, TcpStream::from_std(stream).unwrap(), 10, 10_000);
            // Held: fan-out queues for the task, writing nothing.
            connection.hold();
            fanout.registry.subscribe(&news, connection.handle("alice"));
            sockets.push(connection);
        }
        let queued = |sockets: &[ConnectionSocket]| {
            sockets
                .iter()
                .filter(|connection| !lock(&connection.shared.state).entries.is_empty())
                .count()
        };
        let sockets = Arc::new(sockets);
        // Runs as soon as the lane yields, and sees how far it got.
        let probe = tokio::spawn({
            let sockets = sockets.clone();
            async move { queued(&sockets) }
        });
        let entry = Outbound::Delivery(Arc::new(Delivery::new(&publication("news", "1"))));
        let run = [Pending {
            publication: publication("news", "1"),
            entry,
            accepted_at: Instant::now(),
        }];
        fanout.deliver_run(&run).await;
        assert_eq!(probe.await.unwrap(), YIELD_EVERY, "the probe ran after the first chunk");
        assert_eq!(queued(&sockets), subscriber_count, "every subscriber got it");
    }

    #[tokio::test]
    async fn a_closed_connection_refuses_offers() {
        let (socket, handle, _client) = pair(100, 1_000).await;
        drop(socket);
        assert_eq!(offer(&handle, &delivery("x", None)), Offer::Closed);
    }

    #[tokio::test]
    async fn a_finished_connection_discards_and_refuses_messages_for_counting() {
        let (socket, handle, _client) = pair(100, 10_000).await;
        socket.hold();
        for offset in 1..=3 {
            assert_eq!(offer(&handle, &delivery("queued", Some(offset))), Offer::Queued);
        }
        socket.send(websocket::text("a reply"));
        assert_eq!(
            handle
                .offer_all(&[&Outbound::Subscribe(ChannelName::parse("x").unwrap())])
                .queued,
            1
        );
        assert_eq!(socket.messages_out(), 3, "replies and control entries are not messages");
        assert_eq!(
            socket.finish(),
            3,
            "the queued messages, not the reply or the control entry"
        );
        assert_eq!(offer(&handle, &delivery("late", None)), Offer::Closed);
    }
}
