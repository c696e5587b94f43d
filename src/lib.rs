//! clio-relay: a thread-per-core relay between Clio clients and Soniox's
//! real-time transcription WebSocket API. See ARCHITECTURE.md for the map.
//!
//! # Layout
//! - [`metrics`]: per-shard counters and latency histograms, merged and
//!   rendered as Prometheus text only when scraped.
//! - [`secret`]: secret values that only ever print as fingerprints.

#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod metrics;
pub mod secret;
