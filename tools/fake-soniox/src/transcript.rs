//! The audio clock and the deterministic transcript it produces.

use std::fmt::Write as _;

/// The words the fake "hears": each stretch of audio becomes the word its
/// bytes hash to, so the same audio gives the same words on any connection
/// that starts at a word boundary.
const WORDS: [&str; 16] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far",
    "into", "green", "hills", "today",
];

/// FNV-1a offset basis: the hash of no bytes.
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The word for a stretch of audio whose bytes hash to `h`, with the space
/// that follows it (so a token's text never depends on what came before).
fn word_for(h: u64) -> String {
    format!("{} ", WORDS[(h % WORDS.len() as u64) as usize])
}

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
    /// Hash of the audio bytes since the last final token.
    hash: u64,
}

impl Transcript {
    /// `bytes_per_sec` of the stream's audio (never 0).
    pub(crate) fn new(bytes_per_sec: u64, ms_per_word: u32) -> Transcript {
        Transcript {
            bytes_per_sec: bytes_per_sec.max(1),
            ms_per_word: u64::from(ms_per_word.max(1)),
            bytes: 0,
            final_ms: 0,
            hash: FNV_START,
        }
    }

    /// The clock rate for a config's format; `None` for containers/`auto`.
    pub(crate) fn bytes_per_sec(sample_bytes: Option<u64>, rate: u64, channels: u64) -> u64 {
        match sample_bytes {
            Some(b) => b.saturating_mul(rate).saturating_mul(channels),
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

    /// The first byte at or after `ms` on the audio clock.
    fn byte_at(&self, ms: u64) -> u64 {
        (u128::from(ms) * u128::from(self.bytes_per_sec)).div_ceil(1000) as u64
    }

    fn final_word(&mut self, start_ms: u64, end_ms: u64) -> Token {
        let text = word_for(self.hash);
        self.hash = FNV_START;
        self.final_ms = end_ms;
        Token {
            text,
            start_ms,
            end_ms,
            is_final: true,
        }
    }

    /// Adds a frame of audio; returns the words that became final and, if
    /// at least half a word is pending, a non-final token for it. A word is
    /// final once `ms_per_word` of audio is in; its text comes from those
    /// bytes alone.
    pub(crate) fn push_audio(&mut self, mut data: &[u8]) -> Vec<Token> {
        let mut tokens = Vec::new();
        loop {
            let boundary = self.byte_at(self.final_ms + self.ms_per_word);
            let take = (boundary.saturating_sub(self.bytes) as usize).min(data.len());
            self.hash = fnv(self.hash, &data[..take]);
            self.bytes += take as u64;
            data = &data[take..];
            if self.bytes >= boundary {
                let start = self.final_ms;
                tokens.push(self.final_word(start, start + self.ms_per_word));
            }
            if data.is_empty() {
                break;
            }
        }
        let total = self.total_ms();
        if total > self.final_ms && total - self.final_ms >= self.ms_per_word / 2 {
            tokens.push(Token {
                text: word_for(self.hash),
                start_ms: self.final_ms,
                end_ms: total,
                is_final: false,
            });
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
            tokens.push(self.final_word(start, total));
        }
        self.final_ms = total;
        self.hash = FNV_START;
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
    fn words_follow_the_clock_and_the_bytes() {
        // 16 kHz s16le mono: 32 bytes per ms.
        let audio: Vec<u8> = (0..32 * 800u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut t = Transcript::new(32_000, 480);
        assert!(t.push_audio(&audio[..32 * 200]).is_empty());
        let toks = t.push_audio(&audio[32 * 200..32 * 500]);
        assert!(toks[0].is_final);
        assert_eq!(toks[0].text, word_for(fnv(FNV_START, &audio[..32 * 480])));
        assert_eq!((toks[0].start_ms, toks[0].end_ms), (0, 480));
        assert_eq!(toks.len(), 1, "20 ms pending is less than half a word");
        let toks = t.push_audio(&audio[32 * 500..]); // 320 ms pending => partial
        assert_eq!(toks.len(), 1);
        assert!(!toks[0].is_final);
        let toks = t.flush();
        assert!(toks[0].is_final);
        assert_eq!(toks[0].text, word_for(fnv(FNV_START, &audio[32 * 480..])));
        assert_eq!((toks[0].start_ms, toks[0].end_ms), (480, 800));
        assert_eq!(t.final_ms(), 800);

        // The same audio from a word boundary gives the same words, however
        // it is cut into frames.
        let mut whole = Transcript::new(32_000, 480);
        let a: Vec<String> = whole
            .push_audio(&audio)
            .into_iter()
            .filter(|t| t.is_final)
            .map(|t| t.text)
            .collect();
        let mut split = Transcript::new(32_000, 480);
        let mut b = vec![];
        for chunk in audio.chunks(333) {
            b.extend(
                split
                    .push_audio(chunk)
                    .into_iter()
                    .filter(|t| t.is_final)
                    .map(|t| t.text),
            );
        }
        assert_eq!(a, b);
        let mut later = Transcript::new(32_000, 480);
        let c: Vec<String> = later
            .push_audio(&audio[32 * 480..])
            .into_iter()
            .filter(|t| t.is_final)
            .map(|t| t.text)
            .collect();
        assert!(c.is_empty(), "320 ms is not a whole word");
        assert_eq!(later.flush()[0].text, whole.flush()[0].text);
    }

    #[test]
    fn hex_marker() {
        let frame: Vec<u8> = (0u8..20).collect();
        assert_eq!(hex16(&frame), "000102030405060708090a0b0c0d0e0f");
    }
}
