//! What the two pumps of one stream share: a half per direction, each
//! written by its own pump, and the meter of what the stream is counted and
//! billed for. Plain cells: both pumps run in the stream's one task.

use std::cell::{Cell, RefCell};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use memchr::memmem::Finder;

use super::resume;
use crate::core::keyring::RateScope;
use crate::core::usage::UsageRecord;

/// What the two pumps of one stream share. Plain cells: both run in one task.
///
/// Each direction writes its own half ([`UpHalf`], [`DownHalf`]); what
/// the stream is counted and billed for is in its [`Meter`].
#[derive(Debug)]
pub struct StreamState {
    /// When the stream started (after the upgrade).
    pub started: Instant,
    /// Last time bytes arrived from either side (idle detection).
    pub last_activity: Cell<Instant>,
    /// The client→upstream direction.
    pub up: UpHalf,
    /// The upstream→client direction.
    pub down: DownHalf,
    /// Bytes, audio and upstream's own figures, for limits and usage.
    pub meter: Meter,
    /// Raw-audio streams: the copy and timeline for a mid-stream resume.
    pub resume: RefCell<Option<Box<resume::Resume>>>,
}

impl StreamState {
    /// Fresh state at `now`.
    pub fn new(now: Instant) -> Self {
        StreamState {
            started: now,
            last_activity: Cell::new(now),
            up: UpHalf {
                at_boundary: Cell::new(true),
                write_since: Cell::new(None),
                first_audio_at: Cell::new(None),
                replayable: Cell::new(true),
                audio_ended: Cell::new(false),
                behind_client: Cell::new(false),
                client_closed: Cell::new(false),
            },
            down: DownHalf {
                at_boundary: Cell::new(true),
                mid_message: Cell::new(false),
                inspect_first: Cell::new(true),
                first_error: Cell::new(None),
                error_passed: Cell::new(None),
                accepted: Cell::new(false),
                ever_accepted: Cell::new(false),
                first_result_seen: Cell::new(false),
                fins: Cell::new(0),
                fin_search: Cell::new(FinSearch::default()),
                joined: RefCell::new(None),
                last_word_seen: Cell::new(false),
                write_since: Cell::new(None),
                held: Cell::new(0),
            },
            meter: Meter::default(),
            resume: RefCell::new(None),
        }
    }

    /// Whether upstream's refusal can still move the stream to another
    /// account unseen: everything sent up is in the replay copy and
    /// upstream has not accepted the stream.
    pub fn retry_allowed(&self) -> bool {
        self.up.replayable.get() && !self.down.accepted.get()
    }

    /// A new upstream connection (after a failover or a resume): its
    /// first message is looked at again, and it gets a whole idle timeout
    /// (the wait that ended the last one, after the client's end of audio,
    /// must not end this one at once).
    pub fn new_connection(&self) {
        self.down.new_connection();
        self.last_activity.set(Instant::now());
    }

    /// Looks at a whole upstream text message for `<fin>` and for the
    /// figures usage needs: `total_audio_proc_ms` of `finished`, and an
    /// `error_code`. A byte search first, so ordinary results cost almost
    /// nothing. Returns whether `<fin>` was there.
    pub fn note_upstream_text(&self, payload: &[u8]) -> bool {
        let fin = FIN.find(payload).is_some();
        if fin {
            self.down.fins.set(self.down.fins.get() + 1);
        }
        self.note_upstream_figures(payload);
        fin
    }

    /// Takes the next piece of an upstream text message as the scanner
    /// walks it ([`FrameScanner::scan_text`](clio_frame::scanner::FrameScanner::scan_text)):
    /// a message whole in one read is looked at in place, as
    /// [`note_upstream_text`](Self::note_upstream_text) does. One that
    /// comes in pieces (cut across reads, or sent in fragments) is joined
    /// into a copy of up to [`JOINED_TEXT_MAX`] bytes and looked at whole
    /// once its last piece is in, so that a `finished` or an error is read
    /// however it came; past that bound the copy is let go, and only
    /// `<fin>` is still found (the search carries 4 bytes from one piece
    /// to the next), counted in [`DownHalf::fins`] once.
    pub fn note_upstream_piece(&self, piece: &[u8], starts: bool, ends: bool) {
        if starts && ends {
            self.note_upstream_text(piece);
            return;
        }
        let down = &self.down;
        let (mut search, mut joined) = if starts {
            (FinSearch::default(), Some(Box::default()))
        } else {
            (down.fin_search.get(), down.joined.take())
        };
        search.feed(piece);
        if let Some(text) = joined.as_deref_mut() {
            if text.len() + piece.len() <= JOINED_TEXT_MAX {
                text.extend_from_slice(piece);
            } else {
                joined = None;
            }
        }
        if !ends {
            down.fin_search.set(search);
            down.joined.replace(joined);
            return;
        }
        match joined {
            Some(text) => {
                self.note_upstream_text(&text);
            }
            None if search.found => down.fins.set(down.fins.get() + 1),
            None => {}
        }
    }

    /// The figures of a whole upstream text message (see
    /// [`note_upstream_text`](Self::note_upstream_text)).
    fn note_upstream_figures(&self, payload: &[u8]) {
        if self.meter.compressed() {
            // Only upstream can tell a compressed stream's length: its
            // latest figure stands for a stream that ends without
            // `finished` (a client that left, a drain, a revocation).
            if let Some(ms) = total_audio_proc_ms_of(payload) {
                self.meter.upstream_seen_ms.set(Some(ms));
            }
        }
        if FINISHED.find(payload).is_none() && ERROR_CODE.find(payload).is_none() {
            return;
        }
        if let Some(t) = upstream_said(payload) {
            if t.finished || t.error.is_some() {
                self.down.last_word_seen.set(true);
            }
            if t.finished {
                self.meter.upstream_audio_ms.set(t.total_audio_proc_ms);
            }
            if let Some((code, scope)) = t.error.filter(|&(code, _)| code != 0) {
                self.meter.upstream_error.set(Some(code));
                self.down.error_passed.set(Some((code, scope)));
            }
        }
    }
}

/// Whether `<fin>` is in an upstream text message that comes in pieces
/// (split across reads): the last 4 bytes seen are carried to the next
/// piece, so a `<fin>` cut anywhere is found. Bounded: 6 bytes, whatever
/// the message's length.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FinSearch {
    /// The message's last bytes so far (at most 4: one short of `<fin>`).
    tail: [u8; 4],
    tail_len: u8,
    /// `<fin>` is in the message so far.
    found: bool,
}

impl FinSearch {
    /// Takes the message's next `piece`.
    fn feed(&mut self, piece: &[u8]) {
        if self.found || piece.is_empty() {
            return;
        }
        // A `<fin>` across the cut starts in the tail and ends within the
        // piece's first 4 bytes.
        let t = self.tail_len as usize;
        let head = piece.len().min(4);
        let mut joint = [0u8; 8];
        joint[..t].copy_from_slice(&self.tail[..t]);
        joint[t..t + head].copy_from_slice(&piece[..head]);
        if FIN.find(&joint[..t + head]).is_some() || FIN.find(piece).is_some() {
            self.found = true;
            return;
        }
        let keep = (t + piece.len()).min(4);
        let mut tail = [0u8; 4];
        if piece.len() >= keep {
            tail[..keep].copy_from_slice(&piece[piece.len() - keep..]);
        } else {
            let old = keep - piece.len();
            tail[..old].copy_from_slice(&self.tail[t - old..t]);
            tail[old..keep].copy_from_slice(piece);
        }
        self.tail = tail;
        self.tail_len = keep as u8;
    }
}

/// What an upstream text message says as upstream's last word: an error,
/// or `finished`. Read leniently, field by field, so that one field of an
/// unexpected type does not hide the others: before, a `finished` whose
/// `total_audio_proc_ms` was not a whole number, or an error whose
/// `error_code` was a string or whose `error_message` was `null`, was
/// taken for an ordinary result (and a close after it for a server going
/// away).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct UpstreamSaid {
    /// An error (`error_code` there and not `null`): its code, when it is
    /// a number or a string of digits that fits (`0` when it is not), and
    /// the level of a 429, read from `error_message`.
    pub error: Option<(u16, RateScope)>,
    /// `"finished": true`.
    pub finished: bool,
    /// `total_audio_proc_ms`, a fraction dropped.
    pub total_audio_proc_ms: Option<u64>,
}

/// Reads an upstream text message (a JSON object) for [`UpstreamSaid`];
/// `None` when it is not one. Only messages a byte search found
/// `"error_code"` or `"finished"` in are parsed; the rest of the object
/// is skipped, not kept.
pub(crate) fn upstream_said(payload: &[u8]) -> Option<UpstreamSaid> {
    use serde_json::Value;
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(default)]
        error_code: Option<Value>,
        #[serde(default)]
        error_message: Option<Value>,
        #[serde(default)]
        finished: Option<Value>,
        #[serde(default)]
        total_audio_proc_ms: Option<Value>,
    }
    // An object only: serde would read a struct from an array too.
    if payload.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let s: Shape = serde_json::from_slice(payload).ok()?;
    let whole = |v: &Value| -> Option<u64> {
        match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                    .map(|f| f as u64)
            }),
            Value::String(t) => t.trim().parse().ok(),
            _ => None,
        }
    };
    let error = s.error_code.map(|code| {
        let code = whole(&code)
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(0);
        let message = match &s.error_message {
            Some(Value::String(m)) => m.as_str(),
            _ => "",
        };
        (code, RateScope::from_message(message))
    });
    Some(UpstreamSaid {
        error,
        finished: s.finished == Some(Value::Bool(true)),
        total_audio_proc_ms: s.total_audio_proc_ms.as_ref().and_then(whole),
    })
}

// The byte searches run over every upstream result: SIMD searchers (a
// compare at every offset showed in the profile of a flood), each built
// once rather than per search (building one showed too).
/// The longest upstream text message in pieces that is joined to be read
/// whole (see [`StreamState::note_upstream_piece`]): `finished` and errors
/// are well under it (upstream's `finished` carries no tokens).
pub const JOINED_TEXT_MAX: usize = 8 << 10;

static FIN: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"<fin>"));
static FINISHED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finished\""));
pub(crate) static ERROR_CODE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"error_code\""));
static FINAL_MS: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"final_audio_proc_ms\""));
static TOTAL_MS: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"total_audio_proc_ms\""));

/// A result's `final_audio_proc_ms`, read from its bytes (no JSON parse).
pub(super) fn final_audio_proc_ms_of(payload: &[u8]) -> Option<u64> {
    number_after(payload, &FINAL_MS)
}

/// A result's `total_audio_proc_ms`, read from its bytes (no JSON parse).
pub(super) fn total_audio_proc_ms_of(payload: &[u8]) -> Option<u64> {
    number_after(payload, &TOTAL_MS)
}

/// The whole number after the first `key` (a quoted JSON key) in
/// `payload`; `None` without one, or past `u64`.
fn number_after(payload: &[u8], key: &Finder<'_>) -> Option<u64> {
    let at = key.find(payload)? + key.needle().len();
    let rest = payload[at..].trim_ascii_start().strip_prefix(b":")?;
    let digits = rest
        .trim_ascii_start()
        .iter()
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// The client→upstream half, written by [`client_to_upstream`](super::client_to_upstream).
#[derive(Debug)]
pub struct UpHalf {
    /// The upstream socket is between frames (the relay may write its own
    /// control frame; a data frame only when, besides, the client's
    /// scanner has no fragmented message open).
    pub at_boundary: Cell<bool>,
    /// Since when a write upstream has been waiting (the time of the client
    /// read it forwards); `None` between writes. A stream idle for the idle
    /// timeout with a write still waiting has a stalled upstream.
    pub write_since: Cell<Option<Instant>>,
    /// When the first client audio (binary payload bytes) went upstream:
    /// not a keepalive or another text message, nor the empty end of audio.
    pub first_audio_at: Cell<Option<Instant>>,
    /// Everything sent upstream on this connection after the config is in
    /// the replay copy ([`ClientSide::replay`](super::ClientSide::replay)): a failure can still move
    /// the stream to another account unseen.
    pub replayable: Cell<bool>,
    /// The client's end of audio (an empty message) has gone upstream:
    /// from then on the stream waits on upstream alone, so silence is
    /// upstream's failure, not an idle client.
    pub audio_ended: Cell<bool>,
    /// The write upstream under way began while a write to the client was
    /// waiting. If it stalls while that write still waits, upstream
    /// stopped reading because the client did (its results backed up).
    pub behind_client: Cell<bool>,
    /// The client's close frame has gone upstream: all the client still
    /// waits for is its results and the close's answer, so a write to it
    /// is bounded as one upstream is ([`idle_watch`](super::idle_watch)).
    pub client_closed: Cell<bool>,
}

/// The upstream→client half, written by the upstream→client pumps.
#[derive(Debug)]
pub struct DownHalf {
    /// The client socket is between frames (the relay may write its own
    /// control frame).
    pub at_boundary: Cell<bool>,
    /// A fragmented upstream message is open towards the client: the
    /// relay's own error frame may not go in, and no other connection's
    /// messages may follow (no resume).
    pub mid_message: Cell<bool>,
    /// The first upstream message still has to be looked at.
    pub inspect_first: Cell<bool>,
    /// The first upstream message carried this error code.
    pub first_error: Cell<Option<(u16, RateScope)>>,
    /// An error upstream sent that went on to the client (none that a
    /// failover or a resume hid): its account is marked for it.
    pub error_passed: Cell<Option<(u16, RateScope)>>,
    /// Upstream answered with a first message that is not an error: the
    /// stream is committed to this connection and the copy is let go.
    pub accepted: Cell<bool>,
    /// Some upstream connection of the stream accepted it (kept across
    /// failovers and resumes). A stream none accepted was billed nothing.
    pub ever_accepted: Cell<bool>,
    /// Whether time-to-first-result has been recorded.
    pub first_result_seen: Cell<bool>,
    /// Upstream's messages with the `<fin>` token (each answers a
    /// finalize) so far: a drain's finalize waits for one more than came
    /// before it (and than the client's own finalizes still pending).
    pub fins: Cell<u64>,
    /// The search for `<fin>` in an upstream text message whose pieces
    /// came in more than one read (the compressed-audio pump).
    pub fin_search: Cell<FinSearch>,
    /// That message so far, while it is within [`JOINED_TEXT_MAX`] bytes
    /// (boxed: a stream holds 16 bytes for it, and a copy only while such
    /// a message is arriving).
    pub joined: RefCell<Option<Box<Vec<u8>>>>,
    /// Upstream's last word on this connection (`finished`, or an error)
    /// has gone to the client: a close frame may follow. One before it is
    /// a session lost, as a dropped connection is.
    pub last_word_seen: Cell<bool>,
    /// Since when a write to the client has been under way: set around
    /// each write, so the other pump and the stream's watch see it only
    /// while it waits for room (the client is not reading). `None`
    /// between writes.
    pub write_since: Cell<Option<Instant>>,
    /// Bytes at the front of the upstream buffer, already scanned, held
    /// back from the client: a read ended inside a frame with them, and
    /// they may start a copy of the account key that the next read
    /// completes ([`Redactor::cut_tail`](crate::core::secret::Redactor::cut_tail)).
    /// A count, not a copy: the bytes stay where they were read.
    pub held: Cell<u16>,
}

// The most bytes held: a key's longest form (each byte of a key, visible
// ASCII, is at most two JSON-escaped) less one.
const _: () = assert!(2 * crate::core::config::MAX_KEY_BYTES <= u16::MAX as usize);

impl DownHalf {
    /// A write to the client is under way ([`DownHalf::write_since`]).
    pub fn writing(&self) -> bool {
        self.write_since.get().is_some()
    }

    /// Upstream answered this connection's first message with anything
    /// but an error: the stream is committed to it. True the first time
    /// on the connection: the account's success, to mark
    /// ([`AccountState::mark_ok`](crate::core::keyring::AccountState::mark_ok)).
    pub fn accept(&self) -> bool {
        self.ever_accepted.set(true);
        !self.accepted.replace(true)
    }

    /// A new upstream connection (after a failover or a resume): its first
    /// message is looked at again and it has accepted nothing yet.
    pub fn new_connection(&self) {
        self.mid_message.set(false);
        self.joined.take();
        self.inspect_first.set(true);
        self.first_error.set(None);
        self.accepted.set(false);
        self.last_word_seen.set(false);
        self.held.set(0);
    }
}

/// What a stream is counted and billed for: bytes each way, its audio
/// against the device's daily allowance, and upstream's own figures.
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes from the client forwarded upstream.
    bytes_up: Cell<u64>,
    /// Bytes from upstream forwarded to the client.
    bytes_down: Cell<u64>,
    /// Audio payload bytes forwarded (binary messages).
    audio_bytes: Cell<u64>,
    /// Audio bytes already counted against the device's daily allowance.
    audio_counted: Cell<u64>,
    /// Audio bytes per millisecond for the stream's raw format (0 when the
    /// format is compressed and only upstream can tell the duration).
    bytes_per_ms: Cell<f64>,
    /// The device's hold on its limits, once admitted.
    device: RefCell<Option<crate::core::devices::DevicePermit>>,
    /// Upstream's `total_audio_proc_ms` from its `finished` message.
    pub(super) upstream_audio_ms: Cell<Option<u64>>,
    /// A compressed stream's latest `total_audio_proc_ms` from any result.
    upstream_seen_ms: Cell<Option<u64>>,
    /// Of that figure, the milliseconds already counted against the
    /// device's daily allowance.
    upstream_counted_ms: Cell<u64>,
    /// The last `error_code` upstream sent.
    upstream_error: Cell<Option<u16>>,
    /// The audio milliseconds counted (a second at a time, with the
    /// device's daily allowance) on each UTC day, in the order counted:
    /// a stream that crosses midnight has two.
    days: RefCell<Vec<(u64, u64)>>,
    /// The parts of the stream earlier accounts carried, before a resume
    /// moved it to another account: each account's audio and bytes.
    parts: RefCell<Vec<Part>>,
    /// The audio milliseconds, bytes up and bytes down those parts hold.
    parted: Cell<(u64, u64, u64)>,
}

/// What one account's connections carried of a stream that a resume moved
/// to another account.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// The account.
    pub account: String,
    /// Audio milliseconds its connections processed (upstream's figure).
    pub audio_ms: u64,
    /// Bytes from the client forwarded to it.
    pub bytes_up: u64,
    /// Bytes from it forwarded to the client.
    pub bytes_down: u64,
}

impl Meter {
    /// The device's hold on its limits, once admitted.
    pub fn admit(&self, permit: crate::core::devices::DevicePermit) {
        *self.device.borrow_mut() = Some(permit);
    }

    /// The device's longest stream length (zero: no limit, or no device).
    pub fn max_stream_length(&self) -> Duration {
        self.device
            .borrow()
            .as_ref()
            .map_or(Duration::ZERO, |d| d.limits.max_stream_length)
    }

    /// The last `error_code` upstream sent (one passed on to the client).
    pub fn upstream_error(&self) -> Option<u16> {
        self.upstream_error.get()
    }

    /// The stream's raw audio format, in bytes per millisecond (0: compressed).
    pub fn set_audio_rate(&self, bytes_per_ms: f64) {
        self.bytes_per_ms.set(bytes_per_ms);
    }

    /// The format is compressed (or `auto`): only upstream tells its length.
    pub fn compressed(&self) -> bool {
        self.bytes_per_ms.get() <= 0.0
    }

    /// Adds `n` bytes forwarded upstream.
    #[inline]
    pub fn add_up(&self, n: u64) {
        self.bytes_up.set(self.bytes_up.get() + n);
    }

    /// Adds `n` bytes forwarded to the client.
    #[inline]
    pub fn add_down(&self, n: u64) {
        self.bytes_down.set(self.bytes_down.get() + n);
    }

    /// Counts forwarded audio against the device's daily allowance, one
    /// second of audio at a time (a shared counter, so not per frame):
    /// raw audio by its bytes, compressed audio by upstream's latest
    /// `total_audio_proc_ms` (only upstream can tell its length). Returns
    /// false once the allowance is used up.
    pub fn count_audio(&self, bytes: u64) -> bool {
        let total = self.audio_bytes.get() + bytes;
        self.audio_bytes.set(total);
        let per_ms = self.bytes_per_ms.get();
        let ms = if per_ms <= 0.0 {
            let counted = self.upstream_counted_ms.get();
            let seen = self.upstream_seen_ms.get().unwrap_or(0);
            if seen < counted + 1000 {
                return true;
            }
            self.upstream_counted_ms.set(seen);
            seen - counted
        } else {
            let pending = total - self.audio_counted.get();
            if (pending as f64) < per_ms * 1000.0 {
                return true;
            }
            self.audio_counted.set(total);
            (pending as f64 / per_ms) as u64
        };
        let now = std::time::SystemTime::now();
        self.count_on(crate::core::devices::utc_day(now), ms);
        let device = self.device.borrow();
        device.as_ref().is_none_or(|d| d.add_audio(ms, now))
    }

    /// Notes `ms` of audio counted on UTC day `day`.
    fn count_on(&self, day: u64, ms: u64) {
        let mut days = self.days.borrow_mut();
        match days.last_mut() {
            Some((d, n)) if *d == day => *n += ms,
            _ => days.push((day, ms)),
        }
    }

    /// The audio milliseconds counted on UTC days other than `day` (the
    /// day the stream ended), by day in the order counted: what a stream
    /// that crossed midnight relayed before it.
    pub fn audio_on_other_days(&self, day: u64) -> Vec<(u64, u64)> {
        self.days
            .borrow()
            .iter()
            .filter(|(d, n)| *d != day && *n > 0)
            .copied()
            .collect()
    }

    /// Closes `account`'s part of the stream when a resume moves it to
    /// another account. Upstream bills each connection to its account, so
    /// the ledger gives each account its part: the audio up to
    /// `processed_ms`, the largest `total_audio_proc_ms` its connections
    /// reported (on the stream's timeline), less the parts before; and
    /// the bytes forwarded so far, less the parts before. The audio the
    /// resume replays to the next account is its again (in its usage
    /// logs), and not in the ledger.
    pub fn close_part(&self, account: &str, processed_ms: u64) {
        let (ms, up, down) = self.parted.get();
        let now = (
            processed_ms.max(ms),
            self.bytes_up.get(),
            self.bytes_down.get(),
        );
        let part = Part {
            account: account.to_string(),
            audio_ms: now.0 - ms,
            bytes_up: now.1 - up,
            bytes_down: now.2 - down,
        };
        let mut parts = self.parts.borrow_mut();
        match parts.iter_mut().find(|p| p.account == account) {
            Some(p) => {
                p.audio_ms += part.audio_ms;
                p.bytes_up += part.bytes_up;
                p.bytes_down += part.bytes_down;
            }
            None => parts.push(part),
        }
        self.parted.set(now);
    }

    /// Takes the parts earlier accounts carried (see
    /// [`close_part`](Self::close_part)).
    pub fn take_parts(&self) -> Vec<Part> {
        std::mem::take(&mut self.parts.borrow_mut())
    }

    /// Audio milliseconds by the relay's own meter.
    pub fn audio_ms(&self) -> u64 {
        let per_ms = self.bytes_per_ms.get();
        if per_ms > 0.0 {
            (self.audio_bytes.get() as f64 / per_ms) as u64
        } else {
            0
        }
    }

    /// Ends the metering: settles the device's daily audio with what was
    /// not counted yet (the last partial second of raw audio, or for
    /// compressed formats upstream's whole figure) and returns the stream's
    /// usage record with the meter's figures; whose stream it was (account,
    /// device, reference id) is the caller's to fill in. A stream upstream
    /// refused (`billed` false) is recorded with no audio.
    pub fn settle(&self, now: std::time::SystemTime, billed: bool) -> UsageRecord {
        // Upstream refused the stream: none of its audio was transcribed
        // or billed, nor counts for the device.
        let (relay_ms, upstream_ms) = if billed {
            // `finished`'s figure, else (compressed formats) the last one seen.
            let upstream_ms = self.upstream_audio_ms.get().or(self.upstream_seen_ms.get());
            (self.audio_ms(), upstream_ms)
        } else {
            (0, None)
        };
        if let Some(device) = self.device.borrow().as_ref().filter(|_| billed) {
            let per_ms = self.bytes_per_ms.get();
            let counted_ms = if per_ms > 0.0 {
                (self.audio_counted.get() as f64 / per_ms) as u64
            } else {
                self.upstream_counted_ms.get()
            };
            let total = if relay_ms > 0 {
                relay_ms
            } else {
                upstream_ms.unwrap_or(0)
            };
            device.add_audio(total.saturating_sub(counted_ms), now);
        }
        UsageRecord {
            day: crate::core::devices::utc_day(now),
            account: String::new(),
            device: String::new(),
            reference_id: String::new(),
            audio_ms_relay: relay_ms,
            audio_ms_upstream: upstream_ms,
            bytes_up: self.bytes_up.get(),
            bytes_down: self.bytes_down.get(),
            error: self.upstream_error.get(),
            part: false,
        }
    }
}
