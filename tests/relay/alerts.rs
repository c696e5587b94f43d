//! In-process alerts: log, metric and webhook, driven by real streams.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tungstenite::Message;

use crate::util::*;

/// A webhook receiver on 127.0.0.1:0; every POST body arrives on the channel.
fn webhook() -> (String, mpsc::Receiver<serde_json::Value>) {
    let (url, rx, _) = webhook_failing(0);
    (url, rx)
}

/// [`webhook`] that answers its first `failures` POSTs with 503 (their
/// bodies are not passed on); also returns the count of POSTs received.
fn webhook_failing(
    failures: usize,
) -> (String, mpsc::Receiver<serde_json::Value>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/clio", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn);
            let (mut line, mut len, mut path) = (String::new(), 0usize, String::new());
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("POST ") {
                    path = line.split(' ').nth(1).unwrap_or("").to_string();
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            if counted.fetch_add(1, Ordering::SeqCst) < failures {
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
                v["path"] = serde_json::Value::String(path);
                let _ = tx.send(v);
            }
        }
    });
    (url, rx, posts)
}

/// Waits for a webhook call for `alert` in `state` (calls come in any order).
fn next(rx: &mpsc::Receiver<serde_json::Value>, alert: &str, state: &str) -> serde_json::Value {
    thread_local! {
        static SEEN: std::cell::RefCell<Vec<serde_json::Value>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let matches = |v: &serde_json::Value| v["alert"] == alert && v["state"] == state;
    if let Some(v) = SEEN.with(|s| s.borrow().iter().find(|v| matches(v)).cloned()) {
        return v;
    }
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {alert} {state} webhook"));
        SEEN.with(|s| s.borrow_mut().push(v.clone()));
        if matches(&v) {
            return v;
        }
    }
}

#[test]
fn concurrency_and_budget_alerts_fire_and_resolve_with_a_webhook() {
    let fake = fake(&["k1"], |_| {});
    let (url, rx) = webhook();
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 2;
    cfg.accounts[0].price_per_hour = 3600.0; // 1 per second of audio
    cfg.accounts[0].monthly_budget = 1.0;
    cfg.usage.alerts.interval = Duration::from_millis(100);
    cfg.usage.alerts.concurrency_ratio = 0.5;
    cfg.usage.alerts.webhook_url = Some(url);
    let relay = Relay::start(cfg);
    // One live stream of two allowed: at the 50% threshold.
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let fired = next(&rx, "account_near_concurrency", "firing");
    assert_eq!(
        (
            fired["subject"].as_str(),
            fired["path"].as_str(),
            fired["source"].as_str()
        ),
        (Some("a"), Some("/hooks/clio"), Some("clio-relay"))
    );
    // The account is its pool's only one: the pool is as full.
    let pool = next(&rx, "pool_near_concurrency", "firing");
    assert_eq!(pool["subject"], "default", "{pool}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains(
            "clio_relay_alerts_firing{alert=\"account_near_concurrency\",subject=\"a\"} 1"
        ),
        "{metrics}"
    );
    // 1 s of audio costs 1 of a budget of 1: the budget alert fires too.
    for f in audio_frames(10, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut ws).finished());
    next(&rx, "account_near_concurrency", "resolved");
    let budget = next(&rx, "account_near_budget", "firing");
    assert!(budget["value"].as_f64().unwrap() >= 0.9, "{budget}");
    // README: a budget only alerts. The account, now past its budget,
    // still takes and finishes a stream.
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(10, 2));
    assert!(got.finished(), "{got:?}");
    assert_eq!(fake.sessions().len(), 2);
}

/// A webhook that answers 503 twice gets the alert on the third try.
#[test]
fn a_failing_webhook_is_retried() {
    let fake = fake(&["k1"], |_| {});
    let (url, rx, posts) = webhook_failing(2);
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 2;
    cfg.usage.alerts.interval = Duration::from_millis(100);
    cfg.usage.alerts.concurrency_ratio = 0.5;
    cfg.usage.alerts.webhook_url = Some(url);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    // The pass that fires finds the account and its pool near their limits:
    // the first change is refused twice and sent again, then both arrive.
    next(&rx, "account_near_concurrency", "firing");
    next(&rx, "pool_near_concurrency", "firing");
    assert!(posts.load(Ordering::SeqCst) >= 4, "2 refused + 2 taken");
}

#[test]
fn high_error_rate_and_slow_first_result_fire() {
    let dying = fake(&["k1"], |c| c.faults.close_after_frames = Some(2));
    let (url, rx) = webhook();
    let mut cfg = relay_config(&dying.url(), &[("a", "k1")]);
    cfg.usage.alerts.interval = Duration::from_millis(200);
    cfg.usage.alerts.error_min_streams = 3;
    cfg.usage.alerts.webhook_url = Some(url);
    let relay = Relay::start(cfg);
    for _ in 0..4 {
        let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(4, 1));
        assert_eq!(got.error_code(), Some(503));
    }
    let v = next(&rx, "high_error_rate", "firing");
    assert!(v["value"].as_f64().unwrap() >= 0.5, "{v}");

    // First results slower than 50 ms: audio at real-time pace, one word per 480 ms.
    let healthy = fake(&["k1"], |_| {});
    let (url, rx) = webhook();
    let mut cfg = relay_config(&healthy.url(), &[("a", "k1")]);
    cfg.usage.alerts.interval = Duration::from_millis(200);
    cfg.usage.alerts.slow_first_result = Duration::from_millis(50);
    cfg.usage.alerts.webhook_url = Some(url);
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(6, 1) {
        ws.send(Message::binary(f)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(read_all(&mut ws).finished());
    let v = next(&rx, "slow_first_result", "firing");
    assert!(v["value"].as_f64().unwrap() > 0.05, "{v}");
}

/// Refusals that are the client's own (here bad tokens, 50 before and after
/// each failing stream) are neither errors nor streams started: they do not
/// dilute upstream's failures below the alert's threshold. Every stream and
/// refusal is in one window, the first (from the relay's start), which a
/// long interval holds open until the last is done and a reload to a short
/// one then ends: counted in, the refusals made its 8 errors 8 of 458
/// streams started, under 5% (one error per failing stream, since none is
/// resumed). A 3 s window had to hold 3 of the streams with the refusals
/// between them, which a loaded host did not always run that fast.
#[test]
fn a_flood_of_bad_tokens_does_not_hide_a_high_error_rate() {
    let dying = fake(&["k1"], |c| c.faults.close_after_frames = Some(2));
    let (url, rx) = webhook();
    let mut cfg = relay_config(&dying.url(), &[("a", "k1")]);
    cfg.failover.max_resumes = 0;
    cfg.usage.alerts.interval = Duration::from_secs(3600);
    cfg.usage.alerts.error_min_streams = 3;
    cfg.usage.alerts.webhook_url = Some(url);
    let relay = Relay::start(cfg);
    let bad_tokens = |n| {
        for _ in 0..n {
            assert!(connect(relay.addr(), "clio1.not-a-token", Via::Header).is_err());
        }
    };
    bad_tokens(50);
    for _ in 0..8 {
        let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(4, 1));
        assert_eq!(got.error_code(), Some(503));
        bad_tokens(50);
    }
    // The window ends at the next pass of the usage service (each second).
    let mut cfg = relay.cfg.clone();
    cfg.usage.alerts.interval = Duration::from_millis(100);
    relay.handle.reload(&cfg).unwrap();
    let v = next(&rx, "high_error_rate", "firing");
    assert_eq!(v["value"].as_f64(), Some(1.0), "{v}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("clio_relay_refusals_total{by=\"client\"} 450"),
        "{metrics}"
    );
}

#[test]
fn unusual_usage_needs_a_baseline_and_the_stats_list_firing_alerts() {
    const ADMIN: &str = "alerts-admin-token-0123456789";
    let fake = fake(&["k1"], |_| {});
    let (url, rx) = webhook();
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.accounts[0].max_concurrent_streams = 2;
    cfg.usage.alerts.interval = Duration::from_millis(100);
    cfg.usage.alerts.concurrency_ratio = 0.5;
    // Any audio is over the floor: only the missing baseline holds it back.
    cfg.usage.alerts.unusual_min_audio_seconds = 1;
    cfg.usage.alerts.webhook_url = Some(url);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let (mut ws, _) = connect(relay.addr(), &relay.token("chatty-phone"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(20, 1)).finished());
    // The stream's audio is in the ledger, and so in the alerts' history.
    assert!(wait_until(Duration::from_secs(10), || http(
        admin,
        "GET",
        "/admin/usage?group_by=device",
        Some(ADMIN),
        None
    )
    .1
    .contains("chatty-phone")));
    // A later evaluation: a live stream makes the concurrency alert fire.
    let (mut held, _) = connect(relay.addr(), &relay.token("other"), Via::Header).unwrap();
    held.send(Message::text(config_message(None))).unwrap();
    next(&rx, "account_near_concurrency", "firing");
    // That pass saw 2 s of audio with no history: no unusual_usage.
    let (_, metrics) = http(admin, "GET", "/metrics", None, None);
    assert!(!metrics.contains("alert=\"unusual_usage\""), "{metrics}");
    // The dashboard's data lists what fires (read until an evaluation has
    // stored it: the webhook and the stats are two views of one pass).
    let lists_it = || {
        let (_, stats) = http(admin, "GET", "/admin/stats", Some(ADMIN), None);
        let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
        v["alerts_firing"].as_array().is_some_and(|firing| {
            firing
                .iter()
                .any(|a| a["alert"] == "account_near_concurrency" && a["subject"] == "a")
        })
    };
    assert!(wait_until(Duration::from_secs(10), lists_it));
    drop(held);
}

/// A removed account's resolved alerts leave the scrape. Before, every
/// account that ever fired `account_near_concurrency` or
/// `account_near_budget` kept its `clio_relay_alerts_firing` series at 0
/// for the life of the process, removed or not: accounts added and
/// removed through the admin API grew the scrape without bound.
#[test]
fn a_removed_accounts_resolved_alerts_leave_the_scrape() {
    const ADMIN: &str = "admin-token-for-tests-0123456789";
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    cfg.usage.alerts.interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let call = |method: &str, path: &str, body: Option<&str>| {
        let (status, answer) = http(admin, method, path, Some(ADMIN), body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
    };
    let series = r#"clio_relay_alerts_firing{alert="account_near_concurrency",subject="hot"}"#;
    let value = || {
        let (_, metrics) = http(admin, "GET", "/metrics", None, None);
        series_value(&metrics, series)
    };
    call(
        "POST",
        "/admin/accounts",
        Some(r#"{"id":"hot","key":"k1","max_concurrent_streams":1}"#),
    );
    call("POST", "/admin/accounts/a/disable", None);
    // One stream on an account that takes one: it fires, then resolves.
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || value() == Some(1.0)),
        "{:?}",
        value()
    );
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
    assert!(
        wait_until(Duration::from_secs(10), || value() == Some(0.0)),
        "{:?}",
        value()
    );
    call("POST", "/admin/accounts/a/enable", None);
    call("DELETE", "/admin/accounts/hot", None);
    assert!(
        wait_until(Duration::from_secs(10), || value().is_none()),
        "a removed account's resolved alert stays: {:?}",
        value()
    );
}
