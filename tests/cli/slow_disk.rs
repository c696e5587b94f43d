//! A slow disk under a running relay, made with strace: every fsync of
//! the relay held for seconds, as a network file system or a failing
//! drive holds it.

use std::io::Read as _;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clio_relay::control::httpc::{blocking, Endpoint, Request};

use crate::util::*;

/// How long strace holds each fsync: longer than the watchdog's check may
/// take with `WatchdogSec=2s` (keep-alives every second, so a check has
/// under 2 s).
const FSYNC_DELAY: Duration = Duration::from_secs(5);

/// Kills (and reaps) a child process when the test ends, passed or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether every thread of `pid` is traced (strace has attached to all).
fn all_threads_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .is_some_and(|v| v.trim() != "0")
        })
    })
}

/// An admin thread inside an fsync that takes longer than the watchdog
/// allows is waiting on the disk, not hung: the watchdog keeps the relay
/// alive (`WATCHDOG=1`, with a status that says it waits on the disk)
/// rather than have systemd kill it, and every stream with it, to meet the
/// same disk again. Before, the check failed ("watchdog: no answer from
/// admin") and no keep-alive went until the write ended: past
/// `WatchdogSec=`, systemd would have killed the relay.
#[test]
fn an_admin_thread_waiting_on_a_slow_disk_keeps_the_watchdog_fed() {
    const ADMIN: &str = "cli-exit-admin-token-0123456789";
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is not installed (.ci/run installs it)");
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-slow-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let file = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        file.replace("[admin]\n", "[admin]\nhealth_interval = \"0s\"\n"),
    )
    .unwrap();
    let sock_path = dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&sock_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut relay = relay_run(&config);
    relay
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut relay = Reaped(relay.spawn().unwrap());
    wait_listening(admin, &mut relay.0);
    let pid = relay.0.id();
    let mut buf = [0u8; 1024];
    let mut recv = |systemd: &UnixDatagram| {
        systemd
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // The watchdog runs: a keep-alive before the disk turns slow.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no keep-alive from the relay");
        if recv(&systemd).is_some_and(|m| m.starts_with("WATCHDOG=1")) {
            break;
        }
    }

    // From now on every fsync and fdatasync of every thread takes 5 s.
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=fsync,fdatasync",
        ])
        .arg("-e")
        .arg(format!(
            "inject=fsync,fdatasync:delay_enter={}",
            FSYNC_DELAY.as_micros()
        ))
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !all_threads_traced(pid) {
        if let Some(status) = strace.try_wait().unwrap() {
            let mut err = String::new();
            strace.stderr.take().unwrap().read_to_string(&mut err).ok();
            eprintln!("skipped: strace cannot trace the relay here ({status}): {err}");
            return;
        }
        assert!(Instant::now() < deadline, "strace never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    let strace = Reaped(strace);

    // A revocation: the admin thread writes revocations.json, fsyncing
    // the file and its directory, 10 s in all.
    let revoke = std::thread::spawn(move || {
        let req = Request::new("POST", "/admin/revocations")
            .bearer(ADMIN)
            .header("Content-Type", "application/json")
            .body(br#"{"device_id":"stolen-phone"}"#);
        blocking::send(&Endpoint::plain(admin), &req, Duration::from_secs(60))
            .map(|r| (r.status, r.text()))
            .map_err(|e| e.to_string())
    });
    let mut kept_alive_on_disk = Vec::new();
    let mut failed = Vec::new();
    while !revoke.is_finished() {
        let Some(msg) = recv(&systemd) else { continue };
        if msg.contains("STATUS=watchdog:") {
            failed.push(msg);
        } else if msg.starts_with("WATCHDOG=1") && msg.contains("waiting on the disk") {
            kept_alive_on_disk.push(msg);
        }
    }
    let answer = revoke.join().unwrap();
    drop(strace);
    assert_eq!(
        answer.as_ref().map(|(status, _)| *status),
        Ok(200),
        "{answer:?}"
    );
    assert!(failed.is_empty(), "the watchdog gave up: {failed:?}");
    assert!(
        !kept_alive_on_disk.is_empty(),
        "no keep-alive said the admin thread waits on the disk"
    );
    // The relay is whole: the admin port answers again.
    let req = Request::new("GET", "/healthz");
    let health = blocking::send(&Endpoint::plain(admin), &req, Duration::from_secs(20))
        .map(|r| r.status)
        .map_err(|e| e.to_string());
    assert_eq!(health, Ok(200));
    // SAFETY: a signal to the relay this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert!(relay.0.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}
