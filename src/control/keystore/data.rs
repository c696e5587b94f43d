//! What the store holds ([`StoreData`]) and its JSON form inside the
//! encrypted file.
//!
//! The public types hold keys as [`Secret`]s, which have no serde support on
//! purpose; the JSON form uses private mirror structs that exist only while a
//! document is being sealed or opened.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::core::config::valid_account_id;
use crate::core::secret::Secret;

/// Which of the store's rules a [`StoreData`] breaks. Names the account
/// (ids are not secret), never a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataError {
    /// An account id is not `[A-Za-z0-9._-]+`.
    BadId(String),
    /// Two accounts have this id.
    DuplicateId(String),
    /// This account's current or a retiring key is empty.
    EmptyKey(String),
    /// This account is both stored and in the removed list.
    StoredAndRemoved(String),
    /// Two overrides are for this account.
    DuplicateOverride(String),
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataError::BadId(id) => write!(f, "account id {id:?} is not [A-Za-z0-9._-]+"),
            DataError::DuplicateId(id) => write!(f, "account id {id} appears twice"),
            DataError::EmptyKey(id) => write!(f, "account {id} has an empty key"),
            DataError::StoredAndRemoved(id) => {
                write!(f, "account {id} is both stored and removed")
            }
            DataError::DuplicateOverride(id) => write!(f, "override for {id} appears twice"),
        }
    }
}

impl std::error::Error for DataError {}

/// Version of the JSON document inside the sealed file.
const DOC_VERSION: u32 = 1;

/// One API key and when it was added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    /// The Soniox API key.
    pub key: Secret,
    /// When the key was added to the store (unix seconds); gives its age.
    pub created_at: u64,
}

/// A key being rotated out: it still serves the streams it carries, takes
/// no new ones, and is forgotten once `retire_at` has passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiringKey {
    /// The old key.
    pub key: StoredKey,
    /// When its overlap period ends (unix seconds).
    pub retire_at: u64,
}

/// An account added or changed at runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAccount {
    /// Same rules as a config-file id: `[A-Za-z0-9._-]`, unique.
    pub id: String,
    /// Free-form region label published to clients.
    pub region: String,
    /// The pool the account belongs to (`default` unless set).
    pub pool: String,
    /// A disabled account takes no new streams.
    pub enabled: bool,
    /// Streams the account may carry at once.
    pub max_concurrent_streams: u32,
    /// The current key: takes every new stream.
    pub key: StoredKey,
    /// Keys being rotated out, with the time their overlap ends.
    pub retiring: Vec<RetiringKey>,
}

/// A change to a config-file account that does not take it over: the key
/// stays in the config file (so rotating it there still works), only the
/// fields set here win. Used to disable a config account at runtime without
/// copying its key into the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountOverride {
    /// The config-file account this applies to.
    pub id: String,
    /// Replaces `enabled` when set.
    pub enabled: Option<bool>,
    /// Replaces `max_concurrent_streams` when set.
    pub max_concurrent_streams: Option<u32>,
}

/// The whole content of the store file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreData {
    /// Incremented on every save; [`super::KeyStore::save`] refuses data
    /// whose generation is not the one on disk (a lost update).
    pub generation: u64,
    /// Accounts added or taken over at runtime.
    pub accounts: Vec<StoredAccount>,
    /// Ids removed at runtime: config-file accounts of these ids are dropped.
    pub removed: Vec<String>,
    /// Field overrides for config-file accounts (see [`AccountOverride`]).
    pub overrides: Vec<AccountOverride>,
}

impl StoreData {
    /// The stored account `id`, if any.
    pub fn account(&self, id: &str) -> Option<&StoredAccount> {
        self.accounts.iter().find(|a| a.id == id)
    }

    /// Adds `account`, or replaces the stored account of the same id. The id
    /// stops being removed, and any override of it is dropped (the stored
    /// entry now says everything).
    pub fn upsert(&mut self, account: StoredAccount) {
        self.removed.retain(|r| *r != account.id);
        self.overrides.retain(|o| o.id != account.id);
        match self.accounts.iter_mut().find(|a| a.id == account.id) {
            Some(slot) => *slot = account,
            None => self.accounts.push(account),
        }
    }

    /// Removes account `id` wherever it comes from: the stored entry is
    /// deleted and the id is recorded so a config-file entry stays removed.
    pub fn remove(&mut self, id: &str) {
        self.accounts.retain(|a| a.id != id);
        self.overrides.retain(|o| o.id != id);
        if !self.removed.iter().any(|r| r == id) {
            self.removed.push(id.to_string());
        }
    }

    /// Makes `key` the current key of stored account `id`; the old current
    /// key keeps serving until `now + overlap_secs`. Returns false if there
    /// is no stored account `id`.
    pub fn rotate(&mut self, id: &str, key: Secret, now: u64, overlap_secs: u64) -> bool {
        let Some(account) = self.accounts.iter_mut().find(|a| a.id == id) else {
            return false;
        };
        let old = std::mem::replace(
            &mut account.key,
            StoredKey {
                key,
                created_at: now,
            },
        );
        account.retiring.push(RetiringKey {
            key: old,
            retire_at: now.saturating_add(overlap_secs),
        });
        true
    }

    /// Forgets retiring keys whose overlap has ended. Returns how many.
    pub fn prune_retired(&mut self, now: u64) -> usize {
        let mut pruned = 0;
        for a in &mut self.accounts {
            let before = a.retiring.len();
            a.retiring.retain(|r| r.retire_at > now);
            pruned += before - a.retiring.len();
        }
        pruned
    }

    /// Checks what the merge and the relay rely on: valid, unique ids,
    /// non-empty keys, no id both stored and removed. Never quotes a key.
    pub fn validate(&self) -> Result<(), DataError> {
        let mut ids = HashSet::new();
        for a in &self.accounts {
            if !valid_account_id(&a.id) {
                return Err(DataError::BadId(a.id.clone()));
            }
            if !ids.insert(a.id.as_str()) {
                return Err(DataError::DuplicateId(a.id.clone()));
            }
            if a.key.key.expose().is_empty()
                || a.retiring.iter().any(|r| r.key.key.expose().is_empty())
            {
                return Err(DataError::EmptyKey(a.id.clone()));
            }
            if self.removed.contains(&a.id) {
                return Err(DataError::StoredAndRemoved(a.id.clone()));
            }
        }
        let mut overridden = HashSet::new();
        for o in &self.overrides {
            if !overridden.insert(o.id.as_str()) {
                return Err(DataError::DuplicateOverride(o.id.clone()));
            }
        }
        Ok(())
    }

    /// The JSON document (plaintext: the caller wipes it after sealing).
    pub(super) fn to_json(&self) -> Vec<u8> {
        let doc = Doc {
            version: DOC_VERSION,
            generation: self.generation,
            accounts: self
                .accounts
                .iter()
                .map(|a| DocAccount {
                    id: a.id.clone(),
                    region: a.region.clone(),
                    pool: a.pool.clone(),
                    enabled: a.enabled,
                    max_concurrent_streams: a.max_concurrent_streams,
                    key: DocKey::from(&a.key),
                    retiring: a
                        .retiring
                        .iter()
                        .map(|r| DocRetiring {
                            key: DocKey::from(&r.key),
                            retire_at: r.retire_at,
                        })
                        .collect(),
                })
                .collect(),
            removed: self.removed.clone(),
            overrides: self
                .overrides
                .iter()
                .map(|o| DocOverride {
                    id: o.id.clone(),
                    enabled: o.enabled,
                    max_concurrent_streams: o.max_concurrent_streams,
                })
                .collect(),
        };
        serde_json::to_vec(&doc).expect("a store document always serializes")
    }

    /// Parses and validates a decrypted document.
    pub(super) fn from_json(json: &[u8]) -> Result<StoreData, StoreError> {
        // serde_json's own messages can quote a value from the input (a
        // key, say); only the error's category and position are shown.
        let doc: Doc = serde_json::from_slice(json).map_err(|e| {
            StoreError::Corrupt(format!(
                "document does not parse ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if doc.version != DOC_VERSION {
            return Err(StoreError::Corrupt(format!(
                "document version {} is not supported (this build reads {DOC_VERSION})",
                doc.version
            )));
        }
        let data = StoreData {
            generation: doc.generation,
            accounts: doc
                .accounts
                .into_iter()
                .map(|a| StoredAccount {
                    id: a.id,
                    region: a.region,
                    pool: a.pool,
                    enabled: a.enabled,
                    max_concurrent_streams: a.max_concurrent_streams,
                    key: a.key.into(),
                    retiring: a
                        .retiring
                        .into_iter()
                        .map(|r| RetiringKey {
                            key: r.key.into(),
                            retire_at: r.retire_at,
                        })
                        .collect(),
                })
                .collect(),
            removed: doc.removed,
            overrides: doc
                .overrides
                .into_iter()
                .map(|o| AccountOverride {
                    id: o.id,
                    enabled: o.enabled,
                    max_concurrent_streams: o.max_concurrent_streams,
                })
                .collect(),
        };
        data.validate()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(data)
    }
}

// ---------------------------------------------------------------------------
// The JSON document (private mirror types; keys as plain strings)
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    version: u32,
    generation: u64,
    #[serde(default)]
    accounts: Vec<DocAccount>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    overrides: Vec<DocOverride>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocAccount {
    id: String,
    region: String,
    /// Absent for the default pool, so a document without pools reads as
    /// it did before pools (and an older relay of a fleet still opens it).
    #[serde(default = "default_pool", skip_serializing_if = "is_default_pool")]
    pool: String,
    enabled: bool,
    max_concurrent_streams: u32,
    key: DocKey,
    #[serde(default)]
    retiring: Vec<DocRetiring>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocKey {
    key: String,
    created_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocRetiring {
    key: DocKey,
    retire_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocOverride {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrent_streams: Option<u32>,
}

fn default_pool() -> String {
    crate::core::config::DEFAULT_POOL.to_string()
}

fn is_default_pool(pool: &str) -> bool {
    pool == crate::core::config::DEFAULT_POOL
}

impl From<&StoredKey> for DocKey {
    fn from(k: &StoredKey) -> Self {
        DocKey {
            key: k.key.expose().to_string(),
            created_at: k.created_at,
        }
    }
}

impl From<DocKey> for StoredKey {
    fn from(k: DocKey) -> Self {
        StoredKey {
            key: Secret::new(k.key),
            created_at: k.created_at,
        }
    }
}
