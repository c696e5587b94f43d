//! Session tokens: short-lived credentials a device presents instead of an
//! API key.
//!
//! A token is `clio1.<kid>.<payload>.<sig>`:
//! - `kid`: 8 hex digits naming the signing secret (the first 4 bytes of
//!   HMAC-SHA256(secret, "clio-relay token key id")), so the current and the
//!   previous secret can both verify during a rotation;
//! - `payload`: base64url (no padding) of compact JSON
//!   `{"d":device_id,"i":issued_unix_secs,"e":expires_unix_secs,"t":token_id}`,
//!   plus `"r":tier` and `"p":[pool,…]` when given (no `p`: the default pool
//!   only); unknown fields are ignored;
//! - `sig`: base64url (no padding) of HMAC-SHA256 over the ASCII
//!   `clio1.<kid>.<payload>` under the secret.
//!
//! `clients/README.md` is the specification for minters outside the relay,
//! with test vectors.
//!
//! Expiry is exact: a token is refused from the instant `now >= expires_at`.
//! The clock-skew allowance applies only to the issue time. Keys from the
//! configuration ([`TokenKeys::from_config`]) also refuse a token whose
//! lifetime (`e − i`) is longer than `tokens.max_ttl`, so no token lives
//! longer than a revocation of its id has to be kept. Tokens are
//! credentials: nothing here ever prints one.
//!
//! A secret may be bound to pools (`tokens.pools`, `tokens.previous_pools`):
//! it then neither mints nor verifies a token naming any other pool, so a
//! development secret cannot open a production stream even by mistake.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use clio_relay::core::secret::Secret;
//! use clio_relay::core::token::{TokenError, TokenKeys};
//!
//! let secret = Secret::new("a token secret of at least 32 bytes....");
//! let keys = TokenKeys::new(&secret, None, Duration::from_secs(30));
//! let now = SystemTime::now();
//! let token = keys.mint("phone-42", Duration::from_secs(900), now).unwrap();
//! assert_eq!(keys.verify(&token, now).unwrap().device_id, "phone-42");
//! let later = now + Duration::from_secs(900);
//! assert_eq!(keys.verify(&token, later), Err(TokenError::Expired));
//! ```

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::core::config::TokensConfig;
use crate::core::secret::Secret;

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
    /// The token id is empty, too long or has characters outside
    /// `[A-Za-z0-9._:@-]`: no revocation could name it.
    BadTokenId,
    /// Minting: the ttl is under one second or overflows the clock.
    BadTtl,
    /// Minting: the system random generator failed.
    Random,
    /// The token names a pool its signing secret is not bound to
    /// (`tokens.pools`), or a pool name that is not one.
    PoolNotAllowed,
    /// The token's lifetime (expiry minus issue time) is longer than the
    /// relay accepts (`tokens.max_ttl`).
    TooLong,
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
            TokenError::BadTokenId => {
                "invalid token id (1 to 128 characters of A-Z a-z 0-9 . _ : @ -)"
            }
            TokenError::BadTtl => "token ttl must be at least 1s",
            TokenError::Random => "system random generator failed",
            TokenError::PoolNotAllowed => {
                "session token names a pool its signing secret may not mint for"
            }
            TokenError::TooLong => {
                "session token lifetime (expiry minus issue time) longer than tokens.max_ttl"
            }
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
    /// The device tier the token grants (`[devices.tier.NAME]`), if any.
    pub tier: Option<String>,
    /// The pools whose accounts may carry the stream; never empty (a token
    /// that names none gets the default pool).
    pub pools: Vec<String>,
}

impl Claims {
    /// Whether the token lets a stream use an account of `pool`.
    pub fn allows_pool(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p == pool)
    }
}

/// The JSON payload, as minted.
#[derive(Serialize)]
struct PayloadOut<'a> {
    d: &'a str,
    i: u64,
    e: u64,
    t: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    p: &'a [String],
}

/// The JSON payload, as read: extra fields (the reserved `r`) are ignored.
#[derive(Deserialize)]
struct PayloadIn {
    d: String,
    i: u64,
    e: u64,
    t: String,
    #[serde(default)]
    r: Option<String>,
    #[serde(default)]
    p: Option<Vec<String>>,
}

/// One signing secret, by its key id.
struct SigningKey {
    kid: String,
    key: hmac::Key,
    /// The pools tokens signed with it may name; `None`: any.
    pools: Option<Vec<String>>,
}

impl SigningKey {
    fn new(secret: &Secret) -> Self {
        SigningKey {
            kid: key_id(secret),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
            pools: None,
        }
    }

    /// Whether a token signed with this key may name every one of `pools`.
    fn allows(&self, pools: &[String]) -> bool {
        pools.iter().all(|p| {
            crate::core::config::valid_account_id(p)
                && self.pools.as_ref().is_none_or(|bound| bound.contains(p))
        })
    }
}

/// The pools a token's `p` claim stands for: the default pool when empty.
fn effective_pools(pools: &[String]) -> Vec<String> {
    if pools.is_empty() {
        vec![crate::core::config::DEFAULT_POOL.to_string()]
    } else {
        pools.to_vec()
    }
}

/// The keys that mint and verify session tokens: the current secret, and
/// during a rotation the previous one (verify only).
pub struct TokenKeys {
    /// Signs new tokens and verifies them.
    current: SigningKey,
    /// The secret being rotated out: verifies only.
    previous: Option<SigningKey>,
    /// `[[tokens.extra]]`: more secrets, verify only, each bound to its pools.
    extra: Vec<SigningKey>,
    /// How far in the future an issue time may be.
    clock_skew: Duration,
    /// The longest lifetime (`e − i`) a token may have; `None`: any.
    max_lifetime: Option<Duration>,
    /// Source of token ids.
    rng: SystemRandom,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys")
            .field("current_kid", &self.current.kid)
            .field("current_pools", &self.current.pools)
            .field("previous_kid", &self.previous.as_ref().map(|k| &k.kid))
            .field("previous_pools", &self.previous.as_ref().map(|k| &k.pools))
            .field(
                "extra",
                &self
                    .extra
                    .iter()
                    .map(|k| (&k.kid, &k.pools))
                    .collect::<Vec<_>>(),
            )
            .field("clock_skew", &self.clock_skew)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

impl TokenKeys {
    /// Keys from the current secret and, during a rotation, the previous one.
    pub fn new(current: &Secret, previous: Option<&Secret>, clock_skew: Duration) -> TokenKeys {
        TokenKeys {
            current: SigningKey::new(current),
            previous: previous.map(SigningKey::new),
            extra: Vec::new(),
            clock_skew,
            max_lifetime: None,
            rng: SystemRandom::new(),
        }
    }

    /// Binds the current secret to `current` pools and the previous one to
    /// `previous` (`None`: any pool): a token naming another pool is
    /// neither minted nor verified.
    pub fn bind_pools(
        mut self,
        current: Option<Vec<String>>,
        previous: Option<Vec<String>>,
    ) -> TokenKeys {
        self.current.pools = current;
        if let Some(prev) = &mut self.previous {
            prev.pools = previous;
        }
        self
    }

    /// Refuses ([`TokenError::TooLong`]) a token whose lifetime (expiry
    /// minus issue time) is longer than `max`.
    pub fn with_max_ttl(mut self, max: Duration) -> TokenKeys {
        self.max_lifetime = Some(max);
        self
    }

    /// Keys from the `[tokens]` configuration, `max_ttl` the longest
    /// lifetime they accept.
    pub fn from_config(cfg: &TokensConfig) -> TokenKeys {
        let mut keys = TokenKeys::new(&cfg.secret, cfg.previous_secret.as_ref(), cfg.clock_skew)
            .bind_pools(cfg.pools.clone(), cfg.previous_pools.clone())
            .with_max_ttl(cfg.max_ttl);
        for x in &cfg.extra {
            keys = keys.with_extra(&x.secret, x.pools.clone());
        }
        keys
    }

    /// Adds a secret that verifies tokens (never signs them) naming only
    /// `pools`: another backend's, e.g. a development build's.
    pub fn with_extra(mut self, secret: &Secret, pools: Vec<String>) -> TokenKeys {
        let mut key = SigningKey::new(secret);
        key.pools = Some(pools);
        self.extra.push(key);
        self
    }

    /// The pools the current secret is bound to (`None`: any).
    pub fn current_pools(&self) -> Option<&[String]> {
        self.current.pools.as_deref()
    }

    /// The kid new tokens are signed with.
    pub fn current_kid(&self) -> &str {
        &self.current.kid
    }

    /// Mints a token for `device_id`, issued at `now` (whole seconds, rounded
    /// down) and expiring `ttl` (whole seconds, at least 1) later, signed
    /// with the current secret. The caller enforces any maximum ttl.
    pub fn mint(
        &self,
        device_id: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        self.mint_with_tier(device_id, None, ttl, now)
    }

    /// Like [`TokenKeys::mint`], for a device tier (`[devices.tier.NAME]`).
    pub fn mint_with_tier(
        &self,
        device_id: &str,
        tier: Option<&str>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        self.mint_in(device_id, tier, &[], ttl, now)
    }

    /// Like [`TokenKeys::mint_with_tier`], for streams on the accounts of
    /// `pools` only (empty: the default pool). A secret bound to pools
    /// (`tokens.pools`) refuses any other with [`TokenError::PoolNotAllowed`].
    pub fn mint_in(
        &self,
        device_id: &str,
        tier: Option<&str>,
        pools: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        if !valid_device_id(device_id) || tier.is_some_and(|t| !valid_device_id(t)) {
            return Err(TokenError::BadDeviceId);
        }
        if ttl.as_secs() < 1 {
            return Err(TokenError::BadTtl);
        }
        let issued = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TokenError::BadTtl)?
            .as_secs();
        let expires = issued
            .checked_add(ttl.as_secs())
            .ok_or(TokenError::BadTtl)?;
        // Must stay representable as a SystemTime for verify to compare.
        UNIX_EPOCH
            .checked_add(Duration::from_secs(expires))
            .ok_or(TokenError::BadTtl)?;
        let mut id = [0u8; 8];
        self.rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        self.mint_exact_in(device_id, tier, pools, issued, expires, &hex(&id))
    }

    /// Mints the token with exactly these claims (times in Unix seconds),
    /// signed with the current secret: what the specification's test
    /// vectors are made with (`clients/README.md`). A live token needs a
    /// fresh random `token_id`; [`TokenKeys::mint`] draws one.
    pub fn mint_exact(
        &self,
        device_id: &str,
        tier: Option<&str>,
        issued: u64,
        expires: u64,
        token_id: &str,
    ) -> Result<String, TokenError> {
        self.mint_exact_in(device_id, tier, &[], issued, expires, token_id)
    }

    /// [`TokenKeys::mint_exact`] with the `p` claim: the pools named.
    pub fn mint_exact_in(
        &self,
        device_id: &str,
        tier: Option<&str>,
        pools: &[String],
        issued: u64,
        expires: u64,
        token_id: &str,
    ) -> Result<String, TokenError> {
        if !self.current.allows(&effective_pools(pools)) {
            return Err(TokenError::PoolNotAllowed);
        }
        if !valid_device_id(device_id) || tier.is_some_and(|t| !valid_device_id(t)) {
            return Err(TokenError::BadDeviceId);
        }
        if !valid_device_id(token_id) {
            return Err(TokenError::BadTokenId);
        }
        if expires <= issued {
            return Err(TokenError::BadTtl);
        }
        let json = serde_json::to_vec(&PayloadOut {
            d: device_id,
            i: issued,
            e: expires,
            t: token_id,
            r: tier,
            p: pools,
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
                _ => self
                    .extra
                    .iter()
                    .find(|k| k.kid == kid)
                    .ok_or(TokenError::UnknownKey)?,
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
        // The id a revocation names it by (`POST /admin/revocations`,
        // which takes only such ids): a token whose id no revocation can
        // name would be one that could not be revoked but by its device.
        if !valid_device_id(&p.t) {
            return Err(TokenError::BadTokenId);
        }
        let at = |secs: u64| UNIX_EPOCH.checked_add(Duration::from_secs(secs));
        let expires = at(p.e).ok_or(TokenError::Malformed)?;
        let issued = at(p.i).ok_or(TokenError::Malformed)?;
        if now >= expires {
            return Err(TokenError::Expired);
        }
        if self
            .max_lifetime
            .is_some_and(|max| p.e.saturating_sub(p.i) > max.as_secs())
        {
            return Err(TokenError::TooLong);
        }
        let pools = match p.p {
            None => effective_pools(&[]),
            // A token that names no pool at all is not one for the default.
            Some(list) if list.is_empty() => return Err(TokenError::Malformed),
            Some(list) => list,
        };
        if !key.allows(&pools) {
            return Err(TokenError::PoolNotAllowed);
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
            tier: p.r,
            pools,
        })
    }
}

#[cfg(test)]
mod tests;
