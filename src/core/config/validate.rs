//! The checks that look at values and relations between keys.

use std::collections::HashMap;
use std::time::Duration;

use super::*;

pub(super) fn check_token_secret(key: &str, secret: &Secret, p: &mut Problems) {
    let len = secret.expose().len();
    if len == 0 {
        p.push(key, "is empty");
    } else if len < MIN_TOKEN_SECRET_BYTES {
        p.push(
            key,
            format!("is {len} bytes; a token secret needs at least {MIN_TOKEN_SECRET_BYTES}"),
        );
    }
}

/// How problems name the `i`th `[[account]]`: by its id (`account
/// "prod-1"`) when it has a usable one, else by position (`account[1]`).
pub(super) fn account_label(i: usize, id: Option<&str>) -> String {
    match id {
        Some(id) if valid_account_id(id) => format!("account {id:?}"),
        _ => format!("account[{i}]"),
    }
}

/// Whether `id` is a valid account id: non-empty, `[A-Za-z0-9._-]`.
pub fn valid_account_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `region` is a valid account region label: empty (none), or
/// 1-64 of `[A-Za-z0-9._-]`, as an account id. It goes in every metrics
/// series of the account and in `/v1/config`, so it is bounded.
pub fn valid_region(region: &str) -> bool {
    region.is_empty() || valid_account_id(region)
}

/// The longest account key taken, in bytes (the config file and the
/// admin API): a key goes in every upgrade's `Authorization` header, and
/// one of tens of KiB would make each upgrade one upstream refuses for its
/// size (servers commonly take 8 KiB of headers). A real key is tens of
/// characters.
pub const MAX_KEY_BYTES: usize = 4096;

/// What a region that [`valid_region`] refuses is told (the config file and
/// the admin API say the same).
pub const REGION_RULE: &str = "must be empty or 1-64 characters of A-Z a-z 0-9 . _ -";

/// `s` quoted, cut after 64 characters (`"…"…`), so a problem about a
/// long value stays one readable line.
pub fn quote_bounded(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{:?}… ({} characters)", &s[..at], s.chars().count()),
        None => format!("{s:?}"),
    }
}

/// The checks that need no secrets and no file system: ranges, relations
/// between keys, account ids.
pub(super) fn validate_semantics(c: &Config, p: &mut Problems) {
    let s = &c.server;
    if s.shards > MAX_SHARDS {
        p.push(
            "server.shards",
            format!("{} is more than {MAX_SHARDS}", s.shards),
        );
    }
    if s.max_streams < 1 {
        p.push("server.max_streams", "must be at least 1");
    }
    if !p.reported("server.listen")
        && !p.reported("server.admin_listen")
        && s.listen == s.admin_listen
        && s.listen.port() != 0
    {
        p.push(
            "server.admin_listen",
            format!("is the same as server.listen ({})", s.listen),
        );
    }

    if let Err(e) = parse_ws_url(&c.upstream.url) {
        p.push("upstream.url", e);
    }
    for pool in &c.pools {
        if pool.name == DEFAULT_POOL || c.pools.iter().filter(|q| q.name == pool.name).count() > 1 {
            p.push(
                &format!("pool.{}", pool.name),
                "is declared twice (the default pool's endpoint is upstream.url)",
            );
        }
        if let Err(e) = parse_ws_url(&pool.url) {
            p.push(&format!("pool.{}.url", pool.name), e);
        }
    }
    if c.upstream.connect_timeout.is_zero() && !p.reported("upstream.connect_timeout") {
        p.push("upstream.connect_timeout", "must be more than 0");
    }

    validate_tokens(&c.tokens, p);

    let l = &c.limits;
    for (key, d) in [
        ("limits.handshake_timeout", l.handshake_timeout),
        ("limits.idle_timeout", l.idle_timeout),
        ("limits.stall_timeout", l.stall_timeout),
        ("limits.finalize_wait", l.finalize_wait),
    ] {
        if d.is_zero() && !p.reported(key) {
            p.push(key, "must be more than 0");
        }
    }
    for (key, n) in [
        ("limits.max_header_bytes", l.max_header_bytes),
        ("limits.max_frame_bytes", l.max_frame_bytes),
        ("limits.max_first_message_bytes", l.max_first_message_bytes),
        ("limits.max_unauthenticated", l.max_unauthenticated),
        (
            "limits.max_unauthenticated_per_address",
            l.max_unauthenticated_per_address,
        ),
    ] {
        if n == 0 {
            p.push(key, "must be more than 0");
        }
    }

    if c.accounts.is_empty() {
        p.push("account", "at least one [[account]] is needed");
    }
    // The relay carries at most MAX_ACCOUNTS: past them, the start loaded
    // the first and warned of each other one, and every reload said each
    // was "kept removed (removed at runtime)". A disabled account with no
    // key is not loaded, so it does not count.
    let keyed = c.accounts.iter().filter(|a| a.has_key()).count();
    if keyed > crate::core::keyring::MAX_ACCOUNTS {
        p.push(
            "account",
            format!(
                "{keyed} accounts with a key; a relay carries at most {}",
                crate::core::keyring::MAX_ACCOUNTS
            ),
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, a) in c.accounts.iter().enumerate() {
        let key = format!("account[{i}].id");
        if !p.reported(&key) {
            if a.id.is_empty() {
                p.push(&key, "is empty");
            } else if !valid_account_id(&a.id) {
                p.push(
                    &key,
                    format!("{:?} must be 1-64 characters of A-Z a-z 0-9 . _ -", a.id),
                );
            } else if let Some(first) = seen.insert(&a.id, i) {
                seen.insert(&a.id, first);
                p.push(
                    &key,
                    format!("duplicate id {:?} (also account[{first}])", a.id),
                );
            }
        }
        if a.pool != DEFAULT_POOL && !c.pools.iter().any(|pool| pool.name == a.pool) {
            p.push(
                &format!("{}.pool", account_label(i, Some(&a.id))),
                format!(
                    "{:?} is not a pool: declare [pool.{}] with its url, or use {DEFAULT_POOL:?}",
                    a.pool, a.pool
                ),
            );
        }
        if !valid_region(&a.region) {
            p.push(
                &format!("{}.region", account_label(i, Some(&a.id))),
                format!("{} {REGION_RULE}", quote_bounded(&a.region)),
            );
        }
        if a.max_concurrent_streams < 1 {
            p.push(
                &format!("{}.max_concurrent_streams", account_label(i, Some(&a.id))),
                "must be at least 1",
            );
        }
        if !a.key.expose().is_empty() && !a.key.fits_a_header() {
            p.push(
                &format!("{}.key", account_label(i, Some(&a.id))),
                "has spaces, line breaks or non-ASCII characters: it goes in an HTTP header",
            );
        } else if a.key.expose().len() > MAX_KEY_BYTES {
            p.push(
                &format!("{}.key", account_label(i, Some(&a.id))),
                format!(
                    "is longer than {MAX_KEY_BYTES} bytes ({}): it goes in every upgrade's header",
                    a.key.expose().len()
                ),
            );
        }
    }
}

/// The checks on `[tokens]` durations and pool bindings (secrets are
/// checked where they are read).
pub(super) fn validate_tokens(t: &TokensConfig, p: &mut Problems) {
    for (key, pools) in [
        ("tokens.pools", &t.pools),
        ("tokens.previous_pools", &t.previous_pools),
    ] {
        let Some(pools) = pools else { continue };
        if pools.is_empty() {
            p.push(
                key,
                "is empty, so every token would be refused: name at least one pool, \
                 or leave it out for any pool",
            );
        }
        for name in pools {
            if !t.known_pools.contains(name) {
                p.push(
                    key,
                    format!(
                        "{name:?} is not a pool (the file declares {})",
                        t.known_pools.join(", ")
                    ),
                );
            }
        }
    }
    let mut kids = vec![(
        "tokens.secret".to_string(),
        crate::core::token::key_id(&t.secret),
    )];
    if let Some(prev) = &t.previous_secret {
        kids.push((
            "tokens.previous_secret".into(),
            crate::core::token::key_id(prev),
        ));
    }
    for (i, x) in t.extra.iter().enumerate() {
        let key = format!("tokens.extra[{i}].pools");
        if x.pools.is_empty() {
            p.push(&key, "is empty: name the pools its tokens may use");
        }
        for name in &x.pools {
            if !t.known_pools.contains(name) {
                p.push(
                    &key,
                    format!(
                        "{name:?} is not a pool (the file declares {})",
                        t.known_pools.join(", ")
                    ),
                );
            }
        }
        let kid = crate::core::token::key_id(&x.secret);
        if let Some((other, _)) = kids.iter().find(|(_, k)| *k == kid) {
            p.push(
                &format!("tokens.extra[{i}]"),
                format!("has the same secret as {other}: each secret is bound once"),
            );
        }
        kids.push((format!("tokens.extra[{i}]"), kid));
    }
    if t.previous_pools.is_some() && t.previous_secret.is_none() {
        p.push(
            "tokens.previous_pools",
            "binds the previous secret, but there is none (tokens.previous_secret_env or _file)",
        );
    }
    for (key, d) in [
        ("tokens.default_ttl", t.default_ttl),
        ("tokens.max_ttl", t.max_ttl),
    ] {
        if d < Duration::from_secs(1) && !p.reported(key) {
            p.push(key, "must be at least 1s");
        }
    }
    if !p.reported("tokens.default_ttl")
        && !p.reported("tokens.max_ttl")
        && t.default_ttl > t.max_ttl
    {
        p.push(
            "tokens.default_ttl",
            format!(
                "{} is longer than tokens.max_ttl {}",
                humantime::format_duration(t.default_ttl),
                humantime::format_duration(t.max_ttl)
            ),
        );
    }
}
