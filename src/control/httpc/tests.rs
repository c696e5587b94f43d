//! The client against real servers on 127.0.0.1 (std threads), in both
//! forms, plus the parser fed at every split.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const TOKEN: &str = "sk-test-4f1d2b7c9e";

/// A server on 127.0.0.1:0 that reads each request (head and
/// `Content-Length` body) and lets `answer` write the reply, given the
/// request text and the connection's number (from 1). Returns its address
/// and the connection count.
fn server(
    answer: impl Fn(&str, usize, &mut TcpStream) + Send + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let request = read_request(&mut conn);
            answer(&request, n, &mut conn);
        }
    });
    (addr, count)
}

fn read_request(conn: &mut impl Read) -> String {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
        data.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; len];
    let _ = conn.read_exact(&mut body);
    head + &String::from_utf8_lossy(&body)
}

/// The three framings, by path: `/length`, `/chunked`, `/close`; `/big` a
/// Content-Length over any small limit, `/echo` the request as the body.
fn framings(request: &str, _: usize, conn: &mut TcpStream) {
    let path = request.split(' ').nth(1).unwrap_or("");
    let reply: Vec<u8> = match path {
        "/length" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
            .to_vec(),
        "/close" => b"HTTP/1.1 200 OK\r\n\r\nuntil the close".to_vec(),
        "/big" => b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec(),
        "/echo" => format!(
            "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n{request}",
            request.len()
        )
        .into_bytes(),
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    };
    let _ = conn.write_all(&reply);
}

fn on_glommio<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move { test().await });
}

/// An address nothing listens on (a port just released).
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn blocking_reads_every_framing() {
    let (addr, _) = server(framings);
    let ep = Endpoint::plain(addr);
    let get = |path| blocking::send(&ep, &Request::get(path), LIMIT);
    assert_eq!(get("/length").unwrap().text(), "hello");
    let chunked = get("/chunked").unwrap();
    assert_eq!(chunked.text(), "hello, world");
    assert_eq!(chunked.header("transfer-encoding"), Some("chunked"));
    assert_eq!(get("/close").unwrap().text(), "until the close");
    assert_eq!(get("/nothing").unwrap().status, 404);
    let echo = blocking::send(
        &ep,
        &Request::post_json("/echo", br#"{"a":1}"#).bearer(TOKEN),
        LIMIT,
    )
    .unwrap();
    assert_eq!(echo.status, 201);
    let sent = echo.text();
    assert!(sent.starts_with("POST /echo HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains(&format!("\r\nHost: {addr}\r\n")), "{sent}");
    assert!(sent.contains("\r\nConnection: close\r\n"), "{sent}");
    assert!(sent.contains("\r\nContent-Length: 7\r\n"), "{sent}");
    assert!(
        sent.contains(&format!("\r\nAuthorization: Bearer {TOKEN}\r\n")),
        "{sent}"
    );
    assert!(sent.ends_with("\r\n\r\n{\"a\":1}"), "{sent}");
}

#[test]
fn glommio_reads_every_framing() {
    let (addr, _) = server(framings);
    on_glommio(move || async move {
        let ep = Endpoint::plain(addr);
        for (path, body) in [
            ("/length", "hello"),
            ("/chunked", "hello, world"),
            ("/close", "until the close"),
        ] {
            let r = client::send(&ep, &Request::get(path), LIMIT).await.unwrap();
            assert_eq!((r.status, r.text().as_str()), (200, body), "{path}");
        }
    });
}

#[test]
fn an_oversized_body_is_refused() {
    let (addr, _) = server(framings);
    let ep = Endpoint::plain(addr);
    // Content-Length over the bound: refused before reading the body.
    let err = blocking::send(&ep, &Request::get("/big").max_body(1000), LIMIT).unwrap_err();
    assert!(matches!(err, Error::TooLarge("body", 1000)), "{err:?}");
    // Chunked and close-delimited bodies are counted as they come.
    for path in ["/chunked", "/close"] {
        let err = blocking::send(&ep, &Request::get(path).max_body(8), LIMIT).unwrap_err();
        assert!(matches!(err, Error::TooLarge("body", 8)), "{path}: {err:?}");
    }
    on_glommio(move || async move {
        let ep = Endpoint::plain(addr);
        let err = client::send(&ep, &Request::get("/big").max_body(1000), LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge("body", 1000)), "{err:?}");
    });
}

#[test]
fn every_address_is_tried_in_turn() {
    let (live, count) = server(framings);
    let dead = dead_addr();
    let ep = Endpoint::plain(live);
    let deadline = Instant::now() + LIMIT;
    let r = blocking::send_to(&[dead, live], &ep, &Request::get("/length"), deadline).unwrap();
    assert_eq!(r.text(), "hello");
    let err =
        blocking::send_to(&[dead, dead], &ep, &Request::get("/length"), deadline).unwrap_err();
    assert!(matches!(err, Error::Connect(2, _)), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    on_glommio(move || async move {
        let ep = Endpoint::plain(live);
        let r = client::send_to(&[dead, live], &ep, &Request::get("/length"), LIMIT)
            .await
            .unwrap();
        assert_eq!(r.text(), "hello");
        let err = client::send_to(&[dead], &ep, &Request::get("/length"), LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect(1, _)), "{err:?}");
    });
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// An address that swallows the handshake (a listener whose one-place
/// queue is full: the kernel drops the SYNs after it) is passed by, the
/// live one tried beside it, in both forms.
#[test]
fn an_address_that_never_answers_is_passed_by() {
    let (live, count) = server(framings);
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hole.listen(0).unwrap();
    let hole = hole.local_addr().unwrap().as_socket().unwrap();
    let _queued = std::net::TcpStream::connect(hole).unwrap();
    let ep = Endpoint::plain(live);
    let deadline = Instant::now() + LIMIT;
    let r = blocking::send_to(&[hole, live], &ep, &Request::get("/length"), deadline).unwrap();
    assert_eq!(r.text(), "hello");
    on_glommio(move || async move {
        let ep = Endpoint::plain(live);
        let r = client::send_to(&[hole, live], &ep, &Request::get("/length"), LIMIT)
            .await
            .unwrap();
        assert_eq!(r.text(), "hello");
        let err = client::send_to(
            &[hole],
            &ep,
            &Request::get("/length"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Timeout), "{err:?}");
    });
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[test]
fn a_host_name_is_resolved() {
    let (addr, _) = server(framings);
    let ep = Endpoint {
        host: "localhost".into(),
        port: addr.port(),
        tls: None,
    };
    // Where localhost also resolves to ::1 (nothing listens there), the
    // address loop moves on to 127.0.0.1.
    let r = blocking::send(&ep, &Request::get("/length"), LIMIT).unwrap();
    assert_eq!(r.text(), "hello");
    on_glommio(move || async move {
        let r = client::send(&ep, &Request::get("/chunked"), LIMIT)
            .await
            .unwrap();
        assert_eq!(r.text(), "hello, world");
    });
}

/// Fails twice (a 503, then a close without an answer), then answers 204.
fn flaky(_: &str, n: usize, conn: &mut TcpStream) {
    match n {
        1 => {
            let _ = conn.write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
        }
        2 => {}
        _ => {
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
        }
    }
}

const QUICK: Retry = Retry {
    attempts: 4,
    first_wait: Duration::from_millis(10),
    total: Duration::from_secs(20),
};

#[test]
fn retries_on_5xx_and_connection_errors_then_succeeds() {
    let (addr, count) = server(flaky);
    on_glommio(move || async move {
        let ep = Endpoint::plain(addr);
        let req = Request::post_json("/hook", b"{}");
        let (r, tries) = client::send_with_retry(&ep, &req, LIMIT, QUICK).await;
        assert_eq!(r.unwrap().status, 204);
        assert_eq!(tries, 3);
    });
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

/// `Retry-After` is delta-seconds or an HTTP-date (RFC 9110 §10.2.3);
/// either, when longer than the backoff, is the wait.
#[test]
fn retry_after_is_seconds_or_a_date() {
    let answer = |value: &str| -> Result<Response, Error> {
        Ok(Response {
            status: 503,
            reason: "Service Unavailable".into(),
            headers: vec![("Retry-After".into(), value.into())],
            body: Vec::new(),
        })
    };
    let policy = Retry::WEBHOOK;
    let backoff = policy.first_wait;
    assert_eq!(policy.wait_after(1, &answer("7")), Duration::from_secs(7));
    let in_100s = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(100));
    let wait = policy.wait_after(1, &answer(&in_100s));
    assert!(
        (Duration::from_secs(95)..=Duration::from_secs(100)).contains(&wait),
        "{in_100s}: {wait:?}"
    );
    let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(100));
    assert_eq!(policy.wait_after(1, &answer(&past)), backoff);
    assert_eq!(policy.wait_after(1, &answer("soon")), backoff);
}

#[test]
fn retries_stop_at_the_attempt_bound_and_skip_4xx() {
    let slow_down = |_: &str, _: usize, conn: &mut TcpStream| {
        let _ = conn.write_all(b"HTTP/1.1 429 Slow Down\r\nContent-Length: 0\r\n\r\n");
    };
    let (busy, busy_count) = server(slow_down);
    let (refusing, refusing_count) = server(|_, _, conn| {
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    // A server of its own for the total bound's one try: that try has
    // 5 ms in all, and may give up before it connects or before this
    // server's thread takes the connection, so whether this server counts
    // it is a race.
    // (Counted on `busy`, it made that count 4 or 5 by the host's load.)
    let (bounded, bounded_count) = server(slow_down);
    on_glommio(move || async move {
        let req = Request::post_json("/hook", b"{}");
        let (r, tries) = client::send_with_retry(&Endpoint::plain(busy), &req, LIMIT, QUICK).await;
        assert_eq!((r.unwrap().status, tries), (429, 4));
        let (r, tries) =
            client::send_with_retry(&Endpoint::plain(refusing), &req, LIMIT, QUICK).await;
        assert_eq!((r.unwrap().status, tries), (400, 1));
        // The total bound: no try starts after it (here: none after the first).
        let once = Retry {
            total: Duration::from_millis(5),
            ..QUICK
        };
        let (_, tries) =
            client::send_with_retry(&Endpoint::plain(bounded), &req, LIMIT, once).await;
        assert_eq!(tries, 1);
    });
    // Each answered try was counted before its answer was written.
    assert_eq!(busy_count.load(Ordering::SeqCst), 4);
    assert_eq!(refusing_count.load(Ordering::SeqCst), 1);
    assert!(bounded_count.load(Ordering::SeqCst) <= 1);
}

#[test]
fn the_deadline_ends_a_silent_server() {
    let (addr, _) = server(|_, _, conn| {
        // Holds the connection open, answering nothing.
        let _ = conn.read(&mut [0u8; 1]);
    });
    let ep = Endpoint::plain(addr);
    let limit = Duration::from_millis(200);
    let err = blocking::send(&ep, &Request::get("/"), limit).unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    on_glommio(move || async move {
        let err = client::send(&ep, &Request::get("/"), limit)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout), "{err:?}");
    });
}

#[test]
fn the_token_is_in_no_error_and_no_debug() {
    let (addr, _) = server(|_, _, conn| {
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n");
    });
    let ep = Endpoint::plain(addr);
    let req = Request::get("/").bearer(TOKEN);
    let errors = [
        blocking::send(&ep, &req, LIMIT).unwrap_err(),
        blocking::send(&Endpoint::plain(dead_addr()), &req, LIMIT).unwrap_err(),
        blocking::send(&ep, &Request::get("/").bearer("a\r\nb"), LIMIT).unwrap_err(),
    ];
    for e in &errors {
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(TOKEN) && !text.contains("a\r\nb"), "{text}");
        }
    }
    let shown = format!("{req:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}

#[test]
fn a_head_that_would_break_is_refused() {
    let ok = write_request("h", &Request::get("/a?b=c").header("X-A", "1")).unwrap();
    assert_eq!(
        String::from_utf8(ok).unwrap(),
        format!(
            "GET /a?b=c HTTP/1.1\r\nHost: h\r\nConnection: close\r\nUser-Agent: clio-relay/{}\r\nX-A: 1\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    for bad in [
        Request::get("/a b"),
        Request::get(""),
        Request::new("G ET", "/"),
        Request::get("/").header("X-A", "1\r\nX-Injected: 1"),
        Request::get("/").header("X A", "1"),
    ] {
        assert!(
            matches!(write_request("h", &bad), Err(Error::Request(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn urls_become_endpoints() {
    let (ep, target) = Endpoint::parse_url("http://127.0.0.1:8080/hooks/a?x=1", None).unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, target.as_str()),
        ("127.0.0.1", 8080, "/hooks/a?x=1")
    );
    assert_eq!(ep.authority(), "127.0.0.1:8080");
    let tls = crate::dataplane::upstream::tls_client_config(None).unwrap();
    let (ep, target) = Endpoint::parse_url("https://[::1]", Some(tls)).unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, target.as_str()),
        ("::1", 443, "/")
    );
    assert_eq!(ep.authority(), "[::1]");
    assert!(Endpoint::parse_url("https://x/", None).is_err());
    assert!(Endpoint::parse_url("ftp://x/", None).is_err());
    assert!(Endpoint::parse_url("http://u:p@x/", None).is_err());
    assert!(Endpoint::parse_url("http://x:99999/", None).is_err());
}

/// Feeds `bytes` split at every point, and byte by byte.
fn parse_all_ways(method: &str, bytes: &[u8], max_body: usize) -> Result<Response, Error> {
    let whole = {
        let mut p = Parser::new(method, max_body);
        p.push(bytes).and_then(|_| p.eof()).and_then(|_| p.finish())
    };
    for at in 0..=bytes.len() {
        let mut p = Parser::new(method, max_body);
        let split = p
            .push(&bytes[..at])
            .and_then(|_| p.push(&bytes[at..]))
            .and_then(|_| p.eof())
            .and_then(|_| p.finish());
        assert_eq!(
            format!("{split:?}"),
            format!("{whole:?}"),
            "split at {at} of {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let mut p = Parser::new(method, max_body);
    let mut r = Ok(());
    for b in bytes {
        r = r.and_then(|_| p.push(std::slice::from_ref(b)));
    }
    let bytewise = r.and_then(|_| p.eof()).and_then(|_| p.finish());
    assert_eq!(format!("{bytewise:?}"), format!("{whole:?}"));
    whole
}

#[test]
fn the_parser_frames_bodies_at_any_split() {
    let body = |raw: &[u8]| parse_all_ways("GET", raw, 100).map(|r| r.text());
    assert_eq!(
        body(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA").unwrap(),
        "abc"
    );
    assert_eq!(
        body(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n")
            .unwrap(),
        "abcd"
    );
    assert_eq!(body(b"HTTP/1.1 200 OK\r\n\r\nabc").unwrap(), "abc");
    assert_eq!(
        body(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap(),
        "ok"
    );
    assert_eq!(body(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(), "");
    let head = parse_all_ways("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 100);
    assert_eq!(head.unwrap().body, b"");
    // What is refused.
    let err = |raw: &[u8]| format!("{:?}", body(raw).unwrap_err());
    assert_eq!(err(b""), "NoAnswer");
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"),
        "Truncated"
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
        "Truncated"
    );
    assert!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").contains("chunk size")
    );
    assert!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n").contains("CRLF")
    );
    assert!(
        err(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
            .contains("conflicting")
    );
    assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\na").contains("Content-Length"));
    assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n").contains("TooLarge"));
    assert!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n").contains("TooLarge")
    );
    assert!(
        err(&[b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &[b'x'; 101]].concat()).contains("TooLarge")
    );
    assert!(err(b"NOT HTTP\r\n\r\n").contains("Malformed"));
    let long_head = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD]].concat();
    let mut p = Parser::new("GET", 100);
    assert!(matches!(
        p.push(&long_head),
        Err(Error::TooLarge("head", _))
    ));
}

/// A TLS server for `localhost` with a CA made now; the client trusts it
/// through `ca_file`, as `upstream.ca_file` does.
#[test]
fn https_with_the_upstream_tls_setup() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let ca_file = std::env::temp_dir().join(format!("clio-httpc-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { return };
            let conn = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let _ = read_request(&mut tls);
            let _ = tls.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecure\r\n0\r\n\r\n",
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    let tls = crate::dataplane::upstream::tls_client_config(Some(&ca_file)).unwrap();
    let _ = std::fs::remove_file(&ca_file);
    let ep = Endpoint {
        host: "localhost".into(),
        port: tls_addr.port(),
        tls: Some(tls),
    };
    let r = blocking::send(&ep, &Request::get("/v1/models").bearer(TOKEN), LIMIT).unwrap();
    assert_eq!(r.text(), "secure");
    let untrusted = Endpoint {
        tls: Some(crate::dataplane::upstream::tls_client_config(None).unwrap()),
        ..ep.clone()
    };
    on_glommio(move || async move {
        let r = client::send(&ep, &Request::get("/v1/models").bearer(TOKEN), LIMIT)
            .await
            .unwrap();
        assert_eq!(r.text(), "secure");
        // Without the CA the certificate is refused, and not retried.
        let err = client::send(&untrusted, &Request::get("/").bearer(TOKEN), LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err:?}");
        assert!(!err.is_transient());
        assert!(!err.to_string().contains(TOKEN));
    });
}

/// A server that answers 413 after the head and closes without reading the
/// body: the client's write fails, and the answer is still read.
#[test]
fn an_answer_before_the_whole_request_is_read() {
    let addr = server_head_only();
    let big = vec![b'x'; 8 << 20];
    let ep = Endpoint::plain(addr);
    let r = blocking::send(&ep, &Request::post_json("/up", &big), LIMIT).unwrap();
    assert_eq!(r.status, 413);
    on_glommio(move || async move {
        let big = vec![b'x'; 8 << 20];
        let r = client::send(&ep, &Request::post_json("/up", &big), LIMIT)
            .await
            .unwrap();
        assert_eq!(r.status, 413);
    });
}

/// Reads each request's head only, answers 413 and closes.
fn server_head_only() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = conn.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n");
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
    });
    addr
}

/// A `Retry-After` longer than any clock can add (a server's bug or its
/// malice: `18446744073709551615` seconds, or a date in the year 9999)
/// ends the retries, as any wait past the total bound does. Before, the
/// sum of now and the wait overflowed the monotonic clock: the thread
/// that sent (the admin thread, for a webhook) panicked.
#[test]
fn a_retry_after_past_any_clock_ends_the_retries() {
    for value in ["18446744073709551615", "Fri, 31 Dec 9999 23:59:59 GMT"] {
        let (addr, count) = server(move |_, _, conn| {
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 429 Slow Down\r\nRetry-After: {value}\r\nContent-Length: 0\r\n\r\n"
                )
                .as_bytes(),
            );
        });
        on_glommio(move || async move {
            let req = Request::post_json("/hook", b"{}");
            let (r, tries) =
                client::send_with_retry(&Endpoint::plain(addr), &req, LIMIT, QUICK).await;
            assert_eq!((r.unwrap().status, tries), (429, 1), "{value}");
        });
        assert_eq!(count.load(Ordering::SeqCst), 1, "{value}");
    }
}
