//! Session token verification.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clio_relay::core::secret::Secret;
use clio_relay::core::token::{TokenError, TokenKeys};
use proptest::prelude::*;

fn keys() -> TokenKeys {
    TokenKeys::new(
        &Secret::new("property-test-secret-0123456789abcdef"),
        Some(&Secret::new("property-test-old-secret-0123456789ab")),
        Duration::from_secs(30),
    )
}

fn device() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just('Q'),
            Just('7'),
            Just('-'),
            Just('_'),
            Just('.'),
            Just(':')
        ],
        1..64,
    )
    .prop_map(|c| c.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A minted token verifies to its claims from its issue time up to the
    /// second before it expires, and not from that second on.
    #[test]
    fn a_minted_token_holds_until_exactly_its_expiry(dev in device(), issued in 1_000_000u64..4_000_000_000, ttl in 1u64..100_000) {
        let k = keys();
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let token = k.mint(&dev, Duration::from_secs(ttl), at(issued)).unwrap();
        let c = k.verify(&token, at(issued)).unwrap();
        prop_assert_eq!((c.device_id.as_str(), c.issued_at, c.expires_at), (dev.as_str(), issued, issued + ttl));
        prop_assert!(k.verify(&token, at(issued + ttl - 1)).is_ok());
        prop_assert_eq!(k.verify(&token, at(issued + ttl)).unwrap_err(), TokenError::Expired);
        // Clock skew covers the issue time only.
        prop_assert!(k.verify(&token, at(issued - 30)).is_ok());
        prop_assert_eq!(k.verify(&token, at(issued - 31)).unwrap_err(), TokenError::NotYetValid);
    }

    /// Changing any one character of a token makes it fail.
    #[test]
    fn any_changed_character_is_refused(dev in device(), at in any::<prop::sample::Index>(), with in prop_oneof![Just(b'A'), Just(b'z'), Just(b'0'), Just(b'-'), Just(b'_'), Just(b'.'), Just(b'=')]) {
        let k = keys();
        let now = SystemTime::now();
        let token = k.mint(&dev, Duration::from_secs(600), now).unwrap();
        let i = at.index(token.len());
        let mut bytes = token.into_bytes();
        prop_assume!(bytes[i] != with);
        bytes[i] = with;
        let changed = String::from_utf8(bytes).unwrap();
        prop_assert!(k.verify(&changed, now).is_err(), "{} verified", changed);
    }

    /// A token signed with another secret, or any string at all, is refused
    /// (and never panics).
    #[test]
    fn foreign_and_random_tokens_are_refused(dev in device(), junk in ".{0,300}", parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 0..6)) {
        let k = keys();
        let now = SystemTime::now();
        let other = TokenKeys::new(&Secret::new("a-different-secret-0123456789abcdefgh"), None, Duration::ZERO);
        let foreign = other.mint(&dev, Duration::from_secs(600), now).unwrap();
        prop_assert_eq!(k.verify(&foreign, now).unwrap_err(), TokenError::UnknownKey);
        // Same key id, other secret: a forged signature.
        let kid = k.current_kid().to_string();
        let forged = format!("clio1.{kid}.{}", foreign.splitn(3, '.').nth(2).unwrap());
        prop_assert_eq!(k.verify(&forged, now).unwrap_err(), TokenError::BadSignature);
        prop_assert!(k.verify(&junk, now).is_err());
        let dotted = format!("clio1.{kid}.{}", parts.join("."));
        prop_assert!(k.verify(&dotted, now).is_err());
    }
}
