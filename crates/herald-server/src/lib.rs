//! The Herald server: configuration, authentication, the session (what a
//! connection's commands mean), the WebSocket transport, brokers, the HTTP
//! API, metrics and shutdown. The `herald` binary (`main.rs`) is a thin
//! command-line front end over this library; integration tests start nodes
//! through [`server::start`].

pub mod api;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod fanout;
pub mod http_client;
pub mod http_error;
pub mod hub;
pub mod metrics;
pub mod redis;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod transport;
pub mod util;
