//! Socket activation end to end: a child process gets listening sockets the
//! way systemd passes them (fds 3 and 4, `LISTEN_FDS`, `LISTEN_FDNAMES`,
//! and `LISTEN_PID` set to the child's own pid by an `exec`ing shell), takes
//! them with `clio_relay::cli::systemd::listen_fds` and accepts on them.
//!
//! The child is this test binary again, running only [`child`], selected by
//! `CLIO_RELAY_ACTIVATION_CHILD`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = "CLIO_RELAY_ACTIVATION_CHILD";

/// In the child: take the sockets, check them, accept one connection on
/// each and answer it. Does nothing in a normal test run.
#[test]
fn child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let got = clio_relay::cli::systemd::listen_fds().expect("listen_fds");
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert!(std::env::var_os(k).is_none(), "{k} left in the environment");
    }
    if mode == "expect-none" {
        assert!(got.is_empty());
        println!("CHILD-EMPTY");
        return;
    }
    let client = got.client.expect("a client socket");
    let admin = got.admin.expect("an admin socket");
    let client_addr = clio_relay::cli::systemd::local_addr(&client).unwrap();
    let admin_addr = clio_relay::cli::systemd::local_addr(&admin).unwrap();
    println!("CHILD-ADDRS client={client_addr} admin={admin_addr}");
    for (name, fd) in [("client", client), ("admin", admin)] {
        let l = TcpListener::from(fd);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut s, _) = loop {
            match l.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{name}: accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.write_all(format!("hello from {name}\n").as_bytes())
            .unwrap();
    }
    println!("CHILD-OK");
}

/// Spawns the child with `fds` on 3, 4, … as systemd would.
fn spawn_child(mode: &str, fds: &[RawFd], names: &str, pid: Option<&str>) -> std::process::Child {
    let me = std::env::current_exe().unwrap();
    // LISTEN_PID must be the pid of the process that reads it: the shell's
    // $$, kept by `exec`.
    let script = match pid {
        None => r#"LISTEN_PID=$$ exec "$@""#.to_string(),
        Some(p) => format!(r#"LISTEN_PID={p} exec "$@""#),
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg("sh")
        .arg(me)
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fds = fds.to_vec();
    // SAFETY: only fcntl/dup2 between fork and exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{fcntl, FcntlArg};
            // First above the target range (a source may sit on 3 or 4, and
            // dup2 onto itself would keep FD_CLOEXEC), then into place.
            let mut high = Vec::with_capacity(fds.len());
            for &fd in &fds {
                high.push(fcntl(fd, FcntlArg::F_DUPFD(64))?);
            }
            for (i, &fd) in high.iter().enumerate() {
                nix::unistd::dup2(fd, 3 + i as RawFd)?;
                nix::unistd::close(fd)?;
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn greet(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_child_accepts_on_the_sockets_it_was_passed() {
    let client = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client_addr, admin_addr) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
    // Passed in the other order: the names decide.
    let child = spawn_child(
        "accept",
        &[admin.as_raw_fd(), client.as_raw_fd()],
        "admin:client",
        None,
    );
    // The parent keeps its copies open, as systemd does; the child's accept
    // serves connections made now.
    assert_eq!(greet(client_addr), "hello from client\n");
    assert_eq!(greet(admin_addr), "hello from admin\n");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "CHILD-ADDRS client={client_addr} admin={admin_addr}"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("CHILD-OK"), "{stdout}");
}

#[test]
fn sockets_meant_for_another_pid_are_left_alone() {
    let client = TcpListener::bind("127.0.0.1:0").unwrap();
    let child = spawn_child("expect-none", &[client.as_raw_fd()], "client", Some("1"));
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CHILD-EMPTY"), "{stdout}");
}
