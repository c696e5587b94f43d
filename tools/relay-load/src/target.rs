//! Where relay-load's streams go and how they authenticate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clio_relay::core::token::TokenKeys;

/// Where the streams go: a resolved address, the `Host` header and the
/// request path (with any query).
#[derive(Debug, Clone)]
pub struct Target {
    /// The socket address connected to.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query of the upgrade request.
    pub path: String,
}

impl Target {
    /// The relay's client endpoint at `addr`: `/v1/transcribe`.
    pub fn relay(addr: SocketAddr) -> Target {
        Target {
            addr,
            host: addr.to_string(),
            path: "/v1/transcribe".into(),
        }
    }

    /// Soniox's (or fake-soniox's) endpoint at `addr`: `/transcribe-websocket`.
    pub fn direct(addr: SocketAddr) -> Target {
        Target {
            addr,
            host: addr.to_string(),
            path: "/transcribe-websocket".into(),
        }
    }

    /// A full `ws://host[:port]/path?query` URL (resolved once, here).
    pub fn from_url(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
        }) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        use std::net::ToSocketAddrs;
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path,
        })
    }
}

/// Where each stream puts its credential (token or API key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVia {
    /// `Authorization: Bearer <credential>` on the upgrade.
    Header,
    /// `?token=<credential>` on the request path.
    Query,
    /// `Sec-WebSocket-Protocol: soniox-api-key, <credential>`.
    Subprotocol,
    /// `api_key` in the first (config) message.
    FirstMessage,
    /// Nowhere (an open proxy, or to see the refusals).
    None,
}

impl std::str::FromStr for AuthVia {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "header" => AuthVia::Header,
            "query" => AuthVia::Query,
            "subprotocol" => AuthVia::Subprotocol,
            "first-message" => AuthVia::FirstMessage,
            "none" => AuthVia::None,
            _ => {
                return Err(format!(
                    "unknown auth mode {s:?} (header, query, subprotocol, first-message, none)"
                ))
            }
        })
    }
}

/// Where the credentials come from.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credential.
    #[default]
    None,
    /// The same credential for every stream (an API key, with `--direct`).
    Fixed(String),
    /// Session tokens from this list, round robin.
    List(Arc<Vec<String>>),
    /// A fresh session token per stream, minted with these keys for device
    /// `load-<n>` and the given lifetime.
    Mint(Arc<TokenKeys>, Duration),
}

impl std::fmt::Debug for Credentials {
    // Credentials never print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "Credentials::None",
            Credentials::Fixed(_) => "Credentials::Fixed(..)",
            Credentials::List(_) => "Credentials::List(..)",
            Credentials::Mint(..) => "Credentials::Mint(..)",
        })
    }
}

impl Credentials {
    /// The credential for stream number `n`.
    pub(super) fn for_stream(&self, n: u64) -> Result<Option<String>, String> {
        Ok(match self {
            Credentials::None => None,
            Credentials::Fixed(k) => Some(k.clone()),
            Credentials::List(l) if l.is_empty() => None,
            Credentials::List(l) => Some(l[(n % l.len() as u64) as usize].clone()),
            Credentials::Mint(keys, ttl) => Some(
                keys.mint(&format!("load-{n}"), *ttl, SystemTime::now())
                    .map_err(|e| e.to_string())?,
            ),
        })
    }
}
