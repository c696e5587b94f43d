//! Usage and cost figures against what upstream (fake-soniox) saw and
//! what the client sent: the ledger's per-account and per-device audio,
//! its streams and its cost, in the ways real streams end.

use std::time::Duration;

use fake_soniox::FaultKind;
use serde_json::Value;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(20);
const ADMIN: &str = "usage-admin-token-0123456789";

/// `/admin/usage` rows of `group` by key, once `want` rows are there.
fn usage_rows(relay: &Relay, group: &str, want: usize) -> serde_json::Map<String, Value> {
    let mut rows = serde_json::Map::new();
    let ok = wait_until(LIMIT, || {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            &format!("/admin/usage?group_by={group}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        rows = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].as_str().unwrap().to_string(), r.clone()))
            .collect();
        rows.len() >= want
    });
    assert!(ok, "{rows:?}");
    rows
}

#[test]
fn a_stream_resumed_on_another_account_bills_each_account_its_audio() {
    // Two accounts at different prices. The first connection is refused
    // (401) at its sixth audio frame, after upstream accepted the stream:
    // its account is marked and the resume takes the other. Each account
    // must carry the audio its own connection was sent, less what the
    // resume replayed, at its own price; the stream counts once.
    let faults = only_first_connection_fails(FaultKind::Error(401), 6, |n| n == 6);
    let fake = fake(&["k1", "k2"], |c| c.faults.random = Some(faults));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
    cfg.accounts[0].price_per_hour = 3.6;
    cfg.accounts[1].price_per_hour = 36.0;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    // 20 frames of 100 ms.
    let frames = audio_frames(20, 3);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    let sessions = fake.sessions();
    let first = &sessions[0];
    let second = &sessions[1];
    assert_ne!(first.key, second.key, "the resume took the other account");
    let account_of = |key: &Option<String>| match key.as_deref() {
        Some("k1") => "a",
        Some("k2") => "b",
        k => panic!("{k:?}"),
    };
    // What each upstream connection processed, by upstream's own count.
    let (first_ms, second_ms) = (first.audio_ms, second.audio_ms);
    let rows = usage_rows(&relay, "account", 2);
    let ms = |a: &str| (rows[a]["audio_seconds"].as_f64().unwrap() * 1000.0).round() as u64;
    let first_account = account_of(&first.key);
    let second_account = account_of(&second.key);
    let context = format!(
        "first connection {first_ms} ms on {first_account}, second {second_ms} ms on \
         {second_account}: {rows:?}"
    );
    // The first account carries what its connection reported processing
    // (its last result's total: the fake reports one per 100 ms frame,
    // and the frame it failed at got an error, no result), the second the
    // rest of the audio; the audio sent counts once.
    assert_eq!(ms(first_account), first_ms - 100, "{context}");
    assert_eq!(ms(first_account) + ms(second_account), 2000, "{context}");
    // The second account's connection processed the replay again: the
    // ledger is below its bill by less than what was replayed.
    assert!(ms(second_account) <= second_ms, "{context}");
    let streams: u64 = rows.values().map(|r| r["streams"].as_u64().unwrap()).sum();
    assert_eq!(streams, 1, "one stream: {context}");
    assert_eq!(rows[second_account]["streams"], 1, "{context}");
    let seconds = |a: &str| rows[a]["audio_seconds"].as_f64().unwrap();
    let price = |a: &str| if a == "a" { 3.6 } else { 36.0 };
    for a in [first_account, second_account] {
        let cost = rows[a]["cost"].as_f64().unwrap();
        let want = seconds(a) / 3600.0 * price(a);
        assert!((cost - want).abs() < 1e-9, "{a}: cost {cost}, want {want}");
    }
    let devices = usage_rows(&relay, "device", 1);
    assert_eq!(devices["dev"]["streams"], 1, "{devices:?}");
    assert_eq!(devices["dev"]["audio_seconds"], 2.0, "{devices:?}");
}
