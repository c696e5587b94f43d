//! Unit tests for session tokens.

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
    let tok = k
        .mint("phone-1:abc@x", Duration::from_secs(900), t(NOW))
        .unwrap();
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
    let tok2 = k
        .mint("phone-1:abc@x", Duration::from_secs(900), t(NOW))
        .unwrap();
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
        &format!(
            r#"{{"d":"dev","i":{NOW},"e":{},"t":"0011223344556677","r":"pro","x":[1]}}"#,
            NOW + 60
        ),
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
    let longer = forge(
        "some other secret of enough length!!",
        r#"{"d":"dev","i":1,"e":99999999999,"t":"x"}"#,
    );
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
        assert_eq!(
            k.verify(&bad, t(NOW)),
            Err(TokenError::Malformed),
            "{bad:?}"
        );
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
    let new_tok = rotated
        .mint("dev", Duration::from_secs(60), t(NOW))
        .unwrap();
    assert_eq!(
        rotated.verify(&new_tok, t(NOW)).unwrap().key_id,
        keys().current_kid()
    );
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
    assert_eq!(
        k.verify(&tok, exp + Duration::from_millis(1)),
        Err(TokenError::Expired)
    );
    // The skew allowance does not extend expiry.
    let lenient = TokenKeys::new(&Secret::new(SECRET), None, Duration::from_secs(3600));
    assert_eq!(lenient.verify(&tok, exp), Err(TokenError::Expired));
}

#[test]
fn a_lifetime_past_max_ttl_is_refused() {
    let k = keys().with_max_ttl(Duration::from_secs(3600));
    let lasting = |secs: u64| k.mint_exact("dev", None, NOW, NOW + secs, "abcd").unwrap();
    assert!(k.verify(&lasting(3600), t(NOW)).is_ok());
    assert_eq!(k.verify(&lasting(3601), t(NOW)), Err(TokenError::TooLong));
    // Issued in the past or the future makes no difference: the lifetime is
    // the token's own.
    assert_eq!(
        k.verify(&lasting(3601), t(NOW + 3000)),
        Err(TokenError::TooLong)
    );
    assert!(k.verify(&lasting(3601), t(NOW + 3601)) == Err(TokenError::Expired));
    // Without a bound (keys not from the configuration), any lifetime.
    assert!(keys().verify(&lasting(10 * 3600), t(NOW)).is_ok());
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
    let tok = minter
        .mint("dev", Duration::from_secs(600), t(NOW + 30))
        .unwrap();
    assert!(keys().verify(&tok, t(NOW)).is_ok());
    // 31s ahead: not yet valid.
    let tok = minter
        .mint("dev", Duration::from_secs(600), t(NOW + 31))
        .unwrap();
    assert_eq!(keys().verify(&tok, t(NOW)), Err(TokenError::NotYetValid));
    assert!(keys().verify(&tok, t(NOW + 1)).is_ok());
    // No skew: issue time must not be after now.
    let strict = TokenKeys::new(&Secret::new(SECRET), None, Duration::ZERO);
    let tok = minter
        .mint("dev", Duration::from_secs(600), t(NOW + 1))
        .unwrap();
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
    for bad in [
        "",
        &"x".repeat(129),
        "a b",
        "a/b",
        "é",
        "a\"b",
        "a\nb",
        "a.b,c",
    ] {
        assert!(!valid_device_id(bad), "{bad:?}");
        assert_eq!(k.mint(bad, ttl, t(NOW)), Err(TokenError::BadDeviceId));
    }
    // A signed token with a bad device id is refused too.
    let tok = forge(
        SECRET,
        &format!(r#"{{"d":"a b","i":{NOW},"e":{},"t":"x"}}"#, NOW + 60),
    );
    assert_eq!(k.verify(&tok, t(NOW)), Err(TokenError::BadDeviceId));
    // So is one whose token id no revocation could name, and none is minted.
    for id in ["", "a b", "é"] {
        let json = serde_json::json!({"d": "dev", "i": NOW, "e": NOW + 60, "t": id});
        let tok = forge(SECRET, &json.to_string());
        assert_eq!(
            k.verify(&tok, t(NOW)),
            Err(TokenError::BadTokenId),
            "{id:?}"
        );
        assert_eq!(
            k.mint_exact("dev", None, NOW, NOW + 60, id),
            Err(TokenError::BadTokenId)
        );
    }
}

#[test]
fn ttl_rules() {
    let k = keys();
    assert_eq!(
        k.mint("dev", Duration::ZERO, t(NOW)),
        Err(TokenError::BadTtl)
    );
    assert_eq!(
        k.mint("dev", Duration::from_millis(999), t(NOW)),
        Err(TokenError::BadTtl)
    );
    assert_eq!(
        k.mint("dev", Duration::MAX, t(NOW)),
        Err(TokenError::BadTtl)
    );
    assert!(k.mint("dev", Duration::from_secs(1), t(NOW)).is_ok());
}

#[test]
fn nothing_prints_the_token_or_secret() {
    let k = TokenKeys::new(
        &Secret::new(SECRET),
        Some(&Secret::new(OLD)),
        Duration::ZERO,
    );
    let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
    let dbg = format!("{k:?}");
    assert!(dbg.contains(k.current_kid()), "{dbg}");
    assert!(!dbg.contains(SECRET) && !dbg.contains(OLD), "{dbg}");
    assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
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

#[test]
fn pools_claim_round_trips_and_defaults() {
    let k = keys();
    let eu = vec!["prod-eu".to_string()];
    let tok = k
        .mint_in("dev", None, &eu, Duration::from_secs(60), t(NOW))
        .unwrap();
    let payload = tok.split('.').nth(2).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(json["p"], serde_json::json!(["prod-eu"]));
    let c = k.verify(&tok, t(NOW)).unwrap();
    assert_eq!(c.pools, eu);
    assert!(c.allows_pool("prod-eu") && !c.allows_pool("default"));
    // No pool named: the default pool only, and no `p` in the payload.
    let tok = k.mint("dev", Duration::from_secs(60), t(NOW)).unwrap();
    assert_eq!(k.verify(&tok, t(NOW)).unwrap().pools, ["default"]);
    // An empty list or a name that is not a pool name is refused.
    let forged = forge(
        SECRET,
        &format!(
            r#"{{"d":"dev","i":{NOW},"e":{},"t":"0011","p":[]}}"#,
            NOW + 60
        ),
    );
    assert_eq!(k.verify(&forged, t(NOW)), Err(TokenError::Malformed));
    let forged = forge(
        SECRET,
        &format!(
            r#"{{"d":"dev","i":{NOW},"e":{},"t":"0011","p":["a b"]}}"#,
            NOW + 60
        ),
    );
    assert_eq!(k.verify(&forged, t(NOW)), Err(TokenError::PoolNotAllowed));
}

#[test]
fn a_secret_bound_to_pools_neither_mints_nor_verifies_others() {
    let dev = vec!["dev".to_string()];
    let prod = vec!["prod".to_string()];
    let bound = keys().bind_pools(Some(dev.clone()), None);
    assert_eq!(bound.current_pools(), Some(&dev[..]));
    let ttl = Duration::from_secs(60);
    assert_eq!(
        bound.mint_in("d", None, &prod, ttl, t(NOW)),
        Err(TokenError::PoolNotAllowed)
    );
    assert_eq!(
        bound.mint("d", ttl, t(NOW)),
        Err(TokenError::PoolNotAllowed),
        "no pool means the default pool, which dev is not"
    );
    let ok = bound.mint_in("d", None, &dev, ttl, t(NOW)).unwrap();
    assert_eq!(bound.verify(&ok, t(NOW)).unwrap().pools, dev);
    // A claim forged with the dev secret (as a careless or hostile minter
    // would) is refused by a relay that binds that secret to dev.
    let forged = forge(
        SECRET,
        &format!(
            r#"{{"d":"d","i":{NOW},"e":{},"t":"0011","p":["dev","prod"]}}"#,
            NOW + 60
        ),
    );
    assert_eq!(
        bound.verify(&forged, t(NOW)),
        Err(TokenError::PoolNotAllowed)
    );
    let no_pool = forge(
        SECRET,
        &format!(r#"{{"d":"d","i":{NOW},"e":{}, "t":"0011"}}"#, NOW + 60),
    );
    assert_eq!(
        bound.verify(&no_pool, t(NOW)),
        Err(TokenError::PoolNotAllowed)
    );
    // During a rotation each secret keeps its own binding.
    let old = TokenKeys::new(&Secret::new(OLD), None, Duration::ZERO)
        .bind_pools(Some(prod.clone()), None);
    let old_prod = old.mint_in("d", None, &prod, ttl, t(NOW)).unwrap();
    let rotating = TokenKeys::new(
        &Secret::new(SECRET),
        Some(&Secret::new(OLD)),
        Duration::ZERO,
    )
    .bind_pools(Some(dev.clone()), Some(prod.clone()));
    assert_eq!(rotating.verify(&old_prod, t(NOW)).unwrap().pools, prod);
    let rotating_dev_only = TokenKeys::new(
        &Secret::new(SECRET),
        Some(&Secret::new(OLD)),
        Duration::ZERO,
    )
    .bind_pools(Some(dev.clone()), Some(dev));
    assert_eq!(
        rotating_dev_only.verify(&old_prod, t(NOW)),
        Err(TokenError::PoolNotAllowed)
    );
    assert!(!format!("{rotating:?}").contains(SECRET));
}

#[test]
fn an_extra_secret_verifies_only_tokens_for_its_pools_and_never_signs() {
    let dev = vec!["dev".to_string()];
    let dev_backend = TokenKeys::new(&Secret::new(OLD), None, Duration::ZERO);
    let relay = keys()
        .bind_pools(Some(vec!["prod".into()]), None)
        .with_extra(&Secret::new(OLD), dev.clone());
    let ttl = Duration::from_secs(60);
    let dev_token = dev_backend.mint_in("d", None, &dev, ttl, t(NOW)).unwrap();
    assert_eq!(relay.verify(&dev_token, t(NOW)).unwrap().pools, dev);
    let dev_for_prod = dev_backend
        .mint_in("d", None, &["prod".into()], ttl, t(NOW))
        .unwrap();
    assert_eq!(
        relay.verify(&dev_for_prod, t(NOW)),
        Err(TokenError::PoolNotAllowed)
    );
    // The relay's own minting uses the current secret only.
    let minted = relay
        .mint_in("d", None, &["prod".into()], ttl, t(NOW))
        .unwrap();
    assert!(minted.starts_with(&format!("clio1.{}.", relay.current_kid())));
    assert!(!format!("{relay:?}").contains(OLD));
}
