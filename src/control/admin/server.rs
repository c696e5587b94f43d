//! The admin port's HTTP server: accepts connections from allowlisted
//! peers, reads one request each (head and body, bounded), hands it to
//! the routing table and writes the answer.

use std::rc::Rc;
use std::time::Duration;

use super::{routes, Admin};
use crate::dataplane::accept::Spare;
use crate::dataplane::buf::{Buf, BufferPool};
use crate::dataplane::http;
use crate::dataplane::io::{timeout, Conn, Duplex};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// A parsed admin request.
#[derive(Debug)]
pub(super) struct Request<'a> {
    pub(super) method: &'a str,
    pub(super) path: &'a str,
    pub(super) query: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    pub(super) body: &'a [u8],
}

impl Request<'_> {
    /// The value of header `name` (case-insensitive).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Accepts admin connections (allowlisted peers only) and answers each on
/// its own task; never ends.
pub(super) async fn accept_loop(
    admin: &Rc<Admin>,
    listener: glommio::net::TcpListener,
    spare: &Spare,
) {
    let pool = BufferPool::new(MAX_BODY + 8192, 2, 16);
    let errors = crate::dataplane::accept::AcceptErrors::new("admin", true);
    loop {
        let tcp = match listener.accept().await {
            Ok(tcp) => {
                errors.succeeded();
                spare.refill();
                tcp
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                let wait = errors.failed(&admin.process.faults, &e);
                if crate::dataplane::accept::is_file_limit(&e) && spare.release() {
                    continue; // a descriptor is free now: accept again at once
                }
                glommio::timer::Timer::new(wait).await;
                spare.refill();
                continue;
            }
        };
        if !admin.allowed(|| tcp.peer_addr().ok()) {
            continue; // dropped: not on the allowlist
        }
        glommio::spawn_local(serve(admin.clone(), pool.clone(), tcp)).detach();
    }
}

/// Reads one request from `tcp`, answers it and closes.
async fn serve(admin: Rc<Admin>, pool: Rc<BufferPool>, tcp: glommio::net::TcpStream) {
    let conn = Duplex::new(Conn::Plain(tcp.into()));
    let mut buf = pool.get();
    let answer = match timeout(Duration::from_secs(10), read_request(&conn, &mut buf)).await {
        Some(Ok(n)) => match parse_request(&buf.filled()[..n]) {
            Some(req) => routes::route(&admin, &req).await,
            None => http::json_error(400, "malformed HTTP request"),
        },
        Some(Err((status, why))) => http::json_error(status, why),
        None => return,
    };
    // A client that stops reading does not keep the answer (a scrape's is
    // the largest) and the connection: the same bound as the request's.
    if timeout(Duration::from_secs(10), conn.write_all(&answer))
        .await
        .is_none()
    {
        return;
    }
    // No reset: a client still sending (a 413 body) that reads late still
    // gets the answer.
    http::close_gracefully(&conn, Duration::from_secs(2)).await;
}

/// Reads a request head and its body (by `Content-Length`) into `buf`;
/// returns the total length, or an HTTP status to refuse with and why.
async fn read_request(conn: &Duplex, buf: &mut Buf) -> Result<usize, (u16, &'static str)> {
    let head = http::read_head(conn, buf, 8192)
        .await
        .map_err(|e| match e {
            http::HeadError::TooLarge => (431u16, "request head over 8 KiB"),
            _ => (400u16, "malformed HTTP request"),
        })?;
    let head_bytes = &buf.filled()[..head];
    let mut headers = http::header_slots(head_bytes);
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head_bytes).is_err() {
        return Err((400, "malformed HTTP request"));
    }
    if let Some(why) = http::host_fault(req.headers, req.version == Some(1)) {
        return Err((400, why));
    }
    let named = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };
    if named("transfer-encoding").next().is_some() {
        // Not read: a body is sent whole, with its length.
        return Err((
            411,
            "send the body with a Content-Length (chunked bodies are not read)",
        ));
    }
    let mut lengths = named("content-length");
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(h), None) => std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or((400, "Content-Length is not a number"))?,
        (Some(_), Some(_)) => return Err((400, "more than one Content-Length")),
    };
    if length > MAX_BODY {
        return Err((413, "request body over 64 KiB"));
    }
    while buf.len() < head + length {
        match buf.read_from(conn).await {
            Ok(0) | Err(_) => return Err((400, "request body shorter than its Content-Length")),
            Ok(_) => {}
        }
    }
    Ok(head + length)
}

fn parse_request(bytes: &[u8]) -> Option<Request<'_>> {
    let mut headers = http::header_slots(bytes);
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = req
        .headers
        .iter()
        .filter_map(|h| Some((h.name, std::str::from_utf8(h.value).ok()?)))
        .collect();
    Some(Request {
        method: req.method?,
        path,
        query,
        headers,
        body: &bytes[head..],
    })
}
