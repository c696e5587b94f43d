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

/// A relay under a slow disk, with systemd's notify socket and watchdog.
struct SlowDisk {
    dir: std::path::PathBuf,
    admin: std::net::SocketAddr,
    systemd: UnixDatagram,
    relay: Reaped,
    strace: Option<Reaped>,
}

impl SlowDisk {
    /// A relay with `WatchdogSec=2s`, once it has sent a keep-alive, with
    /// every fsync and fdatasync of every thread held [`FSYNC_DELAY`]
    /// from then on. `None` (said) where strace cannot trace it.
    fn start(name: &str) -> Option<SlowDisk> {
        if Command::new("strace").arg("-V").output().is_err() {
            panic!("strace is not installed (.ci/run installs it)");
        }
        let dir = std::env::temp_dir().join(format!("clio-relay-{name}-{}", std::process::id()));
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
        let mut disk = SlowDisk {
            dir,
            admin,
            systemd,
            relay,
            strace: None,
        };
        // The watchdog runs: a keep-alive before the disk turns slow.
        disk.wait_for("a keep-alive", |m| m.starts_with("WATCHDOG=1"));
        let pid = disk.relay.0.id();
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
                return None;
            }
            assert!(Instant::now() < deadline, "strace never attached");
            std::thread::sleep(Duration::from_millis(20));
        }
        disk.strace = Some(Reaped(strace));
        Some(disk)
    }

    /// The next notification, if one comes within 200 ms.
    fn recv(&self) -> Option<String> {
        let mut buf = [0u8; 1024];
        self.systemd
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits (20 s at most) for a notification that `is` says is `what`.
    fn wait_for(&self, what: &str, is: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no {what} from the relay");
            if self.recv().is_some_and(|m| is(&m)) {
                return;
            }
        }
    }

    /// A revocation on a thread of its own: the admin thread writes
    /// revocations.json, fsyncing the file and its directory, 10 s in all.
    fn revoke(&self) -> std::thread::JoinHandle<Result<(u16, String), String>> {
        const ADMIN: &str = "cli-exit-admin-token-0123456789";
        let admin = self.admin;
        std::thread::spawn(move || {
            let req = Request::new("POST", "/admin/revocations")
                .bearer(ADMIN)
                .header("Content-Type", "application/json")
                .body(br#"{"device_id":"stolen-phone"}"#);
            blocking::send(&Endpoint::plain(admin), &req, Duration::from_secs(60))
                .map(|r| (r.status, r.text()))
                .map_err(|e| e.to_string())
        })
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: a signal to the relay this test started.
        unsafe { libc::kill(self.relay.0.id() as libc::pid_t, sig) };
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        // strace first: it lets go of the relay, which may then be killed.
        self.strace.take();
        std::fs::remove_dir_all(&self.dir).ok();
    }
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
    let Some(mut disk) = SlowDisk::start("slow-disk-watchdog") else {
        return;
    };
    let revoke = disk.revoke();
    let mut kept_alive_on_disk = Vec::new();
    let mut failed = Vec::new();
    while !revoke.is_finished() {
        let Some(msg) = disk.recv() else { continue };
        if msg.contains("STATUS=watchdog:") {
            failed.push(msg);
        } else if msg.starts_with("WATCHDOG=1") && msg.contains("waiting on the disk") {
            kept_alive_on_disk.push(msg);
        }
    }
    let answer = revoke.join().unwrap();
    disk.strace.take();
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
    let health = blocking::send(&Endpoint::plain(disk.admin), &req, Duration::from_secs(20))
        .map(|r| r.status)
        .map_err(|e| e.to_string());
    assert_eq!(health, Ok(200));
    disk.signal(libc::SIGTERM);
    assert!(disk.relay.0.wait().unwrap().success());
}

/// A SIGHUP while the admin thread is inside a slow write waits for it
/// (the admin thread applies reloads), but a SIGTERM after it does not
/// wait for the reload: the relay says STOPPING=1 and drains at once, and
/// exits once the write has ended. Before, the main thread waited for the
/// reload's answer and took no signal until the write ended.
#[test]
fn a_sigterm_during_a_reload_held_by_a_slow_disk_is_taken_at_once() {
    let Some(mut disk) = SlowDisk::start("slow-disk-reload") else {
        return;
    };
    let revoke = disk.revoke();
    // The admin thread is inside the write: the watchdog says so.
    disk.wait_for("keep-alive waiting on the disk", |m| {
        m.starts_with("WATCHDOG=1") && m.contains("waiting on the disk")
    });
    disk.signal(libc::SIGHUP);
    disk.wait_for("RELOADING=1", |m| m.contains("RELOADING=1"));
    disk.signal(libc::SIGTERM);
    disk.wait_for("STOPPING=1", |m| m.contains("STOPPING=1"));
    assert!(
        !revoke.is_finished(),
        "STOPPING=1 came only after the slow write had ended"
    );
    let answer = revoke.join().unwrap();
    assert_eq!(
        answer.as_ref().map(|(status, _)| *status),
        Ok(200),
        "{answer:?}"
    );
    disk.strace.take();
    assert!(disk.relay.0.wait().unwrap().success());
}
