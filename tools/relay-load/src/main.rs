//! `relay-load`: the load generator for clio-relay. See
//! `relay_load` for what it measures and README.md for the flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clio_relay::core::config::Config;
use clio_relay::core::token::TokenKeys;
use relay_load::{self, AuthVia, Credentials, LoadOptions, Mode, Pace, Target};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for clio-relay: N concurrent streams of echo-stamped audio,
/// every frame's round trip measured, lost/duplicated/reordered frames counted.
#[derive(Debug, clap::Parser)]
#[command(name = "relay-load", version)]
struct Args {
    /// Relay (or, with --direct, fake-soniox) address.
    /// [default: 127.0.0.1:8080, with --direct 127.0.0.1:7300]
    #[arg(long)]
    target: Option<SocketAddr>,
    /// Full ws:// URL of any WebSocket endpoint (overrides --target and the path).
    #[arg(long, conflicts_with = "target")]
    url: Option<String>,
    /// Talk to fake-soniox (or Soniox) directly: path /transcribe-websocket, --key as Bearer.
    #[arg(long, requires = "key")]
    direct: bool,
    /// API key for --direct (or a fixed credential for --url).
    #[arg(long, conflicts_with_all = ["relay_config", "tokens"])]
    key: Option<String>,
    /// Mint a token per stream from this relay config's [tokens] section (needs its secret env var or file).
    #[arg(long, conflicts_with = "tokens")]
    relay_config: Option<PathBuf>,
    /// Session tokens, one per line, used round robin.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Where the credential goes: header, query, subprotocol, first-message, none.
    #[arg(long, default_value = "header")]
    auth: AuthVia,
    /// Concurrent streams.
    #[arg(short = 'n', long, default_value_t = 10, value_parser = at_least_one::<usize>)]
    streams: usize,
    /// Streams opened per second (0 = all at once).
    #[arg(long, default_value_t = 500.0, value_parser = ramp_rate)]
    ramp: f64,
    /// Seconds of audio per stream (wall time is this divided by the pace).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    stream_seconds: f64,
    /// Audio pace: realtime, xK (K times real time, e.g. x4) or flood.
    #[arg(long, default_value = "realtime")]
    pace: Pace,
    /// Audio frame length in ms (100 ms = 3,200 bytes of 16 kHz s16le mono).
    #[arg(long, default_value_t = 100, value_parser = at_least_one::<u32>)]
    frame_ms: u32,
    /// Sample rate of the s16le mono audio.
    #[arg(long, default_value_t = 16_000, value_parser = at_least_one::<u32>)]
    sample_rate: u32,
    /// Hard cap on the whole run; what still runs then is cut.
    /// [default: ramp + one stream + --timeout; idle 60s; churn 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Start a new stream in each slot when one ends, until --duration.
    #[arg(long = "loop")]
    repeat: bool,
    /// Idle mode: config and a keepalive every --keepalive-every only, held for --duration.
    #[arg(long, conflicts_with = "churn")]
    idle: bool,
    /// Churn mode: open, config, one frame, its result, end of audio, close; repeated by --concurrency workers.
    #[arg(long)]
    churn: bool,
    /// Churn mode: concurrent workers.
    #[arg(long, default_value_t = 50, value_parser = at_least_one::<usize>)]
    concurrency: usize,
    /// Idle mode: keepalive interval.
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    keepalive_every: Duration,
    /// Longest wait for any one step (connect, upgrade, a result, the close).
    #[arg(long, default_value = "15s", value_parser = positive_duration)]
    timeout: Duration,
    /// Executor threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The model named in the config message.
    #[arg(long, default_value = "stt-rt-v4")]
    model: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the run's latency histograms here (HdrHistogram percentile
    /// distributions, ms): connect.hgrm, and rtt.hgrm for stream and churn
    /// runs (an idle run measures no round trip: it writes connect.hgrm
    /// only, and removes an rtt.hgrm an earlier run left there).
    #[arg(long)]
    hgrm_dir: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(short, long)]
    quiet: bool,
    /// The relay's admin address (HOST:PORT): its /metrics is read before
    /// and after the run, to report the failovers and resumes the clients
    /// never saw.
    #[arg(long)]
    relay_metrics: Option<SocketAddr>,
}

/// A stream's length: a number of seconds, finite and above 0.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!(
            "{s:?} is not a length: a number of seconds above 0, such as 10 or 0.5"
        )),
    }
}

/// A wait or an interval (`--timeout`, `--keepalive-every`): a duration
/// above 0. A `--timeout` of 0 failed every stream at its connect with
/// "connect timeout", and a `--keepalive-every` of 0 sent keepalives as
/// fast as the socket took them.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "{s:?} is not a wait: a duration above 0, such as 15s or 500ms"
        )),
        Err(e) => Err(format!(
            "{s:?} is not a duration ({e}), such as 15s or 500ms"
        )),
    }
}

/// A ramp: streams opened per second, 0 (all at once) or more.
fn ramp_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a ramp: streams opened per second, 0 (all at once) or more, such as 500"
        )),
    }
}

/// A count that must be 1 or more (`-n`, `--concurrency`, `--frame-ms`,
/// `--sample-rate`):
/// 0 is refused on the command line (exit 2), as other bad values are.
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match s.parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        _ => Err(format!("{s:?} is not a whole number of 1 or more")),
    }
}

/// What relay-load reads of the relay's `/metrics`: its failover counters
/// (resumes, failovers at open, mid-stream), its upstream connections
/// open, and its client streams live (`None` from a relay that does not
/// export `clio_relay_streams_live`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayCounts {
    failovers: [u64; 3],
    active: u64,
    live: Option<u64>,
}

/// Reads the relay's failover counters and streams open from its `/metrics`.
fn relay_failovers(admin: SocketAddr) -> Result<RelayCounts, String> {
    use clio_relay::control::httpc::{blocking, Endpoint, Request};
    let r = blocking::send(
        &Endpoint::plain(admin),
        &Request::get("/metrics"),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("--relay-metrics {admin}: {e}"))?;
    if r.status != 200 {
        return Err(format!("--relay-metrics {admin}: status {}", r.status));
    }
    let body = r.text();
    let mut out = RelayCounts {
        failovers: [0; 3],
        active: 0,
        live: None,
    };
    for line in body.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        if line.starts_with("clio_relay_streams_resumed_total ") {
            out.failovers[0] += value();
        } else if line.starts_with("clio_relay_failovers_total{phase=\"open\"") {
            out.failovers[1] += value();
        } else if line.starts_with("clio_relay_failovers_total{phase=\"mid\"") {
            out.failovers[2] += value();
        } else if line.starts_with("clio_relay_streams_active{") {
            out.active += value();
        } else if line.starts_with("clio_relay_streams_live ") {
            out.live = Some(value());
        }
    }
    Ok(out)
}

/// How long relay-load waits, after its run, for the relay to end the
/// run's streams before it reads the counters anyway.
const RELAY_SETTLE: Duration = Duration::from_secs(5);

/// The relay's counters once the run's streams have ended there too. A
/// run cut short (`--duration`, Ctrl-C) leaves streams the relay is still
/// ending, and resuming: read at once, their resumes were missed.
///
/// The relay's live streams (`clio_relay_streams_live`) back to their
/// number `before` the run says so exactly: a stream counts from its
/// admission to its end, between two upstream connections too, and its
/// resumes are counted before it ends (the relay reads that gauge before
/// the counters). Its upstream connections open
/// (`clio_relay_streams_active`) do not: a resume's new connection is
/// not counted while it connects, so a read in that gap missed the
/// resume however long two reads in a row were apart. With a relay that
/// does not export the gauge, those two equal reads 100 ms apart are the
/// best there is. After [`RELAY_SETTLE`] it reads them as they are, and
/// says so.
fn relay_failovers_settled(admin: SocketAddr, before: RelayCounts) -> Result<RelayCounts, String> {
    let deadline = std::time::Instant::now() + RELAY_SETTLE;
    let mut last: Option<RelayCounts> = None;
    loop {
        let now = relay_failovers(admin)?;
        let (more, settled) = match (before.live, now.live) {
            (Some(b), Some(n)) => (n.saturating_sub(b), n <= b),
            _ => (
                now.active.saturating_sub(before.active),
                now.active <= before.active && last == Some(now),
            ),
        };
        if settled {
            return Ok(now);
        }
        if std::time::Instant::now() >= deadline {
            if more > 0 {
                eprintln!(
                    "relay-load: the relay still had {more} more streams open than before the run after {}; \
                     their failovers may be missing from the report",
                    humantime::format_duration(RELAY_SETTLE)
                );
            }
            return Ok(now);
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Set by the first SIGINT or SIGTERM: the run ends early, with its report.
static STOP: AtomicBool = AtomicBool::new(false);
/// The signal that set [`STOP`].
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: nix::libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // The second one: out at once, as without a handler.
        // SAFETY: `_exit` is async-signal-safe and ends the process.
        unsafe { nix::libc::_exit(128 + signal) };
    }
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Ctrl-C (SIGINT) and SIGTERM end the run early rather than lose it: the
/// streams still running are cut and the report is printed.
fn on_stop_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls `_exit`, both
        // async-signal-safe.
        let _ = unsafe { sigaction(signal, &action) };
    }
}

/// The signal that stopped the run early, if one did.
fn stopped_by() -> Option<&'static str> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        nix::libc::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

/// What the command line gave that this run's mode does not use: `-n`
/// with `--churn` (its workers are `--concurrency`), `--concurrency`
/// without it; `--keepalive-every` without `--idle`; the audio's shape
/// with `--idle` (which sends none), and its length, pace and `--loop`
/// with `--churn` (one frame a cycle, cycles repeated anyway). Said on
/// stderr, not refused: scripts pass common flags to every mode. Before,
/// they were dropped unsaid, and `--churn -n 200` ran the default 50
/// workers.
fn ignored_flags(matches: &clap::ArgMatches, args: &Args) -> Vec<String> {
    use clap::parser::ValueSource;
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut out = Vec::new();
    if args.churn && given("streams") {
        out.push(format!(
            "-n {} is ignored: a --churn run has --concurrency workers ({})",
            args.streams, args.concurrency
        ));
    }
    if !args.churn && given("concurrency") {
        out.push(format!(
            "--concurrency {} is ignored: it is --churn's; this run opens -n streams ({})",
            args.concurrency, args.streams
        ));
    }
    if !args.idle && given("keepalive_every") {
        out.push("--keepalive-every is ignored: it is --idle's (keepalives only)".to_string());
    }
    let flag = |id: &str| match id {
        "repeat" => "--loop".to_string(),
        _ => format!("--{}", id.replace('_', "-")),
    };
    if args.idle {
        for id in [
            "stream_seconds",
            "pace",
            "frame_ms",
            "sample_rate",
            "repeat",
        ] {
            if given(id) {
                out.push(format!(
                    "{} is ignored: an --idle run sends no audio, only keepalives",
                    flag(id)
                ));
            }
        }
    }
    if args.churn {
        for id in ["stream_seconds", "pace", "repeat"] {
            if given(id) {
                out.push(format!(
                    "{} is ignored: a --churn cycle sends one frame, and cycles repeat until --duration",
                    flag(id)
                ));
            }
        }
    }
    out
}

fn main() {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    for ignored in ignored_flags(&matches, &args) {
        eprintln!("relay-load: {ignored}");
    }
    on_stop_signals();
    let result = run(args);
    let signal = STOP_SIGNAL.load(Ordering::SeqCst);
    if let Some(name) = stopped_by() {
        eprintln!(
            "relay-load: stopped by {name} before the run's end: streams still running were cut; \
             the numbers cover the run until then"
        );
    }
    match result {
        Ok(_) if signal != 0 => std::process::exit(128 + signal),
        Ok(clean) => std::process::exit(if clean { 0 } else { 3 }),
        Err(e) => {
            eprintln!("relay-load: {e}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let target = if let Some(url) = &args.url {
        Target::from_url(url)?
    } else if args.direct {
        Target::direct(
            args.target
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7300))),
        )
    } else {
        Target::relay(
            args.target
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
        )
    };
    let mode = if args.idle {
        Mode::Idle
    } else if args.churn {
        Mode::Churn
    } else {
        Mode::Stream
    };
    let mut opts = LoadOptions {
        target,
        auth: args.auth,
        credentials: Credentials::None,
        mode,
        streams: if mode == Mode::Churn {
            args.concurrency
        } else {
            args.streams
        },
        ramp_per_sec: args.ramp,
        stream_seconds: args.stream_seconds,
        pace: args.pace,
        frame_ms: args.frame_ms,
        sample_rate: args.sample_rate,
        duration: Duration::ZERO,
        repeat: args.repeat,
        threads: args.threads,
        keepalive_every: args.keepalive_every,
        io_timeout: args.timeout,
        model: args.model,
        progress: !args.quiet,
        stop: Some(&STOP),
    };
    opts.duration = args.duration.unwrap_or(match mode {
        Mode::Stream => opts.natural_duration(),
        Mode::Idle => Duration::from_secs(60),
        Mode::Churn => Duration::from_secs(10),
    });
    // Tokens outlive the run, with room for a slow start, but no longer
    // than the relay takes (`tokens.max_ttl`): each is minted as its
    // stream opens, and a stream outlives its token.
    let ttl = opts.duration + Duration::from_secs(600);
    opts.credentials = if let Some(key) = args.key {
        Credentials::Fixed(key)
    } else if let Some(path) = &args.relay_config {
        let tokens = Config::load_tokens(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let ttl = ttl.min(tokens.max_ttl);
        Credentials::Mint(Arc::new(TokenKeys::from_config(&tokens)), ttl)
    } else if let Some(path) = &args.tokens {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let list: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if list.is_empty() {
            return Err(format!("{}: no tokens", path.display()).into());
        }
        Credentials::List(Arc::new(list))
    } else {
        Credentials::None
    };
    // Where the report goes is checked before the load, not found
    // unusable after it (which lost the whole report).
    if let Some(dir) = &args.hgrm_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("--hgrm-dir {}: {e}", dir.display()))?;
    }
    let before = args.relay_metrics.map(relay_failovers).transpose()?;
    let report = relay_load::run(&opts)?;
    if report.streams_started == 0 && stopped_by().is_none() {
        return Err(format!(
            "no stream started within --duration {}: nothing was measured",
            humantime::format_duration(opts.duration)
        )
        .into());
    }
    // Read once the relay has ended the run's streams too. A relay that
    // died during the run (the reason to read its report)
    // costs the failover line, not the report.
    let failovers = match (args.relay_metrics, before) {
        (Some(admin), Some(b)) => match relay_failovers_settled(admin, b) {
            Ok(a) => {
                let (a, b) = (a.failovers, b.failovers);
                Some([
                    a[0] - b[0].min(a[0]),
                    a[1] - b[1].min(a[1]),
                    a[2] - b[2].min(a[2]),
                ])
            }
            Err(e) => {
                eprintln!("relay-load: after the run: {e}; no relay failovers in the report");
                None
            }
        },
        _ => None,
    };
    // A failure to write them (a full disk) is said after the report is
    // printed: it costs the files, not the numbers (still exit 1).
    let hgrm = args.hgrm_dir.as_ref().map(|dir| {
        report
            .write_hgrm(dir)
            .map_err(|e| format!("--hgrm-dir {}: {e}", dir.display()))
    });
    if args.json {
        let mut json = report.to_json();
        // A script reading the JSON (the head-to-head's `timeout` sends
        // SIGTERM) tells a cut run from a whole one.
        json["stopped_by"] = stopped_by().into();
        if let Some([resumed, open, mid]) = failovers {
            json["relay_streams_resumed"] = resumed.into();
            json["relay_failovers_open"] = open.into();
            json["relay_failovers_mid"] = mid.into();
        }
        println!("{json}");
    } else {
        print!("{}", report.table());
        if let Some([resumed, open, mid]) = failovers {
            println!(
                "relay failovers the clients never saw: {resumed} resumes mid-stream ({mid} mid-stream failures), {open} at open"
            );
        }
    }
    if let Some(Err(e)) = hgrm {
        return Err(e.into());
    }
    Ok(report.clean())
}
