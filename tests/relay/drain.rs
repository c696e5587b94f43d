//! Graceful drain and zero-downtime restart.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use clio_relay::cli::systemd::Activated;
use tungstenite::Message;

use crate::util::*;

#[test]
fn drain_finalizes_live_streams_then_asks_clients_to_reconnect() {
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let token = relay.token("phone");
    // A stream in the middle of its audio: 10 frames sent, more would come.
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(10, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 10));
    let handle = &relay.handle;
    let cut = std::thread::scope(|s| {
        let d = s.spawn(|| handle.drain(Duration::from_millis(300)));
        // While draining: healthz says so, and no new stream is taken.
        assert!(healthz_turns_503(relay.handle.admin_addr));
        // Without socket activation the client port closes: new connections
        // are refused (README, "Draining").
        assert!(wait_until(Duration::from_secs(5), || {
            std::net::TcpStream::connect(relay.addr()).is_err()
        }));
        d.join().unwrap()
    });
    assert_eq!(cut, 1);
    let got = read_all(&mut ws);
    // The final tokens came first (the finalize's `<fin>`), then the 503 and 1012.
    let fin = got.messages.iter().position(|m| {
        m["tokens"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"))
    });
    let err = got.messages.iter().position(|m| m["error_code"] == 503);
    assert!(fin.is_some() && err.is_some() && fin < err, "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
    assert!(fake.sessions()[0]
        .text_messages
        .iter()
        .any(|t| t.contains("finalize")));
    assert!(
        std::net::TcpStream::connect(relay.addr()).is_err(),
        "the listener is closed"
    );
}

/// A client that sent a finalize of its own earlier (and got its `<fin>`)
/// still gets the drain's final tokens: the drain waits for the `<fin>`
/// that answers its own finalize, not for any the stream ever saw.
#[test]
fn a_drain_after_a_clients_own_finalize_still_delivers_its_final_tokens() {
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(20, 1);
    let has_fin = |m: &serde_json::Value| {
        m["tokens"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"))
    };
    for f in &frames[..10] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::text(r#"{"type":"finalize"}"#)).unwrap();
    loop {
        match ws.read().unwrap() {
            Message::Text(t) if has_fin(&serde_json::from_str(&t).unwrap()) => break,
            _ => {}
        }
    }
    // A second of audio not final yet when the drain comes.
    for f in &frames[10..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 20));
    assert_eq!(relay.handle.drain(Duration::from_millis(300)), 1);
    let got = read_all(&mut ws);
    let fin = got.messages.iter().position(has_fin);
    let err = got.messages.iter().position(|m| m["error_code"] == 503);
    assert!(fin.is_some() && err.is_some() && fin < err, "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
}

/// A compressed-audio stream's drain ends on the `<fin>` answering its
/// finalize however upstream's writes cut the messages: the `<fin>` result
/// in two writes (cut inside `<fin>`), or with another result after it in
/// the same write. The finalize wait is 30 s here: a `<fin>` the relay did
/// not count would hold the stream that long, past the client's 15 s read
/// timeout, and the 503 and close 1012 would not come.
#[test]
fn a_compressed_streams_drain_ends_on_its_fin_however_upstream_cuts_it() {
    use fake_soniox::FinDelivery;
    for delivery in [FinDelivery::Split, FinDelivery::Trailed] {
        let fake = fake(&["k1"], |c| c.faults.fin_delivery = delivery);
        let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
        cfg.limits.finalize_wait = Duration::from_secs(30);
        let relay = Relay::start(cfg);
        let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = "ogg".into();
        ws.send(Message::text(config.to_string())).unwrap();
        for f in audio_frames(10, 1) {
            ws.send(Message::binary(f)).unwrap();
        }
        assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
            && s[0].audio_frames == 10));
        let handle = &relay.handle;
        let (got, cut) = std::thread::scope(|s| {
            let d = s.spawn(|| handle.drain(Duration::from_millis(300)));
            (read_all(&mut ws), d.join().unwrap())
        });
        assert_eq!(cut, 1, "{delivery:?}");
        let has_fin = |m: &serde_json::Value| {
            m["tokens"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"))
        };
        let fin = got.messages.iter().position(has_fin);
        let err = got.messages.iter().position(|m| m["error_code"] == 503);
        assert!(
            fin.is_some() && err.is_some() && fin < err,
            "{delivery:?}: {got:?}"
        );
        if delivery == FinDelivery::Trailed {
            // The result after the `<fin>` was forwarded too.
            let next = &got.messages[fin.unwrap() + 1];
            assert_eq!(next["tokens"], serde_json::json!([]), "{got:?}");
        }
        assert_eq!(got.close_code(), Some(1012), "{delivery:?}: {got:?}");
        assert!(fake.sessions()[0]
            .text_messages
            .iter()
            .any(|t| t.contains("finalize")));
    }
}

#[test]
fn a_stream_still_opening_at_the_drain_deadline_is_drained_too() {
    // Upstream answers each upgrade 2 s late; the drain's 300 ms deadline
    // passes while this stream still waits for it.
    let fake = fake(&["k1"], |c| {
        c.faults.handshake_delay = Duration::from_secs(2)
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(10, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    let live = || relay.account_live(0);
    assert!(wait_until(Duration::from_secs(10), || live() == 1));
    assert_eq!(relay.handle.drain(Duration::from_millis(300)), 1);
    // Once open, it is finalized and told to reconnect like any other:
    // it does not stream on past the drain.
    let got = read_all(&mut ws);
    assert_eq!(
        (got.error_code(), got.close_code()),
        (Some(503), Some(1012)),
        "{got:?}"
    );
    assert_eq!(relay.handle.process.live_streams(), 0);
}

#[test]
fn a_restart_on_a_shared_socket_refuses_nothing_and_loses_nothing() {
    use relay_load::{self, AuthVia, Credentials, LoadOptions, Pace, Target};
    // Echo mode: relay-load then checks every frame comes back once, in order.
    let fake = fake(&["k1"], |c| c.echo = true);
    // The socket systemd would hold across the restart.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let fd: OwnedFd = socket.into();
    let activated = || Activated {
        client: Some(fd.try_clone().unwrap()),
        admin: None,
    };
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 100;
    let old = clio_relay::cli::server::start_with(&cfg, activated()).unwrap();
    let keys = Arc::new(clio_relay::core::token::TokenKeys::from_config(&cfg.tokens));
    let load = std::thread::spawn(move || {
        relay_load::run(&LoadOptions {
            target: Target::relay(addr),
            auth: AuthVia::Header,
            credentials: Credentials::Mint(keys, Duration::from_secs(600)),
            streams: 8,
            ramp_per_sec: 100.0,
            stream_seconds: 1.0,
            pace: Pace::Times(4.0),
            repeat: true,
            duration: Duration::from_secs(4),
            threads: 1,
            ..LoadOptions::default()
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1000));
    // The new process takes the same socket, then the old one drains.
    let new = clio_relay::cli::server::start_with(&cfg, activated()).unwrap();
    let old_total = old.metrics().streams_total();
    assert_eq!(
        old.drain(Duration::from_secs(5)),
        0,
        "every old stream finished in time"
    );
    old.shutdown();
    let report = load.join().unwrap();
    let summary = report.table();
    assert!(
        report.streams_failed.is_empty(),
        "a refused or broken stream across the restart:\n{summary}"
    );
    assert_eq!(
        (report.lost, report.duplicated, report.reordered),
        (0, 0, 0),
        "{summary}"
    );
    assert!(
        report.streams_ok > old_total,
        "streams completed on both sides of the restart:\n{summary}"
    );
    assert!(
        new.metrics().streams_total() > 0,
        "the new process took streams"
    );
}

#[test]
fn the_binary_speaks_sd_notify_and_drains_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let fake = fake(&["k1"], |_| {});
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n[upstream]\nurl = \"{}\"\n[tokens]\nsecret_env = \"NOTIFY_TEST_SECRET\"\n[admin]\nstate_dir = \"{}\"\n[[account]]\nid = \"a\"\nkey_env = \"NOTIFY_TEST_KEY\"\n", fake.url(), dir.display()),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("NOTIFY_TEST_SECRET", "x".repeat(40))
        .env("NOTIFY_TEST_KEY", "k1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut until = |what: &str| {
        let mut buf = [0u8; 512];
        while !seen.contains(what) {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|_| panic!("no {what} in {seen:?}"));
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    until("READY=1");
    until("WATCHDOG=1");
    until("STATUS=0 live streams");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    until("RELOADING=1");
    until("MONOTONIC_USEC=");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    until("STOPPING=1");
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

/// relay-load through a relay that drains: each stream gets its final
/// tokens up to `<fin>`, then 503 and close 1012. The report counts the
/// streams as told to reconnect, and `<fin>` (Soniox's marker, not a
/// word) as no "unexpected token": before, it counted one per stream and
/// hinted that upstream was not an echoing fake-soniox, which it was.
#[test]
fn relay_load_reads_a_drains_fin_as_a_marker_not_a_stray_word() {
    let report = drained_load(3);
    let summary = report.table();
    assert_eq!(
        report.streams_failed.get("error 503"),
        Some(&3),
        "{summary}"
    );
    assert_eq!(report.unexpected, 0, "{summary}");
    assert!(!summary.contains("--echo"), "{summary}");
}

/// The same drained run's report explains its "error 503" streams: they
/// were told to reconnect, and why that happens. Before, the table said
/// "streams failed 3 (error 503: 3)" and no hint.
#[test]
fn relay_load_explains_streams_a_drain_told_to_reconnect() {
    let report = drained_load(2);
    let summary = report.table();
    assert_eq!(
        report.streams_failed.get("error 503"),
        Some(&2),
        "{summary}"
    );
    assert!(
        summary.contains("hint: 2 streams were told to reconnect")
            && summary.contains("a clio-relay does so when it drains"),
        "{summary}"
    );
}

/// relay-load's report of `streams` real-time streams through a relay
/// in front of an echoing fake, drained once every stream is under way
/// upstream with audio echoed.
fn drained_load(streams: usize) -> relay_load::LoadReport {
    use relay_load::{self, AuthVia, Credentials, LoadOptions, Pace, Target};
    let fake = fake(&["k1"], |c| c.echo = true);
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let keys = Arc::new(clio_relay::core::token::TokenKeys::from_config(
        &relay.cfg.tokens,
    ));
    let addr = relay.addr();
    let load = std::thread::spawn(move || {
        relay_load::run(&LoadOptions {
            target: Target::relay(addr),
            auth: AuthVia::Header,
            credentials: Credentials::Mint(keys, Duration::from_secs(600)),
            streams,
            ramp_per_sec: 0.0,
            stream_seconds: 30.0,
            pace: Pace::Times(1.0),
            duration: Duration::from_secs(60),
            threads: 1,
            ..LoadOptions::default()
        })
        .unwrap()
    });
    assert!(wait_until(Duration::from_secs(10), || fake
        .active_streams()
        == streams));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        relay.handle.drain(Duration::from_millis(100)) as usize,
        streams
    );
    load.join().unwrap()
}

/// Connections the relay accepted before its drain closed the listener
/// are served, not refused, while the drain's streams run: one whose
/// upgrade request comes only once the drain has begun (token on the
/// request), and one upgraded before it whose token comes in its first
/// message after. Before, both were refused once `/healthz` turned 503
/// (HTTP 503; 503 with close 1012), though the kernel had handed them to
/// the relay, so a restart refused streams: relay-load saw `http 503` at
/// hand-overs under churn. (A drain with no stream left answers them at
/// once: see the next test.)
#[test]
fn connections_accepted_before_a_drain_are_served_not_refused() {
    use tungstenite::client::IntoClientRequest;
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let token = relay.token("phone");
    // A stream that runs through the drain: the drain waits for it.
    let (mut running, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    running.send(Message::text(config_message(None))).unwrap();
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1));
    // Upgraded, its token still to come in its first message.
    let (mut late_token, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    // Connected, its request not sent yet, and taken off the accept queue.
    let tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || accept_queue(
        relay.addr()
    ) == Some(0)));
    let handle = &relay.handle;
    let cut = std::thread::scope(|s| {
        let d = s.spawn(|| handle.drain(Duration::from_secs(30)));
        assert!(healthz_turns_503(relay.handle.admin_addr));
        let mut req = format!("ws://{}/v1/transcribe", relay.addr())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tungstenite::client::client(req, tcp)
            .unwrap_or_else(|e| panic!("refused during the drain: {e:?}"));
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
        assert!(got.finished(), "token on the request: {got:?}");
        let got = stream_session(
            &mut late_token,
            &config_message(Some(&token)),
            &audio_frames(3, 2),
        );
        assert!(got.finished(), "token in the first message: {got:?}");
        assert!(!d.is_finished(), "the drain ended with a stream live");
        running.send(Message::binary(Vec::<u8>::new())).unwrap();
        let got = read_all(&mut running);
        assert!(got.finished(), "the running stream: {got:?}");
        d.join().unwrap()
    });
    assert_eq!(cut, 0, "the streams ended on their own");
    assert_eq!(fake.sessions().len(), 3);
}

/// The connections waiting in the accept queue of the listeners on
/// `addr`'s port (the kernel's `rx_queue` of a listening socket), or None
/// when nothing listens there.
/// Whether `/healthz` on the admin port `admin` turns 503 (a drain began)
/// within 10 s.
fn healthz_turns_503(admin: std::net::SocketAddr) -> bool {
    wait_until(Duration::from_secs(10), || {
        http(admin, "GET", "/healthz", None, None).0 == 503
    })
}

fn accept_queue(addr: std::net::SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{:04X}", addr.port());
    let mut queued = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local address, remote, state (0A: listening), tx_queue:rx_queue
        if f.len() > 4 && f[1].ends_with(&port) && f[3] == "0A" {
            let rx = f[4].split(':').nth(1).unwrap();
            *queued.get_or_insert(0) += u64::from_str_radix(rx, 16).unwrap();
        }
    }
    queued
}

/// SIGINT stops at once (README, "Runbook"), a drain under way too: an
/// operator who sent SIGTERM and will not wait for `limits.drain_timeout`
/// presses Ctrl-C. Before, the drain held the thread that waits for
/// signals, so SIGINT (and a second SIGTERM, a SIGHUP) went unseen until
/// the drain ended: here, an hour. The live stream is not finalized: it
/// ends at once through its own end, told to reconnect (Soniox's 503,
/// close 1012), so its usage is recorded (tests/relay/usage.rs).
#[test]
fn sigint_stops_a_draining_relay_at_once() {
    use std::io::BufRead;
    // Nothing ends the stream on its own: only the drain, or the stop.
    let fake = fake(&["k1"], |c| c.idle_timeout = Duration::from_secs(3600));
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n[upstream]\nurl = \"{}\"\n[tokens]\nsecret_env = \"SIGINT_TEST_SECRET\"\n[limits]\ndrain_timeout = \"1h\"\nidle_timeout = \"1h\"\n[admin]\nstate_dir = \"{}\"\nhealth_interval = \"0s\"\n[[account]]\nid = \"a\"\nkey_env = \"SIGINT_TEST_KEY\"\n", fake.url(), dir.display()),
    )
    .unwrap();
    let secret = "x".repeat(40);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clio-relay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("SIGINT_TEST_SECRET", &secret)
        .env("SIGINT_TEST_KEY", "k1")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let listening = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay logs its addresses");
        if line.contains("clio-relay listening") {
            break line;
        }
    };
    let (client, admin) = (
        listening_addr(&listening, "client"),
        listening_addr(&listening, "admin"),
    );
    let keys = clio_relay::core::token::TokenKeys::from_config(
        &clio_relay::core::config::TokensConfig::new(clio_relay::core::secret::Secret::new(secret)),
    );
    let token = keys
        .mint(
            "phone",
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let (mut ws, _) = connect(client, &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 3));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(healthz_turns_503(admin));
    sigint_and_reap(&mut child, "SIGINT left the relay draining");
    // Ended at once: no finalize went up, and the client is told to
    // reconnect.
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s[0].closed));
    let upstream = &fake.sessions()[0].text_messages;
    assert!(
        !upstream.iter().any(|m| m.contains("finalize")),
        "{upstream:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// What a drain's cut stream has, and what it must send again (README,
/// "Draining"): every word of the audio that went up before the
/// finalize, with `total_audio_proc_ms` saying how much that was; audio
/// the client sends after it is not forwarded. So a client that keeps
/// its recent audio resends what came after that point on its new
/// stream, and loses no word.
#[test]
fn a_drained_stream_is_told_how_much_audio_was_transcribed() {
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(10, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 10));
    let handle = &relay.handle;
    std::thread::scope(|s| {
        let d = s.spawn(|| handle.drain(Duration::from_millis(100)));
        // The finalize's answer: the words so far, up to `<fin>`.
        let fin = loop {
            let Message::Text(t) = ws.read().unwrap() else {
                continue;
            };
            let m: serde_json::Value = serde_json::from_str(&t).unwrap();
            let is_fin = m["tokens"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["text"] == "<fin>"));
            if is_fin {
                break m;
            }
        };
        // 10 frames of 100 ms went up before the finalize.
        assert_eq!(fin["total_audio_proc_ms"], 1000, "{fin}");
        // Audio sent now is too late: it is not forwarded.
        for f in audio_frames(3, 2) {
            if ws.send(Message::binary(f)).is_err() {
                break;
            }
        }
        let rest = read_all(&mut ws);
        assert_eq!(
            (rest.error_code(), rest.close_code()),
            (Some(503), Some(1012)),
            "{rest:?}"
        );
        assert_eq!(d.join().unwrap(), 1);
    });
    assert_eq!(fake.sessions()[0].audio_frames, 10);
}

/// A drain waits for the streams it has, not for connections that carry
/// none (README, "Draining"): three silent connections (one accepted
/// that sent nothing, one upgraded whose token is to come in its first
/// message, one upgraded with its token on the request) do not hold it.
/// While the real stream runs they are left alone; once it ends, the
/// drain ends, and each gets the answer of a relay that is restarting:
/// HTTP 503 before the upgrade, Soniox's 503 and close 1012 after it.
/// Before, the drain waited for them until `limits.handshake_timeout`
/// and `limits.idle_timeout` (here 20 s) ended them with 408s.
#[test]
fn a_drain_ends_with_its_streams_and_answers_the_silent_connections() {
    use std::io::Read;
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.handshake_timeout = Duration::from_secs(20);
    cfg.limits.idle_timeout = Duration::from_secs(20);
    let relay = Relay::start(cfg);
    let token = relay.token("phone");
    // The real stream: its config and some audio are up.
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 3));
    // The silent ones.
    let (mut no_token, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let (mut no_config, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let mut no_head = std::net::TcpStream::connect(relay.addr()).unwrap();
    no_head
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || accept_queue(
        relay.addr()
    ) == Some(0)));
    let handle = &relay.handle;
    std::thread::scope(|s| {
        let d = s.spawn(|| handle.drain(Duration::from_secs(3600)));
        assert!(healthz_turns_503(relay.handle.admin_addr));
        // The stream goes on during the drain, and the drain waits for it.
        for f in audio_frames(3, 2) {
            ws.send(Message::binary(f)).unwrap();
        }
        assert!(fake.wait_for(Duration::from_secs(10), |s| s[0].audio_frames == 6));
        assert!(!d.is_finished(), "the drain ended with a stream live");
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
        let got = read_all(&mut ws);
        assert!(got.finished(), "the stream ran to its own end: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{got:?}");
        assert_eq!(d.join().unwrap(), 0, "no stream was cut");
    });
    // Each silent connection was answered when the drain ended.
    let mut head = String::new();
    no_head.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 503 "), "{head:?}");
    assert!(head.contains("reconnect"), "{head:?}");
    for (name, ws) in [
        ("token to come", &mut no_token),
        ("no config", &mut no_config),
    ] {
        let got = read_all(ws);
        assert_eq!(
            (got.error_code(), got.close_code()),
            (Some(503), Some(1012)),
            "{name}: {got:?}"
        );
    }
}

/// Runs a drain while `stream` (begun, its config and audio up) is live,
/// ends the stream, and returns once the drain did: it waited for the
/// stream alone, cut none, and the connections without a stream are
/// answered as it ends.
fn drain_while(relay: &Relay, fake: &fake_soniox::FakeSoniox, mut send: impl FnMut(Message)) {
    let handle = &relay.handle;
    std::thread::scope(|s| {
        let d = s.spawn(|| handle.drain(Duration::from_secs(3600)));
        assert!(healthz_turns_503(relay.handle.admin_addr));
        send(Message::binary(audio_frames(1, 9).remove(0)));
        assert!(fake.wait_for(Duration::from_secs(10), |s| s[0].audio_frames == 4));
        assert!(!d.is_finished(), "the drain ended with a stream live");
        send(Message::binary(Vec::<u8>::new()));
        assert_eq!(d.join().unwrap(), 0, "no stream was cut");
    });
}

/// A connection still in its TLS handshake on a `[tls]` client port does
/// not hold a drain, and is closed, with no answer (there is no HTTP to
/// answer in yet), when the drain's streams end: one that sent half its
/// ClientHello, and one that sent all of it and got the relay's answer
/// but never finished. Each counts as a 503 of the relay's own.
/// `limits.handshake_timeout` (2 min) is past the test's reads (15 s):
/// the close is the drain's.
#[test]
fn a_drain_closes_the_connections_still_in_their_tls_handshake() {
    use std::io::{Read, Write};
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.limits.handshake_timeout = Duration::from_secs(120);
    });
    let at = relay.addr();
    let mut ws = crate::tls::wss_connect(at, &ca, &relay.token("phone")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.flush().unwrap();
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 3));
    // A ClientHello as a real client sends it.
    let client_hello = || {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert!(hello.len() > 100, "{}", hello.len());
        hello
    };
    let connect = || {
        let tcp = std::net::TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        tcp
    };
    let mut half = connect();
    let hello = client_hello();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    let mut unfinished = connect();
    unfinished.write_all(&client_hello()).unwrap();
    // The relay's ServerHello: it is waiting for the client's Finished.
    let mut first = [0u8; 5];
    unfinished.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 22, "a TLS handshake record: {first:?}");
    assert!(wait_until(Duration::from_secs(10), || accept_queue(at) == Some(0)));
    let before = relay.handle.metrics();
    drain_while(&relay, &fake, |m| {
        ws.send(m).unwrap();
        ws.flush().unwrap();
    });
    let got = read_all_tls(&mut ws);
    assert!(got.contains("\"finished\":true"), "{got}");
    for (name, tcp) in [
        ("half a ClientHello", &mut half),
        ("unfinished", &mut unfinished),
    ] {
        let mut rest = Vec::new();
        match tcp.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{name}: not closed by the drain: {e}"),
        }
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/"),
            "{name}: no HTTP before the handshake: {rest:?}"
        );
    }
    let after = relay.handle.metrics();
    use clio_relay::core::metrics::{RefusedBy, Side};
    assert_eq!(
        after.errors(Side::Internal, 503) - before.errors(Side::Internal, 503),
        2
    );
    assert_eq!(
        after.refusals(RefusedBy::Relay) - before.refusals(RefusedBy::Relay),
        2
    );
}

/// A stop with no stream live (SIGINT, or a relay embedded and shut
/// down) closes the connections still in their TLS handshake: one that
/// sent half its ClientHello, one that got the relay's answer and never
/// finished, and one that sent nothing yet. Their tasks were left on the
/// shard's executor when its thread ended, their sockets registered with
/// the shard's ring, which nothing closed then: each stayed open, and so
/// did the client listener (its poll's removal never completed), taking
/// connections nobody would answer. `limits.handshake_timeout` (2 min) is
/// past the test's reads (15 s): the close is the stop's.
#[test]
fn a_stop_closes_the_connections_still_in_their_tls_handshake() {
    use std::io::{Read, Write};
    let fake = fake(&["k1"], |_| {});
    let (relay, _ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.limits.handshake_timeout = Duration::from_secs(120);
    });
    let at = relay.addr();
    let hello = {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    };
    let connect = || {
        let tcp = std::net::TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        tcp
    };
    let mut half = connect();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    let mut unfinished = connect();
    unfinished.write_all(&hello).unwrap();
    let mut first = [0u8; 5];
    unfinished.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 22, "a TLS handshake record: {first:?}");
    let mut silent = connect();
    assert!(wait_until(Duration::from_secs(10), || accept_queue(at) == Some(0)));
    let stopped = std::thread::spawn(move || relay.handle.shutdown());
    for (name, tcp) in [
        ("half a ClientHello", &mut half),
        ("unfinished", &mut unfinished),
        ("silent", &mut silent),
    ] {
        let mut rest = Vec::new();
        match tcp.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{name}: not closed by the stop: {e}"),
        }
    }
    stopped.join().unwrap();
    // The listener is closed too: a connection is refused, not queued.
    let late = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(5));
    assert!(
        late.is_err(),
        "the client port still listens after the stop"
    );
}

/// The text of every message until the connection ends.
fn read_all_tls<S: std::io::Read + std::io::Write>(ws: &mut tungstenite::WebSocket<S>) -> String {
    let mut text = String::new();
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            text.push_str(&t);
        }
    }
    text
}

/// A connection from a balancer in `server.proxy_protocol_from` still
/// sending its PROXY header does not hold a drain, and gets HTTP 503
/// "reconnect" when the drain's streams end: a v1 header cut before its
/// CRLF, and a v2 header cut inside its address block. Each counts as a
/// 503 of the relay's own. `limits.handshake_timeout` (2 min) is past the
/// test's reads (15 s): the answer is the drain's.
#[test]
fn a_drain_answers_the_connections_still_sending_their_proxy_header() {
    use std::io::Write;
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.limits.handshake_timeout = Duration::from_secs(120);
    let relay = Relay::start(cfg);
    let at = relay.addr();
    let v2 = crate::proxy_protocol::v2("192.0.2.7:5000".parse().unwrap());
    let mut ws = crate::proxy_protocol::ws_after(at, &v2, &relay.token("phone"));
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1
        && s[0].audio_frames == 3));
    let mut v1_part = crate::proxy_protocol::from([127, 0, 0, 1], at);
    v1_part
        .write_all(b"PROXY TCP4 192.0.2.8 10.0.0.1 5000")
        .unwrap();
    let mut v2_part = crate::proxy_protocol::from([127, 0, 0, 1], at);
    v2_part.write_all(&v2[..v2.len() - 5]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || accept_queue(at) == Some(0)));
    let before = relay.handle.metrics();
    drain_while(&relay, &fake, |m| ws.send(m).unwrap());
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    for (name, tcp) in [("v1", &mut v1_part), ("v2", &mut v2_part)] {
        let (status, text) = crate::proxy_protocol::answer(tcp);
        assert_eq!(status, 503, "{name}: {text:?}");
        assert!(text.contains("reconnect"), "{name}: {text:?}");
    }
    let after = relay.handle.metrics();
    use clio_relay::core::metrics::{RefusedBy, Side};
    assert_eq!(
        after.errors(Side::Internal, 503) - before.errors(Side::Internal, 503),
        2
    );
    assert_eq!(
        after.refusals(RefusedBy::Relay) - before.refusals(RefusedBy::Relay),
        2
    );
}

/// A stream still opening its first upstream connection (upstream takes
/// the connection and never answers its upgrade) when the relay stops:
/// the stop does not wait for the connect. The client is told to
/// reconnect (Soniox's 503, close 1012) as a drain tells it, not cut; the
/// stream never reached upstream, so it has no usage, as a refused one
/// has none. Before, the stop dropped the connection unanswered.
#[test]
fn a_stop_tells_a_stream_still_opening_upstream_to_reconnect() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        upstream.local_addr().unwrap()
    );
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = held.clone();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(conn) = conn else { return };
            kept.lock().unwrap().push(conn);
        }
    });
    let mut cfg = relay_config(&url, &[("a", "k1")]);
    cfg.upstream.connect_timeout = Duration::from_secs(120);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    assert!(wait_until(Duration::from_secs(10), || !held
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(relay.handle.process.live_streams(), 1);
    relay.handle.shutdown();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
}

/// As above, for a stream whose connection failed mid-stream and whose
/// resume is opening a new one (upstream takes the connection and never
/// answers its upgrade) when the relay stops: a live stream, told to
/// reconnect as every live stream is (503, close 1012), not that its
/// upstream connection was lost (close 1011).
#[test]
fn a_stop_tells_a_stream_still_resuming_to_reconnect() {
    let faults = only_first_connection_fails(fake_soniox::FaultKind::Drop, 6, |n| n == 6);
    let fake = fake(&["k1"], |c| c.faults.random = Some(faults));
    // The first connection goes through; the resume's is held unanswered.
    let (url, held) = door_with(
        &fake.url(),
        |n| {
            if n == 0 {
                Entry::Pipe
            } else {
                Entry::Hold
            }
        },
    );
    let mut cfg = relay_config(&url, &[("a", "k1")]);
    cfg.upstream.connect_timeout = Duration::from_secs(120);
    // The usage reconciliation would reach the door too (its REST base).
    cfg.usage.reconcile_interval = Duration::ZERO;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    let frames = audio_frames(10, 5);
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames[..5] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    // Upstream's first word: the stream is accepted, the drop to come is
    // mid-stream.
    assert!(matches!(ws.read().unwrap(), Message::Text(_)));
    for f in &frames[5..] {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    // The first connection dropped, and the resume's is at the door.
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert!(wait_until(Duration::from_secs(10), || !held
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(relay.handle.process.live_streams(), 1);
    relay.handle.shutdown();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(503), "{got:?}");
    assert_eq!(got.close_code(), Some(1012), "{got:?}");
}

/// A stop with a stream live (SIGINT) waits for the connections its
/// streams leave: here a wss:// client that stopped reading, its socket
/// full, whose stream the stop ends. Its 503 and close wait their 1 s and
/// its usage is recorded; then its close_notify waits 1 s more, after the
/// record. The stop waited only for the records, so the shard stopped
/// while that write waited: its task was left on the stopped executor,
/// the socket open (held by the relay, not closed) until the process
/// exited. As for any connection a stop leaves (one accepted as the stop
/// begins, answered 503 as a drain answers it), the stop now waits for
/// it, and the data plane closes it.
#[test]
fn a_stop_with_live_streams_waits_for_their_connections_to_close() {
    let fake = fake(&["k1"], |c| c.echo = true);
    let (relay, ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.limits.socket_buffer = 16 << 10;
        c.limits.idle_timeout = Duration::from_secs(600);
        c.limits.stall_timeout = Duration::from_secs(600);
    });
    let at = relay.addr();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&at.into()).unwrap();
    let tcp: std::net::TcpStream = sock.into();
    let ours = (at, tcp.local_addr().unwrap());
    let mut ws = crate::tls::wss_connect_with(at, &ca, &relay.token("phone"), tcp).unwrap();
    ws.get_mut()
        .sock
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    // Small frames, each answered with a larger result, and nothing read:
    // the relay's socket to the client fills.
    for _ in 0..3000 {
        if ws.send(Message::binary(vec![7u8; 16])).is_err() {
            break;
        }
    }
    let mut last = 0;
    let full = wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(300));
        let (unsent, _, _) = crate::sockets::socket_state(ours.0, ours.1);
        let steady = unsent > 0 && unsent == last;
        last = unsent;
        steady
    });
    assert!(full, "the relay's socket to the client never filled");
    relay.handle.shutdown();
    // Closed by the relay (no file holds it; its FIN may wait behind what
    // the client never read). Once the shards have stopped, the kernel
    // lets go of their rings' last references a moment later.
    let closed = wait_until(Duration::from_secs(10), || {
        !matches!(crate::sockets::tcp_socket(ours.0, ours.1), Some((_, true)))
    });
    assert!(
        closed,
        "the relay's socket to the client is still open after the stop: {:?}",
        crate::sockets::tcp_socket(ours.0, ours.1)
    );
}
