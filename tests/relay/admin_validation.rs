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

    for (method, path, allow) in [
        ("POST", "/admin/stats", "GET"),
        ("DELETE", "/admin/usage", "GET"),
        ("POST", "/admin/reconciliation", "GET"),
        ("PUT", "/admin/revocations", "GET, POST, DELETE"),
        ("PUT", "/admin/accounts", "GET, POST"),
        ("GET", "/admin/accounts/acct-a/enable", "POST"),
        ("GET", "/admin/accounts/acct-a/limit", "POST, PUT"),
        ("POST", "/dashboard", "GET"),
        ("POST", "/metrics", "GET"),
    ] {
        let (status, body) = http(admin, method, path, Some(ADMIN), Some("{}"));
        assert_eq!(status, 405, "{method} {path}: {body}");
        let head = answer_head(admin, method, path, Some(ADMIN));
        assert_eq!(
            header_of(&head, "allow").as_deref(),
            Some(allow),
            "{method} {path}: {head}"
        );
    }
}

#[test]
fn unknown_paths_are_404_and_the_admin_api_needs_its_token() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    for (method, path, token, want) in [
        ("GET", "/nope", None, 404),
        ("POST", "/nope", None, 404),
        ("GET", "/metrics/extra", None, 404),
        ("GET", "/admin/nope", None, 401),
        ("GET", "/admin/nope", Some(ADMIN), 404),
        ("POST", "/admin/accounts/acct-a/bogus", Some(ADMIN), 404),
        ("GET", "/admin/accounts", None, 401),
        ("PUT", "/admin/accounts", None, 401),
        ("GET", "/admin/accounts", Some("wrong-token"), 401),
        ("GET", "/admin/accounts/", Some(ADMIN), 200),
        ("GET", "/metrics", None, 200),
    ] {
        let (status, body) = http(admin, method, path, token, None);
        assert_eq!(status, want, "{method} {path}: {body}");
        if want >= 400 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
            assert_http_error_body(&v, u64::from(want));
        }
    }
}

/// The head of the answer to one request (no body sent).
fn answer_head(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    out.split("\r\n\r\n").next().unwrap_or("").to_string()
}
