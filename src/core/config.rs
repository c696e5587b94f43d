//! The relay's configuration: one TOML file, loaded in two layers.
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

use crate::core::secret::Secret;

mod changes;
mod load;
pub(crate) use load::{shown_env_name, shown_file_name};
mod raw;
mod sections;
mod url;
mod validate;

pub(crate) use load::unreadable_hint;
pub use sections::*;
pub use url::{parse_ws_url, UrlError, WsEndpoint};
use validate::{account_label, check_token_secret, validate_semantics};
pub use validate::{quote_bounded, valid_account_id, valid_region, MAX_KEY_BYTES, REGION_RULE};

/// The shortest token signing secret accepted, in bytes (HMAC-SHA256 wants
/// at least its output size of key material).
pub const MIN_TOKEN_SECRET_BYTES: usize = 32;

/// The largest `server.shards` accepted.
pub const MAX_SHARDS: usize = 1024;

/// The pool an account without `pool` belongs to, and the one a token that
/// names no pool may use.
pub const DEFAULT_POOL: &str = "default";

/// `TimeoutStopSec` of the shipped unit (`systemd/clio-relay.service`):
/// systemd kills a stop that takes longer.
pub const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(90);

/// The most a stop waits for the streams it ends (SIGINT, during a drain
/// too, or those a drain's wait gave up on) to record their usage: each
/// ends through its own end, unfinalized, whose two last writes (the
/// client's "reconnect", upstream's close) take at most 1 s each when a
/// peer stopped reading, and a second more for a loaded host to run them.
/// An end already under way gives up its longer waits at the stop (a
/// drain's `<fin>`, the client's answer to upstream's close), so those
/// two writes are what is left of it, and at most the 1 s write of a
/// drain's finalize begun before the stop.
/// With nothing live it is not waited; otherwise it ends when the last
/// usage is recorded, within milliseconds when the peers read.
pub const STOP_CUT_WAIT: Duration = Duration::from_secs(3);

/// The most a stop takes beyond `limits.drain_timeout`, with the default
/// `limits.finalize_wait` (3 s): the listeners closed (2 s), the cut
/// streams finalized (8 s: the finalize wait and 5 s to write and close),
/// the streams still live ended and their usage recorded
/// ([`STOP_CUT_WAIT`], 3 s), the last usage saved (5 s). A longer
/// finalize wait adds its difference ([`Config::stop_after_drain`]).
pub const STOP_AFTER_DRAIN: Duration = Duration::from_secs(18);

/// The default `limits.finalize_wait`, which [`STOP_AFTER_DRAIN`] counts.
const DEFAULT_FINALIZE_WAIT: Duration = Duration::from_secs(3);

/// The upstream URL used when `upstream.url` is not set.
pub const DEFAULT_UPSTREAM_URL: &str = "wss://stt-rt.soniox.com/transcribe-websocket";

/// A commented example configuration; the same text as `config/example.toml`.
const EXAMPLE_CONFIG: &str = include_str!("../../config/example.toml");

/// Whether `ip` is reachable only from the host or a private network:
/// loopback, RFC 1918, shared (100.64/10) and link-local IPv4; loopback,
/// unique-local (fc00::/7) and link-local IPv6 (and IPv4 in IPv6 of those).
fn private_address(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => private_address(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

/// Which accounts [`account_warnings`] counted, for its wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountsCounted {
    /// The config file's, and the relay keeps no account set of its own
    /// (no master key, no `[cluster]`): they are what it runs.
    File,
    /// The config file's, while a key store or a fleet may add, enable,
    /// disable or re-limit accounts at runtime (`check-config`, which does
    /// not read the store).
    FileWithStore,
    /// The running relay's account set: the file's merged with the key
    /// store's (or the fleet's).
    Running,
}

/// What the enabled accounts' limits say about `server.max_streams`, one
/// line each: no account enabled, or a `max_streams` the operator set
/// (`set_max_streams`, [`ServerConfig::max_streams_if_set`]; 9000 too)
/// above what the enabled accounts carry together. The default, left
/// unset ([`DEFAULT_MAX_STREAMS`], a ceiling rather than a plan), is not
/// warned of. `accounts` is each account's (enabled,
/// `max_concurrent_streams`); `counted` says whose they are.
pub fn account_warnings(
    set_max_streams: Option<u32>,
    accounts: impl IntoIterator<Item = (bool, u32)>,
    counted: AccountsCounted,
) -> Vec<String> {
    let mut w = Vec::new();
    let (mut all, mut enabled, mut capacity) = (0usize, 0usize, 0u64);
    for (on, max) in accounts {
        all += 1;
        if on {
            enabled += 1;
            capacity += u64::from(max);
        }
    }
    let (whose, note) = match counted {
        AccountsCounted::File => ("the", ""),
        AccountsCounted::FileWithStore => (
            "the file's",
            " (the file's accounts only: accounts added, enabled, disabled or re-limited at \
             runtime, kept in the key store in admin.state_dir or the fleet's account set, are \
             not counted here; the relay counts its running set when it starts and at each \
             reload, and `clio-relay keys list` shows it)",
        ),
        AccountsCounted::Running => (
            "the",
            " (the running account set: the config file's with the key store's or the \
             fleet's changes; `clio-relay keys list` shows it)",
        ),
    };
    if all > 0 && enabled == 0 {
        let none = if counted == AccountsCounted::FileWithStore {
            "no account in the file is enabled"
        } else {
            "no account is enabled"
        };
        w.push(format!(
            "account: {none}; every stream will be refused{note}"
        ));
    }
    // The default max_streams is a ceiling on the process, above what
    // nearly every account set carries (Soniox's default is 10 streams a
    // key): the accounts being the limit under it is the usual state, and
    // a stream past them gets a 429 that says so. A max_streams chosen for
    // this relay, whatever its value, is a plan of what it carries:
    // accounts that cannot carry it are worth a word.
    let above = set_max_streams.filter(|&m| enabled > 0 && capacity < u64::from(m));
    if let Some(max_streams) = above {
        w.push(format!(
            "server.max_streams: {max_streams} is more than {whose} enabled accounts carry \
             ({capacity}); the accounts are the limit{note}: past {capacity} streams, new ones \
             get 429; add accounts or raise their max_concurrent_streams, or set max_streams \
             to what they carry"
        ));
    }
    w
}

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
    /// The fleet's shared store; `None` for a relay on its own.
    pub cluster: Option<ClusterConfig>,
    /// Failover at open and mid-stream.
    pub failover: FailoverConfig,
    /// `[pool.NAME]`: the account pools besides the default one, by name.
    /// The default pool's endpoint is `upstream.url` (see [`Config::pools`]).
    pub pools: Vec<PoolConfig>,
    /// The secret files the config was read from (`*_file`), each with
    /// the key that names it, e.g. `account "a": key_file`: the warnings
    /// name one that every user of the host can read.
    pub secret_files: Vec<(String, PathBuf)>,
}

/// Parses a duration in the config syntax: `500ms`, `5s`, `15m`, `2h`,
/// `1h 30m` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|source| DurationError {
        text: s.to_string(),
        source,
    })
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
    /// A problem is an environment variable (`key_env`, `secret_env`, ...)
    /// that is not set or empty. A running relay reads its environment
    /// only when it starts, so at a reload this may be one set since, which
    /// the reload cannot see: the SIGHUP log says so.
    pub unset_env: bool,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
            unset_env: false,
        }
    }
}

impl From<Problems> for ConfigError {
    fn from(p: Problems) -> Self {
        ConfigError {
            problems: p.lines,
            unset_env: p.unset_env,
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

/// A duration that is not in the config syntax (`500ms`, `5s`, `1h 30m`).
/// Durations are never secret, so the message quotes the text.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationError {
    /// The text that did not parse, as given.
    pub text: String,
    /// What the duration parser found wrong with it.
    pub source: humantime::DurationError,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: {}", self.text, self.source)
    }
}

impl std::error::Error for DurationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Problems found so far, and the keys they were about (so later checks
/// that depend on a key already reported stay quiet).
#[derive(Default)]
struct Problems {
    lines: Vec<String>,
    keys: HashSet<String>,
    /// One of them is an environment variable not set or empty.
    unset_env: bool,
    /// The secret files read, for [`Config::secret_files`].
    secret_files: Vec<(String, PathBuf)>,
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
    /// Every pool with its endpoint: the default pool (`upstream.url`,
    /// `admin.rest_url`) first, then each `[pool.NAME]` by name.
    pub fn all_pools(&self) -> Vec<PoolConfig> {
        let mut all = Vec::with_capacity(self.pools.len() + 1);
        all.push(PoolConfig {
            name: DEFAULT_POOL.to_string(),
            url: self.upstream.url.clone(),
            rest_url: self.admin.rest_url.clone(),
        });
        all.extend(self.pools.iter().cloned());
        all
    }

    /// The names of every pool, the default pool first.
    pub fn pool_names(&self) -> Vec<String> {
        self.all_pools().into_iter().map(|p| p.name).collect()
    }

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
        Ok(Config::load_minting(path)?.0)
    }

    /// [`Config::load_tokens`], with the names of the device tiers
    /// (`[devices.tier.NAME]`), which a token may name: `mint-token --tier`
    /// needs no account key either.
    pub fn load_minting(path: &Path) -> Result<(TokensConfig, Vec<String>), ConfigError> {
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
            // A disabled account may wait for its key (it is not loaded).
            if a.key.expose().is_empty() && a.enabled {
                p.push(
                    &format!("{}.key", account_label(i, Some(&a.id))),
                    "is empty",
                );
            }
        }
        validate_semantics(self, &mut p);
        if p.lines.is_empty() {
            Ok(())
        } else {
            Err(p.into())
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
        if let Some(t) = &self.tls {
            let until = crate::core::tls::load(t)
                .ok()
                .and_then(|l| l.not_after)
                .map_or_else(String::new, |at| {
                    format!(" (valid until {})", httpdate::fmt_http_date(at))
                });
            let _ = writeln!(
                s,
                "tls: cert_file {}{until}, key_file {}",
                t.cert_file.display(),
                t.key_file.display()
            );
        }
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
        for pool in &self.pools {
            let _ = writeln!(
                s,
                "pool {}: {}{}",
                pool.name,
                pool.url,
                match &pool.rest_url {
                    Some(r) => format!(", rest {r}"),
                    None => String::new(),
                }
            );
        }
        let bound = |pools: &Option<Vec<String>>| match pools {
            Some(p) => format!(" (pools {})", p.join(", ")),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "tokens: key id {}{}{}, default_ttl {}, max_ttl {}, clock_skew {}",
            crate::core::token::key_id(&self.tokens.secret),
            bound(&self.tokens.pools),
            match &self.tokens.previous_secret {
                Some(prev) => format!(
                    " (previous {}{} still accepted)",
                    crate::core::token::key_id(prev),
                    bound(&self.tokens.previous_pools)
                ),
                None => String::new(),
            },
            d(self.tokens.default_ttl),
            d(self.tokens.max_ttl),
            d(self.tokens.clock_skew)
        );
        for x in &self.tokens.extra {
            let _ = writeln!(
                s,
                "tokens: key id {} also verifies, for pools {} only",
                crate::core::token::key_id(&x.secret),
                x.pools.join(", ")
            );
        }
        if let Some(c) = &self.cluster {
            let _ = writeln!(
                s,
                "cluster: {}{}, node_id {}, lease_ttl {}, timeout {}, on_store_down {}",
                c.redis_url,
                match &c.username {
                    Some(user) => format!(" (user {user})"),
                    None => String::new(),
                },
                c.node_id,
                d(c.lease_ttl),
                d(c.timeout),
                match c.on_store_down {
                    StoreDown::Local => "local",
                    StoreDown::Refuse => "refuse",
                }
            );
        }
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
                "  {}: {}region {}, {}, max_concurrent_streams {}, {}",
                a.id,
                if a.pool == DEFAULT_POOL {
                    String::new()
                } else {
                    format!("pool {}, ", a.pool)
                },
                if a.region.is_empty() { "-" } else { &a.region },
                if a.enabled { "enabled" } else { "disabled" },
                a.max_concurrent_streams,
                if a.has_key() {
                    format!("key fp:{}", a.key.fingerprint())
                } else {
                    "no key (not loaded)".to_string()
                }
            );
        }
        for w in self.warnings() {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }

    /// The most a stop takes beyond `limits.drain_timeout` with this
    /// file's `limits.finalize_wait`: [`STOP_AFTER_DRAIN`] with the
    /// difference from the default wait.
    pub fn stop_after_drain(&self) -> Duration {
        (STOP_AFTER_DRAIN + self.limits.finalize_wait).saturating_sub(DEFAULT_FINALIZE_WAIT)
    }

    /// Things that are valid but probably not meant, one line each, naming
    /// the key (shown by `check-config`, logged at startup). Never a secret.
    ///
    /// What the accounts' limits say (no account enabled, `max_streams`
    /// above what they carry) counts the file's accounts here, where the
    /// key store is not read: with a master key or `[cluster]` the text
    /// says so. A running relay says it of the account set it runs instead
    /// ([`Config::warnings_besides_accounts`] and [`account_warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        let runtime = self.admin.master_key.is_some() || self.cluster.is_some();
        let mut w = account_warnings(
            self.server.max_streams_if_set(),
            self.accounts
                .iter()
                .map(|a| (a.enabled, a.max_concurrent_streams)),
            if runtime {
                AccountsCounted::FileWithStore
            } else {
                AccountsCounted::File
            },
        );
        w.extend(self.warnings_besides_accounts());
        w
    }

    /// [`Config::warnings`] but those of the accounts' limits, which a
    /// running relay says of the account set it runs (the file's merged
    /// with the key store's, or the fleet's): [`account_warnings`].
    pub fn warnings_besides_accounts(&self) -> Vec<String> {
        let mut w = Vec::new();
        // Soniox limits concurrency per key: two entries with one key would
        // each believe they own the whole budget.
        let mut by_key: std::collections::HashMap<&str, usize> = Default::default();
        for (i, a) in self.accounts.iter().enumerate() {
            if !a.has_key() {
                let label = account_label(i, Some(&a.id));
                w.push(match &a.key_to_come {
                    Some(KeySource::Env(var)) => format!(
                        "{label}: disabled and its key is not there (key_env {var} is not set), \
                         so it is not loaded; to use it, set {var} and restart (a reload cannot \
                         see a variable set after the start), or switch it to a key_file"
                    ),
                    Some(KeySource::File(path)) => format!(
                        "{label}: disabled and its key is not there (key_file {} does not \
                         exist), so it is not loaded; to use it, write that file and reload",
                        path.display()
                    ),
                    None => format!(
                        "{label}: disabled and its key is not there (key_env unset or key_file \
                         missing), so it is not loaded; to use it, write its key_file and \
                         reload, or set its key_env variable and restart (a reload cannot see a \
                         variable set after the start)"
                    ),
                });
                continue;
            }
            if let Some(first) = by_key.insert(a.key.expose(), i) {
                by_key.insert(a.key.expose(), first);
                w.push(format!(
                    "{}: has the same key as {}; \
                     Soniox's limit is per key, so max_concurrent_streams would be counted twice",
                    account_label(i, Some(&a.id)),
                    account_label(first, Some(&self.accounts[first].id)),
                ));
            }
        }
        if self.admin.allow.is_empty() && !private_address(self.server.admin_listen.ip()) {
            let a = self.server.admin_listen;
            let what = if a.ip().is_unspecified() {
                "every address of this host"
            } else {
                "a public address"
            };
            w.push(format!(
                "server.admin_listen: {a} is {what} and admin.allow is empty: whoever reaches \
                 it reads /metrics and /v1/config and can try admin tokens on the admin API \
                 and the dashboard; bind it to a loopback or private address (the default is \
                 127.0.0.1:9464), or list the networks that may connect in admin.allow \
                 (e.g. [\"10.0.0.0/8\"])"
            ));
        }
        // `10.1.2.3/8` is all of 10.0.0.0/8: most likely one address was
        // meant.
        let lists = [
            ("server.allow", &self.server.allow),
            ("admin.allow", &self.admin.allow),
            (
                "server.proxy_protocol_from",
                &self.server.proxy_protocol_from,
            ),
        ];
        for (key, list) in lists {
            for net in list.iter().filter(|n| n.addr() != n.network()) {
                w.push(format!(
                    "{key}: {net} has host bits set, so it stands for all of {}; write {} \
                     for that one address, or {} for the network",
                    net.trunc(),
                    ipnet::IpNet::from(net.addr()),
                    net.trunc()
                ));
            }
        }
        for net in &self.server.proxy_protocol_from {
            if net.prefix_len() == 0 {
                w.push(format!(
                    "server.proxy_protocol_from: {net} is every address: every client must then \
                     send a PROXY header, and may claim any address in it; list only the \
                     balancers' addresses"
                ));
            }
        }
        let after = self.stop_after_drain();
        let stop = self.limits.drain_timeout + after;
        if stop > UNIT_STOP_TIMEOUT {
            w.push(format!(
                "limits.drain_timeout: {} s, plus up to {} s to finalize, end and save, is more than \
                 the shipped systemd unit's TimeoutStopSec={} s, which would kill the drain; \
                 raise TimeoutStopSec above {} s in a drop-in (`systemctl edit clio-relay`)",
                self.limits.drain_timeout.as_secs(),
                after.as_secs(),
                UNIT_STOP_TIMEOUT.as_secs(),
                stop.as_secs()
            ));
        }
        if let Some(t) = &self.tls {
            if let Ok(loaded) = crate::core::tls::load(t) {
                w.extend(loaded.date_warning(t, std::time::SystemTime::now()));
                w.extend(loaded.chain_warning(t));
                w.extend(loaded.unchecked_warning(t));
            }
        }
        // A secret file any user of the host can read, or the client
        // port's private key.
        let tls_key = self
            .tls
            .iter()
            .map(|t| ("tls: key_file".to_string(), t.key_file.clone()));
        for (key, path) in self.secret_files.iter().cloned().chain(tls_key) {
            if let Some(mode) = readable_by_all(&path) {
                w.push(format!(
                    "{key} {} can be read by every user of this host (mode {mode:04o}); \
                     `chmod 600` it (or 640, for a group the relay runs in)",
                    path.display()
                ));
            }
        }
        // An environment variable keeps a trailing newline (`kubectl create
        // secret --from-file`, a CRLF EnvironmentFile); a *_file's is
        // dropped. In a token secret it is part of the HMAC key.
        let ragged = |s: &Secret| {
            let text = s.expose();
            text.trim() != text
        };
        let signing = std::iter::once(("tokens.secret", &self.tokens.secret))
            .chain(
                self.tokens
                    .previous_secret
                    .iter()
                    .map(|s| ("tokens.previous_secret", s)),
            )
            .chain(
                self.tokens
                    .extra
                    .iter()
                    .map(|x| ("tokens.extra", &x.secret)),
            );
        for (key, s) in signing {
            if ragged(s) {
                w.push(format!(
                    "{key}: begins or ends with a space or line break (an environment \
                     variable's is kept; a file's trailing newline is not), and it is part of \
                     the secret: a backend signing without it mints tokens this relay refuses"
                ));
            }
        }
        if self.admin.token.as_ref().is_some_and(ragged) {
            w.push(
                "admin.token: begins or ends with a space or line break, but the token a \
                 request presents is trimmed, so no request can match it: remove it"
                    .to_string(),
            );
        }
        if self.tokens.previous_secret.as_ref() == Some(&self.tokens.secret) {
            w.push("tokens.previous_secret: is the same as tokens.secret".to_string());
        }
        // The admin API changes accounts at runtime; without a master key
        // there is no key store, so those changes end with the process.
        if self.admin.token.is_some() && self.admin.master_key.is_none() && self.cluster.is_some() {
            w.push(
                "admin.master_key: not set, so in this fleet the admin API refuses account \
                 changes (they reach the other nodes sealed under it); set the same \
                 admin.master_key_env or admin.master_key_file on every node \
                 (`openssl rand -hex 32`)"
                    .to_string(),
            );
        } else if self.admin.token.is_some() && self.admin.master_key.is_none() {
            w.push(
                "admin.master_key: not set, so accounts added, rotated, disabled or removed \
                 at runtime (admin API, `clio-relay keys`, dashboard) are lost at the next \
                 restart; set admin.master_key_env or admin.master_key_file \
                 (`openssl rand -hex 32`)"
                    .to_string(),
            );
        }
        // The Redis client reads `#insecure` on a rediss:// URL as "do not
        // check the server's certificate": TLS that anyone in the path
        // can answer, passwords included.
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.redis_url.starts_with("rediss://") && c.redis_url.contains('#'))
        {
            w.push(
                "cluster.redis_url: #insecure turns off the check of Redis's certificate, so whoever can reach the path can pose as Redis and read its password; give the CA in cluster.ca_file instead"
                    .to_string(),
            );
        }
        w
    }
}

/// The file's text and the directory its relative paths are relative to.
/// Like every problem of the file, a failed read does not repeat its path:
/// whoever reports it names the file once (`PATH: problem`).
fn read_config_file(path: &Path) -> Result<(String, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(format!("cannot read the config file: {e}")))?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((text, base))
}

#[cfg(test)]
mod tests;

/// The file's mode when every user of the host can read it: readable by
/// "others", in directories they may all enter. `None` otherwise, or when
/// it cannot be told.
fn readable_by_all(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::fs::canonicalize(path).ok()?;
    let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o7777;
    let enterable =
        |dir: &Path| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    (mode & 0o004 != 0 && path.ancestors().skip(1).all(enterable)).then_some(mode)
}
