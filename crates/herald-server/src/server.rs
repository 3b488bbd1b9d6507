//! Assembles a node (config → hub → router) and runs its accept loop.
//!
//! The accept loop is our own rather than `axum::serve`, for three reasons:
//! the handshake timeout (`header_read_timeout`), `TCP_NODELAY`, and tracking
//! every connection task on the shutdown tracker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api;
use crate::auth::JwtVerifier;
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::redis::keys::Keys;
use crate::config::Config;
use crate::demo;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::redis::link::RedisLink;
use crate::shutdown::Shutdown;
use crate::transport::{guest, ws};

/// A started node.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub hub: Hub,
    accept_loop: tokio::task::JoinHandle<()>,
}

/// Binds `config.listen` and starts serving. `config` must be complete
/// (secrets filled in; see [`Config::fill_ephemeral_secrets`]).
pub async fn start(config: Config) -> std::io::Result<RunningServer> {
    let listener = listen(config.listen)?;
    let local_addr = listener.local_addr()?;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let lanes = tokio::runtime::Handle::current().metrics().num_workers();
    let fanout = Arc::new(Fanout::new(metrics.clone(), lanes));
    let shutdown = Shutdown::default();
    fanout.start(&shutdown.stopped, &shutdown.services);
    let node_id = crate::util::random_token(6);
    let mut stream_consumer = None;
    let mut redis_broker = None;
    let broker: Arc<dyn Broker> = match &config.redis {
        None => {
            let broker = Arc::new(MemoryBroker::new(fanout.clone(), config.policies.clone()));
            let sweep = broker.clone().sweep_loop(metrics.clone(), shutdown.stopped.clone());
            shutdown.services.spawn(sweep);
            broker
        }
        Some(redis) => {
            let (stopped, services) = (shutdown.stopped.clone(), &shutdown.services);
            if let Some(streams) = &redis.streams {
                // Stopped by the consumer itself, once it has given its lease up.
                let link_stop = tokio_util::sync::CancellationToken::new();
                let link = RedisLink::start(
                    "streams",
                    redis.address.clone(),
                    metrics.clone(),
                    link_stop.clone(),
                    services,
                );
                stream_consumer = Some((link, link_stop, Keys::new(&redis.prefix).streams(), streams.clone()));
            }
            let broker = RedisBroker::start(
                redis.clone(),
                config.policies.clone(),
                node_id.clone(),
                fanout.clone(),
                metrics.clone(),
                stopped,
                services,
            );
            let broker = Arc::new(broker);
            redis_broker = Some(broker.clone());
            broker
        }
    };
    let verifier = Arc::new(JwtVerifier::new(&config.jwt));
    let hub = Hub::new(config.clone(), fanout, broker, verifier, metrics, shutdown, node_id);
    if let Some(broker) = redis_broker {
        use crate::cluster::{heartbeat_loop, sweep_loop};
        let (found_dead, deaths) = tokio::sync::mpsc::channel(1);
        let services = &hub.shutdown.services;
        services.spawn(heartbeat_loop(hub.clone(), broker.clone(), found_dead));
        services.spawn(sweep_loop(hub.clone(), broker, deaths));
    }
    if let Some((link, link_stop, keys, streams)) = stream_consumer {
        let consumer = crate::cluster::streams::run(hub.clone(), link, keys, streams);
        hub.shutdown.services.spawn(async move {
            consumer.await;
            link_stop.cancel();
        });
    }
    let router = router(hub.clone());
    let accept_loop = tokio::spawn(accept_loop(listener, router, hub.clone()));
    Ok(RunningServer {
        local_addr,
        hub,
        accept_loop,
    })
}

impl RunningServer {
    /// Drains and stops: stop accepting, mark not-ready, close connections
    /// spread over the drain window, wait for every task up to
    /// `shutdown.timeout`. Returns false if the deadline cut tasks off.
    pub async fn stop(self) -> bool {
        let shutdown = self.hub.shutdown.clone();
        let deadline = tokio::time::Instant::now() + self.hub.config.shutdown.timeout;
        shutdown.begin();
        let _ = self.accept_loop.await;
        shutdown.tracker.close();
        let connections_done = tokio::time::timeout_at(deadline, shutdown.tracker.wait()).await.is_ok();
        shutdown.stopped.cancel();
        shutdown.services.close();
        // Services stop promptly once told; allow them a moment past the deadline.
        let services_done = tokio::time::timeout_at(deadline + Duration::from_secs(1), shutdown.services.wait())
            .await
            .is_ok();
        connections_done && services_done
    }
}

/// Pending connections the kernel may queue before `accept` (it caps this
/// at `net.core.somaxconn`). The common default of 128 overflows in a
/// reconnect storm: SYNs are dropped and clients retry a second later.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

pub fn router(hub: Hub) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::handler))
        .route("/api/v1/publish", post(api::publish))
        .route("/api/v1/messages", post(api::direct_message))
        .route("/api/v1/groups/{group_id}/messages", post(api::group_message))
        .route("/api/v1/users/{user_id}/subscriptions", post(api::subscribe_user))
        .route("/api/v1/channels/{channel}/history", get(api::channel_history))
        .route("/api/v1/inbox", get(api::inbox))
        .route("/api/v1/unread", get(api::unread))
        .route("/api/v1/channels/{channel}/presence", get(api::channel_presence))
        .route("/api/v1/presence/users", get(api::users_online))
        .route(
            "/api/v1/users/{user_id}/subscriptions/{channel}",
            axum::routing::delete(api::unsubscribe_user),
        )
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/stats", get(api::stats))
        .route("/metrics", get(api::metrics));
    match &hub.config.guest {
        Some(config) => {
            let guests = axum::Extension(Arc::new(guest::Guests::new(config)));
            router = router
                .route(&config.path, get(guest::lobby).layer(guests.clone()))
                .route(&format!("{}/{{room}}", config.path), get(guest::room).layer(guests));
        }
        None => {
            let path = crate::config::DEFAULT_GUEST_PATH;
            router = router
                .route(path, get(guest::disabled))
                .route(&format!("{path}/{{room}}"), get(guest::disabled));
        }
    }
    if hub.config.demo_page {
        router = router.route("/", get(demo::page));
    }
    if hub.config.ephemeral_secrets {
        router = router.route("/demo/token", get(demo::token));
    }
    router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(hub)
}

async fn accept_loop(listener: TcpListener, router: Router, hub: Hub) {
    let shutdown = hub.shutdown.clone();
    let handshake_timeout = hub.limits().handshake_timeout;
    let send_buffer = hub.limits().send_buffer;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Some(size) = send_buffer {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(size);
        }
        let router = router.clone();
        let draining = shutdown.draining.clone();
        shutdown.tracker.spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.oneshot(request).await.unwrap_or_else(|never| match never {})) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = draining.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}
