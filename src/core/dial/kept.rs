//! A name's addresses, kept and refreshed ([`Addresses`]), for the
//! connections a glommio executor makes: upstream's for a shard's streams
//! and the admin thread's endpoint probe, and the admin thread's HTTP
//! client's (health checks, usage reconciliation, the alert webhook).
//!
//! Once the name has resolved, no call waits for the resolver: past
//! [`DNS_TTL`] it is asked again in the background while the addresses it
//! gave last serve, and they go on serving if it fails (a resolver that is
//! down or slow for a while must not fail the calls to a host that is up);
//! it is asked again [`DNS_RETRY`] later.
//!
//! Every lookup runs on a `clio-resolve` helper thread of its own, never
//! on glommio's blocking pool (one thread per executor): `getaddrinfo`
//! cannot be given a deadline, and a DNS server that drops the queries
//! holds it for its timeout times its attempts (10 s and more, minutes as
//! some hosts set it), which on the pool would hold everything queued
//! behind it (another name's lookup, the fleet's usage query). A name has
//! at most one lookup running, so at most one such thread, however many
//! calls wait.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::in_order;

/// How long a name's addresses serve before the resolver is asked again.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// How long after a failed refresh the resolver is asked again.
pub const DNS_RETRY: Duration = Duration::from_secs(5);

/// What the log says of a name whose refresh failed and of its recovery,
/// for the user of the addresses (each said once per streak).
#[derive(Debug, Clone, Copy)]
pub struct Said {
    /// The refresh failed and the kept addresses go on serving.
    pub failing: &'static str,
    /// A refresh succeeded after failing.
    pub again: &'static str,
}

/// A name's addresses, as this executor's thread last resolved them, and
/// the one a connection last went to. Cheap to clone: the clones share
/// them (and the one lookup).
#[derive(Debug, Clone)]
pub struct Addresses {
    host: String,
    port: u16,
    said: Said,
    state: Rc<RefCell<Resolved>>,
    /// Held by the one lookup before the name has ever resolved, until
    /// the resolver answers (not until the call that began it gives up);
    /// the calls wait for its answer rather than each starting a lookup
    /// of its own (behind one that hangs, a pile that would outlast the
    /// resolver's outage).
    first_lookup: Rc<glommio::sync::Semaphore>,
}

#[derive(Debug, Default)]
struct Resolved {
    /// In the order to try them ([`in_order`]), ordered when they or
    /// `last_good` change, not at each call.
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
    /// `said`: the log's words for a failed refresh and the recovery.
    pub fn new(host: &str, port: u16, said: Said) -> Addresses {
        Addresses {
            host: host.to_string(),
            port,
            said,
            state: Rc::default(),
            first_lookup: Rc::new(glommio::sync::Semaphore::new(1)),
        }
    }

    /// The name these are the addresses of.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses to try, in order ([`in_order`]). Only while the name
    /// has never resolved does this wait for the resolver (and fail with
    /// it), one lookup at a time however many calls wait; after that it
    /// answers at once (see the module doc). An IP address is its own
    /// answer, with no lookup. No deadline of its own: the caller gives
    /// it one, and a call that gives up leaves the lookup running for
    /// the next.
    pub async fn get(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        if let Some(addrs) = self.known() {
            return Ok(addrs);
        }
        let turn = self
            .first_lookup
            .acquire_static_permit(1)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        // The lookup before this one may have had the answer.
        if let Some(addrs) = self.known() {
            return Ok(addrs);
        }
        // On a task of its own, holding the turn until the resolver
        // answers: a call that gives up meanwhile (its timeout) does not
        // let the next begin another lookup beside this one.
        let (host, port, state) = (self.host.clone(), self.port, self.state.clone());
        let asked = glommio::spawn_local(async move {
            let _turn = turn;
            let addrs = lookup(host, port).await?;
            let mut r = state.borrow_mut();
            r.addrs = in_order(&addrs, r.last_good);
            r.due = Some(Instant::now() + DNS_TTL);
            Ok(r.addrs.clone())
        })
        .detach();
        asked
            .await
            .unwrap_or_else(|| Err(io::Error::other("the lookup's task was cancelled")))
    }

    /// The addresses kept, once the name has resolved (starting a
    /// refresh in the background when they are due for one).
    fn known(&self) -> Option<Vec<SocketAddr>> {
        let mut r = self.state.borrow_mut();
        let due = r.due?;
        if Instant::now() >= due && !r.refreshing {
            r.refreshing = true;
            let (host, port, state) = (self.host.clone(), self.port, self.state.clone());
            glommio::spawn_local(refresh(host, port, self.said, state)).detach();
        }
        Some(r.addrs.clone())
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

/// Asks the resolver for `host`'s addresses on a `clio-resolve` thread of
/// its own (`getaddrinfo` blocks, for as long as the resolver takes),
/// and awaits the answer on the executor.
async fn lookup(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
    let (tx, rx) = async_channel::bounded(1);
    std::thread::Builder::new()
        .name("clio-resolve".into())
        .spawn(move || {
            let _ = tx.send_blocking(super::resolve(&host, port));
        })?;
    rx.recv()
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the resolver's thread ended")))
}

/// A refresh in the background: new addresses replace the old; a failure
/// keeps them and asks again after [`DNS_RETRY`].
async fn refresh(host: String, port: u16, said: Said, state: Rc<RefCell<Resolved>>) {
    let found = lookup(host.clone(), port).await;
    let mut r = state.borrow_mut();
    r.refreshing = false;
    match found {
        Ok(addrs) => {
            if r.failing {
                tracing::info!(%host, "{}", said.again);
            }
            r.failing = false;
            r.addrs = in_order(&addrs, r.last_good);
            r.due = Some(Instant::now() + DNS_TTL);
        }
        Err(e) => {
            if !r.failing {
                tracing::warn!(%host, error = %e, "{}", said.failing);
            }
            r.failing = true;
            r.due = Some(Instant::now() + DNS_RETRY);
        }
    }
}
