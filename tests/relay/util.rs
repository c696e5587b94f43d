//! Shared helpers: a fake Soniox, a relay in-process, real WebSocket clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use clio_relay::cli::server::RelayHandle;
use clio_relay::control::httpc::{blocking, Endpoint, Request};
use clio_relay::core::config::{
    AccountConfig, AdminConfig, AuthMode, Config, LimitsConfig, ServerConfig, TokensConfig,
    UpstreamConfig,
};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// A fake Soniox with the given valid keys (each allowing 50 streams),
/// recording audio, and refusing to ever see `forbidden` strings.
pub fn fake(keys: &[&str], tweak: impl FnOnce(&mut FakeConfig)) -> FakeSoniox {
    let mut cfg = FakeConfig {
        keys: keys.iter().map(|k| FakeKey::new(k, 50)).collect(),
        record_audio: true,
        ..FakeConfig::default()
    };
    tweak(&mut cfg);
    FakeSoniox::start(cfg).expect("fake-soniox starts")
}

/// A random token secret for one test.
pub fn secret() -> Secret {
    let mut keys = clio_frame::mask::MaskKeys::default();
    let hex: String = (0..10)
        .flat_map(|_| keys.next_key())
        .map(|b| format!("{b:02x}"))
        .collect();
    Secret::new(hex)
}

/// A relay config pointing at `upstream`, one shard, accounts `(id, key)`.
pub fn relay_config(upstream: &str, accounts: &[(&str, &str)]) -> Config {
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            shards: 1,
            max_streams: 100,
            max_streams_set: true,
            allow: Vec::new(),
            proxy_protocol_from: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: upstream.to_string(),
            auth: AuthMode::Header,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
        },
        tokens: TokensConfig::new(secret()),
        limits: LimitsConfig::default(),
        accounts: accounts
            .iter()
            .map(|(id, key)| AccountConfig::new(*id, Secret::new(*key)))
            .collect(),
        // Health checks off unless a test turns them on: they would race the
        // tests' own account refusals.
        admin: AdminConfig {
            health_interval: Duration::ZERO,
            state_dir: state_dir(),
            ..AdminConfig::default()
        },
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    }
}

/// A started relay and the config it runs with.
#[derive(Debug)]
pub struct Relay {
    pub cfg: Config,
    pub handle: RelayHandle,
}

impl Relay {
    pub fn start(cfg: Config) -> Relay {
        let handle = clio_relay::cli::server::start(&cfg).expect("relay starts");
        Relay { cfg, handle }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.client_addr
    }

    pub fn token(&self, device: &str) -> String {
        TokenKeys::from_config(&self.cfg.tokens)
            .mint(device, Duration::from_secs(600), SystemTime::now())
            .unwrap()
    }

    /// Streams holding a place on the `i`th account (opening ones too).
    pub fn account_live(&self, i: usize) -> u32 {
        self.handle.process.accounts()[i]
            .live
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until no stream is live on any shard (gauges back to zero).
    pub fn wait_idle(&self, limit: Duration) -> bool {
        wait_until(limit, || {
            self.handle.metrics().active_streams() == 0 && self.handle.process.live_streams() == 0
        })
    }
}

/// The address `name=` gives in the relay's "clio-relay listening" log
/// line (`client` or `admin`).
pub fn listening_addr(line: &str, name: &str) -> std::net::SocketAddr {
    let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
    line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Where a client puts its token.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Header,
    Subprotocol,
    Query,
    FirstMessage,
    Nowhere,
}

/// Opens a WebSocket to the relay, with `token` placed per `via`.
pub fn connect(
    addr: SocketAddr,
    token: &str,
    via: Via,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let url = match via {
        Via::Query => format!("ws://{addr}/v1/transcribe?token={token}"),
        _ => format!("ws://{addr}/v1/transcribe"),
    };
    let mut req = url.into_client_request().unwrap();
    match via {
        Via::Header => {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        Via::Subprotocol => {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                format!("soniox-api-key, {token}").parse().unwrap(),
            );
        }
        _ => {}
    }
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tungstenite::client::client(req, tcp).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
    })
}

/// The config message a Clio client sends, with the token as `api_key` if given.
pub fn config_message(api_key: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "model": "stt-rt-v4",
        "audio_format": "pcm_s16le",
        "sample_rate": 16000,
        "num_channels": 1,
        "language_hints": ["en"],
        "enable_endpoint_detection": true,
        "x_unknown_field": {"kept": [1, 2, 3]},
    });
    if let Some(k) = api_key {
        v["api_key"] = Value::String(k.to_string());
    }
    v.to_string()
}

/// `n` frames of 100 ms 16 kHz s16le audio, each with distinct bytes.
pub fn audio_frames(n: usize, seed: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            (0..3200)
                .map(|j| (j as u32 * 31 + i as u32 * 7 + seed as u32) as u8)
                .collect()
        })
        .collect()
}

/// Everything a client received until the server closed.
#[derive(Debug, Default)]
pub struct Received {
    pub messages: Vec<Value>,
    pub close: Option<CloseFrame>,
    /// The connection ended without a close frame.
    pub abrupt: bool,
}

impl Received {
    pub fn text(&self) -> String {
        self.messages
            .iter()
            .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
            .filter(|t| t["is_final"] == true)
            .map(|t| t["text"].as_str().unwrap_or("").to_string())
            .collect()
    }
    pub fn finished(&self) -> bool {
        self.messages.iter().any(|m| m["finished"] == true)
    }
    pub fn error_code(&self) -> Option<u64> {
        self.messages.iter().find_map(|m| m["error_code"].as_u64())
    }
    pub fn close_code(&self) -> Option<u16> {
        self.close.as_ref().map(|c| u16::from(c.code))
    }
}

/// Reads until the server's close (answering it) or the end of the connection.
pub fn read_all(ws: &mut Ws) -> Received {
    let mut r = Received::default();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => r
                .messages
                .push(serde_json::from_str(&t).expect("server text is JSON")),
            Ok(Message::Close(c)) => {
                r.close = c;
                // Let tungstenite send the close reply.
                let _ = ws.flush();
                while ws.read().is_ok() {}
                return r;
            }
            Ok(_) => {}
            Err(_) => {
                r.abrupt = true;
                return r;
            }
        }
    }
}

/// Streams a whole session: config, audio, end of audio; returns what came back.
pub fn stream_session(ws: &mut Ws, first: &str, frames: &[Vec<u8>]) -> Received {
    ws.send(Message::text(first)).unwrap();
    for f in frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    read_all(ws)
}

/// A binary data frame of a fragmented message (the first, or a
/// continuation), its FIN bit as given.
pub fn fragment(payload: &[u8], first: bool, fin: bool) -> Message {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let op = OpCode::Data(if first { Data::Binary } else { Data::Continue });
    Message::Frame(tungstenite::protocol::frame::Frame::message(
        payload.to_vec(),
        op,
        fin,
    ))
}

/// A raw TCP connection that has done the upgrade, for sending bytes no
/// WebSocket library would (unmasked frames, bad opcodes).
pub fn raw_upgrade(addr: SocketAddr, token: &str) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        tcp,
        "GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    (tcp, head)
}

/// A masked client frame.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let op = match opcode {
        1 => clio_frame::frame::Opcode::Text,
        2 => clio_frame::frame::Opcode::Binary,
        8 => clio_frame::frame::Opcode::Close,
        _ => panic!("opcode"),
    };
    clio_frame::frame::build_frame(op, payload, Some([0x12, 0x34, 0x56, 0x78]))
}

/// Reads server frames from a raw socket until close or EOF: (opcode, payload) pairs.
pub fn raw_read_frames(tcp: &mut impl std::io::Read) -> Vec<(u8, Vec<u8>)> {
    read_server_frames(tcp, false)
}

/// Reads server frames from `tcp` until a close frame (or the socket's
/// end): (opcode, payload) pairs. For a client that goes on holding the
/// connection without answering that close.
pub fn raw_read_frames_until_close(tcp: &mut impl std::io::Read) -> Vec<(u8, Vec<u8>)> {
    read_server_frames(tcp, true)
}

/// Server frames as they arrive on `tcp`, until EOF or an error, or the
/// first close frame when `to_close`.
fn read_server_frames(tcp: &mut impl std::io::Read, to_close: bool) -> Vec<(u8, Vec<u8>)> {
    let (mut data, mut out, mut at) = (Vec::new(), Vec::new(), 0);
    let mut chunk = [0u8; 4096];
    loop {
        while let Ok(Some(h)) =
            clio_frame::frame::parse_header(&data[at..], clio_frame::frame::Sender::Server, 1 << 30)
        {
            let end = at + h.header_len + h.payload_len as usize;
            if end > data.len() {
                break;
            }
            out.push((h.opcode as u8, data[at + h.header_len..end].to_vec()));
            at = end;
            if to_close && h.opcode as u8 == 8 {
                return out;
            }
        }
        match tcp.read(&mut chunk) {
            Ok(n) if n > 0 => data.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return out,
        }
    }
}

/// Close frame code from a close payload.
pub fn close_code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[allow(dead_code)]
pub fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

/// A GET with the relay's HTTP client: (status, head, body), status 0
/// (and the error as the head) when there is no answer. `extra` is added
/// to the request head (each line `Name: value\r\n`).
pub fn http_get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, String) {
    let mut req = Request::get(path);
    for line in extra.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').expect("a header line");
        req = req.header(name.trim(), value.trim());
    }
    match blocking::send(&Endpoint::plain(addr), &req, Duration::from_secs(15)) {
        Ok(r) => {
            let mut head = format!("HTTP/1.1 {} {}", r.status, r.reason);
            for (name, value) in &r.headers {
                head.push_str(&format!("\r\n{name}: {value}"));
            }
            (r.status, head, r.text())
        }
        Err(e) => (0, e.to_string(), String::new()),
    }
}

/// The value of header `name` (case-insensitive) in an HTTP response head.
pub fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The HTTP status and JSON body of an upgrade the relay refused.
pub fn refused_upgrade(
    r: Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> (u16, Value) {
    match r {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("body {:?} is not JSON: {e}", String::from_utf8_lossy(&body))
            });
            (resp.status().as_u16(), json)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e:?}"),
        Ok((_, resp)) => panic!("expected an HTTP refusal, the upgrade was accepted: {resp:?}"),
    }
}

/// Asserts `v` is the contract's pre-upgrade error body with `code`.
pub fn assert_http_error_body(v: &Value, code: u64) {
    assert_eq!(v["error_code"].as_u64(), Some(code), "{v}");
    assert!(
        v["error_message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// Asserts `r` holds exactly one error message in the contract's shape
/// (`tokens`, `error_code`, `error_message`, `error_type`) with `code`, and a
/// close frame with `close`.
pub fn assert_error_frame(r: &Received, code: u64, close: u16) {
    let errors: Vec<&Value> = r
        .messages
        .iter()
        .filter(|m| m.get("error_code").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "one error message expected: {r:?}");
    let e = errors[0];
    assert_eq!(e["error_code"].as_u64(), Some(code), "{r:?}");
    assert_eq!(e["tokens"], serde_json::json!([]), "{r:?}");
    assert!(
        e["error_message"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    assert!(
        e["error_type"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    assert_eq!(r.close_code(), Some(close), "{r:?}");
    assert!(!r.finished(), "{r:?}");
}

/// A raw frame: `first` is the FIN/RSV/opcode byte; masked with `mask` if given.
pub fn raw_frame(first: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend(k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// The close frame among raw frames, as its close code.
pub fn raw_close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .find(|(op, _)| *op == 8)
        .map(|(_, p)| close_code_of(p))
}

/// The JSON text messages among raw frames.
pub fn raw_texts(frames: &[(u8, Vec<u8>)]) -> Vec<Value> {
    frames
        .iter()
        .filter(|(op, _)| *op == 1)
        .map(|(_, p)| serde_json::from_slice(p).expect("server text is JSON"))
        .collect()
}

/// The value of the one series named exactly `series` (name and labels)
/// in a `/metrics` scrape.
pub fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One HTTP/1.1 request with the relay's HTTP client; returns (status,
/// body), or status 0 when the connection was dropped without an answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = Request::new(method, path)
        .header("Content-Type", "application/json")
        .body(body.unwrap_or("").as_bytes());
    if let Some(t) = token {
        req = req.bearer(t);
    }
    match blocking::send(&Endpoint::plain(addr), &req, Duration::from_secs(10)) {
        Ok(r) => (r.status, r.text()),
        Err(_) => (0, String::new()),
    }
}

/// A fresh state directory (never /var/lib): under cargo's temp dir for
/// tests (`target/tmp/relay-state/<pid>/<n>`), so a run leaves nothing in
/// /tmp. The first call in a process removes what processes that have
/// ended left there; a relay suite makes some 200 of these a run.
pub fn state_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-state");
    SWEEP.call_once(|| {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let gone = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                .is_some_and(|pid| {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
                });
            if gone {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    root.join(std::process::id().to_string())
        .join(N.fetch_add(1, Ordering::Relaxed).to_string())
}

/// Faults that fail only the fake's first connection, with `kind`, at an
/// audio frame (of the first `within`) for which `at` holds.
pub fn only_first_connection_fails(
    kind: fake_soniox::FaultKind,
    within: u64,
    at: impl Fn(u64) -> bool,
) -> fake_soniox::RandomFaults {
    let mut faults = fake_soniox::RandomFaults {
        share: 0.5,
        kinds: vec![kind],
        within_frames: within,
        seed: 0,
    };
    while !(faults.pick(1).is_some_and(|(n, _)| at(n)) && faults.pick(2).is_none()) {
        faults.seed += 1;
    }
    faults
}

/// A raw client socket that takes little before it is full, upgraded with
/// the token in `auth` (a header line, or empty for none); its writes give
/// up after 500 ms. For clients that stop reading.
pub fn upgraded_raw_client(addr: SocketAddr, auth: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut tcp: TcpStream = sock.into();
    write!(
        tcp,
        "GET /v1/transcribe HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
    .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).unwrap(), 1, "the relay closed: {head:?}");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    // From here on the client writes, with a bound, and never reads.
    tcp.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    tcp
}

/// Writes masked client frames until `n` are sent or the relay stops taking
/// them.
pub fn send_frames(
    tcp: &mut TcpStream,
    opcode: clio_frame::frame::Opcode,
    payload: &[u8],
    n: usize,
) {
    let frame = clio_frame::frame::build_frame(opcode, payload, Some([1, 2, 3, 4]));
    for _ in 0..n {
        if tcp.write_all(&frame).is_err() {
            return;
        }
    }
}

/// An upstream that answers a stream's config with small results, spaced
/// so that the relay reads and forwards them one or two at a time, for as
/// long as the relay takes them, and then holds the connection open
/// without a word. (Small writes to a full socket find it full at a frame
/// boundary, where the relay may write a frame of its own.)
pub fn chatty_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        ws.read().unwrap(); // the config
        ws.get_mut()
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let result = r#"{"tokens":[{"text":"word ","is_final":false}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#;
        // The relay stops reading when its client's socket is full; then
        // these sends back up and time out.
        while ws.send(Message::text(result)).is_ok() {
            std::thread::sleep(Duration::from_micros(20));
        }
        std::thread::sleep(Duration::from_secs(60));
        drop(ws);
    });
    url
}

/// A TCP door in front of the upstream at `url`: connection number `n`
/// (from 0) is closed at once, unanswered, when `shut(n)`, as an upstream
/// that cannot take it would; the others are piped through. Returns the
/// door's own URL (the same path).
pub fn door(url: &str, shut: impl Fn(usize) -> bool + Send + 'static) -> String {
    door_with(
        url,
        move |n| if shut(n) { Entry::Close } else { Entry::Pipe },
    )
    .0
}

/// What a [`door_with`] does with a connection.
pub enum Entry {
    /// Piped through to the upstream.
    Pipe,
    /// Closed at once, unanswered.
    Close,
    /// Accepted and never answered (kept open in the list returned).
    Hold,
}

/// A TCP door in front of the upstream at `url` that does `entry(n)` with
/// connection number `n` (from 0). Returns the door's own URL (the same
/// path) and the connections it holds.
pub fn door_with(
    url: &str,
    entry: impl Fn(usize) -> Entry + Send + 'static,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>) {
    let rest = url.strip_prefix("ws://").expect("a ws:// url");
    let (host, path) = rest.split_once('/').unwrap();
    let upstream: SocketAddr = host.parse().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/{path}", listener.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = held.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { return };
            match entry(n) {
                Entry::Close => continue,
                Entry::Hold => {
                    kept.lock().unwrap().push(conn);
                    continue;
                }
                Entry::Pipe => {}
            }
            let Ok(up) = TcpStream::connect(upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, conn),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (url, held)
}

/// What a [`scripted_upstream`] does at an audio frame.
pub enum UpStep {
    /// A final token for the frame (`w1 `, `w2 `, ... per connection).
    Final,
    /// This text message.
    Text(String),
    /// These bytes, written under the WebSocket layer (a frame it would
    /// not send), then the connection dropped.
    Raw(Vec<u8>),
}

/// An upstream (tungstenite's WebSocket server) whose answer to audio
/// frame `n` (from 1) of connection `c` (from 0) is `step(c, n)`, and to
/// the end of audio `finished` and a close. Returns its URL and a count of
/// the connections it took.
pub fn scripted_upstream(
    step: impl Fn(usize, u64) -> UpStep + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    ws_upstream(move |conn, mut ws| {
        let mut frames = 0u64;
        while let Ok(m) = ws.read() {
            let reply = match m {
                Message::Binary(b) if b.is_empty() => serde_json::json!({
                    "tokens": [], "final_audio_proc_ms": frames * 100,
                    "total_audio_proc_ms": frames * 100, "finished": true,
                })
                .to_string(),
                Message::Binary(_) => {
                    frames += 1;
                    let ms = frames * 100;
                    match step(conn, frames) {
                        UpStep::Final => serde_json::json!({
                            "tokens": [{"text": format!("w{frames} "),
                                "start_ms": ms - 100, "end_ms": ms, "is_final": true}],
                            "final_audio_proc_ms": ms, "total_audio_proc_ms": ms,
                        })
                        .to_string(),
                        UpStep::Text(t) => t,
                        UpStep::Raw(bytes) => {
                            let _ = ws.get_mut().write_all(&bytes);
                            return;
                        }
                    }
                }
                _ => continue,
            };
            let finished = reply.contains("\"finished\":true");
            if ws.send(Message::text(reply)).is_err() {
                return;
            }
            if finished {
                let _ = ws.close(Some(tungstenite::protocol::CloseFrame {
                    code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                    reason: "".into(),
                }));
            }
        }
    })
}

/// An upstream on 127.0.0.1 (tungstenite's WebSocket server) that hands
/// each connection it accepts, after the upgrade, to `serve` on a thread
/// of its own, with the connection's number (from 0). Returns its URL and
/// a count of the connections it took.
pub fn ws_upstream(
    serve: impl Fn(usize, tungstenite::WebSocket<std::net::TcpStream>) + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let conn = counted.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || {
                if let Ok(ws) = tungstenite::accept(tcp) {
                    serve(conn, ws);
                }
            });
        }
    });
    (url, conns)
}

/// Every account of `relay` is healthy: a fault was not held against any
/// of them (a configuration fault, say).
pub fn no_account_blamed(relay: &Relay) -> bool {
    relay
        .handle
        .process
        .accounts()
        .iter()
        .all(|a| a.healthy(Instant::now()))
}

/// Sends `child` SIGINT and waits up to 30 s for it to exit, killing it
/// if it does not; asserts it exited, with status 0 (`what` says what a
/// relay still running means).
pub fn sigint_and_reap(child: &mut std::process::Child, what: &str) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let stopped = wait_until(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    if !stopped {
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    assert!(stopped, "{what}");
    assert!(status.success(), "{status:?}");
}

/// Streams up to `n` frames of 100 ms on `ws`, each echoed (an echoing
/// fake-soniox) before the next goes, until the relay ends the stream:
/// the frames echoed, and the error message that ended it, if any.
pub fn frames_until_ended<S: std::io::Read + std::io::Write>(
    ws: &mut tungstenite::WebSocket<S>,
    n: usize,
) -> (usize, Option<String>) {
    let mut echoed = 0;
    for f in audio_frames(n, 2) {
        if ws.send(Message::binary(f)).is_err() {
            return (echoed, None);
        }
        loop {
            match ws.read() {
                Ok(Message::Text(t)) if t.contains("error_code") => {
                    return (echoed, Some(t.to_string()))
                }
                Ok(Message::Text(_)) => {
                    echoed += 1;
                    break;
                }
                Ok(Message::Close(_)) | Err(_) => return (echoed, None),
                Ok(_) => {}
            }
        }
    }
    (echoed, None)
}
