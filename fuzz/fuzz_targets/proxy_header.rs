#![no_main]
//! `cargo fuzz run proxy_header`: see `clio_relay_fuzz::proxy_header` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::proxy_header(data));
