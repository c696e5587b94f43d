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
use std::fmt::{self, Write as _};

use hdrhistogram::Histogram;

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
    /// Stream start to the first upstream result, microseconds.
    FirstResult,
}

impl Hist {
    /// Every histogram, in index order.
    pub const ALL: [Hist; 5] = [
        Hist::FrameClientToUpstream,
        Hist::FrameUpstreamToClient,
        Hist::ClientHandshake,
        Hist::UpstreamConnect,
        Hist::FirstResult,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Recorded units per second: 1e9 (nanoseconds) or 1e6 (microseconds).
    pub fn units_per_second(self) -> u64 {
        match self {
            Hist::FrameClientToUpstream | Hist::FrameUpstreamToClient => 1_000_000_000,
            Hist::ClientHandshake | Hist::UpstreamConnect | Hist::FirstResult => 1_000_000,
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
}

impl AccountStats {
    fn new(id: &str) -> AccountStats {
        AccountStats {
            id: id.to_owned(),
            streams_active: 0,
            streams_total: 0,
            retries: 0,
        }
    }

    fn add(&mut self, other: &AccountStats) {
        self.streams_active += other.streams_active;
        self.streams_total += other.streams_total;
        self.retries += other.retries;
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
    hists: [RefCell<HistData>; 5],
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
            traffic: Default::default(),
            accounts: RefCell::new(account_ids.iter().map(|id| AccountStats::new(id)).collect()),
            errors: RefCell::new(Vec::new()),
            hists: Hist::ALL.map(|h| {
                RefCell::new(HistData {
                    hist: h.new_histogram(),
                    sum: 0,
                })
            }),
        }
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
    pub fn stream_rejected(&self, side: Side, code: u16) {
        bump(&self.streams_rejected, 1);
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

    /// A stream moved off account index `account` before the client saw
    /// anything from it.
    pub fn account_retry(&self, account: usize) {
        if let Some(a) = self.accounts.borrow_mut().get_mut(account) {
            a.retries += 1;
        }
    }

    /// The account list changed. Counters of ids that remain are kept (by
    /// id, whatever their new index); ids that left are dropped; new ids
    /// start at zero. Later calls address accounts by index into the new
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
            traffic: [self.traffic[0].get(), self.traffic[1].get()],
            accounts: self.accounts.borrow().clone(),
            errors,
            hists: Hist::ALL.map(|h| self.hists[h.index()].borrow().clone()),
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
    traffic: [Traffic; 2],
    accounts: Vec<AccountStats>,
    /// Sorted by `(side, code)`.
    errors: Vec<ErrorCount>,
    hists: [HistData; 5],
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

/// Process-wide facts the caller adds to the scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessGauges {
    /// `server.max_streams` from the config.
    pub max_streams: u64,
    /// Whether the relay is draining (refusing new streams).
    pub draining: bool,
    /// Accounts currently considered healthy.
    pub accounts_healthy: u64,
    /// Accounts in the config.
    pub accounts_total: u64,
}

/// One Prometheus summary family and the histograms rendered into it.
struct Summary {
    name: &'static str,
    help: &'static str,
    /// Each histogram with its extra label, if the family has several.
    members: &'static [(Hist, Option<(&'static str, &'static str)>)],
}

/// The summary families, in output order.
const SUMMARIES: [Summary; 4] = [
    Summary {
        name: "clio_relay_frame_forward_seconds",
        help: "Time from the read that completed a frame to the write that forwarded it.",
        members: &[
            (
                Hist::FrameClientToUpstream,
                Some(("direction", "client_to_upstream")),
            ),
            (
                Hist::FrameUpstreamToClient,
                Some(("direction", "upstream_to_client")),
            ),
        ],
    },
    Summary {
        name: "clio_relay_client_handshake_seconds",
        help: "Client WebSocket handshake duration.",
        members: &[(Hist::ClientHandshake, None)],
    },
    Summary {
        name: "clio_relay_upstream_connect_seconds",
        help: "Upstream connect duration (TCP, TLS and WebSocket upgrade).",
        members: &[(Hist::UpstreamConnect, None)],
    },
    Summary {
        name: "clio_relay_first_result_seconds",
        help: "Time from stream start to the first upstream result.",
        members: &[(Hist::FirstResult, None)],
    },
];

/// The quantiles every summary reports, with their label values.
const QUANTILES: [(f64, &str); 4] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];

/// Renders the Prometheus text exposition format (0.0.4) for a scrape:
/// per-shard stream series from `shards` as given, everything else merged
/// across them, plus the process `gauges`.
pub fn render_prometheus(shards: &[MetricsSnapshot], gauges: &ProcessGauges) -> String {
    let mut merged = MetricsSnapshot::empty(0);
    for s in shards {
        merged.merge(s);
    }
    let mut out = String::with_capacity(8 * 1024);
    let o = &mut out;

    family(
        o,
        "clio_relay_streams_active",
        "gauge",
        "Streams open now, per shard.",
    );
    for s in shards {
        sample(
            o,
            "clio_relay_streams_active",
            &[("shard", &s.shard.to_string())],
            s.streams_active,
        );
    }
    family(
        o,
        "clio_relay_streams_total",
        "counter",
        "Streams opened, per shard.",
    );
    for s in shards {
        sample(
            o,
            "clio_relay_streams_total",
            &[("shard", &s.shard.to_string())],
            s.streams_total,
        );
    }
    family(
        o,
        "clio_relay_streams_rejected_total",
        "counter",
        "Streams refused before or after the upgrade (also counted in errors).",
    );
    sample(
        o,
        "clio_relay_streams_rejected_total",
        &[],
        merged.streams_rejected,
    );

    let accounts = &merged.accounts;
    family(
        o,
        "clio_relay_account_streams_active",
        "gauge",
        "Streams open now, per account.",
    );
    for a in accounts {
        sample(
            o,
            "clio_relay_account_streams_active",
            &[("account", &a.id)],
            a.streams_active,
        );
    }
    family(
        o,
        "clio_relay_account_streams_total",
        "counter",
        "Streams opened, per account.",
    );
    for a in accounts {
        sample(
            o,
            "clio_relay_account_streams_total",
            &[("account", &a.id)],
            a.streams_total,
        );
    }
    family(
        o,
        "clio_relay_account_retries_total",
        "counter",
        "Streams moved off an account before the client saw anything.",
    );
    for a in accounts {
        sample(
            o,
            "clio_relay_account_retries_total",
            &[("account", &a.id)],
            a.retries,
        );
    }

    let directions = [Direction::ClientToUpstream, Direction::UpstreamToClient];
    family(
        o,
        "clio_relay_frames_total",
        "counter",
        "WebSocket frames forwarded.",
    );
    for d in directions {
        sample(
            o,
            "clio_relay_frames_total",
            &[("direction", d.label())],
            merged.frames(d),
        );
    }
    family(
        o,
        "clio_relay_bytes_total",
        "counter",
        "WebSocket frame bytes forwarded.",
    );
    for d in directions {
        sample(
            o,
            "clio_relay_bytes_total",
            &[("direction", d.label())],
            merged.bytes(d),
        );
    }

    family(
        o,
        "clio_relay_errors_total",
        "counter",
        "Errors by side and code.",
    );
    for (side, code, count) in merged.error_counts() {
        let code = code.to_string();
        sample(
            o,
            "clio_relay_errors_total",
            &[("side", side.label()), ("code", &code)],
            count,
        );
    }

    for Summary {
        name,
        help,
        members,
    } in SUMMARIES
    {
        family(o, name, "summary", help);
        for &(h, label) in members {
            let hist = merged.histogram(h);
            let unit = h.units_per_second() as f64;
            let base: Vec<(&str, &str)> = label.into_iter().collect();
            for (q, q_label) in QUANTILES {
                let mut labels = base.clone();
                labels.push(("quantile", q_label));
                // Prometheus convention: a quantile of no observations is NaN.
                let v = if hist.is_empty() {
                    f64::NAN
                } else {
                    hist.value_at_quantile(q) as f64 / unit
                };
                sample(o, name, &labels, v);
            }
            sample(
                o,
                &format!("{name}_sum"),
                &base,
                merged.histogram_sum(h) as f64 / unit,
            );
            sample(o, &format!("{name}_count"), &base, hist.len());
        }
        let max_name = format!("{name}_max");
        family(
            o,
            &max_name,
            "gauge",
            "Largest value observed since start (0 before any).",
        );
        for &(h, label) in members {
            let base: Vec<(&str, &str)> = label.into_iter().collect();
            let hist = merged.histogram(h);
            let max = if hist.is_empty() { 0 } else { hist.max() };
            sample(
                o,
                &max_name,
                &base,
                max as f64 / h.units_per_second() as f64,
            );
        }
    }

    family(
        o,
        "clio_relay_max_streams",
        "gauge",
        "Configured process-wide stream limit.",
    );
    sample(o, "clio_relay_max_streams", &[], gauges.max_streams);
    family(
        o,
        "clio_relay_draining",
        "gauge",
        "1 while draining (refusing new streams), else 0.",
    );
    sample(o, "clio_relay_draining", &[], u8::from(gauges.draining));
    family(
        o,
        "clio_relay_accounts_healthy",
        "gauge",
        "Accounts currently healthy.",
    );
    sample(
        o,
        "clio_relay_accounts_healthy",
        &[],
        gauges.accounts_healthy,
    );
    family(
        o,
        "clio_relay_accounts_total",
        "gauge",
        "Accounts configured.",
    );
    sample(o, "clio_relay_accounts_total", &[], gauges.accounts_total);
    out
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line, escaping label values.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value per the exposition format: `\`, `"` and newline.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A human-readable latency table (for the CLI demo): one row per histogram
/// with samples: count, p50, p90, p99, p99.9 and max in µs/ms/s.
pub fn render_histogram_table(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut rows = 0;
    for h in Hist::ALL {
        let hist = snapshot.histogram(h);
        if hist.is_empty() {
            continue;
        }
        rows += 1;
        // Nanoseconds per recorded unit.
        let ns = 1_000_000_000 / h.units_per_second();
        let q = |q: f64| human_ns(hist.value_at_quantile(q).saturating_mul(ns));
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            h.display_name(),
            hist.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            human_ns(hist.max().saturating_mul(ns)),
        );
    }
    if rows == 0 {
        out.push_str("(no latency samples recorded)\n");
    }
    out
}

/// Formats nanoseconds as `850ns`, `12.3µs`, `4.56ms` or `1.23s`.
fn human_ns(ns: u64) -> String {
    let v = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}µs", v / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", v / 1e6)
    } else {
        format!("{:.2}s", v / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// One parsed sample line: name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Checks that every non-comment line is `name{labels} value` with a
    /// valid name, properly quoted and escaped labels and a float value, and
    /// that each sample belongs to the family declared by the `# TYPE` line
    /// before it. Returns the samples as `(name, labels, value)`.
    fn parse_exposition(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        let mut samples = Vec::new();
        let mut current: Option<(String, String)> = None;
        let mut seen_families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(
                    ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                    "bad type in {line:?}"
                );
                assert!(
                    !seen_families.contains(&name.to_string()),
                    "family {name} repeated"
                );
                seen_families.push(name.to_string());
                current = Some((name.to_string(), kind.to_string()));
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                assert!(
                    rest.split_once(' ').is_some(),
                    "HELP without text: {line:?}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment {line:?}");
            let name_end = line.find(['{', ' ']).expect("name then labels or value");
            let name = &line[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .enumerate()
                        .all(|(i, c)| c.is_ascii_alphabetic()
                            || c == '_'
                            || c == ':'
                            || (i > 0 && c.is_ascii_digit())),
                "bad metric name in {line:?}"
            );
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(after) = rest.strip_prefix('{') {
                let mut chars = after.char_indices().peekable();
                loop {
                    // label name
                    let start = chars.peek().expect("unterminated labels").0;
                    let mut end = start;
                    while let Some(&(i, c)) = chars.peek() {
                        if c == '=' {
                            end = i;
                            break;
                        }
                        assert!(
                            c.is_ascii_alphanumeric() || c == '_',
                            "bad label name in {line:?}"
                        );
                        chars.next();
                    }
                    let key = after[start..end].to_string();
                    assert!(!key.is_empty(), "empty label name in {line:?}");
                    assert_eq!(chars.next().map(|x| x.1), Some('='));
                    assert_eq!(
                        chars.next().map(|x| x.1),
                        Some('"'),
                        "unquoted value in {line:?}"
                    );
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("unterminated label value").1 {
                            '\\' => match chars.next().expect("dangling escape").1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                c => panic!("bad escape \\{c} in {line:?}"),
                            },
                            '"' => break,
                            '\n' => panic!("raw newline in label value"),
                            c => value.push(c),
                        }
                    }
                    labels.push((key, value));
                    match chars.next().expect("unterminated labels") {
                        (_, ',') => continue,
                        (i, '}') => {
                            rest = &after[i + 1..];
                            break;
                        }
                        (_, c) => panic!("unexpected {c:?} in labels of {line:?}"),
                    }
                }
            }
            let value = rest.strip_prefix(' ').expect("one space before the value");
            assert!(
                !value.contains(' '),
                "timestamps are not expected: {line:?}"
            );
            let v: f64 = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (family, kind) = current.as_ref().expect("sample before any # TYPE");
            let belongs = name == family
                || (kind == "summary"
                    && (name == format!("{family}_sum") || name == format!("{family}_count")));
            assert!(belongs, "sample {name} outside its family {family}");
            if kind == "summary" && name == family {
                assert!(labels.iter().any(|(k, _)| k == "quantile"), "{line:?}");
            }
            samples.push((name.to_string(), labels, v));
        }
        samples
    }

    fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .2
    }

    #[test]
    fn snapshot_is_send_and_clone() {
        fn check<T: Send + Clone + 'static>() {}
        check::<MetricsSnapshot>();
    }

    #[test]
    fn records_and_snapshots() {
        let m = ShardMetrics::new(3, &ids(&["a", "b"]));
        m.stream_opened(0);
        m.stream_opened(1);
        m.stream_opened(1);
        m.stream_closed(1);
        m.account_retry(0);
        m.stream_rejected(Side::Client, 401);
        m.error(Side::Upstream, 502);
        m.error(Side::Upstream, 502);
        m.frames_client_to_upstream(2, 100);
        m.frames_client_to_upstream(1, 20);
        m.frames_upstream_to_client(5, 500);
        m.record(Hist::FrameClientToUpstream, 1_500);
        m.record(Hist::UpstreamConnect, 120_000_000); // 120 s saturates at 60 s
                                                      // Out-of-range account indices are ignored, not a panic.
        m.stream_opened(9);
        m.stream_closed(9);
        m.account_retry(9);

        let s = m.snapshot();
        assert_eq!(s.shard, 3);
        assert_eq!(s.streams_total(), 4);
        assert_eq!(s.active_streams(), 2); // index 9 still counts for the shard;
        assert_eq!(s.streams_rejected(), 1);
        let a = s.account("a").unwrap();
        assert_eq!((a.streams_active, a.streams_total, a.retries), (1, 1, 1));
        let b = s.account("b").unwrap();
        assert_eq!((b.streams_active, b.streams_total, b.retries), (1, 2, 0));
        assert_eq!(s.errors(Side::Client, 401), 1);
        assert_eq!(s.errors(Side::Upstream, 502), 2);
        assert_eq!(s.errors(Side::Internal, 500), 0);
        assert_eq!(s.frames(Direction::ClientToUpstream), 3);
        assert_eq!(s.bytes(Direction::ClientToUpstream), 120);
        assert_eq!(s.frames(Direction::UpstreamToClient), 5);
        assert_eq!(s.bytes(Direction::UpstreamToClient), 500);
        let h = s.histogram(Hist::FrameClientToUpstream);
        assert_eq!(h.len(), 1);
        assert!(h.equivalent(h.max(), 1_500));
        assert_eq!(s.histogram_sum(Hist::FrameClientToUpstream), 1_500);
        let up = s.histogram(Hist::UpstreamConnect);
        assert!(up.equivalent(up.max(), 60_000_000));
        assert_eq!(s.histogram_sum(Hist::UpstreamConnect), 60_000_000);
        assert!(s.histogram(Hist::FirstResult).is_empty());

        // A snapshot is a copy: later recording does not change it.
        m.stream_opened(0);
        assert_eq!(s.streams_total(), 4);
        assert_eq!(m.snapshot().streams_total(), 5);
        // The Debug output stays small (no histogram buckets).
        assert!(format!("{m:?}").len() < 2_000);
    }

    #[test]
    fn closing_more_than_opened_saturates_at_zero() {
        let m = ShardMetrics::new(0, &ids(&["a"]));
        m.stream_closed(0);
        let s = m.snapshot();
        assert_eq!(s.active_streams(), 0);
        assert_eq!(s.account("a").unwrap().streams_active, 0);
    }

    #[test]
    fn merge_adds_counters_histograms_and_matches_accounts_by_id() {
        let m0 = ShardMetrics::new(0, &ids(&["a", "b"]));
        let m1 = ShardMetrics::new(1, &ids(&["c", "b", "a"]));
        m0.stream_opened(0); // a
        m0.stream_opened(1); // b
        m1.stream_opened(2); // a
        m1.stream_opened(2); // a
        m1.stream_closed(2);
        m1.stream_opened(0); // c
        m1.account_retry(1); // b
        m0.error(Side::Client, 401);
        m1.error(Side::Client, 401);
        m1.error(Side::Internal, 503);
        m0.frames_upstream_to_client(1, 10);
        m1.frames_upstream_to_client(2, 30);
        for v in 1..=100 {
            m0.record(Hist::FirstResult, v);
        }
        for v in 101..=200 {
            m1.record(Hist::FirstResult, v);
        }

        let mut s = m0.snapshot();
        s.merge(&m1.snapshot());
        assert_eq!(s.shard, 0);
        assert_eq!(s.streams_total(), 5);
        assert_eq!(s.active_streams(), 4);
        let got: Vec<_> = s
            .accounts()
            .iter()
            .map(|a| (a.id.as_str(), a.streams_active, a.streams_total, a.retries))
            .collect();
        assert_eq!(got, [("a", 2, 3, 0), ("b", 1, 1, 1), ("c", 1, 1, 0)]);
        assert_eq!(s.errors(Side::Client, 401), 2);
        assert_eq!(s.errors(Side::Internal, 503), 1);
        assert_eq!(s.frames(Direction::UpstreamToClient), 3);
        assert_eq!(s.bytes(Direction::UpstreamToClient), 40);
        let h = s.histogram(Hist::FirstResult);
        assert_eq!(h.len(), 200);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 200);
        assert_eq!(h.value_at_quantile(0.5), 100);
        assert_eq!(s.histogram_sum(Hist::FirstResult), 200 * 201 / 2);

        // Merging into an empty snapshot is the identity.
        let mut e = MetricsSnapshot::empty(7);
        e.merge(&s);
        assert_eq!(e.streams_total(), s.streams_total());
        assert_eq!(e.accounts(), s.accounts());
        assert_eq!(e.histogram(Hist::FirstResult).len(), 200);
    }

    #[test]
    fn set_accounts_keeps_counters_by_id() {
        let m = ShardMetrics::new(0, &ids(&["a", "b", "c"]));
        m.stream_opened(0);
        m.stream_opened(1);
        m.stream_opened(1);
        m.account_retry(2);
        m.set_accounts(&ids(&["b", "d", "a"]));
        // Indices now address the new list.
        m.stream_opened(1); // d
        m.stream_closed(0); // b
        let s = m.snapshot();
        let got: Vec<_> = s
            .accounts()
            .iter()
            .map(|a| (a.id.as_str(), a.streams_active, a.streams_total, a.retries))
            .collect();
        assert_eq!(got, [("b", 1, 2, 0), ("d", 1, 1, 0), ("a", 1, 1, 0)]);
        assert!(s.account("c").is_none());
        // Process-wide counters are not affected by the account list.
        assert_eq!(s.streams_total(), 4);
        assert_eq!(s.active_streams(), 3);
    }

    fn sample_shards() -> Vec<MetricsSnapshot> {
        let m0 = ShardMetrics::new(0, &ids(&["prod-1", "prod-2"]));
        let m1 = ShardMetrics::new(1, &ids(&["prod-2", "prod-1"]));
        m0.stream_opened(0);
        m0.stream_opened(1);
        m0.stream_closed(1);
        for _ in 0..3 {
            m1.stream_opened(1);
        }
        m1.account_retry(0);
        m0.stream_rejected(Side::Client, 401);
        m1.error(Side::Upstream, 502);
        m0.frames_client_to_upstream(10, 1000);
        m1.frames_client_to_upstream(5, 500);
        m1.frames_upstream_to_client(4, 256);
        // 1..=1000 µs across both shards: exact quantiles (below 2048 every
        // value has its own bucket at 3 significant digits).
        for v in 1..=1000 {
            if v % 2 == 0 { &m0 } else { &m1 }.record(Hist::ClientHandshake, v);
        }
        m0.record(Hist::FrameClientToUpstream, 2_000);
        m1.record(Hist::FrameClientToUpstream, 1_000);
        vec![m0.snapshot(), m1.snapshot()]
    }

    fn gauges() -> ProcessGauges {
        ProcessGauges {
            max_streams: 9000,
            draining: true,
            accounts_healthy: 1,
            accounts_total: 2,
        }
    }

    #[test]
    fn renders_expected_lines() {
        let text = render_prometheus(&sample_shards(), &gauges());
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "# HELP clio_relay_streams_total Streams opened, per shard.",
            "# TYPE clio_relay_streams_total counter",
            "# TYPE clio_relay_streams_active gauge",
            r#"clio_relay_streams_active{shard="0"} 1"#,
            r#"clio_relay_streams_active{shard="1"} 3"#,
            r#"clio_relay_streams_total{shard="0"} 2"#,
            r#"clio_relay_streams_total{shard="1"} 3"#,
            "clio_relay_streams_rejected_total 1",
            r#"clio_relay_account_streams_active{account="prod-1"} 4"#,
            r#"clio_relay_account_streams_active{account="prod-2"} 0"#,
            r#"clio_relay_account_streams_total{account="prod-1"} 4"#,
            r#"clio_relay_account_streams_total{account="prod-2"} 1"#,
            r#"clio_relay_account_retries_total{account="prod-2"} 1"#,
            r#"clio_relay_account_retries_total{account="prod-1"} 0"#,
            r#"clio_relay_frames_total{direction="client_to_upstream"} 15"#,
            r#"clio_relay_frames_total{direction="upstream_to_client"} 4"#,
            r#"clio_relay_bytes_total{direction="client_to_upstream"} 1500"#,
            r#"clio_relay_bytes_total{direction="upstream_to_client"} 256"#,
            r#"clio_relay_errors_total{side="client",code="401"} 1"#,
            r#"clio_relay_errors_total{side="upstream",code="502"} 1"#,
            "# TYPE clio_relay_client_handshake_seconds summary",
            r#"clio_relay_client_handshake_seconds{quantile="0.5"} 0.0005"#,
            r#"clio_relay_client_handshake_seconds{quantile="0.9"} 0.0009"#,
            r#"clio_relay_client_handshake_seconds{quantile="0.99"} 0.00099"#,
            r#"clio_relay_client_handshake_seconds{quantile="0.999"} 0.000999"#,
            "clio_relay_client_handshake_seconds_sum 0.5005",
            "clio_relay_client_handshake_seconds_count 1000",
            "# TYPE clio_relay_client_handshake_seconds_max gauge",
            "clio_relay_client_handshake_seconds_max 0.001",
            r#"clio_relay_frame_forward_seconds{direction="client_to_upstream",quantile="0.5"} 0.000001"#,
            r#"clio_relay_frame_forward_seconds_sum{direction="client_to_upstream"} 0.000003"#,
            r#"clio_relay_frame_forward_seconds_count{direction="client_to_upstream"} 2"#,
            r#"clio_relay_frame_forward_seconds_max{direction="client_to_upstream"} 0.000002"#,
            r#"clio_relay_frame_forward_seconds{direction="upstream_to_client",quantile="0.99"} NaN"#,
            r#"clio_relay_frame_forward_seconds_count{direction="upstream_to_client"} 0"#,
            r#"clio_relay_frame_forward_seconds_max{direction="upstream_to_client"} 0"#,
            "clio_relay_upstream_connect_seconds_count 0",
            "clio_relay_first_result_seconds_sum 0",
            "clio_relay_max_streams 9000",
            "clio_relay_draining 1",
            "clio_relay_accounts_healthy 1",
            "clio_relay_accounts_total 2",
        ] {
            assert!(
                lines.contains(&expected),
                "missing line {expected:?} in\n{text}"
            );
        }
    }

    #[test]
    fn every_line_parses() {
        let text = render_prometheus(&sample_shards(), &gauges());
        let samples = parse_exposition(&text);
        assert!(samples.len() > 40);
        for (name, _, _) in &samples {
            assert!(name.starts_with("clio_relay_"), "{name}");
        }
        // No shards at all still renders a valid document.
        parse_exposition(&render_prometheus(&[], &ProcessGauges::default()));
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        // 90 fast frames of 10 µs, 9 of 1 ms and one of 50 ms, in ns.
        let m = ShardMetrics::new(0, &[]);
        for _ in 0..90 {
            m.record(Hist::FrameUpstreamToClient, 10_000);
        }
        for _ in 0..9 {
            m.record(Hist::FrameUpstreamToClient, 1_000_000);
        }
        m.record(Hist::FrameUpstreamToClient, 50_000_000);
        let samples = parse_exposition(&render_prometheus(&[m.snapshot()], &gauges()));
        let name = "clio_relay_frame_forward_seconds";
        let q = |q: &str| {
            value_of(
                &samples,
                name,
                &[("direction", "upstream_to_client"), ("quantile", q)],
            )
        };
        let close = |got: f64, want: f64| (got - want).abs() <= want * 1e-3;
        assert!(close(q("0.5"), 10e-6), "p50 {}", q("0.5"));
        assert!(close(q("0.9"), 10e-6), "p90 {}", q("0.9"));
        assert!(close(q("0.99"), 1e-3), "p99 {}", q("0.99"));
        assert!(close(q("0.999"), 50e-3), "p99.9 {}", q("0.999"));
        let dir = [("direction", "upstream_to_client")];
        assert_eq!(value_of(&samples, &format!("{name}_count"), &dir), 100.0);
        assert!(close(
            value_of(&samples, &format!("{name}_sum"), &dir),
            0.0599
        ));
        assert!(close(
            value_of(&samples, &format!("{name}_max"), &dir),
            0.05
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b\"c\nd"#);

        let odd = "we\"ird\\id\nx";
        let m = ShardMetrics::new(0, &ids(&[odd]));
        m.stream_opened(0);
        let text = render_prometheus(&[m.snapshot()], &gauges());
        assert!(text
            .lines()
            .any(|l| l == r#"clio_relay_account_streams_total{account="we\"ird\\id\nx"} 1"#));
        let samples = parse_exposition(&text);
        assert_eq!(
            value_of(
                &samples,
                "clio_relay_account_streams_total",
                &[("account", odd)]
            ),
            1.0
        );
    }

    #[test]
    fn histogram_table_shows_only_recorded_histograms() {
        let m = ShardMetrics::new(0, &[]);
        assert!(render_histogram_table(&m.snapshot()).contains("no latency samples"));
        for v in 1..=1000 {
            m.record(Hist::FrameClientToUpstream, v * 1_000); // 1 µs .. 1 ms
        }
        m.record(Hist::UpstreamConnect, 2_500); // 2.5 ms
        let table = render_histogram_table(&m.snapshot());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].contains("p99.9"));
        let frame: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(frame[..2], ["frame", "client->upstream"]);
        assert_eq!(frame[2], "1000");
        // Quantiles report the highest value equivalent to the sample (3 digits).
        assert_eq!(frame[3], "500.2µs");
        assert_eq!(frame[7], "1.00ms");
        assert!(lines[2].starts_with("upstream connect"));
        assert!(lines[2].ends_with("2.50ms"), "{table}");
        assert!(!table.contains("first result"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(12_300), "12.3µs");
        assert_eq!(human_ns(4_560_000), "4.56ms");
        assert_eq!(human_ns(1_230_000_000), "1.23s");
    }

    /// Validates the output with `promtool check metrics` when promtool is
    /// installed; passes silently otherwise.
    #[test]
    fn promtool_accepts_output_if_available() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let text = render_prometheus(&sample_shards(), &gauges());
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("promtool not installed; skipping");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        // Exit 3 means lint problems only (the text parsed). The one lint
        // we accept is the contract's gauge name `clio_relay_accounts_total`.
        let accepted =
            "clio_relay_accounts_total non-counter metrics should not have \"_total\" suffix";
        let lint_only = out.status.code() == Some(3)
            && report.lines().all(|l| l.trim().is_empty() || l == accepted);
        assert!(
            out.status.success() || lint_only,
            "promtool rejected the output:\n{report}\n{text}"
        );
    }
}
