//! Token id revocations expire fleet-wide: Redis keeps each one, timed
//! by its own clock, as long as a token carrying the id can be valid on
//! any node (the longest `tokens.max_ttl` + `tokens.clock_skew` the nodes
//! published), then drops it; tokens issued before it stay refused.

use std::time::{Duration, SystemTime};

use clio_relay::core::config::Config;
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{node, ADMIN, MASTER};

const KEY: &str = "soniox-key-tokens-expire-1";
const SOON: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A node's config with `max_ttl` in seconds and a clock skew of 1 s.
fn config(fake: &fake_soniox::FakeSoniox, redis: &RedisServer, id: &str, max_ttl: u64) -> Config {
    skewed(fake, redis, id, max_ttl, 1)
}

/// A node's config with `max_ttl` and `clock_skew` in seconds.
fn skewed(
    fake: &fake_soniox::FakeSoniox,
    redis: &RedisServer,
    id: &str,
    max_ttl: u64,
    skew: u64,
) -> Config {
    let mut cfg = relay_config(&fake.url(), &[("a", KEY)]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new(MASTER));
    cfg.tokens.default_ttl = Duration::from_secs(max_ttl);
    cfg.tokens.max_ttl = Duration::from_secs(max_ttl);
    cfg.tokens.clock_skew = Duration::from_secs(skew);
    node(&cfg, redis, id)
}

/// Whether `relay` takes `token` for a whole stream (any refusal, at
/// the upgrade or after: no).
fn streams(relay: &Relay, token: &str) -> bool {
    let Ok((mut ws, _)) = connect(relay.addr(), token, Via::Header) else {
        return false;
    };
    stream_session(&mut ws, &config_message(None), &audio_frames(1, 1)).finished()
}

/// A sorted set member's score, if it has one.
fn score(redis: &RedisServer, key: &str, id: &str) -> Option<u64> {
    let r = redis.command(&format!("ZSCORE {key} {id}"));
    r.lines().nth(1).and_then(|l| l.trim().parse().ok())
}

/// A token for device `phone` with id `id`, issued at `issued` (Unix
/// seconds) and living `ttl` seconds.
fn token(relay: &Relay, id: &str, issued: u64, ttl: u64) -> String {
    TokenKeys::from_config(&relay.cfg.tokens)
        .mint_exact("phone", None, issued, issued + ttl, id)
        .unwrap()
}

/// Whether `relay` refuses `token` as revoked (a stream it takes
/// streams; any other refusal fails the test).
fn revoked(relay: &Relay, token: &str) -> bool {
    let (mut ws, _) = connect(relay.addr(), token, Via::Header).unwrap();
    refused_as_revoked(&mut ws)
}

/// Whether a stream on `ws` is refused as revoked (one that streams: no;
/// any other refusal fails the test).
fn refused_as_revoked(ws: &mut Ws) -> bool {
    let got = stream_session(ws, &config_message(None), &audio_frames(1, 1));
    if got.finished() {
        return false;
    }
    assert_eq!(got.error_code(), Some(401), "{got:?}");
    let message = got.messages[0]["error_message"].as_str().unwrap_or("");
    assert!(message.contains("revoked"), "{got:?}");
    true
}

/// Whether `relay` refuses `token`, valid until `exp` (Unix seconds),
/// as revoked. A refusal as expired counts too, but only once `exp` has
/// passed on this clock: a loop that checked the time just before `exp`
/// can reach the relay just after it on a slow host (the relay refuses
/// at `now >= exp`, so an earlier "expired" still fails the test).
fn revoked_until(relay: &Relay, token: &str, exp: u64) -> bool {
    let mut ws = match connect(relay.addr(), token, Via::Header) {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]));
            assert_eq!(response.status(), 401, "{body}");
            assert!(body.contains("expired"), "{body}");
            let now = now_ms();
            assert!(
                now >= exp * 1000,
                "refused as expired at {now} ms, before {exp} s"
            );
            return true;
        }
        Err(e) => panic!("{e}"),
    };
    refused_as_revoked(&mut ws)
}

fn list(relay: &Relay) -> serde_json::Value {
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/revocations",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn revoke(relay: &Relay, id: &str) {
    let body = format!(r#"{{"token_id":"{id}"}}"#);
    let (status, answer) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");
}

/// When `relay` says the revocation of `id` expires, once it knows.
fn expires(relay: &Relay, id: &str) -> Option<u64> {
    list(relay)["token_ids_expire"][id].as_u64()
}

fn up_together(a: &Relay, b: &Relay) -> bool {
    [a, b].iter().all(|r| {
        let f = r.handle.process.fleet.get().unwrap();
        f.store_up() && f.nodes() == 2
    })
}

/// Two nodes, one taking tokens of up to 2 s, one of up to 4 s (clock
/// skew 1 s each): a token id revoked on the first is kept 5 s, the
/// longer node's bound, and refused on both while a token carrying it
/// is valid on either; then Redis and both nodes let it go, not before,
/// and a token issued since with the id streams. A node started later
/// that takes tokens of a minute still refuses one issued before the
/// revocation. (Redis kept every token id revocation until lifted, and
/// `token_ids_expire` was empty in a fleet.)
#[test]
fn a_token_id_revocation_expires_fleet_wide_after_the_longest_lifetime() {
    let redis = RedisServer::start();
    let fake = fake(&[KEY], |_| {});
    let short = Relay::start(config(&fake, &redis, "node-short", 2));
    let long = Relay::start(config(&fake, &redis, "node-long", 4));
    assert!(wait_until(SOON, || up_together(&short, &long)));
    // Both have published their bounds (a poll each).
    assert!(wait_until(SOON, || redis
        .command("HLEN clio:rev:hold")
        .starts_with(":2")));
    let before_ms = now_ms();
    let issued = before_ms / 1000;
    let on_short = token(&short, "leaked-1", issued, 2);
    let on_long = token(&long, "leaked-1", issued, 4);
    revoke(&short, "leaked-1");
    let after = now_ms().div_ceil(1000);
    // Both nodes show when it expires: the revocation (Redis's clock, to
    // the second above) plus the longest bound, 4 + 1 s.
    let mut until = 0;
    assert!(wait_until(SOON, || {
        match (expires(&short, "leaked-1"), expires(&long, "leaked-1")) {
            (Some(x), Some(y)) if x == y => {
                until = x;
                true
            }
            _ => false,
        }
    }));
    assert!(
        (issued + 5..=after + 6).contains(&until),
        "expires at {until}, revoked in [{issued}, {after}]"
    );
    // Refused on both for as long as either could take a token with it.
    while now_ms() / 1000 < issued + 4 {
        if now_ms() / 1000 < issued + 2 {
            assert!(
                revoked_until(&short, &on_short, issued + 2),
                "a revoked token id streamed"
            );
        }
        assert!(
            revoked_until(&long, &on_long, issued + 4),
            "a revoked token id streamed"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Then it goes from Redis and from both nodes, not before 5 s.
    assert!(wait_until(SOON, || {
        redis
            .command("SISMEMBER clio:rev:tok leaked-1")
            .starts_with(":0")
            && list(&short)["token_ids"] == serde_json::json!([])
            && list(&long)["token_ids"] == serde_json::json!([])
    }));
    assert!(now_ms() >= before_ms + 5000, "let go before its time");
    assert!(redis
        .command("ZSCORE clio:rev:tokat leaked-1")
        .starts_with("$-1"));
    let cut: u64 = redis.hget("clio:ver", "tokcut").unwrap().parse().unwrap();
    assert!(cut >= before_ms, "{cut} < {before_ms}");
    // A token issued since with that id streams on both.
    let now = now_ms() / 1000;
    assert!(!revoked(&short, &token(&short, "leaked-1", now, 2)));
    assert!(!revoked(&long, &token(&long, "leaked-1", now, 4)));
    // A node taking tokens of a minute, started now: one issued at the
    // revocation (so valid there for a minute) is refused, one issued
    // now streams.
    let minute = Relay::start(config(&fake, &redis, "node-minute", 60));
    let before_it = token(&minute, "leaked-1", issued, 60);
    assert!(wait_until(SOON, || crate::up(&minute) && revoked(&minute, &before_it)));
    assert!(revoked(&minute, &token(&minute, "other-id", issued, 60)));
    let now = now_ms() / 1000;
    assert!(!revoked(&minute, &token(&minute, "leaked-1", now, 60)));
}

/// Redis loses its data (`FLUSHALL`) while a token id revocation is
/// kept: the nodes give it back with the time Redis had (to the second
/// above), not a new one, and the mark of those already let go. (The
/// times and the mark were not carried: a loss made every revocation
/// count from the reseed, or lost the mark.)
#[test]
fn a_flush_gives_back_token_id_revocations_with_their_times() {
    let redis = RedisServer::start();
    let fake = fake(&[KEY], |_| {});
    let a = Relay::start(config(&fake, &redis, "node-a", 2));
    let b = Relay::start(config(&fake, &redis, "node-b", 10));
    assert!(wait_until(SOON, || up_together(&a, &b)));
    assert!(wait_until(SOON, || redis
        .command("HLEN clio:rev:hold")
        .starts_with(":2")));
    // One let go already (kept 11 s), so the mark is set.
    revoke(&a, "early");
    assert!(wait_until(SOON, || redis
        .hget("clio:ver", "tokcut")
        .is_some()));
    let cut: u64 = redis.hget("clio:ver", "tokcut").unwrap().parse().unwrap();
    revoke(&a, "late");
    let score = |id: &str| -> Option<u64> {
        let r = redis.command(&format!("ZSCORE clio:rev:tokat {id}"));
        r.lines().nth(1).and_then(|l| l.trim().parse().ok())
    };
    let at = score("late").expect("timed when taken");
    // Both nodes have loaded it with its time.
    assert!(wait_until(SOON, || expires(&a, "late").is_some()
        && expires(&b, "late").is_some()));
    let until = expires(&b, "late").unwrap();
    assert!(revoked_until(
        &b,
        &token(&b, "late", at / 1000, 10),
        at / 1000 + 10
    ));
    // Long enough that a time given anew at the reseed would show.
    std::thread::sleep(Duration::from_secs(3));
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    assert!(wait_until(SOON, || redis
        .hget("clio:ver", "epoch")
        .is_some()
        && score("late").is_some()
        && up_together(&a, &b)));
    let back = score("late").unwrap();
    assert!(
        (at..=at + 2000).contains(&back),
        "taken at {at}, given back as {back}"
    );
    let cut_back: u64 = redis.hget("clio:ver", "tokcut").unwrap().parse().unwrap();
    assert!(cut_back >= cut, "mark {cut} given back as {cut_back}");
    assert!(redis
        .command("SISMEMBER clio:rev:tok late")
        .starts_with(":1"));
    // Still refused on both (any token carrying it while it is kept),
    // and expiring when it did.
    let now = now_ms() / 1000;
    assert!(revoked_until(&a, &token(&a, "late", now, 2), now + 2));
    assert!(revoked(&b, &token(&b, "late", now, 10)));
    assert!(wait_until(SOON, || expires(&b, "late").is_some()));
    let again = expires(&b, "late").unwrap();
    assert!((until..=until + 2).contains(&again), "{until} then {again}");
}

/// Every node lowers `tokens.clock_skew` on reload (3 s to 0) right after
/// a token id is revoked: a token issued just before it by a backend 3 s
/// ahead (taken under the old skew) is valid until 5 s after it, and is
/// refused on both nodes all that time; Redis drops the revocation only
/// then, and the mark it leaves covers that token's issue time. (Each
/// node published its new, shorter hold and Redis dropped the revocation
/// by it, 2 s after it was made, with the mark at its time plus the new
/// skew: the token streamed.) Redis loses its data meanwhile: the skew
/// recorded with the revocation comes back with it.
#[test]
fn a_lower_clock_skew_on_reload_does_not_shorten_a_fleet_revocation() {
    let redis = RedisServer::start();
    let fake = fake(&[KEY], |_| {});
    let mut cfg_a = skewed(&fake, &redis, "node-a", 2, 3);
    let mut cfg_b = skewed(&fake, &redis, "node-b", 2, 3);
    let a = Relay::start(cfg_a.clone());
    let b = Relay::start(cfg_b.clone());
    assert!(wait_until(SOON, || up_together(&a, &b)));
    assert!(wait_until(SOON, || redis
        .command("HLEN clio:rev:hold")
        .starts_with(":2")));
    // Issued by a backend whose clock is 3 s ahead, for 2 s.
    let issued = now_ms() / 1000 + 3;
    let ahead = token(&a, "ahead-1", issued, 2);
    revoke(&a, "ahead-1");
    let at = score(&redis, "clio:rev:tokat", "ahead-1").expect("timed when taken");
    assert!(wait_until(SOON, || expires(&a, "ahead-1").is_some()
        && expires(&b, "ahead-1").is_some()));
    cfg_a.tokens.clock_skew = Duration::ZERO;
    cfg_b.tokens.clock_skew = Duration::ZERO;
    a.handle.reload(&cfg_a).unwrap();
    b.handle.reload(&cfg_b).unwrap();
    // Both have published their new hold, 2 s.
    assert!(wait_until(SOON, || {
        let holds = redis.command("HVALS clio:rev:hold");
        holds.matches("2000").count() == 2
    }));
    // Kept, and shown kept, the old skew past the longest max_ttl.
    for relay in [&a, &b] {
        let until = expires(relay, "ahead-1").unwrap();
        assert!(
            until * 1000 >= at + 5000,
            "shown expiring at {until}, revoked at {at} ms"
        );
    }
    // Redis recorded the old skew with it; lost (a flush), the nodes
    // give it back.
    assert!(wait_until(SOON, || score(
        &redis,
        "clio:rev:tokskew",
        "ahead-1"
    ) == Some(3000)));
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    assert!(wait_until(SOON, || score(
        &redis,
        "clio:rev:tokskew",
        "ahead-1"
    ) == Some(3000)));
    // Refused on both for as long as it is valid.
    while now_ms() < (issued + 2) * 1000 {
        assert!(!streams(&a, &ahead), "a revoked token id streamed");
        assert!(!streams(&b, &ahead), "a revoked token id streamed");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Then it goes, not before 5 s, and the mark covers the old skew.
    assert!(wait_until(SOON, || redis
        .command("SISMEMBER clio:rev:tok ahead-1")
        .starts_with(":0")));
    assert!(redis.time_ms() >= at + 5000, "let go before its time");
    let mark: u64 = redis.hget("clio:ver", "tokmark").unwrap().parse().unwrap();
    assert!(mark >= at + 3000, "mark {mark}, revoked at {at}");
    // A token issued now with the id streams on both: issued once both
    // have let it go, each just before its stream (the time read before
    // that wait gave, on a slow host, a token of 2 s that had expired by
    // then, and did not stream).
    assert!(wait_until(SOON, || list(&a)["token_ids"]
        == serde_json::json!([])
        && list(&b)["token_ids"] == serde_json::json!([])));
    assert!(streams(&a, &token(&a, "ahead-1", now_ms() / 1000, 2)));
    assert!(streams(&b, &token(&b, "ahead-1", now_ms() / 1000, 2)));
}

/// A node with a longer `max_ttl` joins after a token id was revoked:
/// Redis now keeps the revocation by its bound, and every node shows that
/// expiry, not only the one that joined; once it leaves, the shorter one
/// again. (A node showed the fleet's hold as of its last load of the
/// lists, which only a revocation change brings: too early while the
/// longer node was in.)
#[test]
fn the_expiry_shown_follows_the_fleets_hold() {
    let redis = RedisServer::start();
    let fake = fake(&[KEY], |_| {});
    let a = Relay::start(config(&fake, &redis, "node-a", 30));
    assert!(wait_until(SOON, || crate::up(&a)));
    revoke(&a, "joined-1");
    let at = score(&redis, "clio:rev:tokat", "joined-1").expect("timed when taken");
    let revoked_at = at.div_ceil(1000);
    assert!(wait_until(SOON, || expires(&a, "joined-1") == Some(revoked_at + 31)));
    let long = Relay::start(config(&fake, &redis, "node-long", 60));
    assert!(wait_until(SOON, || up_together(&a, &long)));
    assert!(
        wait_until(SOON, || expires(&a, "joined-1") == Some(revoked_at + 61)
            && expires(&long, "joined-1") == Some(revoked_at + 61)),
        "shown {:?} and {:?}, kept until {}",
        expires(&a, "joined-1"),
        expires(&long, "joined-1"),
        revoked_at + 61
    );
    drop(long);
    assert!(wait_until(SOON, || expires(&a, "joined-1") == Some(revoked_at + 31)));
    assert!(redis
        .command("SISMEMBER clio:rev:tok joined-1")
        .starts_with(":1"));
}

/// How many `XREAD`s Redis has run: one a poll of each node.
fn polls(redis: &RedisServer) -> u64 {
    let info = redis.command("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xread:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A node writes its token bounds (`clio:rev:hold`, `clio:rev:skew`)
/// with its lease and when a reload changes them, not at every poll:
/// one overwritten in Redis stays so for polls, until the next lease
/// renewal writes it again. A reload's new bounds are written at the
/// next poll, a flush gets them back with the node's registration, and a
/// node that stops takes them out. (Every poll wrote them: five writes a
/// second a node.)
#[test]
fn a_nodes_bounds_are_written_with_its_lease_and_when_they_change() {
    let redis = RedisServer::start();
    let fake = fake(&[KEY], |_| {});
    let mut cfg = skewed(&fake, &redis, "node-a", 2, 1);
    let a = Relay::start(cfg.clone());
    assert!(wait_until(SOON, || crate::up(&a)));
    let member = redis.member("node-a").unwrap();
    let bounds = || {
        (
            redis.hget("clio:rev:hold", &member),
            redis.hget("clio:rev:skew", &member),
        )
    };
    let written = |hold: &str, skew: &str| (Some(hold.to_string()), Some(skew.to_string()));
    assert!(wait_until(SOON, || bounds() == written("3000", "1000")));
    // Right after a lease renewal, so that none comes within the polls
    // watched (tried again if one does).
    let mut kept = false;
    for _ in 0..3 {
        let lease = redis.lease_end("node-a");
        assert!(wait_until(SOON, || redis.lease_end("node-a") != lease));
        let lease = redis.lease_end("node-a");
        redis.command(&format!("HSET clio:rev:hold {member} 999000"));
        let from = polls(&redis);
        assert!(wait_until(SOON, || polls(&redis) >= from + 5));
        let hold = bounds().0;
        if redis.lease_end("node-a") == lease {
            assert_eq!(hold.as_deref(), Some("999000"), "written by a poll");
            kept = true;
            break;
        }
    }
    assert!(kept, "a lease renewal in every window watched");
    // The next lease renewal writes it again.
    assert!(wait_until(SOON, || bounds() == written("3000", "1000")));
    // A reload that changes them: written at the next poll.
    cfg.tokens.clock_skew = Duration::from_secs(2);
    a.handle.reload(&cfg).unwrap();
    assert!(wait_until(SOON, || bounds() == written("4000", "2000")));
    // Redis loses its data: back with the node's registration.
    assert!(redis.command("FLUSHALL").starts_with("+OK"));
    assert!(wait_until(SOON, || {
        let member = redis.member("node-a");
        member.is_some_and(|m| {
            redis.hget("clio:rev:hold", &m).as_deref() == Some("4000")
                && redis.hget("clio:rev:skew", &m).as_deref() == Some("2000")
        })
    }));
    // A node that stops takes them out with its lease.
    drop(a);
    assert!(redis.command("HLEN clio:rev:hold").starts_with(":0"));
    assert!(redis.command("HLEN clio:rev:skew").starts_with(":0"));
    assert!(redis.member("node-a").is_none());
}

/// A fleet's device revocations never expire, and after each change
/// every node reads the whole lists from Redis. That read had the
/// deadline of a stream open's call (`cluster.timeout`): past some
/// hundreds of thousands of ids (600,000 of 36 characters, release
/// build) it never finished in time, so the node counted the store
/// unreachable, reconnected, and failed again at the next poll, for
/// good: it served with its share of each limit, answered revocations
/// 503, and never took a revocation made on another node. Here the
/// fleet holds fewer ids (the debug build reads them slower) under a
/// 100 ms `cluster.timeout`.
#[test]
fn a_node_takes_a_revocation_among_many() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let ids = 150_000;
    let reply = redis.command(&format!(
        "EVAL \"for i = 1, tonumber(ARGV[1]) do redis.call('SADD', KEYS[1], 'device-' .. i .. '-abcdefghijklmnop') end return redis.call('SCARD', KEYS[1])\" 1 clio:rev:dev {ids}"
    ));
    assert_eq!(reply.trim(), format!(":{ids}"), "{reply}");
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new(MASTER));
    let start = |name: &str| {
        let mut c = node(&cfg, &redis, name);
        c.cluster.as_mut().unwrap().timeout = Duration::from_millis(100);
        Relay::start(c)
    };
    let (a, b) = (start("node-a"), start("node-b"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a) && crate::up(&b)));
    // The answer holds every id, past what the tests' HTTP client
    // reads: its status line is enough.
    let status_line = {
        use std::io::{BufRead as _, Write as _};
        let body = r#"{"device_id":"stolen"}"#;
        let mut s = std::net::TcpStream::connect(a.handle.admin_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /admin/revocations HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    // Node b takes it from Redis (a stream of the device is refused as
    // revoked), and both stores stay up.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (mut ws, _) = connect(b.addr(), &b.token("stolen"), Via::Header).unwrap();
            refused_as_revoked(&mut ws)
        }),
        "node b never took the revocation"
    );
    // No call failed on either node: the reads of the lists, at the
    // start and after the revocation, each fit their deadline.
    for r in [&a, &b] {
        let fleet = r.handle.process.fleet.get().unwrap();
        let failed = fleet
            .stats
            .calls_failed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(failed, 0, "calls to Redis failed");
        assert!(crate::up(r));
    }
}
