//! A node whose clock is a day off (run under Debian's libfaketime, which
//! shifts only that process's clock; the host's is never changed). What
//! the fleet shares by time goes by Redis's clock; what the node decides
//! by its own (token times, the day of its usage and daily audio) it
//! cannot know is wrong, so it measures the difference and says so.

use std::time::Duration;

use crate::process::Node;
use crate::redis::RedisServer;
use crate::util::*;

/// Debian's `faketime` package's preload library (.ci/run installs it).
fn libfaketime() -> &'static str {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libfaketime is not installed: apt-get install faketime (.ci/run does)")
}

fn offset(admin: std::net::SocketAddr) -> Option<f64> {
    let (_, m) = http(admin, "GET", "/metrics", None, None);
    m.lines().find_map(|l| {
        l.strip_prefix("clio_relay_cluster_clock_offset_seconds ")?
            .parse()
            .ok()
    })
}

#[test]
fn a_node_whose_clock_is_a_day_ahead_says_how_far() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    let mut c = crate::node(&cfg, &redis, "node-a");
    c.cluster.as_mut().unwrap().lease_ttl = Duration::from_secs(3);
    let a = Relay::start(c);
    let ahead = Node::try_spawn_with(
        &fake.url(),
        &redis.url(),
        "node-b",
        "3s",
        &cfg.tokens.secret,
        "k1",
        "[alerts]\ninterval = \"200ms\"\n",
        &[
            ("LD_PRELOAD", libfaketime()),
            ("FAKETIME", "+1d"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .unwrap_or_else(|(code, err)| panic!("exited {code:?}: {err}"));
    assert!(
        wait_until(Duration::from_secs(10), || offset(ahead.admin)
            .is_some_and(|s| (s - 86_400.0).abs() < 5.0)),
        "the shifted node shows its offset: {:?}",
        offset(ahead.admin)
    );
    // And the in-process alert (a webhook's, too) fires for it.
    assert!(
        wait_until(Duration::from_secs(10), || http(
            ahead.admin,
            "GET",
            "/metrics",
            None,
            None
        )
        .1
        .contains(
            "clio_relay_alerts_firing{alert=\"cluster_clock_offset\",subject=\"node-b\"} 1"
        )),
        "the clock alert fires on the shifted node"
    );
    assert!(
        wait_until(Duration::from_secs(10), || crate::up(&a)
            && offset(a.handle.admin_addr).is_some_and(|s| s.abs() < 2.0)),
        "a node on the host's clock shows none: {:?}",
        offset(a.handle.admin_addr)
    );
    // Its lease goes by Redis's clock: it ends within lease_ttl, not a
    // day later.
    let end = redis.lease_end("node-b").expect("node-b holds a lease");
    let now = redis.time_ms();
    assert!(
        end > now && end <= now + 3_000,
        "lease end {end}, now {now}"
    );
}
