//! Transports: how clients reach the session and the hub. `ws` serves
//! `/ws`; `origin` checks the `Origin` header. Close codes are the
//! session's (`session::close`).

pub mod origin;
pub mod ws;
