//! Per-device limits, revocation and usage, end to end with real streams.

use std::time::{Duration, SystemTime};

use clio_relay::core::config::DeviceLimits;
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use tungstenite::Message;

use crate::util::*;

const ADMIN: &str = "devices-admin-token-0123456789";

fn relay_with(fake: &fake_soniox::FakeSoniox, limits: DeviceLimits) -> Relay {
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.accounts[0].price_per_hour = 0.36;
    cfg.accounts[0].monthly_budget = 100.0;
    cfg.devices.default = limits;
    cfg.devices.tiers.insert(
        "pro".into(),
        DeviceLimits {
            max_concurrent_streams: 3,
            ..Default::default()
        },
    );
    cfg.admin.token = Some(Secret::new(ADMIN));
    Relay::start(cfg)
}

fn open(relay: &Relay, token: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws
}

fn refused(relay: &Relay, token: &str) -> Received {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &[])
}

/// `clio_relay_devices_tracked`: the devices the relay remembers now.
fn devices_tracked(relay: &Relay) -> Option<u64> {
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("clio_relay_devices_tracked "))
        .and_then(|n| n.trim().parse().ok())
}

/// `clio_relay_streams_active`, summed over the shards.
fn streams_active(relay: &Relay) -> u64 {
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    metrics
        .lines()
        .filter(|l| l.starts_with("clio_relay_streams_active"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `GET path` on the admin port with the admin token, as JSON (`Null` when
/// the body is not JSON).
fn admin_get(admin: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let (_, body) = http(admin, "GET", path, Some(ADMIN), None);
    serde_json::from_str(&body).unwrap_or_default()
}

/// relay-load's pattern: a new device for every stream. With no daily
/// allowance, the relay remembers the devices streaming now, not every
/// device that streamed today.
#[test]
fn devices_no_limit_needs_are_forgotten() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(&fake, DeviceLimits::default());
    let live = open(&relay, &relay.token("live-phone"));
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    for i in 0..40 {
        let (mut ws, _) = connect(
            relay.addr(),
            &relay.token(&format!("phone-{i}")),
            Via::Header,
        )
        .unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        assert!(got.finished(), "{got:?}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || devices_tracked(&relay)
            == Some(1)),
        "40 ended streams, one live: {:?} devices remembered",
        devices_tracked(&relay)
    );
    drop(live);
    assert!(
        wait_until(Duration::from_secs(10), || devices_tracked(&relay)
            == Some(0)),
        "{:?}",
        devices_tracked(&relay)
    );
}

#[test]
fn concurrent_streams_per_device_hold_across_shards_and_tiers() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.shards = 2;
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    cfg.devices.tiers.insert(
        "pro".into(),
        DeviceLimits {
            max_concurrent_streams: 3,
            ..Default::default()
        },
    );
    let relay = Relay::start(cfg);
    let token = relay.token("phone");
    // Several connections land on both shards; the device still has two.
    let _a = open(&relay, &token);
    let _b = open(&relay, &token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    for _ in 0..4 {
        let got = refused(&relay, &token);
        assert_eq!(
            (got.error_code(), got.close_code()),
            (Some(429), Some(1013)),
            "{got:?}"
        );
        assert!(
            got.messages[0]["error_message"]
                .as_str()
                .unwrap()
                .contains("2 concurrent streams"),
            "{got:?}"
        );
    }
    // Another device is not affected; a "pro" token of the same device gets 3.
    assert!(refused(&relay, &relay.token("tablet"))
        .error_code()
        .is_none());
    let keys = TokenKeys::from_config(&relay.cfg.tokens);
    let tier_token = |device: &str, tier: &str| {
        keys.mint_with_tier(
            device,
            Some(tier),
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap()
    };
    let pro = tier_token("laptop", "pro");
    let _p: Vec<Ws> = (0..3).map(|_| open(&relay, &pro)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 5));
    assert_eq!(refused(&relay, &pro).error_code(), Some(429));
    // A tier the file does not have (another minter's, or one a reload
    // removed) runs under the [devices] defaults: two.
    let gold = tier_token("desktop", "gold");
    let _g: Vec<Ws> = (0..2).map(|_| open(&relay, &gold)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 7));
    assert_eq!(refused(&relay, &gold).error_code(), Some(429));
}

#[test]
fn new_streams_per_minute_are_a_token_bucket() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(
        &fake,
        DeviceLimits {
            streams_per_minute: 3,
            ..Default::default()
        },
    );
    let token = relay.token("phone");
    for _ in 0..3 {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        assert!(stream_session(&mut ws, &config_message(None), &audio_frames(1, 1)).finished());
    }
    let got = refused(&relay, &token);
    assert_eq!(got.error_code(), Some(429));
    assert!(got.messages[0]["error_message"]
        .as_str()
        .unwrap()
        .contains("3 new streams per minute"));
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_device_rejections_total{limit=\"rate\"} 1"),
        "{metrics}"
    );
}

/// A compressed stream's audio is known only from upstream, and counted
/// against the day when the stream ends: a stream past the allowance
/// goes on to its end, and the device's next stream is refused.
/// A compressed stream's length is upstream's to tell: it is counted
/// against the day as upstream's results report it, a second at a time,
/// and the stream that passes the allowance is ended as a raw one is.
#[test]
fn a_compressed_stream_past_the_daily_allowance_is_ended() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let relay = relay_with(
        &fake,
        DeviceLimits {
            audio_seconds_per_day: 2,
            ..Default::default()
        },
    );
    let token = relay.token("ogg-phone");
    let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.send(Message::text(config.to_string())).unwrap();
    // fake-soniox takes compressed audio as 16,000 bytes a second: each
    // 3,200-byte frame is 200 ms, echoed with the total so far. Each frame
    // waits for the last one's result, so the relay has upstream's figure
    // when the next frame comes.
    let mut last_total = 0;
    let mut ended = None;
    'frames: for f in audio_frames(40, 3) {
        if ws.send(Message::binary(f)).is_err() {
            break;
        }
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["error_code"].is_u64() {
                        ended = Some(v);
                        break 'frames;
                    }
                    last_total = v["total_audio_proc_ms"].as_u64().unwrap();
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("after {last_total} ms: {e}"),
            }
        }
    }
    let ended = ended.unwrap_or_else(|| panic!("not ended after {last_total} ms"));
    assert_eq!(ended["error_code"], 429, "{ended}");
    assert!(
        ended["error_message"]
            .as_str()
            .unwrap()
            .contains("daily audio"),
        "{ended}"
    );
    // Counted a second at a time: ended once 3 s were reported, at the
    // frame after that result.
    assert_eq!(last_total, 3000, "{ended}");
    let rest = read_all(&mut ws);
    assert_eq!(rest.close_code(), Some(1008), "{rest:?}");
    let got = refused(&relay, &token);
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    assert!(got.messages.iter().any(|m| m["error_message"]
        .as_str()
        .is_some_and(|t| t.contains("2 audio seconds per day"))));
}

#[test]
fn daily_audio_allowance_ends_the_stream_that_crosses_it() {
    let fake = fake(&["k1"], |_| {});
    // 3 s a day; 100 ms frames of 16 kHz s16le: the 31st second of audio crosses it.
    let relay = relay_with(
        &fake,
        DeviceLimits {
            audio_seconds_per_day: 3,
            ..Default::default()
        },
    );
    let token = relay.token("phone");
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let mut sent = 0;
    for f in audio_frames(60, 3) {
        if ws.send(Message::binary(f)).is_err() {
            break;
        }
        sent += 1;
    }
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1008)),
        "after {sent} frames: {got:?}"
    );
    assert!(got.messages.iter().any(|m| m["error_message"]
        .as_str()
        .is_some_and(|t| t.contains("daily audio"))));
    // The next stream of the device is refused at once.
    assert_eq!(refused(&relay, &token).error_code(), Some(429));
    // The day's audio outlives the streams. Once every stream of "phone"
    // is over on the relay's side, a device with no audio streams; when it
    // is forgotten, a sweep ran after "phone" ended, and "phone" is still
    // remembered and refused. Another device is fine.
    assert!(wait_until(Duration::from_secs(10), || streams_active(
        &relay
    ) == 0));
    assert!(refused(&relay, &relay.token("other"))
        .error_code()
        .is_none());
    assert!(
        wait_until(Duration::from_secs(10), || streams_active(&relay) == 0
            && devices_tracked(&relay) == Some(1)),
        "{:?}",
        devices_tracked(&relay)
    );
    assert_eq!(refused(&relay, &token).error_code(), Some(429));
}

#[test]
fn max_stream_length_ends_a_long_stream() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(
        &fake,
        DeviceLimits {
            max_stream_length: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let mut ws = open(&relay, &relay.token("phone"));
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1008)),
        "{got:?}"
    );
    assert!(got.messages[0]["error_message"]
        .as_str()
        .unwrap()
        .contains("longest a stream may last"));
}

/// `clio_relay_device_rejections_total{limit="max_length"}`.
fn max_length_rejections(relay: &Relay) -> Option<u64> {
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    metrics.lines().find_map(|l| {
        l.strip_prefix(r#"clio_relay_device_rejections_total{limit="max_length"} "#)?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn a_limit_reached_after_the_clients_close_is_not_a_rejection() {
    // Upstream stops answering at the 2nd frame; the client sends its
    // close and waits for the answer; the longest stream length ends the
    // wait. The client had already ended its stream: it gets the close
    // answered, and no device limit is counted against it.
    let fake = fake(&["k1"], |c| c.faults.stall_after_frames = Some(2));
    let relay = relay_with(
        &fake,
        DeviceLimits {
            max_stream_length: Duration::from_millis(700),
            ..Default::default()
        },
    );
    let mut ws = open(&relay, &relay.token("phone"));
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.close(None).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (None, Some(1000)),
        "{got:?}"
    );
    assert!(relay.wait_idle(Duration::from_secs(5)));
    assert_eq!(max_length_rejections(&relay), Some(0));

    // The same limit on a stream still streaming is counted.
    let mut ws = open(&relay, &relay.token("phone"));
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    assert_eq!(max_length_rejections(&relay), Some(1));
}

#[test]
fn a_stream_still_opening_when_its_device_is_revoked_is_ended_too() {
    // Upstream answers each upgrade 2 s late: the revocation, which ends
    // live streams, comes while this stream is still opening.
    let fake = fake(&["k1"], |c| {
        c.faults.handshake_delay = Duration::from_secs(2)
    });
    let relay = relay_with(&fake, DeviceLimits::default());
    let mut ws = open(&relay, &relay.token("stolen-phone"));
    let live = || relay.account_live(0);
    assert!(wait_until(Duration::from_secs(10), || live() == 1));
    let (status, body) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"stolen-phone","end_live_streams":true}"#),
    );
    assert_eq!(status, 200, "{body}");
    // Once upstream answers, the stream ends as a live one does; it does
    // not stream on for a device revoked while it opened.
    for f in audio_frames(5, 2) {
        let _ = ws.send(Message::binary(f));
    }
    let _ = ws.send(Message::binary(Vec::new()));
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "{got:?}"
    );
    assert!(!got.finished(), "{got:?}");
}

/// A wave of lost devices is revoked in one request (`device_ids`,
/// `token_ids`): each is refused, the live streams of each end when asked,
/// the answer names each id, and one save keeps them all. A list with an
/// id no token can carry is refused whole, naming the id's place, and
/// changes nothing. `DELETE` lifts a list the same way.
#[test]
fn many_devices_are_revoked_in_one_request() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(&fake, DeviceLimits::default());
    let admin = relay.handle.admin_addr;
    let lost: Vec<String> = (0..1000).map(|i| format!("lost-{i:04}")).collect();
    let mut live = open(&relay, &relay.token("lost-0500"));
    let kept_token = relay.token("kept-phone");
    let mut kept = open(&relay, &kept_token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    let leaked = relay.token("phone-2");
    let leaked_id = TokenKeys::from_config(&relay.cfg.tokens)
        .verify(&leaked, SystemTime::now())
        .unwrap()
        .token_id;

    let mut bad = lost.clone();
    bad[3] = "not an id".into();
    let body = serde_json::json!({"device_ids": bad}).to_string();
    let (status, answer) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&body),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("device_ids[3]"), "{answer}");
    assert!(refused(&relay, &relay.token("lost-0001"))
        .error_code()
        .is_none());

    let body = serde_json::json!({
        "device_ids": lost,
        "token_ids": [leaked_id],
        "end_live_streams": true,
    })
    .to_string();
    let (status, answer) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["devices"], serde_json::json!(lost), "every id, in order");
    assert_eq!(v["token_ids"], serde_json::json!([leaked_id]));
    assert_eq!(
        v["revoked"],
        serde_json::json!({"devices": 1000, "token_ids": 1})
    );
    let got = read_all(&mut live);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "{got:?}"
    );
    for d in ["lost-0000", "lost-0999"] {
        assert_eq!(refused(&relay, &relay.token(d)).error_code(), Some(401));
    }
    assert_eq!(refused(&relay, &leaked).error_code(), Some(401));
    // A device not listed streams on: its stream was not ended with the
    // listed one (the same message of the shard ends both, or neither).
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    kept.send(Message::binary(vec![0u8; 3200])).unwrap();
    assert_eq!(fake.active_streams(), 1);
    assert!(refused(&relay, &kept_token).error_code().is_none());
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.cfg.admin.state_dir.join("revocations.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["devices"].as_array().unwrap().len(), 1000);

    let body = serde_json::json!({"device_ids": lost[..500]}).to_string();
    let (status, answer) = http(
        admin,
        "DELETE",
        "/admin/revocations",
        Some(ADMIN),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["devices"], serde_json::json!([]), "{v}");
    assert_eq!(v["revoked"]["devices"], 500, "{v}");
    assert!(refused(&relay, &relay.token("lost-0000"))
        .error_code()
        .is_none());
    assert_eq!(
        refused(&relay, &relay.token("lost-0999")).error_code(),
        Some(401)
    );
}

#[test]
fn revoking_a_device_refuses_new_streams_and_can_end_live_ones() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(&fake, DeviceLimits::default());
    let admin = relay.handle.admin_addr;
    let token = relay.token("lost-phone");
    let mut live = open(&relay, &token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    // Revoke without ending: the live stream goes on, new ones are refused.
    let (status, body) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-phone"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let got = refused(&relay, &token);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008))
    );
    assert_eq!(fake.active_streams(), 1);
    // Now end its live streams too.
    let (status, _) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-phone","end_live_streams":true}"#),
    );
    assert_eq!(status, 200);
    let got = read_all(&mut live);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "{got:?}"
    );
    // A token id can be revoked on its own; lifting a revocation works.
    let other = relay.token("phone-2");
    let token_id = TokenKeys::from_config(&relay.cfg.tokens)
        .verify(&other, SystemTime::now())
        .unwrap()
        .token_id;
    http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&format!(r#"{{"token_id":"{token_id}"}}"#)),
    );
    assert_eq!(refused(&relay, &other).error_code(), Some(401));
    assert!(
        refused(&relay, &relay.token("phone-2"))
            .error_code()
            .is_none(),
        "a new token of the device works"
    );
    http(
        admin,
        "DELETE",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-phone"}"#),
    );
    assert!(refused(&relay, &relay.token("lost-phone"))
        .error_code()
        .is_none());
    assert_eq!(
        http(admin, "GET", "/admin/revocations", None, None).0,
        401,
        "behind the admin token"
    );
}

#[test]
fn usage_counts_audio_bytes_and_cost_per_account_and_device() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with(&fake, DeviceLimits::default());
    for (device, frames) in [("phone", 20), ("phone", 10), ("tablet", 5)] {
        let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
        assert!(
            stream_session(&mut ws, &config_message(None), &audio_frames(frames, 1)).finished()
        );
    }
    let usage = |group: &str| -> serde_json::Value {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            &format!("/admin/usage?group_by={group}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let by_device = usage("device");
    let rows = by_device["rows"].as_array().unwrap();
    let row = |k: &str| rows.iter().find(|r| r["key"] == k).unwrap().clone();
    // 100 ms frames: 3 s for the phone over two streams, 0.5 s for the tablet.
    assert_eq!(
        (
            row("phone")["streams"].as_u64(),
            row("phone")["audio_seconds_relay_meter"].as_f64()
        ),
        (Some(2), Some(3.0))
    );
    assert_eq!(
        row("tablet")["audio_seconds_relay_meter"].as_f64(),
        Some(0.5)
    );
    // Upstream's `total_audio_proc_ms` agrees with the relay's own meter.
    assert_eq!(
        row("phone")["audio_seconds"].as_f64(),
        Some(3.0),
        "{by_device}"
    );
    let by_account = usage("account");
    let a = &by_account["rows"][0];
    assert_eq!(
        (
            a["key"].as_str(),
            a["streams"].as_u64(),
            a["audio_seconds"].as_f64()
        ),
        (Some("a"), Some(3), Some(3.5))
    );
    // 3.5 s at 0.36 per hour.
    assert!((a["cost"].as_f64().unwrap() - 0.00035).abs() < 1e-9, "{a}");
    assert!(a["bytes_up"].as_u64().unwrap() > 35 * 3200);
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_usage_month_audio_seconds{account=\"a\"} 3.5"),
        "{metrics}"
    );
    assert!(metrics.contains("clio_relay_budget_month{account=\"a\",currency=\"USD\"} 100"));
}

/// A compressed stream's length is upstream's to tell. One that ends
/// without upstream's `finished` (here the client leaves mid-stream) is
/// billed, and counted against its device's day, what upstream's last
/// result said it had processed, not nothing.
#[test]
fn a_compressed_stream_cut_short_is_billed_what_upstream_processed() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let relay = relay_with(&fake, DeviceLimits::default());
    let (mut ws, _) = connect(relay.addr(), &relay.token("ogg-phone"), Via::Header).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    ws.send(Message::text(config.to_string())).unwrap();
    // fake-soniox takes compressed audio as 16,000 bytes a second: ten
    // 3,200-byte frames are 2 s, each echoed with the total so far.
    let mut last_total = 0;
    for f in audio_frames(10, 3) {
        ws.send(Message::binary(f)).unwrap();
        loop {
            if let Message::Text(t) = ws.read().unwrap() {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                last_total = v["total_audio_proc_ms"].as_u64().unwrap();
                break;
            }
        }
    }
    assert_eq!(last_total, 2000);
    // The client vanishes: no end of audio, no close.
    drop(ws);
    let row = || {
        let v = admin_get(relay.handle.admin_addr, "/admin/usage?group_by=device");
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == "ogg-phone")
            .cloned()
    };
    assert!(wait_until(Duration::from_secs(10), || row().is_some()));
    let row = row().unwrap();
    assert_eq!(row["streams"].as_u64(), Some(1), "{row}");
    assert_eq!(row["audio_seconds"].as_f64(), Some(2.0), "{row}");
}

/// A stream upstream never accepted, its first answer an error (every
/// account refused it, or its config was refused), was transcribed and
/// billed nothing: it is counted with its error and no audio, although
/// the client's audio had gone up before the answer.
#[test]
fn a_stream_upstream_refused_is_counted_without_audio() {
    let fake = fake(&["k1", "k2"], |c| {
        c.faults.refuse_at_first_message = vec![("k1".into(), 429)];
    });
    let relay = relay_with(&fake, DeviceLimits::default());
    let bad_model = {
        let mut v: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
        v["model"] = "no-such-model".into();
        v.to_string()
    };
    let (mut ws, _) = connect(relay.addr(), &relay.token("refused"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(10, 1));
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    // The second account's key takes streams: a config it refuses.
    let mut cfg = relay_config(&fake.url(), &[("b", "k2")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let other = Relay::start(cfg);
    let (mut ws, _) = connect(other.addr(), &other.token("bad-config"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &bad_model, &audio_frames(10, 1));
    assert_eq!(got.error_code(), Some(400), "{got:?}");
    // Upstream got audio from both before it answered.
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 2
        && s.iter().all(|r| r.closed)));
    for (relay, device, code) in [(&relay, "refused", "429"), (&other, "bad-config", "400")] {
        let row = || {
            let v = admin_get(relay.handle.admin_addr, "/admin/usage?group_by=device");
            v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["key"] == device)
                .cloned()
        };
        assert!(wait_until(Duration::from_secs(10), || row().is_some()));
        let row = row().unwrap();
        assert_eq!(
            (
                row["streams"].as_u64(),
                row["audio_seconds"].as_f64(),
                row["errors"][code].as_u64()
            ),
            (Some(1), Some(0.0), Some(1)),
            "{row}"
        );
    }
}

/// Streams counted in the usage ledger's database file, read beside the
/// running relay (SQLite allows readers while it writes).
fn streams_on_disk(dir: &std::path::Path) -> i64 {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        dir.join("usage.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    db.query_row(
        "SELECT coalesce(sum(streams), 0) FROM totals WHERE grp = 0",
        [],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

#[test]
fn usage_survives_a_restart() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg.clone());
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(wait_until(Duration::from_secs(10), || streams_on_disk(
        &cfg.admin.state_dir
    ) == 1));
    drop(relay);
    let relay = Relay::start(cfg.clone());
    let v = admin_get(relay.handle.admin_addr, "/admin/usage?group_by=device");
    assert_eq!(v["rows"][0]["audio_seconds"].as_f64(), Some(1.0), "{v}");
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// A restart does not start a device's day at 0: the relay reads each
/// device's audio so far today from the usage ledger before it takes a
/// stream. A device that streamed 2.5 s of its 3 s allowance before the
/// restart is ended at the first whole second of its next stream (about
/// 1 s streamed), as it would have been without the restart. Before, the
/// new process let it stream a whole new allowance (ended at its 4th second).
#[test]
fn a_restart_keeps_each_devices_daily_audio_so_far() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.devices.default = DeviceLimits {
        audio_seconds_per_day: 3,
        ..Default::default()
    };
    let relay = Relay::start(cfg.clone());
    let token = relay.token("phone");
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(25, 1)).finished());
    // A stop saves the ledger.
    assert!(relay.wait_idle(Duration::from_secs(10)));
    drop(relay);
    assert_eq!(streams_on_disk(&cfg.admin.state_dir), 1);
    let relay = Relay::start(cfg.clone());
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let (echoed, ended) = frames_until_ended(&mut ws, 60);
    assert!(
        echoed <= 12,
        "{echoed} frames streamed after the restart, of a day with 0.5 s left; then {ended:?}"
    );
    let ended = ended.unwrap_or_default();
    assert!(
        ended.contains("429") && ended.contains("daily audio"),
        "{ended}"
    );
    drop(relay);
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// A stream that ends just before a normal stop (a drain's last streams)
/// is in the ledger when the process is gone: the stop takes the shards'
/// last records and saves, not waiting for the next persist.
/// A ledger that cannot be written (here: `usage.db` cannot be created,
/// as on a full or read-only disk) leaves streaming alone, shows in
/// `clio_relay_usage_ledger_failing`, and once it can be written again
/// gets the usage kept in memory meanwhile.
#[test]
fn a_ledger_that_cannot_be_written_shows_and_catches_up() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_millis(100);
    let dir = cfg.admin.state_dir.clone();
    std::fs::create_dir_all(dir.join("usage.db")).unwrap();
    let relay = Relay::start(cfg);
    let failing = || {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("clio_relay_usage_ledger_failing "))
            .map(str::to_string)
    };
    assert_eq!(failing().as_deref(), Some("1"));
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(failing().as_deref(), Some("1"));
    std::fs::remove_dir(dir.join("usage.db")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || failing().as_deref()
        == Some("0")));
    assert_eq!(streams_on_disk(&dir), 1);
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

/// A state directory removed under a running relay (a clean-up script, a
/// mistaken `rm -rf`, or moved aside) took the ledger with it unseen:
/// SQLite went on writing the deleted file through the descriptor it
/// held, the metrics said all was well, and a restart found no usage at
/// all. The next persist now finds the file gone and writes the whole
/// ledger back where it belongs (0600 in a 0700 directory), and it goes
/// on there.
#[test]
fn a_ledger_removed_under_the_relay_is_written_back() {
    use std::os::unix::fs::PermissionsExt as _;
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_millis(100);
    let dir = cfg.admin.state_dir.clone();
    let relay = Relay::start(cfg);
    let stream = || {
        let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
        assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    };
    stream();
    assert!(wait_until(Duration::from_secs(10), || streams_on_disk(
        &dir
    ) == 1));
    std::fs::remove_dir_all(&dir).unwrap();
    stream();
    assert!(
        wait_until(Duration::from_secs(10), || streams_on_disk(&dir) == 2),
        "the ledger is not back in {}",
        dir.display()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("usage.db")), 0o600);
    // And it goes on in the file put back.
    stream();
    assert!(wait_until(Duration::from_secs(10), || streams_on_disk(
        &dir
    ) == 3));
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

/// A `usage.db` that does not open at start (damaged, cut short) holds
/// audio the relay cannot count: `clio_relay_audio_seconds_total`, a
/// counter since the ledger began, is left out (a gap), as when the
/// ledger cannot be read while it runs, not started again from the
/// streams since (a drop from the last value scraped). Once the ledger
/// opens, it is back.
#[test]
fn a_ledger_that_does_not_open_leaves_the_audio_counter_out() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_millis(100);
    let dir = cfg.admin.state_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("usage.db"), "not a database, a damaged ledger").unwrap();
    let relay = Relay::start(cfg);
    let metrics = || {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        metrics
    };
    let counter = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("clio_relay_audio_seconds_total{account=\"a\"} "))
            .map(str::to_string)
    };
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    // The stream is in the book (collected from the shard).
    assert!(wait_until(Duration::from_secs(10), || {
        let v = admin_get(relay.handle.admin_addr, "/admin/usage?group_by=account");
        v["rows"].as_array().is_some_and(|r| !r.is_empty())
    }));
    let m = metrics();
    assert!(m.contains("clio_relay_usage_ledger_failing 1"), "{m}");
    assert_eq!(counter(&m), None, "{m}");
    std::fs::remove_file(dir.join("usage.db")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || counter(&metrics()).is_some()));
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn usage_of_the_last_streams_is_saved_at_a_stop() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_secs(3600);
    let relay = Relay::start(cfg.clone());
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    drop(relay);
    assert_eq!(streams_on_disk(&cfg.admin.state_dir), 1);
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// `clio_relay_audio_seconds_total` is a counter: when the ledger drops
/// its oldest day past the 400 it keeps, that day's audio stays in it,
/// across a restart too.
#[test]
fn the_audio_counter_keeps_the_days_the_ledger_drops() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.usage.persist_interval = Duration::from_millis(100);
    let today = clio_relay::core::devices::utc_day(SystemTime::now());
    let dir = cfg.admin.state_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    // 401 days of one second each, from an older relay's file: one day
    // more than the ledger keeps.
    let day = serde_json::json!({"a": {"streams": 1, "audio_ms": 1000, "audio_ms_relay": 1000, "bytes_up": 32000, "bytes_down": 10, "errors": {}}});
    let days: serde_json::Map<String, serde_json::Value> = (today - 400..=today)
        .map(|d| (d.to_string(), day.clone()))
        .collect();
    let old = serde_json::json!({"by_account": days.clone(), "by_device": {}});
    std::fs::write(dir.join("usage.json"), old.to_string()).unwrap();
    let counter = |relay: &Relay| {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("clio_relay_audio_seconds_total{account=\"a\"} "))
            .map(str::to_string)
    };
    let days_on_disk = || -> i64 {
        let db = rusqlite::Connection::open_with_flags(
            dir.join("usage.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row(
            "SELECT count(DISTINCT day) FROM totals WHERE grp = 0",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let relay = Relay::start(cfg.clone());
    assert_eq!(counter(&relay).as_deref(), Some("401"));
    // A persist drops the oldest day from the file.
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(wait_until(Duration::from_secs(10), || days_on_disk()
        == 400
        && streams_on_disk(&dir) == 401));
    assert_eq!(counter(&relay).as_deref(), Some("402"));
    drop(relay);
    let relay = Relay::start(cfg);
    assert_eq!(counter(&relay).as_deref(), Some("402"));
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

/// An older relay's `usage.json` is taken into the database at start, with
/// the same figures, and new streams add to it.
#[test]
fn usage_json_of_an_older_relay_is_migrated_at_start() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.persist_interval = Duration::from_millis(100);
    let today = clio_relay::core::devices::utc_day(SystemTime::now());
    let dir = &cfg.admin.state_dir;
    std::fs::create_dir_all(dir).unwrap();
    let old = serde_json::json!({
        "by_account": {today.to_string(): {"a": {"streams": 7, "audio_ms": 70000, "audio_ms_relay": 69000, "bytes_up": 2240000, "bytes_down": 900, "errors": {"503": 2}}}},
        "by_device": {today.to_string(): {"phone": {"streams": 7, "audio_ms": 70000, "audio_ms_relay": 69000, "bytes_up": 2240000, "bytes_down": 900, "errors": {"503": 2}}}}
    });
    std::fs::write(dir.join("usage.json"), old.to_string()).unwrap();
    let relay = Relay::start(cfg.clone());
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(wait_until(Duration::from_secs(10), || streams_on_disk(dir) == 8));
    assert!(!dir.join("usage.json").exists());
    assert!(dir.join("usage.json.migrated").exists());
    let (_, body) = http(
        relay.handle.admin_addr,
        "GET",
        &format!(
            "/admin/usage?group_by=account&from={}&to={}",
            clio_relay::control::usage::format_day(today),
            clio_relay::control::usage::format_day(today + 1)
        ),
        Some(ADMIN),
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &v["rows"][0];
    assert_eq!(
        (
            row["streams"].as_u64(),
            row["audio_seconds"].as_f64(),
            row["errors"]["503"].as_u64()
        ),
        (Some(8), Some(71.0), Some(2)),
        "{v}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A stream resumed mid-stream had two upstream connections, so two
/// entries in Soniox's usage logs, and Soniox billed both: the audio the
/// resume replayed twice. The ledger counts the client's audio once; the
/// reconciliation compares that stream once with all Soniox billed for it.
#[test]
fn reconciliation_counts_a_resumed_stream_once_against_all_it_cost() {
    let faults = only_first_connection_fails(fake_soniox::FaultKind::Drop, 6, |n| n == 6);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = reconciling_relay(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(20, 1));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 2
        && s.iter().all(|r| r.closed)));
    // What Soniox billed: every connection's audio, the replay included.
    let billed_ms: u64 = fake.sessions().iter().map(|s| s.audio_ms).sum();
    assert!(billed_ms > 2000, "{billed_ms}");
    let report = || reconciliation(&relay);
    wait_for_matched(&relay, 1);
    let r = &report()["a"];
    let soniox = billed_ms as f64 / 1000.0;
    assert_eq!(
        (
            r["matched"].as_u64(),
            r["unmatched"].as_u64(),
            r["relay_seconds"].as_f64(),
            r["soniox_seconds"].as_f64(),
        ),
        (Some(1), Some(0), Some(2.0), Some(soniox)),
        "{r}"
    );
    assert!(
        (r["drift_seconds"].as_f64().unwrap() - (2.0 - soniox)).abs() < 1e-9,
        "{r}"
    );
    // The ledger: 20 frames of 100 ms, once.
    let v = admin_get(relay.handle.admin_addr, "/admin/usage?group_by=device");
    assert_eq!(v["rows"][0]["audio_seconds"].as_f64(), Some(2.0), "{v}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_audio_seconds_total{account=\"a\"} 2\n"),
        "{metrics}"
    );
}

/// A relay on `fake`'s account "a" that reconciles every 300 ms.
fn reconciling_relay(fake: &fake_soniox::FakeSoniox) -> Relay {
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.usage.reconcile_interval = Duration::from_millis(300);
    Relay::start(cfg)
}

/// `GET /admin/reconciliation`.
fn reconciliation(relay: &Relay) -> serde_json::Value {
    admin_get(relay.handle.admin_addr, "/admin/reconciliation")
}

/// Waits until account "a"'s reconciliation has matched `n` streams.
fn wait_for_matched(relay: &Relay, n: u64) {
    assert!(
        wait_until(Duration::from_secs(10), || reconciliation(relay)["a"]
            ["matched"]
            == n),
        "{}",
        reconciliation(relay)
    );
}

/// A client may set its own `client_reference_id` and use it for several
/// streams (a session id, say). Soniox's usage logs then hold an entry per
/// stream under that id; the relay compares them with all its streams of
/// that id on that account, not with the latest one only.
#[test]
fn reconciliation_compares_a_shared_reference_id_with_all_its_streams() {
    let fake = fake(&["k1"], |_| {});
    let relay = reconciling_relay(&fake);
    let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    config["client_reference_id"] = "meeting-7".into();
    for frames in [10, 20, 5] {
        let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(frames, 1));
        assert!(got.finished(), "{got:?}");
    }
    let report = || reconciliation(&relay);
    wait_for_matched(&relay, 3);
    let r = &report()["a"];
    assert_eq!(
        (
            r["unmatched"].as_u64(),
            r["relay_seconds"].as_f64(),
            r["soniox_seconds"].as_f64(),
            r["drift_seconds"].as_f64()
        ),
        (Some(0), Some(3.5), Some(3.5), Some(0.0)),
        "{r}"
    );
}

#[test]
fn reconciliation_matches_soniox_usage_logs_stream_by_stream() {
    let fake = fake(&["k1"], |_| {});
    let relay = reconciling_relay(&fake);
    for frames in [10, 20, 5] {
        let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
        assert!(
            stream_session(&mut ws, &config_message(None), &audio_frames(frames, 1)).finished()
        );
    }
    let report = || reconciliation(&relay);
    wait_for_matched(&relay, 3);
    let r = report();
    assert_eq!(
        (
            r["a"]["relay_seconds"].as_f64(),
            r["a"]["soniox_seconds"].as_f64(),
            r["a"]["drift_seconds"].as_f64()
        ),
        (Some(3.5), Some(3.5), Some(0.0)),
        "{r}"
    );
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_usage_drift_seconds{account=\"a\"} 0"),
        "{metrics}"
    );

    // Soniox's REST API failing: the last comparison stands (with its
    // time), not an empty one that would read as "no drift, nothing matched".
    fake.set_rest_status(Some(503));
    let failed_reads = || {
        fake.rest_calls()
            .iter()
            .filter(|c| c.path == "/v1/usage-logs" && c.status == 503)
            .count()
    };
    assert!(wait_until(Duration::from_secs(10), || failed_reads() >= 3));
    let after = report();
    assert_eq!(after["a"], r["a"], "{after}");
}

/// A removed account's reconciliation goes with it: its
/// `clio_relay_usage_drift_seconds` series leaves the scrape and it
/// leaves `/admin/reconciliation`. Before, both kept the account's last
/// comparison for the life of the process, so accounts added and
/// removed grew the scrape without bound, and a removed account's last
/// drift kept `ClioRelayUsageDrift` firing for good.
#[test]
fn a_removed_accounts_reconciliation_goes_with_it() {
    let fake = fake(&["k1"], |_| {});
    let relay = reconciling_relay(&fake);
    let admin = relay.handle.admin_addr;
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"gone","key":"k1"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let drift = || {
        let (_, metrics) = http(admin, "GET", "/metrics", None, None);
        series_value(
            &metrics,
            r#"clio_relay_usage_drift_seconds{account="gone"}"#,
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || drift().is_some()
            && reconciliation(&relay).get("gone").is_some()),
        "never reconciled: {}",
        reconciliation(&relay)
    );
    let (status, body) = http(admin, "DELETE", "/admin/accounts/gone", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_until(Duration::from_secs(10), || drift().is_none()
            && reconciliation(&relay).get("gone").is_none()),
        "a removed account's drift stays: {:?} {}",
        drift(),
        reconciliation(&relay)
    );
}
