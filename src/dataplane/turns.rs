//! Whose turn a shard's time is: its live streams' first, TLS handshakes'
//! in what the streams leave, and at least [`SHARE`] of it while they
//! keep the shard busy.
//!
//! A server's handshake signs (an RSA-4096 signature is about 4 ms of one
//! core; P-256 about 20 µs), on the shard's own thread, and a peer asks
//! for one with a connect and a ClientHello. With every task in one queue,
//! a flood of hellos took a shard's whole time: the streams' frames, and
//! the watchdog's checks, waited behind every handshake queued before them
//! (about 250 hellos a second at one shard holding an RSA-4096 key ended a
//! live stream and missed the watchdog's checks).
//!
//! Now each step of a server handshake ([`InTurn`]) runs only in a turn:
//! - while the shard's data plane has nothing to do (its driver, about to
//!   sleep, hands one turn out instead, [`idle`]), so handshakes get all
//!   the time the streams leave, one step between two looks at the
//!   sockets;
//! - or from a credit that grows at [`SHARE`] of the time that passes, up
//!   to [`CREDIT_MAX`], and that each step's time is taken from, so that
//!   streams that keep the shard busy still leave handshakes a part of it.
//!
//! Handshakes waiting for a turn wait in order; one whose connection ends
//! meanwhile (`limits.handshake_timeout`, a drain) leaves its place empty.
//! A frame arriving during a flood waits for at most the step running and
//! the credit's worth after it (a few ms), where it waited for the whole
//! queue of hellos before.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The part of a busy shard's time that handshakes may take.
pub const SHARE: f64 = 0.25;

/// The most credit kept: what handshakes may take at once after the
/// streams kept the shard busy for a while.
pub const CREDIT_MAX: Duration = Duration::from_millis(5);

/// A waiting handshake's place in the queue.
#[derive(Debug, Default)]
struct Place {
    /// Its task, while it waits; taken when it is woken or gone.
    waker: RefCell<Option<Waker>>,
    /// In the queue (at most once at a time).
    queued: Cell<bool>,
}

/// The turns of one shard (one per thread).
#[derive(Debug)]
struct Turns {
    waiting: RefCell<VecDeque<Rc<Place>>>,
    /// Waiting places, empty ones included (a cheap look for the driver).
    queued: Cell<usize>,
    /// Turns handed out by an idle data plane, not yet taken.
    idle_turns: Cell<u32>,
    /// Time handshakes may take now, in ns; below zero after a long step.
    credit_ns: Cell<i64>,
    credited: Cell<Instant>,
}

thread_local! {
    static TURNS: Turns = Turns {
        waiting: RefCell::new(VecDeque::new()),
        queued: Cell::new(0),
        idle_turns: Cell::new(0),
        credit_ns: Cell::new(CREDIT_MAX.as_nanos() as i64),
        credited: Cell::new(Instant::now()),
    };
}

impl Turns {
    /// The credit now, grown at [`SHARE`] since it was last looked at.
    fn credit(&self, now: Instant) -> i64 {
        let grown = now
            .saturating_duration_since(self.credited.get())
            .as_nanos() as f64
            * SHARE;
        let credit = (self.credit_ns.get() as f64 + grown).min(CREDIT_MAX.as_nanos() as f64);
        self.credit_ns.set(credit as i64);
        self.credited.set(now);
        credit as i64
    }

    /// Whether a step may run now: an idle turn, or credit left.
    fn take(&self) -> bool {
        if self.idle_turns.get() > 0 {
            self.idle_turns.set(self.idle_turns.get() - 1);
            return true;
        }
        self.credit(Instant::now()) > 0
    }

    fn spent(&self, took: Duration) {
        let floor = -(CREDIT_MAX.as_nanos() as i64);
        let left = self.credit_ns.get() - took.as_nanos() as i64;
        self.credit_ns.set(left.max(floor));
    }

    fn wait(&self, place: &Rc<Place>, waker: &Waker) {
        *place.waker.borrow_mut() = Some(waker.clone());
        if !place.queued.replace(true) {
            self.waiting.borrow_mut().push_back(place.clone());
            self.queued.set(self.queued.get() + 1);
        }
    }

    /// Wakes the first handshake still waiting; false if none is.
    fn wake_one(&self) -> bool {
        loop {
            let Some(place) = self.waiting.borrow_mut().pop_front() else {
                return false;
            };
            self.queued.set(self.queued.get() - 1);
            place.queued.set(false);
            let waker = place.waker.borrow_mut().take();
            if let Some(w) = waker {
                w.wake();
                return true;
            }
        }
    }
}

/// Called by the data plane's driver when it would sleep, having nothing
/// to do: hands one turn to the first waiting handshake and returns true
/// (the driver then lets it run before it looks at its sockets again), or
/// returns false if none waits.
pub fn idle() -> bool {
    TURNS.with(|t| {
        if t.queued.get() == 0 || !t.wake_one() {
            return false;
        }
        t.idle_turns.set(t.idle_turns.get() + 1);
        true
    })
}

/// Called by the driver on each of its rounds: wakes the first waiting
/// handshake if credit has grown back. One `Cell` read when none waits.
pub fn credit_grown() {
    TURNS.with(|t| {
        if t.queued.get() > 0 && t.credit(Instant::now()) > 0 {
            t.wake_one();
        }
    })
}

/// A handshake's future, each step of it run in a turn.
pub struct InTurn<F> {
    inner: Pin<Box<F>>,
    place: Option<Rc<Place>>,
}

impl<F> std::fmt::Debug for InTurn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InTurn")
            .field(
                "waiting",
                &self.place.as_ref().is_some_and(|p| p.queued.get()),
            )
            .finish_non_exhaustive()
    }
}

impl<F> InTurn<F> {
    /// `inner`'s steps, each in a turn.
    pub fn new(inner: Pin<Box<F>>) -> InTurn<F> {
        InTurn { inner, place: None }
    }
}

impl<F: Future> Future for InTurn<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        TURNS.with(|t| {
            if !t.take() {
                let place = this.place.get_or_insert_with(Default::default);
                t.wait(place, cx.waker());
                return Poll::Pending;
            }
            if let Some(place) = &this.place {
                // Running now: a place still queued is skipped when reached.
                place.waker.borrow_mut().take();
            }
            let start = Instant::now();
            let step = this.inner.as_mut().poll(cx);
            t.spent(start.elapsed());
            step
        })
    }
}

impl<F> Drop for InTurn<F> {
    fn drop(&mut self) {
        // Gone while waiting: its place stays empty until reached.
        if let Some(place) = &self.place {
            place.waker.borrow_mut().take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counted() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn turns() -> Turns {
        Turns {
            waiting: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            idle_turns: Cell::new(0),
            credit_ns: Cell::new(0),
            credited: Cell::new(Instant::now()),
        }
    }

    #[test]
    fn a_handshake_denied_again_keeps_one_place() {
        let t = turns();
        let (count, waker) = counted();
        let place = Rc::new(Place::default());
        t.wait(&place, &waker);
        t.wait(&place, &waker);
        assert_eq!(t.queued.get(), 1);
        assert!(t.wake_one());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(!t.wake_one(), "nobody else waits");
        assert_eq!(t.queued.get(), 0);
    }

    #[test]
    fn a_place_left_empty_is_passed_over() {
        let t = turns();
        let (gone_count, gone_waker) = counted();
        let (next_count, next_waker) = counted();
        let gone = Rc::new(Place::default());
        let next = Rc::new(Place::default());
        t.wait(&gone, &gone_waker);
        t.wait(&next, &next_waker);
        // What `InTurn`'s drop does.
        gone.waker.borrow_mut().take();
        assert!(t.wake_one());
        assert_eq!(gone_count.0.load(Ordering::Relaxed), 0);
        assert_eq!(next_count.0.load(Ordering::Relaxed), 1);
        assert_eq!(t.queued.get(), 0, "the empty place went with it");
    }

    #[test]
    fn an_idle_turn_is_taken_once() {
        let t = turns();
        t.spent(CREDIT_MAX * 4);
        assert_eq!(
            t.credit_ns.get(),
            -(CREDIT_MAX.as_nanos() as i64),
            "debt is bounded"
        );
        t.idle_turns.set(1);
        assert!(t.take(), "the idle turn");
        assert_eq!(t.idle_turns.get(), 0);
    }

    #[test]
    fn credit_grows_at_the_share_up_to_its_most() {
        let t = turns();
        let then = t.credited.get();
        assert_eq!(t.credit(then + Duration::from_millis(4)), 1_000_000);
        assert_eq!(
            t.credit(then + Duration::from_secs(60)),
            CREDIT_MAX.as_nanos() as i64
        );
    }
}
