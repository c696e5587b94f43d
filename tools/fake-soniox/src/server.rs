//! Executors, listeners, TLS, the split between WebSocket upgrades and REST
//! requests, and the upgrade-time checks.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_tungstenite::WebSocketStream;
use futures_lite::future;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;

use super::rest;
use super::session::{Session, Upgrade};
use super::{AuthVia, Shared};

/// io_uring depth of each executor, as the relay's shards use it.
const RING_DEPTH: usize = 4096;

/// The only path Soniox serves the real-time API on.
pub(crate) const PATH: &str = "/transcribe-websocket";

/// Largest message the fake accepts (a sane bound; audio frames are ~4 kB).
const MAX_MESSAGE: usize = 1 << 20;

/// Starts shard `n` on its own executor thread; returns once it listens.
pub(crate) fn spawn_shard(
    n: usize,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: async_channel::Receiver<()>,
) -> std::io::Result<(glommio::ExecutorJoinHandle<()>, SocketAddr)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        // The locked-memory limit is 8 MiB; glommio's default is 10 MiB.
        .io_memory(512 << 10)
        // Thousands of waiting sockets: the relay's shards use the same
        // depth (a deeper ring has more cancel-table buckets, so a poll is
        // found without walking long chains).
        .ring_depth(RING_DEPTH)
        .name(&format!("fake-soniox-{n}"))
        .spawn(move || async move {
            // glommio's bind sets SO_REUSEPORT, so shards share the port.
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            let _ = ready_tx.send(
                listener
                    .local_addr()
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
            accept_loop(listener, shared, stop).await;
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    match ready_rx.recv() {
        Ok(Ok(bound)) => Ok((handle, bound)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        // The executor did not start: the thread's result says why (a
        // locked-memory limit under glommio's 512 KiB, most often).
        Err(_) => Err(match handle.join() {
            Err(e) => std::io::Error::other(format!("fake-soniox shard did not start: {e}")),
            Ok(()) => std::io::Error::other("fake-soniox shard died while starting"),
        }),
    }
}

/// Accepts until `stop` closes; each connection gets its own task, which
/// also ends on `stop`. Returns once all of them have ended, so their
/// sockets are closed while the executor still runs.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: async_channel::Receiver<()>,
) {
    let live = Rc::new(Cell::new(0usize));
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.recv().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(tcp)) => {
                let shared = shared.clone();
                let stop = stop.clone();
                let guard = ConnGuard::new(&live);
                glommio::spawn_local(async move {
                    future::or(handle_conn(tcp, shared), async {
                        let _ = stop.recv().await;
                    })
                    .await;
                    drop(guard);
                })
                .detach();
            }
            Some(Err(e)) => {
                tracing::warn!("fake-soniox accept: {e}");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    while live.get() > 0 {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Counts a shard's live connection tasks.
struct ConnGuard(Rc<Cell<usize>>);

impl ConnGuard {
    fn new(live: &Rc<Cell<usize>>) -> ConnGuard {
        live.set(live.get() + 1);
        ConnGuard(live.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

async fn handle_conn(tcp: TcpStream, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let fd = tcp.as_raw_fd();
    match shared.cfg.tls.clone() {
        Some(tls) => match futures_rustls::TlsAcceptor::from(tls).accept(tcp).await {
            Ok(stream) => dispatch(stream, fd, shared).await,
            Err(e) => tracing::debug!("fake-soniox TLS accept: {e}"),
        },
        None => dispatch(tcp, fd, shared).await,
    }
}

/// Reads the request head: a WebSocket upgrade goes to [`upgrade`] (with the
/// bytes already read replayed first), anything else is a REST request.
async fn dispatch<S>(mut stream: S, fd: RawFd, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    match rest::read_head(&mut stream, &mut buf).await {
        Ok(Some(head)) if head.is_websocket_upgrade() => {
            upgrade(Replay::new(buf, stream), fd, shared).await;
        }
        Ok(Some(head)) => rest::serve(stream, buf, head, &shared).await,
        Ok(None) => {}
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            tracing::debug!("fake-soniox bad request head: {e}");
            rest::bad_request(stream, &shared, &e.to_string()).await;
        }
        Err(e) => tracing::debug!("fake-soniox reading a request head: {e}"),
    }
}

/// A stream that yields `buf[pos..]` before reading from `inner`: hands the
/// request head read by [`dispatch`] to the WebSocket handshake.
struct Replay<S> {
    buf: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(buf: Vec<u8>, inner: S) -> Replay<S> {
        Replay { buf, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            let n = out.len().min(this.buf.len() - this.pos);
            out[..n].copy_from_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Answers the upgrade (or refuses it) and runs the session.
// The callback's large `Err` type is tungstenite's `ErrorResponse`.
#[allow(clippy::result_large_err)]
async fn upgrade<S>(stream: S, fd: RawFd, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let delay = shared.cfg.faults.handshake_delay;
    if !delay.is_zero() {
        glommio::timer::sleep(delay).await;
    }
    let outcome: RefCell<Option<Upgrade>> = RefCell::new(None);
    let callback = |req: &Request, resp: Response| {
        let (result, up) = check_request(&shared, req, resp);
        *outcome.borrow_mut() = Some(up);
        result
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let up = outcome.into_inner();
    match (ws, up) {
        (Ok(ws), Some(up)) => run_session(ws, up, fd, shared).await,
        (Err(e), Some(up)) => {
            // Refused by us (the record says why) or failed mid-handshake.
            shared.with_record(up.id, |r| r.closed = true);
            tracing::debug!("fake-soniox upgrade {}: {e}", up.id);
        }
        (_, None) => {} // not a WebSocket upgrade at all: nothing to record
    }
}

async fn run_session<S>(ws: WebSocketStream<S>, up: Upgrade, fd: RawFd, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared.lock().active += 1;
    let _live = LiveSession {
        shared: shared.clone(),
        id: up.id,
    };
    Session::new(ws, up, fd, shared).run().await;
}

/// Marks a session over however its task ends (also when dropped on stop).
struct LiveSession {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.active -= 1;
        st.sessions[(self.id - 1) as usize].closed = true;
    }
}

/// Checks path, forbidden strings and the key of an upgrade request.
#[allow(clippy::result_large_err)]
fn check_request(
    shared: &Arc<Shared>,
    req: &Request,
    mut resp: Response,
) -> (Result<Response, ErrorResponse>, Upgrade) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().to_string());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut forbidden = false;
    for s in shared.cfg.forbidden.iter().filter(|s| !s.is_empty()) {
        if path.contains(s.as_str()) {
            shared.violation(format!(
                "forbidden string in request path {:?}",
                req.uri().path()
            ));
            forbidden = true;
        }
        for (k, v) in &headers {
            if v.contains(s.as_str()) || k.contains(s.as_str()) {
                shared.violation(format!("forbidden string in request header {k:?}"));
                forbidden = true;
            }
        }
    }
    let id = shared.new_session(path, headers);
    let mut up = Upgrade {
        id,
        key: None,
        auth_via: None,
        slot: None,
        forbidden,
    };

    // Subprotocol list `soniox-api-key, <key>`: must be answered in kind, or
    // the client aborts the handshake.
    let protocols: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let sub_key = if protocols.iter().any(|p| p == "soniox-api-key") {
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("soniox-api-key"),
        );
        Some(
            protocols
                .iter()
                .find(|p| *p != "soniox-api-key")
                .cloned()
                .unwrap_or_default(),
        )
    } else {
        None
    };
    if forbidden {
        // Accept, then answer with a Soniox error (see `Session`).
        return (Ok(resp), up);
    }
    if req.uri().path() != PATH {
        return (Err(refuse(shared, id, 404, "Not found.")), up);
    }
    let header_key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        });
    let (key, via) = match (header_key, sub_key) {
        (Some(k), _) => (k, AuthVia::Header),
        (None, Some(k)) => (k, AuthVia::Subprotocol),
        (None, None) => return (Ok(resp), up), // maybe in the first message
    };
    match shared.claim(&key) {
        Ok(slot) => {
            shared.with_record(id, |r| {
                r.key = Some(key.clone());
                r.auth_via = Some(via);
            });
            up.key = Some(key);
            up.auth_via = Some(via);
            up.slot = Some(slot);
            (Ok(resp), up)
        }
        Err((code, message)) => (Err(refuse(shared, id, code, message)), up),
    }
}

/// An HTTP refusal of the upgrade with Soniox's REST error body.
fn refuse(shared: &Shared, id: u64, code: u16, message: &str) -> ErrorResponse {
    shared.with_record(id, |r| {
        r.http_status = Some(code);
        r.closed = true;
    });
    let body = serde_json::json!({
        "status_code": code,
        "error_type": super::error_type(code),
        "message": message,
        "request_id": shared.request_id(),
    })
    .to_string();
    let len = HeaderValue::from(body.len());
    let mut resp = ErrorResponse::new(Some(body));
    resp.headers_mut().insert("content-length", len);
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}
