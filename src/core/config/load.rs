//! Resolution of the raw layer (`raw`) into a [`Config`]: defaults,
//! durations, addresses, secrets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::url::UrlProblem;
use super::validate::{check_token_secret, validate_semantics, validate_tokens};
use super::*;

/// Parses and resolves a whole file.
pub(super) fn load_all(text: &str, base: &Path) -> Result<Config, ConfigError> {
    resolve(parse(text)?, base)
}

/// Parses a whole file (unknown keys are still errors) but resolves and
/// checks only `[tokens]`: what minting a token needs, without reading any
/// account key; with the names of the device tiers (`[devices.tier.NAME]`).
pub(super) fn load_tokens(
    text: &str,
    base: &Path,
) -> Result<(TokensConfig, Vec<String>), ConfigError> {
    let raw = parse(text)?;
    let mut p = Problems::default();
    let known = pool_names(&raw);
    let tiers = raw.devices.tier.keys().cloned().collect();
    let tokens = resolve_tokens(raw.tokens, known, base, &mut p);
    if let Some(t) = &tokens {
        validate_tokens(t, &mut p);
    }
    match tokens {
        Some(t) if p.lines.is_empty() => Ok((t, tiers)),
        _ => Err(p.into()),
    }
}

/// Parses a whole file but resolves only what talking to the admin API
/// needs: `server.admin_listen` and `admin.token`.
pub(super) fn load_admin_client(
    text: &str,
    base: &Path,
) -> Result<(SocketAddr, Secret), ConfigError> {
    let raw = parse(text)?;
    let mut p = Problems::default();
    let addr = match raw.server.admin_listen {
        None => ServerConfig::default().admin_listen,
        Some(s) => s.trim().parse().unwrap_or_else(|_| {
            p.push(
                "server.admin_listen",
                format!("invalid socket address {s:?}"),
            );
            ServerConfig::default().admin_listen
        }),
    };
    let token = resolve_secret(
        "admin",
        ("token_env", raw.admin.token_env),
        ("token_file", raw.admin.token_file),
        false,
        base,
        &mut p,
    )
    .flatten();
    match token {
        Some(t) if p.lines.is_empty() => Ok((addr, t)),
        None if p.lines.is_empty() => Err(ConfigError::one(
            "admin: no admin token (admin.token_env or admin.token_file)".to_string(),
        )),
        _ => Err(p.into()),
    }
}

/// A duration value, or its default (with a problem recorded) if it does not parse.
fn duration(key: &str, v: Option<String>, default: Duration, p: &mut Problems) -> Duration {
    match v {
        None => default,
        Some(s) => parse_duration(&s).unwrap_or_else(|e| {
            p.push(key, e);
            default
        }),
    }
}

/// The pools a file declares: the default pool, then each `[pool.NAME]`.
fn pool_names(raw: &RawFile) -> Vec<String> {
    std::iter::once(DEFAULT_POOL.to_string())
        .chain(raw.pool.keys().filter(|n| *n != DEFAULT_POOL).cloned())
        .collect()
}

/// Resolves `[tokens]`; `None` if the section is missing. `known`: the
/// pools the file declares.
fn resolve_tokens(
    raw: Option<RawTokens>,
    known: Vec<String>,
    base: &Path,
    p: &mut Problems,
) -> Option<TokensConfig> {
    let defaults_tokens = TokensConfig::new(Secret::new(""));
    match raw {
        None => {
            p.push(
                "tokens",
                "missing [tokens] section: set tokens.secret_env or tokens.secret_file",
            );
            None
        }
        Some(t) => {
            let secret = resolve_secret(
                "tokens",
                ("secret_env", t.secret_env),
                ("secret_file", t.secret_file),
                true,
                base,
                p,
            )
            .flatten();
            let previous = resolve_secret(
                "tokens",
                ("previous_secret_env", t.previous_secret_env),
                ("previous_secret_file", t.previous_secret_file),
                false,
                base,
                p,
            );
            for (key, s) in [
                ("tokens.secret", &secret),
                ("tokens.previous_secret", &previous.clone().flatten()),
            ] {
                if let Some(s) = s {
                    check_token_secret(key, s, p);
                }
            }
            let tokens = TokensConfig {
                secret: secret.unwrap_or_else(|| Secret::new("")),
                previous_secret: previous.flatten(),
                default_ttl: duration(
                    "tokens.default_ttl",
                    t.default_ttl,
                    defaults_tokens.default_ttl,
                    p,
                ),
                max_ttl: duration("tokens.max_ttl", t.max_ttl, defaults_tokens.max_ttl, p),
                clock_skew: duration(
                    "tokens.clock_skew",
                    t.clock_skew,
                    defaults_tokens.clock_skew,
                    p,
                ),
                pools: t.pools,
                previous_pools: t.previous_pools,
                known_pools: known,
                extra: Vec::new(),
            };
            let mut tokens = tokens;
            for (i, x) in t.extra.into_iter().enumerate() {
                let key = format!("tokens.extra[{i}]");
                let secret = resolve_secret(
                    &key,
                    ("secret_env", x.secret_env),
                    ("secret_file", x.secret_file),
                    true,
                    base,
                    p,
                )
                .flatten();
                let Some(pools) = x.pools else {
                    p.push(
                        &format!("{key}.pools"),
                        "missing: an extra secret is always bound to its pools",
                    );
                    continue;
                };
                if let Some(secret) = secret {
                    check_token_secret(&format!("{key}.secret"), &secret, p);
                    tokens.extra.push(ExtraSecret { secret, pools });
                }
            }
            Some(tokens)
        }
    }
}

/// Turns the raw file into a [`Config`], collecting every problem.
fn resolve(raw: RawFile, base: &Path) -> Result<Config, ConfigError> {
    let mut p = Problems::default();
    let known_pools = pool_names(&raw);
    let defaults_server = ServerConfig::default();
    let defaults_up = UpstreamConfig::default();
    let defaults_limits = LimitsConfig::default();

    let addr = |key: &str, v: Option<String>, default: SocketAddr, p: &mut Problems| match v {
        None => default,
        Some(s) => s.trim().parse().unwrap_or_else(|_| {
            p.push(key, format!("invalid socket address {s:?} (want IP:PORT)"));
            default
        }),
    };
    let server = ServerConfig {
        listen: addr(
            "server.listen",
            raw.server.listen,
            defaults_server.listen,
            &mut p,
        ),
        admin_listen: addr(
            "server.admin_listen",
            raw.server.admin_listen,
            defaults_server.admin_listen,
            &mut p,
        ),
        shards: raw.server.shards.unwrap_or(defaults_server.shards),
        max_streams: raw
            .server
            .max_streams
            .unwrap_or(defaults_server.max_streams),
        max_streams_set: raw.server.max_streams.is_some(),
        allow: networks("server.allow", raw.server.allow, &mut p),
        proxy_protocol_from: networks(
            "server.proxy_protocol_from",
            raw.server.proxy_protocol_from,
            &mut p,
        ),
    };

    let auth = match raw.upstream.auth.as_deref() {
        None | Some("header") => AuthMode::Header,
        Some("config") => AuthMode::Config,
        Some(other) => {
            p.push(
                "upstream.auth",
                format!("must be \"header\" or \"config\", not {other:?}"),
            );
            AuthMode::Header
        }
    };
    let explicit_url = (raw.upstream.url.is_some(), raw.admin.rest_url.is_some());
    let upstream = UpstreamConfig {
        url: raw.upstream.url.unwrap_or(defaults_up.url),
        auth,
        ca_file: raw.upstream.ca_file.map(|f| base.join(f)),
        connect_timeout: duration(
            "upstream.connect_timeout",
            raw.upstream.connect_timeout,
            defaults_up.connect_timeout,
            &mut p,
        ),
    };

    let tokens = resolve_tokens(raw.tokens, known_pools, base, &mut p);

    let l = raw.limits;
    let limits = LimitsConfig {
        handshake_timeout: duration(
            "limits.handshake_timeout",
            l.handshake_timeout,
            defaults_limits.handshake_timeout,
            &mut p,
        ),
        max_header_bytes: l
            .max_header_bytes
            .unwrap_or(defaults_limits.max_header_bytes),
        max_frame_bytes: l.max_frame_bytes.unwrap_or(defaults_limits.max_frame_bytes),
        max_first_message_bytes: l
            .max_first_message_bytes
            .unwrap_or(defaults_limits.max_first_message_bytes),
        idle_timeout: duration(
            "limits.idle_timeout",
            l.idle_timeout,
            defaults_limits.idle_timeout,
            &mut p,
        ),
        stall_timeout: duration(
            "limits.stall_timeout",
            l.stall_timeout,
            defaults_limits.stall_timeout,
            &mut p,
        ),
        socket_buffer: l.socket_buffer.unwrap_or(defaults_limits.socket_buffer),
        drain_timeout: duration(
            "limits.drain_timeout",
            l.drain_timeout,
            defaults_limits.drain_timeout,
            &mut p,
        ),
        finalize_wait: duration(
            "limits.finalize_wait",
            l.finalize_wait,
            defaults_limits.finalize_wait,
            &mut p,
        ),
        max_unauthenticated: l
            .max_unauthenticated
            .unwrap_or(defaults_limits.max_unauthenticated),
        max_unauthenticated_per_address: l
            .max_unauthenticated_per_address
            .unwrap_or(defaults_limits.max_unauthenticated_per_address),
    };

    let defaults_failover = FailoverConfig::default();
    let failover = FailoverConfig {
        replay_bytes: raw
            .failover
            .replay_bytes
            .unwrap_or(defaults_failover.replay_bytes),
        resume_audio: duration(
            "failover.resume_audio",
            raw.failover.resume_audio,
            defaults_failover.resume_audio,
            &mut p,
        ),
        max_resumes: raw
            .failover
            .max_resumes
            .unwrap_or(defaults_failover.max_resumes),
        resume_memory: raw
            .failover
            .resume_memory
            .unwrap_or_else(|| FailoverConfig::resume_memory_for(server.max_streams)),
    };

    let mut accounts = Vec::with_capacity(raw.account.len());
    for (i, a) in raw.account.into_iter().enumerate() {
        let prefix = account_label(i, a.id.as_deref());
        // A disabled account may be listed before its key exists: an unset
        // variable or a missing file leaves it keyless (it is not loaded,
        // and check-config warns) instead of failing the whole file.
        let key_to_come = if a.enabled == Some(false) {
            match (&a.key_env, &a.key_file) {
                (Some(var), None) if std::env::var_os(var).is_none_or(|v| v.is_empty()) => {
                    Some(KeySource::Env(var.clone()))
                }
                (None, Some(f)) if !base.join(f).exists() => Some(KeySource::File(base.join(f))),
                _ => None,
            }
        } else {
            None
        };
        let key = if key_to_come.is_some() {
            None
        } else {
            resolve_secret(
                &prefix,
                ("key_env", a.key_env),
                ("key_file", a.key_file),
                true,
                base,
                &mut p,
            )
            .flatten()
        };
        let id = match a.id {
            Some(id) => id,
            None => {
                p.push(&format!("{prefix}.id"), "missing");
                String::new()
            }
        };
        let mut acc = AccountConfig::new(id, key.unwrap_or_else(|| Secret::new("")));
        acc.key_to_come = key_to_come;
        acc.region = a.region.unwrap_or_default();
        acc.pool = a.pool.unwrap_or(acc.pool);
        acc.enabled = a.enabled.unwrap_or(true);
        acc.max_concurrent_streams = a
            .max_concurrent_streams
            .unwrap_or(acc.max_concurrent_streams);
        acc.price_per_hour = a.price_per_hour.unwrap_or(0.0);
        acc.monthly_budget = a.monthly_budget.unwrap_or(0.0);
        // `nan` and `inf` are TOML floats too, and pass a `< 0` test: a
        // `nan` price priced every cost `null` in /admin/usage and `NaN`
        // in /metrics, and a `nan` budget never alerted.
        for (key, v) in [
            ("price_per_hour", acc.price_per_hour),
            ("monthly_budget", acc.monthly_budget),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                p.push(
                    &format!("{prefix}.{key}"),
                    "must be a finite number, 0 or more",
                );
            }
        }
        accounts.push(acc);
    }

    let mut admin = resolve_admin(raw.admin, base, &mut p);
    let mut upstream = upstream;
    let pool_limits = resolve_pool_limits(&raw.pool, &mut p);
    let pools = resolve_pools(raw.pool, explicit_url, &mut upstream, &mut admin, &mut p);
    let mut devices = resolve_devices(raw.devices, &mut p);
    devices.pools = pool_limits;
    let usage = resolve_usage(raw.usage, raw.alerts, &mut p);
    let tls = raw.tls.and_then(|t| match (t.cert_file, t.key_file) {
        (Some(c), Some(k)) => {
            let tls = TlsConfig {
                cert_file: base.join(c),
                key_file: base.join(k),
            };
            if let Err(e) = crate::core::tls::server_config(&tls) {
                p.push("tls", e);
            }
            Some(tls)
        }
        _ => {
            p.push("tls", "needs both cert_file and key_file");
            None
        }
    });
    let cluster = raw
        .cluster
        .map(|c| resolve_cluster(c, base, admin.master_key.is_some(), &mut p));
    let config = Config {
        server,
        upstream,
        tokens: tokens.unwrap_or_else(|| TokensConfig::new(Secret::new(""))),
        limits,
        accounts,
        admin,
        devices,
        usage,
        tls,
        cluster,
        failover,
        pools,
        secret_files: std::mem::take(&mut p.secret_files),
    };
    if let Some(ca) = &config.upstream.ca_file {
        if !ca.is_file() {
            p.push(
                "upstream.ca_file",
                format!("{} does not exist or is not a file", ca.display()),
            );
        } else if let Err(e) = crate::dataplane::upstream::tls_client_config(Some(ca)) {
            // What the start would stop on (no PEM certificate in it, one
            // that is not a CA's), found here. The message names the key.
            p.keys.insert("upstream.ca_file".to_string());
            p.lines.push(e.to_string());
        }
    }
    validate_semantics(&config, &mut p);
    if p.lines.is_empty() {
        Ok(config)
    } else {
        Err(p.into())
    }
}

/// Each pool's own limits: `[pool.NAME] max_streams` and
/// `[pool.NAME.devices]` (unset fields: no limit of the pool's own; the
/// tier's still hold). `[pool.default]` may set them for the default pool.
fn resolve_pool_limits(
    raw: &std::collections::BTreeMap<String, RawPool>,
    p: &mut Problems,
) -> std::collections::BTreeMap<String, PoolLimits> {
    raw.iter()
        .filter(|(_, rp)| rp.max_streams.is_some() || rp.devices.is_some())
        .map(|(name, rp)| {
            let devices = rp.devices.as_ref().map_or_else(DeviceLimits::default, |d| {
                device_limits(
                    &format!("pool.{name}.devices"),
                    d,
                    &DeviceLimits::default(),
                    p,
                )
            });
            let limits = PoolLimits {
                max_streams: rp.max_streams.unwrap_or(0),
                devices,
            };
            (name.clone(), limits)
        })
        .collect()
}

/// Resolves `[pool.NAME]` into the pool list (the default pool is not in it).
/// `[pool.default]` may give the default pool's endpoint instead of
/// `upstream.url` and `admin.rest_url` (`explicit`: whether those were set),
/// not as well.
fn resolve_pools(
    raw: std::collections::BTreeMap<String, RawPool>,
    (explicit_url, explicit_rest): (bool, bool),
    upstream: &mut UpstreamConfig,
    admin: &mut AdminConfig,
    p: &mut Problems,
) -> Vec<PoolConfig> {
    let mut pools = Vec::with_capacity(raw.len());
    for (name, rp) in raw {
        let key = format!("pool.{name}");
        if let Some(u) = &rp.rest_url {
            if let Err(why) = check_http_url(u) {
                p.push(&format!("{key}.rest_url"), why);
            }
        }
        if name == DEFAULT_POOL {
            match rp.url {
                Some(_) if explicit_url => p.push(
                    "pool.default.url",
                    "the default pool's endpoint is upstream.url: set only one of them",
                ),
                Some(u) => upstream.url = u,
                None => {}
            }
            match rp.rest_url {
                Some(_) if explicit_rest => p.push(
                    "pool.default.rest_url",
                    "the default pool's REST base is admin.rest_url: set only one of them",
                ),
                Some(u) => admin.rest_url = Some(u),
                None => {}
            }
            continue;
        }
        if !valid_account_id(&name) {
            p.push(&key, "pool names are 1-64 of A-Z a-z 0-9 . _ -");
        }
        let Some(url) = rp.url else {
            p.push(
                &format!("{key}.url"),
                "missing: every pool needs its WebSocket endpoint",
            );
            continue;
        };
        pools.push(PoolConfig {
            name,
            url,
            rest_url: rp.rest_url,
        });
    }
    pools
}

/// Parses a list of networks (`10.0.0.0/8`, or a bare address).
fn networks(key: &str, list: Option<Vec<String>>, p: &mut Problems) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (i, net) in list.unwrap_or_default().iter().enumerate() {
        let text = net.trim();
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(n) => out.push(n),
            Err(_) => p.push(
                &format!("{key}[{i}]"),
                format!("invalid network {text:?} (want e.g. 10.0.0.0/8 or ::1)"),
            ),
        }
    }
    out
}

fn device_limits(
    key: &str,
    raw: &RawDeviceLimits,
    base: &DeviceLimits,
    p: &mut Problems,
) -> DeviceLimits {
    DeviceLimits {
        max_concurrent_streams: raw
            .max_concurrent_streams
            .unwrap_or(base.max_concurrent_streams),
        streams_per_minute: raw.streams_per_minute.unwrap_or(base.streams_per_minute),
        audio_seconds_per_day: raw
            .audio_seconds_per_day
            .unwrap_or(base.audio_seconds_per_day),
        max_stream_length: duration(
            &format!("{key}.max_stream_length"),
            raw.max_stream_length.clone(),
            base.max_stream_length,
            p,
        ),
    }
}

/// Resolves `[devices]` and its tiers (a tier's unset fields take the default's).
fn resolve_devices(raw: RawDevices, p: &mut Problems) -> DevicesConfig {
    let default = device_limits(
        "devices",
        &raw.default_limits(),
        &DeviceLimits::default(),
        p,
    );
    let mut tiers = std::collections::BTreeMap::new();
    for (name, t) in &raw.tier {
        if !valid_account_id(name) {
            p.push(
                &format!("devices.tier.{name}"),
                "tier names are 1-64 of A-Z a-z 0-9 . _ -",
            );
        }
        tiers.insert(
            name.clone(),
            device_limits(&format!("devices.tier.{name}"), t, &default, p),
        );
    }
    DevicesConfig {
        default,
        tiers,
        pools: Default::default(),
    }
}

/// Resolves `[usage]` and `[alerts]`.
fn resolve_usage(u: RawUsage, a: RawAlerts, p: &mut Problems) -> UsageConfig {
    let d = UsageConfig::default();
    let da = AlertsConfig::default();
    for (key, v) in [
        ("alerts.concurrency_ratio", a.concurrency_ratio),
        ("alerts.budget_ratio", a.budget_ratio),
        ("alerts.error_rate", a.error_rate),
    ] {
        if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            p.push(key, "must be between 0 and 1");
        }
    }
    // A `nan` factor would keep `unusual_usage` silent, and one of 0 or
    // below would fire it for any usage over the floor.
    if a.unusual_factor
        .is_some_and(|v| !(v.is_finite() && v > 0.0))
    {
        p.push("alerts.unusual_factor", "must be a finite number above 0");
    }
    if let Some(u) = &a.webhook_url {
        if let Err(why) = check_http_url(u) {
            p.push("alerts.webhook_url", why);
        }
    }
    UsageConfig {
        currency: u.currency.unwrap_or(d.currency),
        persist_interval: duration(
            "usage.persist_interval",
            u.persist_interval,
            d.persist_interval,
            p,
        ),
        reconcile_interval: duration(
            "usage.reconcile_interval",
            u.reconcile_interval,
            d.reconcile_interval,
            p,
        ),
        alerts: AlertsConfig {
            interval: duration("alerts.interval", a.interval, da.interval, p),
            concurrency_ratio: a.concurrency_ratio.unwrap_or(da.concurrency_ratio),
            budget_ratio: a.budget_ratio.unwrap_or(da.budget_ratio),
            unusual_factor: a.unusual_factor.unwrap_or(da.unusual_factor),
            unusual_min_audio_seconds: a
                .unusual_min_audio_seconds
                .unwrap_or(da.unusual_min_audio_seconds),
            error_rate: a.error_rate.unwrap_or(da.error_rate),
            error_min_streams: a.error_min_streams.unwrap_or(da.error_min_streams),
            slow_first_result: duration(
                "alerts.slow_first_result",
                a.slow_first_result,
                da.slow_first_result,
                p,
            ),
            webhook_url: a.webhook_url,
        },
    }
}

/// Resolves `[admin]`.
fn resolve_admin(a: RawAdmin, base: &Path, p: &mut Problems) -> AdminConfig {
    let d = AdminConfig::default();
    let token = resolve_secret(
        "admin",
        ("token_env", a.token_env),
        ("token_file", a.token_file),
        false,
        base,
        p,
    )
    .flatten();
    if let Some(t) = &token {
        if t.expose().len() < 16 {
            p.push("admin.token", "must be at least 16 characters");
        }
    }
    let raw = a
        .master_key_file
        .as_ref()
        .filter(|_| a.master_key_env.is_none())
        .map(|f| base.join(f))
        .map(|path| {
            let raw = raw_master_key(&path);
            (path, raw)
        });
    let master_key = match raw {
        Some((path, RawKey::Key(k))) => {
            p.secret_files
                .push(("admin: master_key_file".to_string(), path));
            Some(k)
        }
        Some((path, RawKey::NotText(len))) => {
            p.push(
                "admin",
                format!(
                    "master_key_file {}: {len} bytes that are not text: {MASTER_KEY_FORMS}",
                    path.display()
                ),
            );
            None
        }
        Some((_, RawKey::Text)) | None => resolve_secret(
            "admin",
            ("master_key_env", a.master_key_env),
            ("master_key_file", a.master_key_file),
            false,
            base,
            p,
        )
        .flatten(),
    };
    if let Some(k) = &master_key {
        let k = k.expose().trim();
        if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.push("admin.master_key", MASTER_KEY_FORMS);
        }
    }
    let allow = networks("admin.allow", a.allow, p);
    if let Some(u) = &a.rest_url {
        if let Err(why) = check_http_url(u) {
            p.push("admin.rest_url", why);
        }
    }
    AdminConfig {
        token,
        allow,
        state_dir: a.state_dir.map(|d| base.join(d)).unwrap_or(d.state_dir),
        master_key,
        rotation_period: duration(
            "admin.rotation_period",
            a.rotation_period,
            d.rotation_period,
            p,
        ),
        rotation_overlap: duration(
            "admin.rotation_overlap",
            a.rotation_overlap,
            d.rotation_overlap,
            p,
        ),
        health_interval: duration(
            "admin.health_interval",
            a.health_interval,
            d.health_interval,
            p,
        ),
        rest_url: a.rest_url,
    }
}

/// Resolves `[cluster]`.
fn resolve_cluster(
    c: RawCluster,
    base: &Path,
    has_master_key: bool,
    p: &mut Problems,
) -> ClusterConfig {
    let redis_url = c.redis_url.unwrap_or_default();
    let rest = redis_url
        .strip_prefix("redis://")
        .or_else(|| redis_url.strip_prefix("rediss://"));
    match rest {
        None => p.push(
            "cluster.redis_url",
            "must start with redis:// or rediss:// (TLS)",
        ),
        // The authority ends at the first '/'; an '@' in it carries a
        // password, which belongs in password_env or password_file.
        Some(r) if r.split('/').next().unwrap_or("").contains('@') => p.push(
            "cluster.redis_url",
            "must not hold credentials (the URL is not shown); \
             put the password in cluster.password_env or cluster.password_file",
        ),
        Some(r) if r.split('/').next().unwrap_or("").is_empty() => {
            p.push("cluster.redis_url", "has no host")
        }
        // What the Redis client would refuse at start (a port past 65535,
        // a database that is not a number, a broken address): found here,
        // so check-config says so and `run` exits 3 rather than 1, which
        // systemd would restart every 2 s. Its message never quotes the URL.
        Some(_) => {
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(redis_url.as_str()) {
                p.push(
                    "cluster.redis_url",
                    format!(
                        "is not a Redis URL the client can use ({e}); write redis://HOST:PORT/DB"
                    ),
                );
            }
        }
    }
    let ca = c.ca_file.and_then(|f| {
        let path = base.join(f);
        if !redis_url.starts_with("rediss://") {
            p.push("cluster.ca_file", "is only for a rediss:// (TLS) redis_url");
            return None;
        }
        match std::fs::read(&path) {
            // Read as the connects read it (`store/timed.rs`), so a file
            // cut short or a block that is no certificate is found here,
            // by its key, not at the start as a fault of the URL.
            Ok(pem) => match redis_roots(&pem) {
                Ok(()) => Some(pem),
                Err(why) => {
                    p.push("cluster.ca_file", format!("{}: {why}", path.display()));
                    None
                }
            },
            Err(e) => {
                p.push(
                    "cluster.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    });
    let password = resolve_secret(
        "cluster",
        ("password_env", c.password_env),
        ("password_file", c.password_file),
        false,
        base,
        p,
    )
    .flatten();
    let node_id = c.node_id.unwrap_or_else(crate::core::cluster::host_name);
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        p.push(
            "cluster.node_id",
            "must be 1 to 64 of A-Z a-z 0-9 . _ - (set it when the host name is not)",
        );
    }
    let lease_ttl = duration("cluster.lease_ttl", c.lease_ttl, Duration::from_secs(15), p);
    if lease_ttl < Duration::from_secs(1) {
        p.push("cluster.lease_ttl", "must be at least 1s");
    }
    let timeout = duration("cluster.timeout", c.timeout, Duration::from_millis(250), p);
    if timeout.is_zero() || timeout > Duration::from_secs(5) {
        p.push("cluster.timeout", "must be more than 0 and at most 5s");
    }
    let on_store_down = match c.on_store_down.as_deref() {
        None | Some("local") => StoreDown::Local,
        Some("refuse") => StoreDown::Refuse,
        Some(other) => {
            p.push(
                "cluster.on_store_down",
                format!("must be \"local\" or \"refuse\", not {other:?}"),
            );
            StoreDown::Local
        }
    };
    if !has_master_key {
        p.push(
            "cluster",
            "needs admin.master_key_env or admin.master_key_file: \
             accounts are shared through Redis encrypted under the master key",
        );
    }
    let username = c.username;
    if username
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.chars().any(|ch| ch.is_whitespace()))
    {
        p.push(
            "cluster.username",
            "must be a Redis ACL user name (no spaces)",
        );
    }
    if username.is_some() && password.is_none() {
        p.push(
            "cluster.username",
            "needs cluster.password_env or cluster.password_file",
        );
    }
    ClusterConfig {
        redis_url,
        ca,
        username,
        password,
        node_id,
        lease_ttl,
        on_store_down,
        timeout,
    }
}

/// What the relay's HTTP client would refuse in `url` when it is used,
/// found at load time: a scheme other than `http`/`https`, credentials
/// (`user:password@`, which it never sends), no host, a port that is not
/// 1 to 65535. Its authority is read as `upstream.url`'s is (one parser).
/// Never quotes the URL: a webhook may hold a secret in its path.
fn check_http_url(url: &str) -> Result<(), &'static str> {
    let as_ws = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        return Err("must start with http:// or https://");
    };
    let Err(e) = parse_ws_url(&as_ws) else {
        return Ok(());
    };
    Err(match e.problem {
        UrlProblem::Credentials => {
            "must not hold credentials (user:password@): the relay sends none; \
             a webhook that needs a secret can take it in the URL's path or query"
        }
        UrlProblem::NoHost => "has no host",
        UrlProblem::Port => "has an invalid port (not a number from 1 to 65535)",
        UrlProblem::UnclosedIpv6 => "has an unclosed IPv6 address",
        UrlProblem::Fragment => "must not have a fragment (#...): it is never sent",
        UrlProblem::Scheme => "must start with http:// or https://",
    })
}

/// The two forms of a master key the relay takes.
const MASTER_KEY_FORMS: &str =
    "must be 64 hex digits (`openssl rand -hex 32`), or a master_key_file of exactly 32 raw bytes";

/// What a `master_key_file` holds.
enum RawKey {
    /// Exactly 32 bytes that are not hex digits (what `systemd-creds` or
    /// `head -c 32 /dev/urandom` write): the key, as the 64 hex digits the
    /// rest of the relay reads.
    Key(Secret),
    /// Bytes that are not text, of another length: no key (how many).
    NotText(usize),
    /// Text, or a file that cannot be read: read as any other secret file.
    Text,
}

fn raw_master_key(path: &Path) -> RawKey {
    let Ok(mut bytes) = std::fs::read(path) else {
        return RawKey::Text;
    };
    let hex_text = bytes
        .iter()
        .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace());
    let key = if bytes.len() == 32 && !hex_text {
        RawKey::Key(Secret::new(
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        ))
    } else if std::str::from_utf8(&bytes).is_err() {
        RawKey::NotText(bytes.len())
    } else {
        RawKey::Text
    };
    bytes.iter_mut().for_each(|b| *b = 0);
    key
}

/// Reads a secret given as `<env>` or `<file>` under `section`. Returns
/// `None` when the configuration is wrong (problem recorded), `Some(None)`
/// when an optional secret is absent, `Some(Some(secret))` otherwise.
fn resolve_secret(
    section: &str,
    (env_key, env): (&str, Option<String>),
    (file_key, file): (&str, Option<PathBuf>),
    required: bool,
    base: &Path,
    p: &mut Problems,
) -> Option<Option<Secret>> {
    let value = match (env, file) {
        (Some(_), Some(_)) => {
            p.push(section, format!("set only one of {env_key} or {file_key}"));
            return None;
        }
        (None, None) if required => {
            p.push(section, format!("set one of {env_key} or {file_key}"));
            return None;
        }
        (None, None) => return Some(None),
        (Some(var), None) => {
            // An operator may paste the key itself where its variable's name
            // belongs; such a value is refused without being echoed.
            if !valid_env_name(&var) {
                p.push(
                    section,
                    format!(
                        "{env_key} must name an environment variable \
                         ([A-Za-z_][A-Za-z0-9_]*); the value is not shown in case it is a secret"
                    ),
                );
                return None;
            }
            let shown = if shown_env_name(&var) {
                format!("{env_key} {var}")
            } else {
                format!("the variable named by {env_key}")
            };
            match std::env::var(&var) {
                Ok(v) if v.is_empty() => {
                    p.push(section, format!("{shown} is empty"));
                    p.unset_env = true;
                    return None;
                }
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => {
                    p.push(section, format!("{shown} is not set"));
                    p.unset_env = true;
                    return None;
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    p.push(section, format!("{shown} is not valid UTF-8"));
                    return None;
                }
            }
        }
        (None, Some(written)) => {
            let path = base.join(&written);
            // The io::Error never quotes file contents, so it is safe to
            // show; the path is shown when it looks like one, since a key
            // pasted where its file's name belongs is never found.
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let shown = if shown_file_name(&written) {
                        format!("{file_key} {}", path.display())
                    } else {
                        format!("the file named by {file_key} (not shown in case it is a secret)")
                    };
                    let hint = credential_hint(&path, &e);
                    let hint = if hint.is_empty() {
                        unreadable_hint(&path, file_key, shown_file_name(&written), false, &e)
                    } else {
                        hint
                    };
                    p.push(section, format!("{shown}: {e}{hint}"));
                    return None;
                }
            };
            let Ok(mut text) = String::from_utf8(bytes) else {
                p.push(
                    section,
                    format!("{file_key} {}: not valid UTF-8", path.display()),
                );
                return None;
            };
            while text.ends_with(['\n', '\r']) {
                text.pop();
            }
            p.secret_files
                .push((format!("{section}: {file_key}"), path.clone()));
            if text.is_empty() {
                p.push(section, format!("{file_key} {} is empty", path.display()));
                return None;
            }
            text
        }
    };
    Some(Some(Secret::new(value)))
}

/// Whether `name` is a portable environment variable name.
fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether a file name as written is safe to print: it has a directory or
/// an extension, or is too short to be a key. A long bare token might be a
/// key pasted in by mistake.
pub(crate) fn shown_file_name(written: &Path) -> bool {
    let text = written.to_string_lossy();
    text.contains(['/', '.']) || text.len() < 20
}

/// Whether an env var name is safe to print: the conventional upper-case
/// shape and not key-length. Anything else might be a key pasted in by
/// mistake, so messages describe it instead of quoting it.
pub(crate) fn shown_env_name(name: &str) -> bool {
    name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// What to add to "No such file" for a systemd credential
/// (`/run/credentials/UNIT/NAME`): that directory exists only while the
/// unit runs, made from its `LoadCredential=` lines, so `check-config`
/// or `mint-token` run by hand before the first start cannot find it;
/// the shipped unit loads `NAME` from `/etc/clio-relay/credentials/NAME`.
fn credential_hint(path: &Path, e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::NotFound {
        return String::new();
    }
    let Ok(rest) = path.strip_prefix("/run/credentials") else {
        return String::new();
    };
    let mut parts = rest.components();
    let (Some(unit), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return String::new();
    };
    let unit = unit.as_os_str().to_string_lossy();
    let name = name.as_os_str().to_string_lossy();
    format!(
        "; systemd makes /run/credentials/{unit}/ only while {unit} runs, from its \
         LoadCredential= lines (the shipped unit loads {name} from \
         /etc/clio-relay/credentials/{name}): make that file (tools/install.sh prints how), \
         then start the service (a file it cannot load fails the start, in `journalctl -u \
         {unit}`); while it runs, check-config as root reads the copies"
    )
}

/// What to add to "Permission denied" for a secret file: which user the
/// relay runs as and whose the file is, and what to do. `check-config`
/// run as root reads any file, while the shipped unit runs the relay as
/// a dynamic user, which reads no root-only file: the start then fails on
/// a file `check-config` took. A file in `/run/credentials/` is such a
/// credential already, which root reads: an operator's command run as
/// another user is told to run as root. `named` says whether the path
/// may be shown (a long bare name may be a key pasted in by mistake);
/// `public`, that the file is a certificate chain, which every user may
/// read, rather than a secret.
pub(crate) fn unreadable_hint(
    path: &Path,
    file_key: &str,
    named: bool,
    public: bool,
    e: &std::io::Error,
) -> String {
    use std::os::unix::fs::MetadataExt as _;
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let whose = match std::fs::metadata(path) {
        Ok(m) => format!(
            "the file is uid {}'s with mode {:04o}",
            m.uid(),
            m.mode() & 0o7777
        ),
        Err(_) => "a directory on the file's path is closed to it".to_string(),
    };
    if path.starts_with("/run/credentials") {
        // Already a credential: systemd's copy, the service's user's and
        // root's alone. An operator's `check-config`, `mint-token` or
        // `keys` reads it as root.
        return format!(
            "; this runs as uid {uid}, which may not read it ({whose}): the copies systemd \
             makes of a service's credentials are for the service's user and root alone, so \
             run this as root"
        );
    }
    if public {
        // A certificate chain: every user may read it, the dynamic user
        // too, and a reload reads it again (a credential would not be).
        return format!(
            "; the relay runs as uid {uid} and may not read it ({whose}): a certificate \
             chain is no secret, so make it readable by every user (mode 0644, its \
             directories 0755), as the shipped systemd unit's dynamic user needs"
        );
    }
    let name = path
        .file_name()
        .filter(|_| named)
        .map_or_else(|| "NAME".to_string(), |n| n.to_string_lossy().into_owned());
    // LoadCredential= takes an absolute path.
    let source = if named {
        std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string()
    } else {
        "PATH".to_string()
    };
    format!(
        "; the relay runs as uid {uid} and may not read it ({whose}): give it to that \
         user (chown), or, under the shipped systemd unit (a dynamic user, which reads no \
         root-only file), load it as a credential: `LoadCredential={name}:{source}` in \
         `systemctl edit clio-relay`, and {file_key} = \"/run/credentials/clio-relay.service/{name}\" \
         (systemd copies it when the service starts, so a new one takes a restart, not a reload)"
    )
}

/// Whether `pem` (`cluster.ca_file`) gives trust roots as the Redis
/// connects take them: every PEM block read, every certificate a usable
/// root, and at least one.
fn redis_roots(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| crate::core::tls::PemProblem(&e).to_string())?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate that is not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(())
}
