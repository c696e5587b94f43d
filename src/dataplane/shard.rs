//! A shard: one glommio executor on one core, with its own listener on the
//! client port (SO_REUSEPORT: the kernel spreads connections), its own key
//! ring, buffer pool, mask keys and metrics. A stream lives on the shard that
//! accepted it, client and upstream sockets alike.
//!
//! The control plane talks to a shard only by message ([`ShardMsg`]); the
//! shard answers between events.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};

use crate::core::config::LimitsConfig;
use crate::core::keyring::KeyRing;
use crate::core::metrics::{MetricsSnapshot, ShardMetrics};
use crate::core::token::TokenKeys;
use crate::dataplane::buf::BufferPool;
use crate::dataplane::upstream::UpstreamTarget;
use clio_frame::mask::MaskKeys;

pub use crate::dataplane::process::{AdmitPermit, BegunStream, OpenConnection, ProcessState};

/// Size of each pooled read buffer: a stream uses two (one per direction),
/// only while they hold bytes. Audio frames are 3–4 KiB; results are
/// smaller. Larger frames stream through in pieces. A stream that sends
/// faster than real time (a backlog after a network stall) moves up to
/// this much per read and write: 32 KiB carried the flood 7–11% faster
/// than 16 KiB at 10% less CPU, with no change at real time, in churn or
/// idle; 64 KiB was 8% slower (benches/README.md, "Read buffers of 32 KiB").
pub const BUFFER_SIZE: usize = 32 * 1024;

/// The most a shard keeps of free read buffers when the streams that used
/// them are done (a burst's buffers beyond it go back to the allocator).
/// A bound in bytes, so the memory a shard keeps after a burst does not
/// grow with [`BUFFER_SIZE`].
const POOL_KEEP_BYTES: usize = 64 << 20;

/// io_uring registered memory per executor. The relay reads into its own
/// pooled buffers, so glommio's registered-buffer arena is barely used; the
/// process's locked-memory limit (often 8 MiB) must fit every executor's.
pub const IO_MEMORY: usize = 64 * 1024;

/// Submission-queue depth of each of an executor's io_uring rings (glommio's
/// default is 128). Every socket a shard waits on is an armed poll in its
/// main ring, and the kernel finds a request to cancel (glommio cancels its
/// preemption timer on every reactor turn) by walking one bucket of the
/// ring's cancel hash table, which has `2^(log2(completion entries) - 5)`
/// buckets, at most 256. At 128 that is 8 buckets: with 18,000 sockets
/// waiting, every turn walked chains of about 2,000 polls, and
/// `io_poll_find` was 45% of an idle relay's CPU (`perf`, 9,000 idle
/// streams). 4,096 gives the full 256 buckets for about 400 KiB of ring
/// memory per ring.
pub const RING_DEPTH: usize = 4096;

/// Messages from the control plane to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Send back a snapshot of the shard's metrics.
    Snapshot(async_channel::Sender<MetricsSnapshot>),
    /// Answer, to show the shard's event loop turns (the watchdog's
    /// liveness check; a snapshot would copy every histogram).
    /// The reply is the shard's name; a plain channel, so the watchdog
    /// thread waits for it with a deadline and no thread of its own.
    Ping(std::sync::mpsc::Sender<String>),
    /// Install new limits and token keys (a reload); streams already open
    /// keep the version they started with.
    Settings(Settings),
    /// End the live streams of these devices and tokens (a revocation).
    EndStreams {
        /// Device ids to match.
        devices: std::collections::HashSet<String>,
        /// Token ids to match.
        tokens: std::collections::HashSet<String>,
    },
    /// The drain stopped waiting for streams (they ended, or its deadline
    /// passed): finalize and end every live stream, and answer every
    /// connection still without one.
    Drain,
    /// Close the listener: new connections go to another process (a
    /// restart) while this one drains.
    StopAccepting,
    /// A rotated-out key's overlap is over: finalize and end the streams
    /// still on it (clients reconnect onto the new key).
    EndKey(String),
    /// Hand over the usage records of streams ended since the last call.
    TakeUsage(async_channel::Sender<Vec<crate::core::usage::UsageRecord>>),
    /// A new key-ring version was published: install it (if a stream open
    /// has not already, see [`Shard::catch_up_ring`]).
    Ring,
    /// Stop accepting and end the executor.
    Stop,
}

/// Everything a shard needs, built by the server before the thread starts.
#[derive(Debug, Clone)]
pub struct ShardSetup {
    /// Client listen address (with the port already fixed for shards after the first).
    pub listen: SocketAddr,
    /// Pin to this CPU, if any.
    pub cpu: Option<usize>,
    /// Stream limits.
    pub limits: LimitsConfig,
    /// `[failover]`.
    pub failover: crate::core::config::FailoverConfig,
    /// Whether the account key goes in the upgrade's Authorization header.
    pub key_in_header: bool,
    /// Upstream connect + upgrade time limit.
    pub connect_timeout: Duration,
    /// The pools and their endpoints (the default pool's is `upstream.url`).
    pub pools: Vec<crate::core::config::PoolConfig>,
    /// TLS for a wss:// upstream.
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// Session token keys.
    pub tokens: Arc<TokenKeys>,
    /// Per-device limits and tiers.
    pub devices: Arc<crate::core::config::DevicesConfig>,
    /// A listening socket passed by systemd, used instead of binding.
    pub listen_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// TLS for the client port.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// `server.allow`.
    pub allow: Arc<Vec<ipnet::IpNet>>,
    /// `server.proxy_protocol_from`.
    pub proxy_protocol_from: Arc<Vec<ipnet::IpNet>>,
    /// Process-wide state.
    pub process: Arc<ProcessState>,
}

/// A shard's state, shared by its tasks (`Rc`: it never leaves its thread).
#[derive(Debug)]
pub struct Shard {
    /// Shard number (0-based).
    pub index: usize,
    /// Limits and token keys; replaced whole on reload, and each stream keeps
    /// the version it started with.
    settings: RefCell<Rc<Settings>>,
    /// Where the account key goes: the upgrade header or the first message.
    pub key_in_header: bool,
    /// Upstream connect + upgrade time limit.
    pub connect_timeout: Duration,
    /// Process-wide limits and flags.
    pub process: Arc<ProcessState>,
    /// This shard's account slots.
    pub ring: RefCell<KeyRing>,
    /// How many published ring versions `ring` has caught up with
    /// ([`ProcessState::ring_if_newer`]).
    ring_installed: Cell<u64>,
    /// This shard's counters and histograms.
    pub metrics: ShardMetrics,
    /// Read buffers, two per live stream.
    pub pool: Rc<BufferPool>,
    /// Fresh mask keys for client→upstream frames.
    pub masks: RefCell<MaskKeys>,
    /// Where each pool's upstream is and how to reach it, by pool name.
    pub upstreams: Vec<(String, UpstreamTarget)>,
    next_stream: Cell<u64>,
    /// Live streams on this shard, for ending some on request (revocation).
    pub live: RefCell<std::collections::HashMap<u64, Rc<LiveStream>>>,
    /// Usage of streams ended since the admin thread last collected it.
    pub usage: RefCell<Vec<crate::core::usage::UsageRecord>>,
    /// Upgraded connections still waiting for their first-message token;
    /// they hold no `max_streams` slot.
    pub unauthenticated: crate::dataplane::unauth::ShardPool,
    /// Streams refused at the file limit: logged once per interval, with a count.
    pub file_limit_log: crate::dataplane::accept::Rate,
    /// Notified on `ShardMsg::Drain`: wakes the connections still without
    /// a stream (see [`Shard::drain_ended`]), and the streams opening
    /// upstream or finalizing when the relay stops now (see
    /// [`Shard::stopping_now`]).
    drain_over: event_listener::Event,
    /// This shard's own connection to the fleet's store, made on its first
    /// stream open (`None` without `[cluster]`).
    fleet_link: std::cell::OnceCell<Option<Rc<crate::dataplane::fleet_link::FleetLink>>>,
}

/// Why the relay ends a live stream itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A device limit or a revocation.
    Limit(crate::core::devices::Limit),
    /// The relay is shutting down and the drain deadline passed: finalize,
    /// deliver the last results, then tell the client to reconnect.
    Drain,
    /// The key the stream runs on was rotated out and its overlap has
    /// ended: the stream moves to a current key (a resume, for raw audio)
    /// or ends as a drain does. Taken once: a stream that moved goes on.
    KeyRetired,
}

/// A live stream as its shard tracks it.
#[derive(Debug)]
pub struct LiveStream {
    /// The device its token was minted for.
    pub device: String,
    /// Its token's id.
    pub token_id: String,
    /// Fingerprint of the account key it runs on.
    pub key: RefCell<String>,
    stop: Cell<Option<StopReason>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl LiveStream {
    /// A live stream of `device` with token `token_id`.
    pub fn new(device: &str, token_id: &str) -> Rc<LiveStream> {
        Rc::new(LiveStream {
            device: device.into(),
            token_id: token_id.into(),
            key: RefCell::new(String::new()),
            stop: Cell::new(None),
            waker: RefCell::new(None),
        })
    }

    /// Asks the stream to end, for `why`; a move off a retired key never
    /// replaces a reason to end.
    pub fn stop(&self, why: StopReason) {
        if why == StopReason::KeyRetired && self.stop.get().is_some() {
            return;
        }
        self.stop.set(Some(why));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Forgets a request to move off a retired key: the stream is on
    /// another key already (it moved while the request came).
    pub fn forget_key_retired(&self) {
        if self.stop.get() == Some(StopReason::KeyRetired) {
            self.stop.set(None);
        }
    }

    /// Resolves when the stream is asked to end (or to move: that request
    /// is taken).
    pub async fn stopped(&self) -> StopReason {
        std::future::poll_fn(|cx| match self.stop.get() {
            Some(StopReason::KeyRetired) => {
                self.stop.set(None);
                std::task::Poll::Ready(StopReason::KeyRetired)
            }
            Some(why) => std::task::Poll::Ready(why),
            None => {
                // Polled on every wake-up of the stream's task: clone the
                // waker only when it changed.
                let mut waker = self.waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// What a reload can change on a running shard.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Stream limits.
    pub limits: LimitsConfig,
    /// Open-time replay and mid-stream resume.
    pub failover: crate::core::config::FailoverConfig,
    /// Session token keys.
    pub tokens: Arc<TokenKeys>,
    /// Per-device limits and tiers.
    pub devices: Arc<crate::core::config::DevicesConfig>,
    /// TLS for the client port, if `[tls]` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Networks clients may connect from (`server.allow`); empty = any.
    pub allow: Arc<Vec<ipnet::IpNet>>,
    /// Balancers whose connections start with a PROXY protocol header
    /// (`server.proxy_protocol_from`); empty = none.
    pub proxy_protocol_from: Arc<Vec<ipnet::IpNet>>,
}

impl Settings {
    /// Whether a client at `peer` may connect.
    pub fn allows(&self, peer: impl FnOnce() -> Option<std::net::SocketAddr>) -> bool {
        crate::dataplane::io::allowed(&self.allow, peer)
    }
}

impl Shard {
    /// Resolves once a drain has stopped waiting for its streams (they
    /// ended, or its deadline passed; at once if that happened already).
    /// A connection without a stream (its request head, its TLS handshake
    /// or its config message still to come) waits for this beside its
    /// read, and is then answered as by a relay that is restarting: it
    /// holds no drain.
    pub fn drain_ended(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.drain_event_until(ProcessState::finalizing)
    }

    /// Resolves once the relay stops now
    /// ([`ProcessState::stop_now`](crate::dataplane::process::ProcessState::stop_now),
    /// then `ShardMsg::Drain`; at once if that happened already). A
    /// stream opening upstream (its first connection, a failover's, a
    /// resume's) or waiting for a drain's finalize waits for this beside
    /// it, and then ends through its own end (its usage recorded) rather
    /// than hold the stop. Streams in their pumps need not: the message
    /// stops them through their registry entry.
    pub fn stopping_now(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.drain_event_until(ProcessState::stopping_now)
    }

    /// Waits on `drain_over` until `done` holds of the process (at once
    /// if it does already).
    async fn drain_event_until(&self, done: impl Fn(&ProcessState) -> bool) {
        loop {
            if done(&self.process) {
                return;
            }
            // Listening before the second look: a notification between
            // the two is not lost.
            let listener = self.drain_over.listen();
            if done(&self.process) {
                return;
            }
            listener.await;
        }
    }

    /// This shard's link to the fleet's store, if the relay is in a fleet.
    pub fn fleet_link(&self) -> Option<&crate::dataplane::fleet_link::FleetLink> {
        self.fleet_link
            .get_or_init(|| {
                self.process
                    .fleet
                    .get()
                    .map(|f| crate::dataplane::fleet_link::FleetLink::new(f.clone()))
            })
            .as_deref()
    }

    /// Installs the ring version last published, with its accounts'
    /// metrics, if this shard has not yet. Called on the control message
    /// that says one was, and before every stream's admission and account
    /// choice: a rotation, a disable or a new limit the admin API answered
    /// takes every stream opened after the answer, even one that opens
    /// before the shard reads its message (up to a pass later, 5 ms, more
    /// on a loaded host). One atomic load when nothing changed.
    pub fn catch_up_ring(&self) {
        if let Some((count, (ring, ids))) = self.process.ring_if_newer(self.ring_installed.get()) {
            self.metrics.set_accounts(&ids);
            self.ring.borrow_mut().replace(&ring);
            self.ring_installed.set(count);
        }
    }

    /// A key for the live-stream registry.
    pub fn next_live_id(&self) -> u64 {
        let n = self.next_stream.get();
        self.next_stream.set(n + 1);
        n
    }

    /// The current settings; a stream takes them once, at its start.
    pub fn settings(&self) -> Rc<Settings> {
        self.settings.borrow().clone()
    }

    /// Where the accounts of `pool` connect to.
    pub fn upstream(&self, pool: &str) -> Option<&UpstreamTarget> {
        self.upstreams
            .iter()
            .find_map(|(name, t)| (name == pool).then_some(t))
    }

    /// A new stream id, unique across shards and restarts in practice.
    pub fn new_stream_id(&self) -> String {
        let n = self.next_stream.get();
        self.next_stream.set(n + 1);
        format!("clio-{:08x}-{}-{}", self.process.boot_id, self.index, n)
    }
}

/// A running shard thread.
#[derive(Debug)]
pub struct ShardHandle {
    /// Where the shard listens.
    pub addr: SocketAddr,
    /// Control messages in.
    pub tx: async_channel::Sender<ShardMsg>,
    /// The executor's thread.
    pub join: glommio::ExecutorJoinHandle<()>,
}

/// Starts shard `index` and returns once it listens.
pub fn start(index: usize, setup: ShardSetup) -> std::io::Result<ShardHandle> {
    let (tx, rx) = async_channel::unbounded::<ShardMsg>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
    let placement = match setup.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let waiting = crate::dataplane::uring::Waiting::from_env();
    let mut builder = LocalExecutorBuilder::new(placement);
    builder = builder
        .name(&format!("clio-shard-{index}"))
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH);
    if waiting.wake == crate::dataplane::uring::Wake::Ring {
        // glommio's own loop gets a pass at least this often (see `uring`).
        builder = builder.preempt_timer(crate::dataplane::uring::PASS_INTERVAL);
    }
    let join = builder.spawn(move || async move {
        let plane = match crate::dataplane::uring::Plane::new(waiting) {
            Ok(p) => p,
            Err(e) => {
                let _ = ready_tx.send(Err(crate::dataplane::uring::setup_failed(e)));
                return;
            }
        };
        crate::dataplane::uring::install(plane.clone());
        let plane_stop = Rc::new(Cell::new(false));
        glommio::spawn_local(crate::dataplane::uring::drive(
            plane.clone(),
            plane_stop.clone(),
        ))
        .detach();
        let listener = match crate::dataplane::io::stream_listener(
            setup.listen_fd.as_deref(),
            setup.listen,
            true,
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let upstreams = match setup
            .pools
            .iter()
            .map(|p| {
                UpstreamTarget::new(&p.url, setup.upstream_tls.clone())
                    .map(|t| (p.name.clone(), t))
                    .map_err(|e| format!("pool {}: {e}", p.name))
            })
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(u) => u,
            Err(e) => {
                let _ = ready_tx.send(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    e,
                )));
                return;
            }
        };
        let (ring_installed, (first_ring, ids)) = setup
            .process
            .ring_if_newer(u64::MAX)
            .expect("a count of versions is never u64::MAX");
        let shard = Rc::new(Shard {
            index,
            settings: RefCell::new(Rc::new(Settings {
                limits: setup.limits.clone(),
                failover: setup.failover.clone(),
                tokens: setup.tokens.clone(),
                devices: setup.devices.clone(),
                tls: setup.client_tls.clone(),
                allow: setup.allow.clone(),
                proxy_protocol_from: setup.proxy_protocol_from.clone(),
            })),
            key_in_header: setup.key_in_header,
            connect_timeout: setup.connect_timeout,
            process: setup.process.clone(),
            ring: RefCell::new(KeyRing::new(&first_ring)),
            ring_installed: Cell::new(ring_installed),
            metrics: ShardMetrics::new(index, &ids),
            pool: BufferPool::new(BUFFER_SIZE, 64, POOL_KEEP_BYTES / BUFFER_SIZE),
            masks: RefCell::new(MaskKeys::default()),
            upstreams,
            next_stream: Cell::new(0),
            live: RefCell::new(std::collections::HashMap::new()),
            usage: RefCell::new(Vec::new()),
            unauthenticated: Default::default(),
            file_limit_log: crate::dataplane::accept::Rate::new(
                "relay at its file limit: streams refused with 503",
            ),
            fleet_link: std::cell::OnceCell::new(),
            drain_over: event_listener::Event::new(),
        });
        let _ = ready_tx.send(listener.local_addr());
        let (stop_accepting_tx, stop_accepting_rx) = async_channel::bounded::<()>(1);
        let control = {
            let shard = shard.clone();
            async move {
                while let Ok(msg) = rx.recv().await {
                    match msg {
                        ShardMsg::Snapshot(reply) => {
                            let mut snapshot = shard.metrics.snapshot();
                            snapshot.read_buffers =
                                (shard.pool.in_use() as u64, shard.pool.available() as u64);
                            snapshot.unauthenticated = shard.unauthenticated.open() as u64;
                            let _ = reply.send(snapshot).await;
                        }
                        ShardMsg::Settings(settings) => {
                            *shard.settings.borrow_mut() = Rc::new(settings);
                        }
                        ShardMsg::Ring => shard.catch_up_ring(),
                        ShardMsg::EndStreams { devices, tokens } => {
                            for s in shard.live.borrow().values() {
                                if devices.contains(&s.device) || tokens.contains(&s.token_id) {
                                    s.stop(StopReason::Limit(crate::core::devices::Limit::Revoked));
                                }
                            }
                        }
                        ShardMsg::StopAccepting => {
                            let _ = stop_accepting_tx.try_send(());
                        }
                        ShardMsg::EndKey(fingerprint) => {
                            for s in shard.live.borrow().values() {
                                if *s.key.borrow() == fingerprint {
                                    s.stop(StopReason::KeyRetired);
                                }
                            }
                        }
                        ShardMsg::Drain => {
                            for s in shard.live.borrow().values() {
                                s.stop(StopReason::Drain);
                            }
                            shard.drain_over.notify(usize::MAX);
                        }
                        ShardMsg::TakeUsage(reply) => {
                            let taken = std::mem::take(&mut *shard.usage.borrow_mut());
                            let _ = reply.send(taken).await;
                        }
                        ShardMsg::Ping(reply) => {
                            let _ = reply.send(format!("shard {index}"));
                        }
                        ShardMsg::Stop => break,
                    }
                }
            }
        };
        let accept = async {
            let listener = listener;
            let ring_listener = match crate::dataplane::uring::RingListener::new(
                &plane,
                std::os::fd::AsRawFd::as_raw_fd(&listener),
            ) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(shard = index, error = %e, "listener not registered");
                    return;
                }
            };
            let accept_loop = async {
                let errors = crate::dataplane::accept::AcceptErrors::new("client", false);
                let spare = crate::dataplane::accept::Spare::new(1);
                loop {
                    match ring_listener.accept().await {
                        Ok(socket) => {
                            errors.succeeded();
                            glommio::spawn_local(crate::dataplane::uring::Counted(
                                crate::dataplane::session::serve(shard.clone(), socket),
                            ))
                            .detach();
                        }
                        Err(e) => {
                            crate::dataplane::accept::client_accept_failed(
                                &shard,
                                &ring_listener,
                                &errors,
                                &spare,
                                e,
                            )
                            .await
                        }
                    }
                }
            };
            // The stop first: once the control loop has taken
            // `StopAccepting` (and answered a ping after it), no connection
            // is accepted, so a stop's count of open connections is whole.
            futures_lite::future::or(
                async {
                    let _ = stop_accepting_rx.recv().await;
                },
                accept_loop,
            )
            .await;
            drop(ring_listener);
            drop(listener);
            futures_lite::future::pending::<()>().await;
        };
        future::or(control, accept).await;
        // The last streams' sockets close after their peers, as they would
        // have had the shard gone on (at most `uring::CLOSE_LIMIT`).
        plane.all_closed().await;
        plane_stop.set(true);
    })?;
    let addr = match ready_rx.recv() {
        Ok(answer) => answer?,
        // The executor did not start (its io_uring, most often): the
        // thread's result says why.
        Err(_) => {
            return Err(crate::dataplane::uring::executor_failed(
                "shard",
                join.join(),
            ))
        }
    };
    Ok(ShardHandle { addr, tx, join })
}
