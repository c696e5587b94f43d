//! The admin port: metrics, health, readiness and the remote config.

use std::time::Duration;

use serde_json::Value;
use tungstenite::Message;

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

/// The sum over shards of `metric`'s samples whose labels contain `labels`.
fn shard_sum(body: &str, metric: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Open streams that are not moving data hold no read buffers: a buffer is
/// lent to a stream only while bytes are in it, and the gauge says so.
#[test]
fn idle_streams_hold_no_read_buffers() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let frames = audio_frames(3, 7);
    let mut streams: Vec<Ws> = (0..8)
        .map(|i| {
            let (mut ws, _) =
                connect(relay.addr(), &relay.token(&format!("dev-{i}")), Via::Header).unwrap();
            ws.send(Message::text(config_message(None))).unwrap();
            for f in &frames {
                ws.send(Message::binary(f.clone())).unwrap();
            }
            ws
        })
        .collect();
    let mut last = (0.0, 0.0, 0.0);
    let settled = wait_until(LIMIT, || {
        let (_, _, body) = http_get(relay.handle.admin_addr, "/metrics", "");
        last = (
            shard_sum(&body, "clio_relay_streams_active", ""),
            shard_sum(&body, "clio_relay_read_buffers", "state=\"in_use\""),
            shard_sum(&body, "clio_relay_read_buffers", "state=\"free\""),
        );
        last.0 == 8.0 && last.1 == 0.0
    });
    assert!(settled, "(active, in use, free) = {last:?}");
    assert!(last.2 > 0.0, "the pool keeps its free buffers: {last:?}");
    // Every stream carries on once it has data again.
    for ws in &mut streams {
        for f in &frames {
            ws.send(Message::binary(f.clone())).unwrap();
        }
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    }
    for ws in &mut streams {
        assert!(read_all(ws).finished());
    }
}
