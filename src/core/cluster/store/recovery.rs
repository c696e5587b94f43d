//! What the cluster thread does around an outage or a loss of the
//! store's data: the settle period and this node's shares, the epoch and
//! version check after which this node gives back what it knows
//! ([`crate::core::cluster::scripts::RESEED`]), and the changes kept
//! while the store was unreachable, sent when it answers again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::{Worker, POLL};

/// A revocation change (see [`crate::core::cluster::Job::Revoke`]).
#[derive(Clone)]
pub(super) struct Revocation {
    pub(super) device: Option<String>,
    pub(super) token: Option<String>,
    pub(super) end_live: bool,
    pub(super) lift: bool,
}

impl Revocation {
    /// Adds the change to `pipe`, its version bump last.
    pub(super) fn add_to(&self, pipe: &mut redis::Pipeline) {
        let op = if self.lift { "SREM" } else { "SADD" };
        if let Some(d) = &self.device {
            pipe.cmd(op).arg("clio:rev:dev").arg(d).ignore();
        }
        match &self.token {
            // Timed by Redis when it takes it: a change kept while the
            // store was unreachable counts from when it is shared, later
            // than it was made, so it is kept longer, never shorter.
            Some(t) if !self.lift => {
                pipe.cmd("EVAL")
                    .arg(crate::core::cluster::scripts::REVOKE_TOKEN)
                    .arg(0)
                    .arg(t)
                    .ignore();
            }
            Some(t) => {
                pipe.cmd("SREM").arg("clio:rev:tok").arg(t).ignore();
                pipe.cmd("ZREM").arg("clio:rev:tokat").arg(t).ignore();
                pipe.cmd("ZREM").arg("clio:rev:tokskew").arg(t).ignore();
            }
            None => {}
        }
        if self.end_live && !self.lift {
            pipe.cmd("XADD")
                .arg("clio:ends")
                .arg("MAXLEN")
                .arg("~")
                .arg(1000)
                .arg("*")
                .arg("device")
                .arg(self.device.as_deref().unwrap_or(""))
                .arg("token")
                .arg(self.token.as_deref().unwrap_or(""))
                .ignore();
        }
        pipe.cmd("HINCRBY").arg("clio:ver").arg("rev").arg(1);
    }
}

/// Revocation changes waiting for the store, the last of each device or
/// token id: a later change of an id takes the place of the earlier one
/// (only the last matters once both reach the store), so the list grows
/// with the ids changed, not with the calls. A revoke keeps the earlier
/// one's "end the live streams"; a lift drops it.
#[derive(Default)]
pub(super) struct Waiting {
    list: Vec<Revocation>,
    /// (device, token) → its place in `list`.
    at: HashMap<(Option<String>, Option<String>), usize>,
}

impl Waiting {
    /// Keeps `change`, in place of an earlier change of the same id.
    pub(super) fn keep(&mut self, change: Revocation) {
        let id = (change.device.clone(), change.token.clone());
        match self.at.get(&id) {
            Some(&i) => {
                let c = &mut self.list[i];
                let end_live = !change.lift && (change.end_live || (!c.lift && c.end_live));
                *c = Revocation { end_live, ..change };
            }
            None => {
                self.at.insert(id, self.list.len());
                self.list.push(change);
            }
        }
    }

    /// The changes, in the order their ids first changed.
    pub(super) fn changes(&self) -> &[Revocation] {
        &self.list
    }

    /// Takes every change out.
    pub(super) fn take(&mut self) -> Vec<Revocation> {
        self.at.clear();
        std::mem::take(&mut self.list)
    }
}

impl Worker {
    /// While the store is down or settling, each node takes its share of
    /// every account's limit; otherwise the whole limit is the fleet's.
    pub(super) fn set_shares(&self) {
        let whole = self.fleet.store_up() && !self.settling();
        let share = if whole { 1 } else { self.fleet.nodes() };
        for a in self.links.process.accounts() {
            a.set_share(share);
        }
    }

    /// Whether the store is settling after a loss (see [`crate::core::cluster::scripts::RESEED`]).
    pub(super) fn settling(&self) -> bool {
        self.settle_until.is_some_and(|t| Instant::now() < t)
    }

    /// How long opens wait after a loss: long enough for every node to
    /// see it (a poll) and register again (a reconnect), twice over.
    pub(super) fn settle_ms(&self) -> u64 {
        self.settle_ms_duration().as_millis() as u64
    }

    pub(super) fn settle_ms_duration(&self) -> Duration {
        2 * (POLL + self.reconnect_wait())
    }

    /// The nodes with a current lease, as the store counts them. While it
    /// settles the count only grows: nodes are registering again, and
    /// until they have, the shares divide by the count known before.
    pub(super) fn set_nodes(&self, n: i64) {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        if self.settling() {
            self.fleet.nodes.fetch_max(n, Ordering::Relaxed);
        } else {
            self.fleet.nodes.store(n, Ordering::Relaxed);
        }
    }

    /// Compares the store's versions and epoch (`vers`, the fields
    /// [`VERSIONS`] of `clio:ver`), and the id of this node's last usage
    /// batch it holds (`useq`), with what this node saw. After a loss
    /// (the store lost its data, or went back to an older copy) it offers
    /// back what it knows and flushes every device's audio at the next
    /// flush. Returns the store's versions and whether there was a loss;
    /// `None` if a call failed.
    pub(super) fn check_store(
        &mut self,
        vers: &[Option<String>],
        useq: Option<String>,
    ) -> Option<(i64, i64, bool)> {
        let (rev, acct) = (version(vers.first()), version(vers.get(1)));
        let epoch = vers.get(2).cloned().flatten();
        let loss = match &self.epoch {
            None => None,
            Some(e) if epoch.as_ref() != Some(e) => Some("lost its data"),
            // This node's last usage batch is about a second old while
            // its streams end, and is its own (another node putting back
            // a version cannot hide it): a copy from before it is seen
            // even when no revocation or account changed since.
            Some(_)
                if self.rev_ver.is_some_and(|v| rev < v)
                    || self.acct_ver.is_some_and(|v| acct < v)
                    || self.usage_behind(useq.as_deref()) =>
            {
                Some("went back to an older copy of its data")
            }
            Some(_) => return Some((rev, acct, false)),
        };
        if let Some(what) = loss {
            // Learnt again from this node's next batch.
            self.usage_acked = None;
            tracing::warn!(node = %self.fleet.node_id, "the cluster store {what}; this node registers its counts again and gives back the newer revocations, account set and audio totals it knows, and its usage");
            self.audio_all = true;
            // Its usage counters: the admin thread gives them back.
            self.fleet.lost_usage();
            // Changes Redis took that this node's lists may not show yet
            // (no poll since): sent again after registering.
            let recent: Vec<_> = self.recent.drain(..).map(|(_, c)| c).collect();
            let later = self.unshared.take();
            for change in recent.into_iter().chain(later) {
                self.unshared.keep(change);
            }
        }
        // Also at first sight: a store settling after a loss tells a node
        // that started meanwhile how long.
        let (rev, acct) = self.reseed(loss.is_some())?;
        if self.acct_ver.is_some_and(|v| acct < v) {
            // This node had no sealed set to give (a version seen with the
            // set deleted): the store's version is the one to go by.
            self.acct_ver = Some(acct);
        }
        Some((rev, acct, loss.is_some()))
    }

    /// Whether `useq`, the store's id of this node's last usage batch, is
    /// not the last batch it took from this node: the store went back. A
    /// batch whose answer was lost may be the store's too.
    fn usage_behind(&self, useq: Option<&str>) -> bool {
        let Some(acked) = &self.usage_acked else {
            return false;
        };
        let sent = self.usage_sent.as_ref().map(|(id, _)| id.as_str());
        useq != Some(acked.as_str()) && (useq.is_none() || useq != sent)
    }

    /// Tells the store its epoch (starting one if it has none); with
    /// `offer`, gives it this node's revocations and account set where they
    /// are newer than its own, and starts a settle period. The store's
    /// versions after, or `None` if the call failed.
    pub(super) fn reseed(&mut self, offer: bool) -> Option<(i64, i64)> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let devices = &self.links.process.devices;
        let (devices, tokens) = if offer {
            (devices.revoked().0, devices.revoked_tokens_at())
        } else {
            (Vec::new(), Vec::new())
        };
        let mut inv = self.scripts.reseed.prepare_invoke();
        inv.arg(format!("{}-{nanos:x}", self.fleet.node_id))
            .arg(if offer { self.settle_ms() } else { 0 })
            .arg(self.fleet.nodes());
        if offer {
            inv.arg(self.rev_ver.unwrap_or(-1))
                .arg(self.acct_ver.unwrap_or(-1))
                .arg(self.acct_blob.as_deref().unwrap_or(b""));
        } else {
            inv.arg(-1).arg(-1).arg("");
        }
        inv.arg(if offer { self.tok_cut } else { 0 });
        inv.arg(if offer { self.tok_mark } else { 0 });
        inv.arg(devices.len());
        for id in &devices {
            inv.arg(id.as_str());
        }
        // Times as loaded (seconds rounded up, so back at or after the
        // time Redis had): none known, the store gives its own. Each
        // with the clock skew recorded with it (seconds rounded up).
        for (id, held) in &tokens {
            let (at, skew) = held.unwrap_or((0, 0));
            inv.arg(id.as_str())
                .arg(at.saturating_mul(1000))
                .arg(skew.saturating_mul(1000));
        }
        let con = self.con.as_mut()?;
        match inv.invoke::<(String, i64, i64, u64)>(con) {
            Ok((epoch, rev, acct, left)) => {
                self.ok();
                self.epoch = Some(epoch);
                if left > 0 {
                    self.settle_until = Some(Instant::now() + Duration::from_millis(left));
                }
                Some((rev, acct))
            }
            Err(e) => {
                self.failed("reseed", &e);
                None
            }
        }
    }

    /// Keeps an account set the store did not take, for the reconnect.
    pub(super) fn keep_accounts(&mut self, sealed: Vec<u8>) {
        let base = match &self.unshared_accounts {
            Some((_, base)) => *base,
            None => self.acct_ver.unwrap_or(0),
        };
        self.unshared_accounts = Some((sealed, base));
    }

    /// Sends the changes made while the store was unreachable: revocation
    /// changes, and the account set if no other node stored one since.
    pub(super) fn share_unshared(&mut self) {
        if let Some((sealed, base)) = self.unshared_accounts.take() {
            let Some(con) = self.con.as_mut() else { return };
            let r = self
                .scripts
                .publish_if
                .arg(base)
                .arg(sealed.as_slice())
                .invoke::<i64>(con);
            match r {
                Ok(v) if v >= 0 => {
                    self.ok();
                    self.acct_ver = Some(v);
                    self.acct_blob = Some(sealed);
                    tracing::info!("account changes made while the cluster store was unreachable are now fleet-wide");
                }
                Ok(_) => {
                    self.ok();
                    tracing::warn!("account changes made on this node while the cluster store was unreachable were not shared: another node changed the account set meanwhile, and its set applies here now; make them again");
                }
                Err(e) => {
                    self.unshared_accounts = Some((sealed, base));
                    return self.failed("accounts", &e);
                }
            }
        }
        if self.unshared.changes().is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for change in self.unshared.changes() {
            change.add_to(&mut pipe);
        }
        let Some(con) = self.con.as_mut() else { return };
        match pipe.query::<Vec<i64>>(con) {
            Ok(_) => {
                self.ok();
                tracing::info!(
                    changes = self.unshared.changes().len(),
                    "revocation changes made while the cluster store was unreachable are now fleet-wide"
                );
                self.unshared.take();
            }
            Err(e) => self.failed("revocations", &e),
        }
    }
}

/// The fields of `clio:ver` [`Worker::check_store`] reads, in order.
const VERSIONS: [&str; 3] = ["rev", "acct", "epoch"];

/// Adds to `pipe` what [`Worker::check_store`] compares: `clio:ver`'s
/// [`VERSIONS`], then `member`'s entry of `clio:useq`.
pub(super) fn ask_versions(pipe: &mut redis::Pipeline, member: &str) {
    pipe.cmd("HMGET")
        .arg("clio:ver")
        .arg(&VERSIONS)
        .cmd("HGET")
        .arg("clio:useq")
        .arg(member);
}

/// A version field of `clio:ver` (0 when absent).
fn version(field: Option<&Option<String>>) -> i64 {
    field
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{Revocation, Waiting};

    fn change(device: &str, lift: bool, end_live: bool) -> Revocation {
        Revocation {
            device: Some(device.into()),
            token: None,
            end_live,
            lift,
        }
    }

    fn seen(list: &[Revocation]) -> Vec<(String, bool, bool)> {
        list.iter()
            .map(|c| (c.device.clone().unwrap(), c.lift, c.end_live))
            .collect()
    }

    #[test]
    fn changes_kept_offline_hold_one_per_id_the_last() {
        let mut waiting = Waiting::default();
        for i in 0..1000 {
            waiting.keep(change("toggled", i % 2 == 1, false));
        }
        waiting.keep(change("stolen", false, true));
        // A second revoke without ending streams keeps the first's ending.
        waiting.keep(change("stolen", false, false));
        waiting.keep(change("found", false, true));
        waiting.keep(change("found", true, false));
        waiting.keep(Revocation {
            device: None,
            token: Some("toggled".into()),
            end_live: false,
            lift: false,
        });
        let list = waiting.changes();
        assert_eq!(
            seen(&list[..3]),
            [
                ("toggled".to_string(), true, false),
                ("stolen".to_string(), false, true),
                ("found".to_string(), true, false),
            ]
        );
        assert_eq!(list.len(), 4, "a token id is not a device id");
        // Lifted, then revoked again: no ending unless asked.
        waiting.keep(change("found", false, false));
        assert_eq!(
            seen(&waiting.changes()[2..3]),
            [("found".to_string(), false, false)]
        );
        assert_eq!(waiting.take().len(), 4);
        waiting.keep(change("found", false, false));
        assert_eq!(waiting.changes().len(), 1, "taken out: none left behind");
    }
}
