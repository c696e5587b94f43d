//! Pools as the admin port shows them: one line per pool in `/metrics`, in
//! `/admin/accounts` (the dashboard's pool table) and in `/v1/config`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::core::config::PoolConfig;
use crate::core::keyring::RingSlot;
use crate::core::metrics::text::{family, Kind};

/// One pool's accounts, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The pool's name.
    pub name: String,
    /// The upstream host its streams go to (no path, never a key).
    pub upstream_host: String,
    /// Its accounts' region labels, each once, in ring order.
    pub regions: Vec<String>,
    /// Accounts in the pool.
    pub accounts: u32,
    /// Of them, enabled.
    pub enabled: u32,
    /// Of them, healthy.
    pub healthy: u32,
    /// Streams live on its accounts.
    pub live_streams: u32,
    /// The sum of its enabled accounts' limits in force.
    pub max_concurrent_streams: u64,
}

/// Every pool in `pools` (the default pool first) with the accounts of
/// `ring` that belong to it.
pub fn views(pools: &[PoolConfig], ring: &[RingSlot], now: Instant) -> Vec<PoolView> {
    pools
        .iter()
        .map(|p| {
            let mut v = PoolView {
                name: p.name.clone(),
                upstream_host: crate::core::config::parse_ws_url(&p.url)
                    .map(|e| e.host)
                    .unwrap_or_default(),
                regions: Vec::new(),
                accounts: 0,
                enabled: 0,
                healthy: 0,
                live_streams: 0,
                max_concurrent_streams: 0,
            };
            for s in ring.iter().filter(|s| s.account.pool == p.name) {
                let a = &s.account;
                v.accounts += 1;
                let enabled = a.enabled.load(Ordering::Relaxed);
                v.enabled += u32::from(enabled);
                v.healthy += u32::from(a.healthy(now));
                v.live_streams += a.live.load(Ordering::Relaxed);
                if enabled {
                    v.max_concurrent_streams += u64::from(a.effective_max());
                }
                let region = a.region();
                if !region.is_empty() && !v.regions.contains(&region) {
                    v.regions.push(region);
                }
            }
            v
        })
        .collect()
}

impl PoolView {
    /// The pool as JSON for the admin API and `/v1/config`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "upstream_host": self.upstream_host,
            "regions": self.regions,
            "accounts": self.accounts,
            "enabled": self.enabled,
            "healthy": self.healthy,
            "live_streams": self.live_streams,
            "max_concurrent_streams": self.max_concurrent_streams,
        })
    }
}

/// The per-pool families of `/metrics`, `clio_relay_account_info`,
/// which gives each account's pool (and region) to join the per-account
/// series on, and `clio_relay_account_healthy` as of `now`.
pub fn render_metrics(views: &[PoolView], ring: &[RingSlot], now: Instant, out: &mut String) {
    let mut f = family(
        out,
        "clio_relay_account_info",
        Kind::Gauge,
        "Each account's pool and region (always 1), to join the per-account series on.",
    );
    for s in ring {
        let a = &s.account;
        f.sample(
            &[
                ("account", &a.id),
                ("pool", &a.pool),
                ("region", &a.region()),
            ],
            1,
        );
    }
    let mut f = family(
        out,
        "clio_relay_account_healthy",
        Kind::Gauge,
        "1 while the account takes streams as far as upstream goes; 0 while it is held off: its key refused (401, 402, by upstream or a health check) or its connects timing out.",
    );
    for s in ring {
        f.sample(
            &[("account", &s.account.id)],
            u8::from(s.account.healthy(now)),
        );
    }
    type Family = (&'static str, &'static str, fn(&PoolView) -> u64);
    let families: [Family; 4] = [
        (
            "clio_relay_pool_streams_active",
            "Streams open now on the pool's accounts.",
            |v| u64::from(v.live_streams),
        ),
        (
            "clio_relay_pool_max_concurrent_streams",
            "The sum of the limits in force of the pool's enabled accounts: what the pool can carry.",
            |v| v.max_concurrent_streams,
        ),
        (
            "clio_relay_pool_accounts",
            "Accounts in the pool.",
            |v| u64::from(v.accounts),
        ),
        (
            "clio_relay_pool_accounts_healthy",
            "Accounts of the pool that are healthy now.",
            |v| u64::from(v.healthy),
        ),
    ];
    for (name, help, value) in families {
        let mut f = family(out, name, Kind::Gauge, help);
        for v in views {
            f.sample(&[("pool", &v.name)], value(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyring::{AccountState, KeySlot};
    use crate::core::secret::Secret;

    #[test]
    fn each_pool_sums_its_own_accounts() {
        let epoch = Instant::now();
        let slot = |id: &str, pool: &str, region: &str, max: u32| RingSlot {
            account: AccountState::new(id, 0, region, pool, true, max, epoch),
            key: KeySlot::new(Secret::new(format!("key-{id}")), 0),
        };
        let ring = vec![
            slot("us-1", "default", "us-east", 10),
            slot("eu-1", "eu", "eu-west", 5),
            slot("eu-2", "eu", "eu-west", 7),
        ];
        ring[2].account.enabled.store(false, Ordering::Relaxed);
        ring[1].account.live.store(3, Ordering::Relaxed);
        let pools = vec![
            PoolConfig::default_pool("wss://stt-rt.soniox.com/transcribe-websocket"),
            PoolConfig {
                name: "eu".into(),
                url: "wss://stt-rt.eu.soniox.com/transcribe-websocket".into(),
                rest_url: None,
            },
            PoolConfig {
                name: "empty".into(),
                url: "ws://127.0.0.1:9/x".into(),
                rest_url: None,
            },
        ];
        let v = views(&pools, &ring, Instant::now());
        assert_eq!(v[1].upstream_host, "stt-rt.eu.soniox.com");
        assert_eq!(v[1].regions, ["eu-west"]);
        assert_eq!(
            (
                v[1].accounts,
                v[1].enabled,
                v[1].live_streams,
                v[1].max_concurrent_streams
            ),
            (2, 1, 3, 5)
        );
        assert_eq!((v[0].accounts, v[0].max_concurrent_streams), (1, 10));
        assert_eq!((v[2].accounts, v[2].max_concurrent_streams), (0, 0));
        let mut out = String::new();
        render_metrics(&v, &ring, Instant::now(), &mut out);
        for line in [
            r#"clio_relay_account_info{account="eu-2",pool="eu",region="eu-west"} 1"#,
            r#"clio_relay_pool_streams_active{pool="eu"} 3"#,
            r#"clio_relay_pool_max_concurrent_streams{pool="default"} 10"#,
            r#"clio_relay_pool_accounts{pool="empty"} 0"#,
            r#"clio_relay_pool_accounts_healthy{pool="eu"} 2"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        assert!(!out.contains("key-"), "{out}");
    }
}
