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
