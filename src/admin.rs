//! The admin port: `/metrics`, `/healthz`, `/readyz` and `/v1/config`.
//!
//! Runs on its own executor thread, off the streaming path. It learns about
//! the shards only by asking them ([`ShardMsg::Snapshot`]); a scrape merges
//! the answers.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use crate::control::Accounts;
use crate::http;
use crate::io::{timeout, BufferPool, Conn, Duplex};
use crate::metrics::{render_prometheus, MetricsSnapshot, ProcessGauges};
use crate::shard::{ProcessState, ShardMsg, IO_MEMORY};

/// What the admin server needs.
#[derive(Debug)]
pub struct AdminSetup {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Control channels of every shard.
    pub shards: Vec<async_channel::Sender<ShardMsg>>,
    /// Process-wide state (accounts, draining, stream count).
    pub process: Arc<ProcessState>,
    /// The authoritative account set; the admin thread owns it from here on.
    pub accounts: Accounts,
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: async_channel::Sender<()>,
    join: Option<glommio::ExecutorJoinHandle<()>>,
}

impl AdminHandle {
    /// Stops the admin server and waits for its thread.
    pub fn stop(mut self) {
        self.stop.close();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Asks every shard for its metrics and returns the snapshots, in shard order.
pub async fn collect(shards: &[async_channel::Sender<ShardMsg>]) -> Vec<MetricsSnapshot> {
    let mut out = Vec::with_capacity(shards.len());
    for tx in shards {
        let (rtx, rrx) = async_channel::bounded(1);
        if tx.send(ShardMsg::Snapshot(rtx)).await.is_ok() {
            if let Ok(s) = rrx.recv().await {
                out.push(s);
            }
        }
    }
    out
}

/// Starts the admin server on its own thread; returns once it listens.
pub fn start(setup: AdminSetup) -> std::io::Result<AdminHandle> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let join = LocalExecutorBuilder::new(Placement::Unbound)
        .name("clio-admin")
        .io_memory(IO_MEMORY)
        .spawn(move || async move {
            let listener = match TcpListener::bind(setup.listen) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
            let setup = Rc::new(setup);
            let pool = BufferPool::new(16 * 1024, 2, 16);
            let accept = async {
                while let Ok(tcp) = listener.accept().await {
                    let (setup, pool) = (setup.clone(), pool.clone());
                    glommio::spawn_local(async move {
                        let conn = Duplex::new(Conn::Plain(tcp));
                        let mut buf = pool.get();
                        let head = timeout(
                            std::time::Duration::from_secs(10),
                            http::read_head(&conn, &mut buf, 8192),
                        )
                        .await;
                        let answer = match head {
                            Some(Ok(n)) => answer(&setup, &buf.filled()[..n]).await,
                            Some(Err(http::HeadError::TooLarge)) => {
                                http::json_error(431, "request head too large")
                            }
                            _ => return,
                        };
                        let _ = conn.write_all(&answer).await;
                        let _ = conn.close().await;
                    })
                    .detach();
                }
            };
            futures_lite::future::or(accept, async {
                let _ = stop_rx.recv().await;
            })
            .await;
        })?;
    let addr = ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("admin thread ended before listening"))??;
    Ok(AdminHandle {
        addr,
        stop: stop_tx,
        join: Some(join),
    })
}

/// Answers one admin request.
async fn answer(setup: &AdminSetup, head: &[u8]) -> Vec<u8> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return http::json_error(400, "malformed HTTP request");
    }
    if req.method != Some("GET") {
        return http::json_error(405, "only GET is served here");
    }
    let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
    let process = &setup.process;
    match path {
        "/metrics" => {
            let snaps = collect(&setup.shards).await;
            let now = Instant::now();
            let gauges = ProcessGauges {
                max_streams: process.max_streams() as u64,
                draining: process.draining(),
                accounts_healthy: process.accounts().iter().filter(|a| a.healthy(now)).count()
                    as u64,
                accounts_total: process.accounts().len() as u64,
            };
            let body = render_prometheus(&snaps, &gauges);
            http::response(200, "text/plain; version=0.0.4", "", body.as_bytes())
        }
        "/healthz" => {
            if process.draining() {
                http::response(503, "text/plain", "", b"draining\n")
            } else {
                http::response(200, "text/plain", "", b"ok\n")
            }
        }
        "/readyz" => {
            let now = Instant::now();
            let usable = process
                .accounts()
                .iter()
                .any(|a| a.healthy(now) && a.available(now));
            if process.draining() {
                http::response(503, "text/plain", "", b"draining\n")
            } else if !usable {
                http::response(503, "text/plain", "", b"no healthy account\n")
            } else {
                http::response(200, "text/plain", "", b"ready\n")
            }
        }
        "/v1/config" => {
            let body = remote_config(process);
            let etag = etag(&body);
            let matches = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("if-none-match") && h.value == etag.as_bytes()
            });
            if matches {
                http::response(304, "application/json", &format!("ETag: {etag}\r\n"), b"")
            } else {
                http::response(
                    200,
                    "application/json",
                    &format!("ETag: {etag}\r\n"),
                    body.as_bytes(),
                )
            }
        }
        _ => http::json_error(404, "not found"),
    }
}

/// The seed's remote-configuration document: accounts' public fields and
/// feature flags. Never a key.
pub fn remote_config(process: &ProcessState) -> String {
    let accounts: Vec<serde_json::Value> = process
        .accounts()
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "endpoint": "/v1/transcribe",
                "region": a.region,
                "isEnabled": a.enabled.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::json!({
        "sonioxAccounts": accounts,
        "features": {
            "useProxyServer": true,
            "maxConcurrentStreams": process.max_streams(),
        }
    })
    .to_string()
}

/// A strong ETag: the first 16 hex digits of the body's SHA-256.
fn etag(body: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}
