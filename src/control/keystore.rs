//! The encrypted, crash-safe store of accounts and API keys added at runtime.
//!
//! Accounts come from two places: the config file (`[[account]]`, keys from
//! env vars or files) and this store, which the admin API changes while the
//! relay runs. The store is one file, `<state dir>/accounts.store` (state dir
//! `/var/lib/clio-relay` by default, see [`DEFAULT_STATE_DIR`]), sealed with
//! AES-256-GCM under a [`MasterKey`] read from an env var or a file (a
//! systemd credential). Keys are shown anywhere only as
//! [`Secret::fingerprint`](crate::core::secret::Secret::fingerprint)s: nothing here
//! prints one, and no error message quotes file contents.
//!
//! # File format
//! Three text lines (details in `format.rs`): `CLIO-KEYSTORE v1`, `key
//! <check of the master key>`, and the base64 of a fresh 12-byte nonce, the
//! AES-256-GCM ciphertext of a JSON document and its tag, with the first two
//! lines as associated data. A wrong master key is reported as
//! [`StoreError::WrongMasterKey`]; a file that is cut short, edited or not a
//! store at all as [`StoreError::Corrupt`]. The file is mode 0600, the
//! directory 0700 when this module creates it.
//!
//! # Crash safety
//! Every [`KeyStore::save`] writes a temp file beside the store, fsyncs it,
//! renames it over the store and fsyncs the directory, so a crash or
//! `kill -9` at any moment leaves the old store or the new one. Temp files
//! left by a killed writer are deleted by [`KeyStore::open`]. Saves are
//! serialized (a mutex in the process, `flock` on `.accounts.store.lock`
//! across processes) and compare-and-swap on [`StoreData::generation`]: data
//! loaded before someone else's save is refused with
//! [`StoreError::Conflict`] instead of silently undoing that save.
//!
//! # Merge rule ([`merge`])
//! Accounts merge by id:
//! 1. A store account replaces the config-file account of the same id
//!    *entirely* (key, region, flags): runtime changes win until the store
//!    entry is removed. [`MergedAccount::shadows_config`] marks these so the
//!    operator can be told that editing the config entry has no effect.
//! 2. Otherwise an id listed in [`StoreData::removed`] is dropped even if the
//!    config file has it (removing an account at runtime survives restarts).
//!    Adding the id to the store again ([`StoreData::upsert`]) un-removes it.
//! 3. Otherwise the config-file account is served, with the fields of its
//!    [`AccountOverride`] (if any) replacing `enabled` and
//!    `max_concurrent_streams`. This is the one addition to the issue's rule:
//!    it lets an operator disable a config account at runtime without
//!    copying its key into the store, so the key keeps a single home and a
//!    key rotated in the config file still takes effect.
//! 4. Retiring keys whose `retire_at` is not after `now` are dropped.
//!
//! Config accounts keep their file order; store-only accounts follow in
//! store order.
//!
//! # Example
//! ```
//! use clio_relay::control::keystore::{merge, unix_now, KeyStore, MasterKey, StoredAccount, StoredKey};
//! use clio_relay::core::secret::Secret;
//!
//! let dir = std::env::temp_dir().join(format!("clio-keystore-doc-{}", std::process::id()));
//! let store = KeyStore::open(&dir, MasterKey::from_hex(&"5a".repeat(32))?)?;
//! let mut data = store.load()?; // empty the first time
//! data.upsert(StoredAccount {
//!     id: "runtime-1".into(),
//!     region: "us-east".into(),
//!     pool: "default".into(),
//!     enabled: true,
//!     max_concurrent_streams: 100,
//!     key: StoredKey { key: Secret::new("soniox-key"), created_at: unix_now() },
//!     retiring: Vec::new(),
//! });
//! store.save(&mut data)?; // generation 0 -> 1, atomically
//! let accounts = merge(&[], &store.load()?, unix_now());
//! assert_eq!(accounts[0].id, "runtime-1");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), clio_relay::control::keystore::StoreError>(())
//! ```

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

mod atomic;
mod data;
mod format;
pub mod key_dates;
mod master;
mod merge;

pub use data::{AccountOverride, DataError, RetiringKey, StoreData, StoredAccount, StoredKey};
pub use format::MAGIC;
pub use key_dates::KeyDates;

/// Replaces `path` with `bytes` as the store replaces itself (temp file
/// mode 0600, fsync, rename, fsync of the directory; the directory made
/// mode 0700 if missing; the temp removed if the write fails), for the
/// other files of the state directory. The error names what failed and
/// on which path.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<std::fs::Metadata> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    atomic::ensure_dir(dir)
        .and_then(|()| atomic::write_and_rename(dir, path, bytes))
        .and_then(|written| atomic::sync_dir(dir).map(|()| written))
        .map_err(|e| match e {
            StoreError::Io { context, source } => {
                io::Error::new(source.kind(), format!("{context}: {source}"))
            }
            other => io::Error::other(other.to_string()),
        })
}
pub use master::{MasterKey, MASTER_KEY_BYTES};
pub use merge::{merge, MergedAccount, MergedRetiring, Source};

/// Where the store lives unless configured otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/clio-relay";

/// The store file's name inside the state directory.
pub const STORE_FILE: &str = "accounts.store";

/// The lock file serializing writers across processes.
const LOCK_FILE: &str = ".accounts.store.lock";

/// The current time in unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The encrypted account store in one state directory.
pub struct KeyStore {
    /// The state directory: temp files are written here so the rename that
    /// replaces the store stays within one file system (atomic).
    dir: PathBuf,
    /// `<dir>/accounts.store`.
    path: PathBuf,
    /// The key the file is sealed under.
    master: MasterKey,
    /// Serializes saves within the process (the flock does it across
    /// processes, but flock locks are per open file, not per thread).
    write_lock: Mutex<()>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it is
    /// missing, and deletes temp files a killed writer left behind. A missing
    /// store file is an empty store; the file is only read by
    /// [`KeyStore::load`].
    pub fn open(dir: &Path, master: MasterKey) -> Result<KeyStore, StoreError> {
        atomic::ensure_dir(dir)?;
        let store = KeyStore {
            dir: dir.to_path_buf(),
            path: dir.join(STORE_FILE),
            master,
            write_lock: Mutex::new(()),
        };
        let _lock = store.lock_exclusive()?;
        atomic::remove_stale_temps(dir)?;
        Ok(store)
    }

    /// Reads and decrypts the store; an absent file is an empty store
    /// (generation 0).
    pub fn load(&self) -> Result<StoreData, StoreError> {
        let mut bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StoreData::default()),
            Err(e) => {
                return Err(StoreError::io(
                    format!("reading {}", self.path.display()),
                    e,
                ))
            }
        };
        let result = format::open(&self.master, &bytes).and_then(|mut json| {
            let data = StoreData::from_json(&json);
            master::wipe(&mut json);
            data
        });
        master::wipe(&mut bytes);
        result.map_err(|e| match e {
            StoreError::Corrupt(why) => {
                StoreError::Corrupt(format!("{}: {why}", self.path.display()))
            }
            other => other,
        })
    }

    /// Writes `data` as the new store, atomically. `data.generation` must be
    /// the generation on disk (what [`KeyStore::load`] returned, or the value
    /// the last successful save left in `data`); it is incremented and the
    /// new value is what the file holds. On error nothing changes, on disk or
    /// in `data`, with one exception: if only the final fsync of the
    /// directory fails, the new store is already in place (readers see it,
    /// `data.generation` is its generation) but may not survive a power loss.
    pub fn save(&self, data: &mut StoreData) -> Result<(), StoreError> {
        data.validate().map_err(StoreError::Invalid)?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The state directory removed under the running relay: made
        // again (0700), or the lock below fails and no change is saved.
        atomic::ensure_dir(&self.dir)?;
        let _lock = self.lock_exclusive()?;
        let on_disk = self.load()?.generation;
        if on_disk != data.generation {
            return Err(StoreError::Conflict {
                on_disk,
                given: data.generation,
            });
        }
        data.generation += 1;
        let mut json = data.to_json();
        let sealed = format::seal(&self.master, &json);
        master::wipe(&mut json);
        if let Err(e) = sealed.and_then(|b| atomic::write_and_rename(&self.dir, &self.path, &b)) {
            data.generation -= 1;
            return Err(e);
        }
        // The new store is in place (and `data.generation` is its
        // generation) even if this fails: the error then means only that
        // the rename may not survive a power loss.
        atomic::sync_dir(&self.dir)
    }

    /// `data` sealed in the store file's format (AES-256-GCM under the
    /// master key): what a fleet keeps in its shared store, so keys are
    /// never there in the clear.
    pub fn seal_data(&self, data: &StoreData) -> Result<Vec<u8>, StoreError> {
        data.validate().map_err(StoreError::Invalid)?;
        let mut json = data.to_json();
        let sealed = format::seal(&self.master, &json);
        master::wipe(&mut json);
        sealed
    }

    /// Opens what [`KeyStore::seal_data`] sealed (under the same master key).
    pub fn open_data(&self, sealed: &[u8]) -> Result<StoreData, StoreError> {
        format::open(&self.master, sealed).and_then(|mut json| {
            let data = StoreData::from_json(&json);
            master::wipe(&mut json);
            data
        })
    }

    /// The store file's path (`<dir>/accounts.store`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The master key's check value (safe to log: says which key is in use).
    pub fn master_check(&self) -> String {
        self.master.check()
    }

    /// Takes the cross-process writer lock (released when dropped).
    fn lock_exclusive(&self) -> Result<Flock<File>, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            StoreError::io(format!("locking {}", path.display()), errno.into())
        })
    }
}

/// Why a store operation failed. No variant ever holds key material or
/// file contents.
#[derive(Debug)]
pub enum StoreError {
    /// A file system operation failed; `context` says which and on what path.
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The store file is damaged, cut short, or not a store file.
    Corrupt(String),
    /// The file was sealed under a different master key.
    WrongMasterKey,
    /// The master key could not be read or is not 32 bytes of hex.
    BadMasterKey(String),
    /// The data to save breaks the store's rules (duplicate id, empty key...).
    Invalid(DataError),
    /// The store changed since `data` was loaded: reload and reapply.
    Conflict {
        /// The generation in the file.
        on_disk: u64,
        /// The generation of the data given to save.
        given: u64,
    },
    /// The cryptography library failed (e.g. no randomness).
    Crypto(String),
}

impl StoreError {
    fn io(context: String, source: io::Error) -> StoreError {
        StoreError::Io { context, source }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { context, source } => write!(f, "key store: {context}: {source}"),
            StoreError::Corrupt(why) => write!(f, "key store is damaged: {why}"),
            StoreError::WrongMasterKey => f.write_str(
                "key store was sealed under a different master key (check the master key setting)",
            ),
            StoreError::BadMasterKey(why) => write!(f, "master key: {why}"),
            StoreError::Invalid(why) => write!(f, "key store: refusing to save: {why}"),
            StoreError::Conflict { on_disk, given } => write!(
                f,
                "key store changed since it was read (generation {on_disk} on disk, {given} given); \
                 reload and try again"
            ),
            StoreError::Crypto(why) => write!(f, "key store: {why}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
