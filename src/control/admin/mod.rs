//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/v1/config`, and,
//! behind the admin token, the account API (`/admin/…`).
//!
//! Runs on its own executor thread, off the streaming path. It owns the
//! control plane's account set; shards learn of changes only by message
//! ([`ShardMsg::Ring`]), and answer metrics requests ([`ShardMsg::Snapshot`])
//! that a scrape merges.

mod alerts;
mod api;
mod meter;
pub mod pools;
mod remote;
mod routes;

pub use remote::remote_config;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::control::accounts::Accounts;
use crate::control::health::{self, CheckCounts, RestTarget};
use crate::control::usage::UsageBook;
use crate::core::config::UsageConfig;
use crate::core::config::{AdminConfig, Config};
use crate::core::metrics::MetricsSnapshot;
use crate::core::secret::Secret;
use crate::core::token::TokenKeys;
use crate::dataplane::accept::Spare;
use crate::dataplane::http;
use crate::dataplane::io::{timeout, Buf, BufferPool, Conn, Duplex};
use crate::dataplane::shard::Settings;
use crate::dataplane::shard::{ProcessState, ShardMsg, IO_MEMORY};
use crate::dataplane::upstream::{UpstreamFault, UpstreamTarget};
use futures_lite::future::or;
use std::collections::HashMap;

/// Descriptors the admin thread holds in reserve for its own port.
const ADMIN_SPARE_FDS: usize = 4;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// What the admin server needs.
#[derive(Debug)]
pub struct AdminSetup {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Control channels of every shard.
    pub shards: Vec<async_channel::Sender<ShardMsg>>,
    /// Process-wide state (accounts, draining, stream count).
    pub process: Arc<ProcessState>,
    /// The authoritative account set; the admin thread owns it from here on.
    pub accounts: Accounts,
    /// Token, allowlist, rotation settings.
    pub config: AdminConfig,
    /// Messages from the main thread (reloads).
    pub inbox: async_channel::Receiver<AdminMsg>,
    /// Each pool's upstream REST API, by pool name, for active health
    /// checks and reconciliation (a pool whose REST URL is unusable is absent).
    pub rests: Vec<(String, RestTarget)>,
    /// Usage, cost and alert settings.
    pub usage: UsageConfig,
    /// The config file's accounts (for prices and budgets).
    pub account_configs: Vec<crate::core::config::AccountConfig>,
    /// TLS client config for https webhooks.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// A listening socket passed by systemd, used instead of binding.
    pub listen_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// The encrypted key store and the generation last loaded, if any.
    pub store: Option<(crate::control::keystore::KeyStore, u64)>,
    /// In a fleet: the account set other nodes stored (sealed), from the
    /// cluster thread.
    pub fleet_accounts: Option<async_channel::Receiver<Vec<u8>>>,
    /// Every pool and its endpoints (the default pool's is `upstream.url`):
    /// the health checks probe each WebSocket endpoint, `/v1/config` and
    /// the metrics list them.
    pub pools: Vec<crate::core::config::PoolConfig>,
}

fn prices(accounts: &[crate::core::config::AccountConfig]) -> HashMap<String, meter::Price> {
    accounts
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                meter::Price {
                    per_hour: a.price_per_hour,
                    monthly_budget: a.monthly_budget,
                },
            )
        })
        .collect()
}

/// The admin thread's state.
struct Admin {
    shards: Vec<async_channel::Sender<ShardMsg>>,
    process: Arc<ProcessState>,
    accounts: RefCell<Accounts>,
    config: RefCell<AdminConfig>,
    /// HMAC key and tag of the admin token, so a presented token is compared
    /// in constant time (ring's `hmac::verify`).
    token_check: RefCell<Option<(ring::hmac::Key, ring::hmac::Tag)>>,
    /// Each pool's upstream REST API (health checks, reconciliation).
    rests: Vec<(String, RestTarget)>,
    /// Every pool and its endpoints, the default pool first.
    pools: Vec<crate::core::config::PoolConfig>,
    /// Health check outcomes so far.
    checks: CheckCounts,
    /// The usage ledger.
    usage: RefCell<UsageBook>,
    /// Currency, persistence and alert settings.
    usage_cfg: RefCell<UsageConfig>,
    /// Price and budget per account id.
    prices: RefCell<HashMap<String, meter::Price>>,
    /// In-process alert state.
    alerts: RefCell<alerts::AlertState>,
    /// The key store, where account changes are saved (none without a master key).
    store: Option<crate::control::keystore::KeyStore>,
    /// The store generation last written or read.
    store_generation: std::cell::Cell<u64>,
    /// The config file's accounts (the base the store's changes apply to).
    account_configs: RefCell<Vec<crate::core::config::AccountConfig>>,
    /// Last usage reconciliation per account.
    reconciliation: RefCell<std::collections::BTreeMap<String, meter::Reconciliation>>,
    /// TLS client config (https webhooks and REST).
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Messages from the main thread to the admin thread.
#[derive(Debug)]
pub enum AdminMsg {
    /// Apply a re-read config file; the reply lists what changed.
    Reload(Box<Config>, async_channel::Sender<Vec<String>>),
    /// Answer (with "admin"), to show the admin thread's event loop turns:
    /// the watchdog's liveness check.
    Ping(std::sync::mpsc::Sender<String>),
}

fn token_check(token: Option<&Secret>) -> Option<(ring::hmac::Key, ring::hmac::Tag)> {
    token.map(|t| {
        let mut salt = [0u8; 32];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt);
        let tag = ring::hmac::sign(&key, t.expose().as_bytes());
        (key, tag)
    })
}

impl Admin {
    /// The admin thread's state from its setup; the usage ledger is read
    /// from the state dir (in memory only if it cannot be).
    fn new(setup: AdminSetup) -> Admin {
        let book = UsageBook::load(&setup.config.state_dir).unwrap_or_else(|e| {
            tracing::error!(dir = %setup.config.state_dir.display(), error = %e, "usage ledger not opened; counting in memory and trying again at each persist");
            UsageBook::default()
        });
        Admin {
            shards: setup.shards,
            process: setup.process,
            accounts: RefCell::new(setup.accounts),
            token_check: RefCell::new(token_check(setup.config.token.as_ref())),
            config: RefCell::new(setup.config),
            rests: setup.rests,
            pools: setup.pools,
            checks: CheckCounts::default(),
            usage: RefCell::new(book),
            prices: RefCell::new(prices(&setup.account_configs)),
            usage_cfg: RefCell::new(setup.usage),
            alerts: RefCell::new(alerts::AlertState::default()),
            reconciliation: RefCell::new(Default::default()),
            store_generation: std::cell::Cell::new(setup.store.as_ref().map_or(0, |(_, g)| *g)),
            store: setup.store.map(|(s, _)| s),
            account_configs: RefCell::new(setup.account_configs),
            tls: setup.tls,
        }
    }

    /// The REST API of `pool`'s upstream.
    fn rest_for(&self, pool: &str) -> Option<&RestTarget> {
        self.rests
            .iter()
            .find_map(|(name, r)| (name == pool).then_some(r))
    }

    /// Saves the account set to the key store (if there is one).
    fn persist(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut data = self
            .accounts
            .borrow()
            .to_store(&self.account_configs.borrow(), self.store_generation.get());
        store.save(&mut data).map_err(|e| e.to_string())?;
        self.store_generation.set(data.generation);
        Ok(())
    }

    /// In a fleet: stores the account set, sealed under the master key, for
    /// every node to apply.
    async fn share_accounts(&self) -> Result<(), String> {
        let (Some(fleet), Some(store)) = (self.process.fleet.get(), &self.store) else {
            return Ok(());
        };
        let data = self
            .accounts
            .borrow()
            .to_store(&self.account_configs.borrow(), self.store_generation.get());
        let sealed = store.seal_data(&data).map_err(|e| e.to_string())?;
        fleet.publish_accounts(sealed).await
    }

    /// Applies the account set another node of the fleet stored.
    fn apply_fleet_accounts(&self, sealed: &[u8]) {
        let Some(store) = &self.store else {
            return;
        };
        let data = match store.open_data(sealed) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "the fleet's account set cannot be opened here (is admin.master_key the same on every node?)");
                return;
            }
        };
        let now = crate::control::accounts::unix_now();
        let merged = crate::control::keystore::merge(&self.account_configs.borrow(), &data, now);
        let overlap = self.config.borrow().rotation_overlap;
        let log = self
            .accounts
            .borrow_mut()
            .apply_merged(&merged, overlap, now);
        if log.is_empty() {
            return;
        }
        self.publish();
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "fleet account change applied but not saved to the key store");
        }
        for change in log {
            tracing::info!(change = %change, "account change from the fleet");
        }
    }

    /// Sends the current ring version to every shard.
    fn publish(&self) {
        let accounts = self.accounts.borrow();
        // With active checks a 401/402 holds an account off until a check
        // passes; without them, for a minute.
        let checks_on = !self.rests.is_empty() && !self.config.borrow().health_interval.is_zero();
        let holdoff = if checks_on {
            Duration::from_secs(3600)
        } else {
            crate::core::keyring::UNHEALTHY_HOLDOFF
        };
        for e in accounts.entries() {
            e.state.set_unhealthy_holdoff(holdoff);
        }
        let (ring, ids) = (accounts.ring(), accounts.metrics_ids());
        self.process.publish(ring.clone(), ids.clone());
        for tx in &self.shards {
            let _ = tx.try_send(ShardMsg::Ring(ring.clone(), ids.clone()));
        }
    }

    /// Applies a reloaded config: accounts, stream limits, token keys, and
    /// the admin settings. Listen addresses, shards and upstream need a restart.
    fn reload(&self, cfg: &Config) -> Vec<String> {
        let overlap = cfg.admin.rotation_overlap;
        let now = crate::control::accounts::unix_now();
        // Keys new to the file are dated now, here and after restarts.
        crate::control::keystore::KeyDates::record(
            &self.config.borrow().state_dir,
            &cfg.accounts,
            now,
        );
        let mut log = self
            .accounts
            .borrow_mut()
            .apply_config(&cfg.accounts, overlap, now);
        self.publish();
        let settings = Settings {
            limits: cfg.limits.clone(),
            failover: cfg.failover.clone(),
            tokens: Arc::new(TokenKeys::from_config(&cfg.tokens)),
            devices: Arc::new(cfg.devices.clone()),
            allow: Arc::new(cfg.server.allow.clone()),
            tls: match cfg
                .tls
                .as_ref()
                .map(crate::core::tls::server_config)
                .transpose()
            {
                Ok(t) => t,
                Err(e) => {
                    log.push(format!("TLS certificate not reloaded: {e}"));
                    return log;
                }
            },
        };
        self.process.pools.set_caps(&cfg.devices);
        for tx in &self.shards {
            let _ = tx.try_send(ShardMsg::Settings(settings.clone()));
        }
        log.push(format!(
            "limits and token keys applied (signing key id {})",
            settings.tokens.current_kid()
        ));
        *self.token_check.borrow_mut() = token_check(cfg.admin.token.as_ref());
        *self.prices.borrow_mut() = prices(&cfg.accounts);
        *self.account_configs.borrow_mut() = cfg.accounts.clone();
        if let Err(e) = self.persist() {
            log.push(format!("key store not updated: {e}"));
        }
        *self.usage_cfg.borrow_mut() = cfg.usage.clone();
        *self.config.borrow_mut() = cfg.admin.clone();
        log
    }

    fn authorized(&self, req: &Request<'_>) -> bool {
        let check = self.token_check.borrow();
        let Some((key, tag)) = &*check else {
            return false;
        };
        let presented = req
            .header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        presented.is_some_and(|t| ring::hmac::verify(key, t.as_bytes(), tag.as_ref()).is_ok())
    }

    fn allowed(&self, peer: impl FnOnce() -> Option<SocketAddr>) -> bool {
        crate::dataplane::io::allowed(&self.config.borrow().allow, peer)
    }
}

/// A parsed admin request.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: async_channel::Sender<()>,
    join: Option<glommio::ExecutorJoinHandle<()>>,
}

impl AdminHandle {
    /// Stops the admin server and waits for its thread.
    pub fn stop(mut self) {
        self.stop.close();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Sends every shard the message `ask` makes around a reply channel and
/// returns the answers, in shard order; a shard that is gone is left out.
pub async fn ask<T>(
    shards: &[async_channel::Sender<ShardMsg>],
    ask: impl Fn(async_channel::Sender<T>) -> ShardMsg,
) -> Vec<T> {
    let mut out = Vec::with_capacity(shards.len());
    for tx in shards {
        let (rtx, rrx) = async_channel::bounded(1);
        if tx.send(ask(rtx)).await.is_ok() {
            if let Ok(answer) = rrx.recv().await {
                out.push(answer);
            }
        }
    }
    out
}

/// Asks every shard for its metrics and returns the snapshots, in shard order.
pub async fn collect(shards: &[async_channel::Sender<ShardMsg>]) -> Vec<MetricsSnapshot> {
    ask(shards, ShardMsg::Snapshot).await
}

/// Starts the admin server on its own thread; returns once it listens.
pub fn start(setup: AdminSetup) -> std::io::Result<AdminHandle> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let join = LocalExecutorBuilder::new(Placement::Unbound)
        .name("clio-admin")
        .io_memory(IO_MEMORY)
        .spawn(move || run(setup, ready_tx, stop_rx))?;
    let addr = ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("admin thread ended before listening"))??;
    Ok(AdminHandle {
        addr,
        stop: stop_tx,
        join: Some(join),
    })
}

/// The admin thread: listens (and says so on `ready`), then runs its tasks
/// until `stop` closes.
async fn run(
    setup: AdminSetup,
    ready: std::sync::mpsc::Sender<std::io::Result<SocketAddr>>,
    stop: async_channel::Receiver<()>,
) {
    let listener =
        match crate::dataplane::io::listener(setup.listen_fd.as_deref(), setup.listen, false) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
    let _ = ready.send(listener.local_addr().map_err(Into::into));
    let ws_targets: Vec<_> = setup
        .pools
        .iter()
        .filter_map(|p| UpstreamTarget::new(&p.url, setup.tls.clone()).ok())
        .collect();
    let inbox = setup.inbox.clone();
    let fleet_accounts = setup.fleet_accounts.clone();
    let admin = Rc::new(Admin::new(setup));
    admin.publish();
    // Descriptors in reserve: at the file limit, one is given up so
    // the admin port still answers while the client port is full.
    let spare = Spare::new(ADMIN_SPARE_FDS);
    let serve = or(
        accept_loop(&admin, listener, &spare),
        housekeeping(&admin, &spare),
    );
    let control = or(
        messages(&admin, inbox),
        or(
            health_checks(&admin, &ws_targets),
            from_fleet(&admin, fleet_accounts),
        ),
    );
    or(or(serve, control), async {
        let _ = stop.recv().await;
    })
    .await;
}

/// Accepts admin connections (allowlisted peers only) and answers each on
/// its own task; never ends.
async fn accept_loop(admin: &Rc<Admin>, listener: glommio::net::TcpListener, spare: &Spare) {
    let pool = BufferPool::new(MAX_BODY + 8192, 2, 16);
    let errors = crate::dataplane::accept::AcceptErrors::new("admin", true);
    loop {
        let tcp = match listener.accept().await {
            Ok(tcp) => {
                errors.succeeded();
                spare.refill();
                tcp
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                let wait = errors.failed(&admin.process.faults, &e);
                if crate::dataplane::accept::is_file_limit(&e) && spare.release() {
                    continue; // a descriptor is free now: accept again at once
                }
                glommio::timer::Timer::new(wait).await;
                spare.refill();
                continue;
            }
        };
        if !admin.allowed(|| tcp.peer_addr().ok()) {
            continue; // dropped: not on the allowlist
        }
        glommio::spawn_local(serve(admin.clone(), pool.clone(), tcp)).detach();
    }
}

/// Reads one request from `tcp`, answers it and closes.
async fn serve(admin: Rc<Admin>, pool: Rc<BufferPool>, tcp: glommio::net::TcpStream) {
    let conn = Duplex::new(Conn::Plain(tcp.into()));
    let mut buf = pool.get();
    let answer = match timeout(Duration::from_secs(10), read_request(&conn, &mut buf)).await {
        Some(Ok(n)) => match parse_request(&buf.filled()[..n]) {
            Some(req) => routes::route(&admin, &req).await,
            None => http::json_error(400, "malformed HTTP request"),
        },
        Some(Err(status)) => http::json_error(status, "request too large or malformed"),
        None => return,
    };
    let _ = conn.write_all(&answer).await;
    // No reset: a client still sending (a 413 body) that reads late still
    // gets the answer.
    http::close_gracefully(&conn, Duration::from_secs(2)).await;
}

/// Once a second: key housekeeping, the shards' usage into the ledger, the
/// alerts, reconciliation and the ledger's save when due, the devices'
/// sweep. Never ends.
async fn housekeeping(admin: &Admin, spare: &Spare) {
    let mut last_save = Instant::now();
    let mut last_alerts = Instant::now();
    let mut last_reconcile: Option<Instant> = None;
    let mut save_failed = false;
    loop {
        glommio::timer::Timer::new(Duration::from_secs(1)).await;
        api::housekeeping(admin);
        spare.refill();
        let records = meter::collect(admin).await;
        admin.usage.borrow_mut().add(&records);
        admin.alerts.borrow_mut().feed(&records);
        if let Some(fleet) = admin.process.fleet.get() {
            fleet.add_usage(records);
        }
        if last_alerts.elapsed() >= admin.usage_cfg.borrow().alerts.interval {
            last_alerts = Instant::now();
            alerts::evaluate(admin).await;
        }
        let every = admin.usage_cfg.borrow().reconcile_interval;
        if !every.is_zero() && last_reconcile.is_none_or(|t| t.elapsed() >= every) {
            last_reconcile = Some(Instant::now());
            meter::reconcile(admin).await;
        }
        if last_save.elapsed() >= admin.usage_cfg.borrow().persist_interval {
            last_save = Instant::now();
            save_failed = save_usage(admin, save_failed);
        }
        admin.process.devices.sweep(std::time::SystemTime::now());
    }
}

/// Saves the usage ledger if it changed; whether saving fails, logging a
/// failure only when the last save did not fail too.
fn save_usage(admin: &Admin, failed_before: bool) -> bool {
    let dir = admin.config.borrow().state_dir.clone();
    match admin.usage.borrow_mut().save_if_dirty(&dir) {
        Ok(()) => false,
        Err(e) => {
            if !failed_before {
                tracing::error!(dir = %dir.display(), error = %e, "cannot write the usage ledger");
            }
            true
        }
    }
}

/// Answers the main thread's messages (reloads, the watchdog's ping).
async fn messages(admin: &Admin, inbox: async_channel::Receiver<AdminMsg>) {
    while let Ok(msg) = inbox.recv().await {
        match msg {
            AdminMsg::Reload(cfg, reply) => {
                let _ = reply.send(admin.reload(&cfg)).await;
            }
            AdminMsg::Ping(reply) => {
                let _ = reply.send("admin".into());
            }
        }
    }
    futures_lite::future::pending::<()>().await;
}

/// Applies the account sets other nodes of the fleet store.
async fn from_fleet(admin: &Admin, fleet_accounts: Option<async_channel::Receiver<Vec<u8>>>) {
    if let Some(rx) = fleet_accounts {
        while let Ok(sealed) = rx.recv().await {
            admin.apply_fleet_accounts(&sealed);
        }
    }
    futures_lite::future::pending::<()>().await;
}

/// Active health checks, every `admin.health_interval`: each pool's
/// WebSocket endpoint (see [`probe_endpoints`]), then each key against
/// its own pool's REST API. Never ends.
async fn health_checks(admin: &Admin, ws_targets: &[UpstreamTarget]) {
    let mut probed = false;
    loop {
        let interval = admin.config.borrow().health_interval;
        // The WebSocket endpoint itself, at the first check and while a
        // configuration fault stands: a wrong upstream.url is found at
        // start, not by the first user.
        if !interval.is_zero() && (!probed || admin.process.upstream_fault.get().is_some()) {
            probed = probe_endpoints(admin, ws_targets).await;
        }
        if admin.rests.is_empty() || interval.is_zero() {
            glommio::timer::Timer::new(Duration::from_secs(1)).await;
            continue;
        }
        check_keys(admin).await;
        glommio::timer::Timer::new(interval).await;
    }
}

/// Probes every pool's WebSocket endpoint, in order; the first wrong one
/// keeps the fault (a later good one does not clear it). Whether the last
/// probe got an answer.
async fn probe_endpoints(admin: &Admin, ws_targets: &[UpstreamTarget]) -> bool {
    let mut probed = false;
    for t in ws_targets {
        let fault = &admin.process.upstream_fault;
        let status = health::probe_websocket(t, fault, Duration::from_secs(10)).await;
        probed = status.is_some();
        if status.is_some_and(UpstreamFault::is_config_fault) {
            break;
        }
    }
    probed
}

/// Checks each account's current key against its own pool's REST API (an
/// EU key is unknown to the US host), logging changes of health.
async fn check_keys(admin: &Admin) {
    let targets: Vec<_> = admin
        .accounts
        .borrow()
        .entries()
        .iter()
        .map(|e| (e.state.clone(), e.current.clone()))
        .collect();
    for (account, key) in targets {
        let Some(rest) = admin.rest_for(&account.pool) else {
            continue;
        };
        let before = account.healthy(Instant::now());
        let verdict = rest.check(&account, &key, Duration::from_secs(10)).await;
        admin.checks.add(verdict);
        let after = account.healthy(Instant::now());
        if before != after {
            tracing::warn!(account = %account.id, key = %key.fingerprint, ?verdict, healthy = after, "health check changed the account's health");
        } else if verdict == health::Verdict::Unknown {
            tracing::debug!(account = %account.id, "health check could not reach the REST API");
        }
    }
}

/// Reads a request head and its body (by `Content-Length`) into `buf`;
/// returns the total length, or an HTTP status to refuse with.
async fn read_request(conn: &Duplex, buf: &mut Buf) -> Result<usize, u16> {
    let head = http::read_head(conn, buf, 8192)
        .await
        .map_err(|e| match e {
            http::HeadError::TooLarge => 431u16,
            _ => 400u16,
        })?;
    let head_bytes = &buf.filled()[..head];
    let mut headers = http::header_slots(head_bytes);
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head_bytes).is_err() {
        return Err(400);
    }
    let length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(400u16)
        })
        .transpose()?
        .unwrap_or(0);
    if length > MAX_BODY {
        return Err(413);
    }
    while buf.len() < head + length {
        match buf.read_from(conn).await {
            Ok(0) | Err(_) => return Err(400),
            Ok(_) => {}
        }
    }
    Ok(head + length)
}

fn parse_request(bytes: &[u8]) -> Option<Request<'_>> {
    let mut headers = http::header_slots(bytes);
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = req
        .headers
        .iter()
        .filter_map(|h| Some((h.name, std::str::from_utf8(h.value).ok()?)))
        .collect();
    Some(Request {
        method: req.method?,
        path,
        query,
        headers,
        body: &bytes[head..],
    })
}
