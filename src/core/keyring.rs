//! The per-shard key ring: which Soniox account serves a new stream.
//!
//! Each shard owns a [`KeyRing`]: a preallocated vector of account slots,
//! picked from without a lock. What must be the same on every shard lives in
//! one [`AccountState`] per account, shared by `Arc`: the live-stream count
//! (so `max_concurrent_streams` holds across all shards together) and health.
//! Those atomics are touched when a stream opens or closes, or an upstream
//! refuses a key, never per frame.
//!
//! Why one shared count instead of a per-shard split of each account's limit:
//! Soniox enforces the limit per account, not per relay core; a split strands
//! capacity on whichever shard the kernel happened to give fewer connections,
//! and refuses streams the account could carry. One compare-and-swap per
//! stream open is cheap and exact.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::secret::Secret;

/// How long an account that answered 401/402 is left out before it is tried
/// again when active health checks are off (with them on, the admin thread
/// sets an hour, ended early when a check of its key passes).
pub const UNHEALTHY_HOLDOFF: Duration = Duration::from_secs(60);
/// First cooldown after a 429; doubled on each further 429, up to the cap.
pub const COOLDOWN_START: Duration = Duration::from_secs(1);
/// Longest cooldown after repeated 429s.
pub const COOLDOWN_MAX: Duration = Duration::from_secs(60);
/// First hold-off after a connect or upgrade timeout; doubled on each
/// further timeout, up to [`COOLDOWN_MAX`]. Longer than a 429's: a
/// black-holed endpoint costs every stream that tries it a whole
/// `upstream.connect_timeout`.
pub const TIMEOUT_HOLDOFF_START: Duration = Duration::from_secs(5);

/// One API key of an account, shared by every shard. An account has one
/// current key and, during a rotation, retiring keys that keep the streams
/// they already carry.
#[derive(Debug)]
pub struct KeySlot {
    /// The key. Only the upstream handshake reads it.
    pub key: Secret,
    /// `Secret::fingerprint` of the key, computed once: what the admin API,
    /// logs and metrics show instead of the key.
    pub fingerprint: String,
    /// When the key was added (Unix seconds), for key-age warnings.
    pub created_at: u64,
    /// Live streams on this key, across all shards.
    pub live: AtomicU32,
    /// Streams ever started on this key.
    pub streams_total: AtomicU64,
    /// 0 for a current key; for a retiring key, when its overlap ends (Unix seconds).
    pub retire_at: AtomicU64,
    /// The overlap ended and the streams still on the key were told to end.
    pub ending: AtomicBool,
    /// Takes the key out of upstream's bytes before they reach a client,
    /// should upstream echo it; built once for every stream on the key.
    pub redactor: crate::core::secret::Redactor,
}

impl KeySlot {
    /// A current key created at `created_at`.
    pub fn new(key: Secret, created_at: u64) -> Arc<KeySlot> {
        Arc::new(KeySlot {
            fingerprint: key.fingerprint(),
            redactor: crate::core::secret::Redactor::new(&key),
            key,
            created_at,
            live: AtomicU32::new(0),
            streams_total: AtomicU64::new(0),
            retire_at: AtomicU64::new(0),
            ending: AtomicBool::new(false),
        })
    }
}

/// Which level a Soniox 429 was about: limits apply per project and per
/// organisation, and back off separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The project's limit (the usual case).
    Project,
    /// The organisation's limit (the message names the organisation).
    Organization,
}

impl RateScope {
    /// Reads the scope from a Soniox 429 message.
    pub fn from_message(message: &str) -> RateScope {
        let m = message.to_ascii_lowercase();
        if m.contains("organization")
            || m.contains("organisation")
            || m.contains(" org ")
            || m.contains("org-level")
            || m.contains("org level")
        {
            RateScope::Organization
        } else {
            RateScope::Project
        }
    }
}

/// A cooldown that doubles on each further 429 (or timeout), up to
/// [`COOLDOWN_MAX`]. Failures while it runs do not double it: they are of
/// opens already under way when it began, the same episode. Counting them
/// held the only account of a relay off for the whole minute after one
/// overloaded second in which 230 opens timed out together, and every
/// stream of the next 30 s was refused.
#[derive(Debug, Default)]
struct Backoff {
    until_ms: AtomicU64,
    step_ms: AtomicU64,
}

impl Backoff {
    fn hit(&self, now_ms: u64, start: Duration) {
        if self.active(now_ms) {
            return;
        }
        let prev = self.step_ms.load(Ordering::Relaxed);
        let next = if prev == 0 {
            start.as_millis() as u64
        } else {
            (prev * 2).min(COOLDOWN_MAX.as_millis() as u64)
        };
        self.step_ms.store(next, Ordering::Relaxed);
        self.until_ms.store(now_ms + next, Ordering::Relaxed);
    }
    fn reset(&self) {
        if self.step_ms.load(Ordering::Relaxed) != 0 {
            self.step_ms.store(0, Ordering::Relaxed);
        }
    }
    fn active(&self, now_ms: u64) -> bool {
        self.until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// No limit known from upstream.
pub const NO_UPSTREAM_CAP: u32 = u32::MAX;

/// [`AccountState`]'s fleet-wide count is not known.
const NOT_KNOWN: u32 = u32::MAX;

/// One account's state, shared by every shard.
#[derive(Debug)]
pub struct AccountState {
    /// Account id from the config (public).
    pub id: String,
    /// Index of the account in the shards' metrics (stable for the process's life).
    pub metrics_index: usize,
    /// Region label (public).
    pub region: std::sync::Mutex<String>,
    /// The pool the account belongs to: which endpoint its streams go to
    /// and which tokens may use it. Fixed for the state's life (moving an
    /// account to another pool makes a new state).
    pub pool: String,
    /// Disabled accounts take no new streams.
    pub enabled: AtomicBool,
    /// Limit on live streams across all shards.
    pub max_concurrent: AtomicU32,
    /// Live streams across all shards.
    pub live: AtomicU32,
    /// In a fleet whose shared store is unreachable: the number of nodes
    /// the limit is shared among (1 otherwise).
    share: AtomicU32,
    /// In a fleet: live streams on every node, as the store last said
    /// (polled every 200 ms); [`NOT_KNOWN`] alone or while it is unreachable.
    fleet_live: AtomicU32,
    /// Streams upstream will still take on this key, from the last health
    /// check's `/v1/concurrency-limits` (its limit minus use by others);
    /// [`NO_UPSTREAM_CAP`] when unknown.
    pub upstream_cap: AtomicU32,
    /// Left out of picks until this time (ms since `epoch`) after a 401/402.
    unhealthy_until_ms: AtomicU64,
    /// How long a 401/402 holds the account off: short without active health
    /// checks, long with them (a passing check clears it).
    unhealthy_holdoff_ms: AtomicU64,
    /// Cooldown after project-level 429s.
    project: Backoff,
    /// Cooldown after organisation-level 429s.
    organization: Backoff,
    /// Hold-off after connect or upgrade timeouts.
    timed_out: Backoff,
    epoch: Instant,
}

impl AccountState {
    /// A new, healthy account.
    pub fn new(
        id: &str,
        metrics_index: usize,
        region: &str,
        pool: &str,
        enabled: bool,
        max_concurrent: u32,
        epoch: Instant,
    ) -> Arc<Self> {
        Arc::new(AccountState {
            id: id.to_string(),
            metrics_index,
            region: std::sync::Mutex::new(region.to_string()),
            pool: pool.to_string(),
            enabled: AtomicBool::new(enabled),
            max_concurrent: AtomicU32::new(max_concurrent),
            live: AtomicU32::new(0),
            share: AtomicU32::new(1),
            fleet_live: AtomicU32::new(NOT_KNOWN),
            upstream_cap: AtomicU32::new(NO_UPSTREAM_CAP),
            unhealthy_until_ms: AtomicU64::new(0),
            unhealthy_holdoff_ms: AtomicU64::new(UNHEALTHY_HOLDOFF.as_millis() as u64),
            project: Backoff::default(),
            organization: Backoff::default(),
            timed_out: Backoff::default(),
            epoch,
        })
    }

    /// The region label (read by the control plane only).
    pub fn region(&self) -> String {
        self.region
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether a stream may be given to this account at `now`.
    pub fn available(&self, now: Instant) -> bool {
        let ms = self.ms(now);
        self.enabled.load(Ordering::Relaxed)
            && self.healthy(now)
            && !self.project.active(ms)
            && !self.organization.active(ms)
    }

    /// Whether the account is healthy (not held off after a 401/402 or a
    /// connect timeout) at `now`.
    pub fn healthy(&self, now: Instant) -> bool {
        let ms = self.ms(now);
        self.unhealthy_until_ms.load(Ordering::Relaxed) <= ms && !self.timed_out.active(ms)
    }

    /// Whether the account is held off after a connect or upgrade timeout.
    pub fn timed_out(&self, now: Instant) -> bool {
        self.timed_out.active(self.ms(now))
    }

    /// Connecting or upgrading with this account timed out: leave it out of
    /// every shard's picks for a hold-off that doubles on each further
    /// timeout (from [`TIMEOUT_HOLDOFF_START`] up to [`COOLDOWN_MAX`]).
    pub fn mark_timed_out(&self, now: Instant) {
        self.timed_out.hit(self.ms(now), TIMEOUT_HOLDOFF_START);
    }

    /// Whether a 429 cooldown is running at `now`, and at which level.
    pub fn cooling_down(&self, now: Instant) -> Option<RateScope> {
        let ms = self.ms(now);
        if self.organization.active(ms) {
            Some(RateScope::Organization)
        } else if self.project.active(ms) {
            Some(RateScope::Project)
        } else {
            None
        }
    }

    /// The fleet-wide limit: the configured one, or less if upstream said so.
    pub fn fleet_max(&self) -> u32 {
        self.max_concurrent
            .load(Ordering::Relaxed)
            .min(self.upstream_cap.load(Ordering::Relaxed))
    }

    /// The limit in force in this process: [`AccountState::fleet_max`], or
    /// this node's share of it while a fleet's shared store is unreachable.
    pub fn effective_max(&self) -> u32 {
        let max = self.fleet_max();
        match self.share.load(Ordering::Relaxed) {
            0 | 1 => max,
            n if max == 0 => max / n,
            n => (max / n).max(1),
        }
    }

    /// Live streams on the account for the limit it is held to
    /// ([`AccountState::effective_max`]): the fleet's (at most 200 ms old,
    /// and never below this node's own) while the whole limit is the
    /// fleet's, else this node's, held to its share (the store
    /// unreachable, or settling after a loss while it answers).
    pub fn live_for_limit(&self) -> u32 {
        let here = self.live.load(Ordering::Relaxed);
        if self.share.load(Ordering::Relaxed) > 1 {
            return here;
        }
        match self.fleet_live.load(Ordering::Relaxed) {
            NOT_KNOWN => here,
            fleet => fleet.max(here),
        }
    }

    /// The fleet's live streams on the account, from the shared store
    /// (`None`: not known).
    pub fn set_fleet_live(&self, live: Option<u32>) {
        self.fleet_live
            .store(live.unwrap_or(NOT_KNOWN), Ordering::Relaxed);
    }

    /// Shares the limit among `nodes` (1: the whole limit is this node's).
    pub fn set_share(&self, nodes: u32) {
        self.share.store(nodes.max(1), Ordering::Relaxed);
    }

    /// Free stream slots now.
    pub fn headroom(&self) -> u32 {
        self.effective_max()
            .saturating_sub(self.live.load(Ordering::Relaxed))
    }

    /// Sets how long a 401/402 holds the account off.
    pub fn set_unhealthy_holdoff(&self, holdoff: Duration) {
        self.unhealthy_holdoff_ms
            .store(holdoff.as_millis() as u64, Ordering::Relaxed);
    }

    /// Upstream refused the key (401, 402): leave it out of every shard's picks.
    pub fn mark_unhealthy(&self, now: Instant) {
        let holdoff = self.unhealthy_holdoff_ms.load(Ordering::Relaxed);
        self.unhealthy_until_ms
            .store(self.ms(now) + holdoff.max(1), Ordering::Relaxed);
    }

    /// Upstream said 429: cool down at that level, twice as long as last time.
    pub fn mark_rate_limited(&self, now: Instant, scope: RateScope) {
        match scope {
            RateScope::Project => self.project.hit(self.ms(now), COOLDOWN_START),
            RateScope::Organization => self.organization.hit(self.ms(now), COOLDOWN_START),
        }
    }

    /// Upstream accepted a stream (its first message on a connection was
    /// not an error), or an active check passed: healthy again, backoffs
    /// reset. An upgrade alone is no such success: with the key in the
    /// config message (or a key upstream checks only once the stream
    /// starts) every upgrade is taken, and the refusal comes after it.
    pub fn mark_ok(&self) {
        if self.unhealthy_until_ms.load(Ordering::Relaxed) != 0 {
            self.unhealthy_until_ms.store(0, Ordering::Relaxed);
        }
        self.project.reset();
        self.organization.reset();
        self.timed_out.reset();
    }

    /// Upstream answered a connection's upgrade in time: the hold-off
    /// after timeouts starts from its first step again. Only that: the
    /// key's refusals may still come in the answer to the config.
    pub fn mark_connected(&self) {
        self.timed_out.reset();
    }

    /// Reserves one stream slot if under the limit.
    fn try_reserve(&self) -> bool {
        let max = self.effective_max();
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |live| {
                (live < max).then_some(live + 1)
            })
            .is_ok()
    }
}

/// One slot of a key ring: an account and the key new streams on it use.
#[derive(Debug, Clone)]
pub struct RingSlot {
    /// The account.
    pub account: Arc<AccountState>,
    /// Its current key.
    pub key: Arc<KeySlot>,
}

/// A stream's hold on one account and key; released when dropped.
#[derive(Debug)]
pub struct Lease {
    /// The account.
    pub account: Arc<AccountState>,
    /// The key the stream uses for its whole life.
    pub key: Arc<KeySlot>,
    /// The slot's position in the ring (for the stream's tried-set).
    pub slot: usize,
    /// In a fleet: the stream's count in the shared store.
    pub fleet: Option<crate::core::cluster::FleetHold>,
    /// The stream's place in its pool (`[pool.NAME] max_streams`), taken
    /// by the stream before it connects.
    pub pool: Option<crate::core::pool_limits::PoolHold>,
    /// The places were given back before the lease is dropped
    /// ([`Lease::give_back`]).
    given_back: bool,
}

impl Lease {
    /// Gives the stream's places back (on the account, its key, the
    /// fleet's count and the pool's) while the lease is still kept for
    /// what it names: its connection failed, and the stream's next one
    /// takes places of its own, maybe on the same account. Held until
    /// then, the failed connection's place left an account at its limit
    /// no room for the very stream that held it.
    pub fn give_back(&mut self) {
        self.give_back_live();
        self.fleet = None;
        self.pool = None;
    }

    /// The account's and the key's live counts, once (the fleet's and
    /// the pool's holds give theirs back as they drop).
    fn give_back_live(&mut self) {
        if !std::mem::replace(&mut self.given_back, true) {
            self.account.live.fetch_sub(1, Ordering::AcqRel);
            self.key.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.give_back_live();
    }
}

/// One shard's ring of account slots. Replaced whole when the control plane
/// publishes a new version (accounts added, removed, keys rotated); enabling,
/// disabling, limits and health are atomics in [`AccountState`] and reach
/// every shard at once.
#[derive(Debug)]
pub struct KeyRing {
    slots: Vec<RingSlot>,
    /// Where the next tie-break starts, so equal accounts share the load.
    cursor: usize,
}

/// At most this many accounts (a stream's tried-set is a 64-bit mask).
pub const MAX_ACCOUNTS: usize = 64;

impl KeyRing {
    /// A ring over the given slots (the same `Arc`s on every shard).
    pub fn new(slots: &[RingSlot]) -> KeyRing {
        let mut ring = KeyRing {
            slots: Vec::with_capacity(MAX_ACCOUNTS),
            cursor: 0,
        };
        ring.replace(slots);
        ring
    }

    /// Installs a new version of the slots, reusing the preallocated vector.
    pub fn replace(&mut self, slots: &[RingSlot]) {
        self.slots.clear();
        self.slots.extend(slots.iter().take(MAX_ACCOUNTS).cloned());
        self.cursor = 0;
    }

    /// The slots in ring order.
    pub fn slots(&self) -> &[RingSlot] {
        &self.slots
    }

    /// Picks the available account of one of `pools` (a stream's token's
    /// pools: never an account outside them) with the most headroom that
    /// is not in `tried` (bit i = slot i), and reserves a slot on it. Local
    /// apart from the reservation's compare-and-swap.
    pub fn pick(&mut self, now: Instant, tried: u64, pools: &[String]) -> Option<Lease> {
        let n = self.slots.len();
        // Few accounts: try best-first without sorting or allocating.
        let mut excluded = tried | self.outside(pools);
        for _ in 0..n {
            let mut best: Option<(usize, u32)> = None;
            for k in 0..n {
                let i = (self.cursor + k) % n;
                let a = &self.slots[i].account;
                if excluded & (1 << i) != 0 || !a.available(now) {
                    continue;
                }
                let h = a.headroom();
                if h > 0 && best.is_none_or(|(_, bh)| h > bh) {
                    best = Some((i, h));
                }
            }
            let (i, _) = best?;
            let slot = &self.slots[i];
            if slot.account.try_reserve() {
                self.cursor = (i + 1) % n;
                slot.key.live.fetch_add(1, Ordering::AcqRel);
                slot.key.streams_total.fetch_add(1, Ordering::Relaxed);
                return Some(Lease {
                    account: slot.account.clone(),
                    key: slot.key.clone(),
                    slot: i,
                    fleet: None,
                    pool: None,
                    given_back: false,
                });
            }
            excluded |= 1 << i; // lost a race with another shard: next best
        }
        None
    }
}

impl KeyRing {
    /// The slots whose account is in none of `pools` (bit i = slot i), in
    /// this version of the ring.
    fn outside(&self, pools: &[String]) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !pools.iter().any(|p| *p == s.account.pool))
            .fold(0, |mask, (i, _)| mask | 1 << i)
    }

    /// The accounts a new stream may go to (of one of `pools`, available,
    /// not in `tried`), in ring order from the tie-break cursor, with their
    /// fleet-wide limits: what a fleet's shared store chooses from.
    pub fn candidates(&self, now: Instant, tried: u64, pools: &[String]) -> Vec<(String, u32)> {
        let n = self.slots.len();
        let excluded = tried | self.outside(pools);
        (0..n)
            .map(|k| (self.cursor + k) % n)
            .filter(|&i| excluded & (1 << i) == 0 && self.slots[i].account.available(now))
            .map(|i| {
                let a = &self.slots[i].account;
                (a.id.clone(), a.fleet_max())
            })
            .collect()
    }

    /// Reserves a slot on the account `id` (chosen by the shared store),
    /// if it is (still) of one of `pools`.
    pub fn reserve(&mut self, id: &str, pools: &[String]) -> Option<Lease> {
        let n = self.slots.len();
        let i = self
            .slots
            .iter()
            .position(|s| s.account.id == id && pools.iter().any(|p| *p == s.account.pool))?;
        let slot = &self.slots[i];
        slot.account.live.fetch_add(1, Ordering::AcqRel);
        self.cursor = (i + 1) % n;
        slot.key.live.fetch_add(1, Ordering::AcqRel);
        slot.key.streams_total.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            account: slot.account.clone(),
            key: slot.key.clone(),
            slot: i,
            fleet: None,
            pool: None,
            given_back: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any() -> Vec<String> {
        vec!["default".to_string()]
    }

    fn accounts(limits: &[u32]) -> Vec<RingSlot> {
        let epoch = Instant::now();
        limits
            .iter()
            .enumerate()
            .map(|(i, &m)| RingSlot {
                account: AccountState::new(&format!("a{i}"), i, "r", "default", true, m, epoch),
                key: KeySlot::new(Secret::new(format!("k{i}")), 0),
            })
            .collect()
    }

    #[test]
    fn picks_most_headroom_and_enforces_limits_across_rings() {
        let accts = accounts(&[2, 3]);
        let mut ring0 = KeyRing::new(&accts);
        let mut ring1 = KeyRing::new(&accts);
        let now = Instant::now();
        let a = ring0.pick(now, 0, &any()).unwrap();
        assert_eq!(a.slot, 1, "3 free beats 2 free");
        let mut held = vec![a];
        // Two shards share the same limits: 5 streams in all, then none.
        for i in 0..4 {
            let ring = if i % 2 == 0 { &mut ring1 } else { &mut ring0 };
            held.push(ring.pick(now, 0, &any()).unwrap());
        }
        assert!(ring0.pick(now, 0, &any()).is_none());
        assert!(ring1.pick(now, 0, &any()).is_none());
        assert_eq!(accts[0].account.live.load(Ordering::Relaxed), 2);
        assert_eq!(
            accts[0].key.live.load(Ordering::Relaxed),
            2,
            "per-key counts too"
        );
        assert_eq!(accts[1].key.streams_total.load(Ordering::Relaxed), 3);
        held.pop();
        assert!(
            ring1.pick(now, 0, &any()).is_some(),
            "a released slot is free again"
        );
    }

    #[test]
    fn unhealthy_and_cooldown_accounts_are_skipped_everywhere() {
        let accts = accounts(&[5, 5]);
        let mut ring = KeyRing::new(&accts);
        let now = Instant::now();
        accts[0].account.mark_unhealthy(now);
        assert!(!accts[0].account.healthy(now));
        for _ in 0..3 {
            assert_eq!(ring.pick(now, 0, &any()).unwrap().slot, 1);
        }
        assert!(accts[0]
            .account
            .healthy(now + UNHEALTHY_HOLDOFF + Duration::from_millis(1)));
        accts[1].account.mark_rate_limited(now, RateScope::Project);
        assert!(ring.pick(now, 0, &any()).is_none());
        assert!(ring
            .pick(now + Duration::from_millis(1001), 0, &any())
            .is_some());
        // Refused again while the cooldown runs (an open already under
        // way): the same episode, not doubled.
        accts[1]
            .account
            .mark_rate_limited(now + Duration::from_millis(500), RateScope::Project);
        assert!(accts[1]
            .account
            .available(now + Duration::from_millis(1001)));
        // Refused again after it: doubled.
        let again = now + Duration::from_millis(1001);
        accts[1]
            .account
            .mark_rate_limited(again, RateScope::Project);
        assert!(
            !accts[1]
                .account
                .available(again + Duration::from_millis(1500)),
            "backoff doubled to 2 s"
        );
        accts[1].account.mark_ok();
        let later = again + Duration::from_millis(2001);
        accts[1]
            .account
            .mark_rate_limited(later, RateScope::Project);
        assert!(
            accts[1]
                .account
                .available(later + Duration::from_millis(1001)),
            "reset after success"
        );
    }

    /// Many opens that time out together hold the account off once, for
    /// the first hold-off; a timeout after it ends doubles it.
    #[test]
    fn timeouts_of_one_burst_do_not_stretch_the_hold_off() {
        let accts = accounts(&[5]);
        let now = Instant::now();
        let a = &accts[0].account;
        for ms in 0..230 {
            a.mark_timed_out(now + Duration::from_millis(ms));
        }
        let end = now + TIMEOUT_HOLDOFF_START;
        assert!(a.timed_out(end - Duration::from_millis(1)));
        assert!(!a.timed_out(end), "one hold-off for the burst");
        a.mark_timed_out(end);
        assert!(
            a.timed_out(end + TIMEOUT_HOLDOFF_START + Duration::from_millis(1)),
            "a timeout after the hold-off doubles it"
        );
    }

    #[test]
    fn tried_accounts_are_excluded_and_disabled_skipped() {
        let accts = accounts(&[5, 5, 5]);
        let mut ring = KeyRing::new(&accts);
        let now = Instant::now();
        accts[2].account.enabled.store(false, Ordering::Relaxed);
        let l = ring.pick(now, 0b001, &any()).unwrap();
        assert_eq!(l.slot, 1);
        assert!(ring.pick(now, 0b011, &any()).is_none());
    }

    #[test]
    fn picks_only_inside_the_pools_asked_for() {
        let epoch = Instant::now();
        let slot = |id: &str, pool: &str, max: u32, i: usize| RingSlot {
            account: AccountState::new(id, i, "", pool, true, max, epoch),
            key: KeySlot::new(Secret::new(format!("k-{id}")), 0),
        };
        // The US account has far more room; an EU stream still never gets it.
        let accts = vec![
            slot("us-1", "us", 100, 0),
            slot("eu-1", "eu", 1, 1),
            slot("eu-2", "eu", 1, 2),
        ];
        let mut ring = KeyRing::new(&accts);
        let now = Instant::now();
        let eu = vec!["eu".to_string()];
        let a = ring.pick(now, 0, &eu).unwrap();
        let b = ring.pick(now, 0, &eu).unwrap();
        assert_eq!(
            [a.account.pool.as_str(), b.account.pool.as_str()],
            ["eu", "eu"]
        );
        assert!(ring.pick(now, 0, &eu).is_none(), "EU full: none, not US");
        // What a fleet's store chooses from: the EU accounts only.
        let ids: Vec<_> = ring
            .candidates(now, 0, &eu)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert!(
            ids.len() == 2 && !ids.contains(&"us-1".to_string()),
            "{ids:?}"
        );
        assert!(
            ring.reserve("us-1", &eu).is_none(),
            "the store cannot pick US"
        );
        assert_eq!(
            ring.pick(now, 0, &["us".into()]).unwrap().account.id,
            "us-1"
        );
        let both = vec!["eu".to_string(), "us".to_string()];
        assert_eq!(ring.candidates(now, 0, &both).len(), 3);
        assert!(ring.pick(now, 0, &["default".into()]).is_none());
        drop(a);
        assert_eq!(ring.pick(now, 0, &eu).unwrap().account.pool, "eu");
        assert!(ring.reserve("eu-1", &eu).is_some());
    }
}
