//! `ws://` / `wss://` URLs: just enough parsing to check `upstream.url` and
//! give a connector its host, port and path.

use std::fmt;

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
pub fn parse_ws_url(url: &str) -> Result<WsEndpoint, UrlError> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (false, rest)
    } else {
        return Err(UrlError::new(url, UrlProblem::Scheme));
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if path.contains('#') {
        return Err(UrlError::new(url, UrlProblem::Fragment));
    }
    if authority.contains('@') {
        return Err(UrlError::new(url, UrlProblem::Credentials));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| UrlError::new(url, UrlProblem::UnclosedIpv6))?;
        (&v6[..end], &v6[end + 1..])
    } else {
        match authority.find(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        }
    };
    if host.is_empty() {
        return Err(UrlError::new(url, UrlProblem::NoHost));
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
            _ => return Err(UrlError::new(url, UrlProblem::Port)),
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

/// Why a `ws://` / `wss://` URL was refused; the message quotes the URL
/// as given, less any user info (`user:password@` becomes `***@`): a URL
/// refused for carrying credentials must not repeat them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError {
    /// The URL as given, user info replaced by `***`.
    pub url: String,
    /// What is wrong with it.
    pub problem: UrlProblem,
}

/// What is wrong with a `ws://` / `wss://` URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlProblem {
    /// The scheme is not `ws://` or `wss://`.
    Scheme,
    /// The URL has a `#fragment`.
    Fragment,
    /// The URL has `user:password@` in its authority.
    Credentials,
    /// A `[` opens an IPv6 address that no `]` closes.
    UnclosedIpv6,
    /// The host is empty.
    NoHost,
    /// The port is not a number from 1 to 65535.
    Port,
}

impl UrlError {
    fn new(url: &str, problem: UrlProblem) -> UrlError {
        UrlError {
            url: without_user_info(url),
            problem,
        }
    }
}

/// `url` with the user info of its authority (all before its last `@`)
/// replaced by `***`, whatever the scheme.
fn without_user_info(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_string(),
    }
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            UrlProblem::Scheme => "must start with ws:// or wss://",
            UrlProblem::Fragment => "must not have a fragment",
            UrlProblem::Credentials => "must not contain credentials",
            UrlProblem::UnclosedIpv6 => "has an unclosed IPv6 address",
            UrlProblem::NoHost => "has no host",
            UrlProblem::Port => "has an invalid port",
        };
        write!(f, "{:?} {what}", self.url)
    }
}

impl std::error::Error for UrlError {}
