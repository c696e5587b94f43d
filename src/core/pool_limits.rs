//! A pool's own limits on one relay: `[pool.NAME] max_streams`, the
//! pool's live streams in this process (like `server.max_streams`, so a
//! development pool cannot take the slots production needs), and the
//! streams each pool's limits refused, for `/metrics`.
//!
//! The per-device limits a pool sets (`[pool.NAME.devices]`) are merged
//! into the stream's device limits ([`crate::core::config::DevicesConfig::limits_in`])
//! and counted with the device's other streams, fleet-wide in a fleet.
//!
//! A stream's place in its pool is held by its [`crate::core::keyring::Lease`]
//! ([`PoolHold`]), so it moves with the stream on failover and resume and
//! is given back when the stream ends. Only a stream's first account is
//! checked against the cap: a stream already admitted that moves to
//! another account is never refused by it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a pool's limits refused, the `limit` label of
/// `clio_relay_pool_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolLimit {
    /// `[pool.NAME] max_streams`.
    MaxStreams,
    /// `[pool.NAME.devices] max_concurrent_streams`.
    Concurrent,
    /// `[pool.NAME.devices] streams_per_minute`.
    Rate,
    /// `[pool.NAME.devices] audio_seconds_per_day`.
    DailyAudio,
}

impl PoolLimit {
    /// Every value, in label order.
    pub const ALL: [PoolLimit; 4] = [
        PoolLimit::MaxStreams,
        PoolLimit::Concurrent,
        PoolLimit::Rate,
        PoolLimit::DailyAudio,
    ];

    /// The pool's own value of a device limit, if a pool can set it
    /// (`[pool.NAME.devices]`; revocation and stream length are not
    /// counted as a pool's refusals at open).
    pub fn of_device(limit: crate::core::devices::Limit) -> Option<PoolLimit> {
        use crate::core::devices::Limit;
        match limit {
            Limit::Concurrent => Some(PoolLimit::Concurrent),
            Limit::Rate => Some(PoolLimit::Rate),
            Limit::DailyAudio => Some(PoolLimit::DailyAudio),
            Limit::Revoked | Limit::MaxLength => None,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            PoolLimit::MaxStreams => "max_streams",
            PoolLimit::Concurrent => "concurrent",
            PoolLimit::Rate => "rate",
            PoolLimit::DailyAudio => "daily_audio",
        }
    }
}

/// One pool in this process, shared by every shard.
#[derive(Debug, Default)]
pub struct PoolCount {
    /// Streams whose account is in the pool, across all shards.
    live: AtomicU32,
    /// Streams the pool's limits refused, by [`PoolLimit`].
    refused: [AtomicU64; 4],
}

impl PoolCount {
    /// Streams live in the pool now.
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether one more stream fits under `max` (0: no cap).
    pub fn has_room(&self, max: u32) -> bool {
        max == 0 || self.live() < max
    }

    /// Counts one refusal by `limit`.
    pub fn refused(&self, limit: PoolLimit) {
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A stream's place in its pool; given back when dropped.
#[derive(Debug)]
pub struct PoolHold(Arc<PoolCount>);

impl PoolHold {
    /// Takes a place if the pool has fewer than `max` streams (0: no cap).
    /// One compare-and-swap, exact across shards.
    pub fn take(count: &Arc<PoolCount>, max: u32) -> Option<PoolHold> {
        count
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PoolHold(count.clone()))
    }
}

impl Drop for PoolHold {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every pool this process has carried or refused a stream for.
#[derive(Debug, Default)]
pub struct PoolCounts {
    map: Mutex<BTreeMap<String, Arc<PoolCount>>>,
    /// Each pool's `max_streams` as last configured (start, reloads), for
    /// `/metrics` only: streams read theirs from their settings.
    caps: Mutex<BTreeMap<String, u32>>,
}

impl PoolCounts {
    /// The count of `pool`, made on first use. Only a configured pool's
    /// (an account's, or one with limits of its own) is ever made, so the
    /// map stays as small as the configurations the process has run;
    /// [`PoolCounts::has_room`] asks about any other name without one.
    pub fn get(&self, pool: &str) -> Arc<PoolCount> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(pool) {
            return c.clone();
        }
        map.entry(pool.to_string()).or_default().clone()
    }

    /// Whether `pool` has room for one more stream under `max` (0: no cap),
    /// without making its count: a pool this process has no stream in has
    /// room, and a token may name any pool (a name it alone knows must not
    /// grow the map).
    pub fn has_room(&self, pool: &str, max: u32) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(pool).is_none_or(|c| c.has_room(max))
    }

    /// Records the configured caps (at start and on each reload).
    pub fn set_caps(&self, devices: &crate::core::config::DevicesConfig) {
        *self.caps.lock().unwrap_or_else(|e| e.into_inner()) = devices
            .pools
            .iter()
            .map(|(name, l)| (name.clone(), l.max_streams))
            .collect();
    }

    /// `clio_relay_pool_max_streams` and `clio_relay_pool_refusals_total`
    /// for `pools` (every pool the relay has, so each series exists from
    /// the start).
    pub fn render_metrics(&self, pools: &[String], out: &mut String) {
        use crate::core::metrics::text::{family, Kind};
        {
            let caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
            let mut f = family(
                out,
                "clio_relay_pool_max_streams",
                Kind::Gauge,
                "[pool.NAME] max_streams: streams the pool may have at once in this process (0: no cap of its own).",
            );
            for pool in pools {
                f.sample(&[("pool", pool)], caps.get(pool).copied().unwrap_or(0));
            }
        }
        let mut f = family(
            out,
            "clio_relay_pool_refusals_total",
            Kind::Counter,
            "Streams refused at open by a pool's own limits: [pool.NAME] max_streams, or a per-device limit of [pool.NAME.devices].",
        );
        for pool in pools {
            let c = self.get(pool);
            for limit in PoolLimit::ALL {
                f.sample(
                    &[("pool", pool), ("limit", limit.label())],
                    c.refused[limit as usize].load(Ordering::Relaxed),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_holds_across_holders_and_frees_on_drop() {
        let counts = PoolCounts::default();
        let dev = counts.get("dev");
        let a = PoolHold::take(&dev, 2).unwrap();
        let b = PoolHold::take(&counts.get("dev"), 2).unwrap();
        assert!(PoolHold::take(&dev, 2).is_none(), "two is the cap");
        assert!(!dev.has_room(2));
        assert!(PoolHold::take(&counts.get("prod"), 2).is_some(), "per pool");
        drop(a);
        assert!(dev.has_room(2));
        let _c = PoolHold::take(&dev, 2).unwrap();
        drop(b);
        assert_eq!(dev.live(), 1);
        let _uncapped: Vec<_> = (0..5).map(|_| PoolHold::take(&dev, 0).unwrap()).collect();
        assert_eq!(dev.live(), 6);
    }

    #[test]
    fn asking_for_room_in_a_pool_makes_no_count() {
        let counts = PoolCounts::default();
        for i in 0..1000 {
            assert!(counts.has_room(&format!("named-by-a-token-{i}"), 0));
            assert!(counts.has_room(&format!("named-by-a-token-{i}"), 1));
        }
        assert!(counts.map.lock().unwrap().is_empty());
        let dev = counts.get("dev");
        let _hold = PoolHold::take(&dev, 1).unwrap();
        assert!(!counts.has_room("dev", 1), "a held place is seen");
        assert!(counts.has_room("dev", 2));
        assert_eq!(counts.map.lock().unwrap().len(), 1);
    }

    #[test]
    fn refusals_render_per_pool_and_limit() {
        let counts = PoolCounts::default();
        counts.get("dev").refused(PoolLimit::MaxStreams);
        counts.get("dev").refused(PoolLimit::MaxStreams);
        counts.get("dev").refused(PoolLimit::Rate);
        let devices = crate::core::config::DevicesConfig {
            pools: [(
                "dev".to_string(),
                crate::core::config::PoolLimits {
                    max_streams: 4,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        counts.set_caps(&devices);
        let mut out = String::new();
        counts.render_metrics(&["default".into(), "dev".into()], &mut out);
        for line in [
            r#"clio_relay_pool_max_streams{pool="dev"} 4"#,
            r#"clio_relay_pool_max_streams{pool="default"} 0"#,
            r#"clio_relay_pool_refusals_total{pool="dev",limit="max_streams"} 2"#,
            r#"clio_relay_pool_refusals_total{pool="dev",limit="rate"} 1"#,
            r#"clio_relay_pool_refusals_total{pool="default",limit="concurrent"} 0"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
    }
}
