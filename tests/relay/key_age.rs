//! A config-file key's age survives restarts: the state directory records
//! when each key (by fingerprint) was first seen.

use std::time::Duration;

use clio_relay::core::secret::Secret;

use crate::util::*;

const ADMIN: &str = "admin-token-for-key-age-0123";

fn key_age(relay: &Relay) -> (u64, String) {
    let (status, body) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/accounts",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, _, metrics) = http_get(relay.handle.admin_addr, "/metrics", "");
    (
        v["accounts"][0]["key"]["age_seconds"].as_u64().unwrap(),
        metrics,
    )
}

#[test]
fn a_config_keys_age_counts_from_when_it_was_first_seen_not_from_the_start() {
    let fake = fake(&["key-aged"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("aged", "key-aged")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.rotation_period = Duration::from_secs(7 * 86400);
    let dir = cfg.admin.state_dir.clone();

    // First start: the key is new, so it is dated now, by fingerprint only.
    let relay = Relay::start(cfg.clone());
    let (age, metrics) = key_age(&relay);
    assert!(age < 60, "{age}");
    assert!(
        metrics.contains("clio_relay_keys_due_for_rotation 0"),
        "{metrics}"
    );
    relay.handle.shutdown();
    let file = dir.join("key-dates.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let fp = Secret::new("key-aged").fingerprint();
    assert!(text.contains(&fp) && !text.contains("key-aged"), "{text}");

    // Ten days pass (the record is moved back, as ten days would leave it).
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let seen = doc["first_seen"][&fp].as_u64().unwrap();
    doc["first_seen"][&fp] = (seen - 10 * 86400).into();
    std::fs::write(&file, doc.to_string()).unwrap();

    // A restart keeps the key's age, so the rotation warning is due.
    let relay = Relay::start(cfg);
    let (age, metrics) = key_age(&relay);
    assert!(age >= 10 * 86400, "{age}");
    assert!(
        metrics.contains("clio_relay_keys_due_for_rotation 1"),
        "{metrics}"
    );
    relay.handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state directory removed under a running relay took `key-dates.json`
/// with it, and nothing wrote it again (only a reload or a restart did,
/// dating every key from then): after a restart a ten-day-old key was
/// new again, its rotation warning gone. The relay now writes the file
/// again from the dates it runs with, within a second.
#[test]
fn key_dates_removed_under_the_relay_are_written_again() {
    let fake = fake(&["key-aged"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("aged", "key-aged")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.admin.rotation_period = Duration::from_secs(7 * 86400);
    let dir = cfg.admin.state_dir.clone();
    let file = dir.join("key-dates.json");
    let fp = Secret::new("key-aged").fingerprint();
    std::fs::create_dir_all(&dir).unwrap();
    let ten_days_ago = clio_relay::control::accounts::unix_now() - 10 * 86400;
    std::fs::write(
        &file,
        serde_json::json!({"first_seen": {&fp: ten_days_ago}}).to_string(),
    )
    .unwrap();
    let relay = Relay::start(cfg.clone());
    assert!(key_age(&relay).0 >= 10 * 86400);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || file.exists()),
        "key-dates.json is not back in {}",
        dir.display()
    );
    relay.handle.shutdown();
    let relay = Relay::start(cfg);
    let (age, metrics) = key_age(&relay);
    assert!(age >= 10 * 86400, "{age}");
    assert!(
        metrics.contains("clio_relay_keys_due_for_rotation 1"),
        "{metrics}"
    );
    relay.handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
