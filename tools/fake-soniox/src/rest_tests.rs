//! The REST API over real sockets, with a tiny blocking HTTP/1.1 client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::tests::{
    bearer, connect, read_to_close, refused, send_audio, send_text, start, test_tls, tls_connect,
    wait_for, CONFIG, KEY, READ_TIMEOUT,
};
use super::*;

/// 100 ms of 16 kHz s16le mono.
const FRAME_100MS: usize = 3200;

/// One request with `Connection: close`; returns the status and JSON body.
fn http_on<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if let Some(key) = key {
        req.push_str(&format!("authorization: Bearer {key}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes()).unwrap();
    stream.flush().unwrap();
    let raw = read_all(&mut stream);
    parse_response(&raw).0
}

/// Reads until EOF (or an error after some data, e.g. a TLS peer that
/// closes without close_notify).
fn read_all<S: Read>(stream: &mut S) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return raw,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if !raw.is_empty() && e.kind() != std::io::ErrorKind::WouldBlock => return raw,
            Err(e) => panic!("reading the response: {e}"),
        }
    }
}

/// Parses one response (status and JSON body) off the front of `raw`;
/// returns it and the rest.
fn parse_response(raw: &[u8]) -> ((u16, Value), &[u8]) {
    let text_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = std::str::from_utf8(&raw[..text_end]).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let body = &raw[text_end + 4..text_end + 4 + len];
    let json = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!("JSON body: {e}: {}", String::from_utf8_lossy(body));
    });
    ((status, json), &raw[text_end + 4 + len..])
}

fn tcp(fake: &FakeSoniox) -> TcpStream {
    let s = TcpStream::connect(fake.addr()).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

fn get(fake: &FakeSoniox, path: &str, key: Option<&str>) -> (u16, Value) {
    http_on(tcp(fake), "GET", path, key, None)
}

fn post(fake: &FakeSoniox, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    http_on(tcp(fake), "POST", path, key, Some(body))
}

fn assert_error(resp: &(u16, Value), status: u16) {
    let (code, body) = resp;
    assert_eq!(*code, status, "{body}");
    assert_eq!(body["status_code"], status, "{body}");
    assert_eq!(body["error_type"], error_type(status), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()));
}

const ENDPOINTS: [(&str, &str); 5] = [
    ("GET", "/v1/models"),
    ("GET", "/v1/concurrency-limits"),
    ("GET", "/v1/usage-logs"),
    ("GET", "/v1/usage/summary"),
    ("POST", "/v1/auth/temporary-api-key"),
];

const TEMP_BODY: &str = r#"{"usage_type":"transcribe_websocket","expires_in_seconds":60}"#;

fn call(fake: &FakeSoniox, method: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    if method == "POST" {
        post(fake, path, key, TEMP_BODY)
    } else {
        get(fake, path, key)
    }
}

fn two_keys() -> FakeConfig {
    FakeConfig {
        keys: vec![FakeKey::new(KEY, 10), FakeKey::new("fake-key-2", 5)],
        ..FakeConfig::default()
    }
}

/// Streams `frames` × 100 ms of audio with `config`, ends it and waits
/// until the session is closed.
fn stream_session(fake: &FakeSoniox, key: &str, config: &str, frames: usize) {
    let auth = format!("Bearer {key}");
    let mut ws = connect(fake, &[("authorization", &auth)]).unwrap();
    send_text(&mut ws, config);
    for _ in 0..frames {
        send_audio(&mut ws, &[0; FRAME_100MS]);
    }
    send_audio(&mut ws, &[]);
    let (msgs, code) = read_to_close(&mut ws);
    assert_eq!(code, 1000);
    assert_eq!(msgs.last().unwrap()["finished"], true);
    wait_for(fake, "all sessions closed", |s| s.iter().all(|r| r.closed));
}

#[test]
fn rest_models_lists_the_known_models() {
    let fake = start(FakeConfig::default());
    assert!(fake.rest_url().starts_with("http://127.0.0.1:"));
    assert!(fake.rest_url().ends_with("/v1"));
    let (status, body) = get(&fake, "/v1/models", Some(KEY));
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, MODELS.to_vec());
    assert_eq!(body["models"][1]["transcription_mode"], "real_time");
    assert_eq!(
        fake.rest_calls(),
        vec![RestCall {
            method: "GET".into(),
            path: "/v1/models".into(),
            query: String::new(),
            key: Some(KEY.into()),
            status: 200,
        }]
    );
    assert!(fake.sessions().is_empty(), "REST calls are not sessions");
}

#[test]
fn rest_missing_or_unknown_key_is_401() {
    let fake = start(FakeConfig::default());
    for (method, path) in ENDPOINTS {
        for key in [None, Some("nope")] {
            let resp = call(&fake, method, path, key);
            assert_error(&resp, 401);
            assert_eq!(resp.1["error_type"], "unauthenticated");
            assert_eq!(resp.1["message"], "Invalid API key.");
        }
    }
    let calls = fake.rest_calls();
    assert_eq!(calls.len(), 10);
    assert!(calls.iter().all(|c| c.status == 401));
    assert_eq!(calls[1].key.as_deref(), Some("nope"));
    assert_eq!(calls[0].key, None);
}

#[test]
fn rest_rejected_key_is_402_everywhere() {
    let mut cfg = FakeConfig::default();
    cfg.keys.push(FakeKey {
        reject: Some(402),
        ..FakeKey::new("broke", 10)
    });
    let fake = start(cfg);
    for (method, path) in ENDPOINTS {
        assert_error(&call(&fake, method, path, Some("broke")), 402);
        assert_eq!(call(&fake, method, path, Some(KEY)).0, 200, "{path}");
    }
}

#[test]
fn rest_unknown_path_is_404_and_wrong_method_405() {
    let fake = start(FakeConfig::default());
    assert_error(&get(&fake, "/v1/nothing", Some(KEY)), 404);
    assert_error(&get(&fake, "/", None), 404);
    assert_error(&post(&fake, "/v1/models", Some(KEY), "{}"), 405);
    assert_error(&get(&fake, "/v1/auth/temporary-api-key", Some(KEY)), 405);
    let statuses: Vec<u16> = fake.rest_calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![404, 404, 405, 405]);
}

#[test]
fn rest_concurrency_limits_count_live_sessions() {
    let fake = start(two_keys());
    let limits = |key| {
        let (status, body) = get(&fake, "/v1/concurrency-limits", Some(key));
        assert_eq!(status, 200, "{body}");
        body
    };
    let shape = |current: u64, limit: u64| json!({"current":{"transcribe_concurrent":current},"limits":{"transcribe_concurrent":limit}});
    let body = limits(KEY);
    assert_eq!(body["project"], shape(0, 10));
    assert_eq!(body["organization"], shape(0, 15));

    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    wait_for(&fake, "config seen", |s| {
        s.len() == 1 && s[0].config.is_some()
    });
    let body = limits(KEY);
    assert_eq!(body["project"], shape(1, 10));
    assert_eq!(body["organization"], shape(1, 15));
    let body = limits("fake-key-2");
    assert_eq!(body["project"], shape(0, 5));
    assert_eq!(body["organization"], shape(1, 15));

    send_audio(&mut ws, &[]);
    read_to_close(&mut ws);
    wait_for(&fake, "closed", |s| s[0].closed);
    assert_eq!(limits(KEY)["project"], shape(0, 10));
}

#[test]
fn rest_usage_logs_list_finished_sessions() {
    let fake = start(two_keys());
    let with_ref = r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1,"client_reference_id":"ref-42"}"#;
    let before = std::time::SystemTime::now() - Duration::from_secs(1);
    // 20 frames × 100 ms of 16 kHz s16le mono.
    stream_session(&fake, KEY, with_ref, 20);
    // An error session (bad model) of the same key, and one of another key.
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(
        &mut ws,
        r#"{"model":"nope","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1}"#,
    );
    read_to_close(&mut ws);
    stream_session(&fake, "fake-key-2", CONFIG, 3);
    // A refused upgrade is no usage.
    assert_eq!(refused(&fake, &[("authorization", "Bearer nope")]).0, 401);
    wait_for(&fake, "all closed", |s| {
        s.len() == 4 && s.iter().all(|r| r.closed)
    });

    let (status, body) = get(&fake, "/v1/usage-logs", Some(KEY));
    assert_eq!(status, 200, "{body}");
    let logs = body["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 2, "{body}");
    assert_eq!(body["next_page_cursor"], Value::Null);
    let first = &logs[0];
    assert_eq!(first["client_reference_id"], "ref-42");
    assert_eq!(first["audio_duration_ms"], 2000);
    assert_eq!(first["model"], "stt-rt-v4");
    assert_eq!(first["status"], "completed");
    assert!(first["id"].as_str().is_some_and(|i| !i.is_empty()));
    let created = humantime::parse_rfc3339(first["created_at"].as_str().unwrap()).unwrap();
    assert!(created >= before && created <= std::time::SystemTime::now());
    let second = &logs[1];
    assert_eq!(second["status"], "error");
    assert_eq!(second["client_reference_id"], Value::Null);
    assert_eq!(second["audio_duration_ms"], 0);

    let (_, other) = get(&fake, "/v1/usage-logs", Some("fake-key-2"));
    assert_eq!(other["logs"].as_array().unwrap().len(), 1);
    assert_eq!(other["logs"][0]["audio_duration_ms"], 300);

    let (status, summary) = get(&fake, "/v1/usage/summary", Some(KEY));
    assert_eq!(status, 200);
    assert_eq!(summary, json!({"audio_duration_ms": 2000, "sessions": 2}));

    // Pages.
    let (_, page1) = get(&fake, "/v1/usage-logs?limit=1", Some(KEY));
    assert_eq!(page1["logs"].as_array().unwrap().len(), 1);
    assert_eq!(page1["logs"][0]["client_reference_id"], "ref-42");
    let cursor = page1["next_page_cursor"]
        .as_str()
        .expect("a cursor")
        .to_owned();
    let (_, page2) = get(
        &fake,
        &format!("/v1/usage-logs?limit=1&cursor={cursor}"),
        Some(KEY),
    );
    assert_eq!(page2["logs"].as_array().unwrap().len(), 1);
    assert_eq!(page2["logs"][0]["status"], "error");
    assert_eq!(page2["next_page_cursor"], Value::Null);
    assert_error(&get(&fake, "/v1/usage-logs?limit=0", Some(KEY)), 400);
    assert_error(&get(&fake, "/v1/usage-logs?cursor=zz", Some(KEY)), 400);
    let last = fake.rest_calls().pop().unwrap();
    assert_eq!(
        (last.path.as_str(), last.query.as_str()),
        ("/v1/usage-logs", "cursor=zz")
    );
}

#[test]
fn set_key_reject_flips_a_key_and_back() {
    let fake = start(FakeConfig::default());
    assert_eq!(get(&fake, "/v1/models", Some(KEY)).0, 200);
    fake.set_key_reject(KEY, Some(402));
    assert_error(&get(&fake, "/v1/models", Some(KEY)), 402);
    assert_eq!(refused(&fake, &[bearer()]).0, 402, "WebSocket too");
    fake.set_key_reject(KEY, Some(401));
    assert_error(&get(&fake, "/v1/concurrency-limits", Some(KEY)), 401);
    fake.set_key_reject(KEY, None);
    assert_eq!(get(&fake, "/v1/models", Some(KEY)).0, 200);
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[]);
    assert_eq!(read_to_close(&mut ws).1, 1000);
    fake.set_key_reject("unknown", Some(402)); // ignored
}

#[test]
fn rest_status_fault_answers_every_call() {
    let fake = start(FakeConfig {
        faults: Faults {
            rest_status: Some(500),
            ..Faults::default()
        },
        ..FakeConfig::default()
    });
    assert_error(&get(&fake, "/v1/models", Some(KEY)), 500);
    fake.set_rest_status(Some(503));
    for (method, path) in ENDPOINTS {
        assert_error(&call(&fake, method, path, Some(KEY)), 503);
    }
    assert_error(&get(&fake, "/v1/models", None), 503);
    // The WebSocket side is not affected.
    let mut ws = connect(&fake, &[bearer()]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[]);
    assert_eq!(read_to_close(&mut ws).1, 1000);
    fake.set_rest_status(None);
    assert_eq!(get(&fake, "/v1/models", Some(KEY)).0, 200);
    assert_eq!(fake.rest_calls().len(), 8);
}

#[test]
fn rest_over_tls() {
    let (server, client) = test_tls();
    let fake = start(FakeConfig {
        tls: Some(server),
        ..FakeConfig::default()
    });
    assert!(fake.rest_url().starts_with("https://localhost:"));
    let (status, body) = http_on(
        tls_connect(&fake, client.clone()),
        "GET",
        "/v1/models",
        Some(KEY),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["models"].is_array());
    let resp = http_on(
        tls_connect(&fake, client),
        "GET",
        "/v1/usage/summary",
        None,
        None,
    );
    assert_error(&resp, 401);
}

#[test]
fn rest_keep_alive_serves_several_requests() {
    let fake = start(FakeConfig::default());
    let mut s = tcp(&fake);
    let req = "GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer fake-key-1\r\n\r\n\
               GET /v1/usage/summary HTTP/1.1\r\nhost: x\r\nauthorization: Bearer fake-key-1\r\nconnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let raw = read_all(&mut s);
    let ((status1, body1), rest) = parse_response(&raw);
    assert_eq!(status1, 200);
    assert!(body1["models"].is_array());
    let ((status2, body2), rest) = parse_response(rest);
    assert_eq!(status2, 200);
    assert_eq!(body2["sessions"], 0);
    assert!(rest.is_empty());
}

#[test]
fn garbage_request_is_400() {
    let fake = start(FakeConfig::default());
    let mut s = tcp(&fake);
    s.write_all(b"\x01\x02 not http\r\n\r\n").unwrap();
    let raw = read_all(&mut s);
    assert_error(&parse_response(&raw).0, 400);
}

#[test]
fn temporary_key_opens_sessions_under_its_parent() {
    let fake = start(two_keys());
    let body = r#"{"usage_type":"transcribe_websocket","expires_in_seconds":60,"client_reference_id":"temp-ref"}"#;
    let (status, resp) = post(
        &fake,
        "/v1/auth/temporary-api-key",
        Some("fake-key-2"),
        body,
    );
    assert_eq!(status, 200, "{resp}");
    let temp = resp["api_key"].as_str().unwrap().to_owned();
    assert!(temp.starts_with("temp:"));
    let expires = humantime::parse_rfc3339(resp["expires_at"].as_str().unwrap()).unwrap();
    let ttl = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(ttl > Duration::from_secs(50) && ttl <= Duration::from_secs(60));

    // Not a REST key.
    assert_error(&get(&fake, "/v1/models", Some(&temp)), 401);

    // A live session counts under the parent.
    let auth = format!("Bearer {temp}");
    let mut ws = connect(&fake, &[("authorization", &auth)]).unwrap();
    send_text(&mut ws, CONFIG);
    wait_for(&fake, "config seen", |s| {
        s.len() == 1 && s[0].config.is_some()
    });
    let (_, limits) = get(&fake, "/v1/concurrency-limits", Some("fake-key-2"));
    assert_eq!(limits["project"]["current"]["transcribe_concurrent"], 1);
    for _ in 0..5 {
        send_audio(&mut ws, &[0; FRAME_100MS]);
    }
    send_audio(&mut ws, &[]);
    read_to_close(&mut ws);
    wait_for(&fake, "closed", |s| s[0].closed);
    assert_eq!(fake.sessions()[0].key.as_deref(), Some(temp.as_str()));

    // Logged under the parent, with the temporary key's reference.
    let (_, logs) = get(&fake, "/v1/usage-logs", Some("fake-key-2"));
    assert_eq!(logs["logs"].as_array().unwrap().len(), 1, "{logs}");
    assert_eq!(logs["logs"][0]["client_reference_id"], "temp-ref");
    assert_eq!(logs["logs"][0]["audio_duration_ms"], 500);
    let (_, logs) = get(&fake, "/v1/usage-logs", Some(KEY));
    assert!(logs["logs"].as_array().unwrap().is_empty());

    // The parent going bad takes its temporary keys along.
    fake.set_key_reject("fake-key-2", Some(402));
    assert_eq!(refused(&fake, &[("authorization", &auth)]).0, 402);
    fake.set_key_reject("fake-key-2", None);

    // Single use.
    let single =
        r#"{"usage_type":"transcribe_websocket","expires_in_seconds":60,"single_use":true}"#;
    let (_, resp) = post(&fake, "/v1/auth/temporary-api-key", Some(KEY), single);
    let auth = format!("Bearer {}", resp["api_key"].as_str().unwrap());
    let mut ws = connect(&fake, &[("authorization", &auth)]).unwrap();
    send_text(&mut ws, CONFIG);
    send_audio(&mut ws, &[]);
    read_to_close(&mut ws);
    assert_eq!(refused(&fake, &[("authorization", &auth)]).0, 401);

    // Bad requests.
    for bad in [
        "not json",
        r#"{"usage_type":"transcribe_async","expires_in_seconds":60}"#,
        r#"{"usage_type":"transcribe_websocket","expires_in_seconds":0}"#,
        r#"{"usage_type":"transcribe_websocket","expires_in_seconds":3601}"#,
        r#"{"usage_type":"transcribe_websocket"}"#,
    ] {
        assert_error(
            &post(&fake, "/v1/auth/temporary-api-key", Some(KEY), bad),
            400,
        );
    }
}

#[test]
fn temporary_key_expires() {
    let fake = start(FakeConfig::default());
    let body = r#"{"usage_type":"transcribe_websocket","expires_in_seconds":1}"#;
    let (status, resp) = post(&fake, "/v1/auth/temporary-api-key", Some(KEY), body);
    assert_eq!(status, 200);
    let auth = format!("Bearer {}", resp["api_key"].as_str().unwrap());
    std::thread::sleep(Duration::from_millis(1100));
    let (status, err) = refused(&fake, &[("authorization", &auth)]);
    assert_eq!(status, 401);
    assert_eq!(err["error_type"], "unauthenticated");
}
