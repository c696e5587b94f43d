//! What `clio-relay` says about itself: `-V`, `--help`, and the command
//! line mistakes a new user makes first. (`relay-load` and `fake-soniox`
//! test their own in `tools/*/tests/cli.rs`.)

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const RELAY: &str = env!("CARGO_BIN_EXE_clio-relay");

#[test]
fn names_itself_in_its_version() {
    let o = run(RELAY, &["-V"]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("clio-relay {}", env!("CARGO_PKG_VERSION"))
    );
    let help = text(&run(RELAY, &["--help"]));
    assert!(help.contains("Usage: clio-relay"), "{help}");
}

#[test]
fn bare_clio_relay_prints_its_help() {
    let o = run(RELAY, &[]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    for word in [
        "Usage: clio-relay",
        "check-config",
        "mint-token",
        "demo",
        "--config",
    ] {
        assert!(t.contains(word), "{word:?} not in:\n{t}");
    }
}

#[test]
fn subcommand_help_says_what_config_is() {
    for sub in ["run", "check-config", "mint-token", "keys", "demo"] {
        let t = text(&run(RELAY, &[sub, "--help"]));
        assert!(!t.contains("implied"), "{sub} --help:\n{t}");
        assert!(t.contains("config file"), "{sub} --help:\n{t}");
    }
    let t = text(&run(RELAY, &["--help"]));
    assert!(t.contains("with no command runs the relay"), "{t}");
    // What it says check-config exits with is what it does.
    assert!(t.contains("exit 3 with one line per problem"), "{t}");
    // Every exit status is listed, the one systemd does not retry with
    // both its causes (each_kind_of_failure_has_its_own_exit_status and
    // a_wrong_master_key_exits_3 check the statuses themselves).
    for status in 0..=6 {
        assert!(t.contains(&format!("\n  {status}  ")), "{status}:\n{t}");
    }
    assert!(
        t.contains("or its master key does not open the key store"),
        "{t}"
    );
    let bad = std::env::temp_dir().join(format!("clio-relay-help-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "[server]
listen = 7
",
    )
    .unwrap();
    let o = run(RELAY, &["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    std::fs::remove_file(bad).ok();
}

#[test]
fn demo_refuses_a_config_file_it_would_ignore() {
    let o = run(RELAY, &["demo", "--config", "config/example.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains("demo reads no config file"), "{t}");
}

/// `demo --help` listed `-c, --config <FILE>`, a global flag, though demo
/// reads no config file (and refuses one). Each command that reads a
/// config now takes --config itself, and demo's help lists only what demo
/// takes. Every way of giving --config that the docs, units and scripts
/// use still works: after the command or before it, after `keys` or
/// after its action; given twice, it is refused.
#[test]
fn demo_help_lists_only_what_demo_takes() {
    let t = text(&run(RELAY, &["demo", "--help"]));
    assert!(!t.contains("--config") && !t.contains("-c,"), "{t}");
    for flag in ["--clients", "--seconds", "--fast"] {
        assert!(t.contains(flag), "{flag}: {t}");
    }
    for sub in [
        &["run"][..],
        &["check-config"],
        &["mint-token"],
        &["keys"],
        &["keys", "list"],
        &["keys", "rotate"],
    ] {
        let t = text(&run(RELAY, &[sub, &["--help"]].concat()));
        assert!(t.contains("-c, --config <FILE>"), "{sub:?}: {t}");
    }
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-config-at-{}", std::process::id()));
    let admin = free_port().to_string();
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let c = config.as_str();
    for args in [
        &["check-config", "--config", c][..],
        &["check-config", "-c", c],
        &["--config", c, "check-config"],
        &["-c", c, "check-config"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("configuration is valid"), "{args:?}");
    }
    for args in [
        &["mint-token", "--config", c, "--device", "d"][..],
        &["--config", c, "mint-token", "--device", "d"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("clio1."));
    }
    // Nothing listens on the admin port: exit 5 naming this config.
    for args in [
        &["keys", "--config", c, "list"][..],
        &["keys", "list", "--config", c],
        &["--config", c, "keys", "list"],
    ] {
        let o = run_env(args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("is {c} the config it runs")),
            "{args:?}: {}",
            text(&o)
        );
    }
    // A client port taken: the file was read, whichever way it came.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = relay_config(
        &dir.join("busy"),
        &taken.local_addr().unwrap().to_string(),
        "127.0.0.1:0",
    );
    let b = busy.as_str();
    for args in [
        &["run", "--config", b][..],
        &["--config", b, "run"],
        &["--config", b],
    ] {
        let o = relay_run_args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("already in use"), "{args:?}");
    }
    drop(taken);
    for args in [&["demo", "--config", c][..], &["--config", c, "demo"]] {
        let o = run(RELAY, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("demo reads no config file"), "{args:?}");
    }
    let o = run_env(&["--config", c, "check-config", "--config", c]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--config is given twice"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mint_token_refuses_a_pool_its_secret_is_not_bound_to() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-pools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const SECRET: &str = "dev-secret-for-the-cli-test-0123456789";
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let config = dir.join("dev.toml");
    std::fs::write(
        &config,
        "[tokens]\nsecret_file = \"secret\"\npools = [\"dev\"]\n\n\
         [pool.dev]\nurl = \"ws://127.0.0.1:7301/transcribe-websocket\"\n\
         [pool.prod]\nurl = \"wss://stt-rt.soniox.com/transcribe-websocket\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mint = |pool: &str| {
        run(
            RELAY,
            &[
                "mint-token",
                "--config",
                config,
                "--device",
                "phone-1",
                "--pool",
                pool,
            ],
        )
    };
    let o = mint("prod");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        text(&o).contains("binds the token secret to pools dev: it cannot mint a token for prod"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains(SECRET));
    let o = mint("dev");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("clio1."));
    std::fs::remove_dir_all(&dir).ok();
}

/// A `--ttl` over `tokens.max_ttl` is refused (exit 2) with what to do:
/// a shorter --ttl, or a longer max_ttl in the file. Before, the line
/// said only that it was longer ("--ttl 2days is longer than
/// tokens.max_ttl 1day"), not that the relay would refuse such a token
/// nor where the bound is set.
#[test]
fn a_ttl_over_max_ttl_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-ttl-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let o = run_env(&[
        "mint-token",
        "--config",
        &config,
        "--device",
        "phone-1",
        "--ttl",
        "48h",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        text(&o).contains("is longer than tokens.max_ttl 1day")
            && text(&o).contains("give a --ttl of at most 1day")
            && text(&o).contains(&format!("or raise tokens.max_ttl in {config}")),
        "{}",
        text(&o)
    );
    let o = run_env(&[
        "mint-token",
        "--config",
        &config,
        "--device",
        "phone-1",
        "--ttl",
        "24h",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// A loopback address no one listens on (just now).
fn free_port() -> std::net::SocketAddr {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    free.local_addr().unwrap()
}

/// Waits (20 s at most) until the relay `child` accepts on `addr`.
fn wait_listening(addr: std::net::SocketAddr, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "relay never listened");
        let exited = child.try_wait().unwrap();
        assert!(exited.is_none(), "relay exited: {exited:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The environment `relay_config`'s file reads its secrets from.
const RELAY_ENV: [(&str, &str); 3] = [
    ("CLI_EXIT_SECRET", "cli-exit-secret-0123456789abcdef0123"),
    ("CLI_EXIT_ADMIN", "cli-exit-admin-token-0123456789"),
    ("CLI_EXIT_KEY", "cli-exit-soniox-key"),
];

/// The state directory of `relay_config`'s file: beside it, never the
/// host's `/var/lib/clio-relay` (the default), which a test must not
/// write in. A test that sets its own removes this line first.
const STATE_LINE: &str = "state_dir = \"state\"\n";

/// A config for `run`: a relay on `listen` with one account, its admin API
/// on `admin` with a token, its state beside the file ([`STATE_LINE`]).
fn relay_config(dir: &std::path::Path, listen: &str, admin: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nshards = 1\n\n\
             [upstream]\nurl = \"ws://127.0.0.1:9/transcribe-websocket\"\n\n\
             [tokens]\nsecret_env = \"CLI_EXIT_SECRET\"\n\n\
             [admin]\ntoken_env = \"CLI_EXIT_ADMIN\"\n{STATE_LINE}\n\
             [[account]]\nid = \"a\"\nkey_env = \"CLI_EXIT_KEY\"\nmax_concurrent_streams = 5\n"
        ),
    )
    .unwrap();
    config.to_str().unwrap().to_string()
}

/// `clio-relay run --config CONFIG` with the tests' secrets in its
/// environment, and none of systemd's (a test may run under it).
fn relay_run(config: &str) -> Command {
    relay_run_args(&["run", "--config", config])
}

/// `clio-relay ARGS` as [`relay_run`] runs it (the tests' secrets, none of
/// systemd's environment), for a start with its arguments in another order.
fn relay_run_args(args: &[&str]) -> Command {
    let mut c = Command::new(RELAY);
    c.args(args)
        .envs(RELAY_ENV)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS");
    c
}

fn run_env(args: &[&str]) -> Output {
    Command::new(RELAY)
        .args(args)
        .envs(RELAY_ENV)
        .output()
        .unwrap()
}

#[test]
fn each_kind_of_failure_has_its_own_exit_status() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-exit-{}", std::process::id()));
    // 2: the command line (no --config for a command that needs one).
    let o = run(RELAY, &["check-config"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--config FILE is required"),
        "{}",
        text(&o)
    );

    // 3: the configuration (a key no section has), for check-config and run.
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:0\"\nno_such_key = 1\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let o = run_env(&[cmd, "--config", bad]);
        assert_eq!(o.status.code(), Some(3), "{cmd}: {}", text(&o));
        assert!(text(&o).contains("no_such_key"), "{cmd}: {}", text(&o));
    }

    // 4: a port taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let config = relay_config(&dir, &listen, "127.0.0.1:0");
    let o = run_env(&["run", "--config", &config]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("already in use"), "{}", text(&o));

    // 5: `keys` with no relay listening on the admin port.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = free.local_addr().unwrap().to_string();
    drop(free);
    let config = relay_config(&dir, "127.0.0.1:0", &admin);
    let o = run_env(&["keys", "--config", &config, "list"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("admin API at"), "{}", text(&o));
    // What to check: that the relay runs with this config.
    assert!(
        text(&o).contains("Connection refused")
            && text(&o).contains("nothing listens there: is the relay running")
            && text(&o).contains(&format!("is {config} the config it runs")),
        "{}",
        text(&o)
    );
    // An admin port 0 (the relay picks one at its start): `keys` cannot
    // know it, and says so instead of trying port 0.
    let config0 = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let o = run_env(&["keys", "--config", &config0, "list"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("server.admin_listen in")
            && text(&o).contains("has port 0")
            && text(&o).contains("give server.admin_listen a port"),
        "{}",
        text(&o)
    );
    for secret in [
        "cli-exit-admin-token",
        "cli-exit-soniox-key",
        "cli-exit-secret",
    ] {
        assert!(!text(&o).contains(secret), "{}", text(&o));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An account's region is bounded as an id is (empty, or 1-64 of
/// `[A-Za-z0-9._-]`): it goes in every metrics series of the account and
/// in `/v1/config`. A 60,000-character one was taken before.
#[test]
fn an_unbounded_region_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-cli-region-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    for (region, ok) in [
        ("eu".to_string(), true),
        ("us-east".into(), true),
        (String::new(), true),
        ("r".repeat(64), true),
        ("r".repeat(65), false),
        ("x".repeat(60_000), false),
        ("eu west".into(), false),
    ] {
        std::fs::write(&config, format!("{base}region = \"{region}\"\n")).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        let out = text(&o);
        if ok {
            assert!(o.status.success(), "{} chars: {out}", region.len());
        } else {
            assert_eq!(o.status.code(), Some(3), "{} chars: {out}", region.len());
            assert!(out.contains("account \"a\".region"), "{out}");
            assert!(out.contains("1-64"), "{out}");
            assert!(out.len() < 2000, "the problem is one short line: {out}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

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
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!(
        "clio-relay-rust-log-{}-{}",
        std::process::id(),
        value.len()
    ));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let mut child = relay_run(&config)
        .env("RUST_LOG", value)
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

/// A master key that does not open the key store is the configuration's
/// fault: exit 3, which the shipped unit does not restart on
/// (`RestartPreventExitStatus=3`), and the key is never shown.
#[test]
fn a_wrong_master_key_exits_3() {
    use clio_relay::control::keystore::{KeyStore, MasterKey, StoreData};
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-key-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let right = "ab".repeat(32);
    let wrong = "cd".repeat(32);
    KeyStore::open(&state, MasterKey::from_hex(&right).unwrap())
        .unwrap()
        .save(&mut StoreData::default())
        .unwrap();
    let mut file = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "");
    file = file.replace(
        "[admin]\n",
        &format!(
            "[admin]\nstate_dir = \"{}\"\nmaster_key_env = \"CLI_WRONG_MASTER\"\n",
            state.display()
        ),
    );
    std::fs::write(&config, file).unwrap();
    let o = relay_run(&config)
        .env("CLI_WRONG_MASTER", &wrong)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("master key"), "{}", text(&o));
    assert!(!text(&o).contains(&wrong), "{}", text(&o));
    std::fs::remove_dir_all(&dir).ok();
}

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

/// A port held by another program (9464, the admin port's default, is
/// also the OpenTelemetry Prometheus exporter's) was put down to "a
/// running clio-relay" with only "stop it first" to do. The message now
/// also says how to see what holds it and the other way out, and the
/// exit status is still 4.
#[test]
fn a_port_another_program_holds_says_how_to_find_it() {
    let dir = std::env::temp_dir().join(format!("clio-relay-port-held-{}", std::process::id()));
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = other.local_addr().unwrap();
    for (listen, admin, key) in [
        (
            "127.0.0.1:0".to_string(),
            held.to_string(),
            "server.admin_listen",
        ),
        (held.to_string(), "127.0.0.1:0".to_string(), "server.listen"),
    ] {
        let config = relay_config(&dir, &listen, &admin);
        let o = run_env(&["run", "--config", &config]);
        assert_eq!(o.status.code(), Some(4), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&format!("{key} {held} is already in use"))
                && t.contains(&format!(
                    "if another program holds it (`ss -ltnp 'sport = :{}'` names it), stop it \
                     or choose another {key}",
                    held.port()
                )),
            "{t}"
        );
    }
    drop(other);
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

/// A key put in the wrong table (`drain_timeout` under `[admin]`, the
/// admin token's `token_env` under `[server]`) was refused with the
/// table's own keys listed, never where the key belongs. The line now
/// names the table(s) that take it; a misspelt key, which no table
/// takes, gets the list as before. Exit 3 either way.
#[test]
fn a_key_in_the_wrong_table_says_where_it_belongs() {
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-table-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |from: &str, to: &str| {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        text(&o)
    };
    let t = check("[admin]\n", "[admin]\ndrain_timeout = \"60s\"\n");
    assert!(
        t.contains(
            "unknown field `drain_timeout` in [admin] (line 13): it is a key of [limits]: \
             move it there; [admin] takes one of `token_env`"
        ),
        "{t}"
    );
    let t = check("[server]\n", "[server]\nmaster_key_env = \"X\"\n");
    assert!(
        t.contains("unknown field `master_key_env` in [server] (line 2): it is a key of [admin]: move it there"),
        "{t}"
    );
    let t = check("shards = 1\n", "shards = 1\nallow_from = []\n");
    assert!(
        t.contains("unknown field `allow_from` in [server] (line 5), expected one of")
            && !t.contains("it is a key of"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A misspelt key (`listne` in [server]) got the table's keys listed and
/// no more: the line now says which key it probably is, when one is
/// close (an edit or two, by strsim's distance) and no other as close. A
/// key of another table keeps its hint (the test above); when it is also
/// close to one here (`pool` in [tokens], which takes `pools`), the line
/// says both. Exit 3 each time.
#[test]
fn a_misspelt_key_says_which_key_it_may_be() {
    let dir = std::env::temp_dir().join(format!("clio-relay-misspelt-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |from: &str, to: &str| {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        text(&o)
    };
    let t = check("listen = ", "listne = ");
    assert!(
        t.contains(
            "unknown field `listne` in [server] (line 2): did you mean `listen`? \
             [server] takes one of `listen`, `admin_listen`"
        ),
        "{t}"
    );
    let t = check("max_concurrent_streams", "maxconcurrent_streams");
    assert!(
        t.contains(
            "unknown field `maxconcurrent_streams` in account[0] (line 19): did you mean \
             `max_concurrent_streams`?"
        ),
        "{t}"
    );
    // A table's name too.
    let t = check("[upstream]", "[upstrem]");
    assert!(
        t.contains("unknown field `upstrem` in the top level (line 6): did you mean `upstream`?"),
        "{t}"
    );
    // Close to a key here and a key of another table: both said.
    let t = check("[tokens]\n", "[tokens]\npool = [\"default\"]\n");
    assert!(
        t.contains(
            "unknown field `pool` in [tokens] (line 10): did you mean `pools`? (`pool` itself \
             is a key of [[account]]); [tokens] takes one of"
        ),
        "{t}"
    );
    // Two keys as close (idle_timeout, stall_timeout): no guess.
    let t = check("[tokens]\n", "[limits]\nll_timeout = \"5s\"\n[tokens]\n");
    assert!(
        t.contains("unknown field `ll_timeout` in [limits] (line 10), expected one of")
            && !t.contains("did you mean"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A value of the wrong type was refused in serde's words, the Rust type
/// that holds the key: `server.shards: invalid type: string "x", expected
/// usize (line 4)`, and "u32", "u64", "f64", "path string", "a sequence",
/// "struct RawServer". An operator does not know them: the line now says
/// what the key takes, still naming the key and its line. Exit 3.
#[test]
fn a_value_of_the_wrong_type_says_what_the_key_takes() {
    let dir = std::env::temp_dir().join(format!("clio-relay-wrong-type-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config).unwrap();
    for (from, to, said) in [
        (
            "shards = 1\n",
            "shards = \"x\"\n",
            "server.shards: invalid type: string \"x\", expected a whole number (0 or more) (line 4)",
        ),
        (
            "shards = 1\n",
            "shards = 1.5\n",
            "server.shards: invalid type: floating point `1.5`, expected a whole number (0 or more) (line 4)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nmax_streams = -1\n",
            "server.max_streams: invalid value: integer `-1`, expected a whole number from 0 to 4294967295 (line 5)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\nprice_per_hour = \"0.12\"\n",
            "account[0].price_per_hour: invalid type: string \"0.12\", expected a number (line 20)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\nenabled = \"yes\"\n",
            "account[0].enabled: invalid type: string \"yes\", expected true or false (line 20)",
        ),
        (
            "max_concurrent_streams = 5\n",
            "max_concurrent_streams = 5\n[alerts]\nerror_min_streams = \"ten\"\n",
            "alerts.error_min_streams: invalid type: string \"ten\", expected a whole number (0 or more) (line 21)",
        ),
        (
            "[admin]\n",
            "[admin]\ntoken_file = 7\n",
            "admin.token_file: invalid type: integer `7`, expected a path in quotes (line 13)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nallow = \"10.0.0.0/8\"\n",
            "server.allow: invalid type: string \"10.0.0.0/8\", expected a list in brackets, such as [\"a\", \"b\"] (line 5)",
        ),
        (
            "shards = 1\n",
            "shards = 1\nallow = [10]\n",
            "server.allow: invalid type: integer `10`, expected a string in quotes (line 5)",
        ),
        (
            "[server]\n",
            "pool = 1\n[server]\n",
            "pool: invalid type: integer `1`, expected [pool.NAME] tables (line 1)",
        ),
    ] {
        std::fs::write(&config, base.replace(from, to)).unwrap();
        let o = run_env(&["check-config", "--config", &config]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{to}: {t}");
        assert!(t.contains(said), "{to}: {t}");
        for rust in ["usize", "u32", "u64", "f64", "path string", "a sequence", "struct Raw"] {
            assert!(!t.contains(rust), "{to}: {rust}: {t}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `cmd` (`check-config` or `run`) on the relay's test config with a
/// `[cluster]` section whose `redis_url` is `url`, in `dir`.
fn with_redis_url(dir: &std::path::Path, cmd: &str, url: &str) -> std::process::Output {
    let config = relay_config(dir, "127.0.0.1:0", "127.0.0.1:0");
    let base = std::fs::read_to_string(&config)
        .unwrap()
        .replace(STATE_LINE, "")
        .replace(
            "[admin]\n",
            &format!(
                "[admin]\nstate_dir = \"{}\"\nmaster_key_env = \"CLI_URL_MASTER\"\n",
                dir.join("state").display()
            ),
        );
    std::fs::write(
        &config,
        format!("{base}\n[cluster]\nredis_url = \"{url}\"\nnode_id = \"n1\"\n"),
    )
    .unwrap();
    Command::new(RELAY)
        .args([cmd, "--config", &config])
        .envs(RELAY_ENV)
        .env("CLI_URL_MASTER", "ab".repeat(32))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap()
}

/// A `[cluster] redis_url` the Redis client cannot use (a port past
/// 65535, a database that is not a number, a broken IPv6 address) is a
/// configuration mistake: `check-config` names it, and `run` exits 3,
/// which systemd does not restart on, instead of 1 every 2 s. The URL
/// itself is not echoed.
#[test]
fn a_redis_url_the_client_cannot_use_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("clio-relay-redis-url-{}", std::process::id()));
    for url in [
        "redis://10.0.0.5:99999/0",
        "redis://10.0.0.5:6379/zero",
        "redis://[::1:6379/0",
    ] {
        for cmd in ["check-config", "run"] {
            let o = with_redis_url(&dir, cmd, url);
            assert_eq!(o.status.code(), Some(3), "{cmd} {url}: {}", text(&o));
            assert!(
                text(&o).contains("cluster.redis_url"),
                "{cmd} {url}: {}",
                text(&o)
            );
            assert!(!text(&o).contains(url), "{cmd} {url}: {}", text(&o));
        }
    }
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

/// A config file that is not there is named once, with why it cannot be
/// read, by `check-config` and by `run`.
#[test]
fn a_missing_config_file_is_named_once() {
    let path = "/definitely/not/here/relay.toml";
    // `keys` and `mint-token` said only "cannot read the config file: No
    // such file or directory", naming no file.
    for args in [
        &["check-config"][..],
        &["run"],
        &["keys", "list"],
        &["mint-token", "--device", "phone-1"],
    ] {
        let sub = args[0];
        let mut args = args.to_vec();
        args.splice(1..1, ["--config", path]);
        let o = run(RELAY, &args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{sub}: {t}");
        assert_eq!(t.matches(path).count(), 1, "{sub}: {t}");
        assert!(
            t.contains("cannot read the config file: No such file"),
            "{sub}: {t}"
        );
    }
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

/// A listen address the host does not have: the start names it and says
/// so, with exit 1 (a port in use is 4).
#[test]
fn a_listen_address_of_another_host_is_named() {
    let dir = std::env::temp_dir().join(format!("clio-relay-other-host-{}", std::process::id()));
    // 192.0.2.0/24 is TEST-NET-1, never a local address.
    let config = relay_config(&dir, "192.0.2.1:18080", "127.0.0.1:0");
    let o = run_env(&["run", "--config", &config]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("server.listen 192.0.2.1:18080: Cannot assign requested address")
            && text(&o).contains("not an address of this host"),
        "{}",
        text(&o)
    );
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

/// A locked-memory limit under glommio's minimum (64 KiB was Docker's
/// default for years) stopped the start with "shard thread ended before
/// listening" (`run`) or "fake-soniox shard died while starting" (`demo`):
/// no cause, nothing to change. Both now name the limit, its value, what
/// the relay needs and where to raise it, and exit 1.
#[test]
fn a_locked_memory_limit_too_low_names_it_and_how_to_raise_it() {
    let dir = std::env::temp_dir().join(format!("clio-relay-memlock-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    for args in [vec!["run", "--config", config.as_str()], vec!["demo"]] {
        let o = Command::new("sh")
            .args(["-c", "ulimit -l 64 && exec \"$0\" \"$@\""])
            .arg(RELAY)
            .args(&args)
            .envs(RELAY_ENV)
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(
            t.contains("io_uring could not be set up")
                && t.contains("(`ulimit -l`) is 64 KiB: glommio needs at least 512 KiB")
                && t.contains("LimitMEMLOCK=64M"),
            "{args:?}: {t}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
