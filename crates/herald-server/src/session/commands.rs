//! What the protocol's commands mean for an authenticated connection
//! (`Session::command`): subscribe (with recovery), unsubscribe, groups,
//! publish and the chat payload, `mark_read`, history, presence, `refresh`,
//! and their error mappings.

use std::collections::VecDeque;

use herald_core::frame::{self, Command, ErrorCode, FrameError, StreamPosition, ack_frame, error_frame, server_frame};
use herald_core::history::Position;
use herald_core::policy::Subject;
use herald_core::rate_limit::Verdict;
use herald_core::view::{HistoryAnswer, presence_json};
use herald_core::{ChannelName, Payload};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::close::Ending;
use super::state::{Recovery, Session};
use crate::auth::AuthError;
use crate::broker::{MAX_HISTORY_PAGE, ReadCursor};
use crate::hub::{PublishError, PublishRequest, Source};

/// Messages a `history` command returns when it names no limit.
const DEFAULT_HISTORY_PAGE: usize = 100;

impl<'a> Session<'a> {
    /// Handles one client data frame (`None` for a binary frame); `Some`
    /// ends the connection. Every frame passes the rate gate first, valid or
    /// not, so that garbage cannot be sent faster than commands.
    pub(crate) async fn command(&mut self, text: Option<&str>) -> Option<Ending> {
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = &self.hub.metrics;
        metrics.commands.fetch_add(1, Relaxed);
        let parsed = text.map(frame::parse_client_frame);
        match self.gate.check(Instant::now().into()) {
            Verdict::Serve => {}
            Verdict::Refuse => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(rate_limited_frame(parsed.as_ref()));
                return None;
            }
            Verdict::Disconnect => return Some(Ending::RateLimited),
        }
        let parsed = match parsed {
            Some(Ok(parsed)) => parsed,
            Some(Err(error)) => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(error.to_frame());
                return None;
            }
            None => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(error_frame(
                    None,
                    ErrorCode::InvalidFrame,
                    "clients send commands as text frames",
                ));
                return None;
            }
        };
        let message_id = parsed.message_id;
        let outcome = match parsed.command {
            Command::Ping => Ok(server_frame("pong", message_id.as_ref(), json!({}))),
            Command::Auth { .. } => Err(err(
                ErrorCode::AlreadyAuthenticated,
                "this connection is already authenticated",
            )),
            Command::Subscribe { channel, recover } => self
                .subscribe(&channel, recover)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Unsubscribe { channel } => self
                .unsubscribe(&channel)
                .await
                .map(|()| ack(&message_id, json!({"channel": channel}))),
            Command::JoinGroup { group_id } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                self.subscribe(&channel, None).await.map(|mut data| {
                    data["group_id"] = json!(group_id);
                    ack(&message_id, data)
                })
            }
            Command::LeaveGroup { group_id } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                self.unsubscribe(&channel)
                    .await
                    .map(|()| ack(&message_id, json!({"group_id": group_id, "channel": channel})))
            }
            Command::Publish {
                channel,
                message_type,
                data,
            } => self
                .publish(channel, message_type, data, None)
                .await
                .map(|receipt| ack(&message_id, receipt)),
            Command::SendMessage {
                group_id,
                msg_type,
                content,
            } => {
                let channel = ChannelName::group(&group_id).expect("the parser validated the group id");
                let data = herald_core::view::chat_message(&group_id, &self.identity.user_id, &msg_type, &content);
                let exclude = Some(self.identity.user_id.clone());
                let published = self
                    .publish(channel.clone(), Some("new_message".into()), data, exclude)
                    .await;
                if let Ok(receipt) = &published {
                    // The sender is excluded from its own message: step over
                    // its offset here rather than repair a "gap" later.
                    self.step_over(&channel, receipt.offset, receipt.epoch.as_deref());
                }
                published.map(|receipt| ack(&message_id, receipt))
            }
            Command::MarkRead {
                channel,
                read_message_id,
                offset,
            } => self
                .mark_read(channel, read_message_id, offset)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Presence { channel } => self.presence(&channel).await.map(|data| ack(&message_id, data)),
            Command::History { channel, since, limit } => self
                .history(&channel, since, limit)
                .await
                .map(|data| ack(&message_id, data)),
            Command::Refresh { token } => self.refresh(&token).await.map(|data| ack(&message_id, data)),
        };
        match outcome {
            Ok(frame) => {
                self.reply(frame);
                // A recovering subscribe's missed messages follow its ack.
                if !self.recoveries.is_empty()
                    && let Err(ending) = self.replay().await
                {
                    return Some(ending);
                }
            }
            Err((code, message)) => {
                metrics.command_errors.fetch_add(1, Relaxed);
                self.reply(FrameError::new(message_id, code, message).to_frame());
            }
        }
        None
    }

    /// A policy decision for this connection. A channel the server API
    /// subscribed it to is one it is a member of (membership the backend
    /// decided, e.g. a members-only group): "may not subscribe" does not
    /// apply there, every other refusal does.
    fn permit(
        &self,
        channel: &ChannelName,
        decision: Result<(), herald_core::policy::PolicyError>,
    ) -> Result<(), (ErrorCode, String)> {
        match decision {
            Err(herald_core::policy::PolicyError::SubscribeForbidden(_))
                if self.granted_by_server.contains(channel) =>
            {
                Ok(())
            }
            other => other.map_err(policy_error),
        }
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            user_id: &self.identity.user_id,
            granted: &self.identity.channels,
        }
    }

    /// Subscribes; for a channel with history, also establishes the
    /// connection's position (and with `recover`, queues what was missed in
    /// `replay`). Returns the ack's data.
    async fn subscribe(
        &mut self,
        channel: &ChannelName,
        recover: Option<StreamPosition>,
    ) -> Result<serde_json::Value, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_subscribe(&self.subject(), channel))?;
        if !self.subscriptions.contains(channel) && self.subscriptions.len() >= self.hub.limits().max_subscriptions {
            let limit = self.hub.limits().max_subscriptions;
            return Err(err(
                ErrorCode::LimitExceeded,
                &format!("a connection may hold at most {limit} subscriptions"),
            ));
        }
        let keeps_history = self.hub.policies().policy(channel).is_ok_and(|p| p.keeps_history());
        // Subscribed already and not asking to recover: nothing changes, and
        // the position stands (resetting it could skip queued messages).
        if recover.is_none()
            && let Some(position) = self.socket.position(channel)
        {
            return Ok(json!({"channel": channel, "epoch": position.epoch, "offset": position.offset}));
        }
        // Without recovery the client starts from "now": read "now" before
        // registering, so a message published in between is either queued
        // or repaired as a gap. With recovery, register first; the overlap
        // between history and queue is skipped by offset.
        let baseline = match (keeps_history, &recover) {
            (true, None) => Some(self.read_position(channel).await?),
            _ => None,
        };
        self.add_subscription(channel).await;
        // Ack only once messages published from now on will arrive here.
        self.hub.subscribed(channel).await;
        let mut data = json!({"channel": channel});
        if !keeps_history {
            if recover.is_some() {
                data["recovered"] = json!(false);
            }
            return Ok(data);
        }
        let position = match (baseline, recover) {
            (Some(baseline), _) => baseline,
            (None, Some(recover)) => {
                // The first page only: the rest is read as the socket drains.
                let limit = self.socket.replay_room().clamp(1, MAX_HISTORY_PAGE);
                let read = async {
                    let since = self.hub.resolve(channel, recover).await.map_err(broker_error)?;
                    let page = self.hub.history_after(channel, since.clone(), limit).await;
                    Ok((since, page.map_err(broker_error)?))
                };
                let (since, page) = match read.await {
                    Ok(read) => read,
                    Err(error) => {
                        // Not half-subscribed: the client is told, and may retry.
                        self.remove_subscription(channel).await;
                        return Err(error);
                    }
                };
                data["recovered"] = json!(page.recovered);
                // A new recovery of the channel replaces one under way.
                self.recoveries.retain(|recovery| recovery.channel != *channel);
                if page.recovered {
                    let mut recovery = Recovery {
                        channel: channel.clone(),
                        epoch: since.epoch.clone(),
                        pending: VecDeque::new(),
                        last: since.offset,
                        caught_up: false,
                        gap: None,
                        failed: false,
                    };
                    let (id, user) = (self.socket.id(), &self.identity.user_id);
                    recovery.add_page(page.publications, limit, id, user);
                    // The ack's position: the last missed message, or, when
                    // more pages follow, the channel's latest when read.
                    let acked = match recovery.caught_up {
                        true => recovery.last,
                        false => page.current.offset,
                    };
                    self.recoveries.push_back(recovery);
                    // The kept position moves as the replay is queued.
                    self.socket.set_position(channel, since);
                    data["epoch"] = json!(page.current.epoch);
                    data["offset"] = json!(acked);
                    return Ok(data);
                }
                page.current
            }
            (None, None) => unreachable!("a baseline is read whenever recovery is not asked"),
        };
        data["epoch"] = json!(position.epoch);
        data["offset"] = json!(position.offset);
        self.socket.set_position(channel, position);
        Ok(data)
    }

    /// The channel's current position.
    async fn read_position(&self, channel: &ChannelName) -> Result<Position, (ErrorCode, String)> {
        self.hub.position(channel).await.map_err(broker_error)
    }

    /// Stores the user's read cursor for `channel` and tells the user's
    /// other connections (`read`).
    async fn mark_read(
        &self,
        channel: ChannelName,
        read_message_id: String,
        offset: Option<u64>,
    ) -> Result<serde_json::Value, (ErrorCode, String)> {
        // One may mark as read only what one may read.
        self.permit(&channel, self.hub.policies().check_subscribe(&self.subject(), &channel))?;
        let keeps_history = self.hub.policies().policy(&channel).is_ok_and(|p| p.keeps_history());
        let (offset, epoch) = match (keeps_history, offset) {
            (false, _) => (None, None),
            (true, Some(offset)) => (Some(offset), Some(self.read_position(&channel).await?.epoch)),
            (true, None) => {
                // Find the message's position among the kept ones.
                let page = self
                    .hub
                    .history(&channel, None, MAX_HISTORY_PAGE)
                    .await
                    .map_err(broker_error)?;
                let found = page.publications.iter().find(|p| p.message_id == read_message_id);
                (found.and_then(|p| p.offset), found.and_then(|p| p.epoch.clone()))
            }
        };
        let cursor = ReadCursor {
            message_id: read_message_id,
            offset,
            epoch,
        };
        self.hub
            .set_read_cursor(&self.identity.user_id, &channel, cursor.clone())
            .await
            .map_err(broker_error)?;
        let mut event = json!({"channel": channel, "message_id": cursor.message_id});
        if let Some(offset) = cursor.offset {
            event["offset"] = json!(offset);
        }
        let data = RawValue::from_string(event.to_string()).expect("json! output is valid JSON");
        let request = PublishRequest {
            channel: self.user_channel.clone(),
            message_type: Some("read".into()),
            message_id: None,
            payload: Payload::Json(data),
            from: Some(self.identity.user_id.clone()),
            exclude_user: None,
            exclude_connection: Some(self.socket.id()),
            ephemeral: true,
        };
        self.hub.publish(request, Source::Client).await.map_err(publish_error)?;
        Ok(event)
    }

    /// The `history` command: a page of the channel's history.
    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<HistoryAnswer, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_subscribe(&self.subject(), channel))?;
        if !self.hub.policies().policy(channel).is_ok_and(|p| p.keeps_history()) {
            return Err(err(
                ErrorCode::NotAvailable,
                &format!("history is not enabled for `{channel}`"),
            ));
        }
        let limit = limit.map_or(DEFAULT_HISTORY_PAGE, |l| l as usize).min(MAX_HISTORY_PAGE);
        let page = self.hub.history(channel, since, limit).await.map_err(broker_error)?;
        Ok(HistoryAnswer::new(channel.clone(), page))
    }

    async fn unsubscribe(&mut self, channel: &ChannelName) -> Result<(), (ErrorCode, String)> {
        if *channel == self.user_channel {
            return Err(err(ErrorCode::Forbidden, "the personal channel cannot be left"));
        }
        if !self.remove_subscription(channel).await {
            return Err(err(ErrorCode::NotSubscribed, &format!("not subscribed to `{channel}`")));
        }
        Ok(())
    }

    async fn publish(
        &self,
        channel: ChannelName,
        message_type: Option<String>,
        data: Box<RawValue>,
        exclude_user: Option<String>,
    ) -> Result<crate::hub::Receipt, (ErrorCode, String)> {
        self.permit(
            &channel,
            self.hub.policies().check_client_publish(&self.subject(), &channel),
        )?;
        let request = PublishRequest {
            channel,
            message_type,
            message_id: None,
            payload: Payload::Json(data),
            from: Some(self.identity.user_id.clone()),
            exclude_user,
            exclude_connection: None,
            ephemeral: false,
        };
        self.hub.publish(request, Source::Client).await.map_err(publish_error)
    }

    async fn presence(&self, channel: &ChannelName) -> Result<serde_json::Value, (ErrorCode, String)> {
        self.permit(channel, self.hub.policies().check_presence(&self.subject(), channel))?;
        let presence = self.hub.presence(channel).await.map_err(broker_error)?;
        Ok(presence_json(channel, &presence))
    }

    async fn refresh(&mut self, token: &str) -> Result<serde_json::Value, (ErrorCode, String)> {
        let identity = self
            .hub
            .verifier
            .verify(token)
            .map_err(|e: AuthError| err(ErrorCode::InvalidToken, &e.to_string()))?;
        if identity.user_id != self.identity.user_id {
            return Err(err(ErrorCode::InvalidToken, "the new token belongs to another user"));
        }
        let expires_at = identity.expires_at;
        self.identity = identity;
        self.expiry_changed = true;
        // The new token may grant less: drop what it no longer allows
        // (subscriptions the server API made are not the token's to judge).
        let revoked: Vec<ChannelName> = self
            .subscriptions
            .iter()
            .filter(|channel| !self.granted_by_server.contains(*channel))
            .filter(|channel| self.hub.policies().check_subscribe(&self.subject(), channel).is_err())
            .cloned()
            .collect();
        for channel in &revoked {
            self.remove_subscription(channel).await;
        }
        if revoked.is_empty() {
            Ok(json!({"expires_at": expires_at}))
        } else {
            Ok(json!({"expires_at": expires_at, "unsubscribed": revoked}))
        }
    }
}

/// The `rate_limited` error for a refused frame, naming its `message_id`
/// when the frame had a readable one.
pub(crate) fn rate_limited_frame(parsed: Option<&Result<frame::ClientFrame, FrameError>>) -> String {
    let message_id = match parsed {
        Some(Ok(frame)) => frame.message_id.as_ref(),
        Some(Err(error)) => error.message_id.as_ref(),
        None => None,
    };
    error_frame(message_id, ErrorCode::RateLimited, "command rate limit exceeded")
}

fn err(code: ErrorCode, message: &str) -> (ErrorCode, String) {
    (code, message.to_owned())
}

fn ack(message_id: &Option<herald_core::frame::MessageId>, data: impl Serialize) -> String {
    ack_frame(message_id.as_ref(), data)
}

fn broker_error(error: crate::broker::BrokerError) -> (ErrorCode, String) {
    (ErrorCode::Unavailable, error.to_string())
}

fn policy_error(error: herald_core::policy::PolicyError) -> (ErrorCode, String) {
    use herald_core::policy::PolicyError;
    let code = match error {
        PolicyError::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
        PolicyError::PresenceDisabled(_) => ErrorCode::NotAvailable,
        PolicyError::SubscribeForbidden(_) | PolicyError::PublishForbidden(_) => ErrorCode::Forbidden,
    };
    (code, error.to_string())
}

fn publish_error(error: PublishError) -> (ErrorCode, String) {
    let code = match error {
        PublishError::TooLarge(_) => ErrorCode::TooLarge,
        PublishError::Broker(_) => ErrorCode::Unavailable,
        PublishError::OutcomeUnknown { .. } => ErrorCode::PublishOutcomeUnknown,
    };
    (code, error.to_string())
}
