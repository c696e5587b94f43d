//! A Redis that stops answering but keeps its connections open (a stalled
//! primary; here `CLIENT PAUSE`): each call has `cluster.timeout`, so the
//! node sees the store unreachable after about that, as when Redis is gone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clio_relay::core::config::StoreDown;
use clio_relay::core::secret::Secret;

use crate::redis::RedisServer;
use crate::util::*;
use crate::{try_stream, up};

#[test]
fn a_stalled_redis_is_unreachable_after_one_timeout_not_one_per_command() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    // A timeout of 2 s: one timeout and a poll (2.2 s) stays well apart
    // from one timeout per command of a poll (8 s) even with seconds of
    // a loaded host's delays between them. (At 1 s, within 2.5 s, a
    // loaded CI host's delays alone overran the bound.)
    let timeout = Duration::from_secs(2);
    let start = |name: &str| {
        let mut c = crate::node(&cfg, &redis, name);
        let k = c.cluster.as_mut().unwrap();
        k.timeout = timeout;
        k.on_store_down = StoreDown::Refuse;
        Relay::start(c)
    };
    let (a, b) = (start("node-a"), start("node-b"));
    assert!(wait_until(Duration::from_secs(10), || up(&a) && up(&b)));
    assert!(try_stream(&a, "phone").finished());
    assert!(redis.command("CLIENT PAUSE 15000 ALL").starts_with("+OK"));
    // A poll is one pipeline of 4 commands. Read a reply at a time, each
    // with the whole timeout, it held the cluster thread for 4 timeouts
    // (and a batch of stream opens for one timeout per open) while the
    // node still took the store for up.
    assert!(
        wait_until(timeout * 3, || !up(&a) && !up(&b)),
        "unreachable within cluster.timeout (2 s) and a poll, not 4 timeouts"
    );
    // What the README says of an unreachable store, while it stalls.
    let got = try_stream(&a, "phone");
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    let (status, _, _) = http_get(a.handle.admin_addr, "/readyz", "");
    assert_eq!(status, 503);
    // The pause ends (CLIENT UNPAUSE would wait for it too): both back.
    assert!(wait_until(Duration::from_secs(30), || up(&a) && up(&b)));
    assert!(try_stream(&b, "phone").finished());
}

/// A stream opened the moment Redis stalls waits out its shard's call
/// (`timeout`), and is then decided by this node's shares, its account
/// too: it does not ask the cluster thread again, which is still waiting
/// on the same stalled Redis and would take another `timeout`.
#[test]
fn an_open_during_a_stall_is_decided_locally_after_one_wait() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    let mut c = crate::node(&cfg, &redis, "node-a");
    let k = c.cluster.as_mut().unwrap();
    k.timeout = Duration::from_secs(1);
    k.on_store_down = StoreDown::Local;
    let a = Relay::start(c);
    assert!(wait_until(Duration::from_secs(10), || up(&a)));
    assert!(try_stream(&a, "phone").finished());
    let fleet = a.handle.process.fleet.get().unwrap();
    let thread = || fleet.stats.opens_thread.load(Ordering::Relaxed);
    let local = || fleet.stats.opens_local.load(Ordering::Relaxed);
    let (thread_before, local_before) = (thread(), local());
    assert!(redis.command("CLIENT PAUSE 4000 ALL").starts_with("+OK"));
    let got = try_stream(&a, "phone");
    assert!(got.finished(), "{got:?}");
    assert_eq!(local() - local_before, 1, "decided by this node's shares");
    assert_eq!(
        thread() - thread_before,
        0,
        "the account was picked here too, not asked of the stalled store"
    );
    assert!(wait_until(Duration::from_secs(15), || up(&a)));
}
