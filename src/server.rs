//! Starting and stopping a whole relay: shards, the admin server, signals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::admin::{self, AdminHandle, AdminSetup};
use crate::config::{AuthMode, Config};
use crate::control::Accounts;
use crate::metrics::MetricsSnapshot;
use crate::shard::{self, ProcessState, ShardHandle, ShardMsg, ShardSetup};
use crate::token::TokenKeys;

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
}

/// Starts a relay with `cfg`: one shard per `server.shards` (pinned when
/// there are no more shards than cores), then the admin server. Returns once
/// everything listens.
pub fn start(cfg: &Config) -> std::io::Result<RelayHandle> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let epoch = Instant::now();
    let accounts = Accounts::from_config(&cfg.accounts, epoch);
    let process = ProcessState::new(
        cfg.server.max_streams,
        accounts.ring(),
        accounts.metrics_ids(),
    );
    let tls = if cfg.upstream.url.starts_with("wss://") {
        Some(crate::upstream::tls_client_config(cfg.upstream.ca_file.as_deref()).map_err(invalid)?)
    } else {
        None
    };
    let n = cfg.server.shard_count();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut setup = ShardSetup {
        listen: cfg.server.listen,
        cpu: None,
        limits: cfg.limits.clone(),
        key_in_header: cfg.upstream.auth == AuthMode::Header,
        connect_timeout: cfg.upstream.connect_timeout,
        upstream_url: cfg.upstream.url.clone(),
        upstream_tls: tls,
        tokens: Arc::new(TokenKeys::from_config(&cfg.tokens)),
        process: process.clone(),
    };
    let mut shards: Vec<ShardHandle> = Vec::with_capacity(n);
    for i in 0..n {
        setup.cpu = (n <= cores).then_some(i);
        let handle = shard::start(i, setup.clone())?;
        // Port 0 picks a port for the first shard; the others join it.
        setup.listen = handle.addr;
        shards.push(handle);
    }
    let admin = admin::start(AdminSetup {
        listen: cfg.server.admin_listen,
        shards: shards.iter().map(|s| s.tx.clone()).collect(),
        process: process.clone(),
        accounts,
        config: cfg.admin.clone(),
    })?;
    tracing::info!(client = %shards[0].addr, admin = %admin.addr, shards = n, accounts = process.accounts().len(), "clio-relay listening");
    Ok(RelayHandle {
        client_addr: shards[0].addr,
        admin_addr: admin.addr,
        process,
        shards,
        admin: Some(admin),
    })
}

impl RelayHandle {
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
        for s in &self.shards {
            let _ = s.tx.try_send(ShardMsg::Stop);
        }
        for s in self.shards.drain(..) {
            let _ = s.join.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Runs the relay until SIGTERM or SIGINT.
pub fn run(cfg: &Config) -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    // Block the signals before any thread starts so every thread inherits the
    // mask and only this one receives them, synchronously.
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(std::io::Error::from)?;
    let relay = start(cfg)?;
    loop {
        match set.wait().map_err(std::io::Error::from)? {
            Signal::SIGHUP => tracing::info!(
                "SIGHUP: live reload is not implemented yet; configuration unchanged"
            ),
            sig => {
                tracing::info!(signal = %sig, "stopping");
                break;
            }
        }
    }
    relay.shutdown();
    Ok(())
}
