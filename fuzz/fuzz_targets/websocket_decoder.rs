//! Fuzzes the WebSocket decoder: any bytes, split anywhere, must decode or
//! fail without a panic, and no message may exceed the decoder's limit. Run
//! with `cargo +nightly fuzz run websocket_decoder` from this directory.
#![no_main]

use bytes::BytesMut;
use herald_core::websocket::{Decoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let cut = usize::from(cut).min(stream.len());
    let mut decoder = Decoder::new(256);
    let mut buffer = BytesMut::from(&stream[..cut]);
    for rest in [&stream[cut..], &[][..]] {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(Message::Text(text))) => assert!(text.len() <= 256),
                Ok(Some(Message::Binary(bytes))) => assert!(bytes.len() <= 256),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        buffer.extend_from_slice(rest);
    }
});
