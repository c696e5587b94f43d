//! Secret material (API keys, token secrets) that must never be printed.
//!
//! A [`Secret`] has no `Display`, and its `Debug` shows only a fingerprint, so a
//! stray `{:?}` in a log line or a panic message cannot leak the value.

use std::fmt;

/// A secret string: an upstream API key or a token signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into().into_boxed_str())
    }

    /// The secret value itself. Call sites are the few places that must send
    /// or use the value: the upstream handshake, HMAC keys.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value can go in an HTTP header as it is, as an API key
    /// does: visible ASCII, no spaces or line breaks.
    pub fn fits_a_header(&self) -> bool {
        !self.0.is_empty() && self.0.bytes().all(|b| b.is_ascii_graphic())
    }

    /// A short, stable, non-reversible fingerprint of the value (12 hex
    /// digits of HMAC-SHA256 under a fixed label), safe to show anywhere.
    pub fn fingerprint(&self) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"clio-relay key fingerprint v1");
        let tag = ring::hmac::sign(&key, self.0.as_bytes());
        tag.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(fp:{})", self.fingerprint())
    }
}

/// Overwrites, in bytes about to go somewhere the secret must not, each
/// copy of it (as it is, and as a JSON string would escape it) with `*`s
/// of its length. The length is kept, so frame headers stay true, and an
/// API key is ASCII, so the text stays UTF-8. A secret shorter than
/// [`Redactor::MIN_LEN`] bytes (no real key is) is left alone: so short a
/// string could be a transcript's words.
///
/// Built once per key ([`KeySlot`](crate::core::keyring::KeySlot) holds
/// it), not per stream: its searchers take about 1.3 KiB, which every held
/// stream paid when each built its own.
pub struct Redactor {
    finders: Vec<memchr::memmem::Finder<'static>>,
}

impl Redactor {
    /// The shortest secret looked for.
    pub const MIN_LEN: usize = 8;

    /// The redactor of `secret` (one under [`Self::MIN_LEN`] bytes redacts
    /// nothing).
    pub fn new(secret: &Secret) -> Redactor {
        let raw = secret.expose();
        let mut needles = vec![raw.to_owned()];
        if let Ok(quoted) = serde_json::to_string(raw) {
            let escaped = &quoted[1..quoted.len() - 1];
            if escaped != raw {
                needles.push(escaped.to_owned());
            }
        }
        let finders = needles
            .into_iter()
            .filter(|n| n.len() >= Self::MIN_LEN)
            .map(|n| memchr::memmem::Finder::new(n.as_bytes()).into_owned())
            .collect();
        Redactor { finders }
    }

    /// Overwrites each copy of the secret in `bytes`.
    pub fn redact(&self, bytes: &mut [u8]) {
        for finder in &self.finders {
            let len = finder.needle().len();
            let mut from = 0;
            while let Some(at) = finder.find(&bytes[from..]) {
                let start = from + at;
                bytes[start..start + len].fill(b'*');
                from = start + len;
            }
        }
    }
}

impl Redactor {
    /// How many bytes at the end of `bytes` a copy of the secret may start
    /// with, for bytes still to come to complete: the longest tail that is
    /// the start of a form of it (shorter than the form). Bytes cut off
    /// there are held back until the next bytes are in: [`redact`](Self::redact)
    /// of the two together then finds a copy that a read cut in two, where
    /// each part alone is none. At most one byte less than the longest
    /// form; 0 for a secret too short to redact.
    pub fn cut_tail(&self, bytes: &[u8]) -> usize {
        let mut longest = 0;
        for finder in &self.finders {
            let needle = finder.needle();
            let from = bytes.len().saturating_sub(needle.len() - 1);
            // The earliest start that matches is the longest tail.
            for start in from..bytes.len() - longest {
                if needle.starts_with(&bytes[start..]) {
                    longest = bytes.len() - start;
                    break;
                }
            }
        }
        longest
    }
}

/// Says nothing of the secret (a searcher's own `Debug` shows its needle).
impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} forms)", self.finders.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redactor_overwrites_each_form_of_the_secret_and_shows_none() {
        let key = Secret::new("sk/live\\quoted\"key");
        let r = Redactor::new(&key);
        let mut raw = format!("a {} b {} c", key.expose(), key.expose()).into_bytes();
        r.redact(&mut raw);
        let stars = "*".repeat(key.expose().len());
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            format!("a {stars} b {stars} c")
        );
        let escaped = serde_json::to_string(key.expose()).unwrap();
        let mut json = escaped.clone().into_bytes();
        r.redact(&mut json);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            format!("\"{}\"", "*".repeat(escaped.len() - 2))
        );
        assert!(!format!("{r:?}").contains("live"), "{r:?}");
        // A short one redacts nothing.
        let mut words = b"the cat".to_vec();
        Redactor::new(&Secret::new("cat")).redact(&mut words);
        assert_eq!(words, b"the cat");
    }

    #[test]
    fn a_cut_tail_is_the_longest_start_of_a_form_at_the_end() {
        let key = Secret::new("sk/live\\quoted\"key");
        let r = Redactor::new(&key);
        let raw = key.expose().as_bytes();
        assert_eq!(r.cut_tail(b"nothing here"), 0);
        assert_eq!(r.cut_tail(b"ends in s"), 1);
        assert_eq!(r.cut_tail(b"a sk/li"), 5);
        // The whole form is no tail: it is the redaction's to find.
        assert_eq!(r.cut_tail(raw), 0);
        let mut cut = b"x ".to_vec();
        cut.extend_from_slice(&raw[..raw.len() - 1]);
        assert_eq!(r.cut_tail(&cut), raw.len() - 1);
        // The JSON-escaped form, its backslash doubled, is longer.
        let escaped = serde_json::to_string(key.expose()).unwrap();
        let escaped = &escaped.as_bytes()[1..escaped.len() - 1];
        assert_eq!(r.cut_tail(&escaped[..escaped.len() - 1]), escaped.len() - 1);
        assert_eq!(r.cut_tail(&raw[..3]), 3);
        assert_eq!(r.cut_tail(b""), 0);
        assert_eq!(Redactor::new(&Secret::new("cat")).cut_tail(b"a ca"), 0);
    }

    #[test]
    fn debug_shows_fingerprint_not_value() {
        let s = Secret::new("sk_live_very_secret_value");
        let shown = format!("{s:?}");
        assert!(!shown.contains("very_secret"), "{shown}");
        assert!(shown.contains(&s.fingerprint()));
        assert_eq!(s.fingerprint().len(), 12);
        assert_ne!(s.fingerprint(), Secret::new("other").fingerprint());
    }
}
