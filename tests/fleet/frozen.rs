//! A node frozen past its lease (SIGSTOP, as a VM paused that long) and
//! thawed: while frozen its streams stop counting, and once thawed it
//! registers them again, so the fleet's counts are what the nodes hold.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use nix::sys::signal::Signal;
use tungstenite::Message;

use crate::process::{mint, Node};
use crate::redis::RedisServer;
use crate::util::*;

#[test]
fn a_node_thawed_after_its_lease_ended_counts_its_streams_again() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let a = Node::spawn(
        &fake.url(),
        &redis.url(),
        "node-a",
        "3s",
        &cfg.tokens.secret,
        "k1",
        "[devices]\nmax_concurrent_streams = 2\n",
    );
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    assert!(wait_until(Duration::from_secs(20), || b
        .handle
        .process
        .fleet
        .get()
        .unwrap()
        .nodes()
        == 2));
    let token = mint(&cfg, "phone");
    let on_a: Vec<Ws> = (0..2)
        .map(|_| {
            let (mut ws, _) = connect(a.client, &token, Via::Header).unwrap();
            ws.send(Message::text(config_message(None))).unwrap();
            ws
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert_eq!(redis.count("node-a", "dev", "phone").as_deref(), Some("2"));
    a.signal(Signal::SIGSTOP);
    // Its lease ends: B lets the device's streams in again (README: the
    // streams of a node that stops renewing stop counting).
    let on_b: Vec<Ws> = (0..2)
        .map(|_| {
            let mut ws = None;
            assert!(wait_until(Duration::from_secs(30), || {
                let (mut w, _) = connect(b.addr(), &token, Via::Header).unwrap();
                w.send(Message::text(config_message(None))).unwrap();
                let before = fake.active_streams();
                let ok = wait_until(Duration::from_secs(2), || fake.active_streams() > before);
                if ok {
                    ws = Some(w);
                }
                ok
            }));
            ws.unwrap()
        })
        .collect();
    a.signal(Signal::SIGCONT);
    // Thawed, A sees its lease lapsed and registers what it holds.
    assert!(
        wait_until(Duration::from_secs(20), || redis
            .count("node-a", "dev", "phone")
            .as_deref()
            == Some("2")
            && redis.lease_end("node-a").unwrap_or(0) > redis.time_ms()),
        "A's streams count again: {:?}",
        redis.count("node-a", "dev", "phone")
    );
    assert_eq!(redis.count("node-b", "dev", "phone").as_deref(), Some("2"));
    // The device is over its limit (4 of 2) until streams end: none more.
    let (mut ws, _) = connect(b.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &[]);
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    drop(on_a);
    drop(on_b);
    assert!(wait_until(Duration::from_secs(20), || {
        redis.count("node-a", "dev", "phone").is_none()
            && redis.count("node-b", "dev", "phone").is_none()
    }));
}
