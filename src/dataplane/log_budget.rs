//! Log lines that a peer's misbehaviour repeats, bounded.
//!
//! Some lines come once per request or per connection attempt: a refused
//! request or stream, an upstream connect that failed. Every such event is
//! counted in the metrics, and the first [`PER_WINDOW`] of each kind in
//! each [`WINDOW`] are logged one by one, for the whole process. Past
//! that, one peer (a client sending request after request with a bad
//! token, a scanner, an upstream refusing every connection while clients
//! retry) would write a line each: thousands a second, enough to fill a
//! disk or make journald drop the lines that matter. The rest are counted,
//! and once the window is over one line says how many were not logged.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The window the budget of lines is for.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines of one kind logged one by one per window, for the whole process.
pub const PER_WINDOW: u64 = 20;

/// The process's budget of lines of one kind (in `ProcessState`, shared by
/// the shards).
#[derive(Debug)]
pub struct LogBudget {
    /// What the lines are about, in the count's line ("refusals").
    what: &'static str,
    /// Where every one of them is counted, for the count's line.
    counted_in: &'static str,
    start: Instant,
    /// The window (counted from `start`) that `seen` and `unlogged` are for.
    window: AtomicU64,
    /// Events of the window so far, logged or not.
    seen: AtomicU64,
    /// Events of the window not logged.
    unlogged: AtomicU64,
}

impl LogBudget {
    /// A budget for lines about `what`, each also counted in `counted_in`.
    pub fn new(what: &'static str, counted_in: &'static str) -> LogBudget {
        LogBudget {
            what,
            counted_in,
            start: Instant::now(),
            window: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Counts one event; whether to log its line (within the window's budget).
    pub fn admit(&self) -> bool {
        self.roll();
        if self.seen.fetch_add(1, Relaxed) < PER_WINDOW {
            true
        } else {
            self.unlogged.fetch_add(1, Relaxed);
            false
        }
    }

    /// Once a window is over: the line saying how many of its events were
    /// not logged (the admin thread calls this every second, so the line
    /// comes when a flood stops too).
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
        self.seen.store(0, Relaxed);
        let n = self.unlogged.swap(0, Relaxed);
        if n > 0 {
            tracing::info!(
                not_logged = n,
                per = ?WINDOW,
                "{} not logged one by one: more than {PER_WINDOW} in {WINDOW:?}; {} count every one",
                self.what,
                self.counted_in,
            );
        }
    }
}
