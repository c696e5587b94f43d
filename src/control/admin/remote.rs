//! `GET /v1/config`: the seed's remote-configuration document.

use crate::core::config::PoolConfig;
use crate::dataplane::shard::ProcessState;

/// The seed's remote-configuration document: accounts' public fields,
/// the pools and where their streams go, and feature flags. Never a key.
///
/// An app reads `pools` to learn which pools exist, their regions and
/// upstream hosts, and asks its backend for a token of the pool it should
/// use; every pool is served at the same relay `endpoint`, the token
/// decides which accounts carry the stream.
///
/// Accounts (and each pool's regions) are listed by id, not in ring order:
/// the ring's order is how this node learnt its accounts (the file, the key
/// store, the fleet's set, changes made since), and every node of a fleet
/// must publish the same document, so the same ETag, for the same accounts.
pub fn remote_config(process: &ProcessState, pools: &[PoolConfig]) -> String {
    let mut ring = process.ring().to_vec();
    ring.sort_by(|x, y| x.account.id.cmp(&y.account.id));
    let accounts: Vec<serde_json::Value> = ring
        .iter()
        .map(|s| {
            let a = &s.account;
            serde_json::json!({
                "id": a.id,
                "endpoint": "/v1/transcribe",
                "region": a.region(),
                "pool": a.pool,
                "isEnabled": a.enabled.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let pools: Vec<serde_json::Value> =
        super::pools::views(pools, &ring, std::time::Instant::now())
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "endpoint": "/v1/transcribe",
                    "upstreamHost": v.upstream_host,
                    "regions": v.regions,
                    "isAvailable": v.enabled > 0,
                })
            })
            .collect();
    serde_json::json!({
        "sonioxAccounts": accounts,
        "pools": pools,
        "defaultPool": crate::core::config::DEFAULT_POOL,
        "features": {
            "useProxyServer": true,
            "maxConcurrentStreams": process.max_streams(),
        }
    })
    .to_string()
}

/// A strong ETag: the first 16 hex digits of the body's SHA-256.
pub(super) fn etag(body: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}
