//! Transports: how clients reach the session and the hub. `ws` serves
//! `/ws`; `guest` the guest chat (GoChat's dialect, over `ws`'s upgrade,
//! reader and close); `origin` checks the `Origin` header. Close codes are the
//! session's (`session::close`).

pub mod guest;
pub mod origin;
pub mod ws;
