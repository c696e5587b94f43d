//! Whose turn a shard's time is: its live streams' first, a TLS
//! handshake's step between two of the data plane's looks at its sockets.
//!
//! A server's handshake signs (an RSA-4096 signature is about 4 ms of one
//! core; P-256 about 20 µs), on the shard's own thread, and a peer asks
//! for one with a connect and a ClientHello. With every task in one queue,
//! a flood of hellos took a shard's whole time: the streams' frames, and
//! the watchdog's checks, waited behind every handshake queued before them
//! (400 hellos a second at one shard holding an RSA-4096 key: every stream
//! on it ended on its client's timeout, the watchdog's checks went
//! unanswered).
//!
//! Now each step of a server handshake ([`InTurn`]) runs in a turn, and
//! the data plane's driver hands one turn out on each of its rounds
//! ([`round`]), after it has woken the tasks whose sockets are ready: the
//! step runs after them and before the driver's next look. So the
//! streams' work of a round always comes first, and handshakes take what
//! the streams leave: a shard whose streams need a part `b` of it looks
//! at its sockets again at most a step's time over `1 - b` later, and
//! while nothing else waits, handshakes take the whole shard, a step a
//! round. A frame arriving during a flood waits for the step running (a
//! signature, a few ms), where it waited for the whole queue of hellos
//! before.
//!
//! The turn goes to the step that asked last. In quiet times few wait and
//! the order is nothing to anyone; under a flood more hellos come than the
//! shard can sign, and in order of arrival it would sign only hellos that
//! waited longest, whose clients have most likely given up (a queue held
//! up to `limits.handshake_timeout` of them): newest first, the hellos
//! signed are those whose clients still wait, and a hello's next step (the
//! client's Finished, just come in) comes before older hellos. A step
//! whose connection is let go meanwhile (`handshake_timeout`, a drain)
//! leaves its place empty, passed over when reached; empty places are
//! swept out once they are half of the line, so the line is bounded by
//! the connections waiting, whatever a flood does.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A waiting handshake's place in the queue.
#[derive(Debug, Default)]
struct Place {
    /// Its task, while it waits; taken when it is woken or gone.
    waker: RefCell<Option<Waker>>,
    /// In the queue (at most once at a time).
    queued: Cell<bool>,
    /// Handed the round's turn, not yet taken.
    turn: Cell<bool>,
}

/// The turns of one shard (one per thread).
#[derive(Debug, Default)]
struct Turns {
    waiting: RefCell<Vec<Rc<Place>>>,
    /// Waiting places, empty ones included (a cheap look for the driver).
    queued: Cell<usize>,
    /// Places left empty by steps let go while they waited.
    empty: Cell<usize>,
}

/// Empty places are swept out of a line this long or longer once they are
/// half of it.
const SWEEP_FROM: usize = 64;

thread_local! {
    static TURNS: Turns = Turns::default();
}

impl Turns {
    fn wait(&self, place: &Rc<Place>, waker: &Waker) {
        *place.waker.borrow_mut() = Some(waker.clone());
        if !place.queued.replace(true) {
            self.waiting.borrow_mut().push(place.clone());
            self.queued.set(self.queued.get() + 1);
        }
    }

    /// A waiting step let go: its place is empty; the line is swept of
    /// empty places once they are half of it.
    fn left(&self) {
        self.empty.set(self.empty.get() + 1);
        let queued = self.queued.get();
        if queued >= SWEEP_FROM && self.empty.get() * 2 >= queued {
            let mut waiting = self.waiting.borrow_mut();
            waiting.retain(|p| {
                let keep = p.waker.borrow().is_some();
                if !keep {
                    p.queued.set(false);
                }
                keep
            });
            self.queued.set(waiting.len());
            self.empty.set(0);
        }
    }

    /// Hands the turn to the last step that asked and still waits, and
    /// wakes it; false if none does.
    fn hand_turn(&self) -> bool {
        loop {
            let Some(place) = self.waiting.borrow_mut().pop() else {
                return false;
            };
            self.queued.set(self.queued.get() - 1);
            place.queued.set(false);
            let waker = place.waker.borrow_mut().take();
            match waker {
                Some(w) => {
                    place.turn.set(true);
                    w.wake();
                    return true;
                }
                None => self.empty.set(self.empty.get().saturating_sub(1)),
            }
        }
    }
}

/// Called by the data plane's driver once a round, after it has woken
/// the tasks whose sockets are ready: hands the round's turn to the
/// waiting handshake step that asked last and wakes it (it runs after
/// those tasks, which were queued first), and returns true, for the
/// driver to let it run before its next look; false if none waits. One
/// `Cell` read when none does.
pub fn round() -> bool {
    TURNS.with(|t| t.queued.get() > 0 && t.hand_turn())
}

/// A handshake's future, each step of it run in a turn.
pub struct InTurn<F> {
    inner: Pin<Box<F>>,
    place: Rc<Place>,
}

impl<F> std::fmt::Debug for InTurn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InTurn")
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

impl<F> InTurn<F> {
    /// `inner`'s steps, each in a turn.
    pub fn new(inner: Pin<Box<F>>) -> InTurn<F> {
        InTurn {
            inner,
            place: Rc::default(),
        }
    }
}

impl<F: Future> Future for InTurn<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.place.turn.replace(false) {
            // Woken by its socket, or first polled: in line for a turn.
            TURNS.with(|t| t.wait(&this.place, cx.waker()));
            return Poll::Pending;
        }
        this.inner.as_mut().poll(cx)
    }
}

impl<F> Drop for InTurn<F> {
    fn drop(&mut self) {
        // Gone while waiting: its place stays empty until reached or swept.
        let waited = self.place.waker.borrow_mut().take().is_some();
        if waited && self.place.queued.get() {
            TURNS.with(Turns::left);
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

    #[test]
    fn a_step_woken_again_keeps_one_place_and_gets_the_turn() {
        let t = Turns::default();
        let (count, waker) = counted();
        let place = Rc::new(Place::default());
        t.wait(&place, &waker);
        t.wait(&place, &waker);
        assert_eq!(t.queued.get(), 1);
        assert!(t.hand_turn());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(place.turn.get());
        assert!(!t.hand_turn(), "nobody else waits");
        assert_eq!(t.queued.get(), 0);
    }

    #[test]
    fn a_place_left_empty_is_passed_over() {
        let t = Turns::default();
        let (gone_count, gone_waker) = counted();
        let (next_count, next_waker) = counted();
        let gone = Rc::new(Place::default());
        let next = Rc::new(Place::default());
        t.wait(&next, &next_waker);
        t.wait(&gone, &gone_waker);
        // What `InTurn`'s drop does.
        gone.waker.borrow_mut().take();
        assert!(t.hand_turn());
        assert_eq!(gone_count.0.load(Ordering::Relaxed), 0);
        assert!(!gone.turn.get());
        assert_eq!(next_count.0.load(Ordering::Relaxed), 1);
        assert!(next.turn.get());
        assert_eq!(t.queued.get(), 0, "the empty place went with it");
    }

    /// Steps run only with a turn, one a round, the last to ask first, and
    /// a step polled again before its turn (its socket woke it) neither
    /// runs nor moves.
    #[test]
    fn steps_run_one_a_round_the_newest_first() {
        let ran = Rc::new(RefCell::new(Vec::new()));
        let mut steps: Vec<_> = (0..3)
            .map(|i| {
                let ran = ran.clone();
                Box::pin(InTurn::new(Box::pin(async move {
                    ran.borrow_mut().push(i);
                })))
            })
            .collect();
        let (_, waker) = counted();
        let mut cx = Context::from_waker(&waker);
        for s in &mut steps {
            assert!(s.as_mut().poll(&mut cx).is_pending(), "no turn yet");
        }
        assert!(steps[0].as_mut().poll(&mut cx).is_pending(), "still none");
        for n in (0..3).rev() {
            assert!(round(), "round for step {n}");
            assert!(steps[n].as_mut().poll(&mut cx).is_ready());
        }
        assert!(!round(), "nobody waits");
        assert_eq!(*ran.borrow(), vec![2, 1, 0]);
    }

    /// Steps let go while they wait (a flood's hellos timing out) leave
    /// empty places that are swept out: the line stays within twice the
    /// steps still waiting, and those keep their order.
    #[test]
    fn places_left_empty_are_swept_out() {
        let (_, waker) = counted();
        let mut cx = Context::from_waker(&waker);
        let kept: Vec<_> = (0..10)
            .map(|_| {
                let mut s = Box::pin(InTurn::new(Box::pin(async {})));
                assert!(s.as_mut().poll(&mut cx).is_pending());
                s
            })
            .collect();
        for _ in 0..10_000 {
            let mut s = Box::pin(InTurn::new(Box::pin(async {})));
            assert!(s.as_mut().poll(&mut cx).is_pending());
            drop(s);
            let queued = TURNS.with(|t| t.queued.get());
            assert!(queued <= (SWEEP_FROM).max(2 * 10 + 2), "{queued} places");
        }
        let mut kept = kept;
        for n in (0..10).rev() {
            assert!(round());
            assert!(kept[n].as_mut().poll(&mut cx).is_ready(), "step {n}");
        }
        assert!(!round());
    }
}
