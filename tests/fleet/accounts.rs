//! The account set and account limits, fleet-wide.

use std::time::Duration;

use serde_json::Value;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{open, ADMIN};

const K1: &str = "soniox-key-aaaa-1111-fleet";
const K2: &str = "soniox-key-bbbb-2222-fleet";
const K3: &str = "soniox-key-cccc-3333-fleet";

fn accounts(relay: &Relay) -> Vec<Value> {
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/accounts",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["accounts"].as_array().unwrap().clone()
}

fn account(relay: &Relay, id: &str) -> Option<Value> {
    accounts(relay).into_iter().find(|a| a["id"] == id)
}

fn change(relay: &Relay, method: &str, path: &str, body: Option<&str>) {
    let (status, answer) = http(relay.handle.admin_addr, method, path, Some(ADMIN), body);
    assert_eq!(status, 200, "{method} {path}: {answer}");
}

/// Streams one short session on `relay`; returns the key upstream saw.
fn stream_key(relay: &Relay, fake: &fake_soniox::FakeSoniox) -> String {
    let before = fake.sessions().len();
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(got.finished(), "{got:?}");
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), before + 1);
    sessions.last().unwrap().key.clone().unwrap()
}

#[test]
fn account_changes_on_one_node_reach_the_other() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2, K3], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    change(
        &a,
        "POST",
        "/admin/accounts",
        Some(&format!(
            r#"{{"id":"b2","key":"{K2}","max_concurrent_streams":5}}"#
        )),
    );
    assert!(wait_until(soon, || account(&b, "b2").is_some()));
    // With `a` disabled on A, B's streams go to the account A added.
    change(&a, "POST", "/admin/accounts/a/disable", None);
    assert!(wait_until(soon, || account(&b, "a").unwrap()["enabled"] == false));
    assert_eq!(stream_key(&b, &fake), K2);
    // A key rotated on A serves B's next stream.
    change(
        &a,
        "POST",
        "/admin/accounts/b2/rotate",
        Some(&format!(r#"{{"key":"{K3}","overlap":"10m"}}"#)),
    );
    let rotated = account(&a, "b2").unwrap()["key"]["fingerprint"].clone();
    assert!(wait_until(soon, || account(&b, "b2").unwrap()["key"]
        ["fingerprint"]
        == rotated));
    assert_eq!(stream_key(&b, &fake), K3);
    // Limits, enabling and removal travel too.
    change(
        &a,
        "POST",
        "/admin/accounts/b2/limit",
        Some(r#"{"max_concurrent_streams":7}"#),
    );
    assert!(wait_until(soon, || account(&b, "b2").unwrap()
        ["max_concurrent_streams"]
        == 7));
    change(&b, "POST", "/admin/accounts/a/enable", None);
    assert!(wait_until(soon, || account(&a, "a").unwrap()["enabled"] == true));
    change(&a, "DELETE", "/admin/accounts/b2", None);
    assert!(wait_until(soon, || account(&b, "b2").is_none()));
    assert_eq!(stream_key(&b, &fake), K1);
    // Redis holds the set sealed under the master key, never a key in the clear.
    let sealed = redis.command("GET clio:accounts");
    assert!(sealed.contains("CLIO-KEYSTORE v1"), "{sealed}");
    let mut everything = sealed;
    for k in ["clio:rev:dev", "clio:nodes"] {
        everything.push_str(&redis.command(&format!("DUMP {k}")));
    }
    for key in [K1, K2, K3] {
        assert!(!everything.contains(key), "a key in the clear in Redis");
    }
}

#[test]
fn an_account_limit_holds_across_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&[K1], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |c| {
        c.accounts[0].max_concurrent_streams = 3
    });
    let open = |relay: &Relay, device: &str| {
        let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        ws
    };
    let first = open(&a, "d1");
    let _others = [open(&b, "d2"), open(&a, "d3")];
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    for relay in [&b, &a] {
        let (mut ws, _) = connect(relay.addr(), &relay.token("d4"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &[]);
        assert_eq!(
            (got.error_code(), got.close_code()),
            (Some(429), Some(1013)),
            "the account is full fleet-wide: {got:?}"
        );
    }
    assert_eq!(
        fake.active_streams(),
        3,
        "never more than the limit upstream"
    );
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || {
        fake.active_streams() == 2 && redis.count("node-a", "acct", "a").as_deref() == Some("1")
    }));
    let _again = open(&b, "d5");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
}

/// Whether `relay` reports the concurrency alert firing for account "a".
fn firing(relay: &Relay) -> bool {
    http(relay.handle.admin_addr, "GET", "/metrics", None, None)
        .1
        .contains("clio_relay_alerts_firing{alert=\"account_near_concurrency\",subject=\"a\"} 1")
}

/// An account's concurrency alert counts the fleet: one stream on each of
/// two nodes is 2 of 3 (over 0.6) on both, though each node alone has 1.
#[test]
fn the_concurrency_alert_counts_every_nodes_streams() {
    let redis = RedisServer::start();
    let fake = fake(&[K1], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |c| {
        c.accounts[0].max_concurrent_streams = 3;
        c.usage.alerts.concurrency_ratio = 0.6;
        c.usage.alerts.interval = Duration::from_millis(100);
    });
    let first = open(&a, "d1");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    // One of three: under the ratio everywhere (given time to fire).
    std::thread::sleep(Duration::from_millis(600));
    assert!(!firing(&a) && !firing(&b), "1 of 3 is under 0.6");
    let second = open(&b, "d2");
    assert!(
        wait_until(Duration::from_secs(10), || firing(&a) && firing(&b)),
        "2 of 3 streams fleet-wide, one on each node, fire on both"
    );
    drop((first, second));
    assert!(
        wait_until(Duration::from_secs(10), || !firing(&a) && !firing(&b)),
        "and it clears when they end"
    );
}

fn try_change(relay: &Relay, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http(relay.handle.admin_addr, method, path, Some(ADMIN), body)
}

fn add_body(id: &str) -> String {
    format!(r#"{{"id":"{id}","key":"{K2}","max_concurrent_streams":5}}"#)
}

#[test]
fn an_account_change_made_while_redis_is_down_reaches_the_fleet_unless_another_came_first() {
    let mut redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(15);
    let down = |redis: &mut RedisServer| {
        assert!(redis.command("SAVE").starts_with("+OK"));
        redis.kill();
        assert!(wait_until(soon, || !crate::up(&a) && !crate::up(&b)));
    };
    // Only A changed the set while Redis was down: the fleet gets it.
    down(&mut redis);
    let (status, body) = try_change(&a, "POST", "/admin/accounts", Some(&add_body("offline")));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("sent when the cluster store answers again"),
        "{body}"
    );
    redis.restart(); // the snapshot: the same data as before
    assert!(wait_until(soon, || account(&b, "offline").is_some()));
    // Both changed it: the first to reach Redis wins, the other takes
    // its set (and says so in its log), and the two agree.
    down(&mut redis);
    for (relay, id) in [(&a, "from-a"), (&b, "from-b")] {
        let (status, body) = try_change(relay, "POST", "/admin/accounts", Some(&add_body(id)));
        assert_eq!(status, 503, "{body}");
    }
    redis.restart();
    let ids = |r: &Relay| {
        let mut v: Vec<String> = accounts(r)
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert!(
        wait_until(soon, || crate::up(&a)
            && crate::up(&b)
            && ids(&a) == ids(&b)),
        "{:?} {:?}",
        ids(&a),
        ids(&b)
    );
    std::thread::sleep(Duration::from_millis(600)); // a few polls more
    let both = ids(&a);
    assert_eq!(both, ids(&b));
    assert!(both.contains(&"offline".to_string()), "{both:?}");
    let won = ["from-a", "from-b"]
        .iter()
        .filter(|id| both.contains(&id.to_string()))
        .count();
    assert_eq!(won, 1, "one of the two sets: {both:?}");
}

#[test]
fn a_node_with_another_master_key_cannot_overwrite_the_fleets_account_set() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    change(&a, "POST", "/admin/accounts", Some(&add_body("shared")));
    assert!(wait_until(soon, || account(&b, "shared").is_some()));
    let mut cfg = a.cfg.clone();
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(
        "1111111111111111111111111111111111111111111111111111111111111111",
    ));
    cfg.admin.state_dir = state_dir();
    cfg.cluster.as_mut().unwrap().node_id = "node-other-key".into();
    let other = Relay::start(cfg);
    let unreadable = || {
        http(other.handle.admin_addr, "GET", "/metrics", None, None)
            .1
            .contains("clio_relay_cluster_account_set_unreadable 1")
    };
    assert!(wait_until(soon, unreadable));
    let sealed = redis.command("GET clio:accounts");
    let (status, body) = try_change(&other, "POST", "/admin/accounts", Some(&add_body("mine")));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("admin.master_key"), "{body}");
    let (status, _) = try_change(&other, "POST", "/admin/accounts/a/disable", None);
    assert_eq!(status, 409);
    assert!(account(&other, "mine").is_none());
    // The fleet's set is untouched, and the nodes that can open it still change it.
    assert_eq!(redis.command("GET clio:accounts"), sealed);
    change(&b, "POST", "/admin/accounts/shared/disable", None);
    assert!(wait_until(soon, || account(&a, "shared").unwrap()
        ["enabled"]
        == false));
}

#[test]
fn a_fleet_node_without_a_master_key_refuses_account_changes() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, _b) = crate::pair(&fake, &redis, K1, |_| {});
    let mut cfg = a.cfg.clone();
    cfg.admin.master_key = None;
    cfg.admin.state_dir = state_dir();
    cfg.cluster.as_mut().unwrap().node_id = "node-no-key".into();
    let keyless = Relay::start(cfg);
    assert!(wait_until(Duration::from_secs(10), || crate::up(&keyless)));
    let (status, body) = try_change(&keyless, "POST", "/admin/accounts", Some(&add_body("solo")));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("admin.master_key"), "{body}");
    assert!(account(&keyless, "solo").is_none());
    // Revocations need no master key: they still work on that node.
    let (status, body) = try_change(
        &keyless,
        "POST",
        "/admin/revocations",
        Some(r#"{"device_id":"lost"}"#),
    );
    assert_eq!(status, 200, "{body}");
}

/// While the store settles after a loss it answers again, but each node
/// holds an account to its share of the limit. The alert compared the
/// fleet's streams with that share: a node with 1 stream of a 6-stream
/// account, the fleet having 3, saw 3 of 3 and fired. It compares this
/// node's own streams with its share then, as while Redis is unreachable.
#[test]
fn the_concurrency_alert_weighs_a_nodes_own_streams_against_its_share_while_settling() {
    let redis = RedisServer::start();
    let fake = fake(&[K1], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |c| {
        c.accounts[0].max_concurrent_streams = 6;
        c.usage.alerts.concurrency_ratio = 0.6;
        c.usage.alerts.interval = Duration::from_millis(100);
    });
    let _streams = [open(&a, "d1"), open(&b, "d2"), open(&b, "d3")];
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    // 3 of 6 fleet-wide: under 0.6 on both (given time to fire).
    std::thread::sleep(Duration::from_millis(600));
    assert!(!firing(&a) && !firing(&b), "3 of 6 is under 0.6");
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    // Settling (2.4 s) after the nodes see the loss: each holds the
    // account to 3. B's 2 of 3 is over 0.6; A's 1 of 3 is not.
    let (mut b_fired, mut a_fired) = (false, false);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < end {
        b_fired |= firing(&b);
        a_fired |= firing(&a);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b_fired, "B, over 0.6 of its share, fired while settling");
    assert!(!a_fired, "A, with 1 of its 3, must not fire");
}

/// `/v1/config` and its ETag, as `http_get` of `relay`'s admin port gives them.
fn remote_config(relay: &Relay) -> (String, String) {
    let (status, head, body) = http_get(relay.handle.admin_addr, "/v1/config", "");
    assert_eq!(status, 200, "{head}");
    (header_of(&head, "etag").expect("an ETag"), body)
}

#[test]
fn every_node_publishes_the_same_remote_config_for_the_same_accounts() {
    // An app polls whichever node the balancer gives it, with the ETag it
    // has: for the same account set every node must give the same document
    // and the same ETag, whatever order each node learnt its accounts in.
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |cfg| {
        cfg.accounts[0].region = "us-east".into();
        let mut second = cfg.accounts[0].clone();
        second.id = "b".into();
        second.region = "eu-west".into();
        second.key = clio_relay::core::secret::Secret::new(K2);
        cfg.accounts.push(second);
    });
    let soon = Duration::from_secs(10);
    assert_eq!(remote_config(&a), remote_config(&b));
    // `a` taken out at runtime and added back: the running nodes now list
    // it (and its region) after `b`, a node started from the fleet's set
    // before it.
    change(&a, "DELETE", "/admin/accounts/a", None);
    assert!(wait_until(soon, || account(&b, "a").is_none()));
    change(
        &a,
        "POST",
        "/admin/accounts",
        Some(&format!(
            r#"{{"id":"a","key":"{K1}","region":"us-east","max_concurrent_streams":50}}"#
        )),
    );
    assert!(wait_until(soon, || account(&b, "a").is_some()));
    let c = Relay::start(crate::node(&a.cfg, &redis, "node-c"));
    assert!(wait_until(soon, || account(&c, "a")
        .is_some_and(|x| x["source"] == "store")));
    let (tag_a, doc_a) = remote_config(&a);
    let (tag_c, doc_c) = remote_config(&c);
    assert_eq!(
        doc_a, doc_c,
        "node A and node C publish different documents"
    );
    assert_eq!(tag_a, tag_c);
    assert_eq!(remote_config(&b), (tag_a.clone(), doc_a));
    // And C answers A's ETag with 304.
    let (status, head, _) = http_get(
        c.handle.admin_addr,
        "/v1/config",
        &format!("If-None-Match: {tag_a}\r\n"),
    );
    assert_eq!(status, 304, "{head}");
}

#[test]
fn a_key_rotated_on_one_node_moves_the_other_nodes_streams_when_its_overlap_ends() {
    // The runbook on a fleet: rotate on any node; every node's new streams
    // take the new key, and every node's streams leave the old key once
    // the overlap ends (raw audio unseen), so the old key can be revoked.
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    let mut live = crate::open(&b, "long");
    for f in audio_frames(3, 1) {
        live.send(Message::binary(f)).unwrap();
    }
    assert!(wait_until(soon, || fake.sessions().iter().any(|s| s
        .key
        .as_deref()
        == Some(K1)
        && s.audio_frames >= 3)));
    let old = account(&b, "a").unwrap()["key"]["fingerprint"].clone();
    change(
        &a,
        "POST",
        "/admin/accounts/a/rotate",
        Some(&format!(r#"{{"key":"{K2}","overlap":"2s"}}"#)),
    );
    // B takes the new key, keeps the old one for its live stream...
    assert!(wait_until(soon, || {
        let acct = account(&b, "a").unwrap();
        acct["key"]["fingerprint"] != old && acct["retiring_keys"][0]["fingerprint"] == old
    }));
    assert_eq!(stream_key(&b, &fake), K2);
    // ...and once the overlap ends, moves that stream to it and retires it.
    assert!(
        wait_until(soon, || fake
            .sessions()
            .iter()
            .filter(|s| s.key.as_deref() == Some(K2))
            .count()
            == 2),
        "{:?}",
        account(&b, "a")
    );
    assert!(wait_until(soon, || account(&b, "a").unwrap()
        ["retiring_keys"]
        .as_array()
        .unwrap()
        .is_empty()));
    for f in audio_frames(3, 2) {
        live.send(Message::binary(f)).unwrap();
    }
    let got = crate::finish(live);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
}

/// Two account changes made one right after the other on two nodes,
/// before the first reached the second node by its poll, both hold on
/// both nodes: the second node's set is not stored over the first's.
/// (Before, it was: B's acknowledged `disable` was undone by A's `limit`
/// a few milliseconds later, fleet-wide and on B itself.)
#[test]
fn a_change_on_one_node_does_not_undo_one_just_made_on_another() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    change(&a, "POST", "/admin/accounts", Some(&add_body("b2")));
    assert!(wait_until(soon, || account(&b, "b2").is_some()));
    // Each round: B flips account "a", and A at once sets b2's limit.
    for round in 1..=6u32 {
        let enabled = round % 2 == 0;
        let flip = if enabled { "enable" } else { "disable" };
        change(&b, "POST", &format!("/admin/accounts/a/{flip}"), None);
        change(
            &a,
            "POST",
            "/admin/accounts/b2/limit",
            Some(&format!(r#"{{"max_concurrent_streams":{}}}"#, 10 + round)),
        );
        for (name, relay) in [("A", &a), ("B", &b)] {
            assert!(
                wait_until(soon, || {
                    let (acct, b2) = (account(relay, "a").unwrap(), account(relay, "b2").unwrap());
                    acct["enabled"] == enabled && b2["max_concurrent_streams"] == 10 + round
                }),
                "round {round}: node {name} holds both changes: a {}, b2 {}",
                account(relay, "a").unwrap()["enabled"],
                account(relay, "b2").unwrap()["max_concurrent_streams"]
            );
        }
    }
}

/// A flag or a limit another node changed is saved in this node's own key
/// store, as an added or removed account is: a node restarted while Redis
/// is unreachable runs the fleet's last set, not an older one. (Before,
/// only changes that add, remove, move or rotate were saved: a `disable`
/// of a compromised key came back enabled on such a restart.)
#[test]
fn a_flag_and_a_limit_from_the_fleet_are_saved_in_each_nodes_key_store() {
    let mut redis = RedisServer::start();
    let fake = fake(&[K1], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    change(&a, "POST", "/admin/accounts/a/disable", None);
    change(
        &a,
        "POST",
        "/admin/accounts/a/limit",
        Some(r#"{"max_concurrent_streams":7}"#),
    );
    let both = |relay: &Relay| {
        let acct = account(relay, "a").unwrap();
        (
            acct["enabled"].clone(),
            acct["max_concurrent_streams"].clone(),
        )
    };
    let changed = (Value::Bool(false), Value::from(7));
    assert!(wait_until(soon, || both(&b) == changed), "{:?}", both(&b));
    // B restarts while Redis is unreachable: it has only its key store.
    let cfg = b.cfg.clone();
    drop(b);
    redis.kill();
    let b = Relay::start(cfg);
    assert!(!crate::up(&b));
    assert_eq!(both(&b), changed, "B runs the fleet's last set");
    drop(a);
}

/// The runbook's "pull a compromised key now" on a fleet: a rotation with
/// `--overlap 0s` on one node moves every node's streams off the old key
/// within a second, not only that node's. (Before, a node that applied
/// the set after the old key's retire time, always so with 0s, found no
/// retire time for it and kept it `admin.rotation_overlap`, 1h by
/// default, with its streams on it.)
#[test]
fn a_key_pulled_with_no_overlap_on_one_node_moves_the_other_nodes_streams() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    let mut live = crate::open(&b, "long");
    for f in audio_frames(3, 1) {
        live.send(Message::binary(f)).unwrap();
    }
    assert!(wait_until(soon, || fake.sessions().iter().any(|s| s
        .key
        .as_deref()
        == Some(K1)
        && s.audio_frames >= 3)));
    change(
        &a,
        "POST",
        "/admin/accounts/a/rotate",
        Some(&format!(r#"{{"key":"{K2}","overlap":"0s"}}"#)),
    );
    assert!(
        wait_until(soon, || fake
            .sessions()
            .iter()
            .any(|s| s.key.as_deref() == Some(K2))),
        "B's stream moves to the new key: {:?}",
        account(&b, "a")
    );
    assert!(wait_until(soon, || account(&b, "a").unwrap()
        ["retiring_keys"]
        .as_array()
        .unwrap()
        .is_empty()));
    for f in audio_frames(3, 2) {
        live.send(Message::binary(f)).unwrap();
    }
    let got = crate::finish(live);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
}

/// Account changes sent to one node at the same time (two admins, the
/// dashboard's buttons, a script in parallel) are each made, one after
/// the other: none is answered 409 as if another node had made one.
#[test]
fn changes_sent_to_one_node_at_once_are_all_made() {
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let (a, b) = crate::pair(&fake, &redis, K1, |_| {});
    let soon = Duration::from_secs(10);
    change(&a, "POST", "/admin/accounts", Some(&add_body("b2")));
    for round in 1..=5u32 {
        let limits = [("a", 20 + round), ("b2", 30 + round)];
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let calls: Vec<_> = limits
                .iter()
                .map(|(id, n)| {
                    let a = &a;
                    s.spawn(move || {
                        try_change(
                            a,
                            "POST",
                            &format!("/admin/accounts/{id}/limit"),
                            Some(&format!(r#"{{"max_concurrent_streams":{n}}}"#)),
                        )
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for (status, body) in &answers {
            assert_eq!(*status, 200, "round {round}: {body}");
        }
        for relay in [&a, &b] {
            assert!(wait_until(soon, || limits.iter().all(|(id, n)| account(
                relay, id
            )
            .unwrap()["max_concurrent_streams"]
                == *n)));
        }
    }
}

/// Another node's change lands in Redis within one round trip of this
/// node's: after A has caught up with the fleet's set (its compare) and
/// before A's own set reaches Redis (A's calls go through a proxy that
/// holds that one call until B's whole change is answered). A's change is
/// answered 409 and not made anywhere; B's holds on both nodes. (The
/// change-within-a-poll tests never let the other change in between the
/// compare and the store.)
#[test]
fn a_change_landing_within_the_round_trip_is_answered_409() {
    let redis = RedisServer::start();
    let proxy = crate::proxy::Proxy::start(redis.port);
    let fake = fake(&[K1, K2], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", K1)]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    let mut on_a = crate::node(&cfg, &redis, "node-a");
    let fleet = on_a.cluster.as_mut().unwrap();
    fleet.redis_url = proxy.url();
    // A's store call waits out B's change: no deadline within it.
    fleet.timeout = Duration::from_secs(10);
    let a = Relay::start(on_a);
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    let soon = Duration::from_secs(10);
    assert!(wait_until(soon, || crate::up(&a) && crate::up(&b)));
    // A's store of its set: PUBLISH_ON with the set (five parts; the
    // compare has four).
    let sha = ::redis::Script::new(clio_relay::core::cluster::scripts::PUBLISH_ON)
        .get_hash()
        .to_string();
    let store = format!("*5\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n");
    let (tx, rx) = std::sync::mpsc::channel();
    let b_admin = b.handle.admin_addr;
    proxy.hold_for(store.as_bytes(), move || {
        let _ = tx.send(http(
            b_admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(&add_body("from-b")),
        ));
    });
    let (status, body) = try_change(&a, "POST", "/admin/accounts", Some(&add_body("from-a")));
    let (b_status, b_body) = rx.try_recv().expect("B's change came in between");
    assert_eq!(b_status, 200, "{b_body}");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("another node changed the account set at the same time"),
        "{body}"
    );
    // B's change holds on both, A's on neither.
    for relay in [&a, &b] {
        assert!(wait_until(soon, || account(relay, "from-b").is_some()));
        assert!(account(relay, "from-a").is_none());
    }
    std::thread::sleep(Duration::from_millis(600)); // a few polls more
    for relay in [&a, &b] {
        assert!(account(relay, "from-b").is_some() && account(relay, "from-a").is_none());
    }
}

/// A change on A waits on its key store write (the store's lock held
/// here, as a slow disk holds the write) while B changes the account set
/// and A's poll brings B's set. Its answer must be true to the fleet's
/// set: a 200 whose account is on both nodes, or a 409 (another node
/// changed the set at the same time) whose account is on neither.
/// Before, the poll's set was applied on A in the middle of the change,
/// undoing it, and A then stored that set over B's version with the
/// change missing and answered 200: an account added, answered as
/// added, was nowhere.
#[test]
fn a_fleet_set_arriving_during_a_changes_write_does_not_undo_it_unanswered() {
    use std::os::fd::AsRawFd as _;
    let redis = RedisServer::start();
    let fake = fake(&[K1, K2], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", K1)]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    let on_a = crate::node(&cfg, &redis, "node-a");
    std::fs::create_dir_all(&on_a.admin.state_dir).unwrap();
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(on_a.admin.state_dir.join(".accounts.store.lock"))
        .unwrap();
    let a = Relay::start(on_a);
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    let soon = Duration::from_secs(10);
    assert!(wait_until(soon, || crate::up(&a) && crate::up(&b)));
    // A's key store writes wait from now until the lock is let go.
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let a_admin = a.handle.admin_addr;
    let on_a = std::thread::spawn(move || {
        http(
            a_admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(&add_body("from-a")),
        )
    });
    assert!(
        wait_until(soon, || account(&a, "from-a").is_some()),
        "A's change is made, its write waiting"
    );
    let (status, body) = try_change(&b, "POST", "/admin/accounts", Some(&add_body("from-b")));
    assert_eq!(status, 200, "{body}");
    // A's poll brings B's set within 200 ms; now that the change waits
    // for A's, it is not seen on A until then (so this wait is a bound).
    wait_until(Duration::from_secs(3), || account(&a, "from-b").is_some());
    assert!(!on_a.is_finished(), "A's change ended before its write");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) }, 0);
    let (status, body) = on_a.join().unwrap();
    assert!(status == 200 || status == 409, "{status} {body}");
    let made = status == 200;
    for relay in [&a, &b] {
        assert!(wait_until(soon, || account(relay, "from-b").is_some()));
    }
    std::thread::sleep(Duration::from_millis(600)); // a few polls more
    for relay in [&a, &b] {
        assert_eq!(
            account(relay, "from-a").is_some(),
            made,
            "answered {status}: {body}"
        );
        assert!(account(relay, "from-b").is_some());
    }
}
