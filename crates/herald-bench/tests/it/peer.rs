//! A tiny in-process pub/sub peer with nchan's interface, to drive the
//! bench's peer target end to end: WebSocket subscribers at
//! `/sub/{channel}` on one port, `POST /pub/{channel}` with the raw payload
//! on another; every publish goes to the channel's subscribers as one text
//! frame holding the body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

type Subscribers = Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>>;

pub struct MiniPeer {
    pub sub_address: SocketAddr,
    pub pub_address: SocketAddr,
}

impl MiniPeer {
    pub async fn start() -> MiniPeer {
        let subscribers = Subscribers::default();
        let sub_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pub_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = MiniPeer {
            sub_address: sub_listener.local_addr().expect("address"),
            pub_address: pub_listener.local_addr().expect("address"),
        };
        tokio::spawn(accept_subscribers(sub_listener, subscribers.clone()));
        tokio::spawn(accept_publishers(pub_listener, subscribers));
        peer
    }

    pub fn sub_url(&self) -> String {
        format!("ws://{}/sub/{{channel}}", self.sub_address)
    }

    pub fn pub_url(&self) -> String {
        format!("http://{}/pub/{{channel}}", self.pub_address)
    }
}

async fn accept_subscribers(listener: TcpListener, subscribers: Subscribers) {
    while let Ok((stream, _)) = listener.accept().await {
        let subscribers = subscribers.clone();
        tokio::spawn(async move {
            let (sender, mut deliveries) = mpsc::unbounded_channel();
            // Registered during the handshake, so a subscriber whose upgrade
            // completed cannot miss a publish.
            // The callback's signature is tungstenite's to choose.
            #[allow(clippy::result_large_err)]
            let register = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
                let channel = request.uri().path().trim_start_matches("/sub/").to_owned();
                subscribers
                    .lock()
                    .expect("not poisoned")
                    .entry(channel)
                    .or_default()
                    .push(sender);
                Ok(response)
            };
            let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, register).await else {
                return;
            };
            loop {
                tokio::select! {
                    delivery = deliveries.recv() => match delivery {
                        Some(text) => if socket.send(Message::text(text)).await.is_err() { return },
                        None => return,
                    },
                    incoming = socket.next() => match incoming {
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
        });
    }
}

async fn accept_publishers(listener: TcpListener, subscribers: Subscribers) {
    while let Ok((stream, _)) = listener.accept().await {
        let subscribers = subscribers.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let subscribers = subscribers.clone();
            async move {
                let channel = request.uri().path().trim_start_matches("/pub/").to_owned();
                let body = match request.into_body().collect().await {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    Err(_) => String::new(),
                };
                let subscribers = subscribers.lock().expect("not poisoned");
                for subscriber in subscribers.get(&channel).into_iter().flatten() {
                    let _ = subscriber.send(body.clone());
                }
                let mut response = hyper::Response::new(Full::new(Bytes::new()));
                *response.status_mut() = hyper::StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}
