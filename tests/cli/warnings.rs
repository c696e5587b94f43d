//! What the binary warns of (valid, but probably not meant), from
//! `check-config` and at the start and each reload: a `server.max_streams`
//! above what the accounts carry, an admin port in public reach, a
//! disabled account's key still to come, `rediss://…#insecure`,
//! secrets every user can read or with a line break, and a socket systemd
//! passed on another address than the file's.

use std::process::Command;

use crate::util::*;

/// `child`'s stderr, line by line, read on a thread to its end (a relay
/// whose stderr is not read would block, or die of EPIPE).
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Lines from `rx` until `until` matches one or `wait` passes.
fn lines_until(
    rx: &std::sync::mpsc::Receiver<String>,
    until: impl Fn(&str) -> bool,
    wait: std::time::Duration,
) -> Vec<String> {
    let mut lines = Vec::new();
    let end = std::time::Instant::now() + wait;
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        let done = until(&line);
        lines.push(line);
        if done {
            break;
        }
    }
    lines
}

/// Starts `clio-relay run --config CONFIG`, reads its log until a line
/// `until` takes (at most 20 s), kills it and returns the lines read.
fn start_logs_until(config: &str, until: impl Fn(&str) -> bool) -> Vec<String> {
    let mut relay = relay_run(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = stderr_lines(&mut relay);
    let lines = lines_until(&log, until, std::time::Duration::from_secs(20));
    let _ = relay.kill();
    let _ = relay.wait();
    lines
}

/// Starts `clio-relay run --config CONFIG`, reads its log to "listening",
/// reloads it (SIGHUP), reads on to "SIGHUP: reloaded" (at most 20 s
/// each), kills it and returns the lines read: a start's warnings and a
/// reload's.
fn start_and_reload_logs(config: &str) -> Vec<String> {
    let mut relay = relay_run(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = stderr_lines(&mut relay);
    let wait = std::time::Duration::from_secs(20);
    let mut lines = lines_until(&log, |l| l.contains("clio-relay listening"), wait);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    lines.extend(lines_until(&log, |l| l.contains("SIGHUP: reloaded"), wait));
    let _ = relay.kill();
    let _ = relay.wait();
    lines
}

/// The warning that `server.max_streams` is more than the enabled
/// accounts carry counted only the config file's accounts, at the start
/// and at each reload too: a relay whose key store added an account with
/// room to spare was told "the accounts are the limit" at every start,
/// and one whose only file account was disabled at runtime was not told
/// that every stream would be refused. A running relay now counts the
/// account set it runs; `check-config`, which does not read the key
/// store, says that it counts the file's accounts only.
#[test]
fn the_max_streams_warning_counts_the_accounts_the_relay_runs() {
    let dir = std::env::temp_dir().join(format!("clio-relay-capacity-{}", std::process::id()));
    let admin = free_port().to_string();
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let text_of = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "")
        .replace(
        "[admin]\n",
        "[admin]\nstate_dir = \"state\"\nmaster_key_env = \"CLI_CAPACITY_MASTER\"\nhealth_interval = \"0s\"\n",
    );
    // The file's one account carries 5 streams; max_streams is 25.
    std::fs::write(
        &config,
        text_of.replace("shards = 1\n", "shards = 1\nmax_streams = 25\n"),
    )
    .unwrap();
    let master = "ab".repeat(32);
    let env = |c: &mut Command| {
        c.envs(RELAY_ENV)
            .env("CLI_CAPACITY_MASTER", &master)
            .env("CLI_CAPACITY_KEY", "cli-capacity-soniox-key")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS");
    };
    let warned = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("server.max_streams: 25 is more than"))
            .cloned()
            .collect::<Vec<_>>()
    };
    // check-config: the file's account only, and it says so.
    let mut c = Command::new(RELAY);
    c.args(["check-config", "--config", &config]);
    env(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "server.max_streams: 25 is more than the file's enabled accounts carry (5); \
             the accounts are the limit (the file's accounts only"
        ),
        "{}",
        text(&o)
    );
    let admin_addr: std::net::SocketAddr = admin.parse().unwrap();
    let start = || {
        let mut c = Command::new(RELAY);
        c.args(["run", "--config", &config])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        env(&mut c);
        c.spawn().unwrap()
    };
    // The first start runs the file's account: 5 < 25, said of the
    // running set.
    let mut relay = start();
    let log = stderr_lines(&mut relay);
    let lines = lines_until(
        &log,
        |l| l.contains("the running account set"),
        std::time::Duration::from_secs(20),
    );
    let w = warned(&lines);
    assert_eq!(w.len(), 1, "{lines:#?}");
    assert!(
        w[0].contains("more than the enabled accounts carry (5)"),
        "{w:?}"
    );
    wait_listening(admin_addr, &mut relay);
    // An account with room for 50 added at runtime, kept in the key store.
    let mut c = Command::new(RELAY);
    c.args([
        "keys",
        "--config",
        &config,
        "add",
        "--id",
        "b",
        "--max-concurrent-streams",
        "50",
        "--key-env",
        "CLI_CAPACITY_KEY",
    ]);
    env(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(relay.wait().unwrap().success());
    // Restarted, it runs 55 streams' worth of accounts: no warning.
    let mut relay = start();
    let log = stderr_lines(&mut relay);
    let lines = lines_until(
        &log,
        |l| l.contains("clio-relay listening"),
        std::time::Duration::from_secs(20),
    );
    assert!(
        lines.iter().any(|l| l.contains("clio-relay listening")),
        "{lines:#?}"
    );
    // A reload counts again: still none.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let more = lines_until(
        &log,
        |l| l.contains("SIGHUP: reloaded"),
        std::time::Duration::from_secs(20),
    );
    assert!(
        more.iter().any(|l| l.contains("SIGHUP: reloaded")),
        "{more:#?}"
    );
    let all: Vec<String> = lines.into_iter().chain(more).collect();
    assert!(warned(&all).is_empty(), "{all:#?}");
    let _ = relay.kill();
    let _ = relay.wait();
    std::fs::remove_dir_all(&dir).ok();
}

/// An admin port on every address (or a public one) with no
/// `admin.allow` puts `/metrics`, `/v1/config` and the admin API's token
/// check in reach of whoever reaches the host. Nothing said so: it is
/// now a warning, from `check-config` and at the start, that names the
/// address and both ways out; a loopback or private address, or an
/// allowlist, draws none.
#[test]
fn an_admin_port_on_a_public_address_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("clio-relay-public-admin-{}", std::process::id()));
    let check = |admin: &str, allow: Option<&str>| {
        let config = relay_config(&dir, "127.0.0.1:0", admin);
        if let Some(allow) = allow {
            let text = std::fs::read_to_string(&config).unwrap();
            let text = text.replace("[admin]\n", &format!("[admin]\nallow = [\"{allow}\"]\n"));
            std::fs::write(&config, text).unwrap();
        }
        let o = run_env(&["check-config", "--config", &config]);
        assert!(o.status.success(), "{admin}: {}", text(&o));
        let warned: Vec<String> = text(&o)
            .lines()
            .filter(|l| l.starts_with("warning: server.admin_listen"))
            .map(str::to_string)
            .collect();
        (config, warned)
    };
    for (admin, what) in [
        ("0.0.0.0:9464", "every address of this host"),
        ("[::]:9464", "every address of this host"),
        ("203.0.113.7:9464", "a public address"),
    ] {
        let (_, w) = check(admin, None);
        assert_eq!(w.len(), 1, "{admin}: {w:?}");
        assert!(
            w[0].contains(&format!("{admin} is {what} and admin.allow is empty"))
                && w[0].contains("bind it to a loopback or private address")
                && w[0].contains("admin.allow"),
            "{w:?}"
        );
    }
    for (admin, allow) in [
        ("127.0.0.1:9464", None),
        ("10.1.2.3:9464", None),
        ("192.168.1.5:9464", None),
        ("[fd00::5]:9464", None),
        ("0.0.0.0:9464", Some("10.0.0.0/8")),
    ] {
        let (_, w) = check(admin, allow);
        assert!(w.is_empty(), "{admin} {allow:?}: {w:?}");
    }
    // The start logs it too.
    let (config, _) = check("0.0.0.0:0", None);
    let lines = start_logs_until(&config, |l| l.contains("clio-relay listening"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("server.admin_listen: 0.0.0.0:0 is every")),
        "{lines:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// README's first commands: `check-config` on `config/example.toml`
/// "says it is left out until `SONIOX_PROD_ACCOUNT_02` is set". It said
/// "key_env unset or key_file missing", naming neither; it now names the
/// variable (or the file) and what to do.
#[test]
fn a_disabled_account_waiting_for_its_key_names_where_it_comes_from() {
    let o = Command::new(RELAY)
        .args(["check-config", "--config", "config/example.toml"])
        .env("CLIO_RELAY_TOKEN_SECRET", "0123456789abcdef".repeat(4))
        .env("SONIOX_PROD_ACCOUNT_01", "example-key-1")
        .env_remove("SONIOX_PROD_ACCOUNT_02")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(
            "warning: account \"prod-account-2\": disabled and its key is not there \
             (key_env SONIOX_PROD_ACCOUNT_02 is not set), so it is not loaded; to use it, \
             set SONIOX_PROD_ACCOUNT_02 and restart"
        ),
        "{}",
        text(&o)
    );
    // With a key_file, the file.
    let dir = std::env::temp_dir().join(format!("clio-relay-key-to-come-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let mut file = std::fs::read_to_string(&config).unwrap();
    file.push_str("\n[[account]]\nid = \"later\"\nkey_file = \"later.key\"\nenabled = false\n");
    std::fs::write(&config, file).unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert!(o.status.success(), "{}", text(&o));
    let later = dir.join("later.key");
    assert!(
        text(&o).contains(&format!(
            "(key_file {} does not exist), so it is not loaded; to use it, write that file and reload",
            later.display()
        )),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("example-key-1") && !text(&o).contains("cli-exit-soniox-key"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay with no key store and no fleet runs the file's accounts: its
/// warning that `max_streams` is more than they carry is the plain one,
/// without the note about the key store's or the fleet's changes (which
/// it has none of).
#[test]
fn without_a_key_store_the_max_streams_warning_has_no_store_note() {
    let dir = std::env::temp_dir().join(format!("clio-relay-no-store-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_of.replace("shards = 1\n", "shards = 1\nmax_streams = 25\n"),
    )
    .unwrap();
    let lines = start_logs_until(&config, |l| {
        l.contains("server.max_streams: 25 is more than")
    });
    let w: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("server.max_streams: 25 is more than"))
        .collect();
    assert_eq!(w.len(), 1, "{lines:#?}");
    assert!(
        w[0].contains("the enabled accounts carry (5); the accounts are the limit: past 5"),
        "{w:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The default `server.max_streams` (9000) is a ceiling on the process,
/// above what nearly every account set carries: the accounts being the
/// limit under it is the usual state, and a stream past them gets a 429
/// that says so. Yet `check-config` and every start and reload warned
/// "server.max_streams: 9000 is more than the enabled accounts carry" of
/// the example config and of most sound ones, a warning with nothing to
/// do. Only a max_streams the file sets (a plan of what this relay
/// carries, as in the test above; 9000 too, the test below) is now warned
/// of; the summary's `accounts:` line still gives the accounts' sum.
#[test]
fn the_default_max_streams_above_the_accounts_is_not_warned_of() {
    let dir = std::env::temp_dir().join(format!("clio-relay-default-max-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let o = run_env(&["check-config", "--config", &config]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("warning: server.max_streams"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("max_streams 9000")
            && text(&o).contains("1 enabled, 5 concurrent streams in all"),
        "{}",
        text(&o)
    );
    // The start's warnings come after "listening"; a reload's, before
    // "reloaded": read to the end of a reload to have both.
    let lines = start_and_reload_logs(&config);
    assert!(
        lines.iter().any(|l| l.contains("SIGHUP: reloaded")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("server.max_streams")),
        "{lines:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A `max_streams = 9000` written in the file (the default's value) was
/// not told from the default: the warning that it is more than the
/// accounts carry, given for any other value set, was not given for it.
/// The file's setting is now recorded: `check-config`, the start and a
/// reload that brings it warn of it; the default, unset, stays unwarned
/// (the test above).
#[test]
fn a_max_streams_of_9000_set_in_the_file_is_warned_of() {
    let dir = std::env::temp_dir().join(format!("clio-relay-set-9000-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let unset = std::fs::read_to_string(&config).unwrap();
    let set = unset.replace("shards = 1\n", "shards = 1\nmax_streams = 9000\n");
    let warning = "server.max_streams: 9000 is more than the enabled accounts carry (5)";
    std::fs::write(&config, &set).unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("warning: {warning}; the accounts are the limit")),
        "{}",
        text(&o)
    );
    let lines = start_logs_until(&config, |l| l.contains(warning));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains(warning)),
        "{lines:#?}"
    );
    // Started without it, then reloaded with it.
    std::fs::write(&config, &unset).unwrap();
    let mut relay = relay_run(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = stderr_lines(&mut relay);
    let wait = std::time::Duration::from_secs(20);
    let started = lines_until(&log, |l| l.contains("clio-relay listening"), wait);
    assert!(
        started.iter().any(|l| l.contains("clio-relay listening")),
        "{started:#?}"
    );
    std::fs::write(&config, &set).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let reloaded = lines_until(&log, |l| l.contains("SIGHUP: reloaded"), wait);
    let _ = relay.kill();
    let _ = relay.wait();
    // The start's warnings come after "listening", before the reload's.
    assert!(
        !started
            .iter()
            .chain(&reloaded)
            .any(|l| l.contains("config: valid") && l.contains("server.max_streams")),
        "{started:#?} {reloaded:#?}"
    );
    assert!(
        reloaded
            .iter()
            .any(|l| l.contains("SIGHUP: config valid") && l.contains(warning)),
        "{reloaded:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `#insecure` on a `rediss://` URL turns off the Redis client's check of
/// the server's certificate: valid, but `check-config` warns about it.
#[test]
fn an_insecure_rediss_url_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("clio-relay-insecure-{}", std::process::id()));
    let check = |url: &str| {
        let o = with_redis_url(&dir, "check-config", url);
        assert_eq!(o.status.code(), Some(0), "{url}: {}", text(&o));
        text(&o)
    };
    let out = check("rediss://10.0.0.5:6380/0#insecure");
    assert!(
        out.contains("warning: cluster.redis_url: #insecure turns off the check"),
        "{out}"
    );
    // One sentence, not one with the source's indentation inside it.
    let warning = out.lines().find(|l| l.contains("#insecure")).unwrap();
    assert!(!warning.contains("  "), "{warning}");
    let out = check("rediss://10.0.0.5:6380/0");
    assert!(!out.contains("#insecure"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A secret file every user of the host can read is warned about, by
/// check-config and at the start; in a directory only its owner may enter
/// (as the shipped credentials directory is), it is not.
#[test]
fn a_secret_file_every_user_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("clio-relay-modes-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.join("soniox-01");
    std::fs::write(&key, "cli-mode-soniox-key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        file.replace("key_env = \"CLI_EXIT_KEY\"", "key_file = \"soniox-01\""),
    )
    .unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let warned: Vec<_> = text(&o)
        .lines()
        .filter(|l| l.contains("can be read by every user"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warned.len(), 1, "{}", text(&o));
    assert!(
        warned[0].contains("account \"a\": key_file")
            && warned[0].contains("soniox-01")
            && warned[0].contains("mode 0644")
            && warned[0].contains("chmod 600"),
        "{warned:?}"
    );
    assert!(!text(&o).contains("cli-mode-soniox-key"), "{}", text(&o));
    // 0600: nothing to say.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert!(
        !text(&o).contains("can be read by every user"),
        "{}",
        text(&o)
    );
    // 0644 in a 0700 directory: no other user reaches it.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = run_env(&["check-config", "--config", &config]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        !text(&o).contains("can be read by every user"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A token secret or admin token from the environment with a trailing
/// newline (a file's is dropped, a variable's kept) is warned about,
/// never shown.
#[test]
fn a_secret_variable_with_a_trailing_newline_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("clio-relay-ragged-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let secret = "cli-ragged-secret-0123456789abcdef0123";
    let admin = "cli-ragged-admin-token-0123456789";
    let o = Command::new(RELAY)
        .args(["check-config", "--config", &config])
        .env("CLI_EXIT_SECRET", format!("{secret}\n"))
        .env("CLI_EXIT_ADMIN", format!("{admin}\r\n"))
        .env("CLI_EXIT_KEY", "cli-exit-soniox-key")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("warning: tokens.secret: begins or ends")
                && l.contains("refuses")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("warning: admin.token: begins or ends")
                && l.contains("no request can match it")),
        "{t}"
    );
    assert!(!t.contains(secret) && !t.contains(admin), "{t}");
    // Without the newlines: neither.
    let t = text(&run_env(&["check-config", "--config", &config]));
    assert!(!t.contains("begins or ends"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `clio-relay run --config CONFIG` with `client` and `admin` passed as
/// systemd passes its socket units' sockets (fds 3 and 4, named
/// `client` and `admin`, `LISTEN_PID` its own pid by an `exec`ing
/// shell); reads its log to "clio-relay listening" (at most 20 s), kills
/// it and returns the lines read.
fn activated_start_logs(
    config: &str,
    client: &std::net::TcpListener,
    admin: &std::net::TcpListener,
) -> Vec<String> {
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::process::CommandExt;
    let fds = [client.as_raw_fd(), admin.as_raw_fd()];
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"LISTEN_PID=$$ exec "$@""#, "sh", RELAY])
        .args(["run", "--config", config])
        .envs(RELAY_ENV)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "client:admin")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only fcntl, dup2 and close between fork and exec
    // (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{fcntl, FcntlArg};
            // Above the target range first (a source may sit on 3 or 4,
            // and dup2 onto itself would keep FD_CLOEXEC), then into place.
            let mut high = Vec::with_capacity(fds.len());
            for fd in fds {
                high.push(fcntl(fd, FcntlArg::F_DUPFD(64))?);
            }
            for (i, fd) in high.into_iter().enumerate() {
                nix::unistd::dup2(fd, 3 + i as RawFd)?;
                nix::unistd::close(fd)?;
            }
            Ok(())
        });
    }
    let mut relay = cmd.spawn().unwrap();
    let log = stderr_lines(&mut relay);
    let lines = lines_until(
        &log,
        |l| l.contains("clio-relay listening"),
        std::time::Duration::from_secs(20),
    );
    let _ = relay.kill();
    let _ = relay.wait();
    lines
}

/// Under socket activation the relay serves on the sockets systemd
/// passed and never binds the config file's addresses. A socket unit
/// left on the old address when `server.listen` or
/// `server.admin_listen` changed (or the reverse) went unsaid: the
/// relay logged the sockets' addresses and nothing more, while `keys`
/// and the balancer's checks went to the file's. The start now warns of
/// each role whose socket is elsewhere, naming both addresses and the
/// unit to change; a socket where the file says gets no such line.
#[test]
fn a_passed_socket_elsewhere_than_the_config_file_says_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("clio-relay-activated-{}", std::process::id()));
    let client = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (client_at, admin_at) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
    let (file_listen, file_admin) = (free_port(), free_port());
    let config = relay_config(&dir, &file_listen.to_string(), &file_admin.to_string());
    let lines = activated_start_logs(&config, &client, &admin);
    let all = lines.join("\n");
    assert!(
        all.contains("using sockets passed by systemd") && all.contains("clio-relay listening"),
        "{all}"
    );
    for (key, file, passed, unit) in [
        ("server.listen", file_listen, client_at, "clio-relay.socket"),
        (
            "server.admin_listen",
            file_admin,
            admin_at,
            "clio-relay-admin.socket",
        ),
    ] {
        assert!(
            lines.iter().any(|l| l.contains("WARN")
                && l.contains(&format!(
                    "{key} is {file}, but systemd passed the socket on {passed}"
                ))
                && l.contains(&format!("make {unit}'s ListenStream= and {key} the same"))),
            "no warning for {key}:\n{all}"
        );
    }
    // The file naming the sockets' own addresses: no such warning.
    let config = relay_config(&dir, &client_at.to_string(), &admin_at.to_string());
    let lines = activated_start_logs(&config, &client, &admin);
    let all = lines.join("\n");
    assert!(all.contains("clio-relay listening"), "{all}");
    assert!(!all.contains("systemd passed the socket on"), "{all}");
    std::fs::remove_dir_all(&dir).ok();
}
