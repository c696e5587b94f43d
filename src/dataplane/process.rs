//! The process-wide state every shard reads: the stream and connection
//! counts behind `server.max_streams` and a drain, the draining flags,
//! the published account ring, and the guards that count a stream or a
//! connection while they live.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::core::keyring::{AccountState, RingSlot};
use clio_frame::mask::MaskKeys;

/// A ring version and the account ids by metrics index.
/// A ring version and its account ids by metrics index.
pub type Published = (Arc<[RingSlot]>, Arc<[String]>);

/// Process-wide facts every shard reads: the stream count behind
/// `server.max_streams`, the draining flags, and the accounts.
#[derive(Debug)]
pub struct ProcessState {
    live: AtomicU32,
    /// Streams whose client sent its config message and that have not
    /// ended: what a drain waits for.
    begun: AtomicU32,
    /// Streams in their shards' live-stream registries: from their
    /// registration (before upstream opens) until their usage is recorded
    /// (or, never having reached upstream, they end without a record).
    /// What a stop that ends the live streams waits for.
    unrecorded: AtomicU32,
    /// Client connections accepted and not yet closed, streams or not (an
    /// upgrade request still to come, a token still to come in the first
    /// message): a drain answers them before the relay stops.
    connections: AtomicU32,
    /// Notified when `live`, `begun`, `unrecorded` or `connections` falls to zero: a
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
    /// The relay stops now (SIGINT, during a drain too, or the stop after
    /// a drain): waits for the streams end now, and every live stream
    /// ends at once, unfinalized, through its own end.
    stop_now: AtomicBool,
    /// Random per process start, part of every stream id.
    pub(crate) boot_id: u32,
    /// The ring version last published, and account ids by metrics index:
    /// what a shard starts with, and what the admin side reports. Locked only
    /// on control-plane changes and reads, never by a stream.
    published: Mutex<Published>,
    /// How many ring versions were published: a shard that installed
    /// fewer catches up before it admits or places a stream
    /// (`Shard::catch_up_ring`), so a change the admin side answered is in
    /// force for every stream opened after, whether or not the shard's
    /// control message has been read yet.
    ring_versions: AtomicU64,
    /// Per-device limits and revocations, shared by every shard.
    pub devices: crate::core::devices::Devices,
    /// Streams refused or ended by a device limit, by [`crate::core::devices::Limit`].
    pub device_rejections: [AtomicU64; 5],
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
    /// The end of the client port's certificate (`[tls]`), in seconds
    /// since the epoch, as last loaded (the start, each reload that took
    /// it); 0 without `[tls]`. The relay serves it past that date, and
    /// every client then refuses it: the metric lets that be alerted on
    /// before.
    pub tls_not_after: AtomicU64,
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
            unrecorded: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            all_ended: (Mutex::new(()), Condvar::new()),
            max_streams,
            draining: AtomicBool::new(false),
            finalizing: AtomicBool::new(false),
            stop_now: AtomicBool::new(false),
            boot_id,
            published: Mutex::new((ring, metrics_ids)),
            ring_versions: AtomicU64::new(0),
            devices: crate::core::devices::Devices::default(),
            device_rejections: Default::default(),
            pools: Default::default(),
            unauthenticated: Default::default(),
            fleet: std::sync::OnceLock::new(),
            faults: Default::default(),
            upstream_fault: Default::default(),
            tls_not_after: AtomicU64::new(0),
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

    /// Records the end date of the certificate the client port now serves.
    pub fn set_tls_not_after(&self, at: Option<std::time::SystemTime>) {
        let secs = at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.tls_not_after.store(secs, Ordering::Relaxed);
    }

    /// Records a new ring version (the caller also sends it to every shard).
    pub fn publish(&self, ring: Arc<[RingSlot]>, metrics_ids: Arc<[String]>) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        *published = (ring, metrics_ids);
        // Counted under the lock: a shard that reads this count and then
        // the version under the lock has at least that version.
        self.ring_versions.fetch_add(1, Ordering::Release);
    }

    /// The ring version last published and its count, if more were
    /// published than the `installed` count a shard has: one atomic load
    /// when nothing changed, as on nearly every stream open.
    pub fn ring_if_newer(&self, installed: u64) -> Option<(u64, Published)> {
        if self.ring_versions.load(Ordering::Acquire) == installed {
            return None;
        }
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let count = self.ring_versions.load(Ordering::Acquire);
        Some((count, published.clone()))
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

    /// Counts a stream entering its shard's live-stream registry, its
    /// usage not yet recorded; [`ProcessState::stream_unregistered`] when
    /// it leaves. A pair of calls rather than a guard: the registry's
    /// guard reaches this through its shard, and holds no `Arc` of its
    /// own in every stream's task.
    pub fn stream_registered(&self) {
        self.unrecorded.fetch_add(1, Ordering::AcqRel);
    }

    /// A stream left its shard's live-stream registry (its usage
    /// recorded, or it ended without reaching upstream).
    pub fn stream_unregistered(&self) {
        if self.unrecorded.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: wake a waiting stop.
            self.wake_drain();
        }
    }

    /// Streams in the shards' live-stream registries, their usage not yet
    /// recorded.
    pub fn unrecorded_streams(&self) -> u32 {
        self.unrecorded.load(Ordering::Relaxed)
    }

    /// Client connections accepted and not yet closed, streams or not.
    pub fn open_connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
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

    /// Blocks the calling thread (never a shard) until every stream in
    /// the shards' registries has recorded its usage, or `until` has
    /// passed; true when none is left. Unlike the drain's waits, this one
    /// goes on after [`ProcessState::stop_now`]: it is the stop's wait
    /// for the streams that stop ends.
    pub fn wait_all_recorded(&self, until: Instant) -> bool {
        self.wait_none(until, Wait::Unrecorded)
    }

    /// Blocks the calling thread (never a shard) until no client
    /// connection is open, or `until` has passed; true when none is.
    /// Unlike the drain's waits, this one goes on after
    /// [`ProcessState::stop_now`]: it is the stop's wait for the
    /// connections it answered, or whose streams it ended, to close.
    pub fn wait_connections_closed(&self, until: Instant) -> bool {
        self.wait_none(until, Wait::Connections)
    }

    fn wait_none(&self, until: Instant, what: Wait) -> bool {
        let (lock, cv) = &self.all_ended;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let none = match what {
                Wait::Begun => self.begun.load(Ordering::Acquire) == 0,
                Wait::Live => self.live.load(Ordering::Acquire) == 0,
                Wait::Unrecorded => self.unrecorded.load(Ordering::Acquire) == 0,
                Wait::Connections => self.connections.load(Ordering::Acquire) == 0,
                Wait::LiveAndConnections => {
                    self.live.load(Ordering::Acquire) == 0
                        && self.connections.load(Ordering::Acquire) == 0
                }
            };
            if none {
                return true;
            }
            let now = Instant::now();
            let stopped =
                self.stopping_now() && !matches!(what, Wait::Unrecorded | Wait::Connections);
            if now >= until || stopped {
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
    /// a stream is answered ([`Shard::drain_ended`](crate::dataplane::shard::Shard::drain_ended)).
    pub fn finalizing(&self) -> bool {
        self.finalizing.load(Ordering::SeqCst)
    }

    /// Ends a drain's waits now (SIGINT during a drain): it returns
    /// without finalizing, and the relay stops as on SIGINT. Set by every
    /// stop that ends live streams (`RelayHandle::stop_all`): a stream
    /// then skips a drain's finalize, and one opening upstream (or
    /// finalizing) gives up as soon as its shard says so
    /// (`Shard::stopping_now`).
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
    Unrecorded,
    Connections,
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
