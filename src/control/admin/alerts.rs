//! In-process alerts, evaluated on the admin thread every `alerts.interval`:
//!
//! | alert | fires when |
//! |---|---|
//! | `account_near_concurrency` | an account's live streams reach `concurrency_ratio` of its limit |
//! | `pool_near_concurrency` | a pool's live streams reach `concurrency_ratio` of what its enabled accounts carry (its streams cannot go to another pool) |
//! | `account_near_budget` | an account's cost this month (in a fleet, the fleet's) reaches `budget_ratio` of its monthly budget |
//! | `unusual_usage` | a device or account streamed, in the current hour, `unusual_factor` × its average hour of the previous 24 (and at least `unusual_min_audio_seconds`); never without a baseline (no audio in the previous 24 hours) |
//! | `high_error_rate` | upstream and internal errors reach `error_rate` of the streams started in the last window (once `error_min_streams` started) |
//! | `slow_first_result` | p99 time to first result in the last window is over `slow_first_result` |
//! | `cluster_store_down` | in a fleet (`[cluster]`), this node cannot reach the shared store (Redis) |
//! | `cluster_clock_offset` | in a fleet, this node's clock is more than 2 s from Redis's (value: the offset in seconds) |
//! | `upstream_config_fault` | upstream answered the WebSocket upgrade with 400, 404 or another status that says `upstream.url` is wrong, or its TLS certificate was refused (495) |
//!
//! Each change (firing or resolved) is a structured log event, the gauge
//! `clio_relay_alerts_firing{alert,subject}`, and optionally a JSON POST to
//! `alerts.webhook_url`, sent in order by a task of its own and retried on
//! network errors, 5xx and 429 (4 tries within 30 s).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{meter, Admin};
use crate::control::httpc::{client, Endpoint, Request, Retry};
use crate::core::metrics::text::{family, Kind};
use crate::core::metrics::{Hist, MetricsSnapshot, RefusedBy, Side};
use crate::core::usage::UsageRecord;

/// Hours of history kept per subject for the usage baseline.
const HOURS: usize = 25;

/// What the alert evaluator remembers between passes.
#[derive(Debug, Default)]
pub(super) struct AlertState {
    /// (alert, subject) → firing now; resolved ones stay, at false (a
    /// resolved `unusual_usage` only while its subject is in `hourly`, an
    /// account's only while the account is in the set).
    states: BTreeMap<(String, String), bool>,
    /// The merged metrics at the last pass (for window deltas).
    prev: Option<MetricsSnapshot>,
    /// Subject → (hour, audio ms) for each hour of the last 24 and this one
    /// in which it streamed, oldest first: at most [`HOURS`] entries, and
    /// one for a device that streamed in one hour (16 bytes, not a slot for
    /// every hour). Subjects with no audio in the last 24 hours are dropped
    /// (see [`AlertState::feed_at`]), so the map holds the devices and
    /// accounts seen in a day, not every one ever seen.
    hourly: HashMap<String, Vec<(u64, u64)>>,
    /// The hour of the last pruning of `hourly`.
    pruned_hour: u64,
    /// (alert, subject) → what is firing now: value, threshold, and since
    /// when (Unix seconds); for the dashboard.
    firing: BTreeMap<(String, String), (f64, f64, u64)>,
    /// Changes on their way to `alerts.webhook_url`.
    webhook: Rc<WebhookQueue>,
}

/// Whether a subject's audio this hour (`now_ms`) is unusual against its
/// average hour of the previous 24 (`baseline_ms`). No baseline, no alert:
/// a subject with no audio in the previous 24 hours (a new device, or any
/// subject on a relay less than an hour old, since the history lives in
/// memory) has nothing to be unusual against.
fn unusual(now_ms: u64, baseline_ms: f64, factor: f64, floor_ms: u64) -> bool {
    baseline_ms > 0.0 && now_ms >= floor_ms && now_ms as f64 > factor * baseline_ms
}

fn hour_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

impl AlertState {
    /// Adds ended streams' audio to the hourly history.
    pub(super) fn feed(&mut self, records: &[UsageRecord]) {
        self.feed_at(records, hour_now());
    }

    /// [`feed`](Self::feed) at `hour` (hours since the epoch). Once per new
    /// hour it first drops the subjects whose every slot is over 24 hours
    /// old: they have no baseline left and nothing this hour.
    fn feed_at(&mut self, records: &[UsageRecord], hour: u64) {
        if hour != self.pruned_hour {
            self.pruned_hour = hour;
            self.hourly.retain(|_, slots| {
                slots
                    .iter()
                    .any(|&(h, ms)| ms > 0 && h <= hour && hour - h <= 24)
            });
            // A resolved `unusual_usage` of a subject gone from the history
            // goes too: its subjects are devices, and a series kept at 0
            // for every device that ever fired would grow without end.
            let hourly = &self.hourly;
            self.states.retain(|(alert, subject), firing| {
                *firing || alert != "unusual_usage" || hourly.contains_key(subject)
            });
        }
        for r in records {
            for subject in [
                format!("account:{}", r.account),
                format!("device:{}", r.device),
            ] {
                let slots = self.hourly.entry(subject).or_default();
                match slots.last_mut() {
                    Some(slot) if slot.0 == hour => slot.1 += r.audio_ms(),
                    _ => {
                        // A new hour: what no baseline will count again goes.
                        slots.retain(|&(h, _)| h < hour && hour - h < HOURS as u64);
                        slots.push((hour, r.audio_ms()));
                    }
                }
            }
        }
    }

    /// (this hour, average of the previous 24 hours) for a subject, in ms.
    fn usage(&self, slots: &[(u64, u64)], hour: u64) -> (u64, f64) {
        let now = slots.iter().find(|(h, _)| *h == hour).map_or(0, |s| s.1);
        let past: u64 = slots
            .iter()
            .filter(|(h, _)| *h < hour && hour - *h <= 24)
            .map(|s| s.1)
            .sum();
        (now, past as f64 / 24.0)
    }
}

/// The alerts whose subject is an account id.
const ACCOUNT_ALERTS: [&str; 2] = ["account_near_concurrency", "account_near_budget"];

/// One alert's finding.
struct Finding {
    alert: &'static str,
    subject: String,
    value: f64,
    threshold: f64,
}

/// Evaluates every alert once; reports changes.
pub(super) async fn evaluate(admin: &Admin) {
    let cfg = admin.usage.cfg.borrow().alerts.clone();
    let mut found: Vec<Finding> = Vec::new();
    // Concurrency and budget, per account. In a fleet the budget is the
    // fleet's: this month's audio of every node (this node's own while
    // Redis is unreachable).
    let mut month = meter::month_audio(admin);
    if let Some(f) = admin.process.fleet.get().filter(|f| f.store_up()) {
        let today = crate::core::devices::utc_day(SystemTime::now());
        let from = crate::control::usage::month_start(today);
        if let Ok(by_node) = f
            .usage(from, today, crate::core::usage::GroupBy::Account)
            .await
        {
            month = crate::core::cluster::usage::fleet_totals(&by_node)
                .into_iter()
                .map(|(k, t)| (k, t.audio_ms))
                .collect();
        }
    }
    {
        let prices = admin.usage.prices.borrow();
        for e in admin.accounts.set.borrow().entries() {
            let a = &e.state;
            let max = a.effective_max();
            // In a fleet, every node's streams count against the limit.
            let live = a.live_for_limit();
            if max > 0 && live as f64 >= cfg.concurrency_ratio * max as f64 {
                found.push(Finding {
                    alert: "account_near_concurrency",
                    subject: a.id.clone(),
                    value: live as f64 / max as f64,
                    threshold: cfg.concurrency_ratio,
                });
            }
            let p = prices.get(&a.id).copied().unwrap_or_default();
            if p.monthly_budget > 0.0 {
                let spent = meter::cost(month.get(&a.id).copied().unwrap_or(0), p.per_hour);
                if spent >= cfg.budget_ratio * p.monthly_budget {
                    found.push(Finding {
                        alert: "account_near_budget",
                        subject: a.id.clone(),
                        value: spent / p.monthly_budget,
                        threshold: cfg.budget_ratio,
                    });
                }
            }
        }
    }
    // Concurrency per pool: a pool's streams never spill into another, so a
    // full pool refuses streams while others have room.
    let ring = admin.process.ring();
    for v in super::pools::views(&admin.pools, &ring, std::time::Instant::now()) {
        let max = v.max_concurrent_streams;
        let live = u64::from(v.live_streams);
        if max > 0 && live as f64 >= cfg.concurrency_ratio * max as f64 {
            found.push(Finding {
                alert: "pool_near_concurrency",
                subject: v.name.clone(),
                value: live as f64 / max as f64,
                threshold: cfg.concurrency_ratio,
            });
        }
    }
    // The fleet's shared store, seen from this node.
    if let Some(f) = admin.process.fleet.get().filter(|f| !f.store_up()) {
        found.push(Finding {
            alert: "cluster_store_down",
            subject: f.node_id.clone(),
            value: 0.0,
            threshold: 1.0,
        });
    }
    // This node's clock against Redis's: token times and usage days go by
    // this node's.
    if let Some((f, off)) = admin
        .process
        .fleet
        .get()
        .and_then(|f| Some((f, f.clock_off()?)))
    {
        found.push(Finding {
            alert: "cluster_clock_offset",
            subject: f.node_id.clone(),
            value: off,
            threshold: crate::core::cluster::CLOCK_TOLERANCE.as_secs_f64(),
        });
    }
    // A wrong upstream.url: every stream fails until it is fixed.
    if let Some(status) = admin.process.upstream_fault.get() {
        found.push(Finding {
            alert: "upstream_config_fault",
            subject: "upstream".into(),
            value: status as f64,
            threshold: 0.0,
        });
    }
    // Unusual usage against each subject's own baseline.
    {
        let state = admin.usage.alerts.borrow();
        let hour = hour_now();
        for (subject, slots) in &state.hourly {
            let (now, baseline) = state.usage(slots, hour);
            let floor = cfg.unusual_min_audio_seconds * 1000;
            if unusual(now, baseline, cfg.unusual_factor, floor) {
                found.push(Finding {
                    alert: "unusual_usage",
                    subject: subject.clone(),
                    value: now as f64 / 1000.0,
                    threshold: cfg.unusual_factor * baseline / 1000.0,
                });
            }
        }
    }
    // Error rate and first-result latency over the window since the last pass.
    let snaps = super::collect(&admin.shards).await;
    let mut now = MetricsSnapshot::empty(0);
    for s in &snaps {
        now.merge(s);
    }
    // The first window runs from the relay's start.
    let prev = admin
        .usage
        .alerts
        .borrow_mut()
        .prev
        .replace(now.clone())
        .unwrap_or_else(|| MetricsSnapshot::empty(0));
    {
        // Streams started: opened, or refused by the relay or upstream (a
        // refusal that is the client's own counts in neither the errors
        // nor here, see `RefusedBy::is_clients_own`).
        let started = |m: &MetricsSnapshot| {
            m.streams_total()
                + RefusedBy::ALL
                    .into_iter()
                    .filter(|by| !by.is_clients_own())
                    .map(|by| m.refusals(by))
                    .sum::<u64>()
        };
        let streams = started(&now).saturating_sub(started(&prev));
        let errors = |m: &MetricsSnapshot| {
            m.error_counts()
                .filter(|(side, _, _)| *side != Side::Client)
                .map(|(_, _, n)| n)
                .sum::<u64>()
        };
        let errs = errors(&now).saturating_sub(errors(&prev));
        if streams >= cfg.error_min_streams
            && streams > 0
            && errs as f64 >= cfg.error_rate * streams as f64
        {
            found.push(Finding {
                alert: "high_error_rate",
                subject: "relay".into(),
                value: errs as f64 / streams as f64,
                threshold: cfg.error_rate,
            });
        }
        let mut window = now.histogram(Hist::FirstResult).clone();
        if window.subtract(prev.histogram(Hist::FirstResult)).is_ok() && !window.is_empty() {
            let p99 = Duration::from_micros(window.value_at_quantile(0.99));
            if p99 > cfg.slow_first_result {
                found.push(Finding {
                    alert: "slow_first_result",
                    subject: "relay".into(),
                    value: p99.as_secs_f64(),
                    threshold: cfg.slow_first_result.as_secs_f64(),
                });
            }
        }
    }
    // Transitions.
    let mut changes = Vec::new();
    let accounts: std::collections::HashSet<String> = admin
        .accounts
        .set
        .borrow()
        .entries()
        .iter()
        .map(|e| e.state.id.clone())
        .collect();
    {
        let mut state = admin.usage.alerts.borrow_mut();
        let firing: HashMap<(String, String), &Finding> = found
            .iter()
            .map(|f| ((f.alert.to_string(), f.subject.clone()), f))
            .collect();
        for (key, f) in &firing {
            if !state.states.get(key).copied().unwrap_or(false) {
                changes.push(json!({"alert": f.alert, "subject": f.subject, "state": "firing", "value": f.value, "threshold": f.threshold}));
            }
        }
        for (key, was) in state.states.iter_mut() {
            let is = firing.contains_key(key);
            if *was && !is {
                changes.push(json!({"alert": key.0, "subject": key.1, "state": "resolved"}));
            }
            *was = is;
        }
        for key in firing.keys() {
            state.states.insert(key.clone(), true);
        }
        // A resolved alert of an account gone from the set goes too (its
        // resolution was reported above): a series kept at 0 for every
        // account ever removed would grow without end.
        state.states.retain(|(alert, subject), firing| {
            *firing || !ACCOUNT_ALERTS.contains(&alert.as_str()) || accounts.contains(subject)
        });
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let before = std::mem::take(&mut state.firing);
        for (key, f) in &firing {
            let since = before.get(key).map_or(at, |b| b.2);
            state
                .firing
                .insert(key.clone(), (f.value, f.threshold, since));
        }
    }
    for c in changes {
        if c["state"] == "firing" {
            tracing::warn!(alert = %c["alert"].as_str().unwrap_or(""), subject = %c["subject"].as_str().unwrap_or(""), value = c["value"].as_f64().unwrap_or(0.0), threshold = c["threshold"].as_f64().unwrap_or(0.0), "alert firing");
        } else {
            tracing::info!(alert = %c["alert"].as_str().unwrap_or(""), subject = %c["subject"].as_str().unwrap_or(""), "alert resolved");
        }
        if let Some(url) = &cfg.webhook_url {
            post(admin, url, &c);
        }
    }
}

/// Alert changes waiting for the webhook, in order, and whether a task is
/// sending them. One task at a time sends, so a resolution never overtakes
/// its firing; it runs apart from the evaluation, so the admin thread's
/// other work never waits for a slow or failing webhook.
#[derive(Debug, Default)]
pub(super) struct WebhookQueue {
    /// (URL, body) of each change not sent yet.
    pending: RefCell<VecDeque<(String, String)>>,
    sending: Cell<bool>,
}

/// Changes held for a webhook that does not take them; older ones are
/// dropped (and logged) beyond this.
const WEBHOOK_QUEUE: usize = 256;

/// Queues one alert change for the webhook and starts the sender if idle.
fn post(admin: &Admin, url: &str, change: &serde_json::Value) {
    let mut body = change.clone();
    body["source"] = json!("clio-relay");
    body["at"] = json!(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()));
    let queue = admin.usage.alerts.borrow().webhook.clone();
    {
        let mut pending = queue.pending.borrow_mut();
        if pending.len() >= WEBHOOK_QUEUE {
            pending.pop_front();
            tracing::warn!(
                held = WEBHOOK_QUEUE,
                "alert webhook backlog full; the oldest change is dropped"
            );
        }
        pending.push_back((url.to_string(), body.to_string()));
    }
    if queue.sending.replace(true) {
        return;
    }
    let tls = admin.tls.clone();
    glommio::spawn_local(async move {
        loop {
            let next = queue.pending.borrow_mut().pop_front();
            let Some((url, body)) = next else { break };
            send(&url, body.as_bytes(), tls.clone()).await;
        }
        queue.sending.set(false);
    })
    .detach();
}

/// POSTs one change, retrying on network errors, 5xx and 429
/// ([`Retry::WEBHOOK`]: 4 tries within 30 s); what still fails is logged.
async fn send(url: &str, body: &[u8], tls: Option<std::sync::Arc<rustls::ClientConfig>>) {
    let (ep, target) = match Endpoint::parse_url(url, tls) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "alert webhook URL unusable");
            return;
        }
    };
    let req = Request::post_json(&target, body);
    let (outcome, tries) =
        client::send_with_retry(&ep, &req, Duration::from_secs(5), Retry::WEBHOOK).await;
    match outcome {
        Ok(r) if (200..300).contains(&r.status) => {}
        Ok(r) => tracing::warn!(status = r.status, tries, "alert webhook refused the alert"),
        Err(e) => tracing::warn!(error = %e, tries, "alert webhook unreachable"),
    }
}

/// The alerts firing now, for `/admin/stats` and the dashboard.
pub(super) fn firing_json(admin: &Admin) -> serde_json::Value {
    let state = admin.usage.alerts.borrow();
    serde_json::Value::Array(
        state
            .firing
            .iter()
            .map(|((alert, subject), (value, threshold, since))| {
                json!({"alert": alert, "subject": subject, "value": value, "threshold": threshold, "since": since})
            })
            .collect(),
    )
}

/// `clio_relay_alerts_firing{alert,subject}` for `/metrics`.
pub(super) fn render_metrics(state: &AlertState, out: &mut String) {
    let mut f = family(
        out,
        "clio_relay_alerts_firing",
        Kind::Gauge,
        "In-process alerts: 1 while firing, 0 once resolved.",
    );
    for ((alert, subject), firing) in &state.states {
        f.sample(&[("alert", alert), ("subject", subject)], u8::from(*firing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, ms: u64) -> UsageRecord {
        UsageRecord {
            day: 0,
            account: "acct".into(),
            device: device.into(),
            reference_id: "r".into(),
            audio_ms_relay: ms,
            audio_ms_upstream: None,
            bytes_up: 0,
            bytes_down: 0,
            error: None,
            part: false,
        }
    }

    #[test]
    fn alert_subjects_are_escaped_in_the_metrics() {
        // Ids are checked where they enter; the text must not rely on it.
        let mut s = AlertState::default();
        let subject = "dev \"7\"\\x\ny";
        s.states
            .insert(("unusual_usage".into(), subject.into()), true);
        let mut out = String::new();
        render_metrics(&s, &mut out);
        assert!(
            out.lines().any(|l| l
                == r#"clio_relay_alerts_firing{alert="unusual_usage",subject="dev \"7\"\\x\ny"} 1"#),
            "{out}"
        );
    }

    /// Each device that ever fired `unusual_usage` kept its series, at 0,
    /// until a restart: a label that grew with the devices. It now goes
    /// when the device leaves the usage history; other alerts' subjects
    /// (accounts, pools, nodes) stay at 0.
    #[test]
    fn a_resolved_unusual_usage_leaves_the_metrics_with_its_device() {
        let rendered = |s: &AlertState| {
            let mut out = String::new();
            render_metrics(s, &mut out);
            out
        };
        let mut s = AlertState::default();
        let h = 500_000;
        s.feed_at(&[record("dev-1", 1_000)], h);
        s.states
            .insert(("unusual_usage".into(), "device:dev-1".into()), false);
        s.states
            .insert(("account_near_concurrency".into(), "acct".into()), false);
        s.feed_at(&[], h + 1);
        let out = rendered(&s);
        assert!(
            out.contains(
                r#"clio_relay_alerts_firing{alert="unusual_usage",subject="device:dev-1"} 0"#
            ),
            "{out}"
        );
        // A day without audio: the device leaves the history, and the metrics.
        s.feed_at(&[], h + 25);
        let out = rendered(&s);
        assert!(!out.contains("device:dev-1"), "{out}");
        assert!(
            out.contains(
                r#"clio_relay_alerts_firing{alert="account_near_concurrency",subject="acct"} 0"#
            ),
            "{out}"
        );
    }

    #[test]
    fn subjects_silent_for_a_day_are_dropped() {
        let mut s = AlertState::default();
        let h = 500_000;
        s.feed_at(&[record("old", 1_000)], h);
        s.feed_at(&[record("new", 1_000)], h + 10);
        assert_eq!(s.hourly.len(), 3, "account + two devices");
        // 24 hours after "old" streamed it is still part of a baseline.
        s.feed_at(&[], h + 24);
        assert!(s.hourly.contains_key("device:old"));
        // One more hour and it is gone; "new" and the account stay.
        s.feed_at(&[], h + 25);
        assert!(!s.hourly.contains_key("device:old"));
        assert!(s.hourly.contains_key("device:new"));
        assert!(s.hourly.contains_key("account:acct"));
        let slots = &s.hourly["device:new"];
        assert_eq!(slots.len(), 1, "one hour with audio, one entry");
        assert_eq!(s.usage(slots, h + 11), (0, 1_000.0 / 24.0));
        // A day of silence for everyone empties the map.
        s.feed_at(&[], h + 10 + 25);
        assert!(s.hourly.is_empty());
    }

    #[test]
    fn unusual_usage_needs_a_baseline() {
        let (factor, floor) = (5.0, 600_000);
        let mut s = AlertState::default();
        let h = 500_000;
        // A new subject: an hour of audio and no history. Not unusual.
        s.feed_at(&[record("new", 3_600_000)], h);
        let (now, baseline) = s.usage(&s.hourly["device:new"], h);
        assert_eq!((now, baseline), (3_600_000, 0.0));
        assert!(!unusual(now, baseline, factor, floor));
        // With history: 2 minutes an hour on average over the last day...
        let mut s = AlertState::default();
        for k in (1..=24).rev() {
            s.feed_at(&[record("old", 120_000)], h - k);
        }
        s.feed_at(&[record("old", 601_000)], h);
        let (now, baseline) = s.usage(&s.hourly["device:old"], h);
        assert_eq!(baseline, 120_000.0);
        assert_eq!(
            s.hourly["device:old"].len(),
            HOURS,
            "this hour and 24 before"
        );
        s.feed_at(&[record("old", 1)], h + 1);
        assert_eq!(s.hourly["device:old"].len(), HOURS, "the oldest hour went");
        // ...601 s this hour is over 5 × 120 s and over the floor.
        assert!(unusual(now, baseline, factor, floor));
        assert!(
            !unusual(now, baseline, 6.0, floor),
            "under 6 × the baseline"
        );
        assert!(!unusual(599_000, baseline, 1.0, floor), "under the floor");
    }
}
