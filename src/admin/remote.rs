//! `GET /v1/config`: the seed's remote-configuration document.

use crate::shard::ProcessState;

/// The seed's remote-configuration document: accounts' public fields and
/// feature flags. Never a key.
pub fn remote_config(process: &ProcessState) -> String {
    let accounts: Vec<serde_json::Value> = process
        .accounts()
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "endpoint": "/v1/transcribe",
                "region": a.region(),
                "isEnabled": a.enabled.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::json!({
        "sonioxAccounts": accounts,
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
