//! `fake-soniox`: a local stand-in for Soniox's real-time speech-to-text
//! WebSocket API (`/transcribe-websocket`), for tests and load runs.
//!
//! It follows Soniox's real-time protocol as the relay sees it: the API key may arrive as
//! `Authorization: Bearer`, in the subprotocol list `soniox-api-key, <key>`, or
//! as `api_key` in the first (config) message; audio is binary frames; results
//! carry final and non-final tokens; an empty frame ends the audio and is
//! answered by `finished` and a close; errors are one Soniox-shaped message and
//! a close. Faults (slow handshake, abrupt drop, injected error, the
//! `<fin>` result cut across writes or sharing one) are opt-in.
//!
//! The same listener (same port, plain or TLS) also answers Soniox's REST
//! API: a request without `Upgrade: websocket` is served as plain HTTP/1.1
//! (see "REST API" below).
//!
//! # Layout
//! - `server`: executors (one per shard, each with its own `SO_REUSEPORT`
//!   listener), TLS, and the upgrade-time checks (path, key, concurrency).
//! - `session`: one upgraded connection: config message, audio, control
//!   messages, idle timeout, faults, and how a session ends.
//! - `transcript`: the audio clock and the deterministic words it turns into.
//! - `rest`: the REST endpoints, on the same connections as the upgrade.
//!
//! # Endings
//! After an error or `finished` the fake sends close 1000 and waits up to 2 s
//! for the client's close reply before dropping the connection. A client
//! close frame ends the session at once (the reply is sent, then the socket
//! is dropped). A stalled session (the stall fault) ends when its peer
//! closes or resets the connection; its slot is free from that moment,
//! before its task notices. Every ending frees the key's concurrency slot.
//!
//! # Transcript model
//! The fake does not recognise speech. It keeps an audio clock and emits one
//! final word (cycling through "the quick brown fox jumps over the lazy dog")
//! for every `ms_per_word` of audio. For raw formats the clock is exact
//! (`bytes / (sample_rate * num_channels * bytes_per_sample)`); for containers
//! and `auto` it assumes 16 000 bytes per second (128 kbit/s, a typical
//! compressed bitrate), since the fake does not decode them.
//!
//! # REST API
//! Base URL [`FakeSoniox::rest_url`] (`http://127.0.0.1:PORT/v1`, or
//! `https://localhost:PORT/v1` with TLS). HTTP/1.1 with keep-alive
//! (`Connection: close` is honoured); request bodies need `Content-Length`.
//! Every call needs `Authorization: Bearer <key>` with one of the configured
//! keys (temporary keys are for WebSocket sessions only, as at Soniox).
//! Errors carry Soniox's REST error body
//! `{"status_code":401,"error_type":"unauthenticated","message":"Invalid API key.","request_id":"..."}`.
//! Checks, in order: the [`Faults::rest_status`] switch (see
//! [`FakeSoniox::set_rest_status`]) answers every call with its status; an
//! unknown path is 404 and a known path with the wrong method 405; a missing
//! or unknown key is 401; a key with `reject: Some(code)` (see
//! [`FakeSoniox::set_key_reject`]) gets `code` (e.g. 402) on every endpoint.
//! Every call is recorded in [`FakeSoniox::rest_calls`].
//!
//! - `GET /v1/models` → `{"models":[{"id":"stt-rt-v4","name":...,"transcription_mode":"real_time","languages":[...]},...]}`:
//!   the models the WebSocket accepts.
//! - `GET /v1/concurrency-limits` →
//!   `{"project":{"current":{"transcribe_concurrent":N},"limits":{"transcribe_concurrent":M}},"organization":{...same shape...}}`.
//!   The fake has one project per key: `project` is the key's live WebSocket
//!   sessions (those opened with its temporary keys included) and its
//!   `max_concurrent`; `organization` sums the live sessions and the limits
//!   of all configured keys.
//! - `GET /v1/usage-logs[?limit=N&cursor=C]` →
//!   `{"logs":[{"id":"usage-7","client_reference_id":"abc"|null,"model":"stt-rt-v4"|null,"audio_duration_ms":2000,"created_at":"RFC 3339","status":"completed"|"error"},...],"next_page_cursor":"7"|null}`:
//!   the key's finished sessions (upgraded, authenticated and over, also
//!   via its temporary keys), oldest first. `audio_duration_ms` is the
//!   fake's audio clock; `client_reference_id` comes from the config message
//!   (else from the temporary key); `status` is `error` if the fake sent a
//!   Soniox error, else `completed`; `created_at` is when the connection
//!   arrived. `limit` is 1..=1000 (default 100); a non-null
//!   `next_page_cursor` is passed back as `cursor` for the next page.
//! - `GET /v1/usage/summary` → `{"audio_duration_ms":total,"sessions":count}`
//!   over the same sessions. This shape is the fake's own (Soniox's real
//!   summary reports cost, which the fake does not model).
//! - `POST /v1/auth/temporary-api-key` with
//!   `{"usage_type":"transcribe_websocket","expires_in_seconds":1..3600,"client_reference_id"?:"...","single_use"?:bool}`
//!   → `{"api_key":"temp:...","expires_at":"RFC 3339"}`. The key is valid for
//!   WebSocket sessions until it expires (401 after; a used `single_use` key
//!   is 401 too); its sessions count against, and are logged under, the
//!   parent key. `max_session_duration_seconds` is accepted and ignored.
//!
//! # Use
//! ```no_run
//! use fake_soniox::{FakeConfig, FakeSoniox};
//! use std::time::Duration;
//!
//! let fake = FakeSoniox::start(FakeConfig { record_audio: true, ..FakeConfig::default() })?;
//! // Point the relay (or any client) at `fake.url()` with key `fake-key-1`, then:
//! assert!(fake.wait_for(Duration::from_secs(5), |s| s.iter().all(|r| r.closed)));
//! assert!(fake.violations().is_empty());
//! # Ok::<(), std::io::Error>(())
//! ```
//! The binary `fake-soniox` runs the same server from the command line
//! (`fake-soniox --help`).

mod rest;
mod server;
mod session;
mod state;
mod transcript;

#[cfg(test)]
mod rest_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) use state::{error_type, refusal_message, Shared, Slot, State, TempKey, MODELS};

/// The final tokens the fake gives for `audio` (raw, `bytes_per_sec`)
/// sent in one stream and ended, as (text, start_ms, end_ms): the
/// fault-free transcript a test compares a relayed stream with.
pub fn transcript_of(
    audio: &[u8],
    bytes_per_sec: u64,
    ms_per_word: u32,
) -> Vec<(String, u64, u64)> {
    let mut t = transcript::Transcript::new(bytes_per_sec, ms_per_word);
    let mut tokens = t.push_audio(audio);
    tokens.extend(t.flush());
    tokens
        .into_iter()
        .filter(|t| t.is_final)
        .map(|t| (t.text, t.start_ms, t.end_ms))
        .collect()
}

/// Everything a [`FakeSoniox`] needs to run. `Default` gives a plain-`ws`
/// server on `127.0.0.1:0` with one key `fake-key-1` (10 concurrent streams).
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Address of the listener; tests use `127.0.0.1:0` and read [`FakeSoniox::addr`].
    pub listen: SocketAddr,
    /// The API keys the fake knows; any other key is refused with 401.
    pub keys: Vec<FakeKey>,
    /// `Some` serves `wss` with this TLS configuration, `None` plain `ws`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Number of glommio executors (threads), each with its own
    /// `SO_REUSEPORT` listener on the same port, so load spreads like on a
    /// real multi-core front end.
    pub shards: usize,
    /// Echo mode for load tests: every audio frame of at least 16 bytes is
    /// answered at once by a final token whose text is the lowercase hex of
    /// the frame's first 16 bytes (the load tool's sequence number and send
    /// time), so round-trip latency can be measured per frame.
    pub echo: bool,
    /// No audio or keepalive (or config message) for this long ends the
    /// session with error 408, as Soniox does.
    pub idle_timeout: Duration,
    /// One final word is emitted per this many milliseconds of audio.
    pub ms_per_word: u32,
    /// Injected failures.
    pub faults: Faults,
    /// Keep every session's audio bytes, for byte-for-byte checks in tests.
    /// Costs a lock per frame: leave off for load.
    pub record_audio: bool,
    /// Strings that must never reach Soniox (e.g. the relay's session tokens).
    /// Seen in the request head or in a text message, one is recorded in
    /// [`FakeSoniox::violations`] and the session ends with error 400
    /// "forbidden string" (an upgrade carrying one is still accepted, without
    /// checking its key, so that error can go out as a Soniox message).
    pub forbidden: Vec<String>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            keys: vec![FakeKey::new("fake-key-1", 10)],
            tls: None,
            shards: 1,
            echo: false,
            idle_timeout: Duration::from_secs(20),
            ms_per_word: 480,
            faults: Faults::default(),
            record_audio: false,
            forbidden: Vec::new(),
        }
    }
}

/// One API key the fake accepts.
#[derive(Debug, Clone)]
pub struct FakeKey {
    /// The key itself, as the client sends it.
    pub key: String,
    /// Live sessions allowed at once with this key (Soniox's project-level
    /// concurrency limit); one more is refused with 429.
    pub max_concurrent: u32,
    /// `Some(code)`: the key is known but always refused with this code
    /// (e.g. 402, balance exhausted), to test how the relay reports it.
    pub reject: Option<u16>,
}

impl FakeKey {
    /// A valid key allowing `max_concurrent` live sessions.
    pub fn new(key: &str, max_concurrent: u32) -> FakeKey {
        FakeKey {
            key: key.to_owned(),
            max_concurrent,
            reject: None,
        }
    }
}

/// Failures the fake can inject, to test the relay's upstream error paths.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Wait this long after the TCP (and TLS) accept before answering the upgrade.
    pub handshake_delay: Duration,
    /// Wait this long after the end of audio before the last words and
    /// `finished` (a slow finalization).
    pub finish_delay: Duration,
    /// When audio frame number N arrives, drop the TCP connection abruptly
    /// (RST, no close frame): "upstream dies".
    pub close_after_frames: Option<u64>,
    /// When audio frame number N arrives, send a Soniox error with this code
    /// instead of answering it, then close.
    pub error_after_frames: Option<(u64, u16)>,
    /// `Some(code)`: every REST call is answered with this status and
    /// Soniox's REST error body (e.g. 500 or 503), for the relay's health
    /// checks. Changed at run time by [`FakeSoniox::set_rest_status`].
    pub rest_status: Option<u16>,
    /// Keys accepted at the upgrade whose config message is answered with
    /// this Soniox error (401, 402, 429, ...): how Soniox refuses a key it
    /// only checks once the stream starts.
    pub refuse_at_first_message: Vec<(String, u16)>,
    /// A share of sessions fails at a random audio frame.
    pub random: Option<RandomFaults>,
    /// When audio frame N arrives, stop reading (and answering) for good,
    /// with the connection left open: a stalled upstream. The session,
    /// and its key's concurrency slot, ends when the peer closes or resets
    /// the connection.
    pub stall_after_frames: Option<u64>,
    /// How the answer to a `finalize` (the result with `<fin>`) goes out
    /// on the wire: whole in one write (the default), cut in two, or
    /// followed by another result in the same write.
    pub fin_delivery: FinDelivery,
}

/// How the fake writes the result that answers a `finalize` (see
/// [`Faults::fin_delivery`]). Every shape is valid WebSocket: a client
/// reading whole messages sees the same results; a reader of raw bytes
/// (the relay) sees them cut differently.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum FinDelivery {
    /// One frame in one write.
    #[default]
    Whole,
    /// One frame in two writes 50 ms apart, cut inside `<fin>` (after
    /// `<fi`): a reader gets the message in two reads.
    Split,
    /// The frame, then a result with no tokens (the same
    /// `final_audio_proc_ms` and `total_audio_proc_ms`), both in one write:
    /// the `<fin>` result is not the last message of its read.
    Trailed,
}

impl std::str::FromStr for FinDelivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "whole" => Ok(FinDelivery::Whole),
            "split" => Ok(FinDelivery::Split),
            "trailed" => Ok(FinDelivery::Trailed),
            _ => Err(format!(
                "fin delivery {s:?}: expected whole, split or trailed"
            )),
        }
    }
}

/// How [`Faults::random`] fails sessions: each session, on its config
/// message, is picked with probability `share`; a picked one fails with one
/// of `kinds` when audio frame N arrives, N uniform in `1..=within_frames`
/// (a session that ends sooner does not fail). The choice is a function of
/// `seed` and the session id, so a run can be repeated.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomFaults {
    /// Share of sessions that fail, 0.0 to 1.0.
    pub share: f64,
    /// What a failing session does (picked uniformly).
    pub kinds: Vec<FaultKind>,
    /// The failing frame is picked from `1..=within_frames`.
    pub within_frames: u64,
    /// Seed of the choices.
    pub seed: u64,
}

/// One way a session fails mid-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The TCP connection is dropped (RST, no close frame).
    Drop,
    /// A Soniox error with this code (500, 503), then close.
    Error(u16),
    /// Stops reading (and answering) for good, the connection left open
    /// until the peer closes or resets it (then the session ends).
    Stall,
    /// Breaks the protocol: a continuation frame with no message to
    /// continue, then the connection dropped.
    Violation,
    /// Closes with 1001 ("going away") and no message before it, as a
    /// server shutting down does.
    GoingAway,
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(FaultKind::Drop),
            "stall" => Ok(FaultKind::Stall),
            "violation" => Ok(FaultKind::Violation),
            "going-away" => Ok(FaultKind::GoingAway),
            _ => s
                .parse::<u16>()
                .ok()
                .filter(|c| (400..600).contains(c))
                .map(FaultKind::Error)
                .ok_or_else(|| {
                    format!(
                        "fault {s:?}: expected drop, stall, violation, going-away or an error code such as 503"
                    )
                }),
        }
    }
}

impl RandomFaults {
    /// The fault of session `id`, if it gets one: (audio frame, kind).
    pub fn pick(&self, id: u64) -> Option<(u64, FaultKind)> {
        if self.kinds.is_empty() || self.within_frames == 0 {
            return None;
        }
        let mut x = self.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let roll = (next() >> 11) as f64 / (1u64 << 53) as f64;
        if roll >= self.share {
            return None;
        }
        let kind = self.kinds[(next() % self.kinds.len() as u64) as usize];
        Some((1 + next() % self.within_frames, kind))
    }
}

/// One REST request the fake answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCall {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path without the query, e.g. `/v1/usage-logs`.
    pub path: String,
    /// The query string (without `?`), empty if none.
    pub query: String,
    /// The bearer key sent, if any (known or not).
    pub key: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// Where a session's API key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVia {
    /// `Authorization: Bearer <key>` on the upgrade request.
    Header,
    /// Subprotocol list `soniox-api-key, <key>` on the upgrade request.
    Subprotocol,
    /// Legacy `api_key` field of the first (config) message.
    FirstMessage,
}

/// What the fake saw and did on one connection that reached the upgrade.
#[derive(Clone, Debug, Default)]
pub struct SessionRecord {
    /// Sequential id, starting at 1; also in the `request_id` of errors.
    pub id: u64,
    /// Path and query of the upgrade request, as received.
    pub request_path: String,
    /// Headers of the upgrade request, in order (values lossily decoded).
    pub request_headers: Vec<(String, String)>,
    /// The key the session authenticated with (`None` if refused before).
    pub key: Option<String>,
    /// Where that key came from.
    pub auth_via: Option<AuthVia>,
    /// HTTP status if the upgrade itself was refused (401, 402, 404, 429).
    pub http_status: Option<u16>,
    /// The first (config) message, as parsed: without a member a JSON map
    /// cannot hold (a lone surrogate escape, `1e400`; see
    /// [`text_messages`](Self::text_messages) for the message as sent).
    pub config: Option<serde_json::Value>,
    /// Every text message received, in order, the config message included.
    pub text_messages: Vec<String>,
    /// Non-empty binary audio frames received.
    pub audio_frames: u64,
    /// Bytes in those frames.
    pub audio_bytes: u64,
    /// The audio payloads concatenated, only with [`FakeConfig::record_audio`].
    pub audio: Vec<u8>,
    /// The end-of-audio empty frame was received.
    pub empty_frame_received: bool,
    /// The `finished` message was sent.
    pub finished_sent: bool,
    /// Code of the Soniox error message sent, if any.
    pub error_sent: Option<u16>,
    /// The session is over, whichever way it ended.
    pub closed: bool,
    /// Close code of the client's close frame, if it sent one.
    pub client_close_code: Option<u16>,
    /// Audio received, in ms of the fake's audio clock (0 before the config
    /// message); what the REST usage endpoints report.
    pub audio_ms: u64,
    /// When the connection's request arrived.
    pub created_at: Option<SystemTime>,
}

/// A running fake server. Dropping it stops the executors and joins them.
pub struct FakeSoniox {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    /// Closing this channel tells every shard's accept loop to end.
    stop_tx: Option<async_channel::Sender<()>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl std::fmt::Debug for FakeSoniox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSoniox")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("shards", &self.threads.len())
            .finish()
    }
}

impl FakeSoniox {
    /// Starts the executors and returns once every shard is listening.
    pub fn start(cfg: FakeConfig) -> std::io::Result<FakeSoniox> {
        let shards = cfg.shards.max(1);
        let tls = cfg.tls.is_some();
        let listen = cfg.listen;
        let shared = Arc::new(Shared::new(cfg));
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        let mut fake = FakeSoniox {
            addr: listen,
            tls,
            shared: shared.clone(),
            stop_tx: Some(stop_tx),
            threads: Vec::with_capacity(shards),
        };
        for shard in 0..shards {
            // The first shard binds the given address (maybe port 0); the
            // others bind the port it got, sharing it through SO_REUSEPORT.
            let addr = if shard == 0 { listen } else { fake.addr };
            let (handle, bound) =
                server::spawn_shard(shard, addr, shared.clone(), stop_rx.clone())?;
            fake.threads.push(handle);
            if shard == 0 {
                fake.addr = bound;
            }
        }
        Ok(fake)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a client should connect to: `ws://127.0.0.1:PORT/transcribe-websocket`,
    /// or `wss://localhost:PORT/transcribe-websocket` with TLS (so a
    /// certificate for `localhost` validates).
    pub fn url(&self) -> String {
        if self.tls {
            format!("wss://localhost:{}/transcribe-websocket", self.addr.port())
        } else {
            format!("ws://{}/transcribe-websocket", self.addr)
        }
    }

    /// Records of all sessions so far, finished and live, in id order.
    /// Counters of live sessions may lag by a few frames.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.shared.lock().sessions.clone()
    }

    /// Waits until the session records satisfy `pred` (checked every few
    /// ms), at most `timeout`; returns whether they did. For tests that must
    /// see a session end (e.g. `closed`) before asserting on it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[SessionRecord]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if pred(&self.shared.lock().sessions) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One description per forbidden string seen (where it was, not the string).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// The REST calls answered so far, in order.
    pub fn rest_calls(&self) -> Vec<RestCall> {
        self.shared.lock().rest_calls.clone()
    }

    /// Base URL of the REST API: `http://127.0.0.1:PORT/v1`, or
    /// `https://localhost:PORT/v1` with TLS.
    pub fn rest_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}/v1", self.addr.port())
        } else {
            format!("http://{}/v1", self.addr)
        }
    }

    /// Changes a configured key's [`FakeKey::reject`] while the server runs
    /// (WebSocket and REST alike; live sessions are not touched), so a test
    /// can make a key go bad and recover. An unknown key is ignored.
    pub fn set_key_reject(&self, key: &str, reject: Option<u16>) {
        let mut st = self.shared.lock();
        if let Some(k) = st.keys.iter_mut().find(|k| k.key == key) {
            k.reject = reject;
        }
    }

    /// Makes every session of the configured key `key` (those opened with
    /// its temporary keys too), live or new, fail with `kind` at its next
    /// audio frame, until called again with `None`: an account that dies
    /// under its streams. Pair it with [`FakeSoniox::set_key_reject`] to
    /// refuse the key's new upgrades as well.
    pub fn fail_sessions_of(&self, key: &str, kind: Option<FaultKind>) {
        self.shared.fail_sessions_of(key, kind);
    }

    /// Sets (or with `None` clears) [`Faults::rest_status`] while the server runs.
    pub fn set_rest_status(&self, status: Option<u16>) {
        self.shared.lock().rest_status = status;
    }

    /// Sessions upgraded and not yet over.
    pub fn active_streams(&self) -> usize {
        self.shared.lock().active
    }

    /// Stops accepting, ends the executors (live sessions are dropped) and
    /// joins their threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Dropping the only sender closes the channel: every `recv` fails.
        self.stop_tx.take();
        for handle in self.threads.drain(..) {
            if let Err(e) = handle.join() {
                tracing::warn!("fake-soniox shard ended badly: {e}");
            }
        }
    }
}

impl Drop for FakeSoniox {
    fn drop(&mut self) {
        self.shutdown();
    }
}
