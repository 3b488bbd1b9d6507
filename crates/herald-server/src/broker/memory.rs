//! The in-process broker of the embedded default: a publish is delivered to
//! this node's subscribers before `publish` returns. Nothing leaves the process.

use std::sync::Arc;
use std::time::Instant;

use herald_core::{ChannelName, Publication};

use super::{BoxFuture, Broker, BrokerError, Placement};
use crate::fanout::Fanout;

pub struct MemoryBroker {
    fanout: Arc<Fanout>,
}

impl MemoryBroker {
    pub fn new(fanout: Arc<Fanout>) -> Self {
        MemoryBroker { fanout }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Placement, BrokerError>> {
        let accepted_at = Instant::now();
        self.fanout.deliver(&publication, accepted_at);
        Box::pin(std::future::ready(Ok(Placement {
            offset: publication.offset,
            epoch: publication.epoch,
        })))
    }

    fn channel_added(&self, _channel: &ChannelName) {}

    fn channel_removed(&self, _channel: &ChannelName) {}

    fn is_ready(&self) -> bool {
        true
    }
}
