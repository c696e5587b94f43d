//! The relay's configuration: one TOML file (DESIGN.md §1), loaded in two layers.
//!
//! The *raw* layer is a set of serde structs that mirror the file exactly and
//! refuse unknown keys. The *resolved* layer ([`Config`] and its parts) is what
//! the rest of the relay uses: addresses parsed, durations turned into
//! [`Duration`]s, defaults filled in and secrets read from the environment or
//! from files into [`Secret`]s. Secrets are never written inline in the file.
//!
//! Loading collects every problem it can find in one pass, so `check-config`
//! reports them all at once (like `nginx -t`), one line per problem, each
//! naming the key it is about. No problem message ever contains a secret.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// The shortest token signing secret accepted, in bytes (HMAC-SHA256 wants
/// at least its output size of key material).
pub const MIN_TOKEN_SECRET_BYTES: usize = 32;

/// The largest `server.shards` accepted.
pub const MAX_SHARDS: usize = 1024;

/// The upstream URL used when `upstream.url` is not set.
pub const DEFAULT_UPSTREAM_URL: &str = "wss://stt-rt.soniox.com/transcribe-websocket";

/// A commented example configuration; the same text as `config/example.toml`.
const EXAMPLE_CONFIG: &str = include_str!("../config/example.toml");

/// A commented example configuration file (the text of `config/example.toml`).
/// It parses once the environment variables it names are set.
pub fn example_config() -> &'static str {
    EXAMPLE_CONFIG
}

// ---------------------------------------------------------------------------
// Resolved configuration
// ---------------------------------------------------------------------------

/// The whole, validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the relay listens and how many streams it takes.
    pub server: ServerConfig,
    /// How the relay reaches Soniox.
    pub upstream: UpstreamConfig,
    /// How session tokens are signed and checked.
    pub tokens: TokensConfig,
    /// Per-stream bounds on time and memory.
    pub limits: LimitsConfig,
    /// The Soniox accounts whose API keys carry the streams.
    pub accounts: Vec<AccountConfig>,
}

/// `[server]`: listening sockets and process-wide capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The client WebSocket port (`GET /v1/transcribe`, `/healthz`).
    pub listen: SocketAddr,
    /// The admin port: metrics, health, remote config and the admin API.
    /// Kept apart from `listen` so it can stay on loopback.
    pub admin_listen: SocketAddr,
    /// Number of shards (pinned executors); 0 means one per available core.
    /// Use [`ServerConfig::shard_count`] for the resolved number.
    pub shards: usize,
    /// Streams the whole process carries at most; beyond it new clients get
    /// HTTP 503 before the upgrade. This is what bounds process memory.
    pub max_streams: u32,
}

impl ServerConfig {
    /// The number of shards to start: `shards`, or one per available core
    /// when it is 0 (1 if the core count cannot be read).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            shards: 0,
            max_streams: 9000,
        }
    }
}

/// `[upstream]`: the Soniox real-time endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The upstream WebSocket URL (`ws://` or `wss://`, with a host). Tests
    /// point it at `fake-soniox`.
    pub url: String,
    /// How the account's API key is presented upstream.
    pub auth: AuthMode,
    /// Extra PEM trust roots for the upstream TLS connection, on top of the
    /// built-in web roots (tests use a local CA). Must exist if given.
    pub ca_file: Option<PathBuf>,
    /// How long connecting to upstream (TCP + TLS + upgrade) may take before
    /// the stream fails with 502.
    pub connect_timeout: Duration,
}

impl UpstreamConfig {
    /// The parts of [`UpstreamConfig::url`] a connector needs.
    pub fn endpoint(&self) -> Result<WsEndpoint, String> {
        parse_ws_url(&self.url)
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM_URL.to_string(),
            auth: AuthMode::Header,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// How the relay gives the account's API key to upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// `Authorization: Bearer <key>` on the upgrade request (`"header"`).
    #[default]
    Header,
    /// The `api_key` field of the first JSON message (`"config"`, legacy).
    Config,
}

impl AuthMode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Header => "header",
            AuthMode::Config => "config",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[tokens]`: session tokens, the short-lived credentials devices present
/// instead of an API key (see [`crate::token`]).
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// The signing secret for new tokens (at least 32 bytes).
    pub secret: Secret,
    /// The secret being rotated out: tokens signed with it still verify, new
    /// tokens are never signed with it.
    pub previous_secret: Option<Secret>,
    /// Lifetime of a minted token when none is asked for.
    pub default_ttl: Duration,
    /// The longest lifetime a token may be minted with.
    pub max_ttl: Duration,
    /// How far in the future a token's issue time may be (clocks of the
    /// minter and the relay differ). It never extends expiry.
    pub clock_skew: Duration,
}

impl TokensConfig {
    /// Token settings with the default lifetimes for `secret`.
    pub fn new(secret: Secret) -> Self {
        TokensConfig {
            secret,
            previous_secret: None,
            default_ttl: Duration::from_secs(15 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(30),
        }
    }
}

/// `[limits]`: per-stream bounds, so a slow or hostile client cannot hold
/// time or memory without limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Time from TCP accept to a completed WebSocket upgrade.
    pub handshake_timeout: Duration,
    /// Largest HTTP upgrade request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Largest WebSocket frame payload accepted in either direction (close 1009).
    pub max_frame_bytes: usize,
    /// Largest first client message (the config JSON the relay rewrites).
    pub max_first_message_bytes: usize,
    /// Bytes of client frames queued while the upstream connection is opening.
    pub pre_upstream_queue_bytes: usize,
    /// A stream with no frame in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            max_frame_bytes: 1 << 20,
            max_first_message_bytes: 64 << 10,
            pre_upstream_queue_bytes: 256 << 10,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// `[[account]]`: one Soniox account and its API key.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Stable name of the account, used in metrics, logs and the remote
    /// config document; `[A-Za-z0-9._-]`, unique.
    pub id: String,
    /// The account's Soniox API key.
    pub key: Secret,
    /// Free-form region label (e.g. `us-east`), published to clients; may be empty.
    pub region: String,
    /// A disabled account keeps its slot but takes no new streams.
    pub enabled: bool,
    /// Streams this account may carry at once (Soniox's own per-key limit;
    /// 10 is Soniox's default).
    pub max_concurrent_streams: u32,
}

impl AccountConfig {
    /// An enabled account with the default limits.
    pub fn new(id: impl Into<String>, key: Secret) -> Self {
        AccountConfig {
            id: id.into(),
            key,
            region: String::new(),
            enabled: true,
            max_concurrent_streams: 10,
        }
    }
}

/// The parts of a `ws://` or `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsEndpoint {
    /// `wss://`: connect with TLS.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port, explicit or the scheme's default (80 / 443).
    pub port: u16,
    /// Path and query for the request line; at least `/`.
    pub path: String,
}

/// Parses a `ws://` or `wss://` URL. Credentials in the URL are refused:
/// API keys belong in `[[account]]`.
pub fn parse_ws_url(url: &str) -> Result<WsEndpoint, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} must start with ws:// or wss://"));
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if path.contains('#') {
        return Err(format!("{url:?} must not have a fragment"));
    }
    if authority.contains('@') {
        return Err(format!("{url:?} must not contain credentials"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("{url:?} has an unclosed IPv6 address"))?;
        (&v6[..end], &v6[end + 1..])
    } else {
        match authority.find(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        "" => {
            if tls {
                443
            } else {
                80
            }
        }
        p => match p.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(port)) if port > 0 => port,
            _ => return Err(format!("{url:?} has an invalid port")),
        },
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(WsEndpoint {
        tls,
        host: host.to_string(),
        port,
        path,
    })
}

/// Parses a duration in the config syntax: `500ms`, `5s`, `15m`, `2h`,
/// `1h 30m` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Everything wrong with a configuration, one line per problem, each naming
/// the key it is about. Never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// One human-readable line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Problems found so far, and the keys they were about (so later checks
/// that depend on a key already reported stay quiet).
#[derive(Default)]
struct Problems {
    lines: Vec<String>,
    keys: HashSet<String>,
}

impl Problems {
    fn push(&mut self, key: &str, msg: impl fmt::Display) {
        self.keys.insert(key.to_string());
        self.lines.push(format!("{key}: {msg}"));
    }

    fn reported(&self, key: &str) -> bool {
        self.keys.contains(key)
    }
}

// ---------------------------------------------------------------------------
// Raw layer: the file as written
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    tokens: Option<RawTokens>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    account: Vec<RawAccount>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    shards: Option<usize>,
    max_streams: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    auth: Option<String>,
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    previous_secret_env: Option<String>,
    previous_secret_file: Option<PathBuf>,
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    clock_skew: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    handshake_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_frame_bytes: Option<usize>,
    max_first_message_bytes: Option<usize>,
    pre_upstream_queue_bytes: Option<usize>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: Option<String>,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    region: Option<String>,
    enabled: Option<bool>,
    max_concurrent_streams: Option<u32>,
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Reads, parses, resolves and validates the config file at `path`.
    /// Relative `*_file` paths resolve against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("config file {}: {e}", path.display())))?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Config::from_toml_str(&text, base)
    }

    /// Parses, resolves and validates config text; relative `key_file`,
    /// `secret_file` and `ca_file` paths resolve against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawFile =
            toml::from_str(text).map_err(|e| ConfigError::one(describe_toml_error(&e, text)))?;
        resolve(raw, base_dir)
    }

    /// Checks a configuration built in code (the file loader runs the same
    /// checks). Every problem is reported, one line each.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        check_token_secret("tokens.secret", &self.tokens.secret, &mut p);
        if let Some(prev) = &self.tokens.previous_secret {
            check_token_secret("tokens.previous_secret", prev, &mut p);
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if a.key.expose().is_empty() {
                p.push(&format!("account[{i}].key"), "is empty");
            }
        }
        validate_semantics(self, &mut p);
        if p.lines.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p.lines })
        }
    }

    /// A multi-line human summary for `check-config`. Keys appear only as
    /// fingerprints.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let mut s = String::new();
        let shards = if self.server.shards == 0 {
            format!("{} (one per core)", self.server.shard_count())
        } else {
            self.server.shards.to_string()
        };
        let _ = writeln!(
            s,
            "server: listen {}, admin {}, shards {shards}, max_streams {}",
            self.server.listen, self.server.admin_listen, self.server.max_streams
        );
        let _ = writeln!(
            s,
            "upstream: {} (auth {}), connect_timeout {}{}",
            self.upstream.url,
            self.upstream.auth,
            d(self.upstream.connect_timeout),
            match &self.upstream.ca_file {
                Some(p) => format!(", ca_file {}", p.display()),
                None => String::new(),
            }
        );
        let _ = writeln!(
            s,
            "tokens: key id {}{}, default_ttl {}, max_ttl {}, clock_skew {}",
            crate::token::key_id(&self.tokens.secret),
            match &self.tokens.previous_secret {
                Some(prev) => format!(" (previous {} still accepted)", crate::token::key_id(prev)),
                None => String::new(),
            },
            d(self.tokens.default_ttl),
            d(self.tokens.max_ttl),
            d(self.tokens.clock_skew)
        );
        let l = &self.limits;
        let _ = writeln!(
            s,
            "limits: handshake_timeout {}, idle_timeout {}, max_header_bytes {}, max_frame_bytes {}, \
             max_first_message_bytes {}, pre_upstream_queue_bytes {}",
            d(l.handshake_timeout),
            d(l.idle_timeout),
            l.max_header_bytes,
            l.max_frame_bytes,
            l.max_first_message_bytes,
            l.pre_upstream_queue_bytes
        );
        let enabled: Vec<_> = self.accounts.iter().filter(|a| a.enabled).collect();
        let capacity: u64 = enabled
            .iter()
            .map(|a| u64::from(a.max_concurrent_streams))
            .sum();
        let _ = writeln!(
            s,
            "accounts: {} ({} enabled, {capacity} concurrent streams in all)",
            self.accounts.len(),
            enabled.len()
        );
        for a in &self.accounts {
            let _ = writeln!(
                s,
                "  {}: region {}, {}, max_concurrent_streams {}, key fp:{}",
                a.id,
                if a.region.is_empty() { "-" } else { &a.region },
                if a.enabled { "enabled" } else { "disabled" },
                a.max_concurrent_streams,
                a.key.fingerprint()
            );
        }
        s
    }
}

/// One line for a toml parse error: toml's own message, plus the section and
/// line it points at.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    // The section the error is in: the last table header before it.
    let mut section = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in before.lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.0.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            section = Some(format!("{name}[{}]", *n));
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split_once(']')) {
            section = Some(format!("[{}]", name.0.trim()));
        }
    }
    match section {
        Some(s) => format!("{msg} in {s} (line {line})"),
        None => format!("{msg} (line {line})"),
    }
}

/// Turns the raw file into a [`Config`], collecting every problem.
fn resolve(raw: RawFile, base: &Path) -> Result<Config, ConfigError> {
    let mut p = Problems::default();
    let defaults_server = ServerConfig::default();
    let defaults_up = UpstreamConfig::default();
    let defaults_limits = LimitsConfig::default();
    let defaults_tokens = TokensConfig::new(Secret::new(""));

    let addr = |key: &str, v: Option<String>, default: SocketAddr, p: &mut Problems| match v {
        None => default,
        Some(s) => s.trim().parse().unwrap_or_else(|_| {
            p.push(key, format!("invalid socket address {s:?} (want IP:PORT)"));
            default
        }),
    };
    let dur = |key: &str, v: Option<String>, default: Duration, p: &mut Problems| match v {
        None => default,
        Some(s) => parse_duration(&s).unwrap_or_else(|e| {
            p.push(key, e);
            default
        }),
    };

    let server = ServerConfig {
        listen: addr("server.listen", raw.server.listen, defaults_server.listen, &mut p),
        admin_listen: addr(
            "server.admin_listen",
            raw.server.admin_listen,
            defaults_server.admin_listen,
            &mut p,
        ),
        shards: raw.server.shards.unwrap_or(defaults_server.shards),
        max_streams: raw.server.max_streams.unwrap_or(defaults_server.max_streams),
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
    let upstream = UpstreamConfig {
        url: raw.upstream.url.unwrap_or(defaults_up.url),
        auth,
        ca_file: raw.upstream.ca_file.map(|f| base.join(f)),
        connect_timeout: dur(
            "upstream.connect_timeout",
            raw.upstream.connect_timeout,
            defaults_up.connect_timeout,
            &mut p,
        ),
    };

    let tokens = match raw.tokens {
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
                &mut p,
            )
            .flatten();
            let previous = resolve_secret(
                "tokens",
                ("previous_secret_env", t.previous_secret_env),
                ("previous_secret_file", t.previous_secret_file),
                false,
                base,
                &mut p,
            );
            for (key, s) in [("tokens.secret", &secret), ("tokens.previous_secret", &previous.clone().flatten())] {
                if let Some(s) = s {
                    check_token_secret(key, s, &mut p);
                }
            }
            let tokens = TokensConfig {
                secret: secret.unwrap_or_else(|| Secret::new("")),
                previous_secret: previous.flatten(),
                default_ttl: dur("tokens.default_ttl", t.default_ttl, defaults_tokens.default_ttl, &mut p),
                max_ttl: dur("tokens.max_ttl", t.max_ttl, defaults_tokens.max_ttl, &mut p),
                clock_skew: dur("tokens.clock_skew", t.clock_skew, defaults_tokens.clock_skew, &mut p),
            };
            Some(tokens)
        }
    };

    let l = raw.limits;
    let limits = LimitsConfig {
        handshake_timeout: dur(
            "limits.handshake_timeout",
            l.handshake_timeout,
            defaults_limits.handshake_timeout,
            &mut p,
        ),
        max_header_bytes: l.max_header_bytes.unwrap_or(defaults_limits.max_header_bytes),
        max_frame_bytes: l.max_frame_bytes.unwrap_or(defaults_limits.max_frame_bytes),
        max_first_message_bytes: l
            .max_first_message_bytes
            .unwrap_or(defaults_limits.max_first_message_bytes),
        pre_upstream_queue_bytes: l
            .pre_upstream_queue_bytes
            .unwrap_or(defaults_limits.pre_upstream_queue_bytes),
        idle_timeout: dur("limits.idle_timeout", l.idle_timeout, defaults_limits.idle_timeout, &mut p),
    };

    let mut accounts = Vec::with_capacity(raw.account.len());
    for (i, a) in raw.account.into_iter().enumerate() {
        let prefix = format!("account[{i}]");
        let key = resolve_secret(
            &prefix,
            ("key_env", a.key_env),
            ("key_file", a.key_file),
            true,
            base,
            &mut p,
        )
        .flatten();
        let id = match a.id {
            Some(id) => id,
            None => {
                p.push(&format!("{prefix}.id"), "missing");
                String::new()
            }
        };
        let mut acc = AccountConfig::new(id, key.unwrap_or_else(|| Secret::new("")));
        acc.region = a.region.unwrap_or_default();
        acc.enabled = a.enabled.unwrap_or(true);
        acc.max_concurrent_streams = a.max_concurrent_streams.unwrap_or(acc.max_concurrent_streams);
        accounts.push(acc);
    }

    let config = Config {
        server,
        upstream,
        tokens: tokens.unwrap_or(defaults_tokens),
        limits,
        accounts,
    };
    if let Some(ca) = &config.upstream.ca_file {
        if !ca.is_file() {
            p.push("upstream.ca_file", format!("{} does not exist or is not a file", ca.display()));
        }
    }
    validate_semantics(&config, &mut p);
    if p.lines.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { problems: p.lines })
    }
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
        (Some(var), None) => match std::env::var(&var) {
            Ok(v) if v.is_empty() => {
                p.push(section, format!("{env_key} {var} is empty"));
                return None;
            }
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => {
                p.push(section, format!("{env_key} {var} is not set"));
                return None;
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                p.push(section, format!("{env_key} {var} is not valid UTF-8"));
                return None;
            }
        },
        (None, Some(path)) => {
            let path = base.join(path);
            // The io::Error never quotes file contents, so it is safe to show.
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    p.push(section, format!("{file_key} {}: {e}", path.display()));
                    return None;
                }
            };
            let Ok(mut text) = String::from_utf8(bytes) else {
                p.push(section, format!("{file_key} {}: not valid UTF-8", path.display()));
                return None;
            };
            while text.ends_with(['\n', '\r']) {
                text.pop();
            }
            if text.is_empty() {
                p.push(section, format!("{file_key} {} is empty", path.display()));
                return None;
            }
            text
        }
    };
    Some(Some(Secret::new(value)))
}

fn check_token_secret(key: &str, secret: &Secret, p: &mut Problems) {
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

/// Whether `id` is a valid account id: non-empty, `[A-Za-z0-9._-]`.
pub fn valid_account_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The checks that need no secrets and no file system: ranges, relations
/// between keys, account ids.
fn validate_semantics(c: &Config, p: &mut Problems) {
    let s = &c.server;
    if s.shards > MAX_SHARDS {
        p.push("server.shards", format!("{} is more than {MAX_SHARDS}", s.shards));
    }
    if s.max_streams < 1 {
        p.push("server.max_streams", "must be at least 1");
    }
    if !p.reported("server.listen")
        && !p.reported("server.admin_listen")
        && s.listen == s.admin_listen
        && s.listen.port() != 0
    {
        p.push("server.admin_listen", format!("is the same as server.listen ({})", s.listen));
    }

    if let Err(e) = parse_ws_url(&c.upstream.url) {
        p.push("upstream.url", e);
    }
    if c.upstream.connect_timeout.is_zero() && !p.reported("upstream.connect_timeout") {
        p.push("upstream.connect_timeout", "must be more than 0");
    }

    let t = &c.tokens;
    for (key, d) in [("tokens.default_ttl", t.default_ttl), ("tokens.max_ttl", t.max_ttl)] {
        if d < Duration::from_secs(1) && !p.reported(key) {
            p.push(key, "must be at least 1s");
        }
    }
    if !p.reported("tokens.default_ttl") && !p.reported("tokens.max_ttl") && t.default_ttl > t.max_ttl {
        p.push(
            "tokens.default_ttl",
            format!(
                "{} is longer than tokens.max_ttl {}",
                humantime::format_duration(t.default_ttl),
                humantime::format_duration(t.max_ttl)
            ),
        );
    }

    let l = &c.limits;
    for (key, d) in [
        ("limits.handshake_timeout", l.handshake_timeout),
        ("limits.idle_timeout", l.idle_timeout),
    ] {
        if d.is_zero() && !p.reported(key) {
            p.push(key, "must be more than 0");
        }
    }
    for (key, n) in [
        ("limits.max_header_bytes", l.max_header_bytes),
        ("limits.max_frame_bytes", l.max_frame_bytes),
        ("limits.max_first_message_bytes", l.max_first_message_bytes),
        ("limits.pre_upstream_queue_bytes", l.pre_upstream_queue_bytes),
    ] {
        if n == 0 {
            p.push(key, "must be more than 0");
        }
    }

    if c.accounts.is_empty() {
        p.push("account", "at least one [[account]] is needed");
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, a) in c.accounts.iter().enumerate() {
        let key = format!("account[{i}].id");
        if !p.reported(&key) {
            if a.id.is_empty() {
                p.push(&key, "is empty");
            } else if !valid_account_id(&a.id) {
                p.push(&key, format!("{:?} may only use A-Z a-z 0-9 . _ -", a.id));
            } else if let Some(first) = seen.insert(&a.id, i) {
                seen.insert(&a.id, first);
                p.push(&key, format!("duplicate id {:?} (also account[{first}])", a.id));
            }
        }
        if a.max_concurrent_streams < 1 {
            p.push(&format!("account[{i}].max_concurrent_streams"), "must be at least 1");
        }
    }
}

#[cfg(test)]
mod tests;
