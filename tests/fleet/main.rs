//! A fleet of relays sharing one real `redis-server`: limits, revocations,
//! accounts and usage hold across nodes. Every server is a real program on
//! 127.0.0.1, started by the test and stopped when it ends.

#[allow(dead_code)]
#[path = "../relay/util.rs"]
mod util;

mod proxy;
mod redis;

mod accounts;
mod acl;
mod addresses;
mod audio;
mod clock;
mod cutoff;
mod evict;
mod faults;
mod frozen;
mod haproxy;
mod leases;
mod leaving;
mod limits;
mod links;
mod loss;
mod monitor;
mod outage;
mod pools;
mod process;
mod races;
mod same_id;
mod stall;
mod store_faults;
mod tls;
mod tokens;
mod usage;

use std::time::Duration;

use clio_relay::core::config::{ClusterConfig, Config, StoreDown};
use clio_relay::core::secret::Secret;

/// The admin token every node of the test fleet shares.
pub const ADMIN: &str = "fleet-admin-token-0123456789";
/// The master key every node of the test fleet shares.
pub const MASTER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// `cfg` joined to the fleet in `redis` as `node`.
pub fn node(cfg: &Config, redis: &redis::RedisServer, node: &str) -> Config {
    let mut c = cfg.clone();
    c.admin.state_dir = util::state_dir();
    c.cluster = Some(ClusterConfig {
        redis_url: redis.url(),
        ca: None,
        username: None,
        password: None,
        node_id: node.into(),
        lease_ttl: Duration::from_secs(15),
        on_store_down: StoreDown::Local,
        timeout: Duration::from_millis(500),
    });
    c
}

/// Two relays on one Redis with account `a` (key `key`, 50 streams), the
/// admin token and one master key; `tweak` changes the shared config.
pub fn pair(
    fake: &fake_soniox::FakeSoniox,
    redis: &redis::RedisServer,
    key: &str,
    tweak: impl FnOnce(&mut Config),
) -> (util::Relay, util::Relay) {
    let mut cfg = util::relay_config(&fake.url(), &[("a", key)]);
    cfg.accounts[0].max_concurrent_streams = 50;
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new(MASTER));
    tweak(&mut cfg);
    let a = util::Relay::start(node(&cfg, redis, "node-a"));
    let b = util::Relay::start(node(&cfg, redis, "node-b"));
    assert!(
        util::wait_until(Duration::from_secs(10), || {
            [&a, &b].iter().all(|r| {
                let f = r.handle.process.fleet.get().unwrap();
                f.store_up() && f.nodes() == 2
            })
        }),
        "both nodes reach Redis and see each other"
    );
    (a, b)
}

/// Whether `relay`'s cluster thread has the store.
pub fn up(relay: &util::Relay) -> bool {
    relay.handle.process.fleet.get().unwrap().store_up()
}

/// Opens a stream for `device` on `relay` and sends its config.
pub fn open(relay: &util::Relay, device: &str) -> util::Ws {
    let (mut ws, _) = util::connect(relay.addr(), &relay.token(device), util::Via::Header).unwrap();
    ws.send(tungstenite::Message::text(util::config_message(None)))
        .unwrap();
    ws
}

/// A whole short stream for `device` on `relay`; what the client got.
pub fn try_stream(relay: &util::Relay, device: &str) -> util::Received {
    let (mut ws, _) = util::connect(relay.addr(), &relay.token(device), util::Via::Header).unwrap();
    util::stream_session(
        &mut ws,
        &util::config_message(None),
        &util::audio_frames(1, 1),
    )
}

/// Ends a stream's audio and reads to its end; the socket is closed.
pub fn finish(mut ws: util::Ws) -> util::Received {
    ws.send(tungstenite::Message::binary(Vec::<u8>::new()))
        .unwrap();
    util::read_all(&mut ws)
}
