//! Opening a stream: its admission (the process's and the device's
//! limits, revocations, a fleet's shared counts), the choice of an
//! account among the token's pools, the connection upstream with a move
//! to the next account on a refusal, a reopening's patience with an
//! upstream it cannot reach, and the race of every open against the
//! client leaving.

use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;

use crate::core::devices::DevicePermit;
use crate::core::keyring::{Lease, RateScope};
use crate::core::metrics::Side;
use crate::core::token::Claims;
use crate::dataplane::io::Duplex;
use crate::dataplane::shard::AdmitPermit;
use crate::dataplane::upstream::UpstreamFault;
use clio_frame::frame::Sender;
use clio_frame::scanner::FrameScanner;

use super::{refusal, Refusal, Stream, Upstream};

/// `open`, unless the client goes first (its connection shut or failed):
/// then the open is dropped, and nothing is answered. Opening upstream for
/// a client that has left would hold its device's and its account's places
/// until upstream answered, and send (and bill) its audio for no one; a
/// phone that gave up on a slow open and reconnects would find its own
/// place taken. The same holds for a failover's or a resume's new
/// connection.
pub(super) async fn unless_client_leaves<T>(
    client: &Duplex,
    open: impl std::future::Future<Output = Result<T, Refusal>>,
) -> Result<T, Refusal> {
    future::or(open, async {
        client.hung_up().await;
        Err(Refusal::silent(0))
    })
    .await
}

/// How long a reopening waits before it tries every account again when it
/// could reach none; each further wait is twice as long, up to
/// [`REOPEN_WAIT_MAX`].
const REOPEN_WAIT: Duration = Duration::from_millis(250);
const REOPEN_WAIT_MAX: Duration = Duration::from_secs(2);

impl Stream {
    /// Opens upstream for a stream: its first connection (`first`: the
    /// account a fleet's shared store already reserved), or a new one
    /// after a failure (a failover, a resume). When it can reach no
    /// account (every connect failed, or was answered 5xx, or every
    /// account is held off after timeouts), it waits and tries them all
    /// again, while `rounds` (the stream's tries of accounts already
    /// tried) is under `failover.max_resumes`: a restarting upstream or a
    /// moment's network fault is then waited out, where the stream would
    /// have failed at once.
    ///
    /// When the relay stops now, it gives up with the drain's
    /// "reconnect" (503, close 1012): the stop waits for no connect, and
    /// the stream ends (a failover's or a resume's, with its usage
    /// recorded) as the live streams it ends do. Always boxed by its
    /// callers: the race adds nothing to an open stream's task.
    pub(super) async fn open_patiently(
        &self,
        tried: &mut u64,
        rounds: &mut u32,
        first: Option<Lease>,
    ) -> Result<Upstream, Refusal> {
        future::or(self.open_patiently_now(tried, rounds, first), async {
            self.shard.stopping_now().await;
            Err(Refusal::restarting())
        })
        .await
    }

    async fn open_patiently_now(
        &self,
        tried: &mut u64,
        rounds: &mut u32,
        mut first: Option<Lease>,
    ) -> Result<Upstream, Refusal> {
        loop {
            let next = self.open_upstream(tried, first.take()).await;
            match &next {
                Err(r)
                    if r.kind == refusal::UPSTREAM_UNAVAILABLE
                        && *rounds < self.settings.failover.max_resumes =>
                {
                    let wait = REOPEN_WAIT
                        .saturating_mul(1 << (*rounds).min(8))
                        .min(REOPEN_WAIT_MAX);
                    if self.shard.process.upstream_log.admit() {
                        tracing::info!(stream = %self.id, wait = ?wait, "no account reachable; trying again after a wait");
                    }
                    glommio::timer::sleep(wait).await;
                    *rounds += 1;
                    *tried = 0;
                }
                _ => return next,
            }
        }
    }

    /// A `server.max_streams` slot for a stream whose token came in its
    /// first message.
    pub(super) fn admit_stream(&self) -> Result<AdmitPermit, Refusal> {
        let process = &self.shard.process;
        if process.finalizing() {
            return Err(Refusal::restarting());
        }
        process.admit().ok_or_else(|| {
            Refusal::new(
                503,
                "service_unavailable",
                "Relay at capacity (server.max_streams); try again later.",
                1013,
                Side::Internal,
            )
        })
    }

    /// Checks the device's limits and revocations for a new stream. In a
    /// fleet (`[cluster]`) the shared store checks them and picks the
    /// account in the same round trip (the lease returned).
    pub(super) async fn admit(
        &self,
        claims: &Claims,
    ) -> Result<(DevicePermit, Option<Lease>), Refusal> {
        // The account set as the admin side last published it.
        self.shard.catch_up_ring();
        // Every pool of the token at its `max_streams`: refused before the
        // device's counts are touched.
        let pools = self.pools_with_room()?;
        let devices = &self.settings.devices;
        let tier = claims.tier.as_deref();
        let limits = &devices.limits_in(tier, &claims.pools);
        let process = &self.shard.process;
        // A refusal by a limit a pool set names the pool, and counts for it.
        let refused = |r: crate::core::devices::Refused| {
            process.device_rejections[r.limit as usize]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut message = r.message;
            if let Some(pool) = devices.pool_setting(tier, &claims.pools, r.limit) {
                if let Some(limit) = crate::core::pool_limits::PoolLimit::of_device(r.limit) {
                    process.pools.get(pool).refused(limit);
                }
                message = format!("{} (pool.{pool}.devices)", message.trim_end_matches('.'));
            }
            Refusal::device(r.limit, message)
        };
        let Some(fleet) = process.fleet.get() else {
            return process
                .devices
                .admit(claims, limits, SystemTime::now())
                .map(|p| (p, None))
                .map_err(refused);
        };
        fleet
            .admit(
                &process.devices,
                &self.shard.ring,
                claims,
                &pools,
                limits,
                0,
                self.shard
                    .fleet_link()
                    .map(|l| l as &dyn crate::core::cluster::OpenLink),
            )
            .await
            .map_err(|r| match r {
                crate::core::cluster::FleetRefusal::Device(r) => refused(r),
                // Every account at its limit across the fleet: the relays' own limit.
                crate::core::cluster::FleetRefusal::NoAccount => {
                    Refusal::no_account(crate::core::metrics::RefusedBy::RelayLimit)
                }
                crate::core::cluster::FleetRefusal::StoreDown => Refusal::store_down(),
            })
    }

    /// The token's pools with room under their `[pool.NAME] max_streams`
    /// in this process; a 429 naming the limit when none has.
    pub(super) fn pools_with_room(&self) -> Result<Vec<String>, Refusal> {
        let devices = &self.settings.devices;
        let counts = &self.shard.process.pools;
        let pools = self.pools.borrow();
        let open: Vec<String> = pools
            .iter()
            .filter(|p| counts.has_room(p, devices.pool_max_streams(p)))
            .cloned()
            .collect();
        if !open.is_empty() || pools.is_empty() {
            return Ok(open);
        }
        for p in pools.iter() {
            counts
                .get(p)
                .refused(crate::core::pool_limits::PoolLimit::MaxStreams);
        }
        let names: Vec<String> = pools
            .iter()
            .map(|p| {
                format!(
                    "{p} ({} streams, pool.{p}.max_streams)",
                    devices.pool_max_streams(p)
                )
            })
            .collect();
        Err(Refusal::pool_limit(&names.join(", ")))
    }

    /// Picks an account and connects; on a refusal tries the next account.
    /// `first`: the account a fleet's shared store already reserved.
    pub(super) async fn open_upstream(
        &self,
        tried: &mut u64,
        mut first: Option<Lease>,
    ) -> Result<Upstream, Refusal> {
        let shard = &self.shard;
        let mut unreachable = false;
        let mut upstream_refused = false;
        // Races lost for a pool's last place (bounded: the pool is seen
        // full on the next turn, unless a place came free meanwhile).
        let mut raced = 0u32;
        loop {
            // Never an account outside the token's pools, whoever picks it;
            // for the stream's first account, only of a pool with room.
            let pools = if self.placed.get() {
                self.pools.borrow().clone()
            } else {
                self.pools_with_room()?
            };
            let now = Instant::now();
            shard.catch_up_ring();
            let lease = match (first.take(), shard.process.fleet.get()) {
                (Some(l), _) => Some(l),
                (None, Some(fleet)) if fleet.store_up() => {
                    let link = shard
                        .fleet_link()
                        .map(|l| l as &dyn crate::core::cluster::OpenLink);
                    fleet.pick(&shard.ring, *tried, &pools, link).await
                }
                (None, Some(fleet)) => fleet.pick_local(&shard.ring, *tried, &pools),
                (None, None) => shard.ring.borrow_mut().pick(now, *tried, &pools),
            };
            let Some(lease) = lease.filter(|l| pools.contains(&l.account.pool)) else {
                // Accounts held off after connect timeouts are an unreachable
                // upstream, not a lack of capacity. Only the token's pools
                // count: an EU stream is not refused for a US account's state.
                let now = Instant::now();
                let ring = shard.ring.borrow();
                let mine: Vec<_> = ring
                    .slots()
                    .iter()
                    .filter(|s| pools.contains(&s.account.pool))
                    .cloned()
                    .collect();
                return Err(
                    if unreachable || mine.iter().any(|s| s.account.timed_out(now)) {
                        Refusal::upstream_unavailable()
                    } else if mine.is_empty() {
                        Refusal::no_account_in(&pools)
                    } else {
                        Refusal::no_account(refusal::why_no_account(&mine, now, upstream_refused))
                    },
                );
            };
            let mut lease = lease;
            let count = shard.process.pools.get(&lease.account.pool);
            let cap = if self.placed.get() {
                0
            } else {
                self.settings.devices.pool_max_streams(&lease.account.pool)
            };
            match crate::core::pool_limits::PoolHold::take(&count, cap) {
                Some(hold) => lease.pool = Some(hold),
                // Another shard took the pool's last place meanwhile: the
                // next turn sees the pool full.
                None if raced < 8 => {
                    raced += 1;
                    continue;
                }
                None => {
                    count.refused(crate::core::pool_limits::PoolLimit::MaxStreams);
                    let pool = &lease.account.pool;
                    return Err(Refusal::pool_limit(&format!(
                        "{pool} ({cap} streams, pool.{pool}.max_streams)"
                    )));
                }
            }
            let Some(target) = shard.upstream(&lease.account.pool) else {
                // Accounts are checked against the pools at start; kept safe anyway.
                tracing::error!(stream = %self.id, account = %lease.account.id, pool = %lease.account.pool, "no endpoint for the account's pool");
                return Err(Refusal::upstream_unavailable());
            };
            *tried |= 1 << lease.slot;
            // The stream goes on to another connection: the one that
            // failed before it was a move the client did not see.
            self.moved_off();
            let mut buf = shard.pool.get();
            let t0 = Instant::now();
            let key_in_header = shard.key_in_header;
            match target
                .connect(
                    &lease.key.key,
                    key_in_header,
                    &mut buf,
                    shard.connect_timeout,
                    self.settings.limits.socket_buffer,
                )
                .await
            {
                Ok(conn) => {
                    shard.metrics.record(
                        crate::core::metrics::Hist::UpstreamConnect,
                        t0.elapsed().as_micros() as u64,
                    );
                    if shard.process.upstream_fault.clear() {
                        tracing::info!(
                            "upstream accepted an upgrade; the configuration fault is cleared"
                        );
                    }
                    lease.account.mark_connected();
                    self.placed.set(true);
                    shard.metrics.stream_opened(lease.account.metrics_index);
                    let scanner = FrameScanner::new(
                        Sender::Server,
                        self.settings.limits.max_frame_bytes as u64,
                    );
                    return Ok(Upstream {
                        conn,
                        lease,
                        buf,
                        scanner,
                    });
                }
                Err(crate::dataplane::upstream::ConnectError::Refused(status, _))
                    if UpstreamFault::is_config_fault(status) =>
                {
                    // The URL, not the account: every account would get the same.
                    shard.metrics.error(Side::Upstream, status);
                    if shard.process.upstream_fault.set(status) {
                        tracing::error!(stream = %self.id, status, "{}", UpstreamFault::describe(status));
                    }
                    return Err(Refusal::upstream_misconfigured(status));
                }
                Err(crate::dataplane::upstream::ConnectError::Certificate(why)) => {
                    // The URL's (or its CA's), not the account's: as a 404.
                    let status = UpstreamFault::CERTIFICATE;
                    shard.metrics.error(Side::Upstream, status);
                    if shard.process.upstream_fault.set(status) {
                        tracing::error!(stream = %self.id, status, why = %why, "{}", UpstreamFault::describe(status));
                    }
                    return Err(Refusal::upstream_misconfigured(status));
                }
                Err(crate::dataplane::upstream::ConnectError::Refused(status, scope)) => {
                    upstream_refused = true;
                    self.note_refusal(&lease, status, scope);
                    shard
                        .metrics
                        .upstream_error(lease.account.metrics_index, status);
                    self.moving_off(Some(lease.account.metrics_index), false);
                    if shard.process.upstream_log.admit() {
                        tracing::info!(stream = %self.id, account = %lease.account.id, status, "upstream refused the account; trying the next");
                    }
                    if status >= 500 {
                        unreachable = true;
                    }
                }
                Err(crate::dataplane::upstream::ConnectError::FileLimit) => {
                    // The relay's own limit: no account would do better.
                    shard
                        .process
                        .faults
                        .file_limit(crate::dataplane::accept::At::UpstreamConnect);
                    shard
                        .file_limit_log
                        .hit("upstream connect", &"too many open files");
                    return Err(Refusal::file_limit());
                }
                Err(crate::dataplane::upstream::ConnectError::Timeout) => {
                    // Held off on every shard, so later streams do not wait
                    // the whole timeout on it again.
                    unreachable = true;
                    lease.account.mark_timed_out(Instant::now());
                    shard
                        .metrics
                        .upstream_error(lease.account.metrics_index, 502);
                    self.moving_off(Some(lease.account.metrics_index), true);
                    if shard.process.upstream_log.admit() {
                        tracing::warn!(stream = %self.id, account = %lease.account.id, timeout = ?shard.connect_timeout, "upstream connect timed out; the account is held off");
                    }
                }
                Err(crate::dataplane::upstream::ConnectError::Unresolved(why)) => {
                    // The URL's, not the account's: no other account of the
                    // pool (the same URL) is tried for this stream, and none
                    // is held off.
                    unreachable = true;
                    let pool = &lease.account.pool;
                    for (i, s) in shard.ring.borrow().slots().iter().enumerate() {
                        if s.account.pool == *pool {
                            *tried |= 1 << i;
                        }
                    }
                    shard
                        .metrics
                        .upstream_error(lease.account.metrics_index, 502);
                    self.moving_off(None, true);
                    if shard.process.upstream_log.admit() {
                        tracing::warn!(stream = %self.id, account = %lease.account.id, pool = %pool, why = %why, "upstream's name did not resolve; no other account of the pool is tried for this stream");
                    }
                }
                Err(e) => {
                    unreachable = true;
                    shard
                        .metrics
                        .upstream_error(lease.account.metrics_index, 502);
                    self.moving_off(None, true);
                    if shard.process.upstream_log.admit() {
                        tracing::warn!(stream = %self.id, account = %lease.account.id, error = ?e, "upstream connect failed");
                    }
                }
            }
        }
    }

    /// A connection of a stream upstream has not accepted yet failed (refused
    /// at the upgrade or in upstream's first message, or lost: `lost`), on
    /// the account of metrics index `account` when that is a move off the
    /// account (`account_retries_total`). Counted once the stream goes on
    /// to another connection ([`moved_off`](Self::moved_off)): a failover
    /// at open, whether on the stream's first connection or the reopen
    /// after such a failover (a resume's reopen is mid-stream: the resume
    /// counts itself). A stream refused after it moved nowhere, and the
    /// client saw the refusal.
    pub(super) fn moving_off(&self, account: Option<usize>, lost: bool) {
        self.moving_off
            .set(Some((account, lost, !self.resuming.get())));
    }

    /// The stream went on to another connection after the failure
    /// [`moving_off`](Self::moving_off) noted, if any: counts that move.
    fn moved_off(&self) {
        if let Some((account, lost, at_open)) = self.moving_off.take() {
            if let Some(i) = account {
                self.shard.metrics.account_retry(i);
            }
            if at_open {
                self.shard.metrics.failover("open", lost);
            }
        }
    }

    /// Marks the account after upstream refused it with `code`.
    pub(super) fn note_refusal(&self, lease: &Lease, code: u16, scope: RateScope) {
        match code {
            401 | 402 => lease.account.mark_unhealthy(Instant::now()),
            429 => lease.account.mark_rate_limited(Instant::now(), scope),
            _ => {}
        }
    }
}
