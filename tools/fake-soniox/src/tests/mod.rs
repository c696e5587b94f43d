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

/// How many final words (each token's text is a word and a space).
fn final_words(msgs: &[Value]) -> usize {
    final_text(msgs).split_whitespace().count()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
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

mod handshake;
mod server;
mod session;
