//! The start it completes and the relay then running: huge pages off, a
//! `RUST_LOG` that would silence it, a state directory it cannot make, a
//! file-size limit, a burst of connections on the admin port, and a TLS
//! peer's alerts kept out of the log.

use std::process::Command;

use crate::util::*;

/// A running relay has transparent huge pages off (the allocator's huge
/// pages cost it most of its CPU under load), unless `CLIO_RELAY_THP=on`.
#[test]
fn a_running_relay_has_huge_pages_off() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-thp-{}", std::process::id()));
    for (env, expect) in [(None, "0"), (Some("on"), "1")] {
        let admin = free_port();
        let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
        let mut cmd = Command::new(RELAY);
        cmd.args(["run", "--config", &config])
            .envs(RELAY_ENV)
            .env_remove("CLIO_RELAY_THP")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(v) = env {
            cmd.env("CLIO_RELAY_THP", v);
        }
        let mut child = cmd.spawn().unwrap();
        wait_listening(admin, &mut child);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let thp = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .expect("the kernel reports THP_enabled (Linux 5.0 on)")
            .trim()
            .to_string();
        assert_eq!(thp, expect, "CLIO_RELAY_THP={env:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The relay's first log lines with `RUST_LOG` set to `value`: it runs
/// until it says it is listening (or `wait`), then is killed.
fn first_log_lines(value: &str, wait: std::time::Duration) -> Vec<String> {
    first_log_lines_with(&[("RUST_LOG", value)], wait)
}

/// [`first_log_lines`] with `envs` set instead.
fn first_log_lines_with(envs: &[(&str, &str)], wait: std::time::Duration) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "clio-relay-log-lines-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let mut child = relay_run(&config)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let last = line.contains("clio-relay listening");
            if tx.send(line).is_err() || last {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let end = std::time::Instant::now() + wait;
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        lines.push(line);
        if lines.last().unwrap().contains("clio-relay listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    lines
}

/// A `RUST_LOG` the relay cannot use as meant (empty, `warning`, a typo)
/// does not silence it: the default level applies, and a WARN says why.
#[test]
fn a_rust_log_that_would_silence_everything_falls_back_to_info() {
    // `clio-relay=debug` (the binary's name, not its module `clio_relay`),
    // `relay=warn` or `glommio=debug` name no module of the relay and set
    // no level for all: every line of it was off. One module of the relay
    // alone left every other off.
    for value in [
        "",
        "warning",
        "inof",
        "info,clio_relay=debg",
        "clio-relay=debug",
        "relay=warn",
        "glommio=debug",
        // A module within the relay, misspelt or not, leaves the rest of it
        // (the listening line's module included) off.
        "clio_relay::sesion=debug",
        "clio_relay::dataplane=debug",
    ] {
        let lines = first_log_lines(value, std::time::Duration::from_secs(20));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("INFO") && l.contains("clio-relay listening")),
            "RUST_LOG={value:?}: {lines:?}"
        );
        let warned = lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("RUST_LOG "));
        assert_eq!(warned, !value.is_empty(), "RUST_LOG={value:?}: {lines:?}");
    }
    // A filter that means what it says is used as it is (the relay is up
    // well within 3 s, as above, and says nothing).
    let lines = first_log_lines("clio_relay=warn", std::time::Duration::from_secs(3));
    assert!(
        !lines.iter().any(|l| l.contains("INFO")),
        "RUST_LOG=clio_relay=warn: {lines:?}"
    );
}

/// `CLIO_RELAY_LOG_FORMAT=json`: every line one JSON object with the
/// timestamp, level, target, message and the line's own fields (the
/// listening line's addresses); a value that is neither format logs text
/// and a WARN naming it.
#[test]
fn logs_are_json_lines_when_asked() {
    let wait = std::time::Duration::from_secs(20);
    let lines = first_log_lines_with(&[("CLIO_RELAY_LOG_FORMAT", "json")], wait);
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "{key} in {line}");
        }
    }
    let listening: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(listening["message"], "clio-relay listening", "{lines:?}");
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["client"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{listening}"
    );
    let lines = first_log_lines_with(&[("CLIO_RELAY_LOG_FORMAT", "yaml")], wait);
    assert!(
        lines.iter().any(|l| l.contains("WARN")
            && l.contains("CLIO_RELAY_LOG_FORMAT is neither text nor json")
            && l.contains("yaml")),
        "{lines:?}"
    );
    assert!(
        lines.last().unwrap().contains("INFO")
            && serde_json::from_str::<serde_json::Value>(lines.last().unwrap()).is_err(),
        "text: {lines:?}"
    );
}

/// What README says of a state directory that cannot be made or written
/// (`/proc/…` cannot be made, by root either): without a master key the
/// relay runs and logs what it will not keep; with one, the start fails
/// naming the directory.
#[test]
fn a_state_dir_that_cannot_be_made_is_logged_or_stops_the_start() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("clio-relay-no-state-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let state = format!("/proc/clio-relay-no-state-{}", std::process::id());
    let file = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "");
    let with_state = file.replace("[admin]\n", &format!("[admin]\nstate_dir = \"{state}\"\n"));
    std::fs::write(&config, &with_state).unwrap();
    let mut child = relay_run(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wanted = [
        "clio-relay listening",
        "key dates not saved",
        "usage ledger not opened",
    ];
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        seen.push(line);
        if wanted.iter().all(|w| seen.iter().any(|l| l.contains(w))) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for w in wanted {
        assert!(seen.iter().any(|l| l.contains(w)), "{w:?} not in {seen:#?}");
    }
    // With a master key the key store must be kept: the start fails.
    let with_key = with_state.replace(
        "[admin]\n",
        "[admin]\nmaster_key_env = \"CLI_NO_STATE_MASTER\"\n",
    );
    std::fs::write(&config, with_key).unwrap();
    let o = relay_run(&config)
        .env("CLI_NO_STATE_MASTER", "ab".repeat(32))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("key store in {state}")),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A state directory on a read-only file system, as every directory but
/// `/var/lib/clio-relay` is under the shipped unit (`ProtectSystem=strict`),
/// stopped the start with the bare OS error (`Read-only file system (os
/// error 30)`), though the same config ran when started by hand. The
/// line now says what the unit lets the relay write and what to change.
/// The directory is made read-only by a bind mount in a mount namespace
/// of the relay's own (`unshare`); skipped, with the reason, where that
/// cannot be made.
#[test]
fn a_state_dir_on_a_read_only_file_system_says_what_the_unit_lets_it_write() {
    let dir = std::env::temp_dir().join(format!("clio-relay-ro-state-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let state = ro.join("state");
    let file = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "")
        .replace(
            "[admin]\n",
            &format!(
                "[admin]\nstate_dir = \"{}\"\nmaster_key_env = \"CLI_RO_STATE_MASTER\"\n",
                state.display()
            ),
        );
    std::fs::write(&config, file).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = Command::new("unshare")
        .arg(if root { "-m" } else { "-rm" })
        .args([
            "sh",
            "-c",
            r#"{ mount --bind "$2" "$2" && mount -o remount,bind,ro "$2"; } || exit 99
               exec "$0" run --config "$1""#,
            RELAY,
            &config,
            ro.to_str().unwrap(),
        ])
        .envs(RELAY_ENV)
        .env("CLI_RO_STATE_MASTER", "ab".repeat(32))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .output();
    let out = match out {
        Ok(o) if o.status.code() == Some(99) => {
            eprintln!("skipped: no read-only bind mount here: {}", text(&o));
            return;
        }
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: unshare not runnable ({e})");
            return;
        }
    };
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with(&format!("key store in {}", state.display())))
        .unwrap_or_else(|| panic!("no key store line: {t}"));
    for part in [
        "Read-only file system",
        "it is on a read-only file system here",
        "the relay may write only /var/lib/clio-relay, its StateDirectory=",
        "keep admin.state_dir there",
    ] {
        assert!(line.contains(part), "{part:?} not in: {line}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A write past the relay's file-size limit (`ulimit -f`, systemd's
/// `LimitFSIZE=`) fails like a full disk's: the start logs what it does
/// not keep, an account change is answered 500 "applied, but not saved"
/// and applied, and the relay runs on. Before, the first such write (the
/// key dates, at the start) raised SIGXFSZ, which ended the process
/// without a word (exit status 153).
#[test]
fn a_file_size_limit_fails_writes_and_stops_nothing() {
    use clio_relay::control::httpc::{blocking, Endpoint, Request};
    use std::io::{BufRead, BufReader};
    const ADMIN: &str = "cli-exit-admin-token-0123456789";
    const NEW_KEY: &str = "cli-fsize-new-key-0123456789";
    let dir = std::env::temp_dir().join(format!("clio-relay-fsize-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let file = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "");
    std::fs::write(
        &config,
        file.replace(
            "[admin]\n",
            "[admin]\nstate_dir = \"state\"\nmaster_key_env = \"CLI_FSIZE_MASTER\"\nhealth_interval = \"0s\"\n",
        ),
    )
    .unwrap();
    // No file may grow past 0 bytes; stderr is a pipe, which the limit
    // does not bound.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -f 0 && exec \"$0\" \"$@\""])
        .args([RELAY, "run", "--config", &config])
        .env("CLI_EXIT_SECRET", "cli-exit-secret-0123456789abcdef0123")
        .env("CLI_EXIT_ADMIN", ADMIN)
        .env("CLI_EXIT_KEY", "cli-exit-soniox-key")
        .env("CLI_FSIZE_MASTER", "cd".repeat(32))
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    wait_listening(admin, &mut child);
    let ask = |method: &str, path: &str, body: &str| {
        let req = Request::new(method, path)
            .bearer(ADMIN)
            .header("Content-Type", "application/json")
            .body(body.as_bytes());
        let wait = std::time::Duration::from_secs(10);
        match blocking::send(&Endpoint::plain(admin), &req, wait) {
            Ok(r) => (r.status, r.text()),
            Err(e) => (0, e.to_string()),
        }
    };
    let add = format!(r#"{{"id":"b","key":"{NEW_KEY}"}}"#);
    let (status, body) = ask("POST", "/admin/accounts", &add);
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("applied, but not saved to the key store"),
        "{body}"
    );
    let (status, body) = ask("GET", "/admin/accounts", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":"b""#), "{body}");
    assert_eq!(ask("GET", "/healthz", "").0, 200);
    assert!(child.try_wait().unwrap().is_none(), "relay exited");
    let _ = child.kill();
    let _ = child.wait();
    let lines = log.join().unwrap();
    for wanted in ["key dates not saved", "usage ledger not opened"] {
        assert!(
            lines.iter().any(|l| l.contains(wanted)),
            "{wanted:?}: {lines:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .all(|l| !l.contains(NEW_KEY) && !l.contains(ADMIN)),
        "{lines:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Sets the soft file-size limit of process `pid` (the hard one kept);
/// returns the soft one it had.
fn set_file_size_limit(pid: u32, soft: Option<u64>) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `old`'s layout only; both pointers are valid.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit read: {}", std::io::Error::last_os_error());
    if let Some(soft) = soft {
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above; `new` is a valid rlimit.
        let r = unsafe {
            libc::prlimit(
                pid as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &new,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(r, 0, "prlimit set: {}", std::io::Error::last_os_error());
    }
    old.rlim_cur
}

/// An account change and a revocation that a running relay could not
/// save (a full disk; here its file-size limit lowered under it, as
/// `prlimit` does) were answered 500 "applied, but not saved", and then
/// saved only with the next change: once the disk had room again, a
/// restart still lost them (an account's pulled key came back, a revoked
/// device streamed). They are now saved within a second of the disk
/// taking them.
#[test]
fn changes_not_saved_on_a_full_disk_are_saved_once_it_has_room() {
    use clio_relay::control::httpc::{blocking, Endpoint, Request};
    const ADMIN: &str = "cli-exit-admin-token-0123456789";
    let dir = std::env::temp_dir().join(format!("clio-relay-unsaved-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let state = dir.join("state");
    let file = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        file.replace(
            "[admin]\n",
            "[admin]\nmaster_key_env = \"CLI_UNSAVED_MASTER\"\nhealth_interval = \"0s\"\n",
        ),
    )
    .unwrap();
    let master = "cd".repeat(32);
    /// The relay, killed if the test fails with it running.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let start = |admin| {
        let mut child = relay_run(&config)
            .env("CLI_UNSAVED_MASTER", &master)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(admin, &mut child);
        Running(child)
    };
    let ask = |admin, method: &str, path: &str, body: &str| {
        let req = Request::new(method, path)
            .bearer(ADMIN)
            .header("Content-Type", "application/json")
            .body(body.as_bytes());
        let wait = std::time::Duration::from_secs(10);
        match blocking::send(&Endpoint::plain(admin), &req, wait) {
            Ok(r) => (r.status, r.text()),
            Err(e) => (0, e.to_string()),
        }
    };
    let mut relay = start(admin);
    let room = set_file_size_limit(relay.0.id(), Some(0));
    let add = r#"{"id":"b","key":"cli-unsaved-key"}"#;
    let (status, body) = ask(admin, "POST", "/admin/accounts", add);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("applied, but not saved"), "{body}");
    let (status, body) = ask(
        admin,
        "POST",
        "/admin/revocations",
        r#"{"device_id":"stolen-phone"}"#,
    );
    assert_eq!(status, 500, "{body}");
    set_file_size_limit(relay.0.id(), Some(room));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(state.join("accounts.store").exists() && state.join("revocations.json").exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not saved once the disk had room: {:?}",
            std::fs::read_dir(&state)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: a signal to the relay this test started.
    unsafe { libc::kill(relay.0.id() as libc::pid_t, libc::SIGTERM) };
    assert!(relay.0.wait().unwrap().success());
    drop(relay);

    // On an admin port of its own: the first one, free again, may have
    // gone to another test's relay meanwhile (as it did once, with the
    // whole suite running: this GET went there and was reset).
    let admin = free_port();
    let file = std::fs::read_to_string(&config).unwrap();
    let first = file
        .lines()
        .find(|l| l.starts_with("admin_listen"))
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        file.replace(&first, &format!("admin_listen = \"{admin}\"")),
    )
    .unwrap();
    let relay = start(admin);
    let (status, body) = ask(admin, "GET", "/admin/accounts", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":"b""#), "{body}");
    let (status, body) = ask(admin, "GET", "/admin/revocations", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("stolen-phone"), "{body}");
    drop(relay);
    std::fs::remove_dir_all(&dir).ok();
}

/// A burst of connections to the admin port (a backlog accepted at once:
/// here the relay is stopped while they connect) does not evict a scrape
/// among them: its request, already there, is read before the next
/// accept. Before, the accept loop drained the whole backlog before any
/// connection's task ran, so the 256 idle connections accepted after the
/// scrape evicted it unread (a reset), as a flood of new connections did
/// to some scrapes under way.
#[test]
fn a_burst_of_idle_admin_connections_does_not_evict_a_scrape() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("clio-relay-burst-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let mut child = relay_run(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(admin, &mut child);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let signal = |s| nix::sys::signal::kill(pid, s).unwrap();
    for _ in 0..3 {
        // Stopped, the relay accepts nothing: the kernel queues the
        // connections (and the scrape's request) for it.
        // (Nothing unwrapped until it runs again.)
        signal(nix::sys::signal::Signal::SIGSTOP);
        let connect = || std::net::TcpStream::connect(admin);
        let mut idle: Vec<_> = (0..300).map(|_| connect()).collect();
        let scrape = connect().and_then(|mut s| {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .map(|()| s)
        });
        idle.extend((0..300).map(|_| connect()));
        signal(nix::sys::signal::Signal::SIGCONT);
        let mut scrape = scrape.unwrap();
        assert!(idle.iter().all(Result::is_ok));
        scrape
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let read = scrape.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            read.is_ok() && answer.starts_with("HTTP/1.1 200"),
            "{read:?}: {answer}"
        );
        drop(idle);
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
}

/// A TLS peer cannot make the relay log a line per thing it sends: rustls
/// logs a warning alert it receives (and a renegotiation it refuses, an
/// SNI no client may send) at WARN, several per connection, so rustls's
/// own lines are off unless `RUST_LOG` names rustls. The relay's own
/// line for each failed handshake stays, within its budget.
#[test]
fn a_tls_peer_cannot_fill_the_log_through_rustls() {
    use std::io::{BufRead, BufReader, Write};
    let dir = std::env::temp_dir().join(format!("clio-relay-tls-log-{}", std::process::id()));
    let client = free_port();
    let config = relay_config(&dir, &client.to_string(), "127.0.0.1:0");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("\n[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n");
    std::fs::write(&config, toml).unwrap();
    let mut child = relay_run(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    wait_listening(client, &mut child);
    // 30 connections, each with three warning alerts (unrecognized_name)
    // where its ClientHello should be, then gone.
    let alert = [0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 112];
    for _ in 0..30 {
        let mut tcp = std::net::TcpStream::connect(client).unwrap();
        tcp.write_all(&[alert; 3].concat()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The relay's own lines say the handshakes failed.
    let failed = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("TLS handshake failed"))
            .count()
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while failed() == 0 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    let failed = failed();
    let lines = lines.lock().unwrap();
    assert!(failed > 0, "{lines:#?}");
    let from_rustls: Vec<_> = lines.iter().filter(|l| l.contains("rustls::")).collect();
    assert!(
        from_rustls.is_empty(),
        "{} lines: {from_rustls:#?}",
        from_rustls.len()
    );
}

/// Shards are pinned to the CPUs the relay may run on (`taskset`,
/// systemd's `CPUAffinity=`, a container's cpuset), shard `i` to the
/// `i`-th of them, not to CPUs `0..n`: a relay given the CPUs above this
/// test's lowest runs one shard on each of them and none on the lowest.
#[test]
fn shards_are_pinned_within_the_cpus_the_relay_is_given() {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    use std::os::unix::process::CommandExt;
    let ours = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let mine: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| ours.is_set(c).unwrap())
        .collect();
    if mine.len() < 2 {
        eprintln!("one CPU only ({mine:?}): nothing to leave out, not checked");
        return;
    }
    let given = mine[1..].to_vec();
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-cpus-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("shards = 1\n", "shards = 0\n")).unwrap();
    let mut set = CpuSet::new();
    for &cpu in &given {
        set.set(cpu).unwrap();
    }
    let mut cmd = relay_run(&config);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only sched_setaffinity, a system call.
    unsafe {
        cmd.pre_exec(move || sched_setaffinity(Pid::from_raw(0), &set).map_err(Into::into));
    }
    let mut child = cmd.spawn().unwrap();
    wait_listening(admin, &mut child);
    let mut shards = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let Some(index) = comm.trim().strip_prefix("clio-shard-") else {
            continue;
        };
        let index: usize = index.split('-').next().unwrap().parse().unwrap();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        shards.entry(index).or_insert_with(Vec::new).push(cpus);
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    let expected: std::collections::BTreeMap<usize, Vec<String>> = given
        .iter()
        .enumerate()
        .map(|(i, cpu)| (i, vec![cpu.to_string(); shards.get(&i).map_or(1, Vec::len)]))
        .collect();
    assert_eq!(
        shards, expected,
        "one shard per CPU given ({given:?}), shard i on the i-th"
    );
}

/// A list revoked in one request is logged whole, every id in a
/// `revoked` line (100 ids a line), through the real binary's log queue:
/// the log is the revocations' audit trail.
#[test]
fn a_long_revocation_list_is_logged_whole() {
    use clio_relay::control::httpc::{blocking, Endpoint, Request};
    use std::io::{BufRead, BufReader};
    const ADMIN: &str = "cli-exit-admin-token-0123456789";
    let dir = std::env::temp_dir().join(format!("clio-relay-revoke-log-{}", std::process::id()));
    let admin = free_port();
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let mut child = relay_run(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    wait_listening(admin, &mut child);
    // 7,000 short ids: 55 KB, under the admin port's 64 KiB body.
    let ids: Vec<String> = (0..7000).map(|i| format!("d{i}")).collect();
    let body = serde_json::json!({ "device_ids": ids }).to_string();
    let req = Request::new("POST", "/admin/revocations")
        .bearer(ADMIN)
        .header("Content-Type", "application/json")
        .body(body.as_bytes());
    let answer = blocking::send(
        &Endpoint::plain(admin),
        &req,
        std::time::Duration::from_secs(30),
    )
    .map(|r| r.status)
    .map_err(|e| e.to_string());
    assert_eq!(answer, Ok(200));
    // SAFETY: a signal to the relay this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let lines = log.join().unwrap();
    let mut logged = std::collections::HashSet::new();
    for l in lines.iter().filter(|l| l.contains(" revoked ")) {
        let list = l
            .split("devices=")
            .nth(1)
            .and_then(|rest| rest.split('"').nth(1))
            .unwrap_or_else(|| l.split("device=").nth(1).unwrap_or(""));
        logged.extend(
            list.split([' ', '"'])
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    let missing: Vec<_> = ids.iter().filter(|d| !logged.contains(*d)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} ids not logged, e.g. {:?}; dropped: {:?}",
        missing.len(),
        ids.len(),
        missing.first(),
        lines.iter().find(|l| l.contains("log lines dropped"))
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay with fewer shards than the CPUs it may run on pinned them to
/// the lowest of those CPUs. That is what a CPU quota without a cpuset
/// makes (`docker run --cpus=1`, a pod's CPU limit: `shards = 0` counts the
/// quota, 1 here, on a host of 2 and more CPUs), so every such relay on
/// a host crowded its first CPU, with the others idle. With fewer shards
/// than its CPUs, none is pinned now: the kernel spreads them. A count set
/// in the file below the CPUs is the same case, tested here.
#[test]
fn fewer_shards_than_cpus_are_not_pinned_to_the_lowest() {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let ours = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let mine: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| ours.is_set(c).unwrap())
        .collect();
    if mine.len() < 2 {
        eprintln!("one CPU only ({mine:?}): one shard fills it, not checked");
        return;
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-fewer-{}", std::process::id()));
    let admin = free_port();
    // `relay_config` has `shards = 1`.
    let config = relay_config(&dir, "127.0.0.1:0", &admin.to_string());
    let mut child = relay_run(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(admin, &mut child);
    let mut cpus = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        if !comm.starts_with("clio-shard-") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let allowed: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed:"))
            .unwrap()
            .trim()
            .chars()
            .filter_map(|c| c.to_digit(16))
            .map(|d| d.count_ones() as usize)
            .sum();
        cpus.push(allowed);
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    assert!(!cpus.is_empty(), "no shard thread");
    assert!(
        cpus.iter().all(|&n| n == mine.len()),
        "shard threads' CPUs: {cpus:?}, the relay's {}",
        mine.len()
    );
}
