//! A Redis that may evict keys when full (`maxmemory` with an evicting
//! `maxmemory-policy`) can drop a node's counts unseen: the node says so.

use std::time::Duration;

use clio_relay::core::secret::Secret;

use crate::redis::RedisServer;
use crate::util::*;

fn may_evict(relay: &Relay) -> Option<u64> {
    let (_, m) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    m.lines().find_map(|l| {
        l.strip_prefix("clio_relay_cluster_store_may_evict ")?
            .parse()
            .ok()
    })
}

#[test]
fn a_redis_that_may_evict_the_fleets_keys_is_flagged() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    // noeviction: writes fail when full, which a node sees as an outage.
    assert!(redis
        .command("CONFIG SET maxmemory 512mb")
        .starts_with("+OK"));
    let a = Relay::start(crate::node(&cfg, &redis, "node-a"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a)));
    assert_eq!(may_evict(&a), Some(0));
    // An evicting policy: a count hash evicted would leave a device's
    // streams uncounted with no call failing, so no node would notice.
    assert!(redis
        .command("CONFIG SET maxmemory-policy allkeys-lru")
        .starts_with("+OK"));
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&b)));
    assert_eq!(may_evict(&b), Some(1));
}

/// A policy changed while the nodes are connected (`CONFIG SET`, a
/// managed Redis's parameters applied live) was not seen until the next
/// reconnect, which may never come: it is read at each heartbeat.
#[test]
fn a_policy_changed_while_connected_is_seen_within_a_heartbeat() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    let mut c = crate::node(&cfg, &redis, "node-a");
    c.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(3);
    let a = Relay::start(c);
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a)));
    assert_eq!(may_evict(&a), Some(0));
    assert!(redis
        .command("CONFIG SET maxmemory 512mb")
        .starts_with("+OK"));
    assert!(redis
        .command("CONFIG SET maxmemory-policy volatile-lru")
        .starts_with("+OK"));
    assert!(
        wait_until(Duration::from_secs(10), || may_evict(&a) == Some(1)),
        "an evicting policy set while connected is flagged"
    );
    assert!(redis
        .command("CONFIG SET maxmemory-policy noeviction")
        .starts_with("+OK"));
    assert!(
        wait_until(Duration::from_secs(10), || may_evict(&a) == Some(0)),
        "and cleared once it is noeviction again"
    );
    assert!(crate::up(&a), "the node never left the store");
}
