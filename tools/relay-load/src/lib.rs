//! `relay-load`: a load generator that speaks the client side of the
//! Soniox real-time protocol, to the relay, to fake-soniox directly, or to
//! any WebSocket proxy in between.
//!
//! Every audio frame carries its sequence number (bytes 0..8, u64 LE) and
//! its send time (bytes 8..16, ns since the run started, u64 LE). With
//! fake-soniox in echo mode each frame comes back as one result whose final
//! token's text is the hex of those 16 bytes, so each frame's round trip is
//! measured and every lost, duplicated or reordered frame is counted.
//!
//! # Layout
//! - this file: [`LoadOptions`], [`run`], the executors and the merge.
//! - `stream`: one client stream: TCP, upgrade, config, audio, results, close.
//! - `report`: [`LoadReport`]: counts, histograms, table, JSON and `.hgrm` files.
//! - `target`: where streams go ([`Target`]) and how they authenticate
//!   ([`AuthVia`], [`Credentials`]).
//!
//! # Use
//! ```no_run
//! use relay_load::{run, Credentials, LoadOptions, Target};
//! let opts = LoadOptions {
//!     target: Target::direct("127.0.0.1:7300".parse().unwrap()),
//!     credentials: Credentials::Fixed("fake-key-1".into()),
//!     streams: 20,
//!     ..LoadOptions::default()
//! };
//! let report = run(&opts)?;
//! assert_eq!(report.lost, 0);
//! # Ok::<(), std::io::Error>(())
//! ```

mod report;
mod stream;
mod target;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

pub use report::LoadReport;
pub use target::{AuthVia, Credentials, Target};

/// How fast audio is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// `K` times real time (1.0 = real time: one 100 ms frame every 100 ms).
    Times(f64),
    /// As fast as the socket takes it.
    Flood,
}

impl std::str::FromStr for Pace {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "flood" {
            return Ok(Pace::Flood);
        }
        if s == "realtime" || s == "real-time" {
            return Ok(Pace::Times(1.0));
        }
        let n = s.strip_prefix(['x', 'X']).unwrap_or(s);
        match n.parse::<f64>() {
            Ok(k) if k > 0.0 && k.is_finite() => Ok(Pace::Times(k)),
            _ => Err(format!("bad pace {s:?}: realtime, xK (e.g. x4) or flood")),
        }
    }
}

/// What each stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Config, `stream_seconds` of audio at the pace, end of audio, results
    /// until `finished` and the close.
    Stream,
    /// Config, then only keepalives every `keepalive_every`, held until the
    /// run's duration is over; then end of audio and an orderly close.
    Idle,
    /// Cycles as fast as possible: open, config, one audio frame, wait for
    /// its result, end of audio, `finished`, close; `streams` workers each
    /// repeat it until the duration is over.
    Churn,
}

/// Everything a run needs. `Default` gives 10 real-time 10 s streams to the
/// relay on 127.0.0.1:8080 with no credentials.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to connect.
    pub target: Target,
    /// Where the credential goes.
    pub auth: AuthVia,
    /// Where credentials come from.
    pub credentials: Credentials,
    /// What each stream does.
    pub mode: Mode,
    /// Concurrent streams (in churn mode: concurrent workers).
    pub streams: usize,
    /// Streams opened per second while ramping up; 0 opens all at once.
    pub ramp_per_sec: f64,
    /// Audio per stream, in seconds of audio (wall time is this / pace).
    pub stream_seconds: f64,
    /// Audio pace.
    pub pace: Pace,
    /// Audio frame length in ms (100 ms = 3,200 bytes at 16 kHz s16le mono).
    pub frame_ms: u32,
    /// Sample rate of the (s16le mono) audio.
    pub sample_rate: u32,
    /// Hard cap on the whole run: whatever is still running then is cut.
    pub duration: Duration,
    /// Each stream slot starts a new stream when its stream ends, until the
    /// duration is over (churn mode always does).
    pub repeat: bool,
    /// Executor threads; 0 = one per available core.
    pub threads: usize,
    /// Idle mode: a keepalive this often.
    pub keepalive_every: Duration,
    /// Longest wait for any one thing (connect, upgrade, a result, the close).
    pub io_timeout: Duration,
    /// The `model` in the config message.
    pub model: String,
    /// One progress line per second on stderr.
    pub progress: bool,
    /// Set (by a signal handler, say) to end the run early: no stream
    /// starts after it, and those still running are cut within a second,
    /// as at the end of `duration`; the report covers the run until then.
    pub stop: Option<&'static AtomicBool>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            target: Target::relay(SocketAddr::from(([127, 0, 0, 1], 8080))),
            auth: AuthVia::Header,
            credentials: Credentials::None,
            mode: Mode::Stream,
            streams: 10,
            ramp_per_sec: 500.0,
            stream_seconds: 10.0,
            pace: Pace::Times(1.0),
            frame_ms: 100,
            sample_rate: 16_000,
            duration: Duration::from_secs(60),
            repeat: false,
            threads: 0,
            keepalive_every: Duration::from_secs(5),
            io_timeout: Duration::from_secs(15),
            model: "stt-rt-v4".into(),
            progress: false,
            stop: None,
        }
    }
}

impl LoadOptions {
    /// Audio frames per stream (at least 1).
    pub fn frames_per_stream(&self) -> u64 {
        match self.mode {
            Mode::Churn => 1,
            Mode::Idle => 0,
            Mode::Stream => {
                ((self.stream_seconds * 1000.0 / self.frame_ms.max(1) as f64).ceil() as u64).max(1)
            }
        }
    }

    /// Bytes per audio frame (at least 16, for the sequence number and time).
    pub fn frame_bytes(&self) -> usize {
        ((self.sample_rate as u64 * 2 * self.frame_ms as u64 / 1000) as usize).max(16)
    }

    /// Time between frames; zero when flooding.
    fn frame_interval(&self) -> Duration {
        match self.pace {
            Pace::Flood => Duration::ZERO,
            Pace::Times(k) => Duration::from_secs_f64(self.frame_ms as f64 / 1000.0 / k),
        }
    }

    /// Wall time of one stream's audio at the pace.
    pub fn stream_wall_time(&self) -> Duration {
        self.frame_interval() * self.frames_per_stream() as u32
    }

    /// When stream slot `n` starts, from the run's start.
    fn start_offset(&self, n: usize) -> Duration {
        if self.ramp_per_sec > 0.0 {
            Duration::from_secs_f64(n as f64 / self.ramp_per_sec)
        } else {
            Duration::ZERO
        }
    }

    /// A duration that lets every stream ramp up, finish and close.
    pub fn natural_duration(&self) -> Duration {
        self.start_offset(self.streams) + self.stream_wall_time() + self.io_timeout
    }

    fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Distinct refusal messages a run keeps ([`Counters::note_reason`]).
const MAX_REASONS: usize = 16;

/// Counters of one executor (and, merged, of the run).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    pub started: u64,
    pub open: u64,
    pub ok: u64,
    pub cut: u64,
    pub failed: BTreeMap<String, u64>,
    /// What refusals said, by failure and message (`http 401` →
    /// `session token expired` → streams): at most [`MAX_REASONS`].
    pub reasons: BTreeMap<(String, String), u64>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub unexpected: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub idle_held: u64,
}

impl Counters {
    fn merge(&mut self, o: &Counters) {
        self.started += o.started;
        self.open += o.open;
        self.ok += o.ok;
        self.cut += o.cut;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &o.reasons {
            self.note_reason_n(&k.0, &k.1, *v);
        }
        self.frames_sent += o.frames_sent;
        self.frames_received += o.frames_received;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.unexpected += o.unexpected;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.idle_held += o.idle_held;
    }

    /// Counts a refusal `failure` (`http 401`, `error 429`) whose answer
    /// said `message` (its first 200 characters): at most [`MAX_REASONS`]
    /// distinct ones are kept, so a run's memory stays bounded.
    pub(crate) fn note_reason(&mut self, failure: &str, message: &str) {
        self.note_reason_n(failure, message, 1);
    }

    fn note_reason_n(&mut self, failure: &str, message: &str, n: u64) {
        let message: String = message.chars().take(200).collect();
        let key = (failure.to_string(), message);
        if let Some(v) = self.reasons.get_mut(&key) {
            *v += n;
        } else if self.reasons.len() < MAX_REASONS {
            self.reasons.insert(key, n);
        }
    }

    fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s (larger values are
/// recorded as 60 s), 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One executor's state: shared by its stream tasks, never across threads.
pub(crate) struct Worker {
    pub opts: Arc<LoadOptions>,
    /// The run's time zero (frame send times count from it).
    pub epoch: Instant,
    /// Streams after a slot's first (`--loop`, churn) start only before
    /// this; so do idle streams.
    pub last_start: Instant,
    /// Everything still running is cut here.
    pub hard_end: Instant,
    pub counters: RefCell<Counters>,
    pub rtt: RefCell<Histogram<u64>>,
    pub connect: RefCell<Histogram<u64>>,
    /// A cheap generator for mask keys and WebSocket keys.
    pub rng: std::cell::Cell<u64>,
    /// Closed when the run is stopped early ([`LoadOptions::stop`]): its
    /// waiters wake at once.
    pub stopped: glommio::sync::Semaphore,
    /// Whether `stopped` is closed.
    pub stop_seen: std::cell::Cell<bool>,
}

impl Worker {
    pub fn next_random(&self) -> u64 {
        // xorshift64*
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn ns_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether the run was stopped early.
    pub fn is_stopped(&self) -> bool {
        self.stop_seen.get()
    }

    /// Until the run is stopped early (never, if it is not).
    pub async fn until_stopped(&self) {
        let _ = self.stopped.acquire(1).await;
    }

    /// Until `at`, or until the run is stopped early.
    pub async fn sleep_until(&self, at: Instant) {
        futures_lite::future::or(sleep_until(at), self.until_stopped()).await
    }
}

/// One executor's final counters, round trips and connect times.
type Final = (Counters, Histogram<u64>, Histogram<u64>);

/// From an executor to the main thread.
enum Msg {
    /// Each second (tick n): counters and round trips so far.
    Progress(usize, u64, Counters, Histogram<u64>),
    /// At the end.
    Done(usize, Counters, Histogram<u64>, Histogram<u64>),
}

/// Raises the open-file soft limit to the hard limit (each stream is one
/// socket); returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Runs the load described by `opts` and returns what happened. Returns an
/// error only when the run cannot start (bad options, no executor).
pub fn run(opts: &LoadOptions) -> std::io::Result<LoadReport> {
    // Its executors are glommio's, as the relay's are: the same limit.
    clio_relay::dataplane::uring::check_locked_memory()?;
    clio_relay::dataplane::uring::check_io_uring()?;
    if opts.streams == 0 {
        return Err(std::io::Error::other("no streams asked for"));
    }
    if opts.frame_ms == 0 || opts.sample_rate == 0 {
        return Err(std::io::Error::other(
            "frame length and sample rate must be positive",
        ));
    }
    let limit = raise_nofile_limit();
    if opts.streams as u64 + 64 > limit {
        return Err(std::io::Error::other(format!(
            "{} streams need {} file descriptors; the limit is {limit}",
            opts.streams,
            opts.streams + 64
        )));
    }
    let threads = opts.threads().min(opts.streams).max(1);
    let opts = Arc::new(opts.clone());
    let epoch = Instant::now();
    let hard_end = epoch + opts.duration;
    let last_start = match opts.mode {
        // A repeating stream slot starts a new stream only if it can finish.
        Mode::Stream => hard_end
            .checked_sub(opts.stream_wall_time() + Duration::from_secs(1))
            .unwrap_or(epoch),
        // Idle streams are held until shortly before the end, then closed in order.
        Mode::Idle => hard_end
            .checked_sub((opts.duration / 5).min(Duration::from_secs(5)))
            .unwrap_or(epoch),
        Mode::Churn => hard_end,
    };
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let tx = tx.clone();
        let opts = opts.clone();
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            // The locked-memory limit is 8 MiB; glommio's default is 10 MiB.
            .io_memory(64 << 10)
            // Thousands of waiting sockets: see `shard::RING_DEPTH`.
            .ring_depth(clio_relay::dataplane::shard::RING_DEPTH)
            .name(&format!("relay-load-{t}"))
            .spawn(move || async move {
                let worker = Rc::new(Worker {
                    opts,
                    epoch,
                    last_start,
                    hard_end,
                    counters: RefCell::new(Counters::default()),
                    rtt: RefCell::new(new_histogram()),
                    connect: RefCell::new(new_histogram()),
                    rng: std::cell::Cell::new(
                        0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) << 32) ^ seed(),
                    ),
                    stopped: glommio::sync::Semaphore::new(0),
                    stop_seen: std::cell::Cell::new(false),
                });
                executor_main(worker.clone(), t, threads, tx.clone()).await;
                let c = worker.counters.borrow().clone();
                let rtt = worker.rtt.borrow().clone();
                let conn = worker.connect.borrow().clone();
                let _ = tx.send(Msg::Done(t, c, rtt, conn));
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        handles.push(handle);
    }
    drop(tx);

    // Latest counters and round trips of each executor, and the tick they are from.
    let mut latest: Vec<Option<(Counters, Histogram<u64>)>> = vec![None; threads];
    let mut ticks = vec![0u64; threads];
    let mut done: Vec<Option<Final>> = vec![None; threads];
    let mut printed = 0u64;
    let mut last_frames = 0u64;
    let mut progress = report::Progress::new(opts.progress, opts.mode);
    loop {
        match rx.recv() {
            Ok(Msg::Progress(t, tick, c, h)) => {
                latest[t] = Some((c, h));
                ticks[t] = tick;
            }
            Ok(Msg::Done(t, c, rtt, conn)) => {
                latest[t] = Some((c.clone(), rtt.clone()));
                ticks[t] = u64::MAX;
                done[t] = Some((c, rtt, conn));
            }
            Err(_) => break,
        }
        // One line per second, once every running executor has reported it.
        let tick = ticks.iter().copied().min().unwrap_or(0);
        if tick > printed && tick != u64::MAX {
            let mut c = Counters::default();
            let mut h = new_histogram();
            for (lc, lh) in latest.iter().flatten() {
                c.merge(lc);
                let _ = h.add(lh);
            }
            let fps =
                c.frames_received.saturating_sub(last_frames) as f64 / (tick - printed) as f64;
            last_frames = c.frames_received;
            printed = tick;
            progress.line(Duration::from_secs(tick), &c, fps, &h);
        }
    }
    for h in handles {
        h.join()
            .map_err(|e| std::io::Error::other(format!("load executor failed: {e}")))?;
    }
    progress.finish();
    let elapsed = epoch.elapsed();
    let mut counters = Counters::default();
    let mut rtt = new_histogram();
    let mut connect = new_histogram();
    for (i, d) in done.into_iter().enumerate() {
        let (c, r, k) = d.ok_or_else(|| {
            std::io::Error::other(format!("load executor {i} ended without a report"))
        })?;
        counters.merge(&c);
        let _ = rtt.add(&r);
        let _ = connect.add(&k);
    }
    Ok(LoadReport::new(&opts, counters, rtt, connect, elapsed))
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// How often an executor looks at [`LoadOptions::stop`].
const STOP_CHECK: Duration = Duration::from_millis(100);

/// One executor: starts its share of the stream slots on the ramp
/// schedule, reports progress each second, and returns when all are over
/// (or, stopped early, once what ran is cut).
async fn executor_main(worker: Rc<Worker>, t: usize, threads: usize, tx: mpsc::Sender<Msg>) {
    let watch = worker.opts.stop.map(|flag| {
        let worker = worker.clone();
        glommio::spawn_local(async move {
            while !flag.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_CHECK).await;
            }
            worker.stop_seen.set(true);
            worker.stopped.close();
        })
    });
    let ticker = {
        let worker = worker.clone();
        glommio::spawn_local(async move {
            for tick in 1.. {
                sleep_until(worker.epoch + Duration::from_secs(tick)).await;
                let c = worker.counters.borrow().clone();
                let h = worker.rtt.borrow().clone();
                if tx.send(Msg::Progress(t, tick, c, h)).is_err() {
                    return;
                }
            }
        })
    };
    let opts = worker.opts.clone();
    let mut tasks = Vec::new();
    // A slot's first stream starts on the ramp's schedule within the run,
    // even one that cannot finish before `duration` (it is cut then, as
    // asked); only a repeat waits to be able to finish. An idle stream
    // starts only before its hold ends.
    let first_before = match opts.mode {
        Mode::Stream => worker.hard_end,
        Mode::Idle | Mode::Churn => worker.last_start,
    };
    for slot in (t..opts.streams).step_by(threads) {
        let at = worker.epoch + opts.start_offset(slot);
        if at >= first_before {
            break;
        }
        worker.sleep_until(at).await;
        if worker.is_stopped() {
            break;
        }
        let worker = worker.clone();
        tasks.push(glommio::spawn_local(stream::run_slot(worker, slot as u64)));
    }
    for task in tasks {
        task.await;
    }
    drop(ticker);
    drop(watch);
}

/// Sleeps until `at` (returns at once if it is past).
pub(crate) async fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        glommio::timer::sleep(at - now).await;
    }
}
