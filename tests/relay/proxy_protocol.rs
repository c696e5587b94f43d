//! The PROXY protocol from a trusted balancer (`server.proxy_protocol_from`):
//! the client address its header carries is the one the relay counts,
//! checks and logs; a connection from the balancer without a good header
//! is refused; from anyone else a PROXY header is a bad request, as ever.
//! Real sockets on loopback: the balancer is 127.0.0.1, other peers bind
//! 127.0.0.2.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use clio_relay::core::metrics::{RefusedBy, Side};
use tungstenite::Message;

use crate::util::*;

/// The balancer's network: loopback's first address only.
fn balancer() -> Vec<ipnet::IpNet> {
    vec!["127.0.0.1/32".parse().unwrap()]
}

/// A PROXY v2 header (`PROXY` command, TCP) for a client at `client`.
pub(crate) fn v2(client: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match client {
        SocketAddr::V4(a) => {
            body.extend(a.ip().octets());
            body.extend([10, 0, 0, 1]);
            0x11
        }
        SocketAddr::V6(a) => {
            body.extend(a.ip().octets());
            body.extend(std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    body.extend(client.port().to_be_bytes());
    body.extend(8080u16.to_be_bytes());
    v2_raw(0x21, family, &body)
}

/// A PROXY v2 header with this version-and-command byte, family byte and body.
fn v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(version_command);
    h.push(family);
    h.extend((body.len() as u16).to_be_bytes());
    h.extend(body);
    h
}

/// A PROXY v2 `LOCAL` header: a balancer's own connection (a health check).
fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[])
}

/// A TCP connection to `to` from `ip` (a loopback address).
pub(crate) fn from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let tcp: TcpStream = s.into();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp
}

/// An upgrade request, with `auth` (header lines) if any.
fn upgrade_request(auth: &str) -> String {
    format!(
        "GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
}

/// Sends `bytes` on `tcp` and reads the answer: its status (0 when the
/// relay closed without one) and its text; a 101's connection is kept
/// open, any other is read to its end.
fn ask(tcp: &mut TcpStream, bytes: &[u8]) -> (u16, String) {
    tcp.write_all(bytes).unwrap();
    answer(tcp)
}

pub(crate) fn answer(tcp: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    let status = String::from_utf8_lossy(&got)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 101 {
        let _ = tcp.read_to_end(&mut got);
    }
    (status, String::from_utf8_lossy(&got).into_owned())
}

/// A WebSocket client whose connection starts with `prefix` (a PROXY
/// header), with the token on the request.
pub(crate) fn ws_after(to: SocketAddr, prefix: &[u8], token: &str) -> Ws {
    use tungstenite::client::IntoClientRequest;
    let mut tcp = from([127, 0, 0, 1], to);
    tcp.write_all(prefix).unwrap();
    let mut req = format!("ws://{to}/v1/transcribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::client::client(req, tcp)
        .map(|(ws, _)| ws)
        .unwrap_or_else(|e| panic!("the upgrade after a PROXY header: {e:?}"))
}

/// `limits.max_unauthenticated_per_address` counts the clients a trusted
/// balancer names, not the balancer: with a bound of 1, a second
/// connection of one client is refused (429) while other clients (v2
/// over IPv4 and IPv6, v1) are let in; and a stream goes end to end
/// through a connection that started with a header.
#[test]
fn a_trusted_balancers_header_names_the_client() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.proxy_protocol_from = balancer();
    cfg.limits.max_unauthenticated_per_address = 1;
    let relay = Relay::start(cfg);
    let at = relay.addr();
    let no_token = upgrade_request("");
    let waiting = |header: Vec<u8>| {
        let mut tcp = from([127, 0, 0, 1], at);
        let mut bytes = header;
        bytes.extend(no_token.as_bytes());
        let (status, text) = ask(&mut tcp, &bytes);
        (tcp, status, text)
    };
    let (_a, status, text) = waiting(v2("192.0.2.7:5000".parse().unwrap()));
    assert_eq!(status, 101, "{text}");
    let (_a2, status, text) = waiting(v2("192.0.2.7:5001".parse().unwrap()));
    assert_eq!(status, 429, "the same client again: {text}");
    assert!(text.contains("max_unauthenticated_per_address"), "{text}");
    let (_b, status, text) = waiting(b"PROXY TCP4 192.0.2.8 10.0.0.1 5000 8080\r\n".to_vec());
    assert_eq!(status, 101, "another client, by v1: {text}");
    let (_c, status, text) = waiting(v2("[2001:db8::1]:5000".parse().unwrap()));
    assert_eq!(status, 101, "another client, over IPv6: {text}");
    let (_c2, status, text) = waiting(b"PROXY TCP6 2001:db8::1 ::1 5001 8080\r\n".to_vec());
    assert_eq!(status, 429, "the IPv6 client again, by v1: {text}");
    // An IPv6 client holds a /64 (a subscriber's network, from which it
    // picks any address): one address was a fresh bound each time, so a
    // single client could take the shard's whole pool.
    let (_c3, status, text) = waiting(v2("[2001:db8::2]:5000".parse().unwrap()));
    assert_eq!(status, 429, "the IPv6 client's /64 again: {text}");
    let (_d, status, text) = waiting(v2("[2001:db8:0:1::1]:5000".parse().unwrap()));
    assert_eq!(status, 101, "another /64: {text}");
    // A whole stream behind a header: the relay reads the header and
    // nothing past it.
    let frames = audio_frames(10, 3);
    let mut ws = ws_after(
        at,
        &v2("192.0.2.9:6000".parse().unwrap()),
        &relay.token("d"),
    );
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

/// From a balancer the header is required: none, a garbage one, one too
/// large, one cut short by the balancer's FIN, or one that never
/// completes within `limits.handshake_timeout`, each gets its own plain
/// answer (400, or 408 for time), counted as a client error and as a
/// refusal for the balancer's header (`refusals_total{by="proxy_header"}`),
/// not the client's: before, only the answer and the log line said that
/// these 400s and 408s were the balancer's. The connection is closed, and
/// a stream already going on is not touched.
#[test]
fn a_balancer_without_a_good_header_is_refused_and_others_go_on() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.proxy_protocol_from = balancer();
    cfg.limits.handshake_timeout = Duration::from_secs(1);
    let relay = Relay::start(cfg);
    let at = relay.addr();
    let token = relay.token("d");
    let mut live = ws_after(at, &v2("192.0.2.7:5000".parse().unwrap()), &token);
    live.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(10, 4);
    for f in &frames[..5] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    let request = upgrade_request(&format!("Authorization: Bearer {token}\r\n"));
    let refused = |bytes: &[u8], shut: bool| {
        let mut tcp = from([127, 0, 0, 1], at);
        tcp.write_all(bytes).unwrap();
        if shut {
            tcp.shutdown(std::net::Shutdown::Write).unwrap();
        }
        answer(&mut tcp)
    };
    let before = relay.handle.metrics();
    // No header at all.
    let (status, text) = refused(request.as_bytes(), false);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("a PROXY protocol header is required from this address"),
        "{text}"
    );
    // Garbage where the header should be: version 3.
    let mut bad = v2("192.0.2.7:5000".parse().unwrap());
    bad[12] = 0x31;
    bad.extend(request.as_bytes());
    let (status, text) = refused(&bad, false);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed PROXY protocol header"), "{text}");
    let (status, text) = refused(b"PROXY TCP4 nobody 10.0.0.1 1 2\r\n", false);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed PROXY protocol header"), "{text}");
    // A length past the bound (limits.max_header_bytes), told at once.
    let mut big = v2_raw(0x21, 0x11, &[0; 12]);
    big[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    let (status, text) = refused(&big, false);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("PROXY protocol header too large"), "{text}");
    // Cut short: the balancer closes its side in the middle of it.
    let whole = v2("192.0.2.7:5000".parse().unwrap());
    let (status, text) = refused(&whole[..20], true);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("PROXY protocol header cut short"), "{text}");
    // Stalled in the middle: limits.handshake_timeout.
    let (status, text) = refused(&whole[..20], false);
    assert_eq!(status, 408, "{text}");
    assert!(
        text.contains("PROXY protocol header not received in time"),
        "{text}"
    );
    let after = relay.handle.metrics();
    assert_eq!(
        after.errors(Side::Client, 400) - before.errors(Side::Client, 400),
        5
    );
    assert_eq!(
        after.errors(Side::Client, 408) - before.errors(Side::Client, 408),
        1
    );
    let metrics = http(relay.handle.admin_addr, "GET", "/metrics", None, None).1;
    assert!(
        metrics
            .lines()
            .any(|l| l == "clio_relay_refusals_total{by=\"proxy_header\"} 6"),
        "{metrics}"
    );
    assert_eq!(
        after.refusals(RefusedBy::Client),
        before.refusals(RefusedBy::Client),
        "not the client's own refusals"
    );
    // The stream that was going on goes on to its end.
    for f in &frames[5..] {
        live.send(Message::binary(f.clone())).unwrap();
    }
    live.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut live);
    assert!(got.finished(), "{got:?}");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

/// Only a listed balancer's header is read: from another address a PROXY
/// header is not trusted and is a malformed request (400), as without
/// the setting, and that address needs no header. The same header from
/// the balancer is served.
#[test]
fn from_an_untrusted_address_a_proxy_header_is_a_bad_request() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.proxy_protocol_from = balancer();
    let relay = Relay::start(cfg);
    let at = relay.addr();
    let request = upgrade_request(&format!("Authorization: Bearer {}\r\n", relay.token("d")));
    let with = |prefix: &[u8]| {
        let mut b = prefix.to_vec();
        b.extend(request.as_bytes());
        b
    };
    let claimed = v2("192.0.2.7:5000".parse().unwrap());
    for prefix in [
        claimed.clone(),
        b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 8080\r\n".to_vec(),
    ] {
        let (status, text) = ask(&mut from([127, 0, 0, 2], at), &with(&prefix));
        assert_eq!(status, 400, "{text}");
        // Said as what it is: a balancer sending headers to a relay that
        // does not trust it failed every stream as a "malformed HTTP
        // request", no more.
        assert!(
            text.contains(
                "malformed HTTP request: it starts with a PROXY protocol header, \
                 and this address is not in server.proxy_protocol_from"
            ),
            "{text}"
        );
    }
    // A request that is merely malformed is not said to be one.
    let (status, text) = ask(&mut from([127, 0, 0, 2], at), b"PROXY\r\n\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed HTTP request"), "{text}");
    assert!(!text.contains("PROXY protocol"), "{text}");
    let (status, text) = ask(&mut from([127, 0, 0, 2], at), request.as_bytes());
    assert_eq!(status, 101, "no header from a client: {text}");
    let (status, text) = ask(&mut from([127, 0, 0, 1], at), &with(&claimed));
    assert_eq!(status, 101, "the balancer's header: {text}");
}

/// `server.allow` applies to the client a balancer's header names (the
/// balancer itself need not be on it); a `LOCAL` header (the balancer's
/// own check) is the balancer's own address. Both settings change on
/// reload, for new connections.
#[test]
fn server_allow_applies_to_the_client_address_the_header_carries() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.proxy_protocol_from = balancer();
    cfg.server.allow = vec!["192.0.2.0/24".parse().unwrap()];
    let relay = Relay::start(cfg.clone());
    let at = relay.addr();
    let request = upgrade_request(&format!("Authorization: Bearer {}\r\n", relay.token("d")));
    let via_balancer = |header: Vec<u8>, rest: &[u8]| {
        let mut b = header;
        b.extend(rest);
        ask(&mut from([127, 0, 0, 1], at), &b)
    };
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let before = relay.handle.metrics().errors(Side::Client, 403);
    let (status, text) = via_balancer(v2("192.0.2.7:5000".parse().unwrap()), request.as_bytes());
    assert_eq!(status, 101, "a client on the list: {text}");
    let (status, text) = via_balancer(v2("198.51.100.7:5000".parse().unwrap()), request.as_bytes());
    assert_eq!(status, 0, "a client off the list is closed: {text}");
    let (status, text) = via_balancer(v2_local(), healthz);
    assert_eq!(status, 0, "LOCAL is the balancer, off the list: {text}");
    let (status, text) = ask(&mut from([127, 0, 0, 2], at), request.as_bytes());
    assert_eq!(status, 0, "a direct peer off the list: {text}");
    assert_eq!(relay.handle.metrics().errors(Side::Client, 403) - before, 3);
    // The balancer's own address on the list: its LOCAL check is answered.
    cfg.server.allow.push("127.0.0.1/32".parse().unwrap());
    relay.handle.reload(&cfg).unwrap();
    let (status, text) = via_balancer(v2_local(), healthz);
    assert_eq!(status, 200, "{text}");
    // No balancer any more: its header is a bad request again.
    cfg.server.proxy_protocol_from.clear();
    relay.handle.reload(&cfg).unwrap();
    let (status, text) = via_balancer(v2("192.0.2.7:5000".parse().unwrap()), request.as_bytes());
    assert_eq!(status, 400, "{text}");
    let (status, text) = ask(&mut from([127, 0, 0, 1], at), request.as_bytes());
    assert_eq!(status, 101, "{text}");
}

/// With `[tls]` on the relay (a balancer passing TLS through, HAProxy's
/// `mode tcp` with `send-proxy-v2`), the header comes before the
/// ClientHello: read first, then the TLS handshake and the stream as
/// ever. Without it, the balancer's TLS connection is refused.
#[test]
fn over_tls_the_header_comes_before_the_client_hello() {
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.server.proxy_protocol_from = balancer();
    });
    let at = relay.addr();
    let token = relay.token("d");
    let mut tcp = from([127, 0, 0, 1], at);
    tcp.write_all(&v2("192.0.2.7:5000".parse().unwrap()))
        .unwrap();
    let mut ws = crate::tls::wss_connect_with(at, &ca, &token, tcp).unwrap();
    let frames = audio_frames(10, 5);
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        finished |= matches!(&m, Message::Text(t) if t.contains("\"finished\":true"));
    }
    assert!(finished, "the stream over TLS behind a header finished");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
    let before = relay.handle.metrics().errors(Side::Client, 400);
    assert!(
        crate::tls::wss_connect_with(at, &ca, &token, from([127, 0, 0, 1], at)).is_err(),
        "a ClientHello with no header before it is refused"
    );
    assert!(wait_until(Duration::from_secs(10), || relay
        .handle
        .metrics()
        .errors(Side::Client, 400)
        > before));
}

/// HAProxy started by a test with `cfg` (its `{port}` filled in with a
/// free port of 127.0.0.1), stopped on drop.
struct HaProxy {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl HaProxy {
    fn start(cfg: &str) -> HaProxy {
        let dir = state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg.replace("{port}", &port.to_string())).unwrap();
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy runs (.ci/run installs it)");
        let h = HaProxy { child, port, dir };
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "haproxy listens"
        );
        h
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `wss://` upgrade to `to` from `ip`, trusting `ca`, with `token` on
/// the request if any: the WebSocket, or the HTTP status it was refused
/// with.
fn wss_from(
    ip: [u8; 4],
    to: SocketAddr,
    ca: &str,
    token: Option<&str>,
) -> Result<tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>, u16> {
    use rustls::pki_types::pem::PemObject;
    use tungstenite::client::IntoClientRequest;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let tls = rustls::StreamOwned::new(conn, from(ip, to));
    let mut req = format!("wss://localhost:{}/v1/transcribe", to.port())
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tungstenite::client::client(req, tls) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(r.status().as_u16())
        }
        Err(e) => panic!("the wss:// upgrade: {e:?}"),
    }
}

/// README's SNI-passthrough variant of deploy/haproxy.cfg, in a real
/// HAProxy: `mode tcp`, the backend chosen by the ClientHello's SNI, and
/// `send-proxy-v2` to a node with `[tls]`. The node reads HAProxy's
/// header before the ClientHello it passes through, and knows each
/// client by its own address: with a bound of 1 per address, a client's
/// second connection waiting to send its token is refused (429), another
/// client's is let in, and a stream goes end to end.
#[test]
fn behind_haproxy_passing_tls_through_each_client_is_its_own_address() {
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.server.proxy_protocol_from = balancer();
        c.limits.max_unauthenticated_per_address = 1;
    });
    let lb = HaProxy::start(&format!(
        "global\n    maxconn 100\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
         frontend tls\n    bind 127.0.0.1:{{port}}\n    tcp-request inspect-delay 5s\n\
         \x20   tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
         \x20   use_backend relays if {{ req.ssl_sni -i localhost }}\n\
         backend relays\n    server relay-1 {} send-proxy-v2\n",
        relay.addr()
    ));
    let waiting = |ip: [u8; 4]| wss_from(ip, lb.addr(), &ca, None);
    let _a = waiting([127, 0, 0, 2]).expect("the first client waits for its token");
    assert_eq!(
        waiting([127, 0, 0, 2]).err(),
        Some(429),
        "the same client again"
    );
    let _b = waiting([127, 0, 0, 3]).expect("another client waits for its token");
    let mut ws = wss_from([127, 0, 0, 4], lb.addr(), &ca, Some(&relay.token("d"))).unwrap();
    let frames = audio_frames(10, 6);
    ws.send(Message::text(config_message(None))).unwrap();
    for f in &frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        finished |= matches!(&m, Message::Text(t) if t.contains("\"finished\":true"));
    }
    assert!(finished, "the stream through HAProxy finished");
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

/// On a dual-stack port (`[::]`) an IPv4 client's peer address is
/// IPv4-mapped, and the log names it so (`[::ffff:192.0.2.7]:…`). An
/// entry written that way in `server.allow` or `server.proxy_protocol_from`
/// did not match: only the IPv4 form was compared, so the client the log
/// named was refused (403) and the balancer's header was a bad request.
#[test]
fn an_ipv4_mapped_entry_matches_an_ipv4_client_on_a_dual_stack_port() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.listen = "[::]:0".parse().unwrap();
    cfg.server.allow = vec!["::ffff:127.0.0.1/128".parse().unwrap()];
    cfg.server.proxy_protocol_from = vec!["::ffff:127.0.0.1/128".parse().unwrap()];
    let relay = Relay::start(cfg);
    let at = SocketAddr::from(([127, 0, 0, 1], relay.addr().port()));
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // The balancer's LOCAL check: trusted, and on the list itself.
    let mut check = v2_local();
    check.extend(healthz);
    let (status, text) = ask(&mut from([127, 0, 0, 1], at), &check);
    assert_eq!(status, 200, "{text}");
    // Another address is still off the list.
    let (status, text) = ask(&mut from([127, 0, 0, 2], at), healthz);
    assert_eq!(status, 0, "{text}");
}

/// HAProxy's TCP check with `send-proxy-v2` connects, sends its `LOCAL`
/// header and resets the connection at once. By the time the relay asked
/// the socket who its peer was, the reset had come: no address, so not the
/// trusted balancer, so the header went to TLS as a ClientHello. Each check
/// counted a failed handshake (400) and logged one, naming the balancer as
/// untrusted. A connection reset before the relay knows its peer is gone:
/// closed uncounted, as one closed before its first byte.
#[test]
fn a_balancers_check_reset_at_once_is_no_failed_handshake() {
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = crate::tls::tls_relay(&fake.url(), |c| {
        c.server.proxy_protocol_from = balancer();
    });
    let at = relay.addr();
    for _ in 0..50 {
        let tcp = from([127, 0, 0, 1], at);
        (&tcp).write_all(&v2_local()).unwrap();
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp);
    }
    assert!(relay
        .handle
        .process
        .wait_all_closed(std::time::Instant::now() + Duration::from_secs(20)));
    // (A reset is now and then seen only at the handshake timeout, as a
    // 408: not what this test is about.)
    assert_eq!(relay.handle.metrics().errors(Side::Client, 400), 0);
    // A client behind the balancer is served as ever.
    let mut tcp = from([127, 0, 0, 1], at);
    tcp.write_all(&v2("192.0.2.7:5000".parse().unwrap()))
        .unwrap();
    let mut ws = crate::tls::wss_connect_with(at, &ca, &relay.token("d"), tcp).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        finished |= matches!(&m, Message::Text(t) if t.contains("\"finished\":true"));
    }
    assert!(finished);
}

/// The same check against a port with `server.allow` (a balancer's own
/// address on it): reset before the relay read its peer, it was "not on
/// server.allow" and counted and logged as a 403 (`peer=-`).
#[test]
fn a_check_reset_at_once_is_not_refused_by_server_allow() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.server.allow = vec!["127.0.0.1/32".parse().unwrap()];
    let relay = Relay::start(cfg);
    let at = relay.addr();
    for _ in 0..50 {
        let tcp = from([127, 0, 0, 1], at);
        (&tcp).write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp);
    }
    assert!(relay
        .handle
        .process
        .wait_all_closed(std::time::Instant::now() + Duration::from_secs(20)));
    assert_eq!(relay.handle.metrics().errors(Side::Client, 403), 0);
    let (status, text) = ask(
        &mut from([127, 0, 0, 1], at),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
}
