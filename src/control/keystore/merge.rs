//! The accounts the relay serves: the config file's, merged with the
//! store's (the rule is in the [module docs](super)).

use std::collections::HashSet;

use super::data::StoreData;
use crate::core::config::AccountConfig;
use crate::core::secret::Secret;

/// Where a merged account's settings and key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The config file (possibly with a store override of its flags).
    Config,
    /// The key store: added or taken over at runtime.
    Store,
}

impl Source {
    /// A label for logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Store => "store",
        }
    }
}

/// A key still serving while it is rotated out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedRetiring {
    /// The old key.
    pub key: Secret,
    /// When its overlap ends (unix seconds); always after the merge's `now`.
    pub retire_at: u64,
}

/// One account as the relay should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedAccount {
    /// The account id (unique in the merged list).
    pub id: String,
    /// Region label.
    pub region: String,
    /// The pool it belongs to.
    pub pool: String,
    /// Whether new streams may use it.
    pub enabled: bool,
    /// Streams it may carry at once.
    pub max_concurrent_streams: u32,
    /// The key every new stream uses.
    pub key: Secret,
    /// Older keys, still valid until their `retire_at`, for streams already
    /// running on them.
    pub retiring: Vec<MergedRetiring>,
    /// Where it came from.
    pub source: Source,
    /// True when a store entry replaced a config-file entry of the same id:
    /// edits to that entry in the config file have no effect until the store
    /// entry is removed, which an operator should be told.
    pub shadows_config: bool,
    /// Age of the current key in seconds; `None` for config-file keys (the
    /// file does not say when its key was made).
    pub key_age_secs: Option<u64>,
}

/// Merges the config file's accounts with the store's at time `now` (unix
/// seconds). Config-file accounts keep their file order; accounts only in
/// the store follow, in store order.
pub fn merge(config: &[AccountConfig], store: &StoreData, now: u64) -> Vec<MergedAccount> {
    let from_store = |id: &str, shadows_config: bool| {
        store.account(id).map(|a| MergedAccount {
            id: a.id.clone(),
            region: a.region.clone(),
            pool: a.pool.clone(),
            enabled: a.enabled,
            max_concurrent_streams: a.max_concurrent_streams,
            key: a.key.key.clone(),
            retiring: a
                .retiring
                .iter()
                .filter(|r| r.retire_at > now)
                .map(|r| MergedRetiring {
                    key: r.key.key.clone(),
                    retire_at: r.retire_at,
                })
                .collect(),
            source: Source::Store,
            shadows_config,
            key_age_secs: Some(now.saturating_sub(a.key.created_at)),
        })
    };
    let mut out = Vec::with_capacity(config.len() + store.accounts.len());
    let mut seen = HashSet::new();
    // A disabled config account still waiting for its key is not loaded.
    for c in config.iter().filter(|c| c.has_key()) {
        if !seen.insert(c.id.as_str()) {
            continue; // the config loader refuses duplicates; be safe anyway
        }
        if let Some(m) = from_store(&c.id, true) {
            out.push(m);
        } else if store.removed.contains(&c.id) {
            continue;
        } else {
            let o = store.overrides.iter().find(|o| o.id == c.id);
            out.push(MergedAccount {
                id: c.id.clone(),
                region: c.region.clone(),
                pool: c.pool.clone(),
                enabled: o.and_then(|o| o.enabled).unwrap_or(c.enabled),
                max_concurrent_streams: o
                    .and_then(|o| o.max_concurrent_streams)
                    .unwrap_or(c.max_concurrent_streams),
                key: c.key.clone(),
                retiring: Vec::new(),
                source: Source::Config,
                shadows_config: false,
                key_age_secs: None,
            });
        }
    }
    for a in &store.accounts {
        if seen.insert(a.id.as_str()) {
            out.extend(from_store(&a.id, false));
        }
    }
    out
}
