//! What a stream used: the record a shard writes when a stream ends, and
//! the counters records add up to. The ledger that keeps them is the
//! control plane's (`control::usage`); the fleet's store sends them to
//! Redis (`core::cluster`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one stream used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageRecord {
    /// UTC day the stream ended (days since the Unix epoch); for a part
    /// [`split_days`] made, the day its audio was relayed.
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

/// Moves the audio a stream relayed on UTC days other than the one it
/// ended (`other`: each day and its milliseconds, in the order relayed, as
/// the device's daily allowance counted them) out of the stream's
/// `records` (in the order its audio went: the parts of the accounts a
/// resume left, then the last account's) into records of those days,
/// each a `part` (the stream counts once, on the day it ended): each
/// day's audio, in the ledger as in the allowance, is the audio relayed
/// on it. Bytes stay on the day the stream ended.
pub fn split_days(records: &mut Vec<UsageRecord>, other: &[(u64, u64)]) {
    let n = records.len();
    let mut at = 0;
    for &(day, ms) in other {
        let mut left = ms;
        while left > 0 && at < n {
            let r = &mut records[at];
            let take = left.min(r.audio_ms());
            if take == 0 {
                at += 1;
                continue;
            }
            let relay = take.min(r.audio_ms_relay);
            r.audio_ms_relay -= relay;
            r.audio_ms_upstream = r.audio_ms_upstream.map(|u| u - take);
            let part = UsageRecord {
                day,
                account: r.account.clone(),
                device: r.device.clone(),
                reference_id: r.reference_id.clone(),
                audio_ms_relay: relay,
                audio_ms_upstream: r.audio_ms_upstream.map(|_| take),
                bytes_up: 0,
                bytes_down: 0,
                error: None,
                part: true,
            };
            records.push(part);
            left -= take;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(account: &str, relay: u64, upstream: Option<u64>, part: bool) -> UsageRecord {
        UsageRecord {
            day: 10,
            account: account.into(),
            device: "d".into(),
            reference_id: "r".into(),
            audio_ms_relay: relay,
            audio_ms_upstream: upstream,
            bytes_up: 7,
            bytes_down: 9,
            error: None,
            part,
        }
    }

    /// The audio before midnight comes out of the stream's records in the
    /// order it went (the account a resume left first); each account's
    /// and the device's audio over both days is what it was.
    #[test]
    fn a_stream_across_midnight_splits_its_audio_by_day_in_the_order_it_went() {
        let mut records = vec![
            record("a", 1_000, Some(1_000), true),
            record("b", 3_000, Some(3_200), false),
        ];
        split_days(&mut records, &[(9, 1_500)]);
        let on = |day: u64, account: &str| -> u64 {
            records
                .iter()
                .filter(|r| r.day == day && r.account == account)
                .map(UsageRecord::audio_ms)
                .sum()
        };
        assert_eq!((on(9, "a"), on(9, "b")), (1_000, 500));
        assert_eq!((on(10, "a"), on(10, "b")), (0, 2_700));
        // The stream still counts once, on the day it ended, with its bytes.
        let streams: u64 = records.iter().map(|r| u64::from(!r.part)).sum();
        assert_eq!(streams, 1);
        assert!(records
            .iter()
            .filter(|r| r.day == 9)
            .all(|r| r.part && r.bytes_up == 0));
        // Nothing relayed on another day: nothing moves.
        let mut same = vec![record("b", 3_000, None, false)];
        split_days(&mut same, &[]);
        assert_eq!(same, vec![record("b", 3_000, None, false)]);
    }
}
