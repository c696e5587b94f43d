//! `ws://` / `wss://` URLs: just enough parsing to check `upstream.url` and
//! give a connector its host, port and path.

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
