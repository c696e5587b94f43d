//! A fleet of relays sharing one Redis: per-device limits, revocations,
//! account live counts and the account set hold across every node.
//!
//! # How the calls run
//! glommio shards must never block, and the `redis` crate's async client
//! needs tokio. So one dedicated thread per process (`clio-cluster`, see
//! `store.rs`) owns a blocking Redis connection with read and write
//! deadlines of `cluster.timeout`. Shards hand it [`Job`]s through a
//! channel and await the answer on an `async_channel`, so a shard waits
//! like it waits for a socket: other streams run meanwhile. The thread
//! takes every job queued at once and sends them as one pipeline, so under
//! load many stream opens share one round trip.
//!
//! # What a stream open costs
//! One script ([`scripts::OPEN`]) per stream open: revocation, daily audio,
//! the device's live streams and rate, and the account with the most
//! fleet-wide headroom, all checked and counted at once. A stream's end is
//! one `HINCRBY` (fire and forget, pipelined). Nothing is sent per frame;
//! audio for the daily allowance is flushed once a second per device.
//!
//! # A shard's own connection
//! Handing each open to the thread costs two thread wake-ups and a futex
//! per open. So while the store is up, a shard sends its opens on a Redis
//! connection of its own ([`OpenLink`], the data plane's `fleet_link`),
//! pipelined, with the holds given back meanwhile in front of them. The
//! thread still keeps the tally of what this node holds: the link puts
//! every count the store took into the same queue as the releases
//! ([`Fleet::counted`]). Any failure on a link (an error, a deadline
//! missed) is a failure of the store: the thread goes down, waits until
//! every open sent before has passed its deadline, and registers the tally
//! again, so an open whose answer was lost is neither kept nor counted.
//!
//! # When Redis is unreachable
//! Live streams are not touched. New streams follow `on_store_down`:
//! `local` enforces this node's share of each limit (the limit divided by
//! the nodes alive when Redis was last seen), `refuse` answers 503. The
//! thread keeps what this node holds (device and account counts); when
//! Redis answers again it replaces the node's counts with those
//! ([`scripts::REGISTER`]), so nothing is counted twice or left behind.

mod error;
pub mod resp;
pub mod scripts;
mod store;
pub mod usage;

pub use error::ClusterError;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use crate::core::config::{ClusterConfig, DeviceLimits, StoreDown};
use crate::core::devices::{utc_day, DevicePermit, Devices, Limit, Refused};
use crate::core::keyring::{KeyRing, Lease};
use crate::core::token::Claims;
use crate::core::usage::{GroupBy, UsageRecord};

pub use store::{channel, check_node_id, start, Links};

/// A number naming this fleet handle among every relay's: the time in
/// nanoseconds, the process id and a count of the handles made here.
fn instance() -> u64 {
    static MADE: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ (u64::from(std::process::id()) << 24) ^ (MADE.fetch_add(1, Ordering::Relaxed) << 44)
}

/// The host name (the default `cluster.node_id`), or "" when unknown.
/// Asked of the kernel (`uname`), not read from `/proc/sys/kernel/hostname`:
/// the shipped unit's `ProcSubset=pid` leaves only the processes in `/proc`.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

/// Which count a hold is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A device's live streams.
    Device,
    /// An account's live streams.
    Account,
}

impl Kind {
    pub(crate) fn field(self) -> &'static str {
        match self {
            Kind::Device => "dev",
            Kind::Account => "acct",
        }
    }
}

/// Work for the cluster thread.
#[derive(Debug)]
pub enum Job {
    /// A stream open (see [`scripts::OPEN`]).
    Open(OpenJob),
    /// This node's count of `id` changes by `delta`: an open the thread
    /// ran, whose answer no one waited for, is given back. (A stream let
    /// in by local shares is counted through [`Fleet`]'s change queue,
    /// like its release: see `Fleet::took`.)
    Adjust(Kind, String, i32),
    /// Like [`Job::Adjust`], for Redis only: the thread's tally already
    /// has it (holds given back, taken from the queue).
    Sync(Kind, String, i32),
    /// A shard's own connection failed: whether Redis took its last open
    /// is not known, so the thread treats the store as down and registers
    /// what this node holds when it reconnects.
    LinkFailed(String),
    /// Holds were given back (streams ended), or counts taken by this
    /// node's shares, into [`Fleet`]'s change queue, which was empty: send
    /// them within [`RELEASE_DELAY`], or with the next stream open if that
    /// comes first.
    Released,
    /// Revoke (or, with `lift`, un-revoke) a device or token id fleet-wide.
    Revoke {
        /// Device id.
        device: Option<String>,
        /// Token id.
        token: Option<String>,
        /// Also end the live streams on every node.
        end_live: bool,
        /// Lift the revocation instead.
        lift: bool,
        /// Ok, or why Redis did not take it.
        reply: async_channel::Sender<Result<(), ClusterError>>,
    },
    /// Store the sealed account set and tell every node, if the store's
    /// set is still the version `base` it was changed from; with no set,
    /// only compare the versions (see [`AccountsAnswer`]).
    Accounts {
        /// The sealed set, or none to compare only.
        sealed: Option<Vec<u8>>,
        /// The version of the fleet's set the change was made to.
        base: i64,
        /// What the store made of it, or why it did not answer.
        reply: async_channel::Sender<Result<AccountsAnswer, ClusterError>>,
    },
    /// Usage of streams that ended on this node, for the fleet's totals
    /// (added to Redis at the next flush, at most once a second).
    Usage(Vec<UsageRecord>),
    /// Add the usage waiting now, then answer (before a fleet query).
    UsageFlush(async_channel::Sender<Result<(), ClusterError>>),
    /// After the store lost its data: this node's usage from its ledger,
    /// every day Redis keeps, taken after every [`Job::Usage`] before it.
    /// It replaces this node's counters in Redis (see
    /// [`usage::restore_days`]).
    UsageRestore(usage::Pending),
    /// Once after this process's start, when no other process of this
    /// node holds a lease: this node's usage from its ledger, the
    /// last [`usage::MERGE_DAYS`] days, taken after every [`Job::Usage`]
    /// before it. Each of this node's counters in Redis is raised to it
    /// where it holds less (see [`scripts::USAGE_MAX`]).
    UsageMerge(usage::Pending),
    /// Leave the fleet (this node's counts and lease are deleted) and end
    /// the thread.
    Stop,
    /// The store answered an open "settling" (see [`OpenAnswer::Settling`]):
    /// this node takes its shares too, though it saw no loss itself.
    Settling,
}

/// What a stream open asks the store (see [`scripts::OPEN`]).
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// Device id ("" to reserve an account only).
    pub device: String,
    /// Token id.
    pub token: String,
    /// Concurrent streams, streams per minute, audio ms per day (0 = none).
    pub limits: [u64; 3],
    /// The UTC day.
    pub day: u64,
    /// Account ids and their limits, in the ring's order.
    pub candidates: Vec<(String, u32)>,
}

impl OpenRequest {
    /// The arguments of [`scripts::OPEN`] for `node`, into `out`.
    pub fn args(&self, node: &str, ttl_ms: u64, out: &mut impl scripts::Args) {
        out.push(node);
        out.push(&self.device);
        out.push(&self.token);
        for l in self.limits {
            out.push(l);
        }
        out.push(self.day);
        out.push(ttl_ms);
        for (id, max) in &self.candidates {
            out.push(id.as_str());
            out.push(*max);
        }
    }
}

/// A stream open for the cluster thread.
#[derive(Debug)]
pub struct OpenJob {
    /// What is asked.
    pub req: OpenRequest,
    /// After this the job is answered [`OpenAnswer::Down`] without a call.
    pub deadline: Instant,
    /// Where the answer goes (through the asking shard's doorbell).
    pub reply: crate::core::doorbell::Sender<OpenAnswer>,
}

/// The counts a stream open took fleet-wide, given back when dropped.
#[derive(Debug, Default)]
pub struct Taken {
    /// The device's.
    pub device: Option<FleetHold>,
    /// The chosen account's.
    pub account: Option<FleetHold>,
}

/// A shard's own way to the store for stream opens (the data plane's
/// `fleet_link`): answers like the cluster thread, without waking it.
pub trait OpenLink {
    /// Sends `req`, and waits for the answer and the counts taken; gives
    /// `req` back when the link cannot take it now (not connected yet), for
    /// the cluster thread.
    #[allow(clippy::type_complexity)]
    fn open(
        &self,
        req: OpenRequest,
    ) -> Result<
        std::pin::Pin<Box<dyn std::future::Future<Output = (OpenAnswer, Taken)> + '_>>,
        OpenRequest,
    >;
}

/// Where a shard's own connection goes: Redis's addresses as the cluster
/// thread last resolved them, and how to log in.
#[derive(Debug, Clone)]
pub struct LinkTarget {
    /// Redis's addresses, in the resolver's order: the link connects to
    /// the first that answers (`core::dial`), as the
    /// thread's own connection does.
    pub addrs: Vec<std::net::SocketAddr>,
    /// `AUTH` user name, if any.
    pub username: Option<String>,
    /// `AUTH` password, if any.
    pub password: Option<crate::core::secret::Secret>,
    /// `SELECT` database.
    pub db: i64,
}

/// The cluster thread's answer to a stream open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenAnswer {
    /// Counted fleet-wide; the index of the chosen candidate, if any, and
    /// the device's audio today fleet-wide as Redis had it (ms; 0 when no
    /// daily allowance was asked about).
    Ok(Option<usize>, u64),
    /// A device limit or a revocation refused it.
    Refused(Limit),
    /// No candidate account has room fleet-wide.
    NoAccount,
    /// Redis did not answer in time: follow `on_store_down`.
    Down,
    /// The store is settling after a loss (every node registering its
    /// counts again): decide as when it is down.
    Settling,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Redis calls (pipelines) that succeeded.
    pub calls_ok: AtomicU64,
    /// Redis calls that failed or timed out.
    pub calls_failed: AtomicU64,
    /// Stream opens decided by Redis.
    pub opens_shared: AtomicU64,
    /// Stream opens decided by local shares (Redis unreachable).
    pub opens_local: AtomicU64,
    /// Stream opens refused because Redis was unreachable (`refuse`).
    pub opens_refused_down: AtomicU64,
    /// Times this node re-registered its counts.
    pub registrations: AtomicU64,
    /// Sum and count of stream-open round trips, in microseconds.
    pub open_us_sum: AtomicU64,
    /// Count for `open_us_sum`.
    pub open_us_count: AtomicU64,
    /// Stream opens sent on a shard's own connection.
    pub opens_link: AtomicU64,
    /// Stream opens sent through the cluster thread.
    pub opens_thread: AtomicU64,
}

/// A process's handle on the fleet (shared by every shard and the admin
/// thread).
#[derive(Debug)]
pub struct Fleet {
    tx: mpsc::Sender<Job>,
    /// This node's id.
    pub node_id: String,
    /// This process's name in the fleet's counts and leases:
    /// `<node_id>/<instance>`, unique to the process, so two running
    /// relays given one `node_id` never write each other's counts, and a
    /// node restarted after a crash does not take its dead self's.
    pub member: String,
    /// Another running relay uses this `node_id` (seen at a heartbeat).
    pub id_conflict: AtomicBool,
    /// Redis may evict keys when full (a `maxmemory` with a policy other
    /// than `noeviction`), as read at the last connect or heartbeat.
    pub may_evict: AtomicBool,
    /// This node's clock minus Redis's, in ms, at the last heartbeat.
    pub clock_offset_ms: std::sync::atomic::AtomicI64,
    /// What new streams do while Redis is unreachable.
    pub on_store_down: StoreDown,
    /// Lease lifetime.
    pub lease_ttl: Duration,
    timeout: Duration,
    up: AtomicBool,
    nodes: AtomicU32,
    /// Counters for `/metrics`.
    pub stats: FleetStats,
    /// For usage queries, which read on connections of their own.
    usage_via: std::sync::OnceLock<Arc<store::UsageVia>>,
    /// Count changes the thread has not taken yet: holds given back and
    /// counts taken by this node's shares (not yet sent to Redis, unless a
    /// shard's link took them), and counts a link's opens took (in Redis
    /// already). A change does not wake the cluster thread (see
    /// [`Job::Released`]).
    changes: std::sync::Mutex<Vec<Change>>,
    /// Where shards' own connections go; `None` while the store is down or
    /// when it is reached over TLS or a Unix socket (the thread only).
    link: std::sync::Mutex<Option<LinkTarget>>,
    /// The store lost this node's usage counters (it lost its data or
    /// went back to an older copy): the admin thread gives them back
    /// from the ledger ([`Fleet::usage_lost`]).
    usage_lost: AtomicBool,
    /// This process's ledger merge ([`Fleet::merge_usage`]) is due: set
    /// once by the cluster thread, when no other process of this node
    /// holds a lease; taken by the admin thread, which hands the merge.
    usage_merge: AtomicBool,
}

/// A count change waiting in [`Fleet`]'s queue.
#[derive(Debug)]
struct Change {
    kind: Kind,
    id: String,
    delta: i32,
    /// Redis has it already: only the thread's tally is behind.
    in_store: bool,
}

/// A stream's count on a device or account fleet-wide; given back when
/// dropped.
#[derive(Debug)]
pub struct FleetHold {
    fleet: Arc<Fleet>,
    kind: Kind,
    id: String,
}

impl Drop for FleetHold {
    fn drop(&mut self) {
        self.fleet.release(self.kind, std::mem::take(&mut self.id));
    }
}

/// How far a node's clock may be from Redis's before it says so (a
/// heartbeat's round trip is not counted as offset, so a slow one only
/// makes the offset read smaller, by up to that round trip).
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(2);

/// The longest a given-back hold waits to be sent to Redis. Until then the
/// fleet counts the ended stream as live (never one too few); a stream
/// open on this node sends the waiting ones first.
pub const RELEASE_DELAY: Duration = Duration::from_millis(10);

/// Why the fleet refused a stream open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetRefusal {
    /// A device limit or revocation.
    Device(Refused),
    /// No account has room.
    NoAccount,
    /// Redis is unreachable and `on_store_down = "refuse"`.
    StoreDown,
}

impl Fleet {
    /// A handle whose jobs go to `tx`.
    pub fn new(cfg: &ClusterConfig, tx: mpsc::Sender<Job>) -> Arc<Fleet> {
        Arc::new(Fleet {
            tx,
            node_id: cfg.node_id.clone(),
            member: format!("{}/{:012x}", cfg.node_id, instance() & 0xffff_ffff_ffff),
            id_conflict: AtomicBool::new(false),
            may_evict: AtomicBool::new(false),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            on_store_down: cfg.on_store_down,
            lease_ttl: cfg.lease_ttl,
            timeout: cfg.timeout,
            up: AtomicBool::new(false),
            nodes: AtomicU32::new(1),
            stats: FleetStats::default(),
            usage_via: std::sync::OnceLock::new(),
            changes: std::sync::Mutex::new(Vec::new()),
            link: std::sync::Mutex::new(None),
            usage_lost: AtomicBool::new(false),
            usage_merge: AtomicBool::new(false),
        })
    }

    /// Queues a count change; only the first into an empty queue tells the
    /// cluster thread.
    fn change(&self, c: Change) {
        let first = {
            let mut q = self.changes.lock().unwrap_or_else(|e| e.into_inner());
            q.push(c);
            q.len() == 1
        };
        if first {
            self.send(Job::Released);
        }
    }

    /// Queues a given-back hold.
    fn release(&self, kind: Kind, id: String) {
        self.change(Change {
            kind,
            id,
            delta: -1,
            in_store: false,
        });
    }

    /// A count this node takes by its own shares (Redis unreachable, or
    /// settling), for its tally and Redis: queued like the release its
    /// hold gives back when dropped, so the thread always takes the two
    /// in order. (Sent to the thread on its own, the count could reach the
    /// tally after its release, when the thread took the queue first; a
    /// release of a count the tally did not have yet was lost, and the
    /// count stayed in the tally, and in Redis at each registration, for
    /// as long as the node ran.)
    fn took(self: &Arc<Self>, kind: Kind, id: &str) -> FleetHold {
        self.change(Change {
            kind,
            id: id.to_string(),
            delta: 1,
            in_store: false,
        });
        self.hold(kind, id)
    }

    /// A count a shard's link saw Redis take: the thread's tally learns it
    /// through the queue, and the hold gives it back when dropped.
    pub fn counted(self: &Arc<Self>, kind: Kind, id: &str) -> FleetHold {
        self.change(Change {
            kind,
            id: id.to_string(),
            delta: 1,
            in_store: true,
        });
        self.hold(kind, id)
    }

    /// For a shard's link: the holds given back and not yet sent, summed by
    /// id, marked as sent (the link sends them before its next open, so a
    /// device reopening at its limit finds its place free).
    pub fn take_unsent(&self) -> Vec<(Kind, String, i32)> {
        let mut q = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(Kind, String, i32)> = Vec::new();
        for c in q.iter_mut().filter(|c| !c.in_store) {
            c.in_store = true;
            match out
                .iter_mut()
                .find(|(k, id, _)| *k == c.kind && *id == c.id)
            {
                Some(o) => o.2 += c.delta,
                None => out.push((c.kind, c.id.clone(), c.delta)),
            }
        }
        out
    }

    /// Takes every change waiting (for the cluster thread): the net change
    /// of each id for its tally, and the changes Redis does not have yet,
    /// summed by id, as [`Job::Sync`]s to send.
    pub(crate) fn take_changes(&self) -> (HashMap<(Kind, String), i64>, Vec<Job>) {
        let q = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()));
        let mut net: HashMap<(Kind, String), i64> = HashMap::with_capacity(q.len());
        let mut unsent: HashMap<(Kind, String), i32> = HashMap::new();
        for c in q {
            if !c.in_store {
                *unsent.entry((c.kind, c.id.clone())).or_insert(0) += c.delta;
            }
            *net.entry((c.kind, c.id)).or_insert(0) += i64::from(c.delta);
        }
        let jobs = unsent
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .map(|((k, id), d)| Job::Sync(k, id, d))
            .collect();
        (net, jobs)
    }

    /// Where shards' own connections go now (`None`: use the thread).
    pub fn link_target(&self) -> Option<LinkTarget> {
        if !self.store_up() {
            return None;
        }
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A shard's link failed, for the reason `why` (see [`Job::LinkFailed`]).
    pub fn link_failed(&self, why: String) {
        self.send(Job::LinkFailed(why));
    }

    /// How long a shard waits for Redis's answer to a stream open.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether Redis answered the last call.
    pub fn store_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Nodes alive when Redis was last seen (at least 1).
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    fn send(&self, job: Job) {
        let _ = self.tx.send(job);
    }

    /// The store is settling: the cluster thread divides the limits.
    fn settling(&self) {
        self.send(Job::Settling);
    }

    fn hold(self: &Arc<Self>, kind: Kind, id: &str) -> FleetHold {
        FleetHold {
            fleet: self.clone(),
            kind,
            id: id.to_string(),
        }
    }

    /// Opens a stream in the store: on the shard's own `link` when it can
    /// take it, else through the cluster thread; waits without blocking
    /// the shard. The counts taken come with an `Ok`.
    async fn ask_open(
        self: &Arc<Self>,
        device: (&str, &str),
        limits: Option<&DeviceLimits>,
        candidates: Vec<(String, u32)>,
        link: Option<&dyn OpenLink>,
        day: u64,
    ) -> (OpenAnswer, Taken) {
        let lim = limits.map_or([0; 3], |l| {
            [
                u64::from(l.max_concurrent_streams),
                u64::from(l.streams_per_minute),
                l.audio_seconds_per_day.saturating_mul(1000),
            ]
        });
        let mut req = OpenRequest {
            device: device.0.to_string(),
            token: device.1.to_string(),
            limits: lim,
            day,
            candidates,
        };
        if let Some(link) = link.filter(|_| self.store_up()) {
            match link.open(req) {
                Ok(answer) => {
                    self.stats.opens_link.fetch_add(1, Ordering::Relaxed);
                    return answer.await;
                }
                Err(back) => req = back,
            }
        }
        self.stats.opens_thread.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = crate::core::doorbell::oneshot();
        let account_ids: Vec<String> = req.candidates.iter().map(|c| c.0.clone()).collect();
        let dev = req.device.clone();
        self.send(Job::Open(OpenJob {
            req,
            deadline: Instant::now() + self.timeout,
            reply,
        }));
        // The thread answers every job within its deadlines; this bound
        // only guards against a thread that is gone or stuck.
        let bound = self.timeout * 4 + Duration::from_secs(1);
        let answer = crate::core::deadline::timeout(bound, rx)
            .await
            .flatten()
            .unwrap_or(OpenAnswer::Down);
        let mut taken = Taken::default();
        if let OpenAnswer::Ok(pick, _) = answer {
            // The thread's tally has these already.
            if !dev.is_empty() {
                taken.device = Some(self.hold(Kind::Device, &dev));
            }
            taken.account = pick.map(|i| self.hold(Kind::Account, &account_ids[i]));
        }
        (answer, taken)
    }

    /// Admits a new stream of `claims`: device limits and revocations
    /// fleet-wide, and an account of `pools` (the token's, less those at
    /// their `max_streams` here) from `ring` (skipping `tried`) with room
    /// fleet-wide. One Redis round trip, on the shard's `link` when it has
    /// one. While Redis is unreachable, follows `on_store_down`.
    #[allow(clippy::too_many_arguments)]
    pub async fn admit(
        self: &Arc<Self>,
        devices: &Devices,
        ring: &std::cell::RefCell<KeyRing>,
        claims: &Claims,
        pools: &[String],
        limits: &DeviceLimits,
        tried: u64,
        link: Option<&dyn OpenLink>,
    ) -> Result<(DevicePermit, Option<Lease>), FleetRefusal> {
        let candidates = ring.borrow().candidates(Instant::now(), tried, pools);
        let t0 = Instant::now();
        // The day the open asks about, and the one its audio total is of
        // (an answer that comes after midnight is still of this day).
        let day = utc_day(SystemTime::now());
        let (answer, taken) = self
            .ask_open(
                (&claims.device_id, &claims.token_id),
                Some(limits),
                candidates.clone(),
                link,
                day,
            )
            .await;
        match answer {
            // This node's lists too: a store that just lost its data has
            // no revocations until a node gives them back (the holds
            // taken are given back as `taken` drops).
            OpenAnswer::Ok(..) if devices.is_revoked(claims) => {
                self.note_open(t0);
                Err(FleetRefusal::Device(Devices::revoked_refusal()))
            }
            OpenAnswer::Ok(pick, audio_ms) => {
                self.note_open(t0);
                let mut permit = devices.hold(claims, limits);
                // What the other nodes streamed today counts from this
                // stream's first second on, not from this node's next
                // audio flush (up to a second later, when a client sending
                // faster than real time has streamed far more).
                permit.learn_fleet_audio(day, audio_ms);
                permit.fleet = taken.device;
                let lease = match pick {
                    None => None,
                    Some(i) => {
                        let id = &candidates[i].0;
                        match ring.borrow_mut().reserve(id, pools) {
                            Some(mut l) => {
                                l.fleet = taken.account;
                                Some(l)
                            }
                            // Gone from this shard's ring meanwhile.
                            None => return Err(FleetRefusal::NoAccount),
                        }
                    }
                };
                Ok((permit, lease))
            }
            OpenAnswer::Refused(limit) => {
                self.note_open(t0);
                Err(FleetRefusal::Device(refusal(limit, limits)))
            }
            OpenAnswer::NoAccount => {
                self.note_open(t0);
                Err(FleetRefusal::NoAccount)
            }
            OpenAnswer::Down => self.admit_local(devices, claims, limits, (ring, tried, pools)),
            OpenAnswer::Settling => {
                self.settling();
                self.admit_local(devices, claims, limits, (ring, tried, pools))
            }
        }
    }

    fn note_open(&self, t0: Instant) {
        self.stats.opens_shared.fetch_add(1, Ordering::Relaxed);
        self.stats
            .open_us_sum
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.open_us_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Redis is unreachable: refuse, or admit under this node's share of
    /// the device's limits, and pick the account from `ring` by this
    /// node's share too ([`Fleet::pick_local`]), here: asked of the
    /// cluster thread instead, it would wait out another `timeout` when
    /// Redis stalls and the thread has not seen it yet. With no account
    /// to pick, the caller's own pick says why.
    fn admit_local(
        self: &Arc<Self>,
        devices: &Devices,
        claims: &Claims,
        limits: &DeviceLimits,
        (ring, tried, pools): (&std::cell::RefCell<KeyRing>, u64, &[String]),
    ) -> Result<(DevicePermit, Option<Lease>), FleetRefusal> {
        if self.on_store_down == StoreDown::Refuse {
            self.stats
                .opens_refused_down
                .fetch_add(1, Ordering::Relaxed);
            return Err(FleetRefusal::StoreDown);
        }
        self.stats.opens_local.fetch_add(1, Ordering::Relaxed);
        let share = share_of(limits, self.nodes());
        let mut permit = devices
            .admit(claims, &share, SystemTime::now())
            .map_err(FleetRefusal::Device)?;
        permit.fleet = Some(self.took(Kind::Device, &claims.device_id));
        Ok((permit, self.pick_local(ring, tried, pools)))
    }

    /// Reserves an account of `pools` fleet-wide for a stream moving off a
    /// refused one (the device is already counted).
    pub async fn pick(
        self: &Arc<Self>,
        ring: &std::cell::RefCell<KeyRing>,
        tried: u64,
        pools: &[String],
        link: Option<&dyn OpenLink>,
    ) -> Option<Lease> {
        let candidates = ring.borrow().candidates(Instant::now(), tried, pools);
        if candidates.is_empty() {
            return None;
        }
        match self
            .ask_open(
                ("", ""),
                None,
                candidates.clone(),
                link,
                utc_day(SystemTime::now()),
            )
            .await
        {
            (OpenAnswer::Ok(Some(i), _), taken) => {
                let id = &candidates[i].0;
                let mut l = ring.borrow_mut().reserve(id, pools)?;
                l.fleet = taken.account;
                Some(l)
            }
            (OpenAnswer::Down, _) => self.pick_local(ring, tried, pools),
            (OpenAnswer::Settling, _) => {
                self.settling();
                self.pick_local(ring, tried, pools)
            }
            _ => None,
        }
    }

    /// An account by this node's share (Redis unreachable), counted for
    /// re-registration.
    pub fn pick_local(
        self: &Arc<Self>,
        ring: &std::cell::RefCell<KeyRing>,
        tried: u64,
        pools: &[String],
    ) -> Option<Lease> {
        if self.on_store_down == StoreDown::Refuse {
            return None;
        }
        let mut l = ring.borrow_mut().pick(Instant::now(), tried, pools)?;
        l.fleet = Some(self.took(Kind::Account, &l.account.id));
        Some(l)
    }

    /// This node's clock minus Redis's, in seconds, when that is more than
    /// [`CLOCK_TOLERANCE`] either way (at the last heartbeat).
    pub fn clock_off(&self) -> Option<f64> {
        let ms = self.clock_offset_ms.load(Ordering::Relaxed);
        (ms.unsigned_abs() > CLOCK_TOLERANCE.as_millis() as u64).then_some(ms as f64 / 1000.0)
    }

    /// The fleet's lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::core::metrics::text::{family, Kind};
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "clio_relay_cluster_store_up",
            Kind::Gauge,
            "Whether the fleet's shared store (Redis) answered the last call.",
        )
        .sample(&[], u8::from(self.store_up()));
        family(
            out,
            "clio_relay_cluster_node_id_conflict",
            Kind::Gauge,
            "1 while another running relay uses this node's cluster.node_id (seen in the last lease_ttl).",
        )
        .sample(&[], u8::from(self.id_conflict.load(Ordering::Relaxed)));
        family(
            out,
            "clio_relay_cluster_store_may_evict",
            Kind::Gauge,
            "1 when Redis has a maxmemory and a maxmemory-policy other than noeviction (read at connect and at each heartbeat): it may drop the fleet's counts unseen.",
        )
        .sample(&[], u8::from(self.may_evict.load(Ordering::Relaxed)));
        family(
            out,
            "clio_relay_cluster_clock_offset_seconds",
            Kind::Gauge,
            "This node's clock minus Redis's, at the last heartbeat, less what its round trip can explain: token times and usage days go by this node's clock.",
        )
        .sample(
            &[],
            self.clock_offset_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        family(
            out,
            "clio_relay_cluster_nodes",
            Kind::Gauge,
            "Nodes with a current lease, when the store was last seen.",
        )
        .sample(&[], self.nodes());
        family(
            out,
            "clio_relay_cluster_calls_total",
            Kind::Counter,
            "Calls (pipelines) to the shared store, by result.",
        )
        .sample(&[("result", "ok")], get(&s.calls_ok))
        .sample(&[("result", "failed")], get(&s.calls_failed));
        family(
            out,
            "clio_relay_cluster_stream_opens_total",
            Kind::Counter,
            "Stream opens by who decided: the shared store, this node's shares (store down), or refused (store down).",
        )
        .sample(&[("decided_by", "store")], get(&s.opens_shared))
        .sample(&[("decided_by", "local")], get(&s.opens_local))
        .sample(&[("decided_by", "refused")], get(&s.opens_refused_down));
        family(
            out,
            "clio_relay_cluster_open_calls_total",
            Kind::Counter,
            "Stream opens sent to the shared store, by the way they went: a shard's own connection, or the cluster thread.",
        )
        .sample(&[("via", "shard")], get(&s.opens_link))
        .sample(&[("via", "thread")], get(&s.opens_thread));
        family(
            out,
            "clio_relay_cluster_registrations_total",
            Kind::Counter,
            "Times this node wrote what it holds to the store (start, and after the store came back).",
        )
        .sample(&[], get(&s.registrations));
        family(
            out,
            "clio_relay_cluster_open_seconds",
            Kind::Summary,
            "Time a stream open waited for the store.",
        )
        .sample_named("_sum", &[], get(&s.open_us_sum) as f64 / 1e6)
        .sample_named("_count", &[], get(&s.open_us_count));
    }

    /// Hands the usage of ended streams to the cluster thread for the
    /// fleet's totals (no Redis call now).
    pub fn add_usage(&self, records: Vec<UsageRecord>) {
        if !records.is_empty() {
            self.send(Job::Usage(records));
        }
    }

    /// Whether the store lost this node's usage counters since the last
    /// call: if so, the caller gives them back with
    /// [`Fleet::restore_usage`].
    pub fn usage_lost(&self) -> bool {
        self.usage_lost.swap(false, Ordering::AcqRel)
    }

    /// Said by the cluster thread when the store lost its data.
    pub(crate) fn lost_usage(&self) {
        self.usage_lost.store(true, Ordering::Release);
    }

    /// Whether this process's merge of its ledger into the fleet's usage
    /// is due (once, after its start, when no other process of this node
    /// holds a lease): if so, the caller does it with
    /// [`Fleet::merge_usage`].
    pub fn usage_merge_due(&self) -> bool {
        self.usage_merge.swap(false, Ordering::AcqRel)
    }

    /// Said by the cluster thread when the merge is due.
    pub(crate) fn merge_due(&self) {
        self.usage_merge.store(true, Ordering::Release);
    }

    /// Raises this node's usage counters in Redis to `ledger`'s where they
    /// are lower: its ledger's totals over the last [`usage::MERGE_DAYS`]
    /// days, taken after every record handed by [`Fleet::add_usage`]
    /// before this call. What a previous process of this node metered and
    /// never added to Redis (it died, or stopped, while Redis did not
    /// answer) reaches the fleet's totals this way.
    pub fn merge_usage(&self, ledger: usage::Pending) {
        self.send(Job::UsageMerge(ledger));
    }

    /// Replaces this node's usage counters in Redis with `ledger`: its
    /// ledger's totals over [`usage::restore_days`], taken after every
    /// record handed by [`Fleet::add_usage`] before this call.
    pub fn restore_usage(&self, ledger: usage::Pending) {
        self.send(Job::UsageRestore(ledger));
    }

    /// The fleet's usage over the days `from..=to`, by node: this node's
    /// usage so far is added first, then every node's is read from Redis
    /// (on glommio's blocking pool, with a connection of its own, whose
    /// connect, the lookup of Redis's name included, takes at most
    /// `cluster.timeout`, as the cluster thread's: `store::UsageVia`). An
    /// error when Redis is unreachable.
    pub async fn usage(
        &self,
        from: u64,
        to: u64,
        group: GroupBy,
    ) -> Result<usage::ByNode, ClusterError> {
        let (reply, rx) = async_channel::bounded(1);
        self.send(Job::UsageFlush(reply));
        let bound = self.timeout * (usage::FLUSH_CHUNKS as u32 + 2) + Duration::from_secs(1);
        crate::core::deadline::timeout(bound, rx.recv())
            .await
            .and_then(Result::ok)
            .unwrap_or_else(|| Err(ClusterError::ThreadSilent))?;
        let via = self
            .usage_via
            .get()
            .cloned()
            .ok_or(ClusterError::NotConfigured)?;
        let timeout = self.timeout;
        let today = utc_day(SystemTime::now());
        glommio::executor()
            .spawn_blocking(move || via.query(timeout, from, to, today, group))
            .await
    }

    /// Ends the cluster thread after the jobs queued before this.
    pub fn stop(&self) {
        self.send(Job::Stop);
    }

    /// Revokes (or lifts) fleet-wide each of `ids` (a device id, a token
    /// id, or both); every node refuses or ends within a poll interval.
    /// Every job is sent before any answer is awaited, so the cluster
    /// thread sends them in pipelines (up to `store::BATCH` a round trip).
    /// The first error, if any.
    pub async fn revoke(
        &self,
        ids: Vec<(Option<String>, Option<String>)>,
        end_live: bool,
        lift: bool,
    ) -> Result<(), ClusterError> {
        let mut answers = Vec::with_capacity(ids.len());
        for (device, token) in ids {
            let (reply, rx) = async_channel::bounded(1);
            self.send(Job::Revoke {
                device,
                token,
                end_live,
                lift,
                reply,
            });
            answers.push(rx);
        }
        let mut first = Ok(());
        for rx in answers {
            let answer = rx
                .recv()
                .await
                .unwrap_or_else(|_| Err(ClusterError::ThreadGone));
            if first.is_ok() {
                first = answer;
            }
        }
        first
    }

    /// Stores the sealed account set for every node, if no node stored
    /// one since version `base` (the one this node's set was changed
    /// from); with no set, only says whether one did. Two changes made
    /// on two nodes within a poll so never store one over the other.
    pub async fn publish_accounts(
        &self,
        sealed: Option<Vec<u8>>,
        base: i64,
    ) -> Result<AccountsAnswer, ClusterError> {
        let (reply, rx) = async_channel::bounded(1);
        self.send(Job::Accounts {
            sealed,
            base,
            reply,
        });
        rx.recv()
            .await
            .unwrap_or_else(|_| Err(ClusterError::ThreadGone))
    }
}

/// What the store made of an account set sent with the version it was
/// changed from ([`Fleet::publish_accounts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountsAnswer {
    /// The store's version is the one given: the set sent, if any, is
    /// stored, and this is its version now.
    Current(i64),
    /// Another node stored a set since the version given: the store's
    /// version and its sealed set (none when it holds none), which apply
    /// on this node first. A set sent was not stored.
    Moved(i64, Option<Vec<u8>>),
}

/// This node's share of `limits` among `nodes` (Redis unreachable): each
/// count limit divided by the node count, at least 1. The daily audio
/// allowance is not divided: each device's fleet total was last known from
/// Redis and is counted on from there.
pub fn share_of(limits: &DeviceLimits, nodes: u32) -> DeviceLimits {
    let div = |v: u32| if v == 0 { 0 } else { (v / nodes.max(1)).max(1) };
    DeviceLimits {
        max_concurrent_streams: div(limits.max_concurrent_streams),
        streams_per_minute: div(limits.streams_per_minute),
        ..limits.clone()
    }
}

/// The refusal message for `limit` (the same words a single relay uses).
fn refusal(limit: Limit, limits: &DeviceLimits) -> Refused {
    let message = match limit {
        Limit::Revoked => "This device or session token has been revoked.".to_string(),
        Limit::Concurrent => format!(
            "Device limit reached: {} concurrent streams.",
            limits.max_concurrent_streams
        ),
        Limit::Rate => format!(
            "Device limit reached: {} new streams per minute.",
            limits.streams_per_minute
        ),
        Limit::DailyAudio | Limit::MaxLength => format!(
            "Device limit reached: {} audio seconds per day.",
            limits.audio_seconds_per_day
        ),
    };
    Refused { limit, message }
}

/// What this node holds, as the cluster thread keeps it.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) counts: HashMap<(Kind, String), i64>,
}

impl Held {
    pub(crate) fn adjust(&mut self, kind: Kind, id: &str, delta: i64) {
        let key = (kind, id.to_string());
        let n = self.counts.entry(key.clone()).or_insert(0);
        *n += delta;
        if *n <= 0 {
            self.counts.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests;
