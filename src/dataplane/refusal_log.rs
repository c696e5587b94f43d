//! The log lines of refused requests and streams, bounded.
//!
//! Every refusal is counted in the metrics (`streams_rejected_total`,
//! `refusals_total`), and the first [`PER_WINDOW`] of each [`WINDOW`] in
//! the whole process are logged one by one at INFO. Past that, a peer that
//! sends request after request (a bad token, a wrong path, a scanner) would
//! write a line each: thousands a second from one client, enough to fill a
//! disk or make journald drop the lines that matter. The rest are counted,
//! and one line says how many were not logged, once the window is over.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The window the budget of lines is for.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Refusals logged one by one per window, for the whole process.
pub const PER_WINDOW: u64 = 20;

/// The process's budget of refusal lines (in `ProcessState`, shared by the
/// shards).
#[derive(Debug)]
pub struct RefusalLog {
    start: Instant,
    /// The window (counted from `start`) that `logged` and `unlogged` are for.
    window: AtomicU64,
    /// Refusals of the window so far, logged or not.
    logged: AtomicU64,
    /// Refusals of the window not logged.
    unlogged: AtomicU64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            start: Instant::now(),
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }
}

impl RefusalLog {
    /// Counts one refusal; whether to log it (within the window's budget).
    pub fn admit(&self) -> bool {
        self.roll();
        if self.logged.fetch_add(1, Relaxed) < PER_WINDOW {
            true
        } else {
            self.unlogged.fetch_add(1, Relaxed);
            false
        }
    }

    /// Once a window is over: the line saying how many of its refusals
    /// were not logged (the admin thread calls this every second, so the
    /// line comes when a flood stops too).
    pub fn roll(&self) {
        let now = self.start.elapsed().as_secs() / WINDOW.as_secs();
        let was = self.window.load(Relaxed);
        if now == was
            || self
                .window
                .compare_exchange(was, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        self.logged.store(0, Relaxed);
        let n = self.unlogged.swap(0, Relaxed);
        if n > 0 {
            tracing::info!(
                not_logged = n,
                per = ?WINDOW,
                "refusals not logged one by one: more than {PER_WINDOW} in {WINDOW:?}; \
                 clio_relay_streams_rejected_total and clio_relay_refusals_total count every one"
            );
        }
    }
}
