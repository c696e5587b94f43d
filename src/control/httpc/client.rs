//! The client on glommio, for the admin thread: health checks, usage
//! reconciliation and the alert webhook. Names are resolved on glommio's
//! blocking pool; the whole request runs under one timer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsConnector;
use rustls::pki_types::ServerName;

use super::{connect_error, write_request, Endpoint, Error, Parser, Request, Response, Retry};
use crate::dataplane::io::timeout;

/// Sends `req` to `ep` and reads the answer, all within `limit`.
pub async fn send(ep: &Endpoint, req: &Request<'_>, limit: Duration) -> Result<Response, Error> {
    let deadline = Instant::now() + limit;
    timeout(limit, async {
        let (host, port) = (ep.host.clone(), ep.port);
        let addrs: Vec<SocketAddr> = glommio::executor()
            .spawn_blocking(move || {
                std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map(|a| a.collect())
            })
            .await
            .map_err(Error::Resolve)?;
        send_inner(&addrs, ep, req, deadline).await
    })
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
    timeout(limit, send_inner(addrs, ep, req, deadline))
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
        if Instant::now() + wait >= end {
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
) -> Result<Response, Error> {
    let bytes = write_request(&ep.authority(), req)?;
    let tcp = connect_any(addrs, deadline).await?;
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
/// ([`crate::core::dial::first_to_connect`]), all within `deadline`.
pub async fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<glommio::net::TcpStream, Error> {
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
        Some(r) => r
            .map(|(_, tcp)| tcp)
            .map_err(|e| connect_error(addrs.len(), e)),
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
