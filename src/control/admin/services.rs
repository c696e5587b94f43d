//! The admin thread's services, each a task that never ends: accounts
//! (key retirement and rotation warnings, the fleet's account sets), usage
//! (the ledger, alerts, reconciliation, saving), health (endpoint probes
//! and key checks), the process's own upkeep, and the main thread's
//! messages.

use std::time::{Duration, Instant};

use futures_lite::future::or;

use super::{alerts, api, meter, Admin, AdminMsg};
use crate::control::health;
use crate::dataplane::accept::Spare;
use crate::dataplane::upstream::UpstreamFault;

/// The accounts service: once a second, keys past their overlap are
/// retired and keys due for rotation are warned about; the account sets
/// other nodes of the fleet store are applied as they come. Never ends.
pub(super) async fn accounts(
    admin: &Admin,
    fleet_accounts: Option<async_channel::Receiver<(i64, Vec<u8>)>>,
) {
    let keys = async {
        loop {
            glommio::timer::Timer::new(Duration::from_secs(1)).await;
            api::housekeeping(admin).await;
        }
    };
    or(keys, from_fleet(admin, fleet_accounts)).await
}

/// The usage service: once a second the shards' usage goes into the
/// ledger (and the fleet's), and, when due, the alerts are evaluated and
/// usage is reconciled with Soniox's logs; beside that, the ledger is
/// saved when due (a save waiting on a slow disk holds up none of the
/// rest). Never ends.
pub(super) async fn usage(admin: &Admin) {
    // A save is asked for right after the records it is due for are
    // taken, as when it ran in this loop; one asked for while the last
    // is still being written is the same save.
    let (due, saves) = async_channel::bounded::<()>(1);
    let upkeep = async {
        let mut last_save = Instant::now();
        let mut last_alerts = Instant::now();
        let mut last_reconcile: Option<Instant> = None;
        loop {
            glommio::timer::Timer::new(Duration::from_secs(1)).await;
            meter::take_usage(admin).await;
            if last_alerts.elapsed() >= admin.usage.cfg.borrow().alerts.interval {
                last_alerts = Instant::now();
                alerts::evaluate(admin).await;
            }
            let every = admin.usage.cfg.borrow().reconcile_interval;
            if !every.is_zero() && last_reconcile.is_none_or(|t| t.elapsed() >= every) {
                last_reconcile = Some(Instant::now());
                meter::reconcile(admin).await;
            }
            if last_save.elapsed() >= admin.usage.cfg.borrow().persist_interval {
                last_save = Instant::now();
                let _ = due.try_send(());
            }
            learn_others_daily_audio(admin);
        }
    };
    let persist = async {
        while saves.recv().await.is_ok() {
            save_usage(admin, false).await;
        }
    };
    or(upkeep, persist).await
}

/// Alone, with a daily allowance: the devices' audio today that another
/// process wrote to the shared ledger (the old relay of a hand-over
/// restart, as its streams end), so a device moving from it to this
/// process does not get its allowance again. Looked at once a second;
/// read only when another process committed. (In a fleet Redis has it.)
fn learn_others_daily_audio(admin: &Admin) {
    let devices = &admin.process.devices;
    if admin.process.fleet.get().is_some() || !devices.daily_audio() {
        return;
    }
    let day = crate::core::devices::utc_day(std::time::SystemTime::now());
    let others = admin.usage.book.borrow_mut().others_device_audio(day);
    for (device, ms) in others.into_iter().flatten() {
        devices.seed_daily_audio(&device, day, ms);
    }
}

/// Once a second: the admin port's spare descriptors are refilled, the
/// devices' idle states swept, and the refusals and upstream failures a
/// flood kept out of the log counted in a line. Never ends.
pub(super) async fn process(admin: &Admin, spare: &Spare) {
    loop {
        glommio::timer::Timer::new(Duration::from_secs(1)).await;
        spare.refill();
        admin.process.refusal_log.roll();
        admin.process.upstream_log.roll();
        admin.process.devices.sweep(
            std::time::SystemTime::now(),
            admin.process.fleet.get().is_some(),
        );
    }
}

/// Saves the usage ledger if it changed, one save at a time. The commit
/// runs on the admin thread's blocking thread: on a slow disk it takes
/// seconds, and the admin port answers meanwhile. A failure is logged
/// when the last try did not fail too (and always at the stop, when what
/// is kept in memory is lost), and the first save after failures says
/// so; `clio_relay_usage_ledger_failing` shows which holds now.
async fn save_usage(admin: &Admin, at_stop: bool) {
    let Ok(_one) = admin.usage.saving.acquire_permit(1).await else {
        return;
    };
    let dir = admin.config.borrow().state_dir.clone();
    let job = admin.usage.book.borrow_mut().begin_save(&dir);
    let saved = match job {
        Ok(Some(job)) => {
            // This thread's work waits on the disk (the watchdog counts a
            // stop's flush, which holds the main thread's messages, alive).
            let _disk = crate::core::disk_wait::writing();
            let done = glommio::executor().spawn_blocking(move || job.run()).await;
            admin.usage.book.borrow_mut().end_save(done)
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let failed_before = admin.usage.ledger_failing.get();
    match saved {
        // Nothing to save leaves a database that would not open unopened.
        Ok(()) if !admin.usage.book.borrow().is_open() => {}
        Ok(()) => {
            if failed_before {
                tracing::info!(dir = %dir.display(), "usage ledger written again; the usage kept in memory meanwhile is in it");
            }
            admin.usage.ledger_failing.set(false);
        }
        Err(e) => {
            if at_stop {
                tracing::error!(dir = %dir.display(), error = %e, "cannot write the usage ledger at the stop; the usage not saved since the last persist is lost");
            } else if !failed_before {
                tracing::error!(dir = %dir.display(), error = %e, "cannot write the usage ledger; usage is kept in memory and saved when it can be");
            }
            admin.usage.ledger_failing.set(true);
        }
    }
}

/// Answers the main thread's messages (reloads, the watchdog's ping).
pub(super) async fn messages(admin: &Admin, inbox: async_channel::Receiver<AdminMsg>) {
    while let Ok(msg) = inbox.recv().await {
        match msg {
            AdminMsg::Reload(cfg, reply) => {
                let _ = reply.send(admin.reload(&cfg).await).await;
            }
            AdminMsg::Ping(reply) => {
                let _ = reply.send("admin".into());
            }
            AdminMsg::Flush(reply) => {
                meter::take_usage(admin).await;
                save_usage(admin, true).await;
                // The state files' writes asked for before the stop end
                // before the process does: a change is answered as saved
                // only once it is. (Waiting on the disk, as the flush.)
                let disk = crate::core::disk_wait::writing();
                admin.revocations_file.turns.settled().await;
                admin.accounts.store_turns.settled().await;
                admin.key_dates_turns.settled().await;
                drop(disk);
                // And their requests' answers (2 s at most: a client that
                // reads slowly does not hold the stop).
                let until = Instant::now() + Duration::from_secs(2);
                while admin.answering.get() > 0 && Instant::now() < until {
                    glommio::timer::Timer::new(Duration::from_millis(10)).await;
                }
                let _ = reply.send(());
            }
        }
    }
    futures_lite::future::pending::<()>().await;
}

/// Applies the account sets other nodes of the fleet store.
async fn from_fleet(
    admin: &Admin,
    fleet_accounts: Option<async_channel::Receiver<(i64, Vec<u8>)>>,
) {
    if let Some(rx) = fleet_accounts {
        while let Ok((version, sealed)) = rx.recv().await {
            // Between this node's changes, not inside one: applied while
            // a change waited on its key store write, it undid the change,
            // which then stored the set without it over this version and
            // was answered 200. A change under way finds the set itself.
            let _one_at_a_time = admin.accounts.changing.acquire_permit(1).await;
            // One this node has already (a change of its own stored since,
            // or the set its last change found) is not applied again.
            if version > admin.accounts.fleet_version.get() {
                admin.apply_fleet_accounts(version, &sealed).await;
            }
        }
    }
    futures_lite::future::pending::<()>().await;
}

/// The health service: every `admin.health_interval`, each pool's
/// WebSocket endpoint (see [`probe_endpoints`]), then each key against
/// its own pool's REST API. Never ends.
pub(super) async fn health(admin: &Admin) {
    let mut probed = false;
    loop {
        let interval = admin.config.borrow().health_interval;
        // The WebSocket endpoint itself, at the first check and while a
        // configuration fault stands: a wrong upstream.url is found at
        // start, not by the first user.
        if !interval.is_zero() && (!probed || admin.process.upstream_fault.get().is_some()) {
            probed = probe_endpoints(admin).await;
        }
        if admin.health.rests.is_empty() || interval.is_zero() {
            glommio::timer::Timer::new(Duration::from_secs(1)).await;
            continue;
        }
        check_keys(admin).await;
        glommio::timer::Timer::new(interval).await;
    }
}

/// Probes every pool's WebSocket endpoint, in order; the first wrong one
/// keeps the fault (a later good one does not clear it). Whether the last
/// probe got an answer.
async fn probe_endpoints(admin: &Admin) -> bool {
    let mut probed = false;
    for t in &admin.health.endpoints {
        let fault = &admin.process.upstream_fault;
        let status = health::probe_websocket(t, fault, Duration::from_secs(10)).await;
        probed = status.is_some();
        if status.is_some_and(UpstreamFault::is_config_fault) {
            break;
        }
    }
    probed
}

/// Checks each account's current key against its own pool's REST API (an
/// EU key is unknown to the US host), logging changes of health.
async fn check_keys(admin: &Admin) {
    let targets: Vec<_> = admin
        .accounts
        .set
        .borrow()
        .entries()
        .iter()
        .map(|e| (e.state.clone(), e.current.clone()))
        .collect();
    for (account, key) in targets {
        let Some(rest) = admin.rest_for(&account.pool) else {
            continue;
        };
        let before = account.healthy(Instant::now());
        let verdict = rest.check(&account, &key, Duration::from_secs(10)).await;
        admin.health.checks.add(verdict);
        let after = account.healthy(Instant::now());
        if before != after {
            tracing::warn!(account = %account.id, key = %key.fingerprint, ?verdict, healthy = after, "health check changed the account's health");
        } else if verdict == health::Verdict::Unknown {
            tracing::debug!(account = %account.id, "health check could not reach the REST API");
        }
    }
}
