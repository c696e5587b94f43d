//! The client over a std `TcpStream`, for `clio-relay keys` and the tests:
//! the same writer and parser as the glommio form, with the deadline set
//! as the socket's timeouts before each read and write.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::{connect_error, write_request, Endpoint, Error, Parser, Request, Response};

/// Sends `req` to `ep` and reads the answer, all within `limit`.
pub fn send(ep: &Endpoint, req: &Request<'_>, limit: Duration) -> Result<Response, Error> {
    let deadline = Instant::now() + limit;
    let addrs: Vec<SocketAddr> = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(Error::Resolve)?
        .collect();
    send_to(&addrs, ep, req, deadline)
}

/// [`send`] to the given addresses (tried in order) instead of resolving
/// `ep.host`; `ep` still gives the `Host` header and the TLS name.
pub fn send_to(
    addrs: &[SocketAddr],
    ep: &Endpoint,
    req: &Request<'_>,
    deadline: Instant,
) -> Result<Response, Error> {
    let bytes = write_request(&ep.authority(), req)?;
    let tcp = connect_any(addrs, deadline)?;
    let _ = tcp.set_nodelay(true);
    let mut parser = Parser::new(req.method, req.max_body);
    match &ep.tls {
        None => exchange(Timed { tcp, deadline }, &bytes, &mut parser)?,
        Some(cfg) => {
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|_| Error::Url("not a TLS server name".into()))?;
            let conn = rustls::ClientConnection::new(cfg.clone(), name)
                .map_err(|e| Error::Tls(std::io::Error::other(e)))?;
            let mut tls = rustls::StreamOwned::new(conn, Timed { tcp, deadline });
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .map_err(|e| io_error(e, Error::Tls))?;
            }
            exchange(tls, &bytes, &mut parser)?
        }
    }
    parser.finish()
}

/// Connects to the first address that answers, the attempts staggered
/// ([`crate::core::dial::connect_first`]).
pub fn connect_any(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, Error> {
    crate::core::dial::connect_first(addrs, deadline).map_err(|e| connect_error(addrs.len(), e))
}

/// Writes the request and reads the answer. A server may answer and close
/// before taking the whole request (a 413 for a large body): when the
/// write fails, what it answered is still read, and the write's error is
/// returned only if there is no whole answer.
fn exchange(mut s: impl Read + Write, bytes: &[u8], parser: &mut Parser) -> Result<(), Error> {
    match s.write_all(bytes).and_then(|_| s.flush()) {
        Ok(()) => read_answer(s, parser),
        Err(e) => match io_error(e, Error::Io) {
            Error::Timeout => Err(Error::Timeout),
            write_error => read_answer(s, parser).map_err(|_| write_error),
        },
    }
}

fn read_answer(mut s: impl Read, parser: &mut Parser) -> Result<(), Error> {
    let mut chunk = [0u8; 8192];
    while !parser.done() {
        match s.read(&mut chunk) {
            Ok(0) => return parser.eof(),
            Ok(n) => parser.push(&chunk[..n])?,
            // A TLS peer that closes without close_notify: the parser
            // decides whether the body was complete.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return parser.eof(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e, Error::Io)),
        }
    }
    Ok(())
}

fn io_error(e: std::io::Error, wrap: fn(std::io::Error) -> Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout,
        _ => wrap(e),
    }
}

/// A socket whose every read and write ends by the deadline.
struct Timed {
    tcp: TcpStream,
    deadline: Instant,
}

impl Timed {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_write_timeout(Some(left))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}
