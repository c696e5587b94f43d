//! The data plane over real sockets on 127.0.0.1, driven by [`drive`] on a
//! glommio executor as a shard drives it.

use std::cell::Cell;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// The ways a shard can wait: each test runs under every one of them.
fn waitings() -> [Waiting; 3] {
    let batched = Waiting::default();
    let every_event = Waiting {
        defer: false,
        batch_window: Duration::ZERO,
        ..batched
    };
    let eventfd = Waiting {
        wake: Wake::Eventfd,
        defer: false,
        ..batched
    };
    [batched, every_event, eventfd]
}

/// Runs `test` on an executor with a data plane of `sq`/`cq` entries and its
/// driver, as a shard has, once for each way of waiting ([`waitings`]).
fn on_plane<F, Fut>(sq: u32, cq: u32, test: F)
where
    F: Fn(Rc<Plane>) -> Fut + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    for waiting in waitings() {
        let test = test.clone();
        glommio::LocalExecutorBuilder::default()
            .preempt_timer(PASS_INTERVAL)
            .make()
            .unwrap()
            .run(async move {
                let plane = Plane::with_sizes(sq, cq, waiting).unwrap();
                let stop = Rc::new(Cell::new(false));
                let driver = glommio::spawn_local(drive(plane.clone(), stop.clone()));
                test(plane).await;
                stop.set(true);
                driver.await;
            });
    }
}

/// A connected pair: the accepted end as a non-blocking fd, and the peer as
/// a blocking std socket.
fn pair(listener: &TcpListener) -> (OwnedFd, TcpStream) {
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    (ours.into(), peer)
}

/// Starts blocking peer work on a thread of its own now; the result is
/// awaited without blocking the executor.
fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> impl Future<Output = T> {
    let handle = std::thread::spawn(f);
    async move {
        while !handle.is_finished() {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        handle.join().unwrap()
    }
}

#[test]
fn reads_and_writes_whole_across_partial_reads_and_full_sockets() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let mut sock = RingSocket::new(&plane, fd);
        // Peer → us in uneven pieces, read with a small buffer.
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let expect = sent.clone();
        let mut peer2 = peer.try_clone().unwrap();
        let writer = blocking(move || {
            for chunk in sent.chunks(7_777) {
                peer2.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        while got.len() < expect.len() {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        writer.await;
        assert!(got == expect, "bytes changed or reordered");
        // Us → peer: far more than the socket buffers hold, so writes meet
        // a full socket and wait for POLLOUT while the peer reads late.
        let big: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 8)) as u8).collect();
        let expect = big.clone();
        let reader = blocking(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut got = vec![0u8; expect.len()];
            peer.read_exact(&mut got).unwrap();
            got == expect
        });
        sock.write_all(&big).await.unwrap();
        assert!(reader.await, "bytes written changed or reordered");
    });
}

#[test]
fn a_dropped_socket_is_closed_and_its_slot_reused() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let sock = RingSocket::new(&plane, fd);
        assert_eq!(plane.registered(), 1);
        drop(sock);
        assert_eq!(plane.registered(), 0);
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = blocking(move || {
            let mut b = [0u8; 1];
            peer.read(&mut b)
        })
        .await;
        assert_eq!(n.unwrap(), 0, "the peer sees the close (EOF)");
        // The slot is reused by the next socket, which works.
        let (fd, mut peer) = pair(&listener);
        let mut sock = RingSocket::new(&plane, fd);
        peer.write_all(b"again").unwrap();
        let mut b = [0u8; 5];
        sock.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"again");
    });
}

/// A socket dropped while its peer's bytes wait to be reported: with
/// deferred task work, the readiness is queued until the shard next
/// enters the ring, and the poll's removal meets it then (`EALREADY`).
/// Its bytes read without the poll's word (a peek, then the read, as a
/// TLS handshake in its turn does), the deferred wake finds nothing to
/// report and the poll would stay armed with no completion to say so,
/// holding the closed socket open: the peer never saw the close. The
/// removal is tried again until it is done.
#[test]
fn a_socket_dropped_while_its_wake_is_pending_is_closed() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let sock = RingSocket::new(&plane, fd);
        // The driver submits the poll.
        glommio::timer::sleep(Duration::from_millis(20)).await;
        // No await from here to the drop: the driver does not run, and
        // nothing enters the ring.
        peer.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut b = [0u8; 16];
        // SAFETY: `b` is valid for its length of writes.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(n, 5);
        drop(sock);
        plane.submit().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = blocking(move || {
            let mut b = [0u8; 1];
            peer.read(&mut b)
        })
        .await;
        assert_eq!(n.unwrap(), 0, "the peer sees the close (EOF)");
    });
}

/// [`first_to_connect`] over `addrs` with the plane's connect, as a
/// stream's upstream connection makes it, and the addresses it began, in
/// order.
///
/// [`first_to_connect`]: crate::core::dial::first_to_connect
async fn connect_first(
    plane: &Rc<Plane>,
    addrs: &[std::net::SocketAddr],
) -> (
    std::io::Result<(std::net::SocketAddr, RingSocket)>,
    Vec<std::net::SocketAddr>,
) {
    let tried = std::cell::RefCell::new(Vec::new());
    let connect = |addr| {
        tried.borrow_mut().push(addr);
        RingSocket::connect(plane, addr)
    };
    let delay = crate::core::dial::NEXT_ADDRESS_AFTER;
    let r = crate::core::dial::first_to_connect(addrs, delay, connect, |_| false).await;
    (r, tried.into_inner())
}

/// A stream's upstream connection goes past an address that never
/// answers the handshake (here a listener whose one-place queue is full,
/// so the kernel drops every SYN after it), as one whose IPv6 route is
/// broken would: the next address begins beside it and wins, and the
/// attempt left behind, still connecting, is dropped and its socket taken
/// off the ring. (Tried one after the other, the first attempt waited
/// out the kernel's SYN retries, minutes, and the 20 s below ran out.)
#[test]
fn a_connect_goes_past_an_address_that_never_answers() {
    on_plane(64, 256, |plane| async move {
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
        let _queued = TcpStream::connect(hole_addr).unwrap();
        let good = TcpListener::bind("127.0.0.1:0").unwrap();
        let good_addr = good.local_addr().unwrap();
        let addrs = [hole_addr, good_addr];
        let (r, tried) =
            crate::core::deadline::timeout(Duration::from_secs(20), connect_first(&plane, &addrs))
                .await
                .expect("connected within 20 s");
        let (addr, mut sock) = r.unwrap();
        assert_eq!(addr, good_addr);
        assert_eq!(tried, addrs);
        assert_eq!(plane.registered(), 1, "the hole's attempt is off the ring");
        let (mut peer, _) = good.accept().unwrap();
        sock.write_all(b"up").await.unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"up");
    });
}

/// Every address refused: the last one's error, after trying each in
/// turn (a refusal comes at once, so the next begins without the delay),
/// and nothing left on the ring.
#[test]
fn a_connect_to_addresses_that_all_refuse_gives_the_last_error() {
    on_plane(64, 256, |plane| async move {
        let closed: Vec<std::net::SocketAddr> = (0..3)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let (r, tried) = connect_first(&plane, &closed).await;
        let e = r.expect_err("nothing listens");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert_eq!(tried, closed);
        assert_eq!(plane.registered(), 0);
        let (none, _) = connect_first(&plane, &[]).await;
        assert_eq!(none.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    });
}

/// A completion queue too small for the events makes the kernel end
/// multishot polls (a completion without `IORING_CQE_F_MORE`); the plane
/// arms them again and every socket keeps getting its bytes.
#[test]
fn multishot_polls_the_kernel_ends_are_armed_again() {
    on_plane(4, 8, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut socks = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..32 {
            let (fd, peer) = pair(&listener);
            socks.push(RingSocket::new(&plane, fd));
            peers.push(peer);
        }
        plane.submit().unwrap();
        for round in 0..3u8 {
            // Every socket becomes readable while nobody drains the queue:
            // 32 events for 8 completion entries.
            for p in &mut peers {
                p.write_all(&[round; 3]).unwrap();
            }
            for s in &mut socks {
                // A short read: the socket then waits for its next event.
                let mut b = [0u8; 16];
                let n = s.read(&mut b).await.unwrap();
                assert_eq!(&b[..n], &[round; 3]);
            }
        }
        assert!(plane.rearmed() > 0, "the small queue ended some polls");
    });
}

/// A read waiting when its future is dropped leaves nothing behind: the
/// socket's next read, and a later socket in the same slot, work.
#[test]
fn a_cancelled_read_leaves_the_socket_usable() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let mut sock = RingSocket::new(&plane, fd);
        let mut b = [0u8; 4];
        let waited =
            crate::dataplane::io::timeout(Duration::from_millis(30), sock.read(&mut b)).await;
        assert!(waited.is_none(), "nothing was sent yet");
        peer.write_all(b"late").unwrap();
        sock.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"late");
        // Readiness that arrives for a socket already dropped is ignored,
        // and its poll removed.
        peer.write_all(b"more").unwrap();
        drop(sock);
        let (fd, mut peer2) = pair(&listener);
        let mut sock2 = RingSocket::new(&plane, fd);
        peer2.write_all(b"next").unwrap();
        sock2.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"next");
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let eof = blocking(move || {
            let mut b = [0u8; 1];
            peer.read(&mut b).map_err(|e| e.kind())
        })
        .await;
        // Closed with unread bytes: a reset, or EOF; never a hang.
        assert!(
            matches!(eof, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
            "{eof:?}"
        );
    });
}

/// A hang-up is seen without reading: not while bytes come, as soon as the
/// peer's FIN or reset does, with the bytes before it still there to read.
#[test]
fn a_peers_hang_up_is_seen_without_reading() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        fn hung_up(sock: &RingSocket) -> impl Future<Output = ()> + '_ {
            std::future::poll_fn(|cx| sock.poll_hangup(cx))
        }
        for reset in [false, true] {
            let (fd, mut peer) = pair(&listener);
            let mut sock = RingSocket::new(&plane, fd);
            peer.write_all(b"audio").unwrap();
            let waited =
                crate::dataplane::io::timeout(Duration::from_millis(30), hung_up(&sock)).await;
            assert!(waited.is_none(), "bytes alone are no hang-up");
            if reset {
                socket2::SockRef::from(&peer)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            drop(peer);
            crate::dataplane::io::timeout(Duration::from_secs(10), hung_up(&sock))
                .await
                .expect("the hang-up is seen");
            if !reset {
                // What came before a FIN is still there, then EOF.
                let mut got = Vec::new();
                sock.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"audio");
            }
        }
    });
}

/// 9,000 sockets registered at once (4,500 connected pairs, both ends on
/// the plane, as 4,500 streams' client and upstream sockets are): each
/// gets its bytes, and all are released at the end.
#[test]
fn nine_thousand_registered_sockets() {
    on_plane(1024, 16384, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pairs = Vec::new();
        for _ in 0..4_500 {
            let (fd, peer) = pair(&listener);
            peer.set_nonblocking(true).unwrap();
            let a = RingSocket::new(&plane, fd);
            let b = RingSocket::new(&plane, peer.into());
            pairs.push((a, b));
        }
        assert_eq!(plane.registered(), 9_000);
        for (i, (a, _)) in pairs.iter_mut().enumerate() {
            a.write_all(&(i as u32).to_le_bytes()).await.unwrap();
        }
        for (i, (_, b)) in pairs.iter_mut().enumerate() {
            let mut got = [0u8; 4];
            b.read_exact(&mut got).await.unwrap();
            assert_eq!(u32::from_le_bytes(got), i as u32);
        }
        drop(pairs);
        assert_eq!(plane.registered(), 0);
    });
}

/// A shard asleep in its ring is woken by its doorbell: another thread's
/// answer does not wait for the sleep to time out.
#[test]
fn the_doorbell_ends_the_rings_sleep() {
    let plane = Plane::new(Waiting::default()).unwrap();
    let bell = plane
        .doorbell()
        .expect("sleeping in the ring has a doorbell")
        .clone();
    plane.submit().unwrap();
    for round in 0..3 {
        assert!(bell.prepare_sleep());
        let ringer = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            ringer.ring(std::task::Waker::noop().clone());
        });
        let t0 = std::time::Instant::now();
        plane.sleep(Duration::from_secs(30)).unwrap();
        // A hang, not a timing: without the doorbell the sleep lasts 30 s.
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "round {round}: slept through the doorbell"
        );
        bell.woke();
        t.join().unwrap();
        assert!(plane.dispatch() >= 1, "the doorbell's completion");
        assert_eq!(bell.answer(), 1);
        plane.submit().unwrap();
    }
}

/// A shard's executor has no doorbell when glommio is where it sleeps.
#[test]
fn sleeping_in_glommio_needs_no_doorbell() {
    let plane = Plane::new(Waiting {
        wake: Wake::Eventfd,
        defer: false,
        ..Waiting::default()
    })
    .unwrap();
    assert!(plane.doorbell().is_none());
}

/// A shard keeps serving its sockets when glommio's preemption timer fires
/// before glommio has run a task in a pass. glommio 0.9.0 then took the
/// pass for an idle one and parked in its own ring with the data-plane
/// driver still queued; nothing in that ring belongs to the data plane, so
/// the shard slept until some glommio event came (observed: 2 s and more,
/// under CPU load; vendor/glommio carries the fix). A preemption timer of
/// 1 µs makes that case frequent: on 0.9.0 the first echo never came. Each
/// round trip must come back; a hang is what fails, read through a 10 s
/// timeout, not a timing.
#[test]
fn an_early_preemption_does_not_park_the_shard() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (fd, mut peer) = pair(&listener);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // The executor runs on its own thread: if it hangs, the test fails
    // instead of hanging with it.
    std::thread::spawn(move || {
        glommio::LocalExecutorBuilder::default()
            .preempt_timer(Duration::from_micros(1))
            .make()
            .unwrap()
            .run(async move {
                let plane = Plane::new(Waiting::default()).unwrap();
                let stop = Rc::new(Cell::new(false));
                let driver = glommio::spawn_local(drive(plane.clone(), stop.clone()));
                let mut sock = RingSocket::new(&plane, fd);
                let mut byte = [0u8; 1];
                // Echo until the peer closes.
                while sock.read(&mut byte).await.unwrap_or(0) == 1 {
                    sock.write_all(&byte).await.unwrap();
                }
                stop.set(true);
                driver.await;
            });
        let _ = done_tx.send(());
    });
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for round in 0..2_000u32 {
        let b = [round as u8];
        peer.write_all(&b).unwrap();
        let mut back = [0u8; 1];
        peer.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("round {round}: no echo ({e}): the shard parked"));
        assert_eq!(back, b);
    }
    drop(peer);
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the executor ends once the peer closes");
}

/// Readiness that gathered while the shard was busy reaches every socket in
/// one pass. With deferred readiness, Linux (6.13 on) runs at most 20 of
/// the deferred events per enter; a pass that entered once woke 20 sockets
/// and left the rest for later passes, and under load the rest grew.
#[test]
fn one_pass_collects_readiness_for_every_socket() {
    on_plane(1024, 4096, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut held = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..300 {
            let (fd, peer) = pair(&listener);
            tokens.push(plane.register(std::os::fd::AsRawFd::as_raw_fd(&fd), false));
            held.push((fd, peer));
        }
        plane.submit().unwrap();
        // No await from here on: the driver does not run, as a busy shard's
        // does not, while every socket becomes readable.
        for (_, peer) in &mut held {
            peer.write_all(b"x").unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        plane.dispatch();
        let readable = {
            let slots = plane.slots.borrow();
            tokens
                .iter()
                .filter(|t| slots[t.index as usize].readable)
                .count()
        };
        assert_eq!(
            readable,
            tokens.len(),
            "sockets told of their bytes in one pass"
        );
        for t in tokens {
            plane.deregister(t);
        }
        plane.submit().unwrap();
    });
}

/// Runs `test` on a shard that sleeps up to a minute when idle (a deep
/// sleep, see [`deep_sleep`]): whatever the test waits for must end that
/// sleep, or it waits the minute and fails.
fn on_idle_plane<F, Fut>(test: F)
where
    F: FnOnce(Rc<Plane>) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let waiting = Waiting {
        idle_sleep: Duration::from_secs(60),
        ..Waiting::default()
    };
    glommio::LocalExecutorBuilder::default()
        .preempt_timer(PASS_INTERVAL)
        .make()
        .unwrap()
        .run(async move {
            let plane = Plane::with_sizes(64, 256, waiting).unwrap();
            let stop = Rc::new(Cell::new(false));
            let driver = glommio::spawn_local(drive(plane.clone(), stop.clone()));
            // Long enough for the driver to find nothing to do and sleep
            // deep (four quiet short sleeps, 20 ms, then a deep one).
            glommio::timer::sleep(Duration::from_millis(50)).await;
            test(plane).await;
            stop.set(true);
            driver.await;
        });
}

/// How long `f` took: an idle shard's wake-ups are checked against a
/// deep sleep of a minute, so a wake-up that is missed shows as tens of
/// seconds, one that works as the wait itself (well under a second).
async fn took<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let start = std::time::Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

#[test]
fn an_idle_shard_wakes_for_its_timers() {
    on_idle_plane(|_| async {
        let ((), waited) = took(glommio::timer::sleep(Duration::from_millis(300))).await;
        assert!(
            waited < Duration::from_secs(20),
            "a 300 ms timer on an idle shard fired after {waited:?}"
        );
        assert!(waited >= Duration::from_millis(300));
    });
}

#[test]
fn an_idle_shard_wakes_for_a_message_from_another_thread() {
    on_idle_plane(|_| async {
        let (tx, rx) = async_channel::bounded::<u32>(1);
        // No glommio timer meanwhile: only the message can end the sleep.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            tx.send_blocking(7).unwrap();
        });
        let (got, waited) = took(rx.recv()).await;
        assert_eq!(got.unwrap(), 7);
        assert!(
            waited < Duration::from_secs(20),
            "a message sent to an idle shard after 300 ms arrived after {waited:?}"
        );
        sender.join().unwrap();
    });
}

#[test]
fn an_idle_shard_wakes_for_its_blocking_pool() {
    on_idle_plane(|_| async {
        let work = glommio::executor().spawn_blocking(|| {
            std::thread::sleep(Duration::from_millis(300));
            7
        });
        let (got, waited) = took(work).await;
        assert_eq!(got, 7);
        assert!(
            waited < Duration::from_secs(20),
            "the blocking pool's answer reached an idle shard after {waited:?}"
        );
    });
}

/// Reads from `peer` on a thread of its own until EOF, an error or
/// `limit`: what it read, and how it ended. No glommio timer runs while
/// this is awaited (an idle shard may sleep deep meanwhile).
fn read_to_end(
    mut peer: TcpStream,
    limit: Duration,
) -> impl Future<Output = (usize, std::io::Result<()>)> {
    let (tx, rx) = async_channel::bounded(1);
    std::thread::spawn(move || {
        peer.set_read_timeout(Some(limit)).unwrap();
        let mut total = 0;
        let mut b = [0u8; 4096];
        let end = loop {
            match peer.read(&mut b) {
                Ok(0) => break Ok(()),
                Ok(n) => total += n,
                Err(e) => break Err(e),
            }
        };
        let _ = tx.send_blocking((total, end));
    });
    async move { rx.recv().await.unwrap() }
}

/// A socket handed to the plane to close stays open while its peer still
/// sends (what it sends is read and discarded, so the close is no reset),
/// and closes once the peer has closed its side. A shard that stops waits
/// for it.
#[test]
fn a_closing_socket_closes_after_its_peer_not_before() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let sock = RingSocket::new(&plane, fd);
        // Bytes nobody read are waiting when the socket is handed over.
        peer.write_all(b"unread").unwrap();
        // SAFETY: shutdown of the socket's own descriptor: the relay's FIN.
        unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
        sock.close_after_peer();
        assert_eq!(plane.closing(), 1);
        let all_closed = {
            let plane = plane.clone();
            glommio::spawn_local(async move { plane.all_closed().await })
        };
        let peer = blocking(move || {
            let mut b = [0u8; 16];
            assert_eq!(peer.read(&mut b).unwrap(), 0, "the relay's FIN");
            for _ in 0..20 {
                peer.write_all(&[7u8; 1000]).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            peer
        })
        .await;
        assert_eq!(plane.closing(), 1, "closed before its peer");
        assert_eq!(plane.registered(), 1);
        let end = blocking(move || {
            let mut peer = peer;
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            peer.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut b = [0u8; 16];
            peer.read(&mut b).map_err(|e| e.kind())
        })
        .await;
        assert_eq!(end, Ok(0), "the close was a reset");
        all_closed.await;
        assert_eq!(plane.closing(), 0);
        assert_eq!(plane.registered(), 0);
    });
}

/// A peer that never closes does not keep the socket: the plane closes it
/// after [`CLOSE_LIMIT`], even on a shard asleep deep (no timer of
/// glommio's would wake it: the wait is the plane's own).
#[test]
fn a_closing_socket_whose_peer_never_closes_is_closed_after_the_limit() {
    on_idle_plane(|plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, peer) = pair(&listener);
        let sock = RingSocket::new(&plane, fd);
        sock.close_after_peer();
        let ((read, end), waited) = took(read_to_end(peer, Duration::from_secs(20))).await;
        assert_eq!(read, 0);
        end.expect("the peer saw the close (EOF), not a timeout or a reset");
        assert!(
            waited >= CLOSE_LIMIT - Duration::from_millis(100),
            "closed after {waited:?}, before the peer closed or the limit passed"
        );
        assert!(
            waited < Duration::from_secs(20),
            "closed after {waited:?}, not at the limit"
        );
        assert_eq!(plane.closing(), 0);
    });
}

/// A peer that goes on sending after the close gets a reset once the plane
/// has discarded [`DISCARD_LIMIT`] bytes: the socket does not stay open,
/// reading, for as long as it is fed.
#[test]
fn a_closing_socket_that_keeps_receiving_is_reset_after_the_discard_limit() {
    on_plane(64, 256, |plane| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, mut peer) = pair(&listener);
        let sock = RingSocket::new(&plane, fd);
        sock.close_after_peer();
        let sent = blocking(move || {
            let chunk = [1u8; 16 << 10];
            let mut sent = 0usize;
            // 64 times the limit, at loopback speed (well inside the time
            // limit); the socket buffers take a few MiB before the reset
            // comes back, and the reset ends it early.
            while sent < 64 * DISCARD_LIMIT as usize {
                match peer.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => return (sent, true),
                }
            }
            (sent, false)
        })
        .await;
        let (sent, reset) = sent;
        assert!(reset, "the peer sent {sent} bytes without a reset");
        assert!(
            sent >= DISCARD_LIMIT as usize,
            "reset after only {sent} bytes"
        );
        assert_eq!(plane.closing(), 0);
    });
}
