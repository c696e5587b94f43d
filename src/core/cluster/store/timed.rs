//! The cluster thread's connection to Redis: every exchange (a command
//! and its reply, a pipeline and all its replies, the connect with its
//! TLS handshake and log-in) is bounded as a whole by `cluster.timeout`.
//!
//! The `redis` crate's own connection gives each socket read the full
//! timeout: a Redis (or a path to it) that trickles a reply a byte at a
//! time, each byte within the timeout, held the thread for as long as
//! the reply lasted while the node still counted the store as up. Here
//! the socket is the relay's: before each read or write its timeout is
//! what is left of the exchange's deadline, and reads go on only until
//! the reply is whole ([`resp::Scan`], which reads each byte once). The
//! crate still packs the commands and parses the replies.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};

use crate::core::cluster::resp;

/// The most bytes one exchange's replies may take; ours are far smaller
/// (a revocation list of 100,000 ids is about 3 MiB).
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// A socket whose every read and write waits only for what is left of
/// the exchange's deadline.
struct Sock {
    tcp: TcpStream,
    deadline: Instant,
}

impl Sock {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_write_timeout(Some(left))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Plain TCP, or TLS (`rediss://`) over it.
enum Io {
    Plain(Sock),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Sock>>),
}

impl Io {
    fn sock(&mut self) -> &mut Sock {
        match self {
            Io::Plain(s) => s,
            Io::Tls(t) => &mut t.sock,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(t) => t.read(buf),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.write_all(bytes),
            Io::Tls(t) => {
                t.write_all(bytes)?;
                t.flush()
            }
        }
    }
}

/// The cluster thread's connection. After a failed exchange (a timeout,
/// a lost connection, bytes that are not a reply) it is broken: what is
/// left of a reply would be taken for the next one's, so every later call
/// fails at once and the caller connects anew.
pub(super) struct Timed {
    io: Io,
    /// Bytes read past the replies taken so far.
    pending: Vec<u8>,
    /// How far into `pending` the reply being read has been read.
    scan: resp::Scan,
    timeout: Duration,
    db: i64,
    broken: bool,
}

impl Timed {
    /// Each exchange's deadline from now on (a connection that reads
    /// more than a stream open's calls).
    pub(super) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Connects to the Redis `info` names, over TLS for `rediss://` (with
    /// `ca`'s PEM certificates as the only roots, or else the built-in
    /// public ones), logs in and selects the database, all within one
    /// `timeout`.
    ///
    /// Redis's name is resolved into `known`, whose last addresses serve
    /// when the resolver fails or is late ([`KnownAddrs`]): the lookup
    /// counts in the one `timeout`.
    pub(super) fn connect(
        info: &ConnectionInfo,
        ca: Option<&[u8]>,
        timeout: Duration,
        known: &mut KnownAddrs,
    ) -> RedisResult<Timed> {
        let deadline = Instant::now() + timeout;
        let (host, port, tls) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.as_str(), *port, false),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "#insecure (no check of Redis's certificate) is not supported; give the CA in cluster.ca_file",
                    )));
                }
                (host.as_str(), *port, true)
            }
            _ => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "only redis:// and rediss:// URLs",
                )))
            }
        };
        // To the first address that answers, tried staggered, so that one
        // that swallows the handshake (a broken IPv6 route) does not take
        // the whole deadline.
        let addrs = crate::core::dial::in_order(&known.resolve(host, port, deadline)?, None);
        let tcp = crate::core::dial::connect_first(&addrs, deadline)?;
        let _ = tcp.set_nodelay(true);
        let sock = Sock { tcp, deadline };
        let io = if tls {
            let config = tls_config(ca)?;
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(conn, sock);
            // The handshake now, so its failure (an unknown issuer) is the
            // connect's.
            while stream.conn.is_handshaking() {
                stream.conn.complete_io(&mut stream.sock)?;
            }
            Io::Tls(Box::new(stream))
        } else {
            Io::Plain(sock)
        };
        let settings = info.redis_settings();
        let mut con = Timed {
            io,
            pending: Vec::new(),
            scan: resp::Scan::default(),
            timeout,
            db: settings.db(),
            broken: false,
        };
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            // Redis's answer to a wrong one is not logged: it could only
            // say that the password failed.
            if let Value::ServerError(_) = con.once(&auth, deadline)? {
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Password authentication failed",
                )));
            }
        }
        if settings.db() != 0 {
            if let Value::ServerError(e) =
                con.once(redis::cmd("SELECT").arg(settings.db()), deadline)?
            {
                return Err(e.into());
            }
        }
        Ok(con)
    }

    /// Sends one command and reads its reply before `deadline`.
    fn once(&mut self, cmd: &redis::Cmd, deadline: Instant) -> RedisResult<Value> {
        let mut v = self.exchange(&cmd.get_packed_command(), 1, deadline)?;
        Ok(v.pop().unwrap_or(Value::Nil))
    }

    /// Sends `cmd` and reads `n` replies, all before `deadline`.
    fn exchange(&mut self, cmd: &[u8], n: usize, deadline: Instant) -> RedisResult<Vec<Value>> {
        if self.broken {
            return Err(RedisError::from(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection dropped after a failed call",
            )));
        }
        let r = self.exchange_inner(cmd, n, deadline);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn exchange_inner(
        &mut self,
        cmd: &[u8],
        n: usize,
        deadline: Instant,
    ) -> RedisResult<Vec<Value>> {
        self.io.sock().deadline = deadline;
        self.io.write_all(cmd)?;
        let mut out = Vec::with_capacity(n);
        let mut buf = [0u8; 16 * 1024];
        while out.len() < n {
            match self.scan.end(&self.pending) {
                Err(_) => return Err(RedisError::from((ErrorKind::Parse, "not a Redis reply"))),
                Ok(Some(len)) => {
                    let v = redis::parse_redis_value(&self.pending[..len])?;
                    self.pending.drain(..len);
                    out.push(v);
                }
                Ok(None) => {
                    if self.pending.len() > MAX_REPLY_BYTES {
                        return Err(RedisError::from((ErrorKind::Parse, "a reply over 64 MiB")));
                    }
                    let got = self.io.read(&mut buf)?;
                    if got == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    self.pending.extend_from_slice(&buf[..got]);
                }
            }
        }
        Ok(out)
    }
}

/// Redis's addresses as the resolver last gave them. A reconnect asks the
/// resolver again (a managed Redis's name moves on a failover); when it
/// fails, the addresses it gave last serve, so that a resolver outage
/// does not keep the node off a Redis that is up (said once per outage).
///
/// The lookup runs on a helper thread: `getaddrinfo` cannot be given a
/// deadline, and a resolver that does not answer (a DNS server that drops
/// the queries) holds it for its timeout times its attempts, 10 s and
/// more, which on the cluster thread would hold every job queued behind
/// the reconnect. The thread waits for the answer only as long as the
/// connect's deadline allows ([`KnownAddrs::resolve`]); a late answer is
/// kept for the next reconnect, and only one lookup runs at a time.
#[derive(Debug, Default)]
pub(in crate::core::cluster) struct KnownAddrs {
    addrs: Vec<SocketAddr>,
    /// The last lookup failed or was late: said once, until one answers
    /// in time.
    failing: bool,
    /// The answer of the lookup still running on its helper thread, if
    /// one is (a reconnect starts no other until it has answered).
    lookup: Option<mpsc::Receiver<io::Result<Vec<SocketAddr>>>>,
}

impl KnownAddrs {
    /// `host:port`'s addresses now, or the last known when the resolver
    /// fails or is late; its error when none is known. Waits for the
    /// resolver until `deadline` when no address is known; otherwise for
    /// half the time left, so the connect keeps the other half, and not at
    /// all while an earlier lookup has still not answered.
    fn resolve(&mut self, host: &str, port: u16, deadline: Instant) -> io::Result<Vec<SocketAddr>> {
        let answer = if host.parse::<std::net::IpAddr>().is_ok() {
            // An address, not a name: no resolver.
            Some(crate::core::dial::resolve(host, port))
        } else {
            self.ask(host, port, deadline)
        };
        match answer {
            Some(Ok(addrs)) => {
                if self.failing {
                    tracing::info!(%host, "the cluster store's name resolves again");
                }
                self.failing = false;
                self.addrs = addrs;
            }
            Some(Err(e)) if self.addrs.is_empty() => return Err(e),
            None if self.addrs.is_empty() => {
                if !self.failing {
                    tracing::warn!(%host, "the cluster store's name was slow to resolve (no answer within cluster.timeout); no address known yet");
                }
                self.failing = true;
                return Err(io::Error::other(
                    "the resolver gave no answer for the cluster store's name within cluster.timeout",
                ));
            }
            Some(Err(e)) => {
                if !self.failing {
                    tracing::warn!(%host, error = %e, "the cluster store's name did not resolve; connecting to the addresses it had");
                }
                self.failing = true;
            }
            None => {
                if !self.failing {
                    tracing::warn!(%host, "the cluster store's name was slow to resolve (no answer in time); connecting to the addresses it had");
                }
                self.failing = true;
            }
        }
        Ok(self.addrs.clone())
    }

    /// The resolver's answer for `host:port`, from the lookup running or
    /// a new one on a helper thread; `None` when it has not come in the
    /// time [`KnownAddrs::resolve`] gives it.
    fn ask(
        &mut self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Option<io::Result<Vec<SocketAddr>>> {
        let left = deadline.saturating_duration_since(Instant::now());
        // With no address known, all the time left; with some, half of
        // it for a new lookup (the connect keeps the rest), none for one
        // still running from an earlier reconnect (its answer if it has
        // come, the known addresses now if not).
        let (rx, wait) = match self.lookup.take() {
            Some(rx) => (rx, Duration::ZERO),
            None => {
                let (tx, rx) = mpsc::channel();
                let name = host.to_string();
                let spawned = std::thread::Builder::new()
                    .name("clio-resolve".into())
                    .spawn(move || {
                        let _ = tx.send(crate::core::dial::resolve(&name, port));
                    });
                if let Err(e) = spawned {
                    return Some(Err(e));
                }
                (rx, left / 2)
            }
        };
        let wait = if self.addrs.is_empty() { left } else { wait };
        match rx.recv_timeout(wait) {
            Ok(answer) => Some(answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.lookup = Some(rx);
                None
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Some(Err(io::Error::other("the resolver's thread ended")))
            }
        }
    }

    /// The addresses last known (none before the first lookup).
    pub(in crate::core::cluster) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

/// TLS for `rediss://`: `ca`'s certificates as the only trust roots, or
/// the built-in public ones.
fn tls_config(ca: Option<&[u8]>) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                roots.add(cert).map_err(io::Error::other)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl redis::ConnectionLike for Timed {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        let deadline = Instant::now() + self.timeout;
        let mut v = self.exchange(cmd, 1, deadline)?;
        Ok(v.pop().unwrap_or(Value::Nil))
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let deadline = Instant::now() + self.timeout;
        let mut v = self.exchange(cmd, offset + count, deadline)?;
        Ok(v.split_off(offset))
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        !self.broken
    }
}
