//! Shared limits opened at the same moment through different nodes: the
//! fleet never lets more in than the limit, and every place comes back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;

/// Three nodes on one Redis, `tweak` applied to the shared config.
fn three(
    fake: &fake_soniox::FakeSoniox,
    redis: &RedisServer,
    tweak: impl FnOnce(&mut clio_relay::core::config::Config),
) -> Vec<Relay> {
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    tweak(&mut cfg);
    let nodes: Vec<Relay> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Relay::start(crate::node(&cfg, redis, n)))
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || nodes.iter().all(|r| {
            let f = r.handle.process.fleet.get().unwrap();
            f.store_up() && f.nodes() == 3
        })),
        "the three nodes reach Redis and see each other"
    );
    nodes
}

/// What became of the streams opened at once: the ones let in (still
/// open) and how many were refused, with each refusal's error code.
struct Burst {
    admitted: Vec<Ws>,
    refused: Vec<Option<u64>>,
}

/// [`three`] with every device held to `max` concurrent streams.
fn three_with_device_cap(
    fake: &fake_soniox::FakeSoniox,
    redis: &RedisServer,
    max: u32,
) -> Vec<Relay> {
    three(fake, redis, |c| {
        c.devices.default = DeviceLimits {
            max_concurrent_streams: max,
            ..Default::default()
        }
    })
}

/// Session tokens of `n` devices (`prefix-0`, `prefix-1`, ...), minted
/// by `node` (every node shares the secret).
fn devices(node: &Relay, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| node.token(&format!("{prefix}-{i}")))
        .collect()
}

/// Opens `tokens.len()` streams at the same moment, the `i`th on node
/// `i % 3` with `tokens[i]`. A stream is refused when the relay answers
/// its config with an error; the others count as let in once the fake
/// upstream holds as many more streams than `before` the burst as were
/// not refused (bounded wait).
fn burst(nodes: &[Relay], fake: &fake_soniox::FakeSoniox, tokens: Vec<String>) -> Burst {
    let n = tokens.len();
    let before = fake.active_streams();
    let start = Arc::new(Barrier::new(n));
    let refused = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let addr = nodes[i % nodes.len()].addr();
            let (start, refused, done) = (start.clone(), refused.clone(), done.clone());
            std::thread::spawn(move || {
                start.wait();
                let (mut ws, _) = connect(addr, &token, Via::Header).unwrap();
                ws.send(Message::text(config_message(None))).unwrap();
                ws.get_ref()
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                loop {
                    match ws.read() {
                        Ok(Message::Text(t)) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                            if let Some(code) = v["error_code"].as_u64() {
                                refused.fetch_add(1, Ordering::SeqCst);
                                return Err(Some(code));
                            }
                        }
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(e))
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            if done.load(Ordering::SeqCst) {
                                return Ok(ws);
                            }
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return Err(None);
                        }
                    }
                }
            })
        })
        .collect();
    let mut most = 0;
    let settled = wait_until(Duration::from_secs(60), || {
        let live = fake.active_streams().saturating_sub(before);
        most = most.max(live);
        live + refused.load(Ordering::SeqCst) == n
    });
    done.store(true, Ordering::SeqCst);
    let mut b = Burst {
        admitted: Vec::new(),
        refused: Vec::new(),
    };
    for t in threads {
        match t.join().unwrap() {
            Ok(ws) => b.admitted.push(ws),
            Err(code) => b.refused.push(code),
        }
    }
    assert!(settled, "every stream was let in or refused");
    assert!(most <= b.admitted.len(), "never more upstream than let in");
    b
}

#[test]
fn a_device_limit_holds_when_its_streams_open_at_once_on_three_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three_with_device_cap(&fake, &redis, 3);
    let token = nodes[0].token("phone");
    let b = burst(&nodes, &fake, vec![token.clone(); 48]);
    assert_eq!(b.admitted.len(), 3, "exactly the limit is let in");
    assert!(b.refused.iter().all(|c| *c == Some(429)), "{:?}", b.refused);
    // Every place comes back once the streams end: the device opens its
    // three again, spread over the nodes.
    drop(b);
    assert!(wait_until(Duration::from_secs(20), || fake
        .active_streams()
        == 0));
    assert!(wait_until(Duration::from_secs(20), || {
        ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| redis.count(n, "dev", "phone").is_none())
    }));
    let again = burst(&nodes, &fake, vec![token; 9]);
    assert_eq!(again.admitted.len(), 3);
}

#[test]
fn an_account_limit_holds_when_many_devices_open_at_once_on_three_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three(&fake, &redis, |c| c.accounts[0].max_concurrent_streams = 5);
    let tokens = devices(&nodes[0], "device", 45);
    let b = burst(&nodes, &fake, tokens);
    assert_eq!(b.admitted.len(), 5, "exactly the account's limit is let in");
    drop(b);
    assert!(wait_until(Duration::from_secs(20), || fake
        .active_streams()
        == 0));
    assert!(wait_until(Duration::from_secs(20), || {
        ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| redis.count(n, "acct", "a").is_none())
    }));
    let tokens = devices(&nodes[0], "other", 15);
    assert_eq!(burst(&nodes, &fake, tokens).admitted.len(), 5);
}

/// The counts of `kind` (`dev` or `acct`) `field` over the three nodes.
fn counted(redis: &RedisServer, kind: &str, field: &str) -> u64 {
    ["node-a", "node-b", "node-c"]
        .iter()
        .filter_map(|n| redis.count(n, kind, field)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn places_come_back_when_upstream_refuses_or_fails_under_a_burst() {
    let redis = RedisServer::start();
    let fake = fake(&["k1", "k2"], |_| {});
    // Account `a`'s key is refused at the upgrade: every stream moves to
    // `b`, and must leave nothing counted on `a`.
    fake.set_key_reject("k1", Some(429));
    let nodes = three(&fake, &redis, |c| {
        c.accounts = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]).accounts;
        for a in &mut c.accounts {
            a.max_concurrent_streams = 20;
        }
    });
    let tokens = devices(&nodes[0], "device", 30);
    let b = burst(&nodes, &fake, tokens);
    assert_eq!(b.admitted.len(), 20, "b's limit, none on the refused a");
    assert!(wait_until(Duration::from_secs(10), || counted(
        &redis, "acct", "a"
    ) == 0
        && counted(&redis, "acct", "b") == 20));
    // `b` fails under its live streams (a Soniox error at the next frame),
    // and `a` refuses: every stream ends, and every place comes back.
    fake.fail_sessions_of("k2", Some(fake_soniox::FaultKind::Error(503)));
    fake.set_key_reject("k2", Some(503));
    let mut admitted = b.admitted;
    for ws in &mut admitted {
        ws.send(Message::binary(audio_frames(1, 2)[0].clone()))
            .unwrap();
    }
    assert!(wait_until(Duration::from_secs(30), || fake
        .active_streams()
        == 0));
    for mut ws in admitted {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let got = read_all(&mut ws);
        assert!(got.close_code().is_some() || got.abrupt, "{got:?}");
    }
    assert!(
        wait_until(Duration::from_secs(20), || counted(&redis, "acct", "a")
            + counted(&redis, "acct", "b")
            + (0..30)
                .map(|i| counted(&redis, "dev", &format!("device-{i}")))
                .sum::<u64>()
            == 0),
        "a: {} b: {}",
        counted(&redis, "acct", "a"),
        counted(&redis, "acct", "b")
    );
    fake.fail_sessions_of("k2", None);
    fake.set_key_reject("k2", None);
    let tokens = devices(&nodes[0], "again", 25);
    assert_eq!(burst(&nodes, &fake, tokens).admitted.len(), 20);
}

#[test]
fn a_pools_cap_holds_on_each_node_under_a_burst_across_shards() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    // README: `max_streams` is each node's own (across its shards), so
    // the fleet takes at most 3 per node, 9 in all.
    let nodes = three(&fake, &redis, |c| {
        c.server.shards = 2;
        c.devices.pools.insert(
            "default".into(),
            clio_relay::core::config::PoolLimits {
                max_streams: 3,
                ..Default::default()
            },
        );
    });
    let tokens = devices(&nodes[0], "device", 45);
    let b = burst(&nodes, &fake, tokens);
    assert_eq!(b.admitted.len(), 9, "3 on each node");
    assert!(b.refused.iter().all(|c| *c == Some(429)), "{:?}", b.refused);
    for n in &nodes {
        assert_eq!(n.handle.process.live_streams(), 3);
    }
    drop(b);
    assert!(nodes.iter().all(|n| n.wait_idle(Duration::from_secs(20))));
    let tokens = devices(&nodes[0], "again", 30);
    assert_eq!(burst(&nodes, &fake, tokens).admitted.len(), 9);
}

#[test]
fn a_burst_during_a_redis_stall_keeps_to_the_shares_and_leaves_exact_counts() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three_with_device_cap(&fake, &redis, 3);
    let token = nodes[0].token("phone");
    // Redis takes the opens in and answers none for 3 s (past the 500 ms
    // timeout): each node decides by its share (3 / 3 = 1), and Redis
    // runs the opens it took once it answers again.
    assert!(redis.command("CLIENT PAUSE 3000 ALL").starts_with("+OK"));
    let b = burst(&nodes, &fake, vec![token.clone(); 30]);
    assert!(b.admitted.len() <= 3, "{} let in", b.admitted.len());
    assert!(wait_until(Duration::from_secs(30), || nodes
        .iter()
        .all(|n| n.handle.process.fleet.get().unwrap().store_up())));
    // What Redis counts is what the nodes hold, not the late opens.
    let admitted = b.admitted.len() as u64;
    assert!(
        wait_until(Duration::from_secs(20), || counted(&redis, "dev", "phone")
            == admitted),
        "Redis counts {} of {admitted}",
        counted(&redis, "dev", "phone")
    );
    drop(b);
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "dev", "phone"
    ) == 0));
    assert_eq!(burst(&nodes, &fake, vec![token; 12]).admitted.len(), 3);
}

#[test]
fn a_devices_new_stream_rate_holds_under_a_burst_on_three_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three(&fake, &redis, |c| {
        c.devices.default = DeviceLimits {
            streams_per_minute: 5,
            ..Default::default()
        }
    });
    let token = nodes[0].token("phone");
    let b = burst(&nodes, &fake, vec![token; 30]);
    // The bucket refills one stream per 12 s: a burst far shorter than
    // that gets the 5 and at most one more.
    assert!(
        (5..=6).contains(&b.admitted.len()),
        "{} let in",
        b.admitted.len()
    );
    assert!(b.refused.iter().all(|c| *c == Some(429)), "{:?}", b.refused);
}

#[test]
fn redis_dropping_every_connection_under_a_burst_lets_no_more_in() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three_with_device_cap(&fake, &redis, 3);
    let token = nodes[0].token("phone");
    let first = burst(&nodes, &fake, vec![token.clone(); 3]);
    assert_eq!(first.admitted.len(), 3);
    // A failover or a restart drops every client connection: the nodes
    // reconnect, and opens meanwhile go by the shares (one per node, each
    // node holding one already).
    assert!(redis
        .command("CLIENT KILL TYPE normal SKIPME yes")
        .starts_with(':'));
    let second = burst(&nodes, &fake, vec![token.clone(); 30]);
    assert_eq!(second.admitted.len(), 0, "the device has its 3 already");
    assert!(wait_until(Duration::from_secs(20), || nodes
        .iter()
        .all(|n| n.handle.process.fleet.get().unwrap().store_up())));
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "dev", "phone"
    ) == 3));
    drop(first);
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "dev", "phone"
    ) == 0));
    assert_eq!(burst(&nodes, &fake, vec![token; 12]).admitted.len(), 3);
}

#[test]
fn streams_resuming_on_another_account_move_their_fleet_count_with_them() {
    let redis = RedisServer::start();
    let fake = fake(&["k1", "k2"], |_| {});
    let nodes = three(&fake, &redis, |c| {
        c.accounts = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]).accounts;
        for a in &mut c.accounts {
            a.max_concurrent_streams = 20;
        }
    });
    let tokens = devices(&nodes[0], "device", 12);
    let b = burst(&nodes, &fake, tokens);
    assert_eq!(b.admitted.len(), 12);
    assert!(wait_until(Duration::from_secs(10), || counted(
        &redis, "acct", "a"
    ) + counted(
        &redis, "acct", "b"
    ) == 12));
    let on_a = counted(&redis, "acct", "a");
    assert!(on_a > 0, "the most-room pick spread the streams");
    // Account a's upstream drops every stream at its next frame and takes
    // no new one: its streams resume on b (raw audio), mid-stream.
    fake.set_key_reject("k1", Some(503));
    fake.fail_sessions_of("k1", Some(fake_soniox::FaultKind::Drop));
    let mut admitted = b.admitted;
    for ws in &mut admitted {
        ws.send(Message::binary(audio_frames(1, 3)[0].clone()))
            .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(30), || counted(&redis, "acct", "a")
            == 0
            && counted(&redis, "acct", "b") == 12
            && fake.active_streams() == 12),
        "a: {} b: {} upstream: {}",
        counted(&redis, "acct", "a"),
        counted(&redis, "acct", "b"),
        fake.active_streams()
    );
    for mut ws in admitted {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = ws.send(Message::binary(Vec::<u8>::new()));
        let got = read_all(&mut ws);
        assert!(got.finished(), "resumed streams end normally: {got:?}");
    }
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "acct", "b"
    ) + counted(
        &redis, "acct", "a"
    ) == 0));
}

#[test]
fn streams_resuming_at_once_never_pass_the_other_accounts_fleet_limit() {
    let redis = RedisServer::start();
    let fake = fake(&["k1", "k2"], |_| {});
    let nodes = three(&fake, &redis, |c| {
        c.accounts = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]).accounts;
        c.accounts[0].max_concurrent_streams = 20;
        c.accounts[1].max_concurrent_streams = 1;
    });
    // Each open takes the account with the most room: every one goes to
    // a while it has more than b's 1.
    let tokens = devices(&nodes[0], "device", 9);
    let b = burst(&nodes, &fake, tokens);
    assert_eq!(b.admitted.len(), 9);
    assert!(wait_until(Duration::from_secs(10), || counted(
        &redis, "acct", "a"
    ) == 9));
    fake.set_key_reject("k1", Some(503));
    fake.fail_sessions_of("k1", Some(fake_soniox::FaultKind::Drop));
    let mut admitted = b.admitted;
    for ws in &mut admitted {
        ws.send(Message::binary(audio_frames(1, 3)[0].clone()))
            .unwrap();
    }
    // Only one of the nine fits on b at a time, fleet-wide; the others
    // end or wait to resume.
    let mut most_b = 0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            most_b = most_b.max(counted(&redis, "acct", "b"));
            fake.active_streams() <= 1 && counted(&redis, "acct", "a") == 0
        }),
        "a: {} b: {} upstream: {}",
        counted(&redis, "acct", "a"),
        counted(&redis, "acct", "b"),
        fake.active_streams()
    );
    assert!(most_b <= 1, "b counted {most_b}");
    // Ended one by one, each frees b's place for a stream still resuming:
    // b never counts more than one.
    for mut ws in admitted {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = ws.send(Message::binary(Vec::<u8>::new()));
        read_all(&mut ws);
        most_b = most_b.max(counted(&redis, "acct", "b"));
    }
    assert!(most_b <= 1, "b counted {most_b}");
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "acct", "b"
    ) + counted(
        &redis, "acct", "a"
    ) == 0));
}

#[test]
fn a_script_flush_under_a_burst_leaves_exact_counts() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let nodes = three_with_device_cap(&fake, &redis, 6);
    let token = nodes[0].token("phone");
    let first = burst(&nodes, &fake, vec![token.clone(); 3]);
    assert_eq!(first.admitted.len(), 3);
    // Redis forgets the scripts (an operator's SCRIPT FLUSH, a restart
    // the connections survived through a proxy): the next EVALSHA on each
    // link is answered NOSCRIPT.
    assert!(redis.command("SCRIPT FLUSH").starts_with("+OK"));
    let second = burst(&nodes, &fake, vec![token.clone(); 30]);
    assert!(second.admitted.len() <= 3, "{}", second.admitted.len());
    assert!(wait_until(Duration::from_secs(20), || nodes
        .iter()
        .all(|n| n.handle.process.fleet.get().unwrap().store_up())));
    let held = (first.admitted.len() + second.admitted.len()) as u64;
    assert!(
        wait_until(Duration::from_secs(20), || counted(&redis, "dev", "phone")
            == held),
        "Redis counts {} of {held}",
        counted(&redis, "dev", "phone")
    );
    drop(first);
    drop(second);
    assert!(wait_until(Duration::from_secs(20), || counted(
        &redis, "dev", "phone"
    ) == 0));
    assert_eq!(burst(&nodes, &fake, vec![token; 20]).admitted.len(), 6);
}
