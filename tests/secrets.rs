//! Keys and tokens never appear in logs, metrics or error messages.
//!
//! Its own test binary, because it installs a process-wide log subscriber at
//! TRACE level that captures everything the relay logs.

#[path = "relay/util.rs"]
#[allow(dead_code)]
mod util;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clio_relay::core::secret::Secret;
use util::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process's log, captured at TRACE (installed once for every test).
/// Everything except the test's own WebSocket client library (tungstenite
/// logs the requests it sends, and the test client sends tokens).
fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "trace,tungstenite=off,async_tungstenite=off",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        capture
    })
}

/// Panics naming the first of `needles` found in any of `texts`.
fn assert_absent(texts: &[(&str, &str)], needles: &[(&str, &str)]) {
    for (what, text) in texts {
        for (name, needle) in needles {
            if let Some(at) = text.find(needle) {
                panic!(
                    "{name} appears in {what}: ...{}...",
                    &text[at.saturating_sub(300)..at]
                );
            }
        }
    }
}

/// The whole answer to a GET: head lines and body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, head, body) = util::http_get(addr, path, "");
    assert_ne!(status, 0, "{head}");
    format!("{head}\r\n\r\n{body}")
}

#[test]
fn keys_and_tokens_never_leak() {
    let capture = logs();

    const BAD_KEY: &str = "sk-refused-4f8a1c2e9b7d";
    const GOOD_KEY: &str = "sk-accepted-7c3e5a9d1f0b";
    let fake = fake(&[GOOD_KEY], |c| c.faults.close_after_frames = Some(30));
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("refused", BAD_KEY), ("accepted", GOOD_KEY)],
    ));
    let token = relay.token("device-secret-test");
    let mut seen_by_clients = String::new();

    // 1. A session whose first account is refused (401) and whose upstream
    // dies mid-stream: the relay resumes it on a new connection (and logs it).
    let (mut ws, resp) = connect(relay.addr(), &token, Via::Header).unwrap();
    seen_by_clients.push_str(&format!("{:?}", resp.headers()));
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(40, 3));
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    seen_by_clients.push_str(&format!("{got:?}"));

    // 2. A full normal session with the token in the first message.
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(&mut ws, &config_message(Some(&token)), &audio_frames(5, 4));
    assert!(got.finished());
    seen_by_clients.push_str(&format!("{got:?}"));

    // 3. A tampered token: refused before the upgrade.
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    match connect(relay.addr(), &tampered, Via::Header) {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            seen_by_clients.push_str(&String::from_utf8_lossy(
                resp.body().as_deref().unwrap_or_default(),
            ));
        }
        other => panic!("tampered token accepted: {other:?}"),
    }

    let metrics = http_get(relay.handle.admin_addr, "/metrics");
    let remote = http_get(relay.handle.admin_addr, "/v1/config");
    assert!(metrics.contains("clio_relay_streams_total"));
    let summary = format!("{:?} {:?}", relay.cfg, relay.handle.process);
    std::thread::sleep(Duration::from_millis(200));
    let logs = capture.text();
    assert!(logs.contains("refused"), "the refusal was logged: {logs}");

    let secret = relay.cfg.tokens.secret.expose().to_string();
    for (what, text) in [
        ("logs", &logs),
        ("client", &seen_by_clients),
        ("metrics", &metrics),
        ("remote config", &remote),
        ("Debug", &summary),
    ] {
        for (name, needle) in [
            ("good key", GOOD_KEY),
            ("bad key", BAD_KEY),
            ("token", token.as_str()),
            ("tampered token", tampered.as_str()),
            ("token secret", secret.as_str()),
        ] {
            if let Some(at) = text.find(needle) {
                panic!(
                    "{name} appears in {what}: ...{}...",
                    &text[at.saturating_sub(300)..at]
                );
            }
        }
        // Not even the signature part of a token.
        let sig = token.rsplit('.').next().unwrap();
        assert!(!text.contains(sig), "token signature appears in {what}");
    }
}

#[test]
fn the_admin_api_never_echoes_a_key_or_a_secret() {
    let capture = logs();
    const KEY: &str = "sk-adm-current-5e1d7a";
    const NEW_KEY: &str = "sk-adm-rotated-3b9c0f";
    const ADDED_KEY: &str = "sk-adm-added-8d2e6a";
    const ADMIN: &str = "admin-token-secret-test-0123456789";
    const MASTER: &str = "5eb63bbbe01eeed093cb22bb8f5acdc35eb63bbbe01eeed093cb22bb8f5acdc3";
    let fake = fake(&[KEY, NEW_KEY, ADDED_KEY], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct", KEY)]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.master_key = Some(Secret::new(MASTER));
    // Health checks on: they send every key to the fake's REST API.
    cfg.admin.health_interval = Duration::from_millis(300);
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let token = relay.token("device-admin-secrets");
    let call = |method: &str, path: &str, body: &str| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), Some(body));
        assert_ne!(status, 0, "{method} {path}");
        format!("{status} {answer}\n")
    };
    let mut seen = String::new();

    // Refused changes whose bodies hold a key, each key with its own tag:
    // malformed keys, keys next to a malformed or wrong field, keys in
    // bodies refused for something else.
    let refused = [
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m1","key":"sk-leaktag01 space"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            "{\"id\":\"m2\",\"key\":\"sk-leaktag02-\u{fc}\"}".to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m3","key":"sk-leaktag03\r\nX-Evil: 1"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m4","key":"sk-leaktag04","enabled":"sk-leaktag05"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m5","key":"sk-leaktag06""#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m6","key":"sk-leaktag07","sk-leaktag08":1}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m7","key":"sk-leaktag09","key":"sk-leaktag10"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"bad id","key":"sk-leaktag11"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"acct","key":"sk-leaktag12"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m8","key":"sk-leaktag13","pool":"nope"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m9","key":"sk-leaktag14","max_concurrent_streams":-1}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            r#"{"id":"m10","key":"sk-leaktag15","max_concurrent_streams":0}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts",
            format!(
                r#"{{"id":"m11","key":"sk-leaktag16","region":{}}}"#,
                "[".repeat(500) + &"]".repeat(500)
            ),
        ),
        (
            "POST",
            "/admin/accounts/acct/rotate",
            r#"{"key":"sk-leaktag17	tab"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts/acct/rotate",
            format!(r#"{{"key":"{KEY}"}}"#),
        ),
        (
            "POST",
            "/admin/accounts/nope/rotate",
            r#"{"key":"sk-leaktag18"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts/acct/rotate",
            r#"{"key":"sk-leaktag19","overlap":"soon"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts/acct/rotate",
            r#"{"key":"sk-leaktag20","overlap":5}"#.to_string(),
        ),
        (
            "POST",
            "/admin/accounts/acct/limit",
            r#"{"max_concurrent_streams":5,"key":"sk-leaktag21"}"#.to_string(),
        ),
        (
            "POST",
            "/admin/revocations",
            format!(r#"{{"device_id":"{token}"}}"#),
        ),
        (
            "POST",
            "/admin/revocations",
            format!(r#"{{"token_id":"{token}"}}"#),
        ),
        (
            "DELETE",
            "/admin/revocations",
            format!(r#"{{"token_id":"{token}"}}"#),
        ),
    ];
    for (method, path, body) in &refused {
        let answer = call(method, path, body);
        assert!(answer.starts_with('4'), "{method} {path} {body}: {answer}");
        seen.push_str(&answer);
    }
    // A wrong admin token close to the right one, and the right one in
    // the wrong place.
    for auth in [
        format!("Bearer {ADMIN}x"),
        format!("Basic {ADMIN}"),
        ADMIN.to_string(),
    ] {
        let (status, head, body) =
            util::http_get(admin, "/admin/accounts", &format!("Authorization: {auth}"));
        assert_eq!(status, 401, "{head}");
        seen.push_str(&format!("{head}\r\n\r\n{body}"));
    }

    // Changes that apply: an account added, a key rotated, a stream on it.
    seen.push_str(&call(
        "POST",
        "/admin/accounts",
        &format!(r#"{{"id":"added","key":"{ADDED_KEY}","enabled":false}}"#),
    ));
    seen.push_str(&call(
        "POST",
        "/admin/accounts/acct/rotate",
        &format!(r#"{{"key":"{NEW_KEY}","overlap":"1s"}}"#),
    ));
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 2));
    assert!(got.finished(), "{got:?}");
    seen.push_str(&format!("{got:?}"));
    std::thread::sleep(Duration::from_millis(1500));
    for path in [
        "/admin/accounts",
        "/admin/stats",
        "/admin/usage",
        "/admin/revocations",
        "/admin/reconciliation",
    ] {
        let (status, body) = http(admin, "GET", path, Some(ADMIN), None);
        assert_eq!(status, 200, "{path}: {body}");
        seen.push_str(&body);
    }
    assert!(seen.contains("\"added\""), "{seen}");
    let pages = ["/metrics", "/dashboard", "/v1/config", "/readyz"]
        .map(|path| http_get(admin, path))
        .join("\n");
    // The state directory: the key store is sealed, the rest holds
    // fingerprints and figures only.
    std::thread::sleep(Duration::from_millis(200));
    let mut state = String::new();
    for entry in std::fs::read_dir(&relay.cfg.admin.state_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        state.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(!state.is_empty());
    let logs = capture.text();
    assert!(logs.contains("admin change applied"), "{logs}");
    let debug = format!("{:?} {:?}", relay.cfg, relay.handle.process);

    let secret = relay.cfg.tokens.secret.expose().to_string();
    let tags: Vec<String> = (1..=21).map(|n| format!("leaktag{n:02}")).collect();
    let sig = token.rsplit('.').next().unwrap().to_string();
    let mut needles = vec![
        ("a key", KEY),
        ("the rotated-in key", NEW_KEY),
        ("the added key", ADDED_KEY),
        ("the admin token", ADMIN),
        ("the master key", MASTER),
        ("the token secret", secret.as_str()),
        ("a session token's signature", sig.as_str()),
    ];
    needles.extend(tags.iter().map(|t| ("a refused key", t.as_str())));
    // The admin API's bodies never echo a key; the log and the state
    // directory hold none, nor any other secret.
    assert_absent(
        &[
            ("admin answers", &seen),
            ("admin pages", &pages),
            ("logs", &logs),
            ("the state directory", &state),
            ("Debug", &debug),
        ],
        &needles,
    );
}

/// `clio-relay` itself, run with `args` and `env` at RUST_LOG=trace:
/// its exit status and everything it printed.
fn cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_bad_config_never_prints_its_secrets() {
    // Every secret is wrong in its own way, and check-config and run name
    // each problem: none of them may print the value.
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n\n\
         [upstream]\nurl = \"ws://user:leakcfg01@127.0.0.1:9/transcribe-websocket\"\n\n\
         [tokens]\nsecret_env = \"LEAK_TOKEN_SECRET\"\nprevious_secret_env = \"LEAK_PREVIOUS\"\n\n\
         [admin]\nstate_dir = \"state\"\ntoken_env = \"LEAK_ADMIN\"\nmaster_key_env = \"LEAK_MASTER\"\n\n\
         [cluster]\nredis_url = \"redis://:leakcfg02@127.0.0.1:9/0\"\n\n\
         [[account]]\nid = \"a1\"\nkey_env = \"LEAK_KEY1\"\n\n\
         [[account]]\nid = \"a2\"\nkey_env = \"LEAK_KEY2\"\n\n\
         [[account]]\nid = \"a3\"\nkey_file = \"key3\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("key3"), "sk-leakcfg09\u{a0}nbsp\n").unwrap();
    let env = [
        ("LEAK_TOKEN_SECRET", "leakcfg03-short"),
        (
            "LEAK_PREVIOUS",
            "leakcfg04 with a space and long enough to pass",
        ),
        ("LEAK_ADMIN", "leakcfg05"),
        ("LEAK_MASTER", "leakcfg06-not-hex"),
        ("LEAK_KEY1", "sk-leakcfg07 space"),
        ("LEAK_KEY2", "sk-leakcfg08\r\nX-Evil: 1"),
    ];
    let config = config.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let (code, text) = cli(&[cmd, "--config", config], &env);
        assert_eq!(code, Some(3), "{cmd}: {text}");
        assert!(text.contains("account \"a1\""), "{cmd}: {text}");
        assert!(text.contains("admin.master_key"), "{cmd}: {text}");
        for n in 1..=9 {
            let tag = format!("leakcfg{n:02}");
            assert!(!text.contains(&tag), "{cmd} printed {tag}: {text}");
        }
    }
    // mint-token reads only the token secret; a short one is named, not shown.
    let (code, text) = cli(&["mint-token", "--config", config, "--device", "d1"], &env);
    assert_eq!(code, Some(3), "{text}");
    assert!(!text.contains("leakcfg"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}
