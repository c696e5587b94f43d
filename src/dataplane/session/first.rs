//! The client's first message: the config JSON (the only client message
//! the relay parses), in one text frame or in fragments joined, and a
//! token carried in it.

use std::time::SystemTime;

use futures_lite::future;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::core::metrics::Side;
use crate::core::token::Claims;
use crate::dataplane::buf::Buf;
use crate::dataplane::io::{timeout, Duplex};
use clio_frame::frame::{build_frame, parse_header, FrameError, FrameHeader, Opcode, Sender};
use clio_frame::mask::apply_mask;
use clio_frame::scanner::close_body_fault;

use super::config::{members, too_deep, Fields, LoneSurrogate};
use super::{Refusal, Stream};

impl Stream {
    /// Reads the client's first message: a text message with a JSON object,
    /// in one frame or in fragments. Pings before it and between its
    /// fragments are answered here; a close ends the stream.
    /// Once it came, the stream has begun: a drain waits for it. A drain
    /// that ends before it comes refuses the stream (503, close 1012).
    pub(super) async fn read_first_message(
        &self,
        client: &Duplex,
        buf: &mut Buf,
    ) -> Result<ClientConfig, Refusal> {
        let first = self.read_config(client, buf).await;
        if first.is_ok() {
            let _ = self.begun.set(self.shard.process.begin());
        }
        first
    }

    async fn read_config(&self, client: &Duplex, buf: &mut Buf) -> Result<ClientConfig, Refusal> {
        let lim = &self.settings.limits;
        // One deadline for the whole wait: pings and partial frames do not
        // extend it.
        let deadline = std::time::Instant::now() + lim.idle_timeout;
        // A config sent in fragments (RFC 6455 §5.4: some clients split a
        // long message, with pings between): joined here, at most
        // `max_first_message_bytes` in all, once per stream.
        let mut joined: Option<Vec<u8>> = None;
        loop {
            let h = match parse_header(
                buf.filled(),
                Sender::Client,
                lim.max_first_message_bytes as u64,
            ) {
                Err(FrameError::TooBig) => return Err(too_large()),
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
                    // gathered into its own vector, once per stream. Any
                    // other frame that large is refused unread.
                    let expected = match joined {
                        None => Opcode::Text,
                        Some(_) => Opcode::Continuation,
                    };
                    if h.opcode != expected {
                        return config_part(h.opcode, h.fin, &[], &mut joined, usize::MAX)
                            .expect("a frame out of place is refused");
                    }
                    // Fragments past the limit in all are refused before
                    // they are read: a waiting connection holds at most
                    // `max_first_message_bytes` of its config.
                    let max = lim.max_first_message_bytes;
                    let so_far = joined.as_ref().map_or(0, Vec::len);
                    if so_far + h.payload_len as usize > max {
                        return Err(too_large());
                    }
                    let payload = self.read_large_frame(client, buf, h, deadline).await?;
                    match config_part(h.opcode, h.fin, &payload, &mut joined, max) {
                        Some(done) => return done,
                        None => continue,
                    }
                }
                if buf.len() >= n {
                    let (start, hl) = (buf.start(), h.header_len);
                    buf.advance(n);
                    let payload = &mut buf.raw()[start + hl..start + n];
                    apply_mask(payload, mask, 0);
                    match h.opcode {
                        Opcode::Ping => {
                            let pong = build_frame(Opcode::Pong, payload, None);
                            // Within the same deadline: a client that pings
                            // and never reads the pongs (its socket full) is
                            // let go, with nothing more written after what
                            // may be half a pong.
                            // A drain's end lets it go the same way.
                            let left =
                                deadline.saturating_duration_since(std::time::Instant::now());
                            let written = future::or(
                                async { timeout(left, client.write_all(&pong)).await.is_some() },
                                async {
                                    self.shard.drain_ended().await;
                                    false
                                },
                            );
                            if !written.await {
                                return Err(Refusal::silent(0));
                            }
                        }
                        Opcode::Pong => {}
                        // Its body is checked as a later close frame's is
                        // (the scanner's): a bad one gets its error.
                        Opcode::Close => {
                            return Err(match close_body_fault(payload) {
                                None => Refusal::silent(1000),
                                Some(e) => Refusal::new(
                                    400,
                                    "bad_request",
                                    e.reason(),
                                    e.close_code(),
                                    Side::Client,
                                ),
                            })
                        }
                        op => {
                            let max = lim.max_first_message_bytes;
                            if let Some(done) = config_part(op, h.fin, payload, &mut joined, max) {
                                return done;
                            }
                        }
                    }
                    continue;
                }
            }
            self.read_more(client, buf, deadline).await?;
        }
    }

    /// Reads more client bytes while waiting for the first message, until
    /// `deadline`, or until a drain ends (the stream has not begun, and
    /// does not hold it).
    async fn read_more(
        &self,
        client: &Duplex,
        buf: &mut Buf,
        deadline: std::time::Instant,
    ) -> Result<(), Refusal> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let read = future::or(
            async { Some(timeout(left, buf.read_from(client)).await) },
            async {
                self.shard.drain_ended().await;
                None
            },
        );
        match read.await {
            None => Err(Refusal::restarting()),
            Some(None) => Err(Refusal::new(
                408,
                "request_timeout",
                "No start request received in time.",
                1000,
                Side::Client,
            )),
            Some(Some(Ok(0)) | Some(Err(_))) => Err(Refusal::silent(0)),
            Some(Some(Ok(_))) => Ok(()),
        }
    }

    /// Reads the payload of a data frame larger than the read buffer into
    /// a vector of its own, unmasked.
    async fn read_large_frame(
        &self,
        client: &Duplex,
        buf: &mut Buf,
        h: FrameHeader,
        deadline: std::time::Instant,
    ) -> Result<Vec<u8>, Refusal> {
        let mask = h.mask.expect("client frames are masked");
        let total = h.payload_len as usize;
        buf.consume(h.header_len);
        let mut payload = Vec::with_capacity(total);
        while payload.len() < total {
            if buf.is_empty() {
                self.read_more(client, buf, deadline).await?;
            }
            let take = buf.len().min(total - payload.len());
            let at = payload.len();
            payload.extend_from_slice(&buf.filled()[..take]);
            apply_mask(&mut payload[at..], mask, at);
            buf.consume(take);
        }
        Ok(payload)
    }

    /// The claims of a token carried as `api_key` in the first message.
    pub(super) fn first_message_claims(&self, first: &Fields) -> Result<Claims, Refusal> {
        match &first.api_key {
            Some(Err(LoneSurrogate(name))) => Err(lone_surrogate(name)),
            Some(Ok(token)) => self
                .settings
                .tokens
                .verify(token, SystemTime::now())
                .map_err(|e| Refusal::unauthorized(format!("Session token refused: {e}."))),
            _ => Err(Refusal::unauthorized("Missing session token.")),
        }
    }
}

/// The client's config message: the fields the relay reads, and its
/// text as the client sent it, which upstream gets (see
/// [`upstream_config_text`](super::upstream_config_text)).
pub(super) struct ClientConfig {
    pub fields: Fields,
    pub text: Box<[u8]>,
}

/// A first message over `limits.max_first_message_bytes`, in one frame or
/// in fragments.
fn too_large() -> Refusal {
    Refusal::new(
        400,
        "bad_request",
        "Start request is too large.",
        1009,
        Side::Client,
    )
}

/// Takes one data frame of the first message: `Some` once the message is
/// whole (or refused), `None` while its fragments are still coming, kept
/// in `joined`. A continuation with no message open, or a new message
/// inside one, is a protocol error (RFC 6455 §5.4), as it is later in the
/// stream; fragments over `max` bytes in all are refused as too large.
fn config_part(
    opcode: Opcode,
    fin: bool,
    payload: &[u8],
    joined: &mut Option<Vec<u8>>,
    max: usize,
) -> Option<Result<ClientConfig, Refusal>> {
    let out_of_order = || {
        let e = FrameError::Fragmentation;
        Some(Err(Refusal::new(
            400,
            "bad_request",
            e.reason(),
            e.close_code(),
            Side::Client,
        )))
    };
    match (opcode, joined.as_mut()) {
        (Opcode::Text, None) if !fin => {
            *joined = Some(payload.to_vec());
            None
        }
        (Opcode::Continuation, Some(so_far)) => {
            if so_far.len() + payload.len() > max {
                return Some(Err(too_large()));
            }
            so_far.extend_from_slice(payload);
            if !fin {
                return None;
            }
            let whole = joined.take().expect("a message is open");
            Some(parse_config(Opcode::Text, true, &whole))
        }
        (Opcode::Continuation, None) | (_, Some(_)) => out_of_order(),
        (op, None) => Some(parse_config(op, fin, payload)),
    }
}

/// Checks and parses the first message: one text message holding a JSON object.
fn parse_config(opcode: Opcode, fin: bool, payload: &[u8]) -> Result<ClientConfig, Refusal> {
    debug_assert!(fin || opcode != Opcode::Text, "fragments are joined first");
    match opcode {
        // A text message that is not UTF-8 fails the connection with 1007
        // (RFC 6455 §8.1), the first as any later one: it is no JSON
        // question.
        Opcode::Text if std::str::from_utf8(payload).is_err() => {
            let e = FrameError::InvalidUtf8;
            Err(Refusal::new(
                400,
                "bad_request",
                e.reason(),
                e.close_code(),
                Side::Client,
            ))
        }
        Opcode::Text => {
            let text = std::str::from_utf8(payload).expect("checked above");
            Ok(ClientConfig {
                fields: read_fields(text)?,
                text: payload.into(),
            })
        }
        _ => Err(Refusal::bad_request(
            "Start request must be a text message.",
        )),
    }
}

/// Reads the members of the config the relay needs. Refused: a text that
/// is not JSON, or JSON nested deeper than serde_json reads (its words,
/// as before); one that is no object; a member the relay needs whole as
/// a string holding a lone surrogate. JSON's grammar allows what a JSON
/// map cannot hold (a lone surrogate escape, a number past f64's range):
/// anywhere else, that goes upstream as written, for upstream to judge.
fn read_fields(text: &str) -> Result<Fields, Refusal> {
    // serde_json's words are its fixed ones and a position ("trailing
    // comma at line 1 column 8"): they never quote the message, which
    // may carry a token.
    let not_json = |e: &dyn std::fmt::Display| {
        Refusal::bad_request(format!("Start request is not valid JSON: {e}."))
    };
    let not_object = || Refusal::bad_request("Start request must be a JSON object.");
    // Read as a map first: what it takes, JSON takes, and its errors
    // for what JSON does not take are the words clients had.
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Err(not_object()),
        Err(e) => match serde_json::from_str::<&RawValue>(text) {
            // Not JSON. When the map stopped earlier, at what JSON allows
            // (a lone surrogate), the fault is the later one.
            Err(raw) if (raw.line(), raw.column()) > (e.line(), e.column()) => {
                return Err(not_json(&raw))
            }
            Err(_) => return Err(not_json(&e)),
            Ok(_) => {
                if let Some(deep) = too_deep(text) {
                    return Err(not_json(&deep));
                }
            }
        },
    }
    let members = members(text).map_err(|_| not_object())?;
    Fields::read(&members).map_err(|LoneSurrogate(name)| lone_surrogate(name))
}

/// A member the relay reads as a string (`name`) holds a lone surrogate
/// escape, which no string holds: said without quoting it.
fn lone_surrogate(name: &str) -> Refusal {
    Refusal::bad_request(format!(
        "Start request's {name} is not a valid string: it holds a lone surrogate escape."
    ))
}
