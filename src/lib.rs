//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//!
//! Four rooms, each using only the ones below it (the exceptions, and why,
//! are in ARCHITECTURE.md):
//! - [`cli`]: the binary's commands (`run`, `check-config`, `mint-token`,
//!   `keys`, `demo`) and the process they run: start, reload, drain, stop,
//!   signals, systemd.
//! - [`control`]: the control plane, on the admin thread: the admin port and
//!   its APIs, the account set, health checks, the key store, usage, alerts.
//! - [`dataplane`]: the streaming path, on the shards: accept, a stream's
//!   life, the pumps, the data-plane io_uring, the HTTP edge, upstream.
//! - [`core`]: what both planes share: configuration, tokens, secrets, the
//!   key ring, device limits, metrics, TLS material, the fleet's store.
//!
//! The frame path's pure core (frame headers, masking, the scanner) is its
//! own crate, `clio-frame`; the test tools `fake-soniox` and `relay-load` are
//! their own crates under `tools/`.

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod cli;
pub mod control;
pub mod core;
pub mod dataplane;
