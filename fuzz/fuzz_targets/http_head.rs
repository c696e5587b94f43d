#![no_main]
//! `cargo fuzz run http_head`: see `clio_relay_fuzz::http_head` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::http_head(data));
