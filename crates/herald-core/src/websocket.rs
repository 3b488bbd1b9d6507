//! WebSocket framing (RFC 6455), the server's side, without I/O.
//!
//! The server writes unmasked frames, so one encoded frame (header and
//! payload) is the same bytes for every subscriber: fan-out encodes a
//! publication once and hands every socket the same buffer. Clients must
//! mask; [`Decoder`] unmasks, reassembles fragmented messages, checks
//! UTF-8 and enforces the message size limit before buffering a payload.
//! No extension is negotiated, so the reserved bits must be clear.

use bytes::{Buf, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Encodes one complete, unmasked frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    let len = payload.len();
    frame.push(0x80 | opcode);
    if len < 126 {
        frame.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        frame.push(126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame.into()
}

/// A text frame.
pub fn text(text: &str) -> Bytes {
    encode(OP_TEXT, text.as_bytes())
}

/// A close frame with a status code and a reason (cut to fit a control frame).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame and its status code, if it gave one.
    Close(Option<u16>),
}

/// Why the client's byte stream cannot be read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message larger than the limit")]
    TooLarge,
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
}

/// Reads client frames from a byte buffer, one complete message at a time.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// A fragmented message in progress: whether it is text, and its bytes.
    partial: Option<(bool, Vec<u8>)>,
}

impl Decoder {
    /// A decoder refusing messages (and frames) over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            partial: None,
        }
    }

    /// Takes the next complete message from the front of `buffer`. `None`
    /// means more bytes are needed; whatever was consumed stays consumed.
    /// After an error the stream is unusable.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        loop {
            let Some((header_len, fin, opcode, len)) = self.header(buffer)? else {
                return Ok(None);
            };
            let total = header_len + 4 + len;
            if buffer.len() < total {
                // Room for the frame is made as it arrives, not up front.
                return Ok(None);
            }
            let mask: [u8; 4] = buffer[header_len..header_len + 4].try_into().expect("four bytes");
            buffer.advance(header_len + 4);
            let mut payload = buffer.split_to(len);
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
            if let Some(message) = self.frame(fin, opcode, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Parses and checks the header at the front of `buffer`: its length,
    /// FIN, opcode and payload length.
    fn header(&self, buffer: &BytesMut) -> Result<Option<(usize, bool, u8, usize)>, DecodeError> {
        if buffer.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buffer[0], buffer[1]);
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0F;
        if first & 0x70 != 0 {
            return Err(DecodeError::Protocol("reserved bits set without an extension"));
        }
        if second & 0x80 == 0 {
            return Err(DecodeError::Protocol("client frames must be masked"));
        }
        let control = opcode & 0x08 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(DecodeError::Protocol("unknown opcode")),
        }
        let (header_len, len) = match second & 0x7F {
            126 => match buffer.get(2..4) {
                Some(bytes) => (4, u64::from(u16::from_be_bytes([bytes[0], bytes[1]]))),
                None => return Ok(None),
            },
            127 => match buffer.get(2..10) {
                Some(bytes) => (10, u64::from_be_bytes(bytes.try_into().expect("eight bytes"))),
                None => return Ok(None),
            },
            short => (2, u64::from(short)),
        };
        if control {
            if !fin {
                return Err(DecodeError::Protocol("fragmented control frame"));
            }
            if len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(DecodeError::Protocol("control frame payload over 125 bytes"));
            }
        } else {
            let so_far = self.partial.as_ref().map_or(0, |(_, bytes)| bytes.len()) as u64;
            if len.saturating_add(so_far) > self.max_message as u64 {
                return Err(DecodeError::TooLarge);
            }
        }
        Ok(Some((header_len, fin, opcode, len as usize)))
    }

    /// Takes one unmasked frame; a message when it completes one.
    fn frame(&mut self, fin: bool, opcode: u8, payload: BytesMut) -> Result<Option<Message>, DecodeError> {
        match opcode {
            OP_PING => Ok(Some(Message::Ping(payload.freeze()))),
            OP_PONG => Ok(Some(Message::Pong)),
            OP_CLOSE => close_payload(&payload).map(|code| Some(Message::Close(code))),
            OP_CONTINUATION => {
                let Some((_, bytes)) = self.partial.as_mut() else {
                    return Err(DecodeError::Protocol("continuation without a message"));
                };
                bytes.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let (is_text, bytes) = self.partial.take().expect("checked above");
                message(is_text, bytes.into()).map(Some)
            }
            _ => {
                if self.partial.is_some() {
                    return Err(DecodeError::Protocol("a new message inside a fragmented one"));
                }
                let is_text = opcode == OP_TEXT;
                if fin {
                    return message(is_text, payload.freeze()).map(Some);
                }
                self.partial = Some((is_text, payload.to_vec()));
                Ok(None)
            }
        }
    }
}

fn message(is_text: bool, bytes: Bytes) -> Result<Message, DecodeError> {
    if !is_text {
        return Ok(Message::Binary(bytes));
    }
    match String::from_utf8(bytes.to_vec()) {
        Ok(text) => Ok(Message::Text(text)),
        Err(_) => Err(DecodeError::InvalidUtf8),
    }
}

/// The status code of a close frame; its reason must be UTF-8.
fn close_payload(payload: &[u8]) -> Result<Option<u16>, DecodeError> {
    match payload {
        [] => Ok(None),
        [_] => Err(DecodeError::Protocol("close payload of one byte")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame, masked with `mask`.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let server = encode(opcode, payload);
        let header_len = server.len() - payload.len();
        let mut frame = server[..header_len].to_vec();
        if !fin {
            frame[0] &= 0x7F;
        }
        frame[1] |= 0x80;
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
        let mut buffer = BytesMut::from(bytes);
        let mut messages = Vec::new();
        while let Some(message) = decoder.decode(&mut buffer)? {
            messages.push(message);
        }
        Ok(messages)
    }

    #[test]
    fn server_frames_use_the_shortest_length_form() {
        assert_eq!(&encode(OP_TEXT, b"hi")[..], b"\x81\x02hi");
        let medium = encode(OP_BINARY, &[7; 300]);
        assert_eq!(&medium[..4], &[0x82, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let large = encode(OP_BINARY, &vec![0; 70_000]);
        assert_eq!(&large[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn close_frames_carry_the_code_and_a_cut_reason() {
        let frame = close(4008, "client too slow");
        assert_eq!(&frame[..4], &[0x88, 17, 0x0F, 0xA8]);
        let long = close(1000, &"é".repeat(100));
        assert!(long.len() - 2 <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&long[4..]).is_ok(), "cut on a character boundary");
    }

    #[test]
    fn reads_masked_text_binary_and_control_frames() {
        let mut bytes = client_frame(true, OP_TEXT, b"{\"type\":\"ping\"}", [1, 2, 3, 4]);
        bytes.extend(client_frame(true, OP_BINARY, &[0, 255], [9, 9, 9, 9]));
        bytes.extend(client_frame(true, OP_PING, b"p", [5, 6, 7, 8]));
        bytes.extend(client_frame(true, OP_PONG, b"", [5, 6, 7, 8]));
        bytes.extend(client_frame(true, OP_CLOSE, &[0x03, 0xE8, b'o', b'k'], [1, 1, 1, 1]));
        let messages = decode_all(&mut Decoder::new(1024), &bytes).unwrap();
        assert_eq!(
            messages,
            [
                Message::Text("{\"type\":\"ping\"}".into()),
                Message::Binary(Bytes::from_static(&[0, 255])),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Pong,
                Message::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn reassembles_fragments_around_control_frames() {
        let mut bytes = client_frame(false, OP_TEXT, b"hel", [1, 2, 3, 4]);
        bytes.extend(client_frame(true, OP_PING, b"", [1, 2, 3, 4]));
        bytes.extend(client_frame(false, OP_CONTINUATION, b"lo ", [4, 3, 2, 1]));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"world", [0, 0, 0, 0]));
        let messages = decode_all(&mut Decoder::new(1024), &bytes).unwrap();
        assert_eq!(
            messages,
            [Message::Ping(Bytes::new()), Message::Text("hello world".into())]
        );
    }

    #[test]
    fn waits_for_a_whole_frame_byte_by_byte() {
        let bytes = client_frame(true, OP_TEXT, &[b'a'; 200], [1, 2, 3, 4]);
        let mut decoder = Decoder::new(1024);
        let mut buffer = BytesMut::new();
        for (i, byte) in bytes.iter().enumerate() {
            buffer.extend_from_slice(&[*byte]);
            let got = decoder.decode(&mut buffer).unwrap();
            assert_eq!(got.is_some(), i == bytes.len() - 1, "at byte {i}");
        }
        assert!(buffer.is_empty());
    }

    #[test]
    fn refuses_what_the_rfc_forbids() {
        let protocol = |bytes: Vec<u8>| {
            let result = decode_all(&mut Decoder::new(1024), &bytes);
            assert!(matches!(result, Err(DecodeError::Protocol(_))), "{bytes:?}: {result:?}");
        };
        let mut unmasked = encode(OP_TEXT, b"hi").to_vec();
        unmasked[0] |= 0x80;
        protocol(unmasked);
        let mut reserved = client_frame(true, OP_TEXT, b"hi", [1, 2, 3, 4]);
        reserved[0] |= 0x40;
        protocol(reserved);
        protocol(client_frame(true, 0x3, b"", [0; 4]));
        protocol(client_frame(false, OP_PING, b"", [0; 4]));
        protocol(client_frame(true, OP_PING, &[0; 126], [0; 4]));
        protocol(client_frame(true, OP_CONTINUATION, b"x", [0; 4]));
        let mut twice = client_frame(false, OP_TEXT, b"a", [0; 4]);
        twice.extend(client_frame(true, OP_TEXT, b"b", [0; 4]));
        protocol(twice);
        protocol(client_frame(true, OP_CLOSE, &[3], [0; 4]));
        protocol(client_frame(true, OP_CLOSE, &[0, 5], [0; 4]));
    }

    #[test]
    fn refuses_oversized_messages_before_their_payload_arrives() {
        let mut decoder = Decoder::new(100);
        let frame = client_frame(true, OP_BINARY, &[0; 101], [0; 4]);
        let mut header_only = BytesMut::from(&frame[..8]);
        assert_eq!(decoder.decode(&mut header_only), Err(DecodeError::TooLarge));
        let mut fragments = client_frame(false, OP_TEXT, &[b'a'; 60], [0; 4]);
        fragments.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 60], [0; 4]));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &fragments),
            Err(DecodeError::TooLarge)
        );
        let huge = [0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(decode_all(&mut Decoder::new(100), &huge), Err(DecodeError::TooLarge));
    }

    #[test]
    fn refuses_invalid_utf8_in_text_and_close_reasons() {
        let bad = client_frame(true, OP_TEXT, &[0xC3], [1, 2, 3, 4]);
        assert_eq!(decode_all(&mut Decoder::new(100), &bad), Err(DecodeError::InvalidUtf8));
        let mut split = client_frame(false, OP_TEXT, &[0xC3], [0; 4]);
        split.extend(client_frame(true, OP_CONTINUATION, &[0xA9], [0; 4]));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &split).unwrap(),
            [Message::Text("é".into())],
            "a character may straddle fragments"
        );
        let reason = client_frame(true, OP_CLOSE, &[0x03, 0xE8, 0xFF], [0; 4]);
        assert_eq!(
            decode_all(&mut Decoder::new(100), &reason),
            Err(DecodeError::InvalidUtf8)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_all(&mut Decoder::new(64), &bytes);
        }

        #[test]
        fn any_split_of_a_stream_decodes_alike(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..5),
            cut in any::<prop::sample::Index>(),
            mask in any::<[u8; 4]>(),
        ) {
            let stream: Vec<u8> = payloads.iter().flat_map(|p| client_frame(true, OP_BINARY, p, mask)).collect();
            let cut = cut.index(stream.len() + 1);
            let mut decoder = Decoder::new(1024);
            let mut buffer = BytesMut::from(&stream[..cut]);
            let mut messages = Vec::new();
            while let Some(message) = decoder.decode(&mut buffer).unwrap() {
                messages.push(message);
            }
            buffer.extend_from_slice(&stream[cut..]);
            while let Some(message) = decoder.decode(&mut buffer).unwrap() {
                messages.push(message);
            }
            let expected: Vec<Message> = payloads.into_iter().map(|p| Message::Binary(p.into())).collect();
            prop_assert_eq!(messages, expected);
        }
    }
}
