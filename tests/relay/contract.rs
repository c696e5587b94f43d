//! Probes of the client contract with the unusual but legal: a config in
//! fragments, pings where a client may put them, a close with no code,
//! finalizes in a row, a device at its limit reconnecting at once.

use std::io::Write;
use std::time::Duration;

use clio_relay::core::config::DeviceLimits;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

use crate::streaming::{closed_sessions, relay_for};
use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A text data frame of a fragmented message, its FIN bit as given.
fn text_fragment(payload: &[u8], first: bool, fin: bool) -> Message {
    let op = OpCode::Data(if first { Data::Text } else { Data::Continue });
    Message::Frame(Frame::message(payload.to_vec(), op, fin))
}

#[test]
fn a_config_in_fragments_with_a_ping_between_opens_the_stream() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let config = config_message(None);
    let b = config.as_bytes();
    ws.send(text_fragment(&b[..10], true, false)).unwrap();
    ws.send(Message::Ping(b"between".to_vec().into())).unwrap();
    ws.send(text_fragment(&b[10..30], false, false)).unwrap();
    ws.send(text_fragment(&b[30..], false, true)).unwrap();
    let frames = audio_frames(5, 1);
    for f in &frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio, frames.concat());
    let cfg = s.config.as_ref().expect("upstream got the config");
    assert_eq!(cfg["x_unknown_field"]["kept"][2], 3, "{cfg}");
}

#[test]
fn a_ping_before_the_config_is_answered_and_the_stream_opens() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::Ping(b"early".to_vec().into())).unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"early"),
        m => panic!("expected a pong, got {m:?}"),
    }
    let frames = audio_frames(3, 2);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(closed_sessions(&fake, 1)[0].audio, frames.concat());
}

#[test]
fn a_huge_legal_config_reaches_upstream_whole() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let context = "word ".repeat(4000);
    let mut v: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    v["context"] = serde_json::json!({ "text": context });
    v["client_reference_id"] = serde_json::Value::String("r".repeat(256));
    v["x_pad"] = serde_json::Value::String("p".repeat(30_000));
    let text = v.to_string();
    assert!(text.len() > 50_000);
    let got = stream_session(&mut ws, &text, &audio_frames(2, 3));
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.config.as_ref().unwrap(), &v);
}

#[test]
fn pings_while_waiting_for_finished_do_not_disturb_the_end() {
    let fake = fake(&["key-a"], |c| {
        c.faults.finish_delay = Duration::from_millis(800)
    });
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 4) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    for i in 0..5u8 {
        ws.send(Message::Ping(vec![i].into())).unwrap();
    }
    let mut pongs = Vec::new();
    let mut finished = false;
    let close = loop {
        match ws.read() {
            Ok(Message::Pong(p)) => pongs.push(p.to_vec()),
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert!(v.get("error_code").is_none(), "{v}");
                finished |= v["finished"] == true;
            }
            Ok(Message::Close(c)) => break c,
            Ok(_) => {}
            Err(e) => panic!("connection ended: {e}"),
        }
    };
    assert!(finished);
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000));
    // Pings mid-stream pass through: their pongs are upstream's, and the
    // fake, like a server done reading, answers none after the end of
    // audio. None comes from anywhere else, and none out of order.
    assert!(pongs.windows(2).all(|w| w[0] < w[1]), "{pongs:?}");
}

#[test]
fn a_ping_flood_mid_stream_loses_no_audio() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(20, 6);
    for (i, f) in frames.iter().enumerate() {
        for _ in 0..100 {
            ws.send(Message::Ping(vec![i as u8; 125].into())).unwrap();
        }
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000));
    assert_eq!(closed_sessions(&fake, 1)[0].audio, frames.concat());
}

#[test]
fn two_finalizes_in_a_row_are_each_answered() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(10, 7) {
        ws.send(Message::binary(f)).unwrap();
    }
    let fin = r#"{"type":"finalize"}"#;
    ws.send(Message::text(fin)).unwrap();
    ws.send(Message::text(fin)).unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    let fins = got
        .messages
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["text"] == "<fin>")
        .count();
    assert_eq!(fins, 2, "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(&s.text_messages[1..], &[fin.to_string(), fin.to_string()]);
}

#[test]
fn a_close_with_no_code_mid_stream_is_answered_and_reaches_upstream() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let frames = audio_frames(3, 8);
    for f in &frames {
        ws.send(Message::binary(f.clone())).unwrap();
    }
    ws.close(None).unwrap();
    let mut close = None;
    loop {
        match ws.read() {
            Ok(Message::Close(c)) => close = Some(c),
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert!(v.get("error_code").is_none(), "{v}");
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("not a clean close: {e} (close {close:?})"),
        }
    }
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio, frames.concat());
}

/// fake-soniox and a relay whose devices may have one stream at a time.
fn one_stream_a_device() -> (fake_soniox::FakeSoniox, Relay) {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 1,
        ..Default::default()
    };
    let relay = Relay::start(cfg);
    (fake, relay)
}

#[test]
fn a_device_at_its_limit_reconnects_at_once_after_its_stream_ends() {
    let (_fake, relay) = one_stream_a_device();
    let token = relay.token("one");
    for round in 0..20 {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, round));
        assert_eq!(got.error_code(), None, "round {round}: {got:?}");
        assert!(got.finished(), "round {round}: {got:?}");
    }
}

#[test]
fn a_device_at_its_limit_reconnects_at_once_after_it_closes_mid_stream() {
    let (fake, relay) = one_stream_a_device();
    let token = relay.token("one");
    for round in 0..10 {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        ws.send(Message::binary(audio_frames(1, round)[0].clone()))
            .unwrap();
        // Wait for the stream to be open upstream, then close it.
        assert!(fake.wait_for(LIMIT, |s| s.len() == round as usize + 1
            && s[round as usize].audio_frames == 1));
        ws.close(None).unwrap();
        let got = read_all(&mut ws);
        assert_eq!(got.error_code(), None, "round {round}: {got:?}");
    }
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 99));
    assert!(got.finished(), "{got:?}");
}

#[test]
fn text_frames_after_the_config_reach_upstream_unread() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::text("not json, audio as text")).unwrap();
    let got = read_all(&mut ws);
    // Soniox's own answer, passed through.
    assert_eq!(got.error_code(), Some(400), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.text_messages[1], "not json, audio as text");
}

#[test]
fn a_large_config_in_fragments_with_its_token_opens_the_stream() {
    // A 50 KB config (over the 32 KiB read buffer) in three fragments, the
    // middle one alone larger than the buffer, its token as `api_key`.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&config_message(Some(&relay.token("dev")))).unwrap();
    v["x_pad"] = serde_json::Value::String("p".repeat(50_000));
    let text = v.to_string();
    let b = text.as_bytes();
    ws.send(text_fragment(&b[..5_000], true, false)).unwrap();
    ws.send(text_fragment(&b[5_000..45_000], false, false))
        .unwrap();
    ws.send(text_fragment(&b[45_000..], false, true)).unwrap();
    let got = stream_session(&mut ws, r#"{"type":"keepalive"}"#, &audio_frames(2, 9));
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    let cfg = closed_sessions(&fake, 1)[0].config.clone().unwrap();
    assert!(cfg.get("api_key").is_none(), "the token went upstream");
    assert_eq!(cfg["x_pad"], v["x_pad"]);
}

#[test]
fn a_config_whose_fragments_pass_the_limit_gets_400_and_1009() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.max_first_message_bytes = 4096;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let piece = vec![b' '; 1500];
    ws.send(text_fragment(b"{", true, false)).unwrap();
    for _ in 0..3 {
        ws.send(text_fragment(&piece, false, false)).unwrap();
    }
    let _ = ws.send(text_fragment(b"}", false, true));
    let got = read_all(&mut ws);
    assert_error_frame(&got, 400, 1009);
    assert!(fake.sessions().iter().all(|s| s.config.is_none()));
}

#[test]
fn a_binary_frame_inside_a_fragmented_config_gets_400_and_1002() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let config = config_message(None);
    let b = config.as_bytes();
    ws.send(text_fragment(&b[..10], true, false)).unwrap();
    ws.send(Message::binary(audio_frames(1, 1)[0].clone()))
        .unwrap();
    let _ = ws.send(text_fragment(&b[10..], false, true));
    let got = read_all(&mut ws);
    assert_error_frame(&got, 400, 1002);
    assert!(fake.sessions().iter().all(|s| s.config.is_none()));
}

#[test]
fn a_config_in_one_frame_over_its_limit_gets_400_and_1009() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.max_first_message_bytes = 4096;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    v["x_pad"] = serde_json::Value::String("p".repeat(5000));
    let _ = ws.send(Message::text(v.to_string()));
    let got = read_all(&mut ws);
    assert_error_frame(&got, 400, 1009);
    assert!(fake.sessions().iter().all(|s| s.config.is_none()));
}

#[test]
fn a_token_on_the_request_and_another_as_api_key_sends_neither_upstream() {
    // Soniox refuses a key in both places; the relay takes the request's
    // token and removes `api_key`, whatever it holds.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let token = relay.token("dev");
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(
        &mut ws,
        &config_message(Some("not-a-token-at-all")),
        &audio_frames(2, 10),
    );
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    let cfg = s.config.as_ref().unwrap();
    assert!(cfg.get("api_key").is_none(), "{cfg}");
    assert_eq!(s.key.as_deref(), Some("key-a"));
    assert!(!s.text_messages[0].contains(&token));
}

#[test]
fn a_close_with_no_code_before_the_config_is_answered_cleanly() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.close(None).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(!got.abrupt, "{got:?}");
    assert!(relay.wait_idle(LIMIT));
    // The relay goes on taking streams.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(1, 11));
    assert!(got.finished(), "{got:?}");
}

#[test]
fn a_device_at_its_limit_is_refused_while_its_stream_ends_then_taken() {
    let fake = fake(&["key-a"], |c| {
        c.faults.finish_delay = Duration::from_millis(700)
    });
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.devices.default = DeviceLimits {
        max_concurrent_streams: 1,
        ..Default::default()
    };
    let relay = Relay::start(cfg);
    let token = relay.token("one");
    let (mut a, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    a.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(3, 12) {
        a.send(Message::binary(f)).unwrap();
    }
    a.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].empty_frame_received));
    // A is ending (upstream owes `finished`): still a live stream.
    let (mut b, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let refused = stream_session(&mut b, &config_message(None), &[]);
    assert_error_frame(&refused, 429, 1013);
    let msg = refused.messages[0]["error_message"].as_str().unwrap();
    assert!(msg.contains("1 concurrent stream"), "{msg}");
    // A ends untouched, and its device's place is free at once.
    let got = read_all(&mut a);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000));
    let (mut c, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let got = stream_session(&mut c, &config_message(None), &audio_frames(1, 13));
    assert!(got.finished(), "{got:?}");
}

#[test]
fn a_client_that_closes_as_soon_as_finished_comes_gets_a_clean_close() {
    // What the SDKs do: on `finished`, close the socket themselves, so the
    // client's close crosses upstream's on the way.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    for round in 0..10u8 {
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        ws.send(Message::text(config_message(None))).unwrap();
        for f in audio_frames(2, round) {
            ws.send(Message::binary(f)).unwrap();
        }
        ws.send(Message::binary(Vec::<u8>::new())).unwrap();
        loop {
            match ws.read().expect("finished comes before any close") {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert!(v.get("error_code").is_none(), "round {round}: {v}");
                    if v["finished"] == true {
                        break;
                    }
                }
                Message::Close(c) => panic!("round {round}: closed before finished: {c:?}"),
                _ => {}
            }
        }
        ws.close(Some(normal_close())).unwrap();
        let got = read_all(&mut ws);
        assert_eq!(got.error_code(), None, "round {round}: {got:?}");
        assert!(!got.abrupt, "round {round}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "round {round}: {got:?}");
    }
    assert!(relay.wait_idle(LIMIT));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn a_config_in_fragments_gets_the_account_key_in_config_auth() {
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.upstream.auth = clio_relay::core::config::AuthMode::Config;
    let relay = Relay::start(cfg);
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    let config = config_message(Some(&relay.token("dev")));
    let b = config.as_bytes();
    let half = b.len() / 2;
    ws.send(text_fragment(&b[..half], true, false)).unwrap();
    ws.send(text_fragment(&b[half..], false, true)).unwrap();
    let got = stream_session(&mut ws, r#"{"type":"keepalive"}"#, &audio_frames(2, 14));
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.key.as_deref(), Some("key-a"));
    let up = s.config.as_ref().unwrap();
    assert_eq!(up["api_key"], "key-a");
    assert_eq!(up["x_unknown_field"]["kept"][0], 1);
    assert!(
        !format!("{got:?}").contains("key-a"),
        "the client saw the key"
    );
}

#[test]
fn a_config_fragment_past_the_limit_is_refused_before_it_is_read() {
    // A second fragment whose header alone says the config passes the
    // limit: refused on its header (1009), not waited for (the client
    // never sends its payload; waiting would end in 408 much later).
    let fake = fake(&["key-a"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.limits.max_first_message_bytes = 40_000;
    cfg.limits.idle_timeout = Duration::from_secs(8);
    let relay = Relay::start(cfg);
    let (mut tcp, _) = raw_upgrade(relay.addr(), &relay.token("dev"));
    let mask = Some([1, 2, 3, 4]);
    let mut bytes = raw_frame(0x01, mask, &[b' '; 30_000]); // text, not FIN
    let second = raw_frame(0x80, mask, &[b' '; 35_000]); // continuation, FIN
    bytes.extend_from_slice(&second[..100]);
    tcp.write_all(&bytes).unwrap();
    let frames = raw_read_frames(&mut tcp);
    let texts = raw_texts(&frames);
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["error_code"], 400, "{texts:?}");
    assert_eq!(raw_close_code(&frames), Some(1009), "{texts:?}");
}

#[test]
fn a_close_before_the_config_while_upstream_opens_gives_everything_back() {
    // With the token on the request, upstream opens while the config is
    // awaited; a client that closes then leaves no account place taken
    // and no upstream connection open.
    let fake = fake(&["key-a"], |c| {
        c.faults.handshake_delay = Duration::from_millis(600)
    });
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    assert!(wait_until(LIMIT, || relay.account_live(0) == 1));
    ws.close(None).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), None, "{got:?}");
    assert!(wait_until(LIMIT, || relay.account_live(0) == 0));
    assert!(relay.wait_idle(LIMIT));
    assert!(
        fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed && r.config.is_none())),
        "{:?}",
        fake.sessions()
    );
}
