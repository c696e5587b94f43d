//! The frame scanner: walks WebSocket frames where they lie in a read
//! buffer, across reads of any size, and re-masks client frames in place.
//!
//! It owns no buffer and does no I/O: the pumps hand it each window they
//! read and forward the ready region it reports. A frame's header and
//! payload are contiguous in the buffer, so every ready region is one
//! contiguous write; a payload larger than the buffer streams through in
//! pieces (the scanner keeps the mask phase across reads). Nothing here
//! allocates, except [`FrameScanner::scan_capture`], which copies audio
//! into the caller's [`Capture`] for a resume.

use std::collections::VecDeque;

use crate::frame::{parse_header, FrameError, Opcode, Sender};
use crate::mask::{apply_mask, rekey, MaskKeys};
use crate::utf8::Utf8Check;

/// What one pass of [`FrameScanner::scan`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes from the start of the window that are ready to forward.
    pub ready: usize,
    /// Frames whose last byte is in the ready region.
    pub frames_done: u32,
    /// Data (non-control) frames whose header is in the ready region.
    pub data_frames_started: u32,
    /// The ready region ends with a close frame: nothing after it is read.
    pub close_done: bool,
    /// The frame after the ready region breaks the protocol. The ready
    /// frames before it are still forwarded, then the stream ends.
    pub violation: Option<FrameError>,
    /// Payload bytes of binary messages in the ready region (audio, for the
    /// usage meter and the daily allowance).
    pub binary_bytes: u64,
    /// An empty data message ended in the ready region: from a client,
    /// its end of audio.
    pub end_of_audio: bool,
}

/// Walks frames across reads. For client frames it also re-masks in place.
#[derive(Debug)]
pub struct FrameScanner {
    from: Sender,
    max_payload: u64,
    /// Payload bytes of the current frame not yet seen.
    remaining: u64,
    /// `client key ⊕ fresh key` for the current frame (client frames only).
    xor: [u8; 4],
    /// Payload offset (mod 4) of the next payload byte.
    phase: usize,
    /// The current frame is a close frame.
    in_close: bool,
    /// The message being sent is binary (continuations inherit it).
    msg_binary: bool,
    /// The current frame's payload counts as audio.
    counts_audio: bool,
    /// The current text message has had no payload piece handed to a
    /// [`TextSink`] yet.
    text_fresh: bool,
    /// The current client frame's own mask key, and the relay's key that
    /// replaced it (for [`FrameScanner::scan_capture`] and a resume).
    client_key: [u8; 4],
    fresh: [u8; 4],
    /// The current frame's FIN bit and opcode.
    fin: bool,
    opcode: Opcode,
    /// A fragmented message is open: its first frame had no FIN, and the
    /// next data frame must be its continuation.
    in_message: bool,
    /// The current (or last) message has had no payload byte so far.
    msg_empty: bool,
    /// What of the current frame's payload is looked at (client frames
    /// only; audio, binary, never is).
    looks: Looks,
    /// The text message so far is UTF-8.
    utf8: Utf8Check,
    /// The client's close frame so far: its code's bytes, and its reason
    /// checked as UTF-8.
    close_code: [u8; 2],
    close_have: u8,
    close_reason: Utf8Check,
}

impl FrameScanner {
    /// A scanner for frames sent by `from`, refusing payloads over `max_payload`.
    pub fn new(from: Sender, max_payload: u64) -> Self {
        FrameScanner {
            from,
            max_payload,
            remaining: 0,
            xor: [0; 4],
            phase: 0,
            in_close: false,
            msg_binary: false,
            counts_audio: false,
            text_fresh: false,
            client_key: [0; 4],
            fresh: [0; 4],
            fin: true,
            opcode: Opcode::Binary,
            in_message: false,
            msg_empty: false,
            looks: Looks::Nothing,
            utf8: Utf8Check::default(),
            close_code: [0; 2],
            close_have: 0,
            close_reason: Utf8Check::default(),
        }
    }

    /// Mid-frame in an audio frame: how the rest of this frame, re-masked
    /// as the scanner does it, continues on a new connection (see
    /// [`CutFrame`]). `None` between frames; `Some(None)` mid-frame
    /// in anything but audio.
    pub fn cut_frame(&self) -> Option<Option<CutFrame>> {
        if self.remaining == 0 {
            return None;
        }
        if !self.counts_audio {
            return Some(None);
        }
        Some(Some(CutFrame {
            remaining: self.remaining,
            key: self.fresh,
            phase: self.phase,
            fin: self.fin,
        }))
    }

    /// The largest payload this scanner takes.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// Payload bytes of the current frame not yet scanned (0 between frames).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// True between frames (a partial header not yet scanned counts as between).
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// The open fragmented message, if one is: `Some(true)` for binary
    /// (audio), `Some(false)` for text. Only between messages may another
    /// sender's data frame (the relay's error or `finalize`) go in; a
    /// control frame may go in at any frame boundary.
    pub fn open_message(&self) -> Option<bool> {
        self.in_message.then_some(self.msg_binary)
    }

    /// Scans `window` from its start. Client frames get a fresh key from
    /// `masks`. Stops after a close frame, before a partial header (those
    /// bytes stay for the next read), or before a frame that breaks the
    /// protocol ([`Scan::violation`]). Allocation-free.
    #[inline]
    pub fn scan(&mut self, window: &mut [u8], masks: Option<&mut MaskKeys>) -> Scan {
        self.scan_inner(window, masks, None, &mut NoText)
    }

    /// [`scan`](Self::scan) of server frames that also hands `sink` every
    /// text message's payload, in order, piece by piece as it lies in the
    /// window (server frames are unmasked): a message split across reads,
    /// or across fragments, comes in several pieces, and a read with many
    /// messages gives each of them. Only the ready region's bytes are
    /// given. Nothing is copied; [`scan`](Self::scan) and
    /// [`scan_capture`](Self::scan_capture) (client frames: audio) do none
    /// of this.
    #[inline]
    pub fn scan_text(&mut self, window: &mut [u8], sink: &mut impl TextSink) -> Scan {
        debug_assert!(self.from == Sender::Server, "client text is masked");
        self.scan_inner(window, None, None, sink)
    }

    /// [`scan`](Self::scan) that also copies what a resume needs into
    /// `capture`: audio payloads unmasked, the `finalize` messages and
    /// whether the end of audio went by. Client frames only.
    pub fn scan_capture(
        &mut self,
        window: &mut [u8],
        masks: &mut MaskKeys,
        capture: &mut Capture,
    ) -> Scan {
        self.scan_inner(window, Some(masks), Some(capture), &mut NoText)
    }

    #[inline(always)]
    fn scan_inner<S: TextSink>(
        &mut self,
        window: &mut [u8],
        masks: Option<&mut MaskKeys>,
        mut capture: Option<&mut Capture>,
        sink: &mut S,
    ) -> Scan {
        let mut masks = masks;
        let mut out = Scan::default();
        let len = window.len();
        let mut pos = 0;
        // Where the current frame's header is, when it is in this window.
        let mut frame_at = None;
        loop {
            if self.remaining > 0 {
                let n = (self.remaining.min((len - pos) as u64)) as usize;
                if self.looks != Looks::Nothing {
                    let ends = self.remaining == n as u64;
                    if let Err(e) = self.payload_ok(&window[pos..pos + n], ends) {
                        pos = self.invalid(&mut out, e, pos, frame_at);
                        break;
                    }
                    if self.looks == Looks::Text {
                        let starts = std::mem::replace(&mut self.text_fresh, false);
                        sink.text(&window[pos..pos + n], starts, ends && self.fin);
                    }
                }
                if self.from == Sender::Client {
                    if let Some(c) = capture.as_deref_mut() {
                        self.capture_payload(&window[pos..pos + n], c);
                    }
                    apply_mask(&mut window[pos..pos + n], self.xor, self.phase);
                }
                self.phase = (self.phase + n) & 3;
                self.remaining -= n as u64;
                if self.counts_audio {
                    out.binary_bytes += n as u64;
                }
                pos += n;
                if self.remaining > 0 {
                    break; // the payload goes on in the next read
                }
                out.frames_done += 1;
                if let Some(c) = capture.as_deref_mut() {
                    if self.counts_audio {
                        c.frame_ends.push(c.audio.len());
                    }
                    Self::frame_done(c, self.opcode, self.fin);
                }
                if self.in_close {
                    out.close_done = true;
                    break;
                }
                continue;
            }
            if pos == len {
                break;
            }
            let h = match parse_header(&window[pos..], self.from, self.max_payload) {
                Ok(Some(h)) => h,
                Ok(None) => break, // partial header: keep it for the next read
                Err(e) => {
                    out.violation = Some(e);
                    break;
                }
            };
            let data = !h.opcode.is_control();
            if data {
                // A continuation exactly when a message is open.
                if (h.opcode == Opcode::Continuation) != self.in_message {
                    out.violation = Some(FrameError::Fragmentation);
                    break;
                }
                self.in_message = !h.fin;
                let starts = h.opcode != Opcode::Continuation;
                self.msg_empty = (starts || self.msg_empty) && h.payload_len == 0;
            }
            if let (Some(client_key), Some(masks)) = (h.mask, masks.as_deref_mut()) {
                let fresh = masks.next_key();
                let at = pos + h.header_len - 4;
                window[at..at + 4].copy_from_slice(&fresh);
                self.xor = rekey(client_key, fresh);
                self.client_key = client_key;
                self.fresh = fresh;
            }
            self.fin = h.fin;
            self.opcode = h.opcode;
            if data {
                out.data_frames_started += 1;
                match h.opcode {
                    Opcode::Binary => self.msg_binary = true,
                    Opcode::Text => self.msg_binary = false,
                    _ => {}
                }
            }
            self.counts_audio = data && self.msg_binary;
            self.looks = match (self.from, h.opcode) {
                // Either side's close frame and text are checked: a bad one
                // from upstream must not reach the client either (a browser
                // fails its WebSocket on text that is not UTF-8).
                (_, Opcode::Close) => {
                    if h.payload_len == 1 {
                        pos = self.invalid(&mut out, FrameError::BadClose, pos, Some(pos));
                        break;
                    }
                    self.close_have = 0;
                    Looks::Close
                }
                _ if data && !self.msg_binary => Looks::Text,
                _ => Looks::Nothing,
            };
            if h.opcode == Opcode::Text {
                self.text_fresh = true;
            }
            self.in_close = h.opcode == Opcode::Close;
            self.phase = 0;
            self.remaining = h.payload_len;
            frame_at = Some(pos);
            pos += h.header_len;
            if h.payload_len == 0 {
                if h.fin && self.looks == Looks::Text && !self.utf8.finish() {
                    // A message that ends inside a character.
                    pos = self.invalid(&mut out, FrameError::InvalidUtf8, pos, frame_at);
                    break;
                }
                if self.looks == Looks::Text {
                    let starts = std::mem::replace(&mut self.text_fresh, false);
                    sink.text(&[], starts, h.fin);
                }
                out.frames_done += 1;
                // An empty message, in one frame or several, ends the audio.
                let ends_audio = h.fin && !h.opcode.is_control() && self.msg_empty;
                out.end_of_audio |= ends_audio;
                if let Some(c) = capture.as_deref_mut() {
                    c.end_of_audio |= ends_audio;
                    Self::frame_done(c, h.opcode, h.fin);
                }
                if self.in_close {
                    out.close_done = true;
                    break;
                }
            }
        }
        out.ready = pos;
        out
    }
}

impl FrameScanner {
    /// Takes in `masked` (the bytes of the current text or close frame as
    /// they came: a client's before re-masking, upstream's unmasked);
    /// `ends` when they end the frame. A text
    /// message must be UTF-8 (checked at its last frame's end too); a
    /// close frame's code must be one an endpoint may send, and its
    /// reason UTF-8.
    #[inline(never)]
    fn payload_ok(&mut self, masked: &[u8], ends: bool) -> Result<(), FrameError> {
        let mut plain = [0u8; 64];
        let mut phase = self.phase;
        for piece in masked.chunks(plain.len()) {
            let plain = &mut plain[..piece.len()];
            plain.copy_from_slice(piece);
            apply_mask(plain, self.client_key, phase);
            phase = (phase + piece.len()) & 3;
            let text = match self.looks {
                Looks::Close => {
                    let take = (2 - self.close_have as usize).min(plain.len());
                    let at = self.close_have as usize;
                    self.close_code[at..at + take].copy_from_slice(&plain[..take]);
                    self.close_have += take as u8;
                    (&mut self.close_reason, &plain[take..])
                }
                _ => (&mut self.utf8, &plain[..]),
            };
            if !text.0.feed(text.1) {
                return Err(FrameError::InvalidUtf8);
            }
        }
        if !ends {
            return Ok(());
        }
        match self.looks {
            Looks::Close => {
                if !sendable_close_code(u16::from_be_bytes(self.close_code)) {
                    return Err(FrameError::BadClose);
                }
                if !self.close_reason.finish() {
                    return Err(FrameError::InvalidUtf8);
                }
            }
            _ if self.fin && !self.utf8.finish() => return Err(FrameError::InvalidUtf8),
            _ => {}
        }
        Ok(())
    }

    /// Ends a scan at a text or close frame that breaks the protocol
    /// (`e`): nothing of it is ready when its header is in this window
    /// (`frame_at`); when it began in an earlier read, what came before
    /// stays sent. Returns where the ready region ends.
    #[cold]
    fn invalid(
        &mut self,
        out: &mut Scan,
        e: FrameError,
        pos: usize,
        frame_at: Option<usize>,
    ) -> usize {
        out.violation = Some(e);
        match frame_at {
            Some(at) => {
                // Nothing of the bad frame is ready: the scanner stands
                // where the ready region ends, between frames, with the
                // message state the frame found (a continuation had one
                // open), so `at_boundary` and `open_message` tell the
                // relay what the peer was sent.
                self.remaining = 0;
                self.in_close = false;
                if !self.opcode.is_control() {
                    out.data_frames_started -= 1;
                    self.in_message = self.opcode == Opcode::Continuation;
                }
                at
            }
            None => pos,
        }
    }

    /// Copies `masked` (the client's bytes of the current frame, before
    /// re-masking) into `c`, unmasked: audio to `c.audio`, text (up to a
    /// bound) to `c.text`.
    fn capture_payload(&self, masked: &[u8], c: &mut Capture) {
        if self.counts_audio {
            // Appended where the copy lives, then unmasked there: the new
            // bytes are the last `n` of the deque's two parts.
            c.audio.extend(masked);
            let n = masked.len();
            let (front, back) = c.audio.as_mut_slices();
            if back.len() >= n {
                let at = back.len() - n;
                apply_mask(&mut back[at..], self.client_key, self.phase);
            } else {
                let k = n - back.len();
                let at = front.len() - k;
                apply_mask(&mut front[at..], self.client_key, self.phase);
                apply_mask(back, self.client_key, (self.phase + k) & 3);
            }
            return;
        }
        if self.opcode.is_control() || self.msg_binary {
            return;
        }
        let long = c.text_cut || c.text.len() + masked.len() > MAX_CONTROL_TEXT;
        if long && c.long_may_be {
            return; // already known to be one the copy cannot keep
        }
        let at = c.text.len();
        c.text.extend_from_slice(masked);
        apply_mask(&mut c.text[at..], self.client_key, self.phase);
        if long {
            // Not kept, but looked through: `text` keeps only the last
            // bytes, for a word cut between two reads.
            c.text_cut = true;
            if may_be_finalize(&c.text) {
                c.long_may_be = true;
                c.text = Vec::new();
            } else {
                let keep = c.text.len().min(b"finalize".len() - 1);
                c.text.drain(..c.text.len() - keep);
            }
        }
    }

    /// A frame ended: a whole text message that may be a `finalize` is
    /// kept for the relay to read; one too long to keep, noted.
    fn frame_done(c: &mut Capture, opcode: Opcode, fin: bool) {
        if fin && !opcode.is_control() && (c.text_cut || !c.text.is_empty()) {
            if c.text_cut {
                c.long_finalize |= c.long_may_be;
            } else if may_be_finalize(&c.text) {
                c.finalizes
                    .push((c.audio.len(), std::mem::take(&mut c.text)));
            }
            c.text.clear();
            c.text_cut = false;
            c.long_may_be = false;
        }
    }
}

/// Takes the text messages [`FrameScanner::scan_text`] walks, piece by
/// piece.
pub trait TextSink {
    /// The next `piece` of a text message's payload: `starts` when it is
    /// the message's first (nothing of it came before), `ends` when it is
    /// its last. A message that lies whole in one read comes as one piece
    /// with both; an empty message, or an empty fragment, as an empty
    /// piece.
    fn text(&mut self, piece: &[u8], starts: bool, ends: bool);
}

/// The sink of [`FrameScanner::scan`] and [`FrameScanner::scan_capture`]:
/// nothing, compiled away.
struct NoText;

impl TextSink for NoText {
    #[inline(always)]
    fn text(&mut self, _: &[u8], _: bool, _: bool) {}
}

/// Whether client text may be (part of) a `finalize`: it names one, or has
/// an escape, which could spell it. Only JSON tells (the relay's to read).
fn may_be_finalize(text: &[u8]) -> bool {
    text.contains(&b'\\') || text.windows(8).any(|w| w == b"finalize")
}

/// Largest client text message whose content is looked at (for `finalize`).
pub const MAX_CONTROL_TEXT: usize = 4096;

/// What of a client frame's payload the scanner looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Looks {
    /// Nothing: audio, and every server frame.
    Nothing,
    /// A text message's bytes, for UTF-8.
    Text,
    /// A close frame's code and reason.
    Close,
}

/// Whether an endpoint may send close code `code` (RFC 6455 §7.4.1 and
/// §7.4.2; 1004 to 1006 and 1015 are reserved, 1016 to 2999 are for the
/// RFC's extensions, none of which exist).
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Whether `body`, a whole unmasked close frame's payload, is one an
/// endpoint may send: empty, or a sendable code and a UTF-8 reason (the
/// check [`FrameScanner::scan`] makes on close frames it walks).
pub fn close_body_ok(body: &[u8]) -> bool {
    close_body_fault(body).is_none()
}

/// What is wrong with `body`, a whole unmasked close frame's payload, if
/// anything: a 1-byte body or a code no endpoint may send
/// ([`FrameError::BadClose`]), or a reason that is not UTF-8
/// ([`FrameError::InvalidUtf8`]), as [`FrameScanner::scan`] tells them.
pub fn close_body_fault(body: &[u8]) -> Option<FrameError> {
    match body {
        [] => None,
        [a, b, reason @ ..] => {
            if !sendable_close_code(u16::from_be_bytes([*a, *b])) {
                Some(FrameError::BadClose)
            } else if std::str::from_utf8(reason).is_err() {
                Some(FrameError::InvalidUtf8)
            } else {
                None
            }
        }
        [_] => Some(FrameError::BadClose),
    }
}

/// What [`FrameScanner::scan_capture`] saw in one window, beyond [`Scan`].
#[derive(Debug, Default)]
pub struct Capture {
    /// Raw audio payload bytes, unmasked, in order, appended at the back.
    /// Its owner may drop bytes at the front between scans: it is the
    /// stream's whole copy, not one scan's, so audio is copied once.
    pub audio: VecDeque<u8>,
    /// Where in `audio` (as indexed when it was pushed) a client audio
    /// frame ended.
    pub frame_ends: Vec<usize>,
    /// The payload of the client text frame being read, unmasked.
    pub text: Vec<u8>,
    /// The text message being read is longer than [`MAX_CONTROL_TEXT`]:
    /// it is not kept (a `finalize` is far shorter), and `text` holds only
    /// its last few bytes.
    pub text_cut: bool,
    /// ... and it may be a `finalize` (see `long_finalize`).
    pub long_may_be: bool,
    /// A text message longer than [`MAX_CONTROL_TEXT`] that may be a
    /// `finalize` (it names one, or has an escape) went by: upstream may
    /// answer it with `<fin>`, and a replay cannot send it again.
    pub long_finalize: bool,
    /// The client's text messages that went by and may be a `finalize`
    /// (the relay reads each as JSON: one that only names it is not one,
    /// and one may spell it with an escape): where each came in `audio`
    /// (as indexed when it was pushed, as `frame_ends`) and its text,
    /// unmasked.
    pub finalizes: Vec<(usize, Vec<u8>)>,
    /// The client's end of audio (an empty data frame) went by.
    pub end_of_audio: bool,
}

/// A client audio frame the failure cut: part of it went to the old
/// connection, the rest is still to be read from the client. On the new
/// connection the part in the copy and the rest make one frame again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutFrame {
    /// Payload bytes of the frame not yet read.
    pub remaining: u64,
    /// The relay's mask key for the frame: the client→upstream pump
    /// re-masks the rest with it, as for the old connection.
    pub key: [u8; 4],
    /// The payload offset (mod 4) the rest continues at under `key`.
    pub phase: usize,
    /// The frame's FIN bit.
    pub fin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::build_frame;

    fn unmask_frames(bytes: &[u8]) -> Vec<(Opcode, Vec<u8>)> {
        let mut out = vec![];
        let mut at = 0;
        while at < bytes.len() {
            let h = parse_header(&bytes[at..], Sender::Client, 1 << 30)
                .unwrap()
                .unwrap();
            let mut p =
                bytes[at + h.header_len..at + h.header_len + h.payload_len as usize].to_vec();
            apply_mask(&mut p, h.mask.unwrap(), 0);
            out.push((h.opcode, p));
            at += h.header_len + h.payload_len as usize;
        }
        out
    }

    #[test]
    fn remasks_frames_split_at_every_byte() {
        let frames: Vec<(Opcode, Vec<u8>)> = vec![
            (Opcode::Binary, (0..3200u32).map(|i| i as u8).collect()),
            (Opcode::Text, br#"{"type":"keepalive"}"#.to_vec()),
            (Opcode::Ping, b"p".to_vec()),
            (Opcode::Binary, vec![]),
            (Opcode::Binary, vec![7; 70_000]),
        ];
        let mut wire = vec![];
        for (i, (op, p)) in frames.iter().enumerate() {
            wire.extend(build_frame(*op, p, Some([i as u8, 0x55, 0xAA, 3])));
        }
        for chunk in [1usize, 2, 5, 13, 100, 4096, 1 << 20] {
            let mut scanner = FrameScanner::new(Sender::Client, 1 << 20);
            let mut masks = MaskKeys::default();
            let mut carry: Vec<u8> = vec![];
            let mut sent = vec![];
            let (mut done, mut data) = (0, 0);
            for piece in wire.chunks(chunk) {
                carry.extend_from_slice(piece);
                let s = scanner.scan(&mut carry, Some(&mut masks));
                sent.extend_from_slice(&carry[..s.ready]);
                carry.drain(..s.ready);
                done += s.frames_done;
                data += s.data_frames_started;
            }
            assert!(carry.is_empty());
            assert_eq!((done, data), (5, 4), "chunk {chunk}");
            assert_eq!(sent.len(), wire.len());
            assert_ne!(sent, wire, "keys changed");
            assert_eq!(unmask_frames(&sent), frames, "chunk {chunk}");
        }
    }

    /// The capture is the caller's copy, trimmed at the front between
    /// scans, so new audio lands across the deque's wrap point: whatever
    /// the split of the reads, the copy holds the client's audio unmasked,
    /// with each frame's end, and the wire is re-masked as by `scan`.
    #[test]
    fn captures_audio_unmasked_across_the_copys_wrap_point() {
        let frames: Vec<Vec<u8>> = (0..6u32)
            .map(|f| (0..1001u32).map(|i| (i * 7 + f * 13) as u8).collect())
            .collect();
        let mut wire = vec![];
        for (i, p) in frames.iter().enumerate() {
            wire.extend(build_frame(
                Opcode::Binary,
                p,
                Some([i as u8, 0x5A, 0xC3, 9]),
            ));
            wire.extend(build_frame(Opcode::Text, b"{}", Some([1, 2, 3, 4])));
        }
        // One byte left from before, at the deque's physical byte 1,200.
        let all: Vec<u8> = [vec![0u8], frames.concat()].concat();
        for chunk in [1usize, 3, 333, 1000, 4096] {
            let mut scanner = FrameScanner::new(Sender::Client, 1 << 20);
            let mut masks = MaskKeys::default();
            let mut c = Capture::default();
            // A deque with its head moved on: appends soon wrap.
            c.audio.reserve_exact(1500);
            c.audio.extend(std::iter::repeat_n(0u8, 1201));
            c.audio.drain(..1200);
            let (mut kept, mut trimmed, mut ends) = (vec![], 0, vec![]);
            let mut wrapped = false;
            let mut carry: Vec<u8> = vec![];
            let mut sent = vec![];
            for piece in wire.chunks(chunk) {
                carry.extend_from_slice(piece);
                let s = scanner.scan_capture(&mut carry, &mut masks, &mut c);
                sent.extend_from_slice(&carry[..s.ready]);
                carry.drain(..s.ready);
                wrapped |= !c.audio.as_slices().1.is_empty();
                ends.extend(c.frame_ends.drain(..).map(|e| e + trimmed));
                // The owner trims the front, as a final token would.
                let n = c.audio.len() / 2;
                kept.extend(c.audio.drain(..n));
                trimmed += n;
            }
            kept.extend(c.audio.drain(..));
            assert!(wrapped, "chunk {chunk}: the appends never wrapped");
            assert_eq!(kept, all, "chunk {chunk}");
            let want: Vec<usize> = (1..=6).map(|f| 1 + f * 1001).collect();
            assert_eq!(ends, want, "chunk {chunk}");
            let got: Vec<Vec<u8>> = unmask_frames(&sent)
                .into_iter()
                .filter(|(op, _)| *op == Opcode::Binary)
                .map(|(_, p)| p)
                .collect();
            assert_eq!(got, frames, "chunk {chunk}");
        }
    }

    /// A `finalize` is captured whole, fragments joined and unmasked, with
    /// the audio byte it came after, and so is a message with an escape
    /// (which may spell one); a keepalive is not, and a text message
    /// longer than `MAX_CONTROL_TEXT` is not kept, but noted when it names
    /// one (also across reads).
    #[test]
    fn captures_each_finalize_with_its_place_in_the_audio() {
        use Opcode::{Binary, Continuation as Cont, Text};
        let key = Some([9, 8, 7, 6]);
        let long = format!(
            r#"{{"type":"finalize","x":"{}"}}"#,
            "a".repeat(MAX_CONTROL_TEXT)
        );
        let frames: Vec<(Opcode, bool, &[u8])> = vec![
            (Binary, true, &[1; 300]),
            (Text, false, br#"{"type":"fin"#),
            (Cont, true, br#"alize","trailing_silence_ms":300}"#),
            (Binary, true, &[2; 50]),
            (Text, true, br#"{"type":"keepalive"}"#),
            (Text, true, br#"{"type":"fin\u0061lize"}"#),
            (Text, true, long.as_bytes()),
            (Text, true, br#"{"type":"finalize"}"#),
        ];
        let mut wire = vec![];
        for &(op, fin, payload) in &frames {
            wire.extend(frame(op, fin, payload, key));
        }
        for chunk in [1usize, 7, 4096, 1 << 20] {
            let mut s = FrameScanner::new(Sender::Client, 1 << 20);
            let mut masks = MaskKeys::default();
            let mut c = Capture::default();
            let mut carry: Vec<u8> = vec![];
            for piece in wire.chunks(chunk) {
                carry.extend_from_slice(piece);
                let scan = s.scan_capture(&mut carry, &mut masks, &mut c);
                assert_eq!(scan.violation, None);
                carry.drain(..scan.ready);
            }
            let got: Vec<(usize, &[u8])> = c
                .finalizes
                .iter()
                .map(|(at, t)| (*at, t.as_slice()))
                .collect();
            assert_eq!(
                got,
                [
                    (
                        300,
                        &br#"{"type":"finalize","trailing_silence_ms":300}"#[..]
                    ),
                    (350, &br#"{"type":"fin\u0061lize"}"#[..]),
                    (350, &br#"{"type":"finalize"}"#[..]),
                ],
                "chunk {chunk}"
            );
            assert!(c.long_finalize, "chunk {chunk}");
        }
    }

    /// A text message too long to keep is noted when it names `finalize`
    /// anywhere (the word cut between two reads too), and not when it
    /// does not; what it leaves in `text` stays a few bytes.
    #[test]
    fn notes_a_finalize_too_long_to_keep() {
        let pad = "a".repeat(MAX_CONTROL_TEXT);
        for (text, want) in [
            (format!(r#"{{"note":"{pad}","type":"finalize"}}"#), true),
            (format!(r#"{{"note":"{pad}","type":"keepalive"}}"#), false),
        ] {
            let wire = frame(Opcode::Text, true, text.as_bytes(), Some([1, 2, 3, 4]));
            for chunk in [1usize, 5, 4096, 1 << 20] {
                let mut s = FrameScanner::new(Sender::Client, 1 << 20);
                let mut masks = MaskKeys::default();
                let mut c = Capture::default();
                let mut carry: Vec<u8> = vec![];
                let mut most = 0;
                for piece in wire.chunks(chunk) {
                    carry.extend_from_slice(piece);
                    let scan = s.scan_capture(&mut carry, &mut masks, &mut c);
                    assert_eq!(scan.violation, None);
                    carry.drain(..scan.ready);
                    most = most.max(c.text.len());
                }
                assert_eq!(c.long_finalize, want, "chunk {chunk}");
                assert!(c.finalizes.is_empty() && c.text.is_empty());
                assert!(most <= MAX_CONTROL_TEXT + chunk, "chunk {chunk}: {most}");
            }
        }
    }

    #[test]
    fn stops_after_close_and_rejects_violations() {
        let mut wire = build_frame(
            Opcode::Close,
            &crate::frame::close_payload(1000, "bye"),
            Some([1, 2, 3, 4]),
        );
        let close_len = wire.len();
        wire.extend(build_frame(Opcode::Binary, b"after", Some([1, 2, 3, 4])));
        let mut s = FrameScanner::new(Sender::Client, 100);
        let scan = s.scan(&mut wire, Some(&mut MaskKeys::default()));
        assert_eq!(
            (scan.ready, scan.close_done, scan.frames_done),
            (close_len, true, 1)
        );

        // A good frame, then an unmasked one in the same read: the good one
        // is still ready to forward, and the violation is reported after it.
        let mut wire = build_frame(Opcode::Binary, b"good", Some([1, 2, 3, 4]));
        let good = wire.len();
        wire.extend(build_frame(Opcode::Binary, b"x", None));
        let mut s = FrameScanner::new(Sender::Client, 100);
        let scan = s.scan(&mut wire, Some(&mut MaskKeys::default()));
        assert_eq!(
            (scan.ready, scan.frames_done, scan.violation),
            (good, 1, Some(FrameError::Masking))
        );
        let mut big = build_frame(Opcode::Binary, &[0; 101], Some([0; 4]));
        let mut s = FrameScanner::new(Sender::Client, 100);
        let scan = s.scan(&mut big, Some(&mut MaskKeys::default()));
        assert_eq!((scan.ready, scan.violation), (0, Some(FrameError::TooBig)));
    }

    use crate::frame::build_fragment as frame;

    /// Puts the pieces [`FrameScanner::scan_text`] hands over back into
    /// messages, checking that each message starts and ends once.
    #[derive(Default)]
    struct Messages {
        done: Vec<Vec<u8>>,
        open: Option<Vec<u8>>,
    }

    impl TextSink for Messages {
        fn text(&mut self, piece: &[u8], starts: bool, ends: bool) {
            assert_eq!(starts, self.open.is_none(), "starts exactly after an end");
            let mut m = self.open.take().unwrap_or_default();
            m.extend_from_slice(piece);
            if ends {
                self.done.push(m);
            } else {
                self.open = Some(m);
            }
        }
    }

    /// Every text message of the ready region reaches the sink, whatever
    /// the reads: several in one read, one cut across reads, one in
    /// fragments (a ping between them), an empty one; binary, ping and
    /// close payloads never do.
    #[test]
    fn scan_text_hands_over_every_text_message_at_any_split() {
        use Opcode::{Binary, Close, Continuation as Cont, Ping, Text};
        let long: Vec<u8> = (0..300).map(|i| b'a' + (i % 26) as u8).collect();
        let mut wire = vec![];
        wire.extend(frame(Text, true, br#"{"tokens":[{"text":"<fin>"}]}"#, None));
        wire.extend(frame(Text, true, b"second in the read", None));
        wire.extend(frame(Binary, true, b"not text", None));
        wire.extend(frame(Text, false, b"frag", None));
        wire.extend(frame(Ping, true, b"ping", None));
        wire.extend(frame(Cont, false, b"men", None));
        wire.extend(frame(Cont, true, b"ted", None));
        wire.extend(frame(Text, true, b"", None));
        wire.extend(frame(Text, true, &long, None));
        wire.extend(frame(
            Close,
            true,
            &crate::frame::close_payload(1000, "bye"),
            None,
        ));
        let want: Vec<Vec<u8>> = vec![
            br#"{"tokens":[{"text":"<fin>"}]}"#.to_vec(),
            b"second in the read".to_vec(),
            b"fragmented".to_vec(),
            vec![],
            long.clone(),
        ];
        for chunk in 1..=wire.len() {
            let mut s = FrameScanner::new(Sender::Server, 1 << 20);
            let mut sink = Messages::default();
            let mut carry: Vec<u8> = vec![];
            let mut sent = 0;
            for piece in wire.chunks(chunk) {
                carry.extend_from_slice(piece);
                let scan = s.scan_text(&mut carry, &mut sink);
                assert_eq!(scan.violation, None);
                sent += scan.ready;
                carry.drain(..scan.ready);
            }
            assert_eq!(sent, wire.len(), "chunk {chunk}");
            assert!(sink.open.is_none(), "chunk {chunk}");
            assert_eq!(sink.done, want, "chunk {chunk}");
        }
    }

    #[test]
    fn follows_fragmented_messages_and_rejects_them_out_of_order() {
        use Opcode::{Binary, Continuation as Cont, Ping, Text};
        for from in [Sender::Client, Sender::Server] {
            let key = (from == Sender::Client).then_some([5, 6, 7, 8]);
            let masks = |s: &mut FrameScanner, w: &mut Vec<u8>| {
                let mut keys = MaskKeys::default();
                s.scan(w, (from == Sender::Client).then_some(&mut keys))
            };
            // A message in three frames with a ping inside it is fine, and
            // the scanner knows when a message is open.
            let mut s = FrameScanner::new(from, 100);
            let mut wire = frame(Binary, false, b"ab", key);
            let scan = masks(&mut s, &mut wire);
            assert_eq!((scan.violation, s.open_message()), (None, Some(true)));
            assert!(s.at_boundary());
            let mut wire = frame(Ping, true, b"p", key);
            wire.extend(frame(Cont, false, b"cd", key));
            wire.extend(frame(Cont, true, b"ef", key));
            let scan = masks(&mut s, &mut wire);
            assert_eq!(
                (scan.ready, scan.frames_done, scan.violation),
                (wire.len(), 3, None)
            );
            assert_eq!(s.open_message(), None);
            let mut wire = frame(Text, false, b"{", key);
            let scan = masks(&mut s, &mut wire);
            assert_eq!((scan.violation, s.open_message()), (None, Some(false)));

            // A continuation with nothing to continue, after a good frame:
            // the good frame is ready, the violation reported after it.
            let mut s = FrameScanner::new(from, 100);
            let mut wire = frame(Binary, true, b"good", key);
            let good = wire.len();
            wire.extend(frame(Cont, true, b"bad", key));
            let scan = masks(&mut s, &mut wire);
            assert_eq!(
                (scan.ready, scan.frames_done, scan.violation),
                (good, 1, Some(FrameError::Fragmentation))
            );
            // A new message inside an open one, text or binary.
            for second in [Text, Binary] {
                let mut s = FrameScanner::new(from, 100);
                let mut wire = frame(Binary, false, b"ab", key);
                let open = wire.len();
                wire.extend(frame(second, true, b"cd", key));
                let scan = masks(&mut s, &mut wire);
                assert_eq!(
                    (scan.ready, scan.violation),
                    (open, Some(FrameError::Fragmentation))
                );
            }
        }
        assert_eq!(FrameError::Fragmentation.close_code(), 1002);
    }

    #[test]
    fn an_empty_message_in_fragments_ends_the_audio() {
        use Opcode::{Binary, Continuation as Cont, Text};
        let key = Some([5, 6, 7, 8]);
        let ends = |frames: &[(Opcode, bool, &[u8])]| {
            let mut wire = vec![];
            for &(op, fin, payload) in frames {
                wire.extend(frame(op, fin, payload, key));
            }
            let mut plain_wire = wire.clone();
            let mut c = Capture::default();
            let mut s = FrameScanner::new(Sender::Client, 100);
            let scan = s.scan_capture(&mut wire, &mut MaskKeys::default(), &mut c);
            assert_eq!(scan.violation, None);
            assert_eq!(scan.end_of_audio, c.end_of_audio);
            // The plain scan says so too.
            let mut s = FrameScanner::new(Sender::Client, 100);
            let plain = s.scan(&mut plain_wire, Some(&mut MaskKeys::default()));
            assert_eq!(plain.end_of_audio, c.end_of_audio);
            c.end_of_audio
        };
        assert!(ends(&[(Binary, true, b"")]));
        assert!(ends(&[(Text, true, b"")]));
        assert!(ends(&[
            (Binary, false, b""),
            (Cont, false, b""),
            (Cont, true, b"")
        ]));
        assert!(!ends(&[(Binary, false, b"ab"), (Cont, true, b"")]));
        assert!(!ends(&[(Binary, false, b""), (Cont, true, b"cd")]));
        assert!(!ends(&[(Binary, true, b"ab")]));
    }

    #[test]
    fn text_must_be_utf8_across_frames_and_reads() {
        use Opcode::{Binary, Continuation as Cont, Text};
        let key = Some([5, 6, 7, 8]);
        let scan =
            |s: &mut FrameScanner, w: &mut Vec<u8>| s.scan(w, Some(&mut MaskKeys::default()));
        // "€" split between two frames, the second frame split between two
        // reads: fine.
        let euro = "\u{20ac}".as_bytes();
        let mut s = FrameScanner::new(Sender::Client, 100);
        let mut wire = frame(Text, false, &[b'a', euro[0]], key);
        wire.extend(frame(Cont, true, &euro[1..], key));
        let (mut first, mut second) = (
            wire[..wire.len() - 1].to_vec(),
            wire[wire.len() - 1..].to_vec(),
        );
        assert_eq!(scan(&mut s, &mut first).violation, None);
        let last = scan(&mut s, &mut second);
        assert_eq!((last.violation, last.frames_done), (None, 1));

        // A good frame, then a text frame that is not UTF-8: the good one is
        // ready, nothing of the bad one.
        let mut s = FrameScanner::new(Sender::Client, 100);
        let mut wire = frame(Binary, true, b"\xff\xfe audio is not text", key);
        let good = wire.len();
        wire.extend(frame(Text, true, b"{\"type\":\xc3\x28}", key));
        let got = scan(&mut s, &mut wire);
        assert_eq!(
            (
                got.ready,
                got.frames_done,
                got.data_frames_started,
                got.violation
            ),
            (good, 1, 1, Some(FrameError::InvalidUtf8))
        );

        // A message that ends inside a character, on an empty last frame.
        let mut s = FrameScanner::new(Sender::Client, 100);
        let mut wire = frame(Text, false, &euro[..2], key);
        let open = wire.len();
        wire.extend(frame(Cont, true, b"", key));
        let got = scan(&mut s, &mut wire);
        assert_eq!(
            (got.ready, got.violation),
            (open, Some(FrameError::InvalidUtf8))
        );

        // Upstream's text is checked the same way: a character split
        // between frames is fine, a byte no character has is not.
        let mut s = FrameScanner::new(Sender::Server, 100);
        let mut wire = frame(Text, false, &[b'a', euro[0]], None);
        wire.extend(frame(Cont, true, &euro[1..], None));
        let good = wire.len();
        wire.extend(frame(Text, true, b"\xff", None));
        let got = s.scan(&mut wire, None);
        assert_eq!(
            (got.ready, got.violation),
            (good, Some(FrameError::InvalidUtf8))
        );
        assert_eq!(FrameError::InvalidUtf8.close_code(), 1007);
    }

    #[test]
    fn close_frames_must_carry_a_sendable_code_and_a_utf8_reason() {
        // The client's, masked, and upstream's, not: one forwarded to the
        // other side must be one it can take.
        for (from, key) in [(Sender::Client, Some([5, 6, 7, 8])), (Sender::Server, None)] {
            close_frames_checked(from, key);
        }
    }

    /// A bad frame whose header is in the window is not ready, and the
    /// scanner then stands at the end of what is: between frames, with
    /// no message of the bad frame's open. (It stood inside the bad
    /// frame, so the relay thought the client mid-frame and sent it no
    /// error frame.)
    #[test]
    fn a_bad_frame_not_forwarded_leaves_the_scanner_at_the_boundary() {
        use crate::frame::build_fragment as frame;
        use Opcode::{Close, Text};
        for (bad, want) in [
            (frame(Close, true, b"\x03\xed", None), FrameError::BadClose),
            (frame(Close, true, b"\x03", None), FrameError::BadClose),
        ] {
            let mut wire = frame(Text, true, b"{}", None);
            let good = wire.len();
            wire.extend(bad);
            let mut s = FrameScanner::new(Sender::Server, 100);
            let scan = s.scan(&mut wire, None);
            assert_eq!((scan.ready, scan.violation), (good, Some(want)));
            assert!(s.at_boundary(), "{want:?}");
            assert_eq!(s.open_message(), None, "{want:?}");
        }
        // A client's text frame that is not UTF-8, after a good one.
        let key = Some([1, 2, 3, 4]);
        let mut wire = frame(Text, true, b"{}", key);
        let good = wire.len();
        wire.extend(frame(Text, true, b"\xc3\x28", key));
        let mut s = FrameScanner::new(Sender::Client, 100);
        let scan = s.scan(&mut wire, Some(&mut MaskKeys::default()));
        assert_eq!(
            (scan.ready, scan.violation),
            (good, Some(FrameError::InvalidUtf8))
        );
        assert!(s.at_boundary());
        assert_eq!(s.open_message(), None);
    }

    fn close_frames_checked(from: Sender, key: Option<[u8; 4]>) {
        use Opcode::{Binary, Close};
        // (payload, violation), each after a good audio frame.
        let cases: [(&[u8], Option<FrameError>); 10] = [
            (b"", None),
            (b"\x03\xe8", None),                       // 1000
            (b"\x03\xe8bye \xe2\x82\xac", None),       // 1000, a reason with a euro sign
            (b"\x0f\xa0app", None),                    // 4000
            (b"\x03", Some(FrameError::BadClose)),     // a 1-byte body
            (b"\x03\xed", Some(FrameError::BadClose)), // 1005, never sent
            (b"\x03\xe7", Some(FrameError::BadClose)), // 999
            (b"\x07\xd0", Some(FrameError::BadClose)), // 2000
            (b"\x13\x88", Some(FrameError::BadClose)), // 5000
            (b"\x03\xe8\xc3\x28", Some(FrameError::InvalidUtf8)),
        ];
        for (payload, want) in cases {
            let mut wire = frame(Binary, true, b"audio", key);
            let good = wire.len();
            wire.extend(frame(Close, true, payload, key));
            // Whole, and cut after each byte of the close frame.
            for cut in [wire.len()].into_iter().chain(good + 1..wire.len()) {
                let mut s = FrameScanner::new(from, 100);
                let (mut a, mut b) = (wire[..cut].to_vec(), wire[cut..].to_vec());
                let first = s.scan(&mut a, Some(&mut MaskKeys::default()));
                let (violation, close) = match first.violation {
                    Some(e) => (Some(e), false),
                    None if b.is_empty() => (None, first.close_done),
                    None => {
                        // What the first read left (a partial header) comes first.
                        let mut rest = a[first.ready..].to_vec();
                        rest.append(&mut b);
                        let second = s.scan(&mut rest, Some(&mut MaskKeys::default()));
                        (second.violation, second.close_done)
                    }
                };
                assert_eq!(violation, want, "{from:?} {payload:?} cut at {cut}");
                assert_eq!(close, want.is_none(), "{from:?} {payload:?} cut at {cut}");
                if from == Sender::Server {
                    assert_eq!(close_body_ok(payload), want.is_none(), "{payload:?}");
                }
                if cut == wire.len() && want.is_some() {
                    assert_eq!(first.ready, good, "nothing of a bad close is sent");
                }
            }
        }
    }
}
