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

use clio_relay::core::config::AuthMode;
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

/// An upstream that echoes back what it was given to authenticate with:
/// the `Authorization` header and the config message (with the key the
/// relay put in it), in an error frame at the stream's first message
/// (`at_frame` 0) or at audio frame `at_frame`, and in its close reason.
/// Returns its URL.
#[allow(clippy::result_large_err)] // tungstenite's callback returns its Response as the error
fn echoing_upstream(code: u16, at_frame: u64) -> String {
    use tungstenite::handshake::server::{Request, Response};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            std::thread::spawn(move || {
                let mut auth = String::new();
                let Ok(mut ws) = tungstenite::accept_hdr(tcp, |req: &Request, resp: Response| {
                    if let Some(v) = req.headers().get("authorization") {
                        auth = v.to_str().unwrap_or_default().to_string();
                    }
                    Ok(resp)
                }) else {
                    return;
                };
                let mut config = String::new();
                let mut frames = 0u64;
                while let Ok(m) = ws.read() {
                    match m {
                        tungstenite::Message::Text(t) if config.is_empty() => {
                            config = t.to_string();
                            if at_frame > 0 {
                                continue;
                            }
                        }
                        tungstenite::Message::Binary(_) => {
                            frames += 1;
                            if frames < at_frame {
                                let ms = frames * 100;
                                let reply = serde_json::json!({
                                    "tokens": [{"text": "w ", "start_ms": ms - 100,
                                        "end_ms": ms, "is_final": true}],
                                    "final_audio_proc_ms": ms, "total_audio_proc_ms": ms,
                                });
                                let _ = ws.send(tungstenite::Message::text(reply.to_string()));
                                continue;
                            }
                            if frames != at_frame {
                                continue;
                            }
                        }
                        _ => continue,
                    }
                    let error = serde_json::json!({
                        "tokens": [],
                        "error_code": code,
                        "error_message": format!("Invalid request ({auth}): {config}"),
                    });
                    let _ = ws.send(tungstenite::Message::text(error.to_string()));
                    let mut reason = format!("refused {auth} {config}");
                    reason.truncate(120);
                    let _ = ws.close(Some(tungstenite::protocol::CloseFrame {
                        code: tungstenite::protocol::frame::coding::CloseCode::Policy,
                        reason: reason.into(),
                    }));
                    while ws.read().is_ok() {}
                    return;
                }
            });
        }
    });
    url
}

#[test]
fn an_upstream_echoing_the_key_never_shows_it_to_the_client() {
    let capture = logs();
    const KEY: &str = "sk-echoed-9a4e2c7b1d";
    let mut seen = String::new();
    // The key in the config message and in the header; an error at the
    // first message (one the relay does not retry, and a refusal of the
    // only account) and one mid-stream; raw audio (a stream that can
    // resume, whose results are read whole) and not (passed on as read).
    let mut cases = Vec::new();
    for format in ["pcm_s16le", "auto"] {
        for auth in [AuthMode::Config, AuthMode::Header] {
            for (code, at_frame) in [(400, 0), (401, 0), (400, 2)] {
                cases.push((format, auth, code, at_frame));
            }
        }
    }
    for (format, auth, code, at_frame) in cases {
        let mut cfg = relay_config(&echoing_upstream(code, at_frame), &[("acct", KEY)]);
        cfg.upstream.auth = auth;
        let relay = Relay::start(cfg);
        let token = relay.token("device-echo");
        // A signal the relay's threads take can interrupt a blocking call
        // of this one: the handshake is tried again, a read goes on.
        let interrupted = |e: &tungstenite::Error| matches!(e, tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::Interrupted);
        let mut ws = loop {
            match connect(relay.addr(), &token, Via::Header) {
                Err(e) if interrupted(&e) => continue,
                r => break r.unwrap().0,
            }
        };
        let config = config_message(None).replace("pcm_s16le", format);
        ws.send(tungstenite::Message::text(config)).unwrap();
        // Only the frames up to the error: more, sent after the relay
        // closed, could reset the connection before the client reads.
        for f in audio_frames(at_frame as usize, 1) {
            ws.send(tungstenite::Message::binary(f)).unwrap();
        }
        // Everything that comes back, the close frame's reason too.
        let mut got = String::new();
        loop {
            let m = ws.read();
            if m.as_ref().is_err_and(interrupted) {
                continue;
            }
            got.push_str(&format!("{m:?}\n"));
            if m.is_err() {
                break;
            }
        }
        assert!(
            got.contains("error_code"),
            "{format} {auth:?} {code}: {got}"
        );
        seen.push_str(&got);
    }
    std::thread::sleep(Duration::from_millis(200));
    let logs = capture.text();
    assert_absent(
        &[("what the client received", &seen), ("logs", &logs)],
        &[("the account key", KEY)],
    );
}

/// A server that answers every request with `status` and, as its body,
/// the request it got (head and body) in `shape`: plain text, or a JSON
/// error message. What another service at the admin address, or a proxy
/// in front of it, may answer. Returns its address.
fn echoing_http_server(status: u16, json: bool) -> std::net::SocketAddr {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then whatever body comes with it.
                while let Ok(n) = tcp.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let request = String::from_utf8_lossy(&got).into_owned();
                let body = if json {
                    serde_json::json!({ "error_code": status, "error_message": request })
                        .to_string()
                } else {
                    format!("bad request: {request}")
                };
                let _ = write!(
                    tcp,
                    "HTTP/1.1 {status} Echo\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

#[test]
fn keys_never_prints_the_admin_token_or_a_key_an_answer_echoes() {
    const ADMIN: &str = "admin-token-keys-echo-0123456789";
    const KEY: &str = "sk-keys-echoed-4d7a1c";
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("new.key"), format!("{KEY}\n")).unwrap();
    let key_file = dir.join("new.key");
    let mut seen = String::new();
    for (status, json) in [(400, false), (400, true), (200, false), (502, true)] {
        let addr = echoing_http_server(status, json);
        let config = dir.join(format!("relay-{status}-{json}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{addr}\"\n\n\
                 [tokens]\nsecret_env = \"ECHO_TOKEN_SECRET\"\n\n\
                 [admin]\nstate_dir = \"state\"\ntoken_env = \"ECHO_ADMIN\"\n"
            ),
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let env = [
            (
                "ECHO_TOKEN_SECRET",
                "an-echo-test-token-secret-0123456789abcdef",
            ),
            ("ECHO_ADMIN", ADMIN),
        ];
        for args in [
            vec!["keys", "--config", config, "list"],
            vec![
                "keys",
                "--config",
                config,
                "add",
                "--id",
                "echoed",
                "--key-file",
                key_file.to_str().unwrap(),
            ],
            vec![
                "keys",
                "--config",
                config,
                "rotate",
                "echoed",
                "--key-file",
                key_file.to_str().unwrap(),
            ],
        ] {
            let (code, text) = cli(&args, &env);
            assert_ne!(code, Some(0), "{args:?}: {text}");
            // The echo did reach it (the request line is in what it said).
            assert!(text.contains("/admin/accounts"), "{args:?}: {text}");
            seen.push_str(&text);
        }
    }
    assert_absent(
        &[("what keys printed", &seen)],
        &[("the admin token", ADMIN), ("the new key", KEY)],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unknown_account_id_is_not_repeated() {
    // A key given where the account id goes (`keys rotate NEWKEY`, the id
    // forgotten): a valid id to the API, and no account has it.
    let capture = logs();
    const ADMIN: &str = "admin-token-unknown-id-0123456789";
    const NEW_KEY: &str = "sk-idpos-6f1c9e2a7b";
    let fake = fake(&["sk-present"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct", "sk-present")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let mut seen = String::new();
    for (method, path, body) in [
        ("POST", "enable", None),
        ("POST", "disable", None),
        ("POST", "limit", Some(r#"{"max_concurrent_streams":5}"#)),
        ("POST", "rotate", Some(r#"{"key":"sk-other"}"#)),
        ("DELETE", "", None),
    ] {
        let path = if path.is_empty() {
            format!("/admin/accounts/{NEW_KEY}")
        } else {
            format!("/admin/accounts/{NEW_KEY}/{path}")
        };
        let (status, answer) = http(admin, method, &path, Some(ADMIN), body);
        assert_eq!(status, 404, "{method} {path}: {answer}");
        seen.push_str(&answer);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_absent(
        &[("admin answers", &seen), ("logs", &capture.text())],
        &[("a key given as an account id", NEW_KEY)],
    );
}

#[test]
fn a_key_on_the_command_line_is_not_echoed_back() {
    // Keys never come on the command line; one put there anyway (as an
    // extra argument, or as a value that is not the option's) is not
    // repeated in the usage error.
    const KEY: &str = "sk-argv-3e8b1d5c9a";
    let mut seen = String::new();
    for args in [
        vec!["keys", "--config", "x.toml", "rotate", "prod-2", KEY],
        vec!["keys", "--config", "x.toml", "add", "--id", "a", KEY],
        vec![
            "keys",
            "--config",
            "x.toml",
            "add",
            "--id",
            "a",
            "--max-concurrent-streams",
            KEY,
        ],
        vec!["keys", "--config", "x.toml", "limit", "a", KEY],
        vec!["mint-token", "--config", "x.toml", "--device", "d", KEY],
        vec![KEY],
    ] {
        let (code, text) = cli(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {text}");
        assert!(text.contains("--help"), "{args:?}: {text}");
        seen.push_str(&text);
    }
    assert_absent(&[("usage errors", &seen)], &[("the key", KEY)]);
}

#[test]
fn keys_never_prints_a_key_given_as_its_file_or_variable() {
    // `--key-file KEY` or `--key-env KEY`: the key where its file's or
    // variable's name goes.
    const KEY: &str = "sk_keysrc_5a0e7d3b9c";
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:9\"\n\n\
         [tokens]\nsecret_env = \"SRC_TOKEN_SECRET\"\n\n\
         [admin]\nstate_dir = \"state\"\ntoken_env = \"SRC_ADMIN\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let env = [("SRC_ADMIN", "admin-token-keysrc-0123456789")];
    let mut seen = String::new();
    for source in ["--key-file", "--key-env"] {
        for action in [vec!["add", "--id", "a"], vec!["rotate", "a"]] {
            let mut args = vec!["keys", "--config", config];
            args.extend(action);
            args.extend([source, KEY]);
            let (code, text) = cli(&args, &env);
            assert_eq!(code, Some(2), "{args:?}: {text}");
            assert!(text.contains(source), "{args:?}: {text}");
            seen.push_str(&text);
        }
    }
    assert_absent(&[("what keys printed", &seen)], &[("the key", KEY)]);
    // A name of the usual shape is no key: it is still named.
    for (source, name) in [("--key-env", "UNSET_SONIOX_KEY"), ("--key-file", "new.key")] {
        let (code, text) = cli(
            &["keys", "--config", config, "rotate", "a", source, name],
            &env,
        );
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains(name), "{source} {name}: {text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An upstream that refuses every WebSocket upgrade with `status`, its
/// body (and a header) quoting the request it got, `Authorization`
/// included. Returns its URL.
fn refusing_upstream(status: u16) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&got).into_owned();
                let auth = request
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .unwrap_or_default()
                    .to_string();
                let body = serde_json::json!({
                    "error_code": status,
                    "error_message": format!("Invalid API key ({auth}); request: {request}"),
                })
                .to_string();
                let _ = write!(
                    tcp,
                    "HTTP/1.1 {status} Refused\r\nX-Echo: {auth}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    url
}

#[test]
fn an_upgrade_refusal_echoing_the_key_reaches_neither_client_nor_log() {
    let capture = logs();
    const KEY: &str = "sk-upgrade-refused-2c8f4a";
    let mut seen = String::new();
    for status in [401, 402, 403, 429, 500] {
        let cfg = relay_config(&refusing_upstream(status), &[("acct", KEY)]);
        let relay = Relay::start(cfg);
        let token = relay.token("device-upgrade-echo");
        let interrupted = |e: &tungstenite::Error| matches!(e, tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::Interrupted);
        let mut ws = loop {
            match connect(relay.addr(), &token, Via::Header) {
                Err(e) if interrupted(&e) => continue,
                r => break r.unwrap().0,
            }
        };
        ws.send(tungstenite::Message::text(config_message(None)))
            .unwrap();
        let mut got = String::new();
        loop {
            let m = ws.read();
            if m.as_ref().is_err_and(interrupted) {
                continue;
            }
            got.push_str(&format!("{m:?}\n"));
            if m.is_err() {
                break;
            }
        }
        assert!(got.contains("error_code"), "{status}: {got}");
        seen.push_str(&got);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_absent(
        &[
            ("what the client received", &seen),
            ("logs", &capture.text()),
        ],
        &[("the account key", KEY)],
    );
}

#[test]
fn an_unknown_query_parameter_that_may_be_a_secret_is_not_repeated() {
    // A key or token pasted as the query (`/admin/usage?KEY`, the name
    // forgotten) is an unknown parameter: the 400 does not repeat it.
    let capture = logs();
    const ADMIN: &str = "admin-token-query-0123456789";
    const KEY: &str = "sk-query-param-7b2e9d4c1a";
    let fake = fake(&["sk-present"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct", "sk-present")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let mut seen = String::new();
    for path in ["/admin/usage", "/admin/revocations"] {
        for query in [KEY.to_string(), format!("from=2026-01-01&{KEY}")] {
            let (status, answer) =
                http(admin, "GET", &format!("{path}?{query}"), Some(ADMIN), None);
            assert_eq!(status, 400, "{path}?{query}: {answer}");
            assert!(answer.contains("unknown parameter"), "{answer}");
            seen.push_str(&answer);
        }
        // A parameter name is still named.
        let (status, answer) = http(admin, "GET", &format!("{path}?group=x"), Some(ADMIN), None);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("unknown parameter group"), "{answer}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_absent(
        &[("admin answers", &seen), ("logs", &capture.text())],
        &[("a key given as the query", KEY)],
    );
}
