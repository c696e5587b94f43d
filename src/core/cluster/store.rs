//! The cluster thread: one blocking Redis connection with deadlines, the
//! jobs of every shard batched into pipelines, and the periodic duties
//! (heartbeat, polling for revocations, account changes and "end" requests,
//! the daily-audio flush, reconnecting).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use redis::{IntoConnectionInfo, Value};

use super::scripts::{int, items, text};
use super::{
    scripts, usage, ClusterError, Fleet, Held, Job, Kind, LinkTarget, OpenAnswer, CLOCK_TOLERANCE,
};
use crate::core::config::ClusterConfig;
use crate::core::devices::utc_day;
use crate::dataplane::shard::{ProcessState, ShardMsg};

mod node_id;
mod recovery;
mod timed;

pub use node_id::check_node_id;
use recovery::Revocation;
use timed::Timed;

/// How often the thread looks for revocations, account changes and "end"
/// requests other nodes made (well under the one-second promise).
pub const POLL: Duration = Duration::from_millis(200);
/// How often device audio is added to the fleet's daily totals, and
/// usage to the fleet's usage.
const AUDIO_FLUSH: Duration = Duration::from_secs(1);
/// How often an unreachable Redis is tried again.
const RECONNECT: Duration = Duration::from_secs(1);
/// Most jobs sent in one pipeline.
const BATCH: usize = 256;
/// The least time the read of the fleet's revocation lists has (see
/// `Worker::lists_timeout`).
const LISTS_TIMEOUT: Duration = Duration::from_secs(2);

/// `t` in ms since the Unix epoch (negative before it).
fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// `s` seconds in ms, at most what Redis takes as an integer.
fn ms(s: u64) -> u64 {
    s.saturating_mul(1000).min(i64::MAX as u64)
}

/// This node's clock minus Redis's, from a call sent at `sent` and
/// answered at `got` (this node's clock, ms) in which Redis read its clock
/// as `redis_now`: the part of the difference the round trip cannot
/// explain (0 when `redis_now` falls within it), so a slow call never
/// reads as a clock off Redis's.
fn clock_offset_ms(sent: i64, got: i64, redis_now: i64) -> i64 {
    if redis_now < sent {
        sent - redis_now
    } else if redis_now > got {
        got - redis_now
    } else {
        0
    }
}

/// Where the thread's findings go.
#[derive(Debug)]
pub struct Links {
    /// Process-wide state: devices (revocations, audio) and accounts.
    pub process: Arc<ProcessState>,
    /// Every shard, for "end the live streams of …".
    pub shards: Vec<async_channel::Sender<ShardMsg>>,
    /// The admin thread, for account-set changes (the sealed document,
    /// with its version).
    pub accounts: Option<async_channel::Sender<(i64, Vec<u8>)>>,
}

/// A fleet handle and the receiving end of its jobs.
pub fn channel(cfg: &ClusterConfig) -> (Arc<Fleet>, mpsc::Receiver<Job>) {
    let (tx, rx) = mpsc::channel();
    (Fleet::new(cfg, tx), rx)
}

/// The Redis client `cfg` names (its password and CA too).
fn client(cfg: &ClusterConfig) -> std::io::Result<redis::Client> {
    let info = cfg
        .redis_url
        .as_str()
        .into_connection_info()
        .map_err(|e| std::io::Error::other(format!("cluster.redis_url: {}", e)))?;
    let info = match &cfg.password {
        Some(p) => {
            let mut settings = info.redis_settings().clone().set_password(p.expose());
            if let Some(u) = &cfg.username {
                settings = settings.set_username(u);
            }
            info.set_redis_settings(settings)
        }
        None => info,
    };
    match &cfg.ca {
        // A private CA: trusted instead of the built-in public roots.
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        None => redis::Client::open(info),
    }
    .map_err(|e| std::io::Error::other(format!("cluster.redis_url: {}", e)))
}

/// How a node reads the fleet's usage (`Fleet::usage`): on a connection
/// of its own, made as the cluster thread makes its own ([`Timed`]), so
/// that the lookup of Redis's name counts in the connect's
/// `cluster.timeout` and the addresses it gave last serve while the
/// resolver fails or hangs. The `redis` crate's connect asked the
/// resolver with no deadline, on the admin thread's blocking pool (one
/// thread): a DNS server that never answers held it, and every query
/// after, for minutes.
pub(super) struct UsageVia {
    client: redis::Client,
    ca: Option<Vec<u8>>,
    /// Redis's addresses as the last query found them, and the lookup
    /// still running, if one is (queries run one at a time, on the
    /// blocking pool).
    known: std::sync::Mutex<timed::KnownAddrs>,
}

impl std::fmt::Debug for UsageVia {
    // Not the client's: its connection info holds Redis's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageVia")
            .field("tls_ca", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl UsageVia {
    /// [`usage::query`] on a [`Timed`] connection: the connect within
    /// `timeout`, the reads within [`usage::read_timeout`].
    pub(super) fn query(
        &self,
        timeout: Duration,
        from: u64,
        to: u64,
        today: u64,
        group: crate::core::usage::GroupBy,
    ) -> Result<usage::ByNode, super::ClusterError> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut con = Timed::connect(
            self.client.get_connection_info(),
            self.ca.as_deref(),
            timeout,
            &mut known,
        )?;
        drop(known);
        con.set_timeout(usage::read_timeout(timeout));
        usage::read(&mut con, from, to, today, group)
    }
}

/// Starts the cluster thread. It connects in the background: a relay
/// starts (and follows `on_store_down`) while Redis is unreachable.
pub fn start(
    cfg: &ClusterConfig,
    fleet: Arc<Fleet>,
    rx: mpsc::Receiver<Job>,
    links: Links,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let client = client(cfg)?;
    let _ = fleet.usage_via.set(Arc::new(UsageVia {
        client: client.clone(),
        ca: cfg.ca.clone(),
        known: std::sync::Mutex::default(),
    }));
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut w = Worker {
        fleet,
        client,
        con: None,
        ca: cfg.ca.clone(),
        held: Held::default(),
        timeout: cfg.timeout,
        ttl_ms: cfg.lease_ttl.as_millis() as u64,
        links,
        scripts: Scripts::new(),
        last_heartbeat: Instant::now(),
        last_poll: Instant::now(),
        last_audio: Instant::now(),
        last_try: None,
        rev_ver: None,
        tok_cut: 0,
        tok_mark: 0,
        bounds_published: None,
        acct_ver: None,
        usage_acked: None,
        epoch: None,
        acct_blob: None,
        settle_until: None,
        unshared: recovery::Waiting::default(),
        recent: Vec::new(),
        unshared_accounts: None,
        audio_all: false,
        ends_id: None,
        failed_logged: false,
        known: Default::default(),
        rejoining: false,
        usage: usage::Pending::new(),
        usage_sent: None,
        usage_sent_max: false,
        usage_max: usage::Pending::new(),
        usage_seq: 0,
        usage_clear: false,
        merge_waits: true,
        merge_waited: false,
        process: started ^ (u64::from(std::process::id()) << 40),
        last_usage: Instant::now(),
        release_at: None,
        id_shared_at: None,
        clock_off: false,
    };
    std::thread::Builder::new()
        .name("clio-cluster".into())
        .spawn(move || w.run(rx))
}

struct Scripts {
    open: redis::Script,
    adjust: redis::Script,
    heartbeat: redis::Script,
    register: redis::Script,
    nodes: redis::Script,
    usage: redis::Script,
    usage_max: redis::Script,
    reseed: redis::Script,
    audio: redis::Script,
    publish_if: redis::Script,
    publish_on: redis::Script,
    tokens_expire: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            open: redis::Script::new(scripts::OPEN),
            adjust: redis::Script::new(scripts::ADJUST),
            heartbeat: redis::Script::new(scripts::HEARTBEAT),
            register: redis::Script::new(scripts::REGISTER),
            nodes: redis::Script::new(scripts::NODES),
            usage: redis::Script::new(scripts::USAGE),
            usage_max: redis::Script::new(scripts::USAGE_MAX),
            reseed: redis::Script::new(scripts::RESEED),
            audio: redis::Script::new(scripts::AUDIO),
            publish_if: redis::Script::new(scripts::PUBLISH_IF),
            publish_on: redis::Script::new(scripts::PUBLISH_ON),
            tokens_expire: redis::Script::new(scripts::TOKENS_EXPIRE),
        }
    }
}

/// What a pipeline slot's answer is for.
enum Pending {
    Open(super::OpenJob),
    Adjust,
    /// A revocation change's version bump, and who asked.
    Revoked(Revocation, async_channel::Sender<Result<(), ClusterError>>),
    /// The answer to a publish of this sealed set (none: a comparison
    /// only), and who asked.
    Accounts(
        Option<Vec<u8>>,
        async_channel::Sender<Result<super::AccountsAnswer, ClusterError>>,
    ),
}

struct Worker {
    fleet: Arc<Fleet>,
    client: redis::Client,
    con: Option<Timed>,
    /// `cluster.ca_file`'s certificates, for `rediss://`.
    ca: Option<Vec<u8>>,
    held: Held,
    timeout: Duration,
    ttl_ms: u64,
    links: Links,
    scripts: Scripts,
    last_heartbeat: Instant,
    last_poll: Instant,
    last_audio: Instant,
    last_try: Option<Instant>,
    rev_ver: Option<i64>,
    /// `tokcut` of `clio:ver` as last loaded (ms, Redis clock; see
    /// [`scripts::TOKENS_EXPIRE`]), offered back to a store that lost it.
    tok_cut: i64,
    /// `tokmark` of `clio:ver` as last loaded (ms, Redis clock), offered
    /// back the same way.
    tok_mark: i64,
    /// This node's token bounds (hold, clock skew; ms) as last written to
    /// `clio:rev:hold` and `clio:rev:skew`: with its lease, and by a poll
    /// that finds them changed (a reload).
    bounds_published: Option<(u64, u64)>,
    acct_ver: Option<i64>,
    /// The id of this node's last usage batch Redis took (`clio:useq`
    /// holds it too, unless Redis lost it or went back to an older copy).
    usage_acked: Option<String>,
    /// The store's epoch when last seen (see [`scripts::RESEED`]).
    epoch: Option<String>,
    /// The sealed account set of version `acct_ver`, offered back to a
    /// store that lost it.
    acct_blob: Option<Vec<u8>>,
    /// Until when the store settles after a loss: this node decides by its
    /// share, and keeps the node count it knew.
    settle_until: Option<Instant>,
    /// Revocation changes made here while the store was unreachable, sent
    /// when it answers again: the last of each device or token id.
    unshared: recovery::Waiting,
    /// Revocation changes Redis took, with the version they made, until a
    /// poll loads a version that has them: given back after a loss.
    recent: Vec<(i64, Revocation)>,
    /// The account set as changed here while the store was unreachable,
    /// and the store's version it was changed from.
    unshared_accounts: Option<(Vec<u8>, i64)>,
    /// The next audio flush offers every device's total (after a loss).
    audio_all: bool,
    ends_id: Option<String>,
    failed_logged: bool,
    /// Redis's addresses as last resolved, kept through a resolver outage.
    known: timed::KnownAddrs,
    /// Going down to register again (not an outage: no ERROR line).
    rejoining: bool,
    /// Usage not yet added to Redis.
    usage: usage::Pending,
    /// A usage batch sent but not answered: sent again, same id, until it is.
    usage_sent: Option<(String, UsageChunk)>,
    /// That batch is a merge's ([`scripts::USAGE_MAX`]).
    usage_sent_max: bool,
    /// The ledger's totals to merge before `usage` is added
    /// ([`Job::UsageMerge`]).
    usage_max: usage::Pending,
    usage_seq: u64,
    /// This node's counters in Redis are to be deleted before the next
    /// batch: `usage` holds the ledger's totals that replace them
    /// ([`Job::UsageRestore`]).
    usage_clear: bool,
    /// The start's ledger merge is not yet due (see
    /// [`Worker::merge_when_alone`]).
    merge_waits: bool,
    /// It waited for another process of this node (said once).
    merge_waited: bool,
    /// This process's part of usage batch ids.
    process: u64,
    last_usage: Instant,
    /// When the holds given back must be sent (see [`super::RELEASE_DELAY`]).
    release_at: Option<Instant>,
    /// When a heartbeat last saw another running relay with this node id.
    id_shared_at: Option<Instant>,
    /// This node's clock was last seen off Redis's (see [`Worker::clock_offset`]).
    clock_off: bool,
}

/// A poll's answers: the nodes script's, [`scripts::TOKENS_EXPIRE`]'s
/// (the token id revocations expired, the fleet's longest hold and
/// `max_ttl` and largest clock skew, ms), what [`recovery::ask_versions`] asks, and the new
/// "end the live streams of" entries.
type PollAnswer = (
    Value,
    (i64, i64, i64, i64),
    Vec<Option<String>>,
    Option<String>,
    Value,
);

type UsageChunk = Vec<(
    (u64, crate::core::usage::GroupBy, String),
    crate::core::usage::Totals,
)>;

/// A version field of `clio:ver` and the store's epoch, read together with
/// what they version (see `Worker::load_revocations`).
type VersionAndEpoch = (Option<i64>, Option<String>);

/// The revocation lists as [`Worker::load_revocations`] reads them: the
/// version and epoch, the device ids, the token ids, their times and
/// recorded clock skews, and the `tokcut` and `tokmark`.
type RevocationLists = (
    VersionAndEpoch,
    HashSet<String>,
    HashSet<String>,
    Vec<(String, i64)>,
    Vec<(String, i64)>,
    (Option<i64>, Option<i64>),
);

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        self.connect();
        loop {
            let mut wait = POLL.saturating_sub(self.last_poll.elapsed());
            if let Some(at) = self.release_at {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(job) => {
                    let mut batch = vec![job];
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    let released = batch.iter().any(|j| matches!(j, Job::Released));
                    if released && self.release_at.is_none() {
                        self.release_at = Some(Instant::now() + super::RELEASE_DELAY);
                    }
                    if batch.iter().any(|j| matches!(j, Job::Open(_) | Job::Stop)) {
                        // Streams that ended go first: a device reopening
                        // at its limit finds its place free.
                        let mut all = self.take_releases();
                        all.append(&mut batch);
                        batch = all;
                    }
                    let stop = batch.iter().position(|j| matches!(j, Job::Stop));
                    if let Some(i) = stop {
                        batch.truncate(i);
                        self.jobs(batch);
                        return self.leave();
                    }
                    self.jobs(batch);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if self.release_at.is_some_and(|at| Instant::now() >= at) {
                let releases = self.take_releases();
                self.jobs(releases);
            }
            self.duties();
        }
    }

    /// The count changes since the last call: the tally takes each id's
    /// net change now; what Redis does not have yet comes back to send.
    fn take_releases(&mut self) -> Vec<Job> {
        self.release_at = None;
        let (net, unsent) = self.fleet.take_changes();
        for ((kind, id), n) in net {
            self.held.adjust(kind, &id, n);
        }
        unsent
    }

    /// How long after a failure the thread waits to reconnect: at least
    /// [`RECONNECT`], and past the deadline of every open a shard's link
    /// sent before the failure, so none is answered after the tally is
    /// registered again.
    fn reconnect_wait(&self) -> Duration {
        RECONNECT.max(self.timeout + Duration::from_millis(100))
    }

    /// A shard's link failed: the store is treated as down (see
    /// [`Job::LinkFailed`]).
    fn link_failed(&mut self, why: &str) {
        if self.con.is_none() {
            return;
        }
        self.fleet
            .stats
            .calls_failed
            .fetch_add(1, Ordering::Relaxed);
        if !self.failed_logged {
            tracing::warn!(
                call = "shard link",
                error = %why,
                "cluster store call failed"
            );
            self.failed_logged = true;
        }
        self.down();
    }

    /// Drops the connection and goes down until the next reconnect.
    fn down(&mut self) {
        self.con = None;
        self.last_try = Some(Instant::now());
        self.set_up(false);
        *self.fleet.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn set_up(&mut self, up: bool) {
        let was = self.fleet.up.swap(up, Ordering::Relaxed);
        if was != up {
            self.set_shares();
            if !up {
                for a in self.links.process.accounts() {
                    // Until the store answers a poll again: this node's own.
                    a.set_fleet_live(None);
                }
            }
            if up {
                tracing::info!(node = %self.fleet.node_id, nodes = self.fleet.nodes(), "cluster store reachable; counts registered");
            } else if !self.rejoining {
                tracing::error!(node = %self.fleet.node_id, on_store_down = ?self.fleet.on_store_down, "cluster store unreachable; live streams go on");
            }
        }
    }

    fn failed(&mut self, what: &str, e: &redis::RedisError) {
        self.fleet
            .stats
            .calls_failed
            .fetch_add(1, Ordering::Relaxed);
        if !self.failed_logged {
            if e.is_timeout() {
                // A read past its deadline is EAGAIN on Linux ("Resource
                // temporarily unavailable"), which says nothing of a slow
                // or silent Redis.
                tracing::warn!(call = what, error = %format_args!("no answer within cluster.timeout ({:?})", self.timeout), "cluster store call failed");
            } else {
                // Redis errors name the server and the failure, never the
                // password (it is not in the URL).
                tracing::warn!(call = what, error = %e, "cluster store call failed");
            }
            self.failed_logged = true;
        }
        self.down();
    }

    fn ok(&mut self) {
        self.fleet.stats.calls_ok.fetch_add(1, Ordering::Relaxed);
        self.failed_logged = false;
    }

    /// Connects, loads the scripts and registers what this node holds.
    fn connect(&mut self) {
        self.last_try = Some(Instant::now());
        let con = Timed::connect(
            self.client.get_connection_info(),
            self.ca.as_deref(),
            self.timeout,
            &mut self.known,
        );
        let mut con = match con {
            Ok(c) => c,
            Err(e) => return self.failed("connect", &e),
        };
        let mut pipe = redis::pipe();
        for s in [
            scripts::OPEN,
            scripts::ADJUST,
            scripts::HEARTBEAT,
            scripts::REGISTER,
            scripts::NODES,
            scripts::USAGE,
            scripts::RESEED,
            scripts::AUDIO,
            scripts::PUBLISH_ON,
            scripts::TOKENS_EXPIRE,
        ] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s);
        }
        if let Err(e) = pipe.query::<Vec<String>>(&mut con) {
            return self.failed("script load", &e);
        }
        self.con = Some(con);
        self.ok();
        self.check_eviction();
        // A store that lost its data while this node could not reach it:
        // known before registering, so the counts go in once.
        let mut pipe = redis::pipe();
        recovery::ask_versions(&mut pipe, &self.fleet.member);
        let vers: Result<(Vec<Option<String>>, Option<String>), _> =
            pipe.query(self.con.as_mut().expect("set above"));
        let (vers, useq) = match vers {
            Ok(v) => v,
            Err(e) => return self.failed("versions", &e),
        };
        if self.check_store(&vers, useq).is_none() {
            return;
        }
        if self.register() {
            self.share_unshared();
            *self.fleet.link.lock().unwrap_or_else(|e| e.into_inner()) = self.link_target();
            self.poll();
        }
    }

    /// Whether Redis may evict keys when it is full: a `maxmemory` with a
    /// policy other than `noeviction` can drop a node's count hashes (its
    /// streams then stop counting, unseen) or any other `clio:` key, where
    /// `noeviction` fails the writes, which the node sees as an outage.
    /// Read at each connect and each heartbeat. A Redis that does not
    /// answer `INFO memory` is taken as it is.
    fn check_eviction(&mut self) {
        let Some(con) = self.con.as_mut() else { return };
        let info = match redis::cmd("INFO").arg("memory").query::<String>(con) {
            Ok(info) => info,
            // No answer (in time), or not a reply: the store is down, as
            // after any other call.
            Err(e) if !redis::ConnectionLike::is_open(&*con) => {
                return self.failed("eviction check", &e)
            }
            // A Redis that does not let this user run INFO: unknown.
            Err(_) => return,
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let limited = field("maxmemory").is_some_and(|m| m != "0");
        let policy = field("maxmemory_policy").unwrap_or("noeviction");
        let evicts = limited && policy != "noeviction";
        let was = self.fleet.may_evict.swap(evicts, Ordering::Relaxed);
        if evicts && !was {
            tracing::warn!(maxmemory_policy = policy, "the cluster store may evict the fleet's keys when full (it has a maxmemory and a policy other than noeviction): a device's or account's streams may then stop counting unseen; set maxmemory-policy noeviction");
        } else if was && !evicts {
            tracing::info!(
                maxmemory_policy = policy,
                "the cluster store no longer evicts keys when full"
            );
        }
    }

    /// Where shards' own connections go: Redis's addresses as this
    /// thread's connect just resolved them (a managed Redis's name may
    /// move), for a plain TCP URL only.
    fn link_target(&self) -> Option<LinkTarget> {
        let info = self.client.get_connection_info();
        let redis::ConnectionAddr::Tcp(..) = info.addr() else {
            return None;
        };
        let addrs = self.known.addrs().to_vec();
        let settings = info.redis_settings();
        Some(LinkTarget {
            addrs,
            username: settings.username().map(str::to_string),
            password: settings.password().map(crate::core::secret::Secret::new),
            db: settings.db(),
        })
    }

    /// Replaces this node's counts in Redis with what it holds (the
    /// changes queued so far counted in first).
    fn register(&mut self) -> bool {
        // Redis takes the whole tally: the unsent changes are in it.
        let _ = self.take_releases();
        let mut inv = self.scripts.register.prepare_invoke();
        inv.arg(&self.fleet.member).arg(self.ttl_ms);
        let devs: Vec<_> = self
            .held
            .counts
            .iter()
            .filter(|((k, _), _)| *k == Kind::Device)
            .collect();
        let bounds = self.token_bounds_ms();
        inv.arg(devs.len())
            .arg(&self.fleet.node_id)
            .arg(bounds.0)
            .arg(bounds.1);
        for ((_, id), n) in &devs {
            inv.arg(id.as_str()).arg(**n);
        }
        for ((k, id), n) in &self.held.counts {
            if *k == Kind::Account {
                inv.arg(id.as_str()).arg(*n);
            }
        }
        let Some(con) = self.con.as_mut() else {
            return false;
        };
        match inv.invoke::<i64>(con) {
            Ok(nodes) => {
                self.ok();
                self.bounds_published = Some(bounds);
                self.set_nodes(nodes);
                self.fleet
                    .stats
                    .registrations
                    .fetch_add(1, Ordering::Relaxed);
                self.last_heartbeat = Instant::now();
                self.set_up(true);
                self.rejoining = false;
                true
            }
            Err(e) => {
                self.failed("register", &e);
                false
            }
        }
    }

    /// Leaves the fleet: this node's lease and counts are deleted, so its
    /// streams stop counting now rather than after the lease ends.
    fn leave(&mut self) {
        if let Err(e) = self.flush_usage(usage::FLUSH_CHUNKS) {
            tracing::warn!(error = %e, "this node's last usage is not in the fleet's totals (its own ledger has it)");
        }
        let Some(con) = self.con.as_mut() else { return };
        let node = &self.fleet.member;
        let r: Result<(), _> = redis::pipe()
            .cmd("ZREM")
            .arg("clio:nodes")
            .arg(node)
            .ignore()
            .cmd("DEL")
            .arg(format!("clio:n:{node}:dev"))
            .arg(format!("clio:n:{node}:acct"))
            .ignore()
            .cmd("HDEL")
            .arg("clio:useq")
            .arg(node)
            .ignore()
            .cmd("HDEL")
            .arg("clio:rev:hold")
            .arg(node)
            .ignore()
            .cmd("HDEL")
            .arg("clio:rev:skew")
            .arg(node)
            .ignore()
            .query(con);
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not leave the fleet; this node's counts end with its lease");
        }
    }

    fn jobs(&mut self, batch: Vec<Job>) {
        let mut flushes = Vec::new();
        let mut rest = Vec::with_capacity(batch.len());
        for job in batch {
            match job {
                Job::Usage(records) => usage::add(&mut self.usage, &records),
                Job::UsageFlush(reply) => flushes.push(reply),
                Job::UsageRestore(ledger) => {
                    // The ledger has every record handed before it: what
                    // waits, and the batch not answered, are in it.
                    self.usage = ledger;
                    self.usage_sent = None;
                    self.usage_max.clear();
                    self.usage_clear = true;
                }
                Job::UsageMerge(ledger) => {
                    // The ledger has every record handed before it: what
                    // waits, and the batch not answered (added or not),
                    // are in it, and the merge covers them.
                    self.usage_max = ledger;
                    self.usage.clear();
                    self.usage_sent = None;
                }
                j => rest.push(j),
            }
        }
        self.pipeline(rest);
        if !flushes.is_empty() {
            let r = self.flush_usage(usage::FLUSH_CHUNKS);
            for reply in flushes {
                let _ = reply.try_send(r.clone());
            }
        }
    }

    /// Adds the usage waiting to Redis, in at most `chunks` calls: the
    /// batch sent but not answered first (same id: the script skips it if
    /// it was added), then new batches of at most [`usage::CHUNK`] entries.
    fn flush_usage(&mut self, chunks: usize) -> Result<(), ClusterError> {
        self.last_usage = Instant::now();
        if self.usage_clear {
            let Some(con) = self.con.as_mut() else {
                return Err(ClusterError::Unreachable);
            };
            let today = crate::core::devices::utc_day(std::time::SystemTime::now());
            let keys = usage::node_keys(&self.fleet.node_id, today);
            match redis::cmd("DEL").arg(keys).query::<i64>(con) {
                Ok(_) => {
                    self.ok();
                    self.usage_clear = false;
                }
                Err(e) => {
                    self.failed("usage", &e);
                    return Err(ClusterError::NoAnswer);
                }
            }
        }
        for _ in 0..chunks {
            if self.usage_sent.is_none() {
                // The merge's batches first: the records after it add to
                // what it leaves.
                self.usage_sent_max = !self.usage_max.is_empty();
                let from = if self.usage_sent_max {
                    &mut self.usage_max
                } else {
                    &mut self.usage
                };
                if from.is_empty() {
                    return Ok(());
                }
                self.usage_seq += 1;
                let id = usage::batch_id(self.process, self.usage_seq);
                self.usage_sent = Some((id, usage::take_chunk(from)));
            }
            let Some(con) = self.con.as_mut() else {
                return Err(ClusterError::Unreachable);
            };
            let (id, chunk) = self.usage_sent.as_ref().expect("set above");
            let script = if self.usage_sent_max {
                &self.scripts.usage_max
            } else {
                &self.scripts.usage
            };
            let inv = usage::invocation(script, &self.fleet.node_id, &self.fleet.member, id, chunk);
            let r = inv.invoke::<i64>(con);
            match r {
                Ok(_) => {
                    self.ok();
                    self.usage_acked = self.usage_sent.take().map(|(id, _)| id);
                }
                Err(e) => {
                    self.failed("usage", &e);
                    return Err(ClusterError::NoAnswer);
                }
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, batch: Vec<Job>) {
        if let Some(why) = batch.iter().find_map(|j| match j {
            Job::LinkFailed(why) => Some(why.clone()),
            _ => None,
        }) {
            self.link_failed(&why);
        }
        let up = self.con.is_some();
        let mut pipe = redis::pipe();
        let mut pending: Vec<Pending> = Vec::new();
        let node = self.fleet.member.clone();
        // Every count change of the batch in one call, before its opens.
        let mut adjust = self.scripts.adjust.prepare_invoke();
        adjust.arg(&node);
        let mut adjusts = 0;
        for job in &batch {
            let (kind, id, delta) = match job {
                Job::Adjust(kind, id, delta) => {
                    self.held.adjust(*kind, id, i64::from(*delta));
                    (kind, id, delta)
                }
                Job::Sync(kind, id, delta) => (kind, id, delta),
                _ => continue,
            };
            adjust.arg(kind.field()).arg(id.as_str()).arg(*delta);
            adjusts += 1;
        }
        if up && adjusts > 0 {
            pipe.invoke_script(&adjust);
            pending.push(Pending::Adjust);
        }
        for job in batch {
            match job {
                Job::Adjust(..) | Job::Sync(..) | Job::Released | Job::LinkFailed(_) => {}
                Job::Settling => {
                    if !self.settling() {
                        self.settle_until = Some(Instant::now() + self.settle_ms_duration());
                        self.set_shares();
                    }
                }
                Job::Open(o) => {
                    if !up || Instant::now() > o.deadline {
                        let _ = o.reply.send(OpenAnswer::Down);
                        continue;
                    }
                    let mut inv = self.scripts.open.prepare_invoke();
                    o.req.args(&node, self.ttl_ms, &mut inv);
                    pipe.invoke_script(&inv);
                    pending.push(Pending::Open(o));
                }
                Job::Revoke {
                    device,
                    token,
                    end_live,
                    lift,
                    reply,
                } => {
                    let change = Revocation {
                        device,
                        token,
                        end_live,
                        lift,
                    };
                    if !up {
                        // This node has it; the fleet gets it on reconnect.
                        self.unshared.keep(change);
                        let _ = reply.try_send(Err(ClusterError::Unreachable));
                        continue;
                    }
                    change.add_to(&mut pipe);
                    pending.push(Pending::Revoked(change, reply));
                }
                Job::Accounts {
                    sealed,
                    base,
                    reply,
                } => {
                    if !up {
                        if let Some(sealed) = sealed {
                            self.keep_accounts(sealed);
                        }
                        let _ = reply.try_send(Err(ClusterError::Unreachable));
                        continue;
                    }
                    let mut inv = self.scripts.publish_on.prepare_invoke();
                    inv.arg(base);
                    if let Some(s) = &sealed {
                        inv.arg(s.as_slice());
                    }
                    pipe.invoke_script(&inv);
                    pending.push(Pending::Accounts(sealed, reply));
                }
                Job::Stop
                | Job::Usage(_)
                | Job::UsageFlush(_)
                | Job::UsageRestore(_)
                | Job::UsageMerge(_) => {}
            }
        }
        if pending.is_empty() {
            return;
        }
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let answers: Result<Vec<Value>, _> = pipe.query(con);
        let answers = match answers {
            Ok(a) => {
                self.ok();
                a
            }
            Err(e) => {
                self.failed("pipeline", &e);
                for p in pending {
                    match p {
                        Pending::Open(o) => {
                            let _ = o.reply.send(OpenAnswer::Down);
                        }
                        Pending::Revoked(change, r) => {
                            // Sent again on reconnect: a set change and a
                            // version bump may land twice, harmlessly.
                            self.unshared.keep(change);
                            let _ = r.try_send(Err(ClusterError::NoAnswer));
                        }
                        Pending::Accounts(sealed, r) => {
                            if let Some(sealed) = sealed {
                                self.keep_accounts(sealed);
                            }
                            let _ = r.try_send(Err(ClusterError::NoAnswer));
                        }
                        _ => {}
                    }
                }
                return;
            }
        };
        let mut undo = Vec::new();
        for (p, v) in pending.into_iter().zip(answers.iter()) {
            match p {
                Pending::Open(o) => {
                    let answer = scripts::open_answer(v);
                    let o_req = &o.req;
                    if let OpenAnswer::Ok(pick, _) = answer {
                        if !o_req.device.is_empty() {
                            self.held.adjust(Kind::Device, &o_req.device, 1);
                        }
                        if let Some(i) = pick {
                            self.held.adjust(Kind::Account, &o_req.candidates[i].0, 1);
                        }
                    }
                    let (device, candidates) = (o.req.device, o.req.candidates);
                    if o.reply.send(answer.clone()).is_err() {
                        // The stream gave up waiting: give back what was taken.
                        if let OpenAnswer::Ok(pick, _) = answer {
                            if !device.is_empty() {
                                undo.push(Job::Adjust(Kind::Device, device, -1));
                            }
                            if let Some(i) = pick {
                                undo.push(Job::Adjust(Kind::Account, candidates[i].0.clone(), -1));
                            }
                        }
                    }
                }
                Pending::Revoked(change, r) => {
                    self.recent.push((int(v), change));
                    let _ = r.try_send(Ok(()));
                }
                Pending::Accounts(sealed, r) => {
                    let answer = scripts::accounts_answer(v);
                    if let (super::AccountsAnswer::Current(ver), Some(sealed)) = (&answer, sealed) {
                        self.acct_ver = Some(*ver);
                        self.acct_blob = Some(sealed);
                    }
                    let _ = r.try_send(Ok(answer));
                }
                Pending::Adjust => {}
            }
        }
        if !undo.is_empty() {
            self.jobs(undo);
        }
    }

    fn duties(&mut self) {
        if self.settle_until.is_some() && !self.settling() {
            self.settle_until = None;
            self.set_shares();
        }
        if self.con.is_none() {
            if self
                .last_try
                .is_none_or(|t| t.elapsed() >= self.reconnect_wait())
            {
                self.connect();
            }
            return;
        }
        // Checked before each call of the pass: see `renew_if_due`.
        if !self.renew_if_due() {
            return;
        }
        if self.last_poll.elapsed() >= POLL {
            self.poll();
        }
        if !self.renew_if_due() {
            return;
        }
        if self.last_audio.elapsed() >= AUDIO_FLUSH {
            self.flush_audio();
        }
        if !self.renew_if_due() {
            return;
        }
        // One batch per pass, so stream opens queued meanwhile wait for one
        // call at most; a backlog (after an outage) goes out a batch a pass.
        let usage_waits = !self.usage.is_empty()
            || !self.usage_max.is_empty()
            || self.usage_sent.is_some()
            || self.usage_clear;
        let backlog = self.usage.len() >= usage::CHUNK
            || !self.usage_max.is_empty()
            || self.usage_sent.is_some();
        if usage_waits && (backlog || self.last_usage.elapsed() >= AUDIO_FLUSH) {
            let _ = self.flush_usage(1);
        }
    }

    /// Renews the lease when a heartbeat is due (every `lease_ttl / 3`);
    /// false when the store is down, before or after. Checked before each
    /// call that may take long, not once a pass: a pass, or one poll, can
    /// make several calls of up to `cluster.timeout` each (a poll, then a
    /// large revocation set or account set to read and parse), and checked
    /// only at the pass's start the lease had to outlast all of them after
    /// a third of it had gone. Between calls, it lapses only if one call
    /// takes more than two thirds of it.
    fn renew_if_due(&mut self) -> bool {
        if self.con.is_some() && self.last_heartbeat.elapsed().as_millis() as u64 >= self.ttl_ms / 3
        {
            self.heartbeat();
        }
        self.con.is_some()
    }

    fn heartbeat(&mut self) {
        self.last_heartbeat = Instant::now();
        let Some(con) = self.con.as_mut() else { return };
        let bounds = {
            let (hold, skew) = self.links.process.devices.token_bounds();
            (ms(hold), ms(skew))
        };
        let sent = unix_ms(SystemTime::now());
        let r: Result<(i64, i64, i64, i64), _> = self
            .scripts
            .heartbeat
            .arg(&self.fleet.member)
            .arg(self.ttl_ms)
            .arg(&self.fleet.node_id)
            .arg(bounds.0)
            .arg(bounds.1)
            .invoke(con);
        match r {
            Ok((lapsed, nodes, shared, redis_now)) => {
                self.ok();
                self.bounds_published = Some(bounds);
                // Redis read its clock somewhere between the call's send
                // and its answer, not necessarily halfway (a Redis busy
                // before it ran the script, an answer slow to come back):
                // what the round trip can explain is no offset.
                let got = unix_ms(SystemTime::now());
                self.clock_offset(clock_offset_ms(sent, got, redis_now));
                self.id_shared(shared == 1);
                // A policy changed while connected (`CONFIG SET`, a managed
                // Redis's parameters applied live) is seen within a heartbeat.
                self.check_eviction();
                if lapsed == 0 {
                    self.set_nodes(nodes);
                } else {
                    // Shards' links may have opens in flight: go down and
                    // register at the reconnect, past their deadlines.
                    tracing::warn!(node = %self.fleet.node_id, "this node's lease had lapsed; registering its counts again");
                    self.down();
                }
            }
            Err(e) => self.failed("heartbeat", &e),
        }
    }

    /// This node's clock against Redis's, the one clock every node reads
    /// (leases, rate buckets). Off by more than [`CLOCK_TOLERANCE`], this
    /// node's own uses of its clock go wrong: session tokens' expiry and
    /// issue times, and the UTC day its usage and daily audio are counted
    /// under (a day ahead, a device gets a second daily allowance here).
    fn clock_offset(&mut self, ms: i64) {
        self.fleet.clock_offset_ms.store(ms, Ordering::Relaxed);
        let (off, tolerance) = (ms.unsigned_abs(), CLOCK_TOLERANCE.as_millis() as u64);
        let seconds = ms as f64 / 1000.0;
        if !self.clock_off && off > tolerance {
            tracing::error!(node = %self.fleet.node_id, offset_seconds = seconds, "this node's clock is off the cluster store's (Redis's clock): session tokens' expiry and issue times, and the UTC day of its usage and daily audio, go by this node's clock; fix its time synchronisation (NTP)");
            self.clock_off = true;
        } else if self.clock_off && off <= tolerance / 2 {
            tracing::info!(node = %self.fleet.node_id, offset_seconds = seconds, "this node's clock agrees with the cluster store's again");
            self.clock_off = false;
        }
    }

    /// Whether another running relay uses this node id: seen at this
    /// heartbeat, or at one in the last lease (two relays' heartbeats
    /// drift, so one may now and then see none of the other's between
    /// two of its own).
    fn id_shared(&mut self, seen: bool) {
        let now = Instant::now();
        if seen {
            if self.id_shared_at.is_none() {
                tracing::error!(node = %self.fleet.node_id, "another running relay has this cluster.node_id; give each node its own: until then both count their streams, but their usage shares one node's row in /admin/usage");
            }
            self.id_shared_at = Some(now);
        } else if self
            .id_shared_at
            .is_some_and(|t| now.duration_since(t).as_millis() as u64 > self.ttl_ms)
        {
            tracing::info!(node = %self.fleet.node_id, "no other running relay has this cluster.node_id any more");
            self.id_shared_at = None;
        }
        self.fleet
            .id_conflict
            .store(self.id_shared_at.is_some(), Ordering::Relaxed);
    }

    /// Revocations, account changes and "end" requests from other nodes.
    fn poll(&mut self) {
        self.last_poll = Instant::now();
        let Some(con) = self.con.as_mut() else { return };
        if self.ends_id.is_none() {
            // Start after the newest request: older ones were for streams
            // that ended before this node started.
            let last: Result<Value, _> = redis::cmd("XREVRANGE")
                .arg("clio:ends")
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query(con);
            match last {
                Ok(v) => {
                    let id = items(&v)
                        .first()
                        .and_then(|e| items(e).first())
                        .map(text)
                        .unwrap_or_else(|| "0-0".into());
                    self.ends_id = Some(id);
                }
                Err(e) => return self.failed("poll", &e),
            }
        }
        let ends_id = self.ends_id.clone().unwrap_or_else(|| "0-0".into());
        let mut nodes_inv = self.scripts.nodes.prepare_invoke();
        nodes_inv.arg(&self.fleet.member).arg(&self.fleet.node_id);
        // The expiry runs before the versions are read: one it bumps is
        // loaded at this poll. This node's hold (`max_ttl` +
        // `clock_skew`) and skew go with it only when they changed since
        // they were last written (a reload); its lease writes them too.
        let bounds = {
            let (hold, skew) = self.links.process.devices.token_bounds();
            (ms(hold), ms(skew))
        };
        let changed = self.bounds_published != Some(bounds);
        let mut expire_inv = self.scripts.tokens_expire.prepare_invoke();
        expire_inv.arg(&self.fleet.member);
        if changed {
            expire_inv.arg(bounds.0).arg(bounds.1);
        }
        let mut pipe = redis::pipe();
        pipe.invoke_script(&nodes_inv);
        pipe.invoke_script(&expire_inv);
        recovery::ask_versions(&mut pipe, &self.fleet.member);
        let r: Result<PollAnswer, _> = pipe
            .cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg("clio:ends")
            .arg(&ends_id)
            .query(con);
        let (nodes, (_expired, fleet_hold, fleet_ttl, fleet_skew), vers, useq, ends) = match r {
            Ok(x) => x,
            Err(e) => return self.failed("poll", &e),
        };
        self.ok();
        if changed {
            self.bounds_published = Some(bounds);
        }
        let Some((rev, acct, loss)) = self.check_store(&vers, useq) else {
            return;
        };
        if loss {
            // Its lease and counts went with it: register again after the
            // reconnect wait, as after an outage.
            self.rejoining = true;
            return self.down();
        }
        let nodes = items(&nodes);
        if nodes.get(2).is_some_and(|m| int(m) == 0) {
            // Its lease was deleted (or evicted) with its streams' place
            // in the counts: register again after the reconnect wait, as
            // after a lapse, rather than at the next heartbeat.
            tracing::warn!(node = %self.fleet.node_id, "this node's lease is gone from the cluster store; registering its counts again");
            self.rejoining = true;
            return self.down();
        }
        let count = nodes.first().map_or(1, int);
        self.set_nodes(count);
        if self.merge_waits {
            self.merge_when_alone(nodes.get(3).map_or(0, int));
        }
        // Each account's live streams on every node, for its alert.
        let live: HashMap<String, i64> = nodes
            .get(1)
            .map(items)
            .unwrap_or_default()
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?), int(p.get(1)?))))
            .collect();
        for a in self.links.process.accounts() {
            let n = live.get(&a.id).copied().unwrap_or(0);
            a.set_fleet_live(Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX - 1)));
        }
        if self.rev_ver != Some(rev) {
            if !self.renew_if_due() {
                return;
            }
            self.load_revocations(rev);
        }
        // The fleet's bounds as of now (a node with a longer `max_ttl`
        // joined, one left, a reload), for `token_ids_expire`: what
        // Redis keeps the revocations by, whether or not they changed.
        // After the load: a skew that went down comes with the skews it
        // left recorded, so no expiry shown is ever too early.
        self.set_fleet_bounds(fleet_hold, fleet_ttl, fleet_skew);
        if self.acct_ver != Some(acct) {
            if !self.renew_if_due() {
                return;
            }
            self.load_accounts(acct);
        }
        self.end_streams(&ends);
    }

    /// The start's ledger merge ([`Job::UsageMerge`]) waits while
    /// `others` other processes of this node hold a current lease. In a
    /// hand-over restart the old process still adds its own usage to
    /// Redis as its streams end, and the ledger the merge would read
    /// (one `usage.db` for both) holds what it persisted before adding
    /// it: merged first, that usage would be counted twice. Once it has
    /// left (its usage added, its lease deleted) or its lease has ended
    /// (it died), the merge is what recovers what it could not add.
    fn merge_when_alone(&mut self, others: i64) {
        if others > 0 {
            if !self.merge_waited {
                tracing::info!(node = %self.fleet.node_id, "another process of this node holds a lease (a hand-over restart, or a process that died): this node's ledger is merged into the fleet's usage once it has left or its lease has ended");
                self.merge_waited = true;
            }
            return;
        }
        if self.merge_waited {
            tracing::info!(node = %self.fleet.node_id, "no other process of this node holds a lease: merging this node's ledger into the fleet's usage");
        }
        self.merge_waits = false;
        self.fleet.merge_due();
    }

    /// Loads the revocation sets, whose version the poll saw at `ver`.
    /// They are read in one transaction with the version and the epoch:
    /// sets emptied by a loss since the poll (a flush, an empty restart)
    /// or gone back to an older copy are not taken for the fleet's; the
    /// next poll sees the loss, and this node gives back what it knows.
    fn load_revocations(&mut self, ver: i64) {
        let lists_timeout = self.lists_timeout();
        let Some(con) = self.con.as_mut() else { return };
        // The lists are as long as the fleet's revocations, which device
        // revocations never shorten: a stream open's deadline was too
        // short for some hundreds of thousands of ids, and the node then
        // counted the store unreachable at each poll, for good.
        con.set_timeout(lists_timeout);
        let r: Result<RevocationLists, _> = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg("clio:ver")
            .arg("rev")
            .arg("epoch")
            .cmd("SMEMBERS")
            .arg("clio:rev:dev")
            .cmd("SMEMBERS")
            .arg("clio:rev:tok")
            .cmd("ZRANGE")
            .arg("clio:rev:tokat")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg("clio:rev:tokskew")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("HMGET")
            .arg("clio:ver")
            .arg("tokcut")
            .arg("tokmark")
            .query(con);
        con.set_timeout(self.timeout);
        match r {
            Ok(((rev, epoch), d, t, at, skews, (cut, mark))) => {
                let rev = rev.unwrap_or(0);
                if epoch != self.epoch || rev < ver {
                    return;
                }
                self.rev_ver = Some(rev);
                self.recent.retain(|(v, _)| *v > rev);
                let devices = &self.links.process.devices;
                let (_, skew) = devices.token_bounds();
                let cut = cut.unwrap_or(0).max(self.tok_cut);
                self.tok_cut = cut;
                let mark = mark.unwrap_or(0).max(self.tok_mark);
                self.tok_mark = mark;
                // Redis's times on this node's clock (the offset its
                // heartbeats measure), in seconds rounded up: later,
                // never sooner.
                let offset = self.fleet.clock_offset_ms.load(Ordering::Relaxed).max(0);
                let secs = |ms: i64| ((ms.max(0) + offset) as u64).div_ceil(1000);
                let at: HashMap<String, i64> = at.into_iter().collect();
                let skews: HashMap<String, i64> = skews.into_iter().collect();
                let span = |ms: i64| (ms.max(0) as u64).div_ceil(1000);
                let tokens = t
                    .into_iter()
                    .map(|id| {
                        let held = at
                            .get(&id)
                            .map(|ms| (secs(*ms), span(skews.get(&id).copied().unwrap_or(0))));
                        (id, held)
                    })
                    .collect();
                // Every token issued up to the latest dropped revocation
                // plus this node's clock skew, or plus the skew recorded
                // with a dropped one: all expired, or carrying an id
                // revoked then.
                let through = if cut > 0 {
                    secs(cut).saturating_add(skew)
                } else {
                    0
                };
                let through = if mark > 0 {
                    through.max(secs(mark))
                } else {
                    through
                };
                devices.replace_revoked(d, tokens, through);
            }
            Err(e) => self.failed("revocations", &e),
        }
    }

    /// The deadline of the read of the revocation lists: `cluster.timeout`,
    /// or [`LISTS_TIMEOUT`] when longer, but never past a third of the
    /// lease (the heartbeats' interval), so that a read that takes it all
    /// cannot hold a heartbeat past the lease.
    fn lists_timeout(&self) -> Duration {
        self.timeout
            .max(LISTS_TIMEOUT.min(Duration::from_millis(self.ttl_ms / 3)))
    }

    /// This node's token bounds in ms: `tokens.max_ttl` +
    /// `tokens.clock_skew`, and `tokens.clock_skew`.
    fn token_bounds_ms(&self) -> (u64, u64) {
        let (hold, skew) = self.links.process.devices.token_bounds();
        (ms(hold), ms(skew))
    }

    /// The fleet's longest hold and `max_ttl` and largest clock skew (ms,
    /// as [`scripts::TOKENS_EXPIRE`] answers them; this node's own at
    /// least), in seconds rounded up, for the expiry each revocation
    /// shows.
    fn set_fleet_bounds(&self, hold: i64, ttl: i64, skew: i64) {
        let devices = &self.links.process.devices;
        let (own_hold, own_skew) = devices.token_bounds();
        let secs = |ms: i64| (ms.max(0) as u64).div_ceil(1000);
        devices.set_fleet_bounds(
            secs(hold).max(own_hold),
            secs(ttl).max(own_hold.saturating_sub(own_skew)),
            secs(skew).max(own_skew),
        );
    }

    fn load_accounts(&mut self, ver: i64) {
        let Some(tx) = self.links.accounts.clone() else {
            self.acct_ver = Some(ver);
            return;
        };
        let Some(con) = self.con.as_mut() else { return };
        // Read with the version and the epoch, as the revocations are: a
        // set gone since the poll (a flush, an empty restart) does not
        // replace the one this node would give back after the loss.
        let r: Result<(VersionAndEpoch, Option<Vec<u8>>), _> = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg("clio:ver")
            .arg("acct")
            .arg("epoch")
            .cmd("GET")
            .arg("clio:accounts")
            .query(con);
        match r {
            Ok(((acct, epoch), blob)) => {
                let acct = acct.unwrap_or(0);
                if epoch != self.epoch || acct < ver {
                    return;
                }
                self.acct_ver = Some(acct);
                self.acct_blob.clone_from(&blob);
                if let Some(b) = blob {
                    let _ = tx.try_send((acct, b));
                }
            }
            Err(e) => self.failed("accounts", &e),
        }
    }

    fn end_streams(&mut self, ends: &Value) {
        // XREAD: [[stream, [[id, [field, value, ...]], ...]]]
        for stream in items(ends) {
            for entry in items(items(stream).get(1).unwrap_or(&Value::Nil)) {
                let e = items(entry);
                let Some(id) = e.first().map(text) else {
                    continue;
                };
                let fields = items(e.get(1).unwrap_or(&Value::Nil));
                let mut device = None;
                let mut token = None;
                for kv in fields.chunks(2) {
                    if let [k, v] = kv {
                        let v = text(v);
                        match text(k).as_str() {
                            "device" if !v.is_empty() => device = Some(v),
                            "token" if !v.is_empty() => token = Some(v),
                            _ => {}
                        }
                    }
                }
                for tx in &self.links.shards {
                    let _ = tx.try_send(ShardMsg::EndStreams {
                        devices: device.iter().cloned().collect(),
                        tokens: token.iter().cloned().collect(),
                    });
                }
                self.ends_id = Some(id);
            }
        }
    }

    /// Adds each device's new audio to the fleet's daily total and learns
    /// what the other nodes streamed.
    fn flush_audio(&mut self) {
        self.last_audio = Instant::now();
        let day = utc_day(SystemTime::now());
        let all = self.audio_all;
        let states = self.links.process.devices.fleet_audio_pending(day, all);
        if states.is_empty() {
            self.audio_all = false;
            return;
        }
        let mut inv = self.scripts.audio.prepare_invoke();
        inv.arg(day);
        let mut sent = Vec::with_capacity(states.len());
        for (id, state) in &states {
            // The floor first: a stream adding audio between the two reads
            // is in the delta, not yet in the floor.
            let known = state.known_fleet_audio(day);
            let (local, delta) = state.unreported_audio(day);
            inv.arg(id.as_str()).arg(delta).arg(known.max(delta));
            sent.push(local);
        }
        let Some(con) = self.con.as_mut() else { return };
        match inv.invoke::<Vec<u64>>(con) {
            Ok(totals) => {
                self.ok();
                self.audio_all &= !all;
                for (((_, state), local), total) in states.iter().zip(sent).zip(totals) {
                    state.set_fleet_audio(day, local, total);
                }
            }
            Err(e) => self.failed("audio", &e),
        }
    }
}
