//! Usage metering: what each stream used, kept per day by account and by
//! device, priced, persisted across restarts, and compared with Soniox's
//! own usage logs.
//!
//! A shard writes one [`UsageRecord`] when a stream ends; the admin thread
//! collects them every second or two ([`crate::dataplane::shard::ShardMsg::TakeUsage`])
//! into the [`UsageBook`], which adds what changed to an SQLite database,
//! `admin.state_dir/usage.db`, every `usage.persist_interval` ([`store`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

pub use crate::core::usage::{GroupBy, Totals, UsageRecord};

pub mod store;
pub use store::Page;

/// How many ended streams are remembered for reconciliation.
pub const RECENT_STREAMS: usize = 100_000;
/// The longest `client_reference_id` Soniox takes, in characters: a longer
/// one (the client's own) is in no usage log, so it is not remembered.
/// That bounds what [`RECENT_STREAMS`] holds at about 200 MB (twice 1 KiB
/// of UTF-8 each), where the first message's 64 KiB would allow 13 GB.
pub const MAX_REFERENCE_CHARS: usize = 256;
/// How many days of daily counters are kept.
pub const KEEP_DAYS: u64 = 400;

/// The admin thread's usage ledger.
///
/// Counters live in an SQLite database in the state directory
/// ([`store`]); what changed since the last persist waits in memory and is
/// added to the database in one transaction by a [`SaveJob`], which runs
/// on a blocking thread ([`UsageBook::begin_save`], [`UsageBook::end_save`];
/// [`UsageBook::save_if_dirty`] runs it in place). Queries read the
/// database through a second connection and merge what is in memory, the
/// batch being committed included until their snapshot holds it, so they
/// see every record added, once.
#[derive(Debug, Default)]
pub struct UsageBook {
    /// The database's writing connection, once opened; away (`None`)
    /// while a [`SaveJob`] has it.
    store: Option<store::Store>,
    /// The database's reading connection, once opened.
    reader: Option<store::Reader>,
    /// Counters added since the last persist: `[by account, by device]`,
    /// each day → key → totals.
    pending: store::Pending,
    /// The batch a [`SaveJob`] is committing.
    in_flight: Option<InFlight>,
    /// The last batch's sequence number.
    seq: u64,
    /// Days with data, stored or pending; at most [`KEEP_DAYS`].
    days: BTreeSet<u64>,
    /// The latest day dropped past [`KEEP_DAYS`]; it and every earlier day
    /// are deleted at the next persist and hidden from queries until then.
    prune_through: Option<u64>,
    /// The last ended streams, oldest first: (reference id, account, audio
    /// ms by the relay).
    recent: VecDeque<(String, String, u64)>,
    /// Reference id → the streams of `recent` that carry it, summed per
    /// account. A client may set one id for several streams; Soniox's
    /// usage logs then list each under it, and each is compared.
    recent_index: HashMap<String, Vec<RecentSum>>,
    /// The day and, per device, the audio milliseconds this process has
    /// written to the database that day: what of a device's stored total
    /// is another process's.
    written_today: (u64, HashMap<String, u64>),
    /// The database's `data_version` when last looked at: it moves only
    /// when another process commits.
    others_seen: Option<i64>,
    /// Whether the last read of the database failed: a failure is logged
    /// when the read before it did not fail, and the first read that works
    /// again says so (every `/metrics` scrape reads it).
    read_failing: std::cell::Cell<bool>,
}

/// A batch of counters on its way to the database.
#[derive(Debug, Clone)]
struct InFlight {
    seq: u64,
    batch: Arc<store::Pending>,
    prune_through: Option<u64>,
}

/// One persist, to run where a blocking write may wait on the disk
/// ([`SaveJob::run`]): it holds the database's writing connection and the
/// batch.
#[derive(Debug)]
pub struct SaveJob {
    store: store::Store,
    batch: Option<InFlight>,
}

/// What a [`SaveJob`] did, for [`UsageBook::end_save`].
#[derive(Debug)]
pub struct SaveDone {
    store: store::Store,
    /// The batch's commit (`Ok` when there was none).
    flushed: std::io::Result<()>,
    /// The file's check after it (see [`UsageBook::save_if_dirty`]).
    kept: std::io::Result<bool>,
}

impl SaveJob {
    /// Commits the batch, then checks that the file is still in its
    /// directory (written back there if not). Blocks on the disk.
    pub fn run(mut self) -> SaveDone {
        let flushed = match &self.batch {
            Some(f) => self.store.flush(&f.batch, f.prune_through, f.seq),
            None => Ok(()),
        };
        let kept = match &flushed {
            Ok(()) => self.store.keep_in_place(),
            Err(_) => Ok(false),
        };
        SaveDone {
            store: self.store,
            flushed,
            kept,
        }
    }
}

/// The streams of one reference id on one account, among the recent ones.
#[derive(Debug)]
struct RecentSum {
    account: String,
    audio_ms: u64,
    streams: u64,
}

impl UsageBook {
    /// Adds ended streams.
    pub fn add(&mut self, records: &[UsageRecord]) {
        for r in records {
            let [by_account, by_device] = &mut self.pending;
            by_account
                .entry(r.day)
                .or_default()
                .entry(r.account.clone())
                .or_default()
                .add(r);
            by_device
                .entry(r.day)
                .or_default()
                .entry(r.device.clone())
                .or_default()
                .add(r);
            self.days.insert(r.day);
            if r.reference_id.chars().nth(MAX_REFERENCE_CHARS).is_some() {
                continue;
            }
            let ms = r.audio_ms();
            // A day's part of a stream that crossed midnight (its bytes
            // stay with the stream's record, which came just before): its
            // audio joins that record's, not another stream of the id.
            if r.part && r.bytes_up == 0 && r.bytes_down == 0 {
                let same =
                    |e: &&mut (String, String, u64)| e.0 == r.reference_id && e.1 == r.account;
                if let Some(e) = self.recent.iter_mut().rev().take(16).find(same) {
                    e.2 += ms;
                    if let Some(s) = self
                        .recent_index
                        .get_mut(&r.reference_id)
                        .and_then(|v| v.iter_mut().find(|s| s.account == r.account))
                    {
                        s.audio_ms += ms;
                    }
                    continue;
                }
            }
            if self.recent.len() == RECENT_STREAMS {
                if let Some((id, account, ms)) = self.recent.pop_front() {
                    self.forget_recent(&id, &account, ms);
                }
            }
            let sums = self.recent_index.entry(r.reference_id.clone()).or_default();
            match sums.iter_mut().find(|s| s.account == r.account) {
                Some(s) => {
                    s.audio_ms += ms;
                    s.streams += 1;
                }
                None => sums.push(RecentSum {
                    account: r.account.clone(),
                    audio_ms: ms,
                    streams: 1,
                }),
            }
            self.recent
                .push_back((r.reference_id.clone(), r.account.clone(), ms));
        }
        self.prune();
    }

    /// Drops the oldest days past [`KEEP_DAYS`].
    fn prune(&mut self) {
        while self.days.len() as u64 > KEEP_DAYS {
            let first = self.days.pop_first().expect("non-empty");
            for book in &mut self.pending {
                book.remove(&first);
            }
            self.prune_through = Some(self.prune_through.map_or(first, |p| p.max(first)));
        }
    }

    /// Takes a stream that leaves `recent` out of its reference id's sum.
    fn forget_recent(&mut self, reference_id: &str, account: &str, ms: u64) {
        let Some(sums) = self.recent_index.get_mut(reference_id) else {
            return;
        };
        if let Some(i) = sums.iter().position(|s| s.account == account) {
            let s = &mut sums[i];
            s.audio_ms -= ms;
            s.streams -= 1;
            if s.streams == 0 {
                sums.swap_remove(i);
            }
        }
        if sums.is_empty() {
            self.recent_index.remove(reference_id);
        }
    }

    /// The relay's audio milliseconds and the number of streams, among
    /// those it ended recently, that carried `reference_id` on `account`.
    pub fn reference_audio_ms(&self, reference_id: &str, account: &str) -> Option<(u64, u64)> {
        self.recent_index
            .get(reference_id)?
            .iter()
            .find(|s| s.account == account)
            .map(|s| (s.audio_ms, s.streams))
    }

    /// Totals per account or device over the days `from..=to`.
    ///
    /// A database that cannot be read is logged, and the answer then holds
    /// only what is not yet persisted.
    pub fn query(&self, from: u64, to: u64, group: GroupBy) -> BTreeMap<String, Totals> {
        self.query_page(from, to, group, &Page::ALL).0
    }

    /// [`UsageBook::query`]'s rows of `page`, in key order, and the last
    /// key's id if more rows follow it. However many keys the days hold,
    /// it holds `page.limit` + 1 of them at most.
    pub fn query_page(
        &self,
        from: u64,
        to: u64,
        group: GroupBy,
        page: &Page,
    ) -> (BTreeMap<String, Totals>, Option<String>) {
        let from = match self.prune_through {
            Some(p) => from.max(p.saturating_add(1)),
            None => from,
        };
        if from > to {
            return (BTreeMap::new(), None);
        }
        let (mut out, committed) = self
            .read(|s| s.query(group, from, to, page))
            .unwrap_or_default();
        let after = page.after.as_deref();
        for unsaved in self.unsaved(committed) {
            for (_, day) in unsaved[group as usize].range(from..=to) {
                for (k, t) in day {
                    if after.is_none_or(|a| k.as_str() > a) {
                        out.entry(k.clone()).or_default().merge(t);
                    }
                }
            }
        }
        // The stored rows kept one key past the page; what was pending may
        // have added more.
        let next = cut_page(&mut out, page);
        (out, next)
    }

    /// Audio milliseconds per account since the ledger began: every day
    /// kept, and the days dropped past [`KEEP_DAYS`] (so a counter built on
    /// it never goes down). `None` when the database cannot be read, or
    /// is not open (it did not open at start, nor at a persist since):
    /// what it holds is then unknown, and the streams since alone would
    /// make the counter go down.
    pub fn audio_ms_all_time(&self) -> Option<BTreeMap<String, u64>> {
        // Days dropped in memory but not yet in the database are still
        // there, and not yet in its retired totals: counted once.
        let (mut out, committed) = self.read(|s| s.audio_ms_all_time())?;
        for unsaved in self.unsaved(committed) {
            for day in unsaved[GroupBy::Account as usize].values() {
                for (k, t) in day {
                    *out.entry(k.clone()).or_default() += t.audio_ms;
                }
            }
        }
        Some(out)
    }

    /// `query` on a snapshot of the database, and the last batch of this
    /// process in it; `None` when the database is not open or cannot be
    /// read (logged).
    fn read<T>(
        &self,
        query: impl FnOnce(&store::Snapshot<'_>) -> rusqlite::Result<T>,
    ) -> Option<(T, u64)> {
        let reader = self.reader.as_ref()?;
        let read = reader
            .snapshot()
            .and_then(|s| Ok((query(&s)?, s.committed)));
        match read {
            Ok(out) => {
                self.read_worked(reader);
                Some(out)
            }
            Err(e) => {
                self.read_failed(reader, &e);
                None
            }
        }
    }

    /// What a snapshot that holds this process's batches up to
    /// `committed` lacks: the pending counters, and the batch in flight
    /// unless it is in.
    fn unsaved(&self, committed: u64) -> impl Iterator<Item = &store::Pending> {
        let in_flight = self.in_flight.as_ref().filter(|f| f.seq > committed);
        std::iter::once(&self.pending).chain(in_flight.map(|f| &*f.batch))
    }

    /// Logs a failed read of `store`, naming its file, unless the read
    /// before failed too.
    fn read_failed(&self, store: &store::Reader, e: &dyn std::fmt::Display) {
        if !self.read_failing.replace(true) {
            tracing::error!(
                path = %store.path().display(),
                error = %e,
                "cannot read the usage ledger database; usage queries and \
                 clio_relay_audio_seconds_total leave out what it holds until it \
                 can be read (logged once, until it can)"
            );
        }
    }

    /// After failed reads, logs that `store` can be read again.
    fn read_worked(&self, store: &store::Reader) {
        if self.read_failing.replace(false) {
            tracing::info!(
                path = %store.path().display(),
                "usage ledger database can be read again"
            );
        }
    }

    /// Whether the database is open (it is, unless opening it failed at
    /// start and at every persist since).
    pub fn is_open(&self) -> bool {
        self.reader.is_some()
    }

    /// The days with usage, oldest first.
    pub fn days(&self) -> impl Iterator<Item = u64> + '_ {
        let after = self.prune_through;
        self.days.iter().copied().filter(move |d| after < Some(*d))
    }

    /// Audio milliseconds per account over `from..=to`.
    pub fn audio_ms_by_account(&self, from: u64, to: u64) -> BTreeMap<String, u64> {
        self.query(from, to, GroupBy::Account)
            .into_iter()
            .map(|(k, t)| (k, t.audio_ms))
            .collect()
    }

    /// Each device's audio on `day` that another process on the state
    /// directory wrote to the database (the other relay of a hand-over
    /// restart), when one has committed since the last call; `None` when
    /// none has, or the database cannot be read. What this process wrote
    /// is left out, and what it has not written yet is not in the
    /// database.
    ///
    /// Its own commits move the database's version too (they go through
    /// another connection), so the rows are read again after each of
    /// them: once a persist interval, only with a daily allowance.
    pub fn others_device_audio(&mut self, day: u64) -> Option<Vec<(String, u64)>> {
        let version = self.reader.as_ref()?.data_version().ok()?;
        if self.others_seen.replace(version) == Some(version) {
            return None;
        }
        let (rows, committed) = self.read(|s| s.device_audio_on(day))?;
        let (written_day, written) = &self.written_today;
        // The batch in flight, when the rows hold it, is this process's.
        let in_flight = self
            .in_flight
            .as_ref()
            .filter(|f| f.seq <= committed)
            .and_then(|f| f.batch[GroupBy::Device as usize].get(&day));
        let mine = |d: &str| {
            let written = if *written_day == day {
                written.get(d).copied().unwrap_or(0)
            } else {
                0
            };
            written + in_flight.and_then(|b| b.get(d)).map_or(0, |t| t.audio_ms)
        };
        Some(
            rows.into_iter()
                .filter_map(|(d, total)| {
                    let others = total.saturating_sub(mine(&d));
                    (others > 0).then_some((d, others))
                })
                .collect(),
        )
    }

    /// Opens the ledger in `dir` (`usage.db`, created 0600 when missing),
    /// importing a `usage.json` left by an older relay.
    pub fn load(dir: &Path) -> std::io::Result<UsageBook> {
        let mut book = UsageBook::default();
        book.open(dir)?;
        Ok(book)
    }

    fn open(&mut self, dir: &Path) -> std::io::Result<()> {
        let store = store::Store::open(dir)?;
        self.days.extend(store.days()?);
        self.reader = Some(store.reader()?);
        self.store = Some(store);
        self.prune();
        Ok(())
    }

    /// Writes what changed since the last call to the database, in one
    /// transaction, here: [`UsageBook::begin_save`], [`SaveJob::run`] and
    /// [`UsageBook::end_save`] in a row.
    pub fn save_if_dirty(&mut self, dir: &Path) -> std::io::Result<()> {
        // A commit syncs the write-ahead log: on a slow disk, seconds.
        let _disk = crate::core::disk_wait::writing();
        match self.begin_save(dir)? {
            Some(job) => self.end_save(job.run()),
            None => Ok(()),
        }
    }

    /// Takes what changed since the last save out of `pending` into a
    /// [`SaveJob`], which commits it, wherever it runs, in one
    /// transaction; queries go on counting it until it is in. A book not
    /// yet open (its [`UsageBook::load`] failed, or it was made with
    /// `default`) opens `dir` first (an error if it cannot: the changes
    /// stay pending); an open book keeps the directory it was opened in.
    /// `None` when a job is already out, or the book is not open and has
    /// nothing to write.
    ///
    /// Changed or not, the job then checks that the database file is
    /// still in its directory, and writes it back there from the open
    /// database if it is gone (removed, or the directory moved; logged
    /// once at WARN by [`UsageBook::end_save`]), so a restart finds it.
    pub fn begin_save(&mut self, dir: &Path) -> std::io::Result<Option<SaveJob>> {
        if self.in_flight.is_some() {
            return Ok(None);
        }
        let dirty = self.pending.iter().any(|b| !b.is_empty());
        let changed = dirty || self.prune_through.is_some();
        if self.reader.is_none() {
            if !changed {
                return Ok(None);
            }
            self.open(dir)?;
        }
        let Some(store) = self.store.take() else {
            return Ok(None);
        };
        let batch = changed.then(|| {
            self.seq += 1;
            InFlight {
                seq: self.seq,
                batch: Arc::new(std::mem::take(&mut self.pending)),
                prune_through: self.prune_through,
            }
        });
        self.in_flight.clone_from(&batch);
        Ok(Some(SaveJob { store, batch }))
    }

    /// Takes back what a [`SaveJob`] did. Its batch, committed, is no
    /// longer merged into queries; not committed, it is pending again,
    /// for the next save. A database file written back to its directory
    /// is read there from now on. The job's error, if any.
    pub fn end_save(&mut self, done: SaveDone) -> std::io::Result<()> {
        let SaveDone {
            store,
            flushed,
            kept,
        } = done;
        if let Ok(true) = kept {
            tracing::warn!(
                path = %store.path().display(),
                "the usage ledger's file was gone (removed, or its directory moved) \
                 under the running relay; written back there from the copy it held open"
            );
            match store.reader() {
                Ok(reader) => self.reader = Some(reader),
                // The old reader reads the copy held open, which holds it all.
                Err(e) => {
                    tracing::warn!(path = %store.path().display(), error = %e, "cannot read the usage ledger's file written back; reading the copy held open")
                }
            }
        }
        self.store = Some(store);
        if let Some(f) = self.in_flight.take() {
            let batch = Arc::try_unwrap(f.batch).unwrap_or_else(|b| (*b).clone());
            match &flushed {
                Ok(()) => {
                    self.note_written(&batch);
                    if self.prune_through == f.prune_through {
                        self.prune_through = None;
                    }
                }
                Err(_) => {
                    for (g, book) in batch.into_iter().enumerate() {
                        for (day, keys) in book {
                            // A day dropped meanwhile stays dropped.
                            if self.prune_through.is_some_and(|p| day <= p) {
                                continue;
                            }
                            let to = self.pending[g].entry(day).or_default();
                            for (key, t) in keys {
                                to.entry(key).or_default().merge(&t);
                            }
                        }
                    }
                }
            }
        }
        flushed?;
        kept.map(|_| ())
    }

    /// Counts in `written_today` the devices' audio of a batch committed.
    fn note_written(&mut self, batch: &store::Pending) {
        let (day, written) = &mut self.written_today;
        if let Some((&last, _)) = batch[GroupBy::Device as usize].last_key_value() {
            if last > *day {
                *day = last;
                written.clear();
            }
        }
        if let Some(devices) = batch[GroupBy::Device as usize].get(day) {
            for (device, t) in devices {
                *written.entry(device.clone()).or_default() += t.audio_ms;
            }
        }
    }
}

/// Keeps `page`'s rows of `rows` (the keys after `page.after`, the first
/// `page.limit` of them) and returns the last one kept if any row was
/// past the page.
pub fn cut_page<T>(rows: &mut BTreeMap<String, T>, page: &Page) -> Option<String> {
    if let Some(after) = &page.after {
        *rows = rows.split_off(after.as_str());
        rows.remove(after.as_str());
    }
    if rows.len() <= page.limit {
        return None;
    }
    let first_past = rows.keys().nth(page.limit).cloned().expect("past the page");
    rows.split_off(&first_past);
    rows.last_key_value().map(|(k, _)| k.clone())
}

/// Whether `e`, from a look at a file in the state directory, says the
/// file is gone (removed, or its directory removed or made a file under
/// the running relay): one to write again, not a fault to report.
pub fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// old file or the new one: temp file, fsync, rename, fsync of the directory,
/// as the key store does it ([`crate::control::keystore::write_file`]): the
/// file mode 0600, a directory made for it mode 0700 (the state directory,
/// removed under a running relay, comes back as private as it was made),
/// and a temp file that a failed write leaves (a full disk) removed, so it
/// does not hold the space. Returns the written file's metadata, read from
/// the file itself before its rename, so that another process's write just
/// after it is never taken for this one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<std::fs::Metadata> {
    crate::control::keystore::write_file(path, bytes)
}

/// The last year [`parse_day`] takes: a `YYYY` year. Past it the day
/// arithmetic below overflows (a panic where overflow is checked, a wrong
/// day where it wraps), and no ledger holds such a day anyway.
pub const LAST_YEAR: i64 = 9999;

/// Parses `YYYY-MM-DD` into a UTC day number: 1970-01-01 to 9999-12-31.
pub fn parse_day(text: &str) -> Option<u64> {
    let mut it = text.trim().splitn(3, '-');
    let (y, m, d): (i64, u32, u32) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1970..=LAST_YEAR).contains(&y) {
        return None;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=month_days).contains(&d) {
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
mod tests;
