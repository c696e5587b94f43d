//! A Redis with ACL users: the fleet logs in as its own user
//! (`cluster.username` with the password), limited to the `clio:` keys.

use std::time::Duration;

use clio_relay::core::secret::Secret;

use crate::redis::RedisServer;
use crate::util::*;

const PASSWORD: &str = "clio-acl-password-9f8e7d";

#[test]
fn the_fleet_logs_in_as_an_acl_user_limited_to_its_keys() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.master_key = Some(Secret::new(crate::MASTER));
    let ok = |r: String| assert!(r.starts_with("+OK"), "{r}");
    ok(redis.command(&format!("ACL SETUSER clio on >{PASSWORD} ~clio:* +@all")));
    // The default user needs a password the relays do not have.
    ok(redis.command("ACL SETUSER default resetpass >not-the-relays-0123"));
    let relay = |name: &str, password: &str| {
        let mut c = crate::node(&cfg, &redis, name);
        let k = c.cluster.as_mut().unwrap();
        k.username = Some("clio".into());
        k.password = Some(Secret::new(password));
        Relay::start(c)
    };
    let a = relay("node-a", PASSWORD);
    assert!(
        wait_until(Duration::from_secs(10), || crate::up(&a)),
        "logged in as clio"
    );
    // Every call of a stream's open, on the shard's own connection too,
    // stays within clio:*.
    assert!(crate::try_stream(&a, "phone").finished());
    assert!(crate::try_stream(&a, "phone").finished());
    let (_, m) = http(a.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        m.contains("clio_relay_cluster_stream_opens_total{decided_by=\"store\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("clio_relay_cluster_calls_total{result=\"failed\"} 0"),
        "{m}"
    );
    // A wrong password: never in, and never shown.
    let b = relay("node-b", "wrong-password-4242");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!crate::up(&b));
    let (_, m) = http(b.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(m.contains("clio_relay_cluster_store_up 0"), "{m}");
    assert!(!m.contains("wrong-password-4242") && !m.contains(PASSWORD));
}
