//! Taking what fan-out queued for a connection, and replay from history:
//! repeats skipped, server-made subscription changes applied, a gap
//! repaired (or reported with `resync`), a recovering subscribe's missed
//! messages queued as the socket drains.

use std::collections::VecDeque;
use std::time::Duration;

use herald_core::ChannelName;
use herald_core::frame::{ErrorCode, error_frame, server_frame};
use herald_core::history::Position;
use herald_core::websocket;
use serde_json::json;
use tokio::time::Instant;

use super::close::Ending;
use super::state::{Recovery, Session};
use crate::broker::{HistoryPage, MAX_HISTORY_PAGE};
use crate::fanout::{Delivery, Judgement, Next, Outbound, Room};
use crate::hub::Hub;

/// The most queue entries taken in one turn before the socket is read again.
const MAX_BATCH: usize = 64;
/// How long gap repair waits for history to be readable (after a Redis
/// restart the Pub/Sub connection may be back before the command
/// connection) before it gives up with `resync`. The connection is held
/// meanwhile: fan-out queues for it, within its queue bounds.
const GAP_REPAIR_WAIT: Duration = Duration::from_secs(5);
/// The least time between two history reads of one gap repair, so that a
/// broker that is reachable but failing is not asked in a loop.
const GAP_REPAIR_RETRY: Duration = Duration::from_millis(100);

impl<'a> Session<'a> {
    /// Takes what fan-out queued for this task, a batch at a time; the hold
    /// ends once nothing is left.
    pub(crate) async fn take_entries(&mut self) -> Option<Ending> {
        if !self.recoveries.is_empty() {
            // Live messages wait until the replay has caught up.
            return None;
        }
        for _ in 0..MAX_BATCH {
            match self.socket.next() {
                None => return None,
                Some(Next::Entry(entry)) => {
                    self.take(entry).await;
                    if !self.recoveries.is_empty() {
                        // A gap is being filled: what follows waits for it.
                        return None;
                    }
                }
                Some(Next::FellBehind) => return Some(Ending::SlowClient),
                Some(Next::Failed) => return Some(Ending::ClientGone),
            }
        }
        // More waits: come back to it after a look at the socket.
        self.socket.wake();
        None
    }

    /// Takes one entry from the queue. For channels with history it keeps
    /// the stream exact: a message already delivered (overlap with a
    /// recovery) is skipped, and a gap (a message lost on its way to this
    /// node) is filled from history, or reported with `resync`.
    async fn take(&mut self, entry: Outbound) {
        let verdict = self.socket.judge(&entry);
        let notice = match entry {
            Outbound::Delivery(delivery) => match verdict {
                Judgement::Skip => return,
                Judgement::Write => return self.socket.send_message(delivery.frame.clone()),
                Judgement::Task => {
                    // A gap or a new epoch: only deliveries with a position get here.
                    let (Some(offset), Some(epoch)) = (delivery.offset, &delivery.epoch) else {
                        return;
                    };
                    match self.socket.position(&delivery.channel) {
                        // A gap: filled from history as the socket drains,
                        // this message after it.
                        Some(position) if position.epoch == *epoch && offset > position.offset + 1 => {
                            self.recoveries.push_back(Recovery {
                                channel: delivery.channel.clone(),
                                epoch: position.epoch,
                                pending: VecDeque::new(),
                                last: position.offset,
                                caught_up: false,
                                gap: Some((offset - 1, delivery.clone())),
                                failed: false,
                            });
                        }
                        // A new epoch: what came before it cannot be replayed.
                        Some(_) => self.close_gap(&delivery.channel, true, offset - 1, &delivery),
                        None => {
                            let position = Position {
                                offset,
                                epoch: epoch.clone(),
                            };
                            self.socket.set_position(&delivery.channel, position);
                            self.socket.send_message(delivery.frame.clone());
                        }
                    }
                    return;
                }
            },
            Outbound::Subscribe(channel) => {
                let limit = self.hub.limits().max_subscriptions;
                if !self.subscriptions.contains(&channel) && self.subscriptions.len() >= limit {
                    let message =
                        format!("cannot add `{channel}`: a connection may hold at most {limit} subscriptions");
                    self.reply(error_frame(None, ErrorCode::LimitExceeded, &message));
                    return;
                }
                // As a plain subscribe: the position is read before registering.
                let keeps_history = self.hub.policies().policy(&channel).is_ok_and(|p| p.keeps_history());
                if keeps_history
                    && self.socket.position(&channel).is_none()
                    && let Ok(position) = self.hub.position(&channel).await
                {
                    self.socket.set_position(&channel, position);
                }
                self.granted_by_server.insert(channel.clone());
                self.add_subscription(&channel).await;
                websocket::text(&server_frame("subscribed", None, json!({"channel": channel})))
            }
            Outbound::Unsubscribe(channel) => {
                if channel == self.user_channel || !self.remove_subscription(&channel).await {
                    return;
                }
                let data = json!({"channel": channel, "reason": "server"});
                websocket::text(&server_frame("unsubscribed", None, data))
            }
        };
        self.socket.send(notice);
    }

    /// Advances the position past a message this connection will not
    /// receive (its own, excluded), when it is the next one.
    pub(super) fn step_over(&mut self, channel: &ChannelName, offset: Option<u64>, epoch: Option<&str>) {
        if let (Some(offset), Some(epoch)) = (offset, epoch) {
            self.socket.step_over(channel, offset, epoch);
        }
    }

    /// Ends a gap before `live`: counts it as recovered, or (`failed`)
    /// tells the client with `resync` that what came before `live` cannot be
    /// replayed; then queues `live` and moves the position to it.
    fn close_gap(&mut self, channel: &ChannelName, failed: bool, until: u64, live: &Delivery) {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(offset), Some(epoch)) = (live.offset, &live.epoch) else {
            return;
        };
        let counter = match failed {
            true => &self.hub.metrics.gaps_unrecovered,
            false => &self.hub.metrics.gaps_recovered,
        };
        counter.fetch_add(1, Relaxed);
        if failed {
            let data = json!({"channel": channel, "recovered": false, "epoch": epoch, "offset": until});
            self.reply(server_frame("resync", None, data));
        }
        let position = Position {
            offset,
            epoch: epoch.clone(),
        };
        self.socket.set_position(channel, position);
        self.socket.send_message(live.frame.clone());
    }

    /// Queues what recovering subscribes replay, as far as the queue has
    /// room, reading the next page of history when one is used up. Once
    /// every replay has caught up, the live messages that waited are taken.
    /// `Err` when live messages alone fill the queue: the client cannot keep up.
    pub(crate) async fn replay(&mut self) -> Result<(), Ending> {
        let (id, user) = (self.socket.id(), self.identity.user_id.clone());
        while let Some(recovery) = self.recoveries.front_mut() {
            while let Some((offset, frame)) = recovery.pending.front() {
                if let Some(frame) = frame {
                    match self.socket.replay_fits(frame.len()) {
                        Room::Now => self.socket.send_message(frame.clone()),
                        // The socket drains first; the task comes back.
                        Room::Later => return Ok(()),
                        Room::Never => return Err(Ending::SlowClient),
                    }
                }
                let position = Position {
                    offset: *offset,
                    epoch: recovery.epoch.clone(),
                };
                self.socket.set_position(&recovery.channel, position);
                recovery.pending.pop_front();
            }
            if !recovery.caught_up {
                let mut limit = self.socket.replay_room().clamp(1, MAX_HISTORY_PAGE);
                if let Some((until, _)) = &recovery.gap {
                    limit = limit.min(until.saturating_sub(recovery.last) as usize).max(1);
                }
                let since = Position {
                    offset: recovery.last,
                    epoch: recovery.epoch.clone(),
                };
                match read_history(self.hub, &recovery.channel, since, limit).await {
                    Some(page) if page.recovered => {
                        recovery.add_page(page.publications, limit, id, &user);
                        continue;
                    }
                    // History moved on (it was trimmed meanwhile) or could
                    // not be read: the replay ends here. A gap is reported
                    // with `resync`; after a subscribe's replay, the next
                    // live message shows the gap, dealt with like any other.
                    _ => recovery.failed = true,
                }
            }
            let Some(recovery) = self.recoveries.pop_front() else {
                break;
            };
            if let Some((until, live)) = recovery.gap {
                self.close_gap(&recovery.channel, recovery.failed, until, &live);
            }
        }
        match self.take_entries().await {
            Some(ending) => Err(ending),
            None => Ok(()),
        }
    }
}

/// Reads `limit` messages of `channel`'s history after `since`, for a
/// replay. A broker that cannot be reached (after a Redis restart the
/// Pub/Sub connection may be back before the command connection) is waited
/// for and the read retried, within [`GAP_REPAIR_WAIT`]: `None` only when
/// history could not be read in that time.
async fn read_history(hub: &Hub, channel: &ChannelName, since: Position, limit: usize) -> Option<HistoryPage> {
    let deadline = Instant::now() + GAP_REPAIR_WAIT;
    let mut waited = false;
    loop {
        let error = match hub.history_after(channel, since.clone(), limit).await {
            Ok(page) => return Some(page),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            tracing::debug!(%channel, %error, "replay gave up waiting for history");
            return None;
        }
        if !std::mem::replace(&mut waited, true) {
            hub.metrics
                .gap_repair_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let pause = tokio::time::sleep(GAP_REPAIR_RETRY);
        let _ = tokio::time::timeout_at(deadline, async {
            hub.broker_reachable().await;
            pause.await;
        })
        .await;
    }
}
