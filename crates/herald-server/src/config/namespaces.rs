//! `[default_namespace]` and `[namespaces.*]`: each namespace's policy
//! (who may subscribe and publish, presence, history), over the defaults
//! of `herald_core::policy`.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::duration::parse_duration;
use herald_core::policy::{NamespacePolicy, Policies, SubscribePolicy, default_policy};

use super::check::{ConfigError, invalid};
use super::raw::RawNamespace;

/// The most messages kept per channel.
pub const MAX_HISTORY_SIZE: usize = 100_000;

/// The policies of every namespace, the unnamed one included.
pub(crate) fn policies(
    default_namespace: Option<&RawNamespace>,
    namespaces: &HashMap<String, RawNamespace>,
) -> Result<Policies, ConfigError> {
    let bare = merge_namespace("default_namespace", default_namespace, default_policy(None))?;
    let mut policies = HashMap::new();
    for (name, policy) in namespaces {
        if !herald_core::channel::is_valid_namespace(name) {
            return Err(invalid(
                &format!("namespaces.{name}"),
                "a namespace name is 1-32 of a-z 0-9 _ -",
            ));
        }
        let defaults = default_policy(Some(name));
        if name == "user" && policy.subscribe.is_some_and(|s| s != SubscribePolicy::Owner) {
            return Err(invalid(
                "namespaces.user.subscribe",
                "personal channels are always `owner`",
            ));
        }
        if name != "user" && policy.subscribe == Some(SubscribePolicy::Owner) {
            return Err(invalid(
                &format!("namespaces.{name}.subscribe"),
                "`owner` applies only to `user`",
            ));
        }
        policies.insert(
            name.clone(),
            merge_namespace(&format!("namespaces.{name}"), Some(policy), defaults)?,
        );
    }
    Ok(Policies::new(policies, bare))
}

fn merge_namespace(
    key: &str,
    raw: Option<&RawNamespace>,
    defaults: NamespacePolicy,
) -> Result<NamespacePolicy, ConfigError> {
    let Some(raw) = raw else { return Ok(defaults) };
    let history_size = raw.history_size.unwrap_or(defaults.history_size);
    if history_size > MAX_HISTORY_SIZE {
        return Err(invalid(
            &format!("{key}.history_size"),
            format!("must be at most {MAX_HISTORY_SIZE}"),
        ));
    }
    let history_ttl = match &raw.history_ttl {
        Some(text) => parse_duration(text).map_err(|problem| invalid(&format!("{key}.history_ttl"), problem))?,
        None if history_size > 0 => Duration::from_secs(300),
        None => defaults.history_ttl,
    };
    if history_size > 0 && history_ttl.is_zero() {
        return Err(invalid(
            &format!("{key}.history_ttl"),
            "must be positive when history_size is set",
        ));
    }
    Ok(NamespacePolicy {
        subscribe: raw.subscribe.unwrap_or(defaults.subscribe),
        client_publish: raw.client_publish.unwrap_or(defaults.client_publish),
        presence: raw.presence.unwrap_or(defaults.presence),
        history_size,
        history_ttl,
        join_leave: raw.join_leave.unwrap_or(defaults.join_leave),
    })
}
