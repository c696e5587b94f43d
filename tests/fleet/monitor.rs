//! No secret reaches Redis or the log: everything the fleet sends Redis
//! (seen by `MONITOR`) and every line the nodes log, while streams run,
//! a device is revoked, an account is added and a key rotated, holds no
//! API key, session token, token secret, admin token, master key or Redis
//! password.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{mint, Node};
use crate::redis::RedisServer;
use crate::util::*;

const KEY: &str = "soniox-key-first-4f3e2d1c0b0a09080706";
const ADDED: &str = "soniox-key-added-8a7b6c5d4e3f2a1b0c9d";
const ROTATED: &str = "soniox-key-rotated-11223344556677889900";
const PASSWORD: &str = "redis-password-c0ffee-77aa";

#[test]
fn nothing_secret_goes_to_redis_or_the_log() {
    let redis = RedisServer::start();
    let ok = |r: String| assert!(r.starts_with("+OK"), "{r}");
    ok(redis.command(&format!("ACL SETUSER clio on >{PASSWORD} ~clio:* +@all")));
    let out = state_dir();
    std::fs::create_dir_all(&out).unwrap();
    let seen = out.join("monitor.txt");
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(std::fs::File::create(&seen).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli runs");
    let fake = fake(&[KEY, ADDED, ROTATED], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", KEY)]);
    let extra = "username = \"clio\"\npassword_env = \"FLEET_REDIS_PW\"\n";
    let node = |name: &str| {
        Node::try_spawn_with(
            &fake.url(),
            &redis.url(),
            name,
            "15s",
            &cfg.tokens.secret,
            KEY,
            extra,
            &[("FLEET_REDIS_PW", PASSWORD)],
        )
        .unwrap()
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let up = |n: &Node| {
        let (_, m) = http(n.admin, "GET", "/metrics", None, None);
        m.contains("clio_relay_cluster_store_up 1") && m.contains("clio_relay_cluster_nodes 2")
    };
    assert!(wait_until(Duration::from_secs(20), || up(&a) && up(&b)));
    let mut tokens = Vec::new();
    for (n, device) in [(&a, "phone"), (&b, "tablet"), (&a, "stolen")] {
        let token = mint(&cfg, device);
        let (mut ws, _) = connect(n.client, &token, Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        assert!(got.finished(), "{got:?}");
        tokens.push(token);
    }
    let admin = |n: &Node, method: &str, path: &str, body: &str| {
        let (status, answer) = http(n.admin, method, path, Some(crate::ADMIN), Some(body));
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    admin(
        &b,
        "POST",
        "/admin/revocations",
        r#"{"device_id":"stolen"}"#,
    );
    admin(
        &a,
        "POST",
        "/admin/accounts",
        &format!(r#"{{"id":"added","key":"{ADDED}"}}"#),
    );
    admin(
        &b,
        "POST",
        "/admin/accounts/a/rotate",
        &format!(r#"{{"key":"{ROTATED}","overlap":"1s"}}"#),
    );
    // The other node applies both changes (it read the sealed set).
    assert!(wait_until(Duration::from_secs(10), || {
        let (_, body) = http(a.admin, "GET", "/admin/accounts", Some(crate::ADMIN), None);
        body.contains("\"added\"") && b.log().contains("rotated") || a.log().contains("rotated")
    }));
    // Usage reaches Redis and is read back (the fleet's usage query).
    // Usage reaches Redis (within about a second of each stream's end)
    // and is read back by the fleet's usage query.
    assert!(wait_until(Duration::from_secs(10), || {
        let (_, usage) = http(a.admin, "GET", "/admin/usage", Some(crate::ADMIN), None);
        usage.contains("\"node-b\"") && usage.contains("\"streams\":3")
    }));
    let _ = monitor.kill();
    let _ = monitor.wait();
    let sent = std::fs::read_to_string(&seen).unwrap();
    assert!(sent.contains("clio:nodes"), "MONITOR saw the fleet's calls");
    assert!(sent.contains("\"AUTH\""), "MONITOR saw the log-in");
    let mut secrets = vec![
        KEY.to_string(),
        ADDED.to_string(),
        ROTATED.to_string(),
        PASSWORD.to_string(),
        crate::ADMIN.to_string(),
        crate::MASTER.to_string(),
        cfg.tokens.secret.expose().to_string(),
    ];
    secrets.extend(tokens);
    for (what, text) in [
        ("Redis", sent),
        ("node-a's log", a.log()),
        ("node-b's log", b.log()),
    ] {
        for s in &secrets {
            // A token's parts are checked too: its signature alone is a
            // secret's work.
            assert!(!text.contains(s.as_str()), "a secret reached {what}");
            if let Some(sig) = s.rsplit('.').next().filter(|p| p.len() >= 16) {
                assert!(!text.contains(sig), "a token's signature reached {what}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_wrong_redis_password_is_never_logged() {
    let redis = RedisServer::start();
    let ok = |r: String| assert!(r.starts_with("+OK"), "{r}");
    ok(redis.command(&format!("ACL SETUSER clio on >{PASSWORD} ~clio:* +@all")));
    let fake = fake(&[KEY], |_| {});
    let cfg = relay_config(&fake.url(), &[("a", KEY)]);
    let wrong = "wrong-redis-password-5d5d5d";
    let node = Node::try_spawn_with(
        &fake.url(),
        &redis.url(),
        "node-a",
        "15s",
        &cfg.tokens.secret,
        KEY,
        "username = \"clio\"\npassword_env = \"FLEET_REDIS_PW\"\n",
        &[("FLEET_REDIS_PW", wrong)],
    )
    .unwrap();
    // It says why it cannot use Redis, without the password.
    assert!(wait_until(Duration::from_secs(20), || node
        .log()
        .contains("cluster store")));
    let (_, metrics) = http(node.admin, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_cluster_store_up 0"),
        "{metrics}"
    );
    let (_, ready) = http(node.admin, "GET", "/readyz", None, None);
    for text in [node.log(), metrics, ready] {
        assert!(!text.contains(wrong) && !text.contains(PASSWORD), "{text}");
    }
}
