//! A connection's place in the channels that keep history: the last
//! position delivered to it in each, and what follows from it for an entry
//! (`Judgement`: write it, skip a repeat, or leave a gap or a new epoch to
//! the connection's task).

use std::collections::HashMap;

use herald_core::ChannelName;
use herald_core::history::Position;

use super::outbound::Outbound;

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

/// For subscribed channels that keep history: the last position delivered
/// to a connection, to skip repeats and to notice gaps.
#[derive(Default)]
pub(super) struct Positions(HashMap<ChannelName, Position>);

// The methods are small and called on fan-out's hot path
// (`ConnectionHandle::offer_all`, in another module and perhaps another
// codegen unit): `#[inline]` keeps them inlined there.
impl Positions {
    /// Judges `entry` for this connection; an in-order message in a channel
    /// whose position is kept advances the position.
    #[inline]
    pub(super) fn judge(&mut self, entry: &Outbound) -> Judgement {
        let Outbound::Delivery(delivery) = entry else {
            return Judgement::Task;
        };
        let (Some(offset), Some(epoch)) = (delivery.offset, delivery.epoch.as_deref()) else {
            return Judgement::Write;
        };
        let Some(position) = self.0.get_mut(&delivery.channel) else {
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

    /// The position kept for `channel`, if any.
    #[inline]
    pub(super) fn get(&self, channel: &ChannelName) -> Option<&Position> {
        self.0.get(channel)
    }

    /// Keeps `position` for `channel` from now on.
    #[inline]
    pub(super) fn insert(&mut self, channel: ChannelName, position: Position) {
        self.0.insert(channel, position);
    }

    /// Stops keeping a position for `channel`.
    #[inline]
    pub(super) fn remove(&mut self, channel: &ChannelName) {
        self.0.remove(channel);
    }

    /// Advances the position past a message the connection will not
    /// receive (its own, excluded), when it is the next one.
    #[inline]
    pub(super) fn step_over(&mut self, channel: &ChannelName, offset: u64, epoch: &str) {
        if let Some(position) = self.0.get_mut(channel)
            && position.epoch == epoch
            && offset == position.offset + 1
        {
            position.offset = offset;
        }
    }
}
