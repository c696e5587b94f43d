//! The refusal the relay sends when it ends a stream itself: one text frame
//! in Soniox's error shape, then a close frame.

use crate::core::keyring::RingSlot;
use crate::core::metrics::{RefusedBy, Side};
use clio_frame::frame::{build_frame, close_payload, Opcode};

/// What a stream refused at the file limit is told.
const FILE_LIMIT: &str = "Relay at its file limit; try again later.";

/// The kind of [`Refusal::upstream_unavailable`]: no account reachable.
pub(super) const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";

/// A refusal after the upgrade: one Soniox-shaped error frame, then a close.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The relay's code for it (400, 401, 408, 429, 502, 503), as
    /// metrics, logs and usage records have it; the client's frame
    /// carries [`client_code`](Self::client_code).
    pub code: u16,
    /// Soniox `error_type`.
    pub kind: &'static str,
    /// Human message. Never contains a token or key.
    pub message: String,
    /// WebSocket close code.
    pub close: u16,
    /// Who caused it, for metrics.
    pub side: Side,
    /// Who refused the stream, for `clio_relay_refusals_total` and the log.
    pub by: RefusedBy,
}

impl Refusal {
    pub(super) fn new(
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
            by: RefusedBy::from_side(side),
        }
    }
    fn by(mut self, by: RefusedBy) -> Self {
        self.by = by;
        self
    }
    /// No error frame: just a close frame with `close` (0: not even that).
    pub(super) fn silent(close: u16) -> Self {
        Refusal::new(0, "", "", close, Side::Client)
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(400, "bad_request", message, 1002, Side::Client)
    }
    /// The relay is draining and no longer takes streams: a stream that
    /// would start past the drain's wait, or a connection still waiting
    /// for its config message when the drain ends (close 1012, "service
    /// restart").
    pub(super) fn restarting() -> Self {
        Refusal::new(
            503,
            "service_unavailable",
            "The relay is restarting; reconnect.",
            1012,
            Side::Internal,
        )
    }
    /// Whether this is [`Refusal::restarting`]: the relay's own stop,
    /// which every live stream is told alike.
    pub(super) fn is_restarting(&self) -> bool {
        self.code == 503 && self.close == 1012
    }
    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Refusal::new(401, "unauthenticated", message, 1008, Side::Client)
    }
    /// No account could take the stream: `by` says whether the relay's own
    /// limits ([`RefusedBy::RelayLimit`]) or upstream's refusals did it.
    pub(super) fn no_account(by: RefusedBy) -> Self {
        match by {
            RefusedBy::RelayLimit => Refusal::new(
                429,
                "too_many_requests",
                "Every Soniox account is at the relay's stream limit; try again later.",
                1013,
                Side::Internal,
            ),
            _ => Refusal::new(
                429,
                "too_many_requests",
                "No Soniox account can take another stream now; try again later.",
                1013,
                Side::Upstream,
            ),
        }
        .by(by)
    }
    /// No account of the token's pools (`pools`) is on this relay at all:
    /// a token minted for a pool this relay does not serve, or a pool
    /// whose accounts were all removed. Counted like every account full
    /// (the relay has no room for the stream), and the message says which.
    pub(super) fn no_account_in(pools: &[String]) -> Self {
        let pools = if pools.is_empty() {
            "default".to_string()
        } else {
            pools.join(", ")
        };
        Refusal::new(
            429,
            "too_many_requests",
            format!("No Soniox account of this token's pools ({pools}) is on this relay."),
            1013,
            Side::Internal,
        )
        .by(RefusedBy::RelayLimit)
    }
    pub(super) fn upstream_unavailable() -> Self {
        Refusal::new(
            502,
            UPSTREAM_UNAVAILABLE,
            "The transcription service is unreachable; try again later.",
            1011,
            Side::Upstream,
        )
    }
    /// A fleet's shared store is unreachable and `cluster.on_store_down`
    /// is `refuse`. After the upgrade there is no HTTP header, so the
    /// retry hint is in the message; close 1013 is "try again later".
    pub(super) fn store_down() -> Self {
        Refusal::new(
            503,
            "service_unavailable",
            "The relay fleet's shared store is unreachable; retry after 5 seconds.",
            1013,
            Side::Upstream,
        )
        .by(RefusedBy::Relay)
    }
    /// Upstream answered the upgrade with a status that says the URL is wrong: the relay's
    /// `upstream.url` is wrong. No account is to blame and none is tried.
    pub(super) fn upstream_misconfigured(status: u16) -> Self {
        let what = if status == crate::dataplane::upstream::UpstreamFault::CERTIFICATE {
            "the relay refused the transcription service's TLS certificate (HTTP 495 here: \
             wrong upstream URL or CA)"
                .to_string()
        } else {
            format!(
                "the transcription service answered its WebSocket upgrade with HTTP \
                 {status} (wrong upstream URL)"
            )
        };
        Refusal::new(
            502,
            "upstream_misconfigured",
            format!(
                "The relay is misconfigured: {what}. This is not a capacity limit; retrying \
                 will not help until the relay's operator fixes it."
            ),
            1011,
            Side::Upstream,
        )
        .by(RefusedBy::UpstreamConfig)
    }
    /// Every pool of the stream's token is at its `[pool.NAME] max_streams`
    /// (`pools`: each with its cap and key). A limit the operator set on
    /// purpose, like a device limit: not counted as the relay's error.
    pub(super) fn pool_limit(pools: &str) -> Self {
        Refusal::new(
            429,
            "too_many_requests",
            format!("Pool limit reached: {pools}; try again later."),
            1013,
            Side::Client,
        )
        .by(RefusedBy::PoolLimit)
    }
    /// A device limit or a revocation.
    pub(super) fn device(limit: crate::core::devices::Limit, message: String) -> Self {
        use crate::core::devices::Limit;
        match limit {
            Limit::Revoked => Refusal::new(401, "unauthenticated", message, 1008, Side::Client)
                .by(RefusedBy::Revoked),
            Limit::Concurrent | Limit::Rate => {
                Refusal::new(429, "too_many_requests", message, 1013, Side::Client)
                    .by(RefusedBy::DeviceLimit)
            }
            Limit::DailyAudio | Limit::MaxLength => {
                Refusal::new(429, "too_many_requests", message, 1008, Side::Client)
                    .by(RefusedBy::DeviceLimit)
            }
        }
    }

    /// The relay is at its file-descriptor limit (its own fault, not upstream's).
    pub(super) fn file_limit() -> Self {
        Refusal::new(503, "service_unavailable", FILE_LIMIT, 1013, Side::Internal)
    }

    /// Whether this is [`Refusal::file_limit`], which is logged once per
    /// interval with a count rather than once per stream.
    pub(super) fn is_file_limit(&self) -> bool {
        self.code == 503 && self.message == FILE_LIMIT
    }

    pub(super) fn upstream_lost() -> Self {
        Refusal::new(
            503,
            "service_unavailable",
            "Cannot continue request: the upstream connection was lost. Reconnect.",
            1011,
            Side::Upstream,
        )
    }

    /// Upstream answered every try of the stream at open with `code` (500
    /// or 503), an error that is not the account's: as a lost connection,
    /// the client is told to reconnect.
    pub(super) fn upstream_failed(code: u16) -> Self {
        Refusal::new(
            503,
            "service_unavailable",
            format!("Cannot continue request: the transcription service answered {code} on every try. Reconnect."),
            1011,
            Side::Upstream,
        )
    }

    /// The code the client's error frame carries: [`code`](Self::code),
    /// except that an unreachable upstream (counted and logged as 502) is
    /// told with 503, Soniox's "Cannot continue request" that clients
    /// reconnect on. Soniox sends no 502, and its JavaScript SDK takes a
    /// code it does not know as an error not worth retrying.
    pub fn client_code(&self) -> u16 {
        if self.kind == UPSTREAM_UNAVAILABLE {
            503
        } else {
            self.code
        }
    }

    /// The error frame and the close frame, as the relay writes them to a client.
    pub fn frames(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "tokens": [],
            "error_code": self.client_code(),
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

/// Why no account could take a stream, once the ring had none left.
///
/// - Upstream, if it refused an account for this very stream (401, 402,
///   429, 5xx), or if every account is out because of upstream: held off
///   after a 401/402, cooling down after a 429, or full at the concurrency
///   limit upstream reported.
/// - The relay's limit, if an account upstream would still serve is full at
///   its configured `max_concurrent_streams`, or if no account is enabled.
pub(super) fn why_no_account(
    slots: &[RingSlot],
    now: std::time::Instant,
    upstream_refused: bool,
) -> RefusedBy {
    use std::sync::atomic::Ordering;
    if upstream_refused {
        return RefusedBy::Upstream;
    }
    let mut upstream = false;
    for s in slots {
        let a = &s.account;
        if !a.enabled.load(Ordering::Relaxed) {
            continue;
        }
        if !a.healthy(now) || a.cooling_down(now).is_some() {
            upstream = true;
            continue;
        }
        let live = a.live.load(Ordering::Relaxed);
        if live >= a.max_concurrent.load(Ordering::Relaxed) {
            return RefusedBy::RelayLimit;
        }
        if live >= a.effective_max() {
            upstream = true; // upstream's own concurrency limit
        }
    }
    if upstream {
        RefusedBy::Upstream
    } else {
        RefusedBy::RelayLimit
    }
}
