//! Integration tests: real nodes on port 0, real WebSocket and HTTP clients.
//! One test binary (modules below) so the crate is linked once.

mod harness;

mod auth;
mod bounds;
mod cluster;
mod framing;
mod guest;
mod history;
mod http_api;
mod layering;
mod lifecycle;
mod limits;
mod messaging;
mod presence;
mod protocol_fuzz;
mod publish_outcome;
mod read_paths;
mod redis;
mod redis_link;
mod soak;
mod streams;
