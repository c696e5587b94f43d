//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//! - [`devices`]: per-device limits (concurrency, rate, daily audio) and revocation.
//! - [`frame`]: WebSocket frame headers, parsed and written in place.
//! - [`health`]: active health checks of each key against upstream's REST API.
//! - [`http`]: the HTTP/1.1 edge: request heads, upgrades, JSON errors.
//! - [`io`]: connections, the shared duplex wrapper, pooled read buffers.
//! - [`keyring`]: per-shard account slots; which account serves a new stream.
//! - [`keys_cli`]: `clio-relay keys`: the admin account API from the command line.
//! - [`keystore`]: the encrypted, crash-safe store of accounts and keys added
//!   at runtime, and how it merges with the config file's accounts.
//! - [`mask`]: in-place re-masking and fresh mask keys.
//! - [`metrics`]: per-shard counters and latency histograms, merged and
//!   rendered as Prometheus text only when scraped.
//! - [`pump`]: the frame path: in-place scanning, re-masking and forwarding.
//! - [`control`]: the control plane's authoritative account set; changes become ring versions.
//! - [`secret`]: secret values that only ever print as fingerprints.
//! - [`systemd`]: sd_notify (ready, status, watchdog, reload, stop) and
//!   socket activation (`LISTEN_FDS`), written by hand.
//! - [`upstream`]: TCP, TLS and the WebSocket client upgrade to Soniox.
//! - [`usage`]: the usage ledger: per day, by account and device; persisted.
//! - [`fake_soniox`]: a local stand-in for Soniox's real-time WebSocket API (tests, load).
//! - [`relay_load`]: the `relay-load` load generator (client side of the protocol).

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod frame;
pub mod health;
pub mod http;
pub mod io;
pub mod keyring;
pub mod keys_cli;
pub mod keystore;
pub mod mask;
pub mod metrics;
pub mod pump;
pub mod secret;
pub mod upstream;
pub mod usage;

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod devices;
#[path = "../tools/fake_soniox/mod.rs"]
pub mod fake_soniox;
#[path = "../tools/relay_load/mod.rs"]
pub mod relay_load;
pub mod server;
pub mod session;
pub mod shard;
pub mod systemd;
pub mod tls;
pub mod token;
