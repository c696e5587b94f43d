//! One stream's life: the client's HTTP upgrade and session token, its first
//! (config) message, the choice of account and the upstream connection (with
//! invisible retries on another account), the pumps, and an orderly end with
//! the contract's error shapes and close codes.
//!
//! - `handshake`: accept, the HTTP request, the token on it, the 101.
//! - `first`: the first (config) message and a token inside it.
//! - `refusal`: the error frame + close the relay sends when it ends a stream.
//! - this file: the stream after the upgrade — account, upstream, pumps, end.

mod first;
mod handshake;
mod refusal;

pub use handshake::serve;
pub use refusal::Refusal;

use std::rc::Rc;
use std::time::Instant;

use futures_lite::future;
use serde_json::{Map, Value};

use crate::frame::{build_frame, close_payload, Opcode, Sender};
use crate::io::{timeout, Buf, Duplex};
use crate::keyring::{Lease, RateScope};
use crate::metrics::Side;
use crate::pump::{self, ClientSide, End, FrameScanner, StreamState};
use crate::shard::{AdmitPermit, Settings, Shard};
use crate::token::Claims;

/// How long the relay waits for a peer's half of a close handshake.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One upgraded stream on one shard.
struct Stream {
    /// The relay's id for the stream: `client_reference_id` upstream when the
    /// client gives none, and `request_id` in the relay's own errors.
    id: String,
    shard: Rc<Shard>,
    /// Limits and token keys as they were when the stream started.
    settings: Rc<Settings>,
    /// Counts the stream against `server.max_streams` until dropped.
    _permit: AdmitPermit,
}

/// An open upstream: the connection, the account it holds, and its read buffer.
struct Upstream {
    conn: Duplex,
    lease: Lease,
    buf: Buf,
}

impl Stream {
    async fn run(self, client: Duplex, mut cbuf: Buf, claims: Option<Claims>) {
        let mut tried = 0u64;
        // With the token on the request, connect upstream while the client
        // prepares its config message; otherwise authenticate first.
        let opened = match claims {
            Some(c) => future::try_zip(self.read_first_message(&client, &mut cbuf), async {
                self.open_upstream(&mut tried).await
            })
            .await
            .map(|(first, up)| (first, up, c)),
            None => match self.read_first_message(&client, &mut cbuf).await {
                Err(r) => Err(r),
                Ok(first) => match self.first_message_claims(&first) {
                    Err(r) => Err(r),
                    Ok(c) => self
                        .open_upstream(&mut tried)
                        .await
                        .map(|up| (first, up, c)),
                },
            },
        };
        let (config, mut up, claims) = match opened {
            Ok(x) => x,
            Err(r) => return self.refuse(&client, &r).await,
        };
        tracing::debug!(stream = %self.id, shard = self.shard.index, device = %claims.device_id, account = %up.lease.account.id, "stream open");
        let started = Instant::now();
        let state = StreamState::new(started);
        let mut cside = ClientSide {
            scanner: FrameScanner::new(Sender::Client, self.settings.limits.max_frame_bytes as u64),
            processed: 0,
            close_seen: false,
        };
        let end = loop {
            if let Err(r) = self.send_config(&up, &config).await {
                break Err(r);
            }
            let end = self
                .pump(&client, &mut up, &mut cbuf, &mut cside, &state)
                .await;
            match end {
                End::Retry(code, scope) => {
                    self.note_refusal(&up.lease, code, scope);
                    tracing::info!(stream = %self.id, account = %up.lease.account.id, code, "upstream refused the account on its first message; moving the stream");
                    self.shard
                        .metrics
                        .stream_closed(up.lease.account.metrics_index);
                    // The refused connection is dropped when `up` is replaced.
                    state.inspect_first_upstream.set(true);
                    match self.open_upstream(&mut tried).await {
                        Ok(next) => up = next,
                        Err(r) => break Err(r),
                    }
                }
                other => break Ok(other),
            }
        };
        let end = match end {
            Ok(end) => end,
            Err(r) => return self.refuse(&client, &r).await,
        };
        if let Some((code, scope)) = state.first_upstream_error.get() {
            self.note_refusal(&up.lease, code, scope);
        }
        self.finish(&client, &up, end, &state, &mut cbuf, &mut cside)
            .await;
        self.shard
            .metrics
            .stream_closed(up.lease.account.metrics_index);
        tracing::debug!(stream = %self.id, ?end, secs = started.elapsed().as_secs_f64(), "stream end");
    }

    /// Reads the client's first message: one whole text frame with a JSON
    /// object. Pings before it are answered here; a close ends the stream.

    /// Picks an account and connects; on a refusal tries the next account.
    async fn open_upstream(&self, tried: &mut u64) -> Result<Upstream, Refusal> {
        let shard = &self.shard;
        let mut unreachable = false;
        loop {
            let lease = shard.ring.borrow_mut().pick(Instant::now(), *tried);
            let Some(lease) = lease else {
                return Err(if unreachable {
                    Refusal::upstream_unavailable()
                } else {
                    Refusal::no_account()
                });
            };
            *tried |= 1 << lease.slot;
            let mut buf = shard.pool.get();
            let t0 = Instant::now();
            let key_in_header = shard.key_in_header;
            match shard
                .upstream
                .connect(
                    &lease.key.key,
                    key_in_header,
                    &mut buf,
                    shard.connect_timeout,
                )
                .await
            {
                Ok(conn) => {
                    shard.metrics.record(
                        crate::metrics::Hist::UpstreamConnect,
                        t0.elapsed().as_micros() as u64,
                    );
                    lease.account.mark_ok();
                    shard.metrics.stream_opened(lease.account.metrics_index);
                    return Ok(Upstream { conn, lease, buf });
                }
                Err(crate::upstream::ConnectError::Refused(status, scope)) => {
                    self.note_refusal(&lease, status, scope);
                    shard.metrics.error(Side::Upstream, status);
                    shard.metrics.account_retry(lease.account.metrics_index);
                    tracing::info!(stream = %self.id, account = %lease.account.id, status, "upstream refused the account; trying the next");
                    if status >= 500 {
                        unreachable = true;
                    }
                }
                Err(e) => {
                    unreachable = true;
                    shard.metrics.error(Side::Upstream, 502);
                    tracing::warn!(stream = %self.id, account = %lease.account.id, error = ?e, "upstream connect failed");
                }
            }
        }
    }

    /// Marks the account after upstream refused it with `code`.
    fn note_refusal(&self, lease: &Lease, code: u16, scope: RateScope) {
        match code {
            401 | 402 => lease.account.mark_unhealthy(Instant::now()),
            429 => lease.account.mark_rate_limited(Instant::now(), scope),
            _ => {}
        }
    }

    /// Writes the client's config upstream: without the client's `api_key`,
    /// with the account key when `upstream.auth = "config"`, and with a
    /// `client_reference_id` (the stream id) when the client gave none.
    async fn send_config(&self, up: &Upstream, config: &Map<String, Value>) -> Result<(), Refusal> {
        let mut config = config.clone();
        config.remove("api_key");
        if !self.shard.key_in_header {
            config.insert(
                "api_key".into(),
                Value::String(up.lease.key.key.expose().to_string()),
            );
        }
        if !config.contains_key("client_reference_id") {
            config.insert("client_reference_id".into(), Value::String(self.id.clone()));
        }
        let text = serde_json::to_vec(&config).expect("a JSON map serializes");
        let key = self.shard.masks.borrow_mut().next_key();
        let frame = build_frame(Opcode::Text, &text, Some(key));
        up.conn
            .write_all(&frame)
            .await
            .map_err(|_| Refusal::upstream_unavailable())
    }

    /// Runs both pumps and the idle watch until one of them ends the stream.
    async fn pump(
        &self,
        client: &Duplex,
        up: &mut Upstream,
        cbuf: &mut Buf,
        cside: &mut ClientSide,
        state: &StreamState,
    ) -> End {
        let shard = &self.shard;
        let Upstream {
            conn, buf: ubuf, ..
        } = up;
        let conn = &*conn;
        // A fresh scanner per upstream connection; the buffer already holds
        // whatever followed the upgrade answer.
        let mut uscanner =
            FrameScanner::new(Sender::Server, self.settings.limits.max_frame_bytes as u64);
        let retry_allowed = || state.data_frames_up.get() == 0 && state.upstream_at_boundary.get();
        let c2u = async {
            match pump::client_to_upstream(
                client,
                conn,
                cbuf,
                cside,
                state,
                &shard.masks,
                &shard.metrics,
            )
            .await
            {
                // The client said goodbye; the stream ends when upstream answers.
                End::ClientClosed => future::pending().await,
                end => end,
            }
        };
        let u2c = pump::upstream_to_client(
            conn,
            client,
            ubuf,
            &mut uscanner,
            state,
            &shard.metrics,
            &retry_allowed,
        );
        future::or(
            future::or(u2c, c2u),
            pump::idle_watch(state, self.settings.limits.idle_timeout),
        )
        .await
    }

    /// Ends a stream the way `end` calls for.
    async fn finish(
        &self,
        client: &Duplex,
        up: &Upstream,
        end: End,
        state: &StreamState,
        cbuf: &mut Buf,
        cside: &mut ClientSide,
    ) {
        let shard = &self.shard;
        let to_client = |r: &Refusal| r.frames(&self.id);
        let close_upstream = |code: u16, reason: &str| {
            let key = shard.masks.borrow_mut().next_key();
            build_frame(Opcode::Close, &close_payload(code, reason), Some(key))
        };
        match end {
            End::UpstreamClosed => {
                // Upstream closed first (after `finished`): carry the client's
                // close reply up, so both close handshakes complete.
                if !cside.close_seen {
                    let c2u = pump::client_to_upstream(
                        client,
                        &up.conn,
                        cbuf,
                        cside,
                        state,
                        &shard.masks,
                        &shard.metrics,
                    );
                    let _ = timeout(CLOSE_WAIT, c2u).await;
                }
            }
            End::ClientGone => {
                if state.upstream_at_boundary.get() {
                    let _ = timeout(
                        std::time::Duration::from_secs(1),
                        up.conn.write_all(&close_upstream(1001, "client went away")),
                    )
                    .await;
                }
            }
            End::ClientProtocol(e) => {
                shard.metrics.error(Side::Client, e.close_code());
                let r = Refusal::new(400, "bad_request", e.reason(), e.close_code(), Side::Client);
                if state.client_at_boundary.get() {
                    let _ = client.write_all(&to_client(&r)).await;
                }
                if state.upstream_at_boundary.get() {
                    let _ = up
                        .conn
                        .write_all(&close_upstream(1001, "client protocol error"))
                        .await;
                }
            }
            End::UpstreamGone if cside.close_seen => {
                // The client closed and upstream hung up instead of answering
                // the close: answer it in upstream's place.
                if state.client_at_boundary.get() {
                    let _ = client
                        .write_all(&build_frame(Opcode::Close, &close_payload(1000, ""), None))
                        .await;
                }
            }
            End::UpstreamGone | End::UpstreamProtocol(_) => {
                let r = Refusal::upstream_lost();
                shard.metrics.error(Side::Upstream, r.code);
                if state.client_at_boundary.get() {
                    let _ = client.write_all(&to_client(&r)).await;
                }
            }
            End::Idle => {
                let r = Refusal::new(
                    408,
                    "request_timeout",
                    "No audio or messages in time; the stream was idle.",
                    1000,
                    Side::Client,
                );
                shard.metrics.error(Side::Client, 408);
                if state.client_at_boundary.get() {
                    let _ = client.write_all(&to_client(&r)).await;
                }
                if state.upstream_at_boundary.get() {
                    let _ = up.conn.write_all(&close_upstream(1000, "idle")).await;
                }
            }
            End::Retry(..) | End::ClientClosed => unreachable!("handled by the caller"),
        }
        let _ = up.conn.close().await;
        close_client(client).await;
    }

    /// Sends a refusal (error frame + close) to the client and ends.
    async fn refuse(&self, client: &Duplex, r: &Refusal) {
        if r.code != 0 {
            self.shard.metrics.stream_rejected(r.side, r.code);
            let _ = client.write_all(&r.frames(&self.id)).await;
        } else if r.close != 0 {
            // The client closed before its first message: answer its close.
            let _ = client
                .write_all(&build_frame(
                    Opcode::Close,
                    &close_payload(r.close, ""),
                    None,
                ))
                .await;
        }
        close_client(client).await;
    }
}

/// Closes the client side after the relay's last frame: FIN, then read and
/// discard until the client closes too (bounded), so no unread byte turns
/// the close into a reset that could cost the client its last frames.
async fn close_client(client: &Duplex) {
    let _ = client.close().await;
    let mut scratch = [0u8; 512];
    let _ = timeout(CLOSE_WAIT, async {
        while let Ok(n) = client.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
