#![no_main]
//! `cargo fuzz run first_message`: see `clio_relay_fuzz::first_message` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::first_message(data));
