//! A node cut off from Redis while it holds streams. Redis runs as a host
//! in a network namespace of its own, reached by node A over one veth link
//! and by node B (and the test) over another; taking A's link down cuts A
//! alone off Redis, while its clients and upstream (on loopback) stay.
//! A keeps its live streams, follows `on_store_down` for new ones, and
//! when the link comes back writes what it holds once: nothing counted
//! twice, nothing left behind. Needs root (`ip netns`), as CI runs.

use std::process::Command;
use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use clio_relay::core::secret::Secret;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{finish, open, try_stream, up};

/// A network namespace with two veth links to this one.
struct Net {
    ns: String,
    /// This side's end of each link.
    ends: [String; 2],
    /// The subnet number: link i is 10.(250 + i).n.0/30.
    n: u32,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn subnet_free(n: u32) -> bool {
    (0..2).all(|i| {
        let out = Command::new("ip")
            .args(["-4", "route", "show", &format!("10.{}.{n}.0/30", 250 + i)])
            .output()
            .expect("ip runs");
        out.stdout.is_empty()
    })
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let n = (0..250)
            .map(|k| (pid + k) % 250 + 1)
            .find(|&n| subnet_free(n))
            .expect("a free 10.250.n.0/30 subnet");
        let tag = format!("cf{}", pid % 100_000);
        let net = Net {
            ns: format!("clio-cutoff-{pid}"),
            ends: [format!("{tag}a0"), format!("{tag}b0")],
            n,
        };
        let _ = Command::new("ip").args(["netns", "del", &net.ns]).output();
        ip(&["netns", "add", &net.ns]);
        ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        for (i, end) in net.ends.iter().enumerate() {
            let peer = format!("{tag}{}1", ["a", "b"][i]);
            ip(&[
                "link", "add", end, "type", "veth", "peer", "name", &peer, "netns", &net.ns,
            ]);
            ip(&["addr", "add", &format!("{}/30", net.here(i)), "dev", end]);
            ip(&["link", "set", end, "up"]);
            let there = format!("{}/30", net.addr(i));
            ip(&["-n", &net.ns, "addr", "add", &there, "dev", &peer]);
            ip(&["-n", &net.ns, "link", "set", &peer, "up"]);
        }
        net
    }

    /// The namespace's address on link `i`.
    fn addr(&self, i: usize) -> String {
        format!("10.{}.{}.2", 250 + i, self.n)
    }

    /// This side's address on link `i`.
    fn here(&self, i: usize) -> String {
        format!("10.{}.{}.1", 250 + i, self.n)
    }

    /// Takes link `i` down or up.
    fn link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.ends[i], if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pairs with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        for end in &self.ends {
            let _ = Command::new("ip").args(["link", "del", end]).output();
        }
    }
}

#[test]
fn a_node_cut_off_from_redis_keeps_its_streams_and_rejoins_counting_once() {
    let net = Net::new();
    // Declared after the namespace: stopped before it is deleted.
    let redis = RedisServer::start_in_netns(&net.ns, &[&net.addr(0), &net.addr(1)], &net.addr(1));
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.admin.token = Some(Secret::new(crate::ADMIN));
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let mut on_a = crate::node(&cfg, &redis, "node-a");
    on_a.cluster.as_mut().unwrap().redis_url = format!("redis://{}:6379/0", net.addr(0));
    let a = Relay::start(on_a);
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    assert!(
        wait_until(Duration::from_secs(10), || up(&a)
            && up(&b)
            && a.handle.process.fleet.get().unwrap().nodes() == 2),
        "both nodes reach Redis over their own link"
    );
    let frames = audio_frames(8, 3);
    let mut live = open(&a, "phone");
    live.send(Message::binary(frames[0].clone())).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    assert_eq!(redis.count("node-a", "dev", "phone").as_deref(), Some("1"));

    net.link(0, false);
    assert!(
        wait_until(Duration::from_secs(10), || !up(&a)),
        "A sees Redis gone"
    );
    assert!(up(&b), "B keeps its link");
    // A's live stream goes on.
    for f in &frames[1..4] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    // New streams on A follow on_store_down = "local": A's share of the
    // device's limit (2 / 2 nodes) is 1, which the live stream holds.
    let got = try_stream(&a, "phone");
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1013)),
        "{got:?}"
    );
    // Another device is let in by the share, and stays live over the rejoin.
    let held = open(&a, "tablet");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    // A stream that starts and ends while A is cut off.
    assert!(try_stream(&a, "watch").finished());

    net.link(0, true);
    assert!(wait_until(Duration::from_secs(15), || up(&a)), "A rejoins");
    // A wrote what it holds, once: the stream from before the cut, the one
    // let in during it, and none for the stream that ended meanwhile.
    assert!(
        wait_until(Duration::from_secs(10), || {
            redis.count("node-a", "dev", "phone").as_deref() == Some("1")
                && redis.count("node-a", "dev", "tablet").as_deref() == Some("1")
                && redis.count("node-a", "acct", "a").as_deref() == Some("2")
        }),
        "A's counts after the rejoin: phone {:?}, tablet {:?}, account {:?}",
        redis.count("node-a", "dev", "phone"),
        redis.count("node-a", "dev", "tablet"),
        redis.count("node-a", "acct", "a")
    );
    assert_eq!(redis.count("node-a", "dev", "watch"), None);
    // Fleet-wide the phone has one stream (on A): B takes one more, then none.
    let second = open(&b, "phone");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    assert_eq!(try_stream(&b, "phone").error_code(), Some(429));
    // The usage of the stream that ran while A was cut off reaches the
    // fleet's totals, on B too.
    let watch_on_a = || {
        let (status, body) = http(
            b.handle.admin_addr,
            "GET",
            "/admin/usage?group_by=device",
            Some(crate::ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["nodes"]["node-a"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["key"] == "watch" && r["streams"] == 1)
    };
    assert!(wait_until(Duration::from_secs(10), watch_on_a));
    // Every stream ends normally; no count is left behind.
    for f in &frames[4..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    assert!(finish(live).finished(), "the stream from before the cut");
    assert!(finish(held).finished(), "the stream let in during the cut");
    assert!(finish(second).finished());
    assert!(wait_until(Duration::from_secs(10), || {
        redis.count("node-a", "dev", "phone").is_none()
            && redis.count("node-a", "dev", "tablet").is_none()
            && redis.count("node-b", "dev", "phone").is_none()
    }));
}
