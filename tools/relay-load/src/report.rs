//! What a run measured: [`LoadReport`], its table, JSON and `.hgrm` files,
//! and the live progress line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{AuthVia, Counters, Credentials, LoadOptions, Mode};

/// The outcome of a run. Latencies are in microseconds.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// `stream`, `idle` or `churn`.
    pub mode: &'static str,
    /// Streams (connections) started.
    pub streams_started: u64,
    /// Streams that ended in order: `finished`, then the close.
    pub streams_ok: u64,
    /// Streams still running when `--duration` ran out (not failures).
    pub streams_cut: u64,
    /// Failed streams by cause: `http N` (status before the upgrade),
    /// `error N` (a Soniox error message after it), `close N` (a close
    /// before `finished`), `closed unanswered` (closed before any answer to
    /// the upgrade request, as a clio-relay closes a client not on its
    /// `server.allow`, or any target or proxy may), `eof`, `reset`,
    /// `timeout`, `refused`, ...
    pub streams_failed: BTreeMap<String, u64>,
    /// What the refusals said (the `error_message` of the HTTP answer or
    /// of the error message after the upgrade), by failure and message,
    /// streams each; at most 16 distinct ones.
    pub refusal_reasons: BTreeMap<(String, String), u64>,
    /// Audio frames sent (end-of-audio frames not counted).
    pub frames_sent: u64,
    /// Echoed frames received (duplicates included).
    pub frames_received: u64,
    /// Frames of streams that ended in order that never came back.
    pub lost: u64,
    /// Frames that came back more than once (extra copies).
    pub duplicated: u64,
    /// Frames that came back after a later frame of their stream.
    pub reordered: u64,
    /// Result tokens that were not an echo of a frame of this stream (a
    /// non-echo upstream sends words).
    pub unexpected: u64,
    /// Bytes written to the sockets (handshakes included).
    pub bytes_sent: u64,
    /// Bytes read from the sockets.
    pub bytes_received: u64,
    /// Idle mode: streams still open when the hold ended (0 in the other
    /// modes, where the table and JSON leave it out).
    pub idle_held: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Echoed frames received per second of the run.
    pub frames_per_sec: f64,
    /// Churn mode: complete cycles (streams ended in order) per second. The
    /// other modes' table and JSON leave it out: a stream's length, not
    /// the target, sets it there.
    pub cycles_per_sec: f64,
    /// Round trip of each echoed frame (sent to its result read), µs.
    pub rtt: Histogram<u64>,
    /// Connect time: TCP + upgrade + auth + first result, µs (idle mode:
    /// until the upgrade answer).
    pub connect: Histogram<u64>,
    /// Whether the streams went out with no credential (`--auth none`, or
    /// none of `--relay-config`, `--tokens`, `--key`): a 401 then says so.
    pub no_credential: bool,
}

impl LoadReport {
    pub(crate) fn new(
        opts: &LoadOptions,
        c: Counters,
        rtt: Histogram<u64>,
        connect: Histogram<u64>,
        elapsed: Duration,
    ) -> LoadReport {
        let secs = elapsed.as_secs_f64().max(1e-9);
        LoadReport {
            mode: match opts.mode {
                Mode::Stream => "stream",
                Mode::Idle => "idle",
                Mode::Churn => "churn",
            },
            streams_started: c.started,
            streams_ok: c.ok,
            streams_cut: c.cut,
            streams_failed: c.failed.clone(),
            refusal_reasons: c.reasons.clone(),
            frames_sent: c.frames_sent,
            frames_received: c.frames_received,
            lost: c.lost,
            duplicated: c.duplicated,
            reordered: c.reordered,
            unexpected: c.unexpected,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            idle_held: c.idle_held,
            elapsed,
            frames_per_sec: c.frames_received as f64 / secs,
            cycles_per_sec: c.ok as f64 / secs,
            rtt,
            connect,
            no_credential: opts.auth == AuthVia::None
                || match &opts.credentials {
                    Credentials::None => true,
                    Credentials::List(l) => l.is_empty(),
                    Credentials::Fixed(_) | Credentials::Mint(..) => false,
                },
        }
    }

    /// All failed streams.
    pub fn failed_total(&self) -> u64 {
        self.streams_failed.values().sum()
    }

    /// Whether every stream ended in order and every frame came back once, in order.
    pub fn clean(&self) -> bool {
        self.failed_total() == 0 && self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }

    /// Likely causes of what went wrong, one line each (empty on a clean
    /// run): what the numbers alone do not say.
    pub fn hints(&self) -> Vec<String> {
        let mut h = Vec::new();
        let by = |prefixes: &[&str]| -> u64 {
            self.streams_failed
                .iter()
                .filter(|(k, _)| prefixes.contains(&k.as_str()))
                .map(|(_, v)| v)
                .sum()
        };
        if self.unexpected > 0 && self.frames_sent > 0 && self.frames_received == 0 {
            h.push(format!(
                "upstream answered with {} words and no echo: it is not in echo mode, so every \
                 frame counts as lost; run fake-soniox with --echo behind the relay",
                self.unexpected
            ));
        } else if self.unexpected > 0 {
            h.push(format!(
                "{} result tokens were not echoes of this run's frames: is upstream a fake-soniox \
                 with --echo?",
                self.unexpected
            ));
        }
        // What the refusals of `failures` said, quoted: ` (answered "…" x3)`.
        let answered = |failures: &[&str]| -> String {
            let quoted: Vec<String> = self
                .refusal_reasons
                .iter()
                .filter(|((f, _), _)| failures.contains(&f.as_str()))
                .map(|((_, m), n)| format!("{m:?} x{n}"))
                .collect();
            if quoted.is_empty() {
                String::new()
            } else {
                format!(" (answered {})", quoted.join(", "))
            }
        };
        let limited = by(&["error 429", "http 429"]);
        if limited > 0 {
            h.push(format!(
                "{limited} streams refused with 429{}: a concurrency limit was full, either the \
                 relay's (the enabled accounts' max_concurrent_streams together, or [devices] \
                 limits; the relay's log names it) or upstream's (fake-soniox --max-concurrent); \
                 raise it or run fewer streams (-n)",
                answered(&["error 429", "http 429"])
            ));
        }
        // A clio-relay at its open-file limit says so in its 503s (HTTP
        // before the upgrade, error 503 for an upstream connection it
        // could not open): that is the cause, where the lines below
        // could only guess at draining, max_streams or upstream.
        let at_file_limit = |failure: &str| {
            self.refusal_reasons
                .keys()
                .any(|(f, m)| f == failure && m.contains("file limit"))
        };
        const FILE_LIMIT: &str = "the relay is at its open-file limit: raise it \
             (LimitNOFILE= under systemd, ulimit -n in a shell; clio_relay_file_limit_total \
             counts where it was met) or run fewer streams (-n)";
        let full = by(&["http 503"]);
        if full > 0 {
            let why = if at_file_limit("http 503") {
                FILE_LIMIT
            } else {
                "the target is full or going away; a clio-relay answers so at \
                 server.max_streams or while draining (its log says which)"
            };
            h.push(format!(
                "{full} streams refused with HTTP 503{}: {why}",
                answered(&["http 503"])
            ));
        }
        let auth = by(&["http 401", "error 401"]);
        if auth > 0 && self.no_credential {
            h.push(format!(
                "{auth} streams refused with 401: relay-load sent no credential (--auth none, or \
                 none of --relay-config, --tokens or --key given); against a relay, give \
                 --relay-config with its config file"
            ));
        } else if auth > 0 {
            let said: Vec<(&str, u64)> = self
                .refusal_reasons
                .iter()
                .filter(|((f, _), _)| f == "http 401" || f == "error 401")
                .map(|((_, m), n)| (m.as_str(), *n))
                .collect();
            let saying = |what: &str| said.iter().any(|(m, _)| m.contains(what));
            let quoted = said
                .iter()
                .map(|(m, n)| format!("{m:?} x{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let why = if quoted.is_empty() {
                String::new()
            } else {
                format!(" (answered {quoted})")
            };
            let mut causes = Vec::new();
            if saying("issued in the future") {
                causes.push(
                    "tokens issued in the future: the clock of the machine that minted them \
                     (with --relay-config, this one) is ahead of the relay's by more than \
                     tokens.clock_skew; synchronise both clocks (NTP)",
                );
            }
            if saying("expired") {
                causes.push(
                    "expired tokens: the minting machine's clock is behind the relay's by more \
                     than their lifetime, or --tokens holds old ones; synchronise the clocks \
                     or mint new tokens",
                );
            }
            if causes.is_empty()
                || said
                    .iter()
                    .any(|(m, _)| !m.contains("issued in the future") && !m.contains("expired"))
            {
                causes.push(
                    "the credentials are not the relay's (with --relay-config, use the relay's \
                     own config file and token secret)",
                );
            }
            h.push(format!(
                "{auth} streams refused with 401{why}: {}",
                causes.join("; or ")
            ));
        }
        let reconnect = by(&["error 503"]);
        if reconnect > 0 {
            let unreachable = self.refusal_reasons.keys().any(|(f, m)| {
                f == "error 503" && m.contains("transcription service is unreachable")
            });
            let why = if at_file_limit("error 503") {
                FILE_LIMIT
            } else if unreachable {
                "a clio-relay could not reach upstream at open (upstream_unavailable; its \
                 metrics and log count it as upstream 502): check its upstream.url, the \
                 network to it and Soniox's status; a client may retry later"
            } else {
                "the target failed them; a clio-relay does so when it drains (SIGTERM, a \
                 restart) or retires their key, or when upstream failed mid-stream with no \
                 resume left (its log says which)"
            };
            h.push(format!(
                "{reconnect} streams were told to reconnect (error 503 after the upgrade){}: \
                 {why}",
                answered(&["error 503"])
            ));
        }
        let unanswered = by(&[super::stream::CLOSED_UNANSWERED]);
        if unanswered > 0 {
            h.push(format!(
                "{unanswered} streams had their connection closed before any answer to the \
                 upgrade request: the target (or a proxy or firewall on the way) took the \
                 connection and closed it without a word; its own log says why. If the target \
                 is a clio-relay, it does that to a client its server.allow does not list \
                 (counted in clio_relay_errors_total{{side=\"client\",code=\"403\"}}): add \
                 this machine's address to server.allow, or run relay-load from an address on it"
            ));
        }
        // Refusals no line here explains (a 400 for a model upstream does
        // not have, a 402, a 408): what the target said, quoted, as the
        // JSON's `refusal_reasons` has it. Before, the table showed only
        // `error 400: 2`, the reason in the JSON alone.
        let explained = [
            "error 429",
            "http 429",
            "http 503",
            "http 401",
            "error 401",
            "error 503",
        ];
        let mut unexplained: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((failure, message), n) in &self.refusal_reasons {
            if !explained.contains(&failure.as_str()) {
                unexplained
                    .entry(failure)
                    .or_default()
                    .push(format!("{message:?} x{n}"));
            }
        }
        for (failure, said) in unexplained {
            let streams = self.streams_failed.get(failure).copied().unwrap_or(0);
            h.push(format!(
                "{streams} streams failed with {failure}: the target answered {}",
                said.join(", ")
            ));
        }
        let refused = by(&["refused"]);
        if refused > 0 {
            h.push(format!(
                "{refused} streams could not connect (connection refused): nothing listens at the \
                 target; is the relay (or fake-soniox) running, and is --target its address \
                 (the relay's server.listen)?"
            ));
        }
        h
    }

    /// Whether the run's streams sent audio (stream and churn modes): only
    /// then do the frame counts, `lost`, `duplicated`, `reordered`,
    /// `unexpected`, `frames_per_sec` and `rtt` measure anything. An idle
    /// stream sends its config and keepalives only.
    pub fn sends_audio(&self) -> bool {
        self.mode != "idle"
    }

    /// The end-of-run table: the measures of the run's mode only (see
    /// [`LoadReport::sends_audio`]; `cycles/s` in churn mode, `idle streams
    /// held` in idle mode).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency", "p50", "p90", "p99", "p99.9", "max", "count"
        );
        let latencies: &[(&str, &Histogram<u64>)] = if self.sends_audio() {
            &[("connect", &self.connect), ("rtt", &self.rtt)]
        } else {
            &[("connect", &self.connect)]
        };
        for &(name, h) in latencies {
            let q = |q: f64| ms(h.value_at_quantile(q));
            let _ = writeln!(
                s,
                "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                name,
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                ms(h.max()),
                h.len()
            );
        }
        let _ = writeln!(s, "(latencies in ms)");
        let _ = writeln!(s);
        let failed = if self.streams_failed.is_empty() {
            "0".to_string()
        } else {
            let parts: Vec<String> = self
                .streams_failed
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            format!("{} ({})", self.failed_total(), parts.join(", "))
        };
        let mut rows: Vec<(&str, String)> = vec![
            ("mode", self.mode.to_string()),
            ("elapsed", format!("{:.1} s", self.elapsed.as_secs_f64())),
            ("streams started", self.streams_started.to_string()),
            ("streams ok", self.streams_ok.to_string()),
            ("streams failed", failed),
            ("streams cut", self.streams_cut.to_string()),
        ];
        if self.sends_audio() {
            rows.extend([
                ("frames sent", self.frames_sent.to_string()),
                ("frames received", self.frames_received.to_string()),
                ("lost", self.lost.to_string()),
                ("duplicated", self.duplicated.to_string()),
                ("reordered", self.reordered.to_string()),
                ("unexpected tokens", self.unexpected.to_string()),
            ]);
        }
        rows.extend([
            ("bytes sent", self.bytes_sent.to_string()),
            ("bytes received", self.bytes_received.to_string()),
        ]);
        if self.sends_audio() {
            rows.push(("frames/s", format!("{:.0}", self.frames_per_sec)));
        }
        match self.mode {
            "idle" => rows.push(("idle streams held", self.idle_held.to_string())),
            "churn" => rows.push(("cycles/s", format!("{:.1}", self.cycles_per_sec))),
            _ => {}
        }
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<18} {v}");
        }
        for hint in self.hints() {
            let _ = writeln!(s, "hint: {hint}");
        }
        s
    }

    /// The report as one JSON object (latencies in ms), with the fields of
    /// the run's mode only, as [`LoadReport::table`]: no frame counts,
    /// `frames_per_sec` or `rtt` in idle mode, `cycles_per_sec` only in
    /// churn mode, `idle_held` only in idle mode.
    pub fn to_json(&self) -> serde_json::Value {
        let lat = |h: &Histogram<u64>| {
            serde_json::json!({
                "count": h.len(),
                "p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
                "p90_ms": h.value_at_quantile(0.9) as f64 / 1000.0,
                "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
                "p999_ms": h.value_at_quantile(0.999) as f64 / 1000.0,
                "max_ms": h.max() as f64 / 1000.0,
                "mean_ms": h.mean() / 1000.0,
            })
        };
        let mut j = serde_json::json!({
            "mode": self.mode,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "streams_started": self.streams_started,
            "streams_ok": self.streams_ok,
            "streams_failed": self.failed_total(),
            "streams_failed_by_code": self.streams_failed,
            "refusal_reasons": self
                .refusal_reasons
                .iter()
                .map(|((failure, message), n)| serde_json::json!({
                    "failure": failure,
                    "message": message,
                    "streams": n,
                }))
                .collect::<Vec<_>>(),
            "streams_cut": self.streams_cut,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "connect": lat(&self.connect),
            "hints": self.hints(),
        });
        if self.sends_audio() {
            j["frames_sent"] = self.frames_sent.into();
            j["frames_received"] = self.frames_received.into();
            j["lost"] = self.lost.into();
            j["duplicated"] = self.duplicated.into();
            j["reordered"] = self.reordered.into();
            j["unexpected_tokens"] = self.unexpected.into();
            j["frames_per_sec"] = self.frames_per_sec.into();
            j["rtt"] = lat(&self.rtt);
        }
        match self.mode {
            "idle" => j["idle_held"] = self.idle_held.into(),
            "churn" => j["cycles_per_sec"] = self.cycles_per_sec.into(),
            _ => {}
        }
        j
    }

    /// Writes the histograms this run's mode measured into `dir` (created
    /// if needed): `connect.hgrm`, and `rtt.hgrm` for a mode that sends
    /// audio ([`LoadReport::sends_audio`]). An idle run measures no round
    /// trip: it removes an `rtt.hgrm` an earlier run left in `dir`, so that
    /// the directory holds one run's files only.
    pub fn write_hgrm(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("connect.hgrm"), hgrm(&self.connect))?;
        let rtt = dir.join("rtt.hgrm");
        if self.sends_audio() {
            std::fs::write(rtt, hgrm(&self.rtt))?;
        } else {
            match std::fs::remove_file(rtt) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// A histogram (µs) in HdrHistogram's classic percentile-distribution text
/// format, values in milliseconds, 5 ticks per half distance.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / 1000.0;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        // The counts array holds (buckets + 1) half-ranges of sub-buckets.
        2 * h.distinct_values() / (usize::from(h.buckets()) + 1)
    );
    s
}

/// The one-line live display on stderr (rewritten in place on a terminal).
pub(crate) struct Progress {
    on: bool,
    tty: bool,
    printed: bool,
    /// Whether the streams send audio: an idle run's line has no
    /// frames/s or round trips to show.
    audio: bool,
}

impl Progress {
    pub(crate) fn new(on: bool, mode: Mode) -> Progress {
        Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            printed: false,
            audio: mode != Mode::Idle,
        }
    }

    pub(crate) fn line(&mut self, t: Duration, c: &Counters, fps: f64, rtt: &Histogram<u64>) {
        if !self.on {
            return;
        }
        let mut line = format!(
            "[{:>5.1}s] open {} done {} failed {} cut {}",
            t.as_secs_f64(),
            c.open,
            c.ok,
            c.failed_total(),
            c.cut,
        );
        if self.audio {
            let _ = write!(
                line,
                " | {fps:.0} frames/s | rtt p50 {} p99 {} ms",
                ms(rtt.value_at_quantile(0.5)),
                ms(rtt.value_at_quantile(0.99)),
            );
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.printed = true;
    }

    pub(crate) fn finish(&mut self) {
        if self.on && self.tty && self.printed {
            let _ = writeln!(std::io::stderr());
        }
    }
}
