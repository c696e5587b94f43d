//! Upstream's name, and its addresses kept and refreshed
//! ([`Addresses`]); which of them a connection goes to, and in what order,
//! is [`crate::core::dial`]'s.
//!
//! Once the name has resolved, no open waits for the resolver: past
//! [`DNS_TTL`] it is asked again in the background while the addresses it
//! gave last serve, and they go on serving if it fails (a resolver that is
//! down or slow for a while must not fail the opens of an upstream that is
//! up); it is asked again [`DNS_RETRY`] later.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::core::dial::in_order;

/// How long a name's addresses serve before the resolver is asked again.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// How long after a failed refresh the resolver is asked again.
pub const DNS_RETRY: Duration = Duration::from_secs(5);

/// A name's addresses, as its shard (or the admin thread) last resolved
/// them, and the one a connection last went to.
#[derive(Debug)]
pub struct Addresses {
    host: String,
    port: u16,
    state: Rc<RefCell<Resolved>>,
    /// Held by the one lookup before the name has ever resolved, until
    /// the resolver answers (not until the open that began it gives up);
    /// the opens wait for its answer rather than each queueing a lookup
    /// of its own on the blocking pool (behind one that hangs, a queue
    /// that would outlast the resolver's outage).
    first_lookup: Rc<glommio::sync::Semaphore>,
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
            first_lookup: Rc::new(glommio::sync::Semaphore::new(1)),
        }
    }

    /// The addresses to try, in order ([`in_order`]). Only while the name
    /// has never resolved does this wait for the resolver (and fail with
    /// it), one lookup at a time however many opens wait; after that it
    /// answers at once (see the module doc).
    pub async fn get(&self) -> io::Result<Vec<SocketAddr>> {
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
        // answers: an open that gives up meanwhile (its timeout) does not
        // let the next begin another lookup behind this one.
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
            glommio::spawn_local(refresh(host, port, state)).detach();
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

/// Asks the resolver for `host`'s addresses on glommio's blocking pool
/// (`getaddrinfo` blocks), not on the executor's thread.
async fn lookup(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
    glommio::executor()
        .spawn_blocking(move || crate::core::dial::resolve(&host, port))
        .await
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
