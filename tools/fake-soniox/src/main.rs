//! `fake-soniox`: runs the local Soniox stand-in until SIGINT or SIGTERM.
//! See `fake_soniox` for what it does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox, FaultKind, Faults, FinDelivery, RandomFaults};
use nix::sys::signal::{SigSet, Signal};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A faithful local stand-in for the Soniox real-time STT WebSocket API.
///
/// The same port also serves Soniox's REST API (requests without
/// `Upgrade: websocket`, `Authorization: Bearer <key>`): GET /v1/models,
/// GET /v1/concurrency-limits, GET /v1/usage-logs, GET /v1/usage/summary and
/// POST /v1/auth/temporary-api-key.
///
/// Keys are checked from the Authorization header, the `soniox-api-key`
/// subprotocol or the first message's `api_key`. README.md ("Tools") and
/// benches/README.md show it in use.
#[derive(Debug, Parser)]
#[command(name = "fake-soniox", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// A valid API key (repeatable).
    #[arg(long = "key", default_values_t = ["fake-key-1".to_owned()])]
    keys: Vec<String>,
    /// Live sessions allowed per key.
    #[arg(long, default_value_t = 10)]
    max_concurrent: u32,
    /// Executor threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Echo mode: answer each audio frame with the hex of its first 16 bytes.
    #[arg(long)]
    echo: bool,
    /// TLS certificate chain (PEM); with --tls-key, serve wss.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// No audio or keepalive for this long ends a session with 408.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Wait this long before answering each upgrade.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    handshake_delay: Duration,
    /// Wait this long after the end of audio before the last words and `finished`.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    finish_delay: Duration,
    /// Drop the TCP connection abruptly when audio frame N arrives.
    #[arg(long)]
    close_after_frames: Option<u64>,
    /// Send a Soniox error (with --error-code) when audio frame N arrives.
    #[arg(long, requires = "error_code")]
    error_after_frames: Option<u64>,
    /// Code of the error sent by --error-after-frames.
    #[arg(long, requires = "error_after_frames")]
    error_code: Option<u16>,
    /// Answer every REST call with this HTTP status (e.g. 503), for testing
    /// health checks.
    #[arg(long)]
    rest_status: Option<u16>,
    /// One final word per this many ms of audio.
    #[arg(long, default_value_t = 480)]
    ms_per_word: u32,
    /// Accept KEY at the upgrade, then answer its config message with this
    /// Soniox error (KEY=401, KEY=402, KEY=429); repeatable. KEY becomes a
    /// known key.
    #[arg(long = "refuse-key", value_name = "KEY=CODE", value_parser = key_code)]
    refuse_keys: Vec<(String, u16)>,
    /// Fail this share of sessions (0 to 1) at a random audio frame.
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// How a failing session fails, picked at random: drop (TCP reset),
    /// stall (stops reading, the connection left open), violation (a frame
    /// that breaks the WebSocket protocol, then the connection dropped),
    /// going-away (close 1001 with no message before it, as a server
    /// shutting down), or a Soniox error code (503, 500).
    #[arg(long, value_delimiter = ',', default_value = "drop,503,500")]
    fail_kinds: Vec<FaultKind>,
    /// The failing audio frame is picked from 1 to this.
    #[arg(long, default_value_t = 50)]
    fail_within_frames: u64,
    /// Seed of the random failures (the same seed repeats a run).
    #[arg(long, default_value_t = 1)]
    fail_seed: u64,
    /// How the result answering a `finalize` (with `<fin>`) is written:
    /// whole (one write), split (two writes 50 ms apart, cut inside
    /// `<fin>`), or trailed (followed by a result with no tokens in the
    /// same write).
    #[arg(long, default_value = "whole")]
    fin_delivery: FinDelivery,
}

fn key_code(s: &str) -> Result<(String, u16), String> {
    let (key, code) = s.rsplit_once('=').ok_or("expected KEY=CODE")?;
    let code: u16 = code.parse().map_err(|_| format!("bad code {code:?}"))?;
    if key.is_empty() || !(400..600).contains(&code) {
        return Err("expected KEY=CODE with a 4xx or 5xx code".into());
    }
    Ok((key.to_owned(), code))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("fake-soniox: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
        _ => None,
    };
    let cfg = FakeConfig {
        listen: args.listen,
        keys: args
            .keys
            .iter()
            .chain(args.refuse_keys.iter().map(|(k, _)| k))
            .map(|k| FakeKey::new(k, args.max_concurrent))
            .collect(),
        tls,
        shards: args.shards,
        echo: args.echo,
        idle_timeout: args.idle_timeout,
        ms_per_word: args.ms_per_word,
        faults: Faults {
            handshake_delay: args.handshake_delay,
            finish_delay: args.finish_delay,
            close_after_frames: args.close_after_frames,
            error_after_frames: args.error_after_frames.zip(args.error_code),
            rest_status: args.rest_status,
            refuse_at_first_message: args.refuse_keys.clone(),
            stall_after_frames: None,
            fin_delivery: args.fin_delivery,
            random: (args.fail_share > 0.0).then(|| RandomFaults {
                share: args.fail_share.min(1.0),
                kinds: args.fail_kinds.clone(),
                within_frames: args.fail_within_frames,
                seed: args.fail_seed,
            }),
        },
        record_audio: false,
        forbidden: Vec::new(),
    };
    // Block the signals before the executor threads exist, so they inherit
    // the mask and only this thread takes them, in `wait` below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    let scheme = if cfg.tls.is_some() { "wss" } else { "ws" };
    let listen = cfg.listen;
    let fake = FakeSoniox::start(cfg).map_err(|e| format!("--listen {listen}: {e}"))?;
    println!(
        "fake-soniox listening on {scheme}://{}/transcribe-websocket, REST at {}",
        fake.addr(),
        fake.rest_url()
    );
    let signal = signals.wait()?;
    eprintln!("fake-soniox: {signal}, stopping");
    fake.stop();
    Ok(())
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}
