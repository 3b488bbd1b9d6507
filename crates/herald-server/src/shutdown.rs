//! One shutdown path for the whole process.
//!
//! [`Shutdown`] holds the cancellation token every long-lived task selects on
//! and the tracker every task (WebSocket connections included: axum does not
//! track upgraded connections) is spawned on, so that the server can wait
//! for all of them with a deadline.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the node starts draining: stop accepting, mark
    /// not-ready, close connections over the drain window.
    pub draining: CancellationToken,
    pub tracker: TaskTracker,
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
