//! The account API behind the admin token: list, add, enable, disable,
//! remove, set limits, rotate keys. Every change is published to every shard
//! at once; key material is shown only as fingerprints.
//!
//! | method and path | body | effect |
//! |---|---|---|
//! | `GET /admin/accounts` | | every account, its health, live streams and keys (fingerprints) |
//! | `POST /admin/accounts` | `{"id","key","region"?,"pool"?,"enabled"?,"max_concurrent_streams"?}` | add |
//! | `POST /admin/accounts/{id}/enable` | | take new streams again |
//! | `POST /admin/accounts/{id}/disable` | | take no new stream (live ones go on) |
//! | `POST` (or `PUT`) `/admin/accounts/{id}/limit` | `{"max_concurrent_streams":N}` | set the limit |
//! | `POST /admin/accounts/{id}/rotate` | `{"key","overlap"?:"1h"}` | new key takes new streams now |
//! | `DELETE /admin/accounts/{id}` | | remove (live streams go on to their end) |

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;

use super::{Admin, Request, ShareError};
use crate::control::accounts::{check_key_length, check_region, unix_now, ChangeError, Source};
use crate::core::metrics::text::{family, Kind};
use crate::core::secret::Secret;
use crate::dataplane::http;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    id: String,
    key: String,
    #[serde(default)]
    region: String,
    #[serde(default = "default_pool")]
    pool: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "ten")]
    max_concurrent_streams: u32,
}

fn default_pool() -> String {
    crate::core::config::DEFAULT_POOL.to_string()
}
fn yes() -> bool {
    true
}
fn ten() -> u32 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    max_concurrent_streams: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    key: String,
    overlap: Option<String>,
}

fn ok(value: serde_json::Value) -> Vec<u8> {
    http::response(200, "application/json", "", value.to_string().as_bytes())
}

fn refused(e: ChangeError) -> Vec<u8> {
    let status = match e {
        ChangeError::NotFound(_) => 404,
        ChangeError::Exists(_) => 409,
        ChangeError::Invalid(_) => 400,
    };
    http::json_error(status, &e.to_string())
}

/// A JSON body, or a 400 that says what is wrong without echoing the body
/// (it may hold a key).
fn body<'a, T: Deserialize<'a>>(req: &'a Request<'_>) -> Result<T, Vec<u8>> {
    req.length_required()?;
    serde_json::from_slice(req.body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => data_fault(&e.to_string()),
            _ => "the body is not valid JSON".to_string(),
        };
        http::json_error(
            400,
            &format!(
                "bad request body: {what} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// What is wrong with a body that is JSON, from serde's message, naming
/// only the fields the API has: never a value, nor a field name the
/// client made up (a key pasted as one).
fn data_fault(serde: &str) -> String {
    // Without serde's " at line L column C": the answer gives it once.
    let serde = serde.rsplit_once(" at line ").map_or(serde, |(m, _)| m);
    let named = |prefix: &str| {
        serde
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
    };
    if let Some(field) = named("missing field `") {
        format!("field `{field}` is missing")
    } else if let Some(field) = named("duplicate field `") {
        format!("field `{field}` is given twice")
    } else if serde.starts_with("unknown field `") {
        match serde.split_once(", expected ") {
            Some((_, fields)) => {
                let fields = fields.strip_prefix("one of ").unwrap_or(fields);
                format!("a field is not one of {fields}")
            }
            None => "a field is unknown".to_string(),
        }
    } else {
        "a field is of the wrong type or out of range, or the body is not an object".to_string()
    }
}

/// `GET /admin/accounts`.
pub(super) fn accounts(admin: &Admin) -> Vec<u8> {
    ok(list(admin))
}

/// `POST /admin/accounts/{id}/enable` (`on`) and `…/disable`.
pub(super) fn set_enabled(admin: &Admin, id: &str, on: bool) -> Result<String, Vec<u8>> {
    admin
        .accounts
        .set
        .borrow_mut()
        .set_enabled(id, on)
        .map(|()| id.to_string())
        .map_err(refused)
}

/// `POST` or `PUT /admin/accounts/{id}/limit`.
pub(super) fn limit(admin: &Admin, id: &str, req: &Request<'_>) -> Result<String, Vec<u8>> {
    let b = body::<LimitBody>(req)?;
    admin
        .accounts
        .set
        .borrow_mut()
        .set_max_concurrent(id, b.max_concurrent_streams)
        .map(|()| id.to_string())
        .map_err(refused)
}

/// `DELETE /admin/accounts/{id}`.
pub(super) fn remove(admin: &Admin, id: &str) -> Result<String, Vec<u8>> {
    admin
        .accounts
        .set
        .borrow_mut()
        .remove(id)
        .map(|_| id.to_string())
        .map_err(refused)
}

/// Makes an account change and answers it: `change` makes it, returning
/// the id of the account changed, or the refusal. A change is published to
/// every shard, saved to the key store, shared with the fleet and logged;
/// the answer is the account list. In a fleet, a node without a master key
/// (nothing to seal the set with) or that cannot open the fleet's account
/// set makes none: the change would stay on this node, or replace the
/// fleet's set with one the other nodes cannot open.
pub(super) async fn changed(
    admin: &Admin,
    req: &Request<'_>,
    change: impl FnOnce(&Admin) -> Result<String, Vec<u8>>,
) -> Vec<u8> {
    if admin.process.fleet.get().is_some() && admin.accounts.store.is_none() {
        return http::json_error(
            409,
            "in a fleet, account changes reach the other nodes sealed under admin.master_key, which this node does not have; give every node the same admin.master_key",
        );
    }
    if admin.accounts.fleet_unreadable.get() {
        return http::json_error(
            409,
            "this node cannot open the fleet's account set (is admin.master_key the same on every node?); make the change on another node",
        );
    }
    // One change at a time on this node (a closed semaphore never comes:
    // the admin thread owns it), made to the fleet's latest set, not to
    // one a poll has yet to bring.
    let _one_at_a_time = admin.accounts.changing.acquire_permit(1).await;
    admin.catch_up_accounts().await;
    let account = match change(admin) {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    admin.publish();
    if let Err(e) = admin.persist().await {
        tracing::error!(error = %e, "account change applied but not saved to the key store");
        return http::json_error(
            500,
            &format!("applied, but not saved to the key store: {e}"),
        );
    }
    let share = admin.share_accounts().await;
    if let Err(ShareError::Moved(version, set)) = &share {
        // Another node stored a change between this node's catching up and
        // its own: that set applies here (this change undone), and this
        // change is answered, not stored over it.
        admin.apply_moved(*version, set.as_deref()).await;
        if let Err(e) = admin.persist().await {
            tracing::error!(error = %e, "fleet account set applied but not saved to the key store");
        }
        tracing::warn!(method = req.method, path = req.path, account = %account, "admin change not made: another node changed the account set at the same time");
        return http::json_error(
            409,
            "another node changed the account set at the same time; its change applies here, and this one was not made: make it again",
        );
    }
    if let Err(e) = share {
        tracing::error!(error = %e, "account change applied on this node; the fleet gets it when the cluster store answers again, unless another node changes the account set first");
        return http::json_error(
            503,
            &format!("applied on this node, not yet fleet-wide ({e}); sent when the cluster store answers again, unless another node changes the account set first"),
        );
    }
    tracing::info!(
        method = req.method,
        path = req.path,
        account = %account,
        "admin change applied"
    );
    ok(list(admin))
}

/// `POST /admin/accounts`: adds the account in the body; its id.
pub(super) fn add(admin: &Admin, req: &Request<'_>) -> Result<String, Vec<u8>> {
    let b: AddBody = body(req)?;
    check_region(&b.region).map_err(refused)?;
    check_key_length(&b.key).map_err(refused)?;
    admin
        .accounts
        .set
        .borrow_mut()
        .add(
            &b.id,
            Secret::new(b.key),
            &b.region,
            &b.pool,
            b.enabled,
            b.max_concurrent_streams,
            unix_now(),
            Source::Store,
        )
        .map(|()| b.id.clone())
        .map_err(refused)
}

/// `POST /admin/accounts/{id}/rotate`.
pub(super) fn rotate(admin: &Admin, id: &str, req: &Request<'_>) -> Result<String, Vec<u8>> {
    let b: RotateBody = body(req)?;
    check_key_length(&b.key).map_err(refused)?;
    let overlap = match b.overlap {
        None => admin.config.borrow().rotation_overlap,
        Some(text) => crate::core::config::parse_duration(&text).map_err(|_| {
            http::json_error(
                400,
                "overlap is not a duration such as \"90s\", \"30m\" or \"1h 30m\"",
            )
        })?,
    };
    admin
        .accounts
        .set
        .borrow_mut()
        .rotate(id, Secret::new(b.key), overlap, unix_now())
        .map(|()| id.to_string())
        .map_err(refused)
}

/// Every account, as the API and the dashboard show it.
pub(super) fn list(admin: &Admin) -> serde_json::Value {
    let now = Instant::now();
    let unix = unix_now();
    let period = admin.config.borrow().rotation_period.as_secs();
    let accounts = admin.accounts.set.borrow();
    let items: Vec<_> = accounts
        .entries()
        .iter()
        .map(|e| {
            let a = &e.state;
            let k = &e.current;
            let age = unix.saturating_sub(k.created_at);
            json!({
                "id": a.id,
                "region": a.region(),
                "pool": a.pool,
                "enabled": a.enabled.load(Ordering::Relaxed),
                "healthy": a.healthy(now),
                "available": a.available(now),
                "live_streams": a.live.load(Ordering::Relaxed),
                "max_concurrent_streams": a.max_concurrent.load(Ordering::Relaxed),
                "source": e.source,
                "key": {
                    "fingerprint": k.fingerprint,
                    "created_at": k.created_at,
                    "age_seconds": age,
                    "due_for_rotation": age >= period,
                    "live_streams": k.live.load(Ordering::Relaxed),
                    "streams_total": k.streams_total.load(Ordering::Relaxed),
                },
                "retiring_keys": e.retiring.iter().map(|r| {
                    let retire_at = r.retire_at.load(Ordering::Relaxed);
                    json!({
                        "fingerprint": r.fingerprint,
                        "retire_at": retire_at,
                        "overdue": retire_at <= unix,
                        "live_streams": r.live.load(Ordering::Relaxed),
                        "streams_total": r.streams_total.load(Ordering::Relaxed),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let pools: Vec<_> = super::pools::views(&admin.pools, &accounts.ring(), now)
        .iter()
        .map(super::pools::PoolView::json)
        .collect();
    json!({ "accounts": items, "pools": pools, "rotation_period_seconds": period })
}

/// `GET /admin/stats`: merged stream, traffic, error and latency figures,
/// and `live`, the client streams admitted and not yet ended
/// (`clio_relay_streams_live`, the dashboard's live streams).
pub(super) fn stats(
    admin: &Admin,
    live: u64,
    shards: &[crate::core::metrics::MetricsSnapshot],
) -> Vec<u8> {
    use crate::core::metrics::{Direction, Hist, MetricsSnapshot};
    let mut m = MetricsSnapshot::empty(0);
    for s in shards {
        m.merge(s);
    }
    let hist: Vec<_> = Hist::ALL
        .iter()
        .map(|&h| {
            let hg = m.histogram(h);
            let ms = |v: u64| v as f64 * 1000.0 / h.units_per_second() as f64;
            json!({
                "name": h.display_name(),
                "count": hg.len(),
                "p50_ms": ms(hg.value_at_quantile(0.5)),
                "p90_ms": ms(hg.value_at_quantile(0.9)),
                "p99_ms": ms(hg.value_at_quantile(0.99)),
                "p999_ms": ms(hg.value_at_quantile(0.999)),
                "max_ms": ms(hg.max()),
            })
        })
        .collect();
    let accounts: Vec<_> = m
        .accounts()
        .iter()
        .map(|a| json!({"id": a.id, "streams_active": a.streams_active, "streams_total": a.streams_total, "retries": a.retries}))
        .collect();
    let errors: Vec<_> = m
        .error_counts()
        .map(|(side, code, n)| json!({"side": side.label(), "code": code, "count": n}))
        .collect();
    let refusals: serde_json::Map<String, serde_json::Value> = crate::core::metrics::RefusedBy::ALL
        .iter()
        .map(|by| (by.label().to_string(), json!(m.refusals(*by))))
        .collect();
    ok(json!({
        "streams_live": live,
        "streams_active": m.active_streams(),
        "streams_total": m.streams_total(),
        "streams_rejected": m.streams_rejected(),
        "refusals": refusals,
        "frames": {"client_to_upstream": m.frames(Direction::ClientToUpstream), "upstream_to_client": m.frames(Direction::UpstreamToClient)},
        "bytes": {"client_to_upstream": m.bytes(Direction::ClientToUpstream), "upstream_to_client": m.bytes(Direction::UpstreamToClient)},
        "accounts": accounts,
        "errors": errors,
        "alerts_firing": super::alerts::firing_json(admin),
        "latency": hist,
    }))
}

/// Once a second on the admin thread: take the account changes another
/// process saved in the key store, free the metrics indices of removed
/// accounts nothing holds, drop removed accounts' reconciliations, retire
/// keys whose overlap is over, and warn (once a day per key) about keys
/// due for rotation.
pub(super) async fn housekeeping(admin: &Admin) {
    // The key store saved by another process (a hand-over's other relay),
    // and a change whose save failed, saved once the disk has room: not
    // inside an account change (its write under way, another process's
    // save would be skipped and written over), left to the next second.
    if let Ok(_one_at_a_time) = admin.accounts.changing.try_acquire_permit(1) {
        admin.catch_up_store().await;
        admin.save_unsaved_store().await;
    }
    // The config keys' dates, if the file is gone from the state directory.
    admin.keep_key_dates().await;
    // Removed accounts whose last stream has ended: their metrics index
    // is freed and their series go.
    let freed = admin.accounts.set.borrow_mut().free_metrics_slots();
    if freed {
        admin.publish();
    }
    // A removed account's last comparison with Soniox's usage logs goes
    // with it (its drift series, and the drift alert on it).
    {
        let set = admin.accounts.set.borrow();
        admin
            .usage
            .reconciliation
            .borrow_mut()
            .retain(|id, _| set.get(id).is_some());
    }
    let now = unix_now();
    let overdue = admin.accounts.set.borrow_mut().expire_retiring(now);
    for k in overdue {
        // Once per key: its streams move to a current key (raw audio, by
        // a resume) or are finalized and told to reconnect; the key is
        // retired when the last one has left it.
        if !k.ending.swap(true, Ordering::Relaxed) {
            tracing::warn!(key = %k.fingerprint, live = k.live.load(Ordering::Relaxed), "rotated-out key is past its overlap; moving its streams off it");
            for tx in &admin.shards {
                let _ = tx.try_send(crate::dataplane::shard::ShardMsg::EndKey(
                    k.fingerprint.clone(),
                ));
            }
        }
    }
    thread_local! {
        static LAST_WARNED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let due = LAST_WARNED.with(|c| {
        // Or the clock was stepped back since (one that was ahead, put
        // right): else none until it passes the day after the last again.
        let due = now >= c.get() + 24 * 3600 || now < c.get();
        if due {
            c.set(now);
        }
        due
    });
    if due {
        let period = admin.config.borrow().rotation_period.as_secs();
        for e in admin.accounts.set.borrow().entries() {
            let age = now.saturating_sub(e.current.created_at);
            if age >= period {
                tracing::warn!(account = %e.state.id, key = %e.current.fingerprint, age_days = age / 86400, "key is older than the rotation period; rotate it");
            }
        }
    }
}

/// Per-key metrics appended to `/metrics`: key age, keys due for rotation,
/// streams on retiring keys. Fingerprints label keys; keys never appear.
pub(super) fn render_key_metrics(admin: &Admin, out: &mut String) {
    let now = unix_now();
    let period = admin.config.borrow().rotation_period.as_secs();
    let accounts = admin.accounts.set.borrow();
    let mut f = family(
        out,
        "clio_relay_key_age_seconds",
        Kind::Gauge,
        "Age of each account's current key.",
    );
    for e in accounts.entries() {
        f.sample(
            &[("account", &e.state.id), ("key", &e.current.fingerprint)],
            now.saturating_sub(e.current.created_at),
        );
    }
    let due = accounts
        .entries()
        .iter()
        .filter(|e| now.saturating_sub(e.current.created_at) >= period)
        .count();
    family(
        out,
        "clio_relay_keys_due_for_rotation",
        Kind::Gauge,
        "Current keys older than the rotation period.",
    )
    .sample(&[], due);
    let mut f = family(
        out,
        "clio_relay_key_streams_active",
        Kind::Gauge,
        "Live streams per key, current and retiring.",
    );
    for e in accounts.entries() {
        let keys = std::iter::once((&e.current, "current"))
            .chain(e.retiring.iter().map(|k| (k, "retiring")));
        for (k, state) in keys {
            f.sample(
                &[
                    ("account", &e.state.id),
                    ("key", &k.fingerprint),
                    ("state", state),
                ],
                k.live.load(Ordering::Relaxed),
            );
        }
    }
}
