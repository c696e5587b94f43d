//! The parts of a resolved [`Config`](super::Config), one per section of
//! the file, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

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

/// `[devices]`: the default limits, and named tiers a token may carry;
/// also each pool's own limits (`[pool.NAME] max_streams` and
/// `[pool.NAME.devices]`), which apply to new streams on a reload like
/// the device limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DevicesConfig {
    /// Limits for tokens without a tier (or with an unknown one).
    pub default: DeviceLimits,
    /// `[devices.tier.NAME]`: limits for tokens minted with `--tier NAME`;
    /// unset fields take the default's value.
    pub tiers: std::collections::BTreeMap<String, DeviceLimits>,
    /// Each pool's own limits, by pool name (absent: none).
    pub pools: std::collections::BTreeMap<String, PoolLimits>,
}

/// A pool's own limits, so that one pool (a development one, say) is held
/// to small caps and cannot crowd out another. 0 means no limit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolLimits {
    /// `[pool.NAME] max_streams`: streams on the pool's accounts at once in
    /// this relay process, across its shards (as `server.max_streams` is
    /// for the whole process).
    pub max_streams: u32,
    /// `[pool.NAME.devices]`: per-device limits for streams of tokens that
    /// name the pool. They tighten the tier's limits, never loosen them.
    pub devices: DeviceLimits,
}

/// The stricter of two limits where 0 means none.
fn stricter<T: PartialOrd + Default + Copy>(a: T, b: T) -> T {
    let none = T::default();
    if a == none || (b != none && b < a) {
        b
    } else {
        a
    }
}

impl DevicesConfig {
    /// The limits for a token's tier.
    pub fn limits(&self, tier: Option<&str>) -> &DeviceLimits {
        tier.and_then(|t| self.tiers.get(t))
            .unwrap_or(&self.default)
    }

    /// The limits a stream of a token with `tier` and `pools` runs under:
    /// the tier's, each tightened by the pools' `[pool.NAME.devices]` (a
    /// token naming several pools gets the strictest of them, since it may
    /// land on any).
    pub fn limits_in(&self, tier: Option<&str>, pools: &[String]) -> DeviceLimits {
        let mut l = self.limits(tier).clone();
        for pool in pools {
            if let Some(p) = self.pools.get(pool) {
                let d = &p.devices;
                l.max_concurrent_streams =
                    stricter(l.max_concurrent_streams, d.max_concurrent_streams);
                l.streams_per_minute = stricter(l.streams_per_minute, d.streams_per_minute);
                l.audio_seconds_per_day =
                    stricter(l.audio_seconds_per_day, d.audio_seconds_per_day);
                l.max_stream_length = stricter(l.max_stream_length, d.max_stream_length);
            }
        }
        l
    }

    /// The pool whose `[pool.NAME.devices]` value of `limit` is the one in
    /// force for a token with `tier` and `pools`, when it is stricter than
    /// the tier's own: what a refusal by that limit names.
    pub fn pool_setting<'a>(
        &self,
        tier: Option<&str>,
        pools: &'a [String],
        limit: crate::core::devices::Limit,
    ) -> Option<&'a str> {
        use crate::core::devices::Limit;
        let value = |l: &DeviceLimits| -> u64 {
            match limit {
                Limit::Concurrent => u64::from(l.max_concurrent_streams),
                Limit::Rate => u64::from(l.streams_per_minute),
                Limit::DailyAudio => l.audio_seconds_per_day,
                Limit::MaxLength => l.max_stream_length.as_millis() as u64,
                Limit::Revoked => 0,
            }
        };
        let in_force = value(&self.limits_in(tier, pools));
        if in_force == 0 || in_force == value(self.limits(tier)) {
            return None;
        }
        pools
            .iter()
            .find(|p| {
                self.pools
                    .get(*p)
                    .is_some_and(|l| value(&l.devices) == in_force)
            })
            .map(String::as_str)
    }

    /// `[pool.NAME] max_streams` (0: none).
    pub fn pool_max_streams(&self, pool: &str) -> u32 {
        self.pools.get(pool).map_or(0, |p| p.max_streams)
    }

    /// Whether any stream's limits can hold a daily audio allowance: the
    /// default's, a tier's or a pool's (`[pool.NAME.devices]`).
    pub fn daily_audio(&self) -> bool {
        std::iter::once(&self.default)
            .chain(self.tiers.values())
            .chain(self.pools.values().map(|p| &p.devices))
            .any(|l| l.audio_seconds_per_day > 0)
    }
}

/// `[usage]` and `[alerts]`: metering, cost and the in-process alerts.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageConfig {
    /// Currency the accounts' prices and budgets are in (a label only).
    pub currency: String,
    /// How often the usage counters changed since the last persist are added
    /// to `admin.state_dir/usage.db`.
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

/// What a node does with new streams while the shared store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDown {
    /// Enforce this node's share of each limit (the limit divided by the
    /// number of nodes last seen alive), from its own counts.
    Local,
    /// Refuse new streams with 503 and `Retry-After`.
    Refuse,
}

/// `[cluster]`: a fleet of relays sharing limits, revocations, accounts and
/// usage through one Redis. Absent: the relay stands alone, with no Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `redis://host:port/db` or `rediss://…` (TLS); no password in it.
    pub redis_url: String,
    /// PEM certificates that `rediss://` trusts instead of the built-in
    /// public roots (a private CA), read from `ca_file` at load.
    pub ca: Option<Vec<u8>>,
    /// Redis ACL user name (`AUTH user password`); `None`: the default user.
    pub username: Option<String>,
    /// Redis password (`AUTH`), from `password_env` or `password_file`.
    pub password: Option<Secret>,
    /// This node's name in the fleet (default: the host name).
    pub node_id: String,
    /// How long a node's counts outlive its last heartbeat.
    pub lease_ttl: Duration,
    /// New streams while Redis is unreachable.
    pub on_store_down: StoreDown,
    /// The deadline of every Redis call.
    pub timeout: Duration,
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
    /// Whether `max_streams` was set (in the file, or by the code that
    /// built this config), 9000 included, rather than left at its default
    /// ([`DEFAULT_MAX_STREAMS`]): only a value set is a plan of what this
    /// relay carries, warned of when the enabled accounts cannot carry it
    /// (see [`account_warnings`](crate::core::config::account_warnings)).
    pub max_streams_set: bool,
    /// Networks clients may connect from; empty means any. Others have their
    /// connection closed at accept. A connection that came through a
    /// balancer listed in `proxy_protocol_from` is checked with the client
    /// address its PROXY header carries.
    pub allow: Vec<ipnet::IpNet>,
    /// Balancers whose connections start with a PROXY protocol header (v1
    /// or v2), which the relay then requires and reads: the client address
    /// it carries is the one the relay uses for `allow`, the per-address
    /// bounds and its log lines. Empty (the default): no header is read
    /// from anyone.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl ServerConfig {
    /// `max_streams` when it was set ([`ServerConfig::max_streams_set`]),
    /// `None` when it is the default.
    pub fn max_streams_if_set(&self) -> Option<u32> {
        self.max_streams_set.then_some(self.max_streams)
    }

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

/// `server.max_streams` when the file does not set it: a ceiling on the
/// process, not a plan of how many streams this relay will carry.
pub const DEFAULT_MAX_STREAMS: u32 = 9000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            shards: 0,
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_set: false,
            allow: Vec::new(),
            proxy_protocol_from: Vec::new(),
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
    /// How long connecting to upstream (TCP + TLS + upgrade) may take, per
    /// account tried. The account is then held off and another tried; a
    /// stream that none can take (after the waits of `failover`) is
    /// refused with 503 and close 1011 (`upstream_unavailable`; counted
    /// and logged as 502).
    pub connect_timeout: Duration,
}

impl UpstreamConfig {
    /// The parts of [`UpstreamConfig::url`] a connector needs.
    pub fn endpoint(&self) -> Result<WsEndpoint, UrlError> {
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

/// One pool of accounts and where its streams go: `[pool.NAME]`, or the
/// default pool (`upstream.url` and `admin.rest_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The pool's name (`[A-Za-z0-9._-]`, 1-64).
    pub name: String,
    /// The pool's real-time WebSocket endpoint (`ws://` or `wss://`).
    pub url: String,
    /// The pool's REST base for health checks and reconciliation; `None`:
    /// derived from `url` (see `admin.rest_url`).
    pub rest_url: Option<String>,
}

impl PoolConfig {
    /// The default pool at `url` (its REST base derived from it).
    pub fn default_pool(url: impl Into<String>) -> PoolConfig {
        PoolConfig {
            name: DEFAULT_POOL.to_string(),
            url: url.into(),
            rest_url: None,
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
/// instead of an API key (see [`crate::core::token`]).
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
    /// `tokens.pools`: the only pools tokens signed with `secret` may name
    /// (`None`: any pool).
    pub pools: Option<Vec<String>>,
    /// `tokens.previous_pools`: the same for `previous_secret`.
    pub previous_pools: Option<Vec<String>>,
    /// The pools the file declares (the default pool and each
    /// `[pool.NAME]`): what `mint-token --pool` may name.
    pub known_pools: Vec<String>,
    /// `[[tokens.extra]]`: more secrets, each bound to its pools, that
    /// verify tokens (never sign them): one relay serving production and
    /// development pools takes each backend's tokens under its own secret.
    pub extra: Vec<ExtraSecret>,
}

/// One `[[tokens.extra]]` secret: it verifies tokens for `pools` only.
#[derive(Debug, Clone)]
pub struct ExtraSecret {
    /// The secret (at least 32 bytes).
    pub secret: Secret,
    /// The only pools its tokens may name.
    pub pools: Vec<String>,
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
            pools: None,
            previous_pools: None,
            known_pools: vec![DEFAULT_POOL.to_string()],
            extra: Vec::new(),
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
    /// A write upstream that waits this long with no progress (upstream
    /// stopped reading) ends the stream as an upstream failure, or
    /// resumes it; a write to a client (it stopped reading) once the
    /// stream is ending (its end of audio or its close went up, or
    /// upstream's last word was read), as the client's failure.
    pub stall_timeout: Duration,
    /// `SO_RCVBUF` of client sockets, and the most bytes an upstream or a
    /// client socket may hold unsent (`TCP_NOTSENT_LOWAT`; its send buffer
    /// is the kernel's), bytes (0: no bound, the kernel's autotuned
    /// buffers): bounds the audio a stalled upstream can hide in the
    /// relay, and the results a client that stops reading leaves there.
    pub socket_buffer: usize,
    /// After SIGTERM, how long live streams may run to their end before the
    /// relay finalizes them and tells their clients to reconnect.
    pub drain_timeout: Duration,
    /// How long a stream the drain finalizes waits for upstream's answer
    /// (the `<fin>` after its final tokens) before its client is told to
    /// reconnect.
    pub finalize_wait: Duration,
    /// Upgraded connections per shard still waiting for a token in their
    /// first message (they hold no `max_streams` slot); 503 beyond.
    pub max_unauthenticated: usize,
    /// The same, per client address across the whole process; 429 beyond.
    pub max_unauthenticated_per_address: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            max_frame_bytes: 1 << 20,
            max_first_message_bytes: 64 << 10,
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            socket_buffer: 256 << 10,
            drain_timeout: Duration::from_secs(30),
            finalize_wait: Duration::from_secs(3),
            max_unauthenticated: 256,
            max_unauthenticated_per_address: 32,
        }
    }
}

/// `[failover]`: how the relay hides an upstream failure from the client
/// (see the README's "Failover").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    /// Bytes a stream keeps of what it sent upstream until upstream has
    /// accepted it (its first result), to replay on another account when
    /// the first one refuses or fails. Past it the stream is committed to
    /// its account. 0 turns open-time replay off.
    pub replay_bytes: usize,
    /// Raw-audio streams keep the audio after the last final token, up to
    /// this much, to resume on a new upstream connection mid-stream.
    pub resume_audio: Duration,
    /// Mid-stream resumes one stream may take; the next failure reaches the
    /// client as today. 0 turns mid-stream resume off.
    pub max_resumes: u32,
    /// Bytes the resume copies of all streams may hold together in this
    /// process; a copy that would grow past it is let go (that stream can
    /// no longer resume). 0 keeps no copies. Default:
    /// [`FailoverConfig::resume_memory_for`] `server.max_streams`.
    pub resume_memory: usize,
}

impl FailoverConfig {
    /// Copy storage a stream needs when upstream's final tokens lag by
    /// Soniox's usual 1-3 s (ARCHITECTURE.md measured 131 / 205 / 261 KB
    /// p50 / p90 / max at a 2 s lag, 16 kHz 16-bit mono).
    pub const RESUME_MEMORY_PER_STREAM: usize = 256 << 10;

    /// The default `resume_memory` for `max_streams` streams.
    pub fn resume_memory_for(max_streams: u32) -> usize {
        max_streams as usize * Self::RESUME_MEMORY_PER_STREAM
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            // 4 s of 16 kHz 16-bit mono audio.
            replay_bytes: 128 << 10,
            resume_audio: Duration::from_secs(30),
            max_resumes: 3,
            resume_memory: FailoverConfig::resume_memory_for(ServerConfig::default().max_streams),
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
    /// The pool the account belongs to (`[pool.NAME]`, or
    /// [`DEFAULT_POOL`]): which endpoint its streams go to, and which
    /// tokens may use it.
    pub pool: String,
    /// A disabled account keeps its slot but takes no new streams.
    pub enabled: bool,
    /// Streams this account may carry at once (Soniox's own per-key limit;
    /// 10 is Soniox's default).
    pub max_concurrent_streams: u32,
    /// Price per hour of audio, in `usage.currency`, for the cost figures.
    pub price_per_hour: f64,
    /// Monthly budget in `usage.currency`; 0 = none.
    pub monthly_budget: f64,
    /// For a disabled account listed before its key exists (no key): the
    /// source the key is to come from, `key_env NAME` or `key_file PATH`,
    /// so a warning can name it. Never the key.
    pub key_to_come: Option<KeySource>,
}

/// Where an account's key is to come from (see
/// [`AccountConfig::key_to_come`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `key_env`: the variable's name.
    Env(String),
    /// `key_file`: the file's path.
    File(PathBuf),
}

impl AccountConfig {
    /// An enabled account with the default limits.
    pub fn new(id: impl Into<String>, key: Secret) -> Self {
        AccountConfig {
            id: id.into(),
            key,
            region: String::new(),
            pool: DEFAULT_POOL.to_string(),
            enabled: true,
            max_concurrent_streams: 10,
            price_per_hour: 0.0,
            monthly_budget: 0.0,
            key_to_come: None,
        }
    }

    /// Whether the account has a key. Only a disabled account can be
    /// without one (its `key_env` unset or `key_file` missing); the relay
    /// does not load it until the key is there.
    pub fn has_key(&self) -> bool {
        !self.key.expose().is_empty()
    }
}
