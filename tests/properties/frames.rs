//! `FrameScanner`, `parse_header` and masking.

use clio_frame::frame::{parse_header, write_header, FrameError, Opcode, Sender, MAX_HEADER_LEN};
use clio_frame::mask::{apply_mask, apply_mask_bytewise, rekey};
use proptest::prelude::*;

use crate::checks::{agrees, decode, pump};

/// One frame to send: what a peer means, before encoding.
#[derive(Debug, Clone)]
struct Frame {
    fin: bool,
    opcode: Opcode,
    payload: Vec<u8>,
    key: [u8; 4],
}

fn data_opcode() -> impl Strategy<Value = Opcode> {
    prop_oneof![
        Just(Opcode::Text),
        Just(Opcode::Binary),
        Just(Opcode::Continuation)
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let data = (
        any::<bool>(),
        data_opcode(),
        prop_oneof![
            8 => proptest::collection::vec(any::<u8>(), 0..200),
            2 => proptest::collection::vec(any::<u8>(), 126..1_000),
            1 => proptest::collection::vec(any::<u8>(), 65_536..66_000),
        ],
        any::<[u8; 4]>(),
    )
        .prop_map(|(fin, opcode, payload, key)| Frame {
            fin,
            opcode,
            payload,
            key,
        });
    let control = (
        prop_oneof![Just(Opcode::Ping), Just(Opcode::Pong)],
        proptest::collection::vec(any::<u8>(), 0..=125),
        any::<[u8; 4]>(),
    )
        .prop_map(|(opcode, payload, key)| Frame {
            fin: true,
            opcode,
            payload,
            key,
        });
    prop_oneof![6 => data, 1 => control]
}

/// `frames` with their data opcodes put in an order RFC 6455 §5.4 allows
/// (a continuation exactly when a fragmented message is open), and text
/// messages made UTF-8 (here ASCII; `utf8.rs` tests characters split
/// anywhere).
fn in_order(mut frames: Vec<Frame>) -> Vec<Frame> {
    let mut open = false;
    let mut text = false;
    for f in frames.iter_mut().filter(|f| !f.opcode.is_control()) {
        f.opcode = match (open, f.opcode) {
            (true, _) => Opcode::Continuation,
            (false, Opcode::Continuation) => Opcode::Binary,
            (false, op) => op,
        };
        if f.opcode != Opcode::Continuation {
            text = f.opcode == Opcode::Text;
        }
        if text {
            f.payload.iter_mut().for_each(|b| *b &= 0x7f);
        }
        open = !f.fin;
    }
    frames
}

fn encode(frames: &[Frame], from: Sender) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let key = (from == Sender::Client).then_some(f.key);
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut h, f.fin, f.opcode, key, f.payload.len() as u64);
        out.extend_from_slice(&h[..n]);
        let at = out.len();
        out.extend_from_slice(&f.payload);
        if let Some(k) = key {
            apply_mask(&mut out[at..], k, 0);
        }
    }
    out
}

/// What may follow the generated frames: nothing, a close frame (after
/// which nothing is read), or a frame that breaks the protocol.
fn tail() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(vec![]),
        1 => Just(vec![0x88, 0x82, 1, 2, 3, 4, 0x02, 0xe9, 0x81, 0x80]), // close 1000 (masked) + garbage
        1 => Just(vec![0x88, 0x02, 0x03, 0xe8, 0x81, 0x00]),             // close 1000 (unmasked) + garbage
        1 => Just(vec![0x83, 0x80, 0, 0, 0, 0]),                          // reserved opcode
        1 => Just(vec![0xc2, 0x80, 0, 0, 0, 0]),                          // RSV1 (deflate) set
        1 => Just(vec![0x09, 0x80, 0, 0, 0, 0]),                          // fragmented ping
        1 => Just(vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]), // 64-bit length, top bit
        1 => Just(vec![0x82, 0xfe, 0xff, 0xff, 1, 2, 3, 4]),              // over the limit below
        1 => Just(vec![0x82, 0x7e, 0x00, 0x10]),                          // unmasked 126-length
        1 => Just(vec![0x80, 0x80, 0, 0, 0, 0]),                          // continuation: bad unless a message is open
        1 => Just(vec![0x81, 0x80, 0, 0, 0, 0]),                          // text: bad inside an open message
        1 => Just(vec![0x81, 0x82, 0, 0, 0, 0, 0xc3, 0x28]),              // client text, not UTF-8
        1 => Just(vec![0x88, 0x81, 0, 0, 0, 0, 0x03]),                    // client close, a 1-byte body
        1 => Just(vec![0x88, 0x82, 0, 0, 0, 0, 0x03, 0xed]),              // client close, code 1005
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any chunking of any frame sequence gives what the whole gives: the
    /// same frames forwarded (re-masked, same content), the same counts,
    /// the same close or violation.
    #[test]
    fn any_chunking_gives_the_whole(
        frames in proptest::collection::vec(frame(), 0..12).prop_map(in_order),
        tail in tail(),
        client in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let from = if client { Sender::Client } else { Sender::Server };
        let mut input = encode(&frames, from);
        input.extend_from_slice(&tail);
        let max = 65_000u64.max(frames.iter().map(|f| f.payload.len() as u64).max().unwrap_or(0));
        let whole = pump(&input, &[], from, max);
        let chunked = pump(&input, &cuts, from, max);
        // One byte per read too, where that stays quick.
        let bytewise = (input.len() <= 4096).then(|| pump(&input, &(0..input.len()).collect::<Vec<_>>(), from, max));
        for other in [Some(&chunked), bytewise.as_ref()].into_iter().flatten() {
            prop_assert!(agrees(&whole, other, from), "whole {:?}\nother {:?}", whole, other);
        }
        // Every generated frame is forwarded whole and unchanged in meaning.
        let sent: Vec<_> = frames.iter().map(|f| (f.fin, f.opcode, f.payload.clone())).collect();
        let got = decode(&whole.forwarded, from);
        prop_assert_eq!(&got[..sent.len()], &sent[..]);
        prop_assert!(got.len() <= sent.len() + 1);
        let audio: u64 = {
            let mut binary = false;
            frames.iter().map(|f| {
                match f.opcode { Opcode::Binary => binary = true, Opcode::Text => binary = false, _ => {} }
                if !f.opcode.is_control() && binary { f.payload.len() as u64 } else { 0 }
            }).sum()
        };
        prop_assert_eq!(whole.binary_bytes, audio);
        if from == Sender::Server {
            // Server frames leave exactly as read.
            prop_assert_eq!(&whole.forwarded[..], &input[..whole.forwarded.len()]);
        }
    }

    /// The header parser reads any prefix of a header as "need more" or as
    /// exactly what the whole header gives, never as something else.
    #[test]
    fn header_prefixes_agree_with_the_whole(bytes in proptest::collection::vec(any::<u8>(), 0..16), client in any::<bool>(), max in any::<u64>()) {
        let from = if client { Sender::Client } else { Sender::Server };
        let whole = parse_header(&bytes, from, max);
        if let Ok(Some(h)) = &whole {
            prop_assert!(h.header_len <= bytes.len() && (2..=14).contains(&h.header_len));
            prop_assert!(h.payload_len <= max && h.payload_len >> 63 == 0);
            prop_assert_eq!(h.mask.is_some(), client);
            prop_assert!(!h.opcode.is_control() || (h.fin && h.payload_len <= 125));
        }
        for k in 0..bytes.len() {
            match parse_header(&bytes[..k], from, max) {
                Ok(None) => {}
                prefix => prop_assert_eq!(prefix, whole, "prefix of {} bytes", k),
            }
        }
    }

    /// A header written by `write_header` parses back to what was written.
    #[test]
    fn written_headers_parse_back(fin in any::<bool>(), op in 0usize..6, key in proptest::option::of(any::<[u8; 4]>()), len in prop_oneof![0u64..126, 126u64..70_000, 65_536u64..(1 << 62)]) {
        let ops = [Opcode::Continuation, Opcode::Text, Opcode::Binary, Opcode::Close, Opcode::Ping, Opcode::Pong];
        let opcode = ops[op];
        let (fin, len) = if opcode.is_control() { (true, len % 126) } else { (fin, len) };
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut h, fin, opcode, key, len);
        let from = if key.is_some() { Sender::Client } else { Sender::Server };
        let parsed = parse_header(&h[..n], from, u64::MAX).unwrap().unwrap();
        prop_assert_eq!((parsed.fin, parsed.opcode, parsed.mask, parsed.payload_len, parsed.header_len), (fin, opcode, key, len, n));
        prop_assert_eq!(parse_header(&h[..n], from, len.saturating_sub(1)), if len == 0 { Ok(Some(parsed)) } else { Err(FrameError::TooBig) });
    }

    /// The 8-bytes-at-a-time mask equals the byte-by-byte reference at any
    /// length, alignment and phase, and masking in pieces equals the whole.
    #[test]
    fn masking_matches_the_bytewise_reference(
        data in proptest::collection::vec(any::<u8>(), 0..300),
        offset in 0usize..8,
        key in any::<[u8; 4]>(),
        phase in any::<usize>(),
        split in any::<usize>(),
    ) {
        let offset = offset.min(data.len());
        let mut fast = data.clone();
        let mut slow = data.clone();
        apply_mask(&mut fast[offset..], key, phase);
        apply_mask_bytewise(&mut slow[offset..], key, phase);
        prop_assert_eq!(&fast, &slow);
        let mut pieces = data.clone();
        let at = split % (data.len() + 1);
        apply_mask(&mut pieces[..at], key, phase);
        apply_mask(&mut pieces[at..], key, phase.wrapping_add(at));
        let mut whole = data.clone();
        apply_mask(&mut whole, key, phase);
        prop_assert_eq!(&pieces, &whole);
    }

    /// Re-masking with `rekey(old, new)` turns a frame masked with `old`
    /// into the same frame masked with `new`.
    #[test]
    fn rekeying_is_masking_with_the_new_key(data in proptest::collection::vec(any::<u8>(), 0..100), old in any::<[u8; 4]>(), new in any::<[u8; 4]>()) {
        let mut a = data.clone();
        apply_mask(&mut a, old, 0);
        apply_mask(&mut a, rekey(old, new), 0);
        let mut b = data;
        apply_mask(&mut b, new, 0);
        prop_assert_eq!(a, b);
    }
}
