//! One stream's life: the client's HTTP upgrade and session token, its first
//! (config) message, the choice of account and the upstream connection (with
//! invisible retries on another account), the pumps, and an orderly end with
//! the contract's error shapes and close codes.
//!
//! - `handshake`: accept, the HTTP request, the token on it, the 101.
//! - `first`: the first (config) message, whole or in fragments, and a
//!   token inside it.
//! - `refusal`: the error frame + close the relay sends when it ends a stream.
//! - this file: the stream after the upgrade — account, upstream, pumps, end.

/// `Box::pin(future)`, with the box allocated before the future is built,
/// so that the future is built in it. `Box::pin` builds the future on the
/// stack and copies all of it into the box, the size of its largest state
/// (4–5 KiB for a stream's opening, and for its end), where a future built
/// in place writes only what it captures: 23 KiB fewer bytes copied per
/// stream opened and closed (counted in benches/README.md).
macro_rules! boxed {
    ($future:expr) => {{
        let mut slot = Box::new_uninit();
        slot.write($future);
        // SAFETY: written on the line above.
        Box::into_pin(unsafe { slot.assume_init() })
    }};
}

mod config;
mod ending;
mod first;
mod handshake;
mod open;
mod refusal;
mod support;

use crate::dataplane::uring::CloseReply;
use ending::{Ending, ToClient};
use open::unless_client_leaves;
use support::{audio_bytes_per_ms, close_after_peer, end_client, raw_audio_rate, LiveGuard};
pub use support::{upstream_config_text, with_api_key};

pub use handshake::serve;
pub use refusal::Refusal;

use std::rc::Rc;
use std::time::{Instant, SystemTime};

use futures_lite::future;

use crate::core::devices::Limit;
use crate::core::keyring::Lease;
use crate::core::metrics::{ShardMetrics, Side};
use crate::core::token::Claims;
use crate::core::usage::UsageRecord;
use crate::dataplane::buf::Buf;
use crate::dataplane::io::{timeout, Duplex};
use crate::dataplane::pump::{self, ClientSide, End, Link, StreamCx, StreamState};
use crate::dataplane::shard::{AdmitPermit, LiveStream, Settings, Shard, StopReason};
use clio_frame::frame::{build_frame, close_payload, Opcode};
use clio_frame::scanner::FrameScanner;

/// How long the relay waits for a peer's half of a close handshake.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest the relay waits to hand a peer its last frames when a
/// stream ends (the client its error frame or close and, over TLS, its
/// close_notify; upstream its close frame or a drain's finalize): a peer
/// that stopped reading, its socket full, does not hold the stream.
const LAST_FRAMES_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// One upgraded stream on one shard.
struct Stream {
    /// The relay's id for the stream: `client_reference_id` upstream when the
    /// client gives none, and `request_id` in the relay's own errors.
    id: String,
    shard: Rc<Shard>,
    /// Limits and token keys as they were when the stream started.
    settings: Rc<Settings>,
    /// Counts the stream against `server.max_streams` until dropped; taken
    /// after the first message when the token comes in it.
    _permit: Option<AdmitPermit>,
    /// The token's pools, once the token is verified: every account the
    /// stream ever gets (at open, on failover, on resume) is of one of them.
    /// Empty until then, which no account matches.
    pools: std::cell::RefCell<Vec<String>>,
    /// The stream has connected on its first account, under its pool's
    /// `max_streams`: the accounts it moves to later (failover, resume)
    /// are not checked against that cap again.
    placed: std::cell::Cell<bool>,
    /// A resume's new connection is opening: a failure on the way is the
    /// resume's (mid-stream), no failover at open.
    resuming: std::cell::Cell<bool>,
    /// A connection that failed before upstream accepted the stream:
    /// its account's metrics index (when it counts as a move off the
    /// account), whether it was lost (else refused), and whether it was
    /// a failover at open (not a resume's reopen). It
    /// counts as a move off the account (`account_retries_total`, and
    /// `failovers_total{phase="open"}`) once the stream goes on to
    /// another connection; a stream refused after it was moved nowhere,
    /// and the client saw the refusal.
    moving_off: std::cell::Cell<Option<(Option<usize>, bool, bool)>>,
    /// Counts the stream as begun (what a drain waits for) from its config
    /// message to its end.
    begun: std::cell::OnceCell<crate::dataplane::shard::BegunStream>,
}

/// An open upstream: the connection, the account it holds, and its read buffer.
struct Upstream {
    conn: Duplex,
    lease: Lease,
    buf: Buf,
    /// Where the upstream→client pump is in the frame stream; kept here so
    /// a drain can pick up exactly where the pump stopped.
    scanner: FrameScanner,
}

impl Upstream {
    /// Lets a failed connection go before the stream opens its next one:
    /// the connection reset (upstream counts an open connection against
    /// the key's own limit until it closes, and one that stopped reading
    /// would see a FIN only behind the audio it no longer reads) and the
    /// lease's places given back, so the next connection may take the
    /// same account when it is at its limit. The lease itself stays, for
    /// the usage record should no account take the stream.
    fn let_go(&mut self) {
        self.conn.reset();
        self.lease.give_back();
    }
}

/// An upstream opened while the client's first message was still being
/// read. It is counted open in the metrics from the moment it opened, so
/// when the first message then fails (the client left, sent no config or
/// a bad one) and the connection is dropped unused, dropping this counts
/// it closed again: the live-stream gauges come back to 0.
struct OpenedEarly<'a> {
    up: Option<Upstream>,
    metrics: &'a ShardMetrics,
}

impl OpenedEarly<'_> {
    /// The upstream, for the stream to use (and count closed when it ends).
    fn take(mut self) -> Upstream {
        self.up.take().expect("taken once")
    }
}

impl Drop for OpenedEarly<'_> {
    fn drop(&mut self) {
        if let Some(up) = &self.up {
            self.metrics.stream_closed(up.lease.account.metrics_index);
        }
    }
}

/// The client's first message and the upstream opened for it at once (the
/// token came on the request), as `try_zip` would, except that an open
/// that fails first is told only once the first message has come: Soniox
/// answers a client only after its config, and an SDK that sends its
/// config right after the upgrade (Soniox's Python SDK) finds a
/// connection that closed before it could, and reports a failure to start
/// without the error. A first message that fails (none in time, a bad
/// one, the client gone) is the answer, whatever the open did; so it is
/// when it fails first.
async fn first_then_open<A, B>(
    first: impl std::future::Future<Output = Result<A, Refusal>>,
    open: impl std::future::Future<Output = Result<B, Refusal>>,
) -> Result<(A, B), Refusal> {
    use std::task::Poll;
    let mut first = std::pin::pin!(first);
    let mut open = std::pin::pin!(open);
    let (mut a, mut b) = (None, None);
    future::poll_fn(|cx| {
        if a.is_none() {
            match first.as_mut().poll(cx) {
                Poll::Ready(Err(r)) => return Poll::Ready(Err(r)),
                Poll::Ready(Ok(x)) => a = Some(x),
                Poll::Pending => {}
            }
        }
        if b.is_none() {
            if let Poll::Ready(x) = open.as_mut().poll(cx) {
                b = Some(x);
            }
        }
        match (a.take(), b.take()) {
            (Some(a), Some(b)) => Poll::Ready(b.map(|b| (a, b))),
            (a2, b2) => {
                (a, b) = (a2, b2);
                Poll::Pending
            }
        }
    })
    .await
}

impl Stream {
    /// The stream's whole life after the upgrade: open, pump, fail over or
    /// resume, end.
    ///
    /// Its future is most of what an open stream holds, so it is written
    /// for size: an `async move` block rather than an `async fn` (whose
    /// arguments would be kept twice, as captured and as locals), and the
    /// open phase in a block of its own, so that what it leaves behind
    /// (its result, the config as JSON) is not kept while the stream flows.
    #[allow(clippy::manual_async_fn)] // the point: see above
    fn run(
        self,
        client: Duplex,
        mut cbuf: Buf,
        mut claims: Option<Claims>,
        pending: Option<crate::dataplane::unauth::Place>,
    ) -> impl std::future::Future<Output = ()> {
        async move {
            let mut tried = 0u64;
            // Rounds of waiting for an unreachable upstream, and of trying
            // the same accounts again after failures that were not theirs:
            // up to `failover.max_resumes` at open in all.
            let mut same_account_retries = 0u32;
            let state = StreamState::new(Instant::now());
            // With the token on the request, connect upstream while the client
            // prepares its config message; otherwise authenticate first. Either
            // way the device's limits are checked before upstream is touched.
            // Boxed: opening (an upstream TLS handshake among it) is the largest
            // state the stream's task ever has, and it is over once the stream
            // flows; unboxed, every open stream would carry its size for life.
            // A token that comes in the first message is put in `claims`,
            // so the stream keeps one copy of them whichever way they came.
            let (config, mut up, _late_permit, reference_id, live) = {
                // A refusal is answered inside the boxed opening too: kept
                // here, the result would be held across that answer, and
                // so take its room in every open stream's task.
                let opened = boxed!(async {
                    let opened: Result<_, Refusal> = async {
                        match &claims {
                            Some(c) => {
                                *self.pools.borrow_mut() = c.pools.clone();
                                // A refusal waits for the first message, as
                                // Soniox answers only once it has the config
                                // (see `first_then_open`).
                                let (permit, lease) = match self.admit(c).await {
                                    Ok(x) => x,
                                    Err(r) => {
                                        self.read_first_message(&client, &mut cbuf).await?;
                                        return Err(r);
                                    }
                                };
                                state.meter.admit(permit);
                                // Live from here: a revocation or a drain
                                // that comes while upstream opens ends it.
                                let live = LiveGuard::register(&self.shard, c);
                                // Pinned where it is built: `try_zip` would
                                // take it by value, two copies of its 5 KiB.
                                let opening = std::pin::pin!(async {
                                    let up = unless_client_leaves(
                                        &client,
                                        self.open_patiently(
                                            &mut tried,
                                            &mut same_account_retries,
                                            lease,
                                        ),
                                    )
                                    .await?;
                                    Ok(OpenedEarly {
                                        up: Some(up),
                                        metrics: &self.shard.metrics,
                                    })
                                });
                                let (first, up) = first_then_open(
                                    self.read_first_message(&client, &mut cbuf),
                                    opening,
                                )
                                .await?;
                                Ok((first, up.take(), None, live))
                            }
                            None => {
                                let first = self.read_first_message(&client, &mut cbuf).await;
                                // Out of the unauthenticated pool, whatever came.
                                drop(pending);
                                let first = first?;
                                // Kept from here, so a refusal's log line
                                // names the device.
                                let c = &*claims.insert(self.first_message_claims(&first.fields)?);
                                *self.pools.borrow_mut() = c.pools.clone();
                                let slot = self.admit_stream()?;
                                let (permit, lease) = self.admit(c).await?;
                                state.meter.admit(permit);
                                let live = LiveGuard::register(&self.shard, c);
                                let up = unless_client_leaves(
                                    &client,
                                    self.open_patiently(
                                        &mut tried,
                                        &mut same_account_retries,
                                        lease,
                                    ),
                                )
                                .await?;
                                Ok((first, up, Some(slot), live))
                            }
                        }
                    }
                    .await;
                    match opened {
                        Ok(x) => Ok(x),
                        Err(r) => {
                            // The client's frames after its request (and its
                            // first message, if read) start a frame each.
                            let awaits = self.refuse(&client, &r, claims.as_ref()).await;
                            Err(awaits.then(|| {
                                let mut reply = CloseReply::after(0);
                                reply.feed(cbuf.filled());
                                reply
                            }))
                        }
                    }
                })
                .await;
                let (config, up, late_permit, live) = match opened {
                    Ok(x) => x,
                    Err(reply) => {
                        end_client(client, reply).await;
                        return;
                    }
                };
                state
                    .meter
                    .set_audio_rate(audio_bytes_per_ms(&config.fields));
                let failover = &self.settings.failover;
                if failover.max_resumes > 0 {
                    if let Some((per_sec, frame)) = raw_audio_rate(&config.fields) {
                        let cap = (failover.resume_audio.as_secs_f64() * per_sec as f64) as usize;
                        *state.resume.borrow_mut() = Some(Box::new(pump::resume::Resume::new(
                            per_sec,
                            frame,
                            cap,
                            failover.max_resumes,
                            self.shard.process.resume_copies.clone(),
                        )));
                    }
                }
                let reference_id = config
                    .fields
                    .client_reference_id
                    .clone()
                    .unwrap_or_else(|| self.id.clone());
                // Kept for the stream's life (a retry sends it again) as the bytes
                // upstream gets, not as a JSON map: a fraction of the memory.
                (
                    upstream_config_text(&config.text, &self.id),
                    up,
                    late_permit,
                    reference_id,
                    live,
                )
            };
            // Set on every way here (the token on the request, or in the
            // first message): never taken.
            let Some(claims) = &claims else { return };
            tracing::debug!(stream = %self.id, shard = self.shard.index, device = %claims.device_id, token_id = %claims.token_id, account = %up.lease.account.id, "stream open");
            let mut cside = ClientSide::new(
                self.settings.limits.max_frame_bytes as u64,
                self.settings.failover.replay_bytes,
            );
            // The last failover was for a lost connection, not a refusal.
            let mut lost: bool;
            // The last connection answered its first message with an
            // error (a refusal): it transcribed and billed nothing.
            let mut refused_last = false;
            // ... or for something that was not the account's fault (a lost
            // connection, 500, 503): with no other account left, the same one
            // is tried again, up to `failover.max_resumes` times.
            let mut not_the_account: bool;
            // The code of the last refusal (`End::Retry`).
            let mut last_code = 0u16;
            let end = loop {
                *live.stream.key.borrow_mut() = up.lease.key.fingerprint.clone();
                // A key retired while the stream was opening on it (the
                // shard's request went to no one) is left as soon as it
                // flows; one retired while the stream was already moving
                // off it no longer concerns it.
                let retired = &up.lease.key.ending;
                if retired.load(std::sync::atomic::Ordering::Relaxed) {
                    live.stream.stop(StopReason::KeyRetired);
                } else {
                    live.stream.forget_key_retired();
                }
                // Written by the client→upstream pump, in the same send as the
                // client frames already read (often the first audio). After a
                // failover the replay copy follows it: the new connection gets
                // every byte the old one got, once.
                if cside.config_frame.is_none() {
                    let mut first = self.config_frame(&up, &config);
                    if let Some(copy) = &cside.replay {
                        first.extend_from_slice(copy);
                    }
                    cside.config_frame = Some(first);
                }
                let end = self
                    .pump(
                        &client,
                        &mut up,
                        &mut cbuf,
                        &mut cside,
                        &state,
                        &live.stream,
                    )
                    .await;
                match end {
                    End::Retry(code, scope) => {
                        lost = false;
                        refused_last = true;
                        not_the_account = matches!(code, 500 | 503);
                        last_code = code;
                        self.note_refusal(&up.lease, code, scope);
                        self.shard
                            .metrics
                            .upstream_error(up.lease.account.metrics_index, code);
                        if self.shard.process.upstream_log.admit() {
                            tracing::info!(stream = %self.id, account = %up.lease.account.id, code, replayed = cside.replay.as_ref().map_or(0, Vec::len), "upstream refused the stream before accepting it; moving it to the next account");
                        }
                    }
                    End::UpstreamGone | End::UpstreamProtocol(_) | End::UpstreamSilent
                        if state.retry_allowed()
                            && !cside.close_seen
                            && !state.down.last_word_seen.get() =>
                    {
                        lost = true;
                        refused_last = false;
                        not_the_account = true;
                        self.shard
                            .metrics
                            .upstream_error(up.lease.account.metrics_index, 502);
                        if self.shard.process.upstream_log.admit() {
                            tracing::info!(stream = %self.id, account = %up.lease.account.id, ?end, replayed = cside.replay.as_ref().map_or(0, Vec::len), "upstream failed before accepting the stream; moving it to the next account");
                        }
                    }
                    End::UpstreamGone
                    | End::UpstreamProtocol(_)
                    | End::UpstreamStalled
                    | End::UpstreamSilent
                    | End::Resume(..)
                    | End::KeyRetired
                        if self.resumable(&state, &cside) =>
                    {
                        match boxed!(unless_client_leaves(
                            &client,
                            self.resume(&mut up, end, &config, &state, &mut cbuf, &mut cside),
                        ))
                        .await
                        {
                            Ok(()) => continue,
                            Err(r) => break Err(r),
                        }
                    }
                    other => break Ok(other),
                }
                cside.config_frame = None;
                self.shard
                    .metrics
                    .stream_closed(up.lease.account.metrics_index);
                self.moving_off(Some(up.lease.account.metrics_index), lost);
                up.let_go();
                state.new_connection();
                // One boxed future for both tries: the first result, kept
                // across the second try, would take its room in every open
                // stream's task.
                let next = unless_client_leaves(
                    &client,
                    boxed!(async {
                        let rounds = &mut same_account_retries;
                        let next = self.open_patiently(&mut tried, rounds, None).await;
                        if matches!(&next, Err(r) if r.code == 429)
                            && not_the_account
                            && *rounds < self.settings.failover.max_resumes
                        {
                            // Every account tried, none refused the stream: try again.
                            *rounds += 1;
                            tried = 0;
                            return self.open_patiently(&mut tried, rounds, None).await;
                        }
                        next
                    }),
                )
                .await;
                match next {
                    Ok(next) => up = next,
                    // No other account: the client learns what happened to its
                    // stream (lost, or failed by upstream with 500 or 503, on
                    // every try), not that no account was free.
                    Err(r) if lost && r.code == 429 => break Err(Refusal::upstream_lost()),
                    Err(r) if not_the_account && r.code == 429 => {
                        break Err(Refusal::upstream_failed(last_code))
                    }
                    Err(r) => break Err(r),
                }
            };
            // The end, boxed as the opening is: only the end needs its
            // state. The loop's result moves into it whole: matched here,
            // it would be kept (for the refusal's answer) in every open
            // stream's task.
            // A close the relay sent the client and the client has yet to
            // answer: its FIN waits for the answer (`end_client`).
            let reply = std::cell::Cell::new(None);
            let upstream_closes = boxed!(async {
                let end = match end {
                    Ok(end) => end,
                    Err(r) => {
                        if self.refuse(&client, &r, Some(claims)).await {
                            reply.set(Some(cside.close_reply(&mut cbuf)));
                        }
                        // A failover or a resume that could not reopen, or
                        // a client that left meanwhile: the stream carried
                        // audio all the same (its account's gauges were
                        // closed before the reopen).
                        let error = (r.code != 0).then_some(r.code);
                        let billed = state.down.ever_accepted.get() || !refused_last;
                        self.record_usage(&up, claims, reference_id, &state, error, billed);
                        // Out of the registry once recorded: what a stop
                        // that ends the live streams waits for.
                        drop(live);
                        return false;
                    }
                };
                // Upstream's refusal that reached the client (at open past
                // the copy's bound, or mid-stream with no resume: a
                // compressed format, resumes used up) marks its account
                // as a hidden one does.
                let passed = state.down.error_passed.get();
                if let Some((code, scope)) = passed.or(state.down.first_error.get()) {
                    self.note_refusal(&up.lease, code, scope);
                }
                let (error, upstream_closes, awaits) = self
                    .finish(&client, &mut up, end, &state, &mut cbuf, &mut cside)
                    .await;
                if awaits {
                    reply.set(Some(cside.close_reply(&mut cbuf)));
                }
                self.shard
                    .metrics
                    .stream_closed(up.lease.account.metrics_index);
                // Upstream's first answer an error (a refusal, a bad
                // config) and no connection that accepted the stream:
                // none of its audio was billed.
                let billed =
                    state.down.ever_accepted.get() || state.down.first_error.get().is_none();
                self.record_usage(&up, claims, reference_id, &state, error, billed);
                drop(live);
                let resume_copy_peak = state
                    .resume
                    .borrow()
                    .as_ref()
                    .map_or(0, |r| r.peak_capacity);
                tracing::debug!(stream = %self.id, ?end, secs = state.started.elapsed().as_secs_f64(), resume_copy_peak, "stream end");
                upstream_closes
            })
            .await;
            // The stream is over; its sockets close after their peers.
            end_client(client, reply.get()).await;
            if upstream_closes {
                close_after_peer(up.conn);
            }
        }
    }

    /// Writes the stream's usage record for the admin thread to collect,
    /// and settles the device's daily audio with the final figure (none
    /// for a stream upstream refused: `billed` false).
    fn record_usage(
        &self,
        up: &Upstream,
        claims: &Claims,
        reference_id: String,
        state: &StreamState,
        error: Option<u16>,
        billed: bool,
    ) {
        let metered = state.meter.settle(SystemTime::now(), billed);
        let account = &up.lease.account.id;
        // The parts earlier accounts carried, after a resume moved the
        // stream (the last account's own earlier part stays in its record).
        let parts: Vec<_> = state
            .meter
            .take_parts()
            .into_iter()
            .filter(|p| &p.account != account)
            .collect();
        // A stream that crossed midnight: the audio of each day on it.
        let other_days = state.meter.audio_on_other_days(metered.day);
        let mut usage = Vec::with_capacity(parts.len() + 1 + other_days.len());
        let (mut ms, mut up_bytes, mut down_bytes) = (0, 0, 0);
        for p in parts {
            ms += p.audio_ms;
            up_bytes += p.bytes_up;
            down_bytes += p.bytes_down;
            usage.push(UsageRecord {
                account: p.account,
                device: claims.device_id.clone(),
                reference_id: reference_id.clone(),
                audio_ms_relay: p.audio_ms,
                audio_ms_upstream: Some(p.audio_ms),
                bytes_up: p.bytes_up,
                bytes_down: p.bytes_down,
                error: None,
                part: true,
                ..metered.clone()
            });
        }
        usage.push(UsageRecord {
            account: account.clone(),
            device: claims.device_id.clone(),
            reference_id,
            error: error.or(metered.error),
            // Upstream's figure is on the stream's timeline: the earlier
            // accounts' parts are in it.
            audio_ms_relay: metered.audio_ms_relay.saturating_sub(ms),
            audio_ms_upstream: metered.audio_ms_upstream.map(|u| u.saturating_sub(ms)),
            bytes_up: metered.bytes_up.saturating_sub(up_bytes),
            bytes_down: metered.bytes_down.saturating_sub(down_bytes),
            ..metered
        });
        crate::core::usage::split_days(&mut usage, &other_days);
        self.shard.usage.borrow_mut().append(&mut usage);
    }

    /// Whether the stream can resume on a new upstream connection now: a
    /// raw-audio stream with resumes left, its copy whole, the client not
    /// gone and not in the middle of a text frame, and upstream's last
    /// word (`finished`, an error) not yet passed on: after it the client
    /// has its answer, and a new connection would give it a second one.
    fn resumable(&self, state: &StreamState, cside: &ClientSide) -> bool {
        !cside.close_seen
            && !state.down.last_word_seen.get()
            && state
                .resume
                .borrow()
                .as_ref()
                .is_some_and(|r| r.can_resume())
            && !matches!(cside.scanner.cut_frame(), Some(None))
            // A text message the client left open cannot be continued on
            // a new connection after the copy's binary frames, nor can a
            // message upstream left open towards the client.
            && cside.scanner.open_message() != Some(false)
            && !state.down.mid_message.get()
            // Nor can a frame the client's socket got only part of.
            && state.down.at_boundary.get()
    }

    /// Resumes the stream after its upstream connection failed mid-stream
    /// (`end`): a new connection (the same account if it is still the best
    /// choice), the config, the audio after the last final token, a
    /// pending finalize or end of audio, then the live audio.
    async fn resume(
        &self,
        up: &mut Upstream,
        end: End,
        config: &[u8],
        state: &StreamState,
        cbuf: &mut Buf,
        cside: &mut ClientSide,
    ) -> Result<(), Refusal> {
        let t0 = Instant::now();
        let reason = match end {
            End::Resume(code, scope) => {
                self.note_refusal(&up.lease, code, scope);
                code
            }
            _ => 0,
        };
        // A move off a retired key is the relay's own doing, not a failure.
        let moved = matches!(end, End::KeyRetired);
        let shard = &self.shard;
        if !moved {
            shard.metrics.upstream_error(
                up.lease.account.metrics_index,
                if reason == 0 { 502 } else { reason },
            );
        }
        shard.metrics.stream_closed(up.lease.account.metrics_index);
        let failed_account = up.lease.account.id.clone();
        // What the failed connection did not read is in the copy.
        up.let_go();
        let (mut tried, mut rounds) = (0, 0);
        self.resuming.set(true);
        let next = boxed!(self.open_patiently(&mut tried, &mut rounds, None)).await;
        self.resuming.set(false);
        // A stop meanwhile is told as to every live stream ("reconnect",
        // close 1012), and the relay's own file limit as at any open (503,
        // close 1013: the relay's fault, try again); anything else is a
        // resume that found no account.
        *up = next.map_err(|r| {
            if r.is_restarting() || r.is_file_limit() {
                r
            } else {
                Refusal::upstream_lost()
            }
        })?;
        // What the old connection got of the client's bytes is in the copy:
        // the frames already re-masked for it are not sent again.
        let cut = cside.scanner.cut_frame().flatten();
        let open_message = cside.scanner.open_message() == Some(true);
        cbuf.consume(cside.processed);
        cside.processed = 0;
        let mut first = self.config_frame(up, config);
        let (n, secs) = {
            let mut r = state.resume.borrow_mut();
            let r = r.as_mut().expect("a resumable stream");
            let secs = r.replay_seconds();
            if up.lease.account.id != failed_account {
                // Upstream bills each connection to its account: what the
                // failed one processed is its part.
                state.meter.close_part(&failed_account, r.total_ms());
            }
            first.extend(r.begin(&mut shard.masks.borrow_mut(), cut, open_message));
            (r.resumes, secs)
        };
        cside.config_frame = Some(first);
        cside.replay = None;
        state.up.replayable.set(false);
        state.new_connection();
        shard.metrics.resumed(secs, t0.elapsed());
        if moved {
            tracing::info!(stream = %self.id, account = %up.lease.account.id, key = %up.lease.key.fingerprint, resume = n, replayed_secs = secs, "the stream's key was retired; moved to a current key");
        } else {
            shard.metrics.failover("mid", reason == 0);
            if shard.process.upstream_log.admit() {
                tracing::info!(stream = %self.id, failed_account = %failed_account, account = %up.lease.account.id, resume = n, reason, replayed_secs = secs, "upstream failed mid-stream; resumed on a new connection");
            }
        }
        Ok(())
    }

    /// The client's config (see [`upstream_config_text`]) as the masked
    /// text frame upstream gets, with the account key as `api_key` when
    /// `upstream.auth = "config"`.
    fn config_frame(&self, up: &Upstream, config: &[u8]) -> Vec<u8> {
        let with_key;
        let text = if self.shard.key_in_header {
            config
        } else {
            with_key = with_api_key(config, up.lease.key.key.expose());
            &with_key
        };
        let key = self.shard.masks.borrow_mut().next_key();
        build_frame(Opcode::Text, text, Some(key))
    }

    /// Runs both pumps, the idle watch and the relay's own reasons to end
    /// a stream until one of them ends it.
    async fn pump(
        &self,
        client: &Duplex,
        up: &mut Upstream,
        cbuf: &mut Buf,
        cside: &mut ClientSide,
        state: &StreamState,
        live: &LiveStream,
    ) -> End {
        let Upstream {
            conn,
            buf: ubuf,
            scanner: uscanner,
            lease,
        } = up;
        let cx = self.cx(state, lease);
        let conn = &*conn;
        let c2u = async {
            let link = Link {
                from: client,
                to: conn,
                buf: cbuf,
            };
            match pump::client_to_upstream(link, cside, cx).await {
                // The client said goodbye; the stream ends when upstream answers.
                End::ClientClosed => future::pending().await,
                end => end,
            }
        };
        let link = Link {
            from: conn,
            to: client,
            buf: ubuf,
        };
        let u2c = pump::upstream_to_client_any(link, uscanner, cx);
        let limits = &self.settings.limits;
        let idle = pump::idle_watch(state, limits.idle_timeout, limits.stall_timeout);
        // The relay's own reasons: a revocation, a device limit reached
        // elsewhere, a drain, or the device's longest stream length.
        let stopped = async {
            match live.stopped().await {
                StopReason::Limit(l) => End::Stopped(l),
                StopReason::Drain => End::Drain,
                StopReason::KeyRetired => End::KeyRetired,
            }
        };
        let too_long = async move {
            let max_len = state.meter.max_stream_length();
            if max_len.is_zero() {
                future::pending::<()>().await;
            }
            pump::until(state.started + max_len).await;
            End::Stopped(Limit::MaxLength)
        };
        // The first of them to end ends the stream; each wake-up polls them
        // in this order, so an earlier one wins a tie (a stream's results
        // reach the client before its own end is seen). Nested `or`s hold
        // the five futures in place, in this one future: it is part of
        // every open stream's task for its whole life, and an array of
        // pointers to them would add to it.
        future::or(
            future::or(future::or(future::or(u2c, c2u), idle), stopped),
            too_long,
        )
        .await
    }

    /// What this stream's pumps work with besides their sockets.
    fn cx<'a>(&'a self, state: &'a StreamState, lease: &'a Lease) -> StreamCx<'a> {
        StreamCx {
            state,
            masks: &self.shard.masks,
            metrics: &self.shard.metrics,
            account: &lease.account,
            redactor: &lease.key.redactor,
        }
    }

    /// Ends a stream the way `end` calls for: what it needs first (a close
    /// handshake carried on, a drain's finalize), then its row of the
    /// table in `ending.rs`. Returns the error the client was told, whether
    /// a close frame went upstream (then upstream closes the connection
    /// first; see `close_after_peer`), and whether a close frame went to a
    /// client that has not sent its own (then its FIN waits for the reply;
    /// see `end_client`).
    async fn finish(
        &self,
        client: &Duplex,
        up: &mut Upstream,
        end: End,
        state: &StreamState,
        cbuf: &mut Buf,
        cside: &mut ClientSide,
    ) -> (Option<u16>, bool, bool) {
        let shard = &self.shard;
        // A close frame of the relay's own went up in the client's place.
        let mut answered_upstream = false;
        // What this ending needs before the table's two steps.
        match end {
            End::UpstreamClosed if !cside.close_seen => {
                // Upstream closed first (after `finished`): carry the client's
                // close reply up, so both close handshakes complete.
                let cx = self.cx(state, &up.lease);
                let link = Link {
                    from: client,
                    to: &up.conn,
                    buf: cbuf,
                };
                let c2u = pump::client_to_upstream(link, cside, cx);
                // A stop does not wait for the reply: it waits for this
                // stream's usage (`STOP_CUT_WAIT`), which the wait would
                // take most of.
                let _ = timeout(CLOSE_WAIT, future::or(c2u, ended_by_stop(shard))).await;
                // No reply went up (none came in time, the client left,
                // or its close was one no endpoint may send, which is not
                // carried up): the relay answers upstream's close in the
                // client's place (RFC 6455 §5.5.1), between frames, so
                // upstream's close handshake completes and upstream
                // closes the connection first.
                if !cside.close_seen && state.up.at_boundary.get() {
                    let key = shard.masks.borrow_mut().next_key();
                    let close = build_frame(Opcode::Close, &close_payload(1000, ""), Some(key));
                    let sent = timeout(LAST_FRAMES_WAIT, up.conn.write_all(&close)).await;
                    answered_upstream = matches!(sent, Some(Ok(())));
                }
            }
            End::UpstreamStalled => {
                // Reset, not closed: a FIN would wait behind the audio
                // upstream no longer reads, and upstream would count the
                // connection against the key's concurrency limit for as
                // long as the kernel kept trying to send it.
                up.conn.reset();
                if shard.process.upstream_log.admit() {
                    tracing::warn!(stream = %self.id, account = %up.lease.account.id, stall = ?self.settings.limits.stall_timeout, "upstream stopped reading the stream's audio; ending it as an upstream failure");
                }
            }
            End::ClientStalled if cside.close_seen => {
                tracing::info!(stream = %self.id, stall = ?self.settings.limits.stall_timeout, "the client sent its close and stopped reading its results; ending the stream as the client's failure");
            }
            End::ClientStalled if state.up.write_since.get().is_some() => {
                tracing::info!(stream = %self.id, stall = ?self.settings.limits.stall_timeout, "the client stopped reading its results, so upstream stopped reading its audio; ending the stream as the client's failure");
            }
            End::ClientStalled => {
                tracing::info!(stream = %self.id, stall = ?self.settings.limits.stall_timeout, "the client stopped reading its results after its end of audio; ending the stream as the client's failure");
            }
            End::UpstreamSilent if shard.process.upstream_log.admit() => {
                tracing::warn!(stream = %self.id, account = %up.lease.account.id, idle = ?self.settings.limits.idle_timeout, "upstream sent nothing after the client's end of audio; ending the stream as an upstream failure");
            }
            // The finalize is a data frame: between the client's messages.
            // A stop that ends the stream now skips it.
            End::Drain | End::KeyRetired
                if !cside.close_seen
                    && !shard.process.stopping_now()
                    && state.up.at_boundary.get()
                    && cside.scanner.open_message().is_none()
                    && state.down.at_boundary.get()
                    && !state.down.mid_message.get() =>
            {
                self.finalize_for_drain(client, up, state).await;
            }
            _ => {}
        }
        let ending = Ending::of(end, cside.close_seen, state.down.last_word_seen.get());
        // Soniox's own error, passed to the client as it came, when the
        // relay has none of its own to count for this end.
        let counted = ending
            .counted
            .or_else(|| state.meter.upstream_error().map(ending::soniox_error));
        match counted {
            Some((Side::Upstream, code)) => shard
                .metrics
                .upstream_error(up.lease.account.metrics_index, code),
            Some((side, code)) => shard.metrics.error(side, code),
            None => {}
        }
        // A limit counts as a rejection when it ended the stream: not when
        // the client's close was already up and only waited for its answer.
        if let (End::Stopped(limit), ToClient::Error(_)) = (end, &ending.client) {
            shard.process.device_rejections[limit as usize]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut awaits = false;
        if state.down.at_boundary.get() {
            let frames = match &ending.client {
                ToClient::Nothing => None,
                ToClient::Close(code) => {
                    Some(build_frame(Opcode::Close, &close_payload(*code, ""), None))
                }
                // Inside a message upstream left open, only a control
                // frame may go: the error's close, without its text.
                ToClient::Error(r) if state.down.mid_message.get() => Some(build_frame(
                    Opcode::Close,
                    &close_payload(r.close, ""),
                    None,
                )),
                ToClient::Error(r) => Some(r.frames(&self.id)),
            };
            if let Some(frames) = frames {
                let sent = timeout(LAST_FRAMES_WAIT, client.write_all(&frames)).await;
                awaits = matches!(sent, Some(Ok(()))) && !cside.close_seen;
            }
        }
        // A close frame went upstream, the client's or the relay's own:
        // upstream, the server, is the one to close the connection first.
        let mut closing = cside.close_seen || answered_upstream;
        if let (Some((code, reason)), true) = (ending.upstream, state.up.at_boundary.get()) {
            let key = shard.masks.borrow_mut().next_key();
            let close = build_frame(Opcode::Close, &close_payload(code, reason), Some(key));
            let sent = timeout(LAST_FRAMES_WAIT, up.conn.write_all(&close)).await;
            closing |= matches!(sent, Some(Ok(())));
        }
        let error = match ending.client {
            ToClient::Error(r) => Some(r.code),
            _ => None,
        };
        (error, closing, awaits)
    }

    /// A drain's last service to a stream between frames: ask upstream for
    /// its final tokens and deliver them (up to `limits.finalize_wait`), before
    /// the client is told to reconnect.
    async fn finalize_for_drain(&self, client: &Duplex, up: &mut Upstream, state: &StreamState) {
        let shard = &self.shard;
        // Upstream answers in order: the client's finalizes still pending
        // first, then this one. A `<fin>` that came before (the answer to
        // a finalize of the client's) is not this one's.
        let pending = state
            .resume
            .borrow()
            .as_ref()
            .map_or(0, |r| r.pending_finalizes());
        let answered_at = state.down.fins.get() + pending as u64 + 1;
        let key = shard.masks.borrow_mut().next_key();
        let finalize = build_frame(Opcode::Text, br#"{"type":"finalize"}"#, Some(key));
        match timeout(LAST_FRAMES_WAIT, up.conn.write_all(&finalize)).await {
            Some(Ok(())) => {}
            Some(Err(_)) => return,
            None => {
                // Upstream stopped reading, perhaps mid-frame: no close
                // frame may follow.
                state.up.at_boundary.set(false);
                return;
            }
        }
        // A draining stream moves to no other account.
        state.up.replayable.set(false);
        let Upstream {
            conn,
            buf,
            scanner,
            lease,
        } = &mut *up;
        let cx = self.cx(state, lease);
        let link = Link {
            from: conn,
            to: client,
            buf,
        };
        let u2c = pump::upstream_to_client_any(link, scanner, cx);
        // Done once the `<fin>` answering this finalize has reached the
        // client. Only the pump changes these cells, in this task, so this
        // is checked right after each of the pump's polls: no timer, no
        // waker of its own.
        let fin = future::poll_fn(|_| {
            if state.down.fins.get() >= answered_at && state.down.at_boundary.get() {
                std::task::Poll::Ready(End::Drain)
            } else {
                std::task::Poll::Pending
            }
        });
        // A stop that comes meanwhile ends the wait: the stream ends now.
        let _ = timeout(
            self.settings.limits.finalize_wait,
            future::or(future::or(u2c, fin), ended_by_stop(shard)),
        )
        .await;
    }

    /// Sends a refusal (error frame + close) to the client, then its FIN;
    /// `claims` are the token's, once known (its device and token id, for
    /// the log line: an operator can revoke the one it names).
    /// Tells the client why its stream ends; true when that was a close
    /// frame the client has yet to answer (see `end_client`).
    async fn refuse(&self, client: &Duplex, r: &Refusal, claims: Option<&Claims>) -> bool {
        if r.code != 0 {
            self.shard.metrics.stream_refused(r.by, r.side, r.code);
            // Every refusal is counted, and logged at INFO (saying who
            // refused) within the process's budget of lines; the message
            // never holds a token or a key.
            if !r.is_file_limit() && self.shard.process.refusal_log.admit() {
                let device = claims.map_or("-", |c| c.device_id.as_str());
                let token_id = claims.map_or("-", |c| c.token_id.as_str());
                tracing::info!(stream = %self.id, device, token_id, by = r.by.label(), code = r.code, close = r.close, reason = %r.message, "stream refused");
            } // at the file limit, the shard's rate-limited warning says it

            let sent = timeout(LAST_FRAMES_WAIT, client.write_all(&r.frames(&self.id))).await;
            return matches!(sent, Some(Ok(())));
        } else if r.close != 0 {
            // The client closed before its first message: answer its close.
            let close = build_frame(Opcode::Close, &close_payload(r.close, ""), None);
            let _ = timeout(LAST_FRAMES_WAIT, client.write_all(&close)).await;
        }
        false
    }
}

/// A stop that ends the live streams, as the end of a wait it cuts
/// short: the stream ends as a drain's, unfinalized.
async fn ended_by_stop(shard: &Shard) -> End {
    shard.stopping_now().await;
    End::Drain
}
