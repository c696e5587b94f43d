//! The relay's one HTTP/1.1 client: health checks and usage reconciliation
//! against upstream's REST API, the alert webhook, `clio-relay keys`, and
//! the tests.
//!
//! One request writer ([`write_request`]) and one response parser
//! ([`parse::Parser`], no I/O) serve two forms: [`client`] on glommio (the
//! admin thread) and [`blocking`] over a std `TcpStream` (the CLI and the
//! tests). Each request:
//!
//! - runs on a fresh connection (`Connection: close`) under one deadline
//!   that covers resolving, connecting, TLS, writing and reading;
//! - on glommio, takes the host name's addresses as the thread keeps them
//!   ([`crate::core::dial::Addresses`]): refreshed in the background, kept
//!   while the resolver fails or hangs, one lookup a name at a time, on a
//!   helper thread, never on the executor's blocking pool;
//! - tries the addresses the name resolves to as the data plane does
//!   ([`crate::core::dial`]): the next begins beside the last after
//!   250 ms (a quarter of a shorter deadline) or its failure, and the
//!   first to connect is used, so one dead address does not take it all;
//! - reads a body framed by `Content-Length`, chunked, or by the close,
//!   and refuses one larger than its limit (1 MiB unless the request says
//!   otherwise) before reading it;
//! - speaks TLS with rustls for `https` (the upstream TLS setup: webpki
//!   roots plus `upstream.ca_file`).
//!
//! A bearer token is written only into the request bytes: [`Request`]'s
//! `Debug` shows `<redacted>`, and no [`Error`] holds request bytes.
//!
//! Why not hyper: the relay already parses heads with httparse; hyper 1.x
//! would still need our own connector (DNS, address loop, TLS), an I/O
//! adapter and an executor for glommio, and an async runtime in the CLI,
//! for one short request per connection. The hand-written part is the
//! chunked decoder and the framing rules, tested in `tests.rs`.

pub mod blocking;
pub mod client;
pub mod parse;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use parse::{Parser, Response};

/// The default bound on a response body.
pub const MAX_BODY: usize = 1 << 20;
/// The bound on a response head (status line, headers, chunked trailers).
pub const MAX_HEAD: usize = 16 * 1024;

/// Where requests go: a host (name or address), a port, and TLS or not.
#[derive(Clone)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The TLS client config for `https`; `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            if self.tls.is_some() { "https" } else { "http" },
            self.authority()
        )
    }
}

impl Endpoint {
    /// A plain-HTTP endpoint at one socket address.
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: None,
        }
    }

    /// An `http://` or `https://` URL as an endpoint and a request target
    /// (path and query, `/` when empty). `https` needs `tls`.
    pub fn parse_url(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<(Endpoint, String), Error> {
        let (secure, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(Error::Url("not an http:// or https:// URL".into()));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(Error::Url("credentials in a URL are not supported".into()));
        }
        let default_port = if secure { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| Error::Url("unclosed [ in the host".into()))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p),
                None if after.is_empty() => (h, ""),
                None => return Err(Error::Url("junk after the IPv6 host".into())),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (authority, ""),
            }
        };
        let port = if port.is_empty() {
            default_port
        } else {
            port.parse::<u16>()
                .map_err(|_| Error::Url(format!("bad port {port:?}")))?
        };
        if host.is_empty() {
            return Err(Error::Url("no host".into()));
        }
        let tls = if secure {
            Some(tls.ok_or_else(|| Error::Url("an https URL needs a TLS config".into()))?)
        } else {
            None
        };
        let ep = Endpoint {
            host: host.to_string(),
            port,
            tls,
        };
        Ok((ep, target))
    }

    /// `host[:port]` as the `Host` header wants it (IPv6 in brackets, the
    /// port only when it is not the scheme's default).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// One request. The writer adds `Host`, `Connection: close`, `User-Agent`
/// and `Content-Length`.
#[derive(Clone)]
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// Path and query.
    pub target: &'a str,
    /// More header lines, written in order.
    pub headers: Vec<(&'a str, &'a str)>,
    /// `Authorization: Bearer …`; never shown by `Debug`.
    pub bearer: Option<&'a str>,
    /// The body (with `Content-Length`), empty for none.
    pub body: &'a [u8],
    /// The bound on the response body.
    pub max_body: usize,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("headers", &self.headers)
            .field("bearer", &self.bearer.map(|_| "<redacted>"))
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl<'a> Request<'a> {
    /// `method target` with no body.
    pub fn new(method: &'a str, target: &'a str) -> Request<'a> {
        Request {
            method,
            target,
            headers: Vec::new(),
            bearer: None,
            body: b"",
            max_body: MAX_BODY,
        }
    }

    /// `GET target`.
    pub fn get(target: &'a str) -> Request<'a> {
        Request::new("GET", target)
    }

    /// `POST target` with a JSON body.
    pub fn post_json(target: &'a str, body: &'a [u8]) -> Request<'a> {
        Request::new("POST", target)
            .header("Content-Type", "application/json")
            .body(body)
    }

    /// Adds a header line.
    pub fn header(mut self, name: &'a str, value: &'a str) -> Request<'a> {
        self.headers.push((name, value));
        self
    }

    /// Sets the bearer token.
    pub fn bearer(mut self, token: &'a str) -> Request<'a> {
        self.bearer = Some(token);
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: &'a [u8]) -> Request<'a> {
        self.body = body;
        self
    }

    /// Sets the bound on the response body.
    pub fn max_body(mut self, n: usize) -> Request<'a> {
        self.max_body = n;
        self
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The request's bytes: head and body. Refuses a method, target or header
/// that would break the head (CR, LF, NUL, spaces in the target); the
/// error names the part, never its value.
pub fn write_request(authority: &str, req: &Request<'_>) -> Result<Vec<u8>, Error> {
    if !is_token(req.method) {
        return Err(Error::Request("bad method".into()));
    }
    if req.target.is_empty() || req.target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Error::Request("bad request target".into()));
    }
    let value_ok = |v: &str| !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
    for (name, value) in &req.headers {
        if !is_token(name) {
            return Err(Error::Request("bad header name".into()));
        }
        if !value_ok(value) {
            return Err(Error::Request(format!("bad value for header {name}")));
        }
    }
    if req.bearer.is_some_and(|b| !value_ok(b)) {
        return Err(Error::Request("bad bearer token".into()));
    }
    let mut out = Vec::with_capacity(256 + req.body.len());
    let mut line = |parts: &[&[u8]]| {
        for p in parts {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    };
    line(&[
        req.method.as_bytes(),
        b" ",
        req.target.as_bytes(),
        b" HTTP/1.1",
    ]);
    line(&[b"Host: ", authority.as_bytes()]);
    line(&[b"Connection: close"]);
    line(&[
        b"User-Agent: clio-relay/",
        env!("CARGO_PKG_VERSION").as_bytes(),
    ]);
    for (name, value) in &req.headers {
        line(&[name.as_bytes(), b": ", value.as_bytes()]);
    }
    if let Some(b) = req.bearer {
        line(&[b"Authorization: Bearer ", b.as_bytes()]);
    }
    if !req.body.is_empty() || !matches!(req.method, "GET" | "HEAD") {
        line(&[b"Content-Length: ", req.body.len().to_string().as_bytes()]);
    }
    line(&[]);
    out.extend_from_slice(req.body);
    Ok(out)
}

/// Why a request got no answer. No variant holds request bytes (the
/// bearer token), only what went wrong.
#[derive(Debug)]
pub enum Error {
    /// The URL could not be used.
    Url(String),
    /// The request could not be written (a bad header, …).
    Request(String),
    /// The host name did not resolve (or resolved to nothing), or, with
    /// none of its addresses known yet, the resolver did not answer within
    /// the request's time limit (kind `TimedOut`).
    Resolve(std::io::Error),
    /// No address took the connection: how many were tried, and the last
    /// address's error.
    Connect(usize, std::io::Error),
    /// The TLS handshake failed.
    Tls(std::io::Error),
    /// Reading or writing failed after connecting.
    Io(std::io::Error),
    /// The deadline passed.
    Timeout,
    /// The server closed the connection without answering.
    NoAnswer,
    /// The answer is not HTTP/1.1 as this client reads it.
    Malformed(String),
    /// The answer's head or body is over its bound (which is given).
    TooLarge(&'static str, usize),
    /// The connection closed before the body's end.
    Truncated,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Url(m) => write!(f, "bad URL: {m}"),
            Error::Request(m) => write!(f, "bad request: {m}"),
            Error::Resolve(e) => write!(f, "resolve: {e}"),
            Error::Connect(1, e) => write!(f, "connect: {e}"),
            Error::Connect(n, e) => write!(f, "connect: none of {n} addresses answered: {e}"),
            Error::Tls(e) => write!(f, "tls: {e}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Timeout => write!(f, "timed out"),
            Error::NoAnswer => write!(f, "the connection closed without an answer"),
            Error::Malformed(m) => write!(f, "bad answer: {m}"),
            Error::TooLarge(what, n) => write!(f, "answer {what} over {n} bytes"),
            Error::Truncated => write!(f, "the connection closed before the answer's end"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Whether trying again may help: the network, not the request or
    /// the certificate, failed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Resolve(_)
                | Error::Connect(..)
                | Error::Io(_)
                | Error::Timeout
                | Error::NoAnswer
                | Error::Truncated
        )
    }
}

/// How a request is retried ([`client::send_with_retry`]): at most
/// `attempts` tries; the waits between them start at `first_wait` and
/// double; no try starts after `total` has passed since the first.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Tries in all (1 = no retry).
    pub attempts: u32,
    /// The wait before the second try.
    pub first_wait: Duration,
    /// The bound on the whole, tries and waits.
    pub total: Duration,
}

impl Retry {
    /// The alert webhook's policy: 4 tries, waits of 1 s, 2 s, 4 s, all
    /// within 30 s.
    pub const WEBHOOK: Retry = Retry {
        attempts: 4,
        first_wait: Duration::from_secs(1),
        total: Duration::from_secs(30),
    };

    /// Whether an outcome is worth another try: a network failure, a 5xx,
    /// or 429.
    pub fn should_retry(outcome: &Result<Response, Error>) -> bool {
        match outcome {
            Ok(r) => r.status == 429 || (500..600).contains(&r.status),
            Err(e) => e.is_transient(),
        }
    }

    /// The wait after try `n` (1-based), or the server's `Retry-After`
    /// if longer: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
    pub fn wait_after(&self, n: u32, outcome: &Result<Response, Error>) -> Duration {
        let backoff = self
            .first_wait
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX));
        let asked = outcome
            .as_ref()
            .ok()
            .and_then(|r| r.header("retry-after"))
            .and_then(|v| {
                let v = v.trim();
                match v.parse::<u64>() {
                    Ok(secs) => Some(Duration::from_secs(secs)),
                    Err(_) => httpdate::parse_http_date(v)
                        .ok()
                        .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok()),
                }
            })
            .unwrap_or_default();
        backoff.max(asked)
    }
}

/// What a failed connect to `n` addresses is: past the deadline a
/// timeout, with no address a failed lookup, else the last error.
fn connect_error(n: usize, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::TimedOut => Error::Timeout,
        _ if n == 0 => Error::Resolve(e),
        _ => Error::Connect(n, e),
    }
}
