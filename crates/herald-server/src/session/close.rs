//! Every WebSocket close code the server sends, in one place. The numbers
//! and their meaning are part of the protocol (`docs/protocol.md` §8):
//! 4001 and 4003 tell clients not to reconnect with the same token; 1001
//! and 4008 invite a reconnect (after a pause); the others say what the
//! client did wrong and leave reconnecting to it.

/// The answer to the client's own close frame.
pub const NORMAL: u16 = 1000;
/// The server is shutting down or draining; reconnect (to another node) after a short, jittered pause.
pub const GOING_AWAY: u16 = 1001;
/// The client broke the WebSocket framing rules (e.g. an unmasked frame).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A frame or message exceeded `limits.max_message_size`.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The token was refused; do not retry with the same token.
pub const AUTH_FAILED: u16 = 4001;
/// No `auth` frame arrived within `limits.auth_timeout`.
pub const AUTH_TIMEOUT: u16 = 4002;
/// The token expired and no `refresh` brought a newer one; reconnect with a new token.
pub const TOKEN_EXPIRED: u16 = 4003;
/// The client did not read fast enough and its outgoing queue filled up.
pub const SLOW_CLIENT: u16 = 4008;
/// The user already has `limits.max_connections_per_user` connections.
pub const TOO_MANY_CONNECTIONS: u16 = 4009;
/// The client kept sending commands past the rate limit.
pub const RATE_LIMITED: u16 = 4029;

/// Why a connection ended: what the client is told and what is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client vanished; nothing to send.
    ClientGone,
    /// The client sent a close frame; it is answered in kind.
    ClientClosed,
    /// The client broke the framing rules.
    ProtocolError,
    AuthFailed,
    AuthTimeout,
    TokenExpired,
    SlowClient,
    PongTimeout,
    RateLimited,
    TooLarge,
    InvalidUtf8,
    TooManyConnections,
    Shutdown,
}

impl Ending {
    /// The close frame to send, if any.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        Some(match self {
            Ending::ClientGone | Ending::PongTimeout => return None,
            Ending::ClientClosed => (NORMAL, ""),
            Ending::ProtocolError => (PROTOCOL_ERROR, "protocol error"),
            Ending::AuthFailed => (AUTH_FAILED, "authentication failed"),
            Ending::AuthTimeout => (AUTH_TIMEOUT, "authentication timed out"),
            Ending::TokenExpired => (TOKEN_EXPIRED, "token expired"),
            Ending::SlowClient => (SLOW_CLIENT, "client too slow"),
            Ending::RateLimited => (RATE_LIMITED, "rate limit exceeded"),
            Ending::TooLarge => (MESSAGE_TOO_BIG, "message too big"),
            Ending::InvalidUtf8 => (INVALID_PAYLOAD, "text frame is not valid UTF-8"),
            Ending::TooManyConnections => (TOO_MANY_CONNECTIONS, "too many connections for this user"),
            Ending::Shutdown => (GOING_AWAY, "server shutting down, reconnect"),
        })
    }

    /// The `reason` label of `herald_messages_dropped_total` for the
    /// messages discarded with a connection that ended this way.
    pub fn drop_label(self) -> &'static str {
        match self {
            Ending::SlowClient => "slow_client",
            _ => "disconnected",
        }
    }

    /// The `reason` label of `herald_disconnects_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Ending::ClientGone | Ending::ClientClosed => "client",
            Ending::ProtocolError => "protocol_error",
            Ending::AuthFailed => "auth_failed",
            Ending::TooManyConnections => "max_per_user",
            Ending::AuthTimeout => "auth_timeout",
            Ending::TokenExpired => "token_expired",
            Ending::SlowClient => "slow_client",
            Ending::PongTimeout => "pong_timeout",
            Ending::RateLimited => "rate_limited",
            Ending::TooLarge => "too_large",
            Ending::InvalidUtf8 => "invalid_utf8",
            Ending::Shutdown => "shutdown",
        }
    }
}
