//! The admin account API: runtime accounts, enable/disable, limits,
//! rotation with overlap, the admin token and the allowlist.

use std::time::{Duration, Instant};

use clio_relay::core::secret::Secret;
use tungstenite::Message;

use crate::util::*;

const ADMIN: &str = "admin-token-for-tests-0123456789";

fn relay_with_admin(fake: &fake_soniox::FakeSoniox, accounts: &[(&str, &str)]) -> Relay {
    let mut cfg = relay_config(&fake.url(), accounts);
    cfg.admin.token = Some(Secret::new(ADMIN));
    Relay::start(cfg)
}

fn accounts_json(relay: &Relay) -> serde_json::Value {
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/accounts",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn one_session(relay: &Relay) -> Received {
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    stream_session(&mut ws, &config_message(None), &audio_frames(3, 9))
}

#[test]
fn without_the_admin_token_only_401() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let admin = relay.handle.admin_addr;
    assert_eq!(http(admin, "GET", "/admin/accounts", None, None).0, 401);
    assert_eq!(
        http(
            admin,
            "GET",
            "/admin/accounts",
            Some("wrong-token-wrong-token"),
            None
        )
        .0,
        401
    );
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some("x"),
        Some(r#"{"id":"z","key":"zz"}"#),
    );
    assert_eq!(status, 401);
    assert!(!body.contains("accounts\""), "nothing else: {body}");
    // A relay with no admin token configured refuses everyone.
    let plain = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    assert_eq!(
        http(
            plain.handle.admin_addr,
            "GET",
            "/admin/accounts",
            Some(ADMIN),
            None
        )
        .0,
        401
    );
}

#[test]
fn allowlist_drops_other_networks() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let relay = Relay::start(cfg);
    assert_eq!(
        http(relay.handle.admin_addr, "GET", "/healthz", None, None).0,
        0,
        "127.0.0.1 is not allowed"
    );
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let relay = Relay::start(cfg);
    assert_eq!(
        http(relay.handle.admin_addr, "GET", "/healthz", None, None).0,
        200
    );
}

#[test]
fn add_disable_enable_remove_at_runtime() {
    let fake = fake(&["k1", "k2"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let admin = relay.handle.admin_addr;
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"b","key":"k2","region":"eu","max_concurrent_streams":5}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("k2\""), "the key is never echoed: {body}");
    // Disable `a`: within a second every new stream goes to `b`.
    let (status, _) = http(
        admin,
        "POST",
        "/admin/accounts/a/disable",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200);
    let disabled_at = Instant::now();
    for _ in 0..4 {
        assert!(one_session(&relay).finished());
    }
    assert!(disabled_at.elapsed() < Duration::from_secs(10));
    let keys: Vec<_> = fake
        .sessions()
        .iter()
        .filter_map(|s| s.key.clone())
        .collect();
    assert_eq!(
        keys,
        vec!["k2"; 4],
        "a disabled account serves no new stream"
    );
    let list = accounts_json(&relay);
    let b = &list["accounts"][1];
    assert_eq!(
        (b["id"].as_str(), b["region"].as_str(), b["source"].as_str()),
        (Some("b"), Some("eu"), Some("store"))
    );
    assert_eq!(b["key"]["streams_total"], 4);
    assert_eq!(
        b["key"]["fingerprint"].as_str().unwrap(),
        Secret::new("k2").fingerprint()
    );
    // Enable `a`, remove `b`: streams go to `a` again.
    assert_eq!(
        http(admin, "POST", "/admin/accounts/a/enable", Some(ADMIN), None).0,
        200
    );
    assert_eq!(
        http(admin, "DELETE", "/admin/accounts/b", Some(ADMIN), None).0,
        200
    );
    assert!(one_session(&relay).finished());
    assert_eq!(fake.sessions().last().unwrap().key.as_deref(), Some("k1"));
    // Errors name the problem.
    assert_eq!(
        http(admin, "DELETE", "/admin/accounts/nope", Some(ADMIN), None).0,
        404
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(r#"{"id":"a","key":"k9"}"#)
        )
        .0,
        409
    );
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"c","key":"secret-in-bad-body","bogus":1}"#),
    );
    assert_eq!(status, 400);
    assert!(!body.contains("secret-in-bad-body"));
}

#[test]
fn limit_changes_apply_to_new_streams() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let admin = relay.handle.admin_addr;
    assert_eq!(
        http(
            admin,
            "POST",
            "/admin/accounts/a/limit",
            Some(ADMIN),
            Some(r#"{"max_concurrent_streams":1}"#)
        )
        .0,
        200
    );
    let (mut held, _) = connect(relay.addr(), &relay.token("d1"), Via::Header).unwrap();
    held.send(Message::text(config_message(None))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    let got = one_session(&relay);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1013))
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/admin/accounts/a/limit",
            Some(ADMIN),
            Some(r#"{"max_concurrent_streams":2}"#)
        )
        .0,
        200
    );
    assert!(one_session(&relay).finished());
}

/// The admin API's answer to a rotation means the new key takes every
/// stream opened after it. The shard reads the admin side's message on
/// its next pass (up to 5 ms while it has work); a stream that opened
/// before that took the old key. A stream kept busy on the shard (a frame
/// every 3 ms, so it never sleeps long) and a stream opened right after
/// each answer, forty times.
#[test]
fn every_stream_opened_after_a_rotation_takes_the_new_key() {
    let keys: Vec<String> = (0..=40).map(|i| format!("key-{i:02}")).collect();
    let all: Vec<&str> = keys.iter().map(String::as_str).collect();
    let fake = fake(&all, |_| {});
    let relay = relay_with_admin(&fake, &[("a", "key-00")]);
    let admin = relay.handle.admin_addr;
    let (mut busy, _) = connect(relay.addr(), &relay.token("busy"), Via::Header).unwrap();
    busy.send(Message::text(config_message(None))).unwrap();
    // Its upstream session comes first: the relay dials after its 101,
    // and a dial later than the first new stream's whole session made the
    // busy stream's the "last" session read below (its key the old one).
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let frame = audio_frames(1, 3).remove(0);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                busy.send(Message::binary(frame.clone())).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            busy
        })
    };
    let mut late = Vec::new();
    for key in &keys[1..] {
        let (status, body) = http(
            admin,
            "POST",
            "/admin/accounts/a/rotate",
            Some(ADMIN),
            Some(&format!(r#"{{"key":"{key}","overlap":"10m"}}"#)),
        );
        assert_eq!(status, 200, "{body}");
        assert!(one_session(&relay).finished());
        let took = fake.sessions().last().unwrap().key.clone().unwrap();
        if &took != key {
            late.push((key.clone(), took));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut busy = sender.join().unwrap();
    busy.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut busy).finished());
    assert!(late.is_empty(), "streams opened after a rotation's answer took the key before it (rotated to, took): {late:?}");
}

#[test]
fn rotation_under_a_live_stream_loses_no_frame() {
    let fake = fake(&["old-key", "new-key"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let admin = relay.handle.admin_addr;
    // A stream on the old key, half sent and seen upstream: its upstream
    // session is the first (the relay dials after its 101; on a loaded
    // host that dial came after the whole of the new stream's below, and
    // the sessions' order, which the checks read, was the other way).
    let frames = audio_frames(40, 5);
    let mut live = half_a_raw_stream(&relay, &fake, &frames);
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts/a/rotate",
        Some(ADMIN),
        Some(r#"{"key":"new-key","overlap":"10m"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let list = accounts_json(&relay);
    let retiring = &list["accounts"][0]["retiring_keys"][0];
    assert_eq!(
        retiring["fingerprint"].as_str().unwrap(),
        Secret::new("old-key").fingerprint()
    );
    assert_eq!(
        retiring["live_streams"], 1,
        "the old key still carries the live stream"
    );
    // New streams take the new key at once.
    assert!(one_session(&relay).finished());
    assert_eq!(
        fake.sessions().last().unwrap().key.as_deref(),
        Some("new-key")
    );
    // The live stream finishes on the old key, every byte in order.
    for f in &frames[20..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut live);
    assert!(got.finished(), "{got:?}");
    let first = &fake.sessions()[0];
    assert_eq!(first.key.as_deref(), Some("old-key"));
    assert_eq!(first.audio, frames.concat());
    // Metrics show streams per key, labelled by fingerprint only.
    let (_, metrics) = http(admin, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_key_streams_active{account=\"a\""),
        "{metrics}"
    );
    assert!(!metrics.contains("old-key") && !metrics.contains("new-key"));
    // Its streams ended: the old key is retired at the next housekeeping pass.
    assert!(wait_until(Duration::from_secs(5), || {
        accounts_json(&relay)["accounts"][0]["retiring_keys"]
            .as_array()
            .unwrap()
            .is_empty()
    }));
}

/// A directory with a `relay.toml` naming `relay`'s admin port, and a
/// runner of `clio-relay keys ARGS` with it: exit status and output.
fn keys_cli(
    relay: &Relay,
    name: &str,
) -> (
    std::path::PathBuf,
    impl Fn(&[&str]) -> (Option<i32>, String),
) {
    let dir = std::env::temp_dir().join(format!("clio-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nadmin_listen = \"{}\"\n[tokens]\nsecret_env = \"CLI_TEST_TOKEN_SECRET\"\n[admin]\ntoken_env = \"CLI_TEST_ADMIN\"\n",
            relay.handle.admin_addr
        ),
    )
    .unwrap();
    let run = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
            .args(["--config", cfg.to_str().unwrap(), "keys"])
            .args(args)
            .env("CLI_TEST_ADMIN", ADMIN)
            .env("CLI_TEST_NEW_KEY", "k2")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    (dir, run)
}

#[test]
fn keys_cli_talks_to_a_running_relay() {
    let fake = fake(&["k1", "k2"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let (dir, run) = keys_cli(&relay, "keys-cli");
    let (code, out) = run(&["list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&Secret::new("k1").fingerprint()) && out.starts_with("ACCOUNT"),
        "{out}"
    );
    let (code, out) = run(&[
        "add",
        "--id",
        "b",
        "--region",
        "eu",
        "--key-env",
        "CLI_TEST_NEW_KEY",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&Secret::new("k2").fingerprint()), "{out}");
    assert_eq!(run(&["disable", "a"]).0, Some(0));
    assert!(one_session(&relay).finished());
    assert_eq!(fake.sessions().last().unwrap().key.as_deref(), Some("k2"));
    // The admin API answered and refused: exit status 6.
    let (code, out) = run(&["remove", "nope"]);
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("404"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `keys` sends only an account id the admin API takes (1-64 of
/// `[A-Za-z0-9._-]`): anything else is a command-line error (exit 2)
/// naming the rule, and the relay is not asked. Before, the id was pasted
/// into the request's path as typed: `remove 'a?'` removed account `a`
/// (the `?` began a query), `enable 'b/disable?'` disabled `b`, and
/// `enable 'a b'` failed as "admin API at …: bad request target", exit 5,
/// as if the relay could not be reached.
#[test]
fn keys_cli_refuses_an_account_id_the_api_would_not_take() {
    let fake = fake(&["k1", "k2"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1"), ("b", "k2")]);
    let (dir, run) = keys_cli(&relay, "keys-ids");
    for args in [
        &["remove", "a?"][..],
        &["enable", "b/disable?"],
        &["disable", "a b"],
        &["disable", "a/"],
        &["limit", "a?x", "5"],
        &["rotate", "b?", "--key-env", "CLI_TEST_NEW_KEY"],
        &["remove", ""],
    ] {
        let (code, out) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(out.contains("1-64 of A-Z a-z 0-9 . _ -"), "{args:?}: {out}");
    }
    let v = accounts_json(&relay);
    let ids: Vec<(&str, bool)> = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), a["enabled"] == true))
        .collect();
    assert_eq!(ids, [("a", true), ("b", true)], "{v}");
    assert_eq!(run(&["disable", "a"]).0, Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

/// The admin token `keys` presents is trimmed, as the relay trims a
/// presented token: one read from a variable with a trailing newline
/// (`kubectl create secret --from-file`, a CRLF EnvironmentFile) lets it
/// in. Before, `keys` refused to send it and exited 5, "admin API at …:
/// bad request: bad bearer token", as if the relay could not be reached.
#[test]
fn keys_cli_trims_the_admin_token_it_presents() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let (dir, _) = keys_cli(&relay, "keys-trim");
    for token in [
        format!("{ADMIN}\n"),
        format!("{ADMIN}\r\n"),
        format!(" {ADMIN}"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
            .args(["--config", dir.join("relay.toml").to_str().unwrap()])
            .args(["keys", "list"])
            .env("CLI_TEST_ADMIN", &token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{token:?}: {text}");
        assert!(text.starts_with("ACCOUNT"), "{text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `admin.allow` leaving out the host `keys` runs on: the admin port
/// closes the connection unanswered, and `keys` says what to look at.
#[test]
fn keys_cli_names_the_allowlist_when_the_admin_port_hangs_up() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let relay = Relay::start(cfg);
    let (dir, run) = keys_cli(&relay, "keys-allow");
    let (code, out) = run(&["list"]);
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("admin.allow"), "{out}");
    assert!(!out.contains(ADMIN), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn runtime_changes_survive_a_restart_in_the_encrypted_store() {
    // A key long enough that random ciphertext cannot contain it by chance
    // (a 2-byte key did, about once in 60 runs).
    const K2: &str = "runtime-key-two-held-only-encrypted";
    let fake = fake(&["k1", K2, "k3"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("c", "k3")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new("0123456789abcdef".repeat(4)));
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    assert_eq!(
        http(
            admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(&format!(r#"{{"id":"b","key":"{K2}","region":"eu"}}"#))
        )
        .0,
        200
    );
    assert_eq!(
        http(
            admin,
            "POST",
            "/admin/accounts/a/disable",
            Some(ADMIN),
            None
        )
        .0,
        200
    );
    assert_eq!(
        http(admin, "DELETE", "/admin/accounts/c", Some(ADMIN), None).0,
        200
    );
    drop(relay);
    // The store holds the key encrypted: not in the file's bytes.
    let bytes = std::fs::read(cfg.admin.state_dir.join("accounts.store")).unwrap();
    assert!(
        !bytes.windows(K2.len()).any(|w| w == K2.as_bytes()),
        "the key is not stored in the clear"
    );

    let relay = Relay::start(cfg.clone());
    let list = accounts_json(&relay);
    let ids: Vec<_> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["enabled"].as_bool().unwrap(),
                a["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            ("a".into(), false, "config".into()),
            ("b".into(), true, "store".into())
        ],
        "{list}"
    );
    assert!(one_session(&relay).finished());
    assert_eq!(fake.sessions().last().unwrap().key.as_deref(), Some(K2));
    drop(relay);

    // The wrong master key: the relay refuses to start, and says why.
    let mut wrong = cfg.clone();
    wrong.admin.master_key = Some(Secret::new("f".repeat(64)));
    let err = clio_relay::cli::server::start(&wrong)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key store") && !err.contains(&"f".repeat(64)),
        "{err}"
    );
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// The key store changed under a running relay (removed, or an older
/// copy restored, by hand): the next account change writes the running
/// set over it, so every change is saved and a restart loses none. Before,
/// each save was refused as a conflict ("generation 0 on disk, 1 given;
/// reload and try again"), every later change was answered 500 "applied,
/// but not saved" (a reload did not help), and a restart lost them all.
#[test]
fn a_key_store_changed_under_the_relay_is_written_over_at_the_next_change() {
    let fake = fake(&["k1", "k2", "k3"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new("0123456789abcdef".repeat(4)));
    let store = cfg.admin.state_dir.join("accounts.store");
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    let change = |method: &str, path: &str, body: Option<&str>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    change("POST", "/admin/accounts", Some(r#"{"id":"b","key":"k2"}"#));
    let older = std::fs::read(&store).unwrap();
    // Removed by hand.
    std::fs::remove_file(&store).unwrap();
    change("POST", "/admin/accounts/a/disable", None);
    // An older copy put back.
    change("POST", "/admin/accounts", Some(r#"{"id":"c","key":"k3"}"#));
    std::fs::write(&store, &older).unwrap();
    change(
        "POST",
        "/admin/accounts/b/limit",
        Some(r#"{"max_concurrent_streams":7}"#),
    );
    drop(relay);

    let relay = Relay::start(cfg.clone());
    let list = accounts_json(&relay);
    let seen: Vec<_> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["enabled"].as_bool().unwrap(),
                a["max_concurrent_streams"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), false, 10),
            ("b".into(), true, 7),
            ("c".into(), true, 10)
        ],
        "{list}"
    );
    drop(relay);
    std::fs::remove_dir_all(&cfg.admin.state_dir).ok();
}

/// A state directory removed under a running relay (a clean-up script, a
/// mistaken `rm -rf`, moved aside) took the key store with it: nothing
/// wrote it again until an account change, and that change was answered
/// 500, the directory missing for the store's lock; a restart then lost
/// every runtime change, and an account whose key was pulled at runtime
/// came back from the config file with that key. The relay now finds the
/// store gone within a second and writes its running set again.
#[test]
fn a_key_store_removed_under_the_relay_is_written_again() {
    let fake = fake(&["k1", "k2", "k3"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new("0123456789abcdef".repeat(4)));
    let dir = cfg.admin.state_dir.clone();
    let store = dir.join("accounts.store");
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    let change = |method: &str, path: &str, body: Option<&str>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    change("POST", "/admin/accounts", Some(r#"{"id":"b","key":"k2"}"#));
    // The config file's account, its key pulled.
    change("DELETE", "/admin/accounts/a", None);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store.exists()),
        "the key store is not back in {}",
        dir.display()
    );
    drop(relay);
    let ids = |relay: &Relay| -> Vec<String> {
        accounts_json(relay)["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_string())
            .collect()
    };
    let relay = Relay::start(cfg.clone());
    assert_eq!(ids(&relay), vec!["b".to_string()]);
    // And a change made with the directory gone is saved.
    std::fs::remove_dir_all(&dir).unwrap();
    let admin = relay.handle.admin_addr;
    let (status, answer) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"c","key":"k3"}"#),
    );
    assert_eq!(status, 200, "{answer}");
    drop(relay);
    let relay = Relay::start(cfg.clone());
    assert_eq!(ids(&relay), vec!["b".to_string(), "c".to_string()]);
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// A key store file damaged under a running relay (written over by
/// hand, cut short) is kept aside and the next account change writes the
/// running set, so the change is saved and the next start opens the
/// store. Before, every later change was answered 500 "applied, but not
/// saved … key store is damaged", and the next start failed on the
/// damaged file (exit 1), the changes lost with it.
#[test]
fn a_key_store_damaged_under_the_relay_is_kept_aside_and_written_anew() {
    let fake = fake(&["k1", "k2"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new("0123456789abcdef".repeat(4)));
    let dir = cfg.admin.state_dir.clone();
    let store = dir.join("accounts.store");
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    let change = |method: &str, path: &str, body: Option<&str>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    change("POST", "/admin/accounts", Some(r#"{"id":"b","key":"k2"}"#));
    let mut damaged = std::fs::read(&store).unwrap();
    damaged.truncate(damaged.len() / 2);
    std::fs::write(&store, &damaged).unwrap();
    change("POST", "/admin/accounts/a/disable", None);
    drop(relay);
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("accounts.store.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), damaged);

    let relay = Relay::start(cfg.clone());
    let list = accounts_json(&relay);
    let seen: Vec<_> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap().to_string(), a["enabled"] == true))
        .collect();
    assert_eq!(
        seen,
        vec![("a".into(), false), ("b".into(), true)],
        "{list}"
    );
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// Rotates account `a` to `new-key` with `overlap` ("1s").
fn rotate_to_new_key(relay: &Relay, overlap: &str) {
    let (status, _) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/accounts/a/rotate",
        Some(ADMIN),
        Some(&format!(r#"{{"key":"new-key","overlap":"{overlap}"}}"#)),
    );
    assert_eq!(status, 200);
}

/// Checks that the client saw one whole stream, no error, while upstream
/// had two sessions (the move); returns them once both are closed.
fn seen_as_one_stream(
    fake: &fake_soniox::FakeSoniox,
    got: Received,
) -> Vec<fake_soniox::SessionRecord> {
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished() && !got.abrupt, "{got:?}");
    assert!(fake.wait_for(Duration::from_secs(20), |s| s.len() == 2
        && s.iter().all(|r| r.closed)));
    fake.sessions()
}

/// A raw-audio stream with its config and the first half of `frames` sent
/// and seen upstream, on one session.
fn half_a_raw_stream(relay: &Relay, fake: &fake_soniox::FakeSoniox, frames: &[Vec<u8>]) -> Ws {
    let (mut live, _) = connect(relay.addr(), &relay.token("d1"), Via::Header).unwrap();
    live.send(Message::text(config_message(None))).unwrap();
    let half = frames.len() / 2;
    for f in &frames[..half] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == half as u64));
    live
}

fn retired(relay: &Relay) -> bool {
    wait_until(Duration::from_secs(5), || {
        accounts_json(relay)["accounts"][0]["retiring_keys"]
            .as_array()
            .unwrap()
            .is_empty()
    })
}

#[test]
fn raw_audio_on_a_key_whose_overlap_ends_moves_to_the_new_key_unseen() {
    let fake = fake(&["old-key", "new-key"], |c| c.record_audio = true);
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let frames = audio_frames(10, 1);
    let mut live = half_a_raw_stream(&relay, &fake, &frames);
    rotate_to_new_key(&relay, "1s");
    // After the overlap the stream is resumed on a connection with the
    // new key; the client sees nothing of it.
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 2));
    for f in &frames[5..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::new())).unwrap();
    let s = seen_as_one_stream(&fake, read_all(&mut live));
    assert_eq!(s[1].key.as_deref(), Some("new-key"));
    assert!(s[1].audio.ends_with(&frames[5..].concat()));
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
    // Not counted as an upstream failure.
    assert_eq!(relay.handle.metrics().failovers().mid_lost, 0);
    assert!(retired(&relay));
    // README: streams_total counts upstream sessions, so the move counts
    // again on the account; the usage ledger counts the client's stream once.
    let m = relay.handle.metrics();
    assert_eq!(m.streams_total(), 2);
    assert_eq!(m.account("a").unwrap().streams_total, 2);
    let usage = || {
        let (status, body) = http(
            relay.handle.admin_addr,
            "GET",
            "/admin/usage?group_by=account",
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["rows"][0]["streams"].clone()
    };
    assert!(
        wait_until(Duration::from_secs(10), || usage() == 1),
        "{}",
        usage()
    );
}

#[test]
fn a_stream_still_opening_on_a_key_retired_meanwhile_moves_once_it_flows() {
    // Upgrades are answered 3 s late: the stream picks the old key, and
    // while it waits for upstream the key is rotated out with no overlap
    // (pulled) and its streams told to leave; the stream leaves it as soon
    // as it is open.
    let fake = fake(&["old-key", "new-key"], |c| {
        c.faults.handshake_delay = Duration::from_secs(3);
    });
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let (mut live, _) = connect(relay.addr(), &relay.token("d1"), Via::Header).unwrap();
    // The shard picks the account after its 101, on its own thread: the
    // rotation (the admin thread's) waits for that pick, not for a time.
    assert!(wait_until(Duration::from_secs(10), || relay
        .account_live(0)
        == 1));
    rotate_to_new_key(&relay, "0s");
    let frames = audio_frames(10, 2);
    let got = stream_session(&mut live, &config_message(None), &frames);
    let s = seen_as_one_stream(&fake, got);
    assert_eq!(s[0].key.as_deref(), Some("old-key"));
    assert_eq!(s[1].key.as_deref(), Some("new-key"));
    assert!(retired(&relay));
}

#[test]
fn other_streams_on_a_key_whose_overlap_ends_are_finalized_and_told_to_reconnect() {
    let fake = fake(&["old-key", "new-key"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let (mut live, _) = connect(relay.addr(), &relay.token("d1"), Via::Header).unwrap();
    // A compressed format cannot be resumed mid-stream.
    let config = config_message(None).replace("pcm_s16le", "mp3");
    live.send(Message::text(config)).unwrap();
    for f in audio_frames(5, 1) {
        live.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 5));
    rotate_to_new_key(&relay, "1s");
    // After the overlap: the final tokens, then "reconnect" (503) and 1012.
    let got = read_all(&mut live);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(503), Some(1012)),
        "{got:?}"
    );
    assert!(
        got.messages.iter().any(|m| m["error_message"]
            .as_str()
            .is_some_and(|t| t.contains("key was retired"))),
        "{got:?}"
    );
    assert!(
        got.messages.iter().any(|m| m["tokens"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"))),
        "{got:?}"
    );
    // The client reconnects: onto the new key. The old key is retired.
    assert!(one_session(&relay).finished());
    assert_eq!(
        fake.sessions().last().unwrap().key.as_deref(),
        Some("new-key")
    );
    assert!(retired(&relay));
}

#[test]
fn a_key_that_cannot_go_in_a_header_is_refused() {
    // A key goes in the upgrade's Authorization header: a line break would
    // end the header (and add what follows to the request), a space or a
    // pasted newline would make Soniox refuse it at every stream.
    let fake = fake(&["old-key"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let admin = relay.handle.admin_addr;
    for key in [
        r#""k1\n""#,
        r#""k1\r\nX-Extra: 1""#,
        r#""k 1""#,
        r#""k\u00e9""#,
    ] {
        let (status, body) = http(
            admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(&format!(r#"{{"id":"b","key":{key}}}"#)),
        );
        assert_eq!(status, 400, "{key}: {body}");
        assert!(body.contains("HTTP header"), "{body}");
        let (status, body) = http(
            admin,
            "POST",
            "/admin/accounts/a/rotate",
            Some(ADMIN),
            Some(&format!(r#"{{"key":{key}}}"#)),
        );
        assert_eq!(status, 400, "{key}: {body}");
    }
    assert_eq!(
        accounts_json(&relay)["accounts"].as_array().unwrap().len(),
        1
    );
    assert!(one_session(&relay).finished());
}

/// The runbook for a compromised key: disable the account, then rotate
/// with no overlap. A raw-audio stream on it moves to another account (the
/// disabled one takes no stream, whatever its key), unseen.
#[test]
fn a_pulled_key_of_a_disabled_account_moves_its_streams_to_another_account() {
    let fake = fake(&["old-key", "new-key", "key-b"], |c| c.record_audio = true);
    let relay = relay_with_admin(&fake, &[("a", "old-key"), ("b", "key-b")]);
    // Either account may take the stream; the test follows the one that did.
    let frames = audio_frames(10, 1);
    let mut live = half_a_raw_stream(&relay, &fake, &frames);
    let first_key = fake.sessions()[0].key.clone().unwrap();
    let (id, other) = if first_key == "old-key" {
        ("a", "key-b")
    } else {
        ("b", "old-key")
    };
    let (status, _) = http(
        relay.handle.admin_addr,
        "POST",
        &format!("/admin/accounts/{id}/disable"),
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200);
    let (status, _) = http(
        relay.handle.admin_addr,
        "POST",
        &format!("/admin/accounts/{id}/rotate"),
        Some(ADMIN),
        Some(r#"{"key":"new-key","overlap":"0s"}"#),
    );
    assert_eq!(status, 200);
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 2));
    for f in &frames[5..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::new())).unwrap();
    let s = seen_as_one_stream(&fake, read_all(&mut live));
    assert_eq!(s[1].key.as_deref(), Some(other), "{s:?}");
    assert!(s[1].audio.ends_with(&frames[5..].concat()));
}

#[test]
fn an_overlap_too_long_to_add_to_the_clock_keeps_the_old_key_for_its_streams() {
    // `now + overlap` overflowed: a panic on the admin thread in a debug
    // build, and in a release build a retire time in the past, so the key
    // asked to stay "forever" was pulled at once and its streams moved.
    let fake = fake(&["old-key", "new-key"], |c| c.record_audio = true);
    let relay = relay_with_admin(&fake, &[("a", "old-key")]);
    let frames = audio_frames(10, 1);
    let mut live = half_a_raw_stream(&relay, &fake, &frames);
    rotate_to_new_key(&relay, &format!("{}s", u64::MAX));
    let a = &accounts_json(&relay)["accounts"][0];
    let retiring = &a["retiring_keys"][0];
    assert_eq!(retiring["overdue"], false, "{a}");
    assert!(
        retiring["retire_at"].as_u64().unwrap() > 4_000_000_000,
        "{a}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    for f in &frames[5..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::new())).unwrap();
    let got = read_all(&mut live);
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    let s = fake.sessions();
    assert_eq!(s.len(), 1, "the stream stayed on its key: {s:?}");
    assert_eq!(s[0].key.as_deref(), Some("old-key"));
}

/// `/v1/config` and its ETag.
fn remote_config(relay: &Relay) -> (String, String) {
    let (status, head, body) = http_get(relay.handle.admin_addr, "/v1/config", "");
    assert_eq!(status, 200, "{head}");
    (header_of(&head, "etag").expect("an ETag"), body)
}

#[test]
fn the_remote_config_and_its_etag_say_nothing_of_keys() {
    // README: the ETag changes with what the document says (accounts,
    // enabled, region, pool), and a key rotation or a limit leaves it: an
    // app polling /v1/config learns nothing of keys, not even that one
    // was rotated, and is not sent the whole document again for it.
    let fake = fake(&["key-a", "key-b", "new-key"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "key-a"), ("b", "key-b")]);
    let post = |path: &str, body: Option<&str>| {
        let (status, answer) = http(relay.handle.admin_addr, "POST", path, Some(ADMIN), body);
        assert_eq!(status, 200, "{path}: {answer}");
        remote_config(&relay)
    };
    // A live stream on `a`'s key, which the rotation below retires.
    post("/admin/accounts/b/disable", None);
    let mut live = connect(relay.addr(), &relay.token("dev"), Via::Header)
        .unwrap()
        .0;
    live.send(Message::text(config_message(None))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .sessions()
        .iter()
        .any(|s| s.key.as_deref() == Some("key-a"))));
    let before = post("/admin/accounts/b/enable", None);
    let old = accounts_json(&relay)["accounts"][0]["key"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    rotate_to_new_key(&relay, "10m");
    let accounts = accounts_json(&relay);
    let new = accounts["accounts"][0]["key"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(old, new);
    let retiring = &accounts["accounts"][0]["retiring_keys"][0];
    assert_eq!(retiring["fingerprint"], old.as_str(), "{accounts}");
    assert_eq!(retiring["live_streams"], 1, "{accounts}");
    let after = post(
        "/admin/accounts/a/limit",
        Some(r#"{"max_concurrent_streams":3}"#),
    );
    assert_eq!(after, before, "a rotation or a limit changed /v1/config");
    for needle in ["key-a", "new-key", old.as_str(), new.as_str()] {
        assert!(!after.1.contains(needle), "{needle} in {}", after.1);
    }
    // Disabling an account is news to the app: a new ETag, and the old
    // one back once it is enabled again.
    let disabled = post("/admin/accounts/b/disable", None);
    assert_ne!(disabled.0, before.0);
    assert!(
        disabled.1.contains(r#""isEnabled":false"#),
        "{}",
        disabled.1
    );
    assert_eq!(post("/admin/accounts/b/enable", None), before);
    drop(live);
}

/// An account removed while streams run on it and added again under the
/// same id counts those streams against its limit: they go on to their
/// end on the same key, so the limit (the key's at Soniox) holds across
/// the change. (Before, the account came back counting 0, and took
/// `max_concurrent_streams` more streams beside them.)
#[test]
fn an_account_removed_and_added_again_counts_the_streams_still_on_it() {
    let fake = fake(&["k1"], |_| {});
    let relay = relay_with_admin(&fake, &[("a", "k1")]);
    let admin = relay.handle.admin_addr;
    let change = |method: &str, path: &str, body: Option<&str>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    change(
        "POST",
        "/admin/accounts/a/limit",
        Some(r#"{"max_concurrent_streams":2}"#),
    );
    let open = |device: &str| {
        let (mut ws, _) = connect(relay.addr(), &relay.token(device), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        ws
    };
    let first = open("d1");
    let _second = open("d2");
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 2));
    change("DELETE", "/admin/accounts/a", None);
    change(
        "POST",
        "/admin/accounts",
        Some(r#"{"id":"a","key":"k1","max_concurrent_streams":2}"#),
    );
    let got = one_session(&relay);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(429), Some(1013)),
        "2 streams still run on a: {got:?}"
    );
    assert_eq!(
        fake.active_streams(),
        2,
        "never more than the limit upstream"
    );
    let live = &accounts_json(&relay)["accounts"][0];
    assert_eq!(live["live_streams"], 2, "{live}");
    // One ends: its slot is the account's again.
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == 1));
    assert!(one_session(&relay).finished());
}

/// A key pulled (rotated out with no overlap) and its account removed
/// within the same second: the pull still moves the key's streams off it
/// within a second, here to the pool's other account, unseen by the
/// client. The removal lets an account's streams go on, but on its
/// current key; a rotated-out key keeps its retire time. Before, the
/// removal dropped the account's rotated-out keys from the relay's
/// watch: the stream ran on the pulled key to its end. An account a
/// reload moved to another pool lost its rotated-out keys the same way.
#[test]
fn a_pulled_key_of_an_account_removed_at_once_still_has_its_streams_moved() {
    let fake = fake(&["old-key", "new-key", "b-key"], |c| c.record_audio = true);
    let mut cfg = relay_config(&fake.url(), &[("a", "old-key"), ("b", "b-key")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    // The stream opens on "a", the account with the most room.
    cfg.accounts[1].max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let frames = audio_frames(10, 1);
    let mut live = half_a_raw_stream(&relay, &fake, &frames);
    assert_eq!(fake.sessions()[0].key.as_deref(), Some("old-key"));
    rotate_to_new_key(&relay, "0s");
    let (status, body) = http(
        relay.handle.admin_addr,
        "DELETE",
        "/admin/accounts/a",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        fake.wait_for(Duration::from_secs(20), |s| s.len() == 2),
        "the stream stayed on the pulled key: {:?}",
        fake.sessions()
            .iter()
            .map(|s| (s.key.clone(), s.audio_frames, s.closed))
            .collect::<Vec<_>>()
    );
    for f in &frames[5..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::new())).unwrap();
    let s = seen_as_one_stream(&fake, read_all(&mut live));
    assert_eq!(s[1].key.as_deref(), Some("b-key"));
    assert!(s[1].audio.ends_with(&frames[5..].concat()));
}
