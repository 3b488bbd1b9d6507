//! The WebSocket layer seen from the wire: a raw TCP client that writes its
//! own handshake and frames, so that it can do what library clients never do
//! (pipeline a frame behind the handshake, send unmasked or reserved-bit
//! frames, fragment a command around a ping).

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{DEADLINE, TestServer};

const OP_TEXT: u8 = 0x1;
const OP_CONTINUATION: u8 = 0x0;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A client frame: masked, FIN as given, no reserved bits.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        len if len < 126 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn handshake(server: &TestServer, query: &str) -> Vec<u8> {
    format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    )
    .into_bytes()
}

/// A WebSocket connection over a bare socket.
struct Raw {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Raw {
    /// Sends `first` (a handshake, maybe with frames behind it) and reads
    /// the HTTP response head.
    async fn open(server: &TestServer, first: &[u8]) -> (Raw, String) {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(first).await.unwrap();
        let mut raw = Raw {
            stream,
            buffer: Vec::new(),
        };
        let head = loop {
            if let Some(end) = raw.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(raw.buffer[..end].to_vec()).unwrap();
                raw.buffer.drain(..end + 4);
                break head;
            }
            assert!(raw.fill().await > 0, "the server closed before answering");
        };
        (raw, head)
    }

    /// Opens an upgraded connection authenticated by query token.
    async fn authenticated(server: &TestServer) -> Raw {
        let query = format!("?token={}", server.token("alice"));
        let (mut raw, head) = Raw::open(server, &handshake(server, &query)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(raw.json().await["type"], "auth_success");
        raw
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
            .await
            .expect("the server answers within the deadline")
            .unwrap();
        self.buffer.extend_from_slice(&chunk[..read]);
        read
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next server frame: opcode and payload. Server frames are
    /// unmasked, final and free of reserved bits.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buffer.len() >= 2 {
                let (first, second) = (self.buffer[0], self.buffer[1]);
                assert_eq!(first & 0xF0, 0x80, "FIN set, no reserved bits");
                assert_eq!(second & 0x80, 0, "server frames are not masked");
                let (start, len) = match second & 0x7F {
                    126 if self.buffer.len() >= 4 => (4, u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize),
                    126 | 127 => (usize::MAX, 0),
                    len => (2, len as usize),
                };
                if start != usize::MAX && self.buffer.len() >= start + len {
                    let payload = self.buffer[start..start + len].to_vec();
                    self.buffer.drain(..start + len);
                    return (first & 0x0F, payload);
                }
            }
            assert!(self.fill().await > 0, "the server closed the socket mid-frame");
        }
    }

    async fn json(&mut self) -> Value {
        let (opcode, payload) = self.frame().await;
        assert_eq!(opcode, OP_TEXT, "a text frame");
        serde_json::from_slice(&payload).unwrap()
    }

    /// Expects a close frame and returns its code.
    async fn close_code(&mut self) -> u16 {
        let (opcode, payload) = self.frame().await;
        assert_eq!(opcode, OP_CLOSE, "a close frame, got {payload:?}");
        u16::from_be_bytes([payload[0], payload[1]])
    }

    /// Expects the server to close the TCP connection.
    async fn expect_eof(&mut self) {
        assert_eq!(self.fill().await, 0, "nothing after the close frame");
    }
}

#[tokio::test]
async fn requests_that_are_not_upgrades_get_a_json_error() {
    let server = TestServer::start().await;
    let (status, body) = server.http("GET", "/ws", None, None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "not_websocket"
    );
    let (status, _) = server.http("POST", "/ws", None, Some(String::new())).await;
    assert_eq!(status, 405);
    let old = String::from_utf8(handshake(&server, ""))
        .unwrap()
        .replace("Version: 13", "Version: 8");
    let (mut raw, head) = Raw::open(&server, old.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    while !raw.buffer.ends_with(b"}}") {
        assert!(raw.fill().await > 0, "the body arrives");
    }
    let body: Value = serde_json::from_slice(&raw.buffer).unwrap();
    assert_eq!(body["error"]["code"], "not_websocket");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Sec-WebSocket-Version")
    );
}

#[tokio::test]
async fn the_handshake_answers_with_the_rfc_accept_key() {
    let server = TestServer::start().await;
    let (_raw, head) = Raw::open(&server, &handshake(&server, "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The example key and answer of RFC 6455 §1.3.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
}

#[tokio::test]
async fn a_frame_sent_right_behind_the_handshake_is_read() {
    let server = TestServer::start().await;
    let mut first = handshake(&server, "");
    let auth = json!({"type": "auth", "data": {"token": server.token("alice")}}).to_string();
    first.extend(client_frame(true, OP_TEXT, auth.as_bytes()));
    let (mut raw, head) = Raw::open(&server, &first).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let success = raw.json().await;
    assert_eq!(success["type"], "auth_success", "{success}");
    assert_eq!(success["data"]["user_id"], "alice");
}

#[tokio::test]
async fn fragments_and_pings_in_between_are_served() {
    let server = TestServer::start().await;
    let mut raw = Raw::authenticated(&server).await;
    let command = br#"{"type":"ping","message_id":"m1"}"#;
    let mut bytes = client_frame(false, OP_TEXT, &command[..10]);
    bytes.extend(client_frame(true, OP_PING, b"are you there"));
    bytes.extend(client_frame(false, OP_CONTINUATION, &command[10..20]));
    bytes.extend(client_frame(true, OP_CONTINUATION, &command[20..]));
    raw.send(&bytes).await;
    assert_eq!(raw.frame().await, (OP_PONG, b"are you there".to_vec()));
    let pong = raw.json().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["message_id"], "m1");
}

#[tokio::test]
async fn a_client_close_is_answered_and_the_socket_closed() {
    let server = TestServer::start().await;
    let mut raw = Raw::authenticated(&server).await;
    raw.send(&client_frame(true, OP_CLOSE, &1000u16.to_be_bytes())).await;
    assert_eq!(raw.close_code().await, 1000);
    raw.expect_eof().await;
}

#[tokio::test]
async fn broken_framing_closes_with_1002() {
    let server = TestServer::start().await;
    let unmasked = {
        let mut frame = client_frame(true, OP_TEXT, b"{}");
        frame[1] &= 0x7F;
        frame.drain(2..6);
        frame
    };
    let reserved = {
        let mut frame = client_frame(true, OP_TEXT, b"{}");
        frame[0] |= 0x40;
        frame
    };
    let fragmented_ping = client_frame(false, OP_PING, b"");
    for bad in [unmasked, reserved, fragmented_ping] {
        let mut raw = Raw::authenticated(&server).await;
        raw.send(&bad).await;
        assert_eq!(raw.close_code().await, 1002, "for {bad:?}");
        raw.expect_eof().await;
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_disconnects_total{reason=\"protocol_error\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_from_its_header() {
    let server = TestServer::start_with("[limits]\nmax_message_size = 1000").await;
    let mut raw = Raw::authenticated(&server).await;
    // Only the header of a 60,000-byte frame: the server need not wait for it.
    let header = [0x81, 0x80 | 126, 0xEA, 0x60, 1, 2, 3, 4];
    raw.send(&header).await;
    assert_eq!(raw.close_code().await, 1009);
    raw.expect_eof().await;
}

#[tokio::test]
async fn a_ping_flood_meets_the_rate_limit() {
    let server = TestServer::start_with("[limits]\ncommands_per_second = 1\ncommand_burst = 3").await;
    let mut raw = Raw::authenticated(&server).await;
    let pings: Vec<u8> = (0..20).flat_map(|_| client_frame(true, OP_PING, b"p")).collect();
    raw.send(&pings).await;
    let mut pongs = 0;
    loop {
        match raw.frame().await {
            (OP_PONG, _) => pongs += 1,
            (OP_CLOSE, payload) => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4029);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs <= 3, "{pongs} pings answered past the burst");
}
