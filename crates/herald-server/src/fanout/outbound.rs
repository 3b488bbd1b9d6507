//! What fan-out hands to connections: a publication encoded once as a
//! WebSocket frame (`Delivery`), and the entries a connection's queue holds
//! (`Outbound`: a shared frame, or a subscription change from the server
//! API). Plain data, shared by the lanes, the connection's queue and its task.

use std::sync::Arc;

use bytes::Bytes;
use herald_core::publication::EncodedFrame;
use herald_core::{ChannelName, Publication, websocket};

/// A publication's WebSocket frame, ready for any number of sockets.
pub fn wire_frame(frame: EncodedFrame) -> Bytes {
    match frame {
        EncodedFrame::Text(text) => websocket::encode(websocket::OP_TEXT, text.as_bytes()),
        EncodedFrame::Binary(bytes) => websocket::encode(websocket::OP_BINARY, &bytes),
    }
}

/// A publication as every subscriber of a node receives it: encoded once,
/// with what a connection needs to keep its place in the channel.
#[derive(Debug)]
pub struct Delivery {
    /// The complete WebSocket frame.
    pub frame: Bytes,
    pub channel: ChannelName,
    pub offset: Option<u64>,
    pub epoch: Option<String>,
}

impl Delivery {
    pub fn new(publication: &Publication) -> Self {
        Delivery {
            frame: wire_frame(publication.encode()),
            channel: publication.channel.clone(),
            offset: publication.offset,
            epoch: publication.epoch.clone(),
        }
    }
}

/// An entry for a connection. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Delivery(Arc<Delivery>),
    /// The server API subscribes this connection to a channel.
    Subscribe(ChannelName),
    /// The server API unsubscribes this connection from a channel.
    Unsubscribe(ChannelName),
}

/// What a control entry counts for in the queue's byte bound.
const CONTROL_SIZE: usize = 64;

impl Outbound {
    pub fn len(&self) -> usize {
        match self {
            Outbound::Delivery(delivery) => delivery.frame.len(),
            Outbound::Subscribe(_) | Outbound::Unsubscribe(_) => CONTROL_SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame of a delivery.
    pub(super) fn frame(&self) -> Option<&Bytes> {
        match self {
            Outbound::Delivery(delivery) => Some(&delivery.frame),
            _ => None,
        }
    }
}
