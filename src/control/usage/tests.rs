//! The ledger against a reference model, on disk, across restarts and migrations.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use super::store::{DB_FILE, JSON_FILE};
use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "clio-usage-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ledger as it was kept before the database: every day in memory,
/// the oldest day dropped past [`KEEP_DAYS`]. The database must give the
/// same figures.
#[derive(Default)]
struct Model {
    books: [BTreeMap<u64, BTreeMap<String, Totals>>; 2],
}

impl Model {
    fn add(&mut self, records: &[UsageRecord]) {
        for r in records {
            let [a, d] = &mut self.books;
            a.entry(r.day)
                .or_default()
                .entry(r.account.clone())
                .or_default()
                .add(r);
            d.entry(r.day)
                .or_default()
                .entry(r.device.clone())
                .or_default()
                .add(r);
        }
        while self.books[0].len() as u64 > KEEP_DAYS {
            let first = *self.books[0].keys().next().unwrap();
            self.books[0].remove(&first);
            self.books[1].remove(&first);
        }
    }

    fn query(&self, from: u64, to: u64, group: GroupBy) -> BTreeMap<String, Totals> {
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for (_, day) in self.books[group as usize].range(from..=to) {
            for (k, t) in day {
                out.entry(k.clone()).or_default().merge(t);
            }
        }
        out
    }

    /// The file an older relay wrote.
    fn json(&self) -> String {
        serde_json::json!({"by_account": self.books[0], "by_device": self.books[1]}).to_string()
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

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
        part: false,
    }
}

/// A reference id longer than Soniox takes (256 characters) is not
/// remembered: no usage log can carry it, and a client choosing one of
/// 64 KiB for every stream would make the bound a matter of gigabytes. The
/// stream is still counted.
#[test]
fn an_overlong_reference_id_is_counted_but_not_remembered() {
    let mut b = UsageBook::default();
    let longest = "é".repeat(256);
    let over = "r".repeat(257);
    b.add(&[
        rec(10, "a", "d1", &longest, 5),
        rec(10, "a", "d1", &over, 7),
    ]);
    assert_eq!(b.reference_audio_ms(&longest, "a"), Some((5, 1)));
    assert_eq!(b.reference_audio_ms(&over, "a"), None);
    assert_eq!(b.recent.len(), 1);
    assert_eq!(b.query(10, 10, GroupBy::Account)["a"].streams, 2);
}

/// A stream that crossed midnight is one stream to compare with Soniox's
/// usage logs, with all its audio, although the ledger has its audio on
/// two days (`core::usage::split_days`). Before, the day's part counted
/// as a second stream of its reference id (`matched` one too many).
#[test]
fn a_stream_across_midnight_is_one_recent_stream() {
    let mut b = UsageBook::default();
    let mut records = vec![rec(11, "a", "d1", "night", 3_000)];
    crate::core::usage::split_days(&mut records, &[(10, 2_000)]);
    b.add(&records);
    assert_eq!(b.reference_audio_ms("night", "a"), Some((3_000, 1)));
    assert_eq!(b.query(10, 10, GroupBy::Device)["d1"].audio_ms, 2_000);
    assert_eq!(b.query(11, 11, GroupBy::Device)["d1"].audio_ms, 1_000);
    // And it leaves whole: what stays answers no audio of it.
    let batch: Vec<_> = (0..RECENT_STREAMS as u64)
        .map(|i| rec(12, "a", "d1", &format!("s{i}"), 1))
        .collect();
    b.add(&batch);
    assert_eq!(b.reference_audio_ms("night", "a"), None);
    assert_eq!(b.recent.len(), RECENT_STREAMS);
}

/// The last `RECENT_STREAMS` streams answer by reference id and account,
/// the oldest leave as new ones come, and an id several streams carried
/// answers with their sum until each has left.
#[test]
fn recent_streams_answer_by_reference_id_up_to_the_bound() {
    let mut b = UsageBook::default();
    let batch: Vec<_> = (0..RECENT_STREAMS as u64)
        .map(|i| rec(10, "a", "d1", &format!("s{i}"), i + 1))
        .collect();
    for part in batch.chunks(250) {
        b.add(part);
    }
    assert_eq!(b.reference_audio_ms("s0", "a"), Some((1, 1)));
    assert_eq!(b.reference_audio_ms("s0", "b"), None);
    let last = format!("s{}", RECENT_STREAMS - 1);
    assert_eq!(
        b.reference_audio_ms(&last, "a"),
        Some((RECENT_STREAMS as u64, 1))
    );
    // "s1" again, on another account, and "s2" again on the same: "s0"
    // and the first "s1" leave.
    b.add(&[rec(10, "b", "d1", "s1", 7), rec(10, "a", "d1", "s2", 10)]);
    assert_eq!(b.reference_audio_ms("s0", "a"), None);
    assert_eq!(b.reference_audio_ms("s1", "a"), None);
    assert_eq!(b.reference_audio_ms("s1", "b"), Some((7, 1)));
    assert_eq!(b.reference_audio_ms("s2", "a"), Some((13, 2)));
    // The first "s2" leaves; the second still answers.
    b.add(&[rec(10, "a", "d1", "x", 9)]);
    assert_eq!(b.reference_audio_ms("s2", "a"), Some((10, 1)));
    assert_eq!(b.reference_audio_ms("x", "a"), Some((9, 1)));
    // Pushed through a whole bound more: only the newest are left, and
    // the index holds nothing else.
    for i in 0..RECENT_STREAMS as u64 {
        b.add(&[rec(10, "c", "d1", &format!("t{i}"), 1)]);
    }
    assert_eq!(b.reference_audio_ms("s1", "b"), None);
    assert_eq!(b.reference_audio_ms("s2", "a"), None);
    assert_eq!(b.reference_audio_ms("x", "a"), None);
    assert_eq!(b.reference_audio_ms("t0", "c"), Some((1, 1)));
    assert_eq!(b.recent_index.len(), RECENT_STREAMS);
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
    // Only days the month has: no rolling over into the next one.
    assert_eq!(parse_day("2026-02-30"), None);
    assert_eq!(parse_day("2026-02-29"), None);
    assert_eq!(parse_day("2026-04-31"), None);
    assert_eq!(format_day(parse_day("2024-02-29").unwrap()), "2024-02-29");
    assert_eq!(format_day(parse_day("2000-02-29").unwrap()), "2000-02-29");
    assert_eq!(parse_day("2100-02-29"), None);
    assert_eq!(format_day(parse_day("2026-12-31").unwrap()), "2026-12-31");
    // YYYY: the last day is 9999-12-31. Past some 10^16 the arithmetic
    // overflowed (a panic in a checked build).
    assert_eq!(format_day(parse_day("9999-12-31").unwrap()), "9999-12-31");
    assert_eq!(parse_day("10000-01-01"), None);
    assert_eq!(parse_day("100000000000000000-01-01"), None);
    assert_eq!(parse_day("9223372036854775807-01-01"), None);
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
    assert_eq!(b.reference_audio_ms("s2", "a"), Some((2000, 1)));
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
    let dir = TempDir::new("restart");
    let mut b = UsageBook::load(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    b.save_if_dirty(&dir.0).unwrap();
    let loaded = UsageBook::load(&dir.0).unwrap();
    assert_eq!(
        loaded.query(0, 100, GroupBy::Account),
        b.query(0, 100, GroupBy::Account)
    );
    assert_eq!(loaded.query(0, 100, GroupBy::Account)["a"].audio_ms, 1000);
}

#[test]
fn a_book_that_could_not_open_opens_at_its_next_save() {
    let dir = TempDir::new("late-open");
    let mut b = UsageBook::default();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    assert_eq!(b.query(0, 100, GroupBy::Device)["d1"].streams, 1);
    b.save_if_dirty(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s2", 500)]);
    b.save_if_dirty(&dir.0).unwrap();
    let loaded = UsageBook::load(&dir.0).unwrap();
    assert_eq!(loaded.query(0, 100, GroupBy::Device)["d1"].audio_ms, 1500);
}

/// A save runs off the thread that queries: between its start and its
/// end the queries count its batch once, whether their snapshot holds it
/// yet or not, and a batch whose commit failed is pending again.
#[test]
fn a_batch_on_its_way_to_the_database_counts_once() {
    let dir = TempDir::new("in-flight");
    let mut b = UsageBook::load(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    b.save_if_dirty(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s2", 500)]);
    let job = b.begin_save(&dir.0).unwrap().expect("a batch to write");
    assert!(
        b.begin_save(&dir.0).unwrap().is_none(),
        "one save at a time"
    );
    // Not committed yet: the batch is merged from memory.
    b.add(&[rec(10, "a", "d1", "s3", 250)]);
    let audio = |b: &UsageBook| {
        (
            b.query(0, 100, GroupBy::Device)["d1"].audio_ms,
            b.audio_ms_all_time().unwrap()["a"],
        )
    };
    assert_eq!(audio(&b), (1750, 1750));
    // Committed, its end not yet taken: the snapshot holds it.
    let done = job.run();
    assert_eq!(audio(&b), (1750, 1750));
    b.end_save(done).unwrap();
    assert_eq!(audio(&b), (1750, 1750));
    b.save_if_dirty(&dir.0).unwrap();
    assert_eq!(
        UsageBook::load(&dir.0)
            .unwrap()
            .query(0, 100, GroupBy::Device)["d1"]
            .audio_ms,
        1750
    );

    // A commit that fails: its batch is pending again, and saved next.
    b.add(&[rec(10, "a", "d1", "s4", 100)]);
    let job = b.begin_save(&dir.0).unwrap().unwrap();
    // Another connection moves the table away for the commit's time.
    let other = rusqlite::Connection::open(dir.0.join(DB_FILE)).unwrap();
    other
        .execute_batch("ALTER TABLE totals RENAME TO away")
        .unwrap();
    let done = job.run();
    other
        .execute_batch("ALTER TABLE away RENAME TO totals")
        .unwrap();
    assert!(b.end_save(done).is_err());
    assert_eq!(audio(&b), (1850, 1850));
    b.save_if_dirty(&dir.0).unwrap();
    assert_eq!(audio(&b), (1850, 1850));
    assert_eq!(
        UsageBook::load(&dir.0)
            .unwrap()
            .query(0, 100, GroupBy::Device)["d1"]
            .audio_ms,
        1850
    );
}

/// The daily audio another process wrote leaves out this process's own
/// batches, the one on its way included, once the database holds it.
#[test]
fn others_device_audio_leaves_out_a_batch_of_this_process_in_flight() {
    let dir = TempDir::new("others-in-flight");
    let mut mine = UsageBook::load(&dir.0).unwrap();
    let mut other = UsageBook::load(&dir.0).unwrap();
    mine.add(&[rec(10, "a", "d1", "s1", 1000)]);
    mine.save_if_dirty(&dir.0).unwrap();
    other.add(&[rec(10, "a", "d1", "s2", 300)]);
    other.save_if_dirty(&dir.0).unwrap();
    mine.add(&[rec(10, "a", "d1", "s3", 500)]);
    let job = mine.begin_save(&dir.0).unwrap().unwrap();
    let done = job.run();
    // Committed, not yet taken back: still this process's.
    assert_eq!(mine.others_device_audio(10), Some(vec![("d1".into(), 300)]));
    mine.end_save(done).unwrap();
    other.add(&[rec(10, "a", "d1", "s4", 200)]);
    other.save_if_dirty(&dir.0).unwrap();
    assert_eq!(mine.others_device_audio(10), Some(vec![("d1".into(), 500)]));
}

/// A ledger removed under the book is written back; one whose copy
/// cannot be opened where it belongs (here a directory in its log's
/// place) is tried again at the next save, not taken for a file someone
/// else put there, and nothing the book wrote meanwhile is lost.
#[test]
fn a_removed_ledger_is_written_back_once_it_can_be() {
    let dir = TempDir::new("removed");
    let mut b = UsageBook::load(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    b.save_if_dirty(&dir.0).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.0.join(format!("{DB_FILE}{suffix}")));
    }
    let wal = dir.0.join(format!("{DB_FILE}-wal"));
    std::fs::create_dir(&wal).unwrap();
    b.add(&[rec(10, "a", "d1", "s2", 500)]);
    assert!(b.save_if_dirty(&dir.0).is_err());
    std::fs::remove_dir(&wal).unwrap();
    b.add(&[rec(10, "a", "d1", "s3", 250)]);
    b.save_if_dirty(&dir.0).unwrap();
    let loaded = UsageBook::load(&dir.0).unwrap();
    assert_eq!(loaded.query(0, 100, GroupBy::Device)["d1"].audio_ms, 1750);
}

#[test]
fn the_database_and_its_log_are_mode_0600() {
    let dir = TempDir::new("mode");
    std::fs::create_dir_all(&dir.0).unwrap();
    // A file left readable by someone else is corrected too.
    let db = dir.0.join(DB_FILE);
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = UsageBook::load(&dir.0).unwrap();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    b.save_if_dirty(&dir.0).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.0.join(format!("{DB_FILE}{suffix}"));
        assert!(p.exists(), "{}", p.display());
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

/// The reason for the database: a persist writes what changed, not the
/// ledger. 20,000 devices make a database of about 750 KB; one more stream
/// then writes a few pages to the log.
#[test]
fn a_persist_writes_only_what_changed() {
    let dir = TempDir::new("delta");
    let mut b = UsageBook::load(&dir.0).unwrap();
    let many: Vec<_> = (0..20_000)
        .map(|i| rec(10, "a", &format!("device-{i:05}"), &format!("s{i}"), 1000))
        .collect();
    b.add(&many);
    b.save_if_dirty(&dir.0).unwrap();
    b.store.as_ref().unwrap().checkpoint().unwrap();
    let wal = dir.0.join(format!("{DB_FILE}-wal"));
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
    let db_size = std::fs::metadata(dir.0.join(DB_FILE)).unwrap().len();
    assert!(db_size > 512 << 10, "{db_size}");
    eprintln!("database {db_size} bytes");
    b.add(&[rec(10, "a", "device-12345", "x", 500)]);
    b.save_if_dirty(&dir.0).unwrap();
    let written = std::fs::metadata(&wal).unwrap().len();
    assert!(
        written > 0 && written < 64 << 10,
        "{written} bytes written for one stream"
    );
    eprintln!("one stream wrote {written} bytes to the log");
    assert_eq!(
        b.query(10, 10, GroupBy::Device)["device-12345"].audio_ms,
        1500
    );
}

#[test]
fn an_old_usage_json_is_imported_once() {
    let dir = TempDir::new("migrate");
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut model = Model::default();
    model.add(&[
        rec(10, "a", "d1", "s1", 1000),
        rec(11, "b", "d2", "s2", 0),
        rec(11, "a", "d1", "s3", 250),
    ]);
    let json = dir.0.join(JSON_FILE);
    std::fs::write(&json, model.json()).unwrap();
    let check = |b: &UsageBook| {
        for g in [GroupBy::Account, GroupBy::Device] {
            assert_eq!(b.query(0, u64::MAX, g), model.query(0, u64::MAX, g));
        }
    };
    check(&UsageBook::load(&dir.0).unwrap());
    assert!(!json.exists());
    let migrated = dir.0.join(format!("{JSON_FILE}.migrated"));
    assert!(migrated.exists());
    check(&UsageBook::load(&dir.0).unwrap());
    // A crash after the import's commit and before the rename: the file is
    // there again, and is not counted twice.
    std::fs::copy(&migrated, &json).unwrap();
    check(&UsageBook::load(&dir.0).unwrap());
    assert!(!json.exists());
}

#[test]
fn an_unreadable_usage_json_is_refused_and_kept() {
    let dir = TempDir::new("bad-json");
    std::fs::create_dir_all(&dir.0).unwrap();
    let json = dir.0.join(JSON_FILE);
    std::fs::write(&json, b"{\"by_account\": [").unwrap();
    let err = UsageBook::load(&dir.0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("move it away"), "{err}");
    assert_eq!(std::fs::read(&json).unwrap(), b"{\"by_account\": [");
    // Counting goes on in memory; a save fails the same way and loses nothing.
    let mut b = UsageBook::default();
    b.add(&[rec(10, "a", "d1", "s1", 1000)]);
    assert!(b.save_if_dirty(&dir.0).is_err());
    std::fs::remove_file(&json).unwrap();
    b.save_if_dirty(&dir.0).unwrap();
    let loaded = UsageBook::load(&dir.0).unwrap();
    assert_eq!(loaded.query(0, 100, GroupBy::Account)["a"].audio_ms, 1000);
}

#[test]
fn days_past_keep_days_are_dropped_as_before() {
    let dir = TempDir::new("prune");
    let mut b = UsageBook::load(&dir.0).unwrap();
    let mut model = Model::default();
    for day in 0..KEEP_DAYS + 5 {
        let r = [rec(
            day,
            "a",
            &format!("d{}", day % 7),
            &format!("s{day}"),
            day,
        )];
        b.add(&r);
        model.add(&r);
        if day % 50 == 0 || day == KEEP_DAYS + 2 {
            b.save_if_dirty(&dir.0).unwrap();
        }
        if day == KEEP_DAYS + 1 {
            // Before the persist that deletes them, the dropped days are
            // already out of the figures.
            assert_eq!(
                b.query(0, u64::MAX, GroupBy::Device),
                model.query(0, u64::MAX, GroupBy::Device)
            );
        }
    }
    b.save_if_dirty(&dir.0).unwrap();
    let loaded = UsageBook::load(&dir.0).unwrap();
    for g in [GroupBy::Account, GroupBy::Device] {
        assert_eq!(loaded.query(0, u64::MAX, g), model.query(0, u64::MAX, g));
    }
    assert!(loaded.query(0, 4, GroupBy::Account).is_empty());
    assert_eq!(
        loaded.store.as_ref().unwrap().days().unwrap().len() as u64,
        KEEP_DAYS
    );
}

/// One step of a ledger's life.
#[derive(Debug, Clone)]
enum Op {
    Add(Vec<UsageRecord>),
    Save,
    Restart,
    /// Days from..=to, and a page: after which key (an index into the
    /// keys records use, or none), how many rows.
    Query(u64, u64, Option<usize>, usize),
}

fn record() -> impl Strategy<Value = UsageRecord> {
    (
        0u64..6,
        0usize..3,
        0usize..5,
        0u64..100_000,
        proptest::option::of(0u64..100_000),
        any::<u32>(),
        proptest::option::of(prop_oneof![Just(400u16), Just(408), Just(503)]),
    )
        .prop_map(|(day, a, d, ms, up, bytes, error)| UsageRecord {
            day,
            account: ["a", "b", "c"][a].into(),
            device: format!("device-{d}"),
            reference_id: format!("r{bytes}"),
            audio_ms_relay: ms,
            audio_ms_upstream: up,
            bytes_up: u64::from(bytes),
            bytes_down: u64::from(bytes / 3),
            error,
            part: false,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(record(), 0..8).prop_map(Op::Add),
        2 => Just(Op::Save),
        1 => Just(Op::Restart),
        2 => (0u64..7, 0u64..7, proptest::option::of(0usize..8), 1usize..5)
            .prop_map(|(a, b, after, limit)| Op::Query(a.min(b), a.max(b), after, limit)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any sequence of adds, persists, restarts (losing what was not
    /// persisted, as a crash would) and queries gives the figures of the
    /// in-memory reference.
    #[test]
    fn the_database_gives_the_reference_figures(ops in proptest::collection::vec(op(), 1..24)) {
        let dir = TempDir::new("prop");
        let mut book = UsageBook::load(&dir.0).unwrap();
        let mut saved = Model::default();
        let mut unsaved: Vec<UsageRecord> = Vec::new();
        for op in ops {
            match op {
                Op::Add(rs) => {
                    book.add(&rs);
                    unsaved.extend(rs);
                }
                Op::Save => {
                    book.save_if_dirty(&dir.0).unwrap();
                    saved.add(&unsaved);
                    unsaved.clear();
                }
                Op::Restart => {
                    drop(book);
                    book = UsageBook::load(&dir.0).unwrap();
                    unsaved.clear();
                }
                Op::Query(from, to, after, limit) => {
                    let mut now = Model { books: saved.books.clone() };
                    now.add(&unsaved);
                    for g in [GroupBy::Account, GroupBy::Device] {
                        let all = now.query(from, to, g);
                        prop_assert_eq!(book.query(from, to, g), all.clone());
                        // The page: the keys after `after`, the first
                        // `limit`, and the last of them when more follow.
                        let after = after.map(|i| {
                            ["a", "b", "c", "device-0", "device-1", "device-2", "device-3", "device-4"][i]
                                .to_string()
                        });
                        let mut past: Vec<_> = all
                            .into_iter()
                            .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
                            .collect();
                        let more = past.len() > limit;
                        past.truncate(limit);
                        let next = more.then(|| past.last().unwrap().0.clone());
                        let page = Page { after, limit };
                        prop_assert_eq!(
                            book.query_page(from, to, g, &page),
                            (past.into_iter().collect(), next)
                        );
                    }
                }
            }
        }
    }
}
