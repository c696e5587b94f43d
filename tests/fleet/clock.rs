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

/// A TCP proxy in front of `redis` that holds each heartbeat's answer
/// (`HEARTBEAT`'s reply: four integers, the last Redis's clock in ms) for
/// `hold` before passing it on; every other byte goes through at once.
/// Returns its URL and a count of the answers it held.
fn holding_heartbeats(
    redis: &RedisServer,
    hold: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", listener.local_addr().unwrap());
    let held = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = held.clone();
    let port = redis.port;
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Both);
            });
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let reply = String::from_utf8_lossy(&buf[..n]);
                    let ints: Vec<&str> = reply.split("\r\n").collect();
                    // "*4", ":l", ":n", ":s", ":<ms>", "": one heartbeat answer.
                    let heartbeat = ints.len() == 6
                        && ints[0] == "*4"
                        && ints[1..5].iter().all(|i| {
                            i.strip_prefix(':')
                                .is_some_and(|d| d.parse::<i64>().is_ok())
                        })
                        && ints[4].len() == 14;
                    if heartbeat {
                        std::thread::sleep(hold);
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (url, held)
}

#[test]
fn a_slow_heartbeat_is_not_taken_for_a_clock_off_redis() {
    // Redis reads its clock as the heartbeat arrives; its answer takes
    // 4.6 s to come back (within cluster.timeout, 5 s). The node's clock
    // is Redis's (the host's): the round trip says nothing of how far
    // apart they are, and no offset may be reported from it.
    let redis = RedisServer::start();
    let (url, held) = holding_heartbeats(&redis, Duration::from_millis(4600));
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(clio_relay::core::secret::Secret::new(crate::MASTER));
    let mut c = crate::node(&cfg, &redis, "node-a");
    let k = c.cluster.as_mut().unwrap();
    k.redis_url = url;
    k.timeout = Duration::from_secs(5);
    k.lease_ttl = Duration::from_secs(30);
    let a = Relay::start(c);
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a)));
    assert!(
        wait_until(Duration::from_secs(30), || held
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1),
        "a heartbeat's answer went through the proxy"
    );
    // The proxy counts an answer just before it passes it on: the node
    // has read it well within this.
    std::thread::sleep(Duration::from_millis(500));
    let off = offset(a.handle.admin_addr).expect("the gauge is there");
    assert!(
        off.abs() < 1.0,
        "clock offset {off} s from a slow round trip"
    );
    let (_, m) = http(a.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        !m.contains("alert=\"cluster_clock_offset\""),
        "no clock alert: {}",
        m.lines()
            .filter(|l| l.contains("cluster_clock_offset"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
