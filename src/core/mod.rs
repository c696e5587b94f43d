//! What the data plane and the control plane share.
//!
//! - [`config`]: the TOML config file, parsed, validated, secrets resolved.
//! - [`secret`]: secret values that only ever print as fingerprints.
//! - [`token`]: session tokens (HMAC-signed, short-lived device credentials).
//! - [`keyring`]: per-shard account slots; which account serves a new stream.
//! - [`devices`]: per-device limits (concurrency, rate, daily audio) and revocation.
//! - [`pool_limits`]: a pool's own cap on its live streams, and its refusals.
//! - [`metrics`]: per-shard counters and latency histograms, merged and
//!   rendered as Prometheus text only when scraped.
//! - [`tls`]: TLS material: the rustls server config from PEM files (the
//!   client port serves it; config validation loads it once to check it).
//! - [`usage`]: what a stream used: the record a shard writes at its end.
//! - [`cluster`]: the fleet's shared store in Redis: device and account
//!   leases, revocations, the account set, usage.
//! - [`deadline`]: a deadline for any future on a glommio executor.
//! - [`disk_wait`]: whether, and since when, the admin thread is inside a
//!   disk write (what the watchdog counts as alive on a slow disk).
//! - [`dial`]: which of a name's addresses a connection goes to (RFC 8305's
//!   staggered attempts), for upstream, Redis and the HTTP client.
//! - [`log_sink`]: the process's log lines, queued (bounded) and written
//!   to stderr by a thread of their own, so a stalled reader stalls no
//!   shard.
//! - [`doorbell`]: answers from other threads (the fleet's store) that
//!   reach a shard's task at once, also while the shard sleeps in its ring.

pub mod cluster;
pub mod config;
pub mod deadline;
pub mod devices;
pub mod dial;
pub mod disk_wait;
pub mod doorbell;
pub mod keyring;
pub mod log_sink;
pub mod metrics;
pub mod pool_limits;
pub mod secret;
pub mod tls;
pub mod token;
pub mod usage;
