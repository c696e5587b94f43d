//! The admin port: metrics, health, readiness and the remote config.

use std::time::Duration;

use serde_json::Value;
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// The value of the first sample line of `metric` whose labels contain `labels`.
fn sample(body: &str, metric: &str, labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name_labels, value) = l.rsplit_once(' ')?;
        let name = name_labels.split('{').next()?;
        (name == metric && name_labels.contains(labels)).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_count_a_session() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (status, head, body) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("clio_relay_streams_total"), "{body}");
    let before = sample(
        &body,
        "clio_relay_frames_total",
        "direction=\"client_to_upstream\"",
    )
    .unwrap_or(0.0);
    assert_eq!(before, 0.0);

    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert!(stream_session(&mut ws, &config_message(None), &audio_frames(10, 1)).finished());
    assert!(relay.wait_idle(LIMIT));

    let (status, _, body) = http_get(relay.handle.admin_addr, "/metrics", "");
    assert_eq!(status, 200);
    let frames = sample(
        &body,
        "clio_relay_frames_total",
        "direction=\"client_to_upstream\"",
    );
    assert!(
        frames.is_some_and(|n| n >= 11.0),
        "10 audio + end expected: {frames:?}\n{body}"
    );
    let count = sample(&body, "clio_relay_frame_forward_seconds_count", "");
    assert!(count.is_some_and(|n| n > 0.0), "{body}");
    let streams = sample(&body, "clio_relay_streams_total", "");
    assert!(streams.is_some_and(|n| n >= 1.0), "{body}");
}

#[test]
fn healthz_and_readyz() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    assert_eq!(http_get(relay.handle.admin_addr, "/healthz", "").0, 200);
    assert_eq!(http_get(relay.handle.admin_addr, "/readyz", "").0, 200);
}

#[test]
fn readyz_is_503_when_the_only_account_was_refused() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "wrong-key")]));
    assert_eq!(http_get(relay.handle.admin_addr, "/readyz", "").0, 200);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.error_code().is_some(), "{got:?}");
    assert!(fake.wait_for(LIMIT, |s| s.iter().any(|r| r.http_status == Some(401))));
    let (status, _, body) = http_get(relay.handle.admin_addr, "/readyz", "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        http_get(relay.handle.admin_addr, "/healthz", "").0,
        200,
        "health is not readiness"
    );
}

#[test]
fn remote_config_with_etag() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("acct-a", "key-a"), ("acct-b", "key-b")],
    ));
    let (status, head, body) = http_get(relay.handle.admin_addr, "/v1/config", "");
    assert_eq!(status, 200, "{head}");
    let doc: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(doc["sonioxAccounts"][0]["id"], "acct-a", "{doc}");
    assert_eq!(doc["sonioxAccounts"][1]["id"], "acct-b", "{doc}");
    // README: the flags are fixed; maxConcurrentStreams is server.max_streams.
    assert_eq!(
        doc["features"],
        serde_json::json!({"useProxyServer": true, "maxConcurrentStreams": 100}),
        "{doc}"
    );
    let etag = header_of(&head, "etag").expect("an ETag");
    assert!(!etag.is_empty());

    let (status, head2, body2) = http_get(
        relay.handle.admin_addr,
        "/v1/config",
        &format!("If-None-Match: {etag}\r\n"),
    );
    assert_eq!(status, 304, "{head2}");
    assert!(body2.is_empty(), "{body2}");
    // A 304 has no Content-Length unless it is the 200's (RFC 9110 §15.4.5).
    assert_eq!(header_of(&head2, "content-length"), None, "{head2}");
    assert_eq!(header_of(&head2, "etag").as_deref(), Some(etag.as_str()));
    let (status, _, _) = http_get(
        relay.handle.admin_addr,
        "/v1/config",
        "If-None-Match: \"something-else\"\r\n",
    );
    assert_eq!(status, 200);
    // If-None-Match compares weakly, takes a list, and `*` (RFC 9110
    // §13.1.2): a proxy that compresses the answer makes its ETag weak.
    for value in [
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        format!("\"other\",W/{etag} , \"x\""),
        "*".to_string(),
    ] {
        let (status, head, _) = http_get(
            relay.handle.admin_addr,
            "/v1/config",
            &format!("If-None-Match: {value}\r\n"),
        );
        assert_eq!(status, 304, "{value}: {head}");
    }
    // A list sent on several lines is one list (RFC 9110 §5.3), as an
    // HTTP library that adds one line per tag sends it.
    let (status, head, _) = http_get(
        relay.handle.admin_addr,
        "/v1/config",
        &format!("If-None-Match: \"other\"\r\nIf-None-Match: {etag}\r\n"),
    );
    assert_eq!(status, 304, "tag on a second line: {head}");
    for value in ["W/\"other\"", "\"other\", \"x\""] {
        let (status, head, _) = http_get(
            relay.handle.admin_addr,
            "/v1/config",
            &format!("If-None-Match: {value}\r\n"),
        );
        assert_eq!(status, 200, "{value}: {head}");
    }
}

/// The sum over shards of `metric`'s samples whose labels contain `labels`.
fn shard_sum(body: &str, metric: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Open streams that are not moving data hold no read buffers: a buffer is
/// lent to a stream only while bytes are in it, and the gauge says so.
#[test]
fn idle_streams_hold_no_read_buffers() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let frames = audio_frames(3, 7);
    let mut streams: Vec<Ws> = (0..8)
        .map(|i| {
            let (mut ws, _) =
                connect(relay.addr(), &relay.token(&format!("dev-{i}")), Via::Header).unwrap();
            ws.send(Message::text(config_message(None))).unwrap();
            for f in &frames {
                ws.send(Message::binary(f.clone())).unwrap();
            }
            ws
        })
        .collect();
    let mut last = (0.0, 0.0, 0.0);
    let settled = wait_until(LIMIT, || {
        let (_, _, body) = http_get(relay.handle.admin_addr, "/metrics", "");
        last = (
            shard_sum(&body, "clio_relay_streams_active", ""),
            shard_sum(&body, "clio_relay_read_buffers", "state=\"in_use\""),
            shard_sum(&body, "clio_relay_read_buffers", "state=\"free\""),
        );
        last.0 == 8.0 && last.1 == 0.0
    });
    assert!(settled, "(active, in use, free) = {last:?}");
    assert!(last.2 > 0.0, "the pool keeps its free buffers: {last:?}");
    // Every stream carries on once it has data again.
    for ws in &mut streams {
        for f in &frames {
            ws.send(Message::binary(f.clone())).unwrap();
        }
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    }
    for ws in &mut streams {
        assert!(read_all(ws).finished());
    }
}

/// Sends a bare request and reads the whole answer: (head, body bytes).
fn raw_answer(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(tcp, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut all = Vec::new();
    tcp.read_to_end(&mut all).unwrap();
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    (
        String::from_utf8_lossy(&all[..at]).into_owned(),
        all[at..].to_vec(),
    )
}

#[test]
fn head_requests_get_the_get_answers_head_and_no_body() {
    // RFC 9110 §9.1: a server supports GET and HEAD; §9.3.2: a HEAD answer
    // is the GET answer's head, with no body. Health checkers use it.
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let admin = relay.handle.admin_addr;
    for (addr, path) in [
        (relay.addr(), "/healthz"),
        (admin, "/healthz"),
        (admin, "/readyz"),
        (admin, "/metrics"),
    ] {
        let (get_head, get_body) = raw_answer(addr, "GET", path);
        let (head, body) = raw_answer(addr, "HEAD", path);
        assert!(head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head}");
        assert!(body.is_empty(), "HEAD {path} has a body: {body:?}");
        assert!(get_head.starts_with("HTTP/1.1 200") && !get_body.is_empty());
        assert_eq!(
            header_of(&head, "content-type"),
            header_of(&get_head, "content-type"),
            "{path}"
        );
    }
    // A path served with GET says it takes HEAD too.
    let (head, _) = raw_answer(admin, "PUT", "/healthz");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(header_of(&head, "allow").as_deref(), Some("GET, HEAD"));
    // HEAD on the stream endpoint is refused, without a body either.
    let (head, body) = raw_answer(relay.addr(), "HEAD", "/v1/transcribe");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(body.is_empty(), "{body:?}");
}

/// A 401 from the admin API says which of three things is wrong: the
/// relay has no admin token at all, the request sent none, or it sent
/// another. Before, all three were "admin token required", so an operator
/// whose `clio-relay keys` sent the token got "401: admin token required"
/// and looked for a missing token on their side when the relay's config
/// had none, or when the token was simply not the relay's.
#[test]
fn an_admin_401_says_whether_the_token_is_off_missing_or_wrong() {
    const TOKEN: &str = "admin-401-token-0123456789";
    let fake = fake(&["k1"], |_| {});
    let off = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let (status, body) = http(
        off.handle.admin_addr,
        "GET",
        "/admin/accounts",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("this relay has no admin token"), "{body}");
    assert!(body.contains("admin.token_env"), "{body}");

    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(TOKEN));
    let on = Relay::start(cfg);
    let admin = on.handle.admin_addr;
    let (status, body) = http(admin, "GET", "/admin/accounts", None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin token required"), "{body}");
    let wrong = "not-the-admin-token-0123456789";
    let (status, body) = http(admin, "GET", "/admin/accounts", Some(wrong), None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin token refused"), "{body}");
    assert!(!body.contains(wrong) && !body.contains(TOKEN), "{body}");
    let (status, body) = http(admin, "GET", "/admin/accounts", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
}

/// Every 401 of the admin port carries `WWW-Authenticate: Bearer`, the
/// challenge RFC 9110 §15.5.2 requires (RFC 6750 §3's scheme): with
/// `error="invalid_token"` when the request sent a token that is not the
/// admin token, without an error code when it sent none or the relay has
/// none (RFC 6750 §3.1). Before, no 401 had one, and a client that reads
/// 401s by the book (Java's `HttpURLConnection`) failed on them.
#[test]
fn an_admin_401_carries_a_bearer_challenge() {
    const TOKEN: &str = "admin-challenge-token-0123456789";
    let fake = fake(&["k1"], |_| {});
    let off = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(TOKEN));
    let on = Relay::start(cfg);
    let challenge = |addr, path: &str, extra: &str| {
        let (status, head, body) = http_get(addr, path, extra);
        assert_eq!(status, 401, "{path} {extra}: {head}\n{body}");
        assert!(
            !head.contains(TOKEN) && !body.contains(TOKEN),
            "{head}\n{body}"
        );
        let challenges: Vec<_> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, v)| v.trim().to_string())
            .collect();
        assert_eq!(challenges.len(), 1, "{path} {extra}: {head}");
        challenges[0].clone()
    };
    let wrong = "Authorization: Bearer not-the-admin-token-0123456789";
    for path in ["/admin/accounts", "/admin/stats", "/admin/nope"] {
        assert_eq!(challenge(on.handle.admin_addr, path, ""), "Bearer");
        assert_eq!(
            challenge(on.handle.admin_addr, path, wrong),
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(
            challenge(
                on.handle.admin_addr,
                path,
                &format!("Authorization: Basic {TOKEN}")
            ),
            "Bearer"
        );
        assert_eq!(challenge(off.handle.admin_addr, path, wrong), "Bearer");
    }
    // The right token, and the paths open to all, get no challenge.
    let right = format!("Authorization: Bearer {TOKEN}");
    for (path, extra) in [("/admin/accounts", right.as_str()), ("/metrics", "")] {
        let (status, head, _) = http_get(on.handle.admin_addr, path, extra);
        assert_eq!(status, 200, "{head}");
        assert_eq!(header_of(&head, "www-authenticate"), None, "{head}");
    }
}

/// The scheme of `Authorization: Bearer <token>` is case-insensitive (RFC
/// 9110 §11.1), on the admin port as on the client port: `BEARER` and
/// `bEaReR` with the admin token are let in, and with another token are
/// "refused", not told that no token was sent. Before, only `Bearer` and
/// `bearer` were read: the admin token under `BEARER` got 401 "admin
/// token required".
#[test]
fn the_admin_token_scheme_is_case_insensitive() {
    use clio_relay::control::httpc::{blocking, Endpoint, Request};
    const TOKEN: &str = "admin-scheme-token-0123456789";
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(TOKEN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let ask = |authorization: &str| {
        let req = Request::new("GET", "/admin/accounts").header("Authorization", authorization);
        let r = blocking::send(&Endpoint::plain(admin), &req, LIMIT).unwrap();
        (r.status, r.text())
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, body) = ask(&format!("{scheme} {TOKEN}"));
        assert_eq!(status, 200, "{scheme}: {body}");
        let (status, body) = ask(&format!("{scheme} not-the-admin-token-0123456789"));
        assert_eq!(status, 401, "{scheme}: {body}");
        assert!(body.contains("admin token refused"), "{scheme}: {body}");
    }
    // Another scheme, or none, sends no bearer token.
    for authorization in [format!("Basic {TOKEN}"), TOKEN.to_string()] {
        let (status, body) = ask(&authorization);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("admin token required"), "{body}");
        assert!(!body.contains(TOKEN), "{body}");
    }
}

/// `/v1/config` may be kept by an HTTP cache (the app's URL cache, a proxy
/// in front of the admin port) and is asked for again with its ETag each
/// time it is used: `no-cache`, on the 200 and on the 304. With `no-store`
/// no cache kept it, so none ever sent the tag back.
#[test]
fn remote_config_may_be_cached_and_is_revalidated() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let admin = relay.handle.admin_addr;
    let (status, head, _) = http_get(admin, "/v1/config", "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header_of(&head, "cache-control").as_deref(),
        Some("no-cache"),
        "{head}"
    );
    let etag = header_of(&head, "etag").expect("an ETag");
    let (status, head, _) = http_get(admin, "/v1/config", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(status, 304, "{head}");
    assert_eq!(
        header_of(&head, "cache-control").as_deref(),
        Some("no-cache"),
        "{head}"
    );
    // The other answers stay out of caches.
    let (_, head, _) = http_get(admin, "/metrics", "");
    assert_eq!(
        header_of(&head, "cache-control").as_deref(),
        Some("no-store"),
        "{head}"
    );
}

/// README: `isAvailable` says a pool has an enabled account; health is not
/// in the document. A key Soniox refuses marks its account unhealthy on
/// this node only, for a while: were it in the document, the ETag would
/// change with it and differ between the nodes of a fleet.
#[test]
fn the_remote_config_does_not_change_with_account_health() {
    let fake = fake(&["key-ok"], |_| {});
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("bad", "key-refused"), ("good", "key-ok")],
    ));
    let admin = relay.handle.admin_addr;
    let (_, head, before) = http_get(admin, "/v1/config", "");
    let etag = header_of(&head, "etag").unwrap();
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert!(got.finished(), "{got:?}");
    let now = std::time::Instant::now();
    let accounts = relay.handle.process.accounts();
    let bad = accounts.iter().find(|a| a.id == "bad").unwrap();
    assert!(!bad.healthy(now), "the refused account is held off");
    let (_, head, after) = http_get(admin, "/v1/config", "");
    assert_eq!(header_of(&head, "etag").unwrap(), etag);
    assert_eq!(after, before);
    let doc: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(doc["pools"][0]["isAvailable"], true, "{doc}");
}

/// The dashboard may not be framed by another site: its CSP says
/// `frame-ancestors 'none'` (and `X-Frame-Options: DENY` for browsers
/// that read only that). Before, any page could load the admin port's
/// dashboard in an invisible frame over its own buttons, and an operator
/// who logged in there clicked **disable** or **rotate** unaware
/// (clickjacking). Every answer of both ports says
/// `X-Content-Type-Options: nosniff`: a browser never reads a JSON or
/// text answer, whose strings a request or upstream may shape, as HTML
/// or script.
#[test]
fn the_dashboard_cannot_be_framed_and_no_answer_is_sniffed() {
    let fake = fake(&["k1"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("a", "k1")]));
    let admin = relay.handle.admin_addr;
    for path in ["/", "/dashboard"] {
        let (head, _) = raw_answer(admin, "GET", path);
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let csp = header_of(&head, "content-security-policy").unwrap_or_default();
        assert!(
            csp.split(';').any(|d| d.trim() == "frame-ancestors 'none'"),
            "{path}: {head}"
        );
        assert_eq!(
            header_of(&head, "x-frame-options").as_deref(),
            Some("DENY"),
            "{path}: {head}"
        );
    }
    for (addr, method, path) in [
        (admin, "GET", "/dashboard"),
        (admin, "GET", "/metrics"),
        (admin, "GET", "/v1/config"),
        (admin, "GET", "/admin/accounts"),
        (admin, "GET", "/nope"),
        (relay.addr(), "GET", "/healthz"),
        (relay.addr(), "GET", "/v1/transcribe"),
        (relay.addr(), "GET", "/nope"),
    ] {
        let (head, _) = raw_answer(addr, method, path);
        assert_eq!(
            header_of(&head, "x-content-type-options").as_deref(),
            Some("nosniff"),
            "{method} {path}: {head}"
        );
    }
}
