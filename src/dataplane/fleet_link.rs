//! A shard's own connection to the fleet's store (Redis), for stream opens.
//!
//! Through the cluster thread, every open costs a futex to wake the thread,
//! its sleep on Redis's answer, and a wake-up of the shard. Here the shard
//! writes the open on a socket registered with its data-plane ring and
//! reads the answer when the ring says it is there, like any stream socket:
//! no thread is woken. Opens from the shard's streams are pipelined on the
//! one connection, and the holds given back meanwhile go in front of each
//! (so a device reopening at its limit finds its place free).
//!
//! The link is only used while the cluster thread says the store is up.
//! Any failure (an error reply, bytes that are not a reply, a lost
//! connection, an answer later than `cluster.timeout`) answers every open
//! waiting on it as "store down" and tells the thread, which goes down and
//! registers this node's tally again when it reconnects (see
//! `core::cluster`): an open whose answer was lost is not counted twice.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use redis::Value;

use crate::core::cluster::scripts::{self, ADJUST_HASH, OPEN_HASH};
use crate::core::cluster::{
    resp, Fleet, Kind, LinkTarget, OpenAnswer, OpenLink, OpenRequest, Taken,
};
use crate::dataplane::uring::RingSocket;

/// How long a shard waits before trying to connect again.
const RETRY: Duration = Duration::from_secs(1);
/// The most reply bytes a link holds while a reply is incomplete; ours
/// are a few dozen bytes.
const MAX_PENDING: usize = 64 * 1024;

/// A shard's link (one per shard, made on its first stream open).
#[derive(Debug)]
pub struct FleetLink {
    fleet: Arc<Fleet>,
    me: Weak<FleetLink>,
    conn: RefCell<Option<Rc<Conn>>>,
    connecting: Cell<bool>,
    last_try: Cell<Option<Instant>>,
}

/// One connection: commands to write, and who waits for each reply.
#[derive(Debug)]
struct Conn {
    sock: RingSocket,
    /// Commands not yet written; `written` of them are.
    out: RefCell<Vec<u8>>,
    written: Cell<usize>,
    /// One entry per command written or to write, in order.
    waiting: RefCell<VecDeque<Waiter>>,
    /// The connection's task, to wake when `out` gains a command.
    task: RefCell<Option<Waker>>,
    broken: Cell<bool>,
}

/// Who waits for a reply.
#[derive(Debug)]
enum Waiter {
    /// Log-in, script loads and holds given back: any answer but an error.
    Plain,
    /// A stream open.
    Open {
        req: OpenRequest,
        reply: async_channel::Sender<(OpenAnswer, Taken)>,
    },
}

impl FleetLink {
    /// A link for this shard; it connects when first used.
    pub fn new(fleet: Arc<Fleet>) -> Rc<FleetLink> {
        Rc::new_cyclic(|me| FleetLink {
            fleet,
            me: me.clone(),
            conn: RefCell::new(None),
            connecting: Cell::new(false),
            last_try: Cell::new(None),
        })
    }

    /// The connection, if it is open and sound.
    fn ready(&self) -> Option<Rc<Conn>> {
        self.conn
            .borrow()
            .as_ref()
            .filter(|c| !c.broken.get())
            .cloned()
    }

    /// Starts connecting in the background (the open asking goes through
    /// the cluster thread meanwhile), at most once per [`RETRY`].
    fn connect_soon(&self) {
        if self.connecting.get() || self.last_try.get().is_some_and(|t| t.elapsed() < RETRY) {
            return;
        }
        let (Some(target), Some(me)) = (self.fleet.link_target(), self.me.upgrade()) else {
            return;
        };
        self.connecting.set(true);
        self.last_try.set(Some(Instant::now()));
        glommio::spawn_local(async move {
            let conn = connect(&target, &me.fleet).await;
            me.connecting.set(false);
            let Some(conn) = conn else { return };
            *me.conn.borrow_mut() = Some(conn.clone());
            let r = conn.run(&me.fleet).await;
            let why = match r {
                Err(e) => {
                    tracing::debug!(error = %e, "shard's store connection ended");
                    e.to_string()
                }
                Ok(()) => "the connection ended".to_string(),
            };
            conn.fail(&me.fleet, || why);
            let mut mine = me.conn.borrow_mut();
            if mine.as_ref().is_some_and(|c| Rc::ptr_eq(c, &conn)) {
                *mine = None;
            }
        })
        .detach();
    }
}

impl OpenLink for FleetLink {
    fn open(
        &self,
        req: OpenRequest,
    ) -> Result<Pin<Box<dyn Future<Output = (OpenAnswer, Taken)> + '_>>, OpenRequest> {
        let Some(conn) = self.ready() else {
            self.connect_soon();
            return Err(req);
        };
        let fleet = &self.fleet;
        let (reply, answer) = async_channel::bounded(1);
        {
            let mut out = conn.out.borrow_mut();
            let mut waiting = conn.waiting.borrow_mut();
            let unsent = fleet.take_unsent();
            if !unsent.is_empty() {
                let mut c = scripts::evalsha(&ADJUST_HASH);
                c.arg(&fleet.member);
                for (kind, id, delta) in unsent {
                    c.arg(kind.field()).arg(id).arg(delta);
                }
                c.write_packed_command(&mut out);
                waiting.push_back(Waiter::Plain);
            }
            let mut c = scripts::evalsha(&OPEN_HASH);
            req.args(&fleet.member, fleet.lease_ttl.as_millis() as u64, &mut c);
            c.write_packed_command(&mut out);
            waiting.push_back(Waiter::Open { req, reply });
        }
        conn.wake();
        Ok(Box::pin(async move {
            match crate::core::deadline::timeout(fleet.timeout(), answer.recv()).await {
                Some(Ok(a)) => a,
                // Late, or the connection failed: whether Redis took it is
                // not known, which the thread settles (see the module doc).
                Some(Err(_)) => {
                    // The connection failed first (it told the thread why).
                    conn.fail(fleet, || "the connection ended".to_string());
                    (OpenAnswer::Down, Taken::default())
                }
                None => {
                    conn.fail(fleet, || {
                        format!("no answer within cluster.timeout ({:?})", fleet.timeout())
                    });
                    (OpenAnswer::Down, Taken::default())
                }
            }
        }))
    }
}

/// Connects and queues the log-in and the script loads, ahead of any open.
async fn connect(target: &LinkTarget, fleet: &Fleet) -> Option<Rc<Conn>> {
    let plane = crate::dataplane::uring::current()?;
    let any = crate::core::dial::first_to_connect(
        &target.addrs,
        crate::core::dial::attempt_delay(fleet.timeout()),
        |addr| RingSocket::connect(&plane, addr),
        |_| false,
    );
    let (_, sock) = crate::core::deadline::timeout(fleet.timeout(), any)
        .await?
        .ok()?;
    sock.set_nodelay().ok()?;
    let conn = Rc::new(Conn {
        sock,
        out: RefCell::new(Vec::with_capacity(4096)),
        written: Cell::new(0),
        waiting: RefCell::new(VecDeque::new()),
        task: RefCell::new(None),
        broken: Cell::new(false),
    });
    let mut first = Vec::new();
    if let Some(p) = &target.password {
        let mut c = redis::cmd("AUTH");
        if let Some(u) = &target.username {
            c.arg(u);
        }
        first.push(c.arg(p.expose()).clone());
    }
    if target.db != 0 {
        first.push(redis::cmd("SELECT").arg(target.db).clone());
    }
    for script in [scripts::OPEN, scripts::ADJUST] {
        first.push(redis::cmd("SCRIPT").arg("LOAD").arg(script).clone());
    }
    for c in first {
        c.write_packed_command(&mut conn.out.borrow_mut());
        conn.waiting.borrow_mut().push_back(Waiter::Plain);
    }
    Some(conn)
}

impl Conn {
    fn wake(&self) {
        if let Some(w) = self.task.borrow_mut().take() {
            w.wake();
        }
    }

    /// Breaks the connection: every open waiting is answered "store down"
    /// (its sender dropped), and the thread is told when any was, and why.
    fn fail(&self, fleet: &Fleet, why: impl FnOnce() -> String) {
        if self.broken.replace(true) {
            return;
        }
        let outstanding = std::mem::take(&mut *self.waiting.borrow_mut());
        if !outstanding.is_empty() {
            fleet.link_failed(why());
        }
        self.wake();
    }

    /// Writes what is queued and reads replies until the connection fails.
    async fn run(&self, fleet: &Arc<Fleet>) -> io::Result<()> {
        let mut pending: Vec<u8> = Vec::with_capacity(512);
        let mut buf = [0u8; 2048];
        std::future::poll_fn(|cx| loop {
            if self.broken.get() {
                return Poll::Ready(Err(io::Error::other("link broken")));
            }
            let mut moved = false;
            {
                let mut out = self.out.borrow_mut();
                let w = self.written.get();
                if w < out.len() {
                    match self.sock.poll_send(cx, &[io::IoSlice::new(&out[w..])]) {
                        Poll::Ready(Ok(n)) => {
                            moved = true;
                            if w + n == out.len() {
                                out.clear();
                                self.written.set(0);
                            } else {
                                self.written.set(w + n);
                            }
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
            }
            match self.sock.poll_recv(cx, &mut buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(n)) => {
                    moved = true;
                    pending.extend_from_slice(&buf[..n]);
                    if let Err(e) = self.take_replies(&mut pending, fleet) {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if !moved {
                *self.task.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
        })
        .await
    }

    /// Answers the waiters of every complete reply in `pending`.
    fn take_replies(&self, pending: &mut Vec<u8>, fleet: &Arc<Fleet>) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut at = 0;
        while let Some(n) = resp::reply_len(&pending[at..]).map_err(|_| bad("not a Redis reply"))? {
            let value = redis::parse_redis_value(&pending[at..at + n])
                .map_err(|_| bad("not a Redis reply"))?;
            at += n;
            let waiter = self
                .waiting
                .borrow_mut()
                .pop_front()
                .ok_or_else(|| bad("a reply to nothing asked"))?;
            answer(waiter, &value, fleet).map_err(|_| bad("the store refused a call"))?;
        }
        pending.drain(..at);
        if pending.len() > MAX_PENDING {
            return Err(bad("a reply too long"));
        }
        Ok(())
    }
}

/// Hands `value` to `waiter`. An error reply, or an open answered with
/// anything but its script's reply, is the link's failure.
fn answer(waiter: Waiter, value: &Value, fleet: &Arc<Fleet>) -> Result<(), ()> {
    if matches!(value, Value::ServerError(_)) {
        return Err(());
    }
    fleet
        .stats
        .calls_ok
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Waiter::Open { req, reply } = waiter else {
        return Ok(());
    };
    let answer = scripts::open_answer(value);
    let mut taken = Taken::default();
    match answer {
        OpenAnswer::Down => return Err(()),
        OpenAnswer::Ok(pick, _) => {
            // Counted in Redis now; the thread's tally learns it from the
            // queue, and a stream that stopped waiting gives it back.
            if !req.device.is_empty() {
                taken.device = Some(fleet.counted(Kind::Device, &req.device));
            }
            let account = pick.and_then(|i| req.candidates.get(i));
            taken.account = account.map(|(id, _)| fleet.counted(Kind::Account, id));
        }
        _ => {}
    }
    let _ = reply.try_send((answer, taken));
    Ok(())
}
