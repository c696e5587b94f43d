//! The admin port: metrics, health, readiness and the remote config.

use std::time::Duration;

use serde_json::Value;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// The value of the first sample line of `metric` whose labels contain `labels`.
fn sample(body: &str, metric: &str, labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name_labels, value) = l.rsplit_once(' ')?;
        let name = name_labels.split('{').next()?;
        (name == metric && name_labels.contains(labels)).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_count_a_session() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (status, head, body) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("clio_relay_streams_total"), "{body}");
    let before = sample(
        &body,
        "clio_relay_frames_total",
        "direction=\"client_to_upstream\"",
    )
    .unwrap_or(0.0);
    assert_eq!(before, 0.0);

    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(relay.wait_idle(LIMIT));

    let (status, _, body) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert_eq!(status, 200);
    let frames = sample(
        &body,
        "clio_relay_frames_total",
        "direction=\"client_to_upstream\"",
    );
    assert!(
        frames.is_some_and(|n| n >= 11.0),
        "10 audio + end expected: {frames:?}\n{body}"
    );
    let count = sample(&body, "clio_relay_frame_forward_seconds_count", "");
    assert!(count.is_some_and(|n| n > 0.0), "{body}");
    let streams = sample(&body, "clio_relay_streams_total", "");
    assert!(streams.is_some_and(|n| n >= 1.0), "{body}");
}

#[test]
fn healthz_and_readyz() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    assert_eq!(http_get(relay.handle.admin_addr, "/healthz", "").0, 200);
    assert_eq!(http_get(relay.handle.admin_addr, "/readyz", "").0, 200);
}

#[test]
fn readyz_is_503_when_the_only_account_was_refused() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "wrong-key")]));
    assert_eq!(http_get(relay.handle.admin_addr, "/readyz", "").0, 200);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.error_code().is_some(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().any(|r| r.http_status == Some(401))));
    let (status, _, body) = http_get(relay.handle.admin_addr, "/readyz", "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        http_get(relay.handle.admin_addr, "/healthz", "").0,
        200,
        "health is not readiness"
    );
}

#[test]
fn remote_config_with_etag() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("acct-a", "key-a"), ("acct-b", "key-b")],
    ));
    let (status, head, body) = http_get(relay.handle.admin_addr, "/v1/config", "");
    assert_eq!(status, 200, "{head}");
    let doc: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(doc["sonioxAccounts"][0]["id"], "acct-a", "{doc}");
    assert_eq!(doc["sonioxAccounts"][1]["id"], "acct-b", "{doc}");
    let etag = header_of(&head, "etag").expect("an ETag");
    assert!(!etag.is_empty());

    let (status, head2, body2) = http_get(
        relay.handle.admin_addr,
        "/v1/config",
        &format!("If-None-Match: {etag}\r\n"),
    );
    assert_eq!(status, 304, "{head2}");
    assert!(body2.is_empty(), "{body2}");
    let (status, _, _) = http_get(
        relay.handle.admin_addr,
        "/v1/config",
        "If-None-Match: \"something-else\"\r\n",
    );
    assert_eq!(status, 200);
}
