//! Redis there but bad, behind a proxy (`proxy.rs`): calls that are not
//! answered while other connections are cut. What a node counts by its
//! own shares meanwhile comes out of the fleet's counts when it ends.

use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use clio_relay::core::secret::Secret;

use crate::process::Node;
use crate::proxy::Proxy;
use crate::redis::RedisServer;
use crate::util::*;
use crate::{finish, open, try_stream, up};

/// A stream let in by this node's shares while the cluster thread waits on
/// an unanswered call, and ended before the thread is back: its count and
/// its release reach the thread's tally in order, so the count the node
/// registers when Redis answers again does not keep it. (The count went
/// to the thread as a job, the release into the queue the thread takes
/// before a batch with an open: the release was taken first, of a count
/// the tally did not have, and lost; the count then stayed in the tally,
/// and in Redis at every registration, for as long as the node ran: one
/// stream fewer for the device, and for the account, fleet-wide.)
#[test]
fn a_stream_let_in_by_shares_while_the_thread_waits_leaves_no_count() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 2,
        ..Default::default()
    };
    let mut c = crate::node(&cfg, &redis, "node-a");
    let k = c.cluster.as_mut().unwrap();
    k.redis_url = proxy.url();
    // Long enough for the streams below while the thread waits.
    k.timeout = Duration::from_secs(4);
    let a = Relay::start(c);
    assert!(wait_until(Duration::from_secs(10), || up(&a)));
    let fleet = a.handle.process.fleet.get().unwrap();
    let via_link = || {
        fleet
            .stats
            .opens_link
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The shard's own connection is made at its first open.
    assert!(wait_until(Duration::from_secs(10), || {
        assert!(try_stream(&a, "warm-up").finished());
        via_link() > 0
    }));
    proxy.fault(true);
    assert!(
        wait_until(Duration::from_secs(5), || proxy.poll_held()),
        "the cluster thread waits on a call"
    );
    // The link is cut at this open: decided by this node's share, whole.
    let got = try_stream(&a, "phone");
    assert!(got.finished(), "{got:?}");
    assert!(wait_until(Duration::from_secs(5), || a
        .handle
        .process
        .live_streams()
        == 0));
    // An open through the thread, which is still waiting: it is answered
    // when the call times out, with what came meanwhile.
    let tablet = open(&a, "tablet");
    assert!(wait_until(Duration::from_secs(10), || !up(&a)));
    proxy.fault(false);
    assert!(wait_until(Duration::from_secs(15), || up(&a)));
    assert!(finish(tablet).finished());
    assert!(wait_until(Duration::from_secs(5), || a
        .handle
        .process
        .live_streams()
        == 0));
    assert!(
        wait_until(Duration::from_secs(5), || redis
            .count("node-a", "dev", "phone")
            .is_none_or(|n| n == "0")
            && redis.count("node-a", "acct", "a").is_none_or(|n| n == "0")),
        "no stream is live: phone {:?}, account {:?}",
        redis.count("node-a", "dev", "phone"),
        redis.count("node-a", "acct", "a")
    );
    // The device has both its places.
    let two = [open(&a, "phone"), open(&a, "phone")];
    for ws in two {
        let got = finish(ws);
        assert!(got.finished(), "{got:?}");
    }
}

/// An account change whose answer is lost after Redis took it: answered
/// 503 (whether Redis took it is not known), and when the store answers
/// again the node finds its own set there: the change is fleet-wide, said
/// so once, and not stored a second time. (The node took the new version
/// for another node's change: it logged a WARN that its change was not
/// shared and must be made again, which was false.)
#[test]
fn an_account_change_whose_answer_was_lost_is_found_fleet_wide() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(crate::ADMIN));
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    let a = node_up(&fake.url(), &proxy.url(), &cfg.tokens.secret, "");
    // The publish carries the sealed set (the script writes clio:accounts).
    proxy.lose_answer_to(b"CLIO-KEYSTORE");
    let (status, body) = http(
        a.admin,
        "POST",
        "/admin/accounts/a/limit",
        Some(crate::ADMIN),
        Some(r#"{"max_concurrent_streams":7}"#),
    );
    assert!(proxy.answer_lost());
    assert_eq!(status, 503, "{body}");
    assert!(
        wait_until(Duration::from_secs(10), || a.log().contains(
            "account changes made while the cluster store was unreachable are now fleet-wide"
        )),
        "{}",
        a.log()
    );
    assert!(!a.log().contains("make them again"), "{}", a.log());
    assert_eq!(
        redis.hget("clio:ver", "acct").as_deref(),
        Some("1"),
        "stored once"
    );
    // Another node gets the set as changed.
    let b = Relay::start(crate::node(&cfg, &redis, "node-b"));
    assert!(wait_until(Duration::from_secs(10), || b
        .handle
        .process
        .accounts()
        .first()
        .is_some_and(|a| a.fleet_max() == 7)));
}

/// A Redis that takes calls and does not answer them (paused here) is
/// logged as that: the call that failed, and no answer within
/// `cluster.timeout`; not the socket's "Resource temporarily
/// unavailable (os error 11)", which a read past its deadline gives.
#[test]
fn a_silent_redis_is_logged_as_no_answer_within_the_timeout() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let a = node_up(
        &fake.url(),
        &redis.url(),
        &cfg.tokens.secret,
        "timeout = \"400ms\"\n",
    );
    assert!(redis.command("CLIENT PAUSE 3000 ALL").starts_with("+OK"));
    assert!(
        wait_until(Duration::from_secs(5), || a
            .log()
            .contains("cluster store unreachable")),
        "{}",
        a.log()
    );
    let log = a.log();
    assert!(
        log.lines().any(|l| l.contains("cluster store call failed")
            && l.contains("no answer within cluster.timeout (400ms)")),
        "{log}"
    );
    assert!(!log.contains("os error 11"), "{log}");
}

/// A Redis whose answer trickles in a byte at a time, each byte in time
/// for a socket read's timeout, does not answer within `cluster.timeout`:
/// the call fails at its deadline, the node counts the store down (as
/// when Redis is unreachable, `on_store_down`) and connects again. (The
/// timeout applied to each read: `INFO memory`, about 1 KiB at 100 ms a
/// byte, held the cluster thread for nearly two minutes, no poll, no
/// heartbeat, no open through it, while the store was counted up.)
#[test]
fn a_redis_that_trickles_its_answer_is_down_at_the_timeout() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let a = node_up(
        &fake.url(),
        &proxy.url(),
        &cfg.tokens.secret,
        "timeout = \"400ms\"\n",
    );
    // Asked at every heartbeat (a third of the 15 s lease).
    proxy.trickle_answer_to(b"INFO", Duration::from_millis(100));
    assert!(wait_until(Duration::from_secs(15), || proxy.trickle_started()));
    assert!(
        wait_until(Duration::from_secs(5), || has_metric(
            &a,
            "clio_relay_cluster_store_up 0"
        )),
        "{}",
        a.log()
    );
    let log = a.log();
    assert!(
        log.lines().any(|l| l.contains("cluster store call failed")
            && l.contains("call=\"eviction check\"")
            && l.contains("no answer within cluster.timeout (400ms)")),
        "{log}"
    );
    // A new connection, answered as Redis answers: up again.
    assert!(wait_until(Duration::from_secs(10), || has_metric(
        &a,
        "clio_relay_cluster_store_up 1"
    )));
}

/// A shard's own connection that fails is logged with why, as the
/// thread's own calls are: here the connection cut at a stream open.
/// (The WARN named the call, "shard link", and nothing else.)
#[test]
fn a_shards_link_that_fails_is_logged_with_why() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let a = node_up(&fake.url(), &proxy.url(), &cfg.tokens.secret, "");
    let token = crate::process::mint(&cfg, "phone");
    let stream = || {
        let (mut ws, _) = connect(a.client, &token, Via::Header).unwrap();
        stream_session(&mut ws, &config_message(None), &audio_frames(1, 1))
    };
    let metric = |line: &str| has_metric(&a, line);
    // The shard's own connection is made at its first open.
    assert!(wait_until(Duration::from_secs(10), || {
        assert!(stream().finished());
        metric("clio_relay_cluster_open_calls_total{via=\"shard\"} 1")
    }));
    proxy.cut_links(true);
    let got = stream();
    assert!(got.finished(), "decided by this node's share: {got:?}");
    let failed = |log: &str| {
        log.lines()
            .find(|l| l.contains("cluster store call failed"))
            .map(str::to_string)
    };
    assert!(
        wait_until(Duration::from_secs(5), || failed(&a.log()).is_some()),
        "{}",
        a.log()
    );
    let line = failed(&a.log()).unwrap();
    assert!(
        line.contains("call=\"shard link\"") && line.contains("error=unexpected end of file"),
        "{line}"
    );
}

/// A relay process ("node-a", a lease of 15 s, `extra` in its
/// `[cluster]`) on `redis_url`, once it counts the store up.
fn node_up(upstream: &str, redis_url: &str, secret: &Secret, extra: &str) -> Node {
    let a = Node::spawn(upstream, redis_url, "node-a", "15s", secret, "k1", extra);
    assert!(wait_until(Duration::from_secs(10), || has_metric(
        &a,
        "clio_relay_cluster_store_up 1"
    )));
    a
}

/// Whether `node`'s /metrics has `line`.
fn has_metric(node: &Node, line: &str) -> bool {
    http(node.admin, "GET", "/metrics", None, None)
        .1
        .contains(line)
}
