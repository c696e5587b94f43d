//! A shard: one glommio executor on one core, with its own listener on the
//! client port (SO_REUSEPORT: the kernel spreads connections), its own key
//! ring, buffer pool, mask keys and metrics. A stream lives on the shard that
//! accepted it, client and upstream sockets alike.
//!
//! The control plane talks to a shard only by message ([`ShardMsg`]); the
//! shard answers between events.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};

use crate::core::config::LimitsConfig;
use crate::core::keyring::{AccountState, KeyRing, RingSlot};
use crate::core::metrics::{MetricsSnapshot, ShardMetrics};
use crate::core::token::TokenKeys;
use crate::dataplane::buf::BufferPool;
use crate::dataplane::upstream::UpstreamTarget;
use clio_frame::mask::MaskKeys;

/// Size of each pooled read buffer: a stream uses two (one per direction),
/// only while they hold bytes. Audio frames are 3–4 KiB; results are
/// smaller. Larger frames stream through in pieces. A stream that sends
/// faster than real time (a backlog after a network stall) moves up to
/// this much per read and write: 32 KiB carried the flood 7–11% faster
/// than 16 KiB at 10% less CPU, with no change at real time, in churn or
/// idle; 64 KiB was 8% slower (benches/README.md, "Read buffers of 32 KiB").
pub const BUFFER_SIZE: usize = 32 * 1024;

/// The most a shard keeps of free read buffers when the streams that used
/// them are done (a burst's buffers beyond it go back to the allocator).
/// A bound in bytes, so the memory a shard keeps after a burst does not
/// grow with [`BUFFER_SIZE`].
const POOL_KEEP_BYTES: usize = 64 << 20;

/// io_uring registered memory per executor. The relay reads into its own
/// pooled buffers, so glommio's registered-buffer arena is barely used; the
/// process's locked-memory limit (often 8 MiB) must fit every executor's.
pub const IO_MEMORY: usize = 64 * 1024;

/// Submission-queue depth of each of an executor's io_uring rings (glommio's
/// default is 128). Every socket a shard waits on is an armed poll in its
/// main ring, and the kernel finds a request to cancel (glommio cancels its
/// preemption timer on every reactor turn) by walking one bucket of the
/// ring's cancel hash table, which has `2^(log2(completion entries) - 5)`
/// buckets, at most 256. At 128 that is 8 buckets: with 18,000 sockets
/// waiting, every turn walked chains of about 2,000 polls, and
/// `io_poll_find` was 45% of an idle relay's CPU (`perf`, 9,000 idle
/// streams). 4,096 gives the full 256 buckets for about 400 KiB of ring
/// memory per ring.
pub const RING_DEPTH: usize = 4096;

/// A ring version and the account ids by metrics index.
type Published = (Arc<[RingSlot]>, Arc<[String]>);

/// Process-wide facts every shard reads: the stream count behind
/// `server.max_streams`, the draining flags, and the accounts.
#[derive(Debug)]
pub struct ProcessState {
    live: AtomicU32,
    /// Streams whose client sent its config message and that have not
    /// ended: what a drain waits for.
    begun: AtomicU32,
    /// Client connections accepted and not yet closed, streams or not (an
    /// upgrade request still to come, a token still to come in the first
    /// message): a drain answers them before the relay stops.
    connections: AtomicU32,
    /// Notified when `live`, `begun` or `connections` falls to zero: a
    /// drain waits on it rather than polling the counts.
    all_ended: (Mutex<()>, Condvar),
    max_streams: u32,
    /// A drain has begun: `/healthz` 503. Streams are still taken on the
    /// connections accepted before the listeners closed, while streams
    /// that had begun run on.
    draining: AtomicBool,
    /// The drain stopped waiting for its streams (they ended, or its
    /// deadline passed): live streams are finalized, a stream that would
    /// start now is refused ("reconnect"), and so is every connection
    /// still without a stream.
    finalizing: AtomicBool,
    /// SIGINT came during a drain: waits for the streams end now.
    stop_now: AtomicBool,
    /// Random per process start, part of every stream id.
    boot_id: u32,
    /// The ring version last published, and account ids by metrics index:
    /// what a shard starts with, and what the admin side reports. Locked only
    /// on control-plane changes and reads, never by a stream.
    published: Mutex<Published>,
    /// Per-device limits and revocations, shared by every shard.
    pub devices: crate::core::devices::Devices,
    /// Streams refused or ended by a device limit, by [`crate::core::devices::Limit`].
    pub device_rejections: [std::sync::atomic::AtomicU64; 5],
    /// Each pool's live streams (`[pool.NAME] max_streams`) and refusals.
    pub pools: crate::core::pool_limits::PoolCounts,
    /// Connections waiting for a first-message token, by client address.
    pub unauthenticated: crate::dataplane::unauth::AddressPool,
    /// The fleet's shared store (`[cluster]`), set once before any stream.
    pub fleet: std::sync::OnceLock<Arc<crate::core::cluster::Fleet>>,
    /// Accept errors and file-limit hits, for the metrics.
    pub faults: crate::dataplane::accept::Faults,
    /// Upstream answered an upgrade with a status that says `upstream.url` is wrong.
    pub upstream_fault: crate::dataplane::upstream::UpstreamFault,
    /// The resume copies' memory (`failover.resume_memory`).
    pub resume_copies: Arc<crate::dataplane::pump::copy_budget::CopyBudget>,
    /// The budget of refusal lines in the log.
    pub refusal_log: crate::dataplane::log_budget::LogBudget,
    /// The budget of upstream failure lines in the log (connects, and
    /// streams moved or resumed after a failure).
    pub upstream_log: crate::dataplane::log_budget::LogBudget,
}

impl ProcessState {
    /// State for a process with these limits and accounts.
    pub fn new(max_streams: u32, ring: Arc<[RingSlot]>, metrics_ids: Arc<[String]>) -> Arc<Self> {
        let mut masks = MaskKeys::default();
        let boot_id = u32::from_le_bytes(masks.next_key());
        Arc::new(ProcessState {
            live: AtomicU32::new(0),
            begun: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            all_ended: (Mutex::new(()), Condvar::new()),
            max_streams,
            draining: AtomicBool::new(false),
            finalizing: AtomicBool::new(false),
            stop_now: AtomicBool::new(false),
            boot_id,
            published: Mutex::new((ring, metrics_ids)),
            devices: crate::core::devices::Devices::default(),
            device_rejections: Default::default(),
            pools: Default::default(),
            unauthenticated: Default::default(),
            fleet: std::sync::OnceLock::new(),
            faults: Default::default(),
            upstream_fault: Default::default(),
            resume_copies: Arc::new(crate::dataplane::pump::copy_budget::CopyBudget::new(
                crate::core::config::FailoverConfig::default().resume_memory,
            )),
            refusal_log: crate::dataplane::log_budget::LogBudget::new(
                "refusals",
                "clio_relay_streams_rejected_total and clio_relay_refusals_total",
            ),
            upstream_log: crate::dataplane::log_budget::LogBudget::new(
                "upstream failures",
                "clio_relay_errors_total{side=\"upstream\"}, clio_relay_account_retries_total and clio_relay_failovers_total",
            ),
        })
    }

    /// Records a new ring version (the caller also sends it to every shard).
    pub fn publish(&self, ring: Arc<[RingSlot]>, metrics_ids: Arc<[String]>) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = (ring, metrics_ids);
    }

    /// The ring version last published.
    pub fn ring(&self) -> Arc<[RingSlot]> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Account ids by metrics index.
    pub fn metrics_ids(&self) -> Arc<[String]> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The accounts of the ring version last published.
    pub fn accounts(&self) -> Vec<Arc<AccountState>> {
        self.ring().iter().map(|s| s.account.clone()).collect()
    }

    /// Counts a new stream against `max_streams`, or `None` when full.
    pub fn admit(self: &Arc<Self>) -> Option<AdmitPermit> {
        let max = self.max_streams;
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| AdmitPermit(self.clone()))
    }

    /// Streams admitted and not yet ended, across all shards.
    pub fn live_streams(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Streams whose client sent its config message and that have not
    /// ended, across all shards: a drain's streams. A connection still
    /// waiting for its config message is not one, even with a
    /// `max_streams` slot (its token on the request).
    pub fn begun_streams(&self) -> u32 {
        self.begun.load(Ordering::Relaxed)
    }

    /// Counts a stream as begun (its config message came) until the value
    /// is dropped.
    pub fn begin(self: &Arc<Self>) -> BegunStream {
        self.begun.fetch_add(1, Ordering::AcqRel);
        BegunStream(self.clone())
    }

    /// Counts an accepted client connection until the value is dropped.
    pub fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::AcqRel);
        OpenConnection(self.clone())
    }

    /// Blocks the calling thread (never a shard) until no stream is live,
    /// or `until` has passed, or [`ProcessState::stop_now`]; true when
    /// none is live.
    pub fn wait_all_ended(&self, until: Instant) -> bool {
        self.wait_none(until, Wait::Live)
    }

    /// Like [`ProcessState::wait_all_ended`], for begun streams only (a
    /// drain before its deadline: connections without a stream, or
    /// waiting for their config message, do not hold it).
    pub fn wait_begun_ended(&self, until: Instant) -> bool {
        self.wait_none(until, Wait::Begun)
    }

    /// Like [`ProcessState::wait_all_ended`], and until no client
    /// connection is open either (the end of a drain: the connections it
    /// answered have had their answers written).
    pub fn wait_all_closed(&self, until: Instant) -> bool {
        self.wait_none(until, Wait::LiveAndConnections)
    }

    fn wait_none(&self, until: Instant, what: Wait) -> bool {
        let (lock, cv) = &self.all_ended;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let none = match what {
                Wait::Begun => self.begun.load(Ordering::Acquire) == 0,
                Wait::Live => self.live.load(Ordering::Acquire) == 0,
                Wait::LiveAndConnections => {
                    self.live.load(Ordering::Acquire) == 0
                        && self.connections.load(Ordering::Acquire) == 0
                }
            };
            if none {
                return true;
            }
            let now = Instant::now();
            if now >= until || self.stopping_now() {
                return false;
            }
            guard = cv
                .wait_timeout(guard, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The `server.max_streams` limit.
    pub fn max_streams(&self) -> u32 {
        self.max_streams
    }

    /// Whether the relay is draining (`/healthz` 503; its listeners are
    /// closed, but a connection accepted before is still served while
    /// begun streams run).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the drain stopped waiting for its streams (they ended, or
    /// its deadline passed): no new stream (503 "reconnect"), one that
    /// registers now is stopped at once, and a connection still without
    /// a stream is answered ([`Shard::drain_ended`]).
    pub fn finalizing(&self) -> bool {
        self.finalizing.load(Ordering::SeqCst)
    }

    /// Ends a drain's waits now (SIGINT during a drain): it returns
    /// without finalizing, and the relay stops as on SIGINT.
    pub fn stop_now(&self) {
        self.stop_now.store(true, Ordering::SeqCst);
        self.wake_drain();
    }

    /// Wakes a drain waiting in [`ProcessState::wait_all_ended`] or
    /// [`ProcessState::wait_all_closed`] to check its counts again.
    /// Taking the lock orders this with the waiter's check, so the wake-up
    /// cannot fall between its check and its wait.
    fn wake_drain(&self) {
        let (lock, cv) = &self.all_ended;
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        cv.notify_all();
    }

    /// Whether [`ProcessState::stop_now`] was called.
    pub fn stopping_now(&self) -> bool {
        self.stop_now.load(Ordering::SeqCst)
    }

    /// Marks the drain's wait for streams as over (or, for tests, not).
    pub fn set_finalizing(&self, on: bool) {
        self.finalizing.store(on, Ordering::SeqCst);
    }

    /// Starts or stops draining.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }
}

/// What [`ProcessState::wait_none`] waits to fall to zero.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Begun,
    Live,
    LiveAndConnections,
}

/// A begun stream, counted by [`ProcessState::begin`] until dropped.
#[derive(Debug)]
pub struct BegunStream(Arc<ProcessState>);

impl Drop for BegunStream {
    fn drop(&mut self) {
        if self.0.begun.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last begun stream ended: wake a waiting drain.
            self.0.wake_drain();
        }
    }
}

/// An accepted client connection, counted by [`ProcessState::connection`]
/// until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<ProcessState>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last open connection closed: wake a waiting drain.
            self.0.wake_drain();
        }
    }
}

/// One admitted stream's place under `max_streams`; freed on drop.
#[derive(Debug)]
pub struct AdmitPermit(Arc<ProcessState>);

impl Drop for AdmitPermit {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last live stream ended: wake a waiting drain.
            self.0.wake_drain();
        }
    }
}

/// Messages from the control plane to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Send back a snapshot of the shard's metrics.
    Snapshot(async_channel::Sender<MetricsSnapshot>),
    /// Answer, to show the shard's event loop turns (the watchdog's
    /// liveness check; a snapshot would copy every histogram).
    /// The reply is the shard's name; a plain channel, so the watchdog
    /// thread waits for it with a deadline and no thread of its own.
    Ping(std::sync::mpsc::Sender<String>),
    /// Install new limits and token keys (a reload); streams already open
    /// keep the version they started with.
    Settings(Settings),
    /// End the live streams of this device or token (a revocation).
    EndStreams {
        /// Device id to match.
        device: Option<String>,
        /// Token id to match.
        token: Option<String>,
    },
    /// The drain stopped waiting for streams (they ended, or its deadline
    /// passed): finalize and end every live stream, and answer every
    /// connection still without one.
    Drain,
    /// Close the listener: new connections go to another process (a
    /// restart) while this one drains.
    StopAccepting,
    /// A rotated-out key's overlap is over: finalize and end the streams
    /// still on it (clients reconnect onto the new key).
    EndKey(String),
    /// Hand over the usage records of streams ended since the last call.
    TakeUsage(async_channel::Sender<Vec<crate::core::usage::UsageRecord>>),
    /// Install a new key-ring version; the ids are the accounts by metrics index.
    Ring(Arc<[RingSlot]>, Arc<[String]>),
    /// Stop accepting and end the executor.
    Stop,
}

/// Everything a shard needs, built by the server before the thread starts.
#[derive(Debug, Clone)]
pub struct ShardSetup {
    /// Client listen address (with the port already fixed for shards after the first).
    pub listen: SocketAddr,
    /// Pin to this CPU, if any.
    pub cpu: Option<usize>,
    /// Stream limits.
    pub limits: LimitsConfig,
    /// `[failover]`.
    pub failover: crate::core::config::FailoverConfig,
    /// Whether the account key goes in the upgrade's Authorization header.
    pub key_in_header: bool,
    /// Upstream connect + upgrade time limit.
    pub connect_timeout: Duration,
    /// The pools and their endpoints (the default pool's is `upstream.url`).
    pub pools: Vec<crate::core::config::PoolConfig>,
    /// TLS for a wss:// upstream.
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// Session token keys.
    pub tokens: Arc<TokenKeys>,
    /// Per-device limits and tiers.
    pub devices: Arc<crate::core::config::DevicesConfig>,
    /// A listening socket passed by systemd, used instead of binding.
    pub listen_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// TLS for the client port.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// `server.allow`.
    pub allow: Arc<Vec<ipnet::IpNet>>,
    /// `server.proxy_protocol_from`.
    pub proxy_protocol_from: Arc<Vec<ipnet::IpNet>>,
    /// Process-wide state.
    pub process: Arc<ProcessState>,
}

/// A shard's state, shared by its tasks (`Rc`: it never leaves its thread).
#[derive(Debug)]
pub struct Shard {
    /// Shard number (0-based).
    pub index: usize,
    /// Limits and token keys; replaced whole on reload, and each stream keeps
    /// the version it started with.
    settings: RefCell<Rc<Settings>>,
    /// Where the account key goes: the upgrade header or the first message.
    pub key_in_header: bool,
    /// Upstream connect + upgrade time limit.
    pub connect_timeout: Duration,
    /// Process-wide limits and flags.
    pub process: Arc<ProcessState>,
    /// This shard's account slots.
    pub ring: RefCell<KeyRing>,
    /// This shard's counters and histograms.
    pub metrics: ShardMetrics,
    /// Read buffers, two per live stream.
    pub pool: Rc<BufferPool>,
    /// Fresh mask keys for client→upstream frames.
    pub masks: RefCell<MaskKeys>,
    /// Where each pool's upstream is and how to reach it, by pool name.
    pub upstreams: Vec<(String, UpstreamTarget)>,
    next_stream: Cell<u64>,
    /// Live streams on this shard, for ending some on request (revocation).
    pub live: RefCell<std::collections::HashMap<u64, Rc<LiveStream>>>,
    /// Usage of streams ended since the admin thread last collected it.
    pub usage: RefCell<Vec<crate::core::usage::UsageRecord>>,
    /// Upgraded connections still waiting for their first-message token;
    /// they hold no `max_streams` slot.
    pub unauthenticated: crate::dataplane::unauth::ShardPool,
    /// Streams refused at the file limit: logged once per interval, with a count.
    pub file_limit_log: crate::dataplane::accept::Rate,
    /// Notified on `ShardMsg::Drain`: wakes the connections still without
    /// a stream (see [`Shard::drain_ended`]).
    drain_over: event_listener::Event,
    /// This shard's own connection to the fleet's store, made on its first
    /// stream open (`None` without `[cluster]`).
    fleet_link: std::cell::OnceCell<Option<Rc<crate::dataplane::fleet_link::FleetLink>>>,
}

/// Why the relay ends a live stream itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A device limit or a revocation.
    Limit(crate::core::devices::Limit),
    /// The relay is shutting down and the drain deadline passed: finalize,
    /// deliver the last results, then tell the client to reconnect.
    Drain,
    /// The key the stream runs on was rotated out and its overlap has
    /// ended: the stream moves to a current key (a resume, for raw audio)
    /// or ends as a drain does. Taken once: a stream that moved goes on.
    KeyRetired,
}

/// A live stream as its shard tracks it.
#[derive(Debug)]
pub struct LiveStream {
    /// The device its token was minted for.
    pub device: String,
    /// Its token's id.
    pub token_id: String,
    /// Fingerprint of the account key it runs on.
    pub key: RefCell<String>,
    stop: Cell<Option<StopReason>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl LiveStream {
    /// A live stream of `device` with token `token_id`.
    pub fn new(device: &str, token_id: &str) -> Rc<LiveStream> {
        Rc::new(LiveStream {
            device: device.into(),
            token_id: token_id.into(),
            key: RefCell::new(String::new()),
            stop: Cell::new(None),
            waker: RefCell::new(None),
        })
    }

    /// Asks the stream to end, for `why`; a move off a retired key never
    /// replaces a reason to end.
    pub fn stop(&self, why: StopReason) {
        if why == StopReason::KeyRetired && self.stop.get().is_some() {
            return;
        }
        self.stop.set(Some(why));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Forgets a request to move off a retired key: the stream is on
    /// another key already (it moved while the request came).
    pub fn forget_key_retired(&self) {
        if self.stop.get() == Some(StopReason::KeyRetired) {
            self.stop.set(None);
        }
    }

    /// Resolves when the stream is asked to end (or to move: that request
    /// is taken).
    pub async fn stopped(&self) -> StopReason {
        std::future::poll_fn(|cx| match self.stop.get() {
            Some(StopReason::KeyRetired) => {
                self.stop.set(None);
                std::task::Poll::Ready(StopReason::KeyRetired)
            }
            Some(why) => std::task::Poll::Ready(why),
            None => {
                // Polled on every wake-up of the stream's task: clone the
                // waker only when it changed.
                let mut waker = self.waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// What a reload can change on a running shard.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Stream limits.
    pub limits: LimitsConfig,
    /// Open-time replay and mid-stream resume.
    pub failover: crate::core::config::FailoverConfig,
    /// Session token keys.
    pub tokens: Arc<TokenKeys>,
    /// Per-device limits and tiers.
    pub devices: Arc<crate::core::config::DevicesConfig>,
    /// TLS for the client port, if `[tls]` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Networks clients may connect from (`server.allow`); empty = any.
    pub allow: Arc<Vec<ipnet::IpNet>>,
    /// Balancers whose connections start with a PROXY protocol header
    /// (`server.proxy_protocol_from`); empty = none.
    pub proxy_protocol_from: Arc<Vec<ipnet::IpNet>>,
}

impl Settings {
    /// Whether a client at `peer` may connect.
    pub fn allows(&self, peer: impl FnOnce() -> Option<std::net::SocketAddr>) -> bool {
        crate::dataplane::io::allowed(&self.allow, peer)
    }
}

impl Shard {
    /// Resolves once a drain has stopped waiting for its streams (they
    /// ended, or its deadline passed; at once if that happened already).
    /// A connection without a stream (its request head, its TLS handshake
    /// or its config message still to come) waits for this beside its
    /// read, and is then answered as by a relay that is restarting: it
    /// holds no drain.
    pub async fn drain_ended(&self) {
        loop {
            if self.process.finalizing() {
                return;
            }
            // Listening before the second look: a notification between
            // the two is not lost.
            let listener = self.drain_over.listen();
            if self.process.finalizing() {
                return;
            }
            listener.await;
        }
    }

    /// This shard's link to the fleet's store, if the relay is in a fleet.
    pub fn fleet_link(&self) -> Option<&crate::dataplane::fleet_link::FleetLink> {
        self.fleet_link
            .get_or_init(|| {
                self.process
                    .fleet
                    .get()
                    .map(|f| crate::dataplane::fleet_link::FleetLink::new(f.clone()))
            })
            .as_deref()
    }

    /// A key for the live-stream registry.
    pub fn next_live_id(&self) -> u64 {
        let n = self.next_stream.get();
        self.next_stream.set(n + 1);
        n
    }

    /// The current settings; a stream takes them once, at its start.
    pub fn settings(&self) -> Rc<Settings> {
        self.settings.borrow().clone()
    }

    /// Where the accounts of `pool` connect to.
    pub fn upstream(&self, pool: &str) -> Option<&UpstreamTarget> {
        self.upstreams
            .iter()
            .find_map(|(name, t)| (name == pool).then_some(t))
    }

    /// A new stream id, unique across shards and restarts in practice.
    pub fn new_stream_id(&self) -> String {
        let n = self.next_stream.get();
        self.next_stream.set(n + 1);
        format!("clio-{:08x}-{}-{}", self.process.boot_id, self.index, n)
    }
}

/// A running shard thread.
#[derive(Debug)]
pub struct ShardHandle {
    /// Where the shard listens.
    pub addr: SocketAddr,
    /// Control messages in.
    pub tx: async_channel::Sender<ShardMsg>,
    /// The executor's thread.
    pub join: glommio::ExecutorJoinHandle<()>,
}

/// Starts shard `index` and returns once it listens.
pub fn start(index: usize, setup: ShardSetup) -> std::io::Result<ShardHandle> {
    let (tx, rx) = async_channel::unbounded::<ShardMsg>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
    let placement = match setup.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let waiting = crate::dataplane::uring::Waiting::from_env();
    let mut builder = LocalExecutorBuilder::new(placement);
    builder = builder
        .name(&format!("clio-shard-{index}"))
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH);
    if waiting.wake == crate::dataplane::uring::Wake::Ring {
        // glommio's own loop gets a pass at least this often (see `uring`).
        builder = builder.preempt_timer(crate::dataplane::uring::PASS_INTERVAL);
    }
    let join = builder.spawn(move || async move {
        let plane = match crate::dataplane::uring::Plane::new(waiting) {
            Ok(p) => p,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        crate::dataplane::uring::install(plane.clone());
        let plane_stop = Rc::new(Cell::new(false));
        glommio::spawn_local(crate::dataplane::uring::drive(
            plane.clone(),
            plane_stop.clone(),
        ))
        .detach();
        let listener = match crate::dataplane::io::stream_listener(
            setup.listen_fd.as_deref(),
            setup.listen,
            true,
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let upstreams = match setup
            .pools
            .iter()
            .map(|p| {
                UpstreamTarget::new(&p.url, setup.upstream_tls.clone())
                    .map(|t| (p.name.clone(), t))
                    .map_err(|e| format!("pool {}: {e}", p.name))
            })
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(u) => u,
            Err(e) => {
                let _ = ready_tx.send(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    e,
                )));
                return;
            }
        };
        let ids = setup.process.metrics_ids();
        let shard = Rc::new(Shard {
            index,
            settings: RefCell::new(Rc::new(Settings {
                limits: setup.limits.clone(),
                failover: setup.failover.clone(),
                tokens: setup.tokens.clone(),
                devices: setup.devices.clone(),
                tls: setup.client_tls.clone(),
                allow: setup.allow.clone(),
                proxy_protocol_from: setup.proxy_protocol_from.clone(),
            })),
            key_in_header: setup.key_in_header,
            connect_timeout: setup.connect_timeout,
            process: setup.process.clone(),
            ring: RefCell::new(KeyRing::new(&setup.process.ring())),
            metrics: ShardMetrics::new(index, &ids),
            pool: BufferPool::new(BUFFER_SIZE, 64, POOL_KEEP_BYTES / BUFFER_SIZE),
            masks: RefCell::new(MaskKeys::default()),
            upstreams,
            next_stream: Cell::new(0),
            live: RefCell::new(std::collections::HashMap::new()),
            usage: RefCell::new(Vec::new()),
            unauthenticated: Default::default(),
            file_limit_log: crate::dataplane::accept::Rate::new(
                "relay at its file limit: streams refused with 503",
            ),
            fleet_link: std::cell::OnceCell::new(),
            drain_over: event_listener::Event::new(),
        });
        let _ = ready_tx.send(listener.local_addr());
        let (stop_accepting_tx, stop_accepting_rx) = async_channel::bounded::<()>(1);
        let control = {
            let shard = shard.clone();
            async move {
                while let Ok(msg) = rx.recv().await {
                    match msg {
                        ShardMsg::Snapshot(reply) => {
                            let mut snapshot = shard.metrics.snapshot();
                            snapshot.read_buffers =
                                (shard.pool.in_use() as u64, shard.pool.available() as u64);
                            snapshot.unauthenticated = shard.unauthenticated.open() as u64;
                            let _ = reply.send(snapshot).await;
                        }
                        ShardMsg::Settings(settings) => {
                            *shard.settings.borrow_mut() = Rc::new(settings);
                        }
                        ShardMsg::Ring(ring, ids) => {
                            shard.metrics.set_accounts(&ids);
                            shard.ring.borrow_mut().replace(&ring);
                        }
                        ShardMsg::EndStreams { device, token } => {
                            for s in shard.live.borrow().values() {
                                if device.as_deref() == Some(s.device.as_str())
                                    || token.as_deref() == Some(s.token_id.as_str())
                                {
                                    s.stop(StopReason::Limit(crate::core::devices::Limit::Revoked));
                                }
                            }
                        }
                        ShardMsg::StopAccepting => {
                            let _ = stop_accepting_tx.try_send(());
                        }
                        ShardMsg::EndKey(fingerprint) => {
                            for s in shard.live.borrow().values() {
                                if *s.key.borrow() == fingerprint {
                                    s.stop(StopReason::KeyRetired);
                                }
                            }
                        }
                        ShardMsg::Drain => {
                            for s in shard.live.borrow().values() {
                                s.stop(StopReason::Drain);
                            }
                            shard.drain_over.notify(usize::MAX);
                        }
                        ShardMsg::TakeUsage(reply) => {
                            let taken = std::mem::take(&mut *shard.usage.borrow_mut());
                            let _ = reply.send(taken).await;
                        }
                        ShardMsg::Ping(reply) => {
                            let _ = reply.send(format!("shard {index}"));
                        }
                        ShardMsg::Stop => break,
                    }
                }
            }
        };
        let accept = async {
            let listener = listener;
            let ring_listener = match crate::dataplane::uring::RingListener::new(
                &plane,
                std::os::fd::AsRawFd::as_raw_fd(&listener),
            ) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(shard = index, error = %e, "listener not registered");
                    return;
                }
            };
            let accept_loop = async {
                let errors = crate::dataplane::accept::AcceptErrors::new("client", false);
                let spare = crate::dataplane::accept::Spare::new(1);
                loop {
                    match ring_listener.accept().await {
                        Ok(socket) => {
                            errors.succeeded();
                            glommio::spawn_local(crate::dataplane::uring::Counted(
                                crate::dataplane::session::serve(shard.clone(), socket),
                            ))
                            .detach();
                        }
                        Err(e) => {
                            crate::dataplane::accept::client_accept_failed(
                                &shard,
                                &ring_listener,
                                &errors,
                                &spare,
                                e,
                            )
                            .await
                        }
                    }
                }
            };
            futures_lite::future::or(accept_loop, async {
                let _ = stop_accepting_rx.recv().await;
            })
            .await;
            drop(ring_listener);
            drop(listener);
            futures_lite::future::pending::<()>().await;
        };
        future::or(control, accept).await;
        // The last streams' sockets close after their peers, as they would
        // have had the shard gone on (at most `uring::CLOSE_LIMIT`).
        plane.all_closed().await;
        plane_stop.set(true);
    })?;
    let addr = ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("shard thread ended before listening"))??;
    Ok(ShardHandle { addr, tx, join })
}
