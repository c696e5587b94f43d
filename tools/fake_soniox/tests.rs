//! The fake over real sockets, with blocking tungstenite as the client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use super::*;

pub(super) type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

pub(super) const KEY: &str = "fake-key-1";
pub(super) const CONFIG: &str =
    r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1}"#;
/// 120 ms of 16 kHz s16le mono.
const FRAME: usize = 3840;
/// Bound on every blocking read, so a broken fake fails a test instead of hanging it.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn start(cfg: FakeConfig) -> FakeSoniox {
    FakeSoniox::start(cfg).expect("fake starts")
}

pub(super) fn request(fake: &FakeSoniox, headers: &[(&str, &str)]) -> Request {
    let mut req = fake.url().into_client_request().unwrap();
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    req
}

pub(super) fn bearer() -> (&'static str, &'static str) {
    ("authorization", "Bearer fake-key-1")
}

pub(super) fn connect(fake: &FakeSoniox, headers: &[(&str, &str)]) -> tungstenite::Result<Ws> {
    let (mut ws, _) = tungstenite::connect(request(fake, headers))?;
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    }
    Ok(ws)
}

/// The HTTP status and JSON body of a refused upgrade.
pub(super) fn refused(fake: &FakeSoniox, headers: &[(&str, &str)]) -> (u16, Value) {
    match connect(fake, headers) {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().expect("error body");
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap(),
            )
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

pub(super) fn send_text<S: Read + Write>(ws: &mut WebSocket<S>, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

pub(super) fn send_audio<S: Read + Write>(ws: &mut WebSocket<S>, data: &[u8]) {
    ws.send(Message::binary(data.to_vec())).unwrap();
}

/// Reads the next text message as JSON.
fn read_json<S: Read + Write>(ws: &mut WebSocket<S>) -> Value {
    loop {
        match ws.read().expect("read a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(f) => panic!("closed before a message: {f:?}"),
            _ => {}
        }
    }
}

/// Reads text messages until the server's close frame; returns them and its
/// code, then finishes the closing handshake.
pub(super) fn read_to_close<S: Read + Write>(ws: &mut WebSocket<S>) -> (Vec<Value>, u16) {
    let mut msgs = Vec::new();
    loop {
        match ws.read().expect("read until close") {
            Message::Text(t) => msgs.push(serde_json::from_str(t.as_str()).unwrap()),
            Message::Close(f) => {
                let code = f.map_or(1005, |f| u16::from(f.code));
                // Our reply goes out on the next read, which then ends.
                while ws.read().is_ok() {}
                return (msgs, code);
            }
            _ => {}
        }
    }
}

/// Expects exactly one Soniox error message and then a close.
pub(super) fn expect_error<S: Read + Write>(ws: &mut WebSocket<S>, code: u16) -> Value {
    let (msgs, close) = read_to_close(ws);
    assert_eq!(msgs.len(), 1, "one error message: {msgs:?}");
    let err = msgs[0].clone();
    assert_eq!(err["error_code"], code, "{err}");
    assert_eq!(err["tokens"], serde_json::json!([]));
    assert!(err["error_message"].is_string() && err["error_type"].is_string());
    assert!(err["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(close, 1000);
    err
}

/// Waits (bounded) until the fake's records satisfy `pred`.
pub(super) fn wait_for(fake: &FakeSoniox, what: &str, pred: impl Fn(&[SessionRecord]) -> bool) {
    assert!(
        fake.wait_for(READ_TIMEOUT, pred),
        "timed out waiting for {what}: {:?}",
        fake.sessions()
    );
}

fn final_text(msgs: &[Value]) -> String {
    msgs.iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["is_final"] == true)
        .map(|t| t["text"].as_str().unwrap().to_owned())
        .collect()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn header_key_streams_words_then_finished_and_close() {
    let fake = start(FakeConfig {
        record_audio: true,
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    let mut sent = Vec::new();
    for i in 0..10 {
        let frame = pattern(FRAME, i);
        send_audio(&mut ws, &frame);
        sent.extend_from_slice(&frame);
    }
    send_audio(&mut ws, &[]);
    let (msgs, code) = read_to_close(&mut ws);
    assert_eq!(code, 1000);
    // 1200 ms at 480 ms a word: two words, then the 240 ms rest at the end.
    assert_eq!(final_text(&msgs), "the quick brown");
    let non_final = msgs
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["is_final"] == false)
        .count();
    assert!(non_final > 0, "partial words are shown: {msgs:?}");
    let first = msgs
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .find(|t| t["is_final"] == true)
        .unwrap();
    assert_eq!(
        (first["start_ms"].as_u64(), first["end_ms"].as_u64()),
        (Some(0), Some(480))
    );
    assert_eq!(
        first["confidence"].as_f64().map(|c| c > 0.0 && c <= 1.0),
        Some(true)
    );
    assert!(msgs.iter().all(|m| m["total_audio_proc_ms"].is_u64()));
    let last = msgs.last().unwrap();
    assert_eq!(last["finished"], true);
    assert_eq!(last["final_audio_proc_ms"], 1200);
    assert_eq!(last["total_audio_proc_ms"], 1200);

    wait_for(&fake, "closed session", |s| s.len() == 1 && s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.key.as_deref(), Some(KEY));
    assert_eq!(rec.auth_via, Some(AuthVia::Header));
    assert_eq!(rec.request_path, "/transcribe-websocket");
    assert!(rec
        .request_headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == "Bearer fake-key-1"));
    assert_eq!(rec.config.as_ref().unwrap()["model"], "stt-rt-v4");
    assert_eq!(rec.text_messages, vec![CONFIG.to_owned()]);
    assert_eq!((rec.audio_frames, rec.audio_bytes), (10, 10 * FRAME as u64));
    assert!(rec.audio == sent, "audio recorded byte for byte");
    assert!(rec.empty_frame_received && rec.finished_sent);
    assert_eq!(rec.error_sent, None);
    assert_eq!(rec.client_close_code, Some(1000));
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn subprotocol_key_is_answered_with_the_subprotocol() {
    let fake = start(FakeConfig::default());
    let req = request(
        &fake,
        &[("sec-websocket-protocol", "soniox-api-key, fake-key-1")],
    );
    let (mut ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "soniox-api-key");
    send_text(&mut ws, CONFIG);
    send_text(&mut ws, ""); // end of audio as an empty text frame
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    wait_for(&fake, "closed session", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.auth_via, Some(AuthVia::Subprotocol));
    assert_eq!(rec.key.as_deref(), Some(KEY));
    assert!(rec.empty_frame_received);
}

#[test]
fn first_message_key_is_accepted() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v5","audio_format":"auto","extra":{"x":1}}"#,
    );
    send_audio(&mut ws, &pattern(16_000, 1)); // 1000 ms at the assumed 16 kB/s
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(final_text(&msgs), "the quick");
    assert_eq!(msgs.last().unwrap()["finished"], true);
    wait_for(&fake, "closed session", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.auth_via, Some(AuthVia::FirstMessage));
    assert_eq!(rec.key.as_deref(), Some(KEY));
}

#[test]
fn bad_key_in_first_message_is_a_401_error_message() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"nope","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    let err = expect_error(&mut ws, 401);
    assert_eq!(err["error_type"], "unauthenticated");
    wait_for(&fake, "closed session", |s| s[0].closed);
    assert_eq!(fake.sessions()[0].error_sent, Some(401));
    assert_eq!(fake.sessions()[0].key, None);
}

#[test]
fn no_key_anywhere_is_a_401_error_message() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(&mut ws, CONFIG);
    expect_error(&mut ws, 401);
}

#[test]
fn bad_key_on_upgrade_is_http_401() {
    let fake = start(FakeConfig::default());
    let (status, body) = refused(&fake, &[("authorization", "Bearer wrong")]);
    assert_eq!(status, 401);
    assert_eq!(body["status_code"], 401);
    assert_eq!(body["error_type"], "unauthenticated");
    assert_eq!(body["message"], "Invalid API key.");
    assert!(body["request_id"].is_string());
    let (status, _) = refused(
        &fake,
        &[("sec-websocket-protocol", "soniox-api-key, wrong")],
    );
    assert_eq!(status, 401);
    wait_for(&fake, "two refused", |s| {
        s.len() == 2 && s.iter().all(|r| r.closed)
    });
    assert_eq!(fake.sessions()[0].http_status, Some(401));
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn rejected_key_and_wrong_path_are_refused() {
    let fake = start(FakeConfig {
        keys: vec![FakeKey {
            reject: Some(402),
            ..FakeKey::new("broke", 10)
        }],
        ..FakeConfig::default()
    });
    let (status, body) = refused(&fake, &[("authorization", "Bearer broke")]);
    assert_eq!((status, body["status_code"].as_u64()), (402, Some(402)));
    let req = format!("ws://{}/other", fake.addr());
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn key_in_both_places_is_400() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    let err = expect_error(&mut ws, 400);
    assert!(err["error_message"].as_str().unwrap().contains("one place"));
}

#[test]
fn binary_first_message_is_400() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_audio(&mut ws, &[1, 2, 3]);
    let err = expect_error(&mut ws, 400);
    assert_eq!(
        err["error_message"],
        "Start request must be a text message."
    );
}

#[test]
fn bad_configs_are_400() {
    let fake = start(FakeConfig::default());
    for config in [
        r#"{"model":"stt-rt-v0","audio_format":"auto"}"#,
        r#"{"audio_format":"auto"}"#,
        r#"{"model":"stt-rt-v4"}"#,
        r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","num_channels":1}"#,
        r#"{"model":"stt-rt-v4","audio_format":"opus-ish"}"#,
        r#"["not","an","object"]"#,
        "not json",
    ] {
        let mut ws = connect(&fake, &[bearer()]).unwrap();
        send_text(&mut ws, config);
        expect_error(&mut ws, 400);
    }
    wait_for(&fake, "all closed", |s| {
        s.len() == 7 && s.iter().all(|r| r.closed)
    });
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn finalize_makes_pending_audio_final_and_sends_fin() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_text(&mut ws, r#"{"type":"keepalive"}"#);
    send_audio(&mut ws, &pattern(32 * 300, 0)); // 300 ms: a partial word
    let partial = read_json(&mut ws);
    assert_eq!(partial["tokens"][0]["is_final"], false);
    send_text(&mut ws, r#"{"type":"finalize"}"#);
    let fin = read_json(&mut ws);
    let tokens = fin["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{fin}");
    assert_eq!(tokens[0]["text"], "the");
    assert_eq!(tokens[0]["is_final"], true);
    assert_eq!(tokens[1]["text"], "<fin>");
    assert_eq!(tokens[1]["is_final"], true);
    assert_eq!(fin["final_audio_proc_ms"], 300);
    send_text(&mut ws, r#"{"type":"dance"}"#);
    expect_error(&mut ws, 400);
}

#[test]
fn concurrency_limit_is_429_until_a_slot_frees() {
    let fake = start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 1)],
        ..FakeConfig::default()
    });
    let mut first = connect(&fake, &[bearer()]).unwrap();
    let (status, body) = refused(&fake, &[bearer()]);
    assert_eq!(status, 429);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("concurrency limit"));
    // The same limit applies to a key sent in the first message.
    let mut legacy = connect(&fake, &[]).unwrap();
    send_text(
        &mut legacy,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    expect_error(&mut legacy, 429);

    first
        .close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        }))
        .unwrap();
    while first.read().is_ok() {}
    let deadline = Instant::now() + READ_TIMEOUT;
    while fake.active_streams() != 0 {
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut again = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut again, CONFIG);
    send_audio(&mut again, &[]);
    let (msgs, _) = read_to_close(&mut again);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    let recs = fake.sessions();
    assert_eq!(recs[0].client_close_code, Some(1000));
    assert!(!recs[0].finished_sent);
}

#[test]
fn echo_mode_returns_the_marker() {
    let fake = start(FakeConfig {
        echo: true,
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for i in 0..3u8 {
        let mut frame = vec![0u8; 3200]; // 100 ms
        for (j, b) in frame.iter_mut().take(16).enumerate() {
            *b = i * 16 + j as u8;
        }
        send_audio(&mut ws, &frame);
        let msg = read_json(&mut ws);
        let tokens = msg["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 1);
        let expected: String = frame[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(tokens[0]["text"], expected);
        assert_eq!(tokens[0]["is_final"], true);
        assert_eq!(tokens[0]["start_ms"], u64::from(i) * 100);
        assert_eq!(tokens[0]["end_ms"], u64::from(i) * 100 + 100);
    }
    send_audio(&mut ws, &[1, 2, 3]); // too short to echo
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.len(), 1, "only finished: {msgs:?}");
    assert_eq!(msgs[0]["finished"], true);
}

#[test]
fn error_after_frames_sends_the_error_and_closes() {
    let fake = start(FakeConfig {
        faults: Faults {
            error_after_frames: Some((3, 503)),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for _ in 0..3 {
        send_audio(&mut ws, &[0; 320]); // 10 ms: no words
    }
    let err = expect_error(&mut ws, 503);
    assert_eq!(err["error_message"], "Cannot continue request.");
    wait_for(&fake, "closed", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!((rec.audio_frames, rec.error_sent), (3, Some(503)));
}

#[test]
fn close_after_frames_drops_the_connection_without_close_frame() {
    let fake = start(FakeConfig {
        faults: Faults {
            close_after_frames: Some(2),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[0; 320]);
    send_audio(&mut ws, &[0; 320]);
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => panic!("got a close frame {f:?}"),
            Ok(Message::Text(t)) => panic!("got a message {t}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("connection not dropped within the read timeout")
            }
            Err(_) => break,
        }
    }
    wait_for(&fake, "closed", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.audio_frames, 2);
    assert!(!rec.finished_sent && rec.error_sent.is_none());
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn idle_session_gets_408() {
    let fake = start(FakeConfig {
        idle_timeout: Duration::from_millis(200),
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    let err = expect_error(&mut ws, 408);
    assert_eq!(err["error_type"], "request_timeout");
}

#[test]
fn keepalive_keeps_an_idle_session_open() {
    let fake = start(FakeConfig {
        idle_timeout: Duration::from_millis(1000),
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(200));
        send_text(&mut ws, r#"{"type":"keepalive"}"#);
    }
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["finished"], true);
}

#[test]
fn forbidden_string_in_header_is_a_violation() {
    let fake = start(FakeConfig {
        forbidden: vec!["sess-secret-123".to_owned()],
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer(), ("x-clio-session", "sess-secret-123")]).unwrap();
    let err = expect_error(&mut ws, 400);
    assert_eq!(err["error_message"], "forbidden string");
    let v = fake.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("x-clio-session") && !v[0].contains("sess-secret-123"));
}

#[test]
fn forbidden_string_in_a_text_message_is_a_violation() {
    let fake = start(FakeConfig {
        forbidden: vec!["sess-secret-123".to_owned()],
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(
        &mut ws,
        r#"{"model":"stt-rt-v4","audio_format":"auto","client_reference_id":"sess-secret-123"}"#,
    );
    expect_error(&mut ws, 400);
    let v = fake.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("text message"));
}

#[test]
fn handshake_delay_holds_the_upgrade() {
    let fake = start(FakeConfig {
        faults: Faults {
            handshake_delay: Duration::from_millis(200),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let t0 = Instant::now();
    let _ws = connect(&fake, &[bearer()]).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(200));
}

#[test]
fn shards_share_the_port() {
    let fake = start(FakeConfig {
        shards: 2,
        ..FakeConfig::default()
    });
    let mut conns: Vec<Ws> = (0..6)
        .map(|_| connect(&fake, &[bearer()]).unwrap())
        .collect();
    for ws in &mut conns {
        send_text(ws, CONFIG);
        send_audio(ws, &pattern(FRAME * 8, 3)); // 960 ms
        send_audio(ws, &[]);
    }
    for ws in &mut conns {
        let (msgs, code) = read_to_close(ws);
        assert_eq!(code, 1000);
        assert_eq!(final_text(&msgs), "the quick");
    }
    fake.stop();
}

/// A server configuration for `localhost` signed by a fresh test CA, and a
/// client configuration trusting that CA.
pub(super) fn test_tls() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A TLS client connection to the fake, for `localhost`.
pub(super) fn tls_connect(
    fake: &FakeSoniox,
    client: Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client, name).unwrap();
    let tcp = TcpStream::connect(fake.addr()).unwrap();
    tcp.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn tls_with_a_test_ca() {
    let (server, client) = test_tls();
    let fake = start(FakeConfig {
        tls: Some(server),
        ..FakeConfig::default()
    });
    assert!(fake.url().starts_with("wss://localhost:"));

    let tls = tls_connect(&fake, client);
    let (mut ws, _) = tungstenite::client::client(request(&fake, &[bearer()]), tls).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &pattern(FRAME * 4, 9));
    send_audio(&mut ws, &[]);
    let (msgs, code) = read_to_close(&mut ws);
    assert_eq!(code, 1000);
    assert_eq!(final_text(&msgs), "the");
    assert_eq!(msgs.last().unwrap()["finished"], true);
}

#[test]
fn stop_ends_live_sessions() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[0; 320]);
    wait_for(&fake, "audio seen", |s| {
        !s.is_empty() && s[0].config.is_some()
    });
    assert_eq!(fake.active_streams(), 1);
    fake.stop();
    // The client sees its connection end (no hang until the read timeout).
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("connection still open after stop")
            }
            Err(_) => break,
        }
    }
}

#[test]
fn many_echo_sessions_in_parallel() {
    let fake = Arc::new(start(FakeConfig {
        echo: true,
        shards: 2,
        keys: vec![FakeKey::new(KEY, 100)],
        ..FakeConfig::default()
    }));
    let clients: Vec<_> = (0..32u32)
        .map(|c| {
            let fake = fake.clone();
            std::thread::spawn(move || {
                let mut ws = connect(&fake, &[bearer()]).unwrap();
                send_text(&mut ws, CONFIG);
                for seq in 0..50u32 {
                    let mut frame = vec![0u8; 640];
                    frame[..4].copy_from_slice(&c.to_be_bytes());
                    frame[4..8].copy_from_slice(&seq.to_be_bytes());
                    send_audio(&mut ws, &frame);
                    let msg = read_json(&mut ws);
                    let expected: String = frame[..16].iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(msg["tokens"][0]["text"], expected);
                }
                send_audio(&mut ws, &[]);
                let (msgs, _) = read_to_close(&mut ws);
                assert_eq!(msgs.last().unwrap()["finished"], true);
                assert_eq!(msgs.last().unwrap()["total_audio_proc_ms"], 1000);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    wait_for(&fake, "all closed", |s| {
        s.len() == 32 && s.iter().all(|r| r.closed)
    });
    assert!(fake
        .sessions()
        .iter()
        .all(|r| r.audio_frames == 50 && r.finished_sent));
    assert_eq!(fake.active_streams(), 0);
}
