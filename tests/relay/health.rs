//! Active health checks against fake-soniox's REST API.

use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

fn accounts_view(relay: &Relay) -> Vec<(String, bool)> {
    relay
        .handle
        .process
        .accounts()
        .iter()
        .map(|a| (a.id.clone(), a.healthy(Instant::now())))
        .collect()
}

#[test]
fn a_key_that_goes_bad_is_taken_out_and_back_in() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    // Both keys pass.
    assert!(wait_until(Duration::from_secs(10), || fake
        .rest_calls()
        .iter()
        .filter(|c| c.path == "/v1/models" && c.status == 200)
        .count()
        >= 2));
    assert_eq!(
        accounts_view(&relay),
        vec![("a".into(), true), ("b".into(), true)]
    );
    // Key k1 stops working at Soniox: the next check marks `a` unhealthy on
    // every shard, before any stream was refused.
    fake.set_key_reject("k1", Some(401));
    assert!(
        wait_until(Duration::from_secs(10), || !accounts_view(&relay)[0].1),
        "{:?}",
        accounts_view(&relay)
    );
    let before = fake.sessions().len();
    for _ in 0..3 {
        let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
        assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
    }
    let keys: Vec<_> = fake.sessions()[before..]
        .iter()
        .map(|s| s.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(keys, vec!["k2"; 3], "no stream tried the bad key");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_health_checks_total{result=\"refused\"}"),
        "{metrics}"
    );
    // It recovers: the next passing check puts it back.
    fake.set_key_reject("k1", None);
    assert!(wait_until(Duration::from_secs(10), || accounts_view(
        &relay
    )[0]
    .1));
}

#[test]
fn readyz_follows_the_checks_and_unreachable_rest_changes_nothing() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    assert!(wait_until(Duration::from_secs(10), || http(
        admin, "GET", "/readyz", None, None
    )
    .0 == 200));
    // REST down: no verdict, the account stays healthy.
    fake.set_rest_status(Some(503));
    let calls = fake.rest_calls().len();
    assert!(wait_until(Duration::from_secs(10), || fake
        .rest_calls()
        .len()
        > calls + 2));
    assert_eq!(http(admin, "GET", "/readyz", None, None).0, 200);
    fake.set_rest_status(None);
    fake.set_key_reject("k1", Some(402));
    assert!(wait_until(Duration::from_secs(10), || http(
        admin, "GET", "/readyz", None, None
    )
    .0 == 503));
}

#[test]
fn upstream_concurrency_limit_caps_the_account() {
    // Soniox allows 2 live streams on k1; the relay's config says 10.
    let fake = fake(&[], |c| {
        c.keys = vec![
            fake_soniox::FakeKey::new("k1", 2),
            fake_soniox::FakeKey::new("k2", 10),
        ]
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.accounts[0].max_concurrent_streams = 10;
    cfg.accounts[1].max_concurrent_streams = 1;
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    assert!(wait_until(Duration::from_secs(10), || fake
        .rest_calls()
        .iter()
        .any(|c| c.path == "/v1/concurrency-limits")));
    // Four streams: a takes 2 (its upstream room), b takes 1, the fourth is refused.
    let mut open = Vec::new();
    for i in 0..3 {
        let (mut ws, _) =
            connect(relay.addr(), &relay.token(&format!("d{i}")), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        open.push(ws);
        let n = i + 1;
        assert!(wait_until(Duration::from_secs(10), || fake
            .active_streams()
            == n));
    }
    let (mut ws, _) = connect(relay.addr(), &relay.token("d4"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &[]);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1013)),
        "{got:?}"
    );
    assert!(
        fake.sessions().iter().all(|s| s.http_status != Some(429)),
        "the relay never hit Soniox's limit"
    );
}

#[test]
fn an_upstream_on_ipv6_has_its_keys_checked() {
    // The REST base derived from `ws://[::1]:PORT/…` keeps the brackets:
    // without them it had "no host", and the pool's health checks were off.
    let fake = fake(&["k1"], |c| c.listen = "[::1]:0".parse().unwrap());
    assert!(fake.url().starts_with("ws://[::1]:"), "{}", fake.url());
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    fake.set_key_reject("k1", Some(401));
    assert!(
        wait_until(Duration::from_secs(10), || !accounts_view(&relay)[0].1),
        "the refused key was never checked: {:?}",
        fake.rest_calls()
    );
    fake.set_key_reject("k1", None);
    assert!(wait_until(Duration::from_secs(10), || accounts_view(
        &relay
    )[0]
    .1));
}

/// A key Soniox refuses is named in the scrape:
/// `clio_relay_account_healthy{account}` is 0 for its account while the
/// checks hold it off, and 1 again once a check passes. Before, only the
/// count `clio_relay_accounts_healthy` said that one was out: the checks
/// keep every stream off the refused key, so its account's errors never
/// rise, and no alert named it or fired (short of every account out).
#[test]
fn a_refused_key_is_named_in_the_scrape() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    let healthy = || {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        (
            series_value(&metrics, r#"clio_relay_account_healthy{account="a"}"#),
            series_value(&metrics, r#"clio_relay_account_healthy{account="b"}"#),
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || healthy()
            == (Some(1.0), Some(1.0))),
        "{:?}",
        healthy()
    );
    fake.set_key_reject("k1", Some(401));
    assert!(
        wait_until(Duration::from_secs(10), || healthy()
            == (Some(0.0), Some(1.0))),
        "{:?}",
        healthy()
    );
    fake.set_key_reject("k1", None);
    assert!(
        wait_until(Duration::from_secs(10), || healthy()
            == (Some(1.0), Some(1.0))),
        "{:?}",
        healthy()
    );
}
