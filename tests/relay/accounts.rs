//! Choosing a Soniox account: invisible retries, exhaustion, per-account
//! limits, where the key goes, and that it never comes back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clio_relay::core::config::AuthMode;
use fake_soniox::{AuthVia, FakeKey};
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// The relay has accounts ("bad", `bad_key`) then ("good", "key-ok"); the
/// fake knows `keys` and refuses `bad_key` with `refused_with`.
fn moves_to_the_next_account(keys: Vec<FakeKey>, bad_key: &str, refused_with: u16) {
    let fake = fake(&[], |c| c.keys = keys);
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("bad", bad_key), ("good", "key-ok")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(10, 6);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "the client saw the retry: {got:?}");
    assert_eq!(got.close_code(), Some(1000));

    assert!(
        fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)),
        "{:?}",
        fake.sessions()
    );
    let s = fake.sessions();
    assert!(
        s.iter().any(|r| r.http_status == Some(refused_with)),
        "{s:?}"
    );
    let served = s
        .iter()
        .find(|r| r.key.as_deref() == Some("key-ok"))
        .expect("a session on the good key");
    assert_eq!(served.audio, frames.concat());

    let m = relay.handle.metrics();
    assert!(
        m.account("bad").expect("bad account in metrics").retries >= 1,
        "{:?}",
        m.accounts()
    );
    assert_eq!(
        m.account("good").unwrap().streams_total,
        1,
        "{:?}",
        m.accounts()
    );
    assert!(
        !relay.handle.process.accounts()[0].healthy(Instant::now()),
        "refused account still healthy"
    );
    assert!(relay.handle.process.accounts()[1].healthy(Instant::now()));
}

#[test]
fn unknown_key_moves_the_stream_to_the_next_account() {
    moves_to_the_next_account(vec![FakeKey::new("key-ok", 50)], "nope", 401);
}

#[test]
fn key_refused_with_402_moves_the_stream_to_the_next_account() {
    let broke = FakeKey {
        key: "key-broke".into(),
        max_concurrent: 50,
        reject: Some(402),
    };
    moves_to_the_next_account(vec![broke, FakeKey::new("key-ok", 50)], "key-broke", 402);
}

#[test]
fn all_accounts_refused_gets_429_and_1013() {
    let fake = fake(&["key-ok"], |_| {});
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("a", "nope-1"), ("b", "nope-2")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert_error_frame(&got, 429, 1013);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2
        && s.iter().all(|r| r.http_status == Some(401))));
    assert!(relay.wait_idle(LIMIT));
}

#[test]
fn account_concurrency_limit_gets_429_and_1013() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.accounts[0].max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let token = relay.token("dev");

    let (mut first, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    first.send(Message::text(config_message(None))).unwrap();
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].config.is_some()));
    assert_eq!(
        relay.handle.process.accounts()[0]
            .live
            .load(Ordering::Relaxed),
        1
    );

    let (mut second, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut second, &config_message(None), &audio_frames(2, 1));
    assert_error_frame(&got, 429, 1013);
    assert_eq!(
        fake.sessions().len(),
        1,
        "the second stream went upstream anyway"
    );

    first.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut first).finished());
    assert!(relay.wait_idle(LIMIT));
    let (mut third, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut third, &config_message(None), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
}

const KEY: &str = "sk-live-SECRET-7f3a9c21e4b8d605";

#[test]
fn config_auth_puts_the_key_in_the_first_message_only() {
    let fake = fake(&[KEY], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", KEY)]);
    cfg.upstream.auth = AuthMode::Config;
    let relay = Relay::start(cfg);
    let (mut ws, resp) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(10, 2));
    assert!(got.finished(), "{got:?}");

    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    let s = &fake.sessions()[0];
    assert_eq!(s.auth_via, Some(AuthVia::FirstMessage));
    assert_eq!(s.key.as_deref(), Some(KEY));
    assert_eq!(s.config.as_ref().unwrap()["api_key"], KEY);
    let head = format!("{} {:?}", s.request_path, s.request_headers);
    assert!(
        !head.contains(KEY),
        "the key was in the upgrade request: {head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );

    let seen = format!("{got:?} {:?}", resp.headers());
    assert!(!seen.contains(KEY), "the client saw the key");
}

#[test]
fn keys_never_reach_the_client_or_the_admin_port() {
    let fake = fake(&[KEY], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", KEY)]));
    let (mut ws, resp) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(10, 2));
    assert!(got.finished(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(
        fake.sessions()[0].key.as_deref(),
        Some(KEY),
        "the key was used"
    );

    let seen = format!("{:?} {:?} {:?}", got.messages, got.close, resp.headers());
    assert!(!seen.contains(KEY), "the client saw the key");
    // Also a refused stream's error message.
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let refused = stream_session(&mut ws, &config_message(None), &[]);
    assert_eq!(refused.error_code(), Some(401));
    assert!(!format!("{refused:?}").contains(KEY));

    for path in ["/metrics", "/v1/config", "/healthz", "/readyz"] {
        let (status, head, body) = http_get(relay.handle.admin_addr, path, "");
        assert_eq!(status, 200, "{path}");
        assert!(
            !head.contains(KEY) && !body.contains(KEY),
            "{path} shows the key"
        );
    }
}

#[test]
fn config_auth_refusal_on_the_first_message_moves_the_stream() {
    // With the key in the config message, the fake refuses it with a Soniox
    // error after the upgrade; no audio has gone up yet, so the relay can
    // still move the stream to the next account.
    let fake = fake(&["key-ok"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("bad", "nope"), ("good", "key-ok")]);
    cfg.upstream.auth = AuthMode::Config;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    assert!(
        fake.wait_for(LIMIT, |s| s
            .iter()
            .any(|r| r.key.as_deref() == Some("key-ok") && r.config.is_some())),
        "{:?}",
        fake.sessions()
    );
    let frames = audio_frames(10, 4);
    let got = stream_session(&mut ws, r#"{"type":"keepalive"}"#, &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(
        got.error_code(),
        None,
        "the client saw the refusal: {got:?}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, Some(401), "{s:?}");
    assert_eq!(s[1].key.as_deref(), Some("key-ok"));
    assert_eq!(s[1].audio, frames.concat());
    assert!(!relay.handle.process.accounts()[0].healthy(Instant::now()));
}

#[test]
fn a_429_answering_the_config_doubles_the_cooldown_though_the_upgrade_passed() {
    // With the key in the config message (`upstream.auth = "config"`),
    // upstream takes every upgrade and refuses the key only in its answer
    // to the config: a taken upgrade is no success of the key's, and each
    // 429 after a cooldown ended doubles the next (1 s, 2 s, 4 s).
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("key-busy", 50), FakeKey::new("key-ok", 50)];
        c.keys[0].reject = Some(429);
    });
    let mut cfg = relay_config(&fake.url(), &[("busy", "key-busy"), ("ok", "key-ok")]);
    cfg.upstream.auth = AuthMode::Config;
    // More room than "ok": each stream tries it first while it may.
    cfg.accounts[0].max_concurrent_streams = 20;
    let relay = Relay::start(cfg);
    let busy = relay.handle.process.accounts()[0].clone();
    let mut refused_at = Instant::now();
    for round in 0..3u8 {
        assert!(
            wait_until(Duration::from_secs(30), || busy
                .cooling_down(Instant::now())
                .is_none()),
            "round {round}: the cooldown never ended"
        );
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        assert!(
            wait_until(LIMIT, || busy.cooling_down(Instant::now()).is_some()),
            "round {round}: the 429 cooled nothing down"
        );
        refused_at = Instant::now();
        for f in audio_frames(3, round) {
            ws.send(Message::binary(f)).unwrap();
        }
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
        let got = read_all(&mut ws);
        assert!(got.finished(), "round {round}: {got:?}");
        assert_eq!(got.error_code(), None, "round {round}: {got:?}");
    }
    // The third cooldown is 4 s: 2 s after it began it still runs.
    assert!(
        busy.cooling_down(refused_at + Duration::from_secs(2))
            .is_some(),
        "the cooldown did not double"
    );
    let sessions = fake.sessions();
    let refused = sessions
        .iter()
        .filter(|s| s.key.as_deref() == Some("key-busy") || s.error_sent == Some(429))
        .count();
    assert_eq!(refused, 3, "{sessions:?}");
}
