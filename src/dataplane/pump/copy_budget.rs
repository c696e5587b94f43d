//! One memory budget for the resume copies of every raw-audio stream in the
//! process (`failover.resume_memory`).
//!
//! A stream's copy is bounded by `failover.resume_audio` of its own format,
//! but how much of that bound it holds is up to upstream's final tokens: a
//! stream whose audio brings none (silence, noise, an upstream that
//! finalizes late) keeps the whole bound, and 30 s of 48 kHz stereo 16-bit
//! audio is 5.8 MB. Times `server.max_streams`, that is more memory than a
//! host has. So the copies share one budget: a copy that would grow past it
//! lets go of its audio instead, for good. That stream goes on and loses
//! nothing, but a later upstream failure reaches its client as if its
//! resumes were used up; every other stream keeps its copy.
//!
//! One budget for the process, not a share per shard, for the reason the
//! account limits are counted that way: a split strands memory on the shard
//! with fewer streams. Copies change their storage rarely (they grow by
//! doubling and give it back when final tokens empty them), so an atomic add
//! per change costs nothing on the frame path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The process's budget for resume copies: bytes of storage held now, the
/// limit, and the copies let go at the limit.
#[derive(Debug)]
pub struct CopyBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
    dropped: AtomicU64,
}

impl CopyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> CopyBudget {
        CopyBudget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Sets the limit (a reload). Copies already past a lowered limit keep
    /// their storage; none grows until the total is under it again.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The limit, bytes.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes of storage the copies hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Copies let go because they would have passed the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes if the total stays within the limit.
    pub fn try_take(&self, n: usize) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= limit)
            })
            .is_ok()
    }

    /// Takes `n` bytes whatever the limit (storage already allocated).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives back `n` bytes.
    pub fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether the copies hold more than the limit.
    pub fn over(&self) -> bool {
        self.used() > self.limit()
    }

    /// Counts a copy let go at the limit.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of the budget.
    pub fn render(&self, out: &mut String) {
        use crate::core::metrics::text::{family, Kind};
        family(
            out,
            "clio_relay_resume_copy_bytes",
            Kind::Gauge,
            "Memory the raw-audio streams' resume copies hold now, bytes.",
        )
        .sample(&[], self.used() as u64);
        family(
            out,
            "clio_relay_resume_copy_limit_bytes",
            Kind::Gauge,
            "failover.resume_memory: the most the resume copies may hold together, bytes.",
        )
        .sample(&[], self.limit() as u64);
        family(
            out,
            "clio_relay_resume_copies_dropped_total",
            Kind::Counter,
            "Streams that let go of their resume copy at failover.resume_memory; a later upstream failure reaches their client.",
        )
        .sample(&[], self.dropped());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_only_what_fits_and_counts_back_to_zero() {
        let b = CopyBudget::new(1000);
        assert!(b.try_take(600));
        assert!(!b.try_take(401), "past the limit");
        assert!(b.try_take(400));
        assert!(!b.over());
        b.take(10);
        assert!(b.over(), "storage already allocated is counted");
        b.give_back(1010);
        assert_eq!(b.used(), 0);
        b.set_limit(0);
        assert!(!b.try_take(1));
        assert!(b.try_take(0));
    }
}
