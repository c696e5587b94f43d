//! Which of a name's addresses a connection goes to, and in what order:
//! upstream's for a stream, Redis's for a shard's fleet link.
//!
//! A name can resolve to several addresses, and one of them can swallow the
//! handshake without an answer: an IPv6 address the host has no working
//! route to, a dead host still in DNS. Tried one after the other, such an
//! address would cost every stream open the whole `connect_timeout` and
//! fail it. So, as RFC 8305 ("Happy Eyeballs") has it, an attempt runs
//! alone for [`NEXT_ADDRESS_AFTER`] (or until it fails), then the next
//! address is tried beside it, and the first to connect is used; the
//! others are dropped, their sockets closed. The address that connected
//! last is tried first next time ([`in_order`]), so once one answers, the
//! opens after it wait for no other.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

/// How long an attempt runs alone before the next address is tried beside
/// it (RFC 8305's "connection attempt delay", whose recommended value this
/// is).
pub const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

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
/// with `connect` for each: an attempt runs alone for
/// [`NEXT_ADDRESS_AFTER`], or until it fails, before the next begins beside
/// it. Returns the address that connected and its connection; the other
/// attempts are dropped. An error that no other address could mend (the
/// relay out of file descriptors, by `fatal`) ends it at once; otherwise,
/// once every attempt failed, the last error. No deadline of its own: the
/// caller's `connect_timeout` bounds it.
pub async fn first_to_connect<T, F, Fut>(
    addrs: &[SocketAddr],
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
            return Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
            }));
        }
        let mut delay =
            (next.len() > 0).then(|| Box::pin(glommio::timer::Timer::new(NEXT_ADDRESS_AFTER)));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
