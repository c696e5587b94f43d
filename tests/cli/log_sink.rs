//! The relay's log sink failing under it, with a stream flowing: stderr a
//! pipe whose reader went away (EPIPE), or one nobody reads any more (a
//! stalled journald). Lines the relay cannot write are lost; its threads,
//! streams and process are not.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime};

use clio_relay::control::httpc::{blocking, Endpoint, Request};
use clio_relay::core::config::TokensConfig;
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox};
use tungstenite::Message;

use crate::util::*;

/// The longest any one wait of these tests lasts.
const WAIT: Duration = Duration::from_secs(15);

/// The relay as a child process, its stderr read only as far as its
/// listening line.
struct Relay {
    child: Child,
    stderr: BufReader<std::fs::File>,
    client: SocketAddr,
    admin: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// An echoing fake Soniox with the key of `relay_config`'s file.
fn fake() -> FakeSoniox {
    FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(RELAY_ENV[2].1, 100)],
        echo: true,
        ..FakeConfig::default()
    })
    .unwrap()
}

/// Starts `clio-relay run` (one shard) against `upstream`, its stderr the
/// write end `stderr` of a pipe whose read end is `read`; returns once the
/// relay has logged that it listens.
fn start(
    name: &str,
    upstream: &str,
    stderr: std::os::fd::OwnedFd,
    read: std::os::fd::OwnedFd,
) -> Relay {
    let dir =
        std::env::temp_dir().join(format!("clio-relay-log-sink-{name}-{}", std::process::id()));
    let config = relay_config(&dir, "127.0.0.1:0", "127.0.0.1:0");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ws://127.0.0.1:9/transcribe-websocket", upstream);
    std::fs::write(&config, text).unwrap();
    let child = relay_run(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(std::fs::File::from(read));
    let mut line = String::new();
    let mut seen = String::new();
    let (client, admin) = loop {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "the relay's log ended before it listened: {seen}");
        seen.push_str(&line);
        if line.contains("clio-relay listening") {
            let field = |name: &str| -> SocketAddr {
                let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                line[at..]
                    .split([' ', '\n'])
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            break (field("client"), field("admin"));
        }
    };
    Relay {
        child,
        stderr,
        client,
        admin,
        dir,
    }
}

/// A pipe: (read end, write end), neither inherited by a child but as
/// its stderr.
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// A stream open on the relay, its config sent and one frame echoed.
fn open_stream(addr: SocketAddr) -> tungstenite::WebSocket<TcpStream> {
    use tungstenite::client::IntoClientRequest;
    let keys = TokenKeys::from_config(&TokensConfig::new(Secret::new(RELAY_ENV[0].1)));
    let token = keys
        .mint("dev-log-sink", Duration::from_secs(600), SystemTime::now())
        .unwrap();
    let mut req = format!("ws://{addr}/v1/transcribe")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, _) = tungstenite::client::client(req, tcp).unwrap();
    ws.send(Message::text(
        r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":16000,"num_channels":1}"#,
    ))
    .unwrap();
    echo(&mut ws, 1);
    ws
}

/// Sends one audio frame of `byte`s and waits (at most [`WAIT`]) for
/// fake-soniox's echo of it.
fn echo(ws: &mut tungstenite::WebSocket<TcpStream>, byte: u8) {
    ws.send(Message::binary(vec![byte; 3200])).unwrap();
    let want = format!("{byte:02x}").repeat(16);
    loop {
        match ws.read() {
            Ok(Message::Text(t)) if t.contains(&want) => return,
            Ok(Message::Text(t)) => assert!(!t.contains("error_code"), "{t}"),
            Ok(_) => {}
            Err(e) => panic!("frame {byte} was not echoed: {e}"),
        }
    }
}

/// A request with a bad token, which the shard refuses (401) and logs;
/// its status, 0 when no answer came (within [`WAIT`]).
fn refused_request(addr: SocketAddr) -> u16 {
    use std::io::Write;
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(
        b"GET /v1/transcribe HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nAuthorization: Bearer clio1.bad.bad.bad\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 12];
    match tcp.read_exact(&mut head) {
        Ok(()) => std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// One GET on the admin port; (status, body), status 0 when no answer came.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    match blocking::send(&Endpoint::plain(addr), &Request::get(path), WAIT) {
        Ok(r) => (r.status, r.text()),
        Err(_) => (0, String::new()),
    }
}

/// Sends `sig` to the relay (gone already, it is not there to get it).
fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

/// Waits (at most [`WAIT`]) for the relay to exit; its status.
fn exit_status(child: &mut Child) -> Option<std::process::ExitStatus> {
    let end = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// stderr a pipe whose reader has gone (a log shipper that died): every
/// line the relay writes fails with EPIPE. A failed write panicked the
/// thread that wrote the line (tracing-subscriber reported it with
/// `eprintln!`, which panics when stderr fails): the shard at a refused
/// request, the admin thread, the main thread at SIGTERM (exit 101), and
/// the relay went on listening with no shard to serve.
#[test]
fn a_broken_stderr_pipe_stops_no_thread() {
    let fake = fake();
    let (read, write) = pipe();
    let mut relay = start("epipe", &fake.url(), write, read);
    let mut ws = open_stream(relay.client);
    // The log's reader goes away: every write to stderr is EPIPE now.
    let Relay { stderr, .. } = &mut relay;
    drop(std::mem::replace(
        stderr,
        BufReader::new(std::fs::File::open("/dev/null").unwrap()),
    ));

    for _ in 0..3 {
        assert_eq!(
            refused_request(relay.client),
            401,
            "the shard did not answer"
        );
    }
    echo(&mut ws, 2);
    // A reload logs on the main and the admin threads.
    signal(&relay.child, nix::sys::signal::Signal::SIGHUP);
    let (status, _) = get(relay.admin, "/healthz");
    assert_eq!(status, 200, "the admin thread did not answer");
    assert_eq!(
        refused_request(relay.client),
        401,
        "the shard did not answer"
    );
    echo(&mut ws, 3);
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay exited"
    );

    drop(ws);
    signal(&relay.child, nix::sys::signal::Signal::SIGTERM);
    let status = exit_status(&mut relay.child).expect("the relay stopped on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// stderr a pipe nobody reads any more (a stalled journald, a log
/// shipper that stopped reading): full, so a `write(2)` to it blocks.
/// A shard that wrote a line there itself stopped, and every stream on
/// it with it, until the reader came back. The relay's lines wait in its
/// queue instead: requests are answered, the live stream's frames flow,
/// the admin port answers, and once the reader reads again the lines come,
/// in order.
#[test]
fn a_stalled_log_reader_stalls_no_stream() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fake = fake();
    let (read, write) = pipe();
    // The test's own way into the pipe, not shared with the relay's
    // descriptor (its flags are its own): non-blocking, to fill it.
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", write.as_raw_fd()))
        .unwrap();
    let mut relay = start("stalled", &fake.url(), write, read);
    let mut ws = open_stream(relay.client);

    // Nobody reads the relay's log from now on, and it is full.
    let filled = loop {
        match filler.write(&[b'#'; 4096]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(filled);

    // Each refused request is a line the shard logs.
    for _ in 0..5 {
        assert_eq!(
            refused_request(relay.client),
            401,
            "the shard did not answer"
        );
    }
    echo(&mut ws, 2);
    echo(&mut ws, 3);
    let (status, metrics) = get(relay.admin, "/metrics");
    assert_eq!(status, 200, "the admin thread did not answer");
    assert!(
        metrics.contains("\nclio_relay_log_lines_dropped_total 0\n"),
        "{metrics}"
    );

    // The reader reads again: the lines the relay queued meanwhile come.
    let stderr = std::mem::replace(
        &mut relay.stderr,
        BufReader::new(std::fs::File::open("/dev/null").unwrap()),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut refused = 0;
    while refused < 5 {
        let line = rx.recv_timeout(WAIT).expect("the queued lines came");
        refused += usize::from(line.contains("request refused"));
    }
    echo(&mut ws, 4);
}
