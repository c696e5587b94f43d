//! How streams end at their edges: a client that half-closes after its
//! close frame, close frames with bad bodies from upstream at the end
//! (after its `finished`, or after the client's close), a client that
//! does not answer upstream's close (or answers it with a bad one), and
//! upstream gone inside a result while the client is slow to read.

use std::io::Write;
use std::time::Duration;

use crate::util::*;

const LIMIT: Duration = Duration::from_secs(15);

/// A client that sends its close frame and at once its FIN (shutdown of
/// its sending side: a client that has nothing more to say) still reads
/// its close's answer: the FIN after a close frame is not a client gone.
#[test]
fn a_client_that_half_closes_after_its_close_frame_gets_the_answer() {
    let fake = fake(&["key-a"], |_| {});
    let relay = Relay::start(relay_config(&fake.url(), &[("acct-a", "key-a")]));
    let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
        .unwrap();
    for f in audio_frames(5, 1) {
        tcp.write_all(&client_frame(2, &f)).unwrap();
    }
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].audio_frames == 5));
    tcp.write_all(&client_frame(
        8,
        &clio_frame::frame::close_payload(1000, "done"),
    ))
    .unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let frames = raw_read_frames(&mut tcp);
    assert_eq!(raw_close_code(&frames), Some(1000), "{frames:?}");
    assert!(
        raw_texts(&frames)
            .iter()
            .all(|m| m.get("error_code").is_none()),
        "{frames:?}"
    );
    assert!(fake.wait_for(LIMIT, |s| s.len() == 1 && s[0].closed));
    assert_eq!(fake.sessions()[0].client_close_code, Some(1000));
    assert!(relay.wait_idle(LIMIT));
    let m = relay.handle.metrics();
    assert_eq!(
        m.error_counts().count(),
        0,
        "{:?}",
        m.error_counts().collect::<Vec<_>>()
    );
}

/// Close bodies no endpoint may send: one byte, a code never sent
/// (1005, 999), a reason that is not UTF-8.
const BAD_CLOSES: [&[u8]; 4] = [b"\x03", b"\x03\xed", b"\x03\xe7", b"\x03\xe8\xc3\x28"];

/// An upstream that answers with `finished` at the end of audio (or, with
/// `after_client_close`, reads on to the client's close), then writes
/// the close frame with `body` under the WebSocket layer and hangs up.
fn upstream_with_bad_close(body: &'static [u8], after_client_close: bool) -> String {
    ws_upstream(move |_, mut ws| {
        use tungstenite::Message;
        loop {
            match ws.read() {
                Ok(Message::Binary(b)) if b.is_empty() && !after_client_close => break,
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        if !after_client_close {
            let _ = ws.send(Message::text(
                r#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0,"finished":true}"#,
            ));
        }
        let mut frame = vec![0x88, body.len() as u8];
        frame.extend_from_slice(body);
        let _ = ws.get_mut().write_all(&frame);
        std::thread::sleep(Duration::from_millis(200));
    })
    .0
}

/// Upstream's bad close after its `finished` (or after the client's
/// close) never reaches the client: the relay closes in upstream's place
/// with 1000, as the contract has it, and it counts as nobody's error.
#[test]
fn a_bad_close_from_upstream_at_the_end_is_answered_with_1000() {
    for after_client_close in [false, true] {
        for body in BAD_CLOSES {
            let url = upstream_with_bad_close(body, after_client_close);
            let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
            let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
            assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
            tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
                .unwrap();
            tcp.write_all(&client_frame(2, &audio_frames(1, 1)[0]))
                .unwrap();
            if after_client_close {
                tcp.write_all(&client_frame(
                    8,
                    &clio_frame::frame::close_payload(1000, ""),
                ))
                .unwrap();
            } else {
                tcp.write_all(&client_frame(2, b"")).unwrap();
            }
            let frames = raw_read_frames_until_close(&mut tcp);
            let case = format!("{body:?} after_client_close={after_client_close}: {frames:?}");
            let last = frames.last().expect("a close");
            assert_eq!(last.0, 8, "{case}");
            assert_eq!(last.1, 1000u16.to_be_bytes(), "{case}");
            assert!(
                raw_texts(&frames)
                    .iter()
                    .all(|m| m.get("error_code").is_none()),
                "{case}"
            );
            if !after_client_close {
                assert!(
                    raw_texts(&frames).iter().any(|m| m["finished"] == true),
                    "{case}"
                );
                tcp.write_all(&client_frame(
                    8,
                    &clio_frame::frame::close_payload(1000, ""),
                ))
                .unwrap();
            }
            assert!(relay.wait_idle(LIMIT), "{case}");
            let m = relay.handle.metrics();
            assert_eq!(
                m.error_counts().count(),
                0,
                "{case}: {:?}",
                m.error_counts().collect::<Vec<_>>()
            );
        }
    }
}

/// Upstream hangs up inside a result (half a frame sent) while the client
/// is slow to read what came before it: the client still gets every
/// whole result before it, never a frame of the relay's inside the cut
/// one, and the connection ends (the stream does not wait for the idle
/// timeout).
#[test]
fn upstream_gone_inside_a_result_while_the_client_is_slow() {
    use std::io::Read;
    let result = r#"{"tokens":[{"text":"word ","is_final":true}],"final_audio_proc_ms":0,"total_audio_proc_ms":0}"#;
    let url = ws_upstream(move |_, mut ws| {
        use tungstenite::Message;
        let _ = ws.read(); // the config
        for _ in 0..3000 {
            if ws.send(Message::text(result)).is_err() {
                return;
            }
        }
        // Half of one more text frame, then the connection's end.
        let mut frame = vec![0x81, 100];
        frame.extend_from_slice(&[b' '; 50]);
        let _ = ws.get_mut().write_all(&frame);
        let _ = ws.get_mut().flush();
    })
    .0;
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.idle_timeout = Duration::from_secs(600);
    cfg.limits.socket_buffer = 16 << 10;
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(
        relay.addr(),
        &format!("Authorization: Bearer {}\r\n", relay.token("dev")),
    );
    let mut config: serde_json::Value = serde_json::from_str(&config_message(None)).unwrap();
    config["audio_format"] = "ogg".into();
    send_frames(
        &mut client,
        clio_frame::frame::Opcode::Text,
        config.to_string().as_bytes(),
        1,
    );
    // Slow: nothing read until the relay's socket to it has filled.
    std::thread::sleep(Duration::from_millis(1500));
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let mut data = Vec::new();
    let _ = client.read_to_end(&mut data);
    let data = &data[..];
    let (mut at, mut texts) = (0, 0);
    while let Ok(Some(h)) =
        clio_frame::frame::parse_header(&data[at..], clio_frame::frame::Sender::Server, 1 << 30)
    {
        let end = at + h.header_len + h.payload_len as usize;
        if end > data.len() {
            break;
        }
        assert_eq!(
            &data[at + h.header_len..end],
            result.as_bytes(),
            "frame {texts}"
        );
        texts += 1;
        at = end;
    }
    assert_eq!(texts, 3000, "every whole result");
    assert!(relay.wait_idle(LIMIT), "the stream did not end");
}

/// Upstream closes first (after `finished`), and the client answers with
/// a close no endpoint may send, or not at all (it holds its connection
/// open, silent): the relay does not carry a bad close up, and answers
/// upstream's close in the client's place (RFC 6455 §5.5.1: an endpoint
/// that gets a close sends one back), so upstream's close handshake
/// completes. Before, the relay sent none and closed the connection:
/// upstream saw it end with no close (tungstenite: "Connection reset
/// without closing handshake").
#[test]
fn upstreams_close_is_answered_when_the_client_does_not_answer_it() {
    let cases = BAD_CLOSES.iter().map(|b| Some(*b)).chain([None]);
    for body in cases {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let url = ws_upstream(move |_, mut ws| {
            use tungstenite::Message;
            loop {
                match ws.read() {
                    Ok(Message::Binary(b)) if b.is_empty() => break,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            let _ = ws.send(Message::text(
                r#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0,"finished":true}"#,
            ));
            let _ = ws.close(Some(normal_close()));
            let got = loop {
                match ws.read() {
                    Ok(Message::Close(c)) => break format!("close {c:?}"),
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => break "closed".to_string(),
                    Err(e) => break format!("error {e}"),
                }
            };
            let _ = tx.lock().unwrap().send(got);
        })
        .0;
        let relay = Relay::start(relay_config(&url, &[("acct-a", "key-a")]));
        let (mut tcp, head) = raw_upgrade(relay.addr(), &relay.token("dev"));
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
        tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
            .unwrap();
        tcp.write_all(&client_frame(2, &audio_frames(1, 1)[0]))
            .unwrap();
        tcp.write_all(&client_frame(2, b"")).unwrap();
        let frames = raw_read_frames_until_close(&mut tcp);
        assert_eq!(raw_close_code(&frames), Some(1000), "{body:?}: {frames:?}");
        if let Some(body) = body {
            tcp.write_all(&raw_frame(0x88, Some([9, 8, 7, 6]), body))
                .unwrap();
        }
        let got = rx.recv_timeout(LIMIT).unwrap();
        assert!(
            got.starts_with("close Some"),
            "{body:?}: upstream got {got}"
        );
        assert!(relay.wait_idle(LIMIT), "{body:?}");
    }
}

/// The raw-audio pump's version of [`upstream_gone_inside_a_result_while_the_client_is_slow`]:
/// upstream's first connection hangs up inside a result while the client
/// has not read for 1.5 s. The stream resumes on a new connection, and
/// the client, reading late, gets only whole frames, every text one
/// JSON, then `finished` and close 1000, with no error.
#[test]
fn a_resume_inside_a_result_while_the_client_is_slow_passes_only_whole_frames() {
    use std::io::Read;
    const CUT_AT: u64 = 200;
    let (url, _) = scripted_upstream(|conn, n| match (conn, n) {
        (0, CUT_AT) => UpStep::Raw(vec![0x81, 100, b'{', b'"']),
        _ => UpStep::Final,
    });
    let mut cfg = relay_config(&url, &[("acct-a", "key-a")]);
    cfg.limits.socket_buffer = 16 << 10;
    let relay = Relay::start(cfg);
    let mut client = upgraded_raw_client(
        relay.addr(),
        &format!("Authorization: Bearer {}\r\n", relay.token("dev")),
    );
    let op = clio_frame::frame::Opcode::Binary;
    send_frames(
        &mut client,
        clio_frame::frame::Opcode::Text,
        config_message(None).as_bytes(),
        1,
    );
    for f in audio_frames(CUT_AT as usize + 20, 3) {
        send_frames(&mut client, op, &f[..640], 1);
    }
    send_frames(&mut client, op, &[], 1);
    std::thread::sleep(Duration::from_millis(1500));
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut frames = Vec::new();
    let mut at = 0;
    'read: loop {
        while let Ok(Some(h)) =
            clio_frame::frame::parse_header(&data[at..], clio_frame::frame::Sender::Server, 1 << 30)
        {
            let end = at + h.header_len + h.payload_len as usize;
            if end > data.len() {
                break;
            }
            frames.push((h.opcode, data[at + h.header_len..end].to_vec()));
            at = end;
            if h.opcode == clio_frame::frame::Opcode::Close {
                break 'read;
            }
        }
        match client.read(&mut chunk) {
            Ok(n) if n > 0 => data.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let texts: Vec<serde_json::Value> = frames
        .iter()
        .filter(|(op, _)| *op == clio_frame::frame::Opcode::Text)
        .map(|(_, p)| serde_json::from_slice(p).expect("whole JSON"))
        .collect();
    assert!(
        texts.iter().all(|m| m.get("error_code").is_none()),
        "{texts:?}"
    );
    assert!(texts.iter().any(|m| m["finished"] == true), "{texts:?}");
    let (op, body) = frames.last().unwrap();
    assert_eq!(*op, clio_frame::frame::Opcode::Close);
    assert_eq!(&body[..2], &1000u16.to_be_bytes());
    assert_eq!(relay.handle.metrics().streams_resumed(), 1);
}
