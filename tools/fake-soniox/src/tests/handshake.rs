//! The upgrade and the first message: where the key may be, and what is refused.

use super::*;

#[test]
fn header_key_streams_words_then_finished_and_close() {
    let fake = start(FakeConfig {
        record_audio: true,
        ..FakeConfig::default()
    });
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    let mut sent = Vec::new();
    for i in 0..10 {
        let frame = pattern(FRAME, i);
        send_audio(&mut ws, &frame);
        sent.extend_from_slice(&frame);
    }
    send_audio(&mut ws, &[]);
    let (msgs, code) = read_to_close(&mut ws);
    assert_eq!(code, 1000);
    // 1200 ms at 480 ms a word: two words, then the 240 ms rest at the end.
    assert_eq!(final_words(&msgs), 3);
    let non_final = msgs
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["is_final"] == false)
        .count();
    assert!(non_final > 0, "partial words are shown: {msgs:?}");
    let first = msgs
        .iter()
        .flat_map(|m| m["tokens"].as_array().cloned().unwrap_or_default())
        .find(|t| t["is_final"] == true)
        .unwrap();
    assert_eq!(
        (first["start_ms"].as_u64(), first["end_ms"].as_u64()),
        (Some(0), Some(480))
    );
    assert_eq!(
        first["confidence"].as_f64().map(|c| c > 0.0 && c <= 1.0),
        Some(true)
    );
    assert!(msgs.iter().all(|m| m["total_audio_proc_ms"].is_u64()));
    let last = msgs.last().unwrap();
    assert_eq!(last["finished"], true);
    assert_eq!(last["final_audio_proc_ms"], 1200);
    assert_eq!(last["total_audio_proc_ms"], 1200);

    wait_for(&fake, "closed session", |s| s.len() == 1 && s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.key.as_deref(), Some(KEY));
    assert_eq!(rec.auth_via, Some(AuthVia::Header));
    assert_eq!(rec.request_path, "/transcribe-websocket");
    assert!(rec
        .request_headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == "Bearer fake-key-1"));
    assert_eq!(rec.config.as_ref().unwrap()["model"], "stt-rt-v4");
    assert_eq!(rec.text_messages, vec![CONFIG.to_owned()]);
    assert_eq!((rec.audio_frames, rec.audio_bytes), (10, 10 * FRAME as u64));
    assert!(rec.audio == sent, "audio recorded byte for byte");
    assert!(rec.empty_frame_received && rec.finished_sent);
    assert_eq!(rec.error_sent, None);
    assert_eq!(rec.client_close_code, Some(1000));
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn subprotocol_key_is_answered_with_the_subprotocol() {
    let fake = start(FakeConfig::default());
    let req = request(
        &fake,
        &[("sec-websocket-protocol", "soniox-api-key, fake-key-1")],
    );
    let (mut ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "soniox-api-key");
    send_text(&mut ws, CONFIG);
    send_text(&mut ws, ""); // end of audio as an empty text frame
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    wait_for(&fake, "closed session", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.auth_via, Some(AuthVia::Subprotocol));
    assert_eq!(rec.key.as_deref(), Some(KEY));
    assert!(rec.empty_frame_received);
}

#[test]
fn first_message_key_is_accepted() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v5","audio_format":"auto","extra":{"x":1}}"#,
    );
    send_audio(&mut ws, &pattern(16_000, 1)); // 1000 ms at the assumed 16 kB/s
    send_audio(&mut ws, &[]);
    let (msgs, _) = read_to_close(&mut ws);
    assert_eq!(final_words(&msgs), 2);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    wait_for(&fake, "closed session", |s| s[0].closed);
    let rec = &fake.sessions()[0];
    assert_eq!(rec.auth_via, Some(AuthVia::FirstMessage));
    assert_eq!(rec.key.as_deref(), Some(KEY));
}

#[test]
fn bad_key_in_first_message_is_a_401_error_message() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"nope","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    let err = expect_error(&mut ws, 401);
    assert_eq!(err["error_type"], "unauthenticated");
    wait_for(&fake, "closed session", |s| s[0].closed);
    assert_eq!(fake.sessions()[0].error_sent, Some(401));
    assert_eq!(fake.sessions()[0].key, None);
}

#[test]
fn no_key_anywhere_is_a_401_error_message() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[]).unwrap();
    send_text(&mut ws, CONFIG);
    expect_error(&mut ws, 401);
}

#[test]
fn bad_key_on_upgrade_is_http_401() {
    let fake = start(FakeConfig::default());
    let (status, body) = refused(&fake, &[("authorization", "Bearer wrong")]);
    assert_eq!(status, 401);
    assert_eq!(body["status_code"], 401);
    assert_eq!(body["error_type"], "unauthenticated");
    assert_eq!(body["message"], "Invalid API key.");
    assert!(body["request_id"].is_string());
    let (status, _) = refused(
        &fake,
        &[("sec-websocket-protocol", "soniox-api-key, wrong")],
    );
    assert_eq!(status, 401);
    wait_for(&fake, "two refused", |s| {
        s.len() == 2 && s.iter().all(|r| r.closed)
    });
    assert_eq!(fake.sessions()[0].http_status, Some(401));
    assert_eq!(fake.active_streams(), 0);
}

#[test]
fn rejected_key_and_wrong_path_are_refused() {
    let fake = start(FakeConfig {
        keys: vec![FakeKey {
            reject: Some(402),
            ..FakeKey::new("broke", 10)
        }],
        ..FakeConfig::default()
    });
    let (status, body) = refused(&fake, &[("authorization", "Bearer broke")]);
    assert_eq!((status, body["status_code"].as_u64()), (402, Some(402)));
    let req = format!("ws://{}/other", fake.addr());
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn key_in_both_places_is_400() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(
        &mut ws,
        r#"{"api_key":"fake-key-1","model":"stt-rt-v4","audio_format":"auto"}"#,
    );
    let err = expect_error(&mut ws, 400);
    assert!(err["error_message"].as_str().unwrap().contains("one place"));
}

#[test]
fn binary_first_message_is_400() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_audio(&mut ws, &[1, 2, 3]);
    let err = expect_error(&mut ws, 400);
    assert_eq!(
        err["error_message"],
        "Start request must be a text message."
    );
}

#[test]
fn bad_configs_are_400() {
    let fake = start(FakeConfig::default());
    for config in [
        r#"{"model":"stt-rt-v0","audio_format":"auto"}"#,
        r#"{"audio_format":"auto"}"#,
        r#"{"model":"stt-rt-v4"}"#,
        r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","num_channels":1}"#,
        r#"{"model":"stt-rt-v4","audio_format":"opus-ish"}"#,
        r#"["not","an","object"]"#,
        "not json",
    ] {
        let mut ws = connect(&fake, &[bearer()]).unwrap();
        send_text(&mut ws, config);
        expect_error(&mut ws, 400);
    }
    wait_for(&fake, "all closed", |s| {
        s.len() == 7 && s.iter().all(|r| r.closed)
    });
    assert_eq!(fake.active_streams(), 0);
}
