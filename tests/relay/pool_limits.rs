//! A pool's own limits, with two fake upstreams "us" and "eu" behind one
//! relay: `[pool.eu] max_streams` caps the EU pool's streams and leaves
//! the US pool alone, and `[pool.eu.devices]` holds EU tokens' devices to
//! smaller limits than the tier's. Each refusal is the documented 429 and
//! names the limit.

use std::time::{Duration, SystemTime};

use clio_relay::core::config::{AccountConfig, DeviceLimits, PoolConfig, PoolLimits};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeKey, FakeSoniox};
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// The US fake (us-key-1) and the EU fake (eu-key-1, eu-key-2), and a
/// config with pools "us" ("us-1", limit 10) and "eu" ("eu-1", "eu-2",
/// limit 5 each): the accounts have room to spare, so only the pools' own
/// limits refuse. `tweak_eu` changes the EU fake.
fn us_and_eu(
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
    cfg.accounts = vec![
        account("us-1", "us-key-1", "us", 10),
        account("eu-1", "eu-key-1", "eu", 5),
        account("eu-2", "eu-key-2", "eu", 5),
    ];
    (us, eu, cfg)
}

fn eu_limits(max_streams: u32, devices: DeviceLimits) -> (String, PoolLimits) {
    (
        "eu".to_string(),
        PoolLimits {
            max_streams,
            devices,
        },
    )
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

/// A whole session on `token`; what the client got.
fn session(relay: &Relay, token: &str) -> Received {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &audio_frames(3, 1))
}

/// Opens a stream and keeps it live (config and one audio frame sent).
fn hold(relay: &Relay, token: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1).remove(0)))
        .unwrap();
    ws
}

fn message(got: &Received) -> String {
    got.messages[0]["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn metrics(relay: &Relay) -> String {
    http_get(relay.handle.admin_addr, "/metrics", "").2
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

#[test]
fn a_pools_max_streams_caps_its_streams_and_leaves_other_pools_alone() {
    let (us, eu, mut cfg) = us_and_eu(|_| {});
    cfg.devices.pools = [eu_limits(2, DeviceLimits::default())].into();
    let relay = Relay::start(cfg);
    let _a = hold(&relay, &token(&relay, "eu-a", &["eu"]));
    let _b = hold(&relay, &token(&relay, "eu-b", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 2
        && s.iter().all(|r| r.audio_frames == 1)));

    // The third EU stream is refused although both EU accounts have room.
    let third = token(&relay, "eu-c", &["eu"]);
    let got = session(&relay, &third);
    assert_error_frame(&got, 429, 1013);
    let text = message(&got);
    assert!(
        text.contains("Pool limit reached") && text.contains("pool.eu.max_streams"),
        "{text}"
    );
    assert!(
        !text.contains(&third),
        "the token is in the message: {text}"
    );
    assert_eq!(eu.sessions().len(), 2);

    // The US pool has no cap of its own: its streams go on, and a token
    // naming both pools goes to the US while the EU pool is full.
    let _us: Vec<_> = (0..3)
        .map(|i| hold(&relay, &token(&relay, &format!("us-{i}"), &["us"])))
        .collect();
    let got = session(&relay, &token(&relay, "both", &["eu", "us"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(us.wait_for(LIMIT, |s| s.len() == 4));
    assert_eq!(eu.sessions().len(), 2, "{:?}", eu.sessions());

    let m = metrics(&relay);
    for line in [
        r#"clio_relay_pool_max_streams{pool="eu"} 2"#,
        r#"clio_relay_pool_max_streams{pool="us"} 0"#,
        r#"clio_relay_pool_refusals_total{pool="eu",limit="max_streams"} 1"#,
        r#"clio_relay_pool_refusals_total{pool="us",limit="max_streams"} 0"#,
        r#"clio_relay_refusals_total{by="pool_limit"} 1"#,
    ] {
        assert!(has_line(&m, line), "{line} missing:\n{m}");
    }

    // A place freed is a place taken again.
    drop(_a);
    assert!(eu.wait_for(LIMIT, |s| s.iter().filter(|r| r.closed).count() == 1));
    assert!(wait_until(LIMIT, || relay
        .handle
        .process
        .pools
        .get("eu")
        .live()
        == 1));
    let got = session(&relay, &token(&relay, "eu-d", &["eu"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s.len() == 3));
}

#[test]
fn a_stream_at_its_pools_cap_still_moves_to_another_account_at_open() {
    // eu-key-1 refuses at its first message: the stream, the only one
    // the EU pool may have, moves to eu-2 while its first account's place
    // is still held. The cap applies to admitting the stream, not to its
    // moves.
    let (us, eu, mut cfg) = us_and_eu(|c| {
        c.faults.refuse_at_first_message = vec![("eu-key-1".into(), 401)];
    });
    cfg.devices.pools = [eu_limits(1, DeviceLimits::default())].into();
    // eu-1 first: both accounts have the same room, and the tie-break
    // starts at the first.
    let relay = Relay::start(cfg);
    let got = session(&relay, &token(&relay, "eu-moved", &["eu"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(eu.wait_for(LIMIT, |s| s
        .iter()
        .any(|r| r.key.as_deref() == Some("eu-key-2") && r.closed)));
    assert!(us.sessions().is_empty(), "{:?}", us.sessions());
    assert!(wait_until(LIMIT, || relay
        .handle
        .process
        .pools
        .get("eu")
        .live()
        == 0));
}

#[test]
fn a_pools_device_limits_tighten_the_tiers_for_its_tokens_only() {
    let (us, eu, mut cfg) = us_and_eu(|_| {});
    cfg.devices.default.max_concurrent_streams = 3;
    cfg.devices.pools = [eu_limits(
        0,
        DeviceLimits {
            max_concurrent_streams: 1,
            ..Default::default()
        },
    )]
    .into();
    let relay = Relay::start(cfg);
    let _one = hold(&relay, &token(&relay, "phone", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    let second = token(&relay, "phone", &["eu"]);
    let got = session(&relay, &second);
    assert_error_frame(&got, 429, 1013);
    let text = message(&got);
    assert!(
        text.contains("Device limit reached: 1 concurrent streams")
            && text.contains("pool.eu.devices"),
        "{text}"
    );
    assert!(
        !text.contains(&second),
        "the token is in the message: {text}"
    );
    // A token naming eu among others runs under eu's limit too.
    assert_error_frame(
        &session(&relay, &token(&relay, "phone", &["us", "eu"])),
        429,
        1013,
    );
    // The US pool keeps the tier's 3: the same device streams there.
    let _us: Vec<_> = (0..2)
        .map(|_| hold(&relay, &token(&relay, "phone", &["us"])))
        .collect();
    assert!(us.wait_for(LIMIT, |s| s.len() == 2
        && s.iter().all(|r| r.audio_frames == 1)));
    let got = session(&relay, &token(&relay, "phone", &["us"]));
    assert_error_frame(&got, 429, 1013);
    assert_eq!(message(&got), "Device limit reached: 3 concurrent streams.");
    let m = metrics(&relay);
    for line in [
        r#"clio_relay_pool_refusals_total{pool="eu",limit="concurrent"} 2"#,
        r#"clio_relay_pool_refusals_total{pool="us",limit="concurrent"} 0"#,
        r#"clio_relay_device_rejections_total{limit="concurrent"} 3"#,
    ] {
        assert!(has_line(&m, line), "{line} missing:\n{m}");
    }
}

#[test]
fn a_reload_changes_a_pools_limits_for_new_streams() {
    let (_us, eu, mut cfg) = us_and_eu(|_| {});
    cfg.devices.pools = [eu_limits(1, DeviceLimits::default())].into();
    let relay = Relay::start(cfg.clone());
    let _one = hold(&relay, &token(&relay, "eu-a", &["eu"]));
    assert!(eu.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    assert_error_frame(&session(&relay, &token(&relay, "eu-b", &["eu"])), 429, 1013);
    // Raised to 2: the next EU stream goes through; the metric follows.
    cfg.devices.pools = [eu_limits(2, DeviceLimits::default())].into();
    relay.handle.reload(&cfg).unwrap();
    let got = session(&relay, &token(&relay, "eu-c", &["eu"]));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(has_line(
        &metrics(&relay),
        r#"clio_relay_pool_max_streams{pool="eu"} 2"#
    ));
}
