//! Revocations: the device ids and token ids refused on this process
//! (a relay alone's own lists, or the fleet's from the shared store), and
//! the expiry of token id revocations once no token can carry the id.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Devices, Limit, Refused};
use crate::core::token::Claims;

impl Devices {
    /// Whether `claims`' device or token id is on this process's revocation
    /// lists.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.revoked_devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&claims.device_id)
            || self
                .revoked_tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&claims.token_id)
            || match self.forgotten_through.load(Ordering::Relaxed) {
                0 => false,
                mark => claims.issued_at <= mark,
            }
    }

    /// The refusal of a revoked device or token.
    pub fn revoked_refusal() -> Refused {
        Refused {
            limit: Limit::Revoked,
            message: "This device or session token has been revoked.".into(),
        }
    }

    /// Replaces both revocation lists with the fleet's, from the shared
    /// store: token ids with when Redis took them (Unix seconds, Redis's
    /// clock) and the clock skew recorded with them (seconds), kept by
    /// the fleet's bounds (see [`Devices::set_fleet_bounds`]); tokens
    /// issued at or before `through` stay refused (see
    /// [`Devices::forgotten_through`]), raised first so that no moment
    /// lacks both the dropped ids and it.
    pub fn replace_revoked(
        &self,
        devices: HashSet<String>,
        tokens: HashMap<String, Option<(u64, u64)>>,
        through: u64,
    ) {
        self.forgotten_through.fetch_max(through, Ordering::Relaxed);
        // Alone (another process's save taken): when each new one was
        // made. A fleet's are let go by Redis.
        if self.fleet_hold.load(Ordering::Relaxed) == u64::MAX {
            let mut made = self.revoked_made.lock().unwrap_or_else(|e| e.into_inner());
            made.retain(|id, _| tokens.contains_key(id));
            let now = (crate::control::accounts::unix_now(), Instant::now());
            for (id, held) in &tokens {
                if let (Some((at, _)), false) = (held, made.contains_key(id)) {
                    if let Some(t) = made_at(now, *at) {
                        made.insert(id.clone(), t);
                    }
                }
            }
        }
        *self
            .revoked_devices
            .write()
            .unwrap_or_else(|e| e.into_inner()) = devices;
        *self
            .revoked_tokens
            .write()
            .unwrap_or_else(|e| e.into_inner()) = tokens;
    }

    /// In a fleet: its nodes' longest `max_ttl` + `clock_skew` (`hold`),
    /// longest `max_ttl` (`ttl`) and largest `clock_skew` (`skew`),
    /// seconds, as of the last poll. A token id revocation is kept `ttl`
    /// plus the larger of `skew` and the skew recorded with it, and at
    /// least `hold`.
    pub fn set_fleet_bounds(&self, hold: u64, ttl: u64, skew: u64) {
        self.fleet_hold.store(hold, Ordering::Relaxed);
        self.fleet_ttl.store(ttl, Ordering::Relaxed);
        self.fleet_skew.store(skew, Ordering::Relaxed);
    }

    /// Every revoked token id with when it was revoked and the clock skew
    /// then, if known (Unix seconds, seconds), sorted by id.
    pub fn revoked_tokens_at(&self) -> Vec<(String, Option<(u64, u64)>)> {
        let mut v: Vec<_> = self
            .revoked_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, held)| (id.clone(), *held))
            .collect();
        v.sort();
        v
    }

    /// The token lifetime bounds in force, seconds: how long a token id
    /// revocation must be kept (`tokens.max_ttl` + `tokens.clock_skew`),
    /// and `tokens.clock_skew`.
    pub fn token_bounds(&self) -> (u64, u64) {
        let skew = self.token_skew.load(Ordering::Relaxed);
        (
            self.token_hold.load(Ordering::Relaxed).saturating_add(skew),
            skew,
        )
    }

    /// Denies a device id (its new streams are refused from now on).
    pub fn revoke_device(&self, device: &str) -> bool {
        self.revoked_devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_string())
    }

    /// Denies a token id, not knowing when yet (the fleet's way: the
    /// next load of the fleet's lists tells).
    pub fn revoke_token(&self, token_id: &str) -> bool {
        self.revoked_tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token_id.to_string(), None)
            .is_none()
    }

    /// Denies a token id revoked at `at` (Unix seconds) under a clock
    /// skew of `skew` seconds (`None`: the one in force): kept until no
    /// token carrying it can still be valid, `at` plus `tokens.max_ttl`
    /// plus the larger of `skew` and the skew in force
    /// ([`Devices::set_token_lifetime`]), then let go
    /// ([`Devices::expire_revoked_tokens`]). Revoking it again starts
    /// over.
    pub fn revoke_token_at(&self, token_id: &str, at: u64, skew: Option<u64>) -> bool {
        let skew = skew.unwrap_or_else(|| self.token_skew.load(Ordering::Relaxed));
        self.note_made(token_id, at);
        self.revoked_tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token_id.to_string(), Some((at, skew)))
            .is_none()
    }

    /// The token lifetime bounds in force (`tokens.max_ttl`,
    /// `tokens.clock_skew`): a token id revocation is kept their sum (the
    /// skew the larger of the one in force and the one when it was made).
    /// A token issued before the revocation (by a clock at most the skew
    /// then ahead of this one) lives at most `max_ttl` from its issue time.
    pub fn set_token_lifetime(&self, max_ttl: Duration, clock_skew: Duration) {
        let ceil = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        self.token_skew.store(ceil(clock_skew), Ordering::Relaxed);
        self.token_hold.store(ceil(max_ttl), Ordering::Relaxed);
    }

    /// The clock skew (seconds) that counts for a revocation made under
    /// `skew`: the larger of it and the one in force.
    fn token_skew_for(&self, skew: u64) -> u64 {
        skew.max(self.token_skew.load(Ordering::Relaxed))
    }

    /// When (Unix seconds) a revocation made at `at` under a clock skew
    /// of `skew` seconds expires: in a fleet by the fleet's bounds (its
    /// nodes' longest `max_ttl` plus the larger of their largest
    /// `clock_skew` and `skew`, and at least their longest `max_ttl` +
    /// `clock_skew`), else by this relay's `max_ttl` and the skew that
    /// counts.
    fn token_expiry(&self, at: u64, skew: u64) -> u64 {
        match self.fleet_hold.load(Ordering::Relaxed) {
            u64::MAX => at
                .saturating_add(self.token_hold.load(Ordering::Relaxed))
                .saturating_add(self.token_skew_for(skew)),
            fleet => at.saturating_add(
                fleet.max(
                    self.fleet_ttl
                        .load(Ordering::Relaxed)
                        .saturating_add(skew.max(self.fleet_skew.load(Ordering::Relaxed))),
                ),
            ),
        }
    }

    /// Notes when, by the monotonic clock, the revocation of `token_id`
    /// made at `at` (Unix seconds, by the wall clock) was made: its age by
    /// the wall clock now before this instant (none when it is older than
    /// the monotonic clock can tell).
    fn note_made(&self, token_id: &str, at: u64) {
        let now = (crate::control::accounts::unix_now(), Instant::now());
        let mut made = self.revoked_made.lock().unwrap_or_else(|e| e.into_inner());
        match made_at(now, at) {
            Some(t) => made.insert(token_id.to_string(), t),
            None => made.remove(token_id),
        };
    }

    /// Whether the revocation of `token_id` made at `at`, due at `due`
    /// (Unix seconds), has been kept its whole time by the monotonic
    /// clock too.
    fn held_long_enough(
        &self,
        made: &HashMap<String, Instant>,
        token_id: &str,
        at: u64,
        due: u64,
    ) -> bool {
        made.get(token_id)
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(due.saturating_sub(at)))
    }

    /// Lets go of the token id revocations that have expired at `now`
    /// (Unix seconds), and refuses from then on every token issued at or
    /// before the latest of them plus the clock-skew allowance: under the
    /// bounds in force every such token has expired too, and were
    /// `tokens.max_ttl` raised later, one that lived longer, revoked
    /// or not, stays refused. Returns how many went.
    pub fn expire_revoked_tokens(&self, now: u64) -> usize {
        let mut mark = 0;
        let mut gone = 0;
        let mut made = self.revoked_made.lock().unwrap_or_else(|e| e.into_inner());
        self.revoked_tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, held| match *held {
                Some((at, skew))
                    if self.token_expiry(at, skew) <= now
                        && self.held_long_enough(&made, id, at, self.token_expiry(at, skew)) =>
                {
                    mark = mark.max(at.saturating_add(self.token_skew_for(skew)));
                    made.remove(id);
                    gone += 1;
                    false
                }
                _ => true,
            });
        drop(made);
        self.forgotten_through.fetch_max(mark, Ordering::Relaxed);
        gone
    }

    /// Tokens issued at or before this (Unix seconds) are refused, since
    /// a revocation that could name them has expired (0: none).
    pub fn forgotten_through(&self) -> u64 {
        self.forgotten_through.load(Ordering::Relaxed)
    }

    /// Raises [`Devices::forgotten_through`] to `mark` (as saved).
    pub fn set_forgotten_through(&self, mark: u64) {
        self.forgotten_through.fetch_max(mark, Ordering::Relaxed);
    }

    /// The token id revocations that expire, with when they were made
    /// (Unix seconds), the clock skew then (seconds), and when they expire
    /// (Unix seconds), sorted by id.
    pub fn revoked_token_times(&self) -> Vec<(String, u64, u64, u64)> {
        let mut v: Vec<_> = self
            .revoked_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(id, held)| {
                let (at, skew) = (*held)?;
                Some((id.clone(), at, skew, self.token_expiry(at, skew)))
            })
            .collect();
        v.sort();
        v
    }

    /// Whether `device` is revoked.
    pub fn device_revoked(&self, device: &str) -> bool {
        self.revoked_devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(device)
    }

    /// Whether `token_id` is revoked, and then until when (Unix seconds)
    /// if that is known yet.
    pub fn token_revoked(&self, token_id: &str) -> Option<Option<u64>> {
        let held = *self
            .revoked_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token_id)?;
        Some(held.map(|(at, skew)| self.token_expiry(at, skew)))
    }

    /// How many device ids and token ids are revoked.
    pub fn revoked_counts(&self) -> (usize, usize) {
        (
            self.revoked_devices
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            self.revoked_tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
        )
    }

    /// Lifts a device or token revocation.
    pub fn unrevoke(&self, device: Option<&str>, token_id: Option<&str>) -> bool {
        let mut any = false;
        if let Some(d) = device {
            any |= self
                .revoked_devices
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(d);
        }
        if let Some(t) = token_id {
            self.revoked_made
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(t);
            any |= self
                .revoked_tokens
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(t)
                .is_some();
        }
        any
    }

    /// Of the revoked device ids in order, the first `limit` after
    /// `after`, and whether more follow.
    pub fn revoked_devices_page(&self, after: Option<&str>, limit: usize) -> (Vec<String>, bool) {
        let set = self
            .revoked_devices
            .read()
            .unwrap_or_else(|e| e.into_inner());
        page_of(set.iter(), after, limit)
    }

    /// Of the revoked token ids in order, the first `limit` after
    /// `after`, each with when its revocation expires (when known), and
    /// whether more follow.
    pub fn revoked_tokens_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, Option<u64>)>, bool) {
        let map = self
            .revoked_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (ids, more) = page_of(map.keys(), after, limit);
        let page = ids
            .into_iter()
            .map(|id| {
                let until = map
                    .get(&id)
                    .copied()
                    .flatten()
                    .map(|(at, skew)| self.token_expiry(at, skew));
                (id, until)
            })
            .collect();
        (page, more)
    }

    /// The revoked device ids and token ids, sorted.
    pub fn revoked(&self) -> (Vec<String>, Vec<String>) {
        let mut d: Vec<_> = self
            .revoked_devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut t: Vec<_> = self
            .revoked_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        d.sort();
        t.sort();
        (d, t)
    }
}

/// The monotonic instant a revocation made at `at` (Unix seconds) was
/// made, from `now` (Unix seconds, and the same moment's instant): its
/// age by the wall clock before it; `None` when older than the monotonic
/// clock can tell.
fn made_at(now: (u64, Instant), at: u64) -> Option<Instant> {
    now.1
        .checked_sub(Duration::from_secs(now.0.saturating_sub(at)))
}

/// Of `ids`, the first `limit` after `after` in order, and whether more
/// follow: a pass over the ids and a sort of the page alone, so a page of
/// a long list costs the list's length once, not its sort.
fn page_of<'a>(
    ids: impl Iterator<Item = &'a String>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<String>, bool) {
    let mut page: Vec<&String> = ids
        .filter(|id| after.is_none_or(|a| id.as_str() > a))
        .collect();
    let more = page.len() > limit;
    if more {
        page.select_nth_unstable(limit);
        page.truncate(limit);
    }
    page.sort_unstable();
    (page.into_iter().cloned().collect(), more)
}

#[cfg(test)]
mod tests {
    use super::page_of;

    #[test]
    fn pages_walk_the_ids_in_order_each_once() {
        let ids: Vec<String> = (0..1003)
            .map(|i| format!("id-{:05}", (i * 7919) % 1003))
            .collect();
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = page_of(ids.iter(), after.as_deref(), 100);
            assert!(page.len() <= 100);
            assert_eq!(more, page.len() == 100 && walked.len() + 100 < ids.len());
            walked.extend(page);
            if !more {
                break;
            }
            after = walked.last().cloned();
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(walked, sorted);
        assert_eq!(page_of(ids.iter(), Some("id-99999"), 10), (vec![], false));
    }
}
