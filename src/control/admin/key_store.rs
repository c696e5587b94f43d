//! Where the admin thread's account set is kept besides memory: the key
//! store, saved at each change (and again each second while a save
//! failed), another process's saves taken in (the other relay of a
//! hand-over restart), the store and `key-dates.json` written again when
//! they are gone from under the running relay; and in a fleet, the set
//! shared through the store and another node's set taken in and saved.

use crate::control::keystore::StoreError;
use crate::core::cluster::AccountsAnswer;

use super::{Admin, ShareError};

impl Admin {
    /// Saves the account set to the key store (if there is one), on the
    /// blocking thread ([`FileTurns`](super::file_turns::FileTurns)): the
    /// set as it is when this save's turn comes. A failure (a full disk)
    /// leaves the set marked unsaved, which
    /// [`Admin::save_unsaved_store`] tries again each second.
    pub(super) async fn persist(&self) -> Result<(), StoreError> {
        let Some(store) = &self.accounts.store else {
            return Ok(());
        };
        let saved = self
            .accounts
            .store_turns
            .write(|| {
                let data = self.accounts.set.borrow().to_store(
                    &self.accounts.configs.borrow(),
                    self.accounts.store_generation.get(),
                );
                let store = store.clone();
                move || save_over(&store, data)
            })
            .await;
        self.accounts.store_unsaved.set(saved.is_err());
        self.accounts.store_generation.set(saved?);
        Ok(())
    }

    /// Once a second: an account set whose save failed (a full disk, the
    /// file-size limit) is saved again, so a change answered "applied,
    /// but not saved" is not lost at the next restart once the disk has
    /// room; logged once when it is.
    pub(super) async fn save_unsaved_store(&self) {
        if !self.accounts.store_unsaved.get() || self.accounts.store_turns.busy() {
            return;
        }
        if self.persist().await.is_ok() {
            if let Some(store) = &self.accounts.store {
                tracing::info!(path = %store.path().display(), "account changes not saved before are saved in the key store now");
            }
        }
    }

    /// Once a second: `key-dates.json` missing from the state directory
    /// (removed under the running relay with its directory, or not saved
    /// at the start, the disk full) is written from the dates the running
    /// keys carry, so a restart does not date the config file's keys from
    /// then (and drop their rotation warnings). Logged once when written;
    /// a write that fails is tried again each second.
    pub(super) async fn keep_key_dates(&self) {
        if self.key_dates_turns.busy() {
            return;
        }
        let path = self
            .config
            .borrow()
            .state_dir
            .join(crate::control::keystore::key_dates::FILE_NAME);
        match std::fs::metadata(&path) {
            Err(e) if crate::control::usage::is_gone(&e) => {}
            _ => return,
        }
        let dates: std::collections::BTreeMap<String, u64> = {
            let set = self.accounts.set.borrow();
            self.accounts
                .configs
                .borrow()
                .iter()
                .filter(|a| a.has_key())
                .filter_map(|a| {
                    let fp = a.key.fingerprint();
                    set.entries()
                        .iter()
                        .flat_map(|e| std::iter::once(&e.current).chain(&e.retiring))
                        .find(|k| k.fingerprint == fp)
                        .map(|k| (fp, k.created_at))
                })
                .collect()
        };
        if dates.is_empty() {
            return;
        }
        let dir = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_owned();
        // A write that fails says nothing more: the start said `key dates
        // not saved`, or the state directory's other files say it is gone.
        let written = self
            .key_dates_turns
            .write(|| move || crate::control::keystore::KeyDates::write_again(&dir, dates))
            .await;
        if written.is_ok() {
            tracing::warn!(path = %path.display(), "key-dates.json was missing (removed under the running relay, or not saved at the start); written again with the dates the running keys carry");
        }
    }

    /// In a fleet: stores the account set, sealed under the master key, for
    /// every node to apply.
    pub(super) async fn share_accounts(&self) -> Result<(), ShareError> {
        let (Some(fleet), Some(store)) = (self.process.fleet.get(), &self.accounts.store) else {
            return Ok(());
        };
        let data = self.accounts.set.borrow().to_store(
            &self.accounts.configs.borrow(),
            self.accounts.store_generation.get(),
        );
        let sealed = store.seal_data(&data)?;
        match fleet
            .publish_accounts(Some(sealed), self.accounts.fleet_version.get())
            .await?
        {
            AccountsAnswer::Current(version) => {
                self.accounts.fleet_version.set(version);
                Ok(())
            }
            AccountsAnswer::Moved(version, set) => Err(ShareError::Moved(version, set)),
        }
    }

    /// In a fleet, before an account change: brings this node's set up to
    /// the fleet's, if another node stored one this node has not applied
    /// yet (its poll comes every 200 ms), so the change is made to it.
    /// An unreachable store is no reason to refuse: the change then
    /// follows the rules for one made while the store is down.
    pub(super) async fn catch_up_accounts(&self) {
        self.catch_up_store().await;
        let (Some(fleet), Some(_)) = (self.process.fleet.get(), &self.accounts.store) else {
            return;
        };
        let base = self.accounts.fleet_version.get();
        if let Ok(AccountsAnswer::Moved(version, set)) = fleet.publish_accounts(None, base).await {
            self.apply_moved(version, set.as_deref()).await;
        }
    }

    /// Alone (not in a fleet), with a key store: applies the account set
    /// another process saved in the store since this one last read or
    /// wrote it. That is the other relay of a hand-over restart, which
    /// shares the state directory: a key pulled on either one (the
    /// operator's `clio-relay keys` reaches the one at the config file's
    /// admin port, the old one) must reach the other, whose next change
    /// would otherwise write its own set over it. Only a later generation
    /// is taken: a store removed, or an older copy put back, by hand is
    /// written over at the next change, as before. Called once a second
    /// and before each change; the file is opened only when it changed.
    pub(super) async fn catch_up_store(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let Some(store) = &self.accounts.store else {
            return;
        };
        // While a save of this relay's is queued or under way, the file
        // is older than the running set: not another process's save.
        if self.process.fleet.get().is_some() || self.accounts.store_turns.busy() {
            return;
        }
        let meta = match std::fs::metadata(store.path()) {
            Ok(meta) => meta,
            Err(e) if crate::control::usage::is_gone(&e) => {
                self.store_gone().await;
                return;
            }
            Err(_) => return,
        };
        let stamp = (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size());
        if self.accounts.store_seen.replace(Some(stamp)) == Some(stamp) {
            return;
        }
        // A store that cannot be read here (damaged, being replaced) is
        // left to the next change, which keeps it aside and writes anew.
        let Ok(data) = store.load() else {
            return;
        };
        if data.generation <= self.accounts.store_generation.get() {
            return;
        }
        self.accounts.store_generation.set(data.generation);
        for change in self.apply_store_data(&data) {
            tracing::info!(change = %change, generation = data.generation, "account change saved in the key store by another process");
        }
    }

    /// The key store this relay saved is gone from the state directory
    /// (removed, or the directory removed or moved, under the running
    /// relay): the running set is written again, so a restart does not
    /// lose the changes made at runtime (an account whose key was pulled
    /// would come back from the config file with it). One that cannot be
    /// written is logged once (the next second tries again), and its
    /// return once. A relay that never saved one (generation 0) has
    /// nothing the config file does not hold.
    pub(super) async fn store_gone(&self) {
        if self.accounts.store_generation.get() == 0 {
            return;
        }
        let Some(store) = &self.accounts.store else {
            return;
        };
        let reported = &self.accounts.store_gone_reported;
        match self.persist().await {
            Ok(()) => {
                reported.set(false);
                tracing::warn!(
                    path = %store.path().display(),
                    "the key store was gone (removed, or its directory moved) under the running relay; the running account set is written there again"
                );
            }
            Err(e) if !reported.replace(true) => {
                tracing::error!(
                    path = %store.path().display(),
                    error = %e,
                    "the key store is gone (removed, or its directory moved) under the running relay and cannot be written again; a restart now loses the account changes made at runtime (trying again each second)"
                );
            }
            Err(_) => {}
        }
    }

    /// Applies a key store's accounts (another process's save, or the
    /// fleet's set) merged with the file's, and publishes them to the
    /// shards when anything changed; returns what changed.
    pub(super) fn apply_store_data(
        &self,
        data: &crate::control::keystore::StoreData,
    ) -> Vec<String> {
        let now = crate::control::accounts::unix_now();
        let merged = crate::control::keystore::merge(&self.accounts.configs.borrow(), data, now);
        let overlap = self.config.borrow().rotation_overlap;
        let log = self
            .accounts
            .set
            .borrow_mut()
            .apply_merged(&merged, overlap, now);
        if !log.is_empty() {
            self.publish();
        }
        log
    }

    /// Takes the fleet's set of `version` (none: the store holds none).
    pub(super) async fn apply_moved(&self, version: i64, set: Option<&[u8]>) {
        match set {
            Some(sealed) => self.apply_fleet_accounts(version, sealed).await,
            None => self.accounts.fleet_version.set(version),
        }
    }

    /// Applies the account set of `version` another node of the fleet stored.
    pub(super) async fn apply_fleet_accounts(&self, version: i64, sealed: &[u8]) {
        let Some(store) = &self.accounts.store else {
            return;
        };
        let data = match store.open_data(sealed) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "the fleet's account set cannot be opened here (is admin.master_key the same on every node?); account changes on this node are refused until it can");
                self.accounts.fleet_unreadable.set(true);
                return;
            }
        };
        self.accounts.fleet_unreadable.set(false);
        self.accounts.fleet_version.set(version);
        let log = self.apply_store_data(&data);
        if log.is_empty() {
            return;
        }
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "fleet account change applied but not saved to the key store");
        }
        for change in log {
            tracing::info!(change = %change, "account change from the fleet");
        }
    }
}

/// Writes `data` (built from the running set at the generation this relay
/// last wrote or read) as the key store, on the blocking thread; returns
/// the generation written.
fn save_over(
    store: &crate::control::keystore::KeyStore,
    mut data: crate::control::keystore::StoreData,
) -> Result<u64, StoreError> {
    match store.save(&mut data) {
        // Changed by something else since this relay last wrote it
        // (removed or restored by hand, another process on the state
        // dir): the store holds what this relay runs, so its set goes
        // over it. Refusing would refuse every later change too, and a
        // restart would lose them all.
        Err(StoreError::Conflict { on_disk, given }) => {
            tracing::warn!(
                path = %store.path().display(),
                generation_on_disk = on_disk,
                generation_written_last = given,
                "the key store was changed by something other than this relay; writing the running account set over it"
            );
            data.generation = on_disk;
            store.save(&mut data)?;
        }
        // Damaged under it (written over by hand, cut short): kept
        // aside, for whoever damaged it, and the running set written
        // anew. Else no change would be saved again, and the next
        // start would stop on the damaged file.
        Err(StoreError::Corrupt(why)) => {
            let aside = store.dir().join(format!(
                "{}.damaged-{}",
                crate::control::keystore::STORE_FILE,
                crate::control::accounts::unix_now()
            ));
            std::fs::rename(store.path(), &aside).map_err(|e| StoreError::Io {
                context: format!("moving the damaged store aside to {}", aside.display()),
                source: e,
            })?;
            tracing::warn!(
                damaged = %why,
                kept_as = %aside.display(),
                "the key store was damaged under this relay; kept aside, writing the running account set anew"
            );
            data.generation = 0;
            store.save(&mut data)?;
        }
        other => other?,
    }
    Ok(data.generation)
}
