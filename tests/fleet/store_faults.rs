//! Redis faults an operator meets: a Redis that answers reads but refuses
//! writes (`min-replicas-to-write` with no replica, as a primary cut off
//! from its replicas does), and one not there when the nodes start. The
//! nodes see each as unreachable, live streams go on, and once Redis
//! answers the fleet's counts are exact.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{finish, open, try_stream, up};

#[test]
fn a_redis_refusing_writes_is_unreachable_and_the_fleet_converges_after() {
    refusing_writes(
        "CONFIG SET min-replicas-to-write 1",
        "CONFIG SET min-replicas-to-write 0",
    );
}

/// README "Redis's memory": full under `noeviction`, Redis refuses writes
/// (OOM), which the nodes see as Redis unreachable.
#[test]
fn a_full_redis_is_unreachable_and_the_fleet_converges_after() {
    refusing_writes("CONFIG SET maxmemory 1", "CONFIG SET maxmemory 0");
}

/// Redis refuses writes from `refuse` until `take`, while a stream flows.
fn refusing_writes(refuse: &str, take: &str) {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        c.devices.default = DeviceLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        };
    });
    let frames = audio_frames(6, 3);
    let mut live = open(&a, "phone");
    live.send(Message::binary(frames[0].clone())).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    assert!(redis.command(refuse).starts_with("+OK"));
    assert!(
        wait_until(Duration::from_secs(20), || !up(&a) && !up(&b)),
        "a refused write takes the store down on both nodes"
    );
    // While Redis refuses writes: each node holds its share (2 / 2 = 1).
    let held = open(&b, "phone");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    let got = try_stream(&a, "phone");
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    // The stream that was flowing goes on to a normal end.
    for f in &frames[1..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    let got = finish(live);
    assert!(got.finished(), "a live stream is not touched: {got:?}");
    assert!(redis.command(take).starts_with("+OK"));
    assert!(wait_until(Duration::from_secs(20), || up(&a) && up(&b)));
    // Each node wrote what it holds: the stream held on B, not the one
    // that ended on A.
    assert!(wait_until(Duration::from_secs(10), || {
        redis.count("node-b", "dev", "phone").as_deref() == Some("1")
            && redis.count("node-a", "dev", "phone").is_none()
    }));
    // Shared again: one more fits fleet-wide, then none on either node.
    let _second = open(&a, "phone");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert_eq!(try_stream(&a, "phone").error_code(), Some(429));
    assert_eq!(try_stream(&b, "phone").error_code(), Some(429));
    drop(held);
}

#[test]
fn nodes_started_while_redis_is_unreachable_join_the_fleet_when_it_answers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let a = Relay::start(crate::node(&cfg, &redis, "node-a"));
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    assert!(!up(&a) && !up(&b));
    // Knowing no other node, each holds the whole limit (2 / 1).
    let first = open(&a, "phone");
    let second = open(&a, "phone");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert_eq!(try_stream(&a, "phone").error_code(), Some(429));
    redis.restart();
    assert!(wait_until(Duration::from_secs(20), || {
        let f = |r: &Relay| r.handle.process.fleet.get().unwrap().nodes() == 2;
        up(&a) && up(&b) && f(&a) && f(&b)
    }));
    assert_eq!(redis.count("node-a", "dev", "phone").as_deref(), Some("2"));
    // Shared now: the device is at its limit on either node.
    assert_eq!(try_stream(&b, "phone").error_code(), Some(429));
    assert_eq!(try_stream(&a, "phone").error_code(), Some(429));
    // The streams opened before Redis was there end normally and give
    // their places back.
    assert!(finish(first).finished());
    assert!(finish(second).finished());
    assert!(wait_until(Duration::from_secs(10), || redis
        .count("node-a", "dev", "phone")
        .is_none()));
    assert!(try_stream(&b, "phone").finished());
}

/// The fleet's streams of account `a` today, as `relay` answers
/// `/admin/usage` (`None` unless it answers for the fleet).
fn fleet_streams(relay: &Relay) -> Option<u64> {
    let (_, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/usage",
        Some(crate::ADMIN),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (v["scope"] == "fleet").then_some(())?;
    v["rows"].as_array()?.iter().find(|r| r["key"] == "a")?["streams"].as_u64()
}

#[test]
fn a_flushall_under_streams_on_three_nodes_converges_with_usage_counted_once() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(crate::ADMIN));
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 3,
        ..Default::default()
    };
    let nodes: Vec<Relay> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Relay::start(crate::node(&cfg, &redis, n)))
        .collect();
    let all_up = || {
        nodes.iter().all(|r| {
            let f = r.handle.process.fleet.get().unwrap();
            f.store_up() && f.nodes() == 3
        })
    };
    assert!(wait_until(Duration::from_secs(20), all_up));
    for (i, n) in nodes.iter().enumerate() {
        for j in 0..3 {
            assert!(try_stream(n, &format!("d{i}{j}")).finished());
        }
    }
    assert!(wait_until(Duration::from_secs(10), || fleet_streams(
        &nodes[0]
    ) == Some(9)));
    // One stream of "phone" held on each node through the flush.
    let held: Vec<_> = nodes.iter().map(|n| open(n, "phone")).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    // Streams that end while the fleet notices and settles count once too.
    for n in &nodes {
        for j in 0..2 {
            assert!(try_stream(n, &format!("after{j}")).finished());
        }
    }
    assert!(wait_until(Duration::from_secs(20), all_up));
    assert!(
        wait_until(Duration::from_secs(20), || {
            ["node-a", "node-b", "node-c"]
                .iter()
                .all(|n| redis.count(n, "dev", "phone").as_deref() == Some("1"))
        }),
        "each node registered the stream it holds"
    );
    assert_eq!(try_stream(&nodes[1], "phone").error_code(), Some(429));
    assert!(
        wait_until(Duration::from_secs(20), || fleet_streams(&nodes[2])
            == Some(15)),
        "the fleet's usage: {:?} of 15",
        fleet_streams(&nodes[2])
    );
    for ws in held {
        assert!(finish(ws).finished());
    }
    assert!(wait_until(Duration::from_secs(10), || fleet_streams(
        &nodes[0]
    ) == Some(18)));
}
