//! Rendering snapshots: Prometheus text exposition format 0.0.4 for the
//! admin endpoint, and a human latency table for the CLI demo. Runs on the
//! admin thread at scrape time, never on a shard's frame path.

use std::fmt::{self, Write as _};

use super::{Direction, Hist, MetricsSnapshot};

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
        help: "Time from stream start to the first upstream result.",
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
        "clio_relay_read_buffers",
        "gauge",
        "Pooled read buffers per shard: in_use holds a stream's unread bytes or a read, free waits on the pool's list.",
    );
    for s in shards {
        let shard = s.shard.to_string();
        for (state, n) in [("in_use", s.read_buffers.0), ("free", s.read_buffers.1)] {
            sample(
                o,
                "clio_relay_read_buffers",
                &[("shard", &shard), ("state", state)],
                n,
            );
        }
    }
    family(
        o,
        "clio_relay_unauthenticated_connections",
        "gauge",
        "Upgraded connections waiting for a token in their first message, per shard; they hold no max_streams slot.",
    );
    for s in shards {
        sample(
            o,
            "clio_relay_unauthenticated_connections",
            &[("shard", &s.shard.to_string())],
            s.unauthenticated,
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

    let f = merged.failovers();
    family(
        o,
        "clio_relay_failovers_total",
        "counter",
        "Upstream failures the client did not see, by phase (open: before upstream accepted the stream; mid) and reason.",
    );
    for (phase, reason, n) in [
        ("open", "refused", f.open_refused),
        ("open", "lost", f.open_lost),
        ("mid", "error", f.mid_error),
        ("mid", "lost", f.mid_lost),
    ] {
        sample(
            o,
            "clio_relay_failovers_total",
            &[("phase", phase), ("reason", reason)],
            n,
        );
    }
    family(
        o,
        "clio_relay_streams_resumed_total",
        "counter",
        "Mid-stream resumes on a new upstream connection.",
    );
    sample(o, "clio_relay_streams_resumed_total", &[], f.resumed);
    family(
        o,
        "clio_relay_replayed_audio_seconds_total",
        "counter",
        "Audio replayed to upstream by mid-stream resumes.",
    );
    let _ = writeln!(
        o,
        "clio_relay_replayed_audio_seconds_total {:.3}",
        f.replayed_ms as f64 / 1000.0
    );

    family(
        o,
        "clio_relay_refusals_total",
        "counter",
        "Streams refused, by who refused them: client, device_limit, revoked, relay_limit (every account at its max_concurrent_streams), relay (max_streams, draining), upstream, upstream_config (a wrong upstream.url).",
    );
    for by in crate::core::metrics::RefusedBy::ALL {
        sample(
            o,
            "clio_relay_refusals_total",
            &[("by", by.label())],
            merged.refusals(by),
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
pub(super) fn escape_label_value(out: &mut String, value: &str) {
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
