//! Per-device limits and revocations, fleet-wide.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::ADMIN;

fn open(relay: &Relay, token: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws
}

fn refused(relay: &Relay, token: &str) -> Received {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &[])
}

fn pair(
    fake: &fake_soniox::FakeSoniox,
    redis: &RedisServer,
    limits: DeviceLimits,
) -> (Relay, Relay) {
    crate::pair(fake, redis, "k1", |c| c.devices.default = limits)
}

#[test]
fn a_device_stream_limit_is_exact_across_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = pair(
        &fake,
        &redis,
        DeviceLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        },
    );
    let token = a.token("phone");
    let first = open(&a, &token);
    let _second = open(&b, &token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    // The device has its two streams, one on each node: a third is refused
    // on either.
    for relay in [&a, &b, &a] {
        let got = refused(relay, &token);
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
    // Another device is not affected.
    assert!(refused(&b, &b.token("tablet")).error_code().is_none());
    // A stream that ends on A frees a place for B.
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    assert!(wait_until(Duration::from_secs(10), || {
        redis.count("node-a", "dev", "phone").is_none()
    }));
    let _third = open(&b, &token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    assert_eq!(refused(&a, &token).error_code(), Some(429));
}

#[test]
fn new_streams_per_minute_hold_across_nodes() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = pair(
        &fake,
        &redis,
        DeviceLimits {
            streams_per_minute: 3,
            ..Default::default()
        },
    );
    let token = a.token("phone");
    for relay in [&a, &b, &a] {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        assert!(stream_session(&mut ws, &config_message(None), &audio_frames(1, 1)).finished());
    }
    let got = refused(&b, &token);
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    assert!(got.messages[0]["error_message"]
        .as_str()
        .unwrap()
        .contains("3 new streams per minute"));
}

#[test]
fn a_revocation_on_one_node_refuses_and_ends_streams_on_another() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = pair(&fake, &redis, DeviceLimits::default());
    let token = a.token("lost-phone");
    let mut live = open(&b, &token);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    let (status, body) = http(
        a.handle.admin_addr,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-phone","end_live_streams":true}"#),
    );
    assert_eq!(status, 200, "{body}");
    // B ends the live stream and refuses new ones.
    let got = read_all(&mut live);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(401), Some(1008)),
        "{got:?}"
    );
    let got = refused(&b, &token);
    assert_eq!(got.error_code(), Some(401), "{got:?}");
    // B lists it too; lifting it on B frees the device on A.
    let (_, list) = http(
        b.handle.admin_addr,
        "GET",
        "/admin/revocations",
        Some(ADMIN),
        None,
    );
    assert!(list.contains("lost-phone"), "{list}");
    let (status, _) = http(
        b.handle.admin_addr,
        "DELETE",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-phone"}"#),
    );
    assert_eq!(status, 200);
    // A applies the lift at its next poll (every 200 ms).
    assert!(wait_until(Duration::from_secs(5), || refused(&a, &token)
        .error_code()
        .is_none()));
}
