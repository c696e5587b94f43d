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

/// How a probed stream ends after its paced frames.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// The client's TCP connection goes, with no close frame.
    Vanishes,
    /// The client goes quiet; `limits.idle_timeout` (1 s) ends it.
    Idle,
    /// The relay drains.
    Drain,
    /// The device is revoked with `end_live_streams`.
    Revoked,
    /// Upstream ends it with a 400 at the frame after the paced ones (not
    /// a failure a resume hides).
    UpstreamError,
    /// The device's daily allowance (1 s) ends it.
    Allowance,
    /// The client ends its audio and upstream says `finished`.
    Finished,
}

/// A config message for `format` (a raw one at 16 kHz mono, or a
/// compressed one, which the fake counts at 16,000 bytes a second).
fn config_for(format: &str) -> String {
    let mut v: Value = serde_json::from_str(&config_message(None)).unwrap();
    v["audio_format"] = format.into();
    if format != "pcm_s16le" {
        v.as_object_mut().unwrap().remove("sample_rate");
        v.as_object_mut().unwrap().remove("num_channels");
    }
    v.to_string()
}

/// One stream of `format` that sends `paced` frames of 3,200 bytes, each
/// answered before the next goes, then ends as `ending` says. Returns
/// (the ledger's audio ms for the device, its streams, what fake-soniox
/// counted on the stream's connection).
fn probe(format: &str, paced: usize, ending: Ending) -> (u64, u64, u64) {
    let fake = fake(&["k1"], |c| {
        // A result for every frame: each is answered before the next goes.
        c.ms_per_word = 100;
        if ending == Ending::UpstreamError {
            c.faults.error_after_frames = Some((paced as u64 + 1, 400));
        }
    });
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    if ending == Ending::Idle {
        cfg.limits.idle_timeout = Duration::from_secs(1);
    }
    if ending == Ending::Allowance {
        cfg.devices.default.audio_seconds_per_day = 1;
    }
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(tungstenite::Message::text(config_for(format)))
        .unwrap();
    let frames = audio_frames(paced + 1, 5);
    for f in &frames[..paced] {
        ws.send(tungstenite::Message::binary(f.clone())).unwrap();
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => assert!(!t.contains("error_code"), "{format}: {t}"),
            other => panic!("{format}: {other:?}"),
        }
    }
    match ending {
        Ending::Vanishes => drop(ws),
        Ending::Idle => {
            read_all(&mut ws);
        }
        Ending::Drain => {
            assert_eq!(relay.handle.drain(Duration::from_secs(2)), 1);
            read_all(&mut ws);
        }
        Ending::Revoked => {
            let (status, body) = http(
                relay.handle.admin_addr,
                "POST",
                "/admin/revocations",
                Some(ADMIN),
                Some(r#"{"device_id":"dev","end_live_streams":true}"#),
            );
            assert_eq!(status, 200, "{body}");
            let got = read_all(&mut ws);
            assert_eq!(got.error_code(), Some(401), "{got:?}");
        }
        Ending::Allowance => {
            // On, paced, until the relay ends the stream.
            let mut ended = false;
            for f in audio_frames(30, 6) {
                if ws.send(tungstenite::Message::binary(f)).is_err() {
                    ended = true;
                    break;
                }
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) if !t.contains("error_code") => {}
                    _ => {
                        ended = true;
                        break;
                    }
                }
            }
            assert!(ended, "{format}: the allowance never ended the stream");
            read_all(&mut ws);
        }
        Ending::UpstreamError => {
            let _ = ws.send(tungstenite::Message::binary(frames[paced].clone()));
            let got = read_all(&mut ws);
            assert!(got.error_code().is_some(), "{got:?}");
        }
        Ending::Finished => {
            ws.send(tungstenite::Message::binary(Vec::<u8>::new()))
                .unwrap();
            let got = read_all(&mut ws);
            assert!(got.finished(), "{got:?}");
        }
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert!(relay.wait_idle(LIMIT));
    let rows = usage_rows(&relay, "device", 1);
    let row = &rows["dev"];
    let ms = (row["audio_seconds"].as_f64().unwrap() * 1000.0).round() as u64;
    let accounts = usage_rows(&relay, "account", 1);
    assert_eq!(accounts["a"]["audio_seconds"], row["audio_seconds"]);
    (
        ms,
        row["streams"].as_u64().unwrap(),
        fake.sessions()[0].audio_ms,
    )
}

/// Each ending, for a raw and a compressed stream: the ledger has the
/// audio fake-soniox processed, and one stream.
fn probe_both(ending: Ending) {
    for (format, frame_ms) in [("pcm_s16le", 100), ("ogg", 200)] {
        let (ledger, streams, fake_ms) = probe(format, 8, ending);
        // A compressed stream is counted by upstream's figure: an error
        // carries none (the frame it answered is not counted), and a stream
        // the allowance ends is ended at the frame that passes it, before
        // upstream reports on that frame.
        let lost = if format == "ogg" && matches!(ending, Ending::UpstreamError | Ending::Allowance)
        {
            frame_ms
        } else {
            0
        };
        assert_eq!(
            (ledger, streams),
            (fake_ms - lost, 1),
            "{format} {ending:?}: ledger {ledger} ms, fake-soniox {fake_ms} ms"
        );
        assert!(fake_ms >= 8 * frame_ms, "{format} {ending:?}: {fake_ms}");
    }
}

#[test]
fn a_stream_that_finishes_is_billed_what_upstream_processed() {
    probe_both(Ending::Finished);
}

#[test]
fn a_client_that_vanishes_is_billed_what_upstream_processed() {
    probe_both(Ending::Vanishes);
}

#[test]
fn an_idle_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Idle);
}

#[test]
fn a_drained_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Drain);
}

#[test]
fn a_revoked_stream_is_billed_what_upstream_processed() {
    probe_both(Ending::Revoked);
}

#[test]
fn an_upstream_error_is_billed_what_upstream_processed() {
    probe_both(Ending::UpstreamError);
}

#[test]
fn a_stream_past_its_allowance_is_billed_what_upstream_processed() {
    probe_both(Ending::Allowance);
}

#[test]
fn cost_is_the_audio_hours_times_the_price_rounded_once() {
    // 1.5 s at 36 an hour is 0.015 exactly: the figure an operator reads
    // in /admin/usage, by pool, and in /metrics is that, not a value a
    // rounding off it (0.015000000000000001).
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].price_per_hour = 36.0;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(15, 1));
    assert!(got.finished(), "{got:?}");
    let rows = usage_rows(&relay, "account", 1);
    assert_eq!(rows["a"]["audio_seconds"], 1.5, "{rows:?}");
    assert_eq!(rows["a"]["cost"], 0.015, "{rows:?}");
    let pools = usage_rows(&relay, "pool", 1);
    let pool = pools.values().next().unwrap();
    assert_eq!(pool["cost"], 0.015, "{pools:?}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("clio_relay_cost_month{account=\"a\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.ends_with(" 0.015"), "{line}");
}
