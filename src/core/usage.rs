//! What a stream used: the record a shard writes when a stream ends, and
//! the counters records add up to. The ledger that keeps them is the
//! control plane's (`control::usage`); the fleet's store sends them to
//! Redis (`core::cluster`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one stream used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageRecord {
    /// UTC day the stream ended (days since the Unix epoch).
    pub day: u64,
    /// Account id.
    pub account: String,
    /// Device id (from the session token).
    pub device: String,
    /// The relay's stream id (`client_reference_id` upstream unless the
    /// client set its own).
    pub reference_id: String,
    /// Audio milliseconds by the relay's own meter: binary payload bytes over
    /// the config's format, rate and channels (0 for compressed formats).
    pub audio_ms_relay: u64,
    /// Audio milliseconds by upstream's `total_audio_proc_ms`, when seen.
    pub audio_ms_upstream: Option<u64>,
    /// Bytes the client sent, and received.
    pub bytes_up: u64,
    /// Bytes the client received.
    pub bytes_down: u64,
    /// The error code the stream ended with, if any.
    pub error: Option<u16>,
    /// An earlier account's part of a stream that resumed on another
    /// account: the audio and bytes that account's connection was sent,
    /// counted for it but not as a stream (the record of the stream's
    /// last account counts the stream, with the rest of its audio).
    #[serde(default)]
    pub part: bool,
}

impl UsageRecord {
    /// The audio figure used for usage and cost: upstream's when it gave
    /// one (what Soniox bills), else the relay's meter.
    pub fn audio_ms(&self) -> u64 {
        self.audio_ms_upstream.unwrap_or(self.audio_ms_relay)
    }
}

/// Counters for one day and one account or device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    /// Streams ended.
    pub streams: u64,
    /// Audio milliseconds (upstream's figure where known).
    pub audio_ms: u64,
    /// Audio milliseconds by the relay's own meter.
    pub audio_ms_relay: u64,
    /// Bytes from clients.
    pub bytes_up: u64,
    /// Bytes to clients.
    pub bytes_down: u64,
    /// Streams that ended in an error, by code.
    pub errors: BTreeMap<u16, u64>,
}

impl Totals {
    /// Counts one ended stream.
    pub fn add(&mut self, r: &UsageRecord) {
        self.streams += u64::from(!r.part);
        self.audio_ms += r.audio_ms();
        self.audio_ms_relay += r.audio_ms_relay;
        self.bytes_up += r.bytes_up;
        self.bytes_down += r.bytes_down;
        if let Some(code) = r.error {
            *self.errors.entry(code).or_default() += 1;
        }
    }

    /// No stream counted.
    pub fn is_empty(&self) -> bool {
        *self == Totals::default()
    }

    /// Adds another set of counters.
    pub fn merge(&mut self, o: &Totals) {
        self.streams += o.streams;
        self.audio_ms += o.audio_ms;
        self.audio_ms_relay += o.audio_ms_relay;
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
        for (c, n) in &o.errors {
            *self.errors.entry(*c).or_default() += n;
        }
    }
}

/// Grouping for queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupBy {
    /// Per account.
    Account = 0,
    /// Per device.
    Device = 1,
}
