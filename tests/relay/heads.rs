//! Request heads: the limits as documented, whatever the head's shape, and
//! answers that reach a client even if it is still sending.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ADMIN: &str = "heads-admin-token-0123456789";

/// Writes `request` in one write (and then `more`, if any, ignoring
/// errors), waits a moment as a slow client would, then reads the answer:
/// up to the end of a 101's head, or to the end of the connection. The flag
/// says whether a refusal's connection ended cleanly (FIN) rather than with
/// a reset.
fn send_raw(addr: SocketAddr, request: &[u8], more: &[u8]) -> (String, bool) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.write_all(request).unwrap();
    let _ = tcp.write_all(more);
    std::thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let clean = loop {
        match tcp.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), clean)
}

fn upgrade_head(token: &str, extra: &str) -> String {
    format!(
        "GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    )
}

#[test]
fn head_limits_hold_however_the_head_arrives() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("dev-1");

    // 12 KiB of head in one write: over limits.max_header_bytes (8,192).
    let big = upgrade_head(&token, &format!("X-Pad: {}\r\n", "a".repeat(12 * 1024)));
    let (answer, _) = send_raw(relay.addr(), big.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Many small headers are fine while the head is under the limit.
    let many: String = (0..200).map(|i| format!("X-H-{i}: v\r\n")).collect();
    let head = upgrade_head(&token, &many);
    assert!(head.len() < 8192);
    let (answer, _) = send_raw(relay.addr(), head.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");

    // A wrong WebSocket version is told the one the relay speaks.
    let v8 =
        upgrade_head(&token, "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (answer, _) = send_raw(relay.addr(), v8.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert_eq!(
        header_of(&answer, "sec-websocket-version").as_deref(),
        Some("13"),
        "{answer}"
    );

    // The absolute form of the target (RFC 9112 §3.2.2) names the same
    // endpoint.
    let absolute = upgrade_head(&token, "").replacen(
        "GET /v1/transcribe",
        "GET http://relay.example/v1/transcribe",
        1,
    );
    let (answer, _) = send_raw(relay.addr(), absolute.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");

    // The stream endpoint is GET only.
    let post = upgrade_head(&token, "").replacen("GET", "POST", 1);
    let (answer, _) = send_raw(relay.addr(), post.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(
        header_of(&answer, "allow").as_deref(),
        Some("GET"),
        "{answer}"
    );

    // A long path on the admin port is over the head limit too.
    let path = format!("/{}", "p".repeat(9 * 1024));
    let (answer, _) = send_raw(
        relay.handle.admin_addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        b"",
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[test]
fn refusals_reach_a_client_that_is_still_sending() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("dev-1");
    let junk = vec![b'x'; 64 * 1024];

    // 431 on the client port, with more head bytes still coming.
    let big = upgrade_head(&token, &format!("X-Pad: {}\r\n", "a".repeat(12 * 1024)));
    let (answer, clean) = send_raw(relay.addr(), big.as_bytes(), &junk);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(clean, "the 431 was followed by a reset");

    // 413 on the admin port, with the body still coming.
    let head = "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n";
    let (answer, clean) = send_raw(relay.handle.admin_addr, head.as_bytes(), &junk);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(clean, "the 413 was followed by a reset");
}

/// Sends `head` as written, reads the answer's head, and if it is a 101,
/// streams a session over the connection with a real WebSocket client.
fn stream_with_head(addr: SocketAddr, head: &str) -> (String, Option<Received>) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") && tcp.read(&mut b).unwrap() == 1 {
        answer.push(b[0]);
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.starts_with("HTTP/1.1 101") {
        return (answer, None);
    }
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(tcp, tungstenite::protocol::Role::Client, None);
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 9));
    (answer, Some(got))
}

/// `limits.max_header_bytes` is the bound, whatever the read buffer's
/// size: with a limit past the 32 KiB pooled buffer, a 40 KiB head is
/// served (and its stream runs), and one over the limit still gets 431.
#[test]
fn a_head_limit_past_the_read_buffer_is_the_limit() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.max_header_bytes = 64 * 1024;
    let relay = Relay::start(cfg);
    let token = relay.token("dev-1");

    let long = upgrade_head(&token, &format!("X-Pad: {}\r\n", "a".repeat(40 * 1024)));
    assert!(long.len() > 32 * 1024 && long.len() < 64 * 1024);
    let (answer, got) = stream_with_head(relay.addr(), &long);
    let got = got.unwrap_or_else(|| panic!("a head under the limit was refused: {answer}"));
    assert!(got.finished(), "{answer} {got:?}");

    let over = upgrade_head(&token, &format!("X-Pad: {}\r\n", "a".repeat(70 * 1024)));
    let (answer, _) = send_raw(relay.addr(), over.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[test]
fn list_headers_may_come_on_several_lines() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("dev-1");
    let finished = |head: String| {
        let (answer, got) = stream_with_head(relay.addr(), &head);
        let got = got.unwrap_or_else(|| panic!("not upgraded: {answer}"));
        assert!(got.finished(), "{answer} {got:?}");
        assert_eq!(got.error_code(), None, "{got:?}");
        answer
    };
    let base = |extra: &str| {
        format!(
            "GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n";

    // RFC 6455 §11.3.4: several Sec-WebSocket-Protocol lines are one list.
    let answer = finished(base(&format!(
        "{upgrade}Sec-WebSocket-Protocol: soniox-api-key\r\nSec-WebSocket-Protocol: {token}\r\n"
    )));
    assert_eq!(
        header_of(&answer, "sec-websocket-protocol").as_deref(),
        Some("soniox-api-key"),
        "{answer}"
    );

    // RFC 9110 §5.3: so are several Connection lines.
    let bearer = format!("Authorization: Bearer {token}\r\n");
    finished(base(&format!(
        "Upgrade: websocket\r\nConnection: keep-alive\r\nConnection: Upgrade\r\n{bearer}"
    )));

    // Lines that name neither still get no upgrade.
    let (answer, _) = stream_with_head(
        relay.addr(),
        &base(&format!(
            "Upgrade: websocket\r\nConnection: keep-alive\r\nConnection: close\r\n{bearer}"
        )),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[test]
fn a_percent_encoded_query_token_is_decoded() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("dev-1");
    // Every byte escaped, as an over-eager URL encoder may do: still the
    // same token (RFC 3986 §2.1).
    let escaped: String = token.bytes().map(|b| format!("%{b:02X}")).collect();
    let head = format!(
        "GET /v1/transcribe?token={escaped} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (answer, got) = stream_with_head(relay.addr(), &head);
    let got = got.unwrap_or_else(|| panic!("not upgraded: {answer}"));
    assert!(got.finished(), "{got:?}");

    // A bad escape is a malformed token, not some other token.
    let head = head.replacen("?token=%", "?token=%G", 1);
    let (answer, _) = stream_with_head(relay.addr(), &head);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// `Authorization` may come once (RFC 9110 §5.3): a request with two gets
/// 400 on both ports, whichever of them holds the right credential (the
/// client port took the last, the admin port the first).
#[test]
fn a_request_with_two_authorization_headers_gets_400() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.admin.token = Some(clio_relay::core::secret::Secret::new(ADMIN));
    let relay = Relay::start(cfg);
    let token = relay.token("dev-1");
    for (first, second) in [
        (token.as_str(), "clio1.x.y.z"),
        ("clio1.x.y.z", token.as_str()),
    ] {
        let head = upgrade_head(first, &format!("Authorization: Bearer {second}\r\n"));
        let (answer, _) = send_raw(relay.addr(), head.as_bytes(), b"");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("Authorization"), "{answer}");
        assert!(!answer.contains(&token), "{answer}");
    }
    for (first, second) in [(ADMIN, "wrong"), ("wrong", ADMIN)] {
        let head = format!(
            "GET /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n\r\n"
        );
        let (answer, _) = send_raw(relay.handle.admin_addr, head.as_bytes(), b"");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(!answer.contains(ADMIN), "{answer}");
    }
    // One is served.
    let (answer, _) = send_raw(relay.addr(), upgrade_head(&token, "").as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a `Host`, with more than
/// one, or with one that names no host gets 400, on both ports; HTTP/1.0
/// may leave it out.
#[test]
fn a_request_needs_exactly_one_host() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("dev-1");
    let upgrade = |hosts: &str| {
        format!(
            "GET /v1/transcribe HTTP/1.1\r\n{hosts}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };
    for hosts in [
        "",
        "Host: a.example\r\nHost: b.example\r\n",
        "Host: a.example/v1\r\n",
        "Host: a example\r\n",
    ] {
        let (answer, _) = send_raw(relay.addr(), upgrade(hosts).as_bytes(), b"");
        assert!(answer.starts_with("HTTP/1.1 400"), "{hosts:?}: {answer}");
        assert!(answer.contains("Host"), "{hosts:?}: {answer}");
        assert!(!answer.contains(&token), "{answer}");
        let admin = format!("GET /healthz HTTP/1.1\r\n{hosts}\r\n");
        let (answer, _) = send_raw(relay.handle.admin_addr, admin.as_bytes(), b"");
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "admin {hosts:?}: {answer}"
        );
    }
    // What a request may carry: a name, an address, a port, an empty value.
    for hosts in [
        "Host: relay.example\r\n",
        "Host: 127.0.0.1:8080\r\n",
        "Host: [::1]:8080\r\n",
        "host: Relay.Example\r\n",
    ] {
        let (answer, _) = send_raw(relay.addr(), upgrade(hosts).as_bytes(), b"");
        assert!(answer.starts_with("HTTP/1.1 101"), "{hosts:?}: {answer}");
    }
    for (port, head) in [
        (relay.addr(), "GET /healthz HTTP/1.0\r\n\r\n"),
        (relay.handle.admin_addr, "GET /healthz HTTP/1.0\r\n\r\n"),
        (
            relay.handle.admin_addr,
            "GET /healthz HTTP/1.1\r\nHost:\r\n\r\n",
        ),
    ] {
        let (answer, _) = send_raw(port, head.as_bytes(), b"");
        assert!(answer.contains(" 200 "), "{head:?}: {answer}");
    }
}

#[test]
fn a_head_whose_lines_end_in_a_bare_line_feed_is_answered() {
    // RFC 9112 §2.2: a recipient may take a lone LF for a line's end, and
    // the relay's HTTP parser does. Before, the head's end was looked for
    // only as CRLF CRLF, so such a head (a hand-written client's) waited
    // out limits.handshake_timeout and got 408 "request head not received
    // in time".
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let upgrade = upgrade_head(&relay.token("dev"), "").replace("\r\n", "\n");
    let (answer, _) = send_raw(relay.addr(), upgrade.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    // Mixed, as a client that writes its last line by hand would.
    let mixed = upgrade_head(&relay.token("dev"), "").replacen("\r\n\r\n", "\n\n", 1);
    let (answer, _) = send_raw(relay.addr(), mixed.as_bytes(), b"");
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    let (answer, clean) = send_raw(relay.addr(), b"GET /healthz HTTP/1.1\nHost: x\n\n", b"");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(clean, "{answer}");
}
