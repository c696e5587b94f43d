//! Mid-stream resume for raw-audio streams: the rolling copy of the audio
//! after the last final token, and the upstream→client pump that rewrites a
//! resumed connection's results onto the stream's own timeline.
//!
//! The copy is the raw (unmasked) audio, captured by the client→upstream
//! pump as it re-masks each frame
//! ([`clio_frame::scanner::FrameScanner::scan_capture`]). Each
//! result's `final_audio_proc_ms` trims it. When the upstream connection
//! fails (a drop, a protocol error, or a 500/503 error message), the
//! session opens a new one, sends the config and the copy, and this pump
//! shifts the new connection's `start_ms`/`end_ms` and
//! `final_audio_proc_ms`/`total_audio_proc_ms` by the resume point, so the
//! client sees one stream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::copy_budget::CopyBudget;
use super::state::{final_audio_proc_ms_of, total_audio_proc_ms_of};
use super::{End, Link, StreamCx};
use crate::core::keyring::RateScope;
use crate::core::metrics::Hist;
use clio_frame::frame::{build_fragment, build_frame, parse_header, FrameError, Opcode, Sender};
use clio_frame::mask::MaskKeys;
use clio_frame::scanner::{close_body_ok, Capture, CutFrame};
use clio_frame::utf8::Utf8Check;

/// The fewest bytes a replayed frame carries when the client's own frames
/// were smaller: smaller frames are merged in the copy's bookkeeping, so
/// that a client sending its audio a few bytes a frame cannot make the copy
/// keep a frame length (8 bytes) for every few bytes of audio.
const MIN_REPLAY_FRAME: usize = 256;

/// The most `finalize` messages a copy keeps unanswered: upstream answers
/// each at once, so more waiting means a client sending them in a loop,
/// and the copy (each up to [`clio_frame::scanner::MAX_CONTROL_TEXT`]
/// bytes) is let go instead of growing.
const MAX_PENDING_FINALIZES: usize = 8;

/// A raw-audio stream's resume state: the copy and the timeline.
#[derive(Debug)]
pub struct Resume {
    /// Audio bytes per second, and bytes per sample frame (all channels).
    bytes_per_sec: u64,
    align: u64,
    /// The client's frame lengths in the copy (the first may be cut short
    /// by a trim; frames under [`MIN_REPLAY_FRAME`] merged with the next),
    /// then `open` bytes of a frame still arriving: a resume replays the
    /// audio in the client's own frames.
    lens: VecDeque<usize>,
    open: usize,
    base: u64,
    /// Bound of the copy (`failover.resume_audio`).
    cap: usize,
    /// What the scanner captures: its `audio` is the copy itself, the raw
    /// audio from absolute byte `base` on (the scanner appends, this trims).
    pub capture: Capture,
    /// Length of the copy when the scanner's last captures were taken in.
    absorbed: usize,
    /// `final_audio_proc_ms` the client has seen, on its timeline.
    final_ms: u64,
    /// The largest `total_audio_proc_ms` the client has seen: a resumed
    /// connection processes the replayed audio again, and its totals,
    /// shifted, would step back below it.
    total_ms: u64,
    /// Added to the current connection's times: where its time 0 (the
    /// copy's first byte when it began) is on the stream's timeline.
    shift_ms: u64,
    /// Resumes so far, and the bound.
    pub resumes: u32,
    max_resumes: u32,
    /// The client's `finalize`s no `<fin>` answered yet, oldest first:
    /// the absolute audio byte each came after, and its text.
    finalizes: VecDeque<(u64, Vec<u8>)>,
    /// The client sent its end of audio.
    end_of_audio: bool,
    /// The largest the copy's storage grew to, bytes (for the stream-end log).
    pub peak_capacity: usize,
    /// The process's budget for copies, and what this copy holds of it.
    budget: Arc<CopyBudget>,
    charged: usize,
    /// The copy was let go at the budget's limit: no more resumes.
    let_go: bool,
}

impl Resume {
    /// For a raw format of `bytes_per_sec` with `frame_bytes` per sample
    /// frame, keeping up to `cap` bytes of audio within `budget`, resuming
    /// at most `max` times.
    pub fn new(
        bytes_per_sec: u64,
        frame_bytes: u64,
        cap: usize,
        max: u32,
        budget: Arc<CopyBudget>,
    ) -> Self {
        Resume {
            bytes_per_sec: bytes_per_sec.max(1),
            align: frame_bytes.max(1),
            lens: VecDeque::new(),
            open: 0,
            base: 0,
            cap,
            capture: Capture::default(),
            absorbed: 0,
            final_ms: 0,
            total_ms: 0,
            shift_ms: 0,
            resumes: 0,
            max_resumes: max,
            finalizes: VecDeque::new(),
            end_of_audio: false,
            peak_capacity: 0,
            budget,
            charged: 0,
            let_go: false,
        }
    }

    /// Whether the stream still keeps a copy (it was not let go at the
    /// budget's limit): the client→upstream pump captures audio only then.
    pub fn keeps_copy(&self) -> bool {
        !self.let_go
    }

    /// Brings the budget in line with the copy's storage now.
    fn settle(&mut self) {
        let cap = self.capture.audio.capacity();
        if cap > self.charged {
            self.budget.take(cap - self.charged);
        } else {
            self.budget.give_back(self.charged - cap);
        }
        self.charged = cap;
    }

    /// Lets go of the copy for good: its storage goes back to the budget
    /// and the stream cannot resume.
    fn let_go(&mut self) {
        self.let_go = true;
        self.capture = Capture::default();
        self.lens = VecDeque::new();
        self.finalizes = VecDeque::new();
        self.open = 0;
        self.absorbed = 0;
        self.settle();
        self.budget.count_dropped();
    }

    /// The byte where `ms` of audio starts, aligned down to a sample frame.
    fn byte_at(&self, ms: u64) -> u64 {
        let b = (u128::from(ms) * u128::from(self.bytes_per_sec)).div_ceil(1000) as u64;
        b - b % self.align
    }

    /// Makes room in the copy for the audio of a window of `window` bytes
    /// before the scanner appends it, growing by doubling but never past
    /// the bound and one window (a deque left to grow by itself doubles
    /// past the bound). A copy with no storage yet gets it from the
    /// scanner's first audio: a stream that sends none (keepalives only)
    /// holds none.
    ///
    /// Growth past the budget lets the copy go instead.
    pub fn reserve_for(&mut self, window: usize) {
        let audio = &mut self.capture.audio;
        let need = audio.len() + window;
        if self.let_go || audio.capacity() == 0 || need <= audio.capacity() {
            return;
        }
        // Saturating: `cap` comes from the client's sample rate, and one
        // no microphone has makes it `usize::MAX` (the budget bounds it).
        let want = need
            .max(audio.capacity() * 2)
            .min(self.cap.saturating_add(window));
        if !self.budget.try_take(want - audio.capacity()) {
            self.let_go();
            return;
        }
        self.charged += want - audio.capacity();
        audio.reserve_exact(want - audio.len());
        self.settle();
    }

    /// Takes in what the scanner appended to the copy: the client's frame
    /// lengths, a `finalize` or the end of audio, and drops the oldest
    /// audio past the bound.
    pub fn absorb_capture(&mut self) {
        if self.let_go {
            // Let go while the scanner had this window to capture.
            self.capture = Capture::default();
            self.settle();
            return;
        }
        if self.capture.long_finalize {
            // A finalize too long to keep may have gone up: a replay could
            // not send it again, and its `<fin>` would answer another.
            self.let_go();
            return;
        }
        if !self.capture.finalizes.is_empty() {
            for (at, text) in std::mem::take(&mut self.capture.finalizes) {
                if !is_finalize(&text) {
                    continue;
                }
                if self.finalizes.len() == MAX_PENDING_FINALIZES {
                    self.let_go();
                    return;
                }
                self.finalizes.push_back((self.base + at as u64, text));
            }
        }
        if self.capture.end_of_audio {
            self.end_of_audio = true;
            self.capture.end_of_audio = false;
        }
        let len = self.capture.audio.len();
        let mut from = self.absorbed;
        for &end in &self.capture.frame_ends {
            let len = self.open + end - from;
            match self.lens.back_mut() {
                // Replayed as part of the frame before, while that one is
                // small: bytes a frame would otherwise cost 8 here.
                Some(last) if *last < MIN_REPLAY_FRAME => *last += len,
                _ => self.lens.push_back(len),
            }
            self.open = 0;
            from = end;
        }
        self.capture.frame_ends.clear();
        self.open += len - from;
        self.trim_front(len.saturating_sub(self.cap));
        self.absorbed = self.capture.audio.len();
        self.peak_capacity = self.peak_capacity.max(self.capture.audio.capacity());
        // The first storage comes from the scanner's first audio.
        if self.charged == 0 && self.capture.audio.capacity() > 0 {
            self.settle();
            if self.budget.over() {
                self.let_go();
            }
        }
    }

    /// Drops the first `n` bytes of the copy, and of its frame lengths.
    fn trim_front(&mut self, n: usize) {
        let n = n.min(self.capture.audio.len());
        if n == 0 {
            return;
        }
        self.capture.audio.drain(..n);
        self.absorbed = self.absorbed.saturating_sub(n);
        self.base += n as u64;
        let mut left = n;
        while left > 0 {
            match self.lens.front_mut() {
                Some(len) if *len <= left => {
                    left -= *len;
                    self.lens.pop_front();
                }
                Some(len) => {
                    *len -= left;
                    left = 0;
                }
                None => {
                    self.open -= left;
                    left = 0;
                }
            }
        }
    }

    /// A result said `final_ms` (on the current connection's timeline):
    /// the copy lets go of the audio before it.
    fn note_final(&mut self, final_ms: u64) {
        let ms = final_ms + self.shift_ms;
        if ms <= self.final_ms {
            return;
        }
        self.final_ms = ms;
        let to = self.byte_at(ms);
        if to > self.base {
            self.trim_front((to - self.base) as usize);
        }
        if self.capture.audio.is_empty() && self.capture.audio.capacity() > 64 << 10 {
            self.capture.audio.shrink_to(0);
            self.settle();
        }
    }

    /// The client's finalizes no `<fin>` answered yet.
    pub fn pending_finalizes(&self) -> usize {
        self.finalizes.len()
    }

    /// Whether another resume is possible: resumes left, and the copy still
    /// holds everything after the last final token.
    pub fn can_resume(&self) -> bool {
        !self.let_go && self.resumes < self.max_resumes && self.base <= self.byte_at(self.final_ms)
    }

    /// The largest `total_audio_proc_ms` the client has seen, on the
    /// stream's timeline: how far upstream's connections so far processed.
    pub fn total_ms(&self) -> u64 {
        self.total_ms
    }

    /// Seconds of audio a resume replays now.
    pub fn replay_seconds(&self) -> f64 {
        self.capture.audio.len() as f64 / self.bytes_per_sec as f64
    }

    /// Starts a resume: counts it, moves the timeline to the resume point,
    /// and returns what the new connection gets after its config: the
    /// copy as binary frames, the client's frame lengths kept, then a
    /// pending `finalize`, then the end of audio if the client sent it
    /// (masked with keys from `masks`). When the failure `cut` a client
    /// frame, last comes that frame's start from the copy, with a header
    /// for the whole frame and a key under which the rest, re-masked as
    /// for the old connection, continues it: upstream gets the client's
    /// frames as the client sent them. When it came between frames of a
    /// fragmented binary message (`open_message`), last comes an empty
    /// frame without FIN that opens a message for the client's next
    /// continuation.
    pub fn begin(
        &mut self,
        masks: &mut MaskKeys,
        cut: Option<CutFrame>,
        open_message: bool,
    ) -> Vec<u8> {
        self.resumes += 1;
        // The copy starts at (or, aligned down, just before) the last
        // final token's end: the new connection's time 0 is that end. Not
        // the copy's start in ms, rounded down: at a rate of a fraction of
        // a byte a ms (44.1 kHz), aligned down to a sample, that came out
        // a ms before the end, and a word the new connection starts at
        // its time 0 was dropped as one the client already has. (When
        // upstream finalized audio not in the copy yet, the copy starts
        // before the end, and its start is the time 0.)
        self.shift_ms = if self.base == self.byte_at(self.final_ms) {
            self.final_ms
        } else {
            self.base * 1000 / self.bytes_per_sec
        };
        self.final_ms = self.final_ms.max(self.shift_ms);
        // Every frame's header (14 bytes at most, masked), a frame split
        // at each finalize, the finalizes, and the end-of-audio and cut
        // frames'.
        let finalize_bytes: usize = self.finalizes.iter().map(|(_, t)| t.len()).sum();
        let mut out = Vec::with_capacity(
            self.capture.audio.len()
                + finalize_bytes
                + (self.lens.len() + 2 * self.finalizes.len() + 2)
                    * clio_frame::frame::MAX_HEADER_LEN,
        );
        // Each pending finalize goes where it was in the audio (one the
        // trims passed, first), as the client sent it.
        let mut finalizes = self.finalizes.iter().peekable();
        let base = self.base;
        let mut finalizes_to = |out: &mut Vec<u8>, masks: &mut MaskKeys, upto: u64| {
            while let Some((_, text)) = finalizes.next_if(|(f, _)| *f <= upto) {
                out.extend(build_frame(Opcode::Text, text, Some(masks.next_key())));
            }
        };
        let mut chunk = Vec::new();
        let mut at = 0;
        for &len in &self.lens {
            let end = at + len;
            while at < end {
                finalizes_to(&mut out, masks, base + at as u64);
                // Up to the next finalize inside the frame, if one is
                // (frames merged in the copy's bookkeeping had one between).
                let next = self
                    .finalizes
                    .iter()
                    .map(|(f, _)| f.saturating_sub(base) as usize)
                    .find(|&f| f > at && f < end);
                let to = next.unwrap_or(end);
                chunk.clear();
                chunk.extend(self.capture.audio.range(at..to));
                out.extend(build_frame(Opcode::Binary, &chunk, Some(masks.next_key())));
                at = to;
            }
        }
        finalizes_to(&mut out, masks, u64::MAX);
        if self.end_of_audio {
            out.extend(build_frame(Opcode::Binary, b"", Some(masks.next_key())));
        }
        // The frame the failure cut comes last: the rest of it follows
        // from the client.
        match cut {
            Some(cut) => {
                // Payload byte `open + i` of the new frame is byte `phase +
                // i` of the old one's key: rotate the key by the difference.
                let open = self.open;
                let turn = (cut.phase + 4 - open % 4) & 3;
                let key = std::array::from_fn(|j| cut.key[(j + turn) & 3]);
                let mut h = [0u8; clio_frame::frame::MAX_HEADER_LEN];
                let n = clio_frame::frame::write_header(
                    &mut h,
                    cut.fin,
                    Opcode::Binary,
                    Some(key),
                    open as u64 + cut.remaining,
                );
                out.extend_from_slice(&h[..n]);
                let from = out.len();
                out.extend(self.capture.audio.range(at..at + open));
                clio_frame::mask::apply_mask(&mut out[from..], key, 0);
            }
            None if self.open > 0 => {
                // Not expected (an open frame is a cut one); sent whole.
                chunk.clear();
                chunk.extend(self.capture.audio.range(at..at + self.open));
                out.extend(build_frame(Opcode::Binary, &chunk, Some(masks.next_key())));
                self.lens.push_back(self.open);
                self.open = 0;
            }
            None => {}
        }
        if open_message && cut.is_none() {
            out.extend(build_fragment(
                Opcode::Binary,
                false,
                b"",
                Some(masks.next_key()),
            ));
        }
        out
    }

    /// Puts a resumed connection's result on the stream's timeline: times
    /// shifted, final tokens the client already has dropped. `None` when
    /// the message is not JSON (it then goes through as it is).
    fn rewrite(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(payload).ok()?;
        let shift = self.shift_ms;
        let delivered = self.final_ms;
        let obj = v.as_object_mut()?;
        if let Some(Value::Array(tokens)) = obj.get_mut("tokens") {
            tokens.retain_mut(|t| {
                let is_final = t.get("is_final").and_then(Value::as_bool) == Some(true);
                for k in ["start_ms", "end_ms"] {
                    if let Some(ms) = t.get(k).and_then(Value::as_u64) {
                        t[k] = Value::from(ms + shift);
                    }
                }
                let start = t
                    .get("start_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                let special = t
                    .get("text")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.starts_with('<'));
                !(is_final && !special && start < delivered)
            });
        }
        // One stream's figures never go back: the replayed audio was
        // processed before, on the connection that failed.
        for (k, seen) in [
            ("final_audio_proc_ms", delivered),
            ("total_audio_proc_ms", self.total_ms),
        ] {
            if let Some(ms) = obj.get(k).and_then(Value::as_u64) {
                obj.insert(k.into(), Value::from((ms + shift).max(seen)));
            }
        }
        serde_json::to_vec(&v).ok()
    }
}

/// Whether a client's text message is a `finalize`, as upstream reads it:
/// a JSON object whose `type` is `"finalize"` (escapes read), not any
/// message that names one (a keepalive with a note): upstream answers only
/// a finalize with `<fin>`, and each `<fin>` answers the oldest pending.
fn is_finalize(text: &[u8]) -> bool {
    serde_json::from_slice::<Value>(text)
        .is_ok_and(|v| v.get("type").and_then(Value::as_str) == Some("finalize"))
}

impl Drop for Resume {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

/// The `error_code` of an error message, by a byte search first.
fn error_code_of(payload: &[u8]) -> Option<(u16, RateScope)> {
    // A byte search first: the JSON is parsed only for an error.
    super::state::ERROR_CODE.find(payload)?;
    super::state::upstream_said(payload)?.error
}

/// The upstream→client pump of a resumable stream: frame by frame (whole
/// frames only), each result's final point noted, a resumed connection's
/// results rewritten, and an upstream error it can recover from returned
/// as [`End::Retry`] (before upstream accepted the stream, when
/// [`StreamState::retry_allowed`](super::StreamState::retry_allowed)) or
/// [`End::Resume`] instead of reaching the client.
///
/// A text message upstream sends in fragments is joined, up to
/// `max_payload` bytes in all, and goes to the client as one frame (RFC
/// 6455 §5.4 lets an intermediary change a message's fragmentation): it is
/// read as a whole one is (its `finished`, error, final point, `<fin>`),
/// and a connection lost before its last fragment leaves none of it with
/// the client. A ping or pong between its fragments goes on before it.
pub async fn upstream_to_client(link: Link<'_>, max_payload: u64, cx: StreamCx<'_>) -> End {
    let Link {
        from: upstream,
        to: client,
        buf,
    } = link;
    let StreamCx {
        state, redactor, ..
    } = cx;
    let down = &state.down;
    let resume = &state.resume;
    let can_resume = || resume.borrow().as_ref().is_some_and(|r| r.can_resume());
    // Frames passed on as they came wait at the front of `buf` and leave in
    // one write: before the next read, before a rewritten frame, and at
    // the end (upstream's last result and its close frame, read together,
    // reach the client in one send).
    let mut held = Held::default();
    // Upstream's text message so far is UTF-8 (a message may come in
    // fragments), as the scanner checks it on the other pumps.
    let mut utf8 = Utf8Check::default();
    let mut in_text = false;
    // Upstream has a fragmented message open (the client may not: a text
    // one is joined here), and the text message's fragments so far.
    let mut upstream_open = false;
    let mut joined: Option<Vec<u8>> = None;
    let end = loop {
        let mut need_more = true;
        if buf.len() > held.bytes {
            match parse_header(&buf.filled()[held.bytes..], Sender::Server, u64::MAX >> 1) {
                Err(e) => break End::UpstreamProtocol(e),
                Ok(None) => {}
                Ok(Some(h)) => {
                    if h.payload_len > max_payload {
                        break End::UpstreamProtocol(FrameError::TooBig);
                    }
                    let total = h.header_len + h.payload_len as usize;
                    // A result larger than a read buffer (many non-final
                    // tokens, a translation) is held whole, in a buffer of
                    // its own while it is there. Only once the frames
                    // before it are out: one that merely does not fit
                    // behind them is read after a compaction, as before.
                    if held.bytes == 0 {
                        buf.hold(total);
                    }
                    let data = !h.opcode.is_control();
                    if data && (h.opcode == Opcode::Continuation) != upstream_open {
                        break End::UpstreamProtocol(FrameError::Fragmentation);
                    }
                    if buf.len() - held.bytes >= total {
                        need_more = false;
                        // Never the account key to the client, should
                        // upstream echo it (a message in fragments is
                        // looked at again once joined).
                        redactor.redact(
                            &mut buf.filled()[held.bytes + h.header_len..held.bytes + total],
                        );
                        if h.opcode == Opcode::Close {
                            let at = held.bytes + h.header_len;
                            if !close_body_ok(&buf.filled()[at..held.bytes + total]) {
                                break End::UpstreamProtocol(FrameError::BadClose);
                            }
                            if !down.last_word_seen.get() {
                                // Closed with neither `finished` nor an
                                // error (a server going away): the session
                                // is lost, and resumed as a dropped one is.
                                break End::UpstreamGone;
                            }
                        }
                        if data {
                            if h.opcode != Opcode::Continuation {
                                in_text = h.opcode == Opcode::Text;
                            }
                            let at = held.bytes + h.header_len;
                            let payload = &buf.filled()[at..held.bytes + total];
                            if in_text && (!utf8.feed(payload) || (h.fin && !utf8.finish())) {
                                break End::UpstreamProtocol(FrameError::InvalidUtf8);
                            }
                            upstream_open = !h.fin;
                            if in_text && (joined.is_some() || !h.fin) {
                                let text = joined.get_or_insert_with(Vec::new);
                                if (text.len() + payload.len()) as u64 > max_payload {
                                    break End::UpstreamProtocol(FrameError::TooBig);
                                }
                                text.extend_from_slice(payload);
                                if !h.fin {
                                    // Kept, not passed on: what waits
                                    // before it goes first.
                                    if held.flush(client, buf, cx).await.is_err() {
                                        return End::ClientGone;
                                    }
                                    buf.consume(total);
                                    continue;
                                }
                            } else {
                                down.mid_message.set(!h.fin);
                            }
                        }
                        // A ping or pong is no message: the first
                        // message is still to come.
                        let ping_or_pong = matches!(h.opcode, Opcode::Ping | Opcode::Pong);
                        let first = !ping_or_pong && down.inspect_first.replace(false);
                        let mut out = None;
                        let at = held.bytes;
                        // A whole text message: one frame, or the last of
                        // its fragments (then `joined` holds them all).
                        let mut whole = if data && h.fin { joined.take() } else { None };
                        if let Some(text) = whole.as_mut() {
                            redactor.redact(text);
                        }
                        // An error is no result: not the stream's first.
                        let mut error = false;
                        if h.opcode == Opcode::Text && h.fin || whole.is_some() {
                            let payload = match &whole {
                                Some(text) => text.as_slice(),
                                None => &buf.filled()[at + h.header_len..at + total],
                            };
                            if let Some((code, scope)) = error_code_of(payload) {
                                error = true;
                                if first {
                                    down.first_error.set(Some((code, scope)));
                                }
                                let recoverable = matches!(code, 401 | 402 | 429 | 500 | 503);
                                if recoverable && first && state.retry_allowed() {
                                    break End::Retry(code, scope);
                                }
                                if recoverable && can_resume() {
                                    break End::Resume(code, scope);
                                }
                            } else if down.accept() {
                                cx.account.mark_ok();
                            }
                            let mut r = resume.borrow_mut();
                            let Some(r) = r.as_mut() else {
                                break End::UpstreamGone;
                            };
                            if r.resumes > 0 {
                                out = r.rewrite(payload);
                            }
                            let text = out.as_deref().unwrap_or(payload);
                            if let Some(ms) = final_audio_proc_ms_of(text) {
                                // Rewritten: already on the client's timeline.
                                let shift = if out.is_some() { r.shift_ms } else { 0 };
                                r.note_final(ms.saturating_sub(shift));
                            }
                            if let Some(ms) = total_audio_proc_ms_of(text) {
                                r.total_ms = r.total_ms.max(ms);
                            }
                            if state.note_upstream_text(text) {
                                // `<fin>`: the oldest pending finalize is answered.
                                r.finalizes.pop_front();
                            }
                            // Joined, it goes on as one frame: rewritten,
                            // or as it came.
                            if out.is_none() {
                                out = whole;
                            }
                        } else if data {
                            if down.accept() {
                                cx.account.mark_ok();
                            }
                        } else if !ping_or_pong {
                            // A close commits nothing to bill (a close
                            // after an error is the stream's end).
                            down.accepted.set(true);
                        }
                        let close = h.opcode == Opcode::Close;
                        match out {
                            Some(text) => {
                                // Its own bytes: what waits goes first.
                                if held.flush(client, buf, cx).await.is_err() {
                                    return End::ClientGone;
                                }
                                let frame = build_frame(Opcode::Text, &text, None);
                                // Cut short (the stream ended meanwhile),
                                // the client socket is left inside it.
                                down.at_boundary.set(false);
                                down.write_since.set(Some(Instant::now()));
                                if client
                                    .write_all_noting(&frame, &down.write_since)
                                    .await
                                    .is_err()
                                {
                                    return End::ClientGone;
                                }
                                down.write_since.set(None);
                                down.at_boundary.set(true);
                                buf.consume(total);
                                // What the client got: the frame written
                                // (rewritten or joined), not upstream's.
                                Held::delivered(1, frame.len(), !error, held.read_at, cx);
                            }
                            None => held.add(total, !h.opcode.is_control() && !error),
                        }
                        if close {
                            break End::UpstreamClosed;
                        }
                    }
                }
            }
        }
        if need_more {
            if held.flush(client, buf, cx).await.is_err() {
                return End::ClientGone;
            }
            match super::read_more(buf, upstream, state).await {
                Some(at) => held.read_at = at,
                None => return End::UpstreamGone,
            }
        }
    };
    // Whatever ends the pump, the frames before it reach the client first.
    if held.flush(client, buf, cx).await.is_err() {
        return End::ClientGone;
    }
    end
}

/// Upstream frames the pump passed on unchanged but has not written yet:
/// the first `bytes` of its buffer.
#[derive(Debug)]
struct Held {
    bytes: usize,
    frames: u64,
    /// A data frame that is no error is among them (the stream's first
    /// result, if not seen).
    data: bool,
    /// When their bytes were read.
    read_at: Instant,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            bytes: 0,
            frames: 0,
            data: false,
            read_at: Instant::now(),
        }
    }
}

impl Held {
    fn add(&mut self, bytes: usize, data: bool) {
        self.bytes += bytes;
        self.frames += 1;
        self.data |= data;
    }

    /// Writes the held frames to the client in one write and counts them.
    async fn flush(
        &mut self,
        client: &crate::dataplane::io::Duplex,
        buf: &mut crate::dataplane::buf::Buf,
        cx: StreamCx<'_>,
    ) -> std::io::Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        // Whole frames: between frames once written, inside one while the
        // write waits (a stream ended then must not write a frame of its
        // own there, nor a resumed connection's results).
        let down = &cx.state.down;
        down.at_boundary.set(false);
        down.write_since.set(Some(Instant::now()));
        client
            .write_all_noting(&buf.filled()[..self.bytes], &down.write_since)
            .await?;
        down.write_since.set(None);
        down.at_boundary.set(true);
        buf.consume(self.bytes);
        Held::delivered(self.frames, self.bytes, self.data, self.read_at, cx);
        // Emptied; `read_at` stays the time of the read they came from.
        self.bytes = 0;
        self.frames = 0;
        self.data = false;
        Ok(())
    }

    /// Counts `frames` frames of `bytes` that reached the client, read at
    /// `read_at`.
    fn delivered(frames: u64, bytes: usize, data: bool, read_at: Instant, cx: StreamCx<'_>) {
        let StreamCx {
            state,
            metrics,
            account,
            ..
        } = cx;
        let took = read_at.elapsed().as_nanos() as u64;
        for _ in 0..frames {
            metrics.record(Hist::FrameUpstreamToClient, took);
        }
        metrics.frames_upstream_to_client(frames, bytes as u64);
        state.meter.add_down(bytes as u64);
        let down = &state.down;
        if data && !down.first_result_seen.get() {
            if let Some(t0) = state.up.first_audio_at.get() {
                down.first_result_seen.set(true);
                metrics.first_result(account.metrics_index, t0.elapsed().as_micros() as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_follows_the_final_point_and_its_bound() {
        // 32 bytes a ms, 2-byte samples, 1,000 bytes at most.
        let mut r = Resume::new(32_000, 2, 1000, 2, Arc::new(CopyBudget::new(1 << 20)));
        r.reserve_for(640);
        r.capture.audio.extend((0..640u32).map(|i| i as u8));
        r.absorb_capture();
        r.note_final(10); // 320 bytes are final
        assert_eq!((r.base, r.capture.audio.len()), (320, 320));
        assert!(r.can_resume());
        r.reserve_for(900);
        r.capture.audio.extend(std::iter::repeat_n(7u8, 900));
        r.absorb_capture();
        assert_eq!(r.capture.audio.len(), 1000, "bounded");
        assert!(!r.can_resume(), "audio after the final point was lost");
        r.note_final(40); // 1,280 bytes
        assert!(r.can_resume());
        let mut masks = MaskKeys::default();
        r.capture.end_of_audio = true;
        r.absorb_capture();
        let replay = r.begin(&mut masks, None, false);
        assert_eq!(r.shift_ms, 40);
        assert!(!replay.is_empty());
        // A result of the new connection at its 0..480 ms is 40..520 ms.
        let out = r
            .rewrite(br#"{"tokens":[{"text":"a ","start_ms":0,"end_ms":480,"is_final":true}],"final_audio_proc_ms":480,"total_audio_proc_ms":500}"#)
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["tokens"][0]["start_ms"], 40);
        assert_eq!(v["tokens"][0]["end_ms"], 520);
        assert_eq!(v["final_audio_proc_ms"], 520);
        assert_eq!(v["total_audio_proc_ms"], 540);
        assert_eq!(
            final_audio_proc_ms_of(br#"{"final_audio_proc_ms": 123,"x":1}"#),
            Some(123)
        );
        assert_eq!(final_audio_proc_ms_of(br#"{"tokens":[]}"#), None);
        assert_eq!(
            total_audio_proc_ms_of(br#"{"total_audio_proc_ms" : 7}"#),
            Some(7)
        );
        assert_eq!(
            total_audio_proc_ms_of(br#"{"total_audio_proc_ms":99999999999999999999}"#),
            None
        );
    }

    /// `n` bytes of audio through `r` as the client→upstream pump takes
    /// them in (the scanner's own part: appending to the copy).
    fn capture(r: &mut Resume, n: usize) {
        r.reserve_for(n);
        if r.keeps_copy() {
            r.capture.audio.extend(std::iter::repeat_n(1u8, n));
        }
        r.absorb_capture();
    }

    #[test]
    fn copies_share_one_budget_and_the_one_past_it_lets_go() {
        let budget = Arc::new(CopyBudget::new(40_000));
        let new = || Resume::new(32_000, 2, 1 << 20, 3, budget.clone());
        let (mut a, mut b) = (new(), new());
        for _ in 0..5 {
            capture(&mut a, 3200);
        }
        assert!(a.keeps_copy() && a.can_resume());
        let held_a = budget.used();
        assert!(held_a >= 16_000, "a's storage is counted: {held_a}");
        capture(&mut b, 3200);
        assert!(b.keeps_copy());
        while b.keeps_copy() {
            capture(&mut b, 3200);
        }
        assert!(!b.can_resume(), "a copy let go cannot resume");
        assert_eq!(b.capture.audio.capacity(), 0, "its storage went back");
        assert_eq!(budget.used(), held_a, "only a's copy is held");
        assert_eq!(budget.dropped(), 1);
        // b goes on without a copy; a is untouched and still resumes.
        capture(&mut b, 3200);
        assert_eq!(budget.used(), held_a);
        assert!(a.can_resume());
        a.note_final(1000);
        assert!(budget.used() <= held_a);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0, "every byte counted is given back");
    }

    /// A client sending its audio one byte a frame: the copy's frame
    /// bookkeeping stays a small part of the audio it describes (it was 8
    /// bytes a byte), and a resume still replays every byte in order.
    #[test]
    fn tiny_frames_are_kept_as_few_replay_frames() {
        let budget = Arc::new(CopyBudget::new(1 << 30));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget);
        let mut sent = Vec::new();
        for w in 0..100u32 {
            // A read of 4,800 one-byte frames (7 bytes each on the wire).
            r.reserve_for(4800);
            for i in 0..4800u32 {
                let b = (w * 4800 + i) as u8 ^ (w as u8);
                r.capture.audio.push_back(b);
                sent.push(b);
                r.capture.frame_ends.push(r.capture.audio.len());
            }
            r.absorb_capture();
        }
        assert_eq!(r.capture.audio.len(), 480_000);
        assert!(
            r.lens.len() <= 480_000 / MIN_REPLAY_FRAME + 1,
            "{} frame lengths kept",
            r.lens.len()
        );
        // The replay: every byte, in order, in frames of at least
        // MIN_REPLAY_FRAME bytes (the last one aside).
        let frames = replayed(&r.begin(&mut MaskKeys::default(), None, false));
        let last = frames.len() - 1;
        let mut got = Vec::new();
        for (i, (_, p)) in frames.into_iter().enumerate() {
            assert!(
                p.len() >= MIN_REPLAY_FRAME || i == last,
                "a {}-byte frame",
                p.len()
            );
            got.extend(p);
        }
        assert!(got == sent, "the replay is the audio");
    }

    /// The replay's frames, unmasked: (opcode, payload).
    fn replayed(replay: &[u8]) -> Vec<(Opcode, Vec<u8>)> {
        let (mut at, mut out) = (0, Vec::new());
        while at < replay.len() {
            let h = parse_header(&replay[at..], Sender::Client, u64::MAX)
                .unwrap()
                .unwrap();
            let n = h.payload_len as usize;
            let mut p = replay[at + h.header_len..at + h.header_len + n].to_vec();
            clio_frame::mask::apply_mask(&mut p, h.mask.unwrap(), 0);
            out.push((h.opcode, p));
            at += h.header_len + n;
        }
        out
    }

    /// Pending finalizes are replayed where each came in the audio, as the
    /// client sent them, also between tiny frames the copy merged; a
    /// `<fin>` answers the oldest; one the trims passed goes first.
    #[test]
    fn pending_finalizes_are_replayed_in_place() {
        const A: &[u8] = br#"{"type":"finalize","n":"A"}"#;
        const B: &[u8] = br#"{"type":"finalize","n":"B"}"#;
        let budget = Arc::new(CopyBudget::new(1 << 30));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget);
        let frame = |r: &mut Resume, n: usize, b: u8| {
            r.reserve_for(n);
            r.capture.audio.extend(std::iter::repeat_n(b, n));
            r.capture.frame_ends.push(r.capture.audio.len());
        };
        // 100 bytes, "A", 100 bytes (merged with the first: both are tiny),
        // "B", 3,200 bytes, in one read.
        frame(&mut r, 100, 1);
        r.capture.finalizes.push((100, A.to_vec()));
        frame(&mut r, 100, 2);
        r.capture.finalizes.push((200, B.to_vec()));
        frame(&mut r, 3200, 3);
        r.absorb_capture();
        assert_eq!(r.lens, [3400], "the tiny frames merged");
        let text = |t: &[u8]| (Opcode::Text, t.to_vec());
        let audio = |n: usize, b: u8| (Opcode::Binary, vec![b; n]);
        let replay = replayed(&r.begin(&mut MaskKeys::default(), None, false));
        assert_eq!(
            replay,
            [
                audio(100, 1),
                text(A),
                audio(100, 2),
                text(B),
                audio(3200, 3)
            ]
        );
        // "A" is answered; the first 8 ms (256 bytes) become final, past
        // "B"'s place: it goes first.
        r.finalizes.pop_front();
        r.note_final(8);
        let replay = replayed(&r.begin(&mut MaskKeys::default(), None, false));
        assert_eq!(replay, [text(B), audio(3144, 3)]);
    }

    /// Only a finalize, as upstream reads it, waits for a `<fin>`: not a
    /// message that names one; one spelled with an escape does.
    #[test]
    fn only_a_finalize_waits_for_its_fin() {
        let budget = Arc::new(CopyBudget::new(1 << 30));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget);
        capture(&mut r, 3200);
        let texts: [&[u8]; 5] = [
            br#"{"type":"keepalive","note":"finalize soon"}"#,
            br#"finalize"#,
            br#"["finalize"]"#,
            br#"{"type":"fin\u0061lize"}"#,
            br#"{"kind":"finalize"}"#,
        ];
        for t in texts {
            r.capture.finalizes.push((3200, t.to_vec()));
        }
        r.absorb_capture();
        let pending: Vec<&[u8]> = r.finalizes.iter().map(|(_, t)| t.as_slice()).collect();
        assert_eq!(pending, [texts[3]]);
    }

    /// A finalize too long to keep lets the copy go at once.
    #[test]
    fn a_finalize_too_long_to_keep_lets_the_copy_go() {
        let budget = Arc::new(CopyBudget::new(1 << 30));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget.clone());
        capture(&mut r, 3200);
        assert!(r.keeps_copy());
        r.capture.long_finalize = true;
        r.absorb_capture();
        assert!(!r.keeps_copy() && !r.can_resume());
        assert_eq!((budget.used(), budget.dropped()), (0, 1));
    }

    /// More than `MAX_PENDING_FINALIZES` unanswered lets the copy go.
    #[test]
    fn a_client_finalizing_in_a_loop_lets_its_copy_go() {
        let budget = Arc::new(CopyBudget::new(1 << 30));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget.clone());
        capture(&mut r, 3200);
        for i in 0..MAX_PENDING_FINALIZES {
            let pad = "x".repeat(4096 - 32);
            let text = format!(r#"{{"type":"finalize","pad":"{pad}"}}"#);
            r.capture.finalizes.push((0, text.into_bytes()));
            r.absorb_capture();
            assert!(r.keeps_copy(), "{i}");
        }
        r.capture
            .finalizes
            .push((0, br#"{"type":"finalize"}"#.to_vec()));
        r.absorb_capture();
        assert!(!r.keeps_copy() && !r.can_resume());
        assert!(r.finalizes.is_empty());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn no_budget_keeps_no_copy() {
        let budget = Arc::new(CopyBudget::new(0));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget.clone());
        capture(&mut r, 3200);
        assert!(!r.keeps_copy() && !r.can_resume());
        assert_eq!((budget.used(), budget.dropped()), (0, 1));
    }

    #[test]
    fn a_copy_emptied_by_final_tokens_gives_its_storage_back() {
        let budget = Arc::new(CopyBudget::new(1 << 20));
        let mut r = Resume::new(32_000, 2, 1 << 20, 3, budget.clone());
        for _ in 0..40 {
            capture(&mut r, 3200);
        }
        assert!(budget.used() > 64 << 10);
        r.note_final(4000); // all 128,000 bytes are final
        assert_eq!(budget.used(), 0);
        capture(&mut r, 3200);
        assert_eq!(budget.used(), r.capture.audio.capacity());
        assert!(r.can_resume());
    }
}

#[cfg(test)]
mod held_tests {
    use super::*;
    use crate::dataplane::buf::BufferPool;
    use crate::dataplane::io::{Conn, Duplex};
    use crate::dataplane::pump::{Link, StreamCx, StreamState};
    use std::cell::RefCell;
    use std::time::Duration;

    /// A read that fills the buffer with whole results and the start of
    /// one more (no larger than a buffer) is no large result: the frames
    /// before it go out and the buffer is compacted, as before `hold`,
    /// rather than all of it moved to a buffer of its own (an allocation
    /// and a copy of up to a buffer's bytes, freed again, on every read
    /// of a burst).
    #[test]
    fn a_result_cut_by_a_full_read_keeps_the_pooled_buffer() {
        use futures_lite::AsyncWriteExt;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let pair = || async {
                    let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    let peer = glommio::net::TcpStream::connect(l.local_addr().unwrap())
                        .await
                        .unwrap();
                    let ours = Duplex::new(Conn::Plain(l.accept().await.unwrap().into()));
                    (ours, peer)
                };
                let (upstream, mut upstream_peer) = pair().await;
                let (client, _client_peer) = pair().await;
                let result = build_frame(Opcode::Text, br#"{"tokens":[],"x":"0123"}"#, None);
                assert_eq!(result.len(), 26);
                // Three whole results and 12 bytes of a fourth in 90.
                let mut wire = Vec::new();
                for _ in 0..4 {
                    wire.extend_from_slice(&result);
                }
                upstream_peer.write_all(&wire[..90]).await.unwrap();
                upstream_peer.flush().await.unwrap();
                glommio::timer::sleep(Duration::from_millis(50)).await;
                let pool = BufferPool::new(90, 1, 4);
                let mut buf = pool.get();
                let state = StreamState::new(std::time::Instant::now());
                *state.resume.borrow_mut() = Some(Box::new(Resume::new(
                    32_000,
                    2,
                    1 << 20,
                    3,
                    Arc::new(super::super::copy_budget::CopyBudget::new(1 << 30)),
                )));
                let masks = RefCell::new(MaskKeys::default());
                let metrics = crate::core::metrics::ShardMetrics::new(0, &[]);
                let account = crate::core::keyring::AccountState::new(
                    "a",
                    0,
                    "",
                    "default",
                    true,
                    10,
                    Instant::now(),
                );
                let redactor =
                    crate::core::secret::Redactor::new(&crate::core::secret::Secret::new("k"));
                let cx = StreamCx {
                    state: &state,
                    masks: &masks,
                    metrics: &metrics,
                    account: &account,
                    redactor: &redactor,
                };
                let link = Link {
                    from: &upstream,
                    to: &client,
                    buf: &mut buf,
                };
                let pump = upstream_to_client(link, 1 << 20, cx);
                let _ = futures_lite::future::or(async { Some(pump.await) }, async {
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                    None
                })
                .await;
                assert_eq!(buf.len(), 12, "the fourth result's start waits");
                assert_eq!(buf.capacity(), 90, "still the pool's buffer");
            });
    }
}
