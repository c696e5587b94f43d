//! WebSocket frame headers (RFC 6455 §5.2), parsed and written in place.
//!
//! The relay works on frames, never on messages: it reads a header where it
//! lies in the read buffer, decides what to do with the frame, and forwards
//! the bytes it read. Nothing here allocates.

/// Largest possible frame header: 2 fixed bytes, 8 bytes of extended length,
/// 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Frame opcodes the relay accepts. Anything else is a protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation = 0x0,
    /// UTF-8 text: the config message, control messages, results.
    Text = 0x1,
    /// Binary: audio.
    Binary = 0x2,
    /// Close, with an optional code and reason.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong are control frames: short and never fragmented.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// One protocol violation: in a frame header, in the order of a message's
/// frames, or in a client text message's or close frame's bytes. Each maps to close code
/// 1002, except [`FrameError::TooBig`] (1009) and
/// [`FrameError::InvalidUtf8`] (1007).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// An opcode RFC 6455 reserves.
    BadOpcode,
    /// RSV bits set: no extension was negotiated (permessage-deflate is refused).
    ReservedBits,
    /// A client frame without a mask, or a server frame with one.
    Masking,
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControl,
    /// A 64-bit length with the top bit set.
    BadLength,
    /// A payload longer than the configured limit.
    TooBig,
    /// A continuation frame with no fragmented message to continue, or a
    /// new text or binary frame inside one (RFC 6455 §5.4).
    Fragmentation,
    /// A text message that is not UTF-8 (§8.1; close code 1007), or a
    /// close frame's reason that is not.
    InvalidUtf8,
    /// A close frame with a 1-byte body, or a code no endpoint may send
    /// (§7.4: under 1000, 1004 to 1006, 1015 to 2999, 5000 and over).
    BadClose,
}

impl FrameError {
    /// The WebSocket close code this violation ends a stream with.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooBig => 1009,
            FrameError::InvalidUtf8 => 1007,
            _ => 1002,
        }
    }

    /// A short human reason, used in the error frame and the close reason.
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::BadOpcode => "reserved opcode",
            FrameError::ReservedBits => "reserved bits set without an extension",
            FrameError::Masking => "frame masking is wrong for its direction",
            FrameError::BadControl => "control frame fragmented or over 125 bytes",
            FrameError::BadLength => "invalid payload length",
            FrameError::TooBig => "frame too big",
            FrameError::Fragmentation => "fragmented message out of order",
            FrameError::InvalidUtf8 => "text message is not valid UTF-8",
            FrameError::BadClose => "close frame with an invalid code or body",
        }
    }
}

/// A parsed frame header. `mask_at` is where the 4 mask key bytes sit in the
/// header, so they can be rewritten in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
}

impl FrameHeader {
    /// Offset of the mask key within the header, if masked.
    pub fn mask_offset(&self) -> Option<usize> {
        self.mask.map(|_| self.header_len - 4)
    }
}

/// Which side sent the frame: client frames must be masked, server frames
/// must not be (RFC 6455 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Frames from a WebSocket client: masked.
    Client,
    /// Frames from a WebSocket server: unmasked.
    Server,
}

/// Parses the frame header at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a header. Checks masking
/// for `from`, reserved bits, opcodes, control frame rules and `max_payload`.
pub fn parse_header(
    buf: &[u8],
    from: Sender,
    max_payload: u64,
) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::BadOpcode)?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    if masked != (from == Sender::Client) {
        return Err(FrameError::Masking);
    }
    if opcode.is_control() && (!fin || b1 & 0x7F > 125) {
        return Err(FrameError::BadControl);
    }
    let (len_bytes, short) = match b1 & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(n as u64)),
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(None);
    }
    let payload_len = match short {
        Some(n) => n,
        None if len_bytes == 2 => u16::from_be_bytes([buf[2], buf[3]]) as u64,
        None => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            n
        }
    };
    if payload_len > max_payload {
        return Err(FrameError::TooBig);
    }
    let mask = masked.then(|| {
        let at = header_len - 4;
        [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
    });
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// Writes a frame header into `out` and returns its length.
pub fn write_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut at = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u16::MAX as u64 {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[at..at + 4].copy_from_slice(&key);
        at += 4;
    }
    at
}

/// Builds a whole small frame (header + payload, masked if `mask` is given)
/// into a new vector. Used for the few frames the relay writes itself: the
/// rewritten config message, error messages and close frames. Not for the
/// per-frame path.
pub fn build_frame(opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    build_fragment(opcode, true, payload, mask)
}

/// [`build_frame`] with the FIN bit as given: a frame of a fragmented
/// message (a resume opens one for the client's next continuation).
pub fn build_fragment(opcode: Opcode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut header, fin, opcode, mask, payload.len() as u64);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        crate::mask::apply_mask(&mut out[n..], key, 0);
    }
    out
}

/// Builds the payload of a close frame: a 2-byte code and a UTF-8 reason,
/// cut to fit the 125-byte control frame limit.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + reason.len().min(123));
    out.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length_class() {
        for &len in &[0u64, 1, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = [0u8; MAX_HEADER_LEN];
                let n = write_header(&mut out, true, Opcode::Binary, mask, len);
                let from = if mask.is_some() {
                    Sender::Client
                } else {
                    Sender::Server
                };
                let h = parse_header(&out[..n], from, u64::MAX >> 1)
                    .unwrap()
                    .unwrap();
                assert_eq!(h.payload_len, len);
                assert_eq!(h.header_len, n);
                assert_eq!(h.mask, mask);
                assert_eq!(h.opcode, Opcode::Binary);
                assert!(h.fin);
                // Every strict prefix is incomplete, never an error.
                for cut in 0..n {
                    assert_eq!(parse_header(&out[..cut], from, u64::MAX >> 1), Ok(None));
                }
            }
        }
    }

    #[test]
    fn rejects_protocol_violations() {
        let lim = 1 << 20;
        // Unmasked client frame.
        assert_eq!(
            parse_header(&[0x82, 0x01, 0], Sender::Client, lim),
            Err(FrameError::Masking)
        );
        // Masked server frame.
        assert_eq!(
            parse_header(&[0x82, 0x81, 0, 0, 0, 0], Sender::Server, lim),
            Err(FrameError::Masking)
        );
        // Reserved opcode 0x3 and RSV1 (deflate) set.
        assert_eq!(
            parse_header(&[0x83, 0x80], Sender::Client, lim),
            Err(FrameError::BadOpcode)
        );
        assert_eq!(
            parse_header(&[0xC2, 0x80], Sender::Client, lim),
            Err(FrameError::ReservedBits)
        );
        // Fragmented ping, and a 126-byte ping.
        assert_eq!(
            parse_header(&[0x09, 0x80], Sender::Client, lim),
            Err(FrameError::BadControl)
        );
        assert_eq!(
            parse_header(&[0x89, 0xFE, 0, 126, 0, 0, 0, 0], Sender::Client, lim),
            Err(FrameError::BadControl)
        );
        // Over the size limit, and the top length bit set.
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut out, true, Opcode::Binary, Some([0; 4]), lim + 1);
        assert_eq!(
            parse_header(&out[..n], Sender::Client, lim),
            Err(FrameError::TooBig)
        );
        let bad = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_header(&bad, Sender::Client, u64::MAX),
            Err(FrameError::BadLength)
        );
        assert_eq!(FrameError::TooBig.close_code(), 1009);
        assert_eq!(FrameError::Masking.close_code(), 1002);
    }

    #[test]
    fn built_frames_parse_and_unmask() {
        let f = build_frame(Opcode::Text, b"hello", Some([9, 8, 7, 6]));
        let h = parse_header(&f, Sender::Client, 100).unwrap().unwrap();
        let mut payload = f[h.header_len..].to_vec();
        crate::mask::apply_mask(&mut payload, h.mask.unwrap(), 0);
        assert_eq!(payload, b"hello");
        let c = close_payload(1000, &"é".repeat(100));
        assert!(c.len() <= 125);
        assert!(std::str::from_utf8(&c[2..]).is_ok());
    }
}
