//! A connection's bounded queue: what the lanes (through `ConnectionHandle`)
//! and the connection's task (through `ConnectionSocket`) share behind one
//! lock. The frames waiting for the socket, the entries waiting for the
//! task, their bounds in messages and bytes, the flags that end the
//! connection (slow, failed, closed) and its channel positions.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::outbound::Outbound;
use super::position::Positions;

/// What the fan-out side and the connection task share.
pub(super) struct ConnectionShared {
    pub(super) id: u64,
    /// Set once the connection has authenticated.
    pub(super) user_id: OnceLock<Arc<str>>,
    pub(super) stream: TcpStream,
    pub(super) state: Mutex<State>,
    /// Wakes the task: entries arrived, bytes wait for the socket, or the
    /// connection fell behind or broke.
    pub(super) wake: Notify,
    pub(super) max_messages: usize,
    pub(super) max_bytes: usize,
}

/// A frame waiting for the socket.
pub(super) struct Unsent {
    pub(super) frame: Bytes,
    /// A message (a delivery), as opposed to the task's own frames (replies,
    /// pings, the close frame): what counts as dropped if it is discarded.
    pub(super) message: bool,
}

/// The queue. Plain deques: they allocate only while something waits (an
/// idle connection holds no buffer) and are shrunk after a burst.
#[derive(Default)]
pub(super) struct State {
    /// Encoded frames not yet written, in order; the first may be partly
    /// written already (see `front_partial`).
    pub(super) unsent: VecDeque<Unsent>,
    /// The first of `unsent` is the rest of a frame the socket took part
    /// of: it must be written whole, or the stream breaks mid-frame.
    pub(super) front_partial: bool,
    /// Entries for the task, in order, all behind `unsent`.
    pub(super) entries: VecDeque<Outbound>,
    /// Bytes in `unsent` and `entries`, against `max_bytes`.
    pub(super) bytes: usize,
    /// The task holds the connection: fan-out queues instead of writing.
    pub(super) held: bool,
    /// The task holds the connection for good: every entry goes to it
    /// (a dialect that re-frames deliveries, the guest chat).
    pub(super) held_for_good: bool,
    /// When the socket last took bytes (or `unsent` filled), while bytes wait.
    pub(super) stalled_since: Option<Instant>,
    /// Set when something did not fit: the connection must be closed.
    pub(super) slow: bool,
    /// Set when a write failed: the peer is gone.
    pub(super) failed: bool,
    /// Set when the connection has ended (its task is done with it);
    /// offers are refused, and counted as dropped.
    pub(super) closed: bool,
    /// Messages written or queued here so far: the task compares it across
    /// a keepalive ping to tell a client that stopped reading what was sent
    /// to it from one with nothing at stake.
    pub(super) messages_out: u64,
    /// For subscribed channels that keep history: the last position
    /// delivered here, to skip repeats and to notice gaps.
    pub(super) positions: Positions,
}

// The methods are small and called on fan-out's hot path
// (`ConnectionHandle::offer_all`, in another module and perhaps another
// codegen unit): `#[inline]` keeps them inlined there.
impl State {
    #[inline]
    pub(super) fn push_unsent(&mut self, frame: Bytes, message: bool) {
        if self.unsent.is_empty() {
            self.stalled_since = Some(Instant::now());
        }
        self.bytes += frame.len();
        self.unsent.push_back(Unsent { frame, message });
    }

    /// Drops `written` bytes from the front of `unsent`.
    #[inline]
    pub(super) fn advance(&mut self, mut written: usize) {
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

    #[inline]
    pub(super) fn over_bounds(&self, size: usize, shared: &ConnectionShared) -> bool {
        self.unsent.len() + self.entries.len() >= shared.max_messages || self.bytes + size > shared.max_bytes
    }
}
