//! Graceful drain and zero-downtime restart.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clio_relay::systemd::Activated;
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
        assert!(wait_until(Duration::from_secs(5), || http(
            relay.handle.admin_addr,
            "GET",
            "/healthz",
            None,
            None
        )
        .0 == 503));
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

#[test]
fn a_restart_on_a_shared_socket_refuses_nothing_and_loses_nothing() {
    let fake = fake(&["k1"], |_| {});
    // The socket systemd would hold across the restart.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let fd: OwnedFd = socket.into();
    let activated = || Activated {
        client: Some(fd.try_clone().unwrap()),
        admin: None,
    };
    let cfg = relay_config(&fake.url(), &[("a", "k1")]);
    let old = clio_relay::server::start_with(&cfg, activated()).unwrap();
    let tokens = clio_relay::token::TokenKeys::from_config(&cfg.tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let token = tokens
                .mint(
                    &format!("d{i}"),
                    Duration::from_secs(600),
                    std::time::SystemTime::now(),
                )
                .unwrap();
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = match connect(addr, &token, Via::Header) {
                        Ok((mut ws, _)) => {
                            let got = stream_session(
                                &mut ws,
                                &config_message(None),
                                &audio_frames(3, i as u8),
                            );
                            got.finished() && got.close_code() == Some(1000)
                        }
                        Err(_) => false,
                    };
                    if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The new process takes the same socket, then the old one drains.
    let new = clio_relay::server::start_with(&cfg, activated()).unwrap();
    let started = Instant::now();
    let before = done.load(Ordering::Relaxed);
    assert_eq!(
        old.drain(Duration::from_secs(5)),
        0,
        "every old stream finished in time"
    );
    old.shutdown();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        done.load(Ordering::Relaxed) > before,
        "streams went on during the restart ({:?})",
        started.elapsed()
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "a refused or broken stream across the restart"
    );
    assert!(
        new.metrics().streams_total() > 0,
        "the new process took streams"
    );
    // Every session the fake saw got all of its audio and finished.
    assert!(fake
        .sessions()
        .iter()
        .all(|s| s.audio_frames == 3 && s.empty_frame_received));
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
