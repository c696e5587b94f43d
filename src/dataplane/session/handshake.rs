//! Accepting a client: the HTTP request head, the session token on it,
//! capacity, and the 101 answer.

use std::rc::Rc;
use std::time::{Instant, SystemTime};

use crate::dataplane::uring::RingSocket;

use crate::core::metrics::{RefusedBy, Side};
use crate::core::token::Claims;
use crate::dataplane::buf::Buf;
use crate::dataplane::http::{self, HeadError};
use crate::dataplane::io::{timeout, Conn, Duplex};
use crate::dataplane::proxy_header;
use crate::dataplane::shard::{AdmitPermit, Settings, Shard};
use crate::dataplane::unauth;

use super::Stream;

/// Serves one accepted client connection to the end.
///
/// Its future is the stream's task, kept for the stream's whole life, so
/// it holds the upgrade's future and then the stream's in the same place
/// and nothing else: an `async move` block (an `async fn` keeps its
/// arguments twice), the upgrade in a function of its own whose result
/// moves into the stream.
#[allow(clippy::manual_async_fn)] // the point: see above
pub fn serve(shard: Rc<Shard>, tcp: RingSocket) -> impl std::future::Future<Output = ()> {
    // Counted until it closes: a drain and a stop wait for it, stream or
    // not. Counted here, as the accept loop spawns its task, not at the
    // task's first poll: once a shard's listener is closed, the count
    // holds every connection it accepted.
    let open = shard.process.connection();
    async move {
        let _open = open;
        let Some((stream, client, cbuf, claims, pending)) = upgrade(shard, tcp).await else {
            return;
        };
        stream.run(client, cbuf, claims, pending).await;
    }
}

/// Who refused a balancer's missing, bad or late PROXY header, and whose
/// error it is: the peer's request, with a reason of its own in
/// `clio_relay_refusals_total`.
const PROXY_HEADER: (RefusedBy, Side) = (RefusedBy::ProxyHeader, Side::Client);

/// What a connection still without a stream is told when a drain ends
/// (HTTP 503), and a request that comes after.
const DRAINING: &str = "relay is draining; reconnect";

/// The refusal of a TLS handshake on a client port without `[tls]`.
const TLS_ON_PLAIN_PORT: &str =
    "a TLS handshake on a port without TLS: connect with ws://, or set [tls] on the relay";

/// What [`upgrade`] hands to the stream: the stream, the client's
/// connection and read buffer, the token's claims if they came on the
/// request, and otherwise the connection's place in the unauthenticated
/// pool.
type Upgraded = (Stream, Duplex, Buf, Option<Claims>, Option<unauth::Place>);

/// Everything before the stream: the client's TLS, its request head and
/// token, and the 101. `None` once the connection is answered or gone.
async fn upgrade(shard: Rc<Shard>, tcp: RingSocket) -> Option<Upgraded> {
    let accepted = Instant::now();
    // Nagle's algorithm is off already (the listener's, inherited). What a
    // client can make the relay's kernel hold is bounded both ways: what it
    // sent and the relay has not read (the receive buffer), and the
    // results it has not read (the bytes left unsent).
    let socket_buffer = shard.settings().limits.socket_buffer;
    crate::dataplane::upstream::cap_receive_buffer(&tcp, socket_buffer);
    crate::dataplane::upstream::bound_unsent(&tcp, socket_buffer);
    let settings = shard.settings();
    // `limits.handshake_timeout` runs from the accept, over a balancer's
    // PROXY header, the TLS handshake and the request head together.
    let deadline = accepted + settings.limits.handshake_timeout;
    // A balancer in `server.proxy_protocol_from` says who the client is,
    // in a header before anything else (TLS included); from anyone else no
    // header is looked for.
    let mut carried = None;
    if !settings.proxy_protocol_from.is_empty() {
        // A connection reset before this look has no peer address left
        // (HAProxy's TCP check sends its header and resets at once): it
        // is gone, not an untrusted peer whose header is a bad request.
        let Ok(balancer) = tcp.peer_addr() else {
            return None;
        };
        if proxy_header::trusted(&settings.proxy_protocol_from, balancer) {
            // Boxed: read once per connection, never kept while it streams.
            let read = boxed!(drain_or(
                &shard,
                timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    proxy_header::read(&tcp, settings.limits.max_header_bytes),
                ),
            ));
            let refusal = match read.await {
                Some(Some(Ok(client))) => {
                    carried = client;
                    None
                }
                // Gone, with nothing said: no one to answer.
                Some(Some(Err(None))) => return None,
                Some(Some(Err(Some(why)))) => Some((why.status(), why.message(), PROXY_HEADER)),
                Some(None) => Some((
                    408,
                    "PROXY protocol header not received in time".to_string(),
                    PROXY_HEADER,
                )),
                None => Some((
                    503,
                    DRAINING.to_string(),
                    (RefusedBy::Relay, Side::Internal),
                )),
            };
            if let Some((status, reason, (by, side))) = refusal {
                // Boxed too: rare, and its state is not the stream's.
                boxed!(refuse_before_head(
                    &shard, tcp, status, &reason, by, side, balancer,
                ))
                .await;
                return None;
            }
        }
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    // The client's address: the one a trusted balancer's header carried,
    // or the peer's, asked (a system call) only when needed.
    let peer = move || {
        carried.or_else(|| {
            // SAFETY: `fd` is the client socket, open for as long as
            // `client` below lives, and the closure is only called while
            // it does.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
        })
    };
    if !settings.allows(peer) {
        // No address left to check: reset before this look (a balancer's
        // check), gone rather than refused.
        peer()?;
        shard.metrics.stream_rejected(Side::Client, 403);
        // Logged like every refusal (within the budget), so an operator
        // whose clients cannot connect finds why.
        if shard.process.refusal_log.admit() {
            let peer = peer_text(peer());
            tracing::info!(
                shard = shard.index,
                %peer,
                status = 403,
                reason = "not on server.allow: the connection is closed unanswered",
                "request refused"
            );
        }
        return None; // not on server.allow: the connection is closed
    }
    let conn = match &settings.tls {
        None => Conn::Plain(tcp.into()),
        Some(tls) => {
            // Asked now: a failed handshake has closed the socket. One
            // system call beside a TLS handshake. None: reset already,
            // gone before it asked for anything (a balancer's check).
            let tls_peer = peer()?;
            let acceptor = futures_rustls::TlsAcceptor::from(tls.clone());
            // Boxed: a TLS handshake's state is larger than everything a
            // streaming task keeps, and is needed only for the first RTTs.
            // Each step in a turn (`turns`): a flood of hellos takes the
            // time the shard's streams leave, not theirs.
            let accept = crate::dataplane::turns::InTurn::new(boxed!(async move {
                // A connection closed (or reset) before its first byte asked
                // for nothing, as on the plain port: a balancer's TCP health
                // check, not a failed handshake to count and log.
                // The first bytes, as many as a PROXY v2 signature: a
                // balancer's header from an address not trusted to send one
                // is named as such when the handshake fails on it.
                let mut first = [0u8; 12];
                match std::future::poll_fn(|cx| tcp.poll_peek(cx, &mut first, 0)).await {
                    Ok(0) | Err(_) => None,
                    Ok(n) => {
                        let proxy_header = proxy_header::starts_with_signature(&first[..n]);
                        // A client that has shut its side (or reset) can
                        // never send its Finished: its hello, which may
                        // have waited for this turn until it gave up, is
                        // not answered with a signature.
                        if tcp.peer_gone_now() {
                            let gone = std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the client closed its side before the server's answer",
                            );
                            return Some(Err((gone, proxy_header)));
                        }
                        Some(
                            acceptor
                                .accept(tcp.into())
                                .await
                                .map_err(|e| (e, proxy_header)),
                        )
                    }
                }
            }));
            let accept = drain_or(
                &shard,
                timeout(deadline.saturating_duration_since(Instant::now()), accept),
            );
            match accept.await {
                // Closed before its first byte: gone, not failed.
                Some(Some(None)) => return None,
                Some(Some(Some(Ok(s)))) => Conn::TlsServer(Box::new(s)),
                // A drain ended before the handshake did: no HTTP to
                // answer in yet, so the connection is closed.
                None => {
                    shard.metrics.stream_rejected(Side::Internal, 503);
                    return None;
                }
                Some(failed) => {
                    // Failed (a first byte came), or not done in time.
                    let failed = failed.flatten();
                    // Counted as a request head would be: a bad request,
                    // or one not done in time.
                    let code = if failed.is_none() { 408 } else { 400 };
                    shard.metrics.stream_rejected(Side::Client, code);
                    // Said in the log (within the refusals' budget): a
                    // client refusing the relay's certificate shows here
                    // ("received fatal alert: UnknownCA"), and nowhere else.
                    if shard.process.refusal_log.admit() {
                        let peer = peer_text(Some(tls_peer));
                        match failed {
                            Some(Err((e, true))) => {
                                tracing::info!(shard = shard.index, %peer, error = %e, reason = UNTRUSTED_PROXY_HEADER_TLS, "TLS handshake failed")
                            }
                            Some(Err((e, false))) => {
                                tracing::info!(shard = shard.index, %peer, error = %e, "TLS handshake failed")
                            }
                            _ => {
                                tracing::info!(shard = shard.index, %peer, timeout = ?settings.limits.handshake_timeout, "TLS handshake not done within limits.handshake_timeout")
                            }
                        }
                    }
                    return None;
                }
            }
        }
    };
    let client = Duplex::new(conn);
    let mut cbuf = shard.pool.get();
    let Some((claims, admission)) =
        handshake(&shard, &settings, &client, &mut cbuf, peer, deadline).await
    else {
        // Answered (or gone): FIN, then the data plane reads and discards
        // what the client still sends until it closes too (as at a
        // stream's end), so a client that reads late gets the answer
        // rather than a reset.
        drop(cbuf);
        let _ = timeout(super::LAST_FRAMES_WAIT, client.close()).await;
        super::support::close_after_peer(client);
        return None;
    };
    let (permit, pending) = match admission {
        Admission::Stream(p) => (Some(p), None),
        Admission::Pending(p) => (None, Some(p)),
    };
    shard.metrics.record(
        crate::core::metrics::Hist::ClientHandshake,
        accepted.elapsed().as_micros() as u64,
    );
    let stream = Stream {
        id: shard.new_stream_id(),
        shard,
        settings,
        _permit: permit,
        pools: Default::default(),
        placed: Default::default(),
        resuming: Default::default(),
        moving_off: Default::default(),
        begun: Default::default(),
    };
    Some((stream, client, cbuf, claims, pending))
}

/// What a connection holds once upgraded.
enum Admission {
    /// The token came on the request: a `server.max_streams` slot.
    Stream(AdmitPermit),
    /// No token yet: a place in the unauthenticated pool, until the first
    /// message brings one (then the stream asks for its slot).
    Pending(unauth::Place),
}

/// Reads and answers the HTTP request, whose head must be in by
/// `deadline`. Returns the token's claims (if the token came on the
/// request) once the connection is a WebSocket.
async fn handshake(
    shard: &Rc<Shard>,
    settings: &Settings,
    client: &Duplex,
    buf: &mut Buf,
    peer: impl Fn() -> Option<std::net::SocketAddr>,
    deadline: Instant,
) -> Option<(Option<Claims>, Admission)> {
    let lim = &settings.limits;
    // Every refusal is counted, and logged at INFO within the process's
    // budget of lines (`log_budget`), with the peer's address; `msg`
    // never holds a token.
    let log_refusal = |status: u16, msg: &str| {
        if shard.process.refusal_log.admit() {
            let peer = peer_text(peer());
            tracing::info!(shard = shard.index, %peer, status, reason = msg, "request refused");
        }
    };
    let refuse = |status: u16, msg: &str, side: Side| {
        shard.metrics.stream_rejected(side, status);
        log_refusal(status, msg);
        http::json_error(status, msg)
    };
    let read = drain_or(
        shard,
        timeout(
            deadline.saturating_duration_since(Instant::now()),
            http::read_head(client, buf, lim.max_header_bytes),
        ),
    );
    let Some(head) = read.await else {
        // A drain ended before the request head came: the connection
        // carries no stream and holds the drain no longer.
        let _ = client
            .write_all(&refuse(503, DRAINING, Side::Internal))
            .await;
        return None;
    };
    let head_len = match head {
        None => {
            let _ = client
                .write_all(&refuse(
                    408,
                    "request head not received in time",
                    Side::Client,
                ))
                .await;
            return None;
        }
        Some(Err(HeadError::Io(_))) => return None,
        Some(Err(HeadError::TooLarge)) => {
            let _ = client
                .write_all(&refuse(431, "request head too large", Side::Client))
                .await;
            return None;
        }
        Some(Err(HeadError::Malformed)) => {
            let _ = client
                .write_all(&refuse(400, malformed(buf.filled()), Side::Client))
                .await;
            return None;
        }
        Some(Err(HeadError::Tls)) => {
            // A wss:// client at a port without [tls]: its TLS library
            // cannot read the answer (a "wrong version number"), but it
            // gets it at once, and the log says what happened.
            let _ = client
                .write_all(&refuse(400, TLS_ON_PLAIN_PORT, Side::Client))
                .await;
            return None;
        }
        Some(Ok(n)) => n,
    };
    let req = match http::parse_client_request(&buf.filled()[..head_len]) {
        Ok(r) => r,
        Err(_) => {
            let _ = client
                .write_all(&refuse(400, malformed(buf.filled()), Side::Client))
                .await;
            return None;
        }
    };
    buf.consume(head_len);
    // Answers before the upgrade; to a HEAD, without their bodies.
    let answer = |bytes: Vec<u8>| {
        if req.head {
            http::head_only(bytes)
        } else {
            bytes
        }
    };
    if let Some(why) = req.head_fault {
        let _ = client
            .write_all(&answer(refuse(400, why, Side::Client)))
            .await;
        return None;
    }
    match req.path.as_str() {
        "/v1/transcribe" if !req.get => {
            shard.metrics.stream_rejected(Side::Client, 405);
            log_refusal(405, "method not allowed");
            let _ = client
                .write_all(&answer(http::response(
                    405,
                    "application/json",
                    "Allow: GET\r\n",
                    br#"{"error_code":405,"error_message":"the stream endpoint takes GET (a WebSocket upgrade)"}"#,
                )))
                .await;
            return None;
        }
        "/v1/transcribe" if http::wrong_websocket_version(&req) => {
            shard.metrics.stream_rejected(Side::Client, 426);
            log_refusal(426, "unsupported WebSocket version");
            let _ = client
                .write_all(&http::response(
                    426,
                    "application/json",
                    "Sec-WebSocket-Version: 13\r\n",
                    br#"{"error_code":426,"error_message":"unsupported WebSocket version; this relay speaks version 13"}"#,
                ))
                .await;
            return None;
        }
        "/v1/transcribe" => {}
        "/healthz" => {
            let (status, body) = if shard.process.draining() {
                (503, "draining\n")
            } else {
                (200, "ok\n")
            };
            let _ = client
                .write_all(&answer(http::response(
                    status,
                    "text/plain",
                    "",
                    body.as_bytes(),
                )))
                .await;
            return None;
        }
        _ => {
            let _ = client
                .write_all(&answer(refuse(
                    404,
                    "not found: the stream endpoint is /v1/transcribe",
                    Side::Client,
                )))
                .await;
            return None;
        }
    }
    let claims = match &req.token {
        Some((token, _)) => match settings.tokens.verify(token, SystemTime::now()) {
            Ok(c) => Some(c),
            Err(e) => {
                let why = format!("session token refused: {e}");
                shard.metrics.stream_rejected(Side::Client, 401);
                log_refusal(401, &why);
                let _ = client.write_all(&http::invalid_token(&why)).await;
                return None;
            }
        },
        None => None,
    };
    // Draining, a connection accepted before the listeners closed is still
    // served while begun streams run; once the drain stopped waiting for
    // them, a new stream is refused.
    if shard.process.finalizing() {
        let _ = client
            .write_all(&refuse(503, DRAINING, Side::Internal))
            .await;
        return None;
    }
    let admission = if claims.is_some() {
        let Some(permit) = shard.process.admit() else {
            let _ = client
                .write_all(&refuse(
                    503,
                    "relay at capacity (server.max_streams); try again later",
                    Side::Internal,
                ))
                .await;
            return None;
        };
        Admission::Stream(permit)
    } else {
        // The token will come in the first message: no stream slot until it
        // has, only a place in the bounded pool of such connections.
        match unauth::admit(
            shard,
            peer().map(unauth::address_of),
            lim.max_unauthenticated,
            lim.max_unauthenticated_per_address,
        ) {
            Ok(place) => Admission::Pending(place),
            Err(unauth::Full::Shard) => {
                let _ = client
                    .write_all(&refuse(
                        503,
                        "too many connections waiting to authenticate (limits.max_unauthenticated); send the token on the request, or try again later",
                        Side::Internal,
                    ))
                    .await;
                return None;
            }
            Err(unauth::Full::Address) => {
                let _ = client
                    .write_all(&refuse(
                        429,
                        "too many connections without a session token from this address (limits.max_unauthenticated_per_address)",
                        Side::Client,
                    ))
                    .await;
                return None;
            }
        }
    };
    let Some(answer) = http::upgrade_response(&req) else {
        let _ = client
            .write_all(&refuse(
                400,
                "not a WebSocket upgrade request",
                Side::Client,
            ))
            .await;
        return None;
    };
    if client.write_all(&answer).await.is_err() {
        return None;
    }
    Some((claims, admission))
}

/// `read`'s result, or `None` once a drain has stopped waiting for
/// streams (see [`Shard::drain_ended`]): a connection not yet upgraded
/// does not hold a drain.
async fn drain_or<T>(shard: &Shard, read: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(read.await) }, async {
        shard.drain_ended().await;
        None
    })
    .await
}

/// Refuses a connection before its request head (a balancer's PROXY
/// header missing, bad or late, or a drain that ended before it came):
/// counted and logged as a request refused (the log names the balancer,
/// as the client is not known), answered in plain HTTP (before any TLS),
/// then closed after the peer.
async fn refuse_before_head(
    shard: &Shard,
    tcp: RingSocket,
    status: u16,
    reason: &str,
    by: RefusedBy,
    side: Side,
    balancer: std::net::SocketAddr,
) {
    shard.metrics.stream_refused(by, side, status);
    if shard.process.refusal_log.admit() {
        tracing::info!(shard = shard.index, peer = %balancer, status, reason, "request refused");
    }
    let client = Duplex::new(Conn::Plain(tcp.into()));
    let _ = timeout(
        super::LAST_FRAMES_WAIT,
        client.write_all(&http::json_error(status, reason)),
    )
    .await;
    let _ = timeout(super::LAST_FRAMES_WAIT, client.close()).await;
    super::support::close_after_peer(client);
}

/// What a request that does not parse is told: a balancer's PROXY header
/// from an address not in `server.proxy_protocol_from` is said as such
/// (a balancer with `send-proxy-v2` and the relay without the setting
/// fails every stream, and "malformed HTTP request" alone did not say why).
fn malformed(bytes: &[u8]) -> &'static str {
    if proxy_header::starts_with_signature(bytes) {
        UNTRUSTED_PROXY_HEADER
    } else {
        "malformed HTTP request"
    }
}

/// The refusal of a PROXY header from an address not trusted to send one.
const UNTRUSTED_PROXY_HEADER: &str = "malformed HTTP request: it starts with a PROXY protocol \
     header, and this address is not in server.proxy_protocol_from";

/// Why a TLS handshake that began with such a header failed.
const UNTRUSTED_PROXY_HEADER_TLS: &str = "the connection starts with a PROXY protocol header, \
     and this address is not in server.proxy_protocol_from";

/// A peer's address for a log line, or `-` when the socket no longer has
/// one.
fn peer_text(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "-".to_owned(), |p| p.to_string())
}
