//! Redis's name: resolving to several addresses, one of which never
//! answers (an IPv6 route that is broken, a dead host still in DNS), the
//! cluster thread and each shard's link go past it within
//! `cluster.timeout`; not resolving for a while (a resolver outage), or
//! resolving only after minutes (a DNS server that never answers), a
//! reconnect goes to the addresses it had within `cluster.timeout`.

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

/// A DNS server that never answers: a UDP socket that takes the queries
/// and drops them, on port 53 (the only port `/etc/resolv.conf` can name)
/// of a loopback address no other test uses (127.53.x.y, the first free
/// from one picked by the process id). `None` (said on stderr) where none
/// can be bound.
fn silent_dns() -> Option<std::net::UdpSocket> {
    let seed = std::process::id();
    for i in 0..256 {
        let n = seed.wrapping_add(i * 257);
        let ip = std::net::Ipv4Addr::new(127, 53, (n >> 8) as u8, n as u8 | 1);
        match std::net::UdpSocket::bind((ip, 53)) {
            Ok(s) => return Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => {
                eprintln!("not checked: no DNS port to hold here ({e})");
                return None;
            }
        }
    }
    eprintln!("not checked: every DNS address tried is in use");
    None
}

/// The resolver becomes slow, not failing, while the node is connected:
/// Redis's name leaves the namespace's `/etc/hosts`, and the one DNS
/// server its `/etc/resolv.conf` names takes the queries and never
/// answers (30 s an attempt, 5 attempts, so `getaddrinfo` waits minutes).
/// Then every connection to Redis is cut. The reconnect waits for the
/// lookup only part of `cluster.timeout` (250 ms), goes to the address
/// it had, and says once that the name was slow to resolve: the node is
/// back on Redis (store up, a stream open decided by the store) well
/// before the lookup could end. Before, the cluster thread waited the
/// lookup out, the store down and every job queued behind it meanwhile.
/// A node of the fleet in `redis`, which it finds as `redis.test`, in a
/// namespace whose `/etc/hosts` is `hosts` (where `probe.test` must be
/// 127.0.0.1) and whose one DNS server is `dns`, asked `attempts` times
/// for 30 s each; with a fake upstream and the config its tokens are
/// minted from. `None` (said on stderr) where such a namespace cannot be
/// made here.
fn node_with_dns(
    redis: &RedisServer,
    dns: &std::net::UdpSocket,
    hosts: &str,
    attempts: u32,
) -> Option<(
    Node,
    clio_relay::core::config::Config,
    fake_soniox::FakeSoniox,
)> {
    let resolv_conf = format!(
        "nameserver {}\noptions timeout:30 attempts:{attempts}\n",
        dns.local_addr().unwrap().ip()
    );
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let url = format!("redis://redis.test:{}/0", redis.port);
    match Node::spawn_with_resolver(
        &fake.url(),
        &url,
        &cfg.tokens.secret,
        hosts,
        &resolv_conf,
        "probe.test",
        "127.0.0.1",
        "",
        "",
    ) {
        Ok(node) => Some((node, cfg, fake)),
        Err(why) => {
            eprintln!("not checked: {why}");
            None
        }
    }
}

#[test]
fn redis_is_reached_again_while_the_resolver_hangs() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let hosts = "127.0.0.1 redis.test probe.test\n";
    let Some((node, cfg, _fake)) = node_with_dns(&redis, &dns, hosts, 5) else {
        return;
    };
    let up = || sample(node.admin, "clio_relay_cluster_store_up") == 1;
    assert!(wait_until(Duration::from_secs(10), up), "{}", node.log());
    node.set_hosts("127.0.0.1 probe.test\n");
    let cut = redis.command("CLIENT KILL TYPE normal");
    assert!(cut.starts_with(':'), "{cut}");
    let said = |what: &str| node.log().matches(what).count();
    // The lookup waits 150 s; the node is back on Redis within a second
    // and a timeout or so of seeing the cut.
    assert!(
        wait_until(Duration::from_secs(10), || said(
            "the cluster store's name was slow to resolve"
        ) == 1
            && up()),
        "{}",
        node.log()
    );
    let by_store = || {
        sample(
            node.admin,
            "clio_relay_cluster_stream_opens_total{decided_by=\"store\"}",
        )
    };
    let before = by_store();
    let token = crate::process::mint(&cfg, "phone");
    let (mut ws, _) = connect(node.client, &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert_eq!(by_store(), before + 1, "{}", node.log());
    // Cut again: the lookup still running, the reconnect does not start
    // another, nor say it again.
    let cut = redis.command("CLIENT KILL TYPE normal");
    assert!(cut.starts_with(':'), "{cut}");
    assert!(
        wait_until(Duration::from_secs(10), || sample(
            node.admin,
            "clio_relay_cluster_registrations_total"
        ) >= 3
            && up()),
        "{}",
        node.log()
    );
    assert_eq!(
        said("the cluster store's name was slow to resolve"),
        1,
        "{}",
        node.log()
    );
    assert_eq!(said("call=\"connect\""), 0, "{}", node.log());
    drop(dns);
}

/// The resolver hangs from the start (Redis's name only in DNS, whose
/// one server never answers, for 30 s): no address is known. The node
/// still starts at once (its check that no running relay has its
/// `node_id` gives the lookup `cluster.timeout`, then finds no Redis to
/// ask), and each reconnect reports the store down within
/// `cluster.timeout`, said once, with one lookup running, not one more
/// per reconnect. Before, the start waited the lookup out and then so
/// did the cluster thread's first connect, the thread held all along.
#[test]
fn the_store_is_reported_down_in_time_while_the_resolver_hangs() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let Some((node, _cfg, _fake)) = node_with_dns(&redis, &dns, "127.0.0.1 probe.test\n", 1) else {
        return;
    };
    let failed = || {
        sample(
            node.admin,
            "clio_relay_cluster_calls_total{result=\"failed\"}",
        )
    };
    // A reconnect a second or so after the last fails: three within the
    // 30 s the lookup takes.
    assert!(
        wait_until(Duration::from_secs(10), || failed() >= 3),
        "{} failed calls: {}",
        failed(),
        node.log()
    );
    assert_eq!(
        sample(node.admin, "clio_relay_cluster_store_up"),
        0,
        "{}",
        node.log()
    );
    // The start's lookup and the cluster thread's, both still waiting.
    assert!(
        (1..=2).contains(&node.threads_named("clio-resolve")),
        "{} lookups",
        node.threads_named("clio-resolve")
    );
    let log = node.log();
    let slow = "the cluster store's name was slow to resolve (no answer within cluster.timeout); no address known yet";
    assert_eq!(log.matches(slow).count(), 1, "{log}");
    assert!(
        log.contains(
            "the resolver gave no answer for the cluster store's name within cluster.timeout"
        ),
        "{log}"
    );
    drop(dns);
}

/// Whether a stream opened on `node` now, on a token of `cfg`, is
/// transcribed to its end.
fn streams(node: &Node, cfg: &clio_relay::core::config::Config) -> bool {
    let token = crate::process::mint(cfg, "phone");
    match connect(node.client, &token, Via::Header) {
        Ok((mut ws, _)) => {
            let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
            got.finished() && got.error_code().is_none()
        }
        Err(_) => false,
    }
}

/// Upstream's name only in DNS, whose one server never answers (8 s, one
/// attempt): the relay has never resolved it when streams come. Each
/// open gives the resolver `upstream.connect_timeout` (5 s) and is
/// refused, the log naming the resolver; one lookup serves all the opens
/// waiting, nothing is held against the account, and the pool's other
/// account (the same URL) is not tried. Once the name resolves (here:
/// put in the namespace's `/etc/hosts`) streams go through as soon as
/// the lookup under way has ended. Before, the opens counted as the
/// accounts' connect timeouts ("the account is held off": every shard
/// left it out for a while after the name resolved), each open waited
/// the timeout once per account, and each queued a lookup of its own
/// behind the one that hung.
#[test]
fn a_resolver_that_does_not_answer_is_not_held_against_the_account() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let upstream = format!(
        "ws://soniox.test:{}/transcribe-websocket",
        fake.addr().port()
    );
    let resolv_conf = format!(
        "nameserver {}\noptions timeout:8 attempts:1\n",
        dns.local_addr().unwrap().ip()
    );
    let node = match Node::spawn_with_resolver(
        &upstream,
        &format!("redis://127.0.0.1:{}/0", redis.port),
        &cfg.tokens.secret,
        "127.0.0.1 probe.test\n",
        &resolv_conf,
        "probe.test",
        "127.0.0.1",
        // One round of tries per open (no wait and second round), and a
        // second account of the same pool, so the same URL.
        "[failover]\nmax_resumes = 0\n\
         [[account]]\nid = \"b\"\nkey_file = \"key\"\nmax_concurrent_streams = 50\n",
        "",
    ) {
        Ok(node) => node,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    let opened: Vec<bool> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..3).map(|_| s.spawn(|| streams(&node, &cfg))).collect();
        opens.into_iter().map(|o| o.join().unwrap()).collect()
    });
    assert_eq!(opened, [false, false, false], "{}", node.log());
    // Each refused open tried one account of the two, once.
    let tries = |account: &str| {
        sample(
            node.admin,
            &format!("clio_relay_account_errors_total{{account=\"{account}\",code=\"502\"}}"),
        )
    };
    assert_eq!(tries("a") + tries("b"), 3, "{}", node.log());
    node.set_hosts("127.0.0.1 probe.test soniox.test\n");
    // The lookup under way ends 8 s after the first open; the next open
    // asks again and finds the name.
    assert!(
        wait_until(Duration::from_secs(15), || streams(&node, &cfg)),
        "{}",
        node.log()
    );
    let log = node.log();
    assert!(
        log.contains("why=no answer for soniox.test within upstream.connect_timeout"),
        "{log}"
    );
    assert!(!log.contains("the account is held off"), "{log}");
    drop(dns);
}

/// Whether a stream opened on `node` now, on a token of `cfg` for the
/// accounts of `pool`, is transcribed to its end.
fn streams_in(node: &Node, cfg: &clio_relay::core::config::Config, pool: &str) -> bool {
    let token = clio_relay::core::token::TokenKeys::from_config(&cfg.tokens)
        .mint_in(
            "phone",
            None,
            &[pool.to_string()],
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    match connect(node.client, &token, Via::Header) {
        Ok((mut ws, _)) => {
            let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
            got.finished() && got.error_code().is_none()
        }
        Err(_) => false,
    }
}

/// Two pools on one shard: the default pool's upstream name only in DNS,
/// whose one server never answers (30 s, one attempt), the `eu` pool's
/// in `/etc/hosts`. A stream of the default pool is refused after
/// `upstream.connect_timeout`, its lookup still running; a stream of the
/// `eu` pool opened then goes through, its name looked up beside the one
/// that hangs. Before, both lookups ran on the shard's blocking pool (one
/// thread): the `eu` name's queued behind the hung one, and its stream
/// was refused as unresolved too, for as long as the lookup hung.
#[test]
fn a_name_that_hangs_holds_up_no_other_pools_name() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let port = fake.addr().port();
    let resolv_conf = format!(
        "nameserver {}\noptions timeout:30 attempts:1\n",
        dns.local_addr().unwrap().ip()
    );
    let node = match Node::spawn_with_resolver(
        &format!("ws://hang.test:{port}/transcribe-websocket"),
        &format!("redis://127.0.0.1:{}/0", redis.port),
        &cfg.tokens.secret,
        "127.0.0.1 probe.test soniox.test\n",
        &resolv_conf,
        "probe.test",
        "127.0.0.1",
        &format!(
            "[failover]\nmax_resumes = 0\n\
             [pool.eu]\nurl = \"ws://soniox.test:{port}/transcribe-websocket\"\n\
             [[account]]\nid = \"b\"\nkey_file = \"key\"\npool = \"eu\"\nmax_concurrent_streams = 50\n"
        ),
        "",
    ) {
        Ok(node) => node,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    assert!(!streams_in(&node, &cfg, "default"), "{}", node.log());
    assert!(
        node.log()
            .contains("why=no answer for hang.test within upstream.connect_timeout"),
        "{}",
        node.log()
    );
    assert!(streams_in(&node, &cfg, "eu"), "{}", node.log());
    drop(dns);
}

/// The REST API's name (upstream's, `soniox.test`, from which the health
/// checks' base is derived) leaves the namespace's `/etc/hosts` while the
/// node checks its key every second, and the one DNS server takes the
/// queries and never answers (30 s an attempt, 5 attempts). The checks go
/// on to the address kept, through the refresh that asks the resolver
/// again after 30 s and hangs; one lookup runs (one `clio-resolve`
/// thread), not one per check; and the admin thread's blocking pool,
/// where the fleet's usage is read from Redis, stays free: `/admin/usage`
/// answers with the fleet's. Before, each check's lookup ran on that pool
/// (one thread), queued behind the one that hung: no check reached the
/// REST API once the name had left `/etc/hosts`, and `/admin/usage` waited
/// behind them.
#[test]
fn health_checks_go_on_to_the_kept_address_while_the_resolver_hangs() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let upstream = format!(
        "ws://soniox.test:{}/transcribe-websocket",
        fake.addr().port()
    );
    let resolv_conf = format!(
        "nameserver {}\noptions timeout:30 attempts:5\n",
        dns.local_addr().unwrap().ip()
    );
    let node = match Node::spawn_with_resolver(
        &upstream,
        &format!("redis://127.0.0.1:{}/0", redis.port),
        &cfg.tokens.secret,
        "127.0.0.1 probe.test soniox.test\n",
        &resolv_conf,
        "probe.test",
        "127.0.0.1",
        "",
        "health_interval = \"1s\"\n",
    ) {
        Ok(node) => node,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    let checks = || {
        fake.rest_calls()
            .iter()
            .filter(|c| c.path == "/v1/models" && c.status == 200)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || checks() >= 2),
        "{} checks: {}",
        checks(),
        node.log()
    );
    node.set_hosts("127.0.0.1 probe.test\n");
    // Past the addresses' 30 s, the refresh has asked the silent server.
    std::thread::sleep(clio_relay::core::dial::DNS_TTL + Duration::from_secs(2));
    let then = checks();
    assert!(
        wait_until(Duration::from_secs(20), || checks() >= then + 3),
        "{} checks, {then} when the refresh began: {}",
        checks(),
        node.log()
    );
    let (status, body) = http(node.admin, "GET", "/admin/usage", Some(crate::ADMIN), None);
    assert_eq!(status, 200, "{body}");
    let usage: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(usage["scope"], "fleet", "{body}");
    assert_eq!(
        node.threads_named("clio-resolve"),
        1,
        "one lookup under way: {}",
        node.log()
    );
    drop(dns);
}

/// Redis's name leaves the namespace's `/etc/hosts`, after the node has
/// read the fleet's usage once, and the one DNS server never answers (30 s
/// an attempt, 5 attempts). `/admin/usage` still answers with the fleet's:
/// the query's own connection goes to the address it had, its lookup
/// waited for within `cluster.timeout`, one running however many queries
/// come. Before, the `redis` crate's connect asked the resolver with no
/// deadline, on the admin thread's blocking pool: the query, and every
/// one after it, waited out the lookup (minutes).
#[test]
fn the_fleet_usage_is_read_while_the_resolver_hangs() {
    let redis = RedisServer::start();
    let Some(dns) = silent_dns() else { return };
    let hosts = "127.0.0.1 redis.test probe.test\n";
    let Some((node, _cfg, _fake)) = node_with_dns(&redis, &dns, hosts, 5) else {
        return;
    };
    let up = || sample(node.admin, "clio_relay_cluster_store_up") == 1;
    assert!(wait_until(Duration::from_secs(10), up), "{}", node.log());
    let scope = || {
        let (status, body) = http(node.admin, "GET", "/admin/usage", Some(crate::ADMIN), None);
        let usage: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        (status, usage.map(|u| u["scope"].clone()))
    };
    let fleet = (200, Some(serde_json::json!("fleet")));
    assert_eq!(scope(), fleet, "{}", node.log());
    node.set_hosts("127.0.0.1 probe.test\n");
    for i in 0..3 {
        assert_eq!(
            scope(),
            fleet,
            "query {i} with the resolver silent: {}",
            node.log()
        );
    }
    assert_eq!(
        node.threads_named("clio-resolve"),
        1,
        "one lookup under way: {}",
        node.log()
    );
    drop(dns);
}
