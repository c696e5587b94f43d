//! Session tokens: short-lived credentials a device presents instead of an
//! API key.
//!
//! A token is `clio1.<kid>.<payload>.<sig>`:
//! - `kid`: 8 hex digits naming the signing secret (the first 4 bytes of
//!   HMAC-SHA256(secret, "clio-relay token key id")), so the current and the
//!   previous secret can both verify during a rotation;
//! - `payload`: base64url (no padding) of compact JSON
//!   `{"d":device_id,"i":issued_unix_secs,"e":expires_unix_secs,"t":token_id}`;
//!   unknown fields (such as the reserved `"r"` tier) are ignored;
//! - `sig`: base64url (no padding) of HMAC-SHA256 over the ASCII
//!   `clio1.<kid>.<payload>` under the secret.
//!
//! Expiry is exact: a token is refused from the instant `now >= expires_at`.
//! The clock-skew allowance applies only to the issue time. Tokens are
//! credentials: nothing here ever prints one.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::TokensConfig;
use crate::secret::Secret;

/// The version prefix every token starts with.
pub const TOKEN_PREFIX: &str = "clio1";

/// The longest token [`TokenKeys::verify`] looks at; longer is `Malformed`.
pub const MAX_TOKEN_LEN: usize = 1024;

/// The longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The key id of a token secret: 8 hex digits, safe to show.
pub fn key_id(secret: &Secret) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let tag = hmac::sign(&key, b"clio-relay token key id");
    hex(&tag.as_ref()[..4])
}

/// Whether `id` is a valid device id: 1..=128 chars of `[A-Za-z0-9._:@-]`.
pub fn valid_device_id(id: &str) -> bool {
    (1..=MAX_DEVICE_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why a token could not be minted or was refused. `Display` is a short
/// reason for a client or a log line; it never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of this format (bad shape, encoding, JSON, or too long).
    Malformed,
    /// Signed with a secret this relay does not hold (unknown kid).
    UnknownKey,
    /// The signature does not match the content.
    BadSignature,
    /// The token's lifetime is over.
    Expired,
    /// The issue time is further in the future than the clock-skew allowance.
    NotYetValid,
    /// The device id is empty, too long or has characters outside `[A-Za-z0-9._:@-]`.
    BadDeviceId,
    /// Minting: the ttl is under one second or overflows the clock.
    BadTtl,
    /// Minting: the system random generator failed.
    Random,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed session token",
            TokenError::UnknownKey => "session token signed with an unknown key",
            TokenError::BadSignature => "invalid session token signature",
            TokenError::Expired => "session token expired",
            TokenError::NotYetValid => "session token issued in the future",
            TokenError::BadDeviceId => {
                "invalid device id (1 to 128 characters of A-Z a-z 0-9 . _ : @ -)"
            }
            TokenError::BadTtl => "token ttl must be at least 1s",
            TokenError::Random => "system random generator failed",
        })
    }
}

impl std::error::Error for TokenError {}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The device the token was minted for.
    pub device_id: String,
    /// Issue time, Unix seconds.
    pub issued_at: u64,
    /// Expiry, Unix seconds: the token is refused from this instant on.
    pub expires_at: u64,
    /// Random 16-hex-digit id of this token (for logs and revocation; not a secret).
    pub token_id: String,
    /// The kid of the secret that signed it.
    pub key_id: String,
}

/// The JSON payload, as minted.
#[derive(Serialize)]
struct PayloadOut<'a> {
    d: &'a str,
    i: u64,
    e: u64,
    t: &'a str,
}

/// The JSON payload, as read: extra fields (the reserved `r`) are ignored.
#[derive(Deserialize)]
struct PayloadIn {
    d: String,
    i: u64,
    e: u64,
    t: String,
}

/// One signing secret, by its key id.
struct SigningKey {
    kid: String,
    key: hmac::Key,
}

impl SigningKey {
    fn new(secret: &Secret) -> Self {
        SigningKey {
            kid: key_id(secret),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
        }
    }
}

/// The keys that mint and verify session tokens: the current secret, and
/// during a rotation the previous one (verify only).
pub struct TokenKeys {
    /// Signs new tokens and verifies them.
    current: SigningKey,
    /// The secret being rotated out: verifies only.
    previous: Option<SigningKey>,
    /// How far in the future an issue time may be.
    clock_skew: Duration,
    /// Source of token ids.
    rng: SystemRandom,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys")
            .field("current_kid", &self.current.kid)
            .field("previous_kid", &self.previous.as_ref().map(|k| &k.kid))
            .field("clock_skew", &self.clock_skew)
            .finish()
    }
}

impl TokenKeys {
    /// Keys from the current secret and, during a rotation, the previous one.
    pub fn new(current: &Secret, previous: Option<&Secret>, clock_skew: Duration) -> TokenKeys {
        TokenKeys {
            current: SigningKey::new(current),
            previous: previous.map(SigningKey::new),
            clock_skew,
            rng: SystemRandom::new(),
        }
    }

    /// Keys from the `[tokens]` configuration.
    pub fn from_config(cfg: &TokensConfig) -> TokenKeys {
        TokenKeys::new(&cfg.secret, cfg.previous_secret.as_ref(), cfg.clock_skew)
    }

    /// The kid new tokens are signed with.
    pub fn current_kid(&self) -> &str {
        &self.current.kid
    }

    /// Mints a token for `device_id`, issued at `now` (whole seconds, rounded
    /// down) and expiring `ttl` (whole seconds, at least 1) later, signed
    /// with the current secret. The caller enforces any maximum ttl.
    pub fn mint(&self, device_id: &str, ttl: Duration, now: SystemTime) -> Result<String, TokenError> {
        if !valid_device_id(device_id) {
            return Err(TokenError::BadDeviceId);
        }
        if ttl.as_secs() < 1 {
            return Err(TokenError::BadTtl);
        }
        let issued = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TokenError::BadTtl)?
            .as_secs();
        let expires = issued.checked_add(ttl.as_secs()).ok_or(TokenError::BadTtl)?;
        // Must stay representable as a SystemTime for verify to compare.
        UNIX_EPOCH
            .checked_add(Duration::from_secs(expires))
            .ok_or(TokenError::BadTtl)?;
        let mut id = [0u8; 8];
        self.rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        let token_id = hex(&id);
        let json = serde_json::to_vec(&PayloadOut {
            d: device_id,
            i: issued,
            e: expires,
            t: &token_id,
        })
        .map_err(|_| TokenError::Malformed)?;
        let mut token = format!(
            "{TOKEN_PREFIX}.{}.{}",
            self.current.kid,
            URL_SAFE_NO_PAD.encode(json)
        );
        let sig = hmac::sign(&self.current.key, token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }

    /// Checks a token's shape, signature (constant time) and times, and
    /// returns its claims.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = signed.split('.');
        let (Some(TOKEN_PREFIX), Some(kid), Some(payload), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if kid.len() != 8 || !kid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(TokenError::Malformed);
        }
        let key = if kid == self.current.kid {
            &self.current
        } else {
            match &self.previous {
                Some(prev) if kid == prev.kid => prev,
                _ => return Err(TokenError::UnknownKey),
            }
        };
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&key.key, signed.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;

        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let p: PayloadIn = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if !valid_device_id(&p.d) {
            return Err(TokenError::BadDeviceId);
        }
        let at = |secs: u64| UNIX_EPOCH.checked_add(Duration::from_secs(secs));
        let expires = at(p.e).ok_or(TokenError::Malformed)?;
        let issued = at(p.i).ok_or(TokenError::Malformed)?;
        if now >= expires {
            return Err(TokenError::Expired);
        }
        match now.checked_add(self.clock_skew) {
            Some(latest) if issued > latest => return Err(TokenError::NotYetValid),
            _ => {}
        }
        Ok(Claims {
            device_id: p.d,
            issued_at: p.i,
            expires_at: p.e,
            token_id: p.t,
            key_id: key.kid.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-current";
    const OLD: &str = "fedcba9876543210fedcba9876543210-previous";

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn keys() -> TokenKeys {
        TokenKeys::new(&Secret::new(SECRET), None, Duration::from_secs(30))
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn round_trip() {
        let k = keys();
        let tok = k.mint("phone-1:abc@x", Duration::from_secs(900), t(NOW)).unwrap();
        assert!(tok.starts_with(&format!("clio1.{}.", k.current_kid())));
        assert_eq!(tok.split('.').count(), 4);
        let c = k.verify(&tok, t(NOW + 10)).unwrap();
        assert_eq!(c.device_id, "phone-1:abc@x");
        assert_eq!(c.issued_at, NOW);
        assert_eq!(c.expires_at, NOW + 900);
        assert_eq!(c.token_id.len(), 16);
        assert!(c.token_id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(c.key_id, k.current_kid());
        // Token ids are random.
        let tok2 = k.mint("phone-1:abc@x", Duration::from_secs(900), t(NOW)).unwrap();
        assert_ne!(k.verify(&tok2, t(NOW)).unwrap().token_id, c.token_id);
    }

    #[test]
    fn payload_is_the_documented_json() {
        let k = keys();
        let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let payload = tok.split('.').nth(2).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(json["d"], "dev");
        assert_eq!(json["i"], NOW);
        assert_eq!(json["e"], NOW + 60);
        assert_eq!(json.as_object().unwrap().len(), 4);
    }

    /// A token with a hand-made payload, signed under `secret`.
    fn forge(secret: &str, json: &str) -> String {
        let s = Secret::new(secret);
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let signed = format!("clio1.{}.{}", key_id(&s), URL_SAFE_NO_PAD.encode(json));
        let sig = hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn extra_payload_fields_are_tolerated() {
        let tok = forge(
            SECRET,
            &format!(r#"{{"d":"dev","i":{NOW},"e":{},"t":"0011223344556677","r":"pro","x":[1]}}"#, NOW + 60),
        );
        let c = keys().verify(&tok, t(NOW)).unwrap();
        assert_eq!(c.device_id, "dev");
        assert_eq!(c.token_id, "0011223344556677");
    }

    #[test]
    fn tampering_is_detected() {
        let k = keys();
        let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let parts: Vec<&str> = tok.split('.').collect();

        // Another device's payload under this token's signature.
        let other = k.mint("evil", Duration::from_secs(60), t(NOW)).unwrap();
        let other_payload = other.split('.').nth(2).unwrap();
        let swapped = format!("{}.{}.{}.{}", parts[0], parts[1], other_payload, parts[3]);
        assert_eq!(k.verify(&swapped, t(NOW)), Err(TokenError::BadSignature));

        // A flipped signature character.
        let mut sig = parts[3].to_string();
        let c = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(0..1, c);
        let bad = format!("{}.{}.{}.{sig}", parts[0], parts[1], parts[2]);
        assert_eq!(k.verify(&bad, t(NOW)), Err(TokenError::BadSignature));

        // A truncated signature.
        let short = &tok[..tok.len() - 4];
        assert!(k.verify(short, t(NOW)).is_err());

        // A payload with a longer lifetime, signed by nobody we know.
        let longer = forge("some other secret of enough length!!", r#"{"d":"dev","i":1,"e":99999999999,"t":"x"}"#);
        assert_eq!(k.verify(&longer, t(NOW)), Err(TokenError::UnknownKey));
    }

    #[test]
    fn malformed_tokens() {
        let k = keys();
        let kid = k.current_kid().to_string();
        for bad in [
            String::new(),
            "clio1".into(),
            "clio1.a.b".into(),
            format!("clio2.{kid}.e30.AAAA"),
            format!("clio1.{kid}.e30.AAAA.extra"),
            "clio1.ABCDEF12.e30.AAAA".into(),
            format!("clio1.{kid}.e30.!!!!"),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(k.verify(&bad, t(NOW)), Err(TokenError::Malformed), "{bad:?}");
        }
        // Properly signed but not the payload shape.
        let tok = forge(SECRET, r#"{"d":"dev"}"#);
        assert_eq!(k.verify(&tok, t(NOW)), Err(TokenError::Malformed));
        let tok = forge(SECRET, "not json");
        assert_eq!(k.verify(&tok, t(NOW)), Err(TokenError::Malformed));
        // Long but valid-length token that is otherwise fine is still accepted.
        let long_dev = "d".repeat(MAX_DEVICE_ID_LEN);
        let tok = k.mint(&long_dev, Duration::from_secs(60), t(NOW)).unwrap();
        assert!(tok.len() <= MAX_TOKEN_LEN);
        assert!(k.verify(&tok, t(NOW)).is_ok());
    }

    #[test]
    fn wrong_secret_fails() {
        let tok = keys().mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let other = TokenKeys::new(&Secret::new(OLD), None, Duration::ZERO);
        assert_eq!(other.verify(&tok, t(NOW)), Err(TokenError::UnknownKey));
    }

    #[test]
    fn same_kid_different_secret_is_bad_signature() {
        // A token whose kid is ours but whose signature comes from another key.
        let k = keys();
        let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let (signed, _) = tok.rsplit_once('.').unwrap();
        let other = hmac::Key::new(hmac::HMAC_SHA256, OLD.as_bytes());
        let sig = hmac::sign(&other, signed.as_bytes());
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        assert_eq!(k.verify(&forged, t(NOW)), Err(TokenError::BadSignature));
    }

    #[test]
    fn rotation_previous_secret_still_verifies() {
        let old = TokenKeys::new(&Secret::new(OLD), None, Duration::ZERO);
        let old_tok = old.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let rotated = TokenKeys::new(
            &Secret::new(SECRET),
            Some(&Secret::new(OLD)),
            Duration::from_secs(30),
        );
        let c = rotated.verify(&old_tok, t(NOW)).unwrap();
        assert_eq!(c.key_id, old.current_kid());
        // New tokens are signed with the current secret.
        let new_tok = rotated.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        assert_eq!(rotated.verify(&new_tok, t(NOW)).unwrap().key_id, keys().current_kid());
        assert!(keys().verify(&new_tok, t(NOW)).is_ok());
        // Once the previous secret is dropped, its tokens fail by kid.
        assert_eq!(keys().verify(&old_tok, t(NOW)), Err(TokenError::UnknownKey));
    }

    #[test]
    fn kid_is_derived_from_the_secret() {
        let kid = key_id(&Secret::new(SECRET));
        assert_eq!(kid.len(), 8);
        assert!(kid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(kid, key_id(&Secret::new(SECRET)));
        assert_ne!(kid, key_id(&Secret::new(OLD)));
    }

    #[test]
    fn expiry_is_exact() {
        let k = keys();
        let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let exp = t(NOW + 60);
        assert!(k.verify(&tok, exp - Duration::from_nanos(1)).is_ok());
        assert!(k.verify(&tok, exp - Duration::from_millis(1)).is_ok());
        assert_eq!(k.verify(&tok, exp), Err(TokenError::Expired));
        assert_eq!(k.verify(&tok, exp + Duration::from_millis(1)), Err(TokenError::Expired));
        // The skew allowance does not extend expiry.
        let lenient = TokenKeys::new(&Secret::new(SECRET), None, Duration::from_secs(3600));
        assert_eq!(lenient.verify(&tok, exp), Err(TokenError::Expired));
    }

    #[test]
    fn issue_time_rounds_down() {
        let k = keys();
        let now = t(NOW) + Duration::from_millis(999);
        let tok = k.mint("dev", Duration::from_secs(60), now).unwrap();
        let c = k.verify(&tok, now).unwrap();
        assert_eq!((c.issued_at, c.expires_at), (NOW, NOW + 60));
    }

    #[test]
    fn skew_applies_to_issue_time() {
        let minter = keys();
        // Minted by a clock 30s ahead of ours: accepted.
        let tok = minter.mint("dev", Duration::from_secs(600), t(NOW + 30)).unwrap();
        assert!(keys().verify(&tok, t(NOW)).is_ok());
        // 31s ahead: not yet valid.
        let tok = minter.mint("dev", Duration::from_secs(600), t(NOW + 31)).unwrap();
        assert_eq!(keys().verify(&tok, t(NOW)), Err(TokenError::NotYetValid));
        assert!(keys().verify(&tok, t(NOW + 1)).is_ok());
        // No skew: issue time must not be after now.
        let strict = TokenKeys::new(&Secret::new(SECRET), None, Duration::ZERO);
        let tok = minter.mint("dev", Duration::from_secs(600), t(NOW + 1)).unwrap();
        assert_eq!(strict.verify(&tok, t(NOW)), Err(TokenError::NotYetValid));
        assert!(strict.verify(&tok, t(NOW + 1)).is_ok());
    }

    #[test]
    fn device_id_rules() {
        let k = keys();
        let ttl = Duration::from_secs(60);
        for good in ["a", "A-z_0.9:x@y", &"x".repeat(128)] {
            assert!(valid_device_id(good), "{good}");
            assert!(k.mint(good, ttl, t(NOW)).is_ok());
        }
        for bad in ["", &"x".repeat(129), "a b", "a/b", "é", "a\"b", "a\nb", "a.b,c"] {
            assert!(!valid_device_id(bad), "{bad:?}");
            assert_eq!(k.mint(bad, ttl, t(NOW)), Err(TokenError::BadDeviceId));
        }
        // A signed token with a bad device id is refused too.
        let tok = forge(SECRET, &format!(r#"{{"d":"a b","i":{NOW},"e":{},"t":"x"}}"#, NOW + 60));
        assert_eq!(k.verify(&tok, t(NOW)), Err(TokenError::BadDeviceId));
    }

    #[test]
    fn ttl_rules() {
        let k = keys();
        assert_eq!(k.mint("dev", Duration::ZERO, t(NOW)), Err(TokenError::BadTtl));
        assert_eq!(k.mint("dev", Duration::from_millis(999), t(NOW)), Err(TokenError::BadTtl));
        assert_eq!(k.mint("dev", Duration::MAX, t(NOW)), Err(TokenError::BadTtl));
        assert!(k.mint("dev", Duration::from_secs(1), t(NOW)).is_ok());
    }

    #[test]
    fn nothing_prints_the_token_or_secret() {
        let k = TokenKeys::new(&Secret::new(SECRET), Some(&Secret::new(OLD)), Duration::ZERO);
        let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(k.current_kid()), "{dbg}");
        for shown in [dbg] {
            assert!(!shown.contains(SECRET) && !shown.contains(OLD), "{shown}");
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
        }
        let errors = [
            k.verify(&tok, t(NOW + 60)).unwrap_err(),
            k.verify(&tok[..tok.len() - 2], t(NOW)).unwrap_err(),
            k.verify(&format!("{tok}x"), t(NOW)).unwrap_err(),
        ];
        let sig = tok.rsplit('.').next().unwrap();
        let payload = tok.split('.').nth(2).unwrap();
        for e in errors {
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(!shown.contains(sig) && !shown.contains(payload), "{shown}");
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
    }
}
