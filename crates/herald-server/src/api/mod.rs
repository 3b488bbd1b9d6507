//! The HTTP API, by audience: publishing and server-managed subscriptions
//! for the API key (`publish`); messaging for a user's own token
//! (`messages`); queries — history, inbox, unread, presence — for either
//! (`queries`); operations — `/health`, `/ready`, `/stats`, `/metrics` —
//! (`ops`). `request` is what every endpoint shares: credentials, bounded
//! JSON bodies, the common refusals.
//!
//! Every error is a JSON body `{"error": {"code", "message"}}` with a fitting
//! status; request bodies are read with a size limit and parsed strictly
//! (unknown fields are refused, so typos are not silently ignored).

mod messages;
mod ops;
mod publish;
mod queries;
mod request;

pub use messages::{direct_message, group_message};
pub use ops::{health, method_not_allowed, metrics, not_found, ready, stats};
pub use publish::{MAX_BROADCAST_CHANNELS, publish, subscribe_user, unsubscribe_user};
pub use queries::{
    HistoryQuery, MAX_STATUS_USERS, MAX_UNREAD_CHANNELS, UnreadQuery, UsersQuery, channel_history, channel_presence,
    inbox, unread, users_online,
};
