//! Unit tests of the parent module: real threads, a real eventfd.
use super::*;
use std::sync::atomic::AtomicUsize;

/// A waker that counts its wakes and the threads they ran on.
struct Count {
    wakes: AtomicUsize,
    on: Mutex<Vec<std::thread::ThreadId>>,
}

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, SeqCst);
        self.on.lock().unwrap().push(std::thread::current().id());
    }
}

fn counter() -> (Arc<Count>, Waker) {
    let c = Arc::new(Count {
        wakes: AtomicUsize::new(0),
        on: Mutex::new(Vec::new()),
    });
    (c.clone(), Waker::from(c))
}

/// Whether `fd` is readable within `ms`.
fn readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn a_ring_while_asleep_signals_the_eventfd_and_wakes_on_the_shard() {
    let bell = Doorbell::new().unwrap();
    let (count, waker) = counter();
    assert!(bell.prepare_sleep(), "nothing pending: the shard may sleep");
    let b = bell.clone();
    std::thread::spawn(move || b.ring(waker)).join().unwrap();
    assert!(readable(bell.fd(), 10_000), "the sleeping shard is told");
    bell.woke();
    assert_eq!(
        count.wakes.load(SeqCst),
        0,
        "not woken on the ringing thread"
    );
    assert_eq!(bell.answer(), 1);
    assert_eq!(count.wakes.load(SeqCst), 1);
    assert_eq!(
        count.on.lock().unwrap().as_slice(),
        &[std::thread::current().id()],
        "woken on the shard's own thread"
    );
    assert!(!readable(bell.fd(), 0), "the eventfd was read back");
    assert_eq!(bell.answer(), 0, "each waker once");
}

#[test]
fn a_ring_while_awake_makes_no_system_call_and_stops_the_next_sleep() {
    let bell = Doorbell::new().unwrap();
    let (count, waker) = counter();
    bell.ring(waker);
    assert!(!readable(bell.fd(), 0), "an awake shard is not signalled");
    assert!(!bell.prepare_sleep(), "a waiting wake-up comes first");
    assert_eq!(bell.answer(), 1);
    assert_eq!(count.wakes.load(SeqCst), 1);
    assert!(bell.prepare_sleep());
}

#[test]
fn rings_from_many_threads_each_wake_once() {
    let bell = Doorbell::new().unwrap();
    let (count, _) = counter();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (b, c) = (bell.clone(), count.clone());
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    b.ring(Waker::from(c.clone()));
                }
            })
        })
        .collect();
    let mut woken = 0;
    while woken < 8000 {
        if bell.prepare_sleep() {
            // As the shard would: sleep until told (bounded here).
            readable(bell.fd(), 50);
            bell.woke();
        }
        woken += bell.answer();
        if threads.iter().all(|t| t.is_finished()) && woken < 8000 && !bell.pending.load(SeqCst) {
            break;
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    woken += bell.answer();
    assert_eq!(woken, 8000);
    assert_eq!(count.wakes.load(SeqCst), 8000);
}

#[test]
fn a_oneshot_answer_reaches_the_receiver_through_its_doorbell() {
    let bell = Doorbell::new().unwrap();
    install(bell.clone());
    let (tx, mut rx) = oneshot::<u32>();
    let (count, waker) = counter();
    let mut cx = Context::from_waker(&waker);
    assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Pending);
    assert!(bell.prepare_sleep());
    std::thread::spawn(move || tx.send(7).unwrap())
        .join()
        .unwrap();
    assert!(readable(bell.fd(), 10_000));
    bell.woke();
    assert_eq!(count.wakes.load(SeqCst), 0);
    assert_eq!(bell.answer(), 1);
    assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Ready(Some(7)));
    CURRENT.with(|c| c.borrow_mut().take());
}

#[test]
fn a_oneshot_off_a_shard_wakes_directly_and_ends_without_an_answer() {
    let (tx, mut rx) = oneshot::<u32>();
    let (count, waker) = counter();
    let mut cx = Context::from_waker(&waker);
    assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Pending);
    std::thread::spawn(move || drop(tx)).join().unwrap();
    assert_eq!(count.wakes.load(SeqCst), 1);
    assert_eq!(Pin::new(&mut rx).poll(&mut cx), Poll::Ready(None));
}

#[test]
fn a_oneshot_gives_the_answer_back_when_no_one_waits() {
    let (tx, rx) = oneshot::<String>();
    drop(rx);
    assert_eq!(tx.send("lease".into()), Err("lease".to_string()));
}
