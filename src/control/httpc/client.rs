//! The client on glommio, for the admin thread: health checks, usage
//! reconciliation and the alert webhook. The whole request runs under one
//! timer. A host name's addresses are kept per thread ([`Addresses`], the
//! upstream dial's): once the name has resolved, a request goes to the
//! addresses kept while the resolver is asked again in the background, and
//! they go on serving while it fails or does not answer; before, the
//! requests wait for the name's one lookup, each within its own time limit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsConnector;
use rustls::pki_types::ServerName;

use super::{connect_error, write_request, Endpoint, Error, Parser, Request, Response, Retry};
use crate::core::dial::{Addresses, Said};
use crate::dataplane::io::timeout;

/// What the log says when a request's host name stops resolving (the
/// addresses it had go on serving), and when it resolves again.
const SAID: Said = Said {
    failing: "the host name of the admin thread's requests (health checks, usage reconciliation, alert webhook) did not resolve; its requests go to the addresses it had",
    again: "the host name of the admin thread's requests resolves again",
};

/// The most host names whose addresses a thread keeps: the REST hosts of
/// the pools and the webhook's, which a reload may change; past it, the
/// name used least recently is forgotten.
const KEPT_NAMES: usize = 64;

thread_local! {
    /// The addresses of each `(host, port)` this thread's requests went
    /// to, and when a request last went there.
    static KEPT: RefCell<HashMap<(String, u16), (Addresses, Instant)>> = RefCell::default();
}

/// `ep`'s host's addresses as this thread keeps them (made on first use).
fn kept(ep: &Endpoint) -> Addresses {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        let now = Instant::now();
        let name = (ep.host.clone(), ep.port);
        if let Some((addrs, used)) = kept.get_mut(&name) {
            *used = now;
            return addrs.clone();
        }
        if kept.len() >= KEPT_NAMES {
            let oldest = kept
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                kept.remove(&oldest);
            }
        }
        let addrs = Addresses::new(&ep.host, ep.port, SAID);
        kept.insert(name, (addrs.clone(), now));
        addrs
    })
}

/// Sends `req` to `ep` and reads the answer, all within `limit`. With no
/// address of `ep.host` known yet and no answer from the resolver within
/// `limit`: [`Error::Resolve`] (timed out), not [`Error::Timeout`].
pub async fn send(ep: &Endpoint, req: &Request<'_>, limit: Duration) -> Result<Response, Error> {
    let deadline = Instant::now() + limit;
    // An IP address is its own answer there, with no lookup.
    let addrs = kept(ep);
    let found = match timeout(limit, addrs.get()).await {
        Some(Ok(found)) => found,
        Some(Err(e)) => return Err(Error::Resolve(e)),
        None => {
            return Err(Error::Resolve(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from the resolver within the request's time limit",
            )))
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    timeout(left, send_inner(&found, ep, req, deadline, Some(&addrs)))
        .await
        .unwrap_or(Err(Error::Timeout))
}

/// [`send`] to the given addresses (tried in order) instead of resolving
/// `ep.host`; `ep` still gives the `Host` header and the TLS name.
pub async fn send_to(
    addrs: &[SocketAddr],
    ep: &Endpoint,
    req: &Request<'_>,
    limit: Duration,
) -> Result<Response, Error> {
    let deadline = Instant::now() + limit;
    timeout(limit, send_inner(addrs, ep, req, deadline, None))
        .await
        .unwrap_or(Err(Error::Timeout))
}

/// [`send`] again while [`Retry::should_retry`] says so, waiting
/// [`Retry::wait_after`] between tries, each try within `per_try` and all
/// within `retry.total`. Returns the last outcome and how many tries it took.
pub async fn send_with_retry(
    ep: &Endpoint,
    req: &Request<'_>,
    per_try: Duration,
    retry: Retry,
) -> (Result<Response, Error>, u32) {
    let end = Instant::now() + retry.total;
    let mut n = 1;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let outcome = send(ep, req, per_try.min(left)).await;
        if n >= retry.attempts || !Retry::should_retry(&outcome) {
            return (outcome, n);
        }
        let wait = retry.wait_after(n, &outcome);
        // A wait no clock can add (a `Retry-After` of u64::MAX seconds)
        // is past the bound too.
        if Instant::now().checked_add(wait).is_none_or(|at| at >= end) {
            return (outcome, n);
        }
        glommio::timer::sleep(wait).await;
        n += 1;
    }
}

async fn send_inner(
    addrs: &[SocketAddr],
    ep: &Endpoint,
    req: &Request<'_>,
    deadline: Instant,
    kept: Option<&Addresses>,
) -> Result<Response, Error> {
    let bytes = write_request(&ep.authority(), req)?;
    let (addr, tcp) = connect_any(addrs, deadline).await?;
    if let Some(kept) = kept {
        kept.connected(addr);
    }
    let _ = tcp.set_nodelay(true);
    let mut parser = Parser::new(req.method, req.max_body);
    match &ep.tls {
        None => exchange(tcp, &bytes, &mut parser).await?,
        Some(cfg) => {
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|_| Error::Url("not a TLS server name".into()))?;
            let tls = TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(Error::Tls)?;
            exchange(tls, &bytes, &mut parser).await?
        }
    }
    parser.finish()
}

/// Connects to the first address that answers, the attempts staggered
/// ([`crate::core::dial::first_to_connect`]), all within `deadline`;
/// returns it and its connection.
pub async fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<(SocketAddr, glommio::net::TcpStream), Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    let any = crate::core::dial::first_to_connect(
        addrs,
        crate::core::dial::attempt_delay(left),
        |addr| async move {
            glommio::net::TcpStream::connect(addr)
                .await
                .map_err(std::io::Error::from)
        },
        |_| false,
    );
    match timeout(left, any).await {
        None => Err(Error::Timeout),
        Some(r) => r.map_err(|e| connect_error(addrs.len(), e)),
    }
}

async fn exchange(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    bytes: &[u8],
    parser: &mut Parser,
) -> Result<(), Error> {
    // As in the blocking form: an answer sent before the server took the
    // whole request is still read.
    let wrote = match s.write_all(bytes).await {
        Ok(()) => s.flush().await,
        Err(e) => Err(e),
    };
    match wrote {
        Ok(()) => read_answer(s, parser).await,
        Err(e) => read_answer(s, parser).await.map_err(|_| Error::Io(e)),
    }
}

async fn read_answer(mut s: impl AsyncRead + Unpin, parser: &mut Parser) -> Result<(), Error> {
    let mut chunk = vec![0u8; 8192];
    while !parser.done() {
        match s.read(&mut chunk).await {
            Ok(0) => return parser.eof(),
            Ok(n) => parser.push(&chunk[..n])?,
            // A TLS peer that closes without close_notify: the parser
            // decides whether the body was complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return parser.eof(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(())
}
