//! A relay node as its own process (`clio-relay run`), for tests that kill it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use clio_relay::core::secret::Secret;

use crate::util::listening_addr;

pub struct Node {
    child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    dir: std::path::PathBuf,
    /// Its environment, for [`Node::respawn`].
    env: Vec<(String, String)>,
    /// The files it sees in place of the host's (`/etc/hosts` and, for
    /// [`Node::spawn_with_resolver`], `/etc/resolv.conf` and
    /// `/etc/nsswitch.conf`), each with the path it is mounted on
    /// ([`Node::spawn_with_hosts`]).
    mounts: Vec<(std::path::PathBuf, &'static str)>,
    /// Its standard error (the log) after the line that says it listens.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Node {
    /// Starts `clio-relay run` with account `a` (key `key`), the fleet in
    /// `redis_url` as `node`, and `extra` TOML (sections).
    pub fn spawn(
        upstream: &str,
        redis_url: &str,
        node: &str,
        lease_ttl: &str,
        secret: &Secret,
        key: &str,
        extra: &str,
    ) -> Node {
        Self::try_spawn(upstream, redis_url, node, lease_ttl, secret, key, extra).unwrap_or_else(
            |(code, err)| panic!("relay exited with {code:?} before listening: {err}"),
        )
    }

    /// [`Node::spawn`], or the exit status and standard error of a relay
    /// that exited before it listened.
    pub fn try_spawn(
        upstream: &str,
        redis_url: &str,
        node: &str,
        lease_ttl: &str,
        secret: &Secret,
        key: &str,
        extra: &str,
    ) -> Result<Node, (Option<i32>, String)> {
        Self::try_spawn_with(
            upstream,
            redis_url,
            node,
            lease_ttl,
            secret,
            key,
            extra,
            &[],
        )
    }

    /// [`Node::try_spawn`] with `env` added to the relay's environment.
    #[allow(clippy::too_many_arguments)]
    pub fn try_spawn_with(
        upstream: &str,
        redis_url: &str,
        node: &str,
        lease_ttl: &str,
        secret: &Secret,
        key: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Node, (Option<i32>, String)> {
        let (dir, env) = Self::prepare(
            upstream, redis_url, node, lease_ttl, secret, key, "", extra, "", env,
        );
        Self::run(dir, env, Vec::new())
    }

    /// [`Node::spawn`] behind the test's HAProxy on 127.0.0.1, which sends
    /// a PROXY v2 header on every connection (deploy/haproxy.cfg): the node
    /// trusts that balancer (`server.proxy_protocol_from`).
    pub fn spawn_behind_balancer(
        upstream: &str,
        redis_url: &str,
        node: &str,
        lease_ttl: &str,
        secret: &Secret,
        key: &str,
        extra: &str,
    ) -> Node {
        let (dir, env) = Self::prepare(
            upstream,
            redis_url,
            node,
            lease_ttl,
            secret,
            key,
            "proxy_protocol_from = [\"127.0.0.1/32\"]\n",
            extra,
            "",
            &[],
        );
        Self::run(dir, env, Vec::new()).unwrap_or_else(|(code, err)| {
            panic!("relay exited with {code:?} before listening: {err}")
        })
    }

    /// A hand-over restart of this node (README "One relay per port"): a
    /// second `clio-relay run --join-client-port` of its config, on its
    /// client port and state directory, with an admin port of its own.
    /// The new process takes the directory (this one removes nothing as
    /// it goes).
    pub fn hand_over(&mut self) -> Node {
        let text = std::fs::read_to_string(self.dir.join("relay.toml")).unwrap();
        let text = text.replacen(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"{}\"\n", self.client),
            1,
        );
        std::fs::write(self.dir.join("relay-next.toml"), text).unwrap();
        let dir = std::mem::take(&mut self.dir);
        Self::start(
            dir,
            "relay-next.toml",
            true,
            self.env.clone(),
            self.mounts.clone(),
        )
        .unwrap_or_else(|(code, err)| {
            panic!("the hand-over's relay exited with {code:?} before listening: {err}")
        })
    }

    /// [`Node::spawn`] in a mount namespace of its own whose `/etc/hosts`
    /// is `hosts`, so that a name resolves as the test says. `Err` with
    /// the reason where that cannot be made here (no `unshare`, not
    /// allowed), or where the resolver does not give `first` first for
    /// `name` in it.
    pub fn spawn_with_hosts(
        upstream: &str,
        redis_url: &str,
        secret: &Secret,
        hosts: &str,
        name: &str,
        first: &str,
    ) -> Result<Node, String> {
        Self::spawn_in_namespace(
            upstream,
            redis_url,
            secret,
            "",
            "",
            &[("hosts", "/etc/hosts", hosts)],
            name,
            first,
        )
    }

    /// [`Node::spawn_with_hosts`] whose namespace also has `resolv_conf`
    /// as its `/etc/resolv.conf` and an `/etc/nsswitch.conf` that asks
    /// `/etc/hosts`, then DNS, for a name (whatever the host's asks), so
    /// that a name not in `hosts` goes to the DNS servers the test names.
    /// `extra`: more of the config, after `[cluster]` (e.g. a second
    /// `[[account]]`, whose key file is `key`, as the first's); `admin`:
    /// more lines of `[admin]` (e.g. a `health_interval`, `0s` unless
    /// given).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with_resolver(
        upstream: &str,
        redis_url: &str,
        secret: &Secret,
        hosts: &str,
        resolv_conf: &str,
        name: &str,
        first: &str,
        extra: &str,
        admin: &str,
    ) -> Result<Node, String> {
        Self::spawn_in_namespace(
            upstream,
            redis_url,
            secret,
            extra,
            admin,
            &[
                ("hosts", "/etc/hosts", hosts),
                ("resolv.conf", "/etc/resolv.conf", resolv_conf),
                ("nsswitch.conf", "/etc/nsswitch.conf", "hosts: files dns\n"),
            ],
            name,
            first,
        )
    }

    /// [`Node::spawn`] in a mount namespace of its own where each of
    /// `files` (a file name in the node's directory, the path it is
    /// mounted on, its text) is seen in place of the host's.
    #[allow(clippy::too_many_arguments)]
    fn spawn_in_namespace(
        upstream: &str,
        redis_url: &str,
        secret: &Secret,
        extra: &str,
        admin: &str,
        files: &[(&str, &'static str, &str)],
        name: &str,
        first: &str,
    ) -> Result<Node, String> {
        let (dir, env) = Self::prepare(
            upstream,
            redis_url,
            "node-a",
            "15s",
            secret,
            "k1",
            "",
            extra,
            admin,
            &[],
        );
        let mounts: Vec<(std::path::PathBuf, &'static str)> = files
            .iter()
            .map(|(file, on, text)| {
                let file = dir.join(file);
                std::fs::write(&file, text).unwrap();
                (file, *on)
            })
            .collect();
        let probe = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!("{} && getent ahosts \"$0\"", mount_script(&mounts)))
            .arg(name)
            .output()
            .map_err(|e| format!("unshare not runnable ({e})"))?;
        let answer = String::from_utf8_lossy(&probe.stdout);
        if !probe.status.success() || !answer.starts_with(first) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "no namespace with these hosts, or {first} not first: {answer}{}",
                String::from_utf8_lossy(&probe.stderr)
            ));
        }
        Self::run(dir, env, mounts)
            .map_err(|(code, err)| format!("relay exited with {code:?} before listening: {err}"))
    }

    /// Writes the config of [`Node::try_spawn_with`] into a new directory,
    /// with `server`'s lines in `[server]`, `admin`'s lines in `[admin]` (health checks off unless it sets
    /// `health_interval`); returns it and the relay's environment.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        upstream: &str,
        redis_url: &str,
        node: &str,
        lease_ttl: &str,
        secret: &Secret,
        key: &str,
        server: &str,
        extra: &str,
        admin: &str,
        env: &[(&str, &str)],
    ) -> (std::path::PathBuf, Vec<(String, String)>) {
        let admin = if admin.contains("health_interval") {
            admin.to_string()
        } else {
            format!("health_interval = \"0s\"\n{admin}")
        };
        let dir = crate::util::state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key"), key).unwrap();
        let cfg = dir.join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n{server}\
                 [upstream]\nurl = \"{upstream}\"\n\
                 [tokens]\nsecret_env = \"FLEET_TEST_SECRET\"\n\
                 [admin]\ntoken_env = \"FLEET_TEST_ADMIN\"\nmaster_key_env = \"FLEET_TEST_MASTER\"\n\
                 state_dir = \"{}\"\n{admin}\
                 [cluster]\nredis_url = \"{redis_url}\"\nnode_id = \"{node}\"\nlease_ttl = \"{lease_ttl}\"\n\
                 {extra}\n\
                 [[account]]\nid = \"a\"\nkey_file = \"key\"\nmax_concurrent_streams = 50\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = [
            ("FLEET_TEST_SECRET", secret.expose()),
            ("FLEET_TEST_ADMIN", crate::ADMIN),
            ("FLEET_TEST_MASTER", crate::MASTER),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .chain(env.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        (dir, env)
    }

    /// Starts the relay of `dir/relay.toml` with `env`, in a mount
    /// namespace of its own with `mounts` when there are any.
    fn run(
        dir: std::path::PathBuf,
        env: Vec<(String, String)>,
        mounts: Vec<(std::path::PathBuf, &'static str)>,
    ) -> Result<Node, (Option<i32>, String)> {
        Self::start(dir, "relay.toml", false, env, mounts)
    }

    /// [`Node::run`] of `dir/config`, with `--join-client-port` if `join`.
    fn start(
        dir: std::path::PathBuf,
        config: &str,
        join: bool,
        env: Vec<(String, String)>,
        mounts: Vec<(std::path::PathBuf, &'static str)>,
    ) -> Result<Node, (Option<i32>, String)> {
        let cfg = dir.join(config);
        let relay = env!("CARGO_BIN_EXE_clio-relay");
        let mut command = if mounts.is_empty() {
            Command::new(relay)
        } else {
            let mut c = Command::new("unshare");
            c.args(["--mount", "sh", "-c"])
                .arg(format!("{} && exec \"$0\" \"$@\"", mount_script(&mounts)))
                .arg(relay);
            c
        };
        let mut child = command
            .args(["run", "--config", cfg.to_str().unwrap()])
            .args(join.then_some("--join-client-port"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut before = String::new();
        let Some(listening) = lines.by_ref().map_while(Result::ok).find(|l| {
            before.push_str(l);
            before.push('\n');
            l.contains("listening")
        }) else {
            let status = child.wait().ok().and_then(|s| s.code());
            let _ = std::fs::remove_dir_all(&dir);
            return Err((status, before));
        };
        let field = |name: &str| listening_addr(&listening, name);
        let (client, admin) = (field("client"), field("admin"));
        // Keep reading so the relay never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let mut log = kept.lock().unwrap();
                log.push_str(&l);
                log.push('\n');
            }
        });
        Ok(Node {
            child,
            client,
            admin,
            dir,
            env,
            mounts,
            log,
        })
    }

    /// SIGKILL, then the same relay again: its config and state
    /// directory (its usage ledger) kept, under new ports.
    pub fn respawn(&mut self) {
        self.kill9();
        let dir = std::mem::take(&mut self.dir);
        let env = std::mem::take(&mut self.env);
        let new = Self::run(dir, env, self.mounts.clone()).unwrap_or_else(|(code, err)| {
            panic!("relay exited with {code:?} before listening: {err}")
        });
        // The old one, its directory taken, removes nothing as it goes.
        drop(std::mem::replace(self, new));
    }

    /// SIGTERM (the node drains and leaves the fleet), `between`, then
    /// the same relay again: its config and state directory (its usage
    /// ledger) kept, under new ports.
    pub fn restart_after(&mut self, between: impl FnOnce()) {
        assert!(self.terminate().success());
        between();
        let dir = std::mem::take(&mut self.dir);
        let env = std::mem::take(&mut self.env);
        let new = Self::run(dir, env, self.mounts.clone()).unwrap_or_else(|(code, err)| {
            panic!("relay exited with {code:?} before listening: {err}")
        });
        drop(std::mem::replace(self, new));
    }

    /// Rewrites the `/etc/hosts` it sees ([`Node::spawn_with_hosts`]).
    pub fn set_hosts(&self, hosts: &str) {
        let (file, _) = self
            .mounts
            .iter()
            .find(|(_, on)| *on == "/etc/hosts")
            .expect("spawned with hosts");
        std::fs::write(file, hosts).unwrap();
    }

    /// Its state directory (`admin.state_dir`: the usage ledger's).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.join("state")
    }

    /// How many of its threads are named `name` now.
    pub fn threads_named(&self, name: &str) -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// What it logged since it said it listens.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGINT, as Ctrl-C sends: the node stops at once, cutting its live
    /// streams. Returns its exit status (it is killed if it is still
    /// there after 30 s).
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    /// Sends `signal` to the node (SIGSTOP and SIGCONT freeze and thaw
    /// it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGTERM: the node drains, then exits. Returns its exit status (it
    /// is killed if it is still there after 30 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        self.signal(signal);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.kill9();
        panic!("{signal} did not stop the node in 30 s");
    }

    /// SIGKILL: the node dies holding whatever it holds.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The shell commands that bind-mount each of `mounts` (a file, the path
/// it is seen on), joined by `&&`. The paths are the test's own (no
/// quoting beyond spaces needed).
fn mount_script(mounts: &[(std::path::PathBuf, &'static str)]) -> String {
    mounts
        .iter()
        .map(|(file, on)| format!("mount --bind '{}' {on}", file.display()))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// A 10-minute token for `device` under `cfg`'s token secret, which
/// [`Node::spawn`] gives the relay too.
pub fn mint(cfg: &clio_relay::core::config::Config, device: &str) -> String {
    clio_relay::core::token::TokenKeys::from_config(&cfg.tokens)
        .mint(
            device,
            std::time::Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .unwrap()
}
