//! The connection side of fan-out, its two ends: `ConnectionHandle`, what
//! the registry stores and the lanes offer entries to (written straight to
//! the socket or queued, never waiting), and `ConnectionSocket`, the
//! connection task's end (the socket, the task's own frames, flushing, and
//! what is queued for it). Both work on the queue of `fanout/queue.rs`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use herald_core::ChannelName;
use herald_core::history::Position;
use herald_core::registry::Subscriber;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::outbound::Outbound;
use super::position::Judgement;
use super::queue::{ConnectionShared, State};
use crate::util::lock;

/// A cheap handle to a live connection, stored in the registry.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

/// The connection task's end: the socket and the queue.
pub struct ConnectionSocket {
    pub(super) shared: Arc<ConnectionShared>,
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
                match state.positions.judge(entry) {
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
                state.positions.judge(entry)
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

    /// Holds the connection for the rest of its life: fan-out never writes
    /// to the socket itself, every entry goes to the task, which writes
    /// frames of its own dialect (the guest chat re-frames deliveries).
    pub fn hold_for_good(&self) {
        let mut state = lock(&self.shared.state);
        state.held = true;
        state.held_for_good = true;
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
                state.held = state.held_for_good;
                if state.entries.capacity() > SHRINK_ABOVE {
                    state.entries = VecDeque::new();
                }
                None
            }
        }
    }

    /// Judges an entry the task took (see [`Judgement`]).
    pub fn judge(&self, entry: &Outbound) -> Judgement {
        lock(&self.shared.state).positions.judge(entry)
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
        lock(&self.shared.state).positions.step_over(channel, offset, epoch);
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::fanout::outbound::Delivery;
    use herald_core::websocket;
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
    pub(crate) async fn pair(max_messages: usize, max_bytes: usize) -> (ConnectionSocket, ConnectionHandle, TcpStream) {
        pair_with_id(1, max_messages, max_bytes).await
    }

    pub(crate) async fn pair_with_id(
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
