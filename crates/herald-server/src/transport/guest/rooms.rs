//! `Guests`: the node's guest chat rooms (their channels) and the
//! usernames taken in them on this node.

use std::collections::HashSet;
use std::sync::Mutex;

use herald_core::ChannelName;

use crate::config::GuestConfig;

/// The node's guest chat: its rooms and the usernames taken on this node.
pub struct Guests {
    pub(super) config: GuestConfig,
    /// Each room's channel, in the order of `config.rooms`.
    pub(super) channels: Vec<ChannelName>,
    /// `(room, lowercased username)` of every named guest on this node:
    /// names are unique per room regardless of case.
    pub(super) names: Mutex<HashSet<(usize, String)>>,
}

impl Guests {
    pub fn new(config: &GuestConfig) -> Self {
        let channels = config
            .rooms
            .iter()
            .map(|room| {
                ChannelName::parse(&format!("{}:{room}", config.namespace)).expect("config checked the room names")
            })
            .collect();
        Guests {
            config: config.clone(),
            channels,
            names: Mutex::new(HashSet::new()),
        }
    }
}
