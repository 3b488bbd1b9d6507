//! Every Redis key and Pub/Sub channel Herald uses, built here and nowhere
//! else, from the configured prefix (`redis.prefix`, `herald:` by default,
//! so that deployments can share one Redis):
//!
//! | key                          | what                                        |
//! |------------------------------|---------------------------------------------|
//! | `{prefix}ch:{channel}`       | Pub/Sub channel carrying a Herald channel   |
//! | `{prefix}probe:{node}`       | a node's readiness probe channel            |
//! | `{prefix}hist:{channel}`     | history (a Stream), with `off:` and `epoch:`|
//! | `{prefix}dedup:{channel}:{id}` | cluster-wide claim of a message id        |
//! | `{prefix}presence:{channel}` | presence hash                               |
//! | `{prefix}nodes`, `nodestats` | node heartbeats and their stats             |
//! | `{prefix}read:{user}`        | a user's read cursors                       |
//! | `{prefix}publish`, `:dead`, `:reader` | Streams ingest, dead letters, lease |

use bytes::Bytes;
use herald_core::ChannelName;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of Streams ingest.
#[derive(Debug, Clone)]
pub struct StreamKeys {
    /// The stream publishers `XADD` to.
    pub stream: String,
    /// Where invalid entries are copied before they are acknowledged.
    pub dead: String,
    /// Holds the id of the node that reads the stream.
    pub lease: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// What every Redis channel carrying a Herald channel starts with.
    pub fn channel_prefix(&self) -> String {
        format!("{}ch:", self.prefix)
    }

    /// The Redis channel that carries a Herald channel.
    pub fn channel(&self, channel: &ChannelName) -> Bytes {
        Bytes::from(format!("{}{channel}", self.channel_prefix()))
    }

    /// A node's probe channel (see `probe`).
    pub fn probe(&self, node_id: &str) -> Bytes {
        Bytes::from(format!("{}probe:{node_id}", self.prefix))
    }

    /// The keys of one channel's history: the stream, its latest offset, its epoch.
    pub fn history(&self, channel: &ChannelName) -> [String; 3] {
        let prefix = &self.prefix;
        [
            format!("{prefix}hist:{channel}"),
            format!("{prefix}off:{channel}"),
            format!("{prefix}epoch:{channel}"),
        ]
    }

    pub fn dedup(&self, channel: &ChannelName, id: &str) -> String {
        format!("{}dedup:{channel}:{id}", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    pub fn node_stats(&self) -> String {
        format!("{}nodestats", self.prefix)
    }

    /// What every presence hash starts with.
    pub fn presence_prefix(&self) -> String {
        format!("{}presence:", self.prefix)
    }

    pub fn presence(&self, channel: &ChannelName) -> String {
        format!("{}{channel}", self.presence_prefix())
    }

    pub fn read_cursors(&self, user: &str) -> String {
        format!("{}read:{user}", self.prefix)
    }

    pub fn streams(&self) -> StreamKeys {
        StreamKeys {
            stream: format!("{}publish", self.prefix),
            dead: format!("{}publish:dead", self.prefix),
            lease: format!("{}publish:reader", self.prefix),
        }
    }
}
