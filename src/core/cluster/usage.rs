//! The fleet's usage: each node's per-day counters by account and by
//! device, added to Redis so `/admin/usage` on any node shows the fleet's
//! totals and each node's share.
//!
//! Nothing is sent per frame or per stream. The admin thread hands the
//! cluster thread the usage records of the streams that ended (once a
//! second, and before answering `/admin/usage`); the thread merges them
//! into [`Pending`] and adds them to Redis with one [`super::scripts::USAGE`] call
//! per second at most (a few thousand entries per call). A call whose
//! answer is lost (a timeout after Redis applied it) is sent again with
//! the same batch id, which the script recognises, so a retry never counts
//! twice; while Redis is unreachable the counters wait in memory, merged
//! by day and key (bounded by the ids that streamed meanwhile).
//!
//! Key layout: `clio:u:<day>:<node>:acct` and `…:dev`, hashes with one
//! field per counter and id (`s:<id>` streams, `a:` audio ms, `r:` audio ms
//! by the relay's meter, `u:` bytes up, `d:` bytes down, `e<code>:` errors
//! with that code), and `clio:u:<day>:nodes`, the nodes with usage that day.
//! Account hashes are kept [`KEEP_ACCOUNT_DAYS`], device hashes
//! [`KEEP_DEVICE_DAYS`]. The node's own SQLite ledger stays its record.
//!
//! Queries read on a connection of their own (see [`query`]), never on the
//! cluster thread's, so a month of device usage does not hold up stream
//! opens.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;

use super::ClusterError;
use crate::core::usage::{GroupBy, Totals, UsageRecord};

/// Days an account's fleet usage is kept in Redis (like the local ledger).
pub const KEEP_ACCOUNT_DAYS: u64 = 400;
/// Days a device's fleet usage is kept in Redis: the current and the
/// previous month. Older device usage is in each node's own ledger.
pub const KEEP_DEVICE_DAYS: u64 = 62;
/// Most entries (day, group, id) in one call.
pub const CHUNK: usize = 2_000;
/// Most calls in one flush (the rest waits for the next).
pub const FLUSH_CHUNKS: usize = 8;

/// Days of its ledger a relay merges into the fleet's usage at start
/// (today and yesterday): what a previous process of the node could not
/// add to Redis before it ended.
pub const MERGE_DAYS: u64 = 2;

/// Counters waiting to be added to Redis: (day, group, id) → totals.
pub type Pending = BTreeMap<(u64, GroupBy, String), Totals>;

/// Fleet usage by node: node → key → totals.
pub type ByNode = BTreeMap<String, BTreeMap<String, Totals>>;

/// The hash field prefix of a group.
pub fn group_name(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Account => "acct",
        GroupBy::Device => "dev",
    }
}

/// The days of `group` Redis keeps, counted back from `today`: what a
/// node gives back after the store lost its data.
pub fn restore_days(today: u64, group: GroupBy) -> std::ops::RangeInclusive<u64> {
    let keep = match group {
        GroupBy::Account => KEEP_ACCOUNT_DAYS,
        GroupBy::Device => KEEP_DEVICE_DAYS,
    };
    today.saturating_sub(keep)..=today + 1
}

/// The keys of `node`'s counters over [`restore_days`]: deleted before a
/// node's ledger replaces them.
pub fn node_keys(node: &str, today: u64) -> Vec<String> {
    [GroupBy::Account, GroupBy::Device]
        .into_iter()
        .flat_map(|g| {
            restore_days(today, g).map(move |day| format!("clio:u:{day}:{node}:{}", group_name(g)))
        })
        .collect()
}

/// Adds ended streams to `pending`.
pub fn add(pending: &mut Pending, records: &[UsageRecord]) {
    for r in records {
        for (g, id) in [(GroupBy::Account, &r.account), (GroupBy::Device, &r.device)] {
            pending.entry((r.day, g, id.clone())).or_default().add(r);
        }
    }
}

/// Takes at most [`CHUNK`] entries off `pending`.
pub fn take_chunk(pending: &mut Pending) -> Vec<((u64, GroupBy, String), Totals)> {
    let mut out = Vec::new();
    while out.len() < CHUNK {
        match pending.pop_first() {
            Some(e) => out.push(e),
            None => break,
        }
    }
    out
}

/// The [`super::scripts::USAGE`] (or [`super::scripts::USAGE_MAX`]) call
/// for one chunk.
pub fn invocation<'a>(
    script: &'a redis::Script,
    node: &str,
    member: &str,
    batch: &str,
    chunk: &[((u64, GroupBy, String), Totals)],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    inv.arg(node)
        .arg(member)
        .arg(batch)
        .arg(KEEP_ACCOUNT_DAYS * 86_400)
        .arg(KEEP_DEVICE_DAYS * 86_400);
    for ((day, g, id), t) in chunk {
        let errors: Vec<String> = t.errors.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        inv.arg(*day)
            .arg(group_name(*g))
            .arg(id.as_str())
            .arg(t.streams)
            .arg(t.audio_ms)
            .arg(t.audio_ms_relay)
            .arg(t.bytes_up)
            .arg(t.bytes_down)
            .arg(errors.join(","));
    }
    inv
}

/// Adds one hash field (`<counter>:<id>` = n) to `totals`.
fn add_field(totals: &mut BTreeMap<String, Totals>, field: &str, n: u64) {
    let Some((counter, id)) = field.split_once(':') else {
        return;
    };
    let t = totals.entry(id.to_string()).or_default();
    match counter {
        "s" => t.streams += n,
        "a" => t.audio_ms += n,
        "r" => t.audio_ms_relay += n,
        "u" => t.bytes_up += n,
        "d" => t.bytes_down += n,
        c => {
            if let Some(code) = c.strip_prefix('e').and_then(|c| c.parse().ok()) {
                *t.errors.entry(code).or_default() += n;
            }
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the fleet's usage of `group` over the days `from..=to` (clamped
/// to what Redis keeps, counted back from `today`), by node, on a
/// connection of its own from `client`. Blocking: run it
/// off any executor. (The node's own queries, `Fleet::usage`, go through
/// the cluster store's connection instead, whose lookup of Redis's name
/// is bounded by `timeout`; this one's, the `redis` crate's, is not.)
pub fn query(
    client: &redis::Client,
    timeout: Duration,
    from: u64,
    to: u64,
    today: u64,
    group: GroupBy,
) -> Result<ByNode, ClusterError> {
    if days(from, to, today, group).is_none() {
        return Ok(ByNode::new());
    }
    let mut con = client.get_connection_with_timeout(timeout)?;
    let read_for = read_timeout(timeout);
    con.set_read_timeout(Some(read_for))?;
    con.set_write_timeout(Some(read_for))?;
    read(&mut con, from, to, today, group)
}

/// How long the reads of a query may take, given `cluster.timeout`: a
/// month of devices is a large answer, so more time than a stream open's
/// deadline, still bounded.
pub(super) fn read_timeout(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(5))
}

/// The days `from..=to` clamped to what Redis keeps; `None` when none is
/// left.
fn days(from: u64, to: u64, today: u64, group: GroupBy) -> Option<(u64, u64)> {
    let days = restore_days(today, group);
    let from = from.max(*days.start());
    let to = to.min(*days.end());
    (from <= to).then_some((from, to))
}

/// [`query`]'s reads on `con`: two round trips, the nodes of each day,
/// then their hashes.
pub(super) fn read(
    con: &mut impl redis::ConnectionLike,
    from: u64,
    to: u64,
    today: u64,
    group: GroupBy,
) -> Result<ByNode, ClusterError> {
    let mut out = ByNode::new();
    let Some((from, to)) = days(from, to, today, group) else {
        return Ok(out);
    };
    let mut pipe = redis::pipe();
    for day in from..=to {
        pipe.cmd("SMEMBERS").arg(format!("clio:u:{day}:nodes"));
    }
    let nodes: Vec<Vec<String>> = pipe.query(con)?;
    let mut pipe = redis::pipe();
    let mut which = Vec::new();
    for (day, names) in (from..=to).zip(nodes) {
        for node in names {
            pipe.cmd("HGETALL")
                .arg(format!("clio:u:{day}:{node}:{}", group_name(group)));
            which.push(node);
        }
    }
    if which.is_empty() {
        return Ok(out);
    }
    let hashes: Vec<Value> = pipe.query(con)?;
    for (node, h) in which.into_iter().zip(hashes) {
        let totals = out.entry(node).or_default();
        let pairs: Vec<&Value> = match &h {
            Value::Array(a) => a.iter().collect(),
            Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        };
        for kv in pairs.chunks(2) {
            if let [k, v] = kv {
                let (Some(k), Some(n)) = (text(k), text(v).and_then(|v| v.parse().ok())) else {
                    continue;
                };
                add_field(totals, &k, n);
            }
        }
    }
    out.retain(|_, t| !t.is_empty());
    Ok(out)
}

/// The fleet's totals: every node's summed.
pub fn fleet_totals(by_node: &ByNode) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for totals in by_node.values() {
        for (k, t) in totals {
            out.entry(k.clone()).or_default().merge(t);
        }
    }
    out
}

/// The batch id of a chunk: unique to this process and chunk, so the
/// script can tell a retry from a new chunk.
pub fn batch_id(process: u64, n: u64) -> String {
    format!("{process:x}-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(day: u64, account: &str, device: &str, ms: u64, error: Option<u16>) -> UsageRecord {
        UsageRecord {
            day,
            account: account.into(),
            device: device.into(),
            reference_id: "r".into(),
            audio_ms_relay: ms,
            audio_ms_upstream: None,
            bytes_up: ms * 32,
            bytes_down: 10,
            error,
            part: false,
        }
    }

    #[test]
    fn records_merge_by_day_group_and_id_and_chunks_take_all() {
        let mut p = Pending::new();
        add(
            &mut p,
            &[
                record(5, "a", "phone", 1000, None),
                record(5, "a", "phone", 500, Some(503)),
                record(6, "a", "tab:let", 200, None),
            ],
        );
        let acct = &p[&(5, GroupBy::Account, "a".into())];
        assert_eq!(
            (acct.streams, acct.audio_ms, acct.errors[&503]),
            (2, 1500, 1)
        );
        assert_eq!(p.len(), 4);
        let chunk = take_chunk(&mut p);
        assert_eq!(chunk.len(), 4);
        assert!(p.is_empty());
    }

    #[test]
    fn fields_parse_back_with_colons_in_ids() {
        let mut t = BTreeMap::new();
        for (f, n) in [
            ("s:tab:let", 2),
            ("a:tab:let", 1500),
            ("r:tab:let", 1400),
            ("u:tab:let", 9),
            ("d:tab:let", 8),
            ("e503:tab:let", 1),
            ("bogus", 7),
        ] {
            add_field(&mut t, f, n);
        }
        let x = &t["tab:let"];
        assert_eq!(
            (
                x.streams,
                x.audio_ms,
                x.audio_ms_relay,
                x.bytes_up,
                x.bytes_down
            ),
            (2, 1500, 1400, 9, 8)
        );
        assert_eq!(x.errors[&503], 1);
        assert_eq!(t.len(), 1);
    }
}
