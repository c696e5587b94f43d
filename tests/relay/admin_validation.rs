//! The admin API validates as it says: account ids of 1-64 characters of
//! `[A-Za-z0-9._-]`, and 405 for a method a path does not serve.

use clio_relay::core::secret::Secret;

use crate::util::*;

const ADMIN: &str = "admin-token-for-tests-0123456789";

/// A relay with one account and the admin token `ADMIN`, and its upstream.
fn admin_relay() -> (fake_soniox::FakeSoniox, Relay) {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    (fake, relay)
}

#[test]
fn account_ids_and_methods_are_checked() {
    let (_fake, relay) = admin_relay();
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
        ("POST", "/admin/stats", "GET, HEAD"),
        ("DELETE", "/admin/usage", "GET, HEAD"),
        ("POST", "/admin/reconciliation", "GET, HEAD"),
        ("PUT", "/admin/revocations", "GET, HEAD, POST, DELETE"),
        ("PUT", "/admin/accounts", "GET, HEAD, POST"),
        ("GET", "/admin/accounts/acct-a/enable", "POST"),
        ("GET", "/admin/accounts/acct-a/limit", "POST, PUT"),
        ("POST", "/dashboard", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
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
fn an_account_region_is_bounded() {
    // A 60,000-character region was taken, and went into every metrics
    // series of the account and into /v1/config.
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let add = |id: &str, region: &str| {
        let body = serde_json::json!({"id": id, "key": "key-new", "region": region}).to_string();
        http(admin, "POST", "/admin/accounts", Some(ADMIN), Some(&body))
    };
    for region in [
        "r".repeat(65),
        "x".repeat(60_000),
        "eu west".into(),
        "eu\n".into(),
    ] {
        let (status, body) = add("new-r", &region);
        assert_eq!(status, 400, "{} chars: {body}", region.len());
        assert!(body.contains("region"), "{body}");
        assert!(body.contains("1-64"), "{body}");
        assert!(body.len() < 1000, "{body}");
    }
    let (_, metrics) = http(admin, "GET", "/metrics", None, None);
    assert!(!metrics.contains("new-r"), "refused, not added");
    for (id, region) in [
        ("n1", "eu"),
        ("n2", "us-east"),
        ("n3", ""),
        ("n4", &*"r".repeat(64)),
    ] {
        let (status, body) = add(id, region);
        assert_eq!(status, 200, "{region:?}: {body}");
    }
}

/// A value the admin API refuses is named by its field, never repeated:
/// an operator who pastes a key into the wrong field (`keys rotate
/// --overlap "$(cat key)"`) must not find it in the answer, which goes to
/// terminals and CI logs.
#[test]
fn a_refused_value_is_not_repeated_in_the_answer() {
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let pasted = "sk_live pasted/key 0123456789abcdef";
    let add = |fields: serde_json::Value| {
        let mut body = serde_json::json!({"id": "new-a", "key": "key-new"});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        http(
            admin,
            "POST",
            "/admin/accounts",
            Some(ADMIN),
            Some(&body.to_string()),
        )
    };
    for (field, answer) in [
        ("id", add(serde_json::json!({ "id": pasted }))),
        ("pool", add(serde_json::json!({ "pool": pasted }))),
        ("region", add(serde_json::json!({ "region": pasted }))),
        (
            "overlap",
            http(
                admin,
                "POST",
                "/admin/accounts/acct-a/rotate",
                Some(ADMIN),
                Some(&serde_json::json!({"key": "key-b", "overlap": pasted}).to_string()),
            ),
        ),
    ] {
        let (status, body) = answer;
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body.contains(field), "{field}: {body}");
        assert!(!body.contains("pasted"), "{field}: {body}");
        assert!(!body.contains("0123456789abcdef"), "{field}: {body}");
    }
}

/// A key goes in every upgrade's header: one past 4096 bytes is refused
/// when added or rotated to (a 60,000-byte key was taken), one of 4096
/// taken.
#[test]
fn a_key_past_4096_bytes_is_refused() {
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let add = |id: &str, key: &str| {
        let body = serde_json::json!({"id": id, "key": key}).to_string();
        http(admin, "POST", "/admin/accounts", Some(ADMIN), Some(&body))
    };
    let rotate = |key: &str| {
        let body = serde_json::json!({"key": key, "overlap": "1m"}).to_string();
        http(
            admin,
            "POST",
            "/admin/accounts/acct-a/rotate",
            Some(ADMIN),
            Some(&body),
        )
    };
    for key in ["k".repeat(4097), "k".repeat(60_000)] {
        for (what, (status, body)) in [("add", add("long", &key)), ("rotate", rotate(&key))] {
            assert_eq!(status, 400, "{what} {}: {body}", key.len());
            assert!(body.contains("4096 bytes"), "{what}: {body}");
            assert!(!body.contains("kkkk"), "{what}: {body}");
        }
    }
    let (status, body) = add("long", &"k".repeat(4096));
    assert_eq!(status, 200, "{body}");
    let (status, body) = rotate(&"r".repeat(4096));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn unknown_paths_are_404_and_the_admin_api_needs_its_token() {
    let (_fake, relay) = admin_relay();
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

#[test]
fn a_body_without_one_plain_length_is_refused_saying_why() {
    // Before, a chunked body was read as no body, and two lengths as the
    // first: both answered "the body is not valid JSON".
    use std::io::{Read, Write};
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let body = serde_json::json!({"id": "new-a", "key": "key-new"}).to_string();
    let send = |headers: String, body: &str| {
        let mut tcp = std::net::TcpStream::connect(admin).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        write!(
            tcp,
            "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n{headers}\r\n{body}"
        )
        .unwrap();
        let mut out = String::new();
        let _ = tcp.read_to_string(&mut out);
        out
    };
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let out = send("Transfer-Encoding: chunked\r\n".into(), &chunked);
    assert!(out.starts_with("HTTP/1.1 411 Length Required\r\n"), "{out}");
    assert!(out.contains("Content-Length"), "{out}");
    // A length that is not plain digits: `+N` was read as N, where
    // RFC 9110 has only digits (a proxy in front may frame it otherwise).
    for length in [
        format!("+{}", body.len()),
        format!("{}, {}", body.len(), body.len()),
        "-1".into(),
        "0x10".into(),
    ] {
        let out = send(format!("Content-Length: {length}\r\n"), &body);
        assert!(out.starts_with("HTTP/1.1 400 "), "{length}: {out}");
        assert!(
            out.contains("Content-Length is not a number"),
            "{length}: {out}"
        );
    }
    let two = format!("Content-Length: 5\r\nContent-Length: {}\r\n", body.len());
    let out = send(two, &body);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains("more than one Content-Length"), "{out}");
    let short = format!(
        "Content-Length: {}\r\nConnection: close\r\n",
        body.len() + 10
    );
    let mut tcp = std::net::TcpStream::connect(admin).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    write!(
        tcp,
        "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n{short}\r\n{body}"
    )
    .unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    assert!(out.contains("shorter than its Content-Length"), "{out}");
    // None of them added the account; the same request with its length does.
    let (status, accounts) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
    assert_eq!(status, 200);
    assert!(!accounts.contains("new-a"), "{accounts}");
    let (status, answer) = http(admin, "POST", "/admin/accounts", Some(ADMIN), Some(&body));
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_body_without_a_content_length_is_411_where_a_body_is_taken() {
    // Before, a body sent without Content-Length (and not chunked) was
    // read as no body: "the body is not valid JSON (line 1, column 0)".
    use std::io::{Read, Write};
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let send = |method: &str, path: &str, body: &str| {
        let mut tcp = std::net::TcpStream::connect(admin).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        write!(
            tcp,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nConnection: close\r\n\r\n{body}"
        )
        .unwrap();
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = tcp.read_to_string(&mut out);
        out
    };
    let add = serde_json::json!({"id": "new-a", "key": "key-new"}).to_string();
    for (method, path, body) in [
        ("POST", "/admin/accounts", add.as_str()),
        (
            "POST",
            "/admin/accounts/acct-a/limit",
            r#"{"max_concurrent_streams":3}"#,
        ),
        (
            "PUT",
            "/admin/accounts/acct-a/limit",
            r#"{"max_concurrent_streams":3}"#,
        ),
        (
            "POST",
            "/admin/accounts/acct-a/rotate",
            r#"{"key":"key-b"}"#,
        ),
        ("POST", "/admin/revocations", r#"{"device_id":"dev-1"}"#),
        ("DELETE", "/admin/revocations", r#"{"device_id":"dev-1"}"#),
    ] {
        let out = send(method, path, body);
        assert!(
            out.starts_with("HTTP/1.1 411 Length Required\r\n"),
            "{method} {path}: {out}"
        );
        assert!(out.contains("Content-Length"), "{method} {path}: {out}");
    }
    // A path that takes no body needs no length.
    let out = send("POST", "/admin/accounts/acct-a/disable", "");
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    // Nothing was applied.
    let (_, accounts) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
    assert!(!accounts.contains("new-a"), "{accounts}");
    assert!(
        !accounts.contains("\"max_concurrent_streams\":3"),
        "{accounts}"
    );
}

#[test]
fn usage_queries_are_checked() {
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let get = |query: &str| {
        http(
            admin,
            "GET",
            &format!("/admin/usage?{query}"),
            Some(ADMIN),
            None,
        )
    };
    for (query, says) in [
        // A day the month does not have is not the next month's.
        ("from=2026-02-30", "from: "),
        ("to=2026-04-31", "to: "),
        ("from=2026-12-05&to=2026-12-01", "from is after to"),
        ("group_by=week", "group_by: "),
        ("scope=all", "scope: "),
        // A misspelt parameter is not ignored: `group=device` would have
        // answered by account.
        ("group=device", "unknown parameter group"),
        // A name with no value was read as absent: `group_by` alone
        // answered by account, `from` alone from the 1st of this month.
        (
            "group_by",
            "group_by: want group_by=account, device or pool",
        ),
        ("from&to=2026-12-01", "from: want from=YYYY-MM-DD"),
        ("scope", "scope: want scope=fleet or node"),
        // Only the first of two was read.
        ("from=2026-01-01&from=2026-02-01", "from is given twice"),
        (
            "group_by=device&to=2026-12-01&group_by=pool",
            "group_by is given twice",
        ),
    ] {
        let (status, body) = get(query);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    for query in [
        "",
        "from=2024-02-29&to=2026-12-31&group_by=device&scope=node",
    ] {
        let (status, body) = get(query);
        assert_eq!(status, 200, "{query}: {body}");
    }
}

#[test]
fn a_usage_day_past_year_9999_is_refused_and_the_admin_port_lives_on() {
    // The day arithmetic overflowed for a year past some 10^16: where
    // overflow is checked the admin thread panicked, and the admin port
    // (metrics, health, the admin API) never answered again; where it
    // wraps, the query answered for some other day. A year past 9999 is
    // no `YYYY` and no day any ledger holds.
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    for query in [
        "from=10000-01-01",
        "to=10000-01-01",
        "to=100000000000000000-01-01",
        "from=2026-01-01&to=9223372036854775807-12-31",
    ] {
        let (status, body) = http(
            admin,
            "GET",
            &format!("/admin/usage?{query}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 400, "{query}: {body}");
        let says = if query.starts_with("from=1") {
            "from: "
        } else {
            "to: "
        };
        assert!(body.contains(says), "{query}: {body}");
        assert!(body.contains("9999-12-31"), "{query}: {body}");
    }
    let (status, body) = http(
        admin,
        "GET",
        "/admin/usage?from=2026-01-01&to=9999-12-31",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(admin, "GET", "/healthz", None, None);
    assert_eq!(status, 200, "the admin port still answers");
}

#[test]
fn a_revocation_that_could_never_match_is_refused() {
    // An id no token can carry (device and token ids are 1 to 128 of
    // A-Z a-z 0-9 . _ : @ -) would be stored and match nothing: a pasted
    // id with a trailing space would leave the device unrevoked, with a
    // 200 saying otherwise.
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let long = "a".repeat(129);
    for body in [
        r#"{"device_id":""}"#.to_string(),
        r#"{"device_id":"iphone-42 "}"#.to_string(),
        r#"{"token_id":"t 1"}"#.to_string(),
        format!(r#"{{"device_id":"{long}"}}"#),
        r#"{"device_id":"ok-1","token_id":"caf\u00e9"}"#.to_string(),
    ] {
        for method in ["POST", "DELETE"] {
            let (status, answer) = http(
                admin,
                method,
                "/admin/revocations",
                Some(ADMIN),
                Some(&body),
            );
            assert_eq!(status, 400, "{method} {body}: {answer}");
            assert!(answer.contains("_id"), "{answer}");
        }
    }
    let (status, list) = http(admin, "GET", "/admin/revocations", Some(ADMIN), None);
    assert_eq!(status, 200);
    assert_eq!(
        list,
        r#"{"devices":[],"token_ids":[],"token_ids_expire":{}}"#
    );
    let (status, list) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"iphone-42"}"#),
    );
    assert_eq!(status, 200);
    assert_eq!(
        list,
        r#"{"devices":["iphone-42"],"revoked":{"devices":1,"token_ids":0},"token_ids":[],"token_ids_expire":{}}"#
    );
}

#[test]
fn a_conflict_is_409_conflict_on_the_status_line() {
    // The status line said "409 Unknown": the reason table had no 409.
    use std::io::{Read, Write};
    let (_fake, relay) = admin_relay();
    let body = r#"{"id":"acct-a","key":"key-other"}"#;
    let mut tcp = std::net::TcpStream::connect(relay.handle.admin_addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        tcp,
        "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 409 Conflict\r\n"), "{out}");
    assert!(out.contains("exists already"), "{out}");
}

#[test]
fn a_flood_of_slow_admin_connections_is_bounded_and_locks_no_one_out() {
    // Each connection held a 72 KiB request buffer and a descriptor for
    // its 10 s: 20,000 of them took 1.4 GB and every descriptor the
    // client port needed. Now the port holds 256 at once, and a new one
    // closes the oldest that is not being answered.
    use std::io::{Read, Write};
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let head = format!(
        "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Length: 60000\r\n\r\n"
    );
    let part = format!("{head}{}", "x".repeat(30_000));
    let mut slow: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut tcp = std::net::TcpStream::connect(admin).unwrap();
            tcp.write_all(part.as_bytes()).unwrap();
            tcp
        })
        .collect();
    // An operator still gets answers, and streams still flow.
    let (status, body) = http(admin, "GET", "/admin/accounts", Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(admin, "/healthz", "").0, 200);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(3, 1)).finished());
    // The oldest were closed, unanswered; the newest are still open.
    let waiting = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    let mut b = [0u8; 64];
    for (i, tcp) in slow.iter_mut().take(40).enumerate() {
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let got = tcp.read(&mut b);
        assert!(
            matches!(&got, Ok(0)) || got.as_ref().is_err_and(|e| !waiting(e)),
            "connection {i} of 300 still open: {got:?}"
        );
    }
    let mut open = 0;
    for tcp in &mut slow[100..] {
        tcp.set_nonblocking(true).unwrap();
        open += usize::from(tcp.read(&mut b).is_err_and(|e| waiting(&e)));
    }
    assert_eq!(open, 200, "the newest 200 connections are still served");
    // A request that never completes gets 408 after its 10 s.
    let last = slow.last_mut().unwrap();
    last.set_nonblocking(false).unwrap();
    last.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let mut out = String::new();
    let _ = last.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    assert!(out.contains("within 10 s"), "{out}");
}

#[test]
fn an_account_id_in_the_path_is_checked_too() {
    // An id no account can have was looked up anyway: 404 "no account",
    // where the README promises 400 for an id that is not 1-64 of
    // [A-Za-z0-9._-] (as a body's id gets).
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    let long = "a".repeat(65);
    for id in [long.as_str(), "bad%20id", "caf%C3%A9", "a+b"] {
        for (method, path, body) in [
            ("POST", format!("/admin/accounts/{id}/enable"), None),
            ("POST", format!("/admin/accounts/{id}/disable"), None),
            (
                "POST",
                format!("/admin/accounts/{id}/limit"),
                Some(r#"{"max_concurrent_streams":5}"#),
            ),
            (
                "POST",
                format!("/admin/accounts/{id}/rotate"),
                Some(r#"{"key":"key-new"}"#),
            ),
            ("DELETE", format!("/admin/accounts/{id}"), None),
        ] {
            let (status, answer) = http(admin, method, &path, Some(ADMIN), body);
            assert_eq!(status, 400, "{method} {path}: {answer}");
            assert!(answer.contains("1-64"), "{answer}");
        }
    }
    // A valid id that is not there is still 404.
    let (status, answer) = http(admin, "DELETE", "/admin/accounts/nope", Some(ADMIN), None);
    assert_eq!(status, 404, "{answer}");
}

#[test]
fn a_body_that_is_json_but_wrong_says_which_field() {
    // All of these were "a field is missing, unknown or of the wrong
    // type": a duplicated id read as a missing one.
    let (_fake, relay) = admin_relay();
    let admin = relay.handle.admin_addr;
    for (path, body, says) in [
        ("/admin/accounts", r#"{"id":"n1"}"#, "field `key` is missing"),
        (
            "/admin/accounts",
            r#"{"id":"n1","key":"k1","id":"n2"}"#,
            "field `id` is given twice",
        ),
        (
            "/admin/accounts",
            r#"{"id":"n1","key":"k1","sk-pasted-here":1}"#,
            "a field is not one of `id`, `key`, `region`, `pool`, `enabled`, `max_concurrent_streams`",
        ),
        (
            "/admin/accounts/acct-a/limit",
            r#"{"max_concurrent_streams":99999999999}"#,
            "wrong type or out of range",
        ),
        (
            "/admin/accounts/acct-a/rotate",
            r#"{"key":"k2","overlap":5}"#,
            "wrong type or out of range",
        ),
        (
            "/admin/accounts/acct-a/limit",
            r#"{"max_concurrent_streams":5,"sk-pasted-here":1}"#,
            "a field is not one of `max_concurrent_streams`",
        ),
        ("/admin/accounts", "[]", "not an object"),
    ] {
        let (status, answer) = http(admin, "POST", path, Some(ADMIN), Some(body));
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
        assert!(!answer.contains("pasted"), "{body}: {answer}");
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Whether `token` is refused (401), on the upgrade or as an error frame.
fn refused(relay: &Relay, token: &str) -> bool {
    match connect(relay.addr(), token, Via::Header) {
        Ok((mut ws, _)) => {
            let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
            if got.finished() {
                return false;
            }
            assert_eq!(got.error_code(), Some(401), "{got:?}");
            true
        }
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            true
        }
        Err(e) => panic!("{e}"),
    }
}

/// A revocation by token id is kept while a token carrying the id can be
/// valid: `tokens.max_ttl` plus `tokens.clock_skew` after it was made
/// (shown in `token_ids_expire`). Then it goes, from the lists and from
/// `revocations.json`, and a token issued since with that id streams.
/// Tokens issued before it went stay refused. (Every token id revoked
/// stayed in memory and in the file for good.)
#[test]
fn a_token_id_revocation_expires_when_no_token_can_carry_it() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.tokens.default_ttl = std::time::Duration::from_secs(3);
    cfg.tokens.max_ttl = std::time::Duration::from_secs(3);
    cfg.tokens.clock_skew = std::time::Duration::from_secs(1);
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    let keys = clio_relay::core::token::TokenKeys::from_config(&cfg.tokens);
    let mint = |issued: u64| {
        keys.mint_exact("phone", None, issued, issued + 3, "leaked-1")
            .unwrap()
    };
    let before = unix_now();
    let token = mint(before);
    let body = r#"{"token_id":"leaked-1"}"#;
    let (status, answer) = http(admin, "POST", "/admin/revocations", Some(ADMIN), Some(body));
    assert_eq!(status, 200, "{answer}");
    let after = unix_now();
    let list: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(list["token_ids"], serde_json::json!(["leaked-1"]), "{list}");
    let expires = list["token_ids_expire"]["leaked-1"].as_u64().unwrap();
    assert!((before + 4..=after + 4).contains(&expires), "{list}");
    // Refused for as long as it is valid.
    while unix_now() < before + 3 {
        assert!(refused(&relay, &token), "a revoked token id streamed");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    // Then the revocation goes, not before its time.
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        let (_, list) = http(admin, "GET", "/admin/revocations", Some(ADMIN), None);
        !list.contains("leaked-1")
    }));
    assert!(unix_now() >= expires);
    // And from the file, written off the admin thread just after.
    let file = cfg.admin.state_dir.join("revocations.json");
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            std::fs::read_to_string(&file).is_ok_and(|saved| !saved.contains("leaked-1"))
        }),
        "{:?}",
        std::fs::read_to_string(&file)
    );
    // A token issued since, with that id, streams.
    assert!(!refused(&relay, &mint(unix_now())));
    // Restarted with a longer lifetime allowed: a token the revocation
    // named (issued before it, by a clock up to the skew ahead) that now
    // would still be valid is refused; one issued now streams.
    drop(relay);
    cfg.tokens.default_ttl = std::time::Duration::from_secs(60);
    cfg.tokens.max_ttl = std::time::Duration::from_secs(60);
    let relay = Relay::start(cfg.clone());
    let keys = clio_relay::core::token::TokenKeys::from_config(&cfg.tokens);
    let lasting = |issued: u64| {
        keys.mint_exact("phone", None, issued, issued + 60, "leaked-1")
            .unwrap()
    };
    assert!(refused(&relay, &lasting(before + 1)));
    assert!(!refused(&relay, &lasting(unix_now())));
}

/// A token id revocation is kept for the clock skew in force when it was
/// made, even once a reload lowers `tokens.clock_skew`: a token issued
/// before it by a clock that much ahead (taken then) is valid that much
/// longer. Kept only `max_ttl` plus the new skew, the revocation went
/// while such a token was still valid, and it streamed again.
#[test]
fn a_lower_clock_skew_on_reload_does_not_shorten_a_revocation() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    cfg.tokens.default_ttl = std::time::Duration::from_secs(3);
    cfg.tokens.max_ttl = std::time::Duration::from_secs(3);
    cfg.tokens.clock_skew = std::time::Duration::from_secs(2);
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    let keys = clio_relay::core::token::TokenKeys::from_config(&cfg.tokens);
    // Issued by a backend whose clock is 2 s ahead: valid until now + 5.
    let now = unix_now();
    let ahead = keys
        .mint_exact("phone", None, now + 2, now + 5, "ahead-1")
        .unwrap();
    let body = r#"{"token_id":"ahead-1"}"#;
    let (status, answer) = http(admin, "POST", "/admin/revocations", Some(ADMIN), Some(body));
    assert_eq!(status, 200, "{answer}");
    cfg.tokens.clock_skew = std::time::Duration::ZERO;
    relay.handle.reload(&cfg).unwrap();
    // Refused for as long as it is valid.
    while unix_now() < now + 5 {
        assert!(refused(&relay, &ahead), "a revoked token id streamed");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn revocations_survive_a_restart() {
    // They lived only in memory: a restart (a deploy, a crash, the
    // watchdog) let a revoked device's tokens stream again, unseen.
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let relay = Relay::start(cfg.clone());
    let admin = relay.handle.admin_addr;
    for body in [
        r#"{"device_id":"stolen-phone"}"#,
        r#"{"token_id":"leaked-token"}"#,
        r#"{"device_id":"lost-then-found"}"#,
    ] {
        let (status, answer) = http(admin, "POST", "/admin/revocations", Some(ADMIN), Some(body));
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = http(
        admin,
        "DELETE",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"lost-then-found"}"#),
    );
    assert_eq!(status, 200, "{answer}");
    drop(relay);

    let relay = Relay::start(cfg.clone());
    let (status, list) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/revocations",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list["devices"],
        serde_json::json!(["stolen-phone"]),
        "{list}"
    );
    assert_eq!(
        list["token_ids"],
        serde_json::json!(["leaked-token"]),
        "{list}"
    );
    // Kept a day (max_ttl) and 30 s (clock_skew) from its revocation,
    // which the restart did not move.
    let expires = list["token_ids_expire"]["leaked-token"].as_u64().unwrap();
    assert!(
        expires > unix_now() + 86_400 - 60 && expires <= unix_now() + 86_430,
        "{list}"
    );
    match connect(relay.addr(), &relay.token("stolen-phone"), Via::Header) {
        Ok((mut ws, _)) => {
            let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
            assert_eq!(got.error_code(), Some(401), "{got:?}");
        }
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        Err(e) => panic!("{e}"),
    }
    let (mut ws, _) = connect(relay.addr(), &relay.token("lost-then-found"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(1, 1)).finished());
    drop(relay);

    // A file the relay cannot read stops it, rather than lift them all.
    std::fs::write(cfg.admin.state_dir.join("revocations.json"), "not json").unwrap();
    let e = clio_relay::cli::server::start(&cfg).expect_err("started with its revocations unread");
    assert!(e.to_string().contains("revocations.json"), "{e}");
}

/// `revocations.json` holds device ids: it is private to the relay's
/// user, as the state directory's other files are (0600), and a state
/// directory removed under a running relay comes back private (0700)
/// with the next revocation. It was written 0644, and the directory came
/// back 0755, readable by every user of the host.
#[test]
fn revocations_json_is_private_and_so_is_a_state_dir_made_again() {
    use std::os::unix::fs::PermissionsExt as _;
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let dir = cfg.admin.state_dir.clone();
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let body = r#"{"device_id":"stolen-phone"}"#;
    let (status, answer) = http(admin, "POST", "/admin/revocations", Some(ADMIN), Some(body));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(mode(&dir.join("revocations.json")), 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
    let body = r#"{"device_id":"lost-phone"}"#;
    let (status, answer) = http(admin, "POST", "/admin/revocations", Some(ADMIN), Some(body));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("revocations.json")), 0o600);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n.to_string_lossy().contains(".tmp-")),
        "{names:?}"
    );
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

/// A state directory removed under a running relay took
/// `revocations.json` with it, and nothing wrote it again until the next
/// revocation: a restart meanwhile served the revoked devices again. The
/// relay now finds the file gone within a second and writes its lists.
#[test]
fn revocations_removed_under_the_relay_are_written_again() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let dir = cfg.admin.state_dir.clone();
    let relay = Relay::start(cfg.clone());
    let body = r#"{"device_id":"stolen-phone"}"#;
    let (status, answer) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(body),
    );
    assert_eq!(status, 200, "{answer}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || dir
            .join("revocations.json")
            .exists()),
        "revocations.json is not back in {}",
        dir.display()
    );
    drop(relay);
    let relay = Relay::start(cfg);
    let (status, list) = http(
        relay.handle.admin_addr,
        "GET",
        "/admin/revocations",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list["devices"],
        serde_json::json!(["stolen-phone"]),
        "{list}"
    );
    drop(relay);
    std::fs::remove_dir_all(dir).ok();
}

/// A change's answer held every revoked id: as long as the lists, which
/// device revocations only lengthen (7 MB at 200,000 devices), so each
/// change cost as much as the lists and revoking ids one by one grew
/// with the square of their number. It now names the change's ids as
/// they stand, and the lists' sizes; `GET` still lists them all.
#[test]
fn a_revocation_answers_its_own_ids_not_every_list() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    // 2,000 devices revoked before, as a relay that ran long saved them.
    let many: Vec<String> = (0..2000).map(|i| format!("old-device-{i:05}")).collect();
    std::fs::create_dir_all(&cfg.admin.state_dir).unwrap();
    std::fs::write(
        cfg.admin.state_dir.join("revocations.json"),
        serde_json::json!({"devices": many, "token_ids": []}).to_string(),
    )
    .unwrap();
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let (status, answer) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"stolen","token_id":"leaked"}"#),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.len() < 512, "{} bytes: {answer}", answer.len());
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["devices"], serde_json::json!(["stolen"]), "{v}");
    assert_eq!(v["token_ids"], serde_json::json!(["leaked"]), "{v}");
    assert!(v["token_ids_expire"]["leaked"].as_u64().is_some(), "{v}");
    assert_eq!(
        v["revoked"],
        serde_json::json!({"devices": 2001, "token_ids": 1}),
        "{v}"
    );
    // A lift answers the same way: the id is no longer there.
    let (status, answer) = http(
        admin,
        "DELETE",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"stolen"}"#),
    );
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["devices"], serde_json::json!([]), "{v}");
    assert_eq!(v["revoked"]["devices"], 2000, "{v}");
    // GET lists every id.
    let (_, list) = http(admin, "GET", "/admin/revocations", Some(ADMIN), None);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["devices"].as_array().unwrap().len(), 2000);
    assert_eq!(list["token_ids"], serde_json::json!(["leaked"]));
}

/// `GET /admin/revocations?of=devices` (or `token_ids`) answers the list
/// in pages, in order, each id once: `next` while more follow, `after=`
/// it for the next page, and the lists' sizes. Without `of` the whole
/// lists, as before; `limit` or `after` without it, an unknown `of`, or a
/// parameter it does not take, 400.
#[test]
fn the_revocation_lists_are_read_in_pages() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(Secret::new(ADMIN));
    let many: Vec<String> = (0..2000).map(|i| format!("dev:{i:05}@x")).collect();
    std::fs::create_dir_all(&cfg.admin.state_dir).unwrap();
    std::fs::write(
        cfg.admin.state_dir.join("revocations.json"),
        serde_json::json!({"devices": many, "token_ids": []}).to_string(),
    )
    .unwrap();
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let tokens: Vec<String> = (0..5).map(|i| format!("tok-{i}")).collect();
    let body = serde_json::json!({ "token_ids": tokens }).to_string();
    let (status, answer) = http(
        admin,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");

    let get = |query: &str| {
        let (status, body) = http(
            admin,
            "GET",
            &format!("/admin/revocations?{query}"),
            Some(ADMIN),
            None,
        );
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        )
    };
    let mut walked: Vec<String> = Vec::new();
    let mut query = "of=devices&limit=300".to_string();
    loop {
        let (status, page) = get(&query);
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["revoked"],
            serde_json::json!({"devices": 2000, "token_ids": 5})
        );
        let ids = page["devices"].as_array().unwrap();
        assert!(ids.len() <= 300);
        walked.extend(ids.iter().map(|v| v.as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(next, walked.last().unwrap());
                // `:` and `@` percent-encoded, as a client's URL library does.
                let next = next.replace(':', "%3A").replace('@', "%40");
                query = format!("of=devices&limit=300&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(walked, many, "every id once, in order");

    let (status, page) = get("of=token_ids&limit=3");
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["token_ids"],
        serde_json::json!(["tok-0", "tok-1", "tok-2"])
    );
    assert!(
        page["token_ids_expire"]["tok-0"].as_u64().is_some(),
        "{page}"
    );
    assert_eq!(page["next"], "tok-2");
    let (_, page) = get("of=token_ids&after=tok-2");
    assert_eq!(page["token_ids"], serde_json::json!(["tok-3", "tok-4"]));
    assert!(page.get("next").is_none(), "{page}");

    let (status, whole) = get("");
    assert_eq!(status, 200);
    assert_eq!(whole["devices"].as_array().unwrap().len(), 2000);
    for (query, says) in [
        ("limit=10", "add of=devices"),
        ("of=device", "of=devices or of=token_ids"),
        ("of=devices&limit=0", "limit: want"),
        ("of=devices&page=2", "unknown parameter page"),
        ("of=devices&of=token_ids", "of is given twice"),
    ] {
        let (status, answer) = http(
            admin,
            "GET",
            &format!("/admin/revocations?{query}"),
            Some(ADMIN),
            None,
        );
        assert_eq!(status, 400, "{query}: {answer}");
        assert!(answer.contains(says), "{query}: {answer}");
    }
}
