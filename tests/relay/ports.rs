//! A second relay started with the same config must not join the first
//! one's ports by accident; a hand-over restart joins the client port only
//! when asked to.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// A config file for the `clio-relay` binary with these ports.
fn config_file(upstream: &str, client: SocketAddr, admin: SocketAddr, tag: &str) -> String {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{client}\"\nadmin_listen = \"{admin}\"\nshards = 1\n\
             [upstream]\nurl = \"{upstream}\"\n[tokens]\nsecret_env = \"PORTS_TEST_SECRET\"\n\
             [admin]\nstate_dir = \"{}\"\nhealth_interval = \"0s\"\n\
             [[account]]\nid = \"second\"\nkey_env = \"PORTS_TEST_KEY\"\n",
            dir.display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn relay_binary(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clio-relay"));
    c.args(args)
        .env("PORTS_TEST_SECRET", "s".repeat(40))
        .env("PORTS_TEST_KEY", "k1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs the binary to its exit; one still running after 30 s has joined
/// the ports (the bug this file pins) and is killed, failing the test.
fn exits(mut c: Command) -> (Option<i32>, String) {
    let mut child = c.spawn().unwrap();
    let done = wait_until(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    if !done {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(done, "the second relay started and kept running");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn accounts_total(admin: SocketAddr) -> String {
    let (status, _, body) = http_get(admin, "/metrics", "");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with("clio_relay_accounts_total"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_second_relay_on_the_same_ports_exits_naming_the_port() {
    let fake = fake(&["k1"], |_| {});
    let first = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (client, admin) = (first.addr(), first.handle.admin_addr);
    let before = accounts_total(admin);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for (tag, c, a, key, port) in [
        ("same", client, admin, "server.listen", client),
        ("admin", any, admin, "server.admin_listen", admin),
    ] {
        let cfg = config_file(&fake.url(), c, a, tag);
        let (code, err) = exits(relay_binary(&["run", "--config", &cfg]));
        assert_eq!(code, Some(4), "{tag}: {err}");
        assert!(
            err.contains(&format!("{key} {port} is already in use")),
            "{tag}: {err}"
        );
    }
    // The first relay still has its ports to itself.
    for _ in 0..8 {
        assert_eq!(accounts_total(admin), before);
    }
}

#[test]
fn join_client_port_shares_the_client_port_but_never_the_admin_port() {
    let fake = fake(&["k1"], |_| {});
    let first = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let client = first.addr();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Joining the client port does not let it share the admin port.
    let cfg = config_file(&fake.url(), client, first.handle.admin_addr, "join-admin");
    let (code, err) = exits(relay_binary(&[
        "run",
        "--join-client-port",
        "--config",
        &cfg,
    ]));
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("server.admin_listen"), "{err}");
    // With its own admin port, it joins the client port (a hand-over).
    let mut cfg = relay_config(&fake.url(), &[("b", "k1")]);
    cfg.server.listen = client;
    cfg.server.admin_listen = any;
    let e = clio_relay::cli::server::start(&cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let second = clio_relay::cli::server::start_joining(&cfg, Default::default(), true).unwrap();
    assert_eq!(second.client_addr, client);
    // The first one leaves; the second serves the port alone.
    first.handle.drain(Duration::from_millis(100));
    drop(first);
    let token = {
        let keys = clio_relay::core::token::TokenKeys::from_config(&cfg.tokens);
        keys.mint(
            "phone",
            Duration::from_secs(60),
            std::time::SystemTime::now(),
        )
        .unwrap()
    };
    // The first one's listener is closed asynchronously (an io_uring poll
    // holds it a moment), so a connection may still be reset until it is.
    let served = wait_until(Duration::from_secs(20), || {
        connect(client, &token, Via::Header).is_ok_and(|(mut ws, _)| {
            stream_session(&mut ws, &config_message(None), &audio_frames(2, 1)).finished()
        })
    });
    assert!(served);
    assert!(second.metrics().streams_total() >= 1);
}

#[test]
fn a_restart_binds_the_ports_its_predecessor_just_left() {
    let fake = fake(&["k1"], |_| {});
    // Two free ports, then a relay process on them.
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (client, admin) = (free(), free());
    let cfg = config_file(&fake.url(), client, admin, "restart");
    // Ready when it says READY=1 (a port that answers a connect may still
    // be the last process's listener, for a few milliseconds after it exits).
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = || {
        let mut child = relay_binary(&["run", "--config", &cfg])
            .env("NOTIFY_SOCKET", &sock_path)
            .spawn()
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            match notify.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => break,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    panic!("not ready: {:?}", child.wait_with_output());
                }
            }
        }
        child
    };
    let stop = |child: std::process::Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}: {err}", out.status);
    };
    let first = start();
    // A finished stream and an admin request leave the relay's ends of those
    // connections in TIME_WAIT on its ports.
    let keys = clio_relay::core::token::TokenKeys::from_config(
        &clio_relay::core::config::TokensConfig::new(clio_relay::core::secret::Secret::new(
            "s".repeat(40),
        )),
    );
    let token = keys
        .mint(
            "phone",
            Duration::from_secs(60),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let (mut ws, _) = connect(client, &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
    drop(ws);
    accounts_total(admin);
    stop(first);
    // The next process binds the same ports at once.
    stop(start());
}

/// Relays before the port check (commit 57b106a, 2026-12-02) bound their
/// ports with glommio's `bind`: `SO_REUSEPORT`, no `SO_REUSEADDR`. Their
/// ends of the connections they closed first (an admin request, a health
/// check, a stream) stay bound to the port in `TIME_WAIT` with those
/// options for up to a minute after the relay exits, and the kernel
/// refuses a bind with `SO_REUSEADDR` alone there. An upgrade from such a
/// relay (stop it, start the new one, without the socket units) found
/// both ports "already in use, probably by a running clio-relay" and
/// exited 4, which the systemd unit does not restart. The new relay must
/// start on them.
#[test]
fn a_relay_starts_on_ports_an_older_relay_left_in_time_wait() {
    use std::io::{BufRead, BufReader, Read};
    let fake = fake(&["k1"], |_| {});
    // A port as the older relay left it: its listener (glommio's options)
    // and one connection it closed first, then the listener closed.
    let left_by_older_relay = || {
        let sk = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sk.set_reuse_port(true).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        sk.bind(&any.into()).unwrap();
        sk.listen(16).unwrap();
        let l: std::net::TcpListener = sk.into();
        let addr = l.local_addr().unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        drop(c);
        drop(l);
        addr
    };
    let (client, admin) = (left_by_older_relay(), left_by_older_relay());
    let cfg = config_file(&fake.url(), client, admin, "after-older");
    let mut child = relay_binary(&["run", "--config", &cfg]).spawn().unwrap();
    let mut said = Vec::new();
    let listening = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .inspect(|l| said.push(l.clone()))
        .any(|l| l.contains("clio-relay listening"));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        listening,
        "the relay exited ({status}): {}",
        said.join("\n")
    );
}
