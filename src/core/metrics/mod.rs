//! Per-shard metrics, merged only when scraped.
//!
//! Each shard (one pinned thread) owns a [`ShardMetrics`]. Recording is plain
//! `Cell`/`RefCell` updates on shard-local memory: no locks, no atomics, and
//! no allocation on the per-frame path ([`ShardMetrics::record`],
//! [`ShardMetrics::frames_client_to_upstream`],
//! [`ShardMetrics::frames_upstream_to_client`]). The admin thread asks every
//! shard for a [`MetricsSnapshot`] by message, and [`render_prometheus`]
//! merges them and writes the Prometheus text exposition format (0.0.4).
//!
//! Account ids are the only free-form label values; this module never sees
//! a key or a token.

use std::cell::{Cell, RefCell};
use std::fmt;

use hdrhistogram::Histogram;

mod render;
#[cfg(test)]
mod tests;
pub mod text;

pub use render::{render_histogram_table, render_prometheus, ProcessGauges};

/// Where an error came from; becomes the `side` label of
/// `clio_relay_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// The client (device) side: bad request, bad token, protocol violation.
    Client,
    /// The upstream (Soniox) side: refused, unreachable, failed mid-stream.
    Upstream,
    /// The relay itself: capacity, draining, bugs.
    Internal,
}

impl Side {
    /// The label value: `client`, `upstream` or `internal`.
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

/// Who refused a stream; the `by` label of `clio_relay_refusals_total`.
/// Kept apart from [`Side`] so the relay's own limits never read as
/// upstream's errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusedBy {
    /// The client: bad request, bad or missing token, no first message.
    Client,
    /// A device limit (concurrency, rate, daily audio, stream length).
    DeviceLimit,
    /// A revoked device or token.
    Revoked,
    /// The relay's account limits: every usable account is at its
    /// configured `max_concurrent_streams` (or none is enabled).
    RelayLimit,
    /// The relay as a whole: `server.max_streams`, draining, or a fault.
    Relay,
    /// Upstream: it refused the accounts (401, 402, 429, its own
    /// concurrency limit, cooldowns after those), was unreachable, or
    /// dropped the stream.
    Upstream,
    /// Upstream answered the upgrade with a status that says `upstream.url` is wrong.
    UpstreamConfig,
    /// Every pool of the token at its `[pool.NAME] max_streams`.
    PoolLimit,
    /// A balancer in `server.proxy_protocol_from` sent no PROXY protocol
    /// header, a malformed or too large one, or one cut short or late
    /// (its 400s and 408s, counted apart from the clients' own).
    ProxyHeader,
}

impl RefusedBy {
    /// Every value, in label order.
    pub const ALL: [RefusedBy; 9] = [
        RefusedBy::Client,
        RefusedBy::DeviceLimit,
        RefusedBy::Revoked,
        RefusedBy::RelayLimit,
        RefusedBy::Relay,
        RefusedBy::Upstream,
        RefusedBy::UpstreamConfig,
        RefusedBy::PoolLimit,
        RefusedBy::ProxyHeader,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RefusedBy::Client => "client",
            RefusedBy::DeviceLimit => "device_limit",
            RefusedBy::Revoked => "revoked",
            RefusedBy::RelayLimit => "relay_limit",
            RefusedBy::Relay => "relay",
            RefusedBy::Upstream => "upstream",
            RefusedBy::UpstreamConfig => "upstream_config",
            RefusedBy::PoolLimit => "pool_limit",
            RefusedBy::ProxyHeader => "proxy_header",
        }
    }

    /// Who refused, when only the error's side is known (refusals before
    /// the upgrade: client errors, and the relay's 503s).
    pub fn from_side(side: Side) -> RefusedBy {
        match side {
            Side::Client => RefusedBy::Client,
            Side::Upstream => RefusedBy::Upstream,
            Side::Internal => RefusedBy::Relay,
        }
    }

    /// Whether the refusal follows from the client's own request or from a
    /// limit its operator set for it (a bad request or token, a device or
    /// pool limit, a revocation, a balancer's bad PROXY header, which is a
    /// request's too): a refusal working as meant, which the
    /// error-rate alerts count neither as an error nor as a stream
    /// started, so a flood of such requests cannot hide upstream's or the
    /// relay's failures.
    pub fn is_clients_own(self) -> bool {
        matches!(
            self,
            RefusedBy::Client
                | RefusedBy::DeviceLimit
                | RefusedBy::Revoked
                | RefusedBy::PoolLimit
                | RefusedBy::ProxyHeader
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Direction of forwarded traffic; the `direction` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Frames read from the client and written upstream.
    ClientToUpstream,
    /// Frames read from upstream and written to the client.
    UpstreamToClient,
}

impl Direction {
    /// The label value: `client_to_upstream` or `upstream_to_client`.
    pub fn label(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The latency histograms each shard keeps.
///
/// Frame forwarding is recorded in nanoseconds: from the read that completed
/// a frame's bytes to the write that finished forwarding them. The others are
/// recorded in microseconds. Every histogram tracks 1 unit .. 60 s with 3
/// significant digits; larger values saturate at 60 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hist {
    /// Client→upstream frame forwarding time, nanoseconds.
    FrameClientToUpstream,
    /// Upstream→client frame forwarding time, nanoseconds.
    FrameUpstreamToClient,
    /// Client WebSocket handshake (accept to upgrade done), microseconds.
    ClientHandshake,
    /// Upstream connect (TCP + TLS + WebSocket upgrade), microseconds.
    UpstreamConnect,
    /// A stream's first audio (binary payload) to the first upstream
    /// message after it, microseconds.
    FirstResult,
    /// A mid-stream upstream failure to the new connection that resumes
    /// the stream, microseconds.
    Resume,
}

impl Hist {
    /// Every histogram, in index order.
    pub const ALL: [Hist; 6] = [
        Hist::FrameClientToUpstream,
        Hist::FrameUpstreamToClient,
        Hist::ClientHandshake,
        Hist::UpstreamConnect,
        Hist::FirstResult,
        Hist::Resume,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Recorded units per second: 1e9 (nanoseconds) or 1e6 (microseconds).
    pub fn units_per_second(self) -> u64 {
        match self {
            Hist::FrameClientToUpstream | Hist::FrameUpstreamToClient => 1_000_000_000,
            Hist::ClientHandshake | Hist::UpstreamConnect | Hist::FirstResult | Hist::Resume => {
                1_000_000
            }
        }
    }

    /// The largest value recorded as itself (60 s in this histogram's unit).
    pub fn max_value(self) -> u64 {
        60 * self.units_per_second()
    }

    /// A short human name, used by [`render_histogram_table`].
    pub fn display_name(self) -> &'static str {
        match self {
            Hist::FrameClientToUpstream => "frame client->upstream",
            Hist::FrameUpstreamToClient => "frame upstream->client",
            Hist::ClientHandshake => "client handshake",
            Hist::UpstreamConnect => "upstream connect",
            Hist::FirstResult => "first result",
            Hist::Resume => "mid-stream resume",
        }
    }

    fn new_histogram(self) -> Histogram<u64> {
        Histogram::new_with_bounds(1, self.max_value(), 3)
            .expect("static histogram bounds are valid")
    }
}

/// One account's stream counters on one shard, or merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountStats {
    /// The account id from the config (never a key).
    pub id: String,
    /// Streams currently open on this account.
    pub streams_active: u64,
    /// Streams ever opened on this account.
    pub streams_total: u64,
    /// Streams moved off this account before the client saw anything.
    pub retries: u64,
    /// Upstream errors on this account's connections, by code (refusals at
    /// open and failures mid-stream, as in `clio_relay_errors_total`'s
    /// upstream side), in the order first seen.
    pub errors: Vec<(u16, u64)>,
    /// Time to first result of this account's connections: how many fell
    /// in each bucket of [`ACCOUNT_FIRST_RESULT_BUCKETS_MS`] (not
    /// cumulative; the last counts those above every bound).
    pub first_results: [u64; ACCOUNT_FIRST_RESULT_BUCKETS_MS.len() + 1],
    /// The sum of those times, in microseconds.
    pub first_result_us: u64,
}

/// Upper bounds, in milliseconds, of the buckets of the per-account
/// histogram `clio_relay_account_first_result_seconds` (a Prometheus
/// histogram, so that a query can compare accounts and take quantiles).
pub const ACCOUNT_FIRST_RESULT_BUCKETS_MS: [u64; 8] =
    [100, 250, 500, 1000, 2000, 5000, 10000, 30000];

impl AccountStats {
    fn new(id: &str) -> AccountStats {
        AccountStats {
            id: id.to_owned(),
            streams_active: 0,
            streams_total: 0,
            retries: 0,
            errors: Vec::new(),
            first_results: [0; ACCOUNT_FIRST_RESULT_BUCKETS_MS.len() + 1],
            first_result_us: 0,
        }
    }

    fn add(&mut self, other: &AccountStats) {
        self.streams_active += other.streams_active;
        self.streams_total += other.streams_total;
        self.retries += other.retries;
        for &(code, n) in &other.errors {
            self.add_error(code, n);
        }
        for (mine, theirs) in self.first_results.iter_mut().zip(&other.first_results) {
            *mine += theirs;
        }
        self.first_result_us += other.first_result_us;
    }

    fn add_error(&mut self, code: u16, n: u64) {
        match self.errors.iter_mut().find(|(c, _)| *c == code) {
            Some((_, count)) => *count += n,
            None => self.errors.push((code, n)),
        }
    }
}

/// One `(side, code)` row of the error table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ErrorCount {
    side: Side,
    code: u16,
    count: u64,
}

/// A latency histogram plus the exact sum of what was recorded into it
/// (hdrhistogram only keeps bucketed values; Prometheus wants `_sum`).
#[derive(Clone)]
struct HistData {
    hist: Histogram<u64>,
    sum: u64,
}

/// Frame and byte counters for one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Traffic {
    frames: u64,
    bytes: u64,
}

/// The metrics one shard records. Not `Sync`: it lives on its shard's thread,
/// and the admin thread only ever sees [`MetricsSnapshot`]s.
pub struct ShardMetrics {
    /// Shard number, the `shard` label of the per-shard series.
    shard: usize,
    /// Streams open right now on this shard.
    streams_active: Cell<u64>,
    /// Streams ever opened on this shard.
    streams_total: Cell<u64>,
    /// Streams refused (before or after the upgrade); each is also an error.
    streams_rejected: Cell<u64>,
    /// The same refusals by who made them, indexed by [`RefusedBy`].
    refusals: [Cell<u64>; RefusedBy::ALL.len()],
    /// Forwarded frames and bytes, indexed by [`Direction`]. Plain cells: the
    /// per-frame path does two adds, no allocation.
    traffic: [Cell<Traffic>; 2],
    /// Per-account counters, addressed by index into the latest account list.
    accounts: RefCell<Vec<AccountStats>>,
    /// `(side, code)` error counts: a small linear table, touched on error
    /// paths only (the first error of a kind allocates a row).
    errors: RefCell<Vec<ErrorCount>>,
    /// Latency histograms indexed by [`Hist`], preallocated at their full
    /// range so recording never allocates.
    hists: [RefCell<HistData>; 6],
    /// Failovers and resumes (see [`Failovers`]).
    failovers: Cell<Failovers>,
}

/// Failovers a client never saw, by phase and reason, and resumed streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failovers {
    /// Before upstream accepted the stream: refused (an error message).
    pub open_refused: u64,
    /// Before upstream accepted the stream: the connection lost.
    pub open_lost: u64,
    /// Mid-stream: an error message (500, 503).
    pub mid_error: u64,
    /// Mid-stream: the connection lost.
    pub mid_lost: u64,
    /// Resumes done (a stream resumed twice counts twice).
    pub resumed: u64,
    /// Audio replayed by those resumes, milliseconds.
    pub replayed_ms: u64,
}

impl Failovers {
    fn add(&mut self, o: &Failovers) {
        self.open_refused += o.open_refused;
        self.open_lost += o.open_lost;
        self.mid_error += o.mid_error;
        self.mid_lost += o.mid_lost;
        self.resumed += o.resumed;
        self.replayed_ms += o.replayed_ms;
    }
}

impl ShardMetrics {
    /// Metrics for shard number `shard`. Accounts are later addressed by
    /// index into `account_ids`.
    pub fn new(shard: usize, account_ids: &[String]) -> ShardMetrics {
        ShardMetrics {
            shard,
            streams_active: Cell::new(0),
            streams_total: Cell::new(0),
            streams_rejected: Cell::new(0),
            refusals: Default::default(),
            traffic: Default::default(),
            accounts: RefCell::new(account_ids.iter().map(|id| AccountStats::new(id)).collect()),
            errors: RefCell::new(Vec::new()),
            hists: Hist::ALL.map(|h| {
                RefCell::new(HistData {
                    hist: h.new_histogram(),
                    sum: 0,
                })
            }),
            failovers: Cell::new(Failovers::default()),
        }
    }

    /// A failover the client did not see: `phase` "open" (before upstream
    /// accepted the stream) or "mid"; `lost`: the connection failed (else
    /// upstream sent an error).
    pub fn failover(&self, phase: &str, lost: bool) {
        let mut f = self.failovers.get();
        match (phase, lost) {
            ("open", false) => f.open_refused += 1,
            ("open", true) => f.open_lost += 1,
            (_, false) => f.mid_error += 1,
            (_, true) => f.mid_lost += 1,
        }
        self.failovers.set(f);
    }

    /// A stream resumed on a new connection, replaying `secs` of audio,
    /// `took` after its upstream failed.
    pub fn resumed(&self, secs: f64, took: std::time::Duration) {
        let mut f = self.failovers.get();
        f.resumed += 1;
        f.replayed_ms += (secs * 1000.0) as u64;
        self.failovers.set(f);
        self.record(Hist::Resume, took.as_micros() as u64);
    }

    /// Records one latency sample in `h`'s unit (see [`Hist`]); values above
    /// 60 s are recorded as 60 s. Hot path: no allocation, no atomics.
    pub fn record(&self, h: Hist, value: u64) {
        let value = value.min(h.max_value());
        let mut data = self.hists[h.index()].borrow_mut();
        data.hist.saturating_record(value);
        data.sum = data.sum.saturating_add(value);
    }

    /// A stream was opened on account index `account`: counts it in the
    /// shard's and the account's totals and active gauges.
    pub fn stream_opened(&self, account: usize) {
        bump(&self.streams_total, 1);
        bump(&self.streams_active, 1);
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            a.streams_total += 1;
            a.streams_active += 1;
        }
    }

    /// A stream opened with [`stream_opened`](Self::stream_opened) has
    /// ended. Saturates at zero.
    pub fn stream_closed(&self, account: usize) {
        self.streams_active
            .set(self.streams_active.get().saturating_sub(1));
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            a.streams_active = a.streams_active.saturating_sub(1);
        }
    }

    /// A stream was refused, before or after the upgrade. Counted in
    /// `clio_relay_streams_rejected_total` and in the error table.
    /// Who refused it follows from `side` (see [`RefusedBy::from_side`]).
    pub fn stream_rejected(&self, side: Side, code: u16) {
        self.stream_refused(RefusedBy::from_side(side), side, code);
    }

    /// A stream was refused by `by`: counted in
    /// `clio_relay_streams_rejected_total`, `clio_relay_refusals_total{by}`
    /// and as an error of `(side, code)`.
    pub fn stream_refused(&self, by: RefusedBy, side: Side, code: u16) {
        bump(&self.streams_rejected, 1);
        bump(&self.refusals[by.index()], 1);
        self.error(side, code);
    }

    /// Counts one error in `clio_relay_errors_total{side,code}`. Error path
    /// only: the first error of a kind allocates a table row.
    pub fn error(&self, side: Side, code: u16) {
        let mut errors = self.errors.borrow_mut();
        match errors.iter_mut().find(|e| e.side == side && e.code == code) {
            Some(e) => e.count += 1,
            None => errors.push(ErrorCount {
                side,
                code,
                count: 1,
            }),
        }
    }

    /// Counts frames and bytes forwarded client→upstream. Hot path: plain
    /// cell updates, no allocation.
    pub fn frames_client_to_upstream(&self, frames: u64, bytes: u64) {
        self.traffic_add(Direction::ClientToUpstream, frames, bytes);
    }

    /// Counts frames and bytes forwarded upstream→client. Hot path: plain
    /// cell updates, no allocation.
    pub fn frames_upstream_to_client(&self, frames: u64, bytes: u64) {
        self.traffic_add(Direction::UpstreamToClient, frames, bytes);
    }

    fn traffic_add(&self, direction: Direction, frames: u64, bytes: u64) {
        let cell = &self.traffic[direction.index()];
        let t = cell.get();
        cell.set(Traffic {
            frames: t.frames.wrapping_add(frames),
            bytes: t.bytes.wrapping_add(bytes),
        });
    }

    /// Counts an upstream error of a connection on account index `account`:
    /// in `clio_relay_errors_total{side="upstream"}` and in the account's
    /// `clio_relay_account_errors_total`. Error path only.
    pub fn upstream_error(&self, account: usize, code: u16) {
        self.error(Side::Upstream, code);
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            a.add_error(code, 1);
        }
    }

    /// A connection on account index `account` brought its stream's first
    /// result `us` microseconds after the stream's first audio: recorded
    /// in the process-wide summary and in the account's histogram. Once a
    /// stream.
    pub fn first_result(&self, account: usize, us: u64) {
        self.record(Hist::FirstResult, us);
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            let i = ACCOUNT_FIRST_RESULT_BUCKETS_MS
                .iter()
                .position(|&b| us <= b * 1000)
                .unwrap_or(ACCOUNT_FIRST_RESULT_BUCKETS_MS.len());
            a.first_results[i] += 1;
            a.first_result_us += us;
        }
    }

    /// A stream moved off account index `account` before the client saw
    /// anything from it.
    pub fn account_retry(&self, account: usize) {
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            a.retries += 1;
        }
    }

    /// The account list changed. Counters of ids that remain are kept (by
    /// id, whatever their new index); ids that left are dropped; new ids
    /// start at zero; an empty id is an index no account holds, left out
    /// of snapshots. Later calls address accounts by index into the new
    /// list.
    pub fn set_accounts(&self, account_ids: &[String]) {
        let mut accounts = self.accounts.borrow_mut();
        let mut old = std::mem::take(&mut *accounts);
        *accounts = account_ids
            .iter()
            .map(|id| match old.iter().position(|a| &a.id == id) {
                Some(i) => old.swap_remove(i),
                None => AccountStats::new(id),
            })
            .collect();
    }

    /// A copy of everything recorded so far, to send to the admin thread.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut errors = self.errors.borrow().clone();
        errors.sort_by_key(|e| (e.side, e.code));
        MetricsSnapshot {
            shard: self.shard,
            streams_active: self.streams_active.get(),
            streams_total: self.streams_total.get(),
            streams_rejected: self.streams_rejected.get(),
            refusals: self.refusals.each_ref().map(Cell::get),
            read_buffers: (0, 0),
            unauthenticated: 0,
            traffic: [self.traffic[0].get(), self.traffic[1].get()],
            // An empty id is an index no account holds (freed).
            accounts: self
                .accounts
                .borrow()
                .iter()
                .filter(|a| !a.id.is_empty())
                .cloned()
                .collect(),
            errors,
            hists: Hist::ALL.map(|h| self.hists[h.index()].borrow().clone()),
            failovers: self.failovers.get(),
        }
    }
}

impl fmt::Debug for ShardMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

fn bump(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().wrapping_add(n));
}

/// A point-in-time copy of one shard's metrics, or of several merged.
/// `Send + Clone`, so shards can hand it to the admin thread.
#[derive(Clone)]
pub struct MetricsSnapshot {
    /// The shard it came from (after a merge: the shard of the receiver).
    pub shard: usize,
    streams_active: u64,
    streams_total: u64,
    streams_rejected: u64,
    refusals: [u64; RefusedBy::ALL.len()],
    /// The shard's read buffers: `(in use, on the free list)`, filled in by
    /// the shard when it takes the snapshot.
    pub read_buffers: (u64, u64),
    /// Upgraded connections waiting for a first-message token, filled in
    /// by the shard when it takes the snapshot.
    pub unauthenticated: u64,
    traffic: [Traffic; 2],
    accounts: Vec<AccountStats>,
    /// Sorted by `(side, code)`.
    errors: Vec<ErrorCount>,
    hists: [HistData; 6],
    failovers: Failovers,
}

impl MetricsSnapshot {
    /// An empty snapshot, the identity of [`merge`](Self::merge).
    pub fn empty(shard: usize) -> MetricsSnapshot {
        ShardMetrics::new(shard, &[]).snapshot()
    }

    /// Adds `other` into `self`: counters are summed, histograms added,
    /// accounts matched by id (ids unknown to `self` are appended), errors
    /// matched by `(side, code)`.
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        self.streams_active += other.streams_active;
        self.streams_total += other.streams_total;
        self.streams_rejected += other.streams_rejected;
        self.unauthenticated += other.unauthenticated;
        for (mine, theirs) in self.refusals.iter_mut().zip(&other.refusals) {
            *mine += theirs;
        }
        for (mine, theirs) in self.traffic.iter_mut().zip(&other.traffic) {
            mine.frames += theirs.frames;
            mine.bytes += theirs.bytes;
        }
        for theirs in &other.accounts {
            match self.accounts.iter_mut().find(|a| a.id == theirs.id) {
                Some(mine) => mine.add(theirs),
                None => self.accounts.push(theirs.clone()),
            }
        }
        for theirs in &other.errors {
            match self
                .errors
                .iter_mut()
                .find(|e| e.side == theirs.side && e.code == theirs.code)
            {
                Some(mine) => mine.count += theirs.count,
                None => self.errors.push(*theirs),
            }
        }
        self.errors.sort_by_key(|e| (e.side, e.code));
        self.failovers.add(&other.failovers);
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            mine.hist
                .add(&theirs.hist)
                .expect("all histograms of one kind share their bounds");
            mine.sum = mine.sum.saturating_add(theirs.sum);
        }
    }

    /// Streams open when the snapshot was taken.
    pub fn active_streams(&self) -> u64 {
        self.streams_active
    }

    /// Streams ever opened.
    pub fn streams_total(&self) -> u64 {
        self.streams_total
    }

    /// Streams refused before or after the upgrade.
    pub fn streams_rejected(&self) -> u64 {
        self.streams_rejected
    }

    /// Streams refused by `by`.
    pub fn refusals(&self, by: RefusedBy) -> u64 {
        self.refusals[by.index()]
    }

    /// Failovers and resumes.
    pub fn failovers(&self) -> Failovers {
        self.failovers
    }

    /// Mid-stream resumes done.
    pub fn streams_resumed(&self) -> u64 {
        self.failovers.resumed
    }

    /// Frames forwarded in `direction`.
    pub fn frames(&self, direction: Direction) -> u64 {
        self.traffic[direction.index()].frames
    }

    /// Bytes forwarded in `direction`.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.traffic[direction.index()].bytes
    }

    /// Per-account counters, in account-list order.
    pub fn accounts(&self) -> &[AccountStats] {
        &self.accounts
    }

    /// The counters of account `id`, if it is in the list.
    pub fn account(&self, id: &str) -> Option<&AccountStats> {
        self.accounts.iter().find(|a| a.id == id)
    }

    /// How many errors of `(side, code)` were counted.
    pub fn errors(&self, side: Side, code: u16) -> u64 {
        self.errors
            .iter()
            .find(|e| e.side == side && e.code == code)
            .map_or(0, |e| e.count)
    }

    /// Every `(side, code, count)` counted, sorted by side then code.
    pub fn error_counts(&self) -> impl Iterator<Item = (Side, u16, u64)> + '_ {
        self.errors.iter().map(|e| (e.side, e.code, e.count))
    }

    /// The histogram `h`, in its recording unit (see [`Hist`]).
    pub fn histogram(&self, h: Hist) -> &Histogram<u64> {
        &self.hists[h.index()].hist
    }

    /// The exact sum of the values recorded in `h` (after clamping to 60 s).
    pub fn histogram_sum(&self, h: Hist) -> u64 {
        self.hists[h.index()].sum
    }
}

impl fmt::Debug for MetricsSnapshot {
    /// Counters and histogram counts only: the histograms' bucket arrays
    /// would be tens of thousands of numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hist_counts: Vec<(Hist, u64)> = Hist::ALL
            .iter()
            .map(|&h| (h, self.histogram(h).len()))
            .collect();
        f.debug_struct("MetricsSnapshot")
            .field("shard", &self.shard)
            .field("streams_active", &self.streams_active)
            .field("streams_total", &self.streams_total)
            .field("streams_rejected", &self.streams_rejected)
            .field("traffic", &self.traffic)
            .field("accounts", &self.accounts)
            .field("errors", &self.errors)
            .field("hist_counts", &hist_counts)
            .finish()
    }
}
