//! A node leaving a fleet of three behind HAProxy while a device's streams
//! flow: killed (SIGKILL), its streams stop counting once its lease ends,
//! and not one place more comes back; drained (SIGTERM), it leaves at once.
//! The fleet's usage counts each stream that ended once.

use std::net::SocketAddr;
use std::time::Duration;

use tungstenite::Message;

use crate::haproxy::HaProxy;
use crate::process::{mint, Node};
use crate::redis::RedisServer;
use crate::util::*;

fn metric(node: &Node, series: &str) -> f64 {
    let (_, m) = http(node.admin, "GET", "/metrics", None, None);
    series_value(&m, series).unwrap_or(-1.0)
}

fn open(lb: SocketAddr, token: &str) -> Ws {
    let (mut ws, _) = connect(lb, token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 7)[0].clone()))
        .unwrap();
    ws
}

fn short(lb: SocketAddr, token: &str) -> Received {
    let (mut ws, _) = connect(lb, token, Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &audio_frames(1, 1))
}

/// The fleet's usage of account `a` (streams), as `node` answers it.
fn fleet_streams(node: &Node) -> Option<u64> {
    let (_, body) = http(node.admin, "GET", "/admin/usage", Some(crate::ADMIN), None);
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (v["scope"] == "fleet").then_some(())?;
    v["rows"].as_array()?.iter().find(|r| r["key"] == "a")?["streams"].as_u64()
}

#[test]
fn a_node_leaving_behind_haproxy_gives_back_its_places_once() {
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|name| {
            Node::spawn_behind_balancer(
                &fake.url(),
                &redis.url(),
                name,
                "3s",
                &cfg.tokens.secret,
                "k1",
                "[devices]\nmax_concurrent_streams = 3\n",
            )
        })
        .collect();
    assert!(wait_until(Duration::from_secs(20), || nodes
        .iter()
        .all(|n| metric(n, "clio_relay_cluster_nodes") == 3.0)));
    let lb = HaProxy::start(
        &nodes
            .iter()
            .map(|n| (n.client, n.admin))
            .collect::<Vec<_>>(),
    );
    let lb_addr: SocketAddr = format!("127.0.0.1:{}", lb.port).parse().unwrap();
    let token = mint(&cfg, "phone");
    let mut streams: Vec<Ws> = (0..3).map(|_| open(lb_addr, &token)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    let got = short(lb_addr, &token);
    assert_eq!(got.error_code(), Some(429), "{got:?}\n{}", lb.trouble());
    let mut ended = 0; // streams that ended normally, for the usage
                       // SIGKILL the node with the most of them.
    let live: Vec<f64> = nodes
        .iter()
        .map(|n| metric(n, "clio_relay_streams_live"))
        .collect();
    let victim = (0..3).max_by(|&i, &j| live[i].total_cmp(&live[j])).unwrap();
    let cut = live[victim] as usize;
    assert!(cut >= 1, "{live:?}");
    let mut gone = nodes.remove(victim);
    // Spawned in this order: the victim's node id.
    let victim_id = ["node-a", "node-b", "node-c"][victim];
    gone.kill9();
    let lease_end = redis.lease_end(victim_id).expect("a lease");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3 - cut));
    // Its places come back once its lease ends, and only its places.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let got = short(lb_addr, &token);
            ended += got.finished() as u64;
            got.finished()
        }),
        "the killed node's streams stop counting\n{}",
        lb.trouble()
    );
    assert!(redis.time_ms() >= lease_end, "not before its lease ended");
    // The probe's place is given back within 10 ms of its end (README):
    // only the streams on the two nodes left count then.
    let counted = || -> u64 {
        ["node-a", "node-b", "node-c"]
            .iter()
            .filter_map(|n| redis.count(n, "dev", "phone")?.parse::<u64>().ok())
            .sum()
    };
    assert!(wait_until(Duration::from_secs(10), || counted() == 3 - cut as u64));
    let mut refills: Vec<Ws> = (0..cut).map(|_| open(lb_addr, &token)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    assert_eq!(short(lb_addr, &token).error_code(), Some(429));
    // The streams on the other nodes flowed through it all; SIGTERM one of
    // the two nodes left while they end: it drains and leaves at once.
    let mut draining = nodes.remove(0);
    let status = std::thread::scope(|s| {
        let d = s.spawn(|| draining.terminate());
        streams.append(&mut refills);
        for mut ws in streams {
            let r = read_after_end(&mut ws);
            if r.finished() {
                ended += 1;
            }
        }
        d.join().unwrap()
    });
    assert!(status.success(), "{status:?}");
    let last = &nodes[0];
    assert!(wait_until(Duration::from_secs(10), || metric(
        last,
        "clio_relay_cluster_nodes"
    ) == 1.0));
    assert_eq!(
        ended,
        1 + 3,
        "every stream not on the killed node ended normally"
    );
    // The device has all its places again, on the one node left.
    let full: Vec<Ws> = (0..3).map(|_| open(lb_addr, &token)).collect();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 3));
    assert_eq!(short(lb_addr, &token).error_code(), Some(429));
    drop(full);
    // Usage: every stream that ended on a node that did not die, once.
    assert!(
        wait_until(Duration::from_secs(10), || fleet_streams(last)
            == Some(ended + 3)),
        "fleet usage {:?}, streams ended {}",
        fleet_streams(last),
        ended + 3
    );
}

/// Ends a stream's audio and reads to its end.
fn read_after_end(ws: &mut Ws) -> Received {
    let _ = ws.send(Message::binary(Vec::<u8>::new()));
    read_all(ws)
}
