//! One shutdown path for the whole process.
//!
//! [`Shutdown`] holds the cancellation tokens every long-lived task selects
//! on and the trackers they are spawned on, so that the server can wait for
//! all of them with a deadline. It runs in two phases: `draining` closes the
//! connections (tracked by `tracker`: axum does not track upgraded
//! connections); then `stopped` ends the background services (tracked by
//! `services`), which the connections may need until they are gone.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the node starts draining: stop accepting, mark
    /// not-ready, close connections over the drain window.
    pub draining: CancellationToken,
    /// Connection tasks (HTTP and WebSocket).
    pub tracker: TaskTracker,
    /// Cancelled once the connections are done: background services stop.
    pub stopped: CancellationToken,
    /// Background service tasks (broker links, stream consumer).
    pub services: TaskTracker,
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn begin(&self) {
        self.draining.cancel();
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
