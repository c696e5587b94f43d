//! Keys and tokens never appear in logs, metrics or error messages.
//!
//! Its own test binary, because it installs a process-wide log subscriber at
//! TRACE level that captures everything the relay logs.

#[path = "relay/util.rs"]
#[allow(dead_code)]
mod util;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The whole answer to a GET: head lines and body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, head, body) = util::http_get(addr, path, "");
    assert_ne!(status, 0, "{head}");
    format!("{head}\r\n\r\n{body}")
}

#[test]
fn keys_and_tokens_never_leak() {
    let capture = Capture::default();
    let writer = capture.clone();
    // Everything at TRACE except the test's own WebSocket client library
    // (tungstenite logs the requests it sends, and the test client sends tokens).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,tungstenite=off,async_tungstenite=off",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

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
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
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
