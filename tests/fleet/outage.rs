//! Redis going away and coming back: live streams untouched, new streams
//! by `on_store_down`, counts right afterwards.

use std::time::Duration;

use clio_relay::core::config::{DeviceLimits, StoreDown};
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{finish, open, try_stream, up};

fn metrics(relay: &Relay) -> String {
    http(relay.handle.admin_addr, "GET", "/metrics", None, None).1
}

#[test]
fn redis_down_keeps_live_streams_shares_limits_and_reregisters_exactly() {
    let mut redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        c.devices.default = DeviceLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        };
        c.usage.alerts.interval = Duration::from_millis(100);
    });
    let frames = audio_frames(6, 3);
    let mut live = open(&a, "phone");
    live.send(Message::binary(frames[0].clone())).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !up(&a) && !up(&b)));
    // The live stream goes on to a normal end.
    for f in &frames[1..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    let got = finish(live);
    assert!(got.finished(), "a live stream is not touched: {got:?}");
    assert!(wait_until(Duration::from_secs(10), || a
        .handle
        .process
        .live_streams()
        == 0));
    // New streams: each of the two nodes takes its share (2 / 2 = 1).
    let held = open(&a, "tablet");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    let got = try_stream(&a, "tablet");
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1013)),
        "A's share of the device limit is 1: {got:?}"
    );
    assert!(try_stream(&b, "tablet").finished(), "B has its own share");
    // /readyz, the metric and the alert say so.
    let (status, _, body) = http_get(a.handle.admin_addr, "/readyz", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("cluster store unreachable"), "{body}");
    assert!(metrics(&a).contains("clio_relay_cluster_store_up 0"));
    assert!(wait_until(Duration::from_secs(10), || metrics(&a)
        .contains(
            "clio_relay_alerts_firing{alert=\"cluster_store_down\",subject=\"node-a\"} 1"
        )));
    // Redis comes back empty: each node writes what it holds, once.
    redis.restart();
    assert!(wait_until(Duration::from_secs(15), || up(&a) && up(&b)));
    assert_eq!(redis.count("node-a", "dev", "tablet").as_deref(), Some("1"));
    assert_eq!(redis.count("node-a", "acct", "a").as_deref(), Some("1"));
    assert_eq!(redis.count("node-b", "dev", "tablet"), None);
    assert_eq!(
        redis.count("node-a", "dev", "phone"),
        None,
        "ended while down"
    );
    // Shared again: the device has one stream fleet-wide, so one more fits,
    // on either node, and then none.
    let _second = open(&b, "tablet");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert_eq!(try_stream(&a, "tablet").error_code(), Some(429));
    assert!(wait_until(Duration::from_secs(10), || metrics(&a)
        .contains(
            "clio_relay_alerts_firing{alert=\"cluster_store_down\",subject=\"node-a\"} 0"
        )));
    // Ending the stream held through the outage leaves no count behind.
    assert!(finish(held).finished());
    assert!(wait_until(Duration::from_secs(10), || redis
        .count("node-a", "dev", "tablet")
        .is_none()));
}

#[test]
fn refuse_mode_answers_503_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, _b) = crate::pair(&fake, &redis, "k1", |_| {});
    let mut node = a.cfg.clone();
    node.cluster.as_mut().unwrap().on_store_down = StoreDown::Refuse;
    node.cluster.as_mut().unwrap().node_id = "node-r".into();
    node.admin.state_dir = state_dir();
    let r = Relay::start(node);
    assert!(wait_until(Duration::from_secs(10), || up(&r)));
    assert!(try_stream(&r, "phone").finished());
    redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !up(&r)));
    let got = try_stream(&r, "phone");
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(503), Some(1013)),
        "{got:?}"
    );
    assert_eq!(http_get(r.handle.admin_addr, "/readyz", "").0, 503);
    assert!(metrics(&r).contains("clio_relay_cluster_stream_opens_total{decided_by=\"refused\"} 1"));
    redis.restart();
    assert!(wait_until(Duration::from_secs(15), || up(&r)));
    // Redis came back empty: opens are refused until the three nodes have
    // registered again (see loss.rs), then decided by Redis.
    assert!(wait_until(Duration::from_secs(15), || try_stream(
        &r, "phone"
    )
    .finished()));
}

/// While Redis is unreachable, `local` holds each node to its share of a
/// limit (rounded down, at least 1) counting only its own streams, as
/// README says: the fleet as a whole can pass the limit until Redis
/// answers again.
#[test]
fn while_redis_is_down_each_node_holds_its_own_share_not_the_fleets_limit() {
    let mut redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        c.devices.default = DeviceLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        };
    });
    let c = Relay::start(crate::node(&a.cfg, &redis, "node-c"));
    let nodes = [&a, &b, &c];
    assert!(wait_until(Duration::from_secs(10), || nodes.iter().all(
        |r| up(r) && r.handle.process.fleet.get().unwrap().nodes() == 3
    )));
    // The device's whole limit, on one node.
    let held = [open(&a, "phone"), open(&a, "phone")];
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    redis.kill();
    assert!(wait_until(Duration::from_secs(10), || nodes
        .iter()
        .all(|r| !up(r))));
    // Each other node's share of 2 among 3 is 1, and it has none.
    let more = [open(&b, "phone"), open(&c, "phone")];
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 4));
    for r in nodes {
        let got = try_stream(r, "phone");
        assert_eq!(
            (got.error_code(), got.close_code()),
            (Some(429), Some(1013)),
            "{got:?}"
        );
        assert!(
            got.messages[0]["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("1 concurrent streams")),
            "the refusal names the share: {got:?}"
        );
    }
    for ws in held.into_iter().chain(more) {
        assert!(finish(ws).finished());
    }
}
