//! The frame path end to end.

use std::time::Duration;

use serde_json::Value;
use tungstenite::Message;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A relay with one account, `acct-a` with `key-a`, in front of `fake`.
pub(crate) fn relay_for(fake: &fake_soniox::FakeSoniox) -> Relay {
    Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]))
}

/// Waits until the fake saw `n` sessions, all closed, and returns them.
pub(crate) fn closed_sessions(
    fake: &fake_soniox::FakeSoniox,
    n: usize,
) -> Vec<fake_soniox::SessionRecord> {
    assert!(
        fake.wait_for(LIMIT, |s| s.len() == n && s.iter().all(|r| r.closed)),
        "fake sessions: {:?}",
        fake.sessions()
    );
    fake.sessions()
}

#[test]
fn audio_and_control_messages_arrive_byte_for_byte_in_order() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(50, 3);
    let keepalive = r#"{"type":"keepalive"}"#;
    ws.send(Message::text(config_message(None))).unwrap();
    for (i, f) in frames.iter().enumerate() {
        ws.send(Message::binary(f.clone())).unwrap();
        if i == 24 {
            ws.send(Message::text(keepalive)).unwrap();
        }
    }
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000));
    assert_eq!(got.error_code(), None, "{got:?}");

    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 50);
    assert_eq!(s.audio, frames.concat(), "audio differs upstream");
    assert_eq!(s.audio_bytes, frames.concat().len() as u64);
    assert_eq!(s.text_messages.len(), 2, "{:?}", s.text_messages);
    assert_eq!(s.text_messages[1], keepalive);
    assert!(s.empty_frame_received);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[test]
fn only_the_first_message_is_read_later_ones_go_up_as_sent() {
    // README: the relay removes `api_key` from the config message only; a
    // second config (a token in it too) is a later message like any other:
    // it reaches upstream byte for byte, and upstream's answer (the fake's,
    // as Soniox's: 400, not a control message) reaches the client.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let token = relay.token("dev");
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    let again = format!(r#"{{"model":"stt-rt-v4","api_key":"{token}"}}"#);
    ws.send(Message::text(config_message(Some(&token))))
        .unwrap();
    ws.send(Message::text(again.clone())).unwrap();
    let got = read_all(&mut ws);
    assert_eq!(got.error_code(), Some(400), "{got:?}");
    assert_eq!(got.messages[0]["error_message"], "Invalid control message.");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.text_messages.len(), 2, "{:?}", s.text_messages);
    assert!(
        !s.text_messages[0].contains(&token),
        "{:?}",
        s.text_messages
    );
    assert_eq!(s.text_messages[1], again);
}

#[test]
fn the_config_reaches_upstream_as_the_client_wrote_it() {
    // Only `api_key` goes and `client_reference_id` comes: every other
    // member's value is the client's text. Before, the config was read
    // into a JSON map and written again: a 30-digit integer reached
    // upstream as 1.2345678901234568e+29, `1e2` as 100.0.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let config = r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1,"api_key":"x","x_id":123456789012345678901234567890,"x_gain":1e2}"#;
    let got = stream_session(&mut ws, config, &audio_frames(2, 7));
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    let up = &s.text_messages[0];
    for member in [
        r#""x_id":123456789012345678901234567890"#,
        r#""x_gain":1e2"#,
    ] {
        assert!(up.contains(member), "{member} in {up}");
    }
    assert!(!up.contains("api_key"), "{up}");
}

#[test]
fn a_config_serde_json_cannot_hold_reaches_upstream_as_written() {
    // JSON's grammar allows both, serde_json's map cannot hold them: a
    // lone surrogate escape (JSON.stringify writes one for a string cut
    // inside an emoji, a `context` trimmed to a length) and a number
    // past f64's range. Before, each was refused with 400 "Start request
    // is not valid JSON"; now they go up as written and upstream judges.
    // The token, as `api_key`, still verifies and never goes up.
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let token = relay.token("dev");
    let config = format!(
        r#"{{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1,"context":{{"text":"cut in an emoji \ud83d"}},"x":1e400,"api_key":"{token}"}}"#
    );
    let (mut ws, _) = connect(relay.addr(), "", Via::FirstMessage).unwrap();
    let got = stream_session(&mut ws, &config, &audio_frames(2, 9));
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 2);
    let up = &s.text_messages[0];
    for member in [
        r#""context":{"text":"cut in an emoji \ud83d"}"#,
        r#""x":1e400"#,
        r#""model":"stt-rt-v4""#,
    ] {
        assert!(up.contains(member), "{member} in {up}");
    }
    assert!(!up.contains(&token), "the token reached upstream: {up}");
    assert!(!up.contains("api_key"), "{up}");
    assert_eq!(s.key.as_deref(), Some("key-a"));
}

#[test]
fn frames_larger_than_the_read_buffer_arrive_intact() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames: Vec<Vec<u8>> = (0..5u32)
        .map(|i| {
            (0..100 * 1024u32)
                .map(|j| (j.wrapping_mul(13) ^ (j >> 8) ^ (i * 101)) as u8)
                .collect()
        })
        .collect();
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000));
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 5);
    assert_eq!(s.audio.len(), 5 * 100 * 1024);
    assert!(
        s.audio == frames.concat(),
        "large frames were altered on the way"
    );
}

#[test]
fn fragmented_audio_with_a_ping_inside_arrives_whole() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    let audio = audio_frames(2, 11);
    let a = &audio[0];
    ws.send(fragment(&a[..1000], true, false)).unwrap();
    ws.send(Message::Ping(b"mid".to_vec().into())).unwrap();
    ws.send(fragment(&a[1000..2000], false, false)).unwrap();
    ws.send(fragment(&a[2000..], false, true)).unwrap();
    ws.send(Message::binary(audio[1].clone())).unwrap();
    ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(
        s.audio_frames, 2,
        "one message of three fragments, one whole"
    );
    assert!(s.audio == audio.concat(), "the fragments were altered");
}

fn ends_with(end: Message) {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(10, 5) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.send(end).unwrap();
    let got = read_all(&mut ws);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert!(!got.abrupt);
    let s = &closed_sessions(&fake, 1)[0];
    assert!(s.empty_frame_received, "{s:?}");
    assert!(s.finished_sent);
    assert!(s.closed);
    assert_eq!(s.audio_frames, 10);
}

#[test]
fn empty_binary_frame_ends_the_audio() {
    ends_with(Message::binary(Vec::<u8>::new()));
}

#[test]
fn empty_text_frame_ends_the_audio() {
    ends_with(Message::text(""));
}

#[test]
fn client_vanishing_mid_stream_frees_everything() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 7) {
        ws.send(Message::binary(f)).unwrap();
    }
    assert!(
        fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 5),
        "{:?}",
        fake.sessions()
    );
    assert!(wait_until(LIMIT, || relay.handle.process.accounts()[0]
        .live
        .load(std::sync::atomic::Ordering::Relaxed)
        == 1));
    assert_eq!(relay.handle.metrics().active_streams(), 1);
    // No close frame: the TCP connection just goes.
    drop(ws);
    assert!(
        fake.wait_for(LIMIT, |s| s[0].closed),
        "upstream session still open: {:?}",
        fake.sessions()
    );
    assert!(
        relay.wait_idle(LIMIT),
        "relay gauges stay up: {:?}",
        relay.handle.metrics().active_streams()
    );
    assert_eq!(relay.handle.metrics().active_streams(), 0);
    assert!(wait_until(LIMIT, || relay.handle.process.accounts()[0]
        .live
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0));
    assert!(!fake.sessions()[0].finished_sent);
}

#[test]
fn client_config_passes_through_with_a_reference_id() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);

    // No client_reference_id: the relay adds one; everything else is kept.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(got.finished(), "{got:?}");
    // With one: kept as is.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut mine: Value = serde_json::from_str(&config_message(None)).unwrap();
    mine["client_reference_id"] = Value::String("my-own-ref-42".into());
    let got = stream_session(&mut ws, &mine.to_string(), &audio_frames(3, 1));
    assert!(got.finished(), "{got:?}");
    // With `null`: none given, so the relay's, as the usage record has it.
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let mut null: Value = serde_json::from_str(&config_message(None)).unwrap();
    null["client_reference_id"] = Value::Null;
    let got = stream_session(&mut ws, &null.to_string(), &audio_frames(3, 1));
    assert!(got.finished(), "{got:?}");

    let sessions = closed_sessions(&fake, 3);
    let sent: Value = serde_json::from_str(&config_message(None)).unwrap();
    let up = sessions[0].config.clone().unwrap();
    let up = up.as_object().unwrap();
    for (k, v) in sent.as_object().unwrap() {
        assert_eq!(up.get(k), Some(v), "field {k} changed on the way");
    }
    assert_eq!(
        up["x_unknown_field"],
        serde_json::json!({"kept": [1, 2, 3]})
    );
    let rid = up
        .get("client_reference_id")
        .and_then(Value::as_str)
        .expect("relay sets client_reference_id");
    assert!(!rid.is_empty());
    assert_eq!(
        up.len(),
        sent.as_object().unwrap().len() + 1,
        "extra fields upstream: {up:?}"
    );

    let up2 = sessions[1].config.clone().unwrap();
    assert_eq!(up2["client_reference_id"], "my-own-ref-42");
    assert_eq!(
        up2["x_unknown_field"],
        serde_json::json!({"kept": [1, 2, 3]})
    );
    assert_eq!(
        up2.as_object().unwrap().len(),
        mine.as_object().unwrap().len()
    );
    let up3 = sessions[2].config.clone().unwrap();
    let rid3 = up3["client_reference_id"].as_str();
    assert!(rid3.is_some_and(|r| !r.is_empty() && r != rid), "{up3:?}");
}

#[test]
fn frames_sent_before_upstream_opens_are_not_lost() {
    let fake = fake(&["key-a"], |c| {
        c.faults.handshake_delay = Duration::from_millis(500)
    });
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames = audio_frames(10, 9);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000));
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 10);
    assert_eq!(s.audio, frames.concat());
    assert!(s.empty_frame_received);
}

#[test]
fn a_client_that_leaves_while_upstream_opens_gives_its_place_back() {
    // Upstream answers each upgrade 3 s late, and a device may hold one
    // stream: a phone that gives up on a slow open and tries again.
    let fake = fake(&["key-a"], |c| {
        c.faults.handshake_delay = Duration::from_secs(3)
    });
    let mut cfg = relay_config(&fake.url(), &[("acct-a", "key-a")]);
    cfg.devices.default.max_concurrent_streams = 1;
    let relay = Relay::start(cfg);
    let token = relay.token("dev");
    let (mut gone, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    gone.send(Message::text(config_message(None))).unwrap();
    gone.send(Message::binary(audio_frames(1, 3).remove(0)))
        .unwrap();
    let live = || relay.account_live(0);
    // The relay is opening upstream for it when the connection goes (no
    // close frame).
    assert!(wait_until(LIMIT, || live() == 1));
    drop(gone);
    // Its places come free (the open is dropped, or, without the race,
    // after upstream's late answer), and the same device is served again.
    assert!(wait_until(LIMIT, || live() == 0));
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    let frames = audio_frames(3, 4);
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    // Upstream got the second stream's config and audio only: the first's
    // upgrade (if it got that far) was dropped unanswered, so none of its
    // audio was sent, nor billed.
    assert!(fake.wait_for(LIMIT, |s| s.iter().all(|r| r.closed)));
    let sessions = fake.sessions();
    let configured: Vec<_> = sessions.iter().filter(|r| r.config.is_some()).collect();
    let ids: Vec<u64> = configured.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1, "sessions with a config: {ids:?}");
    assert!(
        configured[0].audio == frames.concat(),
        "the second stream's audio"
    );
    assert!(relay.wait_idle(LIMIT));
    assert_eq!(live(), 0);
}

#[test]
fn more_than_the_pre_upstream_queue_before_upstream_opens_is_not_lost() {
    // 30 × 16 KiB = 480 KiB, beyond the 256 KiB pre-upstream queue: the
    // excess must wait in TCP (back-pressure), not be dropped.
    let fake = fake(&["key-a"], |c| {
        c.faults.handshake_delay = Duration::from_millis(500)
    });
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let frames: Vec<Vec<u8>> = (0..30u32)
        .map(|i| (0..16 * 1024u32).map(|j| (j ^ (i * 37)) as u8).collect())
        .collect();
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 30);
    assert!(s.audio == frames.concat(), "queued audio altered or lost");
}

#[test]
fn client_pings_mid_stream_are_answered() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    ws.send(Message::binary(audio_frames(1, 1)[0].clone()))
        .unwrap();
    ws.send(Message::Ping(b"ping-42".to_vec().into())).unwrap();
    let pong = loop {
        match ws.read().expect("stream stays open") {
            Message::Pong(p) => break p,
            Message::Close(c) => panic!("closed instead of pong: {c:?}"),
            _ => {}
        }
    };
    assert_eq!(&pong[..], b"ping-42");
    let got = stream_session(&mut ws, r#"{"type":"keepalive"}"#, &audio_frames(3, 2));
    assert!(got.finished(), "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.audio_frames, 4);
}

/// Streams `frames` straight to the fake (no relay), as the relay would.
fn direct_session(fake: &fake_soniox::FakeSoniox, key: &str, frames: &[Vec<u8>]) -> Received {
    use tungstenite::client::IntoClientRequest;
    let mut req = fake.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {key}").parse().unwrap());
    let tcp = std::net::TcpStream::connect(fake.addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let (mut ws, _) = tungstenite::client::client(req, tcp).unwrap();
    stream_session(&mut ws, &config_message(None), frames)
}

#[test]
fn upstream_messages_reach_the_client_unchanged_and_in_order() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let frames = audio_frames(60, 2);
    let direct = direct_session(&fake, "key-a", &frames);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let relayed = stream_session(&mut ws, &config_message(None), &frames);
    assert!(direct.finished() && relayed.finished(), "{relayed:?}");
    assert!(!relayed.text().is_empty());
    assert_eq!(relayed.messages, direct.messages);
    assert_eq!(relayed.close_code(), direct.close_code());
}

#[test]
fn client_close_mid_stream_reaches_upstream() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    ws.send(Message::text(config_message(None))).unwrap();
    for f in audio_frames(5, 1) {
        ws.send(Message::binary(f)).unwrap();
    }
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: "bye".into(),
    }))
    .unwrap();
    let got = read_all(&mut ws);
    // Upstream either answers the close or just hangs up (the fake hangs
    // up); either way the client's close is answered as a normal close, not
    // reported as an upstream failure.
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
    assert_eq!(got.error_code(), None, "{got:?}");
    let s = &closed_sessions(&fake, 1)[0];
    assert_eq!(s.client_close_code, Some(1001));
    assert_eq!(s.audio_frames, 5);
    assert!(relay.wait_idle(LIMIT));
}

/// After the close handshake the relay, upstream's WebSocket client, leaves
/// the TCP close to upstream (RFC 6455 §7.1.1): it sends no FIN until
/// upstream has sent its own, so the TIME_WAIT stays with upstream and
/// the relay's ephemeral ports do not run out under churn. Then it closes
/// at once.
#[test]
fn the_relay_lets_upstream_close_the_connection_first() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(tcp).unwrap();
        // Config, then audio until the end of audio (an empty frame).
        loop {
            match ws.read().unwrap() {
                Message::Binary(b) if b.is_empty() => break,
                _ => {}
            }
        }
        ws.send(Message::text(
            r#"{"tokens":[],"final_audio_proc_ms":100,"total_audio_proc_ms":100,"finished":true}"#,
        ))
        .unwrap();
        ws.close(Some(normal_close())).unwrap();
        // The client's close reply, carried up by the relay.
        let replied = loop {
            match ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => break true,
                Err(_) => break false,
            }
        };
        let mut tcp = ws.into_inner();
        // Upstream has not closed yet: the relay must not have either.
        tcp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 64];
        let early_fin = matches!(std::io::Read::read(&mut tcp, &mut b), Ok(0));
        // Now upstream closes; the relay follows.
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        tcp.set_read_timeout(Some(LIMIT)).unwrap();
        let fin_after = matches!(std::io::Read::read(&mut tcp, &mut b), Ok(0));
        report_tx.send((replied, early_fin, fin_after)).unwrap();
    });
    let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev-1"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(got.finished(), "upstream's last result reached the client");
    assert_eq!(got.close_code(), Some(1000));
    let (replied, early_fin, fin_after) = report_rx.recv_timeout(LIMIT * 2).unwrap();
    assert!(replied, "the client's close reply reached upstream");
    assert!(
        !early_fin,
        "the relay closed upstream's connection before upstream did"
    );
    assert!(fin_after, "the relay closes once upstream has");
}

#[test]
fn a_result_larger_than_a_read_buffer_reaches_the_client_whole() {
    // Soniox's results grow with an utterance's non-final tokens (and
    // with translation): one of 100 KB, three read buffers, within
    // `limits.max_frame_bytes`, is a result like any other, for raw audio
    // (whose results the relay reads whole) as for compressed.
    for format in ["pcm_s16le", "ogg"] {
        let (url, conns) = scripted_upstream(|_, frame| match frame {
            3 => UpStep::Text(big_result(100_000, 300)),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let frames = audio_frames(15, 6);
        let got = stream_session(&mut ws, &config.to_string(), &frames);
        assert_eq!(got.error_code(), None, "{format}");
        assert!(got.finished(), "{format}");
        let big: Vec<usize> = got
            .messages
            .iter()
            .map(|m| m.to_string().len())
            .filter(|&n| n >= 100_000)
            .collect();
        assert_eq!(big.len(), 1, "{format}: the big result, once");
        let words: String = (1..=frames.len())
            .filter(|&n| n != 3)
            .map(|n| format!("w{n} "))
            .collect();
        assert_eq!(got.text(), words, "{format}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{format}: no resume"
        );
    }
}

/// A result of about `size` bytes of non-final tokens ending at `ms`.
fn big_result(size: usize, ms: u64) -> String {
    let word = serde_json::json!({"text": "word ", "start_ms": ms - 100,
        "end_ms": ms, "is_final": false, "confidence": 0.9});
    let n = size / word.to_string().len() + 1;
    serde_json::json!({"tokens": vec![word; n],
        "final_audio_proc_ms": ms - 100, "total_audio_proc_ms": ms})
    .to_string()
}

#[test]
fn a_close_no_endpoint_may_send_never_reaches_the_client() {
    // A close frame carrying 1005 (a code that is never sent).
    never_passed_on(vec![0x88, 0x02, 0x03, 0xed]);
}

#[test]
fn upstream_text_that_is_not_utf8_never_reaches_the_client() {
    // A text frame that is not UTF-8 (a browser fails its WebSocket on
    // one).
    never_passed_on(vec![0x81, 0x03, b'{', 0xc3, 0x28]);
}

/// Upstream's first connection answers the second audio frame with
/// `frame`, a frame that breaks the protocol; later ones behave. A
/// raw-audio stream resumes unseen; a compressed one gets the relay's 503
/// and close 1011, never the broken frame.
fn never_passed_on(frame: Vec<u8>) {
    for (format, conns_after, want) in [("pcm_s16le", 2, None), ("ogg", 1, Some(503u64))] {
        let bad = frame.clone();
        let (url, conns) = scripted_upstream(move |conn, n| match (conn, n) {
            (0, 2) => UpStep::Raw(bad.clone()),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(16, 6));
        assert!(!got.abrupt, "{format}: {got:?}");
        assert_eq!(got.error_code(), want, "{format}: {got:?}");
        let close = if want.is_some() { 1011 } else { 1000 };
        assert_eq!(got.close_code(), Some(close), "{format}: {got:?}");
        assert_eq!(got.finished(), want.is_none(), "{format}: {got:?}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            conns_after,
            "{format}"
        );
    }
}

/// The frames an upstream got: (opcode, unmasked payload).
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(u8, Vec<u8>)>>>;

/// A raw upstream that does the upgrade by hand and then records every
/// frame the relay sends it (opcode and payload, unmasked). After the
/// relay's first close frame it waits `delay`, sends one text result, and
/// keeps reading until the relay's FIN. Returns its URL and the frames.
fn recording_upstream(delay: Duration) -> (String, Recorded) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            let record = record.clone();
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut b).unwrap_or(0) != 1 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let Some(key) = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("sec-websocket-key:")
                        .then(|| l[18..].trim().to_string())
                }) else {
                    return;
                };
                let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                write!(
                    tcp,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                )
                .unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let mut answered = false;
                loop {
                    while let Ok(Some(h)) = clio_frame::frame::parse_header(
                        &buf,
                        clio_frame::frame::Sender::Client,
                        1 << 30,
                    ) {
                        let total = h.header_len + h.payload_len as usize;
                        if buf.len() < total {
                            break;
                        }
                        let key: [u8; 4] = buf[h.header_len - 4..h.header_len].try_into().unwrap();
                        let payload: Vec<u8> = buf[h.header_len..total]
                            .iter()
                            .enumerate()
                            .map(|(i, b)| b ^ key[i % 4])
                            .collect();
                        let close = h.opcode == clio_frame::frame::Opcode::Close;
                        record.lock().unwrap().push((h.opcode as u8, payload));
                        buf.drain(..total);
                        if close && !answered {
                            answered = true;
                            std::thread::sleep(delay);
                            let r =
                                br#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#;
                            let _ = tcp.write_all(&clio_frame::frame::build_frame(
                                clio_frame::frame::Opcode::Text,
                                r,
                                None,
                            ));
                        }
                    }
                    match tcp.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, seen)
}

#[test]
fn a_client_that_closes_then_vanishes_costs_upstream_no_second_close() {
    // The client sends its close frame and resets its connection at once.
    // Upstream still sends a result before its close reply; the relay's
    // write of it to the client fails (End::ClientGone). The client's
    // close frame already went up: upstream must get no second one.
    let (url, seen) = recording_upstream(Duration::from_millis(300));
    let relay = Relay::start(relay_config(&url, &[("a", "k1")]));
    let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
    assert!(String::from_utf8_lossy(&head).contains(" 101 "));
    use std::io::Write;
    tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
        .unwrap();
    for f in audio_frames(3, 1) {
        tcp.write_all(&client_frame(2, &f)).unwrap();
    }
    tcp.write_all(&client_frame(8, &1000u16.to_be_bytes()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // A reset, not a FIN: SO_LINGER 0.
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(tcp);
    assert!(relay.wait_idle(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(500));
    let closes: Vec<u16> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(op, _)| *op == 8)
        .map(|(_, p)| close_code_of(p))
        .collect();
    assert_eq!(closes, vec![1000], "close frames upstream got");
}

#[test]
fn a_bad_close_read_together_with_a_result_still_gets_the_error_frame() {
    // Upstream's first connection writes a result and a close frame with
    // 1005 in one go, so the relay reads both at once, then hangs up. The
    // result reaches the client; the bad close never does, and the client
    // is between frames: a compressed stream gets the relay's 503 and
    // close 1011 (it got a bare FIN when both came in one read), a
    // raw-audio one resumes unseen.
    let result = serde_json::json!({
        "tokens": [{"text": "w1 ", "start_ms": 0, "end_ms": 100, "is_final": true}],
        "final_audio_proc_ms": 100, "total_audio_proc_ms": 100,
    })
    .to_string();
    for format in ["ogg", "pcm_s16le"] {
        let mut wire = raw_frame(0x81, None, result.as_bytes());
        wire.extend([0x88, 0x02, 0x03, 0xed]);
        let (url, conns) = scripted_upstream(move |conn, frame| match (conn, frame) {
            (0, 2) => UpStep::Raw(wire.clone()),
            _ => UpStep::Final,
        });
        let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(8, 6));
        if format == "ogg" {
            assert_error_frame(&got, 503, 1011);
            assert!(!got.abrupt, "{got:?}");
        } else {
            assert_eq!(got.error_code(), None, "{got:?}");
            assert!(got.finished(), "{got:?}");
            assert_eq!(got.close_code(), Some(1000), "{got:?}");
            assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
        }
    }
}

/// A config whose raw-audio rate overflows when its numbers are
/// multiplied (a sample rate and channel count no microphone has) is
/// upstream's to judge: the relay computes no rate from it and forwards
/// it, and upstream's answer (here fake-soniox's 400, as a server that
/// takes no such rate) reaches the client, from a shard that goes on
/// serving. The relay's multiplication overflowed: in a debug build its
/// shard thread panicked ("attempt to multiply with overflow"), in a
/// release build the rate wrapped.
#[test]
fn a_raw_audio_rate_that_overflows_is_forwarded_not_computed() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    for (rate, channels) in [(1u64 << 62, 4u64), (16_000, 1 << 62), (u64::MAX, 1)] {
        let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
        config["sample_rate"] = rate.into();
        config["num_channels"] = channels.into();
        let token = relay.token("device-1");
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).expect("upgrade");
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(10, 3));
        assert_error_frame(&got, 400, 1000);
    }
    // The shard that took them still serves.
    let token = relay.token("device-2");
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).expect("upgrade");
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(10, 3));
    assert!(got.finished(), "{got:?}");
}

/// A raw-audio rate whose numbers multiply without overflow but whose
/// `failover.resume_audio` of audio is more bytes than a `usize` holds
/// (2·10^18 bytes a second, which fake-soniox takes) bounds the stream's
/// resume copy by the memory budget alone: the stream runs to its end,
/// with another beside it. The bound plus one read window overflowed as
/// the copy grew: in a debug build the shard thread panicked ("attempt to
/// add with overflow"), and every stream on it stopped.
#[test]
fn a_raw_audio_rate_whose_resume_bound_overflows_streams_to_its_end() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    let (mut beside, _) = connect(relay.addr(), &relay.token("device-2"), Via::Header).unwrap();
    beside
        .send(Message::text(config_message(None)))
        .expect("config");
    let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
    config["sample_rate"] = 1_000_000_000_000_000_000u64.into();
    let token = relay.token("device-1");
    let (mut ws, _) = connect(relay.addr(), &token, Via::Header).expect("upgrade");
    // Reads of the relay's whole 32 KiB buffer, many: the copy grows.
    let frames: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 32_000]).collect();
    let got = stream_session(&mut ws, &config.to_string(), &frames);
    assert!(got.finished(), "{got:?}");
    let got = stream_session_after_config(&mut beside, &audio_frames(10, 3));
    assert!(got.finished(), "{got:?}");
}

/// A raw format whose `sample_rate` is no whole number (`1e-300`, which
/// JSON allows) is no rate the relay meters audio by: upstream judges it
/// (fake-soniox refuses it, 400), and the device's audio is left to
/// upstream's figure, as a compressed format's. The relay divided the
/// audio bytes by it: each of the device's streams added `u64::MAX` ms to
/// its day, and the second overflowed. In a debug build the shard thread
/// panicked ("attempt to add with overflow") and every stream on it
/// stopped; in a release build the device's day wrapped.
#[test]
fn a_sample_rate_that_is_no_whole_number_meters_no_audio_by_it() {
    let fake = fake(&["key-a"], |_| {});
    let relay = relay_for(&fake);
    // Holds the device's state (its day's audio) across the streams.
    let token = relay.token("device-1");
    let (mut held, _) = connect(relay.addr(), &token, Via::Header).unwrap();
    held.send(Message::text(config_message(None)))
        .expect("config");
    let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
    config["sample_rate"] = serde_json::from_str("1e-300").unwrap();
    for _ in 0..2 {
        let (mut ws, _) = connect(relay.addr(), &token, Via::Header).expect("upgrade");
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(10, 3));
        assert_error_frame(&got, 400, 1000);
    }
    let got = stream_session_after_config(&mut held, &audio_frames(10, 3));
    assert!(got.finished(), "{got:?}");
}

/// The rest of [`stream_session`] for a client that sent its config:
/// its audio, its end of audio, and what came back.
fn stream_session_after_config(ws: &mut Ws, frames: &[Vec<u8>]) -> Received {
    for f in frames {
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    ws.send(Message::binary(Vec::<u8>::new()))
        .expect("end of audio");
    read_all(ws)
}

/// How [`cutting_upstream`] sends each of its text messages.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// In three fragments, with a ping between the first two (RFC 6455
    /// §5.4 allows both; the ping's payload, a quoted word, would spoil
    /// the JSON if it were taken into the message).
    Fragments,
    /// As one frame written in two parts 50 ms apart, cut in its payload:
    /// two reads on the relay's side.
    TwoWrites,
}

/// An upstream that sends every message as `cut` says: a final token
/// `w1 `, `w2 `, ... per audio frame, and at the end of audio `finished`,
/// after which it hangs up without a close frame. Returns its URL and a
/// count of the connections it took.
fn cutting_upstream(cut: Cut) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use clio_frame::frame::{build_fragment, Opcode};
    use std::io::Write;
    ws_upstream(move |_, mut ws| {
        let send = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>, text: &[u8]| {
            let tcp = ws.get_mut();
            match cut {
                Cut::Fragments => {
                    let (a, rest) = text.split_at(5);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    let mut wire = build_fragment(Opcode::Text, false, a, None);
                    wire.extend(build_fragment(Opcode::Ping, true, b"\"ping\"", None));
                    wire.extend(build_fragment(Opcode::Continuation, false, b, None));
                    wire.extend(build_fragment(Opcode::Continuation, true, c, None));
                    tcp.write_all(&wire).is_ok()
                }
                Cut::TwoWrites => {
                    let wire = build_fragment(Opcode::Text, true, text, None);
                    let (a, b) = wire.split_at(wire.len() / 2);
                    let first = tcp.write_all(a).and_then(|()| tcp.flush()).is_ok();
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    first && tcp.write_all(b).is_ok()
                }
            }
        };
        let mut frames = 0u64;
        while let Ok(m) = ws.read() {
            let Message::Binary(b) = m else { continue };
            let ms = frames * 100;
            if b.is_empty() {
                let done = serde_json::json!({"tokens": [], "final_audio_proc_ms": ms,
                            "total_audio_proc_ms": ms, "finished": true});
                send(&mut ws, done.to_string().as_bytes());
                let _ = ws.get_mut().shutdown(std::net::Shutdown::Both);
                return;
            }
            frames += 1;
            let ms = frames * 100;
            let result = serde_json::json!({"tokens": [{"text": format!("w{frames} "),
                        "start_ms": ms - 100, "end_ms": ms, "is_final": true}],
                        "final_audio_proc_ms": ms, "total_audio_proc_ms": ms});
            if !send(&mut ws, result.to_string().as_bytes()) {
                return;
            }
        }
    })
}

#[test]
fn a_finished_in_pieces_is_upstreams_last_word() {
    // Upstream's `finished` came in fragments, and upstream then hung up:
    // the client has its answer, so it gets close 1000 in upstream's
    // place, with every word once, one `finished`, no error and no resume.
    // So too when each message came in two reads, or on a compressed
    // stream (its pump walks the frames as they come and joins such a
    // message to read it).
    for (format, cut) in [
        ("pcm_s16le", Cut::Fragments),
        ("pcm_s16le", Cut::TwoWrites),
        ("ogg", Cut::Fragments),
        ("ogg", Cut::TwoWrites),
    ] {
        let (url, conns) = cutting_upstream(cut);
        let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let mut config: Value = serde_json::from_str(&config_message(None)).unwrap();
        config["audio_format"] = format.into();
        let got = stream_session(&mut ws, &config.to_string(), &audio_frames(5, 3));
        assert!(!got.abrupt, "{format} {cut:?}: {got:?}");
        assert_eq!(got.error_code(), None, "{format} {cut:?}: {got:?}");
        assert_eq!(got.close_code(), Some(1000), "{format} {cut:?}: {got:?}");
        assert_eq!(got.text(), "w1 w2 w3 w4 w5 ", "{format} {cut:?}: {got:?}");
        let finished = got.messages.iter().filter(|m| m["finished"] == true);
        assert_eq!(finished.count(), 1, "{format} {cut:?}: {got:?}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{format} {cut:?}"
        );
    }
}

#[test]
#[allow(clippy::result_large_err)] // tungstenite's callback returns its Response as the error
fn an_upgrade_answer_with_many_headers_is_taken() {
    // A 101 with more than 48 headers (as a proxy or a CDN in front of
    // upstream may add) was taken for a malformed answer: every stream
    // got 502 "unreachable".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            std::thread::spawn(move || {
                let many =
                    |_: &tungstenite::handshake::server::Request,
                     mut answer: tungstenite::handshake::server::Response| {
                        for i in 0..60 {
                            let name = format!("x-hop-{i}");
                            let name = tungstenite::http::HeaderName::try_from(name).unwrap();
                            answer.headers_mut().insert(name, "1".parse().unwrap());
                        }
                        Ok(answer)
                    };
                let Ok(mut ws) = tungstenite::accept_hdr(tcp, many) else {
                    return;
                };
                while let Ok(m) = ws.read() {
                    match m {
                        Message::Binary(b) if b.is_empty() => {
                            let done = r#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0,"finished":true}"#;
                            let _ = ws.send(Message::text(done));
                            let _ = ws.close(Some(normal_close()));
                        }
                        Message::Binary(_) => {
                            let result = r#"{"tokens":[{"text":"w ","is_final":true}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#;
                            let _ = ws.send(Message::text(result));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.text(), "w w ", "{got:?}");
    assert!(got.finished(), "{got:?}");
    assert_eq!(got.close_code(), Some(1000), "{got:?}");
}

/// An upstream whose 101 is `answer(accept key)`; it then sends a result
/// for every audio frame and, for the end of audio, `finished` and a
/// close, as a good one would.
fn upstream_answering(answer: fn(&str) -> String) -> String {
    use clio_frame::frame::{build_frame, parse_header, Opcode, Sender};
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "ws://{}/transcribe-websocket",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let Some(key) = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| value.trim().to_string())
                }) else {
                    return;
                };
                let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                buf.drain(..at);
                let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                if tcp.write_all(answer(&accept).as_bytes()).is_err() {
                    return;
                }
                loop {
                    while let Ok(Some(h)) = parse_header(&buf, Sender::Client, 1 << 30) {
                        let total = h.header_len + h.payload_len as usize;
                        if buf.len() < total {
                            break;
                        }
                        buf.drain(..total);
                        let reply = match (h.opcode, h.payload_len) {
                            (Opcode::Binary, 0) => {
                                r#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0,"finished":true}"#
                            }
                            (Opcode::Binary, _) => {
                                r#"{"tokens":[{"text":"w ","is_final":true}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#
                            }
                            _ => continue,
                        };
                        let mut out = build_frame(Opcode::Text, reply.as_bytes(), None);
                        if h.payload_len == 0 {
                            out.extend(build_frame(Opcode::Close, &[0x03, 0xe8], None));
                        }
                        if tcp.write_all(&out).is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    url
}

#[test]
fn a_101_a_websocket_client_must_refuse_is_refused() {
    // RFC 6455 §4.1: a client fails the connection when the 101 names a
    // subprotocol it did not ask for, or lacks `Upgrade: websocket` or
    // `Connection: Upgrade`. The relay took such answers and streamed on
    // them, as it refused one with an extension or a wrong accept key.
    let answers: [fn(&str) -> String; 3] = [
        |accept| {
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\n\r\n")
        },
        |accept| {
            format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
        },
        |accept| {
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
        },
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        let relay = Relay::start(relay_config(&upstream_answering(answer), &[("a", "k1")]));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
        let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
        assert_eq!(got.error_code(), Some(503), "answer {i}: {got:?}");
        assert_eq!(got.close_code(), Some(1011), "answer {i}: {got:?}");
        assert_eq!(got.text(), "", "answer {i}: {got:?}");
    }
    // The same upstream with a 101 a client may take streams.
    let good = |accept: &str| {
        format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
    };
    let relay = Relay::start(relay_config(&upstream_answering(good), &[("a", "k1")]));
    let (mut ws, _) = connect(relay.addr(), &relay.token("dev"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(2, 1));
    assert_eq!(got.error_code(), None, "{got:?}");
    assert_eq!(got.text(), "w w ", "{got:?}");
    assert!(got.finished(), "{got:?}");
}
