//! Upstream over TLS with a CA made at test time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};

use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A fake Soniox serving `wss` for "localhost", and the PEM of its CA.
fn tls_fake() -> (FakeSoniox, String) {
    use rustls::pki_types::pem::PemObject;
    let (ca, cert, key) = localhost_cert();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 50)],
        tls: Some(Arc::new(server)),
        record_audio: true,
        ..FakeConfig::default()
    })
    .unwrap();
    (fake, ca)
}

/// A temp file holding `pem`, removed on drop.
struct TempPem(std::path::PathBuf);

impl TempPem {
    fn new(pem: &str) -> TempPem {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "clio-relay-test-ca-{}-{nanos}.pem",
            std::process::id()
        ));
        std::fs::write(&path, pem).unwrap();
        TempPem(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn upstream_over_tls_with_a_local_ca() {
    let (fake, pem) = tls_fake();
    assert!(fake.url().starts_with("wss://localhost:"));
    let ca = TempPem::new(&pem);
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.upstream.ca_file = Some(ca.0.clone());
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(20, 8);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert!(!got.text().is_empty());
    assert_eq!(got.close_code(), Some(1000));
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

#[test]
fn upstream_tls_without_the_ca_fails_with_502() {
    // A certificate the relay cannot verify (a private CA it was not
    // given) is the configuration's fault, as a wrong path is: a 502 that
    // says so at once (not after the waits for an unreachable upstream),
    // `/readyz` 503 with the reason, and the metric, holding 495.
    let (fake, _pem) = tls_fake();
    let relay = Relay::start(relay_config(
        &fake.url(),
        &[("acct-a", "key-a"), ("acct-b", "key-b")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 8));
    assert_error_frame(&got, 502, 1011);
    let message = got.messages[0]["error_message"].as_str().unwrap();
    assert!(
        message.contains("TLS certificate") && message.contains("not a capacity limit"),
        "{message}"
    );
    assert!(
        fake.sessions().iter().all(|s| s.config.is_none()),
        "{:?}",
        fake.sessions()
    );
    let (status, body) = http(relay.handle.admin_addr, "GET", "/readyz", None, None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream.ca_file"), "{body}");
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics
            .lines()
            .any(|l| l == "clio_relay_upstream_config_fault 495"),
        "{metrics}"
    );
    // Its HELP says what 495 means (it named 400 and 404 only).
    let help = metrics
        .lines()
        .find(|l| l.starts_with("# HELP clio_relay_upstream_config_fault "))
        .unwrap();
    assert!(
        help.contains("495") && help.contains("certificate"),
        "{help}"
    );
    assert!(no_account_blamed(&relay));
}

/// A CA and a "localhost" certificate it signed, as PEM: (ca, cert, key).
pub(crate) fn localhost_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// A relay in front of `upstream` serving TLS on its client port, with a
/// certificate for "localhost" made now (`tweak` changes its config), and
/// the PEM of the CA that signed it.
pub(crate) fn tls_relay(
    upstream: &str,
    tweak: impl FnOnce(&mut clio_relay::core::config::Config),
) -> (Relay, String) {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = localhost_cert();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), &key).unwrap();
    let mut cfg = relay_config(upstream, &[("a", "k1")]);
    cfg.tls = Some(clio_relay::core::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    });
    tweak(&mut cfg);
    (Relay::start(cfg), ca)
}

/// A wss:// client that trusts only `ca_pem`.
pub(crate) fn wss_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    token: &str,
) -> Result<
    tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
    String,
> {
    wss_connect_with(
        addr,
        ca_pem,
        token,
        std::net::TcpStream::connect(addr).unwrap(),
    )
}

/// [`wss_connect`] over `tcp`, a socket connected to `addr`.
pub(crate) fn wss_connect_with(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    token: &str,
    tcp: std::net::TcpStream,
) -> Result<
    tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use tungstenite::client::IntoClientRequest;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Finish the TLS handshake first so a refused certificate shows as an error here.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut req = format!("wss://localhost:{}/v1/transcribe", addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tungstenite::client::client(req, tls)
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

#[test]
fn client_port_serves_tls_and_reloads_its_certificate() {
    let fake = fake(&["k1"], |_| {});
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (ca1, cert1, key1) = localhost_cert();
    std::fs::write(dir.join("cert.pem"), &cert1).unwrap();
    std::fs::write(dir.join("key.pem"), &key1).unwrap();
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.tls = Some(clio_relay::core::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    });
    let relay = Relay::start(cfg.clone());
    let token = relay.token("d");
    // A full session over wss://.
    let mut ws = wss_connect(relay.addr(), &ca1, &token).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    // A new certificate (another CA) on reload: new connections get it, the
    // live stream goes on on the old one.
    let (ca2, cert2, key2) = localhost_cert();
    std::fs::write(dir.join("cert.pem"), &cert2).unwrap();
    std::fs::write(dir.join("key.pem"), &key2).unwrap();
    // The reload's log names the certificate it read, by its end date.
    let log = relay.handle.reload(&cfg).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("TLS certificate read from tls.cert_file")
                && l.contains("cert.pem (valid until")
                && l.contains("01 Jan 4096")),
        "{log:?}"
    );
    assert!(
        wss_connect(relay.addr(), &ca1, &token).is_err(),
        "the old certificate is gone"
    );
    let mut fresh = wss_connect(relay.addr(), &ca2, &token).unwrap();
    fresh.send(Message::text(config_message(None))).unwrap();
    fresh.send(Message::binary(Vec::<u8>::new())).unwrap();
    for f in audio_frames(5, 2) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            finished |= t.contains("\"finished\":true");
        }
    }
    assert!(finished, "the stream across the reload finished");
    assert!(fake.sessions()[0].audio_frames == 10);
    // A plain ws:// client gets nothing from a TLS port.
    assert!(connect(relay.addr(), &token, Via::Header).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// A TLS client that stops reading does not hold its stream: ending it
/// writes the error frame and then TLS's close_notify, and both wait a
/// bounded time on the client's full socket.
#[test]
fn a_tls_client_that_leaves_while_upstream_opens_is_let_go() {
    // Upstream answers each upgrade 3 s late; the client, over TLS, sends
    // its config and leaves. Its hang-up is seen under TLS too: the open
    // is dropped, and upstream never gets the stream's config.
    let fake = fake(&["k1"], |c| {
        c.faults.handshake_delay = Duration::from_secs(3)
    });
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let live = || relay.account_live(0);
    assert!(wait_until(LIMIT, || live() == 1));
    drop(ws);
    assert!(wait_until(LIMIT, || live() == 0));
    assert!(relay.wait_idle(LIMIT));
    // Had the open gone on, its place would have come free only after
    // upstream's late answer, with the config sent by then.
    assert!(
        fake.sessions().iter().all(|s| s.config.is_none()),
        "upstream got the config of a client that had left"
    );
}

#[test]
fn a_tls_client_that_stops_reading_still_has_its_stream_ended() {
    let url = chatty_upstream();
    let (relay, ca) = tls_relay(&url, |cfg| cfg.limits.idle_timeout = Duration::from_secs(1));
    let token = relay.token("d");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&relay.addr().into()).unwrap();
    let mut ws = wss_connect_with(relay.addr(), &ca, &token, sock.into()).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    // From here the client never reads: upstream's results fill its socket.
    assert!(wait_until(LIMIT, || relay.handle.process.live_streams() == 1));
    assert!(
        relay.wait_idle(LIMIT + Duration::from_secs(5)),
        "the stream of a TLS client that stopped reading never ended"
    );
    drop(ws);
}

#[test]
fn clients_that_do_not_speak_tls_are_closed_and_others_served() {
    use std::io::{Read, Write};
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |cfg| {
        cfg.limits.handshake_timeout = Duration::from_secs(1)
    });
    let connect = || {
        let tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        // A bound for a test that would otherwise hang: far past the
        // handshake timeout.
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp
    };
    // Plain HTTP on the TLS port gets a TLS alert record, then the close.
    let mut plain = connect();
    plain
        .write_all(b"GET /v1/transcribe HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = vec![];
    plain.read_to_end(&mut got).expect("closed, not left open");
    assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
    // Each refused handshake is counted before its socket closes: a bad
    // request (400) for its bytes, a timeout (408) for a handshake not
    // done in time.
    let refused = |code: &str| -> u64 {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        let series = format!("clio_relay_errors_total{{side=\"client\",code=\"{code}\"}}");
        series_value(&metrics, &series).unwrap_or(0.0) as u64
    };
    assert_eq!((refused("400"), refused("408")), (1, 0));
    // So do garbage, a record header promising 64 KiB, a handshake record
    // too short for its message, and an SSLv2-style hello; a client whose
    // unread bytes make the close a reset may miss the alert.
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (i, bytes) in [
        noise,
        vec![0x16, 0x03, 0x01, 0xff, 0xff],
        vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
        vec![0x80, 0x2e, 0x01, 0x03, 0x01],
    ]
    .into_iter()
    .enumerate()
    {
        let mut tcp = connect();
        let _ = tcp.write_all(&bytes);
        let mut got = vec![];
        match tcp.read_to_end(&mut got) {
            Ok(_) => assert_eq!(got.first(), Some(&0x15), "{:?}: {got:?}", &bytes[..5]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        // Refused for its bytes, not at the handshake timeout (whose 408
        // would be counted instead): what the relay decided, not how long
        // a loaded host took to say it.
        assert_eq!(
            (refused("400"), refused("408")),
            (2 + i as u64, 0),
            "{:?}",
            &bytes[..5]
        );
    }
    // A silent client, and one that stops half way through its hello,
    // are closed at the handshake timeout.
    let silent = connect();
    let mut half = connect();
    half.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    for (what, mut tcp) in [("silent", silent), ("half a hello", half)] {
        let mut got = vec![];
        let n = tcp.read_to_end(&mut got);
        assert!(n.is_ok(), "{what}: {n:?}");
    }
    // And the port still serves a real client.
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1).remove(0)))
        .unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            finished |= t.contains("\"finished\":true");
        }
    }
    assert!(finished, "the good client's stream finished");
    // Counted as a request head is: a handshake that failed as a bad
    // request (400), one not done in time as a timeout (408).
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    for line in [
        "clio_relay_errors_total{side=\"client\",code=\"400\"} 5",
        "clio_relay_errors_total{side=\"client\",code=\"408\"} 2",
        "clio_relay_refusals_total{by=\"client\"} 7",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

/// A balancer's TCP health check (HAProxy's `check` without `httpchk`, a
/// cloud load balancer's TCP check) connects and closes before sending a
/// byte. On the plain port that is nothing; on the TLS port each one was
/// counted and logged as a failed handshake (`tls handshake eof`, 400), so
/// every check raised `errors_total{side="client",code="400"}` and took a
/// line of the refusals' log budget.
#[test]
fn a_connection_closed_before_its_first_byte_is_no_failed_handshake() {
    use std::io::{Read, Write};
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let refused = |code: &str| -> u64 {
        let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
        let series = format!("clio_relay_errors_total{{side=\"client\",code=\"{code}\"}}");
        series_value(&metrics, &series).unwrap_or(0.0) as u64
    };
    // Each check closes its side first; the relay's close of its own
    // comes after whatever it counts, so the count is final once read.
    let closed_by_the_relay = |tcp: &mut std::net::TcpStream| {
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = vec![];
        match tcp.read_to_end(&mut got) {
            Ok(_) => got,
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                got
            }
        }
    };
    for _ in 0..10 {
        let mut check = std::net::TcpStream::connect(relay.addr()).unwrap();
        assert_eq!(closed_by_the_relay(&mut check), b"");
    }
    assert_eq!((refused("400"), refused("408")), (0, 0));
    // A hello the client cuts short is still a failed handshake.
    let mut half = std::net::TcpStream::connect(relay.addr()).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .unwrap();
    closed_by_the_relay(&mut half);
    assert_eq!((refused("400"), refused("408")), (1, 0));
    // And the port serves.
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            finished |= t.contains("\"finished\":true");
        }
    }
    assert!(finished, "the client's stream finished");
}

/// A ClientHello whose client has shut its side already (a FIN, or a
/// reset) is not answered: such a client can never send the Finished
/// that ends the handshake, and the answer is a signature, the costliest
/// work a peer can ask of a shard (4 ms of RSA-4096). A hello waits for
/// its turn (`turns`), during a flood up to `limits.handshake_timeout`,
/// and a client that gave up meanwhile still had its hello signed in
/// that turn: a flood of hellos each closed once sent took the shard's
/// time for nobody. Here the hello and the FIN come in one segment (the
/// hello corked, the FIN tacked onto it): before, the relay sent its
/// ServerHello flight; now it closes with nothing sent, and the
/// connection counts as a failed handshake (400), as a hello cut short
/// does.
#[test]
fn a_hello_from_a_client_that_has_closed_its_side_is_not_signed() {
    use std::io::{Read, Write};
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    let hello = client_hello();
    for _ in 0..3 {
        let mut tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        socket2::SockRef::from(&tcp).set_cork(true).unwrap();
        tcp.write_all(&hello).unwrap();
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = vec![];
        if let Err(e) = tcp.read_to_end(&mut got) {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        assert_eq!(got.len(), 0, "the relay answered a closed client's hello");
    }
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    let failed = series_value(
        &metrics,
        "clio_relay_errors_total{side=\"client\",code=\"400\"}",
    );
    assert_eq!(failed, Some(3.0), "counted as failed handshakes");
    // A client that stays gets its handshake.
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
}

/// `limits.handshake_timeout` runs from accept to a complete upgrade
/// request, the TLS handshake included: a client that spends part of it
/// on a slow handshake gets only the rest for its request head, not a
/// second whole timeout.
#[test]
fn the_handshake_timeout_counts_the_tls_handshake_too() {
    use std::io::{Read, Write};
    // The trickle below takes about 1 s unhurried; the timeout leaves it
    // five times that, so a loaded machine that stretches the trickle's
    // wake-ups still gets the handshake done in time (2 s, with 1 s of
    // slack, broke the handshake off under load: "broken pipe").
    const TIMEOUT: Duration = Duration::from_secs(5);
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |cfg| cfg.limits.handshake_timeout = TIMEOUT);
    /// Writes one byte at a time, 3 ms apart: the handshake's some 330
    /// bytes take about 1 s.
    struct Trickle(std::net::TcpStream);
    impl Read for Trickle {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write_all(&b[..b.len().min(1)])?;
            std::thread::sleep(Duration::from_millis(3));
            Ok(b.len().min(1))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let start = Instant::now();
    let mut tls = rustls::StreamOwned::new(conn, Trickle(tcp));
    // Until the client's Finished is sent: the relay's handshake is done
    // once it has it.
    let mut done = Ok(());
    while done.is_ok() && tls.conn.is_handshaking() {
        done = tls.conn.complete_io(&mut tls.sock).map(drop);
    }
    let handshake = start.elapsed();
    if let Err(e) = done {
        panic!(
            "the handshake broke off after {handshake:?} ({e}): the trickle took longer \
             than the {TIMEOUT:?} handshake_timeout"
        );
    }
    // Then no request head at all: the 408 comes at TIMEOUT from the
    // accept. Were the timeout to start after the TLS handshake, it would
    // come no sooner than TIMEOUT after the handshake's last byte, sent
    // at `handshake`. However late the relay accepted, the client's
    // Finished (some 200 ms of the trickle) is sent after its answer:
    // counted from the accept, the 408 comes well before that bound.
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    let held = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        held < handshake + TIMEOUT - Duration::from_millis(100),
        "handshake done at {handshake:?}, yet the connection was held {held:?} \
         with a {TIMEOUT:?} handshake_timeout"
    );
}

/// The first flight of a real TLS client (rustls) for "localhost": a
/// ClientHello, as a `wss://` or `https://` client sends it.
fn client_hello() -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello.first(), Some(&0x16), "a handshake record");
    hello
}

/// Sends `bytes` to `addr` and reads the answer to the end.
fn answer_to(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    // A bound for a test that would otherwise hang: past every deadline.
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let read = tcp.read_to_end(&mut got);
    assert!(
        read.is_ok(),
        "{read:?} after {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// A `wss://` client at a client port without `[tls]` (or an `https://`
/// one at the admin port) is refused at its ClientHello with a 400 that
/// says why, not held until the head's deadline and then told 408, as if
/// it were a slow HTTP client: the rest of a ClientHello never ends an
/// HTTP head.
#[test]
fn a_tls_handshake_on_a_plain_port_is_refused_at_once() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.limits.handshake_timeout = Duration::from_secs(2);
    let relay = Relay::start(cfg);
    let hello = client_hello();
    let answer = answer_to(relay.addr(), &hello);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(
        answer.contains("a TLS handshake on a port without TLS"),
        "{answer:?}"
    );
    let answer = answer_to(relay.handle.admin_addr, &hello);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("speaks plain HTTP"), "{answer:?}");
    // Counted as the client's error, and the port still serves.
    let (_, metrics) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    assert!(
        metrics
            .lines()
            .any(|l| l == "clio_relay_errors_total{side=\"client\",code=\"400\"} 1"),
        "{metrics}"
    );
    let (mut ws, _) = connect(relay.addr(), &relay.token("d"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 3));
    assert!(got.finished(), "{got:?}");
}

/// `limits.idle_timeout` counts any byte, of a frame still arriving too:
/// over TLS, of a record still arriving too. A TLS client whose frame
/// comes in one record, its bytes spread over more than the idle timeout,
/// is passing bytes all along and is not idle, as a plain client sending
/// a frame a byte at a time is not.
#[test]
fn a_tls_record_that_arrives_slowly_keeps_its_stream_alive() {
    use std::io::Write;
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |cfg| {
        cfg.limits.idle_timeout = Duration::from_secs(2)
    });
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    // One 3,200-byte audio frame, encrypted as one TLS record, whose bytes
    // go out 32 at a time, 50 ms apart: some 5 s for the record, with a
    // gap of 50 ms between its bytes, never of 2 s.
    let tls = ws.get_mut();
    let audio = audio_frames(1, 7).remove(0);
    let frame = client_frame(2, &audio);
    tls.conn.writer().write_all(&frame).unwrap();
    let mut record = Vec::new();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut record).unwrap();
    }
    assert!(record.len() > frame.len(), "one record: {}", record.len());
    let started = Instant::now();
    let mut cut = None;
    for piece in record.chunks(32) {
        if let Err(e) = tls.sock.write_all(piece) {
            cut = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        cut.is_none(),
        "the relay ended the stream while its record arrived: {cut:?}"
    );
    assert!(started.elapsed() > Duration::from_secs(2));
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut texts = Vec::new();
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            texts.push(t.to_string());
        }
    }
    assert!(
        texts.iter().any(|t| t.contains("\"finished\":true")),
        "the stream was ended while its record arrived: {texts:?}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].audio, audio);
}

/// The TLS handshake of a client that offers `alpn` (none when empty)
/// and trusts `ca_pem`: the protocol agreed, or rustls's error.
fn handshake_offering(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[&str],
) -> Result<Option<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn.alpn_protocol().map(<[u8]>::to_vec))
}

#[test]
fn alpn_offers_as_browsers_and_curl_send_them() {
    // Browsers and curl offer "h2, http/1.1": HTTP/1.1 is agreed. A client
    // that offers none gets none. One that offers h2 alone cannot speak
    // what the port serves: rustls ends the handshake with the
    // no_application_protocol alert (RFC 7301), as README's Errors say.
    let fake = fake(&["k1"], |_| {});
    let (relay, ca) = tls_relay(&fake.url(), |_| {});
    assert_eq!(
        handshake_offering(relay.addr(), &ca, &["h2", "http/1.1"]),
        Ok(Some(b"http/1.1".to_vec()))
    );
    assert_eq!(handshake_offering(relay.addr(), &ca, &[]), Ok(None));
    let refused = handshake_offering(relay.addr(), &ca, &["h2"]).unwrap_err();
    assert!(refused.contains("NoApplicationProtocol"), "{refused}");
    // The port goes on serving.
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let mut finished = false;
    while let Ok(m) = ws.read() {
        if let Message::Text(t) = m {
            finished |= t.contains("\"finished\":true");
        }
    }
    assert!(finished);
}

/// A relay serving TLS with a certificate whose key is RSA-4096, the
/// costliest signature it loads (about 4 ms of a core), signed by a CA
/// made now: the relay and the CA's PEM.
fn rsa4096_relay(
    upstream: &str,
    tweak: impl FnOnce(&mut clio_relay::core::config::Config),
) -> (Relay, String) {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:4096",
        ])
        .arg("-out")
        .arg(&key_path)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "{out:?}");
    let leaf_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    let mut cfg = relay_config(upstream, &[("a", "k1")]);
    cfg.tls = Some(clio_relay::core::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: key_path,
    });
    tweak(&mut cfg);
    (Relay::start(cfg), ca.pem())
}

/// A flood of ClientHellos, each a connect and 500 bytes that ask the
/// shard for a signature (4 ms of RSA-4096), takes the time the shard's
/// live streams leave, not theirs: a stream on the flooded shard has
/// every frame answered, and the shard answers the watchdog's check.
/// Before, every task of the shard waited in one queue behind the hellos
/// accepted before it, and neither came while the flood lasted (with 400
/// hellos a second in a release build, the watchdog's checks went
/// unanswered and every stream ended on its client's timeout).
#[test]
fn a_flood_of_tls_hellos_leaves_a_live_stream_its_time() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let fake = fake(&["k1"], |c| c.echo = true);
    let (relay, ca) = rsa4096_relay(&fake.url(), |c| {
        // Hellos not served in this long are let go: the flood's
        // connections held stay well inside the test's file limit.
        c.limits.handshake_timeout = Duration::from_secs(3);
    });
    let mut ws = wss_connect(relay.addr(), &ca, &relay.token("d")).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let hello = client_hello();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let addr = relay.addr();
    // 1,000 hellos a second, each held open for 1 s once sent (a hello
    // whose client has closed its side is not signed), for at most 30 s.
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u32;
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                n += 1;
                if let Ok(mut tcp) =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                {
                    if tcp.write_all(&hello).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    held.push_back((Instant::now(), tcp));
                }
                while held
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(1))
                {
                    held.pop_front();
                }
                let due = start + Duration::from_millis(u64::from(n));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        })
    };
    assert!(
        wait_until(LIMIT, || sent.load(Ordering::Relaxed) >= 500),
        "the flood is under way"
    );
    // Frames of 100 ms, each answered before the next goes (the client's
    // read waits at most `LIMIT`), the watchdog's check between them.
    let (echoed, ended) = frames_until_ended(&mut ws, 30);
    let alive = relay.handle.alive(LIMIT);
    let flooded = sent.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(
        (echoed, ended),
        (30, None),
        "frames answered on a shard sent {flooded} hellos"
    );
    assert!(alive.is_ok(), "{alive:?}");
    // Once the hellos still queued are served or let go (at most
    // `handshake_timeout` after the flood), new clients are served again.
    let mut ws = None;
    assert!(wait_until(LIMIT * 2, || {
        ws = wss_connect(relay.addr(), &ca, &relay.token("e")).ok();
        ws.is_some()
    }));
    let mut ws = ws.unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    assert_eq!(frames_until_ended(&mut ws, 2), (2, None));
}
