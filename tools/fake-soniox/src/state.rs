//! The fake's shared state: session records, live counts per key, the
//! temporary keys the REST API issued, and the REST call log; and the
//! Soniox error types and messages it answers with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::*;

/// State shared by the shards and the test thread. A mutex is fine in a
/// test fake; the echo audio path avoids it unless audio is recorded.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: FakeConfig,
    state: Mutex<State>,
    next_request: AtomicU64,
    /// Some key's sessions are failing ([`State::failing`]): only then
    /// does an audio frame take the lock to look.
    any_failing: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Index `id - 1`.
    pub(crate) sessions: Vec<SessionRecord>,
    pub(crate) violations: Vec<String>,
    /// Live sessions per (configured) key, for the concurrency limit.
    pub(crate) live: HashMap<String, u32>,
    pub(crate) active: usize,
    /// The configured keys; `reject` changes at run time.
    pub(crate) keys: Vec<FakeKey>,
    /// Temporary keys issued by the REST API.
    pub(crate) temp_keys: HashMap<String, TempKey>,
    pub(crate) rest_status: Option<u16>,
    pub(crate) rest_calls: Vec<RestCall>,
    /// Configured keys whose sessions, live or new, fail at their next
    /// audio frame, and how ([`FakeSoniox::fail_sessions_of`]).
    pub(crate) failing: HashMap<String, FaultKind>,
    /// Sessions that stopped reading (the stall fault), with their key's
    /// place: freed once their peer has closed or reset the connection.
    pub(crate) stalled: Vec<Stalled>,
}

/// A stalled session's socket and concurrency slot ([`Shared::stall`]).
#[derive(Debug)]
pub(crate) struct Stalled {
    id: u64,
    fd: std::os::fd::RawFd,
    slot: Option<Slot>,
}

/// Whether the peer of the TCP socket `fd` has closed its side (FIN) or
/// reset the connection, read or not: what a server that stopped reading
/// learns from its socket's poll.
pub(crate) fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid `pollfd`, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A stalled session's entry in [`State::stalled`]: removed (its slot
/// freed, if a claim has not freed it already) when the session ends.
pub(crate) struct StallGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        let entry = {
            let mut st = self.shared.lock();
            let at = st.stalled.iter().position(|s| s.id == self.id);
            at.map(|i| st.stalled.swap_remove(i))
        };
        // The slot's own drop takes the lock: after it is released.
        drop(entry);
    }
}

/// A temporary API key and the configured key it was issued for.
#[derive(Debug, Clone)]
pub(crate) struct TempKey {
    pub(crate) parent: String,
    pub(crate) expires: Instant,
    pub(crate) single_use: bool,
    pub(crate) used: bool,
    pub(crate) client_reference_id: Option<String>,
}

impl State {
    /// The configured key that `key` is or was issued for.
    pub(crate) fn owner<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        if self.keys.iter().any(|k| k.key == key) {
            Some(key)
        } else {
            self.temp_keys.get(key).map(|t| t.parent.as_str())
        }
    }
}

/// Models the fake knows (WebSocket `model` and `GET /v1/models`).
pub(crate) const MODELS: [&str; 4] = ["stt-rt-v3", "stt-rt-v4", "stt-rt-v5", "stt-rt-preview"];

/// Why a key was refused: HTTP/Soniox code and message.
pub(crate) type Refusal = (u16, &'static str);

impl Shared {
    pub(crate) fn new(cfg: FakeConfig) -> Shared {
        let state = State {
            keys: cfg.keys.clone(),
            rest_status: cfg.faults.rest_status,
            ..State::default()
        };
        Shared {
            cfg,
            state: Mutex::new(state),
            next_request: AtomicU64::new(1),
            any_failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes every session of `key` (a configured key; its temporary
    /// keys' sessions too) fail with `kind` at its next audio frame, or
    /// with `None` no longer.
    pub(crate) fn fail_sessions_of(&self, key: &str, kind: Option<FaultKind>) {
        let mut st = self.lock();
        match kind {
            Some(kind) => st.failing.insert(key.to_owned(), kind),
            None => st.failing.remove(key),
        };
        self.any_failing
            .store(!st.failing.is_empty(), Ordering::Relaxed);
    }

    /// How a session with `key` fails now, if its key's sessions do.
    pub(crate) fn failing(&self, key: Option<&str>) -> Option<FaultKind> {
        if !self.any_failing.load(Ordering::Relaxed) {
            return None;
        }
        let st = self.lock();
        let parent = st.owner(key?)?;
        st.failing.get(parent).copied()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the records from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh `request_id` for an error.
    pub(crate) fn request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("fake-{n:016x}")
    }

    /// Starts a record for a new connection and returns its id.
    pub(crate) fn new_session(&self, path: String, headers: Vec<(String, String)>) -> u64 {
        let mut st = self.lock();
        let id = st.sessions.len() as u64 + 1;
        st.sessions.push(SessionRecord {
            id,
            request_path: path,
            request_headers: headers,
            created_at: Some(SystemTime::now()),
            ..SessionRecord::default()
        });
        id
    }

    /// Runs `f` on the record of session `id`.
    pub(crate) fn with_record<R>(&self, id: u64, f: impl FnOnce(&mut SessionRecord) -> R) -> R {
        let mut st = self.lock();
        f(&mut st.sessions[(id - 1) as usize])
    }

    pub(crate) fn violation(&self, what: String) {
        tracing::warn!("fake-soniox: {what}");
        self.lock().violations.push(what);
    }

    /// Checks `key` (configured, or a live temporary key) and takes one of
    /// its (parent's) concurrency slots.
    pub(crate) fn claim(self: &Arc<Self>, key: &str) -> Result<Slot, Refusal> {
        // A stalled session whose peer has gone no longer counts, though
        // its task has yet to notice: as upstream's kernel has the reset
        // before the peer's next upgrade, its limit no longer counts it.
        drop(self.free_stalled());
        let mut st = self.lock();
        let parent = if st.keys.iter().any(|k| k.key == key) {
            key.to_owned()
        } else {
            match st.temp_keys.get(key) {
                None => return Err((401, "Invalid API key.")),
                Some(t) if t.expires <= Instant::now() => {
                    return Err((401, "Temporary API key expired."))
                }
                Some(t) if t.single_use && t.used => {
                    return Err((401, "Temporary API key already used."))
                }
                Some(t) => t.parent.clone(),
            }
        };
        let Some(k) = st.keys.iter().find(|k| k.key == parent) else {
            return Err((401, "Invalid API key."));
        };
        if let Some(code) = k.reject {
            return Err((code, refusal_message(code)));
        }
        let max = k.max_concurrent;
        let live = st.live.entry(parent.clone()).or_insert(0);
        if *live >= max {
            return Err((
                429,
                "Too many concurrent requests: project level concurrency limit exceeded.",
            ));
        }
        *live += 1;
        if let Some(t) = st.temp_keys.get_mut(key) {
            t.used = true;
        }
        Ok(Slot {
            shared: self.clone(),
            key: parent,
        })
    }
}

impl Shared {
    /// Registers session `id`, stalled on socket `fd`, with its `slot`:
    /// held until the peer closes or resets the connection.
    pub(crate) fn stall(
        self: &Arc<Self>,
        id: u64,
        fd: std::os::fd::RawFd,
        slot: Option<Slot>,
    ) -> StallGuard {
        self.lock().stalled.push(Stalled { id, fd, slot });
        StallGuard {
            shared: self.clone(),
            id,
        }
    }

    /// The slots of stalled sessions whose peer has gone, taken out of
    /// [`State::stalled`] for the caller to drop (outside the lock).
    fn free_stalled(&self) -> Vec<Slot> {
        let mut st = self.lock();
        st.stalled
            .iter_mut()
            .filter(|s| s.slot.is_some() && peer_gone(s.fd))
            .filter_map(|s| s.slot.take())
            .collect()
    }
}

/// One live session's hold on its key's concurrency limit; freed on drop,
/// however the session ends.
#[derive(Debug)]
pub(crate) struct Slot {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(n) = self.shared.lock().live.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Soniox's `error_type` for a code (best guess where the docs are silent).
pub(crate) fn error_type(code: u16) -> &'static str {
    match code {
        400 | 411 | 413 => "invalid_request",
        401 => "unauthenticated",
        402 => "payment_required",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        429 => "rate_limit_exceeded",
        503 => "service_unavailable",
        _ => "internal_error",
    }
}

/// A message for a key refused with `code` via [`FakeKey::reject`] or a fault.
pub(crate) fn refusal_message(code: u16) -> &'static str {
    match code {
        400 => "Bad request.",
        401 => "Invalid API key.",
        402 => "Organization balance exhausted.",
        404 => "Not found.",
        405 => "Method not allowed.",
        408 => "Request timeout.",
        429 => "Rate limit exceeded.",
        503 => "Cannot continue request.",
        _ => "Internal error.",
    }
}
