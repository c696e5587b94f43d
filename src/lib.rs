//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//! - [`secret`]: secret values that only ever print as fingerprints.
//! - [`fake_soniox`]: a local stand-in for Soniox's real-time WebSocket API (tests, load).

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod secret;

#[path = "../tools/fake_soniox/mod.rs"]
pub mod fake_soniox;
