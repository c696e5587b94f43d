//! The control plane: the admin thread's work, apart from the streams.
//!
//! - [`admin`]: the admin port: metrics, health, the account, usage and
//!   revocation APIs, alerts, the dashboard.
//! - [`accounts`]: the authoritative account set; changes become ring versions.
//! - [`httpc`]: the one HTTP/1.1 client (health checks, reconciliation,
//!   the alert webhook, `clio-relay keys`, the tests), on glommio or std.
//! - [`health`]: active health checks of each key against upstream's REST API.
//! - [`keystore`]: the encrypted, crash-safe store of accounts and keys added
//!   at runtime, and how it merges with the config file's accounts.
//! - [`usage`]: the usage ledger: per day, by account and device; persisted.

pub mod accounts;
pub mod admin;
pub mod health;
pub mod httpc;
pub mod keystore;
pub mod usage;
