//! Each shard's own connection to Redis for stream opens: used once the
//! store is up, counting exactly like the cluster thread, and a link whose
//! answer is lost leaves no count behind.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{finish, open, up};

const LIMIT: Duration = Duration::from_secs(10);

/// A whole session; returns once the relay has ended it too.
fn session(relay: &Relay, device: &str) -> Received {
    let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 0));
    got
}

/// The value of the `/metrics` sample `series`.
fn sample(relay: &Relay, series: &str) -> u64 {
    let m = http(relay.handle.admin_addr, "GET", "/metrics", None, None).1;
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {m}"))
}

fn one_stream_each() -> impl FnOnce(&mut clio_relay::core::config::Config) {
    |c| {
        c.devices.default = DeviceLimits {
            max_concurrent_streams: 1,
            ..Default::default()
        }
    }
}

#[test]
fn stream_opens_go_on_the_shards_own_connection_and_count_exactly() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", one_stream_each());
    // One stream at a time for the device: each open finds the last one's
    // end counted, whichever way it went to Redis.
    for i in 0..8 {
        let got = session(&a, "phone");
        assert!(
            got.finished() && got.error_code().is_none(),
            "session {i}: {got:?}"
        );
    }
    let via = |r: &Relay, v: &str| {
        sample(
            r,
            &format!("clio_relay_cluster_open_calls_total{{via=\"{v}\"}}"),
        )
    };
    assert!(
        via(&a, "shard") >= 4,
        "opens on the shards' links: {}",
        via(&a, "shard")
    );
    assert_eq!(via(&a, "shard") + via(&a, "thread"), 8);
    // A live stream counts once, on its node, and its end leaves nothing.
    let live = open(&a, "phone");
    assert!(wait_until(LIMIT, || fake.active_streams() == 1));
    assert_eq!(redis.count("node-a", "dev", "phone").as_deref(), Some("1"));
    assert_eq!(redis.count("node-a", "acct", "a").as_deref(), Some("1"));
    let got = session(&b, "phone");
    assert_eq!(got.error_code(), Some(429), "{got:?}");
    assert!(finish(live).finished());
    assert!(wait_until(LIMIT, || redis
        .count("node-a", "dev", "phone")
        .is_none()
        && redis.count("node-a", "acct", "a").is_none()));
    assert!(session(&b, "phone").finished());
}

#[test]
fn an_open_whose_answer_is_late_is_not_counted_twice() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, _b) = crate::pair(&fake, &redis, "k1", one_stream_each());
    for _ in 0..4 {
        assert!(session(&a, "warm-up").finished());
    }
    let links = sample(&a, "clio_relay_cluster_open_calls_total{via=\"shard\"}");
    assert!(links > 0, "the shards' links are open");
    // Redis holds every script call for two seconds, well past the 500 ms
    // deadline: the open is answered late, after the relay gave up on it
    // and let the stream in by its local share.
    assert!(redis.command("CLIENT PAUSE 2000 WRITE").starts_with("+OK"));
    let live = open(&a, "phone");
    assert!(wait_until(LIMIT, || fake.active_streams() == 1));
    assert!(wait_until(LIMIT, || !up(&a)));
    // Redis runs the held open when the pause ends, and the node's
    // registration afterwards replaces it with what the node holds: one.
    assert!(wait_until(Duration::from_secs(15), || up(&a)));
    assert_eq!(redis.count("node-a", "dev", "phone").as_deref(), Some("1"));
    assert_eq!(redis.count("node-a", "acct", "a").as_deref(), Some("1"));
    assert!(finish(live).finished());
    assert!(wait_until(LIMIT, || redis
        .count("node-a", "dev", "phone")
        .is_none()
        && redis.count("node-a", "acct", "a").is_none()));
    // And the links carry opens again.
    for _ in 0..4 {
        assert!(session(&a, "phone").finished());
    }
    assert!(sample(&a, "clio_relay_cluster_open_calls_total{via=\"shard\"}") > links);
}
