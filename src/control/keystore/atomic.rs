//! Crash-safe replacement of one file: write a temp file beside it, fsync,
//! rename over the target, fsync the directory.
//!
//! `rename(2)` within one directory is atomic: a reader (or the next boot)
//! sees the old file or the new one, never a mix. The fsync before the
//! rename makes sure the new name never points at data still in the page
//! cache only; the directory fsync after it makes the rename itself durable.
//! A crash before the rename leaves a stray temp file, which
//! [`remove_stale_temps`] deletes the next time the store is opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

/// Prefix of the store's temp files: hidden, and named after the store so
/// a glance at the directory says what they are. Every temp file is named
/// after its target this way (`.key-dates.json.tmp-…` for the key dates).
pub const TEMP_PREFIX: &str = ".accounts.store.tmp-";

/// Makes temp names unique within the process (with the pid, across processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `dir` with mode 0700 if it is missing (parents too), and makes
/// its entry durable.
pub fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let _disk = crate::core::disk_wait::writing();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io(format!("creating state directory {}", dir.display()), e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Replaces `target` (in `dir`) with `bytes`, mode 0600: after this returns
/// `Ok`, readers see the new content, but it is durable only once
/// [`sync_dir`] on `dir` has succeeded too (the caller does that, because a
/// failure there means "replaced, durability unknown", not "unchanged").
/// On `Err` the target is untouched.
pub fn write_and_rename(
    dir: &Path,
    target: &Path,
    bytes: &[u8],
) -> Result<fs::Metadata, StoreError> {
    let _disk = crate::core::disk_wait::writing();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = write_synced(&temp, bytes).and_then(|written| {
        fs::rename(&temp, target).map(|()| written).map_err(|e| {
            StoreError::io(
                format!("renaming {} to {}", temp.display(), target.display()),
                e,
            )
        })
    });
    if result.is_err() {
        // Best effort: the write already failed; a leftover is removed on
        // the next open anyway.
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Writes a new file (it must not exist) with mode 0600 and fsyncs it;
/// its metadata, read from the file itself (the rename keeps its inode,
/// modification time and size, and a later writer's file is another).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<fs::Metadata, StoreError> {
    let ctx = |what: &str, e: io::Error| StoreError::io(format!("{what} {}", path.display()), e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ctx("creating", e))?;
    file.write_all(bytes).map_err(|e| ctx("writing", e))?;
    file.sync_all().map_err(|e| ctx("syncing", e))?;
    file.metadata()
        .map_err(|e| ctx("reading the metadata of", e))
}

/// Fsyncs a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let _disk = crate::core::disk_wait::writing();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

/// The other state files whose temp files are written as the store's
/// (`.NAME.tmp-PID-N`), without the store's lock.
const OTHER_TEMPS: [&str; 2] = [".revocations.json.tmp-", ".key-dates.json.tmp-"];

/// Whether `name` is a temp file no writer will rename: the store's (the
/// caller holds its lock), or another state file's whose writer is gone.
fn is_stale_temp(name: &str) -> bool {
    if name.starts_with(TEMP_PREFIX) {
        return true;
    }
    OTHER_TEMPS.iter().any(|prefix| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    })
}

/// Deletes temp files left by a writer that died before its rename.
/// Returns how many were removed. Call only while holding the store lock.
///
/// The store's temp files are every writer's under that lock, so all are
/// stale. The other state files' (`revocations.json`, `key-dates.json`,
/// written without it) are removed only when the process named in them
/// is gone: the other relay of a hand-over restart may be writing one.
/// Before, each `kill -9` in the middle of such a write left its temp
/// file for good.
pub fn remove_stale_temps(dir: &Path) -> Result<usize, StoreError> {
    let ctx = |e| StoreError::io(format!("listing {}", dir.display()), e);
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(ctx)? {
        let entry = entry.map_err(ctx)?;
        if entry.file_name().to_str().is_some_and(is_stale_temp) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(
                        format!("removing stale {}", entry.path().display()),
                        e,
                    ))
                }
            }
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}
