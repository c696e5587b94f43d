//! One upgraded connection, from the config message to the close.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::{future, AsyncRead, AsyncWrite, StreamExt};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use super::transcript::{self, Token, Transcript};
use super::{
    refusal_message, AuthVia, FaultKind, FinDelivery, SessionRecord, Shared, Slot, MODELS,
};

/// How long to wait for the client's close reply before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Between the two writes of a [`FinDelivery::Split`] result: long enough
/// that the reader has the first part before the rest is sent.
const SPLIT_PAUSE: Duration = Duration::from_millis(50);

/// How often a stalled session looks whether its peer has gone.
const STALL_POLL: Duration = Duration::from_millis(20);

/// Without recorded audio, the shared record's counters are refreshed every
/// this many frames (and at the end), not on every frame.
const SYNC_EVERY_FRAMES: u32 = 64;

/// What the upgrade-time checks learnt, handed to the session.
#[derive(Debug)]
pub(crate) struct Upgrade {
    pub(crate) id: u64,
    pub(crate) key: Option<String>,
    pub(crate) auth_via: Option<AuthVia>,
    /// The key's concurrency slot, held for the session's life.
    pub(crate) slot: Option<Slot>,
    /// A forbidden string was in the request head: answer 400 at once.
    pub(crate) forbidden: bool,
}

/// Why the message loop stopped.
#[derive(Debug)]
enum Ending {
    /// Send this Soniox error, then close.
    Error(u16, String),
    /// End of audio: send the last words and `finished`, then close.
    Finished,
    /// Fault: drop the TCP connection with a RST, no close frame.
    Abort,
    /// Fault: a frame that breaks the protocol, then the connection
    /// dropped.
    Violation,
    /// Fault: a close frame with code 1001 and nothing before it.
    GoingAway,
    /// The client closed or vanished.
    Gone,
}

type Step = Result<(), Ending>;

fn error(code: u16, message: &str) -> Ending {
    Ending::Error(code, message.to_owned())
}

/// One session's state.
pub(crate) struct Session<S> {
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    /// The TCP socket under `ws` (maybe under TLS), for the abrupt-drop fault.
    fd: RawFd,
    /// Local copy of the record (without audio), pushed to `shared` by `sync`.
    rec: SessionRecord,
    slot: Option<Slot>,
    forbidden_head: bool,
    /// `Some` once the config message was accepted.
    transcript: Option<Transcript>,
    last_activity: Instant,
    unsynced_frames: u32,
    /// This session's random fault: at which audio frame, and what.
    fault: Option<(u64, FaultKind)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(crate) fn new(ws: WebSocketStream<S>, up: Upgrade, fd: RawFd, shared: Arc<Shared>) -> Self {
        let mut rec = shared.with_record(up.id, |r| r.clone());
        rec.key = up.key;
        rec.auth_via = up.auth_via;
        Session {
            ws,
            shared,
            fd,
            rec,
            slot: up.slot,
            forbidden_head: up.forbidden,
            transcript: None,
            last_activity: Instant::now(),
            unsynced_frames: 0,
            fault: None,
        }
    }

    /// Runs the session to its end; the record is complete afterwards
    /// (except `closed`, which the caller sets).
    pub(crate) async fn run(mut self) {
        let ending = if self.forbidden_head {
            error(400, "forbidden string")
        } else {
            match self.serve().await {
                Ok(()) => Ending::Gone,
                Err(e) => e,
            }
        };
        match ending {
            Ending::Error(code, message) => {
                let rid = self.shared.request_id();
                self.rec.error_sent = Some(code);
                self.sync();
                let msg = transcript::error_json(code, &message, &rid);
                if self.ws.send(Message::text(msg)).await.is_ok() {
                    self.close().await;
                }
            }
            Ending::Finished => {
                if self.finish().await.is_ok() {
                    self.close().await;
                }
            }
            Ending::GoingAway => self.close_with(CloseCode::Away).await,
            Ending::Abort => {
                // SO_LINGER 0: close() sends RST instead of FIN.
                // SAFETY: `fd` is the socket owned by `self.ws`, alive here.
                let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
                let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
            }
            Ending::Violation => {
                // A continuation frame (FIN, opcode 0) with no fragmented
                // message open, written under the WebSocket layer.
                let raw = self.ws.get_mut();
                if futures_lite::AsyncWriteExt::write_all(raw, &[0x80, 0x02, b'{', b'}'])
                    .await
                    .is_ok()
                {
                    let _ = futures_lite::AsyncWriteExt::flush(raw).await;
                }
            }
            Ending::Gone => {}
        }
        self.slot.take();
        self.sync();
    }

    /// The message loop: `Err` says how it ends.
    async fn serve(&mut self) -> Step {
        loop {
            let deadline = self.last_activity + self.shared.cfg.idle_timeout;
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = future::or(async { Some(self.ws.next().await) }, async {
                glommio::timer::sleep(wait).await;
                None
            })
            .await;
            let msg = match next {
                None => return Err(error(408, "Request timeout.")),
                Some(None) => return Err(Ending::Gone),
                Some(Some(Err(e))) => {
                    tracing::debug!("fake-soniox session {}: {e}", self.rec.id);
                    return Err(Ending::Gone);
                }
                Some(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    self.last_activity = Instant::now();
                    self.on_text(t.as_str()).await?;
                }
                Message::Binary(b) => {
                    self.last_activity = Instant::now();
                    self.on_binary(&b).await?;
                }
                Message::Close(frame) => {
                    // The client ends the session: send the queued close
                    // reply, then drop the connection.
                    self.rec.client_close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    let _ = self.ws.close(None).await;
                    return Err(Ending::Gone);
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        self.rec.text_messages.push(text.to_owned());
        // Recorded before it is answered: a test that has the answer (a
        // finalize's `<fin>`) finds the message in the record.
        self.sync();
        let n = self.rec.text_messages.len();
        let result = if self.forbidden_in(text) {
            self.shared.violation(format!(
                "forbidden string in text message #{n} of session {}",
                self.rec.id
            ));
            Err(error(400, "forbidden string"))
        } else if self.transcript.is_none() {
            self.on_config(text)
        } else if text.is_empty() {
            self.rec.empty_frame_received = true;
            Err(Ending::Finished)
        } else {
            self.on_control(text).await
        };
        self.sync();
        result
    }

    fn forbidden_in(&self, text: &str) -> bool {
        self.shared
            .cfg
            .forbidden
            .iter()
            .any(|s| !s.is_empty() && text.contains(s.as_str()))
    }

    /// The first message: key, model and audio format.
    fn on_config(&mut self, text: &str) -> Step {
        let value = config_value(text)
            .ok_or_else(|| error(400, "Start request must be a valid JSON object."))?;
        self.rec.config = Some(value.clone());
        let Some(cfg) = value.as_object() else {
            return Err(error(400, "Start request must be a valid JSON object."));
        };
        match cfg.get("api_key") {
            Some(_) if self.rec.key.is_some() => {
                return Err(error(400, "API key must be sent in only one place."));
            }
            Some(serde_json::Value::String(key)) => {
                let slot = self.shared.claim(key).map_err(|(c, m)| error(c, m))?;
                self.slot = Some(slot);
                self.rec.key = Some(key.clone());
                self.rec.auth_via = Some(AuthVia::FirstMessage);
            }
            Some(_) => return Err(error(401, "Invalid API key.")),
            None if self.rec.key.is_none() => return Err(error(401, "Missing API key.")),
            None => {}
        }
        match cfg.get("model").and_then(|m| m.as_str()) {
            None => return Err(error(400, "Missing model.")),
            Some(m) if !MODELS.contains(&m) => {
                return Err(Ending::Error(400, format!("Invalid model: {m}.")));
            }
            Some(_) => {}
        }
        let format = cfg
            .get("audio_format")
            .and_then(|f| f.as_str())
            .ok_or_else(|| error(400, "Missing audio_format."))?;
        let sample_bytes = transcript::format_sample_bytes(format)
            .ok_or_else(|| Ending::Error(400, format!("Invalid audio_format: {format}.")))?;
        let (mut rate, mut channels) = (0, 0);
        if sample_bytes.is_some() {
            rate = positive(cfg.get("sample_rate"))
                .ok_or_else(|| error(400, "sample_rate is required for raw audio formats."))?;
            channels = positive(cfg.get("num_channels"))
                .ok_or_else(|| error(400, "num_channels is required for raw audio formats."))?;
            // No audio clock runs that fast: refused, as a real server
            // refuses a rate it does not take, rather than overflowing.
            sample_bytes
                .and_then(|b| b.checked_mul(rate))
                .and_then(|b| b.checked_mul(channels))
                .ok_or_else(|| error(400, "sample_rate and num_channels are out of range."))?;
        }
        let refused = self.rec.key.as_deref().and_then(|key| {
            let faults = &self.shared.cfg.faults.refuse_at_first_message;
            faults.iter().find(|(k, _)| k == key).map(|&(_, c)| c)
        });
        if let Some(code) = refused {
            return Err(error(code, refusal_message(code)));
        }
        self.fault = self
            .shared
            .cfg
            .faults
            .random
            .as_ref()
            .and_then(|r| r.pick(self.rec.id));
        let bps = Transcript::bytes_per_sec(sample_bytes, rate, channels);
        self.transcript = Some(Transcript::new(bps, self.shared.cfg.ms_per_word));
        Ok(())
    }

    /// Text after the config: keepalive, finalize, or an error.
    async fn on_control(&mut self, text: &str) -> Step {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|_| error(400, "Invalid control message."))?;
        match value.get("type").and_then(|t| t.as_str()) {
            Some("keepalive") => Ok(()),
            Some("finalize") => {
                let t = self.transcript.as_mut().expect("config accepted");
                let mut tokens = t.flush();
                let end = t.final_ms();
                tokens.push(Token {
                    text: "<fin>".to_owned(),
                    start_ms: end,
                    end_ms: end,
                    is_final: true,
                });
                let total = t.total_ms();
                let msg = transcript::result_json(&tokens, end, total);
                match self.shared.cfg.faults.fin_delivery {
                    FinDelivery::Whole => self.send(msg).await,
                    FinDelivery::Split => {
                        let frame = text_frame(&msg);
                        let cut = frame
                            .windows(5)
                            .position(|w| w == b"<fin>")
                            .expect("the result holds <fin>")
                            + 3;
                        self.write_raw(&frame[..cut]).await?;
                        glommio::timer::sleep(SPLIT_PAUSE).await;
                        self.write_raw(&frame[cut..]).await
                    }
                    FinDelivery::Trailed => {
                        let mut both = text_frame(&msg);
                        both.extend(text_frame(&transcript::result_json(&[], end, total)));
                        self.write_raw(&both).await
                    }
                }
            }
            _ => Err(error(400, "Invalid control message.")),
        }
    }

    /// Writes `bytes` (whole frames, or a frame's start or rest) under the
    /// WebSocket layer, in one write: the layer's own writes are all
    /// flushed (each `send` flushes).
    async fn write_raw(&mut self, bytes: &[u8]) -> Step {
        use futures_lite::AsyncWriteExt;
        let raw = self.ws.get_mut();
        raw.write_all(bytes).await.map_err(|_| Ending::Gone)?;
        raw.flush().await.map_err(|_| Ending::Gone)
    }

    async fn on_binary(&mut self, data: &[u8]) -> Step {
        let Some(t) = self.transcript.as_mut() else {
            return Err(error(400, "Start request must be a text message."));
        };
        if data.is_empty() {
            self.rec.empty_frame_received = true;
            return Err(Ending::Finished);
        }
        self.rec.audio_frames += 1;
        self.rec.audio_bytes += data.len() as u64;
        let frames = self.rec.audio_frames;
        let shared = self.shared.clone();
        let msg = if shared.cfg.echo {
            let (start, end) = t.advance(data.len());
            (data.len() >= 16).then(|| {
                let token = Token {
                    text: transcript::hex16(data),
                    start_ms: start,
                    end_ms: end,
                    is_final: true,
                };
                transcript::result_json(std::slice::from_ref(&token), end, end)
            })
        } else {
            let tokens = t.push_audio(data);
            (!tokens.is_empty())
                .then(|| transcript::result_json(&tokens, t.final_ms(), t.total_ms()))
        };
        if shared.cfg.record_audio {
            shared.with_record(self.rec.id, |r| r.audio.extend_from_slice(data));
            self.sync();
        } else {
            self.unsynced_frames += 1;
            if self.unsynced_frames >= SYNC_EVERY_FRAMES {
                self.sync();
            }
        }
        let faults = &shared.cfg.faults;
        // A key whose sessions fail now (an account that dies under its
        // streams): as a random fault due at this frame.
        let fault = match shared.failing(self.rec.key.as_deref()) {
            Some(kind) => Some((frames, kind)),
            None => self.fault,
        };
        let stall = matches!(fault, Some((n, FaultKind::Stall)) if frames >= n);
        if stall || faults.stall_after_frames.is_some_and(|n| frames >= n) {
            // Never read again. The session (and its key's place) lasts
            // until the peer closes or resets the connection, as a real
            // server's would: a claim at the key's limit frees it at once
            // (`Shared::claim`), and this wait ends the session.
            let _stalled = shared.stall(self.rec.id, self.fd, self.slot.take());
            while !super::state::peer_gone(self.fd) {
                glommio::timer::sleep(STALL_POLL).await;
            }
            return Err(Ending::Gone);
        }
        if faults.close_after_frames.is_some_and(|n| frames >= n) {
            return Err(Ending::Abort);
        }
        if let Some((n, code)) = faults.error_after_frames {
            if frames >= n {
                return Err(error(code, refusal_message(code)));
            }
        }
        match fault {
            Some((n, FaultKind::Drop)) if frames >= n => return Err(Ending::Abort),
            Some((n, FaultKind::Violation)) if frames >= n => return Err(Ending::Violation),
            Some((n, FaultKind::GoingAway)) if frames >= n => return Err(Ending::GoingAway),
            Some((n, FaultKind::Error(code))) if frames >= n => {
                return Err(error(code, refusal_message(code)));
            }
            _ => {}
        }
        match msg {
            Some(msg) => self.send(msg).await,
            None => Ok(()),
        }
    }

    async fn send(&mut self, msg: String) -> Step {
        self.ws
            .send(Message::text(msg))
            .await
            .map_err(|_| Ending::Gone)
    }

    /// Last words and `finished`.
    async fn finish(&mut self) -> Step {
        let delay = self.shared.cfg.faults.finish_delay;
        if !delay.is_zero() {
            glommio::timer::sleep(delay).await;
        }
        if let Some(t) = self.transcript.as_mut() {
            let tokens = t.flush();
            let (fin, total) = (t.final_ms(), t.total_ms());
            if !tokens.is_empty() {
                self.send(transcript::result_json(&tokens, fin, total))
                    .await?;
            }
            self.rec.finished_sent = true;
            self.sync();
            self.send(transcript::finished_json(fin, total)).await
        } else {
            Ok(())
        }
    }

    /// Sends close 1000 and waits (briefly) for the client's reply.
    async fn close(&mut self) {
        self.close_with(CloseCode::Normal).await
    }

    /// Sends a close frame with `code` and waits (briefly) for the client's reply.
    async fn close_with(&mut self, code: CloseCode) {
        let frame = CloseFrame {
            code,
            reason: "".into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = future::or(async { Some(self.ws.next().await) }, async {
                glommio::timer::sleep(wait).await;
                None
            })
            .await;
            match next {
                Some(Some(Ok(Message::Close(frame)))) => {
                    self.rec.client_close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }

    /// Pushes the local record (all but the audio) to the shared one.
    fn sync(&mut self) {
        self.unsynced_frames = 0;
        if let Some(t) = &self.transcript {
            self.rec.audio_ms = t.total_ms();
        }
        let rec = &self.rec;
        self.shared.with_record(rec.id, |r| {
            let audio = std::mem::take(&mut r.audio);
            let closed = r.closed;
            *r = rec.clone();
            r.audio = audio;
            r.closed = closed;
        });
    }
}

/// A server's (unmasked) text frame holding `text`, FIN set.
fn text_frame(text: &str) -> Vec<u8> {
    let len = text.len();
    let mut f = Vec::with_capacity(len + 10);
    f.push(0x81);
    if len < 126 {
        f.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        f.push(126);
        f.extend((len as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend((len as u64).to_be_bytes());
    }
    f.extend(text.as_bytes());
    f
}

/// The config message read as a JSON map. JSON's grammar allows members
/// a map cannot hold (a string with a lone surrogate escape, a number
/// past f64's range), and the server takes them: such a member is left
/// out of the map (the message as sent is in
/// [`SessionRecord::text_messages`](crate::SessionRecord::text_messages)).
/// `None` for a text that is not JSON, or not an object.
fn config_value(text: &str) -> Option<serde_json::Value> {
    if let Ok(v) = serde_json::from_str(text) {
        return Some(v);
    }
    let members: serde_json::Map<String, serde_json::Value> = serde_json::from_str::<
        std::collections::BTreeMap<String, &serde_json::value::RawValue>,
    >(text)
    .ok()?
    .into_iter()
    .filter_map(|(name, v)| Some((name, serde_json::from_str(v.get()).ok()?)))
    .collect();
    Some(members.into())
}

fn positive(v: Option<&serde_json::Value>) -> Option<u64> {
    v.and_then(|v| v.as_u64()).filter(|&n| n > 0)
}
