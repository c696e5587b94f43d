//! The frame path: the two loops that move a stream's frames after the
//! handshake, and the scanner that walks frames in place.
//!
//! Client→upstream: read into the stream's pooled buffer, walk the frame
//! headers where they lie, give each frame a fresh mask key by XOR-ing its
//! payload once with `client key ⊕ fresh key` and overwriting the 4 key bytes
//! in the header, then write the processed bytes, headers and payloads
//! together, in one write. Upstream→client: walk the headers (to validate,
//! count and find the close frame) and write the bytes as they were read.
//!
//! A frame's header and payload are contiguous in the buffer, so every write
//! is one contiguous region; a payload larger than the buffer streams through
//! in pieces (the scanner keeps the mask phase across reads). Nothing on this
//! path allocates, locks, or touches an atomic.

use std::cell::RefCell;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::core::keyring::{AccountState, RateScope};
use crate::core::metrics::{Hist, ShardMetrics};
use crate::core::secret::Redactor;
use crate::dataplane::buf::Buf;
use crate::dataplane::io::Duplex;
use crate::dataplane::uring::CloseReply;
use clio_frame::frame::{parse_header, FrameError, Opcode, Sender};
use clio_frame::mask::MaskKeys;
use clio_frame::scanner::FrameScanner;

/// How a stream's pumping ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Upstream sent a close frame and it reached the client: the normal end.
    UpstreamClosed,
    /// The client's close frame went upstream; the stream ends when upstream answers it.
    ClientClosed,
    /// The client's connection ended (EOF, reset, write failure) without a close handshake.
    ClientGone,
    /// The client broke the protocol.
    ClientProtocol(FrameError),
    /// The upstream connection ended without a close frame, or failed.
    UpstreamGone,
    /// Upstream broke the protocol.
    UpstreamProtocol(FrameError),
    /// Upstream failed mid-stream with this error (500, 503; or refused a
    /// resumed connection) and the stream can resume on a new connection.
    Resume(u16, RateScope),
    /// Upstream's first message was this error code (401, 402, 429, 500,
    /// 503) and all the stream sent it is still in the replay copy (or
    /// nothing went up): the stream can move to another account.
    Retry(u16, RateScope),
    /// No frame in either direction for the idle timeout.
    Idle,
    /// A write upstream waited the whole idle timeout: upstream stopped
    /// reading. Ended (or resumed) as an upstream failure.
    UpstreamStalled,
    /// A write upstream waited the stall timeout, but a write to the
    /// client was waiting before it began, and still is: the client
    /// stopped reading its results (and went on sending), so the relay
    /// stopped reading upstream, and upstream, its own socket full,
    /// stopped reading the audio. Or, after the client's end of audio,
    /// nothing moved for the idle timeout while a write to the client
    /// waited. The client's failure: not resumed, not held against
    /// upstream.
    ClientStalled,
    /// The client's audio had ended and upstream sent nothing for the
    /// idle timeout (no `finished`): the client waits on upstream, so
    /// ended (or resumed) as an upstream failure, not as an idle client.
    UpstreamSilent,
    /// The relay ended the stream: a device limit was reached mid-stream
    /// or the device was revoked.
    Stopped(crate::core::devices::Limit),
    /// The relay is shutting down: finalize, deliver, then "reconnect".
    Drain,
    /// The stream's key was retired (its rotation's overlap ended): a
    /// raw-audio stream moves to a current key by a resume; any other
    /// ends as a drain does, with its own message.
    KeyRetired,
}

/// Client→upstream state that must survive a retry on another account:
/// bytes already re-masked but not yet written are not re-masked again.
#[derive(Debug)]
pub struct ClientSide {
    /// The scanner (mask phase of a frame split across reads).
    pub scanner: FrameScanner,
    /// Bytes at the front of the buffer already scanned and re-masked.
    pub processed: usize,
    /// The client's close frame has gone upstream.
    pub close_seen: bool,
    /// The config message for a new upstream connection, not yet written:
    /// it goes up in the same send as the client frames already read. After
    /// a failover it carries the replay copy too.
    pub config_frame: Option<Vec<u8>>,
    /// Open-time replay copy: every byte written upstream after the config
    /// (frames as re-masked), kept until upstream accepts the stream or the
    /// copy would pass `replay_limit`. `None` once let go.
    pub replay: Option<Vec<u8>>,
    /// `failover.replay_bytes`.
    pub replay_limit: usize,
}

impl ClientSide {
    /// Where a wait for the client's close reply starts: after the frames
    /// already scanned, with the bytes of `buf` not yet scanned read.
    pub fn close_reply(&self, buf: &mut Buf) -> CloseReply {
        let mut reply = CloseReply::after(self.scanner.remaining());
        reply.feed(&buf.filled()[self.processed..]);
        reply
    }

    /// A client side for frames up to `max_frame` bytes, keeping a replay
    /// copy of up to `replay_limit` bytes (0: none).
    pub fn new(max_frame: u64, replay_limit: usize) -> Self {
        ClientSide {
            scanner: FrameScanner::new(clio_frame::frame::Sender::Client, max_frame),
            processed: 0,
            close_seen: false,
            config_frame: None,
            replay: (replay_limit > 0).then(Vec::new),
            replay_limit,
        }
    }

    /// Adds `sent` (bytes just written upstream) to the replay copy, or
    /// lets the copy go when upstream has accepted the stream or the copy
    /// would pass its bound. One flag test once the copy is gone.
    #[inline]
    fn keep_for_replay(&mut self, sent: &[u8], state: &StreamState) {
        if !state.up.replayable.get() {
            return;
        }
        let limit = self.replay_limit;
        match &mut self.replay {
            Some(r) if !state.down.accepted.get() && r.len() + sent.len() <= limit => {
                let need = r.len() + sent.len();
                if need > r.capacity() {
                    // Grow by doubling but never past the bound.
                    let want = need.max(r.capacity() * 2).min(limit);
                    r.reserve_exact(want - r.len());
                }
                r.extend_from_slice(sent);
            }
            _ => {
                self.replay = None;
                state.up.replayable.set(false);
            }
        }
    }
}

/// What a stream's pumps work with besides their sockets: the stream's
/// shared state, and its shard's mask keys and metrics.
#[derive(Debug, Clone, Copy)]
pub struct StreamCx<'a> {
    /// The stream's state, shared by its pumps.
    pub state: &'a StreamState,
    /// The shard's mask keys (client→upstream frames are re-masked).
    pub masks: &'a RefCell<MaskKeys>,
    /// The shard's metrics.
    pub metrics: &'a ShardMetrics,
    /// The connection's account (its metrics index; marked when upstream
    /// accepts the stream).
    pub account: &'a AccountState,
    /// Overwrites the account key the connection was opened with in
    /// upstream's bytes: it is never passed on to the client, should
    /// upstream echo it (the key's own, built once for every stream on it).
    pub redactor: &'a Redactor,
}

/// One direction of a stream: bytes are read from `from` into `buf` and
/// written to `to`.
#[derive(Debug)]
pub struct Link<'a> {
    /// The socket read from.
    pub from: &'a Duplex,
    /// The socket written to.
    pub to: &'a Duplex,
    /// The read buffer of `from`.
    pub buf: &'a mut Buf,
}

/// Moves client frames upstream until the client closes (its close frame is
/// forwarded: [`End::ClientClosed`]), vanishes or misbehaves. Resumable: all
/// its state is in `link.buf` and `side`.
pub async fn client_to_upstream(link: Link<'_>, side: &mut ClientSide, cx: StreamCx<'_>) -> End {
    let Link {
        from: client,
        to: upstream,
        buf,
    } = link;
    let StreamCx {
        state,
        masks,
        metrics,
        ..
    } = cx;
    let mut read_at = Instant::now();
    if side.close_seen {
        return End::ClientClosed;
    }
    loop {
        let processed = side.processed;
        let scan = match state.resume.borrow_mut().as_deref_mut() {
            Some(r) if r.keeps_copy() => {
                r.reserve_for(buf.len() - processed);
                let scan = side.scanner.scan_capture(
                    &mut buf.filled()[processed..],
                    &mut masks.borrow_mut(),
                    &mut r.capture,
                );
                r.absorb_capture();
                scan
            }
            _ => side.scanner.scan(
                &mut buf.filled()[processed..],
                Some(&mut masks.borrow_mut()),
            ),
        };
        side.processed += scan.ready;
        // Audio is binary payload: a keepalive or other control message
        // (text) and the empty end of audio start no first-result clock.
        if scan.binary_bytes > 0 && state.up.first_audio_at.get().is_none() {
            state.up.first_audio_at.set(Some(read_at));
        }
        let config = side.config_frame.take();
        if side.processed > 0 {
            let n = side.processed;
            state.up.at_boundary.set(false);
            state.up.write_since.set(Some(read_at));
            state.up.behind_client.set(state.down.writing());
            let written = match &config {
                Some(c) => upstream.write_two(c, &buf.filled()[..n]).await,
                None => {
                    upstream
                        .write_all_noting(&buf.filled()[..n], &state.up.write_since)
                        .await
                }
            };
            if written.is_err() {
                return End::UpstreamGone;
            }
            state.up.write_since.set(None);
            state.up.at_boundary.set(side.scanner.at_boundary());
            side.keep_for_replay(&buf.filled()[..n], state);
            buf.consume(n);
            side.processed = 0;
            if scan.frames_done > 0 {
                let took = read_at.elapsed().as_nanos() as u64;
                for _ in 0..scan.frames_done {
                    metrics.record(Hist::FrameClientToUpstream, took);
                }
            }
            metrics.frames_client_to_upstream(scan.frames_done as u64, n as u64);
            state.meter.add_up(n as u64);
        } else if let Some(c) = &config {
            state.up.at_boundary.set(false);
            state.up.write_since.set(Some(read_at));
            state.up.behind_client.set(state.down.writing());
            if upstream
                .write_all_noting(c, &state.up.write_since)
                .await
                .is_err()
            {
                return End::UpstreamGone;
            }
            state.up.write_since.set(None);
            state.up.at_boundary.set(side.scanner.at_boundary());
        }
        if scan.end_of_audio {
            state.up.audio_ended.set(true);
        }
        if scan.binary_bytes > 0 && !state.meter.count_audio(scan.binary_bytes) {
            return End::Stopped(crate::core::devices::Limit::DailyAudio);
        }
        if let Some(e) = scan.violation {
            return End::ClientProtocol(e);
        }
        if scan.close_done {
            side.close_seen = true;
            state.up.client_closed.set(true);
            return End::ClientClosed;
        }
        match read_more(buf, client, state).await {
            Some(at) => read_at = at,
            None => return End::ClientGone,
        }
    }
}

/// The upstream→client pump the stream needs: [`resume::upstream_to_client`]
/// for a raw-audio stream that can resume, else [`upstream_to_client`].
pub async fn upstream_to_client_any(
    link: Link<'_>,
    scanner: &mut FrameScanner,
    cx: StreamCx<'_>,
) -> End {
    if cx.state.resume.borrow().is_some() {
        resume::upstream_to_client(link, scanner.max_payload(), cx).await
    } else {
        upstream_to_client(link, scanner, cx).await
    }
}

/// Moves upstream frames to the client as read, until upstream closes or
/// fails. Holds back upstream's first message until it is whole, to see
/// whether it is an account error the stream can still recover from (see
/// [`StreamState::retry_allowed`]).
pub async fn upstream_to_client(
    link: Link<'_>,
    scanner: &mut FrameScanner,
    cx: StreamCx<'_>,
) -> End {
    let Link {
        from: upstream,
        to: client,
        buf,
    } = link;
    let StreamCx {
        state,
        metrics,
        account,
        redactor,
        ..
    } = cx;
    let down = &state.down;
    let mut read_at = Instant::now();
    loop {
        // The bytes this turn passes on: all that was read, but only a
        // ping or pong that comes before upstream's first message (which
        // is still to be looked at).
        let mut window = usize::MAX;
        if down.inspect_first.get() && !buf.is_empty() {
            match first_message_error(buf.filled()) {
                FirstMessage::Incomplete if buf.end() < buf.capacity() || buf.start() > 0 => {
                    match read_more(buf, upstream, state).await {
                        Some(at) => {
                            read_at = at;
                            continue;
                        }
                        None => return End::UpstreamGone,
                    }
                }
                // Closed before a first message (a server going away):
                // as a connection lost at open, the stream can still move.
                FirstMessage::Closed if state.retry_allowed() => return End::UpstreamGone,
                FirstMessage::Error(code, scope) => {
                    down.inspect_first.set(false);
                    down.first_error.set(Some((code, scope)));
                    if matches!(code, 401 | 402 | 429 | 500 | 503) && state.retry_allowed() {
                        return End::Retry(code, scope);
                    }
                }
                FirstMessage::Closed => {
                    // Nothing upstream transcribed: not billed.
                    down.inspect_first.set(false);
                    down.accepted.set(true);
                }
                // A ping or pong is no message: it goes on alone, and the
                // frame after it is the first message.
                FirstMessage::Control(n) => window = n,
                _ => {
                    down.inspect_first.set(false);
                    if down.accept() {
                        account.mark_ok();
                    }
                }
            }
        }
        // Bytes at the front already scanned and held back: they may be
        // the start of the key, which this read's bytes complete.
        let held = usize::from(down.held.get());
        let filled = buf.filled();
        let end = filled.len().min(window);
        // A copy of the key, also one the last read cut (its start held).
        redactor.redact(&mut filled[..end]);
        // Every text message is looked at (for `<fin>`, and `finished`
        // and error figures), also one that a read cut or that shares a
        // read with others: in place, as the scanner walks it.
        let mut scan = scanner.scan_text(&mut filled[held..end], &mut Noted(state));
        // A read that ends inside a frame's payload may end inside the
        // key: what could be its start waits for the rest of the frame
        // (the next read, where the redaction sees it whole). A frame all
        // here goes whole; held bytes of one that never ends (upstream
        // gone, or a protocol error in it) never reach the client, which
        // could not read that frame anyway.
        let keep = if scanner.at_boundary() {
            0
        } else {
            redactor.cut_tail(&filled[..held + scan.ready])
        };
        down.held.set(keep as u16);
        // What goes now: the bytes held before and those just scanned,
        // less the ones kept back.
        scan.ready = held + scan.ready - keep;
        if scan.ready > 0 {
            down.at_boundary.set(false);
            down.write_since.set(Some(read_at));
            if client
                .write_all_noting(&buf.filled()[..scan.ready], &down.write_since)
                .await
                .is_err()
            {
                return End::ClientGone;
            }
            down.write_since.set(None);
            // Held bytes that start a frame leave the client between
            // frames, seen as inside one: the relay writes none of its own.
            down.at_boundary.set(scanner.at_boundary());
            down.mid_message.set(scanner.open_message().is_some());
            buf.consume(scan.ready);
            if scan.frames_done > 0 {
                let took = read_at.elapsed().as_nanos() as u64;
                for _ in 0..scan.frames_done {
                    metrics.record(Hist::FrameUpstreamToClient, took);
                }
                // An error upstream sent (noted as the scanner walked it)
                // is no result: the stream then has none.
                if !down.first_result_seen.get()
                    && scan.data_frames_started > 0
                    && state.meter.upstream_error().is_none()
                {
                    if let Some(t0) = state.up.first_audio_at.get() {
                        down.first_result_seen.set(true);
                        metrics
                            .first_result(account.metrics_index, t0.elapsed().as_micros() as u64);
                    }
                }
            }
            metrics.frames_upstream_to_client(scan.frames_done as u64, scan.ready as u64);
            state.meter.add_down(scan.ready as u64);
        }
        if let Some(e) = scan.violation {
            return End::UpstreamProtocol(e);
        }
        if scan.close_done {
            return End::UpstreamClosed;
        }
        if window != usize::MAX && !buf.is_empty() {
            continue; // the first message may be here already
        }
        match read_more(buf, upstream, state).await {
            Some(at) => read_at = at,
            None => return End::UpstreamGone,
        }
    }
}

/// Hands the upstream text messages the scanner walks to the stream's
/// state ([`StreamState::note_upstream_piece`]).
struct Noted<'a>(&'a StreamState);

impl clio_frame::scanner::TextSink for Noted<'_> {
    #[inline]
    fn text(&mut self, piece: &[u8], starts: bool, ends: bool) {
        self.0.note_upstream_piece(piece, starts, ends);
    }
}

/// Reads more of `conn` into `buf` (after moving what is left to its
/// front) and marks the stream active. Returns when the bytes arrived, or
/// `None` once `conn` has ended or failed.
///
/// Over TLS a record's bytes arrive before any of it can be read: each
/// wake-up that brought some marks the stream active too, so a record
/// that comes slowly is not silence (`limits.idle_timeout` counts any
/// byte, of a frame still arriving too).
pub(crate) async fn read_more(
    buf: &mut Buf,
    conn: &Duplex,
    state: &StreamState,
) -> Option<Instant> {
    buf.compact();
    let read = if conn.is_tls() {
        let mut seen = conn.received();
        let mut read = std::pin::pin!(buf.read_from(conn));
        std::future::poll_fn(|cx| {
            let r = read.as_mut().poll(cx);
            if r.is_pending() && conn.received() != seen {
                seen = conn.received();
                state.last_activity.set(Instant::now());
            }
            r
        })
        .await
    } else {
        // A plain read gives every byte as it comes.
        buf.read_from(conn).await
    };
    match read {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            let at = Instant::now();
            state.last_activity.set(at);
            Some(at)
        }
    }
}

enum FirstMessage {
    /// The first message is not all here yet.
    Incomplete,
    /// A whole text message carrying `error_code` (and, for 429, its level).
    Error(u16, RateScope),
    /// A whole close frame (whether its body is one an endpoint may send
    /// is the scanner's to check, if it goes on to the client).
    Closed,
    /// A whole ping or pong of this many bytes: not a message, so the
    /// first message is the frame after it.
    Control(usize),
    /// Anything else (a result, a control frame, a frame too big to hold).
    Other,
}

/// Looks at the upstream frame at the start of `bytes`: the only upstream
/// message the relay parses, once per stream.
fn first_message_error(bytes: &[u8]) -> FirstMessage {
    let h = match parse_header(bytes, Sender::Server, u64::MAX >> 1) {
        Ok(Some(h)) => h,
        Ok(None) => return FirstMessage::Incomplete,
        Err(_) => return FirstMessage::Other,
    };
    let total = h.header_len as u64 + h.payload_len;
    let whole = (bytes.len() as u64) >= total;
    if h.opcode.is_control() {
        return match (whole, h.opcode) {
            (false, _) => FirstMessage::Incomplete,
            (true, Opcode::Close) => FirstMessage::Closed,
            (true, _) => FirstMessage::Control(total as usize),
        };
    }
    if h.opcode != Opcode::Text {
        return FirstMessage::Other;
    }
    if !h.fin {
        return fragmented_first_message(bytes);
    }
    if !whole {
        return FirstMessage::Incomplete;
    }
    error_in(&bytes[h.header_len..total as usize])
}

/// [`first_message_error`] for a first message sent in fragments (RFC 6455
/// allows it, and a gateway in front of upstream may do it): looked at
/// once its last fragment is in, joined into a copy (at most the read
/// buffer's bytes, once per stream). A ping or pong between fragments is
/// held with them. Fragments out of order, or a close among them, are the
/// scanner's to judge: [`FirstMessage::Other`].
fn fragmented_first_message(bytes: &[u8]) -> FirstMessage {
    // Whether all of it is here first, copying nothing: a read that ends
    // inside it comes back here with the next one.
    if let Err(not_whole) = walk_fragments(bytes, |_| {}) {
        return not_whole;
    }
    let mut text = Vec::new();
    let _ = walk_fragments(bytes, |piece| text.extend_from_slice(piece));
    error_in(&text)
}

/// Walks the text message in fragments at the start of `bytes` (a ping or
/// pong among them passed over), handing each fragment's payload to
/// `piece`, up to its last. `Err` with what [`first_message_error`] says
/// when it is not all here, or not fragments in order.
fn walk_fragments(bytes: &[u8], mut piece: impl FnMut(&[u8])) -> Result<(), FirstMessage> {
    let mut at = 0;
    loop {
        let h = match parse_header(&bytes[at..], Sender::Server, u64::MAX >> 1) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(FirstMessage::Incomplete),
            Err(_) => return Err(FirstMessage::Other),
        };
        let total = h.header_len as u64 + h.payload_len;
        if ((bytes.len() - at) as u64) < total {
            return Err(FirstMessage::Incomplete);
        }
        let end = at + total as usize;
        let expected = if at == 0 {
            Opcode::Text
        } else {
            Opcode::Continuation
        };
        match h.opcode {
            Opcode::Ping | Opcode::Pong => {}
            op if op == expected => {
                piece(&bytes[at + h.header_len..end]);
                if h.fin {
                    return Ok(());
                }
            }
            _ => return Err(FirstMessage::Other),
        }
        at = end;
    }
}

/// Whether a whole first message is an error, and which.
fn error_in(payload: &[u8]) -> FirstMessage {
    // A byte search first: the JSON is parsed only for an error.
    if state::ERROR_CODE.find(payload).is_none() {
        return FirstMessage::Other;
    }
    match state::upstream_said(payload).and_then(|s| s.error) {
        Some((code, scope)) => FirstMessage::Error(code, scope),
        None => FirstMessage::Other,
    }
}

/// Ends with [`End::UpstreamStalled`] once a write upstream has waited
/// `stall` (upstream stopped reading: the client, whose frames the relay
/// can no longer take, is not to blame), or with [`End::Idle`] once nothing
/// has moved either way for `idle` (a write waiting then is a stall too,
/// and so is silence after the client's end of audio: [`End::UpstreamSilent`]).
/// A stall is [`End::ClientStalled`] instead when a write to the client
/// was waiting when the write upstream began, and still is: upstream
/// stopped reading because the client did. So is the quiet after the
/// client's end of audio while a write to the client waits: the relay
/// reads nothing from upstream because the client reads nothing. And
/// once the stream is ending (the client's close or its end of audio has
/// gone up, or upstream's last word, `finished` or an error, has been
/// read), a write to the client that has waited `stall` ends the stream
/// as [`End::ClientStalled`] too: the client sends nothing more, and
/// upstream's last results and its close (or its answer to the client's)
/// wait behind results the client does not read, so nothing else would
/// end the stream before `idle`.
///
/// It shares its task with the pumps, so it is polled on every frame's
/// wake-up. A glommio timer re-registers itself in the reactor's timer map
/// each time it is polled; this one is polled once to register the task's
/// waker and then only when its deadline has passed, or when a write
/// upstream began whose stall deadline comes first (one clock read per
/// wake-up instead of a remove and an insert).
pub async fn idle_watch(state: &StreamState, idle: Duration, stall: Duration) -> End {
    loop {
        let now = Instant::now();
        let idle_at = state.last_activity.get() + idle;
        let up_since = state.up.write_since.get();
        if up_since.is_some_and(|s| now >= s + stall) {
            return stall_of(state);
        }
        let down_since = write_after_the_end(state);
        if down_since.is_some_and(|s| now >= s + stall) {
            return End::ClientStalled;
        }
        let stall_at = match (up_since, down_since) {
            (Some(u), Some(d)) => Some(u.min(d) + stall),
            (u, d) => u.or(d).map(|s| s + stall),
        };
        if now >= idle_at {
            return match up_since {
                Some(since) if since + idle <= now => stall_of(state),
                // Nothing read from upstream because its results wait on
                // a client that does not read them: not upstream's silence.
                _ if state.up.audio_ended.get() && state.down.writing() => End::ClientStalled,
                _ if state.up.audio_ended.get() => End::UpstreamSilent,
                _ => End::Idle,
            };
        }
        let deadline = stall_at.map_or(idle_at, |at| at.min(idle_at));
        let mut timer = glommio::timer::Timer::new(deadline - now);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if armed && Instant::now() < deadline {
                // A write upstream that began since (or one to a client
                // that has nothing more to send): look again.
                let sooner = [state.up.write_since.get(), write_after_the_end(state)]
                    .into_iter()
                    .flatten()
                    .any(|s| s + stall < deadline);
                return if sooner {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                };
            }
            armed = true;
            std::pin::Pin::new(&mut timer).poll(cx).map(|_| ())
        })
        .await;
    }
}

/// Since when a write to the client has waited, if the stream is ending:
/// the client's close or its end of audio has gone up, or upstream's last
/// word (`finished`, or an error) has been read. Such a write is bounded
/// by the stall timeout: the client owes nothing more that would show it
/// is still there, and what upstream still owes waits behind this write.
fn write_after_the_end(state: &StreamState) -> Option<Instant> {
    state.down.write_since.get().filter(|_| {
        state.up.client_closed.get()
            || state.up.audio_ended.get()
            || state.down.last_word_seen.get()
    })
}

/// Whose stall it is: the client's when its results were waiting before
/// the audio upstream was, and still are. A function, not a closure: one
/// kept in [`idle_watch`]'s future would take room in every stream's task.
fn stall_of(state: &StreamState) -> End {
    if state.up.behind_client.get() && state.down.writing() {
        End::ClientStalled
    } else {
        End::UpstreamStalled
    }
}

/// Waits until `deadline`.
///
/// The stream's own deadlines share its task with the pumps, so they are
/// polled on every frame's wake-up. A glommio timer re-registers itself in
/// the reactor's timer map each time it is polled (a remove, an insert and
/// a waker clone); this one is polled once to register the task's waker
/// and then only when its deadline has passed: one clock read per wake-up.
pub async fn until(deadline: Instant) {
    let now = Instant::now();
    if now >= deadline {
        return;
    }
    let mut timer = glommio::timer::Timer::new(deadline - now);
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if armed && Instant::now() < deadline {
            return std::task::Poll::Pending;
        }
        armed = true;
        std::pin::Pin::new(&mut timer).poll(cx).map(|_| ())
    })
    .await
}

pub mod copy_budget;
pub mod resume;
mod state;

pub use state::{DownHalf, FinSearch, Meter, StreamState, UpHalf, JOINED_TEXT_MAX};

#[cfg(test)]
mod tests;
