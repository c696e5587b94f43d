//! How long a thread has been waiting on a disk write.
//!
//! The admin thread's state files (the key store, the revocations, the
//! key dates, the usage ledger) are written, each synced with `fsync`, on
//! its executor's blocking thread, and the admin thread answers meanwhile.
//! But some of its work waits for such a write with the main thread's
//! messages held, the watchdog's liveness ping among them: a reload (which
//! dates new keys and saves the key store) and a stop's last flush. On a
//! slow disk (a network file system, a failing drive, a host's I/O storm)
//! one write can take many seconds. A thread waiting on the kernel is not
//! hung: the write ends when the disk answers, and a restart (what systemd
//! does to a relay whose watchdog stops) would not make the disk faster;
//! it would cut every live stream, and the new process would meet the
//! same disk.
//!
//! So the thread says when it waits on such a write. A thread [`watch`]es
//! a [`DiskWait`]; each write it makes or waits for holds a [`writing`]
//! guard for as long as the write takes; the watchdog, on a ping unanswered, asks
//! [`DiskWait::waiting`] and counts a thread inside a write as alive
//! (`RelayHandle::alive`). The cost is two atomic stores per write, and
//! nothing on a thread that watches none (the shards write no files).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether, and since when, the thread watching it is inside a disk write.
#[derive(Debug)]
pub struct DiskWait {
    origin: Instant,
    /// When the outermost write under way began, in µs since `origin`,
    /// plus one; 0 when none is.
    since: AtomicU64,
    /// Writes under way (a write of a file syncs its directory inside).
    depth: AtomicU32,
}

impl DiskWait {
    /// No write under way yet.
    pub fn new() -> Arc<DiskWait> {
        Arc::new(DiskWait {
            origin: Instant::now(),
            since: AtomicU64::new(0),
            depth: AtomicU32::new(0),
        })
    }

    /// How long the write under way has taken so far; `None` when the
    /// watching thread is in none.
    pub fn waiting(&self) -> Option<Duration> {
        match self.since.load(Ordering::Acquire) {
            0 => None,
            began => {
                let began = self.origin + Duration::from_micros(began - 1);
                Some(Instant::now().saturating_duration_since(began))
            }
        }
    }

    fn enter(&self) {
        if self.depth.fetch_add(1, Ordering::AcqRel) == 0 {
            let now = self.origin.elapsed().as_micros() as u64;
            self.since.store(now + 1, Ordering::Release);
        }
    }

    fn leave(&self) {
        if self.depth.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.since.store(0, Ordering::Release);
        }
    }
}

thread_local! {
    static WATCHED: RefCell<Option<Arc<DiskWait>>> = const { RefCell::new(None) };
}

/// From now on, this thread's writes ([`writing`]) are seen in `wait`.
pub fn watch(wait: Arc<DiskWait>) {
    WATCHED.with(|w| *w.borrow_mut() = Some(wait));
}

/// A disk write under way on this thread, until dropped (also by a panic
/// or an early return).
#[derive(Debug)]
#[must_use = "the write is counted only while the guard lives"]
pub struct Writing(Option<Arc<DiskWait>>);

/// Marks a disk write (a file written, synced, renamed; a directory made or
/// synced; a database commit) on this thread, for as long as the guard
/// lives. Nothing on a thread that [`watch`]es no [`DiskWait`].
pub fn writing() -> Writing {
    let wait = WATCHED.with(|w| w.borrow().clone());
    if let Some(w) = &wait {
        w.enter();
    }
    Writing(wait)
}

impl Drop for Writing {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_thread_is_waiting_while_a_write_lasts_and_not_after() {
        let wait = DiskWait::new();
        let seen = wait.clone();
        let (inside_tx, inside_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        // Before the thread runs: after, it may be inside already.
        assert_eq!(seen.waiting(), None);
        let writer = std::thread::spawn(move || {
            watch(wait);
            let _outer = writing();
            {
                // A write inside another (the directory's sync) ends
                // before it; the outer one is still under way.
                let _inner = writing();
            }
            inside_tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        inside_rx.recv().unwrap();
        assert!(seen.waiting().is_some(), "the outer write is under way");
        done_tx.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(seen.waiting(), None, "the write ended with its guard");
    }

    #[test]
    fn a_write_ended_by_a_panic_is_over() {
        let wait = DiskWait::new();
        let seen = wait.clone();
        let r = std::thread::spawn(move || {
            watch(wait);
            let _w = writing();
            panic!("a write that fails by panicking");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(seen.waiting(), None);
    }

    #[test]
    fn an_unwatched_thread_counts_nothing() {
        let wait = DiskWait::new();
        // This thread watches no DiskWait (each test has its own thread).
        let _w = writing();
        assert_eq!(wait.waiting(), None);
    }
}
