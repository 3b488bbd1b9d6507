//! Namespace policies: who may subscribe to a channel and who may publish
//! into it from a client connection. The server API is never restricted.

use std::collections::HashMap;

use serde::Deserialize;

use crate::channel::{ChannelName, pattern_matches};
use crate::publication::Publication;

/// Who may subscribe to the channels of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribePolicy {
    /// Only the user whose id is the channel name (`user:{id}`).
    Owner,
    /// Only users whose token's `channels` claim lists the channel or a
    /// pattern that matches it.
    Claim,
    /// Any authenticated user.
    Authenticated,
    /// Nobody from a client; only the server API may add subscriptions.
    Server,
}

/// The policy of one namespace (or of bare channel names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespacePolicy {
    pub subscribe: SubscribePolicy,
    /// Whether a client may publish into the namespace. A client must also be
    /// allowed to subscribe (nobody writes into a channel they cannot read),
    /// except in `user`, where publishing is a direct message to the owner.
    pub client_publish: bool,
    /// Whether `presence` may be asked of the namespace's channels.
    pub presence: bool,
    /// Messages kept per channel for recovery and `history` (0: none).
    pub history_size: usize,
    /// How long a kept message stays recoverable.
    pub history_ttl: std::time::Duration,
    /// Whether subscribers are told when a user joins or leaves a channel.
    pub join_leave: bool,
}

impl NamespacePolicy {
    /// A policy without history or join/leave events.
    pub const fn new(subscribe: SubscribePolicy, client_publish: bool, presence: bool) -> Self {
        NamespacePolicy {
            subscribe,
            client_publish,
            presence,
            history_size: 0,
            history_ttl: std::time::Duration::ZERO,
            join_leave: false,
        }
    }

    pub fn keeps_history(&self) -> bool {
        self.history_size > 0
    }
}

/// Why an action on a channel is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown namespace `{0}`")]
    UnknownNamespace(String),
    #[error("not allowed to subscribe to `{0}`")]
    SubscribeForbidden(String),
    #[error("clients may not publish into `{0}`")]
    PublishForbidden(String),
    #[error("presence is not enabled for `{0}`")]
    PresenceDisabled(String),
}

/// The subscriber as policies see it: the user and the token's grants.
pub struct Subject<'a> {
    pub user_id: &'a str,
    /// The token's `channels` claim: exact channel names or `prefix*` patterns.
    pub granted: &'a [String],
}

impl Subject<'_> {
    fn is_granted(&self, channel: &ChannelName) -> bool {
        self.granted
            .iter()
            .any(|pattern| pattern_matches(pattern, channel.as_str()))
    }
}

/// All namespace policies, validated at start-up.
#[derive(Debug, Clone)]
pub struct Policies {
    namespaces: HashMap<String, NamespacePolicy>,
    /// The policy of bare channel names (no namespace).
    bare: NamespacePolicy,
}

/// The policy a namespace has before configuration: `user` is owner-only
/// with direct messages allowed; `group` is members-only (the token's
/// `channels` claim, or a subscription made by the server API) with chat
/// allowed; bare names and other namespaces need the token's `channels`
/// claim. Open groups are `[namespaces.group] subscribe = "authenticated"`.
pub fn default_policy(namespace: Option<&str>) -> NamespacePolicy {
    match namespace {
        Some("user") => NamespacePolicy::new(SubscribePolicy::Owner, true, false),
        Some("group") => NamespacePolicy::new(SubscribePolicy::Claim, true, true),
        _ => NamespacePolicy::new(SubscribePolicy::Claim, false, true),
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies::new(HashMap::new(), default_policy(None))
    }
}

impl Policies {
    /// Builds the policy set; `user` and `group` exist even when not
    /// configured (see [`default_policy`]). `user` is always owner-only:
    /// nobody else may subscribe to a personal channel, whatever the
    /// configuration says.
    pub fn new(mut namespaces: HashMap<String, NamespacePolicy>, bare: NamespacePolicy) -> Self {
        for builtin in ["user", "group"] {
            namespaces
                .entry(builtin.to_owned())
                .or_insert_with(|| default_policy(Some(builtin)));
        }
        if let Some(user) = namespaces.get_mut("user") {
            user.subscribe = SubscribePolicy::Owner;
        }
        Policies { namespaces, bare }
    }

    /// The policy that governs `channel`.
    pub fn policy(&self, channel: &ChannelName) -> Result<&NamespacePolicy, PolicyError> {
        match channel.namespace() {
            None => Ok(&self.bare),
            Some(namespace) => self
                .namespaces
                .get(namespace)
                .ok_or_else(|| PolicyError::UnknownNamespace(namespace.to_owned())),
        }
    }

    /// The policy under which `publication` is kept in history, if it is.
    pub fn history_for(&self, publication: &Publication) -> Option<&NamespacePolicy> {
        if publication.ephemeral {
            return None;
        }
        self.policy(&publication.channel)
            .ok()
            .filter(|policy| policy.keeps_history())
    }

    /// Whether `subject` may subscribe to `channel` from a client connection.
    pub fn check_subscribe(&self, subject: &Subject<'_>, channel: &ChannelName) -> Result<(), PolicyError> {
        let policy = self.policy(channel)?;
        let allowed = match policy.subscribe {
            SubscribePolicy::Owner => channel.name() == subject.user_id,
            SubscribePolicy::Claim => subject.is_granted(channel),
            SubscribePolicy::Authenticated => true,
            SubscribePolicy::Server => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(PolicyError::SubscribeForbidden(channel.to_string()))
        }
    }

    /// Whether `subject` may publish into `channel` from a client connection.
    pub fn check_client_publish(&self, subject: &Subject<'_>, channel: &ChannelName) -> Result<(), PolicyError> {
        let policy = self.policy(channel)?;
        if !policy.client_publish {
            return Err(PolicyError::PublishForbidden(channel.to_string()));
        }
        if policy.subscribe == SubscribePolicy::Owner {
            return Ok(());
        }
        self.check_subscribe(subject, channel)
    }

    /// Whether `subject` may see who is in `channel`.
    pub fn check_presence(&self, subject: &Subject<'_>, channel: &ChannelName) -> Result<(), PolicyError> {
        if !self.policy(channel)?.presence {
            return Err(PolicyError::PresenceDisabled(channel.to_string()));
        }
        self.check_subscribe(subject, channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(text: &str) -> ChannelName {
        ChannelName::parse(text).unwrap()
    }

    fn policies() -> Policies {
        let mut namespaces = HashMap::new();
        namespaces.insert(
            "team".to_owned(),
            NamespacePolicy::new(SubscribePolicy::Claim, true, true),
        );
        namespaces.insert(
            "alerts".to_owned(),
            NamespacePolicy::new(SubscribePolicy::Server, false, false),
        );
        // Trying to open personal channels to everyone must not work.
        namespaces.insert(
            "user".to_owned(),
            NamespacePolicy::new(SubscribePolicy::Authenticated, true, false),
        );
        Policies::new(namespaces, Policies::default().bare)
    }

    #[test]
    fn subscribe_decisions() {
        let policies = policies();
        let granted = vec!["team:red".to_owned(), "team:blue*".to_owned()];
        let alice = Subject {
            user_id: "alice",
            granted: &granted,
        };
        let cases: &[(&str, Result<(), PolicyError>)] = &[
            ("user:alice", Ok(())),
            ("user:bob", Err(PolicyError::SubscribeForbidden("user:bob".into()))),
            ("group:1", Err(PolicyError::SubscribeForbidden("group:1".into()))),
            ("team:red", Ok(())),
            ("team:blue-2", Ok(())),
            ("team:green", Err(PolicyError::SubscribeForbidden("team:green".into()))),
            ("alerts:x", Err(PolicyError::SubscribeForbidden("alerts:x".into()))),
            ("nope:x", Err(PolicyError::UnknownNamespace("nope".into()))),
            ("bare", Err(PolicyError::SubscribeForbidden("bare".into()))),
        ];
        for (name, expected) in cases {
            assert_eq!(&policies.check_subscribe(&alice, &channel(name)), expected, "{name}");
        }
    }

    #[test]
    fn publish_needs_both_flags() {
        let policies = policies();
        let granted = vec!["team:red".to_owned(), "group:9".to_owned()];
        let alice = Subject {
            user_id: "alice",
            granted: &granted,
        };
        assert_eq!(policies.check_client_publish(&alice, &channel("team:red")), Ok(()));
        assert!(policies.check_client_publish(&alice, &channel("team:green")).is_err());
        assert!(policies.check_client_publish(&alice, &channel("alerts:x")).is_err());
        assert_eq!(policies.check_client_publish(&alice, &channel("group:9")), Ok(()));
        assert_eq!(
            policies.check_client_publish(&alice, &channel("group:8")),
            Err(PolicyError::SubscribeForbidden("group:8".into())),
            "groups are members-only"
        );
        assert_eq!(
            policies.check_client_publish(&alice, &channel("user:bob")),
            Ok(()),
            "a direct message"
        );
    }
}
