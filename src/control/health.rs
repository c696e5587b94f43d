//! Active health checks: every `admin.health_interval`, each account's
//! current key is tried against upstream's REST API on the admin thread.
//!
//! - `GET /v1/models` answers whether the key is valid: 200 clears an
//!   account held off after a 401/402; 401/402 marks it unhealthy on every
//!   shard until a later check passes.
//! - `GET /v1/concurrency-limits` gives the project's live use and limit;
//!   the room it leaves (limit − use by others) caps the account's headroom
//!   in every key ring.
//!
//! An unreachable REST API (network error, 5xx) says nothing about the key
//! and changes nothing; it is counted and logged.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::httpc::{self, client, Endpoint, Request};
use crate::core::config::{parse_ws_url, UrlError};
use crate::core::keyring::{AccountState, KeySlot, NO_UPSTREAM_CAP};
use crate::dataplane::buf::BufferPool;
use crate::dataplane::upstream::UpstreamFault;

/// The bound on a REST answer: a page of 1000 usage logs fits.
const MAX_REST_BODY: usize = 4 << 20;

/// Where upstream's REST API is.
#[derive(Debug, Clone)]
pub struct RestTarget {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why a pool's REST API cannot be reached at all (its health checks are
/// then off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestUrlError {
    /// The WebSocket URL, or the REST URL made from it, does not parse.
    Url(UrlError),
    /// The REST URL is `https` but no TLS client config was given.
    NoTls,
}

impl std::fmt::Display for RestUrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestUrlError::Url(e) => e.fmt(f),
            RestUrlError::NoTls => f.write_str("an https REST URL needs a TLS config"),
        }
    }
}

impl std::error::Error for RestUrlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RestUrlError::Url(e) => Some(e),
            RestUrlError::NoTls => None,
        }
    }
}

impl From<UrlError> for RestUrlError {
    fn from(e: UrlError) -> Self {
        RestUrlError::Url(e)
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The key works.
    Healthy,
    /// Upstream refused the key with this status (401, 402).
    Refused(u16),
    /// The REST API could not be asked (network, TLS, 5xx): no verdict.
    Unknown,
}

impl RestTarget {
    /// The REST base: `rest_url` if set, else derived from the WebSocket URL
    /// (`wss://stt-rt.X/…` → `https://api.X`, and for other hosts the same
    /// host and port, which is how fake-soniox serves both).
    pub fn new(
        ws_url: &str,
        rest_url: Option<&str>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<RestTarget, RestUrlError> {
        let url = match rest_url {
            Some(u) => u
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1),
            None => {
                let ws = parse_ws_url(ws_url)?;
                let host = ws
                    .host
                    .strip_prefix("stt-rt.")
                    .map(|rest| format!("api.{rest}"))
                    .unwrap_or(ws.host.clone());
                let scheme = if ws.tls { "wss" } else { "ws" };
                // An IPv6 address goes back in its brackets.
                if host.contains(':') {
                    format!("{scheme}://[{host}]:{}/", ws.port)
                } else {
                    format!("{scheme}://{host}:{}/", ws.port)
                }
            }
        };
        let ep = parse_ws_url(&url)?;
        let tls = if ep.tls {
            Some(tls.ok_or(RestUrlError::NoTls)?)
        } else {
            None
        };
        Ok(RestTarget {
            host: ep.host,
            port: ep.port,
            tls,
        })
    }

    /// `GET path` with the key as bearer token; returns status and body.
    pub async fn get(
        &self,
        path: &str,
        key: &KeySlot,
        limit: Duration,
    ) -> Result<(u16, Vec<u8>), httpc::Error> {
        let ep = Endpoint {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls.clone(),
        };
        let req = Request::get(path)
            .header("Accept", "application/json")
            .bearer(key.key.expose())
            .max_body(MAX_REST_BODY);
        let r = client::send(&ep, &req, limit).await?;
        Ok((r.status, r.body))
    }

    /// Checks one account's current key and applies the result to the
    /// shared account state (seen by every shard at once).
    pub async fn check(&self, account: &AccountState, key: &KeySlot, limit: Duration) -> Verdict {
        let verdict = match self.get("/v1/models", key, limit).await {
            Ok((200, _)) => Verdict::Healthy,
            Ok((s @ 401..=403, _)) => Verdict::Refused(s),
            Ok(_) | Err(_) => Verdict::Unknown,
        };
        match verdict {
            Verdict::Healthy => account.mark_ok(),
            Verdict::Refused(_) => account.mark_unhealthy(Instant::now()),
            Verdict::Unknown => return verdict,
        }
        if verdict == Verdict::Healthy {
            if let Ok((200, body)) = self.get("/v1/concurrency-limits", key, limit).await {
                account
                    .upstream_cap
                    .store(upstream_room(&body, account), Ordering::Relaxed);
            }
        }
        verdict
    }
}

/// From a `/v1/concurrency-limits` answer, how many streams this relay may
/// have on the key: the limit minus what others use (upstream's count
/// includes this relay's own live streams).
fn upstream_room(body: &[u8], account: &AccountState) -> u32 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return NO_UPSTREAM_CAP;
    };
    let p = &v["project"];
    let (Some(current), Some(limit)) = (
        p["current"]["transcribe_concurrent"].as_u64(),
        p["limits"]["transcribe_concurrent"].as_u64(),
    ) else {
        return NO_UPSTREAM_CAP;
    };
    let ours = account.live.load(Ordering::Relaxed) as u64;
    let others = current.saturating_sub(ours);
    limit.saturating_sub(others).min(u32::MAX as u64 - 1) as u32
}

/// Tries the real WebSocket endpoint (`upstream.url`) with an upgrade that
/// carries no key, and records what it shows in `fault`:
///
/// - a status that says the URL is wrong ([`UpstreamFault::is_config_fault`]); the fault is set (true when that is news);
/// - 101, or any other refusal (a 401 for the missing key): the endpoint is
///   there; a standing fault is cleared;
/// - unreachable: nothing is learnt, nothing changes.
///
/// Returns the status upstream answered, if it answered.
pub async fn probe_websocket(
    target: &crate::dataplane::upstream::UpstreamTarget,
    fault: &UpstreamFault,
    limit: Duration,
) -> Option<u16> {
    use crate::dataplane::upstream::ConnectError;
    let pool = BufferPool::new(16 * 1024, 1, 1);
    let mut buf = pool.get();
    let no_key = crate::core::secret::Secret::new(String::new());
    // rustls's reason for a refused certificate (for another name,
    // expired, of an unknown CA): the operator's only way to tell which.
    let mut why = None;
    let status = match target.connect(&no_key, false, &mut buf, limit, 0).await {
        Ok(conn) => {
            // Upgraded: say goodbye at once (a masked close, no config sent).
            let close = clio_frame::frame::build_frame(
                clio_frame::frame::Opcode::Close,
                &clio_frame::frame::close_payload(1000, ""),
                Some([0x5a, 0xa5, 0x3c, 0xc3]),
            );
            let _ = conn.write_all(&close).await;
            101
        }
        Err(ConnectError::Refused(status, _)) => status,
        Err(ConnectError::Certificate(reason)) => {
            why = Some(reason);
            UpstreamFault::CERTIFICATE
        }
        Err(e) => {
            tracing::debug!(error = ?e, "WebSocket probe could not reach upstream");
            return None;
        }
    };
    if UpstreamFault::is_config_fault(status) {
        if fault.set(status) {
            match why {
                Some(why) => {
                    tracing::error!(status, why = %why, "{}", UpstreamFault::describe(status))
                }
                None => tracing::error!(status, "{}", UpstreamFault::describe(status)),
            }
        }
    } else if fault.clear() {
        tracing::info!(
            status,
            "upstream's WebSocket endpoint answers again; the configuration fault is cleared"
        );
    }
    Some(status)
}

/// Counts of check outcomes, for `/metrics`.
#[derive(Debug, Default)]
pub struct CheckCounts {
    /// Checks that found the key valid.
    pub healthy: Cell<u64>,
    /// Checks where upstream refused the key.
    pub refused: Cell<u64>,
    /// Checks that could not reach the REST API.
    pub unknown: Cell<u64>,
}

impl CheckCounts {
    /// Adds one outcome.
    pub fn add(&self, v: Verdict) {
        let c = match v {
            Verdict::Healthy => &self.healthy,
            Verdict::Refused(_) => &self.refused,
            Verdict::Unknown => &self.unknown,
        };
        c.set(c.get() + 1);
    }

    /// `clio_relay_health_checks_total{result}` for `/metrics`.
    pub fn render(&self, out: &mut String) {
        use crate::core::metrics::text::{family, Kind};
        family(
            out,
            "clio_relay_health_checks_total",
            Kind::Counter,
            "Active key checks against upstream's REST API, by result.",
        )
        .sample(&[("result", "healthy")], self.healthy.get())
        .sample(&[("result", "refused")], self.refused.get())
        .sample(&[("result", "unreachable")], self.unknown.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_url_is_derived_from_the_websocket_url() {
        let tls = crate::dataplane::upstream::tls_client_config(None).unwrap();
        let t = RestTarget::new(
            "wss://stt-rt.eu.soniox.com/transcribe-websocket",
            None,
            Some(tls.clone()),
        )
        .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_some()),
            ("api.eu.soniox.com", 443, true)
        );
        let t = RestTarget::new("ws://127.0.0.1:7300/transcribe-websocket", None, None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_some()),
            ("127.0.0.1", 7300, false)
        );
        let t = RestTarget::new("ws://[::1]:7300/transcribe-websocket", None, None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7300));
        let t =
            RestTarget::new("ws://x/", Some("https://api.example.com:8443"), Some(tls)).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("api.example.com", 8443));
    }

    #[test]
    fn room_is_the_limit_minus_what_others_use() {
        let a = AccountState::new("a", 0, "", "default", true, 100, Instant::now());
        a.live.store(3, Ordering::Relaxed);
        let body = br#"{"project":{"current":{"transcribe_concurrent":5},"limits":{"transcribe_concurrent":10}}}"#;
        assert_eq!(upstream_room(body, &a), 8, "10 - (5 - our 3)");
        assert_eq!(upstream_room(b"{}", &a), NO_UPSTREAM_CAP);
    }
}
