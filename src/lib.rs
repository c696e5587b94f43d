//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//! - [`frame`]: WebSocket frame headers, parsed and written in place.
//! - [`http`]: the HTTP/1.1 edge: request heads, upgrades, JSON errors.
//! - [`io`]: connections, the shared duplex wrapper, pooled read buffers.
//! - [`keyring`]: per-shard account slots; which account serves a new stream.
//! - [`keystore`]: the encrypted, crash-safe store of accounts and keys added
//!   at runtime, and how it merges with the config file's accounts.
//! - [`mask`]: in-place re-masking and fresh mask keys.
//! - [`metrics`]: per-shard counters and latency histograms, merged and
//!   rendered as Prometheus text only when scraped.
//! - [`pump`]: the frame path: in-place scanning, re-masking and forwarding.
//! - [`secret`]: secret values that only ever print as fingerprints.
//! - [`upstream`]: TCP, TLS and the WebSocket client upgrade to Soniox.
//! - [`fake_soniox`]: a local stand-in for Soniox's real-time WebSocket API (tests, load).

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod frame;
pub mod http;
pub mod io;
pub mod keyring;
pub mod keystore;
pub mod mask;
pub mod metrics;
pub mod pump;
pub mod secret;
pub mod upstream;

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
#[path = "../tools/fake_soniox/mod.rs"]
pub mod fake_soniox;
pub mod server;
pub mod session;
pub mod shard;
pub mod token;
