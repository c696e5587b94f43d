//! The HTTP/1.1 edge of a stream: reading a request head into the stream's
//! read buffer, the client upgrade and its 101 answer, the
//! upstream upgrade response, and the JSON error answers of the contract.
//!
//! Bytes after the head stay in the buffer: they are the first WebSocket
//! frames and are never lost or copied.

use std::io;

use crate::dataplane::buf::Buf;
use crate::dataplane::io::Duplex;

/// Why a request head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or the socket failed before a full head arrived.
    Io(io::Error),
    /// The head is over the size limit.
    TooLarge,
    /// Not parseable HTTP/1.1.
    Malformed,
    /// The peer began a TLS handshake (its first byte is a TLS handshake
    /// record's, [`TLS_HANDSHAKE`], which no HTTP message begins with):
    /// `wss://` or `https://` to a port that speaks plain HTTP. Said at
    /// once, not after the head's deadline: the rest of a ClientHello
    /// never ends the head, so waiting for it only held the connection.
    Tls,
}

/// The first byte of a TLS handshake record (content type 22).
pub const TLS_HANDSHAKE: u8 = 0x16;

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Io(e) => write!(f, "the request head could not be read: {e}"),
            HeadError::TooLarge => f.write_str("the request head is over the size limit"),
            HeadError::Malformed => f.write_str("the request head is not valid HTTP/1.1"),
            HeadError::Tls => f.write_str("a TLS handshake, on a port that speaks plain HTTP"),
        }
    }
}

impl std::error::Error for HeadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HeadError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads until a full HTTP head (ending in an empty line) is in `buf`.
/// Returns the head's length; the buffer's start is left at the head's start.
/// `max` is the bound whatever `buf`'s size: a head that fills a pooled
/// buffer under a larger `max` moves to a buffer of its own of `max` bytes
/// ([`Buf::hold`]), freed once the head's bytes are consumed.
pub async fn read_head(conn: &Duplex, buf: &mut Buf, max: usize) -> Result<usize, HeadError> {
    let mut scanned = 0;
    loop {
        let filled = &buf.filled()[..];
        if filled.first() == Some(&TLS_HANDSHAKE) {
            return Err(HeadError::Tls);
        }
        if let Some(at) = find_head_end(filled, scanned) {
            // However it arrived: a head over the limit in one read is
            // still over the limit.
            return if at > max {
                Err(HeadError::TooLarge)
            } else {
                Ok(at)
            };
        }
        // The last line feed read may begin the empty line that ends it.
        scanned = filled.len().saturating_sub(2);
        if buf.len() >= max {
            return Err(HeadError::TooLarge);
        }
        if buf.end() == buf.capacity() {
            // Under the limit but the buffer is full: room for the rest.
            buf.hold(max);
            if buf.end() == buf.capacity() {
                // No room to grow (bytes before the head's start): as before.
                return Err(HeadError::TooLarge);
            }
        }
        match buf.read_from(conn).await {
            Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

/// Header slots for parsing `head`: one per line, so any number of headers
/// that fits the byte limit parses (a fixed array refused more than 48).
pub fn header_slots(head: &[u8]) -> Vec<httparse::Header<'_>> {
    let end = find_head_end(head, 0).unwrap_or(head.len());
    let lines = head[..end].iter().filter(|&&b| b == b'\n').count();
    vec![httparse::EMPTY_HEADER; lines.max(1)]
}

/// Where the head in `bytes` ends: after its empty line. Each line may
/// end in CRLF or in a bare LF, which a recipient may take for a line's
/// end (RFC 9112 §2.2) and the HTTP parser does; looked for from `from`,
/// which must be a line feed's place or before it.
fn find_head_end(bytes: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &bytes[from..])
        .map(|p| from + p + 1)
        .find_map(|after| match &bytes[after..] {
            [b'\n', ..] => Some(after + 1),
            [b'\r', b'\n', ..] => Some(after + 2),
            _ => None,
        })
}

/// The most a graceful close reads and discards from a client.
const MAX_DRAIN: usize = 1 << 20;

/// Ends a connection after the relay's answer without a reset: FIN, then
/// read and discard what the client still sends (for up to `wait` and
/// 1 MiB), so unread bytes do not turn the close into a TCP reset that
/// could cost a client that reads late the answer.
pub async fn close_gracefully(conn: &Duplex, wait: std::time::Duration) {
    let _ = conn.close().await;
    let mut scratch = [0u8; 2048];
    let mut left = MAX_DRAIN;
    let _ = crate::dataplane::io::timeout(wait, async {
        while let Ok(n) = conn.read(&mut scratch).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
}

/// Where the client put its session token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `Sec-WebSocket-Protocol: soniox-api-key, <token>` (browsers).
    Subprotocol,
    /// `?token=<token>`.
    Query,
    /// The `api_key` field of the first message (Soniox SDKs).
    FirstMessage,
}

/// A parsed client request: what routing, the token and the upgrade answer
/// need, read from the head where it lies (no header map is built).
#[derive(Debug)]
pub struct ClientRequest {
    /// The method is `GET`.
    pub get: bool,
    /// The method is `HEAD`: any answer goes without its body.
    pub head: bool,
    /// The request path without the query.
    pub path: String,
    /// The session token found on the request, and where. The token is a
    /// credential: never log it.
    pub token: Option<(String, TokenSource)>,
    /// What is wrong with the request's `Host` or `Authorization`, if
    /// anything ([`head_fault`]).
    pub head_fault: Option<&'static str>,
    /// What the 101 answer depends on.
    upgrade: Upgrade,
}

/// The upgrade's parts of a request head. `Upgrade`, `Sec-WebSocket-Version`
/// and `Sec-WebSocket-Key` are read from the first header of their name (as
/// an HTTP header map would give them); `Connection` is a list, which may
/// come on several lines (RFC 9110 §5.3).
#[derive(Debug, Default)]
struct Upgrade {
    /// HTTP/1.1 (a WebSocket upgrade needs at least 1.1).
    http11: bool,
    /// `Connection` lists `Upgrade`.
    connection_upgrade: bool,
    /// `Upgrade: websocket`.
    websocket: bool,
    /// `Sec-WebSocket-Version`, if sent: whether it is 13 (httparse has
    /// trimmed the spaces around it).
    version_13: Option<bool>,
    /// `Sec-WebSocket-Key`, if it is 16 bytes in base64.
    key: Option<[u8; 24]>,
    /// `Sec-WebSocket-Protocol` lists [`SUBPROTOCOL`]: the 101 names it,
    /// wherever the token was read from.
    offers_subprotocol: bool,
}

/// Parses a client request head.
pub fn parse_client_request(head: &[u8]) -> Result<ClientRequest, HeadError> {
    let mut headers = header_slots(head);
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadError::Malformed),
    }
    let method = req.method.ok_or(HeadError::Malformed)?;
    let target = req.path.ok_or(HeadError::Malformed)?;
    // The target must be a URI (origin-, absolute- or asterisk-form), as
    // HTTP's own rules say; one small copy, to check it. The absolute form
    // (`GET http://host/v1/transcribe`), which a server must accept too
    // (RFC 9112 §3.2.2), names its path and query after the authority.
    let uri = tungstenite::http::Uri::try_from(target).map_err(|_| HeadError::Malformed)?;
    let target = match (uri.scheme(), uri.path_and_query()) {
        (Some(_), Some(pq)) => pq.as_str(),
        (Some(_), None) => "/",
        (None, _) => target,
    };
    let mut up = Upgrade {
        http11: req.version == Some(1),
        ..Upgrade::default()
    };
    let (mut upgrade, mut key) = (false, false);
    let (mut bearer, mut subprotocol) = (None, Subprotocol::default());
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("authorization") {
            if let Some(t) = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| strip_bearer(v.trim()))
            {
                bearer = Some(t);
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if let Ok(v) = std::str::from_utf8(h.value) {
                subprotocol.scan(v);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            up.connection_upgrade |= connection_names_upgrade(h.value);
        } else if name.eq_ignore_ascii_case("upgrade") && !std::mem::replace(&mut upgrade, true) {
            up.websocket = upgrade_is_websocket(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") && up.version_13.is_none() {
            up.version_13 = Some(h.value == b"13");
        } else if name.eq_ignore_ascii_case("sec-websocket-key")
            && !std::mem::replace(&mut key, true)
        {
            up.key = valid_key(h.value);
        }
    }
    up.offers_subprotocol = subprotocol.offered;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    // `?token=` with nothing after it is no token, as an empty bearer or
    // subprotocol item is. Its value is percent-decoded (RFC 3986 §2.1):
    // a token needs no escapes, but an over-eager URL encoder may add them.
    let in_query = || {
        let t = query?
            .split('&')
            .find_map(|kv| kv.strip_prefix("token=").filter(|t| !t.is_empty()))?;
        // Escapes that are not UTF-8 leave it as written (and malformed).
        let decoded = percent_encoding::percent_decode_str(t).decode_utf8();
        Some(decoded.unwrap_or(std::borrow::Cow::Borrowed(t)))
    };
    let token = if let Some(t) = bearer {
        Some((t.to_string(), TokenSource::Header))
    } else if let Some(t) = subprotocol.token() {
        Some((t.to_string(), TokenSource::Subprotocol))
    } else {
        in_query().map(|t| (t.into_owned(), TokenSource::Query))
    };
    Ok(ClientRequest {
        get: method == "GET",
        head: method == "HEAD",
        path: path.to_string(),
        token,
        head_fault: head_fault(req.headers, up.http11),
        upgrade: up,
    })
}

/// What is wrong with a request's `Host` or `Authorization`, if anything
/// (a server answers 400):
/// - an HTTP/1.1 request carries exactly one `Host`, and its value is a
///   host with an optional port, or empty; HTTP/1.0 may leave it out
///   (RFC 9112 §3.2);
/// - `Authorization` is no list, so it comes at most once (RFC 9110
///   §5.3): with several, which credential counts would be a guess, and
///   a proxy in front may have read another one.
pub fn head_fault(headers: &[httparse::Header<'_>], http11: bool) -> Option<&'static str> {
    let authorizations = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
        .count();
    if authorizations > 1 {
        return Some("more than one Authorization header");
    }
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (None, _) if http11 => Some("an HTTP/1.1 request needs a Host header"),
        (None, _) => None,
        (Some(_), Some(_)) => Some("more than one Host header"),
        // RFC 3986's reg-name, IP literal or address, and `:port`.
        (Some(h), None) => (!h
            .value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b)))
        .then_some("the Host header names no host"),
    }
}

/// Whether a `Connection` header's value lists `upgrade` (of a request or
/// of upstream's 101).
fn connection_names_upgrade(value: &[u8]) -> bool {
    visible_ascii(value).is_some_and(|v| {
        v.split([' ', ','])
            .any(|item| item.eq_ignore_ascii_case("upgrade"))
    })
}

/// Whether an `Upgrade` header's value is `websocket`.
fn upgrade_is_websocket(value: &[u8]) -> bool {
    visible_ascii(value).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// `value` as text if it is visible ASCII (or tabs and spaces), as an HTTP
/// header value must be to be read as a string.
fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// A `Sec-WebSocket-Key` is 16 bytes in padded base64: 24 characters.
fn valid_key(value: &[u8]) -> Option<[u8; 24]> {
    use base64::Engine as _;
    let key: [u8; 24] = value.try_into().ok()?;
    let mut raw = [0u8; 18];
    match base64::engine::general_purpose::STANDARD.decode_slice(key, &mut raw) {
        Ok(16) => Some(key),
        _ => None,
    }
}

/// The token of an `Authorization` value `Bearer <token>`: the scheme is
/// case-insensitive (RFC 9110 §11.1); `None` for another scheme or an
/// empty token.
pub(crate) fn strip_bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// `soniox-api-key, <token>`: the token is the item after the marker. The
/// list may come on several `Sec-WebSocket-Protocol` lines, which are one
/// list (RFC 6455 §11.3.4), so the items are scanned line by line.
#[derive(Default)]
struct Subprotocol<'h> {
    /// The marker is in the list.
    offered: bool,
    /// The marker was the last item seen.
    after_marker: bool,
    /// The item after the first marker, once seen (`Some(None)` if empty).
    item: Option<Option<&'h str>>,
}

impl<'h> Subprotocol<'h> {
    fn scan(&mut self, line: &'h str) {
        for item in line.split(',').map(str::trim) {
            if self.item.is_some() {
                return;
            }
            if self.after_marker {
                self.item = Some(Some(item).filter(|t| !t.is_empty()));
            } else {
                self.after_marker = item == SUBPROTOCOL;
                self.offered |= self.after_marker;
            }
        }
    }

    fn token(&self) -> Option<&'h str> {
        self.item.flatten()
    }
}

/// The subprotocol marker Soniox's browser clients send before their key.
pub const SUBPROTOCOL: &str = "soniox-api-key";

/// Whether the request asks for a WebSocket version other than 13, the one
/// the relay speaks (RFC 6455 §4.4: answer with `Sec-WebSocket-Version: 13`).
pub fn wrong_websocket_version(req: &ClientRequest) -> bool {
    req.upgrade.version_13 == Some(false)
}

/// The 101 answer to a valid upgrade request (RFC 6455 §4.2), or `None` if
/// the request is not a valid WebSocket upgrade. No extension is ever
/// accepted, which is how permessage-deflate is refused.
pub fn upgrade_response(req: &ClientRequest) -> Option<Vec<u8>> {
    let up = &req.upgrade;
    let key = up.key.filter(|_| {
        req.get && up.http11 && up.connection_upgrade && up.websocket && up.version_13 == Some(true)
    })?;
    let accept = tungstenite::handshake::derive_accept_key(&key);
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    // Named whenever offered, not only when the token came in the list:
    // a client that offered subprotocols may fail a 101 naming none
    // (tungstenite and Node's `ws` do), and one it offered is always
    // one it takes (RFC 6455 §4.1).
    if up.offers_subprotocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(SUBPROTOCOL.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// A complete HTTP response with a body; `Connection: close`, and
/// `Cache-Control: no-store`: no cache keeps it. Every answer says
/// `X-Content-Type-Options: nosniff`: a browser reads it only as its
/// `Content-Type` says, never a JSON or text answer (whose strings a
/// request or upstream may shape) as HTML or script.
pub fn response(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    response_cached(status, content_type, "no-store", extra_headers, body)
}

/// [`response`] with `cache_control` as its `Cache-Control`.
pub fn response_cached(
    status: u16,
    content_type: &str,
    cache_control: &str,
    extra_headers: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: {cache_control}\r\nX-Content-Type-Options: nosniff\r\n{extra_headers}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A 304 answer: no body, and no `Content-Length` (a 304 may carry one
/// only if it is the 200's, RFC 9110 §15.4.5); `cache_control` is the
/// 200's `Cache-Control`, which a 304 repeats (§15.4.5).
pub fn not_modified(cache_control: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 304 Not Modified\r\nConnection: close\r\nCache-Control: {cache_control}\r\n{extra_headers}\r\n"
    )
    .into_bytes()
}

/// Whether an `If-None-Match` value names `etag` (a quoted entity tag):
/// `*`, or a list of tags compared weakly, so `W/"x"` names `"x"` (RFC 9110
/// §13.1.2).
pub fn none_match_finds(value: &str, etag: &str) -> bool {
    fn opaque(tag: &str) -> &str {
        let tag = tag.trim();
        tag.strip_prefix("W/").unwrap_or(tag)
    }
    value.trim() == "*" || value.split(',').any(|t| opaque(t) == opaque(etag))
}

/// The answer to a HEAD request: the GET answer's head, its
/// `Content-Length` included, and no body (RFC 9110 §9.3.2).
pub fn head_only(mut answer: Vec<u8>) -> Vec<u8> {
    if let Some(at) = memchr::memmem::find(&answer, b"\r\n\r\n") {
        answer.truncate(at + 4);
    }
    answer
}

/// The contract's pre-upgrade error: `{"error_code":N,"error_message":"..."}`.
/// A 401 carries the challenge every 401 must (RFC 9110 §15.5.2),
/// `WWW-Authenticate: Bearer` (RFC 6750 §3): without one, some HTTP
/// clients (Java's `HttpURLConnection`, on Android too) fail with "no
/// authentication challenges found" instead of reading the answer. For a
/// request whose token was refused, see [`invalid_token`].
pub fn json_error(status: u16, message: &str) -> Vec<u8> {
    let challenge = if status == 401 {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    json_error_with(status, message, challenge)
}

/// The 401 for a request that presented a bearer token and had it
/// refused: its challenge says so, `error="invalid_token"` (RFC 6750
/// §3.1). One that presented none gets [`json_error`]'s challenge alone,
/// with no error code (§3.1 again).
pub fn invalid_token(message: &str) -> Vec<u8> {
    json_error_with(
        401,
        message,
        "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n",
    )
}

fn json_error_with(status: u16, message: &str, extra_headers: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error_code": status, "error_message": message }).to_string();
    response(status, "application/json", extra_headers, body.as_bytes())
}

/// The standard reason phrase for the statuses the relay uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What an upstream answered to our upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum UpstreamAnswer {
    /// 101 with the right `Sec-WebSocket-Accept` and no extension.
    Upgraded,
    /// Any other status.
    Refused(u16),
    /// 101 with a wrong accept key or an extension we did not ask for.
    Invalid,
}

/// Checks an upstream's answer head against the key we sent.
pub fn check_upstream_answer(head: &[u8], sent_key: &str) -> Result<UpstreamAnswer, HeadError> {
    // Any number of headers that fits the answer's byte bound parses: a
    // fixed array of 48 took a 101 with more (a proxy's or a CDN's) for a
    // malformed answer, and upstream for unreachable.
    let mut headers = header_slots(head);
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadError::Malformed),
    }
    let code = resp.code.ok_or(HeadError::Malformed)?;
    if code != 101 {
        return Ok(UpstreamAnswer::Refused(code));
    }
    // RFC 6455 §4.1: a client fails the connection unless the 101 has
    // `Upgrade: websocket`, `Upgrade` in `Connection` and the accept key
    // of the key it sent, and names no extension or subprotocol it did
    // not ask for (the relay asks for none).
    let expected = tungstenite::handshake::derive_accept_key(sent_key.as_bytes());
    let (mut accept_ok, mut upgrade_ok, mut connection_ok) = (false, false, false);
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept_ok = h.value == expected.as_bytes();
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions")
            || name.eq_ignore_ascii_case("sec-websocket-protocol")
        {
            return Ok(UpstreamAnswer::Invalid);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ok = upgrade_is_websocket(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            connection_ok |= connection_names_upgrade(h.value);
        }
    }
    Ok(if accept_ok && upgrade_ok && connection_ok {
        UpstreamAnswer::Upgraded
    } else {
        UpstreamAnswer::Invalid
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str, target: &str) -> ClientRequest {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        parse_client_request(head.as_bytes()).unwrap()
    }

    #[test]
    fn finds_the_token_in_each_place() {
        let r = req("Authorization: Bearer abc.def\r\n", "/v1/transcribe");
        assert_eq!(r.token, Some(("abc.def".into(), TokenSource::Header)));
        let r = req(
            "Sec-WebSocket-Protocol: soniox-api-key, tok1\r\n",
            "/v1/transcribe",
        );
        assert_eq!(r.token, Some(("tok1".into(), TokenSource::Subprotocol)));
        let r = req("", "/v1/transcribe?x=1&token=tok2");
        assert_eq!(r.token, Some(("tok2".into(), TokenSource::Query)));
        assert_eq!(r.path, "/v1/transcribe");
        assert_eq!(req("", "/v1/transcribe").token, None);
        // An empty value is no token, wherever it is (found by fuzzing).
        assert_eq!(req("", "/v1/transcribe?token=").token, None);
        assert_eq!(
            req("Authorization: Bearer \r\n", "/v1/transcribe").token,
            None
        );
        let r = req("", "/v1/transcribe?token=&token=tok3");
        assert_eq!(r.token, Some(("tok3".into(), TokenSource::Query)));
        assert_eq!(req("Authorization: Basic zzz\r\n", "/").token, None);
    }

    #[test]
    fn a_subprotocol_list_may_span_lines() {
        let on = |lines: &str| req(lines, "/v1/transcribe").token;
        let sub = |t: &str| Some((t.to_string(), TokenSource::Subprotocol));
        assert_eq!(
            on("Sec-WebSocket-Protocol: soniox-api-key\r\nSec-WebSocket-Protocol: tok5\r\n"),
            sub("tok5")
        );
        assert_eq!(
            on("Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: soniox-api-key, tok6, x\r\n"),
            sub("tok6")
        );
        // The item after the first marker is the token, or there is none.
        assert_eq!(
            on("Sec-WebSocket-Protocol: soniox-api-key,\r\nSec-WebSocket-Protocol: tok7\r\n"),
            None
        );
        assert_eq!(on("Sec-WebSocket-Protocol: soniox-api-key\r\n"), None);
        // The header's token comes first, wherever the lines are.
        assert_eq!(
            on("Sec-WebSocket-Protocol: soniox-api-key, tok8\r\nAuthorization: Bearer tok9\r\n"),
            Some(("tok9".into(), TokenSource::Header))
        );
    }

    #[test]
    fn if_none_match_compares_weakly_in_a_list() {
        let tag = "\"ab12\"";
        for v in ["\"ab12\"", "W/\"ab12\"", " \"x\" ,W/\"ab12\"", "*"] {
            assert!(none_match_finds(v, tag), "{v}");
        }
        for v in ["\"ab1\"", "ab12", "\"x\", \"y\"", ""] {
            assert!(!none_match_finds(v, tag), "{v}");
        }
        let answer = String::from_utf8(not_modified("no-cache", "ETag: \"ab12\"\r\n")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 304 ") && answer.ends_with("\r\n\r\n"));
        assert!(!answer.to_ascii_lowercase().contains("content-length"));
    }

    #[test]
    fn a_query_token_is_percent_decoded() {
        let r = req("", "/v1/transcribe?token=ab%2Ecd%2dE");
        assert_eq!(r.token, Some(("ab.cd-E".into(), TokenSource::Query)));
    }

    #[test]
    fn an_absolute_form_target_names_its_path() {
        // RFC 9112 §3.2.2: a server must accept the absolute form too.
        let r = req("", "http://relay.example/v1/transcribe?token=tok4");
        assert_eq!(r.path, "/v1/transcribe");
        assert_eq!(r.token, Some(("tok4".into(), TokenSource::Query)));
        assert_eq!(req("", "wss://relay.example:443/healthz").path, "/healthz");
        assert_eq!(req("", "http://relay.example").path, "/");
        // Only the origin form's path is taken as it is written.
        assert_eq!(req("", "/v1/transcribe").path, "/v1/transcribe");
        assert_eq!(req("", "*").path, "*");
    }

    #[test]
    fn upgrade_answer_echoes_subprotocol_and_refuses_deflate() {
        let r = req(
            "Sec-WebSocket-Protocol: soniox-api-key, tok1\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
            "/v1/transcribe",
        );
        let text = String::from_utf8(upgrade_response(&r).unwrap()).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"));
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
        assert!(text.contains("Sec-WebSocket-Protocol: soniox-api-key\r\n"));
        assert!(!text.contains("tok1"), "the token is never echoed");
        assert!(!text.to_ascii_lowercase().contains("extensions"));
        let bad = parse_client_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(upgrade_response(&bad).is_none());
    }

    #[test]
    fn answers_only_valid_upgrades() {
        let upgrade = |version: &str, extra: &str| {
            format!("GET /v1/transcribe {version}\r\nHost: x\r\n{extra}\r\n")
        };
        let ok = format!("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n");
        let with = |from: &str, to: &str| upgrade("HTTP/1.1", &ok.replace(from, to));
        let cases = [
            (upgrade("HTTP/1.1", &ok), true),
            (upgrade("HTTP/1.0", &ok), false),
            (
                with("Connection: Upgrade", "Connection: keep-alive, UPGRADE"),
                true,
            ),
            (with("Connection: Upgrade", "Connection: keep-alive"), false),
            // Connection lines are one list (RFC 9110 §5.3), as
            // `close, Upgrade` on one line would be.
            (
                upgrade("HTTP/1.1", &format!("Connection: close\r\n{ok}")),
                true,
            ),
            (
                with("Connection: Upgrade", "Connection: close\r\nConnection: x"),
                false,
            ),
            // Upgrade counts by its first line, as a header map gives it.
            (upgrade("HTTP/1.1", &format!("Upgrade: h2c\r\n{ok}")), false),
            (with("Upgrade: websocket", "Upgrade: WebSocket"), true),
            (with("Upgrade: websocket", "Upgrade: h2c"), false),
            (
                with("Upgrade: websocket", "Upgrade: websocket\u{e9}"),
                false,
            ),
            (with("Version: 13", "Version: 12"), false),
            (
                upgrade("HTTP/1.1", &format!("{ok}Sec-WebSocket-Version: 8\r\n")),
                true,
            ),
            (with(KEY, "dGhlIHNhbXBsZSBub25jZQ"), false),
            (with(KEY, "dGhlIHNhbXBsZSBub25jZR=="), false),
            (with(KEY, "AAAAAAAAAAAAAAAAAAAAAAAA"), false),
            (with("Sec-WebSocket-Key", "X-Key"), false),
            (format!("POST /v1/transcribe HTTP/1.1\r\n{ok}\r\n"), false),
        ];
        for (head, upgrades) in &cases {
            let answer = upgrade_response(&parse_client_request(head.as_bytes()).unwrap());
            assert_eq!(answer.is_some(), *upgrades, "{head:?}");
        }
        let text = upgrade_response(&parse_client_request(cases[0].0.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let wrong = parse_client_request(with("Version: 13", "Version: 12").as_bytes()).unwrap();
        assert!(wrong_websocket_version(&wrong));
    }

    #[test]
    fn checks_upstream_answers() {
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            tungstenite::handshake::derive_accept_key(KEY.as_bytes())
        );
        assert_eq!(
            check_upstream_answer(ok.as_bytes(), KEY).unwrap(),
            UpstreamAnswer::Upgraded
        );
        assert_eq!(
            check_upstream_answer(ok.as_bytes(), "other").unwrap(),
            UpstreamAnswer::Invalid
        );
        // What a WebSocket client must refuse (RFC 6455 §4.1).
        for (from, to) in [
            ("Upgrade: websocket\r\n", ""),
            ("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"),
            ("Connection: Upgrade\r\n", ""),
            ("Connection: Upgrade\r\n", "Connection: keep-alive\r\n"),
            ("\r\n\r\n", "\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
            (
                "\r\n\r\n",
                "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            ),
        ] {
            let bad = ok.replacen(from, to, 1);
            assert_eq!(
                check_upstream_answer(bad.as_bytes(), KEY).unwrap(),
                UpstreamAnswer::Invalid,
                "{bad}"
            );
        }
        let fine = ok.replace("Connection: Upgrade", "connection: keep-alive, upgrade");
        assert_eq!(
            check_upstream_answer(fine.as_bytes(), KEY).unwrap(),
            UpstreamAnswer::Upgraded
        );
        let refused = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_upstream_answer(refused, KEY).unwrap(),
            UpstreamAnswer::Refused(401)
        );
        assert!(find_head_end(b"abc\r\n\r\nrest", 0) == Some(7));
        // A bare LF may end any line (RFC 9112 §2.2), the empty one too.
        assert_eq!(find_head_end(b"abc\n\nrest", 0), Some(5));
        assert_eq!(find_head_end(b"abc\r\n\nrest", 0), Some(6));
        assert_eq!(find_head_end(b"abc\n\r\nrest", 0), Some(6));
        assert_eq!(find_head_end(b"abc\r\nd\r\n\r", 0), None);
        assert_eq!(find_head_end(b"abc\r\nd\r\n\r\n", 3), Some(10));
    }
}
