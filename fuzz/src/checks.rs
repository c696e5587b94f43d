//! What each fuzz target checks, on any bytes. A check panics when the
//! relay's code breaks a property; libFuzzer then saves the input.
//!
//! The same file is compiled into the relay's tests (`tests/fuzz_seeds.rs`
//! runs every check over the seeds in `fuzz/seeds/`, and
//! `tests/properties` uses its frame pump), so the checks cannot rot while
//! nobody fuzzes.

use clio_frame::frame::{parse_header, write_header, FrameError, Opcode, Sender, MAX_HEADER_LEN};
use clio_frame::mask::{apply_mask, apply_mask_bytewise, rekey, MaskKeys};
use clio_frame::scanner::FrameScanner;
use clio_relay::dataplane::http::{
    check_upstream_answer, header_slots, parse_client_request, upgrade_response, TokenSource,
};

/// What a pump makes of a byte stream that arrives in pieces: the bytes it
/// forwards and the scanner's counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Pumped {
    /// Bytes forwarded, in order.
    pub forwarded: Vec<u8>,
    /// Frames completed.
    pub frames: u32,
    /// Data frames started.
    pub data_frames: u32,
    /// Payload bytes of binary messages.
    pub binary_bytes: u64,
    /// Ended at a close frame.
    pub close: bool,
    /// Ended at a protocol violation.
    pub violation: Option<FrameError>,
}

/// Feeds `input` to a [`FrameScanner`] in the pieces that the cut points
/// `cuts` (taken modulo the input's length) make, the way the pump does:
/// a partial header stays for the next read, and a close or a violation
/// ends it.
pub fn pump(input: &[u8], cuts: &[usize], from: Sender, max: u64) -> Pumped {
    let mut scanner = FrameScanner::new(from, max);
    let mut masks = MaskKeys::default();
    let mut window: Vec<u8> = Vec::new();
    let mut out = Pumped {
        forwarded: Vec::new(),
        frames: 0,
        data_frames: 0,
        binary_bytes: 0,
        close: false,
        violation: None,
    };
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut last = 0;
    for p in points {
        window.extend_from_slice(&input[last..p]);
        last = p;
        let masks = (from == Sender::Client).then_some(&mut masks);
        let s = scanner.scan(&mut window, masks);
        assert!(s.ready <= window.len());
        out.forwarded.extend_from_slice(&window[..s.ready]);
        window.drain(..s.ready);
        out.frames += s.frames_done;
        out.data_frames += s.data_frames_started;
        out.binary_bytes += s.binary_bytes;
        if s.close_done || s.violation.is_some() {
            out.close = s.close_done;
            out.violation = s.violation;
            break;
        }
        // A partial header is all a window may keep between reads.
        assert!(
            window.len() < MAX_HEADER_LEN,
            "{} bytes held back",
            window.len()
        );
    }
    out
}

/// Decodes forwarded bytes back into (fin, opcode, payload), unmasking with
/// whatever key each frame now carries (the relay's fresh ones, for client
/// frames). The last frame may be cut short: the input ended inside it.
pub fn decode(mut bytes: &[u8], from: Sender) -> Vec<(bool, Opcode, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let h = parse_header(bytes, from, u64::MAX >> 1)
            .expect("forwarded bytes are valid frames")
            .expect("forwarded bytes hold whole headers");
        let end = (h.header_len as u64 + h.payload_len).min(bytes.len() as u64) as usize;
        let mut payload = bytes[h.header_len..end].to_vec();
        if let Some(k) = h.mask {
            apply_mask(&mut payload, k, 0);
        }
        out.push((h.fin, h.opcode, payload));
        bytes = &bytes[end..];
    }
    out
}

/// Whether `other`, the same input pumped in other pieces, agrees with
/// `whole`: the same frames forwarded, the same counts, the same end. One
/// difference is allowed: at a client text or close frame whose payload
/// breaks the protocol (not UTF-8, a bad close code), the part of that
/// frame sent before the read that showed it (the whole input sends none
/// of it).
pub fn agrees(whole: &Pumped, other: &Pumped, from: Sender) -> bool {
    let key = |p: &Pumped| (p.frames, p.binary_bytes, p.close, p.violation);
    if key(other) != key(whole) {
        return false;
    }
    let n = whole.forwarded.len();
    if matches!(
        whole.violation,
        Some(FrameError::InvalidUtf8 | FrameError::BadClose)
    ) {
        other.forwarded.len() >= n
            && (whole.data_frames..=whole.data_frames + 1).contains(&other.data_frames)
            && decode(&other.forwarded[..n], from) == decode(&whole.forwarded, from)
    } else {
        other.data_frames == whole.data_frames
            && other.forwarded.len() == n
            && decode(&other.forwarded, from) == decode(&whole.forwarded, from)
    }
}

/// Any byte stream, cut anywhere, is scanned as the whole is: byte 0 picks
/// the direction, bytes 1..9 the limit, then up to 16 cut points (2 bytes
/// each, after a count byte), then the stream.
pub fn frame_scanner(data: &[u8]) {
    let Some((&dir, rest)) = data.split_first() else {
        return;
    };
    let from = if dir & 1 == 0 {
        Sender::Client
    } else {
        Sender::Server
    };
    let Some((limit, rest)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let max = u64::from(u16::from_le_bytes(*limit)) * 4;
    let Some((&ncuts, rest)) = rest.split_first() else {
        return;
    };
    let ncuts = usize::from(ncuts % 17).min(rest.len() / 2);
    let (cuts, input) = rest.split_at(ncuts * 2);
    let cuts: Vec<usize> = cuts
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let whole = pump(input, &[], from, max);
    let chunked = pump(input, &cuts, from, max);
    assert!(
        agrees(&whole, &chunked, from),
        "whole {whole:?}\nchunked {chunked:?}"
    );
    let decoded = decode(&whole.forwarded, from);
    // What is forwarded is what came in: the same frames, client frames
    // only re-masked.
    assert!(whole.forwarded.len() <= input.len());
    assert_eq!(decode(&input[..whole.forwarded.len()], from), decoded);
    if from == Sender::Server {
        assert_eq!(whole.forwarded, input[..whole.forwarded.len()]);
    }
}

/// Any bytes as a frame header: a prefix parses as need-more or as the
/// whole does; a parsed header keeps the RFC's rules and writes back to a
/// header that parses the same.
pub fn frame_header(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let from = if flags & 1 == 0 {
        Sender::Client
    } else {
        Sender::Server
    };
    let max = if flags & 2 == 0 {
        u64::MAX
    } else {
        1 << (flags >> 2)
    };
    let whole = parse_header(bytes, from, max);
    for k in 0..bytes.len().min(MAX_HEADER_LEN + 1) {
        match parse_header(&bytes[..k], from, max) {
            Ok(None) => {}
            prefix => assert_eq!(prefix, whole, "prefix of {k} bytes"),
        }
    }
    if let Ok(Some(h)) = whole {
        assert!((2..=MAX_HEADER_LEN).contains(&h.header_len) && h.header_len <= bytes.len());
        assert!(h.payload_len <= max && h.payload_len >> 63 == 0);
        assert_eq!(h.mask.is_some(), from == Sender::Client);
        assert!(!h.opcode.is_control() || (h.fin && h.payload_len <= 125));
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut out, h.fin, h.opcode, h.mask, h.payload_len);
        let again = parse_header(&out[..n], from, max).unwrap().unwrap();
        assert_eq!(
            (again.fin, again.opcode, again.mask, again.payload_len),
            (h.fin, h.opcode, h.mask, h.payload_len)
        );
        assert!(n <= h.header_len, "the shortest encoding");
    }
}

/// The 8-bytes-at-a-time mask against the bytewise reference: bytes 0..4
/// are the key, byte 4 the phase, byte 5 the alignment offset and a split
/// point; the rest is the payload.
pub fn mask(data: &[u8]) {
    let Some((head, payload)) = data.split_first_chunk::<6>() else {
        return;
    };
    let key = [head[0], head[1], head[2], head[3]];
    let phase = usize::from(head[4]);
    let offset = usize::from(head[5] & 7).min(payload.len());
    let mut fast = payload.to_vec();
    let mut slow = payload.to_vec();
    apply_mask(&mut fast[offset..], key, phase);
    apply_mask_bytewise(&mut slow[offset..], key, phase);
    assert_eq!(fast, slow);
    let split = usize::from(head[5] >> 3).min(payload.len());
    let mut pieces = payload.to_vec();
    apply_mask(&mut pieces[..split], key, phase);
    apply_mask(&mut pieces[split..], key, phase + split);
    let mut whole = payload.to_vec();
    apply_mask(&mut whole, key, phase);
    assert_eq!(pieces, whole);
    let new = [head[4], head[5], head[0], head[1]];
    apply_mask(&mut whole, rekey(key, new), phase);
    let mut again = payload.to_vec();
    apply_mask(&mut again, new, phase);
    assert_eq!(
        whole, again,
        "rekey(old, new) turns old's masking into new's"
    );
}

/// Any bytes as a client request head and as an upstream upgrade answer:
/// an answer, never a panic; a token found is in the bytes (a query token
/// perhaps percent-encoded there); a request the parser takes gets an
/// upgrade answer or a refusal, never a panic; and the relay upgrades
/// exactly the heads tungstenite's `create_response` would, with the same
/// answer (the relay reads the head in place, tungstenite through an
/// `http::Request` in which several `Connection` lines are one, as RFC 9110
/// §5.3 makes them).
pub fn http_head(data: &[u8]) {
    let ours = parse_client_request(data).ok().map(|req| {
        if let Some((t, source)) = &req.token {
            let within = |bytes: &[u8]| bytes.windows(t.len()).any(|w| w == t.as_bytes());
            let decoded = || percent_encoding::percent_decode(data).collect::<Vec<u8>>();
            assert!(
                !t.is_empty()
                    && (within(data) || (*source == TokenSource::Query && within(&decoded())))
            );
        }
        let answer = upgrade_response(&req);
        if let Some(a) = &answer {
            assert!(a.starts_with(b"HTTP/1.1 101 ") && a.ends_with(b"\r\n\r\n"));
        }
        // Named whenever offered, wherever the token came from.
        if req
            .token
            .as_ref()
            .is_some_and(|(_, s)| *s == TokenSource::Subprotocol)
        {
            assert!(offers_soniox_api_key(data));
        }
        (answer, offers_soniox_api_key(data))
    });
    let reference = tungstenite_answer(data);
    match ours {
        Some((answer, subprotocol)) => {
            let answer = answer.map(|mut a| {
                if subprotocol {
                    // The one header the relay adds: its subprotocol.
                    let line = b"Sec-WebSocket-Protocol: soniox-api-key\r\n";
                    let at = a.len() - 2 - line.len();
                    assert_eq!(&a[at..a.len() - 2], line);
                    a.drain(at..a.len() - 2);
                }
                a
            });
            assert_eq!(answer, reference.flatten(), "the upgrade answer");
        }
        None => assert!(reference.is_none(), "a head tungstenite's parse takes"),
    }
    let _ = check_upstream_answer(data, "dGhlIHNhbXBsZSBub25jZQ==");
}

/// Whether a request head's `Sec-WebSocket-Protocol` lines (one list,
/// RFC 6455 §11.3.4) offer `soniox-api-key`, read apart from the relay's
/// own scan.
fn offers_soniox_api_key(head: &[u8]) -> bool {
    let mut headers = header_slots(head);
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    req.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .any(|item| item.trim() == "soniox-api-key")
}

/// The 101 answer as tungstenite builds it: `None` when the head does not
/// parse into an `http::Request`, `Some(None)` when `create_response`
/// refuses it.
fn tungstenite_answer(head: &[u8]) -> Option<Option<Vec<u8>>> {
    use tungstenite::http;
    let mut headers = header_slots(head);
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let mut b = http::Request::builder()
        .method(req.method?)
        .uri(req.path?)
        .version(if req.version == Some(1) {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        });
    let mut connection: Option<Vec<u8>> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let joined = connection.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(h.value);
        } else {
            b = b.header(h.name, h.value);
        }
    }
    if let Some(c) = connection {
        b = b.header("Connection", c);
    }
    let request = b.body(()).ok()?;
    let Ok(resp) = tungstenite::handshake::server::create_response(&request) else {
        return Some(None);
    };
    let mut out = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
    for (name, value) in resp.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(Some(out))
}

/// Any bytes as the client's config: when they are a JSON object, upstream
/// gets it without `api_key`, with `client_reference_id`, every other field
/// unchanged; and with the account key when asked. One a JSON map cannot
/// hold (a lone surrogate escape, `1e400`) goes up as a JSON object too,
/// each such member's text unchanged.
pub fn first_message(data: &[u8]) {
    let Ok(serde_json::Value::Object(client)) = serde_json::from_slice(data) else {
        first_message_past_a_map(data);
        return;
    };
    let text = clio_relay::dataplane::session::upstream_config_text(data, "s-1");
    let got: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text).unwrap();
    let mut want = client;
    want.remove("api_key");
    want.entry("client_reference_id")
        .or_insert_with(|| "s-1".into());
    assert_eq!(got, want);
    let keyed = clio_relay::dataplane::session::with_api_key(&text, "key\"\u{1F511}");
    let keyed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&keyed).unwrap();
    want.insert("api_key".into(), "key\"\u{1F511}".into());
    assert_eq!(keyed, want);
}

/// [`first_message`] for a JSON object that a JSON map cannot read: its
/// members' values as raw text, those upstream gets the same, in the
/// same order, `api_key` gone and `client_reference_id` there.
fn first_message_past_a_map(data: &[u8]) {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !serde_json::from_str::<&RawValue>(text).is_ok_and(|v| v.get().starts_with('{')) {
        return;
    }
    let up = clio_relay::dataplane::session::upstream_config_text(data, "s-1");
    let up = std::str::from_utf8(&up).expect("upstream's config is UTF-8");
    let got: &RawValue = serde_json::from_str(up).expect("upstream's config is JSON");
    assert!(got.get().starts_with('{'), "{up}");
    // Members named without escapes (a map of `String` names reads
    // those): each value's text unchanged.
    let (Ok(sent), Ok(got)) = (
        serde_json::from_str::<BTreeMap<String, &RawValue>>(text),
        serde_json::from_str::<BTreeMap<String, &RawValue>>(up),
    ) else {
        return;
    };
    let mut want: BTreeMap<&str, &str> = sent
        .iter()
        .filter(|(k, _)| k.as_str() != "api_key")
        .map(|(k, v)| (k.as_str(), v.get()))
        .collect();
    if want.get("client_reference_id").is_none_or(|v| *v == "null") {
        want.insert("client_reference_id", "\"s-1\"");
    }
    let got: BTreeMap<&str, &str> = got.iter().map(|(k, v)| (k.as_str(), v.get())).collect();
    assert_eq!(got, want);
}

/// Any bytes as a session token, and any edit of a real one: refused,
/// never a panic; only the token as minted verifies.
pub fn token(data: &[u8]) {
    use std::sync::OnceLock;
    use std::time::{Duration, UNIX_EPOCH};
    static KEYS: OnceLock<(clio_relay::core::token::TokenKeys, String)> = OnceLock::new();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let (keys, minted) = KEYS.get_or_init(|| {
        let keys = clio_relay::core::token::TokenKeys::new(
            &clio_relay::core::secret::Secret::new("fuzz-token-secret-0123456789abcdef"),
            None,
            Duration::from_secs(30),
        );
        let t = keys
            .mint_exact(
                "device-1",
                None,
                1_800_000_000 - 10,
                1_800_000_600,
                "0011223344556677",
            )
            .unwrap();
        (keys, t)
    });
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = keys.verify(s, now) {
            assert_eq!(s, minted.as_str(), "only the minted token verifies");
            assert_eq!(c.device_id, "device-1");
        }
    }
    // Overwrite part of the minted token with the input, at a place the
    // first byte picks.
    let Some((&at, patch)) = data.split_first() else {
        return;
    };
    let mut edited = minted.clone().into_bytes();
    let at = usize::from(at) % edited.len();
    let end = (at + patch.len()).min(edited.len());
    edited[at..end].copy_from_slice(&patch[..end - at]);
    if let Ok(s) = String::from_utf8(edited) {
        if s != *minted {
            assert!(
                keys.verify(&s, now).is_err(),
                "an edited token verified: {s}"
            );
        }
    }
}

/// `proxy_header`: a balancer's PROXY header, parsed as its bytes arrive.
/// Any bytes give "need more", a header, or a refusal, never a panic; a
/// header is judged whole: every shorter prefix of it is "need more" (for
/// more than that prefix), and its length is within the bytes and the
/// bound; and a refusal is final: once a prefix is refused, so is the
/// whole.
pub fn proxy_header(data: &[u8]) {
    use clio_relay::dataplane::proxy_header::{parse, Parsed};
    const MAX: usize = 8192;
    let whole = parse(data, MAX);
    match &whole {
        Parsed::Header { len, .. } => {
            let len = *len;
            assert!(len <= data.len() && len <= MAX);
            assert_eq!(parse(&data[..len], MAX), whole);
            for k in 0..len {
                assert!(
                    matches!(parse(&data[..k], MAX), Parsed::Need(w) if w > k),
                    "prefix {k} of a {len}-byte header"
                );
            }
        }
        Parsed::Need(w) => assert!(*w > data.len()),
        Parsed::Refused(_) => {}
    }
    if !matches!(whole, Parsed::Refused(_)) {
        for k in 0..data.len() {
            assert!(
                !matches!(parse(&data[..k], MAX), Parsed::Refused(_)),
                "a prefix of {k} bytes refused, the whole not: {whole:?}"
            );
        }
    }
}
