//! The server as a whole: shards on one port, TLS, stop, many sessions at once.

use super::*;

#[test]
fn shards_share_the_port() {
    let fake = start(FakeConfig {
        shards: 2,
        ..FakeConfig::default()
    });
    let mut conns: Vec<Ws> = (0..6)
        .map(|_| connect(&fake, &[bearer()]).unwrap())
        .collect();
    for ws in &mut conns {
        send_text(ws, CONFIG);
        send_audio(ws, &pattern(FRAME * 8, 3)); // 960 ms
        send_audio(ws, &[]);
    }
    for ws in &mut conns {
        let (msgs, code) = read_to_close(ws);
        assert_eq!(code, 1000);
        assert_eq!(final_words(&msgs), 2);
    }
    fake.stop();
}

#[test]
fn tls_with_a_test_ca() {
    let (server, client) = test_tls();
    let fake = start(FakeConfig {
        tls: Some(server),
        ..FakeConfig::default()
    });
    assert!(fake.url().starts_with("wss://localhost:"));

    let tls = tls_connect(&fake, client);
    let (mut ws, _) = tungstenite::client::client(request(&fake, &[bearer()]), tls).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &pattern(FRAME * 4, 9));
    send_audio(&mut ws, &[]);
    let (msgs, code) = read_to_close(&mut ws);
    assert_eq!(code, 1000);
    assert_eq!(final_words(&msgs), 1);
    assert_eq!(msgs.last().unwrap()["finished"], true);
}

#[test]
fn stop_ends_live_sessions() {
    let fake = start(FakeConfig::default());
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[0; 320]);
    wait_for(&fake, "audio seen", |s| {
        !s.is_empty() && s[0].config.is_some()
    });
    assert_eq!(fake.active_streams(), 1);
    fake.stop();
    // The client sees its connection end (no hang until the read timeout).
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("connection still open after stop")
            }
            Err(_) => break,
        }
    }
}

#[test]
fn many_echo_sessions_in_parallel() {
    let fake = Arc::new(start(FakeConfig {
        echo: true,
        shards: 2,
        keys: vec![FakeKey::new(KEY, 100)],
        ..FakeConfig::default()
    }));
    let clients: Vec<_> = (0..32u32)
        .map(|c| {
            let fake = fake.clone();
            std::thread::spawn(move || {
                let mut ws = connect(&fake, &[bearer()]).unwrap();
                send_text(&mut ws, CONFIG);
                for seq in 0..50u32 {
                    let mut frame = vec![0u8; 640];
                    frame[..4].copy_from_slice(&c.to_be_bytes());
                    frame[4..8].copy_from_slice(&seq.to_be_bytes());
                    send_audio(&mut ws, &frame);
                    let msg = read_json(&mut ws);
                    let expected: String = frame[..16].iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(msg["tokens"][0]["text"], expected);
                }
                send_audio(&mut ws, &[]);
                let (msgs, _) = read_to_close(&mut ws);
                assert_eq!(msgs.last().unwrap()["finished"], true);
                assert_eq!(msgs.last().unwrap()["total_audio_proc_ms"], 1000);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    wait_for(&fake, "all closed", |s| {
        s.len() == 32 && s.iter().all(|r| r.closed)
    });
    assert!(fake
        .sessions()
        .iter()
        .all(|r| r.audio_frames == 50 && r.finished_sent));
    assert_eq!(fake.active_streams(), 0);
}
