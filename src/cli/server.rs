//! Starting and stopping a whole relay: shards, the admin server, and
//! the calls a running relay takes (reload, drain, liveness, stop). The
//! process around it, signals and systemd, is `cli::run`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::accounts::Accounts;
use crate::control::admin::{self, AdminHandle, AdminMsg, AdminSetup};
use crate::control::health::RestTarget;
use crate::core::config::{AuthMode, Config, PoolConfig};
use crate::core::metrics::MetricsSnapshot;
use crate::core::token::TokenKeys;
use crate::dataplane::shard::{self, ProcessState, ShardHandle, ShardMsg, ShardSetup};

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    /// The client port's address (every shard listens on it).
    pub client_addr: SocketAddr,
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    /// Process-wide state: accounts, stream count, draining flag.
    pub process: Arc<ProcessState>,
    shards: Vec<ShardHandle>,
    admin: Option<AdminHandle>,
    admin_tx: async_channel::Sender<AdminMsg>,
    /// Whether the admin thread is inside a disk write, and since when:
    /// a thread waiting on a slow disk is not hung ([`RelayHandle::alive`]).
    admin_disk: Arc<crate::core::disk_wait::DiskWait>,
    /// The cluster thread (`[cluster]`), stopped after the shards.
    cluster: Option<std::thread::JoinHandle<()>>,
    /// The config the process started with: what a reload cannot change.
    started_with: Config,
    /// The config the last reload applied (at first, the one the process
    /// started with): what the next reload's log names changes against.
    applied: std::sync::Mutex<Config>,
    /// The longest `limits.finalize_wait` the relay has had (at its start
    /// or a reload), in ms: a drain waits that long for its streams'
    /// finalizes, whichever settings each stream started with.
    finalize_wait_ms: std::sync::atomic::AtomicU64,
}

/// Which of the relay's threads did not answer a liveness ping in time
/// ([`RelayHandle::alive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAlive {
    /// The threads that did not answer (`shard N`, `admin`), sorted.
    pub silent: Vec<String>,
}

impl std::fmt::Display for NotAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no answer from {}", self.silent.join(", "))
    }
}

impl std::error::Error for NotAlive {}

/// What a liveness check ([`RelayHandle::alive`]) found when it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Alive {
    /// The admin thread did not answer, but it was inside a disk write
    /// that had taken this long (it answers once the write ends).
    pub admin_on_disk: Option<std::time::Duration>,
}

/// Why a reload ([`RelayHandle::reload`]) did not reach the admin thread;
/// the running configuration is then kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadError {
    /// The admin thread has ended: nothing takes the new config.
    AdminGone,
    /// The admin thread took the new config but ended without answering.
    AdminSilent,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReloadError::AdminGone => "the admin thread is gone",
            ReloadError::AdminSilent => "the admin thread did not answer",
        })
    }
}

impl std::error::Error for ReloadError {}

/// A config problem found while starting (an unusable URL, TLS file...).
fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
}

/// `pool`'s REST API for its accounts' health checks; `None` (logged) if
/// it cannot be derived: the checks are then off for the pool's accounts.
fn rest_target(
    pool: PoolConfig,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> Option<(String, RestTarget)> {
    match RestTarget::new(&pool.url, pool.rest_url.as_deref(), tls.clone()) {
        Ok(r) => Some((pool.name, r)),
        Err(e) => {
            tracing::warn!(pool = %pool.name, error = %e, "no REST URL for the pool's health checks; they are off for its accounts");
            None
        }
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`).
///
/// The allocator (mimalloc) asks for huge pages on its arenas and gives
/// memory back to the kernel 10 ms after it is freed; the next touch of
/// that memory then faults in, and zeroes, a whole 2 MiB page. A relay's
/// memory comes and goes with its streams (read buffers, each stream's
/// resume copy as it grows), so under load it did little else: at 3,000
/// real-time streams 60% of its CPU was the kernel zeroing huge pages
/// (benches/README.md has the profile and the A/B). Off, whether the host
/// has THP on always or on request. `CLIO_RELAY_THP=on` leaves it as the
/// host has it, for that A/B.
fn huge_pages_off() {
    if std::env::var("CLIO_RELAY_THP").as_deref() == Ok("on") {
        return;
    }
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off; under load the kernel may spend much of the relay's CPU zeroing them");
    }
}

/// Starts a relay with `cfg`: one shard per `server.shards` (pinned, shard
/// `i` to the `i`-th of `allowed_cpus`, when there are as many shards as
/// those), then the admin server. Returns once everything listens.
pub fn start(cfg: &Config) -> std::io::Result<RelayHandle> {
    start_with(cfg, crate::cli::systemd::Activated::default())
}

/// The CPUs this process may run on, lowest first: its affinity, as
/// `taskset`, systemd's `CPUAffinity=` or a container's cpuset left it (the
/// calling thread's, which at start is the process's). Shards are pinned to
/// these, not to CPUs `0..n`: a shard pinned to CPU `i` itself would leave
/// the CPUs the operator gave the relay, onto another's. Empty if the
/// kernel does not say (then no shard is pinned).
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    match sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether the host lets a thread pin itself to `cpus`: this thread's
/// affinity is set to them (what it has already, so nothing changes). A
/// seccomp profile without `sched_setaffinity` refuses it, and glommio
/// panics in a pinned executor's blocking-pool thread: the shards then run
/// unpinned, said once.
fn pinning_allowed(cpus: &[usize]) -> bool {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    for &cpu in cpus {
        if set.set(cpu).is_err() {
            return false;
        }
    }
    match sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "shards not pinned: the host refuses sched_setaffinity (a seccomp profile without it); they run on any of the CPUs the relay is given");
            false
        }
    }
}

/// What to add when the key store's directory cannot be made or written
/// for want of a writable file system or of permission: the shipped unit
/// (`ProtectSystem=strict`, a dynamic user) lets the relay write only its
/// `StateDirectory=`, so an `admin.state_dir` elsewhere fails there
/// though it works when the relay is run by hand as root.
fn state_dir_hint(e: &crate::control::keystore::StoreError) -> String {
    use std::io::ErrorKind;
    let crate::control::keystore::StoreError::Io { source, .. } = e else {
        return String::new();
    };
    let why = match source.kind() {
        ErrorKind::ReadOnlyFilesystem => "it is on a read-only file system here".to_string(),
        ErrorKind::PermissionDenied => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            format!("the relay runs as uid {uid}, which may not write there")
        }
        _ => return String::new(),
    };
    // StateDirectory= makes the directory, owned by the dynamic user;
    // ReadWritePaths= would not make it theirs.
    format!(
        " ({why}; under the shipped systemd unit, ProtectSystem=strict and a dynamic user, \
         the relay may write only /var/lib/clio-relay, its StateDirectory=: keep \
         admin.state_dir there, or set StateDirectory= to another directory under /var/lib \
         in `systemctl edit clio-relay` and admin.state_dir to it)"
    )
}

/// A hand-over restart (`--join-client-port`) onto a state directory
/// that holds `usage.json`: the running relay is one from before the
/// usage database, which reads that file at its start and writes all of
/// it again at each persist and as it exits. Imported now (and the file
/// renamed), the file the old relay writes after would be imported at
/// the next start with everything it held before, counted twice. So the
/// hand-over is refused, before anything is read or written, saying
/// what to do instead: a stop, then a start, which imports the file once.
fn handing_over_from_usage_json(state_dir: &std::path::Path) -> std::io::Result<()> {
    let file = state_dir.join(crate::control::usage::store::JSON_FILE);
    if !file.exists() {
        return Ok(());
    }
    Err(std::io::Error::other(super::ConfigFault(format!(
        "{} is there: the relay this one would take over from is of a version before \
         usage.db (it keeps its usage in that file and writes all of it again as it \
         exits), and a hand-over from it would count its usage twice. Upgrade it with \
         a stop and a start instead: stop it first (SIGTERM, and wait for it to exit; \
         under systemd, `systemctl restart clio-relay`), then start this relay without \
         --join-client-port; it takes the file into usage.db once",
        file.display()
    ))))
}

/// Like [`start`], with listening sockets systemd passed (socket activation):
/// the client socket is shared by every shard, the admin socket used as is.
pub fn start_with(
    cfg: &Config,
    sockets: crate::cli::systemd::Activated,
) -> std::io::Result<RelayHandle> {
    start_joining(cfg, sockets, false)
}

/// Like [`start_with`]. With `join_client_port`, the shards bind the client
/// port even when another process listens there with `SO_REUSEPORT` (a
/// running relay, for a hand-over restart: start the new one, then SIGTERM
/// the old one). Without it, a client port already in use is an error that
/// names it. The admin port is never shared. See [`crate::dataplane::listen`].
pub fn start_joining(
    cfg: &Config,
    sockets: crate::cli::systemd::Activated,
    join_client_port: bool,
) -> std::io::Result<RelayHandle> {
    use crate::dataplane::listen::{check_free, in_use};
    huge_pages_off();
    crate::dataplane::uring::check_locked_memory()?;
    crate::dataplane::uring::check_io_uring()?;
    crate::dataplane::uring::check_locked_memory_for(cfg.server.shard_count())?;
    // Before anything starts: a port in use is a second relay by mistake.
    if sockets.client.is_none() && !join_client_port {
        let addr = cfg.server.listen;
        check_free(addr).map_err(|e| in_use(addr, "server.listen", e))?;
    }
    if sockets.admin.is_none() {
        let addr = cfg.server.admin_listen;
        check_free(addr).map_err(|e| in_use(addr, "server.admin_listen", e))?;
    }
    if join_client_port {
        handing_over_from_usage_json(&cfg.admin.state_dir)?;
    }
    let client_fd = sockets.client.map(Arc::new);
    let admin_fd = sockets.admin.map(Arc::new);
    let epoch = Instant::now();
    // Config-file keys are dated from when this state directory first saw
    // them, so their age (and the rotation warning) survives restarts.
    let now = crate::control::accounts::unix_now();
    let key_dates =
        crate::control::keystore::KeyDates::record(&cfg.admin.state_dir, &cfg.accounts, now);
    let pool_names = cfg.pool_names();
    let dated = |mut merged: Vec<crate::control::keystore::MergedAccount>| {
        for m in &mut merged {
            if m.source == crate::control::keystore::Source::Config {
                m.key_age_secs = key_dates.get(&m.id).map(|at| now.saturating_sub(*at));
            }
        }
        Accounts::from_merged(&merged, &pool_names, epoch)
    };
    // With a master key, runtime changes live in the encrypted key store and
    // merge with the config file's accounts; without one, only the file.
    let (accounts, store) = match &cfg.admin.master_key {
        None => (
            dated(crate::control::keystore::merge(
                &cfg.accounts,
                &crate::control::keystore::StoreData::default(),
                now,
            )),
            None,
        ),
        Some(k) => {
            let store_err = |e: crate::control::keystore::StoreError| {
                use crate::control::keystore::StoreError;
                let what = format!(
                    "key store in {}: {e}{}",
                    cfg.admin.state_dir.display(),
                    state_dir_hint(&e)
                );
                match e {
                    // The file's doing, not the machine's: retrying cannot help.
                    StoreError::WrongMasterKey | StoreError::BadMasterKey(_) => {
                        std::io::Error::other(super::ConfigFault(what))
                    }
                    // A damaged store stays damaged until someone acts: a
                    // restart loop would only fill the journal.
                    StoreError::Corrupt(_) => std::io::Error::other(super::ConfigFault(format!(
                        "{what}; restore it from a backup, or move it aside to start with the \
                         config file's accounts alone (the accounts and keys changed at \
                         runtime are then gone)"
                    ))),
                    _ => std::io::Error::other(what),
                }
            };
            let master =
                crate::control::keystore::MasterKey::from_hex(k.expose()).map_err(store_err)?;
            let store = crate::control::keystore::KeyStore::open(&cfg.admin.state_dir, master)
                .map_err(store_err)?;
            let data = store.load().map_err(store_err)?;
            let merged = crate::control::keystore::merge(&cfg.accounts, &data, now);
            tracing::info!(dir = %cfg.admin.state_dir.display(), generation = data.generation, runtime_accounts = data.accounts.len(), "key store loaded");
            (dated(merged), Some((store, data.generation)))
        }
    };
    let process = ProcessState::new(
        cfg.server.max_streams,
        accounts.ring(),
        accounts.metrics_ids(),
    );
    process.pools.set_caps(&cfg.devices);
    process.resume_copies.set_limit(cfg.failover.resume_memory);
    // One TLS client config for the WebSocket upstream and its REST API.
    let tls = Some(
        crate::dataplane::upstream::tls_client_config(cfg.upstream.ca_file.as_deref())
            .map_err(invalid)?,
    );
    // Each pool's REST API, for its accounts' health checks and usage logs.
    let rests: Vec<_> = cfg
        .all_pools()
        .into_iter()
        .filter_map(|p| rest_target(p, &tls))
        .collect();
    // Another running relay with this node id (a copied config file):
    // refused before this one counts or sends anything under it. Not in a
    // hand-over (`join_client_port`): the running relay with this config
    // is the node this process takes over from.
    if let (Some(c), false) = (&cfg.cluster, join_client_port) {
        // A long `lease_ttl` makes a long watch: past the unit's start
        // timeout, systemd would kill the start it is waiting for.
        let more_time = |watch: Duration| {
            crate::cli::systemd::Notifier::from_env()
                .extend_timeout(watch + Duration::from_secs(10))
        };
        if let Err(why) = crate::core::cluster::check_node_id(c, more_time)? {
            return Err(std::io::Error::other(super::ConfigFault(why)));
        }
    }
    // The fleet handle is in place before any shard takes a stream; its
    // thread starts once the shards exist (it sends them "end" requests).
    let fleet = cfg.cluster.as_ref().map(|c| {
        let (fleet, rx) = crate::core::cluster::channel(c);
        let _ = process.fleet.set(fleet.clone());
        (c, fleet, rx)
    });
    // The account set other nodes store, from the cluster thread to the admin thread.
    let (accounts_tx, accounts_rx) = match fleet {
        Some(_) => {
            let (tx, rx) = async_channel::bounded(16);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let n = cfg.server.shard_count();
    crate::dataplane::accept::check_file_limit(cfg.server.max_streams, n);
    let cpus = allowed_cpus();
    process.devices.set_daily_audio(cfg.devices.daily_audio());
    // Alone, with a daily allowance: each device's day so far, from the
    // usage ledger, before any stream (in a fleet, Redis has it).
    if cfg.cluster.is_none() && cfg.devices.daily_audio() {
        let day = crate::core::devices::utc_day(std::time::SystemTime::now());
        match crate::control::usage::store::device_audio_on(&cfg.admin.state_dir, day) {
            Ok(rows) => {
                for (device, ms) in &rows {
                    process.devices.seed_daily_audio(device, day, *ms);
                }
                if !rows.is_empty() {
                    tracing::info!(
                        devices = rows.len(),
                        "daily audio so far read from the usage ledger"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "daily audio so far not read from the usage ledger; each device's day counts from now")
            }
        }
    }
    process
        .devices
        .set_token_lifetime(cfg.tokens.max_ttl, cfg.tokens.clock_skew);
    // Alone, the revocations the state directory kept, before any stream
    // (in a fleet, they come from Redis).
    if cfg.cluster.is_none() {
        let n = crate::control::admin::load_revocations(&cfg.admin.state_dir, &process.devices)?;
        if n > 0 {
            tracing::info!(dir = %cfg.admin.state_dir.display(), revoked = n, "revocations loaded");
        }
    }
    let mut setup = ShardSetup {
        listen: cfg.server.listen,
        cpu: None,
        limits: cfg.limits.clone(),
        failover: cfg.failover.clone(),
        key_in_header: cfg.upstream.auth == AuthMode::Header,
        connect_timeout: cfg.upstream.connect_timeout,
        pools: cfg.all_pools(),
        upstream_tls: tls.clone(),
        tokens: Arc::new(TokenKeys::from_config(&cfg.tokens)),
        process: process.clone(),
        devices: Arc::new(cfg.devices.clone()),
        listen_fd: client_fd,
        allow: Arc::new(cfg.server.allow.clone()),
        proxy_protocol_from: Arc::new(cfg.server.proxy_protocol_from.clone()),
        client_tls: match cfg.tls.as_ref().map(crate::core::tls::load).transpose() {
            Ok(t) => t.map(|t| {
                process.set_tls_not_after(t.not_after);
                t.config
            }),
            Err(e) => return Err(invalid(e)),
        },
    };
    // Pinned only when the shards fill the CPUs the relay is given: with
    // fewer (a CPU quota without a cpuset, `docker --cpus`, a pod's CPU
    // limit, makes `shards = 0` count fewer), pinning them to the lowest
    // would crowd every such relay on a host onto its first CPUs.
    let pin = n == cpus.len() && pinning_allowed(&cpus);
    let mut shards: Vec<ShardHandle> = Vec::with_capacity(n);
    for i in 0..n {
        setup.cpu = cpus.get(i).copied().filter(|_| pin);
        let handle = shard::start(i, setup.clone()).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => in_use(setup.listen, "server.listen", e),
            _ => e,
        })?;
        // Port 0 picks a port for the first shard; the others join it.
        setup.listen = handle.addr;
        shards.push(handle);
    }
    let (admin_tx, admin_rx) = async_channel::unbounded();
    let admin_disk = crate::core::disk_wait::DiskWait::new();
    let admin = admin::start(AdminSetup {
        listen: cfg.server.admin_listen,
        shards: shards.iter().map(|s| s.tx.clone()).collect(),
        process: process.clone(),
        accounts,
        config: cfg.admin.clone(),
        inbox: admin_rx,
        rests,
        usage: cfg.usage.clone(),
        account_configs: cfg.accounts.clone(),
        tls: tls.clone(),
        store,
        listen_fd: admin_fd,
        fleet_accounts: accounts_rx,
        pools: cfg.all_pools(),
        disk: admin_disk.clone(),
    })
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => in_use(cfg.server.admin_listen, "server.admin_listen", e),
        _ => e,
    })?;
    let cluster = match fleet {
        None => None,
        Some((c, fleet, rx)) => Some(crate::core::cluster::start(
            c,
            fleet,
            rx,
            crate::core::cluster::Links {
                process: process.clone(),
                shards: shards.iter().map(|s| s.tx.clone()).collect(),
                accounts: accounts_tx,
            },
        )?),
    };
    crate::dataplane::accept::say_file_limit(cfg.server.max_streams, n, cfg.cluster.is_some());
    tracing::info!(client = %shards[0].addr, admin = %admin.addr, shards = n, accounts = process.accounts().len(), "clio-relay listening");
    Ok(RelayHandle {
        client_addr: shards[0].addr,
        admin_addr: admin.addr,
        process,
        shards,
        admin: Some(admin),
        admin_tx,
        admin_disk,
        cluster,
        started_with: cfg.clone(),
        applied: std::sync::Mutex::new(cfg.clone()),
        finalize_wait_ms: std::sync::atomic::AtomicU64::new(
            cfg.limits.finalize_wait.as_millis() as u64
        ),
    })
}

impl RelayHandle {
    /// What the running account set's limits say about
    /// `server.max_streams` (see [`crate::core::config::account_warnings`]):
    /// the config file's accounts with the key store's or the fleet's
    /// changes, as `check-config`, which reads only the file, cannot count
    /// them.
    ///
    /// `max_streams` is the one the relay started with (a change takes a
    /// restart); whether the operator set it is the last reload's file's
    /// say when that file has the same value (a `max_streams = 9000` added
    /// to a file that had none is warned of at that reload, as
    /// `check-config` warns of it).
    pub fn account_warnings(&self) -> Vec<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let running = &self.started_with.server;
        let set = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if applied.server.max_streams == running.max_streams {
                applied.server.max_streams_set
            } else {
                running.max_streams_set
            }
        };
        crate::core::config::account_warnings(
            set.then_some(running.max_streams),
            self.process
                .accounts()
                .iter()
                .map(|a| (a.enabled.load(Relaxed), a.max_concurrent.load(Relaxed))),
            // Without a key store or a fleet, the running set is the file's
            // (and what the admin API changed since): nothing to explain.
            if self.started_with.admin.master_key.is_some() || self.started_with.cluster.is_some() {
                crate::core::config::AccountsCounted::Running
            } else {
                crate::core::config::AccountsCounted::File
            },
        )
    }

    /// Every shard's metrics, merged (blocking; for tests and the demo).
    pub fn metrics(&self) -> MetricsSnapshot {
        let txs: Vec<_> = self.shards.iter().map(|s| s.tx.clone()).collect();
        let snaps = futures_lite::future::block_on(admin::collect(&txs));
        let mut merged = MetricsSnapshot::empty(0);
        for s in &snaps {
            merged.merge(s);
        }
        merged
    }

    /// Applies a re-read config (what SIGHUP does): accounts, limits, token
    /// secrets and admin settings change live, nothing in flight is dropped.
    /// Settings that need a restart (listen addresses, shards, upstream,
    /// pools, the REST base, the state directory, the master key, the
    /// cluster) are reported and kept. Returns one line per change; those
    /// of settings kept start with `unchanged: `. A client-port certificate
    /// that no longer loads refuses the whole reload: the one line then
    /// starts with `refused: `, and nothing was applied.
    pub fn reload(&self, cfg: &Config) -> Result<Vec<String>, ReloadError> {
        let old = &self.started_with;
        let mut kept = Vec::new();
        // The key store and the usage ledger stay where they were opened,
        // under the key they were opened with.
        let mut cfg = cfg.clone();
        if cfg.admin.state_dir != old.admin.state_dir {
            kept.push("admin.state_dir (restart to change)".to_string());
            cfg.admin.state_dir.clone_from(&old.admin.state_dir);
        }
        if cfg.admin.master_key != old.admin.master_key {
            kept.push("admin.master_key (restart to change)".to_string());
            cfg.admin.master_key.clone_from(&old.admin.master_key);
        }
        // Health checks and usage reconciliation were set up with it.
        if cfg.admin.rest_url != old.admin.rest_url {
            kept.push("admin.rest_url (restart to change)".to_string());
            cfg.admin.rest_url.clone_from(&old.admin.rest_url);
        }
        if cfg.cluster != old.cluster {
            kept.push("[cluster] (restart to change)".to_string());
        }
        if cfg.server.listen != old.server.listen
            || cfg.server.admin_listen != old.server.admin_listen
        {
            kept.push("server.listen/admin_listen (restart to change)".to_string());
        }
        if cfg.server.shards != old.server.shards
            || cfg.server.max_streams != old.server.max_streams
        {
            kept.push("server.shards/max_streams (restart to change)".to_string());
        }
        if cfg.upstream != old.upstream {
            kept.push("[upstream] (restart to change)".to_string());
        }
        if cfg.pools != old.pools {
            kept.push(
                "[pool.NAME] (restart to change; accounts of a pool this relay does not have are not added)"
                    .to_string(),
            );
        }
        let finalize_ms = cfg.limits.finalize_wait.as_millis() as u64;
        let (tx, rx) = async_channel::bounded(1);
        self.admin_tx
            .try_send(AdminMsg::Reload(Box::new(cfg.clone()), tx))
            .map_err(|_| ReloadError::AdminGone)?;
        let mut log = rx.recv_blocking().map_err(|_| ReloadError::AdminSilent)?;
        if log.first().is_some_and(|l| l.starts_with("refused: ")) {
            return Ok(log);
        }
        {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            let changed = cfg.live_changes_from(&applied);
            if applied.tls.is_some() && cfg.tls.is_none() {
                // Every wss:// client of this port fails from now on:
                // said, not only implied by a missing certificate line.
                log.push(
                    "client-port TLS off ([tls] removed): new connections are served plain ws://"
                        .to_string(),
                );
            }
            if !changed.is_empty() {
                log.push(format!("changed: {}", changed.join(", ")));
            }
            *applied = cfg;
        }
        self.finalize_wait_ms
            .fetch_max(finalize_ms, std::sync::atomic::Ordering::Relaxed);
        // The admin thread has sent the shards their new settings; a shard
        // handles messages in order, so once each answers a ping the reload
        // is in force for every new stream (a shard reads control messages
        // once per data-plane pass, a few milliseconds).
        let _ = self.alive(std::time::Duration::from_secs(2));
        log.extend(kept.into_iter().map(|k| format!("unchanged: {k}")));
        Ok(log)
    }

    /// Graceful stop (SIGTERM): stop accepting (`/healthz` 503, listeners
    /// closed so a new process takes new connections), let begun streams
    /// (their config message came) finish for up to `deadline`, then
    /// finalize the rest: upstream is asked for its final tokens, the
    /// client gets them, then Soniox's 503 "reconnect" and close 1012.
    /// Connections without a begun stream do not hold it: once the begun
    /// streams end (or the deadline passes), each is told to reconnect
    /// (HTTP 503 before the upgrade, 503 and close 1012 after it).
    /// Returns the streams that had to be cut (or, after
    /// [`ProcessState::stop_now`], that were live then: the drain returns
    /// at once, finalizing none).
    pub fn drain(&self, deadline: std::time::Duration) -> u32 {
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::StopAccepting);
        }
        // Each shard handles its messages in order, so once every shard
        // answers a ping its listener is closed: `/healthz` turns 503. A
        // connection a shard accepted until then is served, not refused,
        // while begun streams run (a shard sees control messages within
        // one data-plane pass, a few milliseconds); one that begins its
        // stream meanwhile is waited for too.
        let _ = self.alive(std::time::Duration::from_secs(2));
        self.process.set_draining(true);
        self.process.wait_begun_ended(Instant::now() + deadline);
        if self.process.stopping_now() {
            // SIGINT: the stop cuts what is live, as SIGINT alone does.
            return self.process.begun_streams();
        }
        // From here a stream that would start is refused, one that
        // registers is stopped as it does (the streams' own check), and a
        // connection still without a stream is answered
        // (`Shard::drain_ended`).
        self.process.set_finalizing(true);
        let cut = self.process.begun_streams();
        if cut > 0 {
            tracing::info!(
                streams = cut,
                "drain deadline: finalizing the streams still live"
            );
        }
        // Sent even with none live: a stream admitted just before the flag
        // may register after the count, and it wakes the connections
        // without a stream.
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::Drain);
        }
        // Each stream: its finalize written (1 s), upstream's answer
        // (`limits.finalize_wait`), its last frames and close (4 s); each
        // connection without a stream, its answer (1 s).
        let finalize = std::time::Duration::from_millis(
            self.finalize_wait_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        self.process
            .wait_all_closed(Instant::now() + finalize + std::time::Duration::from_secs(5));
        cut
    }

    /// Whether every shard and the admin thread answer a ping within
    /// `limit` (the systemd watchdog's liveness check). It waits on the
    /// calling thread, with a deadline: no thread is started, so a hung
    /// executor leaves nothing behind but its missing answer.
    ///
    /// An admin thread that does not answer because it is inside a disk
    /// write (an fsync of the state directory on a slow disk) is alive:
    /// the write ends when the disk answers, and a restart would cut every
    /// stream and meet the same disk. [`Alive::admin_on_disk`] says so.
    pub fn alive(&self, limit: std::time::Duration) -> Result<Alive, NotAlive> {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let mut waiting = std::collections::BTreeSet::new();
        for (i, s) in self.shards.iter().enumerate() {
            waiting.insert(format!("shard {i}"));
            let _ = s.tx.try_send(ShardMsg::Ping(tx.clone()));
        }
        waiting.insert("admin".to_string());
        let _ = self.admin_tx.try_send(AdminMsg::Ping(tx));
        let deadline = Instant::now() + limit;
        while !waiting.is_empty() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(name) => {
                    waiting.remove(&name);
                }
                // Timed out, or every thread still waited for is gone.
                Err(_) => break,
            }
        }
        let mut alive = Alive::default();
        if waiting.contains("admin") && self.admin.is_some() {
            alive.admin_on_disk = self.admin_disk.waiting();
            if alive.admin_on_disk.is_some() {
                waiting.remove("admin");
            }
        }
        if waiting.is_empty() {
            Ok(alive)
        } else {
            Err(NotAlive {
                silent: waiting.into_iter().collect(),
            })
        }
    }

    /// Stops the admin thread alone, as if it had died: what the watchdog
    /// must notice. For tests.
    #[doc(hidden)]
    pub fn stop_admin_thread(&mut self) {
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }

    /// Per-shard metrics (blocking).
    pub fn shard_metrics(&self) -> Vec<MetricsSnapshot> {
        let txs: Vec<_> = self.shards.iter().map(|s| s.tx.clone()).collect();
        futures_lite::future::block_on(admin::collect(&txs))
    }

    /// Stops accepting, ends every shard and the admin server, and waits.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.end_live_streams();
        self.end_waiting_connections();
        // The streams have ended (drained, or ended just now); their usage
        // records are still in the shards: into the ledger (and the
        // fleet's) first.
        if self.admin.is_some() {
            let (tx, rx) = std::sync::mpsc::channel();
            if self.admin_tx.try_send(AdminMsg::Flush(tx)).is_ok() {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
            }
        }
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::Stop);
        }
        for s in self.shards.drain(..) {
            let _ = s.join.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        // After the shards: their streams' ends are queued before the stop,
        // and the node leaves the fleet with nothing held.
        if let Some(c) = self.cluster.take() {
            if let Some(f) = self.process.fleet.get() {
                f.stop();
            }
            let _ = c.join();
        }
    }
}

impl RelayHandle {
    /// Every stop's wait for the client connections still open. A stop
    /// that told the shards nothing (no drain before it, no stream live:
    /// SIGINT on an idle relay, a relay embedded and shut down) closes the
    /// listeners first and answers each connection still without a stream
    /// (in its TLS handshake, before its request head or its first
    /// message) as at a drain's end (`Shard::drain_ended`: a TLS handshake
    /// closed, HTTP 503 "reconnect"). After a drain, or a stop that ended
    /// live streams (which closed the listeners and answered those
    /// connections too), it only waits. Either way the stop waits up to
    /// [`STOP_ANSWER_WAIT`] for them to close. A shard that stops leaves
    /// the tasks it still has on its executor: their sockets, registered
    /// with the shard's ring, stayed open until the process exited, and
    /// so did the client listener (whose ring went with them), taking
    /// connections nobody answered. A stop that ended live streams waited
    /// only for their usage records, so a connection it let in meanwhile,
    /// or a stream's connection whose last write (a TLS close_notify,
    /// after the record) waited, was left so.
    fn end_waiting_connections(&self) {
        if !self.process.finalizing() {
            if self.process.open_connections() == 0 {
                return;
            }
            for s in &self.shards {
                let _ = s.tx.try_send(ShardMsg::StopAccepting);
            }
            self.process.set_finalizing(true);
            for s in &self.shards {
                let _ = s.tx.try_send(ShardMsg::Drain);
            }
        }
        // A drain, or a stop that ended live streams, told the shards
        // already. Either way every listener is closed once each shard
        // has answered a ping after its `StopAccepting` (its accept loop
        // looks at that first), and every connection it accepted is
        // counted from its accept: none is left out of this wait.
        self.shards_answer(std::time::Duration::from_secs(2));
        let t0 = Instant::now();
        if !self.process.wait_connections_closed(t0 + STOP_ANSWER_WAIT) {
            tracing::warn!(
                open = self.process.open_connections(),
                waited = ?t0.elapsed(),
                "stop: connections without a stream still open after the wait"
            );
        }
    }

    /// Waits up to `limit` for every shard to answer a ping: each has
    /// handled the messages sent before it.
    fn shards_answer(&self, limit: std::time::Duration) {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::Ping(tx.clone()));
        }
        drop(tx);
        let deadline = Instant::now() + limit;
        for _ in &self.shards {
            if rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                return;
            }
        }
    }

    /// Ends the streams still live (SIGINT, during a drain too; a drain
    /// whose wait gave up on some) through their own ends, so their usage
    /// is recorded as any stream's end records it, and waits up to
    /// [`STOP_CUT_WAIT`](crate::core::config::STOP_CUT_WAIT) for the
    /// records. Each stream is told as a drain tells it
    /// (`ShardMsg::Drain`), and with [`ProcessState::stop_now`] it skips
    /// the finalize: the client gets Soniox's 503 "reconnect" and close
    /// 1012, upstream its close. One opening upstream or waiting for a
    /// finalize gives up on it ([`Shard::stopping_now`](crate::dataplane::shard::Shard::stopping_now)).
    /// With nothing live (a drain that ended every stream, a relay
    /// without streams) nothing is waited for.
    fn end_live_streams(&self) {
        let live = self.process.unrecorded_streams();
        if live == 0 {
            // Nothing to record: the stop goes on as it always did (a
            // stream that registers from here has not reached upstream).
            // Told nothing, the shards take no extra pass to stop.
            return;
        }
        self.process.stop_now();
        // No new connection, as at a drain's start (the listeners close);
        // new streams are refused, and connections still without one are
        // answered as in a drain.
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::StopAccepting);
        }
        self.process.set_finalizing(true);
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::Drain);
        }
        let t0 = Instant::now();
        let recorded = self
            .process
            .wait_all_recorded(t0 + crate::core::config::STOP_CUT_WAIT);
        let left = self.process.unrecorded_streams();
        if recorded {
            tracing::info!(streams = live, waited = ?t0.elapsed(), "stop: the live streams ended, their usage recorded");
        } else {
            tracing::warn!(streams = live, unrecorded = left, waited = ?t0.elapsed(), "stop: streams still live after the wait; their usage is lost");
        }
    }
}

/// How long a stop waits for the connections without a stream it answers
/// (see `RelayHandle::end_waiting_connections`): a TLS handshake closes at
/// once, an HTTP answer's write and FIN take at most 1 s each.
const STOP_ANSWER_WAIT: Duration = Duration::from_secs(2);

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}
