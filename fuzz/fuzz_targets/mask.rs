#![no_main]
//! `cargo fuzz run mask`: see `clio_relay_fuzz::mask` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| clio_relay_fuzz::mask(data));
