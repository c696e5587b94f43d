//! Unit tests of the parent module.
use super::*;
use clio_frame::frame::build_frame;

#[test]
fn passes_server_frames_untouched_and_reads_first_errors() {
    let err = br#"{"tokens":[],"error_code":401,"error_message":"Invalid API key."}"#;
    let mut wire = build_frame(Opcode::Text, err, None);
    let original = wire.clone();
    let mut s = FrameScanner::new(Sender::Server, 1 << 20);
    let scan = s.scan(&mut wire, None);
    assert_eq!((scan.ready, scan.frames_done), (wire.len(), 1));
    assert_eq!(wire, original);
    assert!(matches!(
        first_message_error(&wire),
        FirstMessage::Error(401, RateScope::Project)
    ));
    assert!(matches!(
        first_message_error(&wire[..wire.len() - 1]),
        FirstMessage::Incomplete
    ));
    let ok = build_frame(Opcode::Text, br#"{"tokens":[{"text":"hi"}]}"#, None);
    assert!(matches!(first_message_error(&ok), FirstMessage::Other));
}

#[test]
fn reads_a_first_error_sent_in_fragments_once_all_are_in() {
    use clio_frame::frame::build_fragment;
    let err = br#"{"tokens":[],"error_code":503,"error_message":"Cannot continue request"}"#;
    let (a, rest) = err.split_at(7);
    let (b, c) = rest.split_at(30);
    let mut wire = build_fragment(Opcode::Text, false, a, None);
    wire.extend(build_fragment(Opcode::Pong, true, b"p", None));
    wire.extend(build_fragment(Opcode::Continuation, false, b, None));
    wire.extend(build_fragment(Opcode::Continuation, true, c, None));
    assert!(matches!(
        first_message_error(&wire),
        FirstMessage::Error(503, _)
    ));
    // Cut anywhere, it is not whole yet.
    for cut in 1..wire.len() {
        assert!(
            matches!(first_message_error(&wire[..cut]), FirstMessage::Incomplete),
            "{cut}"
        );
    }
    // A result in fragments is no error; fragments out of order, or a close
    // among them, are left to the scanner.
    let mut ok = build_fragment(Opcode::Text, false, br#"{"tokens":"#, None);
    ok.extend(build_fragment(Opcode::Continuation, true, b"[]}", None));
    assert!(matches!(first_message_error(&ok), FirstMessage::Other));
    let mut bad = build_fragment(Opcode::Text, false, a, None);
    bad.extend(build_fragment(Opcode::Text, true, b, None));
    assert!(matches!(first_message_error(&bad), FirstMessage::Other));
    let mut closed = build_fragment(Opcode::Text, false, a, None);
    closed.extend(build_frame(Opcode::Close, &[0x03, 0xe8], None));
    assert!(matches!(first_message_error(&closed), FirstMessage::Other));
}

#[test]
fn reads_upstreams_last_word_field_by_field() {
    use state::{upstream_said, UpstreamSaid};
    let said = |s: &str| upstream_said(s.as_bytes());
    let error = |code, scope| {
        Some(UpstreamSaid {
            error: Some((code, scope)),
            ..Default::default()
        })
    };
    let org = r#"{"tokens":[],"error_code":429,"error_message":"Organization concurrency limit"}"#;
    assert_eq!(said(org), error(429, RateScope::Organization));
    // A code as a string, as a whole float, with no message or a `null` one.
    for shape in [
        r#"{"tokens":[],"error_code":"503","error_message":"Cannot continue request"}"#,
        r#"{"tokens":[],"error_code":503.0}"#,
        r#"{"tokens":[],"error_code":503,"error_message":null}"#,
        r#"{"error_code":" 503 ","error_message":7}"#,
    ] {
        assert_eq!(said(shape), error(503, RateScope::Project), "{shape}");
    }
    // An error whose code is no number is an error all the same.
    for shape in [
        r#"{"tokens":[],"error_code":"bad","error_message":"x"}"#,
        r#"{"error_code":70000}"#,
        r#"{"error_code":-1}"#,
        r#"{"error_code":{}}"#,
    ] {
        assert_eq!(said(shape), error(0, RateScope::Project), "{shape}");
    }
    // `finished` with a figure of any number type.
    for (shape, ms) in [
        (
            r#"{"tokens":[],"finished":true,"total_audio_proc_ms":1680}"#,
            Some(1680),
        ),
        (
            r#"{"tokens":[],"finished":true,"total_audio_proc_ms":1680.5}"#,
            Some(1680),
        ),
        (
            r#"{"tokens":[],"finished":true,"total_audio_proc_ms":null}"#,
            None,
        ),
        (r#"{"finished":true,"total_audio_proc_ms":"x"}"#, None),
    ] {
        let s = said(shape).unwrap();
        assert!(s.finished && s.error.is_none(), "{shape}");
        assert_eq!(s.total_audio_proc_ms, ms, "{shape}");
    }
    // Neither: a result, `"finished": false`, an `error_code` of `null`.
    for shape in [
        r#"{"tokens":[{"text":"finished"}],"total_audio_proc_ms":5}"#,
        r#"{"tokens":[],"finished":false}"#,
        r#"{"tokens":[],"error_code":null}"#,
    ] {
        let s = said(shape).unwrap();
        assert!(!s.finished && s.error.is_none(), "{shape}");
    }
    assert_eq!(said("[1]"), None);
    assert_eq!(said("not json"), None);
}

/// A `<fin>` is counted once per message that has it, however the message
/// comes in pieces: cut at every pair of points (so `<fin>` itself split
/// in two or three), and beside messages without one.
#[test]
fn counts_each_fin_whatever_the_pieces() {
    let with = br#"{"tokens":[{"text":"x"},{"text":"<fin>"}],"total_audio_proc_ms":9}"#;
    let without = br#"{"tokens":[{"text":"<fi"},{"text":"n>"}],"fin":"<fin"}"#;
    for (msg, fins) in [(&with[..], 1), (&without[..], 0)] {
        for a in 0..=msg.len() {
            for b in a..=msg.len() {
                let state = StreamState::new(Instant::now());
                // A message before, whole, with its own `<fin>`.
                state.note_upstream_piece(b"<fin>", true, true);
                let pieces = [&msg[..a], &msg[a..b], &msg[b..]];
                for (i, p) in pieces.iter().enumerate() {
                    state.note_upstream_piece(p, i == 0, i == 2);
                }
                // And one after, whole, without.
                state.note_upstream_piece(b"{}", true, true);
                assert_eq!(state.down.fins.get(), 1 + fins, "cut at {a} and {b}");
            }
        }
    }
}

/// A `finished` or an error that comes in pieces is read as a whole one
/// is, wherever the cuts fall; one past the join's bound is not copied
/// (and not read), though its `<fin>` is still counted.
#[test]
fn reads_a_last_word_whatever_the_pieces() {
    let finished =
        br#"{"tokens":[],"final_audio_proc_ms":1560,"total_audio_proc_ms":1680,"finished":true}"#;
    let error = br#"{"tokens":[],"error_code":429,"error_message":"too many"}"#;
    for msg in [&finished[..], &error[..]] {
        for a in 0..=msg.len() {
            for b in a..=msg.len() {
                let state = StreamState::new(Instant::now());
                let pieces = [&msg[..a], &msg[a..b], &msg[b..]];
                for (i, p) in pieces.iter().enumerate() {
                    state.note_upstream_piece(p, i == 0, i == 2);
                }
                assert!(state.down.last_word_seen.get(), "cut at {a} and {b}");
                assert!(state.down.joined.borrow().is_none(), "let go");
                if msg == finished {
                    assert_eq!(state.meter.upstream_audio_ms.get(), Some(1680));
                } else {
                    assert_eq!(state.meter.upstream_error(), Some(429));
                }
            }
        }
    }
    let long = format!(
        r#"{{"tokens":[{{"text":"{}"}},{{"text":"<fin>"}}],"finished":true}}"#,
        "x".repeat(JOINED_TEXT_MAX)
    );
    let state = StreamState::new(Instant::now());
    let (a, b) = long.as_bytes().split_at(100);
    state.note_upstream_piece(a, true, false);
    state.note_upstream_piece(b, false, true);
    assert_eq!(state.down.fins.get(), 1);
    assert!(!state.down.last_word_seen.get(), "over the bound: not read");
}
