//! Unit tests of the parent module.
use super::*;
use crate::frame::build_frame;

fn unmask_frames(bytes: &[u8]) -> Vec<(Opcode, Vec<u8>)> {
    let mut out = vec![];
    let mut at = 0;
    while at < bytes.len() {
        let h = parse_header(&bytes[at..], Sender::Client, 1 << 30)
            .unwrap()
            .unwrap();
        let mut p = bytes[at + h.header_len..at + h.header_len + h.payload_len as usize].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        out.push((h.opcode, p));
        at += h.header_len + h.payload_len as usize;
    }
    out
}

#[test]
fn remasks_frames_split_at_every_byte() {
    let frames: Vec<(Opcode, Vec<u8>)> = vec![
        (Opcode::Binary, (0..3200u32).map(|i| i as u8).collect()),
        (Opcode::Text, br#"{"type":"keepalive"}"#.to_vec()),
        (Opcode::Ping, b"p".to_vec()),
        (Opcode::Binary, vec![]),
        (Opcode::Binary, vec![7; 70_000]),
    ];
    let mut wire = vec![];
    for (i, (op, p)) in frames.iter().enumerate() {
        wire.extend(build_frame(*op, p, Some([i as u8, 0x55, 0xAA, 3])));
    }
    for chunk in [1usize, 2, 5, 13, 100, 4096, 1 << 20] {
        let mut scanner = FrameScanner::new(Sender::Client, 1 << 20);
        let mut masks = MaskKeys::default();
        let mut carry: Vec<u8> = vec![];
        let mut sent = vec![];
        let (mut done, mut data) = (0, 0);
        for piece in wire.chunks(chunk) {
            carry.extend_from_slice(piece);
            let s = scanner.scan(&mut carry, Some(&mut masks));
            sent.extend_from_slice(&carry[..s.ready]);
            carry.drain(..s.ready);
            done += s.frames_done;
            data += s.data_frames_started;
        }
        assert!(carry.is_empty());
        assert_eq!((done, data), (5, 4), "chunk {chunk}");
        assert_eq!(sent.len(), wire.len());
        assert_ne!(sent, wire, "keys changed");
        assert_eq!(unmask_frames(&sent), frames, "chunk {chunk}");
    }
}

#[test]
fn stops_after_close_and_rejects_violations() {
    let mut wire = build_frame(
        Opcode::Close,
        &crate::frame::close_payload(1000, "bye"),
        Some([1, 2, 3, 4]),
    );
    let close_len = wire.len();
    wire.extend(build_frame(Opcode::Binary, b"after", Some([1, 2, 3, 4])));
    let mut s = FrameScanner::new(Sender::Client, 100);
    let scan = s.scan(&mut wire, Some(&mut MaskKeys::default()));
    assert_eq!(
        (scan.ready, scan.close_done, scan.frames_done),
        (close_len, true, 1)
    );

    // A good frame, then an unmasked one in the same read: the good one
    // is still ready to forward, and the violation is reported after it.
    let mut wire = build_frame(Opcode::Binary, b"good", Some([1, 2, 3, 4]));
    let good = wire.len();
    wire.extend(build_frame(Opcode::Binary, b"x", None));
    let mut s = FrameScanner::new(Sender::Client, 100);
    let scan = s.scan(&mut wire, Some(&mut MaskKeys::default()));
    assert_eq!(
        (scan.ready, scan.frames_done, scan.violation),
        (good, 1, Some(FrameError::Masking))
    );
    let mut big = build_frame(Opcode::Binary, &[0; 101], Some([0; 4]));
    let mut s = FrameScanner::new(Sender::Client, 100);
    let scan = s.scan(&mut big, Some(&mut MaskKeys::default()));
    assert_eq!((scan.ready, scan.violation), (0, Some(FrameError::TooBig)));
}

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
