//! One stream's life: the client's HTTP upgrade and session token, its first
//! (config) message, the choice of account and the upstream connection (with
//! invisible retries on another account), the pumps, and an orderly end with
//! the contract's error shapes and close codes.

use std::rc::Rc;
use std::time::{Instant, SystemTime};

use futures_lite::future;
use glommio::net::TcpStream;
use serde_json::{Map, Value};

use crate::frame::{
    build_frame, close_payload, parse_header, FrameError, FrameHeader, Opcode, Sender,
};
use crate::http::{self, HeadError};
use crate::io::{timeout, Buf, Conn, Duplex};
use crate::keyring::{Lease, RateScope};
use crate::mask::apply_mask;
use crate::metrics::Side;
use crate::pump::{self, ClientSide, End, FrameScanner, StreamState};
use crate::shard::{AdmitPermit, Settings, Shard};
use crate::token::Claims;

/// How long the relay waits for a peer's half of a close handshake.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A refusal after the upgrade: one Soniox-shaped error frame, then a close.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Soniox error code (400, 401, 408, 429, 502, 503).
    pub code: u16,
    /// Soniox `error_type`.
    pub kind: &'static str,
    /// Human message. Never contains a token or key.
    pub message: String,
    /// WebSocket close code.
    pub close: u16,
    /// Who caused it, for metrics.
    pub side: Side,
}

impl Refusal {
    fn new(
        code: u16,
        kind: &'static str,
        message: impl Into<String>,
        close: u16,
        side: Side,
    ) -> Self {
        Refusal {
            code,
            kind,
            message: message.into(),
            close,
            side,
        }
    }
    /// No error frame: just a close frame with `close` (0: not even that).
    fn silent(close: u16) -> Self {
        Refusal::new(0, "", "", close, Side::Client)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(400, "bad_request", message, 1002, Side::Client)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Refusal::new(401, "unauthenticated", message, 1008, Side::Client)
    }
    fn no_account() -> Self {
        Refusal::new(
            429,
            "too_many_requests",
            "No Soniox account can take another stream now; try again later.",
            1013,
            Side::Upstream,
        )
    }
    fn upstream_unavailable() -> Self {
        Refusal::new(
            502,
            "upstream_unavailable",
            "The transcription service is unreachable; try again later.",
            1011,
            Side::Upstream,
        )
    }
    fn upstream_lost() -> Self {
        Refusal::new(
            503,
            "service_unavailable",
            "Cannot continue request: the upstream connection was lost. Reconnect.",
            1011,
            Side::Upstream,
        )
    }

    /// The error frame and the close frame, as the relay writes them to a client.
    pub fn frames(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "tokens": [],
            "error_code": self.code,
            "error_message": self.message,
            "error_type": self.kind,
            "request_id": request_id,
        })
        .to_string();
        let mut out = build_frame(Opcode::Text, body.as_bytes(), None);
        out.extend(build_frame(
            Opcode::Close,
            &close_payload(self.close, &self.message),
            None,
        ));
        out
    }
}

/// Serves one accepted client connection to the end.
pub async fn serve(shard: Rc<Shard>, tcp: TcpStream) {
    let accepted = Instant::now();
    let _ = tcp.set_nodelay(true);
    let client = Duplex::new(Conn::Plain(tcp));
    let mut cbuf = shard.pool.get();
    let settings = shard.settings();
    let Some((claims, permit)) = handshake(&shard, &settings, &client, &mut cbuf).await else {
        return;
    };
    shard.metrics.record(
        crate::metrics::Hist::ClientHandshake,
        accepted.elapsed().as_micros() as u64,
    );
    let stream = Stream {
        id: shard.new_stream_id(),
        shard: shard.clone(),
        settings,
        _permit: permit,
    };
    stream.run(client, cbuf, claims).await;
}

/// Reads and answers the HTTP request. Returns the token's claims (if the
/// token came on the request) once the connection is a WebSocket.
async fn handshake(
    shard: &Shard,
    settings: &Settings,
    client: &Duplex,
    buf: &mut Buf,
) -> Option<(Option<Claims>, AdmitPermit)> {
    let lim = &settings.limits;
    let refuse = |status: u16, msg: &str, side: Side| {
        shard.metrics.stream_rejected(side, status);
        http::json_error(status, msg)
    };
    let head_len = match timeout(
        lim.handshake_timeout,
        http::read_head(client, buf, lim.max_header_bytes),
    )
    .await
    {
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
                .write_all(&refuse(400, "malformed HTTP request", Side::Client))
                .await;
            return None;
        }
        Some(Ok(n)) => n,
    };
    let req = match http::parse_client_request(&buf.filled()[..head_len]) {
        Ok(r) => r,
        Err(_) => {
            let _ = client
                .write_all(&refuse(400, "malformed HTTP request", Side::Client))
                .await;
            return None;
        }
    };
    buf.start += head_len;
    match req.path.as_str() {
        "/v1/transcribe" => {}
        "/healthz" => {
            let (status, body) = if shard.process.draining() {
                (503, "draining\n")
            } else {
                (200, "ok\n")
            };
            let _ = client
                .write_all(&http::response(status, "text/plain", "", body.as_bytes()))
                .await;
            return None;
        }
        _ => {
            let _ = client
                .write_all(&refuse(
                    404,
                    "not found: the stream endpoint is /v1/transcribe",
                    Side::Client,
                ))
                .await;
            return None;
        }
    }
    let claims = match &req.token {
        Some((token, _)) => match settings.tokens.verify(token, SystemTime::now()) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = client
                    .write_all(&refuse(
                        401,
                        &format!("session token refused: {e}"),
                        Side::Client,
                    ))
                    .await;
                return None;
            }
        },
        None => None,
    };
    if shard.process.draining() {
        let _ = client
            .write_all(&refuse(503, "relay is draining; reconnect", Side::Internal))
            .await;
        return None;
    }
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
    Some((claims, permit))
}

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
    async fn read_first_message(
        &self,
        client: &Duplex,
        buf: &mut Buf,
    ) -> Result<Map<String, Value>, Refusal> {
        let lim = &self.settings.limits;
        loop {
            let h = match parse_header(
                buf.filled(),
                Sender::Client,
                lim.max_first_message_bytes as u64,
            ) {
                Err(FrameError::TooBig) => {
                    return Err(Refusal::new(
                        400,
                        "bad_request",
                        "Start request is too large.",
                        1009,
                        Side::Client,
                    ))
                }
                Err(e) => {
                    return Err(Refusal::new(
                        400,
                        "bad_request",
                        e.reason(),
                        e.close_code(),
                        Side::Client,
                    ))
                }
                Ok(h) => h,
            };
            if let Some(h) = h {
                let n = h.header_len + h.payload_len as usize;
                let mask = h.mask.expect("client frames are masked");
                if n > buf.capacity() {
                    // A config larger than the read buffer (a long `context`):
                    // gathered into its own vector, once per stream.
                    return self.read_large_first_message(client, buf, h).await;
                }
                if buf.len() >= n {
                    let (start, hl) = (buf.start, h.header_len);
                    buf.start += n;
                    let payload = &mut buf.raw()[start + hl..start + n];
                    apply_mask(payload, mask, 0);
                    match h.opcode {
                        Opcode::Ping => {
                            let pong = build_frame(Opcode::Pong, payload, None);
                            let _ = client.write_all(&pong).await;
                        }
                        Opcode::Pong => {}
                        Opcode::Close => return Err(Refusal::silent(1000)),
                        op => return parse_config(op, h.fin, payload),
                    }
                    continue;
                }
            }
            self.read_more(client, buf).await?;
        }
    }

    /// Reads more client bytes while waiting for the first message.
    async fn read_more(&self, client: &Duplex, buf: &mut Buf) -> Result<(), Refusal> {
        match timeout(self.settings.limits.idle_timeout, buf.read_from(client)).await {
            None => Err(Refusal::new(
                408,
                "request_timeout",
                "No start request received in time.",
                1000,
                Side::Client,
            )),
            Some(Ok(0)) | Some(Err(_)) => Err(Refusal::silent(0)),
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn read_large_first_message(
        &self,
        client: &Duplex,
        buf: &mut Buf,
        h: FrameHeader,
    ) -> Result<Map<String, Value>, Refusal> {
        if h.opcode != Opcode::Text {
            return parse_config(h.opcode, h.fin, &[]);
        }
        let mask = h.mask.expect("client frames are masked");
        let total = h.payload_len as usize;
        buf.start += h.header_len;
        let mut payload = Vec::with_capacity(total);
        while payload.len() < total {
            if buf.is_empty() {
                self.read_more(client, buf).await?;
            }
            let take = buf.len().min(total - payload.len());
            let at = payload.len();
            payload.extend_from_slice(&buf.filled()[..take]);
            apply_mask(&mut payload[at..], mask, at);
            buf.start += take;
        }
        parse_config(h.opcode, h.fin, &payload)
    }

    /// The claims of a token carried as `api_key` in the first message.
    fn first_message_claims(&self, first: &Map<String, Value>) -> Result<Claims, Refusal> {
        match first.get("api_key") {
            Some(Value::String(token)) => self
                .settings
                .tokens
                .verify(token, SystemTime::now())
                .map_err(|e| Refusal::unauthorized(format!("Session token refused: {e}."))),
            _ => Err(Refusal::unauthorized("Missing session token.")),
        }
    }

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

/// Checks and parses the first message: one text frame holding a JSON object.
fn parse_config(opcode: Opcode, fin: bool, payload: &[u8]) -> Result<Map<String, Value>, Refusal> {
    match opcode {
        Opcode::Text if !fin => Err(Refusal::bad_request(
            "Start request must be a single text frame.",
        )),
        Opcode::Text => match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Refusal::bad_request("Start request must be a JSON object.")),
        },
        _ => Err(Refusal::bad_request(
            "Start request must be a text message.",
        )),
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
