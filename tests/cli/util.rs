//! What the modules share: the binary, a relay config on real files, and
//! ways to run it.

use std::process::{Command, Output};

pub fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub const RELAY: &str = env!("CARGO_BIN_EXE_clio-relay");

/// A loopback address no one listens on (just now).
pub fn free_port() -> std::net::SocketAddr {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    free.local_addr().unwrap()
}

/// Waits (20 s at most) until the relay `child` accepts on `addr`.
pub fn wait_listening(addr: std::net::SocketAddr, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "relay never listened");
        let exited = child.try_wait().unwrap();
        assert!(exited.is_none(), "relay exited: {exited:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The environment `relay_config`'s file reads its secrets from.
pub const RELAY_ENV: [(&str, &str); 3] = [
    ("CLI_EXIT_SECRET", "cli-exit-secret-0123456789abcdef0123"),
    ("CLI_EXIT_ADMIN", "cli-exit-admin-token-0123456789"),
    ("CLI_EXIT_KEY", "cli-exit-soniox-key"),
];

/// The state directory of `relay_config`'s file: beside it, never the
/// host's `/var/lib/clio-relay` (the default), which a test must not
/// write in. A test that sets its own removes this line first.
pub const STATE_LINE: &str = "state_dir = \"state\"\n";

/// A config for `run`: a relay on `listen` with one account, its admin API
/// on `admin` with a token, its state beside the file ([`STATE_LINE`]).
pub fn relay_config(dir: &std::path::Path, listen: &str, admin: &str) -> String {
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
pub fn relay_run(config: &str) -> Command {
    relay_run_args(&["run", "--config", config])
}

/// `clio-relay ARGS` as [`relay_run`] runs it (the tests' secrets, none of
/// systemd's environment), for a start with its arguments in another order.
pub fn relay_run_args(args: &[&str]) -> Command {
    let mut c = Command::new(RELAY);
    c.args(args)
        .envs(RELAY_ENV)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS");
    c
}

pub fn run_env(args: &[&str]) -> Output {
    Command::new(RELAY)
        .args(args)
        .envs(RELAY_ENV)
        .output()
        .unwrap()
}

/// Runs `cmd` (`check-config` or `run`) on the relay's test config with a
/// `[cluster]` section whose `redis_url` is `url`, in `dir`.
pub fn with_redis_url(dir: &std::path::Path, cmd: &str, url: &str) -> std::process::Output {
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
