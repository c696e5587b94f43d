//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/v1/config`, and,
//! behind the admin token, the account API (`/admin/…`).
//!
//! Runs on its own executor thread, off the streaming path. It owns the
//! control plane's account set; shards learn of changes only by message
//! ([`ShardMsg::Ring`]), and answer metrics requests ([`ShardMsg::Snapshot`])
//! that a scrape merges.
//!
//! Here: the thread's state (`Admin`: the accounts, usage and health
//! services' state apart), starting it, reloads; `key_store.rs` keeps the
//! account set on disk. `server.rs` reads
//! requests, `routes.rs` answers them from one table, `services.rs` runs
//! the services' tasks.

mod alerts;
mod api;
mod file_turns;
mod key_store;
mod meter;
pub mod pools;
mod query;
mod remote;
mod revocations;
mod routes;
mod server;
mod services;

pub use remote::remote_config;
pub use revocations::load_revocations;
use server::Request;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::control::accounts::Accounts;
use crate::control::health::{CheckCounts, RestTarget};
use crate::control::keystore::StoreError;
use crate::control::usage::UsageBook;
use crate::core::cluster::ClusterError;
use crate::core::config::UsageConfig;
use crate::core::config::{AdminConfig, Config};
use crate::core::metrics::MetricsSnapshot;
use crate::core::secret::Secret;
use crate::core::token::TokenKeys;
use crate::dataplane::accept::Spare;
use crate::dataplane::shard::Settings;
use crate::dataplane::shard::{ProcessState, ShardMsg, IO_MEMORY};
use crate::dataplane::upstream::UpstreamTarget;
use futures_lite::future::or;
use std::collections::HashMap;

/// Descriptors the admin thread holds in reserve for its own port.
const ADMIN_SPARE_FDS: usize = 4;

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
    pub fleet_accounts: Option<async_channel::Receiver<(i64, Vec<u8>)>>,
    /// Every pool and its endpoints (the default pool's is `upstream.url`):
    /// the health checks probe each WebSocket endpoint, `/v1/config` and
    /// the metrics list them.
    pub pools: Vec<crate::core::config::PoolConfig>,
    /// Where the admin thread says it is inside a disk write, for the
    /// watchdog (`core::disk_wait`).
    pub disk: Arc<crate::core::disk_wait::DiskWait>,
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

/// Why an account change applied here was not shared with the fleet.
#[derive(Debug)]
enum ShareError {
    /// The account set could not be sealed under the master key.
    Seal(StoreError),
    /// The cluster store did not take the sealed set.
    Fleet(ClusterError),
    /// Another node stored the fleet's set since this node's set was
    /// changed: its version and set, which now apply here.
    Moved(i64, Option<Vec<u8>>),
}

impl std::fmt::Display for ShareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShareError::Seal(e) => e.fmt(f),
            ShareError::Fleet(e) => e.fmt(f),
            ShareError::Moved(..) => {
                f.write_str("another node changed the account set at the same time")
            }
        }
    }
}

impl std::error::Error for ShareError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ShareError::Seal(e) => Some(e),
            ShareError::Fleet(e) => Some(e),
            ShareError::Moved(..) => None,
        }
    }
}

impl From<StoreError> for ShareError {
    fn from(e: StoreError) -> Self {
        ShareError::Seal(e)
    }
}

impl From<ClusterError> for ShareError {
    fn from(e: ClusterError) -> Self {
        ShareError::Fleet(e)
    }
}

/// The admin thread's state: what the admin port and the reloads need,
/// and the state of its three services, each with its own task.
struct Admin {
    shards: Vec<async_channel::Sender<ShardMsg>>,
    process: Arc<ProcessState>,
    config: RefCell<AdminConfig>,
    /// HMAC key and tag of the admin token, so a presented token is compared
    /// in constant time (ring's `hmac::verify`).
    token_check: RefCell<Option<(ring::hmac::Key, ring::hmac::Tag)>>,
    /// Every pool and its endpoints, the default pool first.
    pools: Vec<crate::core::config::PoolConfig>,
    /// TLS client config (https webhooks and REST).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The account set and where it is kept ([`services::accounts`]).
    accounts: AccountsState,
    /// Outside a fleet: `revocations.json` as shared with another process
    /// on the state directory (a hand-over restart's other relay).
    revocations_file: revocations::SharedFile,
    /// `key-dates.json`'s writes, off the admin thread, in order.
    key_dates_turns: file_turns::FileTurns,
    /// Requests being answered (from a whole request to its answer
    /// written), which a stop waits for a moment.
    answering: std::cell::Cell<usize>,
    /// Usage, prices, reconciliation and alerts ([`services::usage`]).
    usage: UsageState,
    /// Active health checks ([`services::health`]).
    health: HealthState,
}

/// The accounts service's state.
struct AccountsState {
    /// The authoritative account set.
    set: RefCell<Accounts>,
    /// The key store, where account changes are saved (none without a
    /// master key); shared with the blocking thread that writes it.
    store: Option<Arc<crate::control::keystore::KeyStore>>,
    /// The key store's writes, off the admin thread, in order.
    store_turns: file_turns::FileTurns,
    /// The store generation last written or read.
    store_generation: std::cell::Cell<u64>,
    /// The store file as last looked at (inode, modification time, size),
    /// so the check each second for another process's save reads and
    /// opens the file only when it changed.
    store_seen: std::cell::Cell<Option<(u64, i64, i64, u64)>>,
    /// The store was found gone and could not be written again: logged
    /// once, until it is.
    store_gone_reported: std::cell::Cell<bool>,
    /// The last save of the account set failed: tried again each second.
    store_unsaved: std::cell::Cell<bool>,
    /// The config file's accounts (the base the store's changes apply to).
    configs: RefCell<Vec<crate::core::config::AccountConfig>>,
    /// In a fleet: the account set other nodes stored could not be opened
    /// here (another master key); account changes are refused.
    fleet_unreadable: std::cell::Cell<bool>,
    /// In a fleet: the version of the fleet's account set this node's set
    /// follows (0 before it has seen one). A change made here is stored
    /// for the fleet only if the store still holds that version.
    fleet_version: std::cell::Cell<i64>,
    /// Held through each account change (an API request's, a reload's,
    /// the fleet's set applied; the once-a-second catch-up and retry
    /// only when free), from catching up to the write's end and the
    /// answer: changes on this node go one at a time, so one never finds
    /// the fleet's set moved by another of its own (answered 409), nor
    /// skips another process's save while a write of this one's is under
    /// way and writes over it.
    changing: glommio::sync::Semaphore,
}

/// The usage service's state.
struct UsageState {
    /// The usage ledger.
    book: RefCell<UsageBook>,
    /// Currency, persistence and alert settings.
    cfg: RefCell<UsageConfig>,
    /// Price and budget per account id.
    prices: RefCell<HashMap<String, meter::Price>>,
    /// In-process alert state.
    alerts: RefCell<alerts::AlertState>,
    /// Last usage reconciliation per account.
    reconciliation: RefCell<std::collections::BTreeMap<String, meter::Reconciliation>>,
    /// The ledger's database could not be opened or written at the last
    /// try: the usage since waits in memory.
    ledger_failing: std::cell::Cell<bool>,
    /// Held through each save of the ledger: one at a time.
    saving: glommio::sync::Semaphore,
}

/// The health service's state.
struct HealthState {
    /// Each pool's upstream REST API (health checks, reconciliation).
    rests: Vec<(String, RestTarget)>,
    /// Each pool's WebSocket endpoint, probed for a configuration fault.
    endpoints: Vec<UpstreamTarget>,
    /// Health check outcomes so far.
    checks: CheckCounts,
}

/// Messages from the main thread to the admin thread.
#[derive(Debug)]
pub enum AdminMsg {
    /// Apply a re-read config file; the reply lists what changed.
    Reload(Box<Config>, async_channel::Sender<Vec<String>>),
    /// Answer (with "admin"), to show the admin thread's event loop turns:
    /// the watchdog's liveness check.
    Ping(std::sync::mpsc::Sender<String>),
    /// Take the shards' usage records into the ledger (and the fleet's)
    /// and save it now, then answer: the stop's last step before the
    /// shards end, so the last streams' usage is not lost with them.
    Flush(std::sync::mpsc::Sender<()>),
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
        let dir = &setup.config.state_dir;
        let book = match UsageBook::load(dir) {
            Ok(book) => book,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "usage ledger not opened; counting in memory and trying again at each persist");
                UsageBook::default()
            }
        };
        let endpoints = setup
            .pools
            .iter()
            .filter_map(|p| UpstreamTarget::new(&p.url, setup.tls.clone()).ok())
            .collect();
        Admin {
            shards: setup.shards,
            process: setup.process,
            token_check: RefCell::new(token_check(setup.config.token.as_ref())),
            config: RefCell::new(setup.config),
            pools: setup.pools,
            tls: setup.tls,
            revocations_file: revocations::SharedFile::default(),
            key_dates_turns: Default::default(),
            answering: Default::default(),
            accounts: AccountsState {
                set: RefCell::new(setup.accounts),
                store_generation: std::cell::Cell::new(setup.store.as_ref().map_or(0, |(_, g)| *g)),
                store_seen: std::cell::Cell::new(None),
                store_gone_reported: std::cell::Cell::new(false),
                store_unsaved: std::cell::Cell::new(false),
                fleet_unreadable: std::cell::Cell::new(false),
                fleet_version: std::cell::Cell::new(0),
                changing: glommio::sync::Semaphore::new(1),
                store: setup.store.map(|(s, _)| Arc::new(s)),
                store_turns: Default::default(),
                configs: RefCell::new(setup.account_configs.clone()),
            },
            usage: UsageState {
                ledger_failing: std::cell::Cell::new(!book.is_open()),
                saving: glommio::sync::Semaphore::new(1),
                book: RefCell::new(book),
                cfg: RefCell::new(setup.usage),
                prices: RefCell::new(prices(&setup.account_configs)),
                alerts: RefCell::new(alerts::AlertState::default()),
                reconciliation: RefCell::new(Default::default()),
            },
            health: HealthState {
                rests: setup.rests,
                endpoints,
                checks: CheckCounts::default(),
            },
        }
    }

    /// The REST API of `pool`'s upstream.
    fn rest_for(&self, pool: &str) -> Option<&RestTarget> {
        self.health
            .rests
            .iter()
            .find_map(|(name, r)| (name == pool).then_some(r))
    }

    /// Sends the current ring version to every shard.
    fn publish(&self) {
        let accounts = self.accounts.set.borrow();
        // With active checks a 401/402 holds an account off until a check
        // passes; without them, for a minute.
        let checks_on =
            !self.health.rests.is_empty() && !self.config.borrow().health_interval.is_zero();
        let holdoff = if checks_on {
            Duration::from_secs(3600)
        } else {
            crate::core::keyring::UNHEALTHY_HOLDOFF
        };
        for e in accounts.entries() {
            e.state.set_unhealthy_holdoff(holdoff);
        }
        let (ring, ids) = (accounts.ring(), accounts.metrics_ids());
        self.process.publish(ring, ids);
        for tx in &self.shards {
            let _ = tx.try_send(ShardMsg::Ring);
        }
    }

    /// Applies a reloaded config: accounts, stream limits, token keys, and
    /// the admin settings. Listen addresses, shards and upstream need a restart.
    async fn reload(&self, cfg: &Config) -> Vec<String> {
        // The certificate first: the files may have changed since the
        // config was validated (a renewal under way), and a reload it
        // refuses must apply nothing, not the accounts alone.
        let tls = match cfg
            .tls
            .as_ref()
            .map(|file| crate::core::tls::load(file).map(|t| (file, t)))
            .transpose()
        {
            Ok(t) => t,
            Err(e) => return vec![format!("refused: TLS certificate not reloaded: {e}")],
        };
        let overlap = cfg.admin.rotation_overlap;
        let now = crate::control::accounts::unix_now();
        // Keys new to the file are dated now, here and after restarts.
        self.key_dates_turns
            .write(|| {
                let dir = self.config.borrow().state_dir.clone();
                let accounts = cfg.accounts.clone();
                move || crate::control::keystore::KeyDates::record(&dir, &accounts, now)
            })
            .await;
        // An account change of its own, as the API's: from taking in the
        // store to its write, none other (a change that came meanwhile
        // would skip taking in the store, a write being under way, and
        // write over what another process saved).
        let _one_at_a_time = self.accounts.changing.acquire_permit(1).await;
        // Onto what the other process of a hand-over saved, if it did.
        self.catch_up_store().await;
        let mut log = self.accounts.set.borrow_mut().apply_config(
            &cfg.accounts,
            &self.accounts.configs.borrow(),
            overlap,
            now,
        );
        self.publish();
        let settings = Settings {
            limits: cfg.limits.clone(),
            failover: cfg.failover.clone(),
            tokens: Arc::new(TokenKeys::from_config(&cfg.tokens)),
            devices: Arc::new(cfg.devices.clone()),
            allow: Arc::new(cfg.server.allow.clone()),
            proxy_protocol_from: Arc::new(cfg.server.proxy_protocol_from.clone()),
            // The reload's log names each change: a renewed certificate
            // shows by its end date.
            tls: tls.map(|(file, t)| {
                log.push(t.describe(file));
                self.process.set_tls_not_after(t.not_after);
                t.config
            }),
        };
        if settings.tls.is_none() {
            // No certificate served: none to alert on.
            self.process.set_tls_not_after(None);
        }
        self.process.pools.set_caps(&cfg.devices);
        self.process
            .devices
            .set_token_lifetime(cfg.tokens.max_ttl, cfg.tokens.clock_skew);
        self.process
            .resume_copies
            .set_limit(cfg.failover.resume_memory);
        self.process
            .devices
            .set_daily_audio(settings.devices.daily_audio());
        for tx in &self.shards {
            let _ = tx.try_send(ShardMsg::Settings(settings.clone()));
        }
        log.push(format!(
            "limits and token keys applied (signing key id {})",
            settings.tokens.current_kid()
        ));
        *self.token_check.borrow_mut() = token_check(cfg.admin.token.as_ref());
        *self.usage.prices.borrow_mut() = prices(&cfg.accounts);
        *self.accounts.configs.borrow_mut() = cfg.accounts.clone();
        if let Err(e) = self.persist().await {
            log.push(format!("key store not updated: {e}"));
        }
        *self.usage.cfg.borrow_mut() = cfg.usage.clone();
        *self.config.borrow_mut() = cfg.admin.clone();
        log
    }

    /// `None` when the request carries the admin token; otherwise the 401:
    /// the relay has none, none was sent, or it is not the one (a token
    /// refused, which its challenge says: `error="invalid_token"`).
    fn unauthorized(&self, req: &Request<'_>) -> Option<Vec<u8>> {
        self.unauthorized_why(req).map(|(why, refused)| {
            if refused {
                crate::dataplane::http::invalid_token(why)
            } else {
                crate::dataplane::http::json_error(401, why)
            }
        })
    }

    /// Why [`Admin::unauthorized`] refuses a request, and whether it
    /// presented a token that was refused.
    fn unauthorized_why(&self, req: &Request<'_>) -> Option<(&'static str, bool)> {
        let check = self.token_check.borrow();
        let Some((key, tag)) = &*check else {
            return Some((
                "admin API off: this relay has no admin token (set admin.token_env or \
                 admin.token_file in its config, then reload)",
                false,
            ));
        };
        // The scheme is case-insensitive, as on the client port.
        let presented = req
            .header("authorization")
            .and_then(|v| crate::dataplane::http::strip_bearer(v.trim()));
        match presented {
            None => Some((
                "admin token required (Authorization: Bearer <admin token>)",
                false,
            )),
            Some(t) if ring::hmac::verify(key, t.as_bytes(), tag.as_ref()).is_ok() => None,
            Some(_) => Some(("admin token refused: not this relay's admin.token", true)),
        }
    }

    fn allowed(&self, peer: impl FnOnce() -> Option<SocketAddr>) -> bool {
        crate::dataplane::io::allowed(&self.config.borrow().allow, peer)
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
    let addr = match ready_rx.recv() {
        Ok(answer) => answer?,
        Err(_) => {
            return Err(crate::dataplane::uring::executor_failed(
                "admin",
                join.join(),
            ))
        }
    };
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
    crate::core::disk_wait::watch(setup.disk.clone());
    let listener =
        match crate::dataplane::io::listener(setup.listen_fd.as_deref(), setup.listen, false) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
    let _ = ready.send(listener.local_addr().map_err(Into::into));
    let inbox = setup.inbox.clone();
    let fleet_accounts = setup.fleet_accounts.clone();
    let admin = Rc::new(Admin::new(setup));
    admin.publish();
    // Descriptors in reserve: at the file limit, one is given up so
    // the admin port still answers while the client port is full.
    let spare = Spare::new(ADMIN_SPARE_FDS);
    let serve = or(
        server::accept_loop(&admin, listener, &spare),
        services::messages(&admin, inbox),
    );
    let services = or(
        or(
            services::accounts(&admin, fleet_accounts),
            services::usage(&admin),
        ),
        or(
            services::health(&admin),
            or(
                services::process(&admin, &spare),
                revocations::upkeep(&admin),
            ),
        ),
    );
    or(or(serve, services), async {
        let _ = stop.recv().await;
    })
    .await;
}
