//! A fleet of relays sharing one real `redis-server`: limits, revocations,
//! accounts and usage hold across nodes. Every server is a real program on
//! 127.0.0.1, started by the test and stopped when it ends.

#[allow(dead_code)]
#[path = "../relay/util.rs"]
mod util;

mod redis;

mod limits;

use std::time::Duration;

use clio_relay::config::{ClusterConfig, Config, StoreDown};

/// `cfg` joined to the fleet in `redis` as `node`.
pub fn node(cfg: &Config, redis: &redis::RedisServer, node: &str) -> Config {
    let mut c = cfg.clone();
    c.admin.state_dir = util::state_dir();
    c.cluster = Some(ClusterConfig {
        redis_url: redis.url(),
        password: None,
        node_id: node.into(),
        lease_ttl: Duration::from_secs(15),
        on_store_down: StoreDown::Local,
        timeout: Duration::from_millis(500),
    });
    c
}
