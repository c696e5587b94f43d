//! Where the session token may come from, and what a bad one gets.

use crate::util::*;

fn streams_with(via: Via) {
    let fake = fake(&["key-a"], |c| c.forbidden = vec![]);
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("device-1");
    let (mut ws, resp) = connect(relay.addr(), &token, via).expect("upgrade accepted");
    if matches!(via, Via::Subprotocol) {
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            "soniox-api-key"
        );
    }
    let first = config_message(matches!(via, Via::FirstMessage).then_some(token.as_str()));
    let got = stream_session(&mut ws, &first, &audio_frames(20, 1));
    assert!(got.finished(), "{via:?}: {got:?}");
    assert!(!got.text().is_empty());
    assert_eq!(got.close_code(), Some(1000));
    // Both close handshakes completed: the client's close reply reached upstream.
    assert!(
        fake.wait_for(std::time::Duration::from_secs(10), |s| s.len() == 1
            && s[0].closed)
    );
    let s = &fake.sessions()[0];
    assert_eq!(s.client_close_code, Some(1000), "{via:?}");
    // The key went upstream in the header; the token never did.
    assert_eq!(s.key.as_deref(), Some("key-a"));
    assert_eq!(s.auth_via, Some(fake_soniox::AuthVia::Header));
    let seen = format!(
        "{:?} {:?} {:?}",
        s.request_path, s.request_headers, s.text_messages
    );
    assert!(
        !seen.contains(&token),
        "{via:?}: the session token reached upstream"
    );
    assert!(s.config.as_ref().unwrap().get("api_key").is_none());
}

#[test]
fn token_in_authorization_header() {
    streams_with(Via::Header);
}

#[test]
fn token_in_subprotocol() {
    streams_with(Via::Subprotocol);
}

#[test]
fn token_in_query() {
    streams_with(Via::Query);
}

#[test]
fn token_as_api_key_in_first_message() {
    streams_with(Via::FirstMessage);
}

/// A token is checked when its stream opens: the stream outlives the
/// token's expiry (and ends as usual), while a new stream with the same
/// token is refused from then on.
#[test]
fn a_stream_outlives_its_tokens_expiry() {
    use std::time::{Duration, SystemTime};
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let unix_now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // Valid for 5 s, whole seconds: time to open the stream on a slow,
    // loaded host (a token of 1 s, minted late in its second, had
    // expired before its own upgrade got there, which was then refused).
    let issued = unix_now();
    let expires = issued + 5;
    let token = clio_relay::core::token::TokenKeys::from_config(&relay.cfg.tokens)
        .mint_exact("device-1", None, issued, expires, "outlived-1")
        .unwrap();
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).expect("upgrade accepted");
    ws.send(tungstenite::Message::text(config_message(None)))
        .unwrap();
    let frames = audio_frames(20, 1);
    for f in &frames[..10] {
        ws.send(tungstenite::Message::binary(f.clone())).unwrap();
    }
    // Past the token's expiry (the relay refuses at now >= exp).
    while unix_now() < expires {
        std::thread::sleep(Duration::from_millis(100));
    }
    match connect(relay.addr(), &token, Via::Header) {
        Err(tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]));
            assert_eq!(response.status(), 401, "{body}");
            assert!(body.contains("expired"), "{body}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an expired token opened a new stream"),
    }
    for f in &frames[10..] {
        ws.send(tungstenite::Message::binary(f.clone())).unwrap();
    }
    ws.send(tungstenite::Message::binary(Vec::<u8>::new()))
        .unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert!(!got.text().is_empty());
    assert_eq!(got.close_code(), Some(1000));
}

/// A token that lives longer than `tokens.max_ttl` (its expiry minus its
/// issue time: a backend that mints its own tokens may write any) is
/// refused, 401 saying why, on the upgrade and as `api_key`; one of
/// exactly `max_ttl` streams. (Only `mint-token` kept to `max_ttl`: a
/// token of any lifetime was taken, so nothing bounded how long a token
/// id, once revoked, could still be presented.)
#[test]
fn a_token_that_lives_longer_than_max_ttl_is_refused() {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.tokens.max_ttl = Duration::from_secs(3600);
    let relay = Relay::start(cfg);
    let keys = clio_relay::core::token::TokenKeys::from_config(&relay.cfg.tokens);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lasting = |secs: u64| {
        keys.mint_exact("device-1", None, now, now + secs, "0123456789abcdef")
            .unwrap()
    };
    let (status, body) = refused_upgrade(connect(relay.addr(), &lasting(3601), Via::Header));
    assert_eq!(status, 401, "{body}");
    assert!(
        body.to_string()
            .contains("lifetime (expiry minus issue time) longer than tokens.max_ttl"),
        "{body}"
    );
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    ws.send(tungstenite::Message::text(config_message(Some(&lasting(
        3601,
    )))))
    .unwrap();
    let got = read_all(&mut ws);
    assert_error_frame(&got, 401, 1008);
    assert!(
        fake.sessions().is_empty(),
        "a refused token reached upstream"
    );
    let (mut ws, _) = connect(relay.addr(), &lasting(3600), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert!(got.finished(), "{got:?}");
}

/// A request may carry a token in more than one place: the relay reads
/// one, the header's, else the subprotocol's, else the query's, and
/// never looks at the others. So a bad token in the place read is
/// refused (401) whatever the others hold, and a good one there opens
/// the stream whatever they hold, as README's "The client protocol" says.
#[test]
fn a_request_with_tokens_in_several_places_is_judged_by_one() {
    use std::io::{Read, Write};
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let good = relay.token("device-several");
    let bad = "not-a-token-at-all";
    // The status of an upgrade carrying `header`, `subprotocol` and
    // `query` tokens (empty: none there).
    let status = |header: &str, subprotocol: &str, query: &str| {
        let mut tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let mut head = String::from("GET /v1/transcribe");
        if !query.is_empty() {
            head.push_str(&format!("?token={query}"));
        }
        head.push_str(" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n");
        if !header.is_empty() {
            head.push_str(&format!("Authorization: Bearer {header}\r\n"));
        }
        if !subprotocol.is_empty() {
            head.push_str(&format!(
                "Sec-WebSocket-Protocol: soniox-api-key, {subprotocol}\r\n"
            ));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).unwrap();
        let mut answer = [0u8; 12];
        tcp.read_exact(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[9..12]).into_owned()
    };
    let cases = [
        // (header, subprotocol, query, status)
        (bad, "", good.as_str(), "401"),
        (good.as_str(), "", bad, "101"),
        (bad, good.as_str(), "", "401"),
        (good.as_str(), bad, "", "101"),
        ("", bad, good.as_str(), "401"),
        ("", good.as_str(), bad, "101"),
        (bad, good.as_str(), good.as_str(), "401"),
    ];
    for (header, subprotocol, query, want) in cases {
        let what = |t: &str| match t {
            "" => "none",
            t if t == bad => "bad",
            _ => "good",
        };
        assert_eq!(
            status(header, subprotocol, query),
            want,
            "header {}, subprotocol {}, query {}",
            what(header),
            what(subprotocol),
            what(query)
        );
    }
}

/// A token signed with the relay's own secret whose id (`t`) is not one
/// a revocation can name (`POST /admin/revocations` takes 1 to 128 of
/// `A-Z a-z 0-9 . _ : @ -`, "an id no token can carry" otherwise) is
/// refused as such: 401 before the upgrade when it comes on the request,
/// a 401 frame and close 1008 when it comes as `api_key`. Before, the
/// relay took it, and its streams could be revoked only with its whole
/// device; the minters (`mint-token`, `mint.py`, `mint.js`) never make one.
#[test]
fn a_token_whose_id_no_revocation_can_name_is_refused() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use clio_relay::core::token::key_id;
    use ring::hmac;
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let secret = &relay.cfg.tokens.secret;
    let sign = |token_id: &serde_json::Value| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({"d": "device-id", "i": now, "e": now + 600, "t": token_id});
        let signed = format!(
            "clio1.{}.{}",
            key_id(secret),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
        let sig = hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    };
    let why =
        "session token refused: invalid token id (1 to 128 characters of A-Z a-z 0-9 . _ : @ -)";
    for id in ["", "a b", "line\nbreak", "é", &"x".repeat(129)] {
        let token = sign(&serde_json::json!(id));
        let (status, body) = refused_upgrade(connect(relay.addr(), &token, Via::Header));
        assert_eq!(status, 401, "{id:?}: {body}");
        assert_eq!(body["error_message"], why, "{id:?}");
        let (mut ws, _) = connect(relay.addr(), "", Via::Nowhere).unwrap();
        let got = stream_session(&mut ws, &config_message(Some(&token)), &[]);
        assert_error_frame(&got, 401, 1008);
        assert!(
            got.messages[0]["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid token id")),
            "{id:?}: {got:?}"
        );
    }
    assert!(
        fake.sessions().is_empty(),
        "a refused token reached upstream"
    );
    // The longest id a revocation takes, and every character it takes,
    // are a token's.
    let longest = "x".repeat(128);
    for id in ["0123456789abcdef", "A-Z.a_z:0@9", longest.as_str()] {
        let (mut ws, _) = connect(relay.addr(), &sign(&serde_json::json!(id)), Via::Header)
            .unwrap_or_else(|e| panic!("{id:?}: {e:?}"));
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        assert!(got.finished(), "{id:?}: {got:?}");
    }
}

/// A client that offers the `soniox-api-key` subprotocol gets it named in
/// the 101 wherever the relay read its token from: a client that offered
/// subprotocols fails the handshake on a 101 naming none (tungstenite,
/// Node's `ws`: "Server sent no subprotocol"), as Soniox never makes it
/// do. Before, the relay named it only when it took the token from the
/// list, so a client with the token in its `Authorization` header as
/// well, or the marker alone and the token in the query, was refused by
/// its own WebSocket library on a good token.
#[test]
fn an_offered_soniox_api_key_subprotocol_is_named_wherever_the_token_is() {
    use tungstenite::client::IntoClientRequest;
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let token = relay.token("device-offers");
    // (URL, Authorization, Sec-WebSocket-Protocol)
    let cases = [
        (
            format!("ws://{}/v1/transcribe", relay.addr()),
            Some(format!("Bearer {token}")),
            format!("soniox-api-key, {token}"),
        ),
        (
            format!("ws://{}/v1/transcribe?token={token}", relay.addr()),
            None,
            "soniox-api-key".to_string(),
        ),
    ];
    for (i, (url, auth, protocols)) in cases.into_iter().enumerate() {
        let mut req = url.into_client_request().unwrap();
        if let Some(a) = auth {
            req.headers_mut()
                .insert("Authorization", a.parse().unwrap());
        }
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
        let tcp = std::net::TcpStream::connect(relay.addr()).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let (mut ws, resp) = match tungstenite::client::client(req, tcp) {
            Ok(x) => x,
            Err(e) => panic!("case {i}: the client refused the relay's 101: {e}"),
        };
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            "soniox-api-key",
            "case {i}"
        );
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(5, 1));
        assert!(got.finished(), "case {i}: {got:?}");
    }
}
