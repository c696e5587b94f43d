//! Leases: a node killed with SIGKILL stops counting when its lease ends,
//! not before and not never.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use tungstenite::Message;

use crate::process::Node;
use crate::redis::RedisServer;
use crate::util::*;

#[test]
fn a_killed_node_stops_counting_when_its_lease_ends() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let mut a = Node::spawn(
        &fake.url(),
        &redis.url(),
        "node-a",
        "3s",
        &cfg.tokens.secret,
        "k1",
        "[devices]\nmax_concurrent_streams = 2\n",
    );
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    let token = b.token("phone");
    let _streams: Vec<Ws> = (0..2)
        .map(|_| {
            let (mut ws, _) = connect(a.client, &token, Via::Header).unwrap();
            ws.send(Message::text(config_message(None))).unwrap();
            ws
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    let refused = || {
        let (mut ws, _) = connect(b.addr(), &token, Via::Header).unwrap();
        stream_session(&mut ws, &config_message(None), &audio_frames(1, 1))
    };
    assert_eq!(refused().error_code(), Some(429));
    let (_, metrics) = http(a.admin, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_cluster_store_up 1"),
        "{metrics}"
    );
    a.kill9();
    let lease_end = redis.lease_end("node-a").expect("node-a holds a lease");
    // Not before: while the dead node's lease runs, its streams count.
    let got = refused();
    if redis.time_ms() < lease_end {
        assert_eq!(got.error_code(), Some(429), "{got:?}");
    }
    // Not never: once it has ended, the device has its streams back.
    assert!(wait_until(Duration::from_secs(30), || refused().finished()));
    assert!(
        redis.time_ms() >= lease_end,
        "released only after the lease"
    );
}

/// `clio:nodes` deleted by hand (or evicted): every node's lease goes, and
/// with it every stream's place in the device and account counts (only
/// nodes with a lease count). Each node sees its own lease gone at its
/// next poll and registers again, rather than at its next heartbeat (a
/// third of lease_ttl later: 20 s here).
#[test]
fn a_deleted_lease_is_registered_again_at_the_next_poll() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let start = |name: &str| {
        let mut c = crate::node(&cfg, &redis, name);
        c.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(60);
        Relay::start(c)
    };
    let (a, b) = (start("node-a"), start("node-b"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a) && crate::up(&b)));
    let _streams: Vec<Ws> = (0..2).map(|_| crate::open(&a, "phone")).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert!(redis.command("DEL clio:nodes").starts_with(":1"));
    assert!(
        wait_until(Duration::from_secs(5), || redis.member("node-a").is_some()
            && redis.member("node-b").is_some()),
        "both leases back well before the next heartbeat"
    );
    // A's two streams count again: the device is at its limit on B.
    assert!(wait_until(Duration::from_secs(5), || crate::up(&b)));
    let got = crate::try_stream(&b, "phone");
    assert_eq!(got.error_code(), Some(429), "{got:?}");
}

/// A node killed with SIGKILL cannot delete its entry in `clio:useq` (the
/// id of its last usage batch), and a restarted one is a new member: each
/// crash left one entry behind for good. A heartbeat forgets a member a
/// day after its lease ended, its `clio:useq` entry with its lease.
#[test]
fn a_killed_nodes_last_usage_batch_id_goes_with_its_old_lease() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let mut a = Node::spawn(
        &fake.url(),
        &redis.url(),
        "node-a",
        "3s",
        &cfg.tokens.secret,
        "k1",
        "",
    );
    let token = crate::process::mint(&cfg, "phone");
    let (mut ws, _) = connect(a.client, &token, Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(1, 1)).finished());
    let member = redis.member("node-a").expect("node-a holds a lease");
    assert!(
        wait_until(Duration::from_secs(10), || redis
            .hget("clio:useq", &member)
            .is_some()),
        "its usage reached Redis"
    );
    a.kill9();
    // A day and a moment later, as far as its lease is concerned.
    let ended = redis.time_ms() - 86_400_000 - 1_000;
    assert!(redis
        .command(&format!("ZADD clio:nodes XX {ended} {member}"))
        .starts_with(':'));
    let mut b = crate::node(&cfg, &redis, "node-b");
    b.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(3);
    let b = Relay::start(b);
    assert!(wait_until(Duration::from_secs(10), || crate::up(&b)));
    assert!(
        wait_until(Duration::from_secs(10), || redis.member("node-a").is_none()
            && redis.hget("clio:useq", &member).is_none()),
        "the dead member's lease and last batch id are gone: {:?}",
        redis.hget("clio:useq", &member)
    );
    assert!(redis.member("node-b").is_some(), "the live member stays");
}

/// The cluster thread renews its node's lease between its calls to the
/// store, not only between its passes: one poll can make several long
/// calls (the poll itself, then a revocation set or an account set that
/// changed, each up to `cluster.timeout`, the sets' parsing after it).
/// Here the proxy makes the poll right after a heartbeat, and the read of
/// the revocation lists that the poll finds changed, take 3.6 s each,
/// against a lease of 6 s (a heartbeat every 2 s). Checked between the
/// calls, the heartbeat is due before the read and renews the lease, so no
/// gap between renewals passes one call (3.6 s). Checked only once a
/// pass, the next renewal came after both (7.2 s): the lease had lapsed,
/// and the node went down to register again, its streams not counted
/// meanwhile.
#[test]
fn long_calls_in_one_poll_do_not_let_the_lease_lapse() {
    const LEASE: Duration = Duration::from_secs(6);
    const LONG: Duration = Duration::from_millis(3600);
    let redis = RedisServer::start();
    let proxy = crate::proxy::Proxy::start(redis.port);
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(crate::ADMIN));
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    let a = Relay::start(crate::node(&cfg, &redis, "node-a"));
    let mut on_b = crate::node(&cfg, &redis, "node-b");
    let fleet = on_b.cluster.as_mut().unwrap();
    fleet.redis_url = proxy.url();
    fleet.lease_ttl = LEASE;
    // Past the long calls: none of them fails.
    fleet.timeout = Duration::from_secs(15);
    let b = Relay::start(on_b);
    let soon = Duration::from_secs(10);
    assert!(wait_until(soon, || crate::up(&a) && crate::up(&b)));
    let stats = &b.handle.process.fleet.get().unwrap().stats;
    let registered = stats
        .registrations
        .load(std::sync::atomic::Ordering::Relaxed);
    // At B's next heartbeat, A revokes a device (the revocation version
    // goes up), and the poll that follows it and its read of the lists are
    // each held for `LONG` before they reach Redis.
    let heartbeat = ::redis::Script::new(clio_relay::core::cluster::scripts::HEARTBEAT)
        .get_hash()
        .to_string();
    let holds = proxy.holds();
    let a_admin = a.handle.admin_addr;
    let (tx, rx) = std::sync::mpsc::channel();
    proxy.hold_for(heartbeat.as_bytes(), move || {
        let _ = tx.send(http(
            a_admin,
            "POST",
            "/admin/revocations",
            Some(crate::ADMIN),
            Some(r#"{"device_id":"lost-phone"}"#),
        ));
        holds.hold_for(b"XREAD", || std::thread::sleep(LONG));
        holds.hold_for(b"clio:rev:tokskew", || std::thread::sleep(LONG));
    });
    let (status, body) = rx.recv_timeout(soon).expect("B's heartbeat came");
    assert_eq!(status, 200, "{body}");
    // The read of the lists has reached the proxy (its hold is taken as
    // it comes): the next renewal is the first after it, due as soon as
    // B has the lists.
    assert!(
        wait_until(soon + LONG * 2, || proxy.holds_left() == 0),
        "B's poll and its read of the lists came"
    );
    let end = redis.lease_end("node-b");
    assert!(
        wait_until(soon + LONG, || !crate::up(&b)
            || redis.lease_end("node-b") != end),
        "B renewed its lease or went down"
    );
    assert!(crate::up(&b), "B's lease lapsed during the poll");
    assert_eq!(
        stats
            .registrations
            .load(std::sync::atomic::Ordering::Relaxed),
        registered,
        "B registered again"
    );
    // And B has the revocation. Waited for, not read once: on CI's loaded
    // host B did not have it yet right after that renewal (the lists can
    // come with a later poll than the one held above).
    let mut list = String::new();
    assert!(
        wait_until(soon, || {
            list = http(
                b.handle.admin_addr,
                "GET",
                "/admin/revocations",
                Some(crate::ADMIN),
                None,
            )
            .1;
            list.contains("lost-phone")
        }),
        "{list}"
    );
}
