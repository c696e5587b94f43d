//! A real `redis-server` on 127.0.0.1, started by the test and killed when
//! dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    /// Where the test reaches it.
    host: String,
    /// TLS only, with this certificate and key (PEM files).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Run inside this network namespace (`ip netns exec`), bound to
    /// these addresses; `None`: 127.0.0.1 here.
    netns: Option<(String, Vec<String>)>,
}

/// A port free on 127.0.0.1 right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = crate::util::state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_with(dir, None)
            .expect("redis-server did not start (is it installed? .ci/run installs it)")
    }

    /// A server that speaks only TLS, with `cert` and `key` (PEM).
    pub fn start_tls(cert: &str, key: &str) -> RedisServer {
        let dir = crate::util::state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("redis-cert.pem"), dir.join("redis-key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        Self::start_with(dir, Some((c, k))).expect("redis-server with TLS did not start")
    }

    /// A server on a free port of 127.0.0.1 (five tries) with its files
    /// in `dir`, with TLS when `tls` names its certificate and key files.
    fn start_with(
        dir: std::path::PathBuf,
        tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> Option<RedisServer> {
        for _ in 0..5 {
            let mut r = RedisServer {
                child: None,
                port: free_port(),
                dir: dir.clone(),
                host: "127.0.0.1".into(),
                netns: None,
                tls: tls.clone(),
            };
            if r.spawn() {
                return Some(r);
            }
        }
        None
    }

    /// A server inside network namespace `ns`, listening on `binds` (the
    /// namespace's own addresses) port 6379; the test reaches it at `host`.
    pub fn start_in_netns(ns: &str, binds: &[&str], host: &str) -> RedisServer {
        let dir = crate::util::state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer {
            child: None,
            port: 6379,
            dir,
            host: host.into(),
            netns: Some((ns.into(), binds.iter().map(|b| b.to_string()).collect())),
            tls: None,
        };
        assert!(r.spawn(), "redis-server starts in namespace {ns}");
        r
    }

    /// Starts the server on `self.port`; false if it did not come up.
    fn spawn(&mut self) -> bool {
        let (mut cmd, binds) = match &self.netns {
            Some((ns, binds)) => {
                let mut c = Command::new("ip");
                // Reached over veth links, not loopback: protected mode
                // would refuse those clients (the links exist only on this
                // machine, to the test's own namespace).
                c.args([
                    "netns",
                    "exec",
                    ns,
                    "redis-server",
                    "--protected-mode",
                    "no",
                ]);
                (c, binds.clone())
            }
            None => (Command::new("redis-server"), vec!["127.0.0.1".to_string()]),
        };
        cmd.arg("--bind").args(binds);
        match &self.tls {
            Some((cert, key)) => {
                cmd.args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
        }
        let child = cmd
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let listening = match self.tls {
                // The test's plain client cannot speak TLS: listening is
                // enough.
                Some(_) => TcpStream::connect((self.host.as_str(), self.port)).is_ok(),
                // Answered by this server, not by another test's that
                // took the port between `free_port` and this bind (that
                // one answered PING as well, and the test went on against
                // it while this one exited, refused the port).
                None => self.command("PING").starts_with("+PONG") && self.serves_our_dir(),
            };
            if listening {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false; // exited: the port was taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Whether the server on `self.port` is the one started with
    /// `self.dir` (`CONFIG GET dir`: each server's is its own).
    fn serves_our_dir(&self) -> bool {
        let ours = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        self.command("CONFIG GET dir")
            .split("\r\n")
            .any(|l| std::path::Path::new(l) == ours)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}:{}/0", self.host, self.port)
    }

    /// Kills the server (SIGKILL): everything in it is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server restarts on port {}", self.port);
    }

    /// A hash field's value, `None` when absent.
    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        let reply = self.command(&format!("HGET {key} {field}"));
        let (len, rest) = reply.strip_prefix('$')?.split_once("\r\n")?;
        let len: usize = len.parse().ok()?; // "$-1": absent
        rest.get(..len).map(str::to_string)
    }

    /// A field of `node`'s count hash of `kind` (`dev` or `acct`), `None`
    /// when absent. Counts are kept by process (`clio:n:<node>/<instance>:…`);
    /// this reads the one process the test runs as `node`.
    pub fn count(&self, node: &str, kind: &str, field: &str) -> Option<String> {
        let reply = self.command(&format!("KEYS clio:n:{node}/*:{kind}"));
        let key = reply.split("\r\n").find(|l| l.starts_with("clio:n:"))?;
        self.hget(key, field)
    }

    /// `node`'s member in `clio:nodes` (one running process), if any.
    pub fn member(&self, node: &str) -> Option<String> {
        let reply = self.command("ZRANGE clio:nodes 0 -1");
        reply
            .split("\r\n")
            .find(|l| l.starts_with(&format!("{node}/")))
            .map(str::to_string)
    }

    /// Redis's clock, in ms (what leases are measured by).
    pub fn time_ms(&self) -> u64 {
        let reply = self.command("TIME");
        let parts: Vec<u64> = reply.split("\r\n").filter_map(|l| l.parse().ok()).collect();
        parts[0] * 1000 + parts[1] / 1000
    }

    /// When `node`'s lease ends (Redis ms), if it has one.
    pub fn lease_end(&self, node: &str) -> Option<u64> {
        let reply = self.command(&format!("ZSCORE clio:nodes {}", self.member(node)?));
        reply
            .split("\r\n")
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|f| f as u64)
    }

    /// Sends one inline command; returns the raw reply ("" on failure).
    /// A reply may take a while: the bound is for a server that never
    /// answers, not for a slow one (at 2 s, one of the large revocation
    /// test's scripts of 50,000 ids ran past it on a loaded host, and the
    /// test read "" for its reply).
    pub fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect((self.host.as_str(), self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        // One read is enough for the small replies the tests ask for, but
        // a reply may arrive in pieces: read until it looks whole.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.ends_with(b"\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
