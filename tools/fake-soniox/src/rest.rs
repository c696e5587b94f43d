//! Soniox's REST API on the WebSocket port (see the module docs for the
//! endpoints): request heads, bodies, routing and the JSON answers.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde_json::{json, Value};

use super::{error_type, refusal_message, RestCall, Shared, State, TempKey, MODELS};

/// Largest request head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Largest request body accepted.
const MAX_BODY: usize = 64 << 10;
/// Most headers in a request head.
const MAX_HEADERS: usize = 64;
/// An idle keep-alive connection is closed after this long.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    method: String,
    path: String,
    query: String,
    /// HTTP/1.x minor version.
    minor: u8,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included.
    len: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Upgrade: websocket`: the request goes to the WebSocket handshake.
    pub(crate) fn is_websocket_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    fn keep_alive(&self) -> bool {
        self.minor >= 1 && !self.has_token("connection", "close")
    }

    fn bearer(&self) -> Option<String> {
        let (scheme, rest) = self.header("authorization")?.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_owned())
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Reads until `buf` holds a complete request head and parses it. `Ok(None)`:
/// the peer closed before sending a byte. `InvalidData`: not HTTP/1.x.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Head>> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                return Ok(Some(head));
            }
            if buf.len() > MAX_HEAD {
                return Err(invalid("request head too large"));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("bad request head: {e}"))),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Head {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        minor: req.version.unwrap_or(1),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        len,
    }))
}

/// Serves REST requests on one connection, starting with `head` (whose
/// bytes, and maybe more, are in `buf`), until the client closes, asks for
/// `Connection: close`, or is idle for [`KEEP_ALIVE`].
pub(crate) async fn serve<S>(mut stream: S, mut buf: Vec<u8>, mut head: Head, shared: &Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        // A body that cannot be read ends the connection after the answer.
        let (status, body, used) = match read_body(&mut stream, &mut buf, &head).await {
            Ok(Ok(body_len)) => {
                let body = &buf[head.len..head.len + body_len];
                let (status, json) = answer(shared, &head, body);
                (status, json, Some(head.len + body_len))
            }
            Ok(Err(status)) => {
                let json = error_body(shared, status, refusal_or(status));
                record(shared, &head, status);
                (status, json, None)
            }
            Err(_) => return,
        };
        let keep = head.keep_alive() && used.is_some();
        if write_response(&mut stream, status, &body, keep)
            .await
            .is_err()
        {
            return;
        }
        let Some(used) = used.filter(|_| keep) else {
            break;
        };
        buf.drain(..used);
        let next = future::or(
            async { Some(read_head(&mut stream, &mut buf).await) },
            async {
                glommio::timer::sleep(KEEP_ALIVE).await;
                None
            },
        )
        .await;
        head = match next {
            Some(Ok(Some(h))) => h,
            _ => break,
        };
    }
    let _ = stream.close().await;
}

/// Answers a request head that is not HTTP at all with 400, then closes.
pub(crate) async fn bad_request<S>(mut stream: S, shared: &Shared, message: &str)
where
    S: AsyncWrite + Unpin,
{
    let body = error_body(shared, 400, message);
    let _ = write_response(&mut stream, 400, &body, false).await;
    let _ = stream.close().await;
}

fn refusal_or(status: u16) -> &'static str {
    match status {
        411 => "Content-Length required.",
        413 => "Request body too large.",
        _ => refusal_message(status),
    }
}

/// Reads the body after `head` into `buf`; `Ok(Err(status))` if it cannot
/// be read (chunked: 411, too large: 413).
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &Head,
) -> io::Result<Result<usize, u16>> {
    if head.header("transfer-encoding").is_some() {
        return Ok(Err(411));
    }
    let len = match head.header("content-length") {
        None => 0,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => return Ok(Err(400)),
        },
    };
    if len > MAX_BODY {
        return Ok(Err(413));
    }
    while buf.len() < head.len + len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Ok(len))
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    body: &Value,
    keep: bool,
) -> io::Result<()> {
    let body = body.to_string();
    let reason = tungstenite::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let connection = if keep { "keep-alive" } else { "close" };
    let out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

/// Soniox's REST error body.
fn error_body(shared: &Shared, status: u16, message: &str) -> Value {
    json!({
        "status_code": status,
        "error_type": error_type(status),
        "message": message,
        "request_id": shared.request_id(),
    })
}

fn record(shared: &Shared, head: &Head, status: u16) {
    shared.lock().rest_calls.push(RestCall {
        method: head.method.clone(),
        path: head.path.clone(),
        query: head.query.clone(),
        key: head.bearer(),
        status,
    });
}

/// The endpoints: path and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Models,
    ConcurrencyLimits,
    UsageLogs,
    UsageSummary,
    TemporaryKey,
}

fn route(path: &str) -> Option<(Endpoint, &'static str)> {
    Some(match path {
        "/v1/models" => (Endpoint::Models, "GET"),
        "/v1/concurrency-limits" => (Endpoint::ConcurrencyLimits, "GET"),
        "/v1/usage-logs" => (Endpoint::UsageLogs, "GET"),
        "/v1/usage/summary" => (Endpoint::UsageSummary, "GET"),
        "/v1/auth/temporary-api-key" => (Endpoint::TemporaryKey, "POST"),
        _ => return None,
    })
}

/// Status and JSON body for one request; records the call.
fn answer(shared: &Shared, head: &Head, body: &[u8]) -> (u16, Value) {
    let (status, json) = match handle(shared, head, body) {
        Ok(json) => (200, json),
        Err((status, message)) => (status, error_body(shared, status, &message)),
    };
    record(shared, head, status);
    (status, json)
}

type Answer = Result<Value, (u16, String)>;

fn fail(status: u16, message: &str) -> Answer {
    Err((status, message.to_owned()))
}

fn handle(shared: &Shared, head: &Head, body: &[u8]) -> Answer {
    let st = shared.lock();
    if let Some(status) = st.rest_status {
        return fail(status, refusal_message(status));
    }
    let Some((endpoint, method)) = route(&head.path) else {
        return fail(404, "Not found.");
    };
    if head.method != method {
        return fail(405, "Method not allowed.");
    }
    let Some(key) = head.bearer() else {
        return fail(401, "Invalid API key.");
    };
    let Some(k) = st.keys.iter().find(|k| k.key == key) else {
        return fail(401, "Invalid API key.");
    };
    if let Some(code) = k.reject {
        return fail(code, refusal_message(code));
    }
    match endpoint {
        Endpoint::Models => Ok(models()),
        Endpoint::ConcurrencyLimits => Ok(concurrency(&st, &key)),
        Endpoint::UsageLogs => usage_logs(&st, &key, &head.query),
        Endpoint::UsageSummary => {
            let (ms, n) =
                finished(&st, &key).fold((0u64, 0u64), |(ms, n), r| (ms + r.audio_ms, n + 1));
            Ok(json!({"audio_duration_ms": ms, "sessions": n}))
        }
        Endpoint::TemporaryKey => {
            drop(st);
            temporary_key(shared, &key, body)
        }
    }
}

fn models() -> Value {
    let languages = json!([
        {"code": "en", "name": "English"},
        {"code": "de", "name": "German"},
        {"code": "fr", "name": "French"},
        {"code": "es", "name": "Spanish"},
    ]);
    let models: Vec<Value> = MODELS
        .iter()
        .map(|id| {
            json!({
                "id": id,
                "name": format!("Speech-to-Text Real-time {}", id.trim_start_matches("stt-rt-")),
                "transcription_mode": "real_time",
                "languages": languages,
            })
        })
        .collect();
    json!({ "models": models })
}

fn concurrency(st: &State, key: &str) -> Value {
    let shape = |current: u64, limit: u64| {
        json!({
            "current": {"transcribe_concurrent": current},
            "limits": {"transcribe_concurrent": limit},
        })
    };
    let own_live = st.live.get(key).copied().unwrap_or(0);
    let own_limit = st
        .keys
        .iter()
        .find(|k| k.key == key)
        .map_or(0, |k| k.max_concurrent);
    let org_live: u64 = st.live.values().map(|&n| u64::from(n)).sum();
    let org_limit: u64 = st.keys.iter().map(|k| u64::from(k.max_concurrent)).sum();
    json!({
        "project": shape(u64::from(own_live), u64::from(own_limit)),
        "organization": shape(org_live, org_limit),
    })
}

/// The finished sessions of configured key `key` (its temporary keys'
/// included), oldest first.
fn finished<'a>(st: &'a State, key: &'a str) -> impl Iterator<Item = &'a super::SessionRecord> {
    st.sessions.iter().filter(move |r| {
        r.closed
            && r.http_status.is_none()
            && r.key.as_deref().and_then(|k| st.owner(k)) == Some(key)
    })
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn usage_logs(st: &State, key: &str, query: &str) -> Answer {
    let limit = match query_param(query, "limit") {
        None => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return fail(400, "Invalid limit: must be 1..1000."),
        },
    };
    let after = match query_param(query, "cursor") {
        None | Some("") => 0,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return fail(400, "Invalid cursor."),
        },
    };
    let mut rest = finished(st, key).filter(|r| r.id > after);
    let page: Vec<_> = rest.by_ref().take(limit).collect();
    let next = match (rest.next(), page.last()) {
        (Some(_), Some(last)) => Value::from(last.id.to_string()),
        _ => Value::Null,
    };
    let logs: Vec<Value> = page
        .iter()
        .map(|r| {
            let config = r.config.as_ref();
            let reference = config
                .and_then(|c| c.get("client_reference_id"))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .or_else(|| {
                    let k = r.key.as_deref()?;
                    st.temp_keys.get(k)?.client_reference_id.clone()
                });
            let model = config.and_then(|c| c.get("model")).cloned();
            json!({
                "id": format!("usage-{}", r.id),
                "client_reference_id": reference,
                "model": model,
                "audio_duration_ms": r.audio_ms,
                "created_at": rfc3339(r.created_at.unwrap_or(SystemTime::UNIX_EPOCH)),
                "status": if r.error_sent.is_some() { "error" } else { "completed" },
            })
        })
        .collect();
    Ok(json!({"logs": logs, "next_page_cursor": next}))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn temporary_key(shared: &Shared, parent: &str, body: &[u8]) -> Answer {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return fail(400, "Request body must be a JSON object.");
    };
    if req.get("usage_type").and_then(Value::as_str) != Some("transcribe_websocket") {
        return fail(400, "usage_type must be \"transcribe_websocket\".");
    }
    let secs = match req.get("expires_in_seconds").and_then(Value::as_u64) {
        Some(n) if (1..=3600).contains(&n) => n,
        _ => return fail(400, "expires_in_seconds must be 1..3600."),
    };
    let reference = match req.get("client_reference_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 256 => Some(s.clone()),
        Some(_) => {
            return fail(
                400,
                "client_reference_id must be a string of at most 256 characters.",
            )
        }
    };
    let single_use = match req.get("single_use") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return fail(400, "single_use must be a boolean."),
    };
    let mut random = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        return fail(500, "Internal error.");
    }
    let api_key = format!("temp:{}", super::transcript::hex16(&random));
    let ttl = Duration::from_secs(secs);
    shared.lock().temp_keys.insert(
        api_key.clone(),
        TempKey {
            parent: parent.to_owned(),
            expires: Instant::now() + ttl,
            single_use,
            used: false,
            client_reference_id: reference,
        },
    );
    Ok(json!({
        "api_key": api_key,
        "expires_at": rfc3339(SystemTime::now() + ttl),
    }))
}
