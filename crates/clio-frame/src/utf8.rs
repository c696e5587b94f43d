//! UTF-8 checked in pieces: a text message arrives in frames, and each
//! frame in reads of any size, so a character may be split anywhere.

/// The check of one text message so far: at most the 3 bytes of a
/// character whose end has not arrived yet.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Check {
    carry: [u8; 3],
    len: u8,
}

/// Bytes of a character that starts with `lead`, or `None` for a byte no
/// character starts with.
fn width(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7f => Some(1),
        0xc2..=0xdf => Some(2),
        0xe0..=0xef => Some(3),
        0xf0..=0xf4 => Some(4),
        _ => None,
    }
}

impl Utf8Check {
    /// Takes in the message's next bytes; false once they cannot be
    /// UTF-8, whatever follows.
    pub fn feed(&mut self, mut piece: &[u8]) -> bool {
        if self.len > 0 {
            // Complete the carried character first.
            let have = self.len as usize;
            let Some(w) = width(self.carry[0]) else {
                return false;
            };
            let take = (w - have).min(piece.len());
            let mut ch = [0u8; 4];
            ch[..have].copy_from_slice(&self.carry[..have]);
            ch[have..have + take].copy_from_slice(&piece[..take]);
            piece = &piece[take..];
            if have + take < w {
                // Still short: it must be a valid start of one.
                return match std::str::from_utf8(&ch[..have + take]) {
                    Err(e) if e.error_len().is_none() => {
                        self.carry[..have + take].copy_from_slice(&ch[..have + take]);
                        self.len = (have + take) as u8;
                        true
                    }
                    _ => false,
                };
            }
            if std::str::from_utf8(&ch[..w]).is_err() {
                return false;
            }
            self.len = 0;
        }
        match std::str::from_utf8(piece) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let rest = &piece[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                true
            }
            Err(_) => false,
        }
    }

    /// The message ended: true when it ended on a whole character. The
    /// check is ready for the next message.
    pub fn finish(&mut self) -> bool {
        std::mem::take(self).len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` fed in the pieces `cuts` makes, then finished.
    fn check(text: &[u8], cuts: &[usize]) -> bool {
        let mut c = Utf8Check::default();
        let mut at = 0;
        for &cut in cuts.iter().chain([&text.len()]) {
            let cut = cut.clamp(at, text.len());
            if !c.feed(&text[at..cut]) {
                return false;
            }
            at = cut;
        }
        c.finish()
    }

    #[test]
    fn any_split_agrees_with_the_whole() {
        let samples: [&[u8]; 12] = [
            b"{\"type\":\"finalize\"}",
            "na\u{ef}ve \u{20ac}10 \u{1f600}!".as_bytes(),
            "\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}".as_bytes(),
            b"",
            b"\xff",
            b"a\xc3",            // cut short at the end
            b"\xc3\x28",         // bad continuation
            b"\xe2\x82",         // three-byte character cut short
            b"\xed\xa0\x80",     // a surrogate
            b"\xf4\x90\x80\x80", // past U+10FFFF
            b"\xc0\xaf",         // overlong
            b"ok \xf0\x9f\x98",  // four-byte character cut short
        ];
        for text in samples {
            let whole = std::str::from_utf8(text).is_ok();
            assert_eq!(check(text, &[]), whole, "{text:?}");
            for a in 0..=text.len() {
                for b in a..=text.len() {
                    assert_eq!(check(text, &[a, b]), whole, "{text:?} cut at {a} and {b}");
                }
            }
        }
    }

    #[test]
    fn each_message_starts_afresh() {
        let mut c = Utf8Check::default();
        assert!(c.feed(b"ab\xe2\x82"));
        assert!(!c.finish(), "a message may not end inside a character");
        assert!(!c.feed(b"\xac"), "the next message starts clean");
        assert!(!Utf8Check::default().feed(b"\x80"));
    }
}
