//! The admin API validates as it says: account ids of 1-64 characters of
//! `[A-Za-z0-9._-]`, and 405 for a method a path does not serve.

use clio_relay::core::secret::Secret;

use crate::util::*;

const ADMIN: &str = "admin-token-for-tests-0123456789";

#[test]
fn account_ids_and_methods_are_checked() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let add = |id: &str| {
        let body = serde_json::json!({"id": id, "key": "key-new"}).to_string();
        http(admin, "POST", "/admin/accounts", Some(ADMIN), Some(&body))
    };
    for id in [
        "a".repeat(65),
        "b".repeat(5000),
        String::new(),
        "bad id".into(),
    ] {
        let (status, body) = add(&id);
        assert_eq!(status, 400, "{} chars: {body}", id.len());
        assert!(body.contains("1-64"), "{body}");
    }
    let (status, body) = add(&"c".repeat(64));
    assert_eq!(status, 200, "{body}");

    for (method, path) in [
        ("POST", "/admin/stats"),
        ("DELETE", "/admin/usage"),
        ("POST", "/admin/reconciliation"),
        ("PUT", "/admin/revocations"),
        ("PUT", "/admin/accounts"),
        ("GET", "/admin/accounts/acct-a/enable"),
        ("POST", "/dashboard"),
        ("POST", "/metrics"),
    ] {
        let (status, body) = http(admin, method, path, Some(ADMIN), Some("{}"));
        assert_eq!(status, 405, "{method} {path}: {body}");
    }
}
