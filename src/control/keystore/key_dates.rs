//! When each config-file key was first seen, so a key's age survives
//! restarts: `<state dir>/key-dates.json`, by key fingerprint.
//!
//! A key from the config file carries no date of its own. Counting its age
//! from the process start would make `admin.rotation_period` meaningless on
//! a relay restarted more often than that. So the relay records, the first
//! time it loads a key (at start or on a reload), the fingerprint and the
//! time, and dates the key from that record ever after. Only fingerprints
//! are written, never keys; the file holds the keys of the current config
//! file, so it stays small. It is replaced atomically (temp file, fsync,
//! rename), mode 0600. A missing or unreadable file only means keys are
//! dated from now, with a warning; it never stops the relay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::config::AccountConfig;
use crate::core::secret::Secret;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "key-dates.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    /// Unix seconds each key (by fingerprint) was first seen.
    first_seen: BTreeMap<String, u64>,
}

/// The first-seen dates of config-file keys in one state directory.
#[derive(Debug)]
pub struct KeyDates {
    dir: PathBuf,
    doc: Document,
}

impl KeyDates {
    /// Reads `dir/key-dates.json`; missing means no key seen yet. An
    /// unreadable or malformed file is logged and treated as empty.
    pub fn load(dir: &Path) -> KeyDates {
        let path = dir.join(FILE_NAME);
        let doc = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "key dates unreadable; config keys are dated from now");
                Document::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "key dates unreadable; config keys are dated from now");
                Document::default()
            }
        };
        KeyDates {
            dir: dir.to_path_buf(),
            doc,
        }
    }

    /// When `key` was first seen: its record, or `now` (then recorded).
    /// A record later than `now` (made while the clock was ahead, since
    /// put right) is dated `now`: kept, it would have the key's age count
    /// from 0 at every start until the clock reached it.
    pub fn first_seen(&mut self, key: &Secret, now: u64) -> u64 {
        let at = self.doc.first_seen.entry(key.fingerprint()).or_insert(now);
        *at = (*at).min(now);
        *at
    }

    /// Keeps only the records of `accounts`' keys, dates any new one `now`,
    /// and writes the file. Returns each account's key date by id (keyless
    /// accounts have none). A failed write is logged: the dates still hold
    /// for this process.
    pub fn record(dir: &Path, accounts: &[AccountConfig], now: u64) -> BTreeMap<String, u64> {
        let mut dates = KeyDates::load(dir);
        let before = dates.doc.first_seen.clone();
        let mut kept = BTreeMap::new();
        let mut by_id = BTreeMap::new();
        for a in accounts.iter().filter(|a| a.has_key()) {
            let at = dates.first_seen(&a.key, now);
            kept.insert(a.key.fingerprint(), at);
            by_id.insert(a.id.clone(), at);
        }
        let changed = kept != before;
        dates.doc.first_seen = kept;
        if changed {
            if let Err(e) = dates.save() {
                tracing::warn!(dir = %dir.display(), error = %e, "key dates not saved; config keys' ages restart with the process");
            }
        }
        by_id
    }

    /// Writes `dir/key-dates.json` with `first_seen` (fingerprint → Unix
    /// seconds): the dates a running relay holds, when the file is gone
    /// from under it.
    pub fn write_again(
        dir: &Path,
        first_seen: BTreeMap<String, u64>,
    ) -> Result<(), super::StoreError> {
        KeyDates {
            dir: dir.to_path_buf(),
            doc: Document { first_seen },
        }
        .save()
    }

    /// Writes the file atomically, mode 0600 (the directory 0700 if made).
    pub fn save(&self) -> Result<(), super::StoreError> {
        super::atomic::ensure_dir(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(&self.doc).expect("a map of numbers serializes");
        super::atomic::write_and_rename(&self.dir, &self.dir.join(FILE_NAME), &bytes)?;
        super::atomic::sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("clio-key-dates-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn dates_survive_a_reload_and_only_fingerprints_are_written() {
        let d = dir("survive");
        let accounts = vec![
            AccountConfig::new("a", Secret::new("key-date-test-AAAA")),
            AccountConfig::new("b", Secret::new("key-date-test-BBBB")),
        ];
        let first = KeyDates::record(&d, &accounts, 1_000);
        assert_eq!(first["a"], 1_000);
        // Later (a restart): the same keys keep their date; a new key is new.
        let mut changed = accounts.clone();
        changed[1].key = Secret::new("key-date-test-CCCC");
        let later = KeyDates::record(&d, &changed, 5_000);
        assert_eq!((later["a"], later["b"]), (1_000, 5_000));
        let text = std::fs::read_to_string(d.join(FILE_NAME)).unwrap();
        assert!(!text.contains("key-date-test"), "{text}");
        assert!(text.contains(&accounts[0].key.fingerprint()), "{text}");
        // The replaced key's record is gone: the file holds the current keys.
        assert!(!text.contains(&accounts[1].key.fingerprint()), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_date_ahead_of_the_clock_is_dated_now() {
        let d = dir("ahead");
        let accounts = vec![AccountConfig::new("a", Secret::new("key-date-test-EEEE"))];
        assert_eq!(KeyDates::record(&d, &accounts, 50_000)["a"], 50_000);
        // The clock put back: the key is dated from now, and stays so.
        assert_eq!(KeyDates::record(&d, &accounts, 1_000)["a"], 1_000);
        assert_eq!(KeyDates::record(&d, &accounts, 2_000)["a"], 1_000);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_broken_file_dates_keys_from_now() {
        let d = dir("broken");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(FILE_NAME), "{not json").unwrap();
        let accounts = vec![AccountConfig::new("a", Secret::new("key-date-test-DDDD"))];
        assert_eq!(KeyDates::record(&d, &accounts, 7)["a"], 7);
        // And it was rewritten whole.
        assert_eq!(KeyDates::record(&d, &accounts, 9)["a"], 7);
        let _ = std::fs::remove_dir_all(&d);
    }
}
