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

#[cfg(test)]
mod tests {
    use super::*;

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
