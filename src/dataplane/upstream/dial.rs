//! From a name to a connection: the name's addresses, kept and refreshed
//! ([`Addresses`]), and which of them a connection goes to, in what order
//! (upstream's for a stream; [`first_to_connect`] also for Redis's, a
//! shard's fleet link).
//!
//! Once the name has resolved, no open waits for the resolver: past
//! [`DNS_TTL`] it is asked again in the background while the addresses it
//! gave last serve, and they go on serving if it fails (a resolver that is
//! down or slow for a while must not fail the opens of an upstream that is
//! up); it is asked again [`DNS_RETRY`] later.
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

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// How long a name's addresses serve before the resolver is asked again.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// How long after a failed refresh the resolver is asked again.
pub const DNS_RETRY: Duration = Duration::from_secs(5);

/// How long an attempt runs alone before the next address is tried beside
/// it (RFC 8305's "connection attempt delay", whose recommended value this
/// is).
pub const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// A name's addresses, as its shard (or the admin thread) last resolved
/// them, and the one a connection last went to.
#[derive(Debug)]
pub struct Addresses {
    host: String,
    port: u16,
    state: Rc<RefCell<Resolved>>,
}

#[derive(Debug, Default)]
struct Resolved {
    /// In the order to try them ([`in_order`]), ordered when they or
    /// `last_good` change, not at each open.
    addrs: Vec<SocketAddr>,
    /// When to ask the resolver again; `None` until it first answered.
    due: Option<Instant>,
    /// A refresh is under way.
    refreshing: bool,
    /// The last refresh failed (said once per streak).
    failing: bool,
    last_good: Option<SocketAddr>,
}

impl Addresses {
    /// `host`'s addresses, port `port`; resolved when first asked for.
    pub fn new(host: &str, port: u16) -> Addresses {
        Addresses {
            host: host.to_string(),
            port,
            state: Rc::default(),
        }
    }

    /// The addresses to try, in order ([`in_order`]). Only while the name
    /// has never resolved does this wait for the resolver (and fail with
    /// it); after that it answers at once (see the module doc).
    pub async fn get(&self) -> io::Result<Vec<SocketAddr>> {
        {
            let mut r = self.state.borrow_mut();
            if let Some(due) = r.due {
                if Instant::now() >= due && !r.refreshing {
                    r.refreshing = true;
                    let (host, port, state) = (self.host.clone(), self.port, self.state.clone());
                    glommio::spawn_local(refresh(host, port, state)).detach();
                }
                return Ok(r.addrs.clone());
            }
        }
        let addrs = lookup(self.host.clone(), self.port).await?;
        let mut r = self.state.borrow_mut();
        r.addrs = in_order(&addrs, r.last_good);
        r.due = Some(Instant::now() + DNS_TTL);
        Ok(r.addrs.clone())
    }

    /// A connection went to `addr`: it is tried first from now on.
    pub fn connected(&self, addr: SocketAddr) {
        let mut r = self.state.borrow_mut();
        r.last_good = Some(addr);
        if r.addrs.first() != Some(&addr) {
            r.addrs = in_order(&r.addrs, Some(addr));
        }
    }
}

/// Asks the resolver for `host`'s addresses on glommio's blocking pool
/// (`getaddrinfo` blocks), not on the executor's thread.
async fn lookup(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = glommio::executor()
        .spawn_blocking(move || {
            (host.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect)
        })
        .await?;
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the name resolved to no address",
        ));
    }
    Ok(addrs)
}

/// A refresh in the background: new addresses replace the old; a failure
/// keeps them and asks again after [`DNS_RETRY`].
async fn refresh(host: String, port: u16, state: Rc<RefCell<Resolved>>) {
    let found = lookup(host.clone(), port).await;
    let mut r = state.borrow_mut();
    r.refreshing = false;
    match found {
        Ok(addrs) => {
            if r.failing {
                tracing::info!(%host, "the upstream name resolves again");
            }
            r.failing = false;
            r.addrs = in_order(&addrs, r.last_good);
            r.due = Some(Instant::now() + DNS_TTL);
        }
        Err(e) => {
            if !r.failing {
                tracing::warn!(%host, error = %e, "the upstream name did not resolve; streams keep opening to the addresses it had");
            }
            r.failing = true;
            r.due = Some(Instant::now() + DNS_RETRY);
        }
    }
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
