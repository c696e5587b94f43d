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
