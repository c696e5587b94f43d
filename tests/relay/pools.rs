//! Account pools: two fake upstreams, "us" and "eu", each its own pool in
//! one relay. A token for a pool only ever reaches that pool's upstream:
//! when its accounts are full (429, not the other pool), through open-time
//! failover, and for a forged claim its secret may not mint.

use std::time::{Duration, SystemTime};

use clio_relay::core::config::{AccountConfig, PoolConfig};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeKey, FakeSoniox};
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// The US fake (keys us-key-1) and the EU fake (eu-key-1, eu-key-2), and a
/// relay with pools "us" and "eu": "us-1" (limit 10) in us, "eu-1" and
/// "eu-2" (limit 1 each) in eu, and no account in the default pool.
/// `tweak_eu` changes the EU fake (its faults).
fn us_and_eu(
    tweak_eu: impl FnOnce(&mut fake_soniox::FakeConfig),
) -> (FakeSoniox, FakeSoniox, Relay) {
    let (us, eu, cfg) = us_and_eu_config(tweak_eu);
    (us, eu, Relay::start(cfg))
}

/// What [`us_and_eu`] starts, not started yet.
fn us_and_eu_config(
    tweak_eu: impl FnOnce(&mut fake_soniox::FakeConfig),
) -> (FakeSoniox, FakeSoniox, clio_relay::core::config::Config) {
    let us = fake(&["us-key-1"], |_| {});
    let eu = fake(&[], |c| {
        c.keys = vec![FakeKey::new("eu-key-1", 50), FakeKey::new("eu-key-2", 50)];
        tweak_eu(c);
    });
    let mut cfg = relay_config(&us.url(), &[]);
    cfg.pools = vec![
        PoolConfig {
            name: "eu".into(),
            url: eu.url(),
            rest_url: None,
        },
        PoolConfig {
            name: "us".into(),
            url: us.url(),
            rest_url: None,
        },
    ];
    let account = |id: &str, key: &str, pool: &str, max: u32| {
        let mut a = AccountConfig::new(id, Secret::new(key));
        a.pool = pool.into();
        a.max_concurrent_streams = max;
        a
    };
    // The US account first and with the most room: a pick that ignored
    // pools would choose it.
    cfg.accounts = vec![
        account("us-1", "us-key-1", "us", 10),
        account("eu-1", "eu-key-1", "eu", 1),
        account("eu-2", "eu-key-2", "eu", 1),
    ];
    (us, eu, cfg)
}

fn token(relay: &Relay, device: &str, pools: &[&str]) -> String {
    let pools: Vec<String> = pools.iter().map(|p| p.to_string()).collect();
    TokenKeys::from_config(&relay.cfg.tokens)
        .mint_in(
            device,
            None,
            &pools,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap()
}

/// A whole session on `token`; what the client got. Returns once the relay
/// has ended the stream too: its account slot is held until upstream has
/// closed the connection, a moment after the client saw the end, and the
/// next session on a one-stream account needs that slot.
fn session(relay: &Relay, token: &str) -> Received {
    let before = relay.handle.process.live_streams();
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(
        wait_until(LIMIT, || relay.handle.process.live_streams() <= before),
        "the relay never ended the stream: {got:?}"
    );
    got
}

/// Opens a stream and keeps it live (config and one audio frame sent).
fn hold(relay: &Relay, token: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1).remove(0)))
        .unwrap();
    ws
}

fn error_message(got: &Received) -> String {
    got.messages
        .iter()
        .find_map(|m| m["error_message"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn keys_seen(fake: &FakeSoniox) -> Vec<String> {
    fake.sessions()
        .iter()
        .filter_map(|s| s.key.clone())
        .collect()
}

#[test]
fn an_eu_token_reaches_only_the_eu_upstream_and_gets_429_when_eu_is_full() {
    let (us, eu, relay) = us_and_eu(|_| {});
    let got = session(&relay, &token(&relay, "eu-phone", &["eu"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert!(us.sessions().is_empty(), "{:?}", us.sessions());

    // Both EU accounts busy: the third EU stream is refused, with the US
    // account idle and ten slots free.
    let _a = hold(&relay, &token(&relay, "eu-a", &["eu"]));
    let _b = hold(&relay, &token(&relay, "eu-b", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 3
        && s[1..].iter().all(|r| r.audio_frames == 1)));
    let got = session(&relay, &token(&relay, "eu-c", &["eu"]));
    assert_error_frame(&got, 429, 1013);
    assert!(
        error_message(&got).contains("at the relay's stream limit"),
        "{got:?}"
    );
    assert!(
        us.sessions().is_empty(),
        "EU audio went to the US: {:?}",
        us.sessions()
    );
    assert_eq!(eu.sessions().len(), 3);

    // The US pool has room, and its tokens go there.
    let got = session(&relay, &token(&relay, "us-phone", &["us"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(us.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(keys_seen(&us), ["us-key-1"]);
    // A token naming both may use either; a token naming none uses the
    // default pool, which has no account here.
    let got = session(&relay, &token(&relay, "both", &["eu", "us"]));
    assert!(got.finished(), "{got:?}");
    assert!(us.wait_for(LIMIT, |s| s.len() == 2));
    let got = session(&relay, &relay.token("no-pool"));
    assert_error_frame(&got, 429, 1013);
    // Not "every account is at its limit": there is none to be.
    assert_eq!(
        error_message(&got),
        "No Soniox account of this token's pools (default) is on this relay.",
        "{got:?}"
    );
    // Nor for a pool this relay does not have (a token minted elsewhere).
    let got = session(&relay, &token(&relay, "asia-phone", &["asia"]));
    assert_error_frame(&got, 429, 1013);
    assert_eq!(
        error_message(&got),
        "No Soniox account of this token's pools (asia) is on this relay.",
        "{got:?}"
    );
    assert!(keys_seen(&eu).iter().all(|k| k.starts_with("eu-")));
}

#[test]
fn open_time_failover_stays_in_the_tokens_pool() {
    // eu-key-1 is refused at its first message, after the upgrade: the
    // stream moves, and only to the other EU account.
    let (us, eu, relay) = us_and_eu(|c| {
        c.faults.refuse_at_first_message = vec![("eu-key-1".into(), 401)];
    });
    for i in 0..2 {
        let got = session(&relay, &token(&relay, &format!("eu-{i}"), &["eu"]));
        assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    }
    assert!(eu.wait_for(LIMIT, |s| s
        .iter()
        .filter(|r| r.key.as_deref() == Some("eu-key-2"))
        .count()
        == 2));
    assert!(us.sessions().is_empty(), "{:?}", us.sessions());

    // Every EU account refusing: the documented 429, never the US account.
    eu.set_key_reject("eu-key-2", Some(402));
    let got = session(&relay, &token(&relay, "eu-x", &["eu"]));
    assert_error_frame(&got, 429, 1013);
    assert!(us.sessions().is_empty(), "{:?}", us.sessions());
}

#[test]
fn a_secret_bound_to_a_pool_refuses_a_forged_claim_for_another() {
    let (us, eu, mut cfg) = us_and_eu_config(|_| {});
    cfg.tokens.pools = Some(vec!["eu".into()]);
    let relay = Relay::start(cfg);
    // A minter holding the secret but ignoring the binding (another
    // backend, or a hand-made token) signs a claim for us.
    let unbound = TokenKeys::new(&relay.cfg.tokens.secret, None, Duration::from_secs(30));
    let forged = unbound
        .mint_in(
            "dev",
            None,
            &["us".into()],
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    let (status, body) = refused_upgrade(connect(relay.addr(), &forged, Via::Header));
    assert_eq!(status, 401, "{body}");
    assert_http_error_body(&body, 401);
    assert!(
        body["error_message"].as_str().unwrap().contains("pool"),
        "{body}"
    );
    // Also when the token comes in the first message.
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(&mut ws, &config_message(Some(&forged)), &[]);
    assert_error_frame(&got, 401, 1008);
    assert!(us.sessions().is_empty() && eu.sessions().is_empty());
    // The relay's own minter refuses too; an eu token streams.
    assert!(TokenKeys::from_config(&relay.cfg.tokens)
        .mint_in(
            "dev",
            None,
            &["us".into()],
            Duration::from_secs(60),
            SystemTime::now()
        )
        .is_err());
    let got = session(&relay, &token(&relay, "ok", &["eu"]));
    assert!(got.finished(), "{got:?}");
    assert!(us.sessions().is_empty());
}

#[test]
fn mid_stream_resume_stays_in_the_tokens_pool() {
    use fake_soniox::FaultKind;
    // The EU upstream fails the first connection (503) at its eighth audio
    // frame and not the second: the stream resumes, on an EU account.
    let faults = only_first_connection_fails(FaultKind::Error(503), 8, |n| n == 8);
    let (us, eu, relay) = us_and_eu(|c| c.faults.random = Some(faults));
    let got = session_of(&relay, &token(&relay, "eu-resumed", &["eu"]), 20);
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(eu.sessions()[0].error_sent, Some(503));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    assert!(
        us.sessions().is_empty(),
        "resumed in the US: {:?}",
        us.sessions()
    );
}

#[test]
fn resumes_past_the_pools_failures_end_with_the_error_not_another_pool() {
    // Every EU connection fails at its fifth audio frame; the US account
    // is healthy and idle. The stream resumes on EU accounts only, until
    // its resumes are used up.
    let (us, eu, mut cfg) = us_and_eu_config(|c| c.faults.error_after_frames = Some((5, 503)));
    cfg.failover.max_resumes = 2;
    let relay = Relay::start(cfg);
    let got = session_of(&relay, &token(&relay, "eu-failing", &["eu"]), 40);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s.len() == 3 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 2);
    assert!(
        us.sessions().is_empty(),
        "resumed in the US: {:?}",
        us.sessions()
    );
}

/// A whole session of `frames` frames of audio on `token`.
fn session_of(relay: &Relay, token: &str, frames: usize) -> Received {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &audio_frames(frames, 3))
}

#[test]
fn health_checks_ask_each_pools_own_rest_api() {
    let (us, eu, mut cfg) = us_and_eu_config(|_| {});
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    let checked = |fake: &FakeSoniox, key: &str| {
        fake.rest_calls()
            .iter()
            .any(|c| c.path == "/v1/models" && c.key.as_deref() == Some(key))
    };
    assert!(wait_until(LIMIT, || checked(&eu, "eu-key-1")
        && checked(&eu, "eu-key-2")
        && checked(&us, "us-key-1")));
    // No key went to the other region's host, so none was refused there
    // and every account is still healthy.
    assert!(us
        .rest_calls()
        .iter()
        .all(|c| c.key.as_deref() == Some("us-key-1")));
    assert!(eu
        .rest_calls()
        .iter()
        .all(|c| c.key.as_deref() != Some("us-key-1")));
    let now = std::time::Instant::now();
    assert!(relay
        .handle
        .process
        .accounts()
        .iter()
        .all(|a| a.healthy(now)));
}

#[test]
fn config_metrics_and_the_admin_api_show_each_pool() {
    const ADMIN: &str = "pools-admin-token-0123456789";
    let (_us, eu, mut cfg) = us_and_eu_config(|_| {});
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.accounts[1].region = "eu-west".into();
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let _live = hold(&relay, &token(&relay, "eu-live", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));

    let (status, _, body) = http_get(admin, "/v1/config", "");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pools: Vec<_> = v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["default", "eu", "us"], "{v}");
    assert_eq!(v["pools"][1]["upstreamHost"], "127.0.0.1");
    assert_eq!(v["pools"][1]["regions"], serde_json::json!(["eu-west"]));
    assert_eq!(v["pools"][1]["endpoint"], "/v1/transcribe");
    assert_eq!(v["pools"][0]["isAvailable"], false, "no account in default");
    assert_eq!(v["defaultPool"], "default");
    assert_eq!(v["sonioxAccounts"][1]["pool"], "eu");

    let metrics = http(admin, "GET", "/metrics", None, None).1;
    for line in [
        r#"clio_relay_pool_streams_active{pool="eu"} 1"#,
        r#"clio_relay_pool_streams_active{pool="us"} 0"#,
        r#"clio_relay_pool_max_concurrent_streams{pool="eu"} 2"#,
        r#"clio_relay_pool_accounts{pool="default"} 0"#,
        r#"clio_relay_account_info{account="eu-1",pool="eu",region="eu-west"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    assert!(!metrics.contains("eu-key-"), "a key in the metrics");

    let (status, body) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accounts"][2]["pool"], "eu");
    assert_eq!(v["pools"][1]["live_streams"], 1, "{v}");
    // An account added at runtime names its pool, which must exist.
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"eu-3","key":"eu-key-3","pool":"eu"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"jp-1","key":"jp-key-1","pool":"jp"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not one of this relay's pools"), "{body}");
    assert!(!body.contains("jp-key-1"), "{body}");
}

#[test]
fn one_relay_takes_each_backends_secret_for_its_own_pools_only() {
    // "us" plays production, "eu" development: the relay's own secret is
    // bound to us, the development backend's secret (an extra one) to eu.
    let (us, eu, mut cfg) = us_and_eu_config(|_| {});
    cfg.tokens.pools = Some(vec!["us".into()]);
    let dev_secret = secret();
    cfg.tokens.extra = vec![clio_relay::core::config::ExtraSecret {
        secret: dev_secret.clone(),
        pools: vec!["eu".into()],
    }];
    let relay = Relay::start(cfg);
    let dev_backend = TokenKeys::new(&dev_secret, None, Duration::from_secs(30));
    let mint = |keys: &TokenKeys, pool: &str| {
        keys.mint_in(
            "d",
            None,
            &[pool.to_string()],
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap()
    };
    let got = session(&relay, &mint(&dev_backend, "eu"));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    // The development secret cannot open a production stream.
    let (status, body) = refused_upgrade(connect(
        relay.addr(),
        &mint(&dev_backend, "us"),
        Via::Header,
    ));
    assert_eq!(status, 401, "{body}");
    let got = session(&relay, &token(&relay, "prod", &["us"]));
    assert!(got.finished(), "{got:?}");
    assert!(us.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(eu.sessions().len(), 1);
}

#[test]
fn usage_and_cost_sum_by_pool() {
    const ADMIN: &str = "pools-usage-token-0123456789";
    let (_us, _eu, mut cfg) = us_and_eu_config(|_| {});
    cfg.admin.token = Some(Secret::new(ADMIN));
    for a in &mut cfg.accounts {
        a.price_per_hour = 3.6; // 0.001 per second of audio
    }
    let relay = Relay::start(cfg);
    // 2 s of audio in eu over two streams, 1 s in us.
    for (pool, frames) in [("eu", 10), ("eu", 10), ("us", 10)] {
        let got = session_of(&relay, &token(&relay, "d", &[pool]), frames);
        assert!(got.finished(), "{got:?}");
    }
    let usage = || -> serde_json::Value {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            "/admin/usage?group_by=pool",
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    assert!(wait_until(LIMIT, || usage()["rows"]
        .as_array()
        .is_some_and(|r| r
            .iter()
            .map(|r| r["streams"].as_u64().unwrap())
            .sum::<u64>()
            == 3)));
    let v = usage();
    assert_eq!(v["group_by"], "pool");
    let row = |k: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == k)
            .unwrap()
            .clone()
    };
    assert_eq!(row("eu")["streams"], 2, "{v}");
    assert_eq!(row("eu")["audio_seconds"].as_f64(), Some(2.0), "{v}");
    assert!(
        (row("eu")["cost"].as_f64().unwrap() - 0.002).abs() < 1e-9,
        "{v}"
    );
    assert_eq!(row("us")["audio_seconds"].as_f64(), Some(1.0), "{v}");
}

#[test]
fn a_reload_moves_accounts_between_pools_but_adds_no_pool() {
    let (_us, eu, cfg) = us_and_eu_config(|_| {});
    let relay = Relay::start(cfg.clone());
    let mut next = cfg.clone();
    next.accounts[2].pool = "us".into(); // eu-2 moves to us
    next.pools.push(PoolConfig {
        name: "jp".into(),
        url: eu.url(),
        rest_url: None,
    });
    let mut jp = AccountConfig::new("jp-1", Secret::new("jp-key-1"));
    jp.pool = "jp".into();
    next.accounts.push(jp);
    let log = relay.handle.reload(&next).unwrap();
    let has = |needle: &str| log.iter().any(|l| l.contains(needle));
    assert!(has("moved eu-2 to pool us"), "{log:?}");
    assert!(has("not added jp-1"), "{log:?}");
    assert!(has("unchanged: [pool.NAME]"), "{log:?}");
    let pools: Vec<(String, String)> = relay
        .handle
        .process
        .accounts()
        .iter()
        .map(|a| (a.id.clone(), a.pool.clone()))
        .collect();
    assert!(pools.contains(&("eu-2".into(), "us".into())), "{pools:?}");
    assert!(!pools.iter().any(|(id, _)| id == "jp-1"), "{pools:?}");
    // eu-1 is now eu's only account: a second EU stream is refused.
    let _held = hold(&relay, &token(&relay, "eu-a", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    assert_error_frame(&session(&relay, &token(&relay, "eu-b", &["eu"])), 429, 1013);
}

/// An account moved to another pool by a reload and back again, with a
/// stream live in each: back in its first pool it counts the stream still
/// live there against its limit, as it does after one move. Before, the
/// move back forgot that stream (the account's state from its first pool
/// was dropped when it left the second), so an account of limit 1 took a
/// second stream in the pool.
#[test]
fn an_account_moved_to_another_pool_and_back_counts_its_streams_in_each() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[]);
    cfg.pools = ["p1", "p2"]
        .into_iter()
        .map(|name| PoolConfig {
            name: name.into(),
            url: fake.url(),
            rest_url: None,
        })
        .collect();
    let mut a = AccountConfig::new("a", Secret::new("k1"));
    a.pool = "p1".into();
    a.max_concurrent_streams = 1;
    cfg.accounts = vec![a];
    let relay = Relay::start(cfg.clone());
    let in_pool = |pool: &str| {
        let mut next = cfg.clone();
        next.accounts[0].pool = pool.into();
        let log = relay.handle.reload(&next).unwrap();
        assert!(
            log.iter()
                .any(|l| l.contains(&format!("moved a to pool {pool}"))),
            "{log:?}"
        );
    };
    let _first = hold(&relay, &token(&relay, "d1", &["p1"]));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    in_pool("p2");
    let _second = hold(&relay, &token(&relay, "d2", &["p2"]));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s[1].audio_frames == 1));
    in_pool("p1");
    assert_eq!(relay.account_live(0), 1, "the stream live in p1");
    assert_error_frame(&session(&relay, &token(&relay, "d3", &["p1"])), 429, 1013);
    assert_eq!(fake.sessions().len(), 2);
}

/// An account moved to another pool and then removed, with a stream still
/// live in its first pool: its metrics series stay while that stream
/// lives, so the stream's end is counted on it and on no account added
/// meanwhile. Before, once the account's state in the second pool was
/// gone, its metrics index was freed with the first pool's stream still
/// live: its series went, and a new account could take the index and
/// have that stream's end counted as its own.
#[test]
fn an_account_moved_then_removed_keeps_its_series_while_its_first_pools_stream_lives() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[]);
    cfg.pools = ["p1", "p2", "p3"]
        .into_iter()
        .map(|name| PoolConfig {
            name: name.into(),
            url: fake.url(),
            rest_url: None,
        })
        .collect();
    let account = |id: &str, key: &str, pool: &str| {
        let mut a = AccountConfig::new(id, Secret::new(key));
        a.pool = pool.into();
        a
    };
    cfg.accounts = vec![account("a", "k1", "p1")];
    let relay = Relay::start(cfg.clone());
    let _first = hold(&relay, &token(&relay, "d1", &["p1"]));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    // Moved to p2, where a stream comes and goes; "c" joins, in a pool of
    // its own, after the first stream opened (which holds the accounts it
    // could fail over to): its series going says a housekeeping pass ran.
    let mut moved = cfg.clone();
    moved.accounts[0].pool = "p2".into();
    moved.accounts.push(account("c", "k2", "p3"));
    relay.handle.reload(&moved).unwrap();
    let mut second = hold(&relay, &token(&relay, "d2", &["p2"]));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s[1].audio_frames == 1));
    second.send(Message::binary(Vec::<u8>::new())).unwrap();
    read_all(&mut second);
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 1));
    let mut gone = cfg.clone();
    gone.accounts.clear();
    relay.handle.reload(&gone).unwrap();
    let metrics = || http(relay.handle.admin_addr, "GET", "/metrics", None, None).1;
    let series = |m: &str, id: &str| {
        series_value(
            m,
            &format!("clio_relay_account_streams_active{{account=\"{id}\"}}"),
        )
    };
    assert!(
        wait_until(LIMIT, || series(&metrics(), "c").is_none()),
        "the removed account c's series never went"
    );
    let m = metrics();
    assert_eq!(series(&m, "a"), Some(1.0), "{m}");
}
