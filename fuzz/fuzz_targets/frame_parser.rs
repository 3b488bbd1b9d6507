//! Fuzzes the client frame parser: any input must parse or produce an
//! `error` frame, never panic. Run with `cargo +nightly fuzz run frame_parser`
//! from this directory (cargo-fuzz needs a nightly toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(error) = herald_core::frame::parse_client_frame(text)
    {
        let _ = error.to_frame();
    }
});
