#![no_main]
//! `cargo fuzz run frame_header`: see `clio_relay_fuzz::frame_header` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::frame_header(data));
