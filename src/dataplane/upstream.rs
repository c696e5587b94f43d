//! Connecting to Soniox: TCP, TLS (rustls + ring), and the WebSocket client
//! upgrade with the account's key where `upstream.auth` puts it.
//!
//! The upgrade answer is read into the stream's upstream read buffer; bytes
//! after it are the first upstream frames and stay where they are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_rustls::TlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::core::config::{parse_ws_url, UrlError, WsEndpoint};
use crate::core::dial;
use crate::core::keyring::RateScope;
use crate::core::secret::Secret;
use crate::dataplane::buf::Buf;
use crate::dataplane::http::{self, UpstreamAnswer};
use crate::dataplane::io::{Conn, Duplex, Tcp};

/// What the log says when upstream's name stops resolving, and when it
/// resolves again ([`dial::Addresses`]).
const SAID: dial::Said = dial::Said {
    failing: "the upstream name did not resolve; streams keep opening to the addresses it had",
    again: "the upstream name resolves again",
};

/// Largest upgrade answer head accepted from upstream.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// Why an upstream connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// Upstream answered the upgrade with this HTTP status (401, 402, 429, 5xx…).
    Refused(u16, RateScope),
    /// TCP, TLS or a broken answer: upstream is unreachable or not speaking WebSocket.
    Unavailable(String),
    /// The URL's host name did not resolve, or the resolver gave no answer
    /// within `upstream.connect_timeout`: the same for every account of
    /// the URL.
    Unresolved(String),
    /// The whole attempt took longer than `upstream.connect_timeout`.
    Timeout,
    /// The relay is at its file-descriptor limit: no socket to connect with.
    /// The relay's own fault, not upstream's, and the same for any account.
    FileLimit,
    /// The relay refused upstream's TLS certificate (expired, for another
    /// name, or signed by a CA it does not trust): the same for every
    /// account of the URL, so a configuration fault
    /// ([`UpstreamFault::CERTIFICATE`]), not an unreachable upstream.
    Certificate(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(status, _) => {
                write!(
                    f,
                    "upstream refused the WebSocket upgrade with HTTP {status}"
                )
            }
            ConnectError::Unavailable(why) => write!(f, "upstream is unavailable: {why}"),
            ConnectError::Unresolved(why) => write!(f, "upstream's name did not resolve: {why}"),
            ConnectError::Timeout => f.write_str("upstream did not answer within connect_timeout"),
            ConnectError::FileLimit => {
                f.write_str("the relay is at its file limit: no socket to connect upstream with")
            }
            ConnectError::Certificate(why) => {
                write!(f, "upstream's TLS certificate was refused: {why}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Why an upstream endpoint cannot be set up from the config (at startup,
/// before any stream): a bad URL, a missing TLS config or CA file.
#[derive(Debug)]
pub enum TargetError {
    /// The URL is not a valid `ws://` / `wss://` URL.
    Url(UrlError),
    /// A `wss://` upstream was given no TLS client config.
    NoTls,
    /// The URL's host is not a valid TLS server name.
    ServerName(rustls::pki_types::InvalidDnsNameError),
    /// `upstream.ca_file` could not be read as PEM certificates.
    CaFile {
        /// The file named by `upstream.ca_file`.
        path: PathBuf,
        /// What reading it found.
        source: rustls::pki_types::pem::Error,
    },
    /// `upstream.ca_file` holds no certificate.
    NoCertificate(PathBuf),
    /// A certificate in `upstream.ca_file` is not a usable trust root.
    BadCertificate {
        /// The file named by `upstream.ca_file`.
        path: PathBuf,
        /// Why rustls refused the certificate.
        source: rustls::Error,
    },
    /// rustls refused to build the client config.
    Tls(rustls::Error),
}

impl From<UrlError> for TargetError {
    fn from(e: UrlError) -> Self {
        TargetError::Url(e)
    }
}

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetError::Url(e) => e.fmt(f),
            TargetError::NoTls => f.write_str("a wss:// upstream needs a TLS config"),
            TargetError::ServerName(e) => write!(f, "upstream.url host: {e}"),
            TargetError::CaFile { path, source } => write!(
                f,
                "upstream.ca_file {}: {}",
                path.display(),
                crate::core::tls::PemProblem(source)
            ),
            TargetError::NoCertificate(path) => {
                write!(
                    f,
                    "upstream.ca_file {}: no certificate found",
                    path.display()
                )
            }
            TargetError::BadCertificate { path, source } => {
                write!(f, "upstream.ca_file {}: {source}", path.display())
            }
            TargetError::Tls(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TargetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TargetError::Url(e) => Some(e),
            TargetError::ServerName(e) => Some(e),
            TargetError::CaFile { source, .. } => Some(source),
            TargetError::BadCertificate { source, .. } => Some(source),
            TargetError::Tls(e) => Some(e),
            TargetError::NoTls | TargetError::NoCertificate(_) => None,
        }
    }
}

/// The parsed `upstream.url` with what a shard needs to connect to it.
pub struct UpstreamTarget {
    host: String,
    port: u16,
    path: String,
    host_header: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The host's addresses, kept and refreshed ([`dial::Addresses`]).
    addrs: dial::Addresses,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Builds the TLS client config: the webpki roots plus any PEM certificates in `ca_file`.
pub fn tls_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TargetError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = |source| TargetError::CaFile {
            path: path.to_path_buf(),
            source,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(pem)?
            .collect::<Result<_, _>>()
            .map_err(pem)?;
        if certs.is_empty() {
            return Err(TargetError::NoCertificate(path.to_path_buf()));
        }
        for c in certs {
            roots.add(c).map_err(|source| TargetError::BadCertificate {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TargetError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl UpstreamTarget {
    /// Parses a `ws://` or `wss://` URL; `tls` is required for `wss://`.
    pub fn new(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<UpstreamTarget, TargetError> {
        let WsEndpoint {
            tls: secure,
            host,
            port,
            path,
        } = parse_ws_url(url)?;
        let default_port = if secure { 443 } else { 80 };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let host_header = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let tls = if secure {
            let cfg = tls.ok_or(TargetError::NoTls)?;
            let name = ServerName::try_from(host.clone()).map_err(TargetError::ServerName)?;
            Some((TlsConnector::from(cfg), name))
        } else {
            None
        };
        Ok(UpstreamTarget {
            addrs: dial::Addresses::new(&host, port, SAID),
            host,
            port,
            path,
            host_header,
            tls,
        })
    }

    /// Opens a WebSocket to upstream with `key`, on the header (`Authorization`)
    /// or leaving it to the first message (`key_in_header == false`). The answer
    /// head is consumed from `buf`; whatever followed it stays there.
    /// `unsent`: the most bytes the socket may hold unsent (0: no bound,
    /// see [`bound_unsent`]).
    pub async fn connect(
        &self,
        key: &Secret,
        key_in_header: bool,
        buf: &mut Buf,
        limit: Duration,
        unsent: usize,
    ) -> Result<Duplex, ConnectError> {
        let started = Instant::now();
        // The name first, under the same limit: a resolver that does not
        // answer is the URL's trouble, not the account's, so it is not a
        // `Timeout` (which holds the account off).
        let addrs = match crate::dataplane::io::timeout(limit, self.addrs.get()).await {
            Some(Ok(addrs)) => addrs,
            Some(Err(e)) if crate::dataplane::accept::is_file_limit(&e) => {
                return Err(ConnectError::FileLimit)
            }
            Some(Err(e)) => return Err(ConnectError::Unresolved(format!("{}: {e}", self.host))),
            None => {
                return Err(ConnectError::Unresolved(format!(
                    "no answer for {} within upstream.connect_timeout",
                    self.host
                )))
            }
        };
        let limit = limit.saturating_sub(started.elapsed());
        let open = self.connect_inner(addrs, key, key_in_header, buf, limit, unsent);
        match crate::dataplane::io::timeout(limit, open).await {
            Some(r) => r,
            None => Err(ConnectError::Timeout),
        }
    }

    async fn connect_inner(
        &self,
        addrs: Vec<SocketAddr>,
        key: &Secret,
        key_in_header: bool,
        buf: &mut Buf,
        limit: Duration,
        unsent: usize,
    ) -> Result<Duplex, ConnectError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            ConnectError::Unavailable(format!("{what}: {e}"))
        };
        let file_limit = crate::dataplane::accept::is_file_limit;
        let (addr, tcp) = crate::core::dial::first_to_connect(
            &addrs,
            crate::core::dial::attempt_delay(limit),
            |addr| connect_tcp(addr, limit, unsent),
            file_limit,
        )
        .await
        .map_err(|e| {
            if file_limit(&e) {
                ConnectError::FileLimit
            } else {
                unavailable("connect", &e)
            }
        })?;
        self.addrs.connected(addr);
        let conn = match &self.tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    match certificate_refused(&e) {
                        Some(why) => ConnectError::Certificate(why),
                        None => unavailable("tls", &e),
                    }
                })?;
                Conn::TlsClient(Box::new(tls))
            }
        };
        let conn = Duplex::new(conn);
        let ws_key = tungstenite::handshake::client::generate_key();
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: clio-relay/{}\r\n",
            self.path,
            self.host_header,
            env!("CARGO_PKG_VERSION")
        );
        if key_in_header {
            req.push_str("Authorization: Bearer ");
            req.push_str(key.expose());
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| unavailable("write upgrade", &e))?;
        drop(req);
        let head_len = http::read_head(&conn, buf, MAX_ANSWER_HEAD.min(buf.capacity()))
            .await
            .map_err(|e| unavailable("upgrade answer", &format!("{e:?}")))?;
        let answer = http::check_upstream_answer(&buf.filled()[..head_len], &ws_key)
            .map_err(|_| unavailable("upgrade answer", &"malformed"))?;
        buf.consume(head_len);
        match answer {
            UpstreamAnswer::Upgraded => Ok(conn),
            UpstreamAnswer::Refused(status) => {
                // The body (what of it came with the head) says, for a 429,
                // whether the project's or the organisation's limit was hit.
                let body = buf.filled();
                let body = String::from_utf8_lossy(&body[..body.len().min(2048)]);
                Err(ConnectError::Refused(
                    status,
                    RateScope::from_message(&body),
                ))
            }
            UpstreamAnswer::Invalid => Err(unavailable(
                "upgrade answer",
                &"bad accept key or unrequested extension",
            )),
        }
    }
}

/// A TCP connection to `addr` with Nagle off and at most about `unsent`
/// bytes waiting unsent in it (0: no bound, see [`bound_unsent`]): on this
/// shard's data plane when there is one (every stream; the wait is bounded
/// by the caller's deadline for the whole open, [`UpstreamTarget::connect`],
/// so it needs no timer of its own), else glommio's, within `limit`.
async fn connect_tcp(
    addr: std::net::SocketAddr,
    limit: Duration,
    unsent: usize,
) -> std::io::Result<Tcp> {
    let Some(plane) = crate::dataplane::uring::current() else {
        let tcp = glommio::net::TcpStream::connect_timeout(addr, limit).await?;
        let _ = tcp.set_nodelay(true);
        bound_unsent(&tcp, unsent);
        return Ok(tcp.into());
    };
    let s = crate::dataplane::uring::RingSocket::connect(&plane, addr).await?;
    let _ = s.set_nodelay();
    bound_unsent(&s, unsent);
    Ok(Tcp::Ring(s))
}

/// Sets a client socket's receive buffer (`SO_RCVBUF`) to `bytes` (0:
/// leaves the kernel's autotuned one). The kernel doubles the figure for
/// its own bookkeeping, and with small writes most of it holds payload: a
/// client can have nearly `2 × bytes` unread in the relay.
pub fn cap_receive_buffer(fd: &impl std::os::fd::AsRawFd, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // SAFETY: `fd` is an open socket for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd).set_recv_buffer_size(bytes);
}

/// Bounds the bytes a socket may hold that it has not sent yet
/// (`TCP_NOTSENT_LOWAT`; 0: no bound): a send that finds about `bytes`
/// unsent waits, as it would on a full send buffer. Upstream's below; a
/// client's the same way (a client that stops reading its results). The send buffer itself
/// stays the kernel's, autotuned, so bytes sent but not yet acknowledged
/// (on their way, or in upstream's receive buffer) do not count against
/// the bound. When upstream stops reading its window closes, nothing more
/// leaves, and the relay holds at most about `bytes` of the stream before
/// its writes wait and the stall deadline starts: up to one segment more
/// (64 KiB on loopback), since the kernel checks the bound only as a send
/// starts a new segment, and fills that one first.
/// (A send buffer capped with `SO_SNDBUF` bounds the same bytes, but also
/// the ones in flight, and so the stream's throughput on any path whose
/// round trip is not tiny; on loopback it cut the flood's frames/s by a
/// fifth, see benches/README.md.)
pub fn bound_unsent(fd: &impl std::os::fd::AsRawFd, bytes: usize) {
    let Ok(bytes) = libc::c_int::try_from(bytes) else {
        return;
    };
    if bytes == 0 {
        return;
    }
    // SAFETY: `fd` is an open socket for the duration of the call, and the
    // option value is a live `c_int` of the length given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = UpstreamTarget::new("ws://127.0.0.1:7300/transcribe-websocket", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 7300, "/transcribe-websocket")
        );
        assert_eq!(t.host_header, "127.0.0.1:7300");
        let tls = tls_client_config(None).unwrap();
        let t =
            UpstreamTarget::new("wss://stt-rt.soniox.com/transcribe-websocket", Some(tls)).unwrap();
        assert_eq!((t.port, t.host_header.as_str()), (443, "stt-rt.soniox.com"));
        let t = UpstreamTarget::new("ws://[::1]:81/x?y=1", None).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.host_header.as_str()
            ),
            ("::1", 81, "/x?y=1", "[::1]:81")
        );
        assert!(UpstreamTarget::new("http://x", None).is_err());
        assert!(
            UpstreamTarget::new("wss://x/", None).is_err(),
            "wss needs TLS"
        );
    }
}

/// Why the TLS handshake refused upstream's certificate, if that is what
/// `e` (from the handshake) says.
fn certificate_refused(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(why) => Some(format!("{why:?}")),
        _ => None,
    }
}

/// A configuration fault upstream has shown: it answered the WebSocket
/// upgrade with a status that says the URL is wrong (400, 404, 405, 426,
/// or a 1xx–3xx other than 101: not a WebSocket endpoint, or a redirect,
/// which the relay does not follow), so `upstream.url` is wrong. That is the same for every account, so it is not held against any
/// of them: streams get a 502 that says so, `/readyz` is 503, and
/// `clio_relay_upstream_config_fault` and the `upstream_config_fault` alert
/// name it. Set by a stream's upgrade or by [`crate::control::health::probe_websocket`]; cleared by
/// the next upgrade upstream accepts. Shared by every shard (one atomic,
/// read once per stream open).
#[derive(Debug, Default)]
pub struct UpstreamFault(std::sync::atomic::AtomicU16);

impl UpstreamFault {
    /// The status a refused TLS certificate is recorded as (nginx's 495,
    /// "SSL Certificate Error"): no HTTP answer came, and the fault is the
    /// URL's (or `upstream.ca_file`'s) all the same.
    pub const CERTIFICATE: u16 = 495;

    /// Whether an upgrade answered `status` is a configuration fault.
    pub fn is_config_fault(status: u16) -> bool {
        matches!(
            status,
            100..=399 | 400 | 404 | 405 | 426 | Self::CERTIFICATE
        ) && status != 101
    }

    /// Records that upstream answered the upgrade with `status`; true when
    /// this is news (the caller logs it once, not per stream).
    pub fn set(&self, status: u16) -> bool {
        self.0.swap(status, Ordering::Relaxed) != status
    }

    /// Upstream accepted an upgrade; true when a fault stood until now.
    pub fn clear(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0 && self.0.swap(0, Ordering::Relaxed) != 0
    }

    /// The status of the standing fault, if any.
    pub fn get(&self) -> Option<u16> {
        Some(self.0.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    /// What `/readyz`, logs and errors say about it.
    pub fn describe(status: u16) -> String {
        if status == Self::CERTIFICATE {
            return "the relay refused upstream's TLS certificate (HTTP 495 here): it has \
                    expired, names another host than upstream.url's, or is signed by a CA \
                    the relay does not trust (set upstream.ca_file for a private one)"
                .into();
        }
        let hint = if (300..400).contains(&status) {
            "a redirect, which the relay does not follow: put the URL it points to in \
             upstream.url"
        } else {
            "check its scheme, host and path; Soniox's is \
             wss://stt-rt.soniox.com/transcribe-websocket"
        };
        format!(
            "upstream answered the WebSocket upgrade with HTTP {status}: upstream.url is \
             misconfigured ({hint})"
        )
    }
}
