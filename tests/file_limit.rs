//! A relay at its file-descriptor limit: the real `clio-relay` binary, run
//! with a small `RLIMIT_NOFILE`, filled with real streams until it has no
//! descriptor left. It must say so (503 "file limit", counted as its own,
//! logged once per interval), keep its admin port answering, and recover
//! once streams end.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clio_relay::control::httpc::{blocking, Endpoint, Request};
use clio_relay::core::config::TokensConfig;
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
use tungstenite::Message;

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

/// The relay as a child process, and every line of its log.
struct Relay {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    client: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

/// Starts `clio-relay run` against `upstream` with an open-file limit of `nofile`.
fn start_relay(upstream: &str, nofile: u64, dir: &std::path::Path) -> Relay {
    start_relay_shards(upstream, nofile, 1, dir)
}

/// [`start_relay`] with `shards` shards.
fn start_relay_shards(upstream: &str, nofile: u64, shards: usize, dir: &std::path::Path) -> Relay {
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shards = {shards}
max_streams = 1000

[upstream]
url = "{upstream}"

[tokens]
secret_env = "CLIO_FILE_LIMIT_TEST_SECRET"

[admin]
state_dir = "{state}"
health_interval = "0s"

[[account]]
id = "acct-a"
key_env = "CLIO_FILE_LIMIT_TEST_KEY"
max_concurrent_streams = 1000
"#,
            state = dir.join("state").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clio-relay"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("CLIO_FILE_LIMIT_TEST_SECRET", SECRET)
        .env("CLIO_FILE_LIMIT_TEST_KEY", "key-a")
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                nofile,
                nofile,
            )
            .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().expect("clio-relay starts");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("clio-relay listening") {
                    let field = |name: &str| -> SocketAddr {
                        let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                        line[at..].split(' ').next().unwrap().parse().unwrap()
                    };
                    let _ = addr_tx.send((field("client"), field("admin")));
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let (client, admin) = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the relay did not start: {:?}", log.lock().unwrap()));
    Relay {
        child,
        log,
        client,
        admin,
    }
}

/// One HTTP GET with the relay's HTTP client; (status, body), status 0
/// when no answer came.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    match blocking::send(
        &Endpoint::plain(addr),
        &Request::get(path),
        Duration::from_secs(10),
    ) {
        Ok(r) => (r.status, r.text()),
        Err(_) => (0, String::new()),
    }
}

/// What one attempt to open a stream came to.
enum Opened {
    Stream(Box<tungstenite::WebSocket<TcpStream>>),
    /// Refused: the HTTP status or error-frame code, and its message.
    Refused(u16, String),
}

fn open_stream(addr: SocketAddr, token: &str) -> Opened {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/v1/transcribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut ws = match tungstenite::client::client(req, tcp) {
        Ok((ws, _)) => ws,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().clone().unwrap_or_default();
            return Opened::Refused(
                resp.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            );
        }
        Err(e) => panic!("upgrade failed: {e:?}"),
    };
    ws.send(Message::text(
        r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1}"#,
    ))
    .unwrap();
    ws.send(Message::binary(vec![1u8; 3200])).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                return match v["error_code"].as_u64() {
                    Some(code) => Opened::Refused(code as u16, t.to_string()),
                    None => Opened::Stream(Box::new(ws)),
                };
            }
            Ok(_) => {}
            Err(e) => panic!("stream broke before its first answer: {e}"),
        }
    }
}

#[test]
fn at_the_file_limit_the_relay_says_so_and_its_admin_port_answers() {
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 1000)],
        echo: true,
        ..FakeConfig::default()
    })
    .unwrap();
    let dir = std::env::temp_dir().join(format!("clio-relay-file-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let relay = start_relay(&fake.url(), 96, &dir);
    assert!(
        !relay.log_lines("exceeds the open-file limit").is_empty(),
        "no start-time warning: {:?}",
        relay.log.lock().unwrap()
    );
    let keys = TokenKeys::from_config(&TokensConfig::new(Secret::new(SECRET)));
    let token = keys
        .mint("dev-1", Duration::from_secs(600), SystemTime::now())
        .unwrap();

    // Fill the relay until it refuses a few streams.
    let mut streams = Vec::new();
    let mut refusals = Vec::new();
    while refusals.len() < 4 {
        assert!(streams.len() < 200, "96 descriptors never ran out");
        match open_stream(relay.client, &token) {
            Opened::Stream(ws) => streams.push(ws),
            Opened::Refused(code, message) => refusals.push((code, message)),
        }
    }
    assert!(streams.len() >= 5, "only {} streams fit", streams.len());
    for (code, message) in &refusals {
        assert_eq!(*code, 503, "{message}");
        assert!(message.contains("file limit"), "{message}");
    }

    // The admin port answers while the client port is full.
    let (status, _) = get(relay.admin, "/healthz");
    assert_eq!(
        status, 200,
        "the admin port did not answer at the file limit"
    );
    let (status, metrics) = get(relay.admin, "/metrics");
    assert_eq!(status, 200);
    let file_limit: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("clio_relay_file_limit_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(file_limit >= 4, "{metrics}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("clio_relay_errors_total{side=\"upstream\"")),
        "the file limit was counted as upstream's:\n{metrics}"
    );

    // Streams end; the relay takes new ones again, and the admin port lives.
    for mut ws in streams.drain(..) {
        let _ = ws.close(None);
        let end = Instant::now() + Duration::from_secs(10);
        while ws.read().is_ok() && Instant::now() < end {}
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match open_stream(relay.client, &token) {
            Opened::Stream(ws) => break ws,
            Opened::Refused(..) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Opened::Refused(code, m) => panic!("no recovery: {code} {m}"),
        }
    };
    drop(stream);
    assert_eq!(get(relay.admin, "/healthz").0, 200);

    // Said once per interval, not once per failure.
    let lines = relay.log_lines("file limit").len() + relay.log_lines("accept failed").len();
    assert!(
        lines <= 12,
        "{lines} log lines about the file limit: {:?}",
        relay.log.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the start says of the streams that fit under the open-file limit
/// is what fits. It was `(limit - (64 + 16 per shard)) / 2`, a budget
/// twice what a shard holds (8 descriptors: rings, event fds, listener,
/// spare): with 16 shards under 256 it said "streams past about 0 will be
/// refused" while 50 and more were served. It now counts the descriptors
/// the relay holds once its shards listen, and keeps a reserve.
#[test]
fn the_start_says_about_how_many_streams_fit_under_the_file_limit() {
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 1000)],
        echo: true,
        ..FakeConfig::default()
    })
    .unwrap();
    let dir = std::env::temp_dir().join(format!("clio-relay-file-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let relay = start_relay_shards(&fake.url(), 256, 16, &dir);
    let said = relay.log_lines("exceeds the open-file limit");
    let said_fit: usize = said
        .first()
        .and_then(|l| l.split("streams past about ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no estimate: {:?}", relay.log.lock().unwrap()));
    let keys = TokenKeys::from_config(&TokensConfig::new(Secret::new(SECRET)));
    let token = keys
        .mint("dev-1", Duration::from_secs(600), SystemTime::now())
        .unwrap();
    let mut streams = Vec::new();
    let mut refused = 0;
    while refused < 2 {
        assert!(streams.len() < 200, "256 descriptors never ran out");
        match open_stream(relay.client, &token) {
            Opened::Stream(ws) => streams.push(ws),
            Opened::Refused(..) => refused += 1,
        }
    }
    let fit = streams.len();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        said_fit > 0 && said_fit <= fit && fit <= said_fit + 32,
        "said about {said_fit}, {fit} fit: {said:?}"
    );
}

/// Sets the soft open-file limit of process `pid` (the hard one kept).
fn set_file_limit(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `old`'s layout only; both pointers are valid.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit read: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above; `new` is a valid rlimit.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit set: {}", std::io::Error::last_os_error());
}

/// The first error message a stream gets and its close code, skipping
/// transcripts.
fn error_and_close(ws: &mut tungstenite::WebSocket<TcpStream>) -> (serde_json::Value, u16) {
    let mut error = serde_json::Value::Null;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["error_code"].is_u64() {
                    error = v;
                }
            }
            Ok(Message::Close(frame)) => {
                return (error, frame.map_or(0, |f| u16::from(f.code)));
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame (error so far: {error}): {e}"),
        }
    }
}

/// A stream whose upstream connection fails while the relay is at its file
/// limit cannot reopen it: it gets what a new stream gets there (503, close
/// 1013, "try again"), the relay's own fault, not a lost upstream (1011);
/// and the stream beside it goes on.
#[test]
fn a_resume_at_the_file_limit_is_told_to_try_again() {
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 1000)],
        echo: true,
        ..FakeConfig::default()
    })
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "clio-relay-file-limit-resume-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let relay = start_relay(&fake.url(), 1024, &dir);
    let keys = TokenKeys::from_config(&TokensConfig::new(Secret::new(SECRET)));
    let token = keys
        .mint("dev-1", Duration::from_secs(600), SystemTime::now())
        .unwrap();
    let (Opened::Stream(mut failing), Opened::Stream(mut beside)) = (
        open_stream(relay.client, &token),
        open_stream(relay.client, &token),
    ) else {
        panic!("the two streams did not open");
    };

    // No descriptor to be had from here on; the open ones stay open.
    set_file_limit(relay.child.id(), 3);
    // Only the session that sends audio next fails.
    fake.fail_sessions_of("key-a", Some(fake_soniox::FaultKind::Drop));
    failing.send(Message::binary(vec![2u8; 3200])).unwrap();
    let (error, close) = error_and_close(&mut failing);
    assert_eq!(error["error_code"], 503, "{error}");
    assert!(
        error["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("file limit")),
        "{error}"
    );
    assert_eq!(close, 1013, "{error}");

    fake.fail_sessions_of("key-a", None);
    set_file_limit(relay.child.id(), 1024);
    beside.send(Message::binary(vec![3u8; 3200])).unwrap();
    loop {
        match beside.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert!(!v["error_code"].is_u64(), "the other stream failed: {v}");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("the other stream broke: {e}"),
        }
    }

    let (status, metrics) = get(relay.admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(|l| l
            .starts_with("clio_relay_file_limit_total{at=\"upstream_connect\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    let _ = beside.close(None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// relay-load against a relay at its file limit names the cause: the
/// relay's 503s say "file limit", and relay-load's hints quote them and
/// say to raise the relay's open-file limit. Before, its hints guessed
/// at "server.max_streams or while draining" (HTTP 503) and "drains,
/// retires their key, or upstream failed" (error 503), the answer that
/// said why in its JSON alone.
#[test]
fn relay_load_names_a_relay_at_its_file_limit() {
    use relay_load::{AuthVia, Credentials, LoadOptions, Pace, Target};
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new("key-a", 1000)],
        echo: true,
        ..FakeConfig::default()
    })
    .unwrap();
    let dir =
        std::env::temp_dir().join(format!("clio-relay-file-limit-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let relay = start_relay(&fake.url(), 96, &dir);
    let keys = TokenKeys::from_config(&TokensConfig::new(Secret::new(SECRET)));
    let report = relay_load::run(&LoadOptions {
        target: Target::relay(relay.client),
        auth: AuthVia::Header,
        credentials: Credentials::Mint(Arc::new(keys), Duration::from_secs(600)),
        streams: 150,
        ramp_per_sec: 0.0,
        stream_seconds: 2.0,
        pace: Pace::Times(4.0),
        duration: Duration::from_secs(60),
        threads: 1,
        ..LoadOptions::default()
    })
    .expect("load runs");
    let table = report.table();
    let _ = std::fs::remove_dir_all(&dir);
    let at_limit: Vec<&str> = ["http 503", "error 503"]
        .into_iter()
        .filter(|f| {
            report
                .refusal_reasons
                .keys()
                .any(|(k, m)| k == f && m.contains("file limit"))
        })
        .collect();
    assert!(
        !at_limit.is_empty(),
        "no stream met the file limit: {table}"
    );
    for failure in at_limit {
        let start = if failure == "http 503" {
            "streams refused with HTTP 503 (answered "
        } else {
            "streams were told to reconnect (error 503 after the upgrade) (answered "
        };
        let hint = table
            .lines()
            .find(|l| l.starts_with("hint: ") && l.contains(start))
            .unwrap_or_else(|| panic!("no hint for {failure}: {table}"));
        assert!(
            hint.contains("file limit")
                && hint.contains("the relay is at its open-file limit: raise it"),
            "{hint}"
        );
        assert!(
            !hint.contains("draining") && !hint.contains("drains"),
            "{hint}"
        );
    }
}
