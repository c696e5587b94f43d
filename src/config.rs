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

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::Secret;

mod load;
mod url;
mod validate;

pub use url::{parse_ws_url, WsEndpoint};
pub use validate::valid_account_id;
use validate::{check_token_secret, validate_semantics};

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
    /// The admin API, key store, rotation and health checks.
    pub admin: AdminConfig,
    /// Per-device limits, by default and per tier.
    pub devices: DevicesConfig,
    /// Usage metering, cost, reconciliation and alerts.
    pub usage: UsageConfig,
    /// TLS on the client port; `None` serves plain `ws://` (behind a TLS
    /// terminator, or for tests).
    pub tls: Option<TlsConfig>,
}

/// `[tls]`: the client port's certificate. Re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Limits on one device's streams; 0 (or a zero duration) means no limit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceLimits {
    /// Streams a device may have open at once, across all shards.
    pub max_concurrent_streams: u32,
    /// New streams a device may open per minute (a token bucket of this size,
    /// refilled evenly over the minute).
    pub streams_per_minute: u32,
    /// Seconds of audio a device may stream per UTC day.
    pub audio_seconds_per_day: u64,
    /// The longest a single stream may last.
    pub max_stream_length: Duration,
}

/// `[devices]`: the default limits, and named tiers a token may carry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DevicesConfig {
    /// Limits for tokens without a tier (or with an unknown one).
    pub default: DeviceLimits,
    /// `[devices.tier.NAME]`: limits for tokens minted with `--tier NAME`;
    /// unset fields take the default's value.
    pub tiers: std::collections::BTreeMap<String, DeviceLimits>,
}

impl DevicesConfig {
    /// The limits for a token's tier.
    pub fn limits(&self, tier: Option<&str>) -> &DeviceLimits {
        tier.and_then(|t| self.tiers.get(t))
            .unwrap_or(&self.default)
    }
}

/// `[usage]` and `[alerts]`: metering, cost and the in-process alerts.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageConfig {
    /// Currency the accounts' prices and budgets are in (a label only).
    pub currency: String,
    /// How often usage counters are written to `admin.state_dir/usage.json`.
    pub persist_interval: Duration,
    /// How often the relay's meter is compared with Soniox's usage logs; 0 = off.
    pub reconcile_interval: Duration,
    /// Alert thresholds and the optional webhook.
    pub alerts: AlertsConfig,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            currency: "USD".into(),
            persist_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(3600),
            alerts: AlertsConfig::default(),
        }
    }
}

/// `[alerts]`: when the in-process alerts fire.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    /// How often alerts are evaluated.
    pub interval: Duration,
    /// An account's live streams over this share of its limit.
    pub concurrency_ratio: f64,
    /// An account's cost this month over this share of its monthly budget.
    pub budget_ratio: f64,
    /// A device or account using this many times its own hourly baseline
    /// (the average hour of the previous 24) in the last hour…
    pub unusual_factor: f64,
    /// …and at least this many audio seconds in that hour.
    pub unusual_min_audio_seconds: u64,
    /// Errors (not counting client mistakes) over this share of streams in
    /// the last evaluation window…
    pub error_rate: f64,
    /// …once at least this many streams started in it.
    pub error_min_streams: u64,
    /// p99 time to first result over this, in the last window.
    pub slow_first_result: Duration,
    /// Where each alert is also POSTed as JSON when it fires or resolves.
    pub webhook_url: Option<String>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            interval: Duration::from_secs(10),
            concurrency_ratio: 0.9,
            budget_ratio: 0.9,
            unusual_factor: 5.0,
            unusual_min_audio_seconds: 600,
            error_rate: 0.05,
            error_min_streams: 20,
            slow_first_result: Duration::from_secs(2),
            webhook_url: None,
        }
    }
}

/// `[admin]`: who may use the admin port, where runtime changes are kept,
/// and how keys are rotated and checked.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Bearer token for the admin API, the dashboard and `clio-relay keys`.
    /// Without one, those answer 401 to everyone.
    pub token: Option<Secret>,
    /// Networks allowed on the admin port (`/metrics` and health included);
    /// empty means any. Others get their connection closed.
    pub allow: Vec<ipnet::IpNet>,
    /// Directory of the encrypted key store (`accounts.store`).
    pub state_dir: PathBuf,
    /// AES-256-GCM master key of the store (64 hex digits). Without it,
    /// runtime account changes live only until the process exits.
    pub master_key: Option<Secret>,
    /// A key older than this is flagged (log and metric) as due for rotation.
    pub rotation_period: Duration,
    /// How long a rotated-out key keeps the streams it carries, by default.
    pub rotation_overlap: Duration,
    /// How often each account's key is checked against upstream's REST API
    /// (`GET /v1/models`, `GET /v1/concurrency-limits`); zero turns it off.
    pub health_interval: Duration,
    /// Upstream's REST base URL; derived from `upstream.url` when not set
    /// (`wss://stt-rt.X/…` → `https://api.X`).
    pub rest_url: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            allow: Vec::new(),
            state_dir: PathBuf::from("/var/lib/clio-relay"),
            master_key: None,
            rotation_period: Duration::from_secs(90 * 24 * 3600),
            rotation_overlap: Duration::from_secs(3600),
            health_interval: Duration::from_secs(30),
            rest_url: None,
        }
    }
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
    /// Networks clients may connect from; empty means any. Others have their
    /// connection closed at accept.
    pub allow: Vec<ipnet::IpNet>,
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
            allow: Vec::new(),
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
    /// A stream with no frame in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// After SIGTERM, how long live streams may run to their end before the
    /// relay finalizes them and tells their clients to reconnect.
    pub drain_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            max_frame_bytes: 1 << 20,
            max_first_message_bytes: 64 << 10,
            idle_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
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
    /// Price per hour of audio, in `usage.currency`, for the cost figures.
    pub price_per_hour: f64,
    /// Monthly budget in `usage.currency`; 0 = none.
    pub monthly_budget: f64,
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
            price_per_hour: 0.0,
            monthly_budget: 0.0,
        }
    }
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
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Reads, parses, resolves and validates the config file at `path`.
    /// Relative `*_file` paths resolve against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, base) = read_config_file(path)?;
        Config::from_toml_str(&text, &base)
    }

    /// Parses, resolves and validates config text; relative `key_file`,
    /// `secret_file` and `ca_file` paths resolve against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        load::load_all(text, base_dir)
    }

    /// Reads only what minting a token needs: the whole file is parsed
    /// (unknown keys are still errors) but only `[tokens]` is resolved and
    /// checked, so `mint-token` works where the account keys cannot be read
    /// (e.g. systemd credentials visible only to the service).
    pub fn load_tokens(path: &Path) -> Result<TokensConfig, ConfigError> {
        let (text, base) = read_config_file(path)?;
        load::load_tokens(&text, &base)
    }

    /// Reads only `server.admin_listen` and the admin token: what
    /// `clio-relay keys` needs to talk to a running relay.
    pub fn load_admin_client(path: &Path) -> Result<(SocketAddr, Secret), ConfigError> {
        let (text, base) = read_config_file(path)?;
        load::load_admin_client(&text, &base)
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
             max_first_message_bytes {}",
            d(l.handshake_timeout),
            d(l.idle_timeout),
            l.max_header_bytes,
            l.max_frame_bytes,
            l.max_first_message_bytes
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
        for w in self.warnings() {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }

    /// Things that are valid but probably not meant, one line each, naming
    /// the key (shown by `check-config`, logged at startup). Never a secret.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let enabled: Vec<_> = self.accounts.iter().filter(|a| a.enabled).collect();
        if !self.accounts.is_empty() && enabled.is_empty() {
            w.push("account: no account is enabled; every stream will be refused".to_string());
        }
        let capacity: u64 = enabled
            .iter()
            .map(|a| u64::from(a.max_concurrent_streams))
            .sum();
        if !enabled.is_empty() && capacity < u64::from(self.server.max_streams) {
            w.push(format!(
                "server.max_streams: {} is more than the enabled accounts carry ({capacity}); \
                 the accounts are the limit",
                self.server.max_streams
            ));
        }
        // Soniox limits concurrency per key: two entries with one key would
        // each believe they own the whole budget.
        let mut by_key: std::collections::HashMap<&str, usize> = Default::default();
        for (i, a) in self.accounts.iter().enumerate() {
            if let Some(first) = by_key.insert(a.key.expose(), i) {
                by_key.insert(a.key.expose(), first);
                w.push(format!(
                    "account[{i}]: has the same key as account[{first}] ({:?}); \
                     Soniox's limit is per key, so max_concurrent_streams would be counted twice",
                    self.accounts[first].id
                ));
            }
        }
        if self.tokens.previous_secret.as_ref() == Some(&self.tokens.secret) {
            w.push("tokens.previous_secret: is the same as tokens.secret".to_string());
        }
        w
    }
}

/// The file's text and the directory its relative paths are relative to.
fn read_config_file(path: &Path) -> Result<(String, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(format!("config file {}: {e}", path.display())))?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((text, base))
}

#[cfg(test)]
mod tests;
