//! What `relay-load` says about itself: `-V` and `--help`.
//!
//! Also why the workspace's `cargo test` builds this binary: a package's
//! binaries are built when it has integration tests, and the relay's own
//! tests run it from the same target directory.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_relay-load");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn names_itself_in_its_version() {
    let o = Command::new(BIN).arg("-V").output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("relay-load {}", env!("CARGO_PKG_VERSION"))
    );
    let help = text(&Command::new(BIN).arg("--help").output().unwrap());
    assert!(help.contains("Usage: relay-load"), "{help}");
}

/// Ctrl-C (SIGINT) in the middle of a run ends it with its report, as the
/// end of `--duration` would: the streams still running are cut, the
/// table and the `.hgrm` files cover the run until then, and the exit
/// status (130) says it was interrupted. Before, the process died with
/// nothing printed and no file written: a long profiling run stopped by
/// hand lost every number.
#[test]
fn sigint_ends_the_run_with_its_report() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    use std::time::Duration;
    const KEY: &str = "sigint-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let dir = std::env::temp_dir().join(format!("relay-load-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(BIN)
        .args(["--direct", "--key", KEY, "--target"])
        .arg(fake.addr().to_string())
        .args(["-n", "4", "--ramp", "0", "--stream-seconds", "120", "-q"])
        .arg("--hgrm-dir")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Every stream under way, its frames echoed.
    assert!(
        (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            fake.active_streams() >= 4
        }),
        "the streams did not start"
    );
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    let written = ["connect.hgrm", "rtt.hgrm"].map(|f| dir.join(f).is_file());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(written, [true, true], "{all}");
    assert_eq!(out.status.code(), Some(130), "{all}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("streams cut        4"), "{all}");
    let received = table
        .lines()
        .find_map(|l| l.strip_prefix("frames received"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(received.is_some_and(|n| n > 0), "{all}");
    assert!(all.contains("stopped by SIGINT"), "{all}");
}

/// An --hgrm-dir that cannot be made is said before the load, not after
/// it: no stream is opened. Before, the whole run went by and then
/// relay-load exited 1 with no report.
#[test]
fn an_hgrm_dir_that_cannot_be_made_is_said_before_the_load() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "hgrm-dir-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    // Under a regular file: no directory can be made there.
    let file = std::env::temp_dir().join(format!("relay-load-hgrm-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(BIN)
        .args(["--direct", "--key", KEY, "--target"])
        .arg(fake.addr().to_string())
        .args(["-n", "1", "--stream-seconds", "0.3", "--pace", "x4", "-q"])
        .arg("--hgrm-dir")
        .arg(file.join("runs"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("--hgrm-dir"), "{all}");
    assert!(fake.sessions().is_empty(), "a stream ran: {all}");
}

/// A relay whose admin port stops answering during the run (it crashed:
/// the very run whose numbers matter) costs the report its failover line,
/// not the report. Before, the second read of --relay-metrics failed and
/// relay-load exited 1 with no table at all.
#[test]
fn a_relay_metrics_port_gone_after_the_run_still_leaves_the_report() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    use std::io::{Read, Write};
    const KEY: &str = "metrics-gone-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    // An admin port that answers one /metrics, then is gone.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let once = std::thread::spawn(move || {
        let (mut c, _) = admin.accept().unwrap();
        let mut head = [0u8; 1024];
        let _ = c.read(&mut head);
        let body = "clio_relay_streams_resumed_total 0\n";
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let out = Command::new(BIN)
        .args(["--direct", "--key", KEY, "--target"])
        .arg(fake.addr().to_string())
        .args(["-n", "1", "--stream-seconds", "0.3", "--pace", "x4", "-q"])
        .arg("--relay-metrics")
        .arg(admin_addr.to_string())
        .output()
        .unwrap();
    once.join().unwrap();
    let all = text(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("streams ok         1"),
        "{all}"
    );
    assert!(all.contains("no relay failovers in the report"), "{all}");
    assert_eq!(out.status.code(), Some(0), "{all}");
}

/// A child process killed (by its own pid) if the test ends before it does.
struct Reaped(Option<std::process::Child>);

impl Reaped {
    fn running(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn take(&mut self) -> std::process::Child {
        self.0.take().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A relay, in this process, in front of `fake`, with one account on
/// `key`; its token secret is `secret`.
fn relay_in_front_of(
    fake: &fake_soniox::FakeSoniox,
    key: &str,
    secret: &str,
) -> (
    clio_relay::cli::server::RelayHandle,
    clio_relay::core::config::Config,
) {
    relay_in_front_of_with(fake, key, secret, |_| {})
}

/// [`relay_in_front_of`], its config changed by `tweak` first.
fn relay_in_front_of_with(
    fake: &fake_soniox::FakeSoniox,
    key: &str,
    secret: &str,
    tweak: impl FnOnce(&mut clio_relay::core::config::Config),
) -> (
    clio_relay::cli::server::RelayHandle,
    clio_relay::core::config::Config,
) {
    use clio_relay::core::config::{
        AccountConfig, AdminConfig, AuthMode, Config, LimitsConfig, ServerConfig, TokensConfig,
        UpstreamConfig,
    };
    use clio_relay::core::secret::Secret;
    let mut cfg = Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            shards: 1,
            max_streams: 10,
            max_streams_set: true,
            allow: Vec::new(),
            proxy_protocol_from: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: fake.url(),
            auth: AuthMode::Header,
            ca_file: None,
            connect_timeout: std::time::Duration::from_secs(5),
        },
        tokens: TokensConfig::new(Secret::new(secret)),
        limits: LimitsConfig::default(),
        accounts: vec![AccountConfig::new("acct-1", Secret::new(key))],
        admin: AdminConfig {
            state_dir: std::env::temp_dir()
                .join(format!("relay-load-cli-{}-{key}", std::process::id())),
            ..AdminConfig::default()
        },
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    };
    tweak(&mut cfg);
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    (relay, cfg)
}

/// The tokens relay-load mints from `--relay-config` live no longer than
/// its `tokens.max_ttl`, which the relay refuses past (401). They lived
/// the run's duration plus 10 minutes: through a relay with `max_ttl` of
/// 5 minutes, every stream was refused.
#[test]
fn tokens_minted_from_the_relay_config_live_within_its_max_ttl() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "max-ttl-key";
    const SECRET: &str = "a relay-load test's max_ttl secret, well over 32 bytes";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let (relay, cfg) = relay_in_front_of_with(&fake, KEY, SECRET, |c| {
        c.tokens.max_ttl = std::time::Duration::from_secs(300);
        c.tokens.default_ttl = std::time::Duration::from_secs(300);
    });
    let dir = cfg.admin.state_dir.join("relay-config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token-secret"), SECRET).unwrap();
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        "[tokens]\nsecret_file = \"token-secret\"\ndefault_ttl = \"5m\"\nmax_ttl = \"5m\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--target")
        .arg(relay.client_addr.to_string())
        .arg("--relay-config")
        .arg(&path)
        .args(["-n", "2", "--ramp", "0", "--stream-seconds", "1", "-q"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("streams started    2"), "{}", text(&out));
    assert!(table.contains("streams ok         2"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The relay's counters are read once the run's streams have ended at the
/// relay too, not the moment relay-load's own have: a run cut short
/// (`--duration`, Ctrl-C) leaves streams the relay is still ending, and
/// some of them resume on the way (a run stopped by SIGINT reported 29
/// resumes where /metrics, read a moment later, said 32). Here, through a
/// real relay, another client's stream opens during relay-load's run and
/// resumes after relay-load's own stream has ended (fake-soniox drops
/// every connection at its 30th audio frame; relay-load's stream has 20,
/// this one 30), then ends: relay-load waits for it and counts the resume.
/// Before, it read at once and reported none.
#[test]
fn relay_metrics_are_read_once_the_relays_streams_have_ended() {
    relay_load_counts_a_resume_after_its_run("metrics-settle-key", std::time::Duration::ZERO, "2");
}

/// The same with a resume whose new connection takes a second to open
/// (fake-soniox answers every upgrade 1 s late): meanwhile the relay
/// counts no upstream connection for the stream (`streams_active` is back
/// to its number before the run, in every read), but the stream is still
/// live (`streams_live`). relay-load read the counters in that gap,
/// before the resume was counted, and reported none; it now waits for
/// the relay's live streams.
#[test]
fn a_resume_that_reconnects_slowly_is_counted_too() {
    relay_load_counts_a_resume_after_its_run(
        "metrics-settle-slow-key",
        std::time::Duration::from_secs(1),
        "2.5",
    );
}

/// relay-load (one stream of `stream_seconds` through a real relay, with
/// `--relay-metrics`; under 3 s, so that fake-soniox does not drop it)
/// reports the resume of another client's stream that
/// the relay makes after relay-load's own stream has ended; each upstream
/// upgrade is answered `handshake_delay` late.
fn relay_load_counts_a_resume_after_its_run(
    key: &str,
    handshake_delay: std::time::Duration,
    stream_seconds: &str,
) {
    use clio_relay::core::token::TokenKeys;
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox, Faults};
    use std::time::{Duration, Instant, SystemTime};
    use tungstenite::Message;
    const DROP_AT: u32 = 30;
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(key, 10)],
        echo: true,
        faults: Faults {
            close_after_frames: Some(u64::from(DROP_AT)),
            handshake_delay,
            ..Faults::default()
        },
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let (relay, cfg) = relay_in_front_of(
        &fake,
        key,
        "a relay-load test's token secret, well over 32 bytes long",
    );
    let keys = TokenKeys::from_config(&cfg.tokens);
    let token = |device: &str| {
        keys.mint(device, Duration::from_secs(600), SystemTime::now())
            .unwrap()
    };
    let tokens = std::env::temp_dir().join(format!("relay-load-{key}-{}", std::process::id()));
    std::fs::write(&tokens, token("load")).unwrap();
    // `stream_seconds` of audio in frames of 100 ms, at real time.
    let child = Command::new(BIN)
        .arg("--target")
        .arg(relay.client_addr.to_string())
        .arg("--tokens")
        .arg(&tokens)
        .args([
            "-n",
            "1",
            "--stream-seconds",
            stream_seconds,
            "-q",
            "--json",
        ])
        .arg("--relay-metrics")
        .arg(relay.admin_addr.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaped(Some(child));
    let wait_until = |what: &str, done: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // relay-load's stream is open at the relay: its read before the run is done.
    wait_until("relay-load's stream did not open", &mut || {
        relay.metrics().active_streams() == 1
    });

    // This test's own stream through the relay: the config and 29 frames,
    // each answered (a final token each, so the relay's resume copy is
    // down to what comes next).
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/v1/transcribe", relay.client_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("test")).parse().unwrap(),
    );
    let tcp = std::net::TcpStream::connect(relay.client_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let (mut ws, _) = tungstenite::client::client(req, tcp).expect("the upgrade");
    let config = serde_json::json!({
        "model": "stt-rt-v4",
        "audio_format": "pcm_s16le",
        "sample_rate": 16000,
        "num_channels": 1,
    });
    ws.send(Message::text(config.to_string())).unwrap();
    let frame = |i: u32| -> Vec<u8> { (0..3200u32).map(|j| (j * 7 + i * 13) as u8).collect() };
    let mut finals = 0;
    let mut read_until = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
                          finals_wanted: usize,
                          finished: bool| loop {
        match ws.read().expect("the relay answers") {
            Message::Text(t) => {
                let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert!(m.get("error_code").is_none(), "{m}");
                finals += m["tokens"]
                    .as_array()
                    .map_or(0, |t| t.iter().filter(|t| t["is_final"] == true).count());
                if finals >= finals_wanted && (!finished || m["finished"] == true) {
                    return;
                }
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    };
    for i in 1..DROP_AT {
        ws.send(Message::binary(frame(i))).unwrap();
    }
    read_until(&mut ws, DROP_AT as usize - 1, false);
    // Both streams open at the relay: relay-load, reading until the
    // relay's streams open are back to none, waits for this one too.
    assert_eq!(
        relay.metrics().active_streams(),
        2,
        "relay-load's stream ended before this one opened: too short for this machine"
    );

    // relay-load's stream has ended at the relay. Before, relay-load read
    // the counters then and exited; now it waits for this stream too.
    wait_until("relay-load's stream did not end", &mut || {
        relay.metrics().active_streams() == 1 && fake.active_streams() == 1
    });
    let ended = Instant::now();
    while ended.elapsed() < Duration::from_millis(1500) && child.running() {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The 30th frame: fake-soniox drops the connection; the relay resumes
    // on a new one (sent only that frame again), and the stream ends.
    ws.send(Message::binary(frame(DROP_AT))).unwrap();
    ws.send(Message::binary(Vec::new())).unwrap();
    read_until(&mut ws, DROP_AT as usize, true);
    let _ = ws.close(None);
    while ws.read().is_ok() {}
    assert_eq!(relay.metrics().streams_resumed(), 1);

    let out = child.take().wait_with_output().unwrap();
    let _ = std::fs::remove_file(&tokens);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["streams_ok"], 1, "{all}");
    assert_eq!(json["relay_streams_resumed"], 1, "{all}");
    relay.shutdown();
    let _ = std::fs::remove_dir_all(&cfg.admin.state_dir);
}

/// With --json, a run stopped by a signal says so in the JSON itself
/// (`"stopped_by": "SIGTERM"`; null for a whole run), so a script that
/// bounds relay-load with `timeout` (SIGTERM) tells a cut run from a
/// whole one without reading stderr. Before, the JSON of a cut run looked
/// like that of a finished one.
#[test]
fn the_json_of_a_stopped_run_says_which_signal_stopped_it() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    use std::time::Duration;
    const KEY: &str = "sigterm-json-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let run = |stream_seconds: &str| {
        Command::new(BIN)
            .args(["--direct", "--key", KEY, "--target"])
            .arg(fake.addr().to_string())
            .args(["-n", "2", "--ramp", "0", "--pace", "x4", "-q", "--json"])
            .args(["--stream-seconds", stream_seconds])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let json = |out: &Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
    };
    let whole = run("0.5").wait_with_output().unwrap();
    assert_eq!(whole.status.code(), Some(0), "{}", text(&whole));
    assert!(json(&whole)["stopped_by"].is_null(), "{}", text(&whole));

    let child = run("600");
    assert!(
        (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            fake.active_streams() >= 2
        }),
        "the streams did not start"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let cut = child.wait_with_output().unwrap();
    assert_eq!(cut.status.code(), Some(143), "{}", text(&cut));
    let report = json(&cut);
    assert_eq!(report["stopped_by"], "SIGTERM", "{report}");
    assert_eq!(report["streams_cut"], 2, "{report}");
}

/// `--duration` shorter than one stream cuts the streams when it is over,
/// as the README says, rather than start none: before, `-n 2
/// --stream-seconds 30 --duration 2s` started no stream at all, printed a
/// table of zeros and exited 0, a "clean" run that measured nothing. A run
/// in which no stream could start (`--duration 0s`) is now exit 1.
#[test]
fn a_duration_shorter_than_a_stream_cuts_streams_rather_than_start_none() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "short-duration-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let run = |duration: &str| {
        Command::new(BIN)
            .args(["--direct", "--key", KEY, "--target"])
            .arg(fake.addr().to_string())
            .args(["-n", "2", "--ramp", "0", "--stream-seconds", "30", "-q"])
            .args(["--duration", duration])
            .output()
            .unwrap()
    };
    let short = run("2s");
    let table = String::from_utf8_lossy(&short.stdout).into_owned();
    assert!(table.contains("streams started    2"), "{}", text(&short));
    assert!(table.contains("streams cut        2"), "{}", text(&short));
    let received = table
        .lines()
        .find_map(|l| l.strip_prefix("frames received"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(received.is_some_and(|n| n > 0), "{}", text(&short));
    assert_eq!(short.status.code(), Some(0), "{}", text(&short));

    let none = run("0s");
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(text(&none).contains("no stream started"), "{}", text(&none));
}

/// A stream's length that is no length (`inf`, `nan`, `0`, below 0) is
/// refused on the command line, and a very long one (a stream to be cut
/// by --duration) runs. Before, `inf` or `1e300` aborted the run at its
/// first stream (the bitmap of its frames could not be allocated: exit
/// 134 and a backtrace), and `0` or `nan` ran one frame per stream.
#[test]
fn a_streams_length_is_a_positive_number_of_seconds() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "stream-seconds-key";
    for bad in ["inf", "nan", "0", "-1"] {
        let o = Command::new(BIN)
            .arg(format!("--stream-seconds={bad}"))
            .output()
            .unwrap();
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{bad}: {all}");
        assert!(all.contains("is not a length"), "{bad}: {all}");
    }
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let out = Command::new(BIN)
        .args(["--direct", "--key", KEY, "--target"])
        .arg(fake.addr().to_string())
        .args(["-n", "1", "--stream-seconds", "1e300", "--duration", "1s"])
        .args(["--pace", "x4", "-q", "--json"])
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["streams_cut"], 1, "{all}");
    assert!(json["frames_received"].as_u64() > Some(0), "{all}");
}

/// A ramp that is no rate (below 0, `nan`, not a number) is refused on
/// the command line (exit 2), as a stream's length that is no length is.
/// Before, `--ramp=-5` and `--ramp nan` ran, every stream opened at once
/// as with `--ramp 0`, and the run looked like the ramp it was not.
#[test]
fn a_ramp_is_a_rate_of_0_or_more() {
    for bad in ["-5", "nan", "fast"] {
        let o = Command::new(BIN)
            .arg(format!("--ramp={bad}"))
            .args(["--target", "127.0.0.1:9", "-n", "1", "-q"])
            .output()
            .unwrap();
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{bad}: {all}");
        assert!(all.contains("is not a ramp"), "{bad}: {all}");
    }
}

/// A count of 0 (`-n 0`, `--concurrency 0`, `--frame-ms 0`,
/// `--sample-rate 0`) is refused on the command line with exit 2, as
/// every other bad argument is; before, the run started and failed with
/// exit 1 ("no streams asked for"), `--concurrency 0` until its fix too.
#[test]
fn a_count_of_zero_is_a_bad_argument() {
    for (flag, value) in [
        ("-n", "0"),
        ("--concurrency", "0"),
        ("--frame-ms", "0"),
        ("--sample-rate", "0"),
    ] {
        let o = Command::new(BIN)
            .args([flag, value])
            .args(["--target", "127.0.0.1:9", "-q"])
            .output()
            .unwrap();
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {all}");
        assert!(
            all.contains("is not a whole number of 1 or more"),
            "{flag} {value}: {all}"
        );
    }
}

/// A locked-memory limit under glommio's minimum ended a run with
/// "load executor failed: IO error occurred: MemLockLimit(65536/524288)";
/// it now says which limit, what is needed and where to raise it.
#[test]
fn a_locked_memory_limit_too_low_is_named() {
    let o = Command::new("sh")
        .args(["-c", "ulimit -l 64 && exec \"$0\" \"$@\""])
        .arg(BIN)
        .args(["--url", "ws://127.0.0.1:9/x", "-n", "1", "--duration", "1s"])
        .output()
        .unwrap();
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains("(`ulimit -l`) is 64 KiB: glommio needs at least 512 KiB")
            && all.contains("`ulimit -l 262144` in a shell"),
        "{all}"
    );
}

/// Each mode prints the measures that mean something in it, in the
/// table, the JSON and the progress line: `cycles/s` (churn's rate of
/// whole cycles) only in churn mode; `idle streams held` only in idle
/// mode; no frame counts, frames/s or round trips in idle mode, which
/// sends no audio. Before, every JSON report had `cycles_per_sec` and
/// `idle_held` (a stream run's "cycles" are its streams over the run's
/// length, not a rate of anything), and an idle run's table, JSON and
/// progress line showed frames and round trips it never measured (all 0).
#[test]
fn each_mode_prints_only_its_own_measures() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "per-mode-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let run = |mode: &[&str], json: bool| {
        let out = Command::new(BIN)
            .args(["--direct", "--key", KEY, "--target"])
            .arg(fake.addr().to_string())
            .args(["-n", "2", "--ramp", "0", "--threads", "1"])
            .args(mode)
            .args(if json { &["--json"][..] } else { &[][..] })
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        out
    };
    let keys = |out: &Output| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)));
        v.as_object().unwrap().keys().cloned().collect()
    };
    let audio = [
        "frames_sent",
        "frames_received",
        "lost",
        "duplicated",
        "reordered",
        "unexpected_tokens",
        "frames_per_sec",
        "rtt",
    ];
    let stream = ["--stream-seconds", "1", "--pace", "x4"];
    let churn = ["--churn", "--concurrency", "2", "--duration", "1s"];
    let idle = ["--idle", "--duration", "2s", "--keepalive-every", "500ms"];
    for (name, mode, has, lacks) in [
        (
            "stream",
            &stream[..],
            &audio[..],
            &["cycles_per_sec", "idle_held"][..],
        ),
        (
            "churn",
            &churn[..],
            &[&audio[..], &["cycles_per_sec"]].concat()[..],
            &["idle_held"][..],
        ),
        (
            "idle",
            &idle[..],
            &["idle_held", "connect"][..],
            &[&audio[..], &["cycles_per_sec"]].concat()[..],
        ),
    ] {
        let out = run(mode, true);
        let keys = keys(&out);
        for k in has {
            assert!(
                keys.iter().any(|x| x == k),
                "{name}: no {k}: {}",
                text(&out)
            );
        }
        for k in lacks {
            assert!(!keys.iter().any(|x| x == k), "{name}: {k}: {}", text(&out));
        }
    }

    let table = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let out = run(&stream, false);
    let t = table(&out);
    assert!(
        t.contains("\nrtt ") && t.contains("\nframes/s "),
        "{}",
        text(&out)
    );
    assert!(
        !t.contains("cycles/s") && !t.contains("idle streams held"),
        "{t}"
    );
    let out = run(&churn, false);
    assert!(table(&out).contains("\ncycles/s "), "{}", text(&out));
    let out = run(&idle, false);
    let t = table(&out);
    assert!(t.contains("\nidle streams held  2"), "{}", text(&out));
    for absent in [
        "rtt",
        "frames",
        "lost",
        "duplicated",
        "reordered",
        "unexpected",
        "cycles/s",
    ] {
        assert!(!t.contains(absent), "idle table: {absent}: {t}");
    }
    // Its progress lines (stderr, one a second) count streams only.
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        progress.contains("] open 2 done 0 failed 0 cut 0"),
        "{progress}"
    );
    assert!(
        !progress.contains("frames/s") && !progress.contains("rtt"),
        "{progress}"
    );
}

/// An idle run with --hgrm-dir wrote an `rtt.hgrm` with no samples (idle
/// streams send no audio: no round trip), which `tools/plot-hgrm.py` then
/// refused as empty. Each mode now writes the histograms it measured: a
/// stream or churn run connect.hgrm and rtt.hgrm, an idle run connect.hgrm
/// only, and it removes the rtt.hgrm an earlier run left in the same
/// directory, which would pass for this run's.
#[test]
fn each_mode_writes_only_the_histograms_it_measured() {
    use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
    const KEY: &str = "hgrm-mode-key";
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 10)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let dir = std::env::temp_dir().join(format!("relay-load-hgrm-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |mode: &[&str]| {
        let out = Command::new(BIN)
            .args(["--direct", "--key", KEY, "--target"])
            .arg(fake.addr().to_string())
            .args(["-n", "2", "--ramp", "0", "--threads", "1", "-q"])
            .args(mode)
            .arg("--hgrm-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{mode:?}: {}", text(&out));
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let stream = ["--stream-seconds", "1", "--pace", "x4"];
    let churn = ["--churn", "--concurrency", "2", "--duration", "1s"];
    let idle = ["--idle", "--duration", "2s", "--keepalive-every", "500ms"];
    assert_eq!(run(&stream), ["connect.hgrm", "rtt.hgrm"]);
    let idle_files = run(&idle);
    let connect = std::fs::read_to_string(dir.join("connect.hgrm")).unwrap();
    assert_eq!(idle_files, ["connect.hgrm"]);
    // Its 2 streams' connect times.
    assert!(
        connect.contains("Total count    =            2]"),
        "{connect}"
    );
    assert_eq!(run(&churn), ["connect.hgrm", "rtt.hgrm"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A wait of 0 (`--timeout 0s`) or a keepalive interval of 0
/// (`--keepalive-every 0s`) is refused on the command line (exit 2).
/// Before, `--timeout 0s` ran and failed every stream with "connect
/// timeout" (exit 3, no hint), and an idle run with `--keepalive-every
/// 0s` sent keepalives as fast as the socket took them (4.9 MB from one
/// stream in 2 s), its stream then cut.
#[test]
fn a_wait_or_keepalive_interval_of_zero_is_a_bad_argument() {
    for (flag, value) in [
        ("--timeout", "0s"),
        ("--timeout", "0ms"),
        ("--keepalive-every", "0s"),
    ] {
        let o = Command::new(BIN)
            .args([flag, value])
            .args(["--target", "127.0.0.1:9", "-n", "1", "-q"])
            .output()
            .unwrap();
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {all}");
        assert!(
            all.contains("is not a wait: a duration above 0"),
            "{flag} {value}: {all}"
        );
    }
    let o = Command::new(BIN)
        .args(["--timeout", "soon", "--target", "127.0.0.1:9", "-q"])
        .output()
        .unwrap();
    let all = text(&o);
    assert_eq!(o.status.code(), Some(2), "{all}");
    assert!(all.contains("is not a duration"), "{all}");
}

/// `-n` with `--churn`, or `--concurrency` without it, is said to be
/// ignored (stderr): each applies to its own modes only, and the run
/// goes on with what does. Before, both were dropped unsaid: `--churn -n
/// 200` ran the default 50 workers, and `--concurrency 200` with
/// real-time streams ran the default 10.
#[test]
fn streams_and_concurrency_given_where_they_do_not_apply_are_said() {
    for (args, said) in [
        (
            &["--churn", "-n", "5", "--duration", "1s"][..],
            "relay-load: -n 5 is ignored: a --churn run has --concurrency workers (50)",
        ),
        (
            &["--concurrency", "5", "-n", "2"],
            "relay-load: --concurrency 5 is ignored: it is --churn's; this run opens -n streams (2)",
        ),
        (
            &["--idle", "--concurrency", "5", "-n", "2", "--duration", "1s"],
            "relay-load: --concurrency 5 is ignored",
        ),
        (
            &["--keepalive-every", "1s", "-n", "1", "--stream-seconds", "1"],
            "relay-load: --keepalive-every is ignored: it is --idle's",
        ),
        (
            &["--idle", "--pace", "x4", "-n", "1", "--duration", "1s"],
            "relay-load: --pace is ignored: an --idle run sends no audio",
        ),
        (
            &["--idle", "--loop", "-n", "1", "--duration", "1s"],
            "relay-load: --loop is ignored: an --idle run sends no audio",
        ),
        (
            &["--churn", "--stream-seconds", "3", "--duration", "1s"],
            "relay-load: --stream-seconds is ignored: a --churn cycle sends one frame",
        ),
    ] {
        let o = Command::new(BIN)
            .args(args)
            .args(["--target", "127.0.0.1:9", "-q"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(said), "{args:?}: {err}");
    }
    // Given where it applies: nothing said.
    let o = Command::new(BIN)
        .args(["--churn", "--concurrency", "2", "--duration", "1s"])
        .args(["--target", "127.0.0.1:9", "-q"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("ignored"), "{err}");
}
