//! Rendering snapshots: Prometheus text exposition format 0.0.4 for the
//! admin endpoint, and a human latency table for the CLI demo. Runs on the
//! admin thread at scrape time, never on a shard's frame path.

use std::fmt::Write as _;

use super::text::{family, Kind};
use super::{Direction, Hist, MetricsSnapshot, ACCOUNT_FIRST_RESULT_BUCKETS_MS};

/// Process-wide facts the caller adds to the scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessGauges {
    /// `server.max_streams` from the config.
    pub max_streams: u64,
    /// Whether the relay is draining (its listeners closed, `/healthz` 503).
    pub draining: bool,
    /// Client streams admitted and not yet ended (what `server.max_streams`
    /// counts): a stream between two upstream connections counts too.
    pub live_streams: u64,
    /// Accounts currently considered healthy.
    pub accounts_healthy: u64,
    /// Accounts in the running set (the config's and the admin API's).
    pub accounts: u64,
}

/// One Prometheus summary family and the histograms rendered into it.
struct Summary {
    name: &'static str,
    help: &'static str,
    /// Each histogram with its extra label, if the family has several.
    members: &'static [(Hist, Option<(&'static str, &'static str)>)],
}

/// The summary families, in output order.
const SUMMARIES: [Summary; 5] = [
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
        help: "Time from a stream's first audio to its first upstream result.",
        members: &[(Hist::FirstResult, None)],
    },
    Summary {
        name: "clio_relay_resume_seconds",
        help:
            "Time from a mid-stream upstream failure to the new connection that resumes the stream.",
        members: &[(Hist::Resume, None)],
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

    let mut f = family(
        o,
        "clio_relay_streams_active",
        Kind::Gauge,
        "Streams open now, per shard.",
    );
    for s in shards {
        f.sample(&[("shard", &s.shard.to_string())], s.streams_active);
    }
    let mut f = family(
        o,
        "clio_relay_streams_total",
        Kind::Counter,
        "Streams opened, per shard.",
    );
    for s in shards {
        f.sample(&[("shard", &s.shard.to_string())], s.streams_total);
    }
    let mut f = family(
        o,
        "clio_relay_read_buffers",
        Kind::Gauge,
        "Pooled read buffers per shard: in_use holds a stream's unread bytes or a read, free waits on the pool's list.",
    );
    for s in shards {
        let shard = s.shard.to_string();
        for (state, n) in [("in_use", s.read_buffers.0), ("free", s.read_buffers.1)] {
            f.sample(&[("shard", &shard), ("state", state)], n);
        }
    }
    let mut f = family(
        o,
        "clio_relay_unauthenticated_connections",
        Kind::Gauge,
        "Upgraded connections waiting for a token in their first message, per shard; they hold no max_streams slot.",
    );
    for s in shards {
        f.sample(&[("shard", &s.shard.to_string())], s.unauthenticated);
    }
    family(
        o,
        "clio_relay_streams_rejected_total",
        Kind::Counter,
        "Streams refused before or after the upgrade (also counted in errors).",
    )
    .sample(&[], merged.streams_rejected);

    let accounts = &merged.accounts;
    let mut f = family(
        o,
        "clio_relay_account_streams_active",
        Kind::Gauge,
        "Streams open now, per account.",
    );
    for a in accounts {
        f.sample(&[("account", &a.id)], a.streams_active);
    }
    let mut f = family(
        o,
        "clio_relay_account_streams_total",
        Kind::Counter,
        "Streams opened, per account.",
    );
    for a in accounts {
        f.sample(&[("account", &a.id)], a.streams_total);
    }
    let mut f = family(
        o,
        "clio_relay_account_retries_total",
        Kind::Counter,
        "Streams moved off an account before the client saw anything.",
    );
    for a in accounts {
        f.sample(&[("account", &a.id)], a.retries);
    }
    let mut f = family(
        o,
        "clio_relay_account_errors_total",
        Kind::Counter,
        "Upstream errors on an account's connections, by code (refusals at open included).",
    );
    for a in accounts {
        for (code, n) in &a.errors {
            f.sample(&[("account", &a.id), ("code", &code.to_string())], n);
        }
    }
    let mut f = family(
        o,
        "clio_relay_account_first_result_seconds",
        Kind::Histogram,
        "Time from a stream's first audio to its first upstream result, per account.",
    );
    for a in accounts {
        let mut below = 0;
        for (i, n) in a.first_results.iter().enumerate() {
            below += n;
            let le = ACCOUNT_FIRST_RESULT_BUCKETS_MS
                .get(i)
                .map_or("+Inf".to_string(), |ms| (*ms as f64 / 1000.0).to_string());
            f.sample_named("_bucket", &[("account", &a.id), ("le", &le)], below);
        }
        f.sample_named(
            "_sum",
            &[("account", &a.id)],
            a.first_result_us as f64 / 1e6,
        );
        f.sample_named("_count", &[("account", &a.id)], below);
    }

    let directions = [Direction::ClientToUpstream, Direction::UpstreamToClient];
    let mut f = family(
        o,
        "clio_relay_frames_total",
        Kind::Counter,
        "WebSocket frames forwarded.",
    );
    for d in directions {
        f.sample(&[("direction", d.label())], merged.frames(d));
    }
    let mut f = family(
        o,
        "clio_relay_bytes_total",
        Kind::Counter,
        "WebSocket frame bytes forwarded.",
    );
    for d in directions {
        f.sample(&[("direction", d.label())], merged.bytes(d));
    }

    let fo = merged.failovers();
    let mut f = family(
        o,
        "clio_relay_failovers_total",
        Kind::Counter,
        "Upstream failures the client did not see, by phase (open: before upstream accepted the stream; mid) and reason.",
    );
    for (phase, reason, n) in [
        ("open", "refused", fo.open_refused),
        ("open", "lost", fo.open_lost),
        ("mid", "error", fo.mid_error),
        ("mid", "lost", fo.mid_lost),
    ] {
        f.sample(&[("phase", phase), ("reason", reason)], n);
    }
    family(
        o,
        "clio_relay_streams_resumed_total",
        Kind::Counter,
        "Mid-stream resumes on a new upstream connection.",
    )
    .sample(&[], fo.resumed);
    family(
        o,
        "clio_relay_replayed_audio_seconds_total",
        Kind::Counter,
        "Audio replayed to upstream by mid-stream resumes.",
    )
    .sample(&[], format_args!("{:.3}", fo.replayed_ms as f64 / 1000.0));

    let mut f = family(
        o,
        "clio_relay_refusals_total",
        Kind::Counter,
        "Streams refused, by who refused them: client, device_limit, revoked, relay_limit (every account at its max_concurrent_streams), relay (max_streams, draining), upstream, upstream_config (a wrong upstream.url), pool_limit (every pool of the token at its max_streams), proxy_header (a trusted balancer's PROXY header missing, malformed, too large, cut short or late).",
    );
    for by in crate::core::metrics::RefusedBy::ALL {
        f.sample(&[("by", by.label())], merged.refusals(by));
    }

    let mut f = family(
        o,
        "clio_relay_errors_total",
        Kind::Counter,
        "Errors by side and code.",
    );
    for (side, code, count) in merged.error_counts() {
        let code = code.to_string();
        f.sample(&[("side", side.label()), ("code", &code)], count);
    }

    for Summary {
        name,
        help,
        members,
    } in SUMMARIES
    {
        let mut f = family(o, name, Kind::Summary, help);
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
                f.sample(&labels, v);
            }
            f.sample_named("_sum", &base, merged.histogram_sum(h) as f64 / unit);
            f.sample_named("_count", &base, hist.len());
        }
        let max_name = format!("{name}_max");
        let mut f = family(
            o,
            &max_name,
            Kind::Gauge,
            "Largest value observed since start (0 before any).",
        );
        for &(h, label) in members {
            let base: Vec<(&str, &str)> = label.into_iter().collect();
            let hist = merged.histogram(h);
            let max = if hist.is_empty() { 0 } else { hist.max() };
            f.sample(&base, max as f64 / h.units_per_second() as f64);
        }
    }

    family(
        o,
        "clio_relay_max_streams",
        Kind::Gauge,
        "Configured process-wide stream limit.",
    )
    .sample(&[], gauges.max_streams);
    family(
        o,
        "clio_relay_streams_live",
        Kind::Gauge,
        "Client streams admitted and not yet ended, process-wide (what max_streams counts); unlike streams_active, a stream between two upstream connections (a resume or failover reconnecting) counts.",
    )
    .sample(&[], gauges.live_streams);
    family(
        o,
        "clio_relay_draining",
        Kind::Gauge,
        "1 while draining (refusing new streams), else 0.",
    )
    .sample(&[], u8::from(gauges.draining));
    family(
        o,
        "clio_relay_accounts_healthy",
        Kind::Gauge,
        "Accounts currently healthy.",
    )
    .sample(&[], gauges.accounts_healthy);
    family(
        o,
        "clio_relay_accounts",
        Kind::Gauge,
        "Accounts in the running set.",
    )
    .sample(&[], gauges.accounts);
    family(
        o,
        "clio_relay_accounts_total",
        Kind::Gauge,
        "Deprecated, the same value as clio_relay_accounts (a gauge misnamed as a counter); goes in a later release.",
    )
    .sample(&[], gauges.accounts);
    out
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
pub(super) fn human_ns(ns: u64) -> String {
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
