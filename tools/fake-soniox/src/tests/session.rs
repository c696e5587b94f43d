//! A session's behaviour: finalize, limits, echo, scripted errors and closes, idle and keepalive, protocol violations, delays.

use super::*;

#[test]
fn finalize_makes_pending_audio_final_and_sends_fin() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_text(&mut ws, r#"{"type":"keepalive"}"#);
    send_audio(&mut ws, &pattern(32 * 300, 0)); // 300 ms: a partial word
    let partial = read_json(&mut ws);
    assert_eq!(partial["tokens"][0]["is_final"], false);
    send_text(&mut ws, r#"{"type":"finalize"}"#);
    let fin = read_json(&mut ws);
    let tokens = fin["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{fin}");
    assert_eq!(tokens[0]["text"], partial["tokens"][0]["text"]);
    assert_eq!(tokens[0]["is_final"], true);
    assert_eq!(tokens[1]["text"], "<fin>");
    assert_eq!(tokens[1]["is_final"], true);
    assert_eq!(fin["final_audio_proc_ms"], 300);
    send_text(&mut ws, r#"{"type":"dance"}"#);
    expect_error(&mut ws, 400);
}

/// Each shape of the `<fin>` result's delivery is valid WebSocket: a
/// reader of whole messages gets the same result (and, trailed, one more
/// with no tokens), however the bytes were cut.
#[test]
fn the_fin_result_arrives_whole_in_every_delivery() {
    for delivery in [FinDelivery::Whole, FinDelivery::Split, FinDelivery::Trailed] {
        let fake = start(FakeConfig {
            faults: Faults {
                fin_delivery: delivery,
                ..Faults::default()
            },
            ..FakeConfig::default()
        });
        let mut ws = connect(&fake, &[bearer()]).unwrap();
        send_text(&mut ws, CONFIG);
        send_audio(&mut ws, &pattern(32 * 300, 0));
        let partial = read_json(&mut ws);
        send_text(&mut ws, r#"{"type":"finalize"}"#);
        let fin = read_json(&mut ws);
        let tokens = fin["tokens"].as_array().unwrap();
        assert_eq!(
            tokens[0]["text"], partial["tokens"][0]["text"],
            "{delivery:?}"
        );
        assert_eq!(tokens[1]["text"], "<fin>", "{delivery:?}");
        if delivery == FinDelivery::Trailed {
            let next = read_json(&mut ws);
            assert_eq!(next["tokens"], serde_json::json!([]), "{delivery:?}");
            assert_eq!(next["final_audio_proc_ms"], fin["final_audio_proc_ms"]);
        }
        // The session goes on as usual after it.
        send_audio(&mut ws, &[]);
        let (msgs, _) = read_to_close(&mut ws);
        assert_eq!(msgs.last().unwrap()["finished"], true, "{delivery:?}");
    }
    assert_eq!("split".parse(), Ok(FinDelivery::Split));
    assert!("halves".parse::<FinDelivery>().is_err());
}

#[test]
fn concurrency_limit_is_429_until_a_slot_frees() {
    let fake = start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 1)],
        ..FakeConfig::default()
    });
    let mut first = connect(&fake, &[bearer()]).unwrap();
    let (status, body) = refused(&fake, &[bearer()]);
    assert_eq!(status, 429);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("concurrency limit"));
    // The same limit applies to a key sent in the first message.
    let mut legacy = connect(&fake, &[]).unwrap();
    send_text(
        &mut legacy,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    expect_error(&mut legacy, 429);

    first
        .close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        }))
        .unwrap();
    while first.read().is_ok() {}
    let deadline = Instant::now() + READ_TIMEOUT;
    while fake.active_streams() != 0 {
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut again = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut again, CONFIG);
    send_audio(&mut again, &[]);
    let (msgs, _) = read_to_close(&mut again);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    let recs = fake.sessions();
    assert_eq!(recs[0].client_close_code, Some(1000));
    assert!(!recs[0].finished_sent);
}

#[test]
fn echo_mode_returns_the_marker() {
    let fake = start(FakeConfig {
        echo: true,
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for i in 0..3u8 {
        let mut frame = vec![0u8; 3200]; // 100 ms
        for (j, b) in frame.iter_mut().take(16).enumerate() {
            *b = i * 16 + j as u8;
        }
        send_audio(&mut ws, &frame);
        let msg = read_json(&mut ws);
        let tokens = msg["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 1);
        let expected: String = frame[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(tokens[0]["text"], expected);
        assert_eq!(tokens[0]["is_final"], true);
        assert_eq!(tokens[0]["start_ms"], u64::from(i) * 100);
        assert_eq!(tokens[0]["end_ms"], u64::from(i) * 100 + 100);
    }
    send_audio(&mut ws, &[1, 2, 3]); // too short to echo
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.len(), 1, "only finished: {msgs:?}");
    assert_eq!(msgs[0]["finished"], true);
}

#[test]
fn error_after_frames_sends_the_error_and_closes() {
    let fake = start(FakeConfig {
        faults: Faults {
            error_after_frames: Some((3, 503)),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for _ in 0..3 {
        send_audio(&mut ws, &[0; 320]); // 10 ms: no words
    }
    let err = expect_error(&mut ws, 503);
    assert_eq!(err["error_message"], "Cannot continue request.");
    wait_for(&fake, "closed", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!((rec.audio_frames, rec.error_sent), (3, Some(503)));
}

#[test]
fn random_faults_fail_the_chosen_share_at_a_chosen_frame() {
    let r = RandomFaults {
        share: 0.5,
        kinds: vec![
            FaultKind::Drop,
            FaultKind::Error(503),
            FaultKind::Error(500),
        ],
        within_frames: 20,
        seed: 7,
    };
    let picks: Vec<_> = (1..=1000).map(|id| r.pick(id)).collect();
    let failing = picks.iter().flatten().count();
    assert!((400..600).contains(&failing), "{failing} of 1000");
    for kind in &r.kinds {
        assert!(picks.iter().flatten().any(|(_, k)| k == kind), "{kind:?}");
    }
    assert!(picks.iter().flatten().all(|(n, _)| (1..=20).contains(n)));
    assert_eq!(picks, (1..=1000).map(|id| r.pick(id)).collect::<Vec<_>>());

    // Every session fails with 500 at its first audio frame.
    let fake = start(FakeConfig {
        faults: Faults {
            random: Some(RandomFaults {
                share: 1.0,
                kinds: vec![FaultKind::Error(500)],
                within_frames: 1,
                seed: 1,
            }),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[0; 320]);
    expect_error(&mut ws, 500);
}

#[test]
fn refuse_at_first_message_answers_the_config_with_the_error() {
    let fake = start(FakeConfig {
        faults: Faults {
            refuse_at_first_message: vec![(KEY.to_owned(), 402)],
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    // The upgrade succeeds; the config message gets the refusal.
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    expect_error(&mut ws, 402);
}

#[test]
fn close_after_frames_drops_the_connection_without_close_frame() {
    let fake = start(FakeConfig {
        faults: Faults {
            close_after_frames: Some(2),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[0; 320]);
    send_audio(&mut ws, &[0; 320]);
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => panic!("got a close frame {f:?}"),
            Ok(Message::Text(t)) => panic!("got a message {t}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("connection not dropped within the read timeout")
            }
            Err(_) => break,
        }
    }
    wait_for(&fake, "closed", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.audio_frames, 2);
    assert!(!rec.finished_sent && rec.error_sent.is_none());
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn idle_session_gets_408() {
    let fake = start(FakeConfig {
        idle_timeout: Duration::from_millis(200),
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    let err = expect_error(&mut ws, 408);
    assert_eq!(err["error_type"], "request_timeout");
}

#[test]
fn keepalive_keeps_an_idle_session_open() {
    let fake = start(FakeConfig {
        idle_timeout: Duration::from_millis(1000),
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(200));
        send_text(&mut ws, r#"{"type":"keepalive"}"#);
    }
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["finished"], true);
}

#[test]
fn forbidden_string_in_header_is_a_violation() {
    let fake = start(FakeConfig {
        forbidden: vec!["sess-secret-123".to_owned()],
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer(), ("x-clio-session", "sess-secret-123")]).unwrap();
    let err = expect_error(&mut ws, 400);
    assert_eq!(err["error_message"], "forbidden string");
    let v = fake.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("x-clio-session") && !v[0].contains("sess-secret-123"));
}

#[test]
fn forbidden_string_in_a_text_message_is_a_violation() {
    let fake = start(FakeConfig {
        forbidden: vec!["sess-secret-123".to_owned()],
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(
        &mut ws,
        r#"{"model":"stt-rt-v4","audio_format":"auto","client_reference_id":"sess-secret-123"}"#,
    );
    expect_error(&mut ws, 400);
    let v = fake.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("text message"));
}

#[test]
fn handshake_delay_holds_the_upgrade() {
    let fake = start(FakeConfig {
        faults: Faults {
            handshake_delay: Duration::from_millis(200),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    let t0 = Instant::now();
    let _ws = connect(&fake, &[bearer()]).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(200));
}
