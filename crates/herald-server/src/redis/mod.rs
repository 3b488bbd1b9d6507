//! The Redis client: what any Redis user needs and nothing of Herald's
//! keys or formats. [`link::RedisLink`] is a pipelined request/reply
//! connection that reconnects and health-checks itself; [`pubsub::PubSub`]
//! keeps a connection subscribed to exactly a desired set of channels and
//! patterns. The Redis broker and the cluster services are built on it.

pub mod link;
pub mod pubsub;
