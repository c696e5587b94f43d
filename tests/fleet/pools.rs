//! Account pools across a fleet: the shared account set carries each
//! account's pool, and the fleet-wide choice of account stays inside the
//! token's pools (full pool: 429, never an account of another pool).

use std::time::{Duration, SystemTime};

use clio_relay::core::config::{AccountConfig, PoolConfig};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use tungstenite::Message;

use crate::redis::RedisServer;
use crate::util::*;
use crate::ADMIN;

const US: &str = "soniox-key-us-1111-fleet";
const EU1: &str = "soniox-key-eu-2222-fleet";
const EU2: &str = "soniox-key-eu-3333-fleet";

fn eu_token(relay: &Relay, device: &str) -> String {
    TokenKeys::from_config(&relay.cfg.tokens)
        .mint_in(
            device,
            None,
            &["eu".into()],
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap()
}

/// Opens an EU stream on `relay` and keeps it live.
fn hold(relay: &Relay, device: &str) -> Ws {
    let (mut ws, _) = connect(relay.addr(), &eu_token(relay, device), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1).remove(0)))
        .unwrap();
    ws
}

#[test]
fn the_fleet_keeps_each_pools_streams_in_the_pool() {
    let redis = RedisServer::start();
    let us = fake(&[US], |_| {});
    let eu = fake(&[EU1, EU2], |_| {});
    let eu_url = eu.url();
    let (a, b) = crate::pair(&us, &redis, US, |cfg| {
        cfg.pools = vec![PoolConfig {
            name: "eu".into(),
            url: eu_url,
            rest_url: None,
        }];
        let mut eu1 = AccountConfig::new("eu-1", Secret::new(EU1));
        eu1.pool = "eu".into();
        eu1.max_concurrent_streams = 1;
        cfg.accounts.push(eu1);
    });
    // An EU account added on A reaches B with its pool.
    let (status, body) = http(
        a.handle.admin_addr,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(&format!(
            r#"{{"id":"eu-2","key":"{EU2}","pool":"eu","max_concurrent_streams":1}}"#
        )),
    );
    assert_eq!(status, 200, "{body}");
    assert!(wait_until(Duration::from_secs(10), || b
        .handle
        .process
        .accounts()
        .iter()
        .any(|x| x.id == "eu-2" && x.pool == "eu")));
    // One EU stream on each node fills both EU accounts fleet-wide; a third,
    // on either node, is refused while the US account (limit 50) is idle.
    let _one = hold(&b, "eu-one");
    let _two = hold(&a, "eu-two");
    assert!(eu.wait_for(Duration::from_secs(10), |s| s.len() == 2
        && s.iter().all(|r| r.audio_frames == 1)));
    let keys: Vec<_> = eu.sessions().iter().filter_map(|s| s.key.clone()).collect();
    assert!(
        keys.contains(&EU1.to_string()) && keys.contains(&EU2.to_string()),
        "{keys:?}"
    );
    for relay in [&a, &b] {
        let (mut ws, _) = connect(relay.addr(), &eu_token(relay, "eu-three"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
        assert_error_frame(&got, 429, 1013);
    }
    assert!(
        us.sessions().is_empty(),
        "EU streams went to the US: {:?}",
        us.sessions()
    );
    // A token for a pool no node has: refused, and the message says so
    // rather than "every account is at its limit".
    let asia = TokenKeys::from_config(&a.cfg.tokens)
        .mint_in(
            "asia-one",
            None,
            &["asia".into()],
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    let (mut ws, _) = connect(a.addr(), &asia, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_error_frame(&got, 429, 1013);
    let message = got
        .messages
        .iter()
        .find_map(|m| m["error_message"].as_str());
    assert_eq!(
        message,
        Some("No Soniox account of this token's pools (asia) is on this relay."),
        "{got:?}"
    );
}

#[test]
fn a_pools_device_limits_hold_across_the_fleet() {
    use clio_relay::core::config::{DeviceLimits, PoolLimits};
    let redis = RedisServer::start();
    let us = fake(&[US], |_| {});
    let eu = fake(&[EU1], |_| {});
    let eu_url = eu.url();
    let (a, b) = crate::pair(&us, &redis, US, |cfg| {
        cfg.pools = vec![PoolConfig {
            name: "eu".into(),
            url: eu_url,
            rest_url: None,
        }];
        let mut eu1 = AccountConfig::new("eu-1", Secret::new(EU1));
        eu1.pool = "eu".into();
        eu1.max_concurrent_streams = 10;
        cfg.accounts.push(eu1);
        cfg.devices.default.max_concurrent_streams = 3;
        cfg.devices.pools = [(
            "eu".to_string(),
            PoolLimits {
                max_streams: 0,
                devices: DeviceLimits {
                    max_concurrent_streams: 1,
                    ..Default::default()
                },
            },
        )]
        .into();
    });
    // The device's one EU stream, on A, counts on B too.
    let _one = hold(&a, "phone");
    assert!(eu.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 1));
    let (mut ws, _) = connect(b.addr(), &eu_token(&b, "phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_error_frame(&got, 429, 1013);
    let text = got.messages[0]["error_message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        text.contains("1 concurrent streams") && text.contains("pool.eu.devices"),
        "{text}"
    );
    assert_eq!(eu.sessions().len(), 1);
    // Its default-pool tokens keep the tier's 3, on either node.
    let (mut ws, _) = connect(b.addr(), &b.token("phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert_eq!(us.sessions().len(), 1);
}
