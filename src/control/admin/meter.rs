//! Usage and cost on the admin thread: collecting usage records from the
//! shards, keeping and persisting the ledger, the `/admin/usage` API, and
//! the usage metrics (revocations are in `revocations.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::json;

use super::{Admin, Request};
use crate::control::usage::{
    cut_page, format_day, month_start, parse_day, GroupBy, Page, UsageRecord,
};
use crate::core::cluster::usage as cluster_usage;
use crate::core::devices::{utc_day, Limit};
use crate::core::metrics::text::{family, Kind};
use crate::dataplane::http;
use crate::dataplane::shard::ShardMsg;

/// Price per audio hour and monthly budget of one account.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Price {
    pub per_hour: f64,
    pub monthly_budget: f64,
}

/// Asks every shard for the usage records of streams ended since last time.
pub(super) async fn collect(admin: &Admin) -> Vec<UsageRecord> {
    super::ask(&admin.shards, ShardMsg::TakeUsage)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Takes the usage records the shards hold into the ledger, the alerts'
/// hourly counts and, in a fleet, the fleet's totals.
pub(super) async fn take_usage(admin: &Admin) {
    let records = collect(admin).await;
    admin.usage.book.borrow_mut().add(&records);
    admin.usage.alerts.borrow_mut().feed(&records);
    if let Some(fleet) = admin.process.fleet.get() {
        fleet.add_usage(records);
        if fleet.usage_lost() {
            fleet.restore_usage(ledger_for_fleet(&admin.usage.book.borrow(), None));
        } else if fleet.usage_merge_due() {
            fleet.merge_usage(ledger_for_fleet(
                &admin.usage.book.borrow(),
                Some(cluster_usage::MERGE_DAYS),
            ));
        }
    }
}

/// This node's ledger, every day the fleet's store keeps (or only the
/// last `last_days`), as the counters that replace this node's in it after
/// it lost its data, or that a start merges into them. It holds every
/// record handed to the fleet so far (they are added here first).
fn ledger_for_fleet(
    book: &crate::control::usage::UsageBook,
    last_days: Option<u64>,
) -> cluster_usage::Pending {
    let today = utc_day(SystemTime::now());
    let mut out = cluster_usage::Pending::new();
    for group in [GroupBy::Account, GroupBy::Device] {
        let keep = cluster_usage::restore_days(today, group);
        let first = last_days.map_or(0, |n| (today + 1).saturating_sub(n));
        for day in book.days().filter(|d| keep.contains(d) && *d >= first) {
            for (id, totals) in book.query(day, day, group) {
                out.insert((day, group, id), totals);
            }
        }
    }
    out
}

/// Cost of `audio_ms` at `price` per hour. The product first, then one
/// division: the result is rounded once where the product is exact (a
/// whole or short price), so 1.5 s at 36 an hour is 0.015, not the
/// 0.015000000000000001 that rounding `ms / 3_600_000` first gives.
pub(super) fn cost(audio_ms: u64, price: f64) -> f64 {
    audio_ms as f64 * price / MS_PER_HOUR
}

const MS_PER_HOUR: f64 = 3_600_000.0;

/// The most rows one `/admin/usage` answer holds (`limit`).
pub const MAX_USAGE_ROWS: usize = 10_000;
/// The rows of an answer that asks for no `limit`.
pub const USAGE_PAGE: usize = 1_000;

/// This month's audio milliseconds per account.
pub(super) fn month_audio(admin: &Admin) -> HashMap<String, u64> {
    let today = utc_day(SystemTime::now());
    admin
        .usage
        .book
        .borrow()
        .audio_ms_by_account(month_start(today), today)
        .into_iter()
        .collect()
}

/// `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=account|device|pool&scope=fleet|node&limit=N&after=KEY`.
///
/// `group_by=pool` sums the accounts' rows (and costs) by each account's
/// pool. Account and device rows come in pages of keys in order
/// ([`Page`]): `next` names the last row when more follow.
///
/// In a fleet (`[cluster]`), `rows` are the fleet's totals and `nodes` each
/// node's share, read from Redis; `scope=node`, or Redis unreachable (then
/// `fleet_error` says why), answers from this node's own ledger.
pub(super) async fn usage(admin: &Admin, req: &Request<'_>) -> Vec<u8> {
    let query = match super::query::checked(
        req.query,
        &[
            ("from", "YYYY-MM-DD"),
            ("to", "YYYY-MM-DD"),
            ("group_by", "account, device or pool"),
            ("scope", "fleet or node"),
            ("limit", "rows, 1 to 10000"),
            ("after", "the previous page's next"),
        ],
    ) {
        Ok(q) => q,
        Err(answer) => return answer,
    };
    let q = |name: &str| query.get(name);
    let today = utc_day(SystemTime::now());
    let parse = |name: &str, default: u64| match q(name) {
        None | Some("") => Ok(default),
        Some(t) => parse_day(t).ok_or_else(|| {
            http::json_error(
                400,
                &format!("{name}: want a day YYYY-MM-DD, 1970-01-01 to 9999-12-31"),
            )
        }),
    };
    let (from, to) = match (parse("from", month_start(today)), parse("to", today)) {
        (Ok(f), Ok(t)) if f <= t => (f, t),
        (Err(e), _) | (_, Err(e)) => return e,
        _ => return http::json_error(400, "from is after to"),
    };
    let by_pool = q("group_by") == Some("pool");
    let group = match q("group_by") {
        None | Some("account") | Some("pool") => GroupBy::Account,
        Some("device") => GroupBy::Device,
        Some(_) => return http::json_error(400, "group_by: account, device or pool"),
    };
    let fleet_scope = match q("scope") {
        None | Some("fleet") => true,
        Some("node") => false,
        Some(_) => return http::json_error(400, "scope: fleet or node"),
    };
    // Rows come in pages of keys in order, so that a ledger of many
    // devices is never read or answered whole: `next` names the last row
    // when more follow, and `after=` it asks for them.
    let (limit, after) = match query.page(USAGE_PAGE, MAX_USAGE_ROWS) {
        Ok(page) => page,
        Err(answer) => return answer,
    };
    if by_pool && (after.is_some() || q("limit").is_some()) {
        // A page of accounts would split a pool's sum.
        return http::json_error(
            400,
            "limit and after page account and device rows; group_by=pool answers every pool",
        );
    }
    let page = if by_pool {
        Page::ALL
    } else {
        Page { after, limit }
    };
    let group_name = match group {
        _ if by_pool => "pool",
        GroupBy::Account => "account",
        _ => "device",
    };
    let rows_of = |totals: &std::collections::BTreeMap<String, crate::core::usage::Totals>| {
        if by_pool {
            pool_rows(admin, totals)
        } else {
            usage_rows(admin, totals, group)
        }
    };
    let currency = admin.usage.cfg.borrow().currency.clone();
    let mut body = json!({"from": format_day(from), "to": format_day(to), "group_by": group_name, "currency": currency});
    let fleet = admin.process.fleet.get().cloned();
    let shared = match &fleet {
        Some(f) if fleet_scope => Some(f.usage(from, to, group).await),
        _ => None,
    };
    let (rows, next) = match shared {
        Some(Ok(by_node)) => {
            body["scope"] = json!("fleet");
            let mut rows = crate::core::cluster::usage::fleet_totals(&by_node);
            let next = cut_page(&mut rows, &page);
            body["nodes"] = by_node
                .into_iter()
                .map(|(node, mut totals)| {
                    totals.retain(|k, _| rows.contains_key(k));
                    (node, rows_of(&totals))
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            (rows, next)
        }
        other => {
            if let Some(Err(e)) = other {
                tracing::warn!(error = %e, "fleet usage unreadable; answering with this node's");
                body["fleet_error"] = json!(e.to_string());
            }
            if fleet.is_some() {
                body["scope"] = json!("node");
            }
            admin.usage.book.borrow().query_page(from, to, group, &page)
        }
    };
    if let Some(f) = &fleet {
        body["node"] = json!(f.node_id);
    }
    body["rows"] = rows_of(&rows);
    if let Some(next) = next {
        body["next"] = json!(next);
    }
    http::response(200, "application/json", "", body.to_string().as_bytes())
}

/// `/admin/usage?group_by=pool` rows: the accounts' rows summed by pool,
/// with their cost. An account's pool is the one it has now (or in the
/// config file); an account gone from both is under `-`. The cost is the
/// sum of each account's audio times its price, divided once, as
/// [`cost`] is: a sum of the accounts' rounded costs showed 0.1 + 0.2 as
/// 0.30000000000000004.
fn pool_rows(
    admin: &Admin,
    totals: &std::collections::BTreeMap<String, crate::core::usage::Totals>,
) -> serde_json::Value {
    let accounts = admin.accounts.set.borrow();
    let configs = admin.accounts.configs.borrow();
    let prices = admin.usage.prices.borrow();
    let mut pools: std::collections::BTreeMap<String, (crate::core::usage::Totals, f64, f64)> =
        Default::default();
    for (account, t) in totals {
        let pool = accounts
            .get(account)
            .map(|e| e.state.pool.clone())
            .or_else(|| {
                configs
                    .iter()
                    .find(|c| &c.id == account)
                    .map(|c| c.pool.clone())
            })
            .unwrap_or_else(|| "-".to_string());
        let p = prices.get(account).copied().unwrap_or_default();
        let (sum, priced_ms, budget) = pools.entry(pool).or_default();
        sum.streams += t.streams;
        sum.audio_ms += t.audio_ms;
        sum.audio_ms_relay += t.audio_ms_relay;
        sum.bytes_up += t.bytes_up;
        sum.bytes_down += t.bytes_down;
        for (code, n) in &t.errors {
            *sum.errors.entry(*code).or_default() += n;
        }
        *priced_ms += t.audio_ms as f64 * p.per_hour;
        *budget += p.monthly_budget;
    }
    pools
        .into_iter()
        .map(|(pool, (t, priced_ms, budget))| {
            json!({
                "key": pool,
                "streams": t.streams,
                "audio_seconds": t.audio_ms as f64 / 1000.0,
                "audio_seconds_relay_meter": t.audio_ms_relay as f64 / 1000.0,
                "bytes_up": t.bytes_up,
                "bytes_down": t.bytes_down,
                "errors": t.errors,
                "cost": priced_ms / MS_PER_HOUR,
                "monthly_budget": budget,
            })
        })
        .collect::<Vec<_>>()
        .into()
}

/// `/admin/usage` rows: one per account or device, accounts with their cost.
fn usage_rows(
    admin: &Admin,
    totals: &std::collections::BTreeMap<String, crate::core::usage::Totals>,
    group: GroupBy,
) -> serde_json::Value {
    let prices = admin.usage.prices.borrow();
    totals
        .iter()
        .map(|(key, t)| {
            let mut row = json!({
                "key": key,
                "streams": t.streams,
                "audio_seconds": t.audio_ms as f64 / 1000.0,
                "audio_seconds_relay_meter": t.audio_ms_relay as f64 / 1000.0,
                "bytes_up": t.bytes_up,
                "bytes_down": t.bytes_down,
                "errors": t.errors,
            });
            if group == GroupBy::Account {
                let p = prices.get(key).copied().unwrap_or_default();
                row["cost"] = json!(cost(t.audio_ms, p.per_hour));
                row["monthly_budget"] = json!(p.monthly_budget);
            }
            row
        })
        .collect::<Vec<_>>()
        .into()
}

/// Usage, cost and device metrics appended to `/metrics`.
pub(super) fn render_metrics(admin: &Admin, out: &mut String) {
    let rejections = &admin.process.device_rejections;
    let mut f = family(
        out,
        "clio_relay_device_rejections_total",
        Kind::Counter,
        "Streams refused or ended by a device limit or revocation.",
    );
    for l in Limit::ALL {
        f.sample(
            &[("limit", l.label())],
            rejections[l as usize].load(Ordering::Relaxed),
        );
    }
    family(
        out,
        "clio_relay_devices_tracked",
        Kind::Gauge,
        "Devices whose state a limit needs now (a live stream, a refilling bucket, or audio today under a daily allowance).",
    )
    .sample(&[], admin.process.devices.tracked());
    family(
        out,
        "clio_relay_usage_ledger_failing",
        Kind::Gauge,
        "1 while the usage ledger (usage.db) cannot be opened or written: usage since waits in memory.",
    )
    .sample(&[], u64::from(admin.usage.ledger_failing.get()));
    let currency = admin.usage.cfg.borrow().currency.clone();
    let month = month_audio(admin);
    let prices = admin.usage.prices.borrow();
    let accounts = admin.accounts.set.borrow();
    let mut f = family(
        out,
        "clio_relay_account_max_concurrent_streams",
        Kind::Gauge,
        "The concurrent-stream limit in force per account.",
    );
    for e in accounts.entries() {
        f.sample(&[("account", &e.state.id)], e.state.effective_max());
    }
    let mut f = family(
        out,
        "clio_relay_usage_month_audio_seconds",
        Kind::Gauge,
        "Audio seconds this calendar month (UTC), per account.",
    );
    for e in accounts.entries() {
        let ms = month.get(&e.state.id).copied().unwrap_or(0);
        f.sample(&[("account", &e.state.id)], ms as f64 / 1000.0);
    }
    let mut f = family(
        out,
        "clio_relay_cost_month",
        Kind::Gauge,
        "Cost this calendar month, per account.",
    );
    for e in accounts.entries() {
        let p = prices.get(&e.state.id).copied().unwrap_or_default();
        let ms = month.get(&e.state.id).copied().unwrap_or(0);
        f.sample(
            &[("account", &e.state.id), ("currency", &currency)],
            cost(ms, p.per_hour),
        );
    }
    let mut f = family(
        out,
        "clio_relay_budget_month",
        Kind::Gauge,
        "Monthly budget per account (0 = none).",
    );
    for e in accounts.entries() {
        let p = prices.get(&e.state.id).copied().unwrap_or_default();
        f.sample(
            &[("account", &e.state.id), ("currency", &currency)],
            p.monthly_budget,
        );
    }
    // A ledger that cannot be read leaves the series out (a gap), not low.
    let totals = admin.usage.book.borrow().audio_ms_all_time();
    let mut f = family(
        out,
        "clio_relay_audio_seconds_total",
        Kind::Counter,
        "Audio seconds relayed, per account (kept across restarts).",
    );
    for (id, ms) in totals.into_iter().flatten() {
        f.sample(&[("account", &id)], ms as f64 / 1000.0);
    }
}

/// The last comparison of the relay's meter with Soniox's usage logs, per account.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(super) struct Reconciliation {
    /// Streams found in both (each once, however many upstream
    /// connections, so log entries, it had).
    pub matched: u64,
    /// Soniox's log entries with no stream of this relay (other clients of the key, or streams older than the relay remembers).
    pub unmatched: u64,
    /// Audio seconds of the matched streams by the relay's meter.
    pub relay_seconds: f64,
    /// … and by Soniox.
    pub soniox_seconds: f64,
    /// relay − Soniox.
    pub drift_seconds: f64,
    /// When (Unix seconds).
    pub at: u64,
}

/// Reads each account's `GET /v1/usage-logs` and compares it, stream by
/// stream (`client_reference_id`), with the relay's own meter.
pub(super) async fn reconcile(admin: &Admin) {
    let targets: Vec<_> = admin
        .accounts
        .set
        .borrow()
        .entries()
        .iter()
        .map(|e| (e.state.id.clone(), e.state.pool.clone(), e.current.clone()))
        .collect();
    'accounts: for (id, pool, key) in targets {
        // Each account's usage logs live on its own pool's REST API.
        let Some(rest) = admin.rest_for(&pool) else {
            continue;
        };
        let mut r = Reconciliation {
            at: crate::control::accounts::unix_now(),
            ..Default::default()
        };
        let mut cursor: Option<String> = None;
        // Soniox's audio and log entries per reference id: a stream
        // resumed mid-stream or moved at open has an entry for each
        // upstream connection it had, each billed.
        let mut theirs_by_ref: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for _page in 0..10 {
            let path = match &cursor {
                None => "/v1/usage-logs?limit=1000".to_string(),
                Some(c) => format!(
                    "/v1/usage-logs?limit=1000&cursor={}",
                    percent_encoding::utf8_percent_encode(c, percent_encoding::NON_ALPHANUMERIC)
                ),
            };
            // A page that cannot be read leaves the last whole comparison
            // standing (its `at` says when): an empty or partial one would
            // read as "nothing matched" or as a drift that is not there.
            let page = rest
                .get(&path, &key, std::time::Duration::from_secs(10))
                .await;
            let v = match &page {
                Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(body).ok(),
                _ => None,
            };
            let Some(v) = v else {
                let status = page.as_ref().map(|(s, _)| *s).ok();
                let last = admin.usage.reconciliation.borrow().get(&id).map(|r| r.at);
                match last {
                    Some(at) => {
                        tracing::warn!(account = %id, status, last_at = at, "Soniox's usage logs could not be read; the last reconciliation stands")
                    }
                    None => {
                        tracing::warn!(account = %id, status, "Soniox's usage logs could not be read; no reconciliation for this account yet")
                    }
                }
                continue 'accounts;
            };
            for log in v["logs"].as_array().into_iter().flatten() {
                let theirs = log["audio_duration_ms"].as_u64().unwrap_or(0);
                match log["client_reference_id"].as_str() {
                    Some(rid) => {
                        let (ms, entries) = theirs_by_ref.entry(rid.to_string()).or_default();
                        *ms += theirs;
                        *entries += 1;
                    }
                    None => r.unmatched += 1,
                }
            }
            cursor = v["next_page_cursor"]
                .as_str()
                .map(str::to_string)
                .or_else(|| v["next_page_cursor"].as_u64().map(|n| n.to_string()));
            if cursor.is_none() {
                break;
            }
        }
        for (rid, (theirs, entries)) in &theirs_by_ref {
            let book = admin.usage.book.borrow();
            match book.reference_audio_ms(rid, &id) {
                // Each stream once, against all Soniox billed for the id.
                Some((ours, streams)) => {
                    r.matched += streams;
                    r.relay_seconds += ours as f64 / 1000.0;
                    r.soniox_seconds += *theirs as f64 / 1000.0;
                }
                None => r.unmatched += entries,
            }
        }
        r.drift_seconds = r.relay_seconds - r.soniox_seconds;
        if r.drift_seconds.abs() > 60.0_f64.max(r.soniox_seconds * 0.05) {
            tracing::warn!(account = %id, drift_seconds = r.drift_seconds, matched = r.matched, "the relay's usage meter and Soniox's usage logs disagree");
        }
        admin.usage.reconciliation.borrow_mut().insert(id, r);
    }
}

/// `GET /admin/reconciliation`.
pub(super) fn reconciliation(admin: &Admin) -> Vec<u8> {
    let body = serde_json::to_string(&*admin.usage.reconciliation.borrow())
        .unwrap_or_else(|_| "{}".into());
    http::response(200, "application/json", "", body.as_bytes())
}

/// `clio_relay_usage_drift_seconds{account}`.
pub(super) fn render_drift(
    reconciliation: &std::collections::BTreeMap<String, Reconciliation>,
    out: &mut String,
) {
    let mut f = family(
        out,
        "clio_relay_usage_drift_seconds",
        Kind::Gauge,
        "The relay's audio meter minus Soniox's usage logs, last reconciliation.",
    );
    for (id, r) in reconciliation {
        f.sample(&[("account", id)], r.drift_seconds);
    }
}
