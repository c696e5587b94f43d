//! The file as written: serde structs mirroring it key for key (unknown
//! keys are errors), and the parse step with toml errors made readable
//! (key, section and line). `load` resolves these into a [`Config`].

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// A duration key's value: a string such as `"30s"`. A bare number is
/// refused with the way to write it (serde alone said "expected a string").
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration as a string with its unit, such as \"30s\" or \"500ms\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(Text)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    pub(super) tokens: Option<RawTokens>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) account: Vec<RawAccount>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) devices: RawDevices,
    #[serde(default)]
    pub(super) usage: RawUsage,
    #[serde(default)]
    pub(super) alerts: RawAlerts,
    pub(super) tls: Option<RawTls>,
    pub(super) cluster: Option<RawCluster>,
    #[serde(default)]
    pub(super) failover: RawFailover,
    #[serde(default)]
    pub(super) pool: std::collections::BTreeMap<String, RawPool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) url: Option<String>,
    pub(super) rest_url: Option<String>,
    pub(super) max_streams: Option<u32>,
    pub(super) devices: Option<RawDeviceLimits>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis_url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) node_id: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) lease_ttl: Option<String>,
    pub(super) on_store_down: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    pub(super) replay_bytes: Option<usize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) resume_audio: Option<String>,
    pub(super) max_resumes: Option<u32>,
    pub(super) resume_memory: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeviceLimits {
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) streams_per_minute: Option<u32>,
    pub(super) audio_seconds_per_day: Option<u64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) max_stream_length: Option<String>,
}

/// `[devices]`: the keys of [`RawDeviceLimits`] (the default limits)
/// and the tiers. The keys are written out, not `#[serde(flatten)]`ed:
/// serde reads a flattened table as a whole first, so its errors lost
/// their key and line (an unknown key in it was "in the top level (line
/// 1)", a wrong value put on the line of the table before it).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevices {
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) streams_per_minute: Option<u32>,
    pub(super) audio_seconds_per_day: Option<u64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) max_stream_length: Option<String>,
    #[serde(default)]
    pub(super) tier: std::collections::BTreeMap<String, RawDeviceLimits>,
}

impl RawDevices {
    /// The default limits `[devices]` sets (its keys but `tier`).
    pub(super) fn default_limits(&self) -> RawDeviceLimits {
        RawDeviceLimits {
            max_concurrent_streams: self.max_concurrent_streams,
            streams_per_minute: self.streams_per_minute,
            audio_seconds_per_day: self.audio_seconds_per_day,
            max_stream_length: self.max_stream_length.clone(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    pub(super) currency: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) persist_interval: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) reconcile_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) interval: Option<String>,
    pub(super) concurrency_ratio: Option<f64>,
    pub(super) budget_ratio: Option<f64>,
    pub(super) unusual_factor: Option<f64>,
    pub(super) unusual_min_audio_seconds: Option<u64>,
    pub(super) error_rate: Option<f64>,
    pub(super) error_min_streams: Option<u64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) slow_first_result: Option<String>,
    pub(super) webhook_url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) master_key_env: Option<String>,
    pub(super) master_key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) rotation_period: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) rotation_overlap: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) health_interval: Option<String>,
    pub(super) rest_url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) shards: Option<usize>,
    pub(super) max_streams: Option<u32>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) proxy_protocol_from: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) auth: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) connect_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub(super) secret_env: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) previous_secret_env: Option<String>,
    pub(super) previous_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) default_ttl: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) max_ttl: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) clock_skew: Option<String>,
    pub(super) pools: Option<Vec<String>>,
    pub(super) previous_pools: Option<Vec<String>>,
    #[serde(default)]
    pub(super) extra: Vec<RawExtraSecret>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExtraSecret {
    pub(super) secret_env: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) pools: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) handshake_timeout: Option<String>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_frame_bytes: Option<usize>,
    pub(super) max_first_message_bytes: Option<usize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) stall_timeout: Option<String>,
    pub(super) socket_buffer: Option<usize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) drain_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub(super) finalize_wait: Option<String>,
    pub(super) max_unauthenticated: Option<usize>,
    pub(super) max_unauthenticated_per_address: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub(super) id: Option<String>,
    pub(super) key_env: Option<String>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) region: Option<String>,
    pub(super) pool: Option<String>,
    pub(super) enabled: Option<bool>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) price_per_hour: Option<f64>,
    pub(super) monthly_budget: Option<f64>,
}

/// One line for a toml parse error: toml's own message, plus the key,
/// section and line it points at.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', "; ");
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    // The section the error is in: the last table header before it.
    let mut section = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in before.lines() {
        let l = l.trim();
        if let Some((name, _)) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            section = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some((name, _)) = l.strip_prefix('[').and_then(|r| r.split_once(']')) {
            section = Some(name.trim().to_string());
        }
    }
    // The key on the line the error points at, if it is a `key = value` line.
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = match line.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.trim_start().starts_with('[') => Some(k.trim()),
        _ => None,
    };
    if msg.starts_with("unknown field") {
        let (what, expected) = match msg.split_once(", expected") {
            Some((w, rest)) => (w, format!(", expected{rest}")),
            None => (msg.as_str(), String::new()),
        };
        let header_line = line.trim_start().starts_with('[');
        // The key serde quotes: "unknown field `KEY`".
        let quoted = what.split('`').nth(1).unwrap_or("");
        // On a header line the unknown key is one of the names it opens,
        // a key of the tables named before it (`[tokens.extr]`: `extr`
        // in [tokens]; `[devices.tiers.pro]`: `tiers` in [devices]).
        let parent = header_name(line).and_then(|n| {
            let parts: Vec<&str> = n.split('.').map(str::trim).collect();
            let at = parts.iter().position(|p| *p == quoted)?;
            (at > 0).then(|| parts[..at].join("."))
        });
        let place = match &section {
            _ if header_line => {
                parent.map_or_else(|| "the top level".to_string(), |p| format!("[{p}]"))
            }
            Some(s) if s.ends_with(']') => s.clone(),
            Some(s) => format!("[{s}]"),
            None => "the top level".to_string(),
        };
        let elsewhere = if header_line {
            Vec::new()
        } else {
            tables_with_key(quoted, &place)
        };
        let takes = expected.strip_prefix(", expected").unwrap_or("");
        let at = format!("{what} in {place} (line {line_no})");
        let near = closest(quoted, listed_keys(takes).map(|k| (k, format!("`{k}`"))));
        let near = (!near.is_empty()).then(|| either(&near));
        return match (near, elsewhere.as_slice()) {
            // `idle_timout` in [server]: misspelt, and in the wrong table.
            (None, []) if !header_line => match close_keys_elsewhere(quoted, &place) {
                moved if !moved.is_empty() => {
                    format!(
                        "{at}: did you mean {}? {place} takes{takes}",
                        either(&moved)
                    )
                }
                _ => format!("{at}{expected}"),
            },
            (None, []) => format!("{at}{expected}"),
            (Some(near), []) => format!("{at}: did you mean {near}? {place} takes{takes}"),
            (None, [one]) => {
                format!("{at}: it is a key of {one}: move it there; {place} takes{takes}")
            }
            (None, tables) => format!(
                "{at}: it is a key of {}; {place} takes{takes}",
                tables.join(" and ")
            ),
            // `pool` in [tokens]: `pools` here, more likely than a move.
            (Some(near), tables) => format!(
                "{at}: did you mean {near}? (`{quoted}` itself is a key of {}); {place} takes{takes}",
                tables.join(" and ")
            ),
        };
    }
    // An error on a table header is about the table it opens (`[account]`
    // where `[[account]]` belongs, a `[tokens]` given twice), not the one
    // before it: its name is the key, its parent the section.
    let (section, key) = match header_name(line) {
        Some(name) => match name.rsplit_once('.') {
            Some((parent, last)) => (Some(parent.to_string()), Some(last)),
            None => (None, Some(name)),
        },
        None => (section, key),
    };
    // `[[pool.eu]]` where `[pool.eu]` belongs: serde reads the list as a
    // table written as a sequence and speaks of its first field.
    let listed = line.trim_start().starts_with("[[");
    let lists = ["account", "tokens.extra"];
    let msg = match header_name(line) {
        Some(name) if listed && !lists.contains(&name) && msg.starts_with("invalid type: ") => {
            format!("[[{name}]] makes a list of tables, and {name} is one table: write [{name}]")
        }
        _ => plain_expected(&msg, key),
    };
    match (section, key) {
        (Some(s), Some(k)) => format!("{s}.{k}: {msg} (line {line_no})"),
        (None, Some(k)) => format!("{k}: {msg} (line {line_no})"),
        (Some(s), None) => format!("{s}: {msg} (line {line_no})"),
        (None, None) => format!("{msg} (line {line_no})"),
    }
}

/// The dotted name a table header line opens (`[a.b]`, `[[a]]`), or
/// `None` for any other line.
fn header_name(line: &str) -> Option<&str> {
    let l = line.trim();
    let name = match l.strip_prefix("[[") {
        Some(r) => r.split_once("]]")?.0,
        None => l.strip_prefix('[')?.split_once(']')?.0,
    };
    let name = name.trim();
    (!name.is_empty()).then_some(name)
}

/// The keys serde lists in what a table takes: " one of `a`, `b`", or
/// " `a` or `b`".
fn listed_keys(takes: &str) -> impl Iterator<Item = &str> {
    takes.split('`').skip(1).step_by(2)
}

/// The keys of `candidates` (each with how it is shown) that `key` is
/// probably a misspelling of: those at the least edit distance from it,
/// if that is close (at most a third of its length, 1 for a short key, a
/// swap of two letters counting one), and at most three (more are no
/// guess).
fn closest<'a>(key: &str, candidates: impl Iterator<Item = (&'a str, String)>) -> Vec<String> {
    if key.is_empty() {
        return Vec::new();
    }
    let key = key.to_ascii_lowercase();
    let within = (key.chars().count() / 3).max(1);
    let mut best = usize::MAX;
    let mut near = Vec::new();
    for (candidate, shown) in candidates {
        let d = strsim::damerau_levenshtein(&key, &candidate.to_ascii_lowercase());
        if d > within || d > best {
            continue;
        }
        if d < best {
            best = d;
            near.clear();
        }
        if !near.contains(&shown) {
            near.push(shown);
        }
    }
    if near.len() > 3 {
        near.clear();
    }
    near
}

/// "`a`", "`a` or `b`", "`a`, `b` or `c`".
fn either(keys: &[String]) -> String {
    match keys {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// For a key close to none of its own table's and no key of another
/// table as it is: the keys of the other tables it is probably a
/// misspelling of, each shown with its table (`` `idle_timeout` of
/// [limits] ``). Each table lists its keys in its answer to a key it
/// does not take.
fn close_keys_elsewhere(key: &str, place: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (shown, table) in other_tables(place) {
        let Err(e) = alone_in(table, "_") else {
            continue;
        };
        let Some((_, takes)) = e.message().split_once(", expected") else {
            continue;
        };
        for k in listed_keys(takes) {
            keys.push((k.to_string(), shown.clone()));
        }
    }
    closest(
        key,
        keys.iter()
            .map(|(k, table)| (k.as_str(), format!("`{k}` of {table}"))),
    )
}

/// serde's "invalid type: …, expected usize" (or `invalid value`) in an
/// operator's words: what the key takes, not the Rust type that holds it
/// (`expected a whole number (0 or more)`). `key` is the key the error is
/// on, for the lists and sets of tables (`account`, `pool`). Any other
/// message is returned as it is.
fn plain_expected(msg: &str, key: Option<&str>) -> String {
    if !msg.starts_with("invalid type: ") && !msg.starts_with("invalid value: ") {
        return msg.to_string();
    }
    let Some((what, expected)) = msg.rsplit_once(", expected ") else {
        return msg.to_string();
    };
    let plain = match expected {
        "usize" | "u64" => "a whole number (0 or more)".to_string(),
        "u32" => format!("a whole number from 0 to {}", u32::MAX),
        "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "path string" => "a path in quotes".to_string(),
        "a sequence" => match key {
            Some("account") => "[[account]] tables".to_string(),
            Some("extra") => "[[tokens.extra]] tables".to_string(),
            _ => "a list in brackets, such as [\"a\", \"b\"]".to_string(),
        },
        "a string" => "a string in quotes".to_string(),
        "a map" => match key {
            Some("pool") => "[pool.NAME] tables".to_string(),
            Some("tier") => "[devices.tier.NAME] tables".to_string(),
            _ => "a table".to_string(),
        },
        e if e.starts_with("struct Raw") => "a table".to_string(),
        _ => return msg.to_string(),
    };
    format!("{what}, expected {plain}")
}

/// For an unknown `key` in `place`: the other tables that have it
/// (`[limits]`), so a key put in the wrong table says where it belongs;
/// empty when none has it. Each table is asked by parsing a one-key file
/// ([`alone_in`]): any answer but "unknown field" means it has it.
fn tables_with_key(key: &str, place: &str) -> Vec<String> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Vec::new();
    }
    other_tables(place)
        .filter(|(_, t)| match alone_in(t, key) {
            Ok(_) => true,
            Err(e) => !e.message().starts_with("unknown field"),
        })
        .map(|(shown, _)| shown)
        .collect()
}

/// A config file of `key = 0` alone in `table`, parsed: how a table is
/// asked whether it takes a key, and which keys it takes.
fn alone_in(table: &str, key: &str) -> Result<RawFile, toml::de::Error> {
    let text = if table == "account" {
        format!("[[account]]\n{key} = 0\n")
    } else {
        format!("[{table}]\n{key} = 0\n")
    };
    toml::from_str(&text)
}

/// The config's tables other than `place`, each as shown (`[limits]`,
/// `[[account]]`) and by name.
fn other_tables(place: &str) -> impl Iterator<Item = (String, &'static str)> + '_ {
    const TABLES: [&str; 12] = [
        "server", "upstream", "tokens", "limits", "failover", "admin", "devices", "usage",
        "alerts", "tls", "cluster", "account",
    ];
    TABLES
        .into_iter()
        .map(|t| {
            let shown = if t == "account" {
                "[[account]]".to_string()
            } else {
                format!("[{t}]")
            };
            (shown, t)
        })
        .filter(move |(shown, _)| !place.starts_with(shown.trim_end_matches(']')))
}

/// Parses the file text into the raw layer; a toml error is one problem.
pub(super) fn parse(text: &str) -> Result<RawFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::one(describe_toml_error(&e, text)))
}
