//! What relay-load tells a user beyond the numbers: hints when upstream is
//! not echoing or a limit refused streams, and its `.hgrm` files plotted
//! side by side by `tools/plot-hgrm.py`. Against a real fake Soniox on
//! loopback, in-process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
use relay_load::{self, AuthVia, Credentials, LoadOptions, LoadReport, Pace, Target};

const KEY: &str = "load-report-key";

fn fake(echo: bool, limit: u32) -> FakeSoniox {
    FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, limit)],
        echo,
        // Each stream holds its slot a while after its audio, so streams
        // opened together overlap however slow the machine is.
        faults: fake_soniox::Faults {
            finish_delay: Duration::from_millis(500),
            ..Default::default()
        },
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts")
}

fn direct(fake: &FakeSoniox, streams: usize) -> LoadReport {
    let opts = LoadOptions {
        target: Target::direct(fake.addr()),
        auth: AuthVia::Header,
        credentials: Credentials::Fixed(KEY.to_string()),
        streams,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        pace: Pace::Flood,
        duration: Duration::from_secs(30),
        threads: 1,
        progress: false,
        ..LoadOptions::default()
    };
    relay_load::run(&opts).expect("load runs")
}

#[test]
fn a_non_echo_upstream_gets_a_hint() {
    let fake = fake(false, 10);
    let r = direct(&fake, 2);
    let table = r.table();
    assert!(r.unexpected > 0 && r.frames_received == 0, "{table}");
    assert!(r.lost > 0, "{table}");
    assert!(
        table.contains("hint: upstream answered with") && table.contains("--echo"),
        "{table}"
    );
    assert_eq!(r.to_json()["hints"].as_array().unwrap().len(), 1);
}

#[test]
fn streams_refused_by_a_limit_get_a_hint() {
    let fake = fake(true, 1);
    let r = direct(&fake, 3);
    let table = r.table();
    assert_eq!(r.streams_ok, 1, "{table}");
    assert_eq!(
        r.streams_failed
            .get("http 429")
            .or(r.streams_failed.get("error 429")),
        Some(&2),
        "{table}"
    );
    assert!(
        table.contains("streams refused with 429") && table.contains("max_concurrent_streams"),
        "{table}"
    );
}

/// A relay that is not running (nothing listens at --target): every
/// stream fails "refused", and a hint says what that means. Before, the
/// report said "streams failed 3 (refused: 3)" and nothing more.
#[test]
fn a_target_nobody_listens_on_gets_a_hint() {
    // A port nothing listens on: every connect is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = LoadOptions {
        target: Target::relay(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        credentials: Credentials::Fixed(KEY.to_string()),
        streams: 3,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        duration: Duration::from_secs(30),
        threads: 1,
        ..LoadOptions::default()
    };
    let r = relay_load::run(&opts).expect("load runs");
    let table = r.table();
    assert_eq!(r.streams_failed.get("refused"), Some(&3), "{table}");
    assert!(
        table.contains("hint: 3 streams could not connect (connection refused)")
            && table.contains("is the relay (or fake-soniox) running"),
        "{table}"
    );
}

#[test]
fn a_clean_run_has_no_hint() {
    let fake = fake(true, 10);
    let r = direct(&fake, 2);
    assert!(r.clean(), "{}", r.table());
    assert!(r.hints().is_empty(), "{:?}", r.hints());
    assert!(!r.table().contains("hint:"));
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clio-load-report-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn plot(args: &[&str]) -> std::process::Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/plot-hgrm.py"))
        .args(args)
        .output()
        .expect("python3 runs")
}

/// Data rows of an .hgrm file.
fn rows(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|v| v.parse::<f64>().is_ok())
        })
        .count()
}

#[test]
fn hgrm_files_of_two_runs_plot_side_by_side() {
    let fake = fake(true, 10);
    let dir = temp_dir("plot");
    for run in ["one", "two"] {
        direct(&fake, 2).write_hgrm(&dir.join(run)).unwrap();
    }
    let svg = dir.join("rtt.svg");
    let (one, two) = (dir.join("one/rtt.hgrm"), dir.join("two/rtt.hgrm"));
    let out = plot(&[
        "-o",
        svg.to_str().unwrap(),
        "--title",
        "rtt <two runs>",
        &format!("first={}", one.display()),
        two.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(
        text.contains("rtt &lt;two runs&gt;"),
        "the title is escaped"
    );
    // One line per file, each with a point per percentile row of its file.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("<polyline class=\"series\""))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("data-label=\"first\""));
    assert!(lines[1].contains("data-label=\"two/rtt.hgrm\""));
    for (line, file) in lines.iter().zip([&one, &two]) {
        let points = line.split("points=\"").nth(1).unwrap();
        let n = points.trim_end_matches("\"/>").split_whitespace().count();
        assert_eq!(n, rows(file), "{line}");
    }
    // A file that is not an .hgrm is refused with a reason.
    let bad = dir.join("bad.hgrm");
    std::fs::write(&bad, "not a histogram\n").unwrap();
    let out = plot(&["-o", svg.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no percentile rows"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The plot's legend gives the percentiles relay-load's table gives. An
/// .hgrm row's percentile column is where its step ends, so the first row
/// at or past 99% can already hold the next, larger sample: with 990 of
/// 1,000 round trips at or under 33.9 ms and the last ten at 80 ms, the
/// legend said p99 80 where the table said 33.855. The legend now reads
/// the rows' counts, as the table's quantiles do.
#[test]
fn the_plots_p99_is_the_tables_p99() {
    let fake = fake(true, 10);
    let dir = temp_dir("plot-p99");
    let mut report = direct(&fake, 1);
    let mut h = relay_load::new_histogram();
    h.record_n(1_000, 989).unwrap();
    h.record(33_855).unwrap();
    h.record_n(80_127, 10).unwrap();
    report.rtt = h;
    report.write_hgrm(&dir).unwrap();
    let table = report.table();
    let p99 = table
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    assert_eq!(p99, "33.855", "{table}");
    let svg = dir.join("rtt.svg");
    let out = plot(&[
        "-o",
        svg.to_str().unwrap(),
        &format!("run={}", dir.join("rtt.hgrm").display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.contains("p50 1  p99 34  max 80"), "{text}");
}

/// An .hgrm file of a run that measured nothing (every stream failed: no
/// round trip) is said to be that, not "is it an .hgrm file?": relay-load
/// wrote it, with its header and `Total count = 0`.
#[test]
fn an_empty_hgrm_is_said_to_hold_no_samples() {
    let fake = fake(true, 10);
    let dir = temp_dir("plot-empty");
    let mut report = direct(&fake, 1);
    report.rtt = relay_load::new_histogram();
    report.write_hgrm(&dir).unwrap();
    let out = plot(&[
        "-o",
        dir.join("rtt.svg").to_str().unwrap(),
        dir.join("rtt.hgrm").to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rtt.hgrm: no samples (Total count = 0)"),
        "{err}"
    );
}

/// Streams sent with no credential at all (no `--relay-config`, `--tokens`
/// or `--key`, or `--auth none`) and refused with 401 get a hint that says
/// so. Before, the hint said the credentials were not the relay's and to
/// use the relay's own config file and secret, which sends someone who
/// forgot `--relay-config` looking at the wrong file.
#[test]
fn streams_sent_with_no_credential_are_told_so() {
    let fake = fake(true, 10);
    for (auth, credentials) in [
        (AuthVia::Header, Credentials::None),
        (AuthVia::None, Credentials::Fixed(KEY.to_string())),
    ] {
        let opts = LoadOptions {
            target: Target::direct(fake.addr()),
            auth,
            credentials,
            streams: 2,
            ramp_per_sec: 0.0,
            stream_seconds: 1.0,
            pace: Pace::Flood,
            duration: Duration::from_secs(30),
            threads: 1,
            progress: false,
            ..LoadOptions::default()
        };
        let r = relay_load::run(&opts).expect("load runs");
        let table = r.table();
        assert_eq!(r.failed_total(), 2, "{table}");
        let hints = r.hints();
        assert_eq!(hints.len(), 1, "{table}");
        assert!(
            hints[0].starts_with("2 streams refused with 401: relay-load sent no credential"),
            "{table}"
        );
    }
    // With a credential, a 401 is still said to be the wrong one.
    let opts = LoadOptions {
        target: Target::direct(fake.addr()),
        credentials: Credentials::Fixed("not-the-key".to_string()),
        streams: 1,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        pace: Pace::Flood,
        duration: Duration::from_secs(30),
        threads: 1,
        progress: false,
        ..LoadOptions::default()
    };
    let r = relay_load::run(&opts).expect("load runs");
    assert!(
        r.hints()
            .iter()
            .any(|h| h.contains("the credentials are not the relay's")),
        "{}",
        r.table()
    );
}

/// A target that is not a clio-relay (here a server that closes every
/// connection it takes, as nginx's `return 444` or a firewall would)
/// closing connections unanswered: the hint says what happened and what
/// it means if the target is a relay, without claiming it is one.
/// Before, it said "the relay closes a client that its server.allow does
/// not list" of any target, fake-soniox and nginx too, and told the user
/// to edit a relay's server.allow there was none of.
#[test]
fn a_target_that_closes_unanswered_is_not_called_a_relay() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                // Taken, then closed without a byte.
                drop(conn);
            }
        })
    };
    let opts = LoadOptions {
        target: Target::direct(addr),
        credentials: Credentials::Fixed(KEY.to_string()),
        streams: 3,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        duration: Duration::from_secs(30),
        threads: 1,
        ..LoadOptions::default()
    };
    let r = relay_load::run(&opts).expect("load runs");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(addr);
    server.join().unwrap();
    let table = r.table();
    assert_eq!(
        r.streams_failed.get("closed unanswered"),
        Some(&3),
        "{table}"
    );
    let hint = table
        .lines()
        .find(|l| l.starts_with("hint: 3 streams had their connection closed"))
        .unwrap_or_else(|| panic!("no hint: {table}"));
    assert!(
        hint.contains("the target (or a proxy or firewall on the way) took the connection")
            && hint.contains("If the target is a clio-relay")
            && !hint.contains("the relay closes"),
        "{hint}"
    );
}

/// Streams refused with 503 by a target that is no relay (fake-soniox
/// straight, `--direct`): at the upgrade and after it. The hints say what
/// the 503 means, and what it means from a clio-relay, without claiming
/// the target is one. Before, they said "the relay is at
/// server.max_streams or draining" and "the relay drained (SIGTERM, a
/// restart) or retired their key" of any target.
#[test]
fn a_503_from_a_target_that_is_no_relay_is_not_called_the_relays() {
    // Refused at the upgrade.
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey {
            reject: Some(503),
            ..FakeKey::new(KEY, 10)
        }],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let r = direct(&fake, 2);
    let table = r.table();
    let refused = r
        .streams_failed
        .get("http 503")
        .or(r.streams_failed.get("error 503"));
    assert_eq!(refused, Some(&2), "{table}");
    // Failed after the upgrade, at the first audio frame.
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        faults: fake_soniox::Faults {
            error_after_frames: Some((1, 503)),
            ..Default::default()
        },
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let r2 = direct(&fake, 2);
    let table2 = r2.table();
    assert_eq!(r2.streams_failed.get("error 503"), Some(&2), "{table2}");
    for (r, table) in [(&r, &table), (&r2, &table2)] {
        let hint = r
            .hints()
            .into_iter()
            .find(|h| h.contains("503"))
            .unwrap_or_else(|| panic!("no 503 hint: {table}"));
        assert!(hint.contains("a clio-relay"), "{hint}");
        assert!(
            !hint.contains("the relay is at") && !hint.contains("the relay drained"),
            "{hint}"
        );
    }
}

/// A refusal no hint explains (here fake-soniox's error 400 for a model
/// it does not have) is quoted in a hint line, as the JSON's
/// `refusal_reasons` has it. Before, the table said only `error 400: 2`,
/// with no hint: the reason was in the JSON alone.
#[test]
fn a_refusal_with_no_hint_of_its_own_is_quoted() {
    let fake = fake(true, 10);
    let opts = LoadOptions {
        target: Target::direct(fake.addr()),
        auth: AuthVia::Header,
        credentials: Credentials::Fixed(KEY.to_string()),
        streams: 2,
        ramp_per_sec: 0.0,
        stream_seconds: 1.0,
        pace: Pace::Flood,
        duration: Duration::from_secs(30),
        threads: 1,
        model: "no-such-model".into(),
        progress: false,
        ..LoadOptions::default()
    };
    let r = relay_load::run(&opts).expect("load runs");
    let table = r.table();
    assert_eq!(r.streams_failed.get("error 400"), Some(&2), "{table}");
    assert!(
        table.contains(
            "hint: 2 streams failed with error 400: the target answered \
             \"Invalid model: no-such-model.\" x2"
        ),
        "{table}"
    );
    assert_eq!(r.to_json()["hints"].as_array().unwrap().len(), 1, "{table}");
}
