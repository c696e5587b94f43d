//! What a client sees when something goes wrong: HTTP errors before the
//! upgrade, one Soniox-shaped error frame and a close after it.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clio_relay::core::config::TokensConfig;
use clio_relay::core::token::TokenKeys;
use fake_soniox::FakeSoniox;
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

fn setup(tweak: impl FnOnce(&mut clio_relay::core::config::Config)) -> (FakeSoniox, Relay) {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    tweak(&mut cfg);
    let relay = Relay::start(cfg);
    (fake, relay)
}

fn bad_tokens(relay: &Relay) -> Vec<(&'static str, String)> {
    let ours = TokenKeys::from_config(&relay.cfg.tokens);
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let expired = ours
        .mint("dev-1", Duration::from_secs(600), hour_ago)
        .unwrap();
    let theirs = TokenKeys::from_config(&TokensConfig::new(secret()));
    let foreign = theirs
        .mint("dev-1", Duration::from_secs(600), SystemTime::now())
        .unwrap();
    vec![
        ("garbage", "not-a-token-at-all".to_string()),
        ("expired", expired),
        ("other secret", foreign),
    ]
}

#[test]
fn bad_tokens_get_401_before_the_upgrade() {
    let (fake, relay) = setup(|_| {});
    for (what, token) in bad_tokens(&relay) {
        for via in [Via::Header, Via::Query] {
            let (status, body) = refused_upgrade(connect(relay.addr(), &token, via));
            assert_eq!(status, 401, "{what} via {via:?}");
            assert_http_error_body(&body, 401);
        }
    }
    assert!(
        fake.sessions().is_empty(),
        "a refused client reached upstream"
    );
    // A good token still works on the same relay.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Query).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
}

/// A 401 before the upgrade carries the challenge RFC 9110 §15.5.2
/// requires of every 401, the Bearer scheme's (RFC 6750 §3), with
/// `error="invalid_token"`: the request had a token, and it was refused.
/// Before, the 401 had none, and an HTTP client that reads 401s by the
/// book (Java's `HttpURLConnection`, Android's too) failed with "no
/// authentication challenges found" instead of reading the error.
#[test]
fn a_refused_token_gets_a_bearer_challenge_with_its_401() {
    let (_fake, relay) = setup(|_| {});
    for (what, token) in bad_tokens(&relay) {
        for via in [Via::Header, Via::Subprotocol, Via::Query] {
            match connect(relay.addr(), &token, via) {
                Err(tungstenite::Error::Http(resp)) => {
                    assert_eq!(resp.status(), 401, "{what} via {via:?}");
                    let challenges: Vec<_> =
                        resp.headers().get_all("www-authenticate").iter().collect();
                    assert_eq!(
                        challenges,
                        ["Bearer error=\"invalid_token\""],
                        "{what} via {via:?}: {resp:?}"
                    );
                }
                other => panic!("{what} via {via:?}: expected a 401, got {other:?}"),
            }
        }
    }
    // Other refusals before the upgrade are not about credentials.
    let (status, head, _) = http_get(relay.addr(), "/nope", "");
    assert_eq!(status, 404, "{head}");
    assert_eq!(header_of(&head, "www-authenticate"), None, "{head}");
}

#[test]
fn missing_token_gets_an_error_frame_and_1008() {
    let (fake, relay) = setup(|_| {});
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert_error_frame(&got, 401, 1008);
    assert!(fake.sessions().is_empty());
}

#[test]
fn bad_token_in_api_key_gets_an_error_frame_and_1008() {
    let (fake, relay) = setup(|_| {});
    for (what, token) in bad_tokens(&relay) {
        let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
        ws.send(Message::text(config_message(Some(&token))))
            .unwrap();
        let got = read_all(&mut ws);
        assert_error_frame(&got, 401, 1008);
        let text = format!("{got:?}");
        assert!(!text.contains(&token), "{what}: the token was echoed back");
    }
    assert!(fake.sessions().is_empty());
}

#[test]
fn oversized_frame_gets_400_and_1009() {
    let (fake, relay) = setup(|c| c.limits.max_frame_bytes = 64 * 1024);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1)[0].clone()))
        .unwrap();
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 1));
    // The relay may close while this is still being written.
    let _ = ws.send(Message::binary(vec![7u8; 100 * 1024]));
    let got = read_all(&mut ws);
    assert_error_frame(&got, 400, 1009);
    assert!(
        fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed),
        "{:?}",
        fake.sessions()
    );
    assert_eq!(
        fake.sessions()[0].audio_frames,
        1,
        "the oversized frame went upstream"
    );
    assert!(relay.wait_idle(LIMIT));
}

/// Sends config and one audio frame on a raw upgraded socket, waits for the
/// fake to see that frame (it is session number `nth`), then sends `bad`;
/// returns the server's frames.
fn raw_bad_frame(fake: &FakeSoniox, nth: usize, relay: &Relay, bad: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
        .unwrap();
    tcp.write_all(&client_frame(2, &audio_frames(1, 1)[0]))
        .unwrap();
    assert!(
        fake.wait_for(LIMIT, |s| s.len() >= nth && s[nth - 1].audio_frames == 1),
        "{:?}",
        fake.sessions()
    );
    tcp.write_all(bad).unwrap();
    raw_read_frames(&mut tcp)
}

#[test]
fn unmasked_client_frame_gets_1002() {
    let (fake, relay) = setup(|_| {});
    let frames = raw_bad_frame(
        &fake,
        1,
        &relay,
        &raw_frame(0x82, None, &[1, 2, 3, 4, 5, 6]),
    );
    assert_eq!(raw_close_code(&frames), Some(1002), "{frames:?}");
    let errs = raw_texts(&frames);
    assert!(errs.iter().any(|m| m["error_code"] == 400), "{errs:?}");
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio_frames, 1);
}

#[test]
fn reserved_opcode_gets_1002() {
    let (fake, relay) = setup(|_| {});
    let frames = raw_bad_frame(
        &fake,
        1,
        &relay,
        &raw_frame(0x83, Some([9, 8, 7, 6]), b"abc"),
    );
    assert_eq!(raw_close_code(&frames), Some(1002), "{frames:?}");
}

#[test]
fn binary_first_message_gets_400() {
    let (fake, relay) = setup(|_| {});
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::binary(audio_frames(1, 1)[0].clone()))
        .unwrap();
    let got = read_all(&mut ws);
    assert_error_frame(&got, 400, 1002);
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed && r.audio_frames == 0)));
}

#[test]
fn first_message_not_json_gets_400() {
    let (_fake, relay) = setup(|_| {});
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
    // Each gets 400 and 1002, with a message that says what is wrong and
    // where (serde_json's own words, none of which quote the input).
    let cases = [
        (
            "hello, relay",
            "Start request is not valid JSON: expected value at line 1 column 1.",
        ),
        ("[1,2,3]", "Start request must be a JSON object."),
        (
            "{\"model\": ",
            "Start request is not valid JSON: EOF while parsing a value at line 1 column 10.",
        ),
        (
            deep.as_str(),
            "Start request is not valid JSON: recursion limit exceeded at line 1 column 132.",
        ),
    ];
    for (first, message) in cases {
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        ws.send(Message::text(first)).unwrap();
        let got = read_all(&mut ws);
        assert_eq!(got.error_code(), Some(400), "{first}: {got:?}");
        assert_eq!(got.messages[0]["error_message"], message, "{first}");
        assert_eq!(got.close_code(), Some(1002), "{first}: {got:?}");
        assert!(!got.finished());
    }
}

#[test]
fn a_lone_surrogate_in_a_member_the_relay_reads_gets_400() {
    // The relay reads `api_key` (the token) and `client_reference_id`
    // (its record's id) as strings: one with a lone surrogate escape,
    // which no string holds, gets a 400 that names the member, never
    // quoting it. Elsewhere in the config it goes up as written.
    let (fake, relay) = setup(|_| {});
    let token = relay.token("dev");
    let cases = [
        (
            Via::FirstMessage,
            format!(r#"{{"model":"stt-rt-v4","api_key":"{token}\udc00"}}"#),
            "Start request's api_key is not a valid string: it holds a lone surrogate escape.",
        ),
        (
            Via::Header,
            r#"{"model":"stt-rt-v4","client_reference_id":"a\ud83d"}"#.to_string(),
            "Start request's client_reference_id is not a valid string: it holds a lone surrogate escape.",
        ),
    ];
    for (via, first, message) in cases {
        let auth = if matches!(via, Via::Header) {
            token.as_str()
        } else {
            ""
        };
        let (mut ws, _) = connect(relay.addr(), auth, via).unwrap();
        ws.send(Message::text(first.as_str())).unwrap();
        let got = read_all(&mut ws);
        // Said by its message, not `first`: that holds a token.
        assert_eq!(got.error_code(), Some(400), "{message}: {got:?}");
        assert_eq!(got.messages[0]["error_message"], message);
        assert_eq!(got.close_code(), Some(1002), "{message}: {got:?}");
    }
    assert!(fake.sessions().iter().all(|s| s.config.is_none()));
}

#[test]
fn max_streams_gets_503_before_the_upgrade() {
    let (fake, relay) = setup(|c| c.server.max_streams = 2);
    let token = relay.token("dev");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        held.push(ws);
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2));
    let (status, body) = refused_upgrade(connect(relay.addr(), &token, Via::Header));
    assert_eq!(status, 503);
    assert_http_error_body(&body, 503);

    let mut first = held.remove(0);
    first.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut first).finished());
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() <= 1));
    let (mut ws, _) =
        connect(relay.addr(), &token, Via::Header).expect("room again after one ended");
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
    drop(held);
}

#[test]
fn wrong_path_is_404_and_healthz_is_200() {
    let (_fake, relay) = setup(|_| {});
    let (status, _, body) = http_get(relay.addr(), "/nope", "");
    assert_eq!(status, 404);
    assert_http_error_body(&serde_json::from_str(&body).expect("JSON body"), 404);
    let (status, _, _) = http_get(relay.addr(), "/healthz", "");
    assert_eq!(status, 200);
}

#[test]
fn other_streams_survive_a_bad_one() {
    let (fake, relay) = setup(|_| {});
    let (mut a, _) = connect(relay.addr(), &relay.token("a"), Via::Header).unwrap();
    a.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(20, 4);
    for f in &frames[..10] {
        a.send(Message::binary(f.clone())).unwrap();
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 10));
    let bad = raw_bad_frame(&fake, 2, &relay, &raw_frame(0x82, None, b"unmasked"));
    assert_eq!(raw_close_code(&bad), Some(1002));
    for f in &frames[10..] {
        a.send(Message::binary(f.clone())).unwrap();
    }
    a.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut a);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None);
    assert_eq!(got.close_code(), Some(1000));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 2 && s.iter().all(|r| r.closed)));
    let full = fake
        .sessions()
        .into_iter()
        .find(|s| s.audio_frames == 20)
        .expect("stream A's session");
    assert_eq!(full.audio, frames.concat());
}

#[test]
fn idle_stream_gets_408() {
    let (_fake, relay) = setup(|c| c.limits.idle_timeout = Duration::from_secs(1));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(408), "{got:?}");
    assert!(got.close.is_some(), "{got:?}");
    assert!(!got.abrupt);
    assert!(relay.wait_idle(LIMIT));
}

#[test]
fn a_client_whose_close_upstream_never_answers_gets_its_answer_not_408() {
    // Upstream stops reading at the third audio frame; the client then
    // closes. Its close is never answered; after the idle timeout the relay
    // answers it in upstream's place: a close, no error (the client said
    // goodbye; it was not idle, and it must get no data frame now).
    let fake = fake(&["key-a"], |c| c.faults.stall_after_frames = Some(3));
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 15) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.close(None).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert!(!got.abrupt, "{got:?}");
    assert!(relay.wait_idle(LIMIT));
    let m = relay.handle.metrics();
    assert_eq!(m.errors(clio_relay::core::metrics::Side::Client, 408), 0);
}

#[test]
fn upstream_dying_mid_stream_gets_503_and_1011() {
    let fake = fake(&["key-a"], |c| c.faults.close_after_frames = Some(5));
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 2) {
        ws.send(Message::binary(f)).unwrap();
    }
    let got = read_all(&mut ws);
    assert_error_frame(&got, 503, 1011);
    assert!(relay.wait_idle(LIMIT));
}

/// An upstream that cannot be reached is told with 503, the code Soniox
/// itself gives when a client should reconnect ("Cannot continue
/// request"), and close 1011. The relay sent 502, a code Soniox never
/// sends: Soniox's JavaScript SDK (`@soniox/client` 2.3) takes an error
/// frame's code it does not know as a `RealtimeError` that
/// `isRetriableError` says is not worth retrying, so a `Recording` with
/// `auto_reconnect` gave up on an outage it would have ridden out (it
/// retries 408, 500, 503 and lost connections). The relay still counts
/// it as before, `errors_total{side="upstream",code="502"}`: the error
/// type says which 503 it is (`upstream_unavailable`).
#[test]
fn an_unreachable_upstream_gets_soniox_reconnect_code_503_and_1011() {
    // A port nothing listens on: every connect is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = relay_config(
        &format!("ws://127.0.0.1:{port}/transcribe-websocket"),
        &[("acct-down", "key-down")],
    );
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_error_frame(&got, 503, 1011);
    assert_eq!(got.messages[0]["error_type"], "upstream_unavailable");
    let m = relay.handle.metrics();
    assert!(m.errors(clio_relay::core::metrics::Side::Upstream, 502) >= 1);
    assert_eq!(m.errors(clio_relay::core::metrics::Side::Upstream, 503), 0);
}

/// relay-load's report explains the 503 an unreachable upstream now
/// gets: before, its hint named only a drain, a retired key and an
/// upstream failure mid-stream, so a run against a relay that could not
/// reach upstream at all pointed the reader at the wrong causes.
#[test]
fn relay_load_explains_an_unreachable_upstreams_503() {
    use relay_load::{AuthVia, Credentials, LoadOptions, Pace, Target};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = relay_config(
        &format!("ws://127.0.0.1:{port}/transcribe-websocket"),
        &[("acct-down", "key-down")],
    );
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let keys = std::sync::Arc::new(TokenKeys::from_config(&relay.cfg.tokens));
    let report = relay_load::run(&LoadOptions {
        target: Target::relay(relay.addr()),
        auth: AuthVia::Header,
        credentials: Credentials::Mint(keys, Duration::from_secs(600)),
        streams: 2,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        pace: Pace::Times(1.0),
        duration: Duration::from_secs(60),
        threads: 1,
        ..LoadOptions::default()
    })
    .unwrap();
    let summary = report.table();
    assert_eq!(
        report.streams_failed.get("error 503"),
        Some(&2),
        "{summary}"
    );
    assert!(
        summary.contains("hint: 2 streams were told to reconnect")
            && summary.contains("could not reach upstream"),
        "{summary}"
    );
}

/// With the token on the request, a refusal at open (here an upstream
/// that cannot be reached) waits for the client's config, as Soniox's
/// answers do: a client that sends none gets 408 at
/// `limits.idle_timeout`, one whose first message is no config gets its
/// 400, and one with a config the open's 503. The relay sent the
/// refusal and its close right after the 101, before the config: Soniox's
/// Python SDK, which sends its config as soon as the upgrade is done,
/// found the connection closing and raised "Failed to start realtime
/// session", the error's code and message lost (five runs in six).
#[test]
fn a_refusal_at_open_waits_for_the_config_as_soniox_does() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = relay_config(
        &format!("ws://127.0.0.1:{port}/transcribe-websocket"),
        &[("acct-down", "key-down")],
    );
    cfg.failover.max_resumes = 0;
    cfg.limits.idle_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    // No config: the relay waits for one, as Soniox would.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert_error_frame(&read_all(&mut ws), 408, 1000);
    // A first message that is no config: the client's fault comes first.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::binary(vec![0u8; 64])).unwrap();
    assert_error_frame(&read_all(&mut ws), 400, 1002);
    // A config: the open's refusal.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    assert_error_frame(&read_all(&mut ws), 503, 1011);
    // The official SDK sees the error as it would Soniox's.
    if crate::failover::soniox_sdk() {
        let got = crate::failover::through_python_sdk(&relay, &[]);
        assert_eq!(got["error"], 503, "{got}");
    }
}

#[test]
fn upstream_error_mid_stream_passes_through() {
    // With mid-stream resume off (raw audio would resume otherwise).
    let fake = fake(&["key-a"], |c| c.faults.error_after_frames = Some((5, 500)));
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 2) {
        ws.send(Message::binary(f)).unwrap();
    }
    let got = read_all(&mut ws);
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].error_sent, Some(500));
    let errs: Vec<_> = got
        .messages
        .iter()
        .filter(|m| m.get("error_code").is_some())
        .collect();
    assert_eq!(errs.len(), 1, "{got:?}");
    let e = errs[0];
    assert_eq!(e["error_code"], 500);
    // Soniox's own message, not one the relay made up.
    assert_eq!(e["error_message"], "Internal error.");
    assert_eq!(e["error_type"], "internal_error");
    assert!(
        e["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("fake-")),
        "{e}"
    );
    assert!(got.close.is_some(), "{got:?}");
    assert!(!got.finished());
}

#[test]
fn frame_just_before_a_protocol_error_still_reaches_upstream() {
    // A valid audio frame and a bad one in the same TCP segment: the valid
    // frame was sent before the violation and must not be lost.
    let (fake, relay) = setup(|_| {});
    let (mut tcp, _) = raw_upgrade(relay.addr(), &relay.token("dev"));
    tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
        .unwrap();
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].config.is_some()));
    let good = audio_frames(1, 3).remove(0);
    let mut bytes = client_frame(2, &good);
    bytes.extend(raw_frame(0x82, None, b"unmasked"));
    tcp.write_all(&bytes).unwrap();
    let frames = raw_read_frames(&mut tcp);
    assert_eq!(raw_close_code(&frames), Some(1002), "{frames:?}");
    assert!(fake.wait_for(LIMIT, |s| s[0].closed));
    let audio = fake.sessions()[0].audio.clone();
    assert!(
        audio == good,
        "the valid frame before the bad one was dropped: {} of {} bytes arrived",
        audio.len(),
        good.len()
    );
}

#[test]
fn a_relay_past_its_drain_deadline_refuses_new_streams_with_503() {
    let (fake, relay) = setup(|_| {});
    // Before the deadline a drain still serves the connections accepted
    // before its listeners closed (tests/relay/drain.rs); past it, none.
    relay.handle.process.set_draining(true);
    relay.handle.process.set_finalizing(true);
    assert_eq!(http_get(relay.addr(), "/healthz", "").0, 503);
    assert_eq!(http_get(relay.handle.admin_addr, "/healthz", "").0, 503);
    let (status, body) = refused_upgrade(connect(relay.addr(), &relay.token("dev"), Via::Header));
    assert_eq!(status, 503);
    assert_http_error_body(&body, 503);
    assert!(fake.sessions().is_empty());
    relay.handle.process.set_draining(false);
    relay.handle.process.set_finalizing(false);
    assert_eq!(http_get(relay.addr(), "/healthz", "").0, 200);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
}

#[test]
fn client_port_allowlist_closes_other_networks() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let relay = Relay::start(cfg.clone());
    assert!(
        connect(relay.addr(), &relay.token("d"), Via::Header).is_err(),
        "127.0.0.1 is not on the list"
    );
    // A reload that adds loopback opens the door.
    cfg.server.allow.push("127.0.0.0/8".parse().unwrap());
    relay.handle.reload(&cfg).unwrap();
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished());
}

#[test]
fn a_continuation_with_no_message_to_continue_gets_1002() {
    // Before the relay checked the order of fragments, this frame went
    // upstream, which dropped the connection: the client got a 503
    // "upstream lost" for its own mistake, after a resume.
    let (fake, relay) = setup(|_| {});
    let frames = raw_bad_frame(
        &fake,
        1,
        &relay,
        &raw_frame(0x80, Some([9, 8, 7, 6]), b"abcd"),
    );
    assert_eq!(raw_close_code(&frames), Some(1002), "{frames:?}");
    let errs = raw_texts(&frames);
    assert!(
        errs.iter()
            .any(|m| m["error_code"] == 400
                && m["error_message"] == "fragmented message out of order"),
        "{errs:?}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio_frames, 1);
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
}

#[test]
fn a_new_message_inside_a_fragmented_one_gets_1002() {
    let (fake, relay) = setup(|_| {});
    let mut bad = raw_frame(0x02, Some([9, 8, 7, 6]), b"abcd");
    bad.extend(raw_frame(0x82, Some([9, 8, 7, 6]), b"efgh"));
    let frames = raw_bad_frame(&fake, 1, &relay, &bad);
    assert_eq!(raw_close_code(&frames), Some(1002), "{frames:?}");
    assert!(raw_texts(&frames).iter().any(|m| m["error_code"] == 400));
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(relay.handle.metrics().streams_resumed(), 0);
}

#[test]
fn a_text_message_that_is_not_utf8_gets_1007() {
    // Before the relay checked, the message went upstream, which dropped
    // the connection; the stream, not yet accepted, was retried from its
    // copy with the same message on three more connections, and the
    // client got a 503 "upstream lost".
    let (fake, relay) = setup(|_| {});
    let frames = raw_bad_frame(
        &fake,
        1,
        &relay,
        &raw_frame(0x81, Some([9, 8, 7, 6]), b"{\"type\":\"\xc3\x28\"}"),
    );
    assert_eq!(raw_close_code(&frames), Some(1007), "{frames:?}");
    let errs = raw_texts(&frames);
    assert!(
        errs.iter()
            .any(|m| m["error_code"] == 400
                && m["error_message"] == "text message is not valid UTF-8"),
        "{errs:?}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    let s = &fake.sessions()[0];
    assert_eq!((s.audio_frames, s.text_messages.len()), (1, 1), "{s:?}");
}

#[test]
fn a_first_message_that_is_not_utf8_gets_1007() {
    // The config is a text message like any other: before the relay
    // checked, bytes that are not UTF-8 were a JSON error ("invalid
    // unicode code point", or "trailing characters" outside a string),
    // closed with 1002.
    let (fake, relay) = setup(|_| {});
    for config in [
        &b"{\"model\":\"\xc3\x28\"}"[..],
        b"{\"model\":\"m\"}\xff",
        b"\xef\xbb",
    ] {
        // The token on the request, and none there (it would be in the config).
        for token in [relay.token("dev"), String::new()] {
            let (mut tcp, head) = raw_upgrade(relay.addr(), &token);
            assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
            tcp.write_all(&client_frame(1, config)).unwrap();
            let frames = raw_read_frames(&mut tcp);
            assert_eq!(
                raw_close_code(&frames),
                Some(1007),
                "{config:?}: {frames:?}"
            );
            let errs = raw_texts(&frames);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0]["error_code"], 400);
            assert_eq!(errs[0]["error_message"], "text message is not valid UTF-8");
        }
    }
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed && r.audio_frames == 0)));
    assert!(fake.sessions().iter().all(|s| s.text_messages.is_empty()));
}

#[test]
fn a_close_frame_with_a_bad_code_or_body_gets_1002() {
    // Before the relay checked, a 1-byte close went upstream and the
    // client got a normal close (1000) back.
    for body in [&b"\x03"[..], b"\x03\xed", b"\x07\xd0"] {
        let (fake, relay) = setup(|_| {});
        let frames = raw_bad_frame(&fake, 1, &relay, &raw_frame(0x88, Some([9, 8, 7, 6]), body));
        assert_eq!(raw_close_code(&frames), Some(1002), "{body:?}: {frames:?}");
        let errs = raw_texts(&frames);
        assert!(
            errs.iter().any(|m| m["error_code"] == 400
                && m["error_message"] == "close frame with an invalid code or body"),
            "{body:?}: {errs:?}"
        );
        assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
        // Upstream got the relay's own close, not the client's bad one.
        assert_eq!(fake.sessions()[0].client_close_code, Some(1001), "{body:?}");
    }
}

#[test]
fn a_bad_close_frame_before_the_first_message_gets_its_error() {
    // Before the relay checked, a close frame that came before the config
    // message got a normal close (1000) back, whatever its body.
    let (fake, relay) = setup(|_| {});
    let invalid = "close frame with an invalid code or body";
    for (body, close, message) in [
        (&b"\x03"[..], 1002, Some(invalid)),
        (b"\x03\xe7", 1002, Some(invalid)), // 999
        (b"\x03\xed", 1002, Some(invalid)), // 1005
        (
            b"\x03\xe8\xc3\x28",
            1007,
            Some("text message is not valid UTF-8"),
        ),
        (b"\x03\xe8bye", 1000, None),
        (b"", 1000, None),
    ] {
        let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
        tcp.write_all(&raw_frame(0x88, Some([9, 8, 7, 6]), body))
            .unwrap();
        let frames = raw_read_frames(&mut tcp);
        assert_eq!(raw_close_code(&frames), Some(close), "{body:?}: {frames:?}");
        let errs = raw_texts(&frames);
        match message {
            Some(message) => {
                assert_eq!(errs.len(), 1, "{body:?}: {errs:?}");
                assert_eq!(errs[0]["error_code"], 400, "{body:?}");
                assert_eq!(errs[0]["error_message"], message, "{body:?}");
            }
            None => assert!(errs.is_empty(), "{body:?}: {errs:?}"),
        }
    }
    // No stream reached upstream (the relay's own check of the upstream
    // URL may have opened a session, which carries no config).
    assert!(
        fake.sessions().iter().all(|s| s.config.is_none()),
        "{:?}",
        fake.sessions()
    );
}
