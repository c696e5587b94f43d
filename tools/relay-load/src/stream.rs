//! One client stream, by hand on a glommio `TcpStream`: the upgrade request,
//! the config message, paced audio frames (or keepalives), the results and
//! the closing handshake. Frames are built and parsed with the crate's own
//! [`clio_frame::frame`] helpers; each stream has one reusable audio frame buffer.

use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use serde::Deserialize;

use super::{sleep_until, AuthVia, Mode, Worker};
use clio_frame::frame::{self, Opcode, Sender};
use clio_relay::dataplane::io::{timeout, Conn, Duplex};

/// Largest server frame or message accepted.
const MAX_MESSAGE: usize = 1 << 20;

/// Largest response head to an upgrade.
const MAX_HEAD: usize = 16 << 10;

/// How a stream ended badly: the key it is counted under.
type Fail = String;

/// Runs stream slot `slot`: one stream, or (churn, `repeat`) one after
/// another until new starts are over.
pub(crate) async fn run_slot(w: Rc<Worker>, slot: u64) {
    let repeat = w.opts.repeat || w.opts.mode == Mode::Churn;
    let mut round = 0u64;
    loop {
        let id = slot + round * w.opts.streams as u64;
        one_stream(&w, id).await;
        round += 1;
        if !repeat || Instant::now() >= w.last_start || w.is_stopped() {
            break;
        }
    }
}

/// One stream from connect to close, counted in the worker's counters.
async fn one_stream(w: &Rc<Worker>, id: u64) {
    {
        let mut c = w.counters.borrow_mut();
        c.started += 1;
        c.open += 1;
    }
    let outcome = future::or(async { Some(body(w, id).await) }, async {
        w.sleep_until(w.hard_end).await;
        None
    })
    .await;
    let mut c = w.counters.borrow_mut();
    c.open -= 1;
    match outcome {
        None => c.cut += 1,
        Some(Ok(lost)) => {
            c.ok += 1;
            c.lost += lost;
        }
        Some(Err(code)) => *c.failed.entry(code).or_insert(0) += 1,
    }
}

/// What a stream's reader learned about the frames that came back.
struct Seen {
    bits: Vec<u64>,
    distinct: u64,
    max: Option<u64>,
}

impl Seen {
    /// For a stream of `frames` frames. The bitmap grows as frames come
    /// back, up to a word per 64 of them: a stream asked to last for ever
    /// (`--stream-seconds 1e300`) costs only what it sends. Allocated up
    /// front, its bitmap for such a length ended the run at its first
    /// stream (an allocation failure).
    fn new(frames: u64) -> Seen {
        Seen {
            bits: Vec::with_capacity(frames.div_ceil(64).min(1 << 16) as usize),
            distinct: 0,
            max: None,
        }
    }
}

/// The socket and the write side both halves share.
struct Wire {
    conn: Duplex,
    /// One writer at a time: audio frames (writer) and pong or close
    /// replies (reader) must not interleave.
    write_lock: Semaphore,
}

impl Wire {
    async fn send(&self, w: &Worker, bytes: &[u8]) -> Result<(), Fail> {
        let _permit = self.write_lock.acquire_permit(1).await.map_err(|_| "io")?;
        self.conn.write_all(bytes).await.map_err(io_fail)?;
        w.counters.borrow_mut().bytes_sent += bytes.len() as u64;
        Ok(())
    }
}

fn io_fail(e: std::io::Error) -> Fail {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset | BrokenPipe => "reset".into(),
        TimedOut => "timeout".into(),
        UnexpectedEof => "eof".into(),
        AddrNotAvailable | AddrInUse => "no local port".into(),
        _ => match e.raw_os_error() {
            Some(24) => "too many open files".into(),
            _ => "io error".into(),
        },
    }
}

/// What a stream fails with when its connection was accepted and then
/// closed (FIN or reset) before a byte of an answer to its upgrade
/// request came: [`CLOSED_UNANSWERED`]. Any target may (or a proxy on
/// the way); a clio-relay does that to a client its `server.allow` does
/// not list, so the report's hint names it.
fn unanswered(e: Fail) -> Fail {
    match e.as_str() {
        "eof" | "reset" => CLOSED_UNANSWERED.into(),
        _ => e,
    }
}

/// The failure key of a connection closed before any answer to its
/// upgrade request (see [`unanswered`]).
pub(crate) const CLOSED_UNANSWERED: &str = "closed unanswered";

/// Connect, upgrade, stream, close. `Ok` is the number of frames lost.
async fn body(w: &Rc<Worker>, id: u64) -> Result<u64, Fail> {
    let o = &w.opts;
    let t0 = Instant::now();
    let cred = o.credentials.for_stream(id).map_err(|_| "token mint")?;
    let tcp = timeout(o.io_timeout, TcpStream::connect(o.target.addr))
        .await
        .ok_or("connect timeout")?
        .map_err(|e| match e {
            glommio::GlommioError::IoError(e) => io_fail(e),
            _ => "connect".to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let wire = Wire {
        conn: Duplex::new(Conn::Plain(tcp.into())),
        write_lock: Semaphore::new(1),
    };
    wire.send(w, upgrade_request(w, cred.as_deref()).as_bytes())
        .await
        .map_err(unanswered)?;

    let mut rb = ReadBuf::new();
    let head_len = loop {
        if let Some(p) = rb.data().windows(4).position(|x| x == b"\r\n\r\n") {
            break p + 4;
        }
        if rb.len() >= MAX_HEAD {
            return Err("bad upgrade response".into());
        }
        let nothing_yet = rb.len() == 0;
        rb.fill(w, &wire.conn, o.io_timeout).await.map_err(|e| {
            if nothing_yet {
                unanswered(e)
            } else {
                e
            }
        })?;
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&rb.data()[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("bad upgrade response".into()),
    }
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        let failure = format!("http {status}");
        // The relay says why in a JSON body (`error_message`): read it
        // (a little, briefly) so the report can name the cause.
        let length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
        if let Some(length) = length.filter(|&n| n > 0 && n <= MAX_ERROR_BODY) {
            rb.consume(head_len);
            let limit = o.io_timeout.min(Duration::from_secs(1));
            while rb.len() < length {
                if rb.fill(w, &wire.conn, limit).await.is_err() {
                    break;
                }
            }
            if let Some(message) = error_message(&rb.data()[..rb.len().min(length)]) {
                w.counters.borrow_mut().note_reason(&failure, &message);
            }
        }
        return Err(failure);
    }
    rb.consume(head_len);
    if o.mode == Mode::Idle {
        w.connect
            .borrow_mut()
            .saturating_record(t0.elapsed().as_micros() as u64);
    }

    let mask_key = (w.next_random() as u32).to_le_bytes();
    let frames = o.frames_per_stream();
    let sent = Cell::new(0u64);
    // When the end of audio went out: the answer to it (`finished`) gets
    // `io_timeout` from then, not from whenever the pending read began.
    let ended_at: Cell<Option<Instant>> = Cell::new(None);
    let (first_tx, first_rx) = async_channel::bounded::<()>(1);

    let config = config_message(w, cred.as_deref());
    wire.send(
        w,
        &frame::build_frame(Opcode::Text, config.as_bytes(), Some(mask_key)),
    )
    .await?;

    let writer = async {
        match o.mode {
            Mode::Stream | Mode::Churn => {
                let mut buf = audio_frame(o.frame_bytes(), mask_key);
                let payload_at = buf.len() - o.frame_bytes();
                let interval = o.frame_interval();
                let audio_start = Instant::now();
                for seq in 0..frames {
                    if !interval.is_zero() {
                        sleep_until(audio_start + interval * seq as u32).await;
                    }
                    let mut stamp = [0u8; 16];
                    stamp[..8].copy_from_slice(&seq.to_le_bytes());
                    stamp[8..].copy_from_slice(&w.ns_since_epoch().to_le_bytes());
                    for (i, b) in stamp.iter().enumerate() {
                        buf[payload_at + i] = b ^ mask_key[i % 4];
                    }
                    wire.send(w, &buf).await?;
                    sent.set(seq + 1);
                    w.counters.borrow_mut().frames_sent += 1;
                }
                if o.mode == Mode::Churn {
                    let _ = first_rx.recv().await;
                }
            }
            Mode::Idle => {
                let keepalive =
                    frame::build_frame(Opcode::Text, br#"{"type":"keepalive"}"#, Some(mask_key));
                loop {
                    let now = Instant::now();
                    if now >= w.last_start {
                        break;
                    }
                    sleep_until((now + o.keepalive_every).min(w.last_start)).await;
                    if Instant::now() >= w.last_start {
                        break;
                    }
                    wire.send(w, &keepalive).await?;
                }
                w.counters.borrow_mut().idle_held += 1;
            }
        }
        ended_at.set(Some(Instant::now()));
        wire.send(w, &frame::build_frame(Opcode::Binary, &[], Some(mask_key)))
            .await
    };

    let reader = async {
        let mut seen = Seen::new(frames);
        let mut message: Vec<u8> = Vec::new();
        let mut finished = false;
        let mut first = true;
        loop {
            // Every complete frame in the buffer.
            while let Some(h) = frame::parse_header(rb.data(), Sender::Server, MAX_MESSAGE as u64)
                .map_err(|_| "bad server frame")?
            {
                let total = h.header_len + h.payload_len as usize;
                if rb.len() < total {
                    break;
                }
                let payload = &rb.data()[h.header_len..total];
                match h.opcode {
                    Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                        let whole = if h.fin && message.is_empty() {
                            Some(payload)
                        } else {
                            message.extend_from_slice(payload);
                            if message.len() > MAX_MESSAGE {
                                return Err("message too big".into());
                            }
                            h.fin.then_some(&message[..])
                        };
                        if let Some(text) = whole {
                            let r = on_message(w, text, &mut seen, frames)?;
                            if r.results && first && o.mode != Mode::Idle {
                                first = false;
                                w.connect
                                    .borrow_mut()
                                    .saturating_record(t0.elapsed().as_micros() as u64);
                                let _ = first_tx.try_send(());
                            }
                            finished |= r.finished;
                            if h.fin {
                                message.clear();
                            }
                        }
                    }
                    Opcode::Ping => {
                        let pong = frame::build_frame(Opcode::Pong, payload, Some(mask_key));
                        rb.consume(total);
                        wire.send(w, &pong).await?;
                        continue;
                    }
                    Opcode::Pong => {}
                    Opcode::Close => {
                        let code = if payload.len() >= 2 {
                            u16::from_be_bytes([payload[0], payload[1]])
                        } else {
                            1005
                        };
                        let reply =
                            frame::close_payload(if code == 1005 { 1000 } else { code }, "");
                        rb.consume(total);
                        let _ = wire
                            .send(
                                w,
                                &frame::build_frame(Opcode::Close, &reply, Some(mask_key)),
                            )
                            .await;
                        // Let the server close first (a short, bounded wait).
                        let _ = timeout(Duration::from_secs(2), async {
                            let mut scratch = [0u8; 512];
                            while matches!(wire.conn.read(&mut scratch).await, Ok(n) if n > 0) {}
                        })
                        .await;
                        if !finished {
                            return Err(format!("close {code}"));
                        }
                        return Ok(seen.distinct);
                    }
                }
                rb.consume(total);
            }
            // An idle stream gets nothing until its end of audio, so it
            // reads in short slices and only its time since the end counts.
            let slice = if o.mode == Mode::Idle {
                o.io_timeout.min(Duration::from_secs(1))
            } else {
                o.io_timeout
            };
            match rb.fill(w, &wire.conn, slice).await {
                Ok(()) => {}
                Err(e)
                    if e == "timeout"
                        && o.mode == Mode::Idle
                        && ended_at.get().is_none_or(|t| t.elapsed() < o.io_timeout) => {}
                Err(e) => return Err(e),
            }
        }
    };

    // A write fails when the server has closed, usually after an error
    // message: let the reader report that message (or the close) instead.
    let writer = async {
        let result = writer.await;
        if result.is_err() {
            ended_at.set(Some(Instant::now()));
            future::pending::<()>().await;
        }
        result
    };
    let ((), distinct) = future::try_zip(writer, reader).await?;
    Ok(sent.get().saturating_sub(distinct))
}

/// What one server message held.
struct MessageInfo {
    /// It carried at least one token.
    results: bool,
    finished: bool,
}

/// The largest error body read for its message.
const MAX_ERROR_BODY: usize = 4096;

/// The `error_message` of a JSON error (the relay's and Soniox's shape).
fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error_message: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|e| e.error_message)
}

#[derive(Deserialize)]
struct ServerMsg<'a> {
    #[serde(default, borrow)]
    tokens: Vec<Token<'a>>,
    #[serde(default)]
    error_code: Option<u64>,
    #[serde(default, borrow)]
    error_message: Option<Cow<'a, str>>,
    #[serde(default)]
    finished: bool,
}

#[derive(Deserialize)]
struct Token<'a> {
    #[serde(default, borrow)]
    text: Cow<'a, str>,
}

/// Accounts for one server message: echoed frames (round trip, order),
/// errors, `finished`.
fn on_message(w: &Worker, text: &[u8], seen: &mut Seen, frames: u64) -> Result<MessageInfo, Fail> {
    let r: ServerMsg<'_> = serde_json::from_slice(text).map_err(|_| "bad result json")?;
    if let Some(code) = r.error_code {
        let failure = format!("error {code}");
        if let Some(message) = &r.error_message {
            w.counters.borrow_mut().note_reason(&failure, message);
        }
        return Err(failure);
    }
    let now = w.ns_since_epoch();
    let mut c = w.counters.borrow_mut();
    for t in &r.tokens {
        if is_marker(&t.text) {
            // Soniox's markers (a finalize's `<fin>`, an endpoint's `<end>`):
            // no word, echoed or not.
            continue;
        }
        let Some(stamp) = unhex16(&t.text) else {
            c.unexpected += 1;
            continue;
        };
        let seq = u64::from_le_bytes(stamp[..8].try_into().unwrap());
        let sent_ns = u64::from_le_bytes(stamp[8..].try_into().unwrap());
        if seq >= frames {
            c.unexpected += 1;
            continue;
        }
        c.frames_received += 1;
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= seen.bits.len() {
            seen.bits.resize(word + 1, 0);
        }
        if seen.bits[word] & bit != 0 {
            c.duplicated += 1;
            continue;
        }
        seen.bits[word] |= bit;
        seen.distinct += 1;
        if seen.max.is_some_and(|m| seq < m) {
            c.reordered += 1;
        }
        seen.max = Some(seen.max.map_or(seq, |m| m.max(seq)));
        w.rtt
            .borrow_mut()
            .saturating_record(now.saturating_sub(sent_ns) / 1000);
    }
    Ok(MessageInfo {
        results: !r.tokens.is_empty(),
        finished: r.finished,
    })
}

/// Whether a token is one of Soniox's markers rather than a word: `<fin>`
/// after a finalize (a draining relay sends one), `<end>` at an endpoint.
fn is_marker(text: &str) -> bool {
    matches!(text, "<fin>" | "<end>")
}

/// 32 lowercase hex digits back into 16 bytes.
fn unhex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(out)
}

/// A masked binary frame of `len` filler bytes (a quiet sine-ish pattern),
/// whose first 16 payload bytes are rewritten per frame.
fn audio_frame(len: usize, key: [u8; 4]) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i as u32 * 37 % 251) as u8).collect();
    frame::build_frame(Opcode::Binary, &payload, Some(key))
}

/// The upgrade request, with the credential placed per `auth`.
fn upgrade_request(w: &Worker, cred: Option<&str>) -> String {
    use base64::Engine as _;
    let o = &w.opts;
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&w.next_random().to_le_bytes());
    key[8..].copy_from_slice(&w.next_random().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut path = o.target.path.clone();
    let mut extra = String::new();
    if let Some(cred) = cred {
        match o.auth {
            AuthVia::Header => extra = format!("Authorization: Bearer {cred}\r\n"),
            AuthVia::Subprotocol => {
                extra = format!("Sec-WebSocket-Protocol: soniox-api-key, {cred}\r\n")
            }
            AuthVia::Query => {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str("token=");
                path.push_str(cred);
            }
            AuthVia::FirstMessage | AuthVia::None => {}
        }
    }
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        o.target.host
    )
}

/// The config message: 16 kHz (or the given rate) s16le mono.
fn config_message(w: &Worker, cred: Option<&str>) -> String {
    let o = &w.opts;
    let mut v = serde_json::json!({
        "model": o.model,
        "audio_format": "pcm_s16le",
        "sample_rate": o.sample_rate,
        "num_channels": 1,
    });
    if let (AuthVia::FirstMessage, Some(cred)) = (o.auth, cred) {
        v["api_key"] = serde_json::Value::String(cred.to_string());
    }
    v.to_string()
}

/// A stream's read buffer: `data()` is what has been read and not consumed.
struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> ReadBuf {
        ReadBuf {
            buf: vec![0; 4096],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more (at least one byte), within `limit`.
    async fn fill(&mut self, w: &Worker, conn: &Duplex, limit: Duration) -> Result<(), Fail> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = timeout(limit, conn.read(&mut self.buf[self.end..]))
            .await
            .ok_or("timeout")?
            .map_err(io_fail)?;
        if n == 0 {
            return Err("eof".into());
        }
        self.end += n;
        w.counters.borrow_mut().bytes_received += n as u64;
        Ok(())
    }
}
