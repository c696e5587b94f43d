//! Unit tests of the metrics module: recording, merging, rendering.

use super::render::human_ns;
use super::text::escape_label_value;
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
            || ((kind == "summary" || kind == "histogram")
                && (name == format!("{family}_sum") || name == format!("{family}_count")))
            || (kind == "histogram" && name == format!("{family}_bucket"));
        assert!(belongs, "sample {name} outside its family {family}");
        if kind == "summary" && name == family {
            assert!(labels.iter().any(|(k, _)| k == "quantile"), "{line:?}");
        }
        if kind == "histogram" {
            assert!(name != family, "a histogram has no bare sample: {line:?}");
            if name.ends_with("_bucket") {
                assert!(labels.iter().any(|(k, _)| k == "le"), "{line:?}");
            }
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
        live_streams: 3,
        accounts_healthy: 1,
        accounts: 2,
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
        "# TYPE clio_relay_streams_live gauge",
        "clio_relay_streams_live 3",
        "clio_relay_draining 1",
        "clio_relay_accounts_healthy 1",
        "clio_relay_accounts 2",
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
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Exit 3 means lint problems only (the text parsed). The one lint
    // we accept is `clio_relay_accounts_total`, the deprecated name of
    // `clio_relay_accounts`, exported beside it until a later release.
    let accepted =
        "clio_relay_accounts_total non-counter metrics should not have \"_total\" suffix";
    let lint_only = out.status.code() == Some(3)
        && report.lines().all(|l| l.trim().is_empty() || l == accepted);
    assert!(
        out.status.success() || lint_only,
        "promtool rejected the output:\n{report}\n{text}"
    );
}

/// Counts allocations made by the current thread, so the hot-path test can
/// prove "allocation-free" without being disturbed by tests on other threads.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; the counter is a const-initialised
// thread-local without a destructor, so touching it never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's layout, passed on unchanged.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from `System`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING_ALLOC: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn hot_path_does_not_allocate() {
    let m = ShardMetrics::new(0, &ids(&["a", "b"]));
    m.error(Side::Upstream, 502); // the first error of a kind may allocate
    let before = allocations();
    for i in 0..10_000u64 {
        m.record(Hist::FrameClientToUpstream, i * 7);
        m.record(Hist::FrameUpstreamToClient, i * 1_000_003);
        m.record(Hist::FirstResult, u64::MAX);
        m.frames_client_to_upstream(1, 640);
        m.frames_upstream_to_client(1, 120);
        m.stream_opened(1);
        m.account_retry(1);
        m.stream_closed(1);
        m.error(Side::Upstream, 502);
    }
    assert_eq!(allocations() - before, 0);
    assert_eq!(m.snapshot().frames(Direction::ClientToUpstream), 10_000);
}

#[test]
fn account_errors_and_first_results_merge_by_account_and_bucket() {
    let m0 = ShardMetrics::new(0, &ids(&["a", "b"]));
    let m1 = ShardMetrics::new(1, &ids(&["b", "a"]));
    m0.upstream_error(0, 503); // a
    m1.upstream_error(1, 503); // a
    m1.upstream_error(1, 429); // a
    m0.first_result(1, 100_000); // b: 0.1 s, in the 0.1 bucket (le is inclusive)
    m1.first_result(0, 100_001); // b: in the 0.25 bucket
    m1.first_result(0, 40_000_000); // b: above every bound
    let text = render_prometheus(&[m0.snapshot(), m1.snapshot()], &gauges());
    let samples = parse_exposition(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels.len() == l.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    };
    let errors = "clio_relay_account_errors_total";
    assert_eq!(
        value(errors, &[("account", "a"), ("code", "503")]),
        Some(2.0)
    );
    assert_eq!(
        value(errors, &[("account", "a"), ("code", "429")]),
        Some(1.0)
    );
    assert_eq!(value(errors, &[("account", "b"), ("code", "503")]), None);
    // Upstream errors are counted in the process-wide table too.
    let all = "clio_relay_errors_total";
    assert_eq!(
        value(all, &[("side", "upstream"), ("code", "503")]),
        Some(2.0)
    );
    let bucket = "clio_relay_account_first_result_seconds_bucket";
    assert_eq!(value(bucket, &[("account", "b"), ("le", "0.1")]), Some(1.0));
    assert_eq!(
        value(bucket, &[("account", "b"), ("le", "0.25")]),
        Some(2.0)
    );
    assert_eq!(value(bucket, &[("account", "b"), ("le", "30")]), Some(2.0));
    assert_eq!(
        value(bucket, &[("account", "b"), ("le", "+Inf")]),
        Some(3.0)
    );
    assert_eq!(
        value(bucket, &[("account", "a"), ("le", "+Inf")]),
        Some(0.0)
    );
    let count = "clio_relay_account_first_result_seconds_count";
    assert_eq!(value(count, &[("account", "b")]), Some(3.0));
    let sum = "clio_relay_account_first_result_seconds_sum";
    assert_eq!(value(sum, &[("account", "b")]), Some(40.200001));
}
