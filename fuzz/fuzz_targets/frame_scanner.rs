#![no_main]
//! `cargo fuzz run frame_scanner`: see `clio_relay_fuzz::frame_scanner` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::frame_scanner(data));
