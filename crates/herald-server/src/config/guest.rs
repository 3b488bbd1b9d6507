//! `[guest]`: the guest chat (the GoChat seed's dialect), off by default.
//! Which rooms exist, where guests connect, the username rules, and the
//! namespace whose channels (`{namespace}:{room}`) carry the rooms. When
//! that namespace is not configured, the guest chat brings its own policy
//! for it: any token user may subscribe and publish, join/leave events on.

use std::collections::HashMap;

use super::check::{ConfigError, invalid};
use super::raw::{RawGuest, RawNamespace};

/// The path guests connect to when `guest.path` is not set.
pub const DEFAULT_GUEST_PATH: &str = "/chat";
/// The longest username allowed when `guest.max_username_length` is not set.
const DEFAULT_MAX_USERNAME: usize = 20;
/// The most `guest.max_username_length` may be.
const MAX_USERNAME_LIMIT: usize = 64;

/// The validated `[guest]` section (present only when enabled).
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Guests connect to `path` (the first room) or `path/{room}`.
    pub path: String,
    /// The namespace of the rooms' channels, shared with token users.
    pub namespace: String,
    /// The rooms, in order; the first is the one `path` alone joins.
    pub rooms: Vec<String>,
    /// Usernames are 1 to this many characters.
    pub max_username_length: usize,
}

/// Validates `[guest]`; when enabled, gives the rooms' namespace its
/// default policy unless `namespaces` configures it, in which case it must
/// announce joins and leaves (the guests' "joined the chat" notices).
pub(crate) fn guest_config(
    raw: RawGuest,
    namespaces: &mut HashMap<String, RawNamespace>,
) -> Result<Option<GuestConfig>, ConfigError> {
    if !raw.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let path = raw.path.unwrap_or_else(|| DEFAULT_GUEST_PATH.to_owned());
    let reserved = [
        "/ws",
        "/api",
        "/health",
        "/ready",
        "/stats",
        "/metrics",
        "/demo",
        "/herald.js",
    ];
    let path_is_plain = path.len() > 1
        && path.starts_with('/')
        && !path.ends_with('/')
        && path[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/'));
    if !path_is_plain
        || reserved
            .iter()
            .any(|r| path == *r || path.starts_with(&format!("{r}/")))
    {
        return Err(invalid(
            "guest.path",
            format!("`{path}` must be a path like /chat (a-z 0-9 - _ /), not one of the server's own"),
        ));
    }
    let namespace = raw.namespace.unwrap_or_else(|| "chat".to_owned());
    if !herald_core::channel::is_valid_namespace(&namespace) || namespace == "user" || namespace == "group" {
        return Err(invalid(
            "guest.namespace",
            "a namespace name is 1-32 of a-z 0-9 _ -, and not `user` or `group`",
        ));
    }
    let rooms = raw.rooms.unwrap_or_else(|| vec!["lobby".to_owned()]);
    if rooms.is_empty() {
        return Err(invalid("guest.rooms", "list at least one room"));
    }
    for room in &rooms {
        if herald_core::ChannelName::parse(&format!("{namespace}:{room}")).is_err() || room.contains([':', '/']) {
            return Err(invalid(
                "guest.rooms",
                format!("`{room}` is not a valid room name (a channel name's charset, no `:` or `/`)"),
            ));
        }
    }
    let max_username_length = raw.max_username_length.unwrap_or(DEFAULT_MAX_USERNAME);
    if max_username_length == 0 || max_username_length > MAX_USERNAME_LIMIT {
        return Err(invalid(
            "guest.max_username_length",
            format!("must be 1 to {MAX_USERNAME_LIMIT}"),
        ));
    }
    match namespaces.get(&namespace) {
        Some(policy) if policy.join_leave != Some(true) => {
            return Err(invalid(
                &format!("namespaces.{namespace}.join_leave"),
                "the guest chat's namespace must set `join_leave = true` (its joined/left notices)",
            ));
        }
        Some(_) => {}
        None => {
            let policy = RawNamespace {
                subscribe: Some(herald_core::policy::SubscribePolicy::Authenticated),
                client_publish: Some(true),
                presence: Some(true),
                join_leave: Some(true),
                ..RawNamespace::default()
            };
            namespaces.insert(namespace.clone(), policy);
        }
    }
    Ok(Some(GuestConfig {
        path,
        namespace,
        rooms,
        max_username_length,
    }))
}
