//! The usage ledger on disk: an SQLite database, `state_dir/usage.db`.
//!
//! One row per (group, day, key) holds that day's counters for one account
//! or one device; errors by code sit in a second table keyed the same way
//! plus the code. A persist is one transaction that *adds* the counters
//! changed since the last one (`INSERT … ON CONFLICT DO UPDATE SET n = n +
//! excluded.n`), so it writes the rows that changed and the B-tree pages
//! above them, never the whole ledger.
//!
//! Crash safety is SQLite's: write-ahead log, `synchronous = FULL` (the log
//! is synced at every commit; one commit per `usage.persist_interval`), so
//! a crash or power cut at any moment leaves the ledger as of the last
//! commit. The file and its `-wal`/`-shm` companions are mode 0600 (SQLite
//! gives the companions the database file's mode).
//!
//! A `usage.json` from an older relay is imported at open, in the same
//! transaction that records its SHA-256, and then renamed
//! `usage.json.migrated`; a crash between the commit and the rename finds
//! the digest and only renames, so nothing is counted twice.

use std::collections::BTreeMap;
use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension};

use super::{GroupBy, Totals};

/// The database's file name in the state directory.
pub const DB_FILE: &str = "usage.db";
/// The ledger file of relays before the database.
pub const JSON_FILE: &str = "usage.json";

/// The schema. `WITHOUT ROWID` keeps each row in its primary key's B-tree
/// (one tree per table, no separate rowid tree to update).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS totals (
    grp INTEGER NOT NULL,
    day INTEGER NOT NULL,
    key TEXT NOT NULL,
    streams INTEGER NOT NULL,
    audio_ms INTEGER NOT NULL,
    audio_ms_relay INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    PRIMARY KEY (grp, day, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS errors (
    grp INTEGER NOT NULL,
    day INTEGER NOT NULL,
    key TEXT NOT NULL,
    code INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (grp, day, key, code)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retired (
    key TEXT PRIMARY KEY,
    audio_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS migrations (
    sha256 TEXT PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    writer TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// How long a writer's row in `batches` is kept after its last commit:
/// long past any process's persist interval, so only the rows of
/// processes long gone are deleted.
const BATCH_ROWS_KEPT_S: u64 = 7 * 86_400;

/// Which rows of a query: the keys after `after` (all, when `None`), in
/// order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The key the previous page ended with.
    pub after: Option<String>,
    /// The most rows.
    pub limit: usize,
}

impl Page {
    /// Every row.
    pub const ALL: Page = Page {
        after: None,
        limit: usize::MAX,
    };
}

/// Changed counters waiting to be written: group → day → key → totals.
pub(super) type Pending = [BTreeMap<u64, BTreeMap<String, Totals>>; 2];

/// The open database, as written: the connection every commit goes
/// through. It is moved to a blocking thread for each persist (a commit
/// syncs the write-ahead log, seconds on a slow disk) and back; the
/// admin thread reads through a [`Reader`] meanwhile.
#[derive(Debug)]
pub(super) struct Store {
    conn: Connection,
    /// The state directory it lives in.
    pub dir: PathBuf,
    /// The database file's device and inode when it was opened, to tell
    /// whether `dir/usage.db` is still the file written.
    file_id: (u64, u64),
    /// This process's name in the `batches` table.
    writer: String,
}

/// A second connection to the database, on the admin thread, for the
/// queries. In write-ahead-log mode a reader never waits for a commit:
/// each read transaction sees the database as of the last commit before
/// it began. With each snapshot comes the sequence number of this
/// process's last batch in it, so a query tells a batch still being
/// committed (merged from memory) from one already in the snapshot.
#[derive(Debug)]
pub(super) struct Reader {
    conn: Connection,
    /// The state directory it lives in.
    pub dir: PathBuf,
    /// The [`Store`]'s name in the `batches` table.
    writer: String,
}

/// The shape of `usage.json`.
#[derive(serde::Deserialize)]
struct JsonBook {
    #[serde(default)]
    by_account: BTreeMap<u64, BTreeMap<String, Totals>>,
    #[serde(default)]
    by_device: BTreeMap<u64, BTreeMap<String, Totals>>,
}

fn grp(g: GroupBy) -> i64 {
    match g {
        GroupBy::Account => 0,
        GroupBy::Device => 1,
    }
}

/// u64 → SQLite integer. Counters never reach 2^63; saturate if one did.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// SQLite value → u64 (an addition that overflowed i64 becomes a REAL in
/// SQLite; it is read back saturated rather than failing the query).
fn uint(v: Value) -> u64 {
    match v {
        Value::Integer(i) => u64::try_from(i).unwrap_or(0),
        Value::Real(f) if f > 0.0 => f as u64,
        _ => 0,
    }
}

/// A file's device and inode.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

fn io_err(e: rusqlite::Error) -> std::io::Error {
    std::io::Error::other(format!("usage ledger database: {e}"))
}

/// Each device's audio milliseconds on `day` in the ledger in `dir`, read
/// without changing anything (the database opened read-only; none there
/// is no usage). At start, so a daily audio allowance counts what the
/// device streamed before a restart.
pub fn device_audio_on(dir: &Path, day: u64) -> std::io::Result<Vec<(String, u64)>> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(io_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(io_err)?;
    device_audio_rows(&conn, day).map_err(io_err)
}

/// Each device's audio milliseconds on `day` in the database `conn`.
fn device_audio_rows(conn: &Connection, day: u64) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut st = conn.prepare_cached(
        "SELECT key, audio_ms FROM totals WHERE grp = ?1 AND day = ?2 AND audio_ms > 0",
    )?;
    let rows = st
        .query_map(params![grp(GroupBy::Device), int(day)], |r| {
            Ok((r.get::<_, String>(0)?, uint(r.get(1)?)))
        })?
        .collect();
    rows
}

impl Store {
    /// Opens (or creates) `dir/usage.db` and imports a `usage.json` found
    /// beside it.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        // Private, as the start makes it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join(DB_FILE);
        // Create it 0600 before SQLite does (SQLite would use 0644 less
        // the umask), and correct the mode of a file made otherwise.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        for suffix in ["", "-wal", "-shm"] {
            let p = dir.join(format!("{DB_FILE}{suffix}"));
            if p.exists() {
                std::fs::set_permissions(&p, Permissions::from_mode(0o600))?;
            }
        }
        let conn = Connection::open(&path).map_err(io_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(io_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(io_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(io_err)?;
        conn.execute_batch(SCHEMA).map_err(io_err)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut store = Store {
            conn,
            dir: dir.to_path_buf(),
            file_id: file_id(&std::fs::metadata(&path)?),
            writer: format!("{}-{}", std::process::id(), now.as_nanos()),
        };
        store.migrate_json()?;
        Ok(store)
    }

    /// A [`Reader`] of this database.
    pub fn reader(&self) -> std::io::Result<Reader> {
        let conn = Connection::open_with_flags(
            self.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(io_err)?;
        // A reader waits only while SQLite recovers a log another
        // connection left: rare, and brief.
        conn.busy_timeout(std::time::Duration::from_secs(1))
            .map_err(io_err)?;
        Ok(Reader {
            conn,
            dir: self.dir.clone(),
            writer: self.writer.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    /// Whether `dir/usage.db` is gone (removed, or its directory removed
    /// or moved) while this store writes it: SQLite goes on writing the
    /// file through the descriptor it holds, which no restart finds.
    /// Then the ledger is copied back there from the open database
    /// (`VACUUM INTO` a temp file made 0600, fsync, rename, the directory
    /// made 0700 if missing and synced) and opened again there; `true`
    /// when that was done. A file another one replaced is left alone and
    /// is an error: which of the two is the ledger is the operator's call.
    pub fn keep_in_place(&mut self) -> std::io::Result<bool> {
        let path = self.path();
        match std::fs::metadata(&path) {
            Ok(m) if file_id(&m) == self.file_id => return Ok(false),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is another file than the one the relay opened (replaced under \
                     it); the relay goes on writing its own, which is no longer in the \
                     directory: restart it to take the new file, or put its own back \
                     (the relay's copy of the ledger is lost at a restart)",
                    path.display()
                )))
            }
            Err(e) if crate::control::usage::is_gone(&e) => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ))
            }
        }
        let gone = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{} is gone (removed, or its directory moved) and cannot be written \
                     there again ({e}); the relay goes on writing the copy it holds open",
                    path.display()
                ),
            )
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(gone)?;
        let tmp = self
            .dir
            .join(format!(".{DB_FILE}.tmp-{}", std::process::id()));
        let copied = (|| {
            let _ = std::fs::remove_file(&tmp);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let into = tmp
                .to_str()
                .ok_or_else(|| std::io::Error::other("the state directory's path is not UTF-8"))?;
            self.conn
                .execute("VACUUM INTO ?1", [into])
                .map_err(io_err)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(gone(e));
        }
        match Store::open(&self.dir) {
            Ok(store) => {
                let writer = std::mem::take(&mut self.writer);
                *self = Store { writer, ..store };
            }
            Err(e) => {
                // The copy goes, so the next persist finds the file gone
                // again and tries anew (the open one holds it all), rather
                // than take the copy for a file put there by someone else.
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{DB_FILE}{suffix}")));
                }
                return Err(gone(e));
            }
        }
        Ok(true)
    }

    /// Imports `usage.json` once (see the module docs).
    fn migrate_json(&mut self) -> std::io::Result<()> {
        let json = self.dir.join(JSON_FILE);
        let bytes = match std::fs::read(&json) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let digest = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        let done: Option<i64> = self
            .conn
            .query_row(
                "SELECT at FROM migrations WHERE sha256 = ?1",
                [&digest],
                |r| r.get(0),
            )
            .optional()
            .map_err(io_err)?;
        if done.is_none() {
            let book: JsonBook = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a usage ledger ({e}); move it away to start without it",
                        json.display()
                    ),
                )
            })?;
            let tx = self.conn.transaction().map_err(io_err)?;
            write(&tx, &[book.by_account, book.by_device], None).map_err(io_err)?;
            tx.execute(
                "INSERT INTO migrations (sha256, at) VALUES (?1, ?2)",
                params![digest, int(crate::control::accounts::unix_now())],
            )
            .map_err(io_err)?;
            tx.commit().map_err(io_err)?;
            tracing::info!(file = %json.display(), "usage.json imported into the usage ledger database");
        }
        std::fs::rename(&json, self.dir.join(format!("{JSON_FILE}.migrated")))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Adds `pending` to the stored counters, deletes every day up to
    /// `prune_through` and records `seq` as this process's last batch, in
    /// one transaction.
    pub fn flush(
        &mut self,
        pending: &Pending,
        prune_through: Option<u64>,
        seq: u64,
    ) -> std::io::Result<()> {
        let now = crate::control::accounts::unix_now();
        let tx = self.conn.transaction().map_err(io_err)?;
        write(&tx, pending, prune_through).map_err(io_err)?;
        tx.execute(
            "INSERT INTO batches (writer, seq, at) VALUES (?1, ?2, ?3)
             ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, at = excluded.at",
            params![self.writer, int(seq), int(now)],
        )
        .map_err(io_err)?;
        tx.execute(
            "DELETE FROM batches WHERE at < ?1",
            [int(now.saturating_sub(BATCH_ROWS_KEPT_S))],
        )
        .map_err(io_err)?;
        tx.commit().map_err(io_err)
    }

    /// The days with data, from the account rows (every record adds to an
    /// account row and a device row of the same day).
    pub fn days(&self) -> std::io::Result<Vec<u64>> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT day FROM totals WHERE grp = 0 ORDER BY day")
            .map_err(io_err)?;
        let days = st
            .query_map([], |r| r.get::<_, Value>(0))
            .map_err(io_err)?
            .map(|d| d.map(uint))
            .collect::<rusqlite::Result<Vec<u64>>>()
            .map_err(io_err)?;
        Ok(days)
    }

    /// Moves the write-ahead log into the database file and empties it
    /// (SQLite also does this by itself every 1,000 pages).
    #[cfg(test)]
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}

impl Reader {
    /// A read transaction: the database as of the last commit, and the
    /// last batch of this process's [`Store`] in it.
    pub fn snapshot(&self) -> rusqlite::Result<Snapshot<'_>> {
        let tx = self.conn.unchecked_transaction()?;
        let committed = tx
            .query_row(
                "SELECT seq FROM batches WHERE writer = ?1",
                [&self.writer],
                |r| r.get::<_, Value>(0),
            )
            .optional()?
            .map_or(0, uint);
        Ok(Snapshot { tx, committed })
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    /// SQLite's `data_version`: it moves when another connection commits
    /// (this process's [`Store`], or another process on the state
    /// directory).
    pub fn data_version(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("PRAGMA data_version", [], |r| r.get(0))
    }
}

/// One read transaction of a [`Reader`] (ended when dropped).
pub(super) struct Snapshot<'a> {
    tx: rusqlite::Transaction<'a>,
    /// The sequence number of this process's last batch in it (0: none).
    pub committed: u64,
}

impl Snapshot<'_> {
    /// Stored rows of `group` over the days `from..=to`, each key's days
    /// merged: of the keys after `page.after`, the first `page.limit`, and
    /// the one after them if there is one (which tells the caller there
    /// are more).
    ///
    /// Rows are stored by day and then key, so each day gives its first
    /// keys after `page.after` in order, and no more than the page can
    /// use: a key among the page's is among the first `page.limit` + 1 of
    /// every day it has a row on. So a page reads at most that many rows
    /// a day and holds that many keys, however many devices the days had.
    pub fn query(
        &self,
        group: GroupBy,
        from: u64,
        to: u64,
        page: &Page,
    ) -> rusqlite::Result<BTreeMap<String, Totals>> {
        let g = grp(group);
        let after = page.after.as_deref().unwrap_or("");
        // SQLite's LIMIT is an i64; -1 is none.
        let take = i64::try_from(page.limit.saturating_add(1)).unwrap_or(-1);
        // Every stream's day has its account's row: the accounts' rows
        // (a few a day) name the days.
        let days: Vec<i64> = self
            .tx
            .prepare_cached(
                "SELECT DISTINCT day FROM totals WHERE grp = 0 AND day BETWEEN ?1 AND ?2",
            )?
            .query_map(params![int(from), int(to)], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        let mut st = self.tx.prepare_cached(
            "SELECT key, streams, audio_ms, audio_ms_relay, bytes_up, bytes_down FROM totals
             WHERE grp = ?1 AND day = ?2 AND key > ?3 ORDER BY key LIMIT ?4",
        )?;
        for day in &days {
            let mut rows = st.query(params![g, day, after, take])?;
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                if out.len() > page.limit && !out.contains_key(&key) {
                    // The page (and the one key after it) is full: a key
                    // before its last takes that one's place; the day's
                    // other keys come after this one.
                    if out.last_key_value().is_some_and(|(last, _)| key > *last) {
                        break;
                    }
                    out.pop_last();
                }
                let t = Totals {
                    streams: uint(r.get(1)?),
                    audio_ms: uint(r.get(2)?),
                    audio_ms_relay: uint(r.get(3)?),
                    bytes_up: uint(r.get(4)?),
                    bytes_down: uint(r.get(5)?),
                    errors: BTreeMap::new(),
                };
                out.entry(key).or_default().merge(&t);
            }
        }
        let Some(last) = out.last_key_value().map(|(k, _)| k.clone()) else {
            return Ok(out);
        };
        let mut st = self.tx.prepare_cached(
            "SELECT key, code, n FROM errors WHERE grp = ?1 AND day = ?2 AND key > ?3 AND key <= ?4",
        )?;
        for day in &days {
            let mut rows = st.query(params![g, day, after, last])?;
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                // A key the page let go on the way has no row in it.
                let Some(t) = out.get_mut(&key) else {
                    continue;
                };
                let code = u16::try_from(uint(r.get(1)?)).unwrap_or(u16::MAX);
                *t.errors.entry(code).or_default() += uint(r.get(2)?);
            }
        }
        Ok(out)
    }

    /// Audio milliseconds per account over every day stored, and every
    /// day dropped past the days kept.
    pub fn audio_ms_all_time(&self) -> rusqlite::Result<BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        let mut st = self.tx.prepare_cached(
            "SELECT key, sum(audio_ms) FROM totals WHERE grp = 0 GROUP BY key
             UNION ALL SELECT key, audio_ms FROM retired",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            *out.entry(r.get(0)?).or_default() += uint(r.get(1)?);
        }
        Ok(out)
    }

    /// Each device's audio milliseconds on `day`, as stored.
    pub fn device_audio_on(&self, day: u64) -> rusqlite::Result<Vec<(String, u64)>> {
        device_audio_rows(&self.tx, day)
    }
}

/// Adds `pending` into the tables and prunes, inside `tx`.
fn write(
    tx: &rusqlite::Transaction<'_>,
    pending: &Pending,
    prune_through: Option<u64>,
) -> rusqlite::Result<()> {
    let mut totals = tx.prepare_cached(
        "INSERT INTO totals (grp, day, key, streams, audio_ms, audio_ms_relay, bytes_up, bytes_down)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (grp, day, key) DO UPDATE SET
            streams = streams + excluded.streams,
            audio_ms = audio_ms + excluded.audio_ms,
            audio_ms_relay = audio_ms_relay + excluded.audio_ms_relay,
            bytes_up = bytes_up + excluded.bytes_up,
            bytes_down = bytes_down + excluded.bytes_down",
    )?;
    let mut errors = tx.prepare_cached(
        "INSERT INTO errors (grp, day, key, code, n) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (grp, day, key, code) DO UPDATE SET n = n + excluded.n",
    )?;
    for (g, book) in [GroupBy::Account, GroupBy::Device].into_iter().zip(pending) {
        for (day, keys) in book {
            for (key, t) in keys {
                totals.execute(params![
                    grp(g),
                    int(*day),
                    key,
                    int(t.streams),
                    int(t.audio_ms),
                    int(t.audio_ms_relay),
                    int(t.bytes_up),
                    int(t.bytes_down)
                ])?;
                for (code, n) in &t.errors {
                    errors.execute(params![grp(g), int(*day), key, i64::from(*code), int(*n)])?;
                }
            }
        }
    }
    if let Some(last) = prune_through {
        // The accounts' audio of the days dropped stays in their all-time
        // totals (`clio_relay_audio_seconds_total` never goes down).
        tx.execute(
            "INSERT INTO retired (key, audio_ms)
             SELECT key, sum(audio_ms) FROM totals WHERE grp = 0 AND day <= ?1 GROUP BY key
             ON CONFLICT (key) DO UPDATE SET audio_ms = audio_ms + excluded.audio_ms",
            [int(last)],
        )?;
        tx.execute("DELETE FROM totals WHERE day <= ?1", [int(last)])?;
        tx.execute("DELETE FROM errors WHERE day <= ?1", [int(last)])?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
