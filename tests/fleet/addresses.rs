//! Redis's name: resolving to several addresses, one of which never
//! answers (an IPv6 route that is broken, a dead host still in DNS), the
//! cluster thread and each shard's link go past it within
//! `cluster.timeout`; not resolving for a while (a resolver outage), a
//! reconnect goes to the addresses it had.

use std::time::Duration;

use crate::process::Node;
use crate::redis::RedisServer;
use crate::util::*;

/// The value of `/metrics`' sample `series` on `admin`, 0 if absent.
fn sample(admin: std::net::SocketAddr, series: &str) -> u64 {
    let m = http(admin, "GET", "/metrics", None, None).1;
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A node of the fleet in `redis`, named `redis.test` in its
/// `/etc/hosts` (`hosts`, which must give `first` first), with a fake
/// upstream and the config its tokens are minted from; `None` (said on
/// stderr) where such a namespace cannot be made here.
fn node_resolving(
    redis: &RedisServer,
    hosts: &str,
    first: &str,
) -> Option<(
    Node,
    clio_relay::core::config::Config,
    fake_soniox::FakeSoniox,
)> {
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let url = format!("redis://redis.test:{}/0", redis.port);
    match Node::spawn_with_hosts(
        &fake.url(),
        &url,
        &cfg.tokens.secret,
        hosts,
        "redis.test",
        first,
    ) {
        Ok(node) => Some((node, cfg, fake)),
        Err(why) => {
            eprintln!("not checked: {why}");
            None
        }
    }
}

/// `redis.test` is `::1` first, where a listener whose one-place queue is
/// full drops every SYN (a black hole), then Redis's 127.0.0.1. With the
/// default `cluster.timeout` (250 ms), each connect used to give the
/// first address the whole deadline, so the cluster thread never reached
/// Redis (the store down for good, `clio_relay_cluster_store_up 0`), and a
/// shard's link began the second address only at the deadline.
#[test]
fn a_redis_address_that_never_answers_is_passed_by() {
    let redis = RedisServer::start();
    let hole = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    let hole_addr: std::net::SocketAddr = format!("[::1]:{}", redis.port).parse().unwrap();
    if let Err(e) = hole.bind(&hole_addr.into()) {
        eprintln!("not checked: no IPv6 loopback here ({e})");
        return;
    }
    hole.listen(0).unwrap();
    let _queued = std::net::TcpStream::connect(hole_addr).unwrap();
    let Some((node, cfg, _fake)) =
        node_resolving(&redis, "::1 redis.test\n127.0.0.1 redis.test\n", "::1")
    else {
        return;
    };
    assert!(
        wait_until(Duration::from_secs(10), || sample(
            node.admin,
            "clio_relay_cluster_store_up"
        ) == 1),
        "the store is up: {}",
        node.log()
    );
    assert!(redis.member("node-a").is_some(), "node-a holds a lease");
    let token = crate::process::mint(&cfg, "phone");
    let via = |v: &str| {
        sample(
            node.admin,
            &format!("clio_relay_cluster_open_calls_total{{via=\"{v}\"}}"),
        )
    };
    for i in 0..6 {
        let (mut ws, _) = connect(node.client, &token, Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
        assert!(
            got.finished() && got.error_code().is_none(),
            "session {i}: {got:?}"
        );
        if via("shard") > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        via("shard") > 0,
        "opens go on the shard's link: {} by the thread, {}",
        via("thread"),
        node.log()
    );
}

/// The resolver stops knowing Redis's name (gone from the namespace's
/// `/etc/hosts`, no DNS server to ask) while the node is connected; then
/// every connection to Redis is cut. The node reconnects to the address
/// it had and says once that the name did not resolve. Before, the
/// reconnect failed on the lookup (`cluster store call failed
/// call="connect"`, "failed to lookup address information") until the
/// resolver came back.
#[test]
fn redis_is_reached_again_through_a_resolver_outage() {
    let redis = RedisServer::start();
    let Some((node, cfg, _fake)) = node_resolving(&redis, "127.0.0.1 redis.test\n", "127.0.0.1")
    else {
        return;
    };
    let up = || sample(node.admin, "clio_relay_cluster_store_up") == 1;
    assert!(wait_until(Duration::from_secs(10), up), "{}", node.log());
    node.set_hosts("");
    let cut = redis.command("CLIENT KILL TYPE normal");
    assert!(cut.starts_with(':'), "{cut}");
    let said = |what: &str| node.log().contains(what);
    assert!(
        wait_until(Duration::from_secs(20), || said(
            "the cluster store's name did not resolve"
        ) && up()),
        "{}",
        node.log()
    );
    assert!(!said("call=\"connect\""), "{}", node.log());
    let token = crate::process::mint(&cfg, "phone");
    let (mut ws, _) = connect(node.client, &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
}
