//! The systemd watchdog's liveness check covers every thread that matters:
//! each shard and the admin thread.

use std::time::Duration;

use crate::util::*;

#[test]
fn the_liveness_check_notices_a_dead_admin_thread() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.server.shards = 2;
    let mut relay = Relay::start(cfg);
    for _ in 0..3 {
        relay
            .handle
            .alive(Duration::from_secs(10))
            .expect("every thread answers");
    }
    relay.handle.stop_admin_thread();
    let err = relay
        .handle
        .alive(Duration::from_secs(2))
        .expect_err("the admin thread is gone");
    assert!(err.to_string().contains("admin"), "{err}");
    assert!(!err.to_string().contains("shard"), "{err}");
}
