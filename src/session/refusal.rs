//! The refusal the relay sends when it ends a stream itself: one text frame
//! in Soniox's error shape, then a close frame.

use crate::frame::{build_frame, close_payload, Opcode};
use crate::metrics::Side;

/// What a stream refused at the file limit is told.
const FILE_LIMIT: &str = "Relay at its file limit; try again later.";

/// A refusal after the upgrade: one Soniox-shaped error frame, then a close.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Soniox error code (400, 401, 408, 429, 502, 503).
    pub code: u16,
    /// Soniox `error_type`.
    pub kind: &'static str,
    /// Human message. Never contains a token or key.
    pub message: String,
    /// WebSocket close code.
    pub close: u16,
    /// Who caused it, for metrics.
    pub side: Side,
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
        }
    }
    /// No error frame: just a close frame with `close` (0: not even that).
    pub(super) fn silent(close: u16) -> Self {
        Refusal::new(0, "", "", close, Side::Client)
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(400, "bad_request", message, 1002, Side::Client)
    }
    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Refusal::new(401, "unauthenticated", message, 1008, Side::Client)
    }
    pub(super) fn no_account() -> Self {
        Refusal::new(
            429,
            "too_many_requests",
            "No Soniox account can take another stream now; try again later.",
            1013,
            Side::Upstream,
        )
    }
    pub(super) fn upstream_unavailable() -> Self {
        Refusal::new(
            502,
            "upstream_unavailable",
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
    }
    /// Upstream answered the upgrade with 400 or 404: the relay's
    /// `upstream.url` is wrong. No account is to blame and none is tried.
    pub(super) fn upstream_misconfigured(status: u16) -> Self {
        Refusal::new(
            502,
            "upstream_misconfigured",
            format!(
                "The relay is misconfigured: the transcription service answered its \
                 WebSocket upgrade with HTTP {status} (wrong upstream URL). This is not a \
                 capacity limit; retrying will not help until the relay's operator fixes it."
            ),
            1011,
            Side::Upstream,
        )
    }
    /// A device limit or a revocation.
    pub(super) fn device(limit: crate::devices::Limit, message: String) -> Self {
        use crate::devices::Limit;
        match limit {
            Limit::Revoked => Refusal::new(401, "unauthenticated", message, 1008, Side::Client),
            Limit::Concurrent | Limit::Rate => {
                Refusal::new(429, "too_many_requests", message, 1013, Side::Client)
            }
            Limit::DailyAudio | Limit::MaxLength => {
                Refusal::new(429, "too_many_requests", message, 1008, Side::Client)
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

    /// The error frame and the close frame, as the relay writes them to a client.
    pub fn frames(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "tokens": [],
            "error_code": self.code,
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
