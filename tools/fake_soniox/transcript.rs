//! The audio clock and the deterministic transcript it produces.

use std::fmt::Write as _;

/// The words the fake "hears", cycled.
const WORDS: [&str; 9] = [
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog",
];

/// Bytes per second assumed for `auto` and container formats, which the fake
/// does not decode: 16 kB/s (128 kbit/s, a typical compressed bitrate).
const ASSUMED_BYTES_PER_SEC: u64 = 16_000;

/// Formats accepted in `audio_format`: raw ones with their sample size, and
/// containers / `auto` with `None`.
pub(crate) fn format_sample_bytes(format: &str) -> Option<Option<u64>> {
    Some(match format {
        "pcm_s16le" | "pcm_s16be" => Some(2),
        "pcm_f32le" | "pcm_s32le" | "pcm_f32be" | "pcm_s32be" => Some(4),
        "mulaw" | "alaw" | "pcm_u8" => Some(1),
        "auto" | "wav" | "ogg" | "webm" | "mp3" | "flac" | "aac" => None,
        _ => return None,
    })
}

/// One token of a result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) text: String,
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    pub(crate) is_final: bool,
}

/// Turns audio bytes into time and time into words.
#[derive(Debug)]
pub(crate) struct Transcript {
    bytes_per_sec: u64,
    ms_per_word: u64,
    bytes: u64,
    /// End of the last final token: `final_audio_proc_ms`.
    final_ms: u64,
    words: usize,
}

impl Transcript {
    /// `bytes_per_sec` of the stream's audio (never 0).
    pub(crate) fn new(bytes_per_sec: u64, ms_per_word: u32) -> Transcript {
        Transcript {
            bytes_per_sec: bytes_per_sec.max(1),
            ms_per_word: u64::from(ms_per_word.max(1)),
            bytes: 0,
            final_ms: 0,
            words: 0,
        }
    }

    /// The clock rate for a config's format; `None` for containers/`auto`.
    pub(crate) fn bytes_per_sec(sample_bytes: Option<u64>, rate: u64, channels: u64) -> u64 {
        match sample_bytes {
            Some(b) => b * rate * channels,
            None => ASSUMED_BYTES_PER_SEC,
        }
    }

    /// Audio received so far, in ms: `total_audio_proc_ms`.
    pub(crate) fn total_ms(&self) -> u64 {
        // u128: no overflow even after days of 192 kHz f32 stereo.
        (u128::from(self.bytes) * 1000 / u128::from(self.bytes_per_sec)) as u64
    }

    pub(crate) fn final_ms(&self) -> u64 {
        self.final_ms
    }

    /// Advances the clock without producing words (echo mode); returns the
    /// clock before and after.
    pub(crate) fn advance(&mut self, len: usize) -> (u64, u64) {
        let before = self.total_ms();
        self.bytes += len as u64;
        let after = self.total_ms();
        self.final_ms = after;
        (before, after)
    }

    fn next_word(&mut self, start_ms: u64, end_ms: u64, is_final: bool) -> Token {
        let word = WORDS[self.words % WORDS.len()];
        let text = if self.words == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        if is_final {
            self.words += 1;
            self.final_ms = end_ms;
        }
        Token {
            text,
            start_ms,
            end_ms,
            is_final,
        }
    }

    /// Adds `len` bytes of audio; returns the words that became final and,
    /// if at least half a word is pending, a non-final token for it.
    pub(crate) fn push_audio(&mut self, len: usize) -> Vec<Token> {
        self.bytes += len as u64;
        let total = self.total_ms();
        let mut tokens = Vec::new();
        while total >= self.final_ms + self.ms_per_word {
            let start = self.final_ms;
            tokens.push(self.next_word(start, start + self.ms_per_word, true));
        }
        if total - self.final_ms >= self.ms_per_word / 2 && total > self.final_ms {
            let start = self.final_ms;
            tokens.push(self.next_word(start, total, false));
        }
        tokens
    }

    /// Makes all audio so far final: the pending partial word (if at least
    /// half a word) becomes a final word. Used by `finalize` and at the end.
    pub(crate) fn flush(&mut self) -> Vec<Token> {
        let total = self.total_ms();
        let mut tokens = Vec::new();
        if total > self.final_ms && total - self.final_ms >= self.ms_per_word / 2 {
            let start = self.final_ms;
            tokens.push(self.next_word(start, total, true));
        }
        self.final_ms = total;
        tokens
    }
}

/// Renders a result message. `tokens` must be non-empty to be worth sending.
pub(crate) fn result_json(tokens: &[Token], final_ms: u64, total_ms: u64) -> String {
    let mut out = String::with_capacity(64 + tokens.len() * 96);
    out.push_str("{\"tokens\":[");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let confidence = if t.is_final { "0.95" } else { "0.7" };
        let _ = write!(
            out,
            "{{\"text\":{},\"start_ms\":{},\"end_ms\":{},\"confidence\":{},\"is_final\":{}}}",
            serde_json::Value::from(t.text.as_str()),
            t.start_ms,
            t.end_ms,
            confidence,
            t.is_final
        );
    }
    let _ = write!(
        out,
        "],\"final_audio_proc_ms\":{final_ms},\"total_audio_proc_ms\":{total_ms}}}"
    );
    out
}

/// Renders the `finished` message.
pub(crate) fn finished_json(final_ms: u64, total_ms: u64) -> String {
    format!(
        "{{\"tokens\":[],\"final_audio_proc_ms\":{final_ms},\"total_audio_proc_ms\":{total_ms},\"finished\":true}}"
    )
}

/// Renders a Soniox error message.
pub(crate) fn error_json(code: u16, message: &str, request_id: &str) -> String {
    serde_json::json!({
        "tokens": [],
        "error_code": code,
        "error_message": message,
        "error_type": super::error_type(code),
        "request_id": request_id,
    })
    .to_string()
}

/// Lowercase hex of up to the first 16 bytes (the echo marker).
pub(crate) fn hex16(frame: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for &b in frame.iter().take(16) {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_the_clock() {
        // 16 kHz s16le mono: 32 bytes per ms.
        let mut t = Transcript::new(32_000, 480);
        assert!(t.push_audio(32 * 200).is_empty());
        let toks = t.push_audio(32 * 300); // 500 ms
        assert_eq!(toks[0].text, "the");
        assert!(toks[0].is_final);
        assert_eq!((toks[0].start_ms, toks[0].end_ms), (0, 480));
        assert_eq!(toks.len(), 1, "20 ms pending is less than half a word");
        let toks = t.push_audio(32 * 300); // 800 ms: 320 pending => partial
        assert_eq!(toks.len(), 1);
        assert_eq!(toks[0].text, " quick");
        assert!(!toks[0].is_final);
        let toks = t.flush();
        assert_eq!(toks[0].text, " quick");
        assert!(toks[0].is_final);
        assert_eq!((toks[0].start_ms, toks[0].end_ms), (480, 800));
        assert_eq!(t.final_ms(), 800);
    }

    #[test]
    fn hex_marker() {
        let frame: Vec<u8> = (0u8..20).collect();
        assert_eq!(hex16(&frame), "000102030405060708090a0b0c0d0e0f");
    }
}
