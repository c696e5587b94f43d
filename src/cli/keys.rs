//! `clio-relay keys …`: the admin account API from the command line.
//!
//! It reads only `server.admin_listen` and the admin token from the config
//! file, and sends one request to the running relay. New keys are read from
//! a file, an environment variable or standard input, never from the
//! command line (where `ps` would show them).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::CliError;
use crate::control::httpc::{self, blocking, Endpoint, Request};
use crate::core::config::Config;

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// List accounts: health, live streams, key fingerprints and ages.
    List,
    /// Add an account (the key from --key-file, --key-env or stdin).
    Add {
        /// Account id.
        #[arg(long)]
        id: String,
        /// Region label.
        #[arg(long, default_value = "")]
        region: String,
        /// The pool it belongs to ([pool.NAME] of the relay, or default).
        #[arg(long, default_value = "default")]
        pool: String,
        /// Concurrent streams allowed on the account.
        #[arg(long, default_value_t = 10)]
        max_concurrent_streams: u32,
        /// Add it disabled.
        #[arg(long)]
        disabled: bool,
        /// Where the key comes from.
        #[command(flatten)]
        key: KeySource,
    },
    /// Take new streams on an account again.
    Enable {
        /// Account id.
        id: String,
    },
    /// Take no new stream on an account (live streams go on).
    Disable {
        /// Account id.
        id: String,
    },
    /// Remove an account (live streams go on to their end).
    Remove {
        /// Account id.
        id: String,
    },
    /// Set an account's concurrent-stream limit.
    Limit {
        /// Account id.
        id: String,
        /// New limit.
        max_concurrent_streams: u32,
    },
    /// Rotate an account's key: the new key takes new streams now, the old
    /// one keeps its streams until they end or the overlap passes.
    Rotate {
        /// Account id.
        id: String,
        /// How long the old key may keep its streams (default admin.rotation_overlap).
        #[arg(long)]
        overlap: Option<String>,
        /// Where the key comes from.
        #[command(flatten)]
        key: KeySource,
    },
}

impl KeysAction {
    /// The account id the action puts in the request's path, if any.
    fn account_in_path(&self) -> Option<&str> {
        match self {
            KeysAction::List | KeysAction::Add { .. } => None,
            KeysAction::Enable { id }
            | KeysAction::Disable { id }
            | KeysAction::Remove { id }
            | KeysAction::Limit { id, .. }
            | KeysAction::Rotate { id, .. } => Some(id),
        }
    }
}

/// Where a new key comes from.
#[derive(Debug, clap::Args)]
pub struct KeySource {
    /// Read the key from this file.
    #[arg(long, conflicts_with = "key_env")]
    key_file: Option<PathBuf>,
    /// Read the key from this environment variable.
    #[arg(long)]
    key_env: Option<String>,
}

impl KeySource {
    /// The key, trimmed; a [`CliError::Usage`] that names the source (never
    /// the key) if it cannot be read or is empty.
    fn read(&self) -> Result<String, CliError> {
        let usage = CliError::Usage;
        let key = if let Some(f) = &self.key_file {
            // A name that may be the key itself, given where its file's
            // (or variable's) name goes, is not repeated, as the config
            // file's `key_file` and `key_env` are not.
            std::fs::read_to_string(f).map_err(|e| {
                usage(if crate::core::config::shown_file_name(f) {
                    format!("--key-file {}: {e}", f.display())
                } else {
                    format!("--key-file: the file named (not shown in case it is a key): {e}")
                })
            })?
        } else if let Some(v) = &self.key_env {
            std::env::var(v).map_err(|_| {
                usage(if crate::core::config::shown_env_name(v) {
                    format!("--key-env {v}: not set")
                } else {
                    "--key-env: the variable named (not shown in case it is a key) is not set"
                        .into()
                })
            })?
        } else {
            use std::io::IsTerminal as _;
            // On a terminal the read would wait without a word, as if hung.
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "reading the new key from standard input: paste it, then Enter and Ctrl-D \
                     (or give --key-file FILE or --key-env VAR)"
                );
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| usage(format!("stdin: {e}")))?;
            s
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(usage("the key is empty".into()));
        }
        Ok(key)
    }
}

/// Runs one `keys` action against the relay the config file describes;
/// returns what to print.
pub fn run(config: &Path, action: &KeysAction) -> Result<String, CliError> {
    let (mut addr, token) =
        Config::load_admin_client(config).map_err(|e| super::config_error(config, &e))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    // Trimmed, as the relay trims a presented token: a variable's trailing
    // newline cannot go in a header.
    let token = token.expose().trim();
    // Port 0 lets the relay pick its admin port when it starts: nothing
    // in the file says which it took.
    if addr.port() == 0 {
        return Err(CliError::AdminUnreachable(format!(
            "admin API at {addr}: server.admin_listen in {} has port 0, so the relay picked its \
             admin port when it started and `keys` cannot know it; give server.admin_listen a \
             port (and restart the relay)",
            config.display()
        )));
    }
    // The id goes in the request's path as it is: one the API would not
    // take (a `?` or `/` in it) could name another path, or another account.
    if let Some(id) = action.account_in_path() {
        if !crate::core::config::valid_account_id(id) {
            return Err(CliError::Usage(
                "the account id must be 1-64 of A-Z a-z 0-9 . _ - (the value is not repeated: it \
                 may be a key given in the wrong place)"
                    .into(),
            ));
        }
    }
    // The new key, if the action sends one: never printed back.
    let mut new_key = None;
    let (method, path, body) = match action {
        KeysAction::List => ("GET", "/admin/accounts".to_string(), None),
        KeysAction::Add {
            id,
            region,
            pool,
            max_concurrent_streams,
            disabled,
            key,
        } => (
            "POST",
            "/admin/accounts".into(),
            Some(
                serde_json::json!({"id": id, "key": new_key.insert(key.read()?), "region": region, "pool": pool, "enabled": !disabled, "max_concurrent_streams": max_concurrent_streams}),
            ),
        ),
        KeysAction::Enable { id } => ("POST", format!("/admin/accounts/{id}/enable"), None),
        KeysAction::Disable { id } => ("POST", format!("/admin/accounts/{id}/disable"), None),
        KeysAction::Remove { id } => ("DELETE", format!("/admin/accounts/{id}"), None),
        KeysAction::Limit {
            id,
            max_concurrent_streams,
        } => (
            "POST",
            format!("/admin/accounts/{id}/limit"),
            Some(serde_json::json!({"max_concurrent_streams": max_concurrent_streams})),
        ),
        KeysAction::Rotate { id, overlap, key } => {
            let mut b = serde_json::json!({"key": new_key.insert(key.read()?)});
            if let Some(o) = overlap {
                b["overlap"] = serde_json::Value::String(o.clone());
            }
            ("POST", format!("/admin/accounts/{id}/rotate"), Some(b))
        }
    };
    let (status, text) =
        request(addr, method, &path, token, body.map(|b| b.to_string())).map_err(|e| {
            let hint = if hung_up(&e) {
                " (the admin port closed the connection unanswered: is this host's address in the relay's admin.allow?)".to_string()
            } else if refused(&e) {
                format!(
                    " (nothing listens there: is the relay running (`systemctl status \
                     clio-relay`), and is {} the config it runs? `keys` talks to its \
                     server.admin_listen)",
                    config.display()
                )
            } else {
                String::new()
            };
            CliError::AdminUnreachable(format!("admin API at {addr}: {e}{hint}"))
        })?;
    // Whatever answered may echo the request (another service at the
    // admin address, a proxy's error page): the admin token and the key
    // are taken out of the answer before any of it is printed.
    let text = without_secrets(text, &[token, new_key.as_deref().unwrap_or_default()]);
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|_| CliError::AdminRefused(format!("admin API answered {status}: {text}")))?;
    if status != 200 {
        return Err(CliError::AdminRefused(format!(
            "{status}: {}",
            value["error_message"].as_str().unwrap_or(&text)
        )));
    }
    Ok(table(&value))
}

/// `text` with each of `secrets` (as sent, and as a JSON string escapes
/// it) replaced by `[redacted]`.
fn without_secrets(mut text: String, secrets: &[&str]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let quoted = serde_json::to_string(secret).unwrap_or_default();
        let escaped = quoted
            .get(1..quoted.len().saturating_sub(1))
            .unwrap_or_default();
        for needle in [*secret, escaped] {
            if !needle.is_empty() && text.contains(needle) {
                text = text.replace(needle, "[redacted]");
            }
        }
    }
    text
}

/// Whether nothing listened at the admin address (connection refused).
fn refused(e: &httpc::Error) -> bool {
    match e {
        httpc::Error::Connect(_, e) | httpc::Error::Io(e) => {
            e.kind() == std::io::ErrorKind::ConnectionRefused
        }
        _ => false,
    }
}

/// Whether the admin port took the connection and closed it unanswered,
/// as it does for a peer outside `admin.allow`.
fn hung_up(e: &httpc::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    match e {
        httpc::Error::NoAnswer => true,
        httpc::Error::Io(e) => matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted),
        _ => false,
    }
}

/// One request to the admin API, through the relay's HTTP client.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> Result<(u16, String), httpc::Error> {
    let body = body.unwrap_or_default();
    let req = Request::new(method, path)
        .header("Content-Type", "application/json")
        .bearer(token)
        .body(body.as_bytes());
    let r = blocking::send(&Endpoint::plain(addr), &req, Duration::from_secs(15))?;
    Ok((r.status, r.text()))
}

/// The account list as a table: one row per account, every column padded
/// to its widest cell (JSON values are turned into text first; `{:<8}` on a
/// `serde_json::Value` pads nothing).
fn table(v: &serde_json::Value) -> String {
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut rows: Vec<[String; 9]> = vec![[
        "ACCOUNT".into(),
        "REGION".into(),
        "POOL".into(),
        "ENABLED".into(),
        "HEALTHY".into(),
        "LIVE/MAX".into(),
        "KEY".into(),
        "AGE".into(),
        "RETIRING KEYS".into(),
    ]];
    for a in v["accounts"].as_array().into_iter().flatten() {
        let age_days = a["key"]["age_seconds"].as_u64().unwrap_or(0) / 86400;
        let due = if a["key"]["due_for_rotation"] == true {
            " (rotate!)"
        } else {
            ""
        };
        let retiring: Vec<String> = a["retiring_keys"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{} ({} live)",
                    r["fingerprint"].as_str().unwrap_or("?"),
                    r["live_streams"]
                )
            })
            .collect();
        let region = text(&a["region"]);
        rows.push([
            text(&a["id"]),
            if region.is_empty() {
                "-".into()
            } else {
                region
            },
            text(&a["pool"]),
            text(&a["enabled"]),
            text(&a["healthy"]),
            format!(
                "{}/{}",
                text(&a["live_streams"]),
                text(&a["max_concurrent_streams"])
            ),
            text(&a["key"]["fingerprint"]),
            format!("{age_days}d{due}"),
            retiring.join(", "),
        ]);
    }
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Numbers right-aligned; the last column is not padded.
            match i {
                5 | 7 => line.push_str(&format!("{cell:>w$}", w = widths[i])),
                8 => line.push_str(cell),
                _ => line.push_str(&format!("{cell:<w$}", w = widths[i])),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn the_account_table_lines_up() {
        let v = serde_json::json!({"accounts": [
            {"id": "prod-account-1", "region": "us-east", "pool": "default", "enabled": true, "healthy": true,
             "live_streams": 12, "max_concurrent_streams": 100,
             "key": {"fingerprint": "25cc70b72eb7", "age_seconds": 86400 * 3, "due_for_rotation": false},
             "retiring_keys": []},
            {"id": "b", "region": "", "pool": "prod-eu", "enabled": false, "healthy": false,
             "live_streams": 0, "max_concurrent_streams": 5,
             "key": {"fingerprint": "0123456789ab", "age_seconds": 86400 * 120, "due_for_rotation": true},
             "retiring_keys": [{"fingerprint": "ba9876543210", "live_streams": 2}]},
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // Each column starts at the same place on every line.
        for header in [
            "REGION",
            "POOL",
            "ENABLED",
            "HEALTHY",
            "KEY",
            "RETIRING KEYS",
        ] {
            let col = lines[0].find(header).unwrap();
            for l in lines[1..].iter().filter(|l| l.len() > col) {
                assert_eq!(&l[col - 2..col], "  ", "{header} misaligned:\n{t}");
                assert_ne!(&l[col..col + 1], " ", "{header} misaligned:\n{t}");
            }
        }
        assert!(lines[1].contains("true     true"), "{t}");
        assert!(lines[2].contains("false    false"), "{t}");
        // Right-aligned numbers end where their header ends.
        let live_end = lines[0].find("LIVE/MAX").unwrap() + "LIVE/MAX".len();
        assert!(lines[1][..live_end].ends_with("12/100"), "{t}");
        assert!(lines[2][..live_end].ends_with("0/5"), "{t}");
        assert!(lines[2].contains("120d (rotate!)"), "{t}");
        assert!(lines[2].ends_with("ba9876543210 (2 live)"), "{t}");
    }
}
