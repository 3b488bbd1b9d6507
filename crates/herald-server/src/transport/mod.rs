//! Transports: how clients reach the hub. `ws` serves `/ws`; `close` is the
//! one table of WebSocket close codes; `origin` checks the `Origin` header.

pub mod close;
pub mod origin;
pub mod ws;
