//! Two relays configured with one `cluster.node_id` (a copied config
//! file): the second refuses to start while the first runs; one that
//! joined while Redis was unreachable keeps its streams counted apart,
//! neither mistakes the other's usage for a store that went back in time,
//! and both say so.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;

use crate::redis::RedisServer;
use crate::util::*;

fn metric(relay: &Relay, name: &str) -> Option<u64> {
    let (_, body) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Usage is kept by node id: a second running process under one id would
/// add its usage to the first's row, and after a loss of Redis's data
/// each would delete the other's when giving its own back. It exits 3 (a
/// configuration fault: systemd's `RestartPreventExitStatus=3` does not
/// retry it) before it counts or sends anything.
#[test]
fn a_second_relay_with_a_running_nodes_id_refuses_to_start() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let mut c = crate::node(&cfg, &redis, "relay-1");
    c.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(3);
    let a = Relay::start(c);
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a)));
    let _streams: Vec<Ws> = (0..2).map(|_| crate::open(&a, "phone")).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    let twin = crate::process::Node::try_spawn(
        &fake.url(),
        &redis.url(),
        "relay-1",
        "3s",
        &cfg.tokens.secret,
        "k1",
        "[devices]\nmax_concurrent_streams = 2\n",
    );
    let Err((code, stderr)) = twin else {
        panic!("a second relay-1 started beside the running one");
    };
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("another running relay has it"), "{stderr}");
    // It wrote nothing under the id: one member, the first's counts.
    let members = redis.command("ZRANGE clio:nodes 0 -1");
    assert_eq!(members.matches("relay-1/").count(), 1, "{members}");
    assert_eq!(redis.count("relay-1", "dev", "phone").as_deref(), Some("2"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(metric(&a, "clio_relay_cluster_node_id_conflict"), Some(0));
}

/// A hand-over restart (README "One relay per port"): the new process,
/// started with `--join-client-port` beside the running one, has its
/// config and so its node id. It is the same node taking over, not a twin
/// by mistake: it starts, and takes streams on the shared port.
#[test]
fn a_hand_over_restart_with_the_same_node_id_starts() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    let mut c = crate::node(&cfg, &redis, "relay-1");
    c.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(3);
    let old = Relay::start(c.clone());
    assert!(wait_until(Duration::from_secs(10), || crate::up(&old)));
    let mut next = c;
    next.server.listen = old.addr();
    next.admin.state_dir = state_dir();
    let new = clio_relay::cli::server::start_joining(&next, Default::default(), true)
        .expect("the hand-over's new relay starts");
    assert_eq!(new.client_addr, old.addr());
    let token = old.token("phone");
    drop(old);
    // The old process's listeners linger while the kernel tears its rings
    // down: a connection may land there and be reset meanwhile.
    let mut streamed = None;
    assert!(wait_until(Duration::from_secs(5), || {
        streamed = connect(new.client_addr, &token, Via::Header).ok();
        streamed.is_some()
    }));
    let (mut ws, _) = streamed.unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
    assert!(got.finished(), "{got:?}");
}

/// A twin that started while Redis was unreachable (here: paused) finds no
/// one to refuse it; the heartbeats then report it on both.
#[test]
fn two_nodes_with_one_node_id_keep_their_counts_apart_and_say_so() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let a = Relay::start(crate::node(&cfg, &redis, "relay-1"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a)));
    let token = a.token("phone");
    let _streams: Vec<Ws> = (0..2).map(|_| crate::open(&a, "phone")).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    // The same node_id on a second host, started while Redis does not
    // answer: it must not wipe the first's counts when it registers.
    assert!(redis.command("CLIENT PAUSE 3000 ALL").starts_with("+OK"));
    let b = Relay::start(crate::node(&cfg, &redis, "relay-1"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&b)));
    let (mut ws, _) = connect(b.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &[]);
    assert_eq!(got.error_code(), Some(429), "the device has its 2: {got:?}");
    // Both nodes count for the shares (two processes, two leases).
    assert!(wait_until(Duration::from_secs(10), || {
        [&a, &b]
            .iter()
            .all(|r| r.handle.process.fleet.get().unwrap().nodes() == 2)
    }));
    // The operator is told, on both, within a heartbeat or two.
    assert!(
        wait_until(Duration::from_secs(20), || {
            [&a, &b]
                .iter()
                .all(|r| metric(r, "clio_relay_cluster_node_id_conflict") == Some(1))
        }),
        "both nodes report the shared node_id"
    );
    // Streams that end on both nodes send usage under one node id: neither
    // takes the other's batch for a store that went back to an older copy
    // (which registers again and puts the whole fleet in its shares).
    let before: Vec<_> = [&a, &b]
        .iter()
        .map(|r| metric(r, "clio_relay_cluster_registrations_total"))
        .collect();
    for _ in 0..3 {
        for r in [&a, &b] {
            assert!(crate::try_stream(r, "tablet").finished());
        }
        std::thread::sleep(Duration::from_millis(1200));
    }
    let after: Vec<_> = [&a, &b]
        .iter()
        .map(|r| metric(r, "clio_relay_cluster_registrations_total"))
        .collect();
    assert_eq!(before, after, "no node registered again");
}

/// A node restarted after SIGKILL comes back with its node_id while its
/// dead self's lease runs: not a twin (the dead one renews nothing), and
/// the dead one's streams count until that lease ends, as for any node
/// that dies.
#[test]
fn a_node_restarted_after_a_crash_is_not_taken_for_a_twin() {
    use crate::process::Node;
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let spawn = || {
        Node::spawn(
            &fake.url(),
            &redis.url(),
            "node-a",
            "3s",
            &cfg.tokens.secret,
            "k1",
            "[devices]\nmax_concurrent_streams = 2\n",
        )
    };
    let token = crate::process::mint(&cfg, "phone");
    let open = |node: &Node| {
        let (mut ws, _) = connect(node.client, &token, Via::Header).unwrap();
        ws.send(tungstenite::Message::text(config_message(None)))
            .unwrap();
        ws
    };
    let mut first = spawn();
    let _streams: Vec<Ws> = (0..2).map(|_| open(&first)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    first.kill9();
    let dead_lease = redis.lease_end("node-a").expect("the dead one's lease");
    let again = spawn();
    let refused = || {
        let (mut ws, _) = connect(again.client, &token, Via::Header).unwrap();
        stream_session(&mut ws, &config_message(None), &audio_frames(1, 1))
    };
    let got = refused();
    if redis.time_ms() < dead_lease {
        assert_eq!(got.error_code(), Some(429), "{got:?}");
    }
    assert!(wait_until(Duration::from_secs(30), || refused().finished()));
    // Heartbeats every second: none sees a twin.
    std::thread::sleep(Duration::from_secs(4));
    let (_, m) = http(again.admin, "GET", "/metrics", None, None);
    assert!(m.contains("clio_relay_cluster_node_id_conflict 0"), "{m}");
    assert!(m.contains("clio_relay_cluster_store_up 1"), "{m}");
}

/// Under systemd, the start of a relay whose dead self's lease it watches
/// asks for that much more start time before it is ready: with a long
/// `lease_ttl` the watch would outlast the unit's start timeout.
#[test]
fn a_start_that_watches_a_dead_lease_asks_systemd_for_time() {
    use crate::process::Node;
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let spawn = |env: &[(&str, &str)]| {
        Node::try_spawn_with(
            &fake.url(),
            &redis.url(),
            "node-a",
            "3s",
            &cfg.tokens.secret,
            "k1",
            "",
            env,
        )
        .unwrap_or_else(|(code, err)| panic!("exited {code:?}: {err}"))
    };
    let mut first = spawn(&[]);
    assert!(wait_until(Duration::from_secs(10), || redis
        .lease_end("node-a")
        .is_some()));
    first.kill9();
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd.set_nonblocking(true).unwrap();
    let _again = spawn(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    assert!(wait_until(Duration::from_secs(10), || {
        while let Ok(n) = systemd.recv(&mut buf) {
            said.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        said.iter().any(|m| m.contains("READY=1"))
    }));
    let extend = said
        .iter()
        .position(|m| m.starts_with("EXTEND_TIMEOUT_USEC="))
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC: {said:?}"));
    let ready = said.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(extend < ready, "{said:?}");
    let usec: u64 = said[extend]["EXTEND_TIMEOUT_USEC=".len()..]
        .trim()
        .parse()
        .unwrap();
    // The watch (a third of the 3 s lease and more) and a margin.
    assert!(usec > 10_000_000, "{usec}");
}
