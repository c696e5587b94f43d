//! The relay's own refusals are labelled as its own: a stream refused
//! because every account is at its configured limit is not upstream's 429.

use std::time::Duration;

use fake_soniox::FakeKey;
use tungstenite::Message;

use crate::util::*;

const ADMIN: &str = "refusals-admin-token-0123456789";

fn metrics(relay: &Relay) -> String {
    http(relay.handle.admin_addr, "GET", "/metrics", None, None).1
}

fn line<'a>(metrics: &'a str, series: &str) -> Option<&'a str> {
    metrics.lines().find(|l| l.starts_with(series))
}

/// Opens a stream and keeps it live (config and one audio frame sent).
fn hold(relay: &Relay, device: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1).remove(0)))
        .unwrap();
    ws
}

fn refused(relay: &Relay, device: &str) -> Received {
    let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &audio_frames(1, 1))
}

#[test]
fn every_account_at_its_limit_is_the_relays_refusal_not_upstreams() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let _held = hold(&relay, "one");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 1));
    let got = refused(&relay, "two");
    assert_error_frame(&got, 429, 1013);
    let m = metrics(&relay);
    assert_eq!(
        line(&m, "clio_relay_refusals_total{by=\"relay_limit\"}"),
        Some("clio_relay_refusals_total{by=\"relay_limit\"} 1"),
        "{m}"
    );
    assert_eq!(
        line(&m, "clio_relay_refusals_total{by=\"upstream\"}"),
        Some("clio_relay_refusals_total{by=\"upstream\"} 0")
    );
    assert!(
        line(
            &m,
            "clio_relay_errors_total{side=\"upstream\",code=\"429\"}"
        )
        .is_none(),
        "counted as upstream's 429: {m}"
    );
    assert!(line(
        &m,
        "clio_relay_errors_total{side=\"internal\",code=\"429\"}"
    )
    .is_some());
    assert_eq!(fake.sessions().len(), 1, "upstream was never asked");
}

#[test]
fn upstreams_refusal_and_a_device_limit_are_labelled_as_theirs() {
    // Upstream takes one stream on the key; the relay would take ten.
    let fake = fake(&[], |c| c.keys = vec![FakeKey::new("k1", 1)]);
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.devices.default.max_concurrent_streams = 1;
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let _held = hold(&relay, "one");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 1));
    assert_error_frame(&refused(&relay, "two"), 429, 1013);
    assert_error_frame(&refused(&relay, "one"), 429, 1013);
    let m = metrics(&relay);
    for (by, n) in [("upstream", 1), ("device_limit", 1), ("relay_limit", 0)] {
        let series = format!("clio_relay_refusals_total{{by=\"{by}\"}}");
        assert_eq!(
            line(&m, &series),
            Some(format!("{series} {n}").as_str()),
            "{m}"
        );
    }
    // The admin API, and so the dashboard, shows the same.
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/stats",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["refusals"]["upstream"].as_u64(),
            v["refusals"]["device_limit"].as_u64(),
            v["refusals"]["relay_limit"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{v}"
    );
}
