//! The node's heartbeat and the presence sweep (see `cluster`).

use std::sync::Arc;

use crate::broker::redis::RedisBroker;
use crate::broker::redis::presence::HEARTBEAT;
use crate::hub::{ClusterStats, Hub};

/// Records this node's heartbeat every [`HEARTBEAT`], keeping the cluster
/// totals of `/stats` fresh. It does nothing else, so that no amount of
/// sweeping can delay it past `node_timeout` (other nodes would declare this
/// one dead). A node it finds dead is handed to [`sweep_loop`].
pub async fn heartbeat_loop(hub: Hub, broker: Arc<RedisBroker>, found_dead: tokio::sync::mpsc::Sender<()>) {
    use std::sync::atomic::Ordering::Relaxed;
    let stopped = hub.shutdown.stopped.clone();
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = serde_json::json!({
            "connections": hub.metrics.connections_current.load(Relaxed),
            "users_online": hub.users_online(),
        });
        if let Ok((nodes, dead)) = broker.heartbeat(&stats).await {
            let total = |key: &str| nodes.iter().filter_map(|n| n[key].as_i64()).sum();
            let cluster = ClusterStats {
                nodes: nodes.len(),
                connections: total("connections"),
                users_online: total("users_online"),
            };
            hub.set_cluster_stats(cluster);
            if !dead.is_empty() {
                tracing::info!(nodes = ?dead, "nodes stopped heartbeating; sweeping their presence");
                // A full channel means a sweep is already due.
                let _ = found_dead.try_send(());
            }
        }
    }
}

/// Removes dead nodes' presence entries and announces their users' `leave`.
///
/// Every [`HEARTBEAT`] it sweeps the join/leave channels this node serves
/// (cheap, and it covers a sweeper that died mid-sweep). When the heartbeat
/// found a node dead, it walks every presence hash in Redis (`SCAN`), so that
/// a dead node leaves no entry behind, in channels without join/leave events
/// or without subscribers on this node too: what a dead node left is
/// bounded by this walk, not by who happens to look.
pub async fn sweep_loop(hub: Hub, broker: Arc<RedisBroker>, mut found_dead: tokio::sync::mpsc::Receiver<()>) {
    let stopped = hub.shutdown.stopped.clone();
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        let channels = tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => hub
                .local_channels()
                .into_iter()
                .filter(|channel| hub.policies().policy(channel).is_ok_and(|p| p.join_leave))
                .collect(),
            Some(()) = found_dead.recv() => match broker.presence_channels().await {
                Ok(channels) => channels,
                Err(error) => {
                    tracing::warn!(%error, "presence sweep could not list channels; the next death retries");
                    continue;
                }
            },
        };
        for channel in channels {
            if stopped.is_cancelled() {
                return;
            }
            if let Ok((_, gone)) = broker.presence_sweep(&channel, true).await {
                for user in gone {
                    hub.announce(&channel, &user, false).await;
                }
            }
        }
    }
}
