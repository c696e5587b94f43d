//! A wrong `upstream.url` (upstream answers the upgrade with 404, 400, a
//! web page or a redirect) is a configuration fault, not an account or
//! capacity problem.

use std::time::Duration;

use crate::util::*;

fn metric(relay: &Relay, name: &str) -> Option<String> {
    let (_, body) = http(relay.handle.admin_addr, "GET", "/metrics", None, None);
    body.lines()
        .find(|l| l.starts_with(name))
        .map(|l| l.to_string())
}

fn readyz(relay: &Relay) -> (u16, String) {
    let (status, body) = http(relay.handle.admin_addr, "GET", "/readyz", None, None);
    (status, body)
}

/// The fake's URL without its path: the mistake an operator makes.
fn without_path(url: &str) -> String {
    url.trim_end_matches("/transcribe-websocket").to_string()
}

#[test]
fn a_wrong_upstream_path_fails_streams_with_a_502_that_says_so() {
    let fake = fake(&["k1", "k2"], |_| {});
    let relay = Relay::start(relay_config(
        &without_path(&fake.url()),
        &[("a", "k1"), ("b", "k2")],
    ));
    let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert_error_frame(&got, 502, 1011);
    let message = got.messages[0]["error_message"].as_str().unwrap();
    assert!(
        message.contains("HTTP 404") && message.contains("not a capacity limit"),
        "{message}"
    );
    // One upgrade was tried, not one per account, and no account is blamed.
    let refused: Vec<_> = fake.sessions().iter().map(|s| s.http_status).collect();
    assert_eq!(refused, vec![Some(404)]);
    assert!(no_account_blamed(&relay));
    // /readyz and the metric name it.
    let (status, body) = readyz(&relay);
    assert_eq!(status, 503);
    assert!(
        body.contains("HTTP 404") && body.contains("upstream.url"),
        "{body}"
    );
    assert_eq!(
        metric(&relay, "clio_relay_upstream_config_fault ").as_deref(),
        Some("clio_relay_upstream_config_fault 404")
    );
    assert!(
        metric(
            &relay,
            "clio_relay_errors_total{side=\"upstream\",code=\"404\"}"
        )
        .is_some(),
        "counted as upstream's 404, not as a 429"
    );
}

#[test]
fn the_health_check_finds_a_wrong_upstream_url_before_any_stream() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&without_path(&fake.url()), &[("a", "k1")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    cfg.usage.alerts.interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    assert!(
        wait_until(Duration::from_secs(10), || readyz(&relay).0 == 503
            && metric(
                &relay,
                "clio_relay_alerts_firing{alert=\"upstream_config_fault\""
            )
            .is_some_and(|l| l.ends_with(" 1"))),
        "{:?}",
        readyz(&relay)
    );
    assert!(readyz(&relay).1.contains("upstream.url"));
    // The probe carried no key.
    assert!(fake.sessions().iter().all(|s| s.key.is_none()));

    // With the right URL the same probe finds nothing wrong.
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    cfg.admin.health_interval = Duration::from_millis(100);
    let good = Relay::start(cfg);
    let before = fake.sessions().len();
    assert!(wait_until(Duration::from_secs(10), || fake
        .sessions()
        .len()
        > before
        && readyz(&good).0 == 200));
    assert_eq!(
        metric(&good, "clio_relay_upstream_config_fault ").as_deref(),
        Some("clio_relay_upstream_config_fault 0")
    );
}

/// A plain HTTP server that answers every request with `head` (a status
/// line and headers), as a web server or a redirect at the wrong URL does.
fn http_answering(head: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(head.as_bytes());
            });
        }
    });
    addr
}

#[test]
fn an_upgrade_answered_by_a_web_page_or_a_redirect_is_a_configuration_fault() {
    for (status, head, says) in [
        (
            200,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "scheme, host and path",
        ),
        (
            301,
            "HTTP/1.1 301 Moved Permanently\r\nLocation: wss://elsewhere/\r\nContent-Length: 0\r\n\r\n",
            "redirect",
        ),
    ] {
        let addr = http_answering(head);
        let relay = Relay::start(relay_config(
            &format!("ws://{addr}/transcribe-websocket"),
            &[("a", "k1"), ("b", "k2")],
        ));
        let (mut ws, _) = connect(relay.addr(), &relay.token("phone"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        // Not "no account can take another stream, try again later".
        assert_error_frame(&got, 502, 1011);
        let message = got.messages[0]["error_message"].as_str().unwrap();
        assert!(message.contains(&format!("HTTP {status}")), "{message}");
        assert!(no_account_blamed(&relay));
        let (code, body) = readyz(&relay);
        assert_eq!(code, 503, "{body}");
        assert!(body.contains(says), "{body}");
        assert_eq!(
            metric(&relay, "clio_relay_upstream_config_fault ").as_deref(),
            Some(format!("clio_relay_upstream_config_fault {status}").as_str())
        );
    }
}
