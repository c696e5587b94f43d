//! `clio-relay keys …`: the admin account API from the command line.
//!
//! It reads only `server.admin_listen` and the admin token from the config
//! file, and sends one request to the running relay. New keys are read from
//! a file, an environment variable or standard input, never from the
//! command line (where `ps` would show them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

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
        /// Concurrent streams allowed on the account.
        #[arg(long, default_value_t = 10)]
        max_concurrent_streams: u32,
        /// Add it disabled.
        #[arg(long)]
        disabled: bool,
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
        #[command(flatten)]
        key: KeySource,
    },
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
    fn read(&self) -> Result<String, String> {
        let key = if let Some(f) = &self.key_file {
            std::fs::read_to_string(f).map_err(|e| format!("--key-file {}: {e}", f.display()))?
        } else if let Some(v) = &self.key_env {
            std::env::var(v).map_err(|_| format!("--key-env {v}: not set"))?
        } else {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("stdin: {e}"))?;
            s
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        Ok(key)
    }
}

/// Runs one `keys` action against the relay the config file describes;
/// returns what to print.
pub fn run(config: &Path, action: &KeysAction) -> Result<String, String> {
    let (mut addr, token) = Config::load_admin_client(config).map_err(|e| e.to_string())?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let token = token.expose();
    let (method, path, body) = match action {
        KeysAction::List => ("GET", "/admin/accounts".to_string(), None),
        KeysAction::Add {
            id,
            region,
            max_concurrent_streams,
            disabled,
            key,
        } => (
            "POST",
            "/admin/accounts".into(),
            Some(
                serde_json::json!({"id": id, "key": key.read()?, "region": region, "enabled": !disabled, "max_concurrent_streams": max_concurrent_streams}),
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
            let mut b = serde_json::json!({"key": key.read()?});
            if let Some(o) = overlap {
                b["overlap"] = serde_json::Value::String(o.clone());
            }
            ("POST", format!("/admin/accounts/{id}/rotate"), Some(b))
        }
    };
    let (status, text) = request(addr, method, &path, token, body.map(|b| b.to_string()))
        .map_err(|e| format!("admin API at {addr}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| format!("admin API answered {status}: {text}"))?;
    if status != 200 {
        return Err(format!(
            "{status}: {}",
            value["error_message"].as_str().unwrap_or(&text)
        ));
    }
    Ok(table(&value))
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\nAuthorization: Bearer ", body.len());
    req.push_str(token);
    req.push_str("\r\n\r\n");
    req.push_str(&body);
    tcp.write_all(req.as_bytes())?;
    let mut out = String::new();
    tcp.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The account list as a table.
fn table(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<20} {:<10} {:<8} {:<8} {:>5}/{:<5} {:<14} {:>8}  {}\n",
        "ACCOUNT", "REGION", "ENABLED", "HEALTHY", "LIVE", "MAX", "KEY", "AGE", "RETIRING KEYS"
    );
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
        out.push_str(&format!(
            "{:<20} {:<10} {:<8} {:<8} {:>5}/{:<5} {:<14} {:>7}d{}  {}\n",
            a["id"].as_str().unwrap_or("?"),
            a["region"].as_str().unwrap_or(""),
            a["enabled"],
            a["healthy"],
            a["live_streams"],
            a["max_concurrent_streams"],
            a["key"]["fingerprint"].as_str().unwrap_or("?"),
            age_days,
            due,
            retiring.join(", ")
        ));
    }
    out
}
