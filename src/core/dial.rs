//! Which of a name's addresses a connection goes to, and in what order:
//! upstream's for a stream, Redis's for the cluster thread and for each
//! shard's fleet link, and the HTTP client's (`control::httpc`).
//!
//! A name can resolve to several addresses, and one of them can swallow the
//! handshake without an answer: an IPv6 address the host has no working
//! route to, a dead host still in DNS. Tried one after the other, such an
//! address would cost a connect its whole time limit and fail it. So, as
//! RFC 8305 ("Happy Eyeballs") has it, an attempt runs alone for a while
//! ([`attempt_delay`]: 250 ms, or a quarter of a shorter limit, so that a
//! 250 ms `cluster.timeout` still reaches the second address), or until it
//! fails, then the next address is tried beside it, and the first to
//! connect is used; the others are dropped, their sockets closed.
//! [`in_order`] puts the address that connected last first, so once one
//! answers, the connects after it wait for no other.
//!
//! Two forms: [`first_to_connect`] for a glommio executor (any connect
//! future), [`connect_first`] for a plain thread (the cluster thread's
//! blocking sockets).
//!
//! The addresses themselves: [`resolve`] asks the resolver (and blocks);
//! on a glommio executor, [`Addresses`] ([`kept`]) keeps a name's and
//! refreshes them, its lookups on helper threads, one at a time.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

pub mod kept;
pub use kept::{Addresses, Said, DNS_RETRY, DNS_TTL};

/// How long an attempt runs alone before the next address is tried beside
/// it (RFC 8305's "connection attempt delay", whose recommended value this
/// is), when the connect's limit is a second or more.
pub const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// RFC 8305's floor for the attempt delay.
const LEAST_ATTEMPT_DELAY: Duration = Duration::from_millis(10);

/// The attempt delay for a connect allowed `limit` in all:
/// [`NEXT_ADDRESS_AFTER`], or a quarter of `limit` when that is less (no
/// less than 10 ms), so that an address that does not answer leaves the
/// next one most of the time.
pub fn attempt_delay(limit: Duration) -> Duration {
    NEXT_ADDRESS_AFTER.min(limit / 4).max(LEAST_ATTEMPT_DELAY)
}

/// `host:port`'s addresses from the resolver (`getaddrinfo`, which
/// blocks, for as long as the resolver takes: on a glommio executor, go
/// through [`Addresses`]); an error when it gives none.
pub fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the name resolved to no address",
        ));
    }
    Ok(addrs)
}

/// `addrs` in the order to try them: `last_good` first when it is among
/// them, then the rest alternating between IPv6 and IPv4, beginning with
/// the family the resolver put first (RFC 8305, section 4), each family in
/// the resolver's order.
pub fn in_order(addrs: &[SocketAddr], last_good: Option<SocketAddr>) -> Vec<SocketAddr> {
    let good = last_good.filter(|g| addrs.contains(g));
    let rest = addrs.iter().copied().filter(|a| Some(*a) != good);
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (lead, other): (Vec<_>, Vec<_>) = rest.partition(|a| a.is_ipv6() == first_v6);
    let mut out: Vec<SocketAddr> = good.into_iter().collect();
    let (mut lead, mut other) = (lead.into_iter(), other.into_iter());
    loop {
        match (lead.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connects to the first of `addrs` (tried in this order) that answers,
/// with `connect` for each: an attempt runs alone for `delay`
/// ([`attempt_delay`]), or until it fails, before the next begins beside
/// it. Returns the address that connected and its connection; the other
/// attempts are dropped. An error that no other address could mend (the
/// relay out of file descriptors, by `fatal`) ends it at once; otherwise,
/// once every attempt failed, the last error. No deadline of its own: the
/// caller's time limit bounds it.
pub async fn first_to_connect<T, F, Fut>(
    addrs: &[SocketAddr],
    delay: Duration,
    mut connect: F,
    fatal: impl Fn(&io::Error) -> bool,
) -> io::Result<(SocketAddr, T)>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut attempts: Vec<(SocketAddr, Pin<Box<Fut>>)> = Vec::new();
    let mut next = addrs.iter().copied();
    let mut last = None;
    loop {
        // The next address begins: the first, after a failure, or once
        // the last to begin has run alone long enough.
        if let Some(addr) = next.next() {
            attempts.push((addr, Box::pin(connect(addr))));
        } else if attempts.is_empty() {
            return Err(last.unwrap_or_else(no_address));
        }
        let mut delay = (next.len() > 0).then(|| Box::pin(glommio::timer::Timer::new(delay)));
        let ended = std::future::poll_fn(|cx| {
            for (i, (_, attempt)) in attempts.iter_mut().enumerate() {
                if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                    return Poll::Ready(Some((i, r)));
                }
            }
            match delay.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(_)) => Poll::Ready(None),
                _ => Poll::Pending,
            }
        })
        .await;
        match ended {
            None => {}
            Some((i, Ok(conn))) => return Ok((attempts[i].0, conn)),
            Some((_, Err(e))) if fatal(&e) => return Err(e),
            Some((i, Err(e))) => {
                drop(attempts.swap_remove(i));
                last = Some(e);
            }
        }
    }
}

/// [`first_to_connect`] for a thread that blocks: TCP to the first of
/// `addrs` (in this order) that answers before `deadline`, the attempts
/// staggered by [`attempt_delay`] of the time left, each a non-blocking
/// connect watched with `poll(2)`. The connection it returns blocks again.
/// Past `deadline`: `TimedOut`; every address refused: the last error.
pub fn connect_first(addrs: &[SocketAddr], deadline: Instant) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let delay = attempt_delay(deadline.saturating_duration_since(Instant::now()));
    let mut attempts: Vec<Socket> = Vec::new();
    let mut next = addrs.iter();
    let mut last = None;
    let mut next_at = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_at || attempts.is_empty() {
            if let Some(addr) = next.next() {
                next_at = now + delay;
                let sock = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
                sock.set_nonblocking(true)?;
                match sock.connect(&(*addr).into()) {
                    Ok(()) => return connected(sock),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => attempts.push(sock),
                    Err(e) => {
                        last = Some(e);
                        next_at = now;
                    }
                }
                continue;
            }
            if attempts.is_empty() {
                return Err(last.unwrap_or_else(no_address));
            }
        }
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let until = if next.len() > 0 {
            next_at.min(deadline)
        } else {
            deadline
        };
        let mut fds: Vec<libc::pollfd> = attempts
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let wait = until.saturating_duration_since(now).as_millis().max(1);
        // SAFETY: `fds` is a live array of `fds.len()` pollfd entries.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                i32::try_from(wait).unwrap_or(i32::MAX),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // The attempts that ended, last first so that removing one leaves
        // the indices before it as they were.
        for i in (0..fds.len()).rev() {
            if fds[i].revents == 0 {
                continue;
            }
            let sock = attempts.swap_remove(i);
            match sock.take_error()? {
                None => return connected(sock),
                Some(e) => {
                    last = Some(e);
                    next_at = Instant::now();
                }
            }
        }
    }
}

/// A connected socket, blocking again, as a std `TcpStream`.
fn connected(sock: socket2::Socket) -> io::Result<TcpStream> {
    sock.set_nonblocking(false)?;
    Ok(sock.into())
}

fn no_address() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_last_good_address_first_then_the_families_in_turn() {
        let v6 = [a("[2001:db8::1]:443"), a("[2001:db8::2]:443")];
        let v4 = [a("192.0.2.1:443"), a("192.0.2.2:443"), a("192.0.2.3:443")];
        let resolved = [v6[0], v6[1], v4[0], v4[1], v4[2]];
        assert_eq!(
            in_order(&resolved, None),
            [v6[0], v4[0], v6[1], v4[1], v4[2]]
        );
        assert_eq!(
            in_order(&resolved, Some(v4[1])),
            [v4[1], v6[0], v4[0], v6[1], v4[2]]
        );
        // An address no longer resolved is not tried.
        assert_eq!(in_order(&[v4[0], v6[0]], Some(v4[2])), [v4[0], v6[0]]);
        assert!(in_order(&[], Some(v4[0])).is_empty());
    }

    #[test]
    fn the_attempt_delay_leaves_a_short_limit_most_of_its_time() {
        assert_eq!(attempt_delay(Duration::from_secs(5)), NEXT_ADDRESS_AFTER);
        assert_eq!(attempt_delay(Duration::from_secs(1)), NEXT_ADDRESS_AFTER);
        assert_eq!(
            attempt_delay(Duration::from_millis(250)),
            Duration::from_micros(62_500)
        );
        assert_eq!(attempt_delay(Duration::ZERO), LEAST_ATTEMPT_DELAY);
    }

    /// A listener that never answers a handshake: its backlog is full
    /// (one connection queued, none accepted), so the kernel drops the
    /// SYNs that come after.
    fn black_hole() -> (socket2::Socket, TcpStream, SocketAddr) {
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let addr = hole.local_addr().unwrap().as_socket().unwrap();
        let queued = TcpStream::connect(addr).unwrap();
        (hole, queued, addr)
    }

    #[test]
    fn a_blocking_connect_goes_past_an_address_that_never_answers() {
        let (_hole, _queued, hole) = black_hole();
        let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good_addr = good.local_addr().unwrap();
        // A limit of 250 ms, as `cluster.timeout`'s default: the hole gets
        // a quarter of it, the good address the rest.
        let deadline = Instant::now() + Duration::from_millis(250);
        let tcp = connect_first(&[hole, good_addr], deadline).expect("the good address answers");
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        // It blocks again, as the caller's timeouts expect.
        tcp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let err = (&tcp).read(&mut [0u8; 1]).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
    }

    #[test]
    fn a_blocking_connect_gives_the_last_refusal_or_the_timeout() {
        // Two ports nothing listens on.
        let closed = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = connect_first(&[closed(), closed()], deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let err = connect_first(&[], deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let (_hole, _queued, hole) = black_hole();
        let deadline = Instant::now() + Duration::from_millis(100);
        let err = connect_first(&[hole], deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
