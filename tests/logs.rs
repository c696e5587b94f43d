//! What the relay logs at the default level (INFO): refused streams and
//! requests, with their code and reason and never the token (a bounded
//! number of lines: a flood is counted in one); every admin change,
//! naming the account.
//!
//! Its own test binary, because it installs a process-wide log subscriber.

#[path = "relay/util.rs"]
#[allow(dead_code)]
mod util;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use util::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process's log, captured at INFO (installed once for every test).
fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        capture
    })
}

#[test]
fn refusals_are_logged_at_info() {
    let capture = logs();

    let fake = fake(&["key-l"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-l", "key-l")]);
    // No account takes streams: every authenticated stream is refused 429.
    cfg.accounts[0].enabled = false;
    let relay = Relay::start(cfg);
    let token = relay.token("device-l");

    // 401 before the upgrade: a tampered token on the request.
    let mut bad = token.clone();
    bad.pop();
    bad.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (status, _) = refused_upgrade(connect(relay.addr(), &bad, Via::Header));
    assert_eq!(status, 401);

    // 401 after the upgrade: a bad token in the first message.
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(&mut ws, &config_message(Some(&bad)), &[]);
    assert_eq!(got.error_code(), Some(401), "{got:?}");

    // 429: no account can take the stream.
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_eq!(got.error_code(), Some(429), "{got:?}");

    assert!(wait_until(std::time::Duration::from_secs(5), || {
        capture.text().matches("refused").count() >= 3
    }));
    let logs = capture.text();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("refused")).collect();
    assert!(
        lines.iter().any(|l| l.contains(" INFO ")
            && l.contains("request refused")
            && l.contains("status=401")),
        "{logs}"
    );
    assert!(
        lines.iter().any(|l| l.contains(" INFO ")
            && l.contains("stream refused")
            && l.contains("code=401")),
        "{logs}"
    );
    assert!(
        lines.iter().any(|l| l.contains(" INFO ")
            && l.contains("stream refused")
            && l.contains("code=429")
            && l.contains("close=1013")),
        "{logs}"
    );
    assert!(!logs.contains(&token) && !logs.contains(&bad), "{logs}");
}

#[test]
fn admin_changes_are_logged_with_the_account_id() {
    const ADMIN: &str = "admin-token-for-log-tests-0123";
    let capture = logs();
    let fake = fake(&["key-x"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-x", "key-x")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts",
        Some(ADMIN),
        Some(r#"{"id":"added-by-test","key":"key-added-0123"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        admin,
        "POST",
        "/admin/accounts/acct-x/disable",
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let logs = capture.text();
    let applied: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("admin change applied"))
        .collect();
    assert!(
        applied
            .iter()
            .any(|l| l.contains("path=\"/admin/accounts\" ") && l.contains("account=added-by-test")),
        "{logs}"
    );
    assert!(
        applied.iter().any(|l| l.contains("account=acct-x")),
        "{logs}"
    );
    assert!(!logs.contains("account=\"\""), "{logs}");
    assert!(
        !logs.contains("key-added-0123") && !logs.contains(ADMIN),
        "{logs}"
    );
}

/// Soniox's usage logs unreadable from the first try: the WARN says there
/// is no reconciliation yet, not that the last one stands.
#[test]
fn an_unreadable_usage_log_at_start_says_there_is_no_reconciliation_yet() {
    let capture = logs();
    let fake = fake(&["key-u"], |_| {});
    fake.set_rest_status(Some(503));
    let mut cfg = relay_config(&fake.url(), &[("acct-u", "key-u")]);
    cfg.usage.reconcile_interval = std::time::Duration::from_millis(300);
    let _relay = Relay::start(cfg);
    let said = |what: &str| {
        capture
            .text()
            .lines()
            .any(|l| l.contains("acct-u") && l.contains(what))
    };
    assert!(
        wait_until(std::time::Duration::from_secs(10), || said(
            "no reconciliation for this account yet"
        )),
        "{}",
        capture.text()
    );
    assert!(
        !said("the last reconciliation stands"),
        "{}",
        capture.text()
    );
}

/// One peer sending request after request that the relay refuses (here a
/// wrong path, as a scanner or a misconfigured prober does) cannot make it
/// write a line each: a few are logged, with the peer's address, and one
/// line counts the rest. Before, each of them left its own line, thousands
/// a second from a single client: a disk filled, or journald dropping the
/// lines that matter.
#[test]
fn a_flood_of_refused_requests_is_logged_in_a_bounded_number_of_lines() {
    use std::io::{Read, Write};
    const REQUESTS: usize = 200;
    let capture = logs();
    let fake = fake(&["key-f"], |c| c.forbidden = vec![]);
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-f", "key-f")]));

    let mut peers = Vec::new();
    for _ in 0..REQUESTS {
        let mut s = std::net::TcpStream::connect(relay.addr()).unwrap();
        peers.push(format!("peer={}", s.local_addr().unwrap()));
        s.write_all(b"GET /flood HTTP/1.1\r\nHost: relay\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }

    // The lines of this relay's refusals, and the count of the rest.
    let tally = || {
        let logs = capture.text();
        let logged = logs
            .lines()
            .filter(|l| {
                l.contains("request refused") && peers.iter().any(|p| l.contains(&format!("{p} ")))
            })
            .count();
        let not_logged = not_logged(&logs, "refusals");
        (logged, not_logged)
    };
    // The count comes once the window is over (it is 10 s long).
    assert!(
        wait_until(std::time::Duration::from_secs(25), || {
            let (logged, not_logged) = tally();
            logged + not_logged >= REQUESTS
        }),
        "{:?}\n{}",
        tally(),
        capture.text()
    );
    let (logged, not_logged) = tally();
    assert!(
        logged > 0,
        "no refusal logged with its peer: {}",
        capture.text()
    );
    assert!(
        // At most 20 a window, and the requests may straddle two.
        logged <= 40,
        "{logged} lines for {REQUESTS} refused requests"
    );
    // Other tests' relays may count refusals of their own in these lines.
    assert!(logged + not_logged >= REQUESTS);
}

/// An upstream that refuses every connection, while clients keep opening
/// streams, cannot make the relay write a line per attempt either: a few
/// are logged, naming the account, and one line counts the rest.
#[test]
fn an_unreachable_upstream_is_logged_in_a_bounded_number_of_lines() {
    const STREAMS: usize = 60;
    let capture = logs();
    // A port nothing listens on: every connect is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = relay_config(
        &format!("ws://127.0.0.1:{port}/transcribe-websocket"),
        &[("acct-down", "key-down")],
    );
    // One try per stream: each stream is one connect, one failure.
    cfg.failover.max_resumes = 0;
    let relay = Relay::start(cfg);
    let token = relay.token("device-down");
    for _ in 0..STREAMS {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
        assert_eq!(got.error_code(), Some(503), "{got:?}");
    }

    let tally = || {
        let logs = capture.text();
        let logged = logs
            .lines()
            .filter(|l| l.contains("upstream connect failed") && l.contains("account=acct-down"))
            .count();
        let not_logged = not_logged(&logs, "upstream failures");
        (logged, not_logged)
    };
    // The count comes once the window is over (it is 10 s long).
    assert!(
        wait_until(std::time::Duration::from_secs(25), || {
            let (logged, not_logged) = tally();
            logged + not_logged >= STREAMS
        }),
        "{:?}\n{}",
        tally(),
        capture.text()
    );
    let (logged, not_logged) = tally();
    assert!(
        // At most 20 a window, and the streams may straddle two.
        (1..=40).contains(&logged),
        "{logged} lines for {STREAMS} failed connects"
    );
    assert!(logged + not_logged >= STREAMS);
}

/// With `[tls]` on the client port, a failed TLS handshake leaves a line
/// naming the peer and rustls's reason (a plain-HTTP client here; a
/// client refusing the relay's certificate says "received fatal alert").
/// Before, it left nothing in the log: only a count in
/// `streams_rejected_total{code="400"}`, so an operator whose certificate
/// chain clients refused could not find out why they failed.
#[test]
fn a_failed_tls_handshake_is_logged_with_the_peer_and_the_reason() {
    use std::io::{Read, Write};
    let capture = logs();
    let fake = fake(&["key-t"], |c| c.forbidden = vec![]);
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut cfg = relay_config(&fake.url(), &[("acct-t", "key-t")]);
    cfg.tls = Some(clio_relay::core::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    });
    let relay = Relay::start(cfg);

    let mut plain = std::net::TcpStream::connect(relay.addr()).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let peer = format!("peer={} ", plain.local_addr().unwrap());
    plain
        .write_all(b"GET /v1/transcribe HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = vec![];
    let _ = plain.read_to_end(&mut got);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || capture
            .text()
            .lines()
            .any(|l| l.contains("TLS handshake failed")
                && l.contains(&peer)
                && l.contains("error="))),
        "{}",
        capture.text()
    );
    eprintln!(
        "DBG {}",
        capture
            .text()
            .lines()
            .filter(|l| l.contains("TLS"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A balancer that sends PROXY headers (HAProxy's `send-proxy-v2`) to a
/// relay whose `server.proxy_protocol_from` does not list it fails every
/// stream. The log said `malformed HTTP request` (a plain port) or
/// rustls's `received corrupt message of type InvalidContentType` (a TLS
/// port), neither of which points at the setting to fix.
#[test]
fn a_proxy_header_from_an_untrusted_address_is_named_in_the_log() {
    use std::io::{Read, Write};
    let capture = logs();
    let fake = fake(&["key-t"], |c| c.forbidden = vec![]);
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let plain = Relay::start(relay_config(&fake.url(), &[("acct-t", "key-t")]));
    let mut cfg = relay_config(&fake.url(), &[("acct-t", "key-t")]);
    cfg.tls = Some(clio_relay::core::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    });
    let tls = Relay::start(cfg);
    // A v2 header (PROXY, TCP over IPv4, 192.0.2.7:5000 to 10.0.0.1:8080),
    // then what the client sent: a request, or a TLS ClientHello's start.
    let mut v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend([192, 0, 2, 7, 10, 0, 0, 1, 0x13, 0x88, 0x1f, 0x90]);
    for (relay, rest, line) in [
        (
            &plain,
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "request refused",
        ),
        (
            &tls,
            &[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ][..],
            "TLS handshake failed",
        ),
    ] {
        let mut tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let peer = format!("peer={} ", tcp.local_addr().unwrap());
        tcp.write_all(&[&v2[..], rest].concat()).unwrap();
        let mut got = vec![];
        let _ = tcp.read_to_end(&mut got);
        assert!(
            wait_until(std::time::Duration::from_secs(10), || capture
                .text()
                .lines()
                .any(|l| l.contains(line)
                    && l.contains(&peer)
                    && l.contains("PROXY protocol header")
                    && l.contains("not in server.proxy_protocol_from"))),
            "{line}: {}",
            capture.text()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A refused stream's line names the device its token was minted for,
/// whether the token came on the request or in the first message: the
/// operator a user calls about a refusal can find it. Before, the line
/// had the stream id, who refused and why, but no device (only a DEBUG
/// line of streams that opened had it).
#[test]
fn a_refused_streams_line_names_its_device() {
    let capture = logs();
    let fake = fake(&["key-d"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-d", "key-d")]);
    // No account takes streams: every authenticated stream is refused 429.
    cfg.accounts[0].enabled = false;
    let relay = Relay::start(cfg);

    let on_request = relay.token("device-on-request");
    let (mut ws, _) = connect(relay.addr(), &on_request, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_eq!(got.error_code(), Some(429), "{got:?}");

    let in_message = relay.token("device-in-message");
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(
        &mut ws,
        &config_message(Some(&in_message)),
        &audio_frames(1, 1),
    );
    assert_eq!(got.error_code(), Some(429), "{got:?}");

    for device in ["device-on-request", "device-in-message"] {
        assert!(
            wait_until(std::time::Duration::from_secs(5), || capture
                .text()
                .lines()
                .any(|l| l.contains("stream refused")
                    && l.contains(&format!("device=\"{device}\""))
                    && l.contains("code=429"))),
            "{device}: {}",
            capture.text()
        );
    }
    let logs = capture.text();
    assert!(
        !logs.contains(&on_request) && !logs.contains(&in_message),
        "{logs}"
    );
}

/// A refused stream's line names its token's id, as README's "Revocation"
/// says the relay logs them (never the token), so that the operator can
/// revoke that token (`POST /admin/revocations {"token_id":…}`) rather
/// than its whole device. Before, the line named the device only, and
/// token ids appeared in no line but a revocation's own.
#[test]
fn a_refused_streams_line_names_its_token_id() {
    use clio_relay::core::token::TokenKeys;
    const ADMIN: &str = "logs-admin-token-0123456789";
    let capture = logs();
    let fake = fake(&["key-t"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-t", "key-t")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let keys = TokenKeys::from_config(&relay.cfg.tokens);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |id: &str| {
        keys.mint_exact("device-refused", None, now, now + 600, id)
            .unwrap()
    };
    let (status, body) = http(
        relay.handle.admin_addr,
        "POST",
        "/admin/revocations",
        Some(ADMIN),
        Some(r#"{"device_id":"device-refused"}"#),
    );
    assert_eq!(status, 200, "{body}");
    // Refused with the token on the request, and in the first message.
    let on_request = token("1b2c3d4e5f607182");
    let (mut ws, _) = connect(relay.addr(), &on_request, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 1));
    assert_eq!(got.error_code(), Some(401), "{got:?}");
    let in_message = token("2c3d4e5f60718293");
    let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
    let got = stream_session(
        &mut ws,
        &config_message(Some(&in_message)),
        &audio_frames(1, 1),
    );
    assert_eq!(got.error_code(), Some(401), "{got:?}");

    for id in ["1b2c3d4e5f607182", "2c3d4e5f60718293"] {
        assert!(
            wait_until(std::time::Duration::from_secs(5), || capture
                .text()
                .lines()
                .any(|l| l.contains("stream refused")
                    && l.contains("device=\"device-refused\"")
                    && l.contains(&format!("token_id=\"{id}\""))
                    && l.contains("code=401"))),
            "{id}: {}",
            capture.text()
        );
    }
    let logs = capture.text();
    for t in [&on_request, &in_message] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "a token's signature is in the log");
    }
}

/// An upstream that drops every connection a few frames in: each raw-audio
/// stream resumes on a new connection, fails again, and so on. Those lines
/// (one per failed connection, naming the account) share the upstream
/// failures' budget: a few, then a count. Before, each resume and each
/// move to another account left its own line, without bound.
#[test]
fn an_upstream_dropping_every_stream_is_logged_in_a_bounded_number_of_lines() {
    const STREAMS: usize = 20;
    let capture = logs();
    let fake = fake(&["key-m"], |c| {
        c.forbidden = vec![];
        c.faults.close_after_frames = Some(3);
    });
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-mid", "key-m")]));
    let token = relay.token("device-mid");
    for _ in 0..STREAMS {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        let _ = stream_session(&mut ws, &config_message(None), &audio_frames(10, 1));
    }
    let lines = |logs: &str| {
        logs.lines()
            .filter(|l| {
                l.contains("account=acct-mid")
                    && (l.contains("upstream failed") || l.contains("upstream refused the stream"))
            })
            .count()
    };
    let f = relay.handle.metrics().failovers();
    let failovers = f.open_refused + f.open_lost + f.mid_error + f.mid_lost;
    assert!(
        failovers >= STREAMS as u64 * 2,
        "every stream should fail over at least twice: {failovers}"
    );
    let logged = lines(&capture.text());
    assert!(
        // At most 20 a window, and the streams may straddle two.
        (1..=40).contains(&logged),
        "{logged} lines for {failovers} failed upstream connections"
    );
}

/// What the log budget's count lines for `what` ("refusals") say was not
/// logged one by one, summed.
fn not_logged(logs: &str, what: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains(&format!("{what} not logged one by one")))
        .filter_map(|l| {
            l.split("not_logged=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// A usage ledger database that cannot be read (here its table renamed
/// away beside the running relay) is logged once, naming the file, not at
/// every `/metrics` scrape (each reads it); the first read that works
/// again says so. Before, each scrape logged the same ERROR, without the
/// path.
#[test]
fn an_unreadable_usage_ledger_is_logged_once_naming_its_file() {
    let capture = logs();
    let fake = fake(&["key-d"], |_| {});
    let cfg = relay_config(&fake.url(), &[("acct-d", "key-d")]);
    let db_path = cfg.admin.state_dir.join("usage.db");
    let relay = Relay::start(cfg);
    let admin = relay.handle.admin_addr;
    let scrape = || {
        let (status, body) = http(admin, "GET", "/metrics", None, None);
        assert_eq!(status, 200, "{body}");
    };
    assert!(wait_until(std::time::Duration::from_secs(10), || db_path.exists()));
    scrape();
    let path = db_path.display().to_string();
    let lines = |what: &str| {
        capture
            .text()
            .lines()
            .filter(|l| l.contains(what) && l.contains(&path))
            .count()
    };
    let db = rusqlite::Connection::open(&db_path).unwrap();
    for round in 1..=2 {
        db.execute_batch("ALTER TABLE totals RENAME TO totals_away")
            .unwrap();
        for _ in 0..5 {
            scrape();
        }
        assert_eq!(
            lines("cannot read the usage ledger database"),
            round,
            "{}",
            capture.text()
        );
        db.execute_batch("ALTER TABLE totals_away RENAME TO totals")
            .unwrap();
        scrape();
        scrape();
        assert_eq!(
            lines("usage ledger database can be read again"),
            round,
            "{}",
            capture.text()
        );
    }
    std::fs::remove_dir_all(db_path.parent().unwrap()).ok();
}

/// Behind a balancer in `server.proxy_protocol_from`, a refusal's line
/// names the client its PROXY header carries, not the balancer; a
/// connection refused for its header names the balancer (the client is
/// not known), with what was wrong.
#[test]
fn a_refusal_behind_a_balancer_names_the_client_it_carries() {
    use std::io::{Read, Write};
    let capture = logs();
    let fake = fake(&["key-p"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-p", "key-p")]);
    cfg.server.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
    let relay = Relay::start(cfg);
    let ask = |bytes: &[u8]| {
        let mut tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        tcp.write_all(bytes).unwrap();
        let mut got = vec![];
        let _ = tcp.read_to_end(&mut got);
        (
            String::from_utf8_lossy(&got).into_owned(),
            tcp.local_addr().unwrap(),
        )
    };
    // PROXY v2, TCP over IPv4, from 192.0.2.77:5077.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend([192, 0, 2, 77, 127, 0, 0, 1]);
    header.extend(5077u16.to_be_bytes());
    header.extend(8080u16.to_be_bytes());
    let request = b"GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    Sec-WebSocket-Version: 13\r\nAuthorization: Bearer not-a-token\r\n\r\n";
    let (answer, _) = ask(&[header.as_slice(), request].concat());
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let (answer, balancer) = ask(request);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let line = |needles: &[&str]| {
        capture
            .text()
            .lines()
            .any(|l| l.contains("request refused") && needles.iter().all(|n| l.contains(n)))
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), || line(&[
            "peer=192.0.2.77:5077 ",
            "status=401"
        ]) && line(&[
            &format!("peer={balancer} "),
            "status=400",
            "a PROXY protocol header is required from this address"
        ])),
        "{}",
        capture.text()
    );
    assert!(!line(&["status=401", &format!("peer={balancer} ")]));
}

/// A client `server.allow` does not list has its connection closed
/// unanswered. It was counted (403) but not logged, unlike every other
/// refusal, so an operator whose clients could not connect found
/// nothing in the log; it is now a `request refused` line naming the
/// peer and `server.allow`.
#[test]
fn a_client_not_on_server_allow_is_logged() {
    use std::io::Read;
    let capture = logs();
    let fake = fake(&["key-a"], |c| c.forbidden = vec![]);
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let relay = Relay::start(cfg);
    let mut tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let me = tcp.local_addr().unwrap();
    let mut got = vec![];
    let _ = tcp.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    let line = || {
        capture.text().lines().any(|l| {
            l.contains(" INFO ")
                && l.contains("request refused")
                && l.contains(&format!("peer={me} "))
                && l.contains("status=403")
                && l.contains("not on server.allow")
        })
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), line),
        "{}",
        capture.text()
    );
}

/// Upstream's certificate refused: the line that says so gives rustls's
/// reason. The health probe at the start is the first to meet it, and
/// its line said only "it has expired, names another host than
/// upstream.url's, or is signed by a CA the relay does not trust", and
/// the streams' opens, finding the fault already set, logged nothing:
/// which of the three was nowhere.
#[test]
fn a_refused_upstream_certificate_is_logged_with_rustls_reason() {
    use rustls::pki_types::pem::PemObject;
    let capture = logs();
    // A fake Soniox at wss://localhost whose certificate names another host.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["elsewhere.example".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let fake = fake_soniox::FakeSoniox::start(fake_soniox::FakeConfig {
        keys: vec![fake_soniox::FakeKey::new("key-c", 5)],
        tls: Some(Arc::new(server)),
        ..fake_soniox::FakeConfig::default()
    })
    .unwrap();
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let mut cfg = relay_config(&fake.url(), &[("acct-c", "key-c")]);
    cfg.upstream.ca_file = Some(dir.join("ca.pem"));
    // Health checks on: with them, the start probes upstream's endpoint.
    cfg.admin.health_interval = std::time::Duration::from_secs(60);
    let relay = Relay::start(cfg);
    // The start's probe of upstream meets it first (/readyz says so),
    // then a stream, as a client would open one.
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            let (status, body) = http(relay.handle.admin_addr, "GET", "/readyz", None, None);
            status == 503 && body.contains("TLS certificate")
        }),
        "the start's probe did not find the certificate refused"
    );
    let (mut ws, _) = connect(relay.addr(), &relay.token("device-c"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 8));
    assert_error_frame(&got, 502, 1011);
    let refused = || {
        capture
            .text()
            .lines()
            .filter(|l| l.contains("refused upstream's TLS certificate"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), || !refused().is_empty()),
        "{}",
        capture.text()
    );
    assert!(
        refused()
            .iter()
            .all(|l| l.contains("why=") && l.contains("NotValidForName")),
        "{:?}",
        refused()
    );
    std::fs::remove_dir_all(&dir).ok();
}
