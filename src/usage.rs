//! Usage metering: what each stream used, kept per day by account and by
//! device, priced, persisted across restarts, and compared with Soniox's
//! own usage logs.
//!
//! A shard writes one [`UsageRecord`] when a stream ends; the admin thread
//! collects them every second or two ([`crate::shard::ShardMsg::TakeUsage`])
//! into the [`UsageBook`], which it writes to `admin.state_dir/usage.json`
//! atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How many ended streams are remembered for reconciliation.
pub const RECENT_STREAMS: usize = 100_000;
/// How many days of daily counters are kept.
pub const KEEP_DAYS: u64 = 400;

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
    fn add(&mut self, r: &UsageRecord) {
        self.streams += 1;
        self.audio_ms += r.audio_ms();
        self.audio_ms_relay += r.audio_ms_relay;
        self.bytes_up += r.bytes_up;
        self.bytes_down += r.bytes_down;
        if let Some(code) = r.error {
            *self.errors.entry(code).or_default() += 1;
        }
    }

    fn merge(&mut self, o: &Totals) {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Per account.
    Account,
    /// Per device.
    Device,
}

/// The admin thread's usage ledger.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UsageBook {
    /// Day → account → totals.
    by_account: BTreeMap<u64, BTreeMap<String, Totals>>,
    /// Day → device → totals.
    by_device: BTreeMap<u64, BTreeMap<String, Totals>>,
    /// The last ended streams: reference id → (account, audio ms by the relay).
    #[serde(skip)]
    recent: VecDeque<(String, String, u64)>,
    #[serde(skip)]
    recent_index: HashMap<String, usize>,
    /// Unsaved changes since the last write.
    #[serde(skip)]
    dirty: bool,
}

impl UsageBook {
    /// Adds ended streams.
    pub fn add(&mut self, records: &[UsageRecord]) {
        for r in records {
            self.by_account
                .entry(r.day)
                .or_default()
                .entry(r.account.clone())
                .or_default()
                .add(r);
            self.by_device
                .entry(r.day)
                .or_default()
                .entry(r.device.clone())
                .or_default()
                .add(r);
            if self.recent.len() == RECENT_STREAMS {
                if let Some((id, _, _)) = self.recent.pop_front() {
                    self.recent_index.remove(&id);
                }
            }
            self.recent
                .push_back((r.reference_id.clone(), r.account.clone(), r.audio_ms()));
            self.dirty = true;
        }
        if self.recent_index.len() != self.recent.len() {
            self.reindex();
        }
        while self.by_account.len() as u64 > KEEP_DAYS {
            let first = *self.by_account.keys().next().expect("non-empty");
            self.by_account.remove(&first);
            self.by_device.remove(&first);
        }
    }

    fn reindex(&mut self) {
        self.recent_index = self
            .recent
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (id.clone(), i))
            .collect();
    }

    /// The relay's audio milliseconds for a stream it ended recently, by reference id.
    pub fn stream_audio_ms(&self, reference_id: &str) -> Option<(&str, u64)> {
        self.recent_index
            .get(reference_id)
            .and_then(|&i| self.recent.get(i))
            .map(|(_, a, ms)| (a.as_str(), *ms))
    }

    /// Totals per account or device over the days `from..=to`.
    pub fn query(&self, from: u64, to: u64, group: GroupBy) -> BTreeMap<String, Totals> {
        let book = match group {
            GroupBy::Account => &self.by_account,
            GroupBy::Device => &self.by_device,
        };
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for (_, day) in book.range(from..=to) {
            for (k, t) in day {
                out.entry(k.clone()).or_default().merge(t);
            }
        }
        out
    }

    /// Audio milliseconds per account over `from..=to`.
    pub fn audio_ms_by_account(&self, from: u64, to: u64) -> BTreeMap<String, u64> {
        self.query(from, to, GroupBy::Account)
            .into_iter()
            .map(|(k, t)| (k, t.audio_ms))
            .collect()
    }

    /// Loads the book from `dir/usage.json` (a missing file is an empty book).
    pub fn load(dir: &Path) -> std::io::Result<UsageBook> {
        match std::fs::read(dir.join("usage.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UsageBook::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the book to `dir/usage.json` if it changed, atomically.
    pub fn save_if_dirty(&mut self, dir: &Path) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomically(&dir.join("usage.json"), &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// old file or the new one: temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Parses `YYYY-MM-DD` into a UTC day number.
pub fn parse_day(text: &str) -> Option<u64> {
    let mut it = text.trim().splitn(3, '-');
    let (y, m, d): (i64, u32, u32) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days).ok()
}

/// Formats a UTC day number as `YYYY-MM-DD`.
pub fn format_day(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

/// The first day of the month `day` is in.
pub fn month_start(day: u64) -> u64 {
    let s = format_day(day);
    parse_day(&format!("{}-01", &s[..7])).unwrap_or(day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(day: u64, account: &str, device: &str, id: &str, ms: u64) -> UsageRecord {
        UsageRecord {
            day,
            account: account.into(),
            device: device.into(),
            reference_id: id.into(),
            audio_ms_relay: ms,
            audio_ms_upstream: None,
            bytes_up: ms * 32,
            bytes_down: 10,
            error: (ms == 0).then_some(503),
        }
    }

    #[test]
    fn days_round_trip() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2026-11-25"), Some(20_782));
        for d in [0, 59, 60, 365, 11_016, 20_782, 30_000] {
            assert_eq!(parse_day(&format_day(d)), Some(d));
        }
        assert_eq!(format_day(month_start(20_782)), "2026-11-01");
        assert_eq!(parse_day("2026-13-01"), None);
    }

    #[test]
    fn groups_by_account_and_device_over_a_range() {
        let mut b = UsageBook::default();
        b.add(&[
            rec(10, "a", "d1", "s1", 1000),
            rec(10, "a", "d2", "s2", 2000),
            rec(11, "b", "d1", "s3", 500),
            rec(12, "a", "d1", "s4", 0),
        ]);
        let by_acc = b.query(10, 11, GroupBy::Account);
        assert_eq!(
            (
                by_acc["a"].streams,
                by_acc["a"].audio_ms,
                by_acc["b"].audio_ms
            ),
            (2, 3000, 500)
        );
        let by_dev = b.query(10, 12, GroupBy::Device);
        assert_eq!((by_dev["d1"].streams, by_dev["d1"].audio_ms), (3, 1500));
        assert_eq!(by_dev["d1"].errors.get(&503), Some(&1));
        assert_eq!(b.stream_audio_ms("s2"), Some(("a", 2000)));
        let mut up = rec(13, "a", "d1", "s5", 1000);
        up.audio_ms_upstream = Some(1100);
        b.add(&[up]);
        assert_eq!(
            b.query(13, 13, GroupBy::Account)["a"].audio_ms,
            1100,
            "upstream's figure wins"
        );
    }

    #[test]
    fn survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("clio-usage-{}", std::process::id()));
        let mut b = UsageBook::default();
        b.add(&[rec(10, "a", "d1", "s1", 1000)]);
        b.save_if_dirty(&dir).unwrap();
        let loaded = UsageBook::load(&dir).unwrap();
        assert_eq!(
            loaded.query(0, 100, GroupBy::Account),
            b.query(0, 100, GroupBy::Account)
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
