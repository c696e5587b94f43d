//! `clio-relay demo`: the relay's main job in one command, with no config
//! and no network. It starts fake-soniox and a relay on loopback, streams a
//! few seconds of generated audio from a few clients through the relay, and
//! prints what came back, how the accounts were used, and the relay's own
//! latency histograms.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use tungstenite::{Message, WebSocket};

use crate::core::config::{
    AccountConfig, AdminConfig, AuthMode, Config, LimitsConfig, ServerConfig, TokensConfig,
    UpstreamConfig,
};
use crate::core::metrics::{render_histogram_table, Direction, MetricsSnapshot};
use crate::core::secret::Secret;
use crate::core::token::TokenKeys;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};

/// Demo flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Clients streaming at once.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Seconds of audio each client streams.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Send audio as fast as possible instead of at real-time pace.
    #[arg(long)]
    pub fast: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            clients: 6,
            seconds: 3,
            fast: false,
        }
    }
}

/// Why one demo client's stream failed on its side (the relay's own
/// errors arrive as results). Never holds the client's token.
#[derive(Debug)]
enum DemoError {
    /// The relay's address does not make a WebSocket request.
    Request(tungstenite::Error),
    /// The token is not a valid HTTP header value (not quoted).
    BadToken,
    /// TCP to the relay failed.
    Connect(std::io::Error),
    /// The WebSocket upgrade failed.
    Upgrade(tungstenite::Error),
    /// A message could not be sent.
    Send(tungstenite::Error),
    /// The socket's read timeout could not be set.
    Socket(std::io::Error),
    /// The relay sent a text message that is not JSON.
    NotJson,
    /// Reading from the relay failed.
    Read(tungstenite::Error),
}

impl std::fmt::Display for DemoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoError::Request(e) => write!(f, "{e}"),
            DemoError::BadToken => f.write_str("bad token"),
            DemoError::Connect(e) => write!(f, "connect: {e}"),
            DemoError::Upgrade(e) => write!(f, "upgrade: {e}"),
            DemoError::Send(e) => write!(f, "send: {e}"),
            DemoError::Socket(e) => write!(f, "{e}"),
            DemoError::NotJson => f.write_str("a result that is not JSON"),
            DemoError::Read(e) => write!(f, "read: {e}"),
        }
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoError::Request(e)
            | DemoError::Upgrade(e)
            | DemoError::Send(e)
            | DemoError::Read(e) => Some(e),
            DemoError::Connect(e) | DemoError::Socket(e) => Some(e),
            DemoError::BadToken | DemoError::NotJson => None,
        }
    }
}

/// What one demo client saw.
#[derive(Debug, Clone)]
pub struct ClientResult {
    /// The device id its token carried.
    pub device: String,
    /// Audio frames it sent.
    pub frames_sent: usize,
    /// The final tokens' text, joined.
    pub transcript: String,
    /// Whether `{"finished":true}` arrived.
    pub finished: bool,
    /// The close code the relay sent, if any.
    pub close_code: Option<u16>,
    /// An error message, if the stream failed.
    pub error: Option<String>,
    /// From the first audio frame sent to the first result received.
    pub first_result: Option<Duration>,
}

/// Everything the demo measured.
#[derive(Debug)]
pub struct DemoReport {
    /// Where fake-soniox listened.
    pub fake_url: String,
    /// The relay's client and admin addresses.
    pub relay_addr: SocketAddr,
    /// The admin port.
    pub admin_addr: SocketAddr,
    /// Shards the relay ran.
    pub shards: usize,
    /// One entry per client.
    pub clients: Vec<ClientResult>,
    /// The relay's metrics, merged across shards, after the run.
    pub metrics: MetricsSnapshot,
}

impl DemoReport {
    /// Whether every client finished cleanly.
    pub fn all_ok(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.finished && c.error.is_none() && c.close_code == Some(1000))
    }
}

/// A fresh random hex string (demo secrets; never printed).
fn random_hex(bytes: usize) -> String {
    let mut keys = clio_frame::mask::MaskKeys::default();
    (0..bytes.div_ceil(4))
        .flat_map(|_| keys.next_key())
        .take(bytes)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the demo and returns what it measured, printing nothing.
pub fn run_demo(args: &DemoArgs) -> std::io::Result<DemoReport> {
    let keys = [
        format!("demo-key-{}", random_hex(6)),
        format!("demo-key-{}", random_hex(6)),
    ];
    let per_key = args.clients.div_ceil(2).max(1) as u32 + 2;
    // fake-soniox is a glommio program too: the same limits, checked first.
    crate::dataplane::uring::check_locked_memory()?;
    crate::dataplane::uring::check_io_uring()?;
    let fake = FakeSoniox::start(FakeConfig {
        keys: keys.iter().map(|k| FakeKey::new(k, per_key)).collect(),
        ms_per_word: 300,
        ..FakeConfig::default()
    })?;
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut accounts: Vec<AccountConfig> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| AccountConfig::new(format!("demo-account-{}", i + 1), Secret::new(k.clone())))
        .collect();
    for a in &mut accounts {
        a.region = "loopback".into();
        a.max_concurrent_streams = per_key;
    }
    // Nothing the demo does outlives it: its state goes to a temp dir.
    let state_dir = std::env::temp_dir().join(format!("clio-relay-demo-{}", std::process::id()));
    let admin = AdminConfig {
        health_interval: Duration::ZERO,
        state_dir: state_dir.clone(),
        ..AdminConfig::default()
    };
    let cfg = Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            admin_listen: "127.0.0.1:0".parse().expect("literal address"),
            shards,
            max_streams: 1000,
            max_streams_set: true,
            allow: Vec::new(),
            proxy_protocol_from: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: fake.url(),
            auth: AuthMode::Header,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
        },
        tokens: TokensConfig::new(Secret::new(random_hex(32))),
        limits: LimitsConfig::default(),
        accounts,
        admin,
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    };
    let relay = crate::cli::server::start(&cfg)?;
    let tokens = TokenKeys::from_config(&cfg.tokens);
    let addr = relay.client_addr;
    let handles: Vec<_> = (0..args.clients)
        .map(|i| {
            let device = format!("demo-device-{}", i + 1);
            let token = tokens
                .mint(&device, Duration::from_secs(300), SystemTime::now())
                .map_err(|e| std::io::Error::other(e.to_string()));
            let (seconds, fast) = (args.seconds, args.fast);
            std::thread::spawn(move || {
                // Stagger the starts a little, as real devices would.
                std::thread::sleep(Duration::from_millis(100 * i as u64));
                match token {
                    Ok(t) => run_client(addr, device, &t, seconds, fast),
                    Err(e) => ClientResult::failed(device, e.to_string()),
                }
            })
        })
        .collect();
    let clients: Vec<ClientResult> = handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| {
                ClientResult::failed("?".into(), "client thread panicked".into())
            })
        })
        .collect();
    // Let the relay see the last closes before reading its counters.
    relay
        .process
        .wait_all_ended(Instant::now() + Duration::from_secs(3));
    let metrics = relay.metrics();
    let report = DemoReport {
        fake_url: fake.url(),
        relay_addr: relay.client_addr,
        admin_addr: relay.admin_addr,
        shards,
        clients,
        metrics,
    };
    relay.shutdown();
    fake.stop();
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(report)
}

impl ClientResult {
    fn failed(device: String, error: String) -> ClientResult {
        ClientResult {
            device,
            frames_sent: 0,
            transcript: String::new(),
            finished: false,
            close_code: None,
            error: Some(error),
            first_result: None,
        }
    }
}

/// 100 ms of a 16 kHz s16le mono tone; `n` shifts the pitch per client.
fn tone_frame(n: usize, frame: usize) -> Vec<u8> {
    let freq = 220.0 + 55.0 * n as f64;
    (0..1600)
        .flat_map(|i| {
            let t = (frame * 1600 + i) as f64 / 16000.0;
            (((t * freq * std::f64::consts::TAU).sin() * 8000.0) as i16).to_le_bytes()
        })
        .collect()
}

/// One client: config, audio at real-time pace (or as fast as possible),
/// end of audio, then every result until the relay closes.
fn run_client(
    addr: SocketAddr,
    device: String,
    token: &str,
    seconds: u64,
    fast: bool,
) -> ClientResult {
    let mut out = ClientResult {
        device,
        frames_sent: 0,
        transcript: String::new(),
        finished: false,
        close_code: None,
        error: None,
        first_result: None,
    };
    let mut ws = match connect(addr, token) {
        Ok(ws) => ws,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let config = serde_json::json!({
        "model": "stt-rt-v4", "audio_format": "pcm_s16le", "sample_rate": 16000, "num_channels": 1,
        "language_hints": ["en"], "enable_endpoint_detection": true,
    });
    let started = Instant::now();
    let n = out
        .device
        .rsplit('-')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    let frames = (seconds * 10) as usize;
    let send = |ws: &mut WebSocket<TcpStream>, m: Message| ws.send(m).map_err(DemoError::Send);
    let result = (|| -> Result<(), DemoError> {
        send(&mut ws, Message::text(config.to_string()))?;
        for f in 0..frames {
            send(&mut ws, Message::binary(tone_frame(n, f)))?;
            out.frames_sent += 1;
            if f % 10 == 9 {
                send(&mut ws, Message::text(r#"{"type":"keepalive"}"#))?;
            }
            drain(&mut ws, &mut out, started, false)?;
            if !fast {
                let due = started + Duration::from_millis(100 * (f as u64 + 1));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        send(&mut ws, Message::binary(Vec::<u8>::new()))?;
        drain(&mut ws, &mut out, started, true)
    })();
    if let Err(e) = result {
        out.error.get_or_insert(e.to_string());
    }
    out
}

fn connect(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, DemoError> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/v1/transcribe")
        .into_client_request()
        .map_err(DemoError::Request)?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| DemoError::BadToken)?,
    );
    let tcp = TcpStream::connect(addr).map_err(DemoError::Connect)?;
    tcp.set_nodelay(true).ok();
    let (ws, _) = tungstenite::client::client(req, tcp).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => DemoError::Upgrade(e),
        // Only a non-blocking socket interrupts a handshake; this one blocks.
        tungstenite::HandshakeError::Interrupted(_) => {
            DemoError::Upgrade(tungstenite::Error::Io(ErrorKind::WouldBlock.into()))
        }
    })?;
    Ok(ws)
}

/// Reads what has arrived; with `to_end`, everything until the close.
fn drain(
    ws: &mut WebSocket<TcpStream>,
    out: &mut ClientResult,
    started: Instant,
    to_end: bool,
) -> Result<(), DemoError> {
    let timeout = if to_end {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(1)
    };
    ws.get_mut()
        .set_read_timeout(Some(timeout))
        .map_err(DemoError::Socket)?;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value =
                    serde_json::from_str(&t).map_err(|_| DemoError::NotJson)?;
                if let Some(code) = v["error_code"].as_u64() {
                    out.error = Some(format!(
                        "{code}: {}",
                        v["error_message"].as_str().unwrap_or("")
                    ));
                }
                if v["finished"] == true {
                    out.finished = true;
                }
                for tok in v["tokens"].as_array().into_iter().flatten() {
                    out.first_result.get_or_insert_with(|| started.elapsed());
                    if tok["is_final"] == true {
                        out.transcript.push_str(tok["text"].as_str().unwrap_or(""));
                    }
                }
            }
            Ok(Message::Close(c)) => {
                out.close_code = c.map(|c| u16::from(c.code));
                let _ = ws.flush();
                return Ok(());
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if !to_end && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Ok(())
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(DemoError::Read(e)),
        }
    }
}

/// Runs the demo and prints what happened; an error if any client failed.
pub fn run(args: &DemoArgs) -> std::io::Result<()> {
    println!(
        "clio-relay demo: a fake Soniox, the relay and {} clients, all on loopback\n",
        args.clients
    );
    let report = run_demo(args)?;
    print!("{}", render(args, &report));
    if report.all_ok() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "some demo streams did not finish cleanly (see above)",
        ))
    }
}

/// The demo's printout.
pub fn render(args: &DemoArgs, r: &DemoReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "  fake Soniox   {}", r.fake_url);
    let _ = writeln!(
        s,
        "  relay         ws://{}/v1/transcribe  ({} shards; admin http://{})",
        r.relay_addr, r.shards, r.admin_addr
    );
    let _ = writeln!(
        s,
        "  streamed      {} s of 16 kHz audio per client, {}\n",
        args.seconds,
        if args.fast {
            "as fast as possible"
        } else {
            "at real-time pace"
        }
    );
    let _ = writeln!(
        s,
        "{:<16} {:>6} {:>13} {:>8} {:>6}  transcript",
        "device", "frames", "first result", "finished", "close"
    );
    for c in &r.clients {
        let first = c.first_result.map_or("-".to_string(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1000.0)
        });
        let mut text = c.transcript.trim().to_string();
        if text.len() > 48 {
            text.truncate(
                text.char_indices()
                    .take_while(|(i, _)| *i < 45)
                    .last()
                    .map_or(0, |(i, ch)| i + ch.len_utf8()),
            );
            text.push_str("...");
        }
        let close = c.close_code.map_or("-".into(), |c| c.to_string());
        let _ = writeln!(
            s,
            "{:<16} {:>6} {:>13} {:>8} {:>6}  {}",
            c.device,
            c.frames_sent,
            first,
            if c.finished { "yes" } else { "NO" },
            close,
            text
        );
        if let Some(e) = &c.error {
            let _ = writeln!(s, "{:<16} error: {e}", "");
        }
    }
    let m = &r.metrics;
    let _ = writeln!(s, "\nper-account use");
    for a in m.accounts() {
        let _ = writeln!(s, "  {:<16} {} streams", a.id, a.streams_total);
    }
    let _ = writeln!(
        s,
        "\nrelay totals: {} streams, {} frames / {} bytes up, {} frames / {} bytes down\n",
        m.streams_total(),
        m.frames(Direction::ClientToUpstream),
        m.bytes(Direction::ClientToUpstream),
        m.frames(Direction::UpstreamToClient),
        m.bytes(Direction::UpstreamToClient)
    );
    s.push_str(&render_histogram_table(m));
    let failed = r
        .clients
        .iter()
        .filter(|c| !(c.finished && c.error.is_none() && c.close_code == Some(1000)))
        .count();
    let errors: u64 = m.error_counts().map(|(_, _, n)| n).sum();
    if failed == 0 {
        let _ = writeln!(
            s,
            "\nall {} streams finished, {} errors",
            r.clients.len(),
            errors
        );
    } else {
        let _ = writeln!(
            s,
            "\n{failed} of {} streams did not finish cleanly, {} errors",
            r.clients.len(),
            errors
        );
    }
    s
}
