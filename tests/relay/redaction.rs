//! An upstream that echoes the account's key never shows it to a client,
//! however upstream's writes (and so the relay's reads) cut it: the key is
//! overwritten with `*`s, and every other byte still reaches the client.

use std::io::Write;
use std::time::Duration;

use tungstenite::Message;

use crate::util::*;

const KEY: &str = "sk-cut-by-reads-7d41c9e2b0";

/// The error message the upstream sends, as it sends it: with a string
/// that starts as the key does but is not the key (`near`), and the key.
fn error_text(key: &str) -> String {
    let near = format!("{}XYZ", &KEY[..10]);
    format!(
        r#"{{"tokens":[],"error_code":400,"error_message":"Invalid request near {near}: key {key} refused"}}"#
    )
}

/// The close reason the upstream sends after it.
fn close_reason(key: &str) -> String {
    format!("refused {key}")
}

/// An upstream that answers the first audio frame with a result (its
/// first message, whole), and the second with an error message and a
/// close frame that repeat the key, written under the WebSocket layer in
/// four TCP writes with a pause after each: the first ends inside a string
/// that starts as the key does (it is not the key), the second inside the
/// key in the error message, the third inside the key in the close reason.
fn upstream_cutting_the_key() -> String {
    ws_upstream(|_, mut ws| {
        let mut frames = 0;
        while let Ok(m) = ws.read() {
            if !matches!(m, Message::Binary(_)) {
                continue;
            }
            frames += 1;
            if frames == 1 {
                let result = r#"{"tokens":[{"text":"w ","start_ms":0,"end_ms":100,"is_final":true}],"final_audio_proc_ms":100,"total_audio_proc_ms":100}"#;
                if ws.send(Message::text(result)).is_err() {
                    return;
                }
                continue;
            }
            let error = raw_frame(0x81, None, error_text(KEY).as_bytes());
            let mut close_body = 1008u16.to_be_bytes().to_vec();
            close_body.extend_from_slice(close_reason(KEY).as_bytes());
            let close = raw_frame(0x88, None, &close_body);
            let near = error.windows(13).position(|w| w.ends_with(b"XYZ")).unwrap() + 10;
            let in_key = error.windows(KEY.len()).position(|w| w == KEY.as_bytes()).unwrap() + 7;
            let in_reason = error.len()
                + close
                    .windows(KEY.len())
                    .position(|w| w == KEY.as_bytes())
                    .unwrap()
                + 5;
            let bytes = [error, close].concat();
            let tcp = ws.get_mut();
            tcp.set_nodelay(true).unwrap();
            let mut from = 0;
            for to in [near, in_key, in_reason, bytes.len()] {
                if tcp.write_all(&bytes[from..to]).is_err() {
                    return;
                }
                let _ = tcp.flush();
                // Time for the relay to read this piece alone.
                std::thread::sleep(Duration::from_millis(300));
                from = to;
            }
            while ws.read().is_ok() {}
            return;
        }
    })
    .0
}

/// On each pump (raw audio's, which reads frames whole, and the one that
/// passes bytes on as read), the client gets the error message and the
/// close reason whole, with the key overwritten and nothing else changed.
/// Before, the second pump passed on the first part of a key a read cut,
/// and the second part no longer matched: the client saw the whole key.
#[test]
fn a_key_that_reads_cut_in_pieces_is_still_overwritten() {
    let stars = "*".repeat(KEY.len());
    for format in ["pcm_s16le", "auto"] {
        let relay = Relay::start(relay_config(
            &upstream_cutting_the_key(),
            &[("acct-a", KEY)],
        ));
        let (mut ws, _) = connect(relay.addr(), &relay.token("dev-1"), Via::Header).unwrap();
        let config = config_message(None).replace("pcm_s16le", format);
        ws.send(Message::text(config)).unwrap();
        for f in audio_frames(2, 1) {
            ws.send(Message::binary(f)).unwrap();
        }
        let got = read_all(&mut ws);
        let shown = format!("{got:?}");
        assert!(
            !shown.contains(KEY),
            "{format}: the client saw the key: {shown}"
        );
        assert_eq!(got.messages.len(), 2, "{format}: {shown}");
        let expected: serde_json::Value = serde_json::from_str(&error_text(&stars)).unwrap();
        assert_eq!(got.messages[1], expected, "{format}");
        let close = got
            .close
            .as_ref()
            .expect("upstream's close reached the client");
        assert_eq!(u16::from(close.code), 1008, "{format}");
        assert_eq!(close.reason.as_str(), close_reason(&stars), "{format}");
        assert!(
            relay.wait_idle(Duration::from_secs(10)),
            "{format}: the stream ended"
        );
    }
}
