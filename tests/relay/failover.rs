//! Failover the client never sees: at open, with the config and the first
//! audio already sent upstream in one go (as the official SDKs send them).

use std::time::{Duration, Instant};

use clio_relay::core::config::AuthMode;
use fake_soniox::{FakeKey, FakeSoniox, FaultKind};

use crate::util::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(10);

/// A fake that knows "key-bad" and "key-ok" and refuses "key-bad" with
/// `code` at its first message (after the upgrade), and a relay with the
/// accounts "bad" then "good".
fn refused_at_first_message(code: u16, auth: AuthMode, replay_bytes: usize) -> (FakeSoniox, Relay) {
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("key-bad", 50), FakeKey::new("key-ok", 50)];
        if auth == AuthMode::Header {
            c.faults.refuse_at_first_message = vec![("key-bad".into(), code)];
        } else {
            c.keys[0].reject = Some(code);
        }
    });
    let mut cfg = relay_config(&fake.url(), &[("bad", "key-bad"), ("good", "key-ok")]);
    cfg.upstream.auth = auth;
    cfg.failover.replay_bytes = replay_bytes;
    if replay_bytes < 128 << 10 {
        cfg.failover.max_resumes = 0;
    }
    (fake, Relay::start(cfg))
}

fn moves_with_audio_already_sent(code: u16, auth: AuthMode) {
    let (fake, relay) = refused_at_first_message(code, auth, 128 << 10);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    // Config, audio and the end of audio leave at once: the relay reads them
    // together and sends them upstream in the same send as the config.
    let frames = audio_frames(12, 9);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(
        got.error_code(),
        None,
        "the client saw the failover: {got:?}"
    );
    assert_eq!(got.close_code(), Some(1000));
    assert!(!got.text().is_empty());

    assert!(
        fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)),
        "{:?}",
        fake.sessions()
    );
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, Some(code), "{s:?}");
    assert_eq!(s[1].key.as_deref(), Some("key-ok"));
    // Every audio byte exactly once on the connection that served it.
    assert_eq!(s[1].audio, frames.concat());
    assert!(s[1].empty_frame_received);
    assert_eq!(
        s[1].text_messages.len(),
        1,
        "the config once: {:?}",
        s[1].text_messages
    );
    if matches!(code, 401 | 402) {
        assert!(!relay.handle.process.accounts()[0].healthy(Instant::now()));
    }
    let m = relay.handle.metrics();
    assert!(m.account("bad").unwrap().retries >= 1, "{:?}", m.accounts());
    assert_eq!(m.account("good").unwrap().streams_total, 1);
}

#[test]
fn header_key_refused_401_after_audio_went_up_moves_the_stream() {
    moves_with_audio_already_sent(401, AuthMode::Header);
}

#[test]
fn header_key_refused_402_and_429_move_the_stream() {
    moves_with_audio_already_sent(402, AuthMode::Header);
    moves_with_audio_already_sent(429, AuthMode::Header);
}

#[test]
fn upstream_500_before_accepting_moves_the_stream() {
    moves_with_audio_already_sent(500, AuthMode::Header);
}

#[test]
fn config_key_refused_after_audio_went_up_moves_the_stream() {
    moves_with_audio_already_sent(401, AuthMode::Config);
}

#[test]
fn past_the_replay_bound_the_stream_stays_on_its_account() {
    // Upstream refuses once its second audio frame has arrived: by then the
    // relay has sent it more than 6,000 bytes of audio, more than a
    // 4,000-byte copy holds, so the stream is committed to its account and
    // the refusal reaches the client as Soniox sent it. (A refusal of the
    // config message alone could arrive before the relay has read the
    // audio, while the copy still holds all of it: then moving is right.)
    // Mid-stream resume off: a raw-audio stream would resume instead.
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("key-bad", 50), FakeKey::new("key-ok", 50)];
        c.faults.error_after_frames = Some((2, 401));
    });
    let mut cfg = relay_config(&fake.url(), &[("bad", "key-bad"), ("good", "key-ok")]);
    cfg.failover.replay_bytes = 4000;
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(12, 9));
    assert_eq!(got.error_code(), Some(401), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions().len(), 1);
}

#[test]
fn no_account_left_gets_the_documented_error() {
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("key-a", 50), FakeKey::new("key-b", 50)];
        c.faults.refuse_at_first_message = vec![("key-a".into(), 401), ("key-b".into(), 402)];
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "key-a"), ("b", "key-b")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
    assert_error_frame(&got, 429, 1013);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
}

#[test]
fn upstream_500_or_503_on_every_try_at_open_gets_503_close_1011() {
    // Before, once the tries of the same account were used up, the client
    // got 429 "Every Soniox account is at the relay's stream limit" (close
    // 1013), counted as the relay's own limit: no account was full.
    for code in [500, 503] {
        let fake = fake(&["key-a"], |c| {
            c.faults.refuse_at_first_message = vec![("key-a".into(), code)];
        });
        let relay = Relay::start(relay_config(&fake.url(), &[("a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
        assert_error_frame(&got, 503, 1011);
        let message = got.messages[0]["error_message"].as_str().unwrap();
        assert!(message.contains(&code.to_string()), "{message}");
        // The first try and `failover.max_resumes` (3) more.
        assert!(
            fake.wait_for(LIMIT, |s| s.len() == 4 && s.iter().all(|r| r.closed)),
            "{:?}",
            fake.sessions()
        );
        let m = relay.handle.metrics();
        assert_eq!(
            m.refusals(clio_relay::core::metrics::RefusedBy::RelayLimit),
            0
        );
        assert_eq!(
            m.refusals(clio_relay::core::metrics::RefusedBy::Upstream),
            1
        );
    }
}

#[test]
fn a_ping_before_upstreams_first_message_is_no_acceptance() {
    // A ping is a control frame, not a message. Before, a ping ahead of a
    // 503 at open counted as upstream accepting the stream: for a
    // compressed stream the 503 reached the client, and a raw-audio one
    // was resumed mid-stream instead of moved at open. Now the ping goes
    // on to the client and the 503 moves the stream, unseen.
    let error = br#"{"tokens":[],"error_code":503,"error_message":"Cannot continue request"}"#;
    let mut answer = vec![0x89, 0x02, b'h', b'b', 0x81, error.len() as u8];
    answer.extend_from_slice(error);
    answer.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]);
    for format in ["pcm_s16le", "ogg"] {
        let answer = answer.clone();
        let (url, conns) = scripted_upstream(move |c, _| match c {
            0 => UpStep::Raw(answer.clone()),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(3, 2));
        assert!(
            got.messages.iter().all(|m| m["error_code"].is_null()),
            "{format}: {got:?}"
        );
        assert!(got.finished(), "{format}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{format}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{format}"
        );
        let f = relay.handle.metrics().failovers();
        assert_eq!((f.open_refused, f.resumed), (1, 0), "{format}: {f:?}");
    }
}

/// Errors that are not the account's: a 400 for a bad config at open, a
/// 408 at open and one mid-stream (raw audio, which could resume). Each
/// reaches the client as upstream sent it, with upstream's close; no other
/// account is tried, none is marked, the stream does not resume.
#[test]
fn errors_that_are_not_the_accounts_pass_through_from_the_first_account() {
    for (model, fault, code) in [
        ("no-such-model", None, 400),
        ("stt-rt-v4", Some((1, 408)), 408),
        ("stt-rt-v4", Some((5, 408)), 408),
    ] {
        let fake = fake(&["k1", "k2", "k3"], |c| c.faults.error_after_frames = fault);
        let relay = Relay::start(relay_config(
            &fake.url(),
            &[("a", "k1"), ("b", "k2"), ("c", "k3")],
        ));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["model"] = model.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(10, 1));
        assert_error_frame(&got, code, 1000);
        assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
        let keys: Vec<Option<String>> = fake.sessions().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, [Some("k1".to_string())], "{model} {fault:?}");
        assert!(no_account_blamed(&relay), "{model} {fault:?}");
        let m = relay.handle.metrics();
        assert_eq!(m.failovers().open_refused + m.failovers().open_lost, 0);
        assert_eq!(m.streams_resumed(), 0, "{model} {fault:?}");
    }
}

/// Whether `python3` can import the official Soniox SDK (`.ci/run` installs it).
pub(crate) fn soniox_sdk() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import soniox"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n!!!!!!!! SKIPPED: the official Soniox Python SDK is not installed \
             (pip install soniox); .ci/run installs it !!!!!!!!\n"
        );
    }
    ok
}

/// Streams `audio` through `relay` with the official Soniox Python SDK
/// (tests/sdk/soniox_python_stream.py) and returns what it printed: the
/// final text, the error it saw (if any), and whether `finished` came.
/// With no audio, the session sends none and reads its events right
/// after the config.
pub(crate) fn through_python_sdk(relay: &Relay, audio: &[u8]) -> Value {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = dir.join("audio.raw");
    std::fs::write(&file, audio).unwrap();
    if audio.is_empty() {
        file = "-".into();
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/soniox_python_stream.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("ws://{}/v1/transcribe", relay.addr()))
        .arg(relay.token("dev"))
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn official_python_sdk_never_sees_an_open_time_failover() {
    if !soniox_sdk() {
        return;
    }
    let (fake, relay) = refused_at_first_message(401, AuthMode::Header, 128 << 10);
    let audio = audio_frames(15, 3).concat();
    let got = through_python_sdk(&relay, &audio);
    assert_eq!(got["error"], Value::Null, "{got}");
    assert_eq!(got["finished"], true, "{got}");
    assert!(!got["text"].as_str().unwrap().is_empty(), "{got}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, Some(401));
    assert_eq!(s[1].key.as_deref(), Some("key-ok"));
    assert_eq!(s[1].audio, audio, "upstream got every audio byte once");
}

#[test]
fn official_python_sdk_never_sees_a_server_going_away_mid_stream() {
    // Upstream's first connection has sent results, then closes with 1001
    // and nothing else at its 20th audio frame (a server shutting down):
    // the SDK, for which a close before `finished` is an error, sees one
    // stream, no error, and the whole transcript once.
    if !soniox_sdk() {
        return;
    }
    let faults = only_first_connection_fails(FaultKind::GoingAway, 20, |n| n == 20);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let audio = audio_frames(40, 17).concat();
    let got = through_python_sdk(&relay, &audio);
    assert_eq!(got["error"], Value::Null, "{got}");
    assert_eq!(got["finished"], true, "{got}");
    let words: String = fake_soniox::transcript_of(&audio, 32_000, 480)
        .into_iter()
        .map(|(text, _, _)| text)
        .collect();
    assert_eq!(got["text"], Value::String(words), "{got}");
    let ok = fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed));
    assert!(
        ok,
        "{:?}",
        fake.sessions()
            .iter()
            .map(|r| (r.closed, r.audio_frames, r.finished_sent))
            .collect::<Vec<_>>()
    );
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}

#[test]
fn a_lost_connection_waits_out_an_upstream_that_is_briefly_unreachable() {
    // One account; its first connection is dropped before any result, and
    // the next two are closed unanswered (a restarting upstream): the relay
    // waits and tries again, and the client sees no error.
    let faults = only_first_connection_fails(FaultKind::Drop, 1, |_| true);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    let url = door(&fake.url(), |n| n == 1 || n == 2);
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(12, 6);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions()[1].audio, frames.concat());
}

#[test]
fn a_first_connection_closed_unanswered_is_waited_out_too() {
    // One account; the stream's very first connection is closed before the
    // upgrade is answered (an upstream restarting, a load balancer's
    // reset): the relay waits and tries again, as it does after a failure,
    // and the client sees no error.
    let fake = fake(&["k1"], |_| {});
    let url = door(&fake.url(), |n| n == 0);
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(14, 6);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

#[test]
fn connection_lost_before_upstream_accepted_moves_the_stream() {
    // The first upstream session is dropped (TCP reset) at its first audio
    // frame, before any result; the second is not.
    let faults = only_first_connection_fails(FaultKind::Drop, 1, |_| true);
    let fake = fake(&["k1", "k2"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(12, 5);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    assert_eq!(s[0].error_sent, None);
    assert!(!s[0].finished_sent);
    assert_eq!(s[1].audio, frames.concat());
    // A lost connection is no reason to hold the account off.
    assert!(relay.handle.process.accounts()[0].healthy(Instant::now()));
}

#[test]
fn a_close_before_upstream_accepted_moves_a_compressed_stream() {
    // The first upstream session closes with 1001 and no message at its
    // first audio frame (a server shutting down), before any result: the
    // close must not reach the client, whose stream moves as at any other
    // failure at open, audio formats that cannot resume included.
    let faults = only_first_connection_fails(FaultKind::GoingAway, 1, |_| true);
    let fake = fake(&["k1", "k2"], |c| c.faults.random = Some(faults));
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    let frames = audio_frames(13, 5);
    let got = stream_session(&mut ws, &config.to_string(), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    assert_eq!(fake.sessions()[1].audio, frames.concat());
    assert_eq!(relay.handle.metrics().failovers().open_lost, 1);
}

/// Per account, what an operator needs to tell a failing or slow account
/// from the rest: upstream's errors by code, and the time to first result
/// as a histogram. Here "bad" refuses every stream with 402 at its first
/// message and "good" carries them, unseen by the clients.
#[test]
fn errors_and_first_results_are_counted_per_account() {
    let (_fake, relay) = refused_at_first_message(402, AuthMode::Header, 128 << 10);
    for i in 0..3 {
        let (mut ws, _) =
            connect(relay.addr(), &relay.token(&format!("dev{i}")), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, i));
        assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    }
    let scrape = || http_get(relay.handle.admin_addr, "/metrics", "").2;
    let line = |body: &str, prefix: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_string()))
    };
    let mut body = scrape();
    // Metrics are collected from the shards when scraped: wait for the
    // last stream's end to be in.
    let deadline = Instant::now() + LIMIT;
    while line(
        &body,
        r#"clio_relay_account_first_result_seconds_count{account="good"}"#,
    )
    .as_deref()
        != Some("3")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        body = scrape();
    }
    // A 402 marks the account: the later streams may skip it.
    let bad_402 = line(
        &body,
        r#"clio_relay_account_errors_total{account="bad",code="402"}"#,
    );
    assert!(
        matches!(bad_402.as_deref(), Some("1" | "2" | "3")),
        "{body}"
    );
    assert!(
        !body.contains(r#"clio_relay_account_errors_total{account="good""#),
        "{body}"
    );
    assert!(body.contains("# TYPE clio_relay_account_first_result_seconds histogram"));
    assert_eq!(
        line(
            &body,
            r#"clio_relay_account_first_result_seconds_bucket{account="good",le="+Inf"}"#
        )
        .as_deref(),
        Some("3"),
        "{body}"
    );
    assert_eq!(
        line(
            &body,
            r#"clio_relay_account_first_result_seconds_count{account="bad"}"#
        )
        .as_deref(),
        Some("0"),
        "{body}"
    );
    // Buckets are cumulative: each at most the next.
    let buckets: Vec<u64> = body
        .lines()
        .filter(|l| {
            l.starts_with(r#"clio_relay_account_first_result_seconds_bucket{account="good""#)
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 9, "{body}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
}

#[test]
fn an_error_at_open_in_fragments_moves_the_stream() {
    // RFC 6455 lets a server (or a gateway in front of it) send a message
    // in fragments. Upstream's 503 at open, in three fragments with a ping
    // between the first two: a raw-audio stream moved, unseen, but a
    // compressed one passed the 503 on to its client (its pump looked at
    // a first message only when it came in one frame).
    use clio_frame::frame::{build_fragment, Opcode};
    let error = br#"{"tokens":[],"error_code":503,"error_message":"Cannot continue request"}"#;
    let (a, rest) = error.split_at(10);
    let (b, c) = rest.split_at(20);
    let mut answer = build_fragment(Opcode::Text, false, a, None);
    answer.extend(build_fragment(Opcode::Ping, true, b"hb", None));
    answer.extend(build_fragment(Opcode::Continuation, false, b, None));
    answer.extend(build_fragment(Opcode::Continuation, true, c, None));
    answer.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]);
    for format in ["pcm_s16le", "ogg"] {
        let answer = answer.clone();
        let (url, conns) = scripted_upstream(move |c, _| match c {
            0 => UpStep::Raw(answer.clone()),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("a", "key-a"), ("b", "key-b")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(3, 2));
        assert!(
            got.messages.iter().all(|m| m["error_code"].is_null()),
            "{format}: {got:?}"
        );
        assert!(got.finished(), "{format}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{format}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{format}"
        );
        let f = relay.handle.metrics().failovers();
        assert_eq!((f.open_refused, f.resumed), (1, 0), "{format}: {f:?}");
    }
}

#[test]
fn each_move_at_open_is_counted_a_refused_upgrade_after_a_refusal_too() {
    // The stream's first account takes the upgrade and refuses the
    // stream (402 in its first message); the next refuses the upgrade
    // (429); the third takes it. Two failovers at open, both refusals,
    // and the client sees none.
    let fake = fake(&[], |c| {
        c.keys = vec![
            FakeKey::new("key-bad", 50),
            FakeKey::new("key-busy", 50),
            FakeKey::new("key-ok", 50),
        ];
        c.keys[1].reject = Some(429);
        c.faults.refuse_at_first_message = vec![("key-bad".into(), 402)];
    });
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("bad", "key-bad"), ("busy", "key-busy"), ("good", "key-ok")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(8, 3);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished() && got.error_code().is_none(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let s = fake.sessions();
    let answers: Vec<_> = s
        .iter()
        .map(|r| (r.key.clone(), r.http_status, r.error_sent))
        .collect();
    assert_eq!(
        answers,
        [
            (Some("key-bad".into()), None, Some(402)),
            (None, Some(429), None),
            (Some("key-ok".into()), None, None),
        ],
        "the stream went bad, busy, good"
    );
    assert_eq!(s[2].audio, frames.concat());
    let f = relay.handle.metrics().failovers();
    assert_eq!((f.open_refused, f.open_lost), (2, 0), "{f:?}");
}

#[test]
fn a_refusal_mid_stream_that_reaches_the_client_marks_the_account() {
    // A compressed stream cannot resume: upstream's 402 or 429 after it
    // accepted the stream reaches the client as Soniox sent it. The
    // account is marked all the same (unhealthy, cooling down), and
    // after a 402 the next stream goes to the other account (a 429's
    // cooldown is too short to check that without a race).
    for code in [402u16, 429] {
        let fake = fake(&["k1", "k2"], |c| {
            c.faults.error_after_frames = Some((6, code))
        });
        let mut cfg = relay_config(&fake.url(), &[("a", "k1"), ("b", "k2")]);
        // More room than "b": "a" takes every stream it may.
        cfg.accounts[0].max_concurrent_streams = 20;
        let relay = Relay::start(cfg);
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = "auto".into();
        let config = config.to_string();
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config, &audio_frames(10, 4));
        assert!(!got.text().is_empty(), "accepted before the error: {got:?}");
        assert_eq!(got.error_code(), Some(code as u64), "{got:?}");
        assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
        // Marked as the stream ends, maybe after the client has its close.
        let a = &relay.handle.process.accounts()[0];
        let marked = wait_until(LIMIT, || {
            let now = Instant::now();
            match code {
                402 => !a.healthy(now),
                _ => a.cooling_down(now).is_some(),
            }
        });
        assert!(marked, "a {code} left the account unmarked");
        if code != 402 {
            continue;
        }
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        stream_session(&mut ws, &config, &audio_frames(2, 5));
        assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s[1].closed));
        assert_eq!(fake.sessions()[1].key.as_deref(), Some("k2"), "{code}");
    }
}
