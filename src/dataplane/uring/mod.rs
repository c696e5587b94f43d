//! The data plane's own io_uring: one per shard, holding every stream
//! socket (and the client listener) for its whole life.
//!
//! glommio 0.9 waits for a socket by arming a one-shot `POLL_ADD`, with a
//! new `Source`, after every read that comes up short (every audio frame),
//! and each of its sleeps replaces two timers and calls `membarrier`. Here a
//! socket is registered once, with a *multishot* poll for readability: the
//! kernel posts a completion each time bytes arrive, until the socket is
//! deregistered. Reads and writes are plain non-blocking `recv`/`send`
//! system calls made by the stream's task when its socket is ready, so
//! bytes land straight in the stream's pooled buffer (no provided-buffer
//! ring: a buffer is lent to a stream only while it holds bytes, as
//! before). A write that finds the socket full arms a one-shot `POLLOUT`.
//!
//! ## Who drives the ring
//!
//! [`drive`] is one task per shard. It drains the completion queue in a
//! batch, marks sockets ready and wakes their tasks, then lets them run.
//! When nothing is left to do it sleeps, as [`Waiting`] says:
//!
//! - [`Wake::Ring`] (the default): the shard thread sleeps in this ring's
//!   `io_uring_enter`, like nginx in `epoll_wait`, for at most
//!   [`PASS_INTERVAL`]. glommio's own loop (timers, channels from the
//!   control plane, its blocking pool) gets a pass whenever its preemption
//!   timer says so, which this task checks between batches; the shard is
//!   built with `preempt_timer(PASS_INTERVAL)`. glommio's per-sleep timer
//!   churn and `membarrier` are then paid once per pass, not once per frame.
//!   This needs glommio never to park while this task is queued (nothing
//!   in glommio's rings would wake it): 0.9.0 did, when its preemption
//!   timer fired before a pass ran anything; `vendor/glommio` fixes that.
//!   The ring is made with `IORING_SETUP_DEFER_TASKRUN`: a socket's
//!   readiness is queued as deferred work that this thread collects when it
//!   enters the ring (the ring's `IORING_SQ_TASKRUN` flag says when there is
//!   some), instead of interrupting the thread once per event. A sleep
//!   ends at the first event. (A batch window, `min_wait_usec`, kernel
//!   6.13, can make events that arrive while the shard sleeps gather first,
//!   [`Waiting::batch_window`]; it is off: the kernel's timed wait cost more
//!   CPU than the wake-ups it saved, benches/README.md has the A/B.)
//!   An idle shard sleeps longer (`deep_sleep`): once four sleeps in a
//!   row ended with nothing to do, the next lasts until glommio's next
//!   timer, and glommio's eventfd, polled by the ring, ends it when another
//!   thread wakes a task.
//! - [`Wake::Eventfd`]: an eventfd is registered with the ring, and the task
//!   waits for it with a glommio read, so glommio sleeps as usual. Kept for
//!   the A/B in benches/README.md.
//!
//! Nothing here allocates per frame: slots are reused, wakers are cloned
//! only when they change, and completions are dispatched in place.

mod closing;
mod setup;
mod socket;
#[cfg(test)]
mod tests;

pub use closing::{CloseReply, CLOSE_LIMIT, DISCARD_LIMIT};
pub use setup::{
    check_io_uring, check_locked_memory, check_locked_memory_for, executor_failed, setup_failed,
    GLOMMIO_MIN_LOCKED_MEMORY, PINNED_PER_EXECUTOR,
};
pub use socket::{RingListener, RingSocket};

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::core::doorbell::Doorbell;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// How long the shard may sleep in the data-plane ring before glommio gets
/// a pass (timers, control messages); an idle shard sleeps longer
/// (`deep_sleep`). Also the shard's preemption timer.
pub const PASS_INTERVAL: Duration = Duration::from_millis(5);

/// The discard buffer's size: what one `recv` of a closing socket reads.
const DISCARD_BYTES: usize = 16 << 10;

/// Submission-queue entries of a data-plane ring. Only registrations,
/// removals and `POLLOUT` waits are submitted, once per batch.
const SQ_ENTRIES: u32 = 1024;

/// Completion-queue entries: one readiness event per socket per batch fits
/// for 16,384 sockets; beyond that the kernel keeps the overflow
/// (`IORING_FEAT_NODROP`) and [`Plane::dispatch`] asks for it.
const CQ_ENTRIES: u32 = 16384;

/// The most enters one [`Plane::dispatch`] makes to collect deferred
/// readiness (each runs at most 20 items of it, so 8,200 items a pass).
/// The half-full completion queue usually stops it first; this bounds a
/// pass whose items post no completion (a poll woken with nothing to
/// report).
const MAX_ENTERS: u32 = 410;

/// What a completion is about (the low 2 bits of its user data).
const KIND_READ: u64 = 0;
const KIND_WRITE: u64 = 1;
/// The removal of a socket's read poll; of its write poll.
const KIND_REMOVE: u64 = 2;
const KIND_REMOVE_WRITE: u64 = 3;
/// The user data of the doorbell's poll (no socket slot has this index).
const DOORBELL: u64 = u64::MAX;
/// The user data of the poll of glommio's eventfd (no slot has it either).
const FOREIGN: u64 = u64::MAX - 1;

/// Readable, or an error or hang-up (always reported).
const POLL_IN: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
const POLL_OUT: u32 = libc::POLLOUT as u32;
/// The peer shut down, or the socket failed.
const POLL_END: u32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;

/// How the shard sleeps when the data plane has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// In the data-plane ring's `io_uring_enter`, at most [`PASS_INTERVAL`].
    Ring,
    /// In glommio, woken by an eventfd the ring signals.
    Eventfd,
}

/// How a shard's data plane waits for its sockets. The defaults are what
/// benches/README.md measured best; the environment variables exist for
/// the A/B runs recorded there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Where the shard sleeps (`CLIO_RELAY_DATAPLANE_WAKE=eventfd` for
    /// [`Wake::Eventfd`]).
    pub wake: Wake,
    /// The kernel keeps readiness events as deferred work until the shard
    /// asks for them (`IORING_SETUP_DEFER_TASKRUN`), instead of
    /// interrupting the shard for each one. Only with [`Wake::Ring`]: the
    /// events must be collected by the thread that sleeps in the ring.
    /// `CLIO_RELAY_DATAPLANE_DEFER=0` turns it off.
    pub defer: bool,
    /// Once asleep, the shard waits up to this long for events to gather
    /// before it wakes for the first (the ring's `min_wait_usec`); an
    /// event after a quiet window still wakes it at once.
    /// `CLIO_RELAY_DATAPLANE_BATCH_US`, for A/B runs; 0 (the default)
    /// wakes on the first event.
    pub batch_window: Duration,
    /// The longest sleep of an idle shard ([`Wake::Ring`] only; see
    /// `deep_sleep`). `CLIO_RELAY_DATAPLANE_IDLE_MS`; 0 keeps every
    /// sleep to [`PASS_INTERVAL`].
    pub idle_sleep: Duration,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            wake: Wake::Ring,
            defer: true,
            batch_window: DEFAULT_BATCH_WINDOW,
            idle_sleep: DEFAULT_IDLE_SLEEP,
        }
    }
}

/// See [`Waiting::batch_window`]: none. At 1,500 real-time streams a
/// 100 µs window cost 7% more CPU than none (benches/README.md, "No batch
/// window").
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::ZERO;

/// See [`Waiting::idle_sleep`]: a bound on an idle shard's sleep, should a
/// way to wake it ever be missed.
pub const DEFAULT_IDLE_SLEEP: Duration = Duration::from_secs(1);

/// Events a sleeping shard waits for before the batch window is up.
const WAKE_BATCH: usize = 64;

impl Waiting {
    /// The defaults, changed by the `CLIO_RELAY_DATAPLANE_*` variables.
    pub fn from_env() -> Waiting {
        let mut w = Waiting::default();
        if std::env::var("CLIO_RELAY_DATAPLANE_WAKE").as_deref() == Ok("eventfd") {
            w.wake = Wake::Eventfd;
        }
        if std::env::var("CLIO_RELAY_DATAPLANE_DEFER").as_deref() == Ok("0") {
            w.defer = false;
        }
        if let Some(us) = std::env::var("CLIO_RELAY_DATAPLANE_BATCH_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            w.batch_window = Duration::from_micros(us);
        }
        if let Some(ms) = std::env::var("CLIO_RELAY_DATAPLANE_IDLE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            w.idle_sleep = Duration::from_millis(ms);
        }
        if w.wake == Wake::Eventfd {
            w.defer = false;
        }
        w
    }
}

/// One registered socket's readiness and waiters.
#[derive(Debug, Default)]
struct Slot {
    /// Bumped on every reuse, so a late completion for an earlier socket in
    /// this slot is recognised and ignored.
    gen: u32,
    fd: RawFd,
    in_use: bool,
    /// Bytes (or EOF, or an error) may be waiting: the next read tries.
    readable: bool,
    /// The peer shut down its side, or the socket failed: reads never
    /// block again, so a short read does not mean "wait for more".
    hup: bool,
    /// The multishot poll is armed (or its SQE is queued).
    read_armed: bool,
    /// A one-shot `POLLOUT` is armed.
    write_armed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The plane closes this socket once its peer has closed its side
    /// (`closing.rs`); no task reads it any more.
    closing: bool,
    /// Bytes a closing socket may still discard before it is closed anyway.
    discard_left: u32,
    /// A closing client socket whose FIN waits for the client's close
    /// frame (its reply to the relay's): the frames read until then.
    await_reply: Option<CloseReply>,
}

/// A registration: which slot, and which use of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    index: u32,
    gen: u32,
}

impl Token {
    fn user_data(self, kind: u64) -> u64 {
        (u64::from(self.index) << 32) | (u64::from(self.gen & 0x3fff_ffff) << 2) | kind
    }

    fn from_user_data(ud: u64) -> (Token, u64) {
        let token = Token {
            index: (ud >> 32) as u32,
            gen: ((ud >> 2) & 0x3fff_ffff) as u32,
        };
        (token, ud & 3)
    }
}

/// A shard's data-plane ring and the sockets registered with it.
pub struct Plane {
    ring: RefCell<IoUring>,
    waiting: Waiting,
    /// The kernel takes a batch window in its wait (`IORING_FEAT_MIN_TIMEOUT`, 6.13).
    min_timeout: bool,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// SQEs queued since the last submit.
    unsubmitted: Cell<bool>,
    /// Wakers collected during a dispatch, woken after the borrows end.
    to_wake: RefCell<Vec<Waker>>,
    /// Sockets registered now (a gauge for tests and metrics).
    registered: Cell<usize>,
    /// Completions handled, and batches they came in (for the benches).
    completions: Cell<u64>,
    batches: Cell<u64>,
    /// Multishot polls the kernel ended that were armed again.
    rearmed: Cell<u64>,
    /// Wake-ups from other threads ([`Wake::Ring`] only: in glommio's
    /// sleep they reach the shard without it). Its eventfd is polled here
    /// for the plane's life.
    doorbell: Option<Arc<Doorbell>>,
    /// glommio's own eventfd for wake-ups from other threads, polled here
    /// once [`drive`] starts ([`Wake::Ring`] only): written while the shard
    /// sleeps deep (`deep_sleep`).
    foreign: Cell<Option<RawFd>>,
    /// Sockets waiting for their peer's FIN before the plane closes them,
    /// oldest first, with the time they are closed anyway (`closing.rs`).
    /// Entries of sockets already closed stay until they reach the front.
    closing: RefCell<VecDeque<(Instant, Token)>>,
    /// How many sockets are closing now.
    closing_now: Cell<usize>,
    /// Where a closing socket's bytes are read to be discarded
    /// (`closing.rs`): one buffer for the plane, not one zeroed on the
    /// stack at each readiness event.
    discard: RefCell<Box<[u8]>>,
    /// Woken when the last closing socket is closed (a shard that stops).
    all_closed: RefCell<Option<Waker>>,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("registered", &self.registered.get())
            .field("completions", &self.completions.get())
            .finish_non_exhaustive()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Plane>>> = const { RefCell::new(None) };
    /// Polls of the shard's stream tasks ([`Counted`]): how the driver knows
    /// whether anything but itself ran since it last looked.
    static POLLS: Cell<u64> = const { Cell::new(0) };
}

/// The data plane of this thread, if its shard made one.
pub fn current() -> Option<Rc<Plane>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Makes `plane` this thread's data plane (and its doorbell this
/// thread's, see [`crate::core::doorbell`]).
pub fn install(plane: Rc<Plane>) {
    if let Some(bell) = plane.doorbell() {
        crate::core::doorbell::install(bell.clone());
    }
    CURRENT.with(|c| *c.borrow_mut() = Some(plane));
}

impl Plane {
    /// A data-plane ring with the default sizes.
    pub fn new(waiting: Waiting) -> io::Result<Rc<Plane>> {
        Plane::with_sizes(SQ_ENTRIES, CQ_ENTRIES, waiting)
    }

    /// A ring of `sq` submission and `cq` completion entries (tests use a
    /// small completion queue to make the kernel end multishot polls).
    pub fn with_sizes(sq: u32, cq: u32, waiting: Waiting) -> io::Result<Rc<Plane>> {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq).setup_clamp().setup_single_issuer();
        if waiting.defer {
            // Readiness events wait as deferred work, flagged in the SQ
            // ring, until this thread enters the ring to collect them.
            builder.setup_defer_taskrun().setup_taskrun_flag();
        }
        let ring = builder.build(sq)?;
        let min_timeout = ring.params().is_feature_min_timeout();
        let doorbell = match waiting.wake {
            Wake::Ring => Some(Doorbell::new()?),
            Wake::Eventfd => None,
        };
        let plane = Rc::new(Plane {
            ring: RefCell::new(ring),
            waiting,
            min_timeout,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            unsubmitted: Cell::new(false),
            to_wake: RefCell::new(Vec::new()),
            registered: Cell::new(0),
            completions: Cell::new(0),
            batches: Cell::new(0),
            rearmed: Cell::new(0),
            doorbell,
            foreign: Cell::new(None),
            closing: RefCell::new(VecDeque::new()),
            closing_now: Cell::new(0),
            discard: RefCell::new(vec![0; DISCARD_BYTES].into_boxed_slice()),
            all_closed: RefCell::new(None),
        });
        plane.arm_wake(DOORBELL);
        Ok(plane)
    }

    /// The doorbell other threads ring to wake this shard's tasks.
    pub fn doorbell(&self) -> Option<&Arc<Doorbell>> {
        self.doorbell.as_ref()
    }

    /// Polls the eventfd that ends a sleep with user data `ud` ([`DOORBELL`]
    /// or [`FOREIGN`]; multishot, for the plane's life), if there is one.
    fn arm_wake(&self, ud: u64) {
        let fd = match ud {
            DOORBELL => self.doorbell.as_ref().map(|bell| bell.fd()),
            _ => self.foreign.get(),
        };
        if let Some(fd) = fd {
            self.push(
                opcode::PollAdd::new(types::Fd(fd), POLL_IN)
                    .multi(true)
                    .build()
                    .user_data(ud),
            );
        }
    }

    /// Polls glommio's eventfd `fd` too (see [`Plane::foreign`]).
    fn watch_foreign(&self, fd: RawFd) {
        self.foreign.set(Some(fd));
        self.arm_wake(FOREIGN);
    }

    /// Sockets registered now.
    pub fn registered(&self) -> usize {
        self.registered.get()
    }

    /// Completions handled so far, and the batches they came in.
    pub fn completions(&self) -> (u64, u64) {
        (self.completions.get(), self.batches.get())
    }

    /// Multishot polls the kernel ended that were armed again.
    pub fn rearmed(&self) -> u64 {
        self.rearmed.get()
    }

    /// Registers `fd` for readiness for as long as the returned token lives
    /// (until [`Plane::deregister`]). With `readable`, the first read is
    /// tried at once; without, it waits for the poll, which reports bytes
    /// already there as soon as it is armed (a socket just connected has
    /// none yet: no `recv` to find EAGAIN).
    fn register(&self, fd: RawFd, readable: bool) -> Token {
        let index = self.free.borrow_mut().pop().unwrap_or_else(|| {
            let mut slots = self.slots.borrow_mut();
            slots.push(Slot::default());
            (slots.len() - 1) as u32
        });
        let token = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.gen = slot.gen.wrapping_add(1) & 0x3fff_ffff;
            slot.fd = fd;
            slot.in_use = true;
            slot.readable = readable;
            slot.hup = false;
            slot.read_armed = true;
            slot.write_armed = false;
            slot.closing = false;
            Token {
                index,
                gen: slot.gen,
            }
        };
        self.push(
            opcode::PollAdd::new(types::Fd(fd), POLL_IN)
                .multi(true)
                .build()
                .user_data(token.user_data(KIND_READ)),
        );
        self.registered.set(self.registered.get() + 1);
        token
    }

    /// Ends a registration: the removal of its polls (readiness, and a
    /// `POLLOUT` still armed) is queued and the slot is free for reuse.
    /// Late completions of this registration are ignored by generation.
    ///
    /// The kernel holds the socket open until the removals reach it, so
    /// the caller's `close` takes effect (the FIN leaves) then: with the
    /// driver's submit at the end of this pass, in the same system call as
    /// the pass's other requests, not one of its own per socket. A caller
    /// that needs the socket gone at once (a listener) submits itself.
    fn deregister(&self, token: Token) {
        let write_armed = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[token.index as usize];
            debug_assert!(slot.in_use && slot.gen == token.gen);
            slot.in_use = false;
            slot.reader = None;
            slot.writer = None;
            std::mem::take(&mut slot.write_armed)
        };
        self.push(
            opcode::PollRemove::new(token.user_data(KIND_READ))
                .build()
                .user_data(token.user_data(KIND_REMOVE)),
        );
        if write_armed {
            // A write was waiting for room (its future dropped): its
            // `POLLOUT` holds the socket open too, for as long as the peer
            // does not read.
            self.push(
                opcode::PollRemove::new(token.user_data(KIND_WRITE))
                    .build()
                    .user_data(token.user_data(KIND_REMOVE_WRITE)),
            );
        }
        self.free.borrow_mut().push(token.index);
        self.registered.set(self.registered.get() - 1);
    }

    /// Queues one SQE; submits first if the queue is full.
    fn push(&self, sqe: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: poll SQEs carry no pointers into our memory; the
            // user data is a plain number.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            let _ = ring.submit();
        }
        if self.waiting.wake == Wake::Eventfd {
            // The driver may be asleep in glommio, waiting for a completion
            // this request would bring: hand it to the kernel now.
            let _ = ring.submit();
            return;
        }
        self.unsubmitted.set(true);
    }

    /// Hands queued SQEs to the kernel (one `io_uring_enter`, no wait).
    pub fn submit(&self) -> io::Result<()> {
        if self.unsubmitted.replace(false) {
            self.ring.borrow_mut().submit()?;
        }
        Ok(())
    }

    /// Whether `token`'s socket may have bytes; if not, `waker` is kept to
    /// be woken when it does.
    fn poll_readable(&self, token: Token, waker: &Waker) -> bool {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[token.index as usize];
        if slot.readable {
            return true;
        }
        set_waker(&mut slot.reader, waker);
        false
    }

    /// Whether the peer has shut down its side or the socket failed, without
    /// reading: otherwise `waker` is woken on the socket's next readiness
    /// event (bytes included), to ask again.
    fn poll_hangup(&self, token: Token, waker: &Waker) -> bool {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[token.index as usize];
        if slot.hup {
            return true;
        }
        set_waker(&mut slot.reader, waker);
        false
    }

    /// The socket had no more bytes: wait for the next readiness event
    /// (unless the peer has shut down: then EOF is always there to read).
    fn clear_readable(&self, token: Token) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[token.index as usize];
        slot.readable = slot.hup;
    }

    /// The socket is full: keep `waker` and arm a one-shot `POLLOUT`.
    fn wait_writable(&self, token: Token, waker: &Waker) {
        let arm = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[token.index as usize];
            set_waker(&mut slot.writer, waker);
            (!std::mem::replace(&mut slot.write_armed, true)).then_some(slot.fd)
        };
        if let Some(fd) = arm {
            self.push(
                opcode::PollAdd::new(types::Fd(fd), POLL_OUT)
                    .build()
                    .user_data(token.user_data(KIND_WRITE)),
            );
        }
    }

    /// Whether a `POLLOUT` wait of `token` is still armed.
    fn write_armed(&self, token: Token) -> bool {
        self.slots.borrow()[token.index as usize].write_armed
    }

    /// Drains the completion queue: marks sockets ready, re-arms multishot
    /// polls the kernel ended, and wakes the waiting tasks. Returns the
    /// completions handled.
    pub fn dispatch(&self) -> usize {
        let mut handled = 0;
        self.close_overdue();
        // Wake-up polls (doorbell, glommio's eventfd) the kernel ended.
        let mut rearm_wakes = Vec::<u64>::new();
        let mut rearm = None::<Vec<(Token, RawFd)>>;
        let mut stale = None::<Vec<u64>>;
        // Closing sockets with bytes or their peer's FIN to read.
        let mut to_drain = None::<Vec<Token>>;
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            let mut to_wake = self.to_wake.borrow_mut();
            let (submitter, sq, mut cq) = ring.split();
            // Readiness events wait as deferred work (the ring flags them),
            // or the kernel kept completions the queue had no room for
            // (`IORING_FEAT_NODROP`): an enter posts them. Not all of them:
            // since Linux 6.13 an enter that waits for nothing runs at most
            // 20 deferred items (`IO_LOCAL_TW_DEFAULT_MAX`) and flags the
            // ring again if more wait. One enter per pass drained 20 events
            // per pass, and at 5,000 real-time streams the backlog grew for
            // good: readiness reached streams seconds late, and opens timed
            // out with upstream's answer unread in their sockets. So enter
            // until the flag clears, or half the queue is filled (the rest
            // is left for the next pass, so the tasks woken here run first).
            let room = cq.capacity() / 2;
            let mut enters = 0;
            while (sq.cq_overflow() || sq.taskrun()) && cq.len() < room && enters < MAX_ENTERS {
                let _ = submitter.submit_and_wait(0);
                cq.sync();
                enters += 1;
            }
            for cqe in &mut cq {
                handled += 1;
                if matches!(cqe.user_data(), DOORBELL | FOREIGN) {
                    // The sleep is over; `drive` wakes the tasks (through
                    // the doorbell, or glommio). Armed again if the kernel
                    // ended the poll.
                    if !cqueue::more(cqe.flags()) {
                        rearm_wakes.push(cqe.user_data());
                    }
                    continue;
                }
                let (token, kind) = Token::from_user_data(cqe.user_data());
                if kind == KIND_REMOVE || kind == KIND_REMOVE_WRITE {
                    // The poll was being woken (its readiness queued as
                    // deferred work, not yet run). That wake may find
                    // nothing left to report (its bytes read meanwhile)
                    // and arm the poll again with no completion to say
                    // so: no late completion would come to remove it by,
                    // and it would hold the closed socket open. Again.
                    if cqe.result() == -libc::EALREADY {
                        let target = if kind == KIND_REMOVE {
                            KIND_READ
                        } else {
                            KIND_WRITE
                        };
                        stale
                            .get_or_insert_with(Vec::new)
                            .push((cqe.user_data() & !3) | target);
                    }
                    continue;
                }
                let Some(slot) = slots.get_mut(token.index as usize) else {
                    continue;
                };
                if !slot.in_use || slot.gen != token.gen {
                    // A late completion of a socket already deregistered.
                    // If its poll is still armed, the remove met it while
                    // it was firing (EALREADY): remove it again, or it
                    // would hold the closed socket open.
                    if kind == KIND_READ && cqueue::more(cqe.flags()) {
                        stale.get_or_insert_with(Vec::new).push(cqe.user_data());
                    }
                    continue;
                }
                match kind {
                    KIND_READ => {
                        slot.readable = true;
                        // One completion may stand for several wake-ups
                        // (data, then FIN): remember a hang-up for good.
                        if cqe.result() < 0 || cqe.result() as u32 & POLL_END != 0 {
                            slot.hup = true;
                        }
                        if !cqueue::more(cqe.flags()) {
                            slot.read_armed = false;
                            // Ended by the kernel (an overflowing queue, or
                            // a poll error): arm it again unless the socket
                            // itself failed (then reads see the error).
                            if cqe.result() >= 0 {
                                rearm.get_or_insert_with(Vec::new).push((token, slot.fd));
                            }
                        }
                        if slot.closing {
                            to_drain.get_or_insert_with(Vec::new).push(token);
                        } else if let Some(w) = slot.reader.take() {
                            to_wake.push(w);
                        }
                    }
                    KIND_WRITE => {
                        slot.write_armed = false;
                        if let Some(w) = slot.writer.take() {
                            to_wake.push(w);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Before the re-arms: a socket closed here must not be armed again.
        for token in to_drain.into_iter().flatten() {
            self.drain_closing(token);
        }
        for ud in rearm_wakes {
            self.rearmed.set(self.rearmed.get() + 1);
            self.arm_wake(ud);
        }
        if let Some(rearm) = rearm {
            for (token, fd) in rearm {
                {
                    let mut slots = self.slots.borrow_mut();
                    let slot = &mut slots[token.index as usize];
                    if !slot.in_use || slot.gen != token.gen {
                        continue; // closed just above
                    }
                    slot.read_armed = true;
                }
                self.rearmed.set(self.rearmed.get() + 1);
                self.push(
                    opcode::PollAdd::new(types::Fd(fd), POLL_IN)
                        .multi(true)
                        .build()
                        .user_data(token.user_data(KIND_READ)),
                );
            }
        }
        for ud in stale.into_iter().flatten() {
            let remove = if ud & 3 == KIND_WRITE {
                KIND_REMOVE_WRITE
            } else {
                KIND_REMOVE
            };
            self.push(
                opcode::PollRemove::new(ud)
                    .build()
                    .user_data((ud & !3) | remove),
            );
        }
        if handled > 0 {
            self.completions
                .set(self.completions.get() + handled as u64);
            self.batches.set(self.batches.get() + 1);
        }
        let mut to_wake = std::mem::take(&mut *self.to_wake.borrow_mut());
        for w in to_wake.drain(..) {
            w.wake();
        }
        *self.to_wake.borrow_mut() = to_wake;
        handled
    }

    /// Submits what is queued and sleeps until completions arrive or
    /// `limit` passes. With a batch window, the first completion waits for
    /// others until the window (counted from the start of the sleep) is
    /// over; after a quiet window the next completion wakes at once.
    fn sleep(&self, limit: Duration) -> io::Result<()> {
        self.unsubmitted.set(false);
        let ring = self.ring.borrow();
        let ts = types::Timespec::from(limit);
        let window = self.waiting.batch_window.as_micros() as u32;
        let (want, args) = if window > 0 && self.min_timeout {
            let args = types::SubmitArgs::new().min_wait_usec(window).timespec(&ts);
            (WAKE_BATCH, args)
        } else {
            (1, types::SubmitArgs::new().timespec(&ts))
        };
        match ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Registers `fd` (an eventfd) to be signalled on every completion.
    fn register_eventfd(&self, fd: RawFd) -> io::Result<()> {
        self.ring.borrow().submitter().register_eventfd(fd)
    }

    /// Whether completions are waiting, in the queue or kept aside by the
    /// kernel when the queue was full.
    fn has_completions(&self) -> bool {
        let mut ring = self.ring.borrow_mut();
        ring.submission().cq_overflow() || !ring.completion().is_empty()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.close_all_now();
    }
}

/// Keeps `waker` in `slot`, cloning only when it changed.
fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// A future whose polls are counted for the driver (see [`drive`]). Every
/// task the shard spawns for a stream is wrapped in one.
#[derive(Debug)]
pub struct Counted<F>(pub F);

impl<F: std::future::Future> std::future::Future for Counted<F> {
    type Output = F::Output;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        POLLS.with(|p| p.set(p.get() + 1));
        // SAFETY: `Counted` is a plain wrapper: the inner future is pinned
        // exactly where `self` is and never moved out.
        unsafe { self.map_unchecked_mut(|c| &mut c.0) }.poll(cx)
    }
}

/// Lets every other runnable task on this executor run once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Short sleeps in a row that must end with nothing to do before a shard
/// sleeps deep (`deep_sleep`): 20 ms of quiet. Going deep after one (5 ms)
/// cost a light load (100 real-time streams, an event every 2 ms a shard)
/// about 8% more CPU, its `membarrier`s paid between frames; after four,
/// nothing measurable (benches/README.md).
const QUIET_SLEEPS: u32 = 4;

/// A sleep of an idle shard (its last [`QUIET_SLEEPS`] sleeps ended with
/// nothing to do): until glommio's next timer is due (at most
/// [`Waiting::idle_sleep`]) instead of at most [`PASS_INTERVAL`], since a
/// pass has nothing to do before then but what other threads send, and
/// those (control messages, the blocking pool's answers) write glommio's
/// eventfd during the sleep, which the ring polls. Arming that costs a
/// `membarrier`, once per deep sleep, so a shard with work sleeps the
/// short way. A closing socket's deadline (`closing.rs`) ends it too. A timer due sooner than a pass
/// interval gets the short sleep too: glommio fires it on the pass after.
/// Returns how many tasks it woke (sent from other threads): they are
/// queued, and must run before the next sleep.
fn deep_sleep(plane: &Plane) -> io::Result<usize> {
    let ex = glommio::executor();
    let cap = plane.waiting.idle_sleep;
    let due = [ex.next_timer(), plane.next_close_due()]
        .into_iter()
        .flatten()
        .min();
    let limit = due.map_or(cap, |due| {
        due.saturating_duration_since(Instant::now()).min(cap)
    });
    if limit <= PASS_INTERVAL {
        return plane.sleep(PASS_INTERVAL).map(|()| 0);
    }
    let woke = ex.prepare_sleep_elsewhere();
    if woke > 0 {
        // Something came in since the last pass; its task is queued.
        return Ok(woke);
    }
    let slept = plane.sleep(limit);
    // Wakes what other threads sent during the sleep now, not at
    // glommio's next pass.
    let woke = ex.woke_elsewhere();
    slept.map(|()| woke)
}

/// Drives `plane` on this shard until `stop` is set: dispatches
/// completions in batches and sleeps as `wake` says (see the module docs).
pub async fn drive(plane: Rc<Plane>, stop: Rc<Cell<bool>>) {
    let eventfd = match plane.waiting.wake {
        Wake::Ring => None,
        Wake::Eventfd => {
            // SAFETY: a fresh eventfd, owned by the file from here on.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 || plane.register_eventfd(fd).is_err() {
                tracing::error!("data plane: eventfd registration failed; sleeping in the ring");
                None
            } else {
                // SAFETY: `fd` is the eventfd made above, owned by the file.
                Some(unsafe {
                    <glommio::io::BufferedFile as std::os::fd::FromRawFd>::from_raw_fd(fd)
                })
            }
        }
    };
    let bell = plane.doorbell().cloned();
    if eventfd.is_none() {
        plane.watch_foreign(glommio::executor().sleep_notifier_fd());
    }
    let mut seen_polls = POLLS.with(Cell::get);
    // After glommio's pass, tasks it woke (timers, control messages) are
    // queued: let them run before sleeping.
    let mut after_pass = true;
    // Sleeps in a row that ended with nothing to do.
    let mut quiet = 0u32;
    let mut just_slept = false;
    while !stop.get() {
        let mut handled = plane.dispatch();
        if let Some(bell) = &bell {
            // Tasks other threads answered (the fleet's store), woken here.
            handled += bell.answer();
        }
        if let Err(e) = plane.submit() {
            tracing::warn!(error = %e, "data plane: submit failed");
        }
        // One waiting handshake step gets this round's turn (`turns`): it
        // runs after the tasks just woken, before the next look.
        let turn = crate::dataplane::turns::round();
        let polls = POLLS.with(Cell::get);
        if std::mem::take(&mut just_slept) {
            quiet = if handled == 0 {
                quiet.saturating_add(1)
            } else {
                0
            };
        } else if handled > 0 || polls != seen_polls {
            quiet = 0;
        }
        if handled > 0 || polls != seen_polls || after_pass || turn {
            seen_polls = polls;
            after_pass = false;
            yield_now().await;
            continue;
        }
        if glommio::executor().need_preempt() {
            glommio::executor().yield_if_needed().await;
            after_pass = true;
            continue;
        }
        match &eventfd {
            None => {
                // Not when another thread has just rung: its task runs first.
                if bell.as_ref().is_none_or(|b| b.prepare_sleep()) {
                    let slept = if quiet >= QUIET_SLEEPS {
                        deep_sleep(&plane).map(|woke| after_pass = woke > 0)
                    } else {
                        plane.sleep(PASS_INTERVAL)
                    };
                    just_slept = true;
                    if let Some(bell) = &bell {
                        bell.woke();
                    }
                    if let Err(e) = slept {
                        tracing::warn!(error = %e, "data plane: wait failed");
                        glommio::timer::sleep(PASS_INTERVAL).await;
                    }
                }
            }
            Some(file) => {
                if !plane.has_completions() {
                    // Completions the kernel had to keep aside (a full
                    // queue) may never signal the eventfd: never wait
                    // longer than a pass, and look again.
                    futures_lite::future::or(
                        async {
                            let _ = file.read_at(0, 8).await;
                        },
                        glommio::timer::sleep(PASS_INTERVAL),
                    )
                    .await;
                }
                after_pass = true;
            }
        }
    }
}
