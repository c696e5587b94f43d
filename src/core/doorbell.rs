//! Answers from other threads to a shard's tasks, delivered at once.
//!
//! A shard sleeps in its data-plane ring (`dataplane::uring`), not in
//! glommio. glommio keeps a wake-up that comes from another thread in a
//! queue it looks at only when its own loop runs, and tells a sleeping
//! executor by an eventfd only when glommio itself is the one asleep; so
//! a stream waiting for the fleet's Redis thread (`core::cluster`) waited
//! for the shard's next glommio pass, up to `PASS_INTERVAL` (5 ms) later.
//! Measured: 5.65 ms on average for a stream open whose Redis round trip
//! takes about 0.1 ms (benches/README.md).
//!
//! A [`Doorbell`] is a shard's own way in. Another thread hands it the
//! waiting task's waker ([`Doorbell::ring`]); the shard wakes the task on
//! its own thread at its next pass ([`Doorbell::answer`]), and when the
//! shard is asleep in its ring, an eventfd that the ring polls ends the
//! sleep. [`oneshot`] is a one-answer channel whose receiver, made on a
//! shard, is woken through that shard's doorbell (elsewhere, directly).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// A shard's way in for wake-ups from other threads.
#[derive(Debug)]
pub struct Doorbell {
    /// Written when the shard must leave its ring's sleep.
    fd: OwnedFd,
    /// The shard is asleep in its ring, or about to be: a ring writes `fd`.
    asleep: AtomicBool,
    /// `fd` was written and not read back yet.
    written: AtomicBool,
    /// `wakers` may hold some (looked at without the lock on every pass).
    pending: AtomicBool,
    /// Wakers handed over and not woken yet.
    wakers: Mutex<Vec<Waker>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Doorbell>>> = const { RefCell::new(None) };
}

/// The doorbell of the shard running on this thread, if it has one.
pub fn current() -> Option<Arc<Doorbell>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Makes `bell` this thread's doorbell.
pub fn install(bell: Arc<Doorbell>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(bell));
}

impl Doorbell {
    /// A doorbell with a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Arc<Doorbell>> {
        // SAFETY: plain system call; the descriptor is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Doorbell {
            // SAFETY: `fd` is a descriptor just made and owned by no one else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            asleep: AtomicBool::new(false),
            written: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
        }))
    }

    /// The eventfd the shard's ring polls.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// From any thread: has the shard wake `waker` on its own thread.
    pub fn ring(&self, waker: Waker) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waker);
        self.pending.store(true, SeqCst);
        // Paired with `prepare_sleep`: either the shard sees `pending`
        // before it sleeps, or this sees `asleep` and ends the sleep.
        if self.asleep.swap(false, SeqCst) {
            self.written.store(true, SeqCst);
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd. A
            // failure (the counter full) still leaves it readable.
            let _ = unsafe { libc::write(self.fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// On the shard, before it sleeps in its ring: false when a wake-up is
    /// already waiting (then it must not sleep). [`Doorbell::woke`] after.
    pub fn prepare_sleep(&self) -> bool {
        self.asleep.store(true, SeqCst);
        if self.pending.load(SeqCst) {
            self.asleep.store(false, SeqCst);
            return false;
        }
        true
    }

    /// On the shard, after its sleep.
    pub fn woke(&self) {
        self.asleep.store(false, SeqCst);
    }

    /// On the shard: wakes the tasks handed over since the last call, on
    /// this thread. Returns how many. One atomic load when there are none.
    pub fn answer(&self) -> usize {
        if !self.pending.load(SeqCst) || !self.pending.swap(false, SeqCst) {
            return 0;
        }
        if self.written.swap(false, SeqCst) {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer from our eventfd
            // (non-blocking: nothing to read is fine).
            let _ = unsafe { libc::read(self.fd(), count.as_mut_ptr().cast(), count.len()) };
        }
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        let n = wakers.len();
        for w in wakers {
            w.wake();
        }
        n
    }
}

/// A channel for one answer from another thread (see the module docs).
pub fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            value: None,
            waker: None,
            closed: false,
        }),
        bell: current(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// The receiving shard's doorbell (none off a shard: wake directly).
    bell: Option<Arc<Doorbell>>,
}

#[derive(Debug)]
struct State<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The other end is gone.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, waker: Option<Waker>) {
        match (waker, &self.bell) {
            (Some(w), Some(bell)) => bell.ring(w),
            (Some(w), None) => w.wake(),
            (None, _) => {}
        }
    }
}

/// The sending end of a [`oneshot`].
#[derive(Debug)]
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    /// Hands `value` to the receiver; gives it back when the receiver is
    /// gone (it stopped waiting).
    pub fn send(self, value: T) -> Result<(), T> {
        let waker = {
            let mut s = self.0.lock();
            if s.closed {
                return Err(value);
            }
            s.value = Some(value);
            s.closed = true;
            s.waker.take()
        };
        self.0.wake(waker);
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            if s.closed {
                return;
            }
            s.closed = true;
            s.waker.take()
        };
        self.0.wake(waker);
    }
}

/// The receiving end of a [`oneshot`]: resolves to the answer, or to
/// `None` when the sender was dropped without one.
#[derive(Debug)]
pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.0.lock();
        if let Some(v) = s.value.take() {
            return Poll::Ready(Some(v));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
    }
}

#[cfg(test)]
mod tests;
