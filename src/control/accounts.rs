//! The control plane's account set: the one authoritative list of accounts
//! and keys, owned by the admin thread. Every change becomes a new ring
//! version published to every shard ([`crate::dataplane::shard::ShardMsg::Ring`]);
//! shards install it between events.
//!
//! Enabling, disabling and limits are atomics in [`AccountState`], so they
//! take effect on every shard at once; adding, removing and rotating change
//! which slots and keys exist, so they go through a new ring version.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::core::config::AccountConfig;
use crate::core::keyring::{AccountState, KeySlot, RingSlot, MAX_ACCOUNTS};
use crate::core::secret::Secret;

/// A key an account may take: not empty, and one that can go in the
/// upgrade's Authorization header as it is.
fn check_key(key: &Secret) -> Result<(), ChangeError> {
    if key.expose().trim().is_empty() {
        Err(ChangeError::Invalid("the key is empty".into()))
    } else if !key.fits_a_header() {
        Err(ChangeError::Invalid(
            "the key has spaces, line breaks or non-ASCII characters: it goes in an HTTP header"
                .into(),
        ))
    } else {
        Ok(())
    }
}

/// A new key (the admin API's add and rotate) is at most
/// [`crate::core::config::MAX_KEY_BYTES`] long. Checked where a key comes
/// in, as a region is ([`check_region`]), not in [`Accounts::add`], so
/// that an account kept in the key store before the bound, or sent by an
/// older node of a fleet, is still loaded.
pub fn check_key_length(key: &str) -> Result<(), ChangeError> {
    let max = crate::core::config::MAX_KEY_BYTES;
    if key.len() > max {
        Err(ChangeError::Invalid(format!(
            "the key is longer than {max} bytes: it goes in every upgrade's header"
        )))
    } else {
        Ok(())
    }
}

/// An id an account can have: 1-64 of `[A-Za-z0-9._-]`.
///
/// A value refused here, as the pool, region and overlap the admin API
/// refuses, is not repeated in the answer: it may be a key pasted into
/// the wrong field, and the answer goes to terminals and CI logs.
fn check_id(id: &str) -> Result<(), ChangeError> {
    if crate::core::config::valid_account_id(id) {
        Ok(())
    } else {
        Err(ChangeError::Invalid(
            "the account id must be 1-64 of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

/// A region a new account can have: empty, or 1-64 of `[A-Za-z0-9._-]`.
/// Checked where an account comes in (the admin API; the config file's
/// own check), not in [`Accounts::add`], so that an account kept in the
/// key store before the bound, or sent by an older node of a fleet, is
/// still loaded.
pub fn check_region(region: &str) -> Result<(), ChangeError> {
    if crate::core::config::valid_region(region) {
        Ok(())
    } else {
        Err(ChangeError::Invalid(format!(
            "the region {}",
            crate::core::config::REGION_RULE
        )))
    }
}

/// Where an account's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file.
    Config,
    /// Added or changed at runtime (the admin API), kept in the key store.
    Store,
}

/// One account as the control plane knows it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Shared state (limits, health, live count).
    pub state: Arc<AccountState>,
    /// The key every new stream takes.
    pub current: Arc<KeySlot>,
    /// Keys being rotated out: they keep the streams they carry until their
    /// overlap ends.
    pub retiring: Vec<Arc<KeySlot>>,
    /// Config file or runtime.
    pub source: Source,
}

/// Why an account change was refused. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// No account with that id.
    NotFound(String),
    /// An account with that id exists already.
    Exists(String),
    /// A field is out of range or malformed.
    Invalid(String),
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The id is not repeated: no account has it, so it may be a key
            // given where the id goes (`keys rotate NEWKEY`, the id forgotten).
            ChangeError::NotFound(_) => f.write_str(
                "no account has that id (it is not repeated: it may be a key given in the \
                 wrong place)",
            ),
            ChangeError::Exists(id) => write!(f, "account {id:?} exists already"),
            ChangeError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ChangeError {}

/// The log lines of a reload for an account changed at runtime (source
/// `store`), which keeps its region, pool, flag and limit: one per field
/// the file changed since the last file and that the account does not
/// have, so a change the runtime one keeps out is not taken for applied.
fn kept_at_runtime(
    st: &AccountState,
    file: &AccountConfig,
    before: Option<&AccountConfig>,
) -> Vec<String> {
    let Some(p) = before else {
        return Vec::new();
    };
    let why = "changed at runtime; the file now says";
    let mut log = Vec::new();
    let region = st.region();
    if p.region != file.region && region != file.region {
        log.push(format!(
            "kept {} region {region:?} ({why} {:?})",
            file.id, file.region
        ));
    }
    if p.pool != file.pool && st.pool != file.pool {
        log.push(format!(
            "kept {} in pool {} ({why} {})",
            file.id, st.pool, file.pool
        ));
    }
    let state = |on: bool| if on { "enabled" } else { "disabled" };
    let enabled = st.enabled.load(Ordering::Relaxed);
    if p.enabled != file.enabled && enabled != file.enabled {
        log.push(format!(
            "kept {} {} ({why} {})",
            file.id,
            state(enabled),
            state(file.enabled)
        ));
    }
    let limit = st.max_concurrent.load(Ordering::Relaxed);
    if p.max_concurrent_streams != file.max_concurrent_streams
        && limit != file.max_concurrent_streams
    {
        log.push(format!(
            "kept {} max_concurrent_streams {limit} ({why} {})",
            file.id, file.max_concurrent_streams
        ));
    }
    log
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The authoritative account set.
#[derive(Debug)]
pub struct Accounts {
    epoch: Instant,
    /// The pools this relay serves (the default pool and `[pool.NAME]`, as
    /// at start): an account must belong to one of them.
    pools: Vec<String>,
    entries: Vec<Entry>,
    /// Account ids by metrics index, each with the state of the account
    /// that holds it. An index stays with its id while anything holds
    /// that state (the set, a live stream's lease, a shard's ring not yet
    /// replaced), so the index a stream records into is its own
    /// account's whatever changes; then [`Accounts::free_metrics_slots`]
    /// frees it (its id becomes empty: the account's series go) and a new
    /// id takes it. So add-and-remove churn keeps the per-account series
    /// and counters bounded.
    metrics_ids: Vec<(String, Weak<AccountState>)>,
    /// Removed accounts' states while streams still run on them: one
    /// added again under the same id, in the same pool, takes its state
    /// back, so its limit counts those streams (on the same key at
    /// Soniox, most likely) until they end.
    removed: Vec<Arc<AccountState>>,
    /// Rotated-out keys of removed accounts while streams still run on
    /// them: their retire time still holds (a key pulled with no overlap,
    /// then its account removed, has its streams moved off within a
    /// second, as without the removal).
    removed_retiring: Vec<Arc<KeySlot>>,
}

impl Accounts {
    /// The accounts of the config file, keys dated now; `pools`: the pools
    /// the relay serves.
    pub fn from_config(accounts: &[AccountConfig], pools: &[String], epoch: Instant) -> Accounts {
        let mut set = Accounts {
            epoch,
            pools: pools.to_vec(),
            entries: Vec::new(),
            metrics_ids: Vec::new(),
            removed: Vec::new(),
            removed_retiring: Vec::new(),
        };
        let now = unix_now();
        // A disabled account still waiting for its key is not loaded.
        for a in accounts.iter().filter(|a| a.has_key()) {
            // Config validation already refused duplicates and bad ids.
            let _ = set.add(
                &a.id,
                a.key.clone(),
                &a.region,
                &a.pool,
                a.enabled,
                a.max_concurrent_streams,
                now,
                Source::Config,
            );
        }
        set
    }

    /// The accounts of the config file merged with the key store's
    /// (`keystore::merge`: a store entry wins by id, removed ids stay gone,
    /// overrides apply).
    pub fn from_merged(
        merged: &[crate::control::keystore::MergedAccount],
        pools: &[String],
        epoch: Instant,
    ) -> Accounts {
        let mut set = Accounts {
            epoch,
            pools: pools.to_vec(),
            entries: Vec::new(),
            metrics_ids: Vec::new(),
            removed: Vec::new(),
            removed_retiring: Vec::new(),
        };
        let now = unix_now();
        for m in merged {
            let source = match m.source {
                crate::control::keystore::Source::Config => Source::Config,
                crate::control::keystore::Source::Store => Source::Store,
            };
            let created = now.saturating_sub(m.key_age_secs.unwrap_or(0));
            if let Err(e) = set.add(
                &m.id,
                m.key.clone(),
                &m.region,
                &m.pool,
                m.enabled,
                m.max_concurrent_streams,
                created,
                source,
            ) {
                tracing::warn!(account = %m.id, error = %e, "stored account not loaded");
            }
        }
        set
    }

    /// The key-store document that reproduces this set over the config
    /// file's `config` accounts: runtime accounts in full, flags changed on
    /// config accounts as overrides, config accounts removed at runtime as
    /// `removed`.
    pub fn to_store(
        &self,
        config: &[AccountConfig],
        generation: u64,
    ) -> crate::control::keystore::StoreData {
        use crate::control::keystore::{
            AccountOverride, RetiringKey, StoreData, StoredAccount, StoredKey,
        };
        let mut data = StoreData {
            generation,
            ..StoreData::default()
        };
        for e in &self.entries {
            let st = &e.state;
            let (enabled, max) = (
                st.enabled.load(Ordering::Relaxed),
                st.max_concurrent.load(Ordering::Relaxed),
            );
            match e.source {
                Source::Store => data.accounts.push(StoredAccount {
                    id: st.id.clone(),
                    region: st.region(),
                    pool: st.pool.clone(),
                    enabled,
                    max_concurrent_streams: max,
                    key: StoredKey {
                        key: e.current.key.clone(),
                        created_at: e.current.created_at,
                    },
                    retiring: e
                        .retiring
                        .iter()
                        .map(|k| RetiringKey {
                            key: StoredKey {
                                key: k.key.clone(),
                                created_at: k.created_at,
                            },
                            retire_at: k.retire_at.load(Ordering::Relaxed),
                        })
                        .collect(),
                }),
                Source::Config => {
                    if let Some(c) = config.iter().find(|c| c.id == st.id) {
                        if c.enabled != enabled || c.max_concurrent_streams != max {
                            data.overrides.push(AccountOverride {
                                id: st.id.clone(),
                                enabled: (c.enabled != enabled).then_some(enabled),
                                max_concurrent_streams: (c.max_concurrent_streams != max)
                                    .then_some(max),
                            });
                        }
                    }
                }
            }
        }
        // A keyless (disabled) config account is absent, not removed.
        for c in config.iter().filter(|c| c.has_key()) {
            if self.get(&c.id).is_none() {
                data.removed.push(c.id.clone());
            }
        }
        data
    }

    /// All entries, in ring order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The pools this relay serves, the default pool first.
    pub fn pools(&self) -> &[String] {
        &self.pools
    }

    /// Account ids by metrics index ("" for an index no account holds).
    pub fn metrics_ids(&self) -> Arc<[String]> {
        self.metrics_ids.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Frees the metrics index of every account gone from the set whose
    /// state nothing holds any more (no live stream, no shard's ring).
    /// Returns whether one was freed: then the ids are to be published
    /// again, so that the shards drop its counters and its series go.
    pub fn free_metrics_slots(&mut self) -> bool {
        self.removed.retain(|s| s.live.load(Ordering::Relaxed) > 0);
        let mut freed = false;
        for (id, holder) in &mut self.metrics_ids {
            // The holder is the id's last state; one it had in another
            // pool (moved, then removed) may still carry streams.
            let still_live = self.removed.iter().any(|s| s.id == *id);
            if !id.is_empty() && holder.strong_count() == 0 && !still_live {
                id.clear();
                freed = true;
            }
        }
        freed
    }

    /// The ring version shards should run: every account with its current key.
    pub fn ring(&self) -> Arc<[RingSlot]> {
        self.entries
            .iter()
            .map(|e| RingSlot {
                account: e.state.clone(),
                key: e.current.clone(),
            })
            .collect()
    }

    /// Where `id` is; an id no account can have is refused as invalid
    /// (400 in the admin API, as a body's id is), not looked up.
    fn find(&self, id: &str) -> Result<usize, ChangeError> {
        check_id(id)?;
        self.entries
            .iter()
            .position(|e| e.state.id == id)
            .ok_or_else(|| ChangeError::NotFound(id.to_string()))
    }

    /// The entry for `id`.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.state.id == id)
    }

    /// Adds an account. Its live count starts at zero; if an account of the
    /// same id was removed earlier and its index is not yet freed, its
    /// metrics index (and counters) are reused.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        id: &str,
        key: Secret,
        region: &str,
        pool: &str,
        enabled: bool,
        max_concurrent: u32,
        key_created_at: u64,
        source: Source,
    ) -> Result<(), ChangeError> {
        check_id(id)?;
        if !self.pools.iter().any(|p| p == pool) {
            return Err(ChangeError::Invalid(format!(
                "the pool is not one of this relay's pools ({}); a new [pool.NAME] needs a restart",
                self.pools.join(", ")
            )));
        }
        if self.find(id).is_ok() {
            return Err(ChangeError::Exists(id.to_string()));
        }
        check_key(&key)?;
        if max_concurrent == 0 {
            return Err(ChangeError::Invalid(
                "max_concurrent_streams must be at least 1".into(),
            ));
        }
        if self.entries.len() >= MAX_ACCOUNTS {
            return Err(ChangeError::Invalid(format!(
                "at most {MAX_ACCOUNTS} accounts"
            )));
        }
        self.free_metrics_slots();
        let metrics_index = match self.metrics_ids.iter().position(|(m, _)| m == id) {
            Some(i) => i,
            None => match self.metrics_ids.iter().position(|(m, _)| m.is_empty()) {
                Some(i) => {
                    self.metrics_ids[i].0 = id.to_string();
                    i
                }
                None => {
                    self.metrics_ids.push((id.to_string(), Weak::new()));
                    self.metrics_ids.len() - 1
                }
            },
        };
        let state = match self
            .removed
            .iter()
            .position(|s| s.id == id && s.pool == pool)
        {
            Some(i) => {
                let state = self.removed.swap_remove(i);
                *state.region.lock().unwrap_or_else(|e| e.into_inner()) = region.to_string();
                state.enabled.store(enabled, Ordering::Relaxed);
                state
                    .max_concurrent
                    .store(max_concurrent, Ordering::Relaxed);
                // Its key may be a new one: nobody refused it yet.
                state.mark_ok();
                state
            }
            None => AccountState::new(
                id,
                metrics_index,
                region,
                pool,
                enabled,
                max_concurrent,
                self.epoch,
            ),
        };
        self.metrics_ids[metrics_index].1 = Arc::downgrade(&state);
        self.entries.push(Entry {
            state,
            current: KeySlot::new(key, key_created_at),
            retiring: Vec::new(),
            source,
        });
        Ok(())
    }

    /// Removes an account: it takes no new stream; streams on it go on to their end.
    pub fn remove(&mut self, id: &str) -> Result<Entry, ChangeError> {
        let i = self.find(id)?;
        let entry = self.entries.remove(i);
        // States whose streams have all ended go. One of the same id in
        // another pool stays while it has streams: an account moved to a
        // pool and back counts them again when it returns (`add`).
        self.removed.retain(|s| {
            s.live.load(Ordering::Relaxed) > 0 && !(s.id == id && s.pool == entry.state.pool)
        });
        if entry.state.live.load(Ordering::Relaxed) > 0 {
            self.removed.push(entry.state.clone());
        }
        self.removed_retiring.extend(
            entry
                .retiring
                .iter()
                .filter(|k| k.live.load(Ordering::Relaxed) > 0)
                .cloned(),
        );
        Ok(entry)
    }

    /// Enables or disables an account (takes effect on every shard at once).
    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<(), ChangeError> {
        let i = self.find(id)?;
        self.entries[i]
            .state
            .enabled
            .store(enabled, Ordering::Relaxed);
        Ok(())
    }

    /// Sets an account's concurrent-stream limit (streams over a lowered
    /// limit go on; new ones wait for room).
    pub fn set_max_concurrent(&mut self, id: &str, max: u32) -> Result<(), ChangeError> {
        if max == 0 {
            return Err(ChangeError::Invalid(
                "max_concurrent_streams must be at least 1".into(),
            ));
        }
        let i = self.find(id)?;
        self.entries[i]
            .state
            .max_concurrent
            .store(max, Ordering::Relaxed);
        Ok(())
    }

    /// Rotates an account's key: `key` takes every new stream at once; the
    /// old key keeps its streams until they end or `overlap` passes.
    pub fn rotate(
        &mut self,
        id: &str,
        key: Secret,
        overlap: Duration,
        now: u64,
    ) -> Result<(), ChangeError> {
        let i = self.find(id)?;
        check_key(&key)?;
        let e = &mut self.entries[i];
        if key == e.current.key || e.retiring.iter().any(|k| k.key == key) {
            return Err(ChangeError::Invalid(
                "the new key is one the account already has".into(),
            ));
        }
        let old = std::mem::replace(&mut e.current, KeySlot::new(key, now));
        // Saturating, as the key store does: an overlap too long to add to
        // the clock keeps the key for its streams, never retires it at once.
        old.retire_at
            .store(now.saturating_add(overlap.as_secs()), Ordering::Relaxed);
        e.retiring.push(old);
        e.source = Source::Store;
        // The new key has not been refused by anyone yet.
        e.state.mark_ok();
        Ok(())
    }

    /// Applies the config file's accounts (a reload): accounts the file adds
    /// are added; accounts that came from the file and are gone from it are
    /// removed; for the rest, region, enabled and the limit follow the file,
    /// and a changed key is rotated in with `overlap`. Accounts changed at
    /// runtime (source `store`) are left alone: the admin API's change wins
    /// until the account is removed, or until the file, once it holds the
    /// key the account runs, names a new one. Returns one line per change.
    pub fn apply_config(
        &mut self,
        accounts: &[AccountConfig],
        previous: &[AccountConfig],
        overlap: Duration,
        now: u64,
    ) -> Vec<String> {
        let mut log = Vec::new();
        // A disabled account whose key is not there is as if not in the file.
        let accounts: Vec<&AccountConfig> = accounts.iter().filter(|a| a.has_key()).collect();
        let stale: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.source == Source::Config && !accounts.iter().any(|a| a.id == e.state.id))
            .map(|e| e.state.id.clone())
            .collect();
        for id in stale {
            let _ = self.remove(&id);
            log.push(format!("removed {id}"));
        }
        for a in accounts {
            let before = previous.iter().find(|p| p.id == a.id);
            // In the last file, with its key, and not here: removed at
            // runtime, which wins over the file.
            if self.get(&a.id).is_none() && before.is_some_and(|p| p.has_key()) {
                log.push(format!("kept removed {} (removed at runtime)", a.id));
                continue;
            }
            // An account moved to another pool is a new account there: its
            // live streams finish where they are, new ones go to the new pool.
            // A pool the running relay does not have needs a restart: the
            // account stays where it is meanwhile.
            if self
                .get(&a.id)
                .is_some_and(|e| e.source == Source::Config && e.state.pool != a.pool)
            {
                if !self.pools.contains(&a.pool) {
                    log.push(format!(
                        "not moved {} to pool {}: a new [pool.NAME] needs a restart",
                        a.id, a.pool
                    ));
                    continue;
                }
                let _ = self.remove(&a.id);
                log.push(format!("moved {} to pool {}", a.id, a.pool));
            }
            let Some(i) = self.entries.iter().position(|e| e.state.id == a.id) else {
                match self.add(
                    &a.id,
                    a.key.clone(),
                    &a.region,
                    &a.pool,
                    a.enabled,
                    a.max_concurrent_streams,
                    now,
                    Source::Config,
                ) {
                    Ok(()) => log.push(format!("added {}", a.id)),
                    Err(e) => log.push(format!("not added {}: {e}", a.id)),
                }
                continue;
            };
            if self.entries[i].source == Source::Store {
                // Rotated (or added again) at runtime: runtime wins, unless
                // the file's key was the one it runs (the runbook's step 4
                // wrote it there) and the file now names a new one: that
                // is the file's own rotation, applied as for any file
                // account, which the account then is again.
                let current = &self.entries[i].current.key;
                let file_rotates =
                    before.is_some_and(|p| p.has_key() && p.key != a.key && p.key == *current);
                if !file_rotates {
                    if before.is_some_and(|p| p.key != a.key) && *current != a.key {
                        log.push(format!(
                            "kept {} key {} (rotated at runtime; the file's new key is not used)",
                            a.id, self.entries[i].current.fingerprint
                        ));
                    }
                    log.extend(kept_at_runtime(&self.entries[i].state, a, before));
                    continue;
                }
                self.entries[i].source = Source::Config;
            }
            let st = &self.entries[i].state;
            {
                let mut region = st.region.lock().unwrap_or_else(|e| e.into_inner());
                if *region != a.region {
                    log.push(format!("{} region {:?} -> {:?}", a.id, *region, a.region));
                    *region = a.region.clone();
                }
            }
            // A flag that differs from the last file's was set at runtime,
            // and runtime wins; one that does not follows the file. Either
            // way the log says what the file's change came to, so a change
            // kept out by runtime's is not taken for applied.
            let state = |on: bool| if on { "enabled" } else { "disabled" };
            let enabled = st.enabled.load(Ordering::Relaxed);
            if before.is_none_or(|p| p.enabled == enabled) {
                st.enabled.store(a.enabled, Ordering::Relaxed);
                if enabled != a.enabled {
                    log.push(format!("{} {}", state(a.enabled), a.id));
                }
            } else if before.is_some_and(|p| p.enabled != a.enabled) && enabled != a.enabled {
                log.push(format!(
                    "kept {} {} (set at runtime; the file now says {})",
                    a.id,
                    state(enabled),
                    state(a.enabled)
                ));
            }
            let limit = st.max_concurrent.load(Ordering::Relaxed);
            if before.is_none_or(|p| p.max_concurrent_streams == limit) {
                st.max_concurrent
                    .store(a.max_concurrent_streams, Ordering::Relaxed);
                if limit != a.max_concurrent_streams {
                    log.push(format!(
                        "{} max_concurrent_streams {limit} -> {}",
                        a.id, a.max_concurrent_streams
                    ));
                }
            } else if before.is_some_and(|p| p.max_concurrent_streams != a.max_concurrent_streams)
                && limit != a.max_concurrent_streams
            {
                log.push(format!(
                    "kept {} max_concurrent_streams {limit} (set at runtime; the file now says {})",
                    a.id, a.max_concurrent_streams
                ));
            }
            if self.entries[i].current.key != a.key {
                let _ = self.rotate(&a.id, a.key.clone(), overlap, now);
                self.entries[i].source = Source::Config;
                log.push(format!(
                    "rotated {} to key {}",
                    a.id, self.entries[i].current.fingerprint
                ));
            }
        }
        log
    }

    /// Makes the set what `merged` says (another node of a fleet changed
    /// it): accounts missing from it are removed, new ones added; the rest
    /// take its region, flags, limit and source, and a different key is
    /// rotated in (the old key keeps its streams until the retire time the
    /// other node gave it, or `overlap`). Live counts, health and metrics
    /// indices of the accounts that stay are kept. Returns one line per change.
    pub fn apply_merged(
        &mut self,
        merged: &[crate::control::keystore::MergedAccount],
        overlap: Duration,
        now: u64,
    ) -> Vec<String> {
        let mut log = Vec::new();
        let stale: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !merged.iter().any(|m| m.id == e.state.id))
            .map(|e| e.state.id.clone())
            .collect();
        for id in stale {
            let _ = self.remove(&id);
            log.push(format!("removed {id}"));
        }
        for m in merged {
            let source = match m.source {
                crate::control::keystore::Source::Config => Source::Config,
                crate::control::keystore::Source::Store => Source::Store,
            };
            if self.get(&m.id).is_some_and(|e| e.state.pool != m.pool) {
                let _ = self.remove(&m.id);
                log.push(format!("moved {} to pool {}", m.id, m.pool));
            }
            let Some(i) = self.entries.iter().position(|e| e.state.id == m.id) else {
                let created = now.saturating_sub(m.key_age_secs.unwrap_or(0));
                match self.add(
                    &m.id,
                    m.key.clone(),
                    &m.region,
                    &m.pool,
                    m.enabled,
                    m.max_concurrent_streams,
                    created,
                    source,
                ) {
                    Ok(()) => log.push(format!("added {}", m.id)),
                    Err(e) => log.push(format!("not added {}: {e}", m.id)),
                }
                continue;
            };
            // Each change named, as a reload names it: the caller saves
            // the set to the key store when there is any.
            let st = &self.entries[i].state;
            {
                let mut region = st.region.lock().unwrap_or_else(|e| e.into_inner());
                if *region != m.region {
                    log.push(format!("{} region {:?} -> {:?}", m.id, *region, m.region));
                    region.clone_from(&m.region);
                }
            }
            if st.enabled.swap(m.enabled, Ordering::Relaxed) != m.enabled {
                let state = if m.enabled { "enabled" } else { "disabled" };
                log.push(format!("{state} {}", m.id));
            }
            let limit = st
                .max_concurrent
                .swap(m.max_concurrent_streams, Ordering::Relaxed);
            if limit != m.max_concurrent_streams {
                log.push(format!(
                    "{} max_concurrent_streams {limit} -> {}",
                    m.id, m.max_concurrent_streams
                ));
            }
            if self.entries[i].current.key != m.key {
                let old = &self.entries[i].current.key;
                // The set's retire time of the key this node runs; a key of
                // the fleet's that the set no longer holds (its retire time
                // passed: always so after a rotation with no overlap, the
                // runbook's pull of a compromised key) retires now, not
                // after `admin.rotation_overlap`.
                let overlap = match m.retiring.iter().find(|r| &r.key == old) {
                    Some(r) => Duration::from_secs(r.retire_at.saturating_sub(now)),
                    None if m.source == crate::control::keystore::Source::Store => Duration::ZERO,
                    None => overlap,
                };
                let _ = self.rotate(&m.id, m.key.clone(), overlap, now);
                log.push(format!(
                    "rotated {} to key {}",
                    m.id, self.entries[i].current.fingerprint
                ));
            }
            self.entries[i].source = source;
        }
        log
    }

    /// Retires keys that carry no stream any more (their overlap is only a
    /// deadline for the streams they carry); returns those past the deadline
    /// that still carry streams, for the caller to report or end.
    pub fn expire_retiring(&mut self, now: u64) -> Vec<Arc<KeySlot>> {
        let mut overdue = Vec::new();
        let mut expire = |k: &Arc<KeySlot>| {
            let due = k.retire_at.load(Ordering::Relaxed) <= now;
            let live = k.live.load(Ordering::Relaxed);
            if due && live > 0 {
                overdue.push(k.clone());
            }
            live > 0
        };
        for e in &mut self.entries {
            e.retiring.retain(&mut expire);
        }
        self.removed_retiring.retain(&mut expire);
        overdue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Accounts {
        let cfg = vec![
            AccountConfig::new("a", Secret::new("key-a")),
            AccountConfig::new("b", Secret::new("key-b")),
        ];
        Accounts::from_config(&cfg, &["default".to_string()], Instant::now())
    }

    #[test]
    fn a_stored_account_with_a_region_past_the_bound_still_loads() {
        // The bound is checked where an account comes in (the admin API,
        // the config file): one kept before it is not dropped at a start.
        let long = "r".repeat(100);
        assert!(check_region(&long).is_err());
        assert!(check_region("eu-west").is_ok() && check_region("").is_ok());
        let mut s = set();
        s.add(
            "c",
            Secret::new("key-c"),
            &long,
            "default",
            true,
            5,
            0,
            Source::Store,
        )
        .unwrap();
        assert_eq!(s.ring().len(), 3);
    }

    #[test]
    fn changes_publish_new_rings_with_stable_metrics_indices() {
        let mut s = set();
        // A shard's ring, not yet replaced, holds "a" and its index.
        let held = s.ring();
        assert_eq!(held.len(), 2);
        s.remove("a").unwrap();
        s.add(
            "c",
            Secret::new("key-c"),
            "eu",
            "default",
            true,
            5,
            0,
            Source::Store,
        )
        .unwrap();
        s.add(
            "a",
            Secret::new("key-a2"),
            "us",
            "default",
            true,
            5,
            0,
            Source::Store,
        )
        .unwrap();
        let ids: Vec<_> = s
            .ring()
            .iter()
            .map(|r| (r.account.id.clone(), r.account.metrics_index))
            .collect();
        assert_eq!(ids, vec![("b".into(), 1), ("c".into(), 2), ("a".into(), 0)]);
        assert_eq!(
            &*s.metrics_ids(),
            &["a".to_string(), "b".into(), "c".into()]
        );
        // Once nothing holds a removed account, its index is freed and the
        // next new id takes it.
        drop(held);
        s.remove("c").unwrap();
        assert!(s.free_metrics_slots());
        assert_eq!(&*s.metrics_ids(), &["a".to_string(), "b".into(), "".into()]);
        s.add(
            "d",
            Secret::new("key-d"),
            "",
            "default",
            true,
            5,
            0,
            Source::Store,
        )
        .unwrap();
        assert_eq!(s.get("d").unwrap().state.metrics_index, 2);
        assert_eq!(
            &*s.metrics_ids(),
            &["a".to_string(), "b".into(), "d".into()]
        );
        assert_eq!(
            s.add(
                "b",
                Secret::new("x"),
                "",
                "default",
                true,
                1,
                0,
                Source::Store
            ),
            Err(ChangeError::Exists("b".into()))
        );
        assert!(matches!(
            s.add(
                "bad id",
                Secret::new("x"),
                "",
                "default",
                true,
                1,
                0,
                Source::Store
            ),
            Err(ChangeError::Invalid(_))
        ));
        assert_eq!(
            s.remove("zz").unwrap_err(),
            ChangeError::NotFound("zz".into())
        );
    }

    #[test]
    fn rotation_moves_new_streams_and_retires_after_overlap() {
        let mut s = set();
        let mut ring = crate::core::keyring::KeyRing::new(&s.ring());
        let old_stream = ring
            .pick(Instant::now(), 0b10, &["default".to_string()])
            .unwrap();
        assert_eq!(old_stream.key.key.expose(), "key-a");
        s.rotate("a", Secret::new("key-a-new"), Duration::from_secs(60), 1000)
            .unwrap();
        ring.replace(&s.ring());
        let new_stream = ring
            .pick(Instant::now(), 0b10, &["default".to_string()])
            .unwrap();
        assert_eq!(new_stream.key.key.expose(), "key-a-new");
        let e = s.get("a").unwrap();
        assert_eq!(e.retiring.len(), 1);
        assert_eq!(
            e.retiring[0].live.load(Ordering::Relaxed),
            1,
            "the old key still carries its stream"
        );
        assert!(s.expire_retiring(1059).is_empty(), "inside the overlap");
        assert_eq!(
            s.expire_retiring(1060).len(),
            1,
            "overdue with a live stream"
        );
        drop(old_stream);
        assert!(s.expire_retiring(1061).is_empty());
        assert!(
            s.get("a").unwrap().retiring.is_empty(),
            "retired once its streams ended"
        );
        assert!(
            s.rotate("a", Secret::new("key-a-new"), Duration::ZERO, 0)
                .is_err(),
            "same key again"
        );
    }
}
