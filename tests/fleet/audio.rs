//! A device's daily audio allowance across nodes: audio streamed on one
//! node counts on the others from their next stream open on.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;

use crate::redis::RedisServer;
use crate::util::*;

/// Audio ms Redis holds for `device` today (`clio:audio:<UTC day
/// number>`, by the nodes' clock).
fn audio_ms(redis: &RedisServer, device: &str) -> u64 {
    let day = clio_relay::core::devices::utc_day(std::time::SystemTime::now());
    redis
        .hget(&format!("clio:audio:{day}"), device)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn audio_streamed_on_one_node_counts_at_the_next_open_on_another() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        c.devices.default = DeviceLimits {
            audio_seconds_per_day: 3,
            ..Default::default()
        };
    });
    // 2.5 s on A, ended normally: within the allowance.
    let token = a.token("phone");
    let (mut ws, _) = connect(a.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(25, 1));
    assert!(got.finished(), "{got:?}");
    // Redis has it (the relay's meter rounds down: 2,499 ms).
    assert!(wait_until(Duration::from_secs(10), || audio_ms(
        &redis, "phone"
    ) >= 2_400));
    // On B the device has 0.5 s left: a client sending 3 s at once is
    // ended at B's first whole second of audio (README: "the stream that
    // passes it is ended at the next such check"), not after B's own
    // 3 s.
    let (mut ws, _) = connect(b.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(30, 2));
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    assert!(
        got.messages.iter().any(|m| m["error_message"]
            .as_str()
            .is_some_and(|t| t.contains("daily audio allowance"))),
        "{got:?}"
    );
    let on_b = fake.sessions().last().unwrap().audio_bytes;
    assert!(
        on_b <= 32_000 + 3_200,
        "B relayed {on_b} bytes (~{} ms) with 500 ms of the allowance left",
        on_b / 32
    );
}
