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

/// The relay's admin token (`relay_config`'s).
const ADMIN: &str = "cli-exit-admin-token-0123456789";

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
    client: std::net::SocketAddr,
    systemd: UnixDatagram,
    relay: Reaped,
    strace: Option<Reaped>,
}

impl SlowDisk {
    /// A relay with `WatchdogSec=2s`, once it has sent a keep-alive, with
    /// every fsync and fdatasync of every thread held [`FSYNC_DELAY`]
    /// from then on. `None` (said) where strace cannot trace it.
    fn start(name: &str) -> Option<SlowDisk> {
        SlowDisk::start_with(name, |config| config)
    }

    /// [`SlowDisk::start`] with the config file's text passed through
    /// `edit` first.
    fn start_with(name: &str, edit: impl Fn(String) -> String) -> Option<SlowDisk> {
        if Command::new("strace").arg("-V").output().is_err() {
            panic!("strace is not installed (.ci/run installs it)");
        }
        let dir = std::env::temp_dir().join(format!("clio-relay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let admin = free_port();
        let client = free_port();
        let config = relay_config(&dir, &client.to_string(), &admin.to_string());
        let file = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            edit(file.replace("[admin]\n", "[admin]\nhealth_interval = \"0s\"\n")),
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
            client,
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

    /// A revocation on a thread of its own: the relay writes
    /// revocations.json, fsyncing the file and its directory, 10 s in all.
    fn revoke(&self) -> std::thread::JoinHandle<Result<(u16, String), String>> {
        self.revoke_device("stolen-phone")
    }

    /// [`SlowDisk::revoke`] of device `id`.
    fn revoke_device(&self, id: &str) -> std::thread::JoinHandle<Result<(u16, String), String>> {
        let admin = self.admin;
        let body = format!(r#"{{"device_id":"{id}"}}"#);
        std::thread::spawn(move || {
            let req = Request::new("POST", "/admin/revocations")
                .bearer(ADMIN)
                .header("Content-Type", "application/json")
                .body(body.as_bytes());
            blocking::send(&Endpoint::plain(admin), &req, Duration::from_secs(60))
                .map(|r| (r.status, r.text()))
                .map_err(|e| e.to_string())
        })
    }

    /// Waits (20 s at most) until a thread of the relay is inside an
    /// fsync strace holds.
    fn wait_in_fsync(&self, pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !a_thread_in_fsync(pid) {
            assert!(Instant::now() < deadline, "no write reached the disk");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The notifications that come until [`SlowDisk::revoke`]'s answer,
    /// which must be a 200.
    fn notes_until_answered(
        &self,
        revoke: std::thread::JoinHandle<Result<(u16, String), String>>,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        while !revoke.is_finished() {
            notes.extend(self.recv());
        }
        let answer = revoke.join().unwrap();
        assert_eq!(
            answer.as_ref().map(|(status, _)| *status),
            Ok(200),
            "{answer:?}"
        );
        notes
    }

    /// `GET /healthz`'s status, if it comes within `wait`.
    fn health(&self, wait: Duration) -> Result<u16, String> {
        let req = Request::new("GET", "/healthz");
        blocking::send(&Endpoint::plain(self.admin), &req, wait)
            .map(|r| r.status)
            .map_err(|e| e.to_string())
    }

    /// Whether `revocations.json` holds [`SlowDisk::revoke`]'s device.
    fn revoked_on_disk(&self) -> bool {
        std::fs::read_to_string(self.dir.join("state").join("revocations.json"))
            .is_ok_and(|s| s.contains("stolen-phone"))
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

/// A revocation on a slow disk: `revocations.json` is written (and
/// synced, file and directory) on the admin executor's blocking thread,
/// so the admin port answers while the write waits, and the revocation is
/// answered once it is saved. Before, the write ran on the admin thread:
/// `/healthz` went unanswered for its length (10 s here), and a
/// balancer's checks took the relay out of rotation.
#[test]
fn a_revocation_on_a_slow_disk_leaves_the_admin_port_answering() {
    let Some(mut disk) = SlowDisk::start("slow-disk-revocation") else {
        return;
    };
    let pid = disk.relay.0.id();
    let revoke = disk.revoke();
    disk.wait_in_fsync(pid);
    let health = disk.health(Duration::from_secs(2));
    let still_writing = a_thread_in_fsync(pid) && !revoke.is_finished();
    assert_eq!(
        health,
        Ok(200),
        "/healthz while the revocation's fsync is held"
    );
    assert!(still_writing, "the answer came only after the write");
    let notes = disk.notes_until_answered(revoke);
    disk.strace.take();
    let failed: Vec<_> = notes
        .iter()
        .filter(|m| m.contains("STATUS=watchdog:"))
        .collect();
    assert!(failed.is_empty(), "the watchdog gave up: {failed:?}");
    assert!(
        disk.revoked_on_disk(),
        "the revocation answered but not saved"
    );
    disk.signal(libc::SIGTERM);
    assert!(disk.relay.0.wait().unwrap().success());
}

/// Two revocations on a slow disk, and between them a save of the other
/// process on the state directory (a hand-over restart's other relay,
/// which took in the first): the second is made onto that save, which
/// the file keeps. Before, a change asked for while another's write was
/// under way did not take in the file (older than the running lists
/// then), and its write, built from the running lists, went over the
/// other process's: the device revoked there was served again here, and
/// after a restart everywhere.
#[test]
fn a_revocation_behind_another_keeps_another_processs_save_meanwhile() {
    let Some(disk) = SlowDisk::start("slow-disk-two-revocations") else {
        return;
    };
    let state = disk.dir.join("state");
    let first = disk.revoke();
    // The first write's file is in place, its directory's fsync held.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !disk.revoked_on_disk() {
        assert!(
            Instant::now() < deadline,
            "the first revocation never saved"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let theirs = br#"{"devices":["peer-device","stolen-phone"],"token_ids":[]}"#;
    std::fs::write(state.join(".theirs"), theirs).unwrap();
    std::fs::rename(state.join(".theirs"), state.join("revocations.json")).unwrap();
    let second = disk.revoke_device("lost-tablet");
    assert!(
        !first.is_finished(),
        "the first write ended before the second revocation came"
    );
    disk.notes_until_answered(first);
    disk.notes_until_answered(second);
    let file = std::fs::read_to_string(state.join("revocations.json")).unwrap();
    for device in ["stolen-phone", "lost-tablet", "peer-device"] {
        assert!(file.contains(device), "{device} not in the file: {file}");
    }
    let req = Request::new("GET", "/admin/revocations").bearer(ADMIN);
    let listed = blocking::send(&Endpoint::plain(disk.admin), &req, Duration::from_secs(20))
        .unwrap()
        .text();
    assert!(listed.contains("peer-device"), "not revoked here: {listed}");
}

/// A reload waits on the disk (it dates new keys in `key-dates.json`),
/// here behind a revocation's write that takes longer than the watchdog
/// allows, with the main thread's messages held: the admin thread is
/// waiting on the disk, not hung, and the watchdog keeps the relay alive
/// (`WATCHDOG=1`, with a status that says it waits on the disk) rather
/// than have systemd kill it, and every stream with it, to meet the same
/// disk again.
#[test]
fn an_admin_thread_waiting_on_a_slow_disk_keeps_the_watchdog_fed() {
    let Some(mut disk) = SlowDisk::start("slow-disk-watchdog") else {
        return;
    };
    let pid = disk.relay.0.id();
    let revoke = disk.revoke();
    disk.wait_in_fsync(pid);
    disk.signal(libc::SIGHUP);
    let notes = disk.notes_until_answered(revoke);
    disk.strace.take();
    let failed: Vec<_> = notes
        .iter()
        .filter(|m| m.contains("STATUS=watchdog:"))
        .collect();
    assert!(failed.is_empty(), "the watchdog gave up: {failed:?}");
    assert!(
        notes
            .iter()
            .any(|m| m.starts_with("WATCHDOG=1") && m.contains("waiting on the disk")),
        "no keep-alive said the admin thread waits on the disk"
    );
    // The relay is whole: the reload ends and the admin port answers.
    disk.wait_for("READY=1 after the reload", |m| m.contains("READY=1"));
    assert_eq!(disk.health(Duration::from_secs(20)), Ok(200));
    disk.signal(libc::SIGTERM);
    assert!(disk.relay.0.wait().unwrap().success());
}

/// A SIGHUP while a slow write holds the admin thread's reload waits for
/// it, but a SIGTERM after it does not wait for the reload: the relay
/// says STOPPING=1 and drains at once, and exits once the write has
/// ended, the revocation answered and saved. Before, the main thread
/// waited for the reload's answer and took no signal until the write
/// ended.
#[test]
fn a_sigterm_during_a_reload_held_by_a_slow_disk_is_taken_at_once() {
    let Some(mut disk) = SlowDisk::start("slow-disk-reload") else {
        return;
    };
    let pid = disk.relay.0.id();
    let revoke = disk.revoke();
    disk.wait_in_fsync(pid);
    disk.signal(libc::SIGHUP);
    disk.wait_for("RELOADING=1", |m| m.contains("RELOADING=1"));
    // The reload waits behind the write: the watchdog says so.
    disk.wait_for("keep-alive waiting on the disk", |m| {
        m.starts_with("WATCHDOG=1") && m.contains("waiting on the disk")
    });
    disk.signal(libc::SIGTERM);
    disk.wait_for("STOPPING=1", |m| m.contains("STOPPING=1"));
    assert!(
        !revoke.is_finished(),
        "STOPPING=1 came only after the slow write had ended"
    );
    disk.notes_until_answered(revoke);
    disk.strace.take();
    assert!(disk.relay.0.wait().unwrap().success());
    assert!(
        disk.revoked_on_disk(),
        "the stop did not wait for the write"
    );
}

/// Whether a thread of `pid` is inside fsync or fdatasync now (strace
/// holds it at the call's entry).
fn a_thread_in_fsync(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
            let nr = s
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok());
            nr == Some(libc::SYS_fsync) || nr == Some(libc::SYS_fdatasync)
        })
    })
}

/// An upstream for one stream at a time: each binary frame is answered
/// with a final result that says 100 ms were processed, a close with a
/// close. Its `ws://` URL.
fn answering_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(tcp) else {
                    return;
                };
                let mut ms = 0;
                while let Ok(msg) = ws.read() {
                    if msg.is_binary() {
                        ms += 100;
                        let result = format!(
                            r#"{{"tokens":[{{"text":"a","is_final":true}}],"final_audio_proc_ms":{ms},"total_audio_proc_ms":{ms}}}"#
                        );
                        if ws.send(tungstenite::Message::text(result)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

/// `clio_relay_audio_seconds_total` of account `a` at the admin port, if
/// it answers within 2 s.
fn audio_seconds(admin: std::net::SocketAddr) -> Result<Option<String>, String> {
    let req = Request::new("GET", "/metrics").bearer("cli-exit-admin-token-0123456789");
    let r = blocking::send(&Endpoint::plain(admin), &req, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    Ok(r.text()
        .lines()
        .find(|l| l.starts_with("clio_relay_audio_seconds_total{account=\"a\"}"))
        .map(str::to_string))
}

/// The usage ledger's commit, every `usage.persist_interval`, syncs its
/// write-ahead log. On a slow disk that takes seconds, and it ran on the
/// admin thread: `/healthz` and `/metrics` went unanswered meanwhile, so
/// a balancer's health check failed and a scrape was lost, once a persist
/// interval. Now the commit runs on a blocking thread: while strace holds
/// its fsync, the admin port answers, and `/metrics` counts the batch
/// being committed once (not left out, not twice).
#[test]
fn the_admin_port_answers_while_the_ledger_waits_on_a_slow_disk() {
    let upstream = answering_upstream();
    let Some(mut disk) = SlowDisk::start_with("slow-disk-ledger", |config| {
        config
            .replace("ws://127.0.0.1:9/transcribe-websocket", &upstream)
            .replace(
                "[admin]\n",
                "[usage]\npersist_interval = \"2s\"\n\n[admin]\n",
            )
    }) else {
        return;
    };
    let pid = disk.relay.0.id();
    // One stream of three frames, ended by the client.
    let client = disk.client;
    let keys = clio_relay::core::token::TokenKeys::from_config(
        &clio_relay::core::config::TokensConfig::new(clio_relay::core::secret::Secret::new(
            RELAY_ENV[0].1,
        )),
    );
    let token = keys
        .mint(
            "phone",
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap();
    {
        use tungstenite::client::IntoClientRequest as _;
        let mut req = format!("ws://{client}/v1/transcribe")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let tcp = std::net::TcpStream::connect(client).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let (mut ws, _) = tungstenite::client::client(req, tcp).unwrap();
        ws.send(tungstenite::Message::text(
            r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1}"#,
        ))
        .unwrap();
        for _ in 0..3 {
            ws.send(tungstenite::Message::binary(vec![0u8; 3200]))
                .unwrap();
            let answer = ws.read().unwrap();
            assert!(
                answer.is_text() && !answer.to_text().unwrap().contains("error_code"),
                "{answer:?}"
            );
        }
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    // The stream's usage is in the ledger (in memory, or on its way).
    let deadline = Instant::now() + Duration::from_secs(20);
    let counted = loop {
        assert!(
            Instant::now() < deadline,
            "the stream's audio never counted"
        );
        if let Ok(Some(line)) = audio_seconds(disk.admin) {
            break line;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(counted.ends_with(" 0.3"), "{counted}");
    // The persist begins and strace holds its fsync.
    disk.wait_in_fsync(pid);
    let health = disk.health(Duration::from_secs(2));
    let during = audio_seconds(disk.admin);
    let still_writing = a_thread_in_fsync(pid);
    assert_eq!(health, Ok(200), "/healthz while the ledger's fsync is held");
    assert_eq!(
        during,
        Ok(Some(counted.clone())),
        "/metrics while the ledger's fsync is held"
    );
    assert!(still_writing, "the answers came only after the write");
    disk.strace.take();
    // Committed, it is counted once.
    assert_eq!(audio_seconds(disk.admin), Ok(Some(counted)));
    disk.signal(libc::SIGTERM);
    assert!(disk.relay.0.wait().unwrap().success());
}
