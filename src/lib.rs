//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//!
//! The frame path:
//! - [`frame`]: WebSocket frame headers, parsed and written in place.
//! - [`mask`]: in-place re-masking and fresh mask keys.
//! - [`pump`]: the frame path: in-place scanning, re-masking and forwarding.
//! - [`io`]: connections, the shared duplex wrapper, pooled read buffers.
//! - [`uring`]: the data plane's own io_uring per shard: every stream socket
//!   registered once (multishot poll), completions dispatched in batches.
//!
//! A stream's life:
//! - [`accept`]: accept loops that survive errors; the file limit, said plainly.
//! - [`shard`]: one executor per core: listener, live streams, control messages.
//! - [`session`]: one stream: upgrade, token, first message, account, pumps, end.
//! - [`http`]: the HTTP/1.1 edge: request heads, upgrades, JSON errors.
//! - [`upstream`]: TCP, TLS and the WebSocket client upgrade to Soniox.
//! - [`tls`]: TLS on the client port: the rustls server config from PEM files.
//! - [`keyring`]: per-shard account slots; which account serves a new stream.
//! - [`devices`]: per-device limits (concurrency, rate, daily audio) and revocation.
//! - [`token`]: session tokens (HMAC-signed, short-lived device credentials).
//! - [`unauth`]: the bounded pool of connections waiting for a first-message token.
//!
//! The control plane:
//! - [`server`]: starting, reloading, draining and stopping a relay; signals.
//! - [`admin`]: the admin port: metrics, health, the account, usage and
//!   revocation APIs, alerts, the dashboard.
//! - [`control`]: the authoritative account set; changes become ring versions.
//! - [`health`]: active health checks of each key against upstream's REST API.
//! - [`keystore`]: the encrypted, crash-safe store of accounts and keys added
//!   at runtime, and how it merges with the config file's accounts.
//! - [`usage`]: the usage ledger: per day, by account and device; persisted.
//! - [`metrics`]: per-shard counters and latency histograms, merged and
//!   rendered as Prometheus text only when scraped.
//! - [`systemd`]: sd_notify and socket activation, written by hand.
//! - [`listen`]: binding the ports; a second relay cannot join them by mistake.
//!
//! Configuration and commands:
//! - [`config`]: the TOML config file, parsed, validated, secrets resolved.
//! - [`secret`]: secret values that only ever print as fingerprints.
//! - [`cli`], [`keys_cli`]: `check-config`, `mint-token` and `keys`.
//! - [`demo`]: `clio-relay demo`.
//!
//! Tools (source under `tools/`):
//! - [`fake_soniox`]: a local stand-in for Soniox's real-time API (WebSocket and REST).
//! - [`relay_load`]: the `relay-load` load generator (client side of the protocol).

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod accept;
pub mod frame;
pub mod health;
pub mod http;
pub mod io;
pub mod keyring;
pub mod keys_cli;
pub mod keystore;
pub mod listen;
pub mod mask;
pub mod metrics;
pub mod pump;
pub mod secret;
pub mod upstream;
pub mod uring;
pub mod usage;

pub mod admin;
pub mod cli;
pub mod cluster;
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
pub mod unauth;
