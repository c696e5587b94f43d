//! The admin port's HTTP server: accepts connections from allowlisted
//! peers, reads one request each (head and body, bounded), hands it to
//! the routing table and writes the answer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use super::{routes, Admin};
use crate::dataplane::accept::Spare;
use crate::dataplane::buf::{Buf, BufferPool};
use crate::dataplane::http;
use crate::dataplane::io::{timeout, Conn, Duplex};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// Connections the admin port holds at once. One more closes the oldest
/// that is not being answered (see [`Conns`]): so a flood of connections
/// that send nothing, or a request a byte at a time, holds at most this
/// many descriptors (the client port's streams need the rest) and
/// request buffers (72 KiB each), and cannot lock an operator out.
pub const MAX_CONNECTIONS: usize = 256;

/// The admin port's open connections, oldest first.
///
/// A connection is evicted (closed, unanswered) when a new one comes
/// and [`MAX_CONNECTIONS`] are open: the oldest one still reading its
/// request, or writing its answer to a client that does not read. One
/// whose request is being handled is never evicted, so no change is cut
/// off halfway. A scrape or an API call takes milliseconds, so what is
/// evicted is what has waited longest: a slow client's, not the next
/// operator's.
#[derive(Default)]
struct Conns {
    next: Cell<u64>,
    open: RefCell<VecDeque<Slot>>,
}

struct Slot {
    id: u64,
    /// Its request is being handled: not evicted.
    handling: bool,
    /// Dropped to evict it: its [`Ticket`] sees the channel closed.
    _evict: async_channel::Sender<()>,
}

impl Conns {
    /// A place for a new connection, evicting the oldest evictable one
    /// when all are taken; `None` when every one is being handled.
    fn admit(self: &Rc<Self>) -> Option<Ticket> {
        let mut open = self.open.borrow_mut();
        if open.len() >= MAX_CONNECTIONS {
            let oldest = open.iter().position(|s| !s.handling)?;
            open.remove(oldest);
        }
        let id = self.next.get();
        self.next.set(id + 1);
        let (tx, rx) = async_channel::bounded(1);
        open.push_back(Slot {
            id,
            handling: false,
            _evict: tx,
        });
        Some(Ticket {
            id,
            conns: self.clone(),
            evicted: rx,
        })
    }
}

/// One connection's place in [`Conns`], given back when dropped.
struct Ticket {
    id: u64,
    conns: Rc<Conns>,
    evicted: async_channel::Receiver<()>,
}

impl Ticket {
    /// Runs `fut` unless the connection is evicted first (`None`).
    async fn unless_evicted<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(fut.await) }, async {
            let _ = self.evicted.recv().await;
            None
        })
        .await
    }

    /// Marks the connection as being handled (`true`) or not; false when
    /// it has been evicted already.
    fn handling(&self, on: bool) -> bool {
        let mut open = self.conns.open.borrow_mut();
        match open.iter_mut().find(|s| s.id == self.id) {
            Some(slot) => {
                slot.handling = on;
                true
            }
            None => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.conns.open.borrow_mut().retain(|s| s.id != self.id);
    }
}

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
    /// For a route that reads a body: a 411 when the request has no
    /// `Content-Length`, whose body (if any was sent) is not read, as a
    /// chunked one is not. Without this its body read as empty and was
    /// answered "not valid JSON".
    pub(super) fn length_required(&self) -> Result<(), Vec<u8>> {
        match self.header("content-length") {
            Some(_) => Ok(()),
            None => Err(http::json_error(
                411,
                "send the body with a Content-Length (a request without one has no body)",
            )),
        }
    }

    /// The value of header `name` (case-insensitive).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// Every value of header `name` (case-insensitive), in order: a list
    /// header sent on several lines is one list (RFC 9110 §5.3).
    pub(super) fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
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
    let conns = Rc::new(Conns::default());
    let full = crate::dataplane::accept::Rate::new(
        "admin port at its connection limit; closed the oldest connection not being answered",
    );
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
        if conns.open.borrow().len() >= MAX_CONNECTIONS {
            full.hit("admin", &format_args!("{MAX_CONNECTIONS} connections open"));
        }
        let Some(ticket) = conns.admit() else {
            continue; // every one is being answered: this one is closed
        };
        glommio::spawn_local(serve(admin.clone(), pool.clone(), tcp, ticket)).detach();
        // The new connection's task runs before the next accept, so a
        // request already there (a scrape's comes with its connection) is
        // read and being answered, not evictable, when 256 more come in a
        // burst (a backlog accepted at once, a flood of connections).
        futures_lite::future::yield_now().await;
    }
}

/// Reads one request from `tcp`, answers it and closes; an evicted
/// connection (see [`Conns`]) is closed where it is, unless its request
/// is being handled.
async fn serve(
    admin: Rc<Admin>,
    pool: Rc<BufferPool>,
    tcp: glommio::net::TcpStream,
    ticket: Ticket,
) {
    let mut buf = pool.get();
    // What came with the connection (a scrape's whole request) is read
    // now: glommio's first read of a socket it has just taken waits for a
    // reactor turn, and in a burst of accepts that turn came only after
    // 256 more connections had evicted this one, its request unread.
    buf.read_now(std::os::fd::AsRawFd::as_raw_fd(&tcp));
    let conn = Duplex::new(Conn::Plain(tcp.into()));
    let read = timeout(Duration::from_secs(10), read_request(&conn, &mut buf));
    let Some(read) = ticket.unless_evicted(read).await else {
        return;
    };
    if !ticket.handling(true) {
        return; // evicted as its request completed
    }
    // Counted until its answer is written: a stop lets it finish.
    let answering = super::file_turns::Counted::new(&admin.answering);
    let answer = match read {
        Some(Ok(n)) => match parse_request(&buf.filled()[..n]) {
            Some(req) => routes::route(&admin, &req).await,
            None => http::json_error(400, "malformed HTTP request"),
        },
        Some(Err((status, why))) => http::json_error(status, why),
        None => http::json_error(408, "the request did not arrive within 10 s"),
    };
    ticket.handling(false);
    drop(buf);
    // A client that stops reading does not keep the answer (a scrape's is
    // the largest) and the connection: the same bound as the request's.
    let written = timeout(Duration::from_secs(10), conn.write_all(&answer));
    let written = ticket.unless_evicted(written).await;
    drop(answering);
    if !matches!(written, Some(Some(Ok(_)))) {
        return;
    }
    // No reset: a client still sending (a 413 body) that reads late still
    // gets the answer.
    ticket
        .unless_evicted(http::close_gracefully(&conn, Duration::from_secs(2)))
        .await;
}

/// Reads a request head and its body (by `Content-Length`) into `buf`;
/// returns the total length, or an HTTP status to refuse with and why.
async fn read_request(conn: &Duplex, buf: &mut Buf) -> Result<usize, (u16, &'static str)> {
    let head = http::read_head(conn, buf, 8192)
        .await
        .map_err(|e| match e {
            http::HeadError::TooLarge => (431u16, "request head over 8 KiB"),
            http::HeadError::Tls => (
                400u16,
                "a TLS handshake on the admin port, which speaks plain HTTP (http://)",
            ),
            _ => (400u16, "malformed HTTP request"),
        })?;
    let head_bytes = &buf.filled()[..head];
    let mut headers = http::header_slots(head_bytes);
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head_bytes).is_err() {
        return Err((400, "malformed HTTP request"));
    }
    if let Some(why) = http::head_fault(req.headers, req.version == Some(1)) {
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
        // Digits only (RFC 9110): `parse` also takes a leading `+`.
        (Some(h), None) => std::str::from_utf8(h.value)
            .ok()
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<usize>().ok())
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
