#![no_main]
//! `cargo fuzz run token`: see `clio_relay_fuzz::token` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::token(data));
