//! The fleet behind a real HAProxy (the shape of deploy/haproxy.cfg):
//! relay-load spreads 1,000 streams over two nodes and loses no frame;
//! draining one node moves new streams to the other with none failed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fake_soniox::FakeKey;

use crate::redis::{free_port, RedisServer};
use crate::util::*;

/// A node's config behind the balancer: deploy/haproxy.cfg sends each
/// connection a PROXY v2 header, and HAProxy reaches the nodes from
/// 127.0.0.1, so that is the balancer they trust (README "Running a
/// fleet").
fn trusting_the_balancer(c: &mut clio_relay::core::config::Config) {
    c.server.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
}

pub struct HaProxy {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl HaProxy {
    /// HAProxy on 127.0.0.1 with deploy/haproxy.cfg's settings, in front of
    /// `nodes` (client address, admin address).
    pub fn start(nodes: &[(std::net::SocketAddr, std::net::SocketAddr)]) -> HaProxy {
        let shipped = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg"),
        )
        .unwrap();
        let dir = state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        // The shipped file, with this test's addresses and faster checks:
        // each backend's servers are this test's nodes, at their client
        // port (`relays`) or their admin port (`remote_config`).
        let servers = |backend: &str| -> String {
            nodes
                .iter()
                .enumerate()
                .map(|(i, (client, admin))| match backend {
                    "relays" => format!("    server relay-{i} {client} port {}\n", admin.port()),
                    "remote_config" => format!("    server relay-{i} {admin}\n"),
                    other => panic!("backend {other} of deploy/haproxy.cfg is not known here"),
                })
                .collect()
        };
        let mut cfg = String::new();
        let mut backend: Option<String> = None;
        for line in shipped.lines() {
            let t = line.trim_start();
            if !line.starts_with(' ') && !line.starts_with('#') && !t.is_empty() {
                if let Some(b) = backend.take() {
                    cfg.push_str(&servers(&b));
                }
                backend = t.strip_prefix("backend ").map(|b| b.trim().to_string());
            }
            if t.starts_with("server ") {
                continue;
            }
            if t.starts_with("log stdout") {
                // One line per stream, kept for the failure messages.
                cfg.push_str("    log stderr format raw local0 info\n");
                continue;
            }
            if t.starts_with("maxconn") {
                // Within this machine's open-file limit (HAProxy wants two
                // descriptors per connection).
                cfg.push_str("    maxconn 5000\n");
            } else if t.starts_with("bind :8080") {
                cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
            } else if t.starts_with("default-server") {
                // Checks every 200 ms; three misses in a row (a drain) take
                // a node out. A loaded test machine answers slowly, not never.
                // The shipped PROXY header stays (the nodes trust this
                // balancer: `trusting_the_balancer`).
                let proxy = if t.contains(" send-proxy-v2") {
                    " send-proxy-v2"
                } else {
                    ""
                };
                cfg.push_str(&format!(
                    "    default-server check inter 200ms fall 3 rise 1 maxconn 9000{proxy}\n"
                ));
            } else if t.starts_with("timeout check") {
                cfg.push_str("    timeout check 10s\n");
            } else {
                cfg.push_str(line);
                cfg.push('\n');
            }
        }
        if let Some(b) = backend.take() {
            cfg.push_str(&servers(&b));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy runs (.ci/run installs it)");
        let h = HaProxy { child, port, dir };
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "haproxy listens"
        );
        h
    }
}

impl HaProxy {
    /// HAProxy's log lines of streams that did not get their upgrade (101),
    /// or were retried: what to look at when a stream failed.
    pub fn trouble(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default();
        let odd: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" 101 ") || l.contains("+1/") || l.contains("/+"))
            .collect();
        format!(
            "haproxy: {} of {} lines not a plain 101:\n{}",
            odd.len(),
            log.lines().count(),
            odd.join("\n")
        )
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs relay-load through HAProxy; returns its JSON report.
fn load(port: u16, relay: &Relay, args: &[&str]) -> Child {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens.toml");
    std::fs::write(&tokens, "[tokens]\nsecret_env = \"FLEET_LB_SECRET\"\n").unwrap();
    // relay-load is its own crate: the workspace's `cargo test` builds it
    // beside clio-relay.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_clio-relay")).with_file_name("relay-load");
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build -p relay-load`",
        bin.display()
    );
    Command::new(bin)
        .arg("--url")
        .arg(format!("ws://127.0.0.1:{port}/v1/transcribe"))
        .arg("--relay-config")
        .arg(&tokens)
        .args(args)
        .args(["--json", "-q"])
        .env("FLEET_LB_SECRET", relay.cfg.tokens.secret.expose())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn report(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "relay-load report: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn failed(r: &serde_json::Value) -> u64 {
    r["streams_failed"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum())
}

// 1,300 streams, about 20 s here. It was once #[ignore]d after a failed
// stream in the drain run, seen beside the other tests before the drain
// closed its listeners ahead of refusing (and before the data plane); it
// did not recur in 10 runs since (alone, beside the whole fleet suite, and
// beside the relay suite). A failure prints HAProxy's line for every stream
// that was not a plain 101, with its retries and termination state.
#[test]
fn haproxy_spreads_streams_and_a_draining_node_loses_none() {
    let redis = RedisServer::start();
    let fake = fake(&[], |c| {
        c.keys = vec![FakeKey::new("k1", 20_000)];
        c.echo = true;
        c.record_audio = false;
    });
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        trusting_the_balancer(c);
        c.accounts[0].max_concurrent_streams = 20_000;
        c.server.max_streams = 5_000;
        c.upstream.connect_timeout = Duration::from_secs(30);
    });
    let lb = HaProxy::start(&[
        (a.addr(), a.handle.admin_addr),
        (b.addr(), b.handle.admin_addr),
    ]);
    let r = report(load(
        lb.port,
        &a,
        &[
            "-n",
            "1000",
            "--ramp",
            "200",
            "--stream-seconds",
            "2",
            "--pace",
            "x4",
            "--timeout",
            "60s",
        ],
    ));
    assert_eq!(r["streams_ok"], 1000, "{r}\n{}", lb.trouble());
    assert_eq!(failed(&r), 0, "{r}\n{}", lb.trouble());
    assert_eq!(r["lost"], 0, "{r}\n{}", lb.trouble());
    let (on_a, on_b) = (
        a.handle.metrics().streams_total(),
        b.handle.metrics().streams_total(),
    );
    assert_eq!(on_a + on_b, 1000, "{}", lb.trouble());
    assert!(
        on_a > 0 && on_b > 0,
        "both nodes took streams: {on_a} / {on_b}"
    );
    // Drain A while streams keep arriving: none fails, B takes the new ones.
    let run = load(
        lb.port,
        &a,
        &[
            "-n",
            "300",
            "--ramp",
            "60",
            "--stream-seconds",
            "2",
            "--pace",
            "x2",
            "--timeout",
            "30s",
        ],
    );
    assert!(wait_until(Duration::from_secs(20), || a
        .handle
        .metrics()
        .streams_total()
        > on_a + 20));
    let drained = std::thread::scope(|s| {
        let d = s.spawn(|| a.handle.drain(Duration::from_secs(20)));
        let r = report(run);
        (d.join().unwrap(), r)
    });
    let (cut, r) = drained;
    assert_eq!(cut, 0, "A's live streams finished within the drain");
    let b_after = b.handle.metrics().streams_total();
    assert_eq!(r["streams_ok"], 300, "{r}\n{}", lb.trouble());
    assert_eq!(failed(&r), 0, "{r}\n{}", lb.trouble());
    assert_eq!(r["lost"], 0, "{r}\n{}", lb.trouble());
    assert!(b_after > on_b, "the drained node's share went to the other");
    assert_eq!(
        a.handle.metrics().streams_total() + b_after,
        1300,
        "every stream was served once\n{}",
        lb.trouble()
    );
}

/// README: the app reads `/v1/config`. Through the shipped balancer it
/// got 404: the document is on the admin port, which stays private, and
/// deploy/haproxy.cfg sent every path to the client port. Now GET
/// /v1/config goes to a ready node's admin port, every node answers with
/// the same document and ETag, and nothing else of the admin port is
/// reachable through the balancer.
#[test]
fn the_balancer_serves_the_remote_config_and_nothing_else_of_the_admin_port() {
    let redis = RedisServer::start();
    let fake = fake(&["k1", "k2"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", trusting_the_balancer);
    // A change made on one node: both must publish it alike.
    let (status, body) = http(
        a.handle.admin_addr,
        "POST",
        "/admin/accounts",
        Some(crate::ADMIN),
        Some(r#"{"id":"eu-1","key":"k2","region":"eu-west"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let on_b = || http_get(b.handle.admin_addr, "/v1/config", "").2;
    assert!(wait_until(Duration::from_secs(10), || on_b().contains("eu-1")));
    let lb = HaProxy::start(&[
        (a.addr(), a.handle.admin_addr),
        (b.addr(), b.handle.admin_addr),
    ]);
    let lb_addr: std::net::SocketAddr = ([127, 0, 0, 1], lb.port).into();
    // Round robin: these reach both nodes.
    let answers: Vec<(u16, Option<String>, String)> = (0..4)
        .map(|_| {
            let (status, head, body) = http_get(lb_addr, "/v1/config", "");
            (status, header_of(&head, "etag"), body)
        })
        .collect();
    let first = answers[0].clone();
    assert_eq!(first.0, 200, "{first:?}\n{}", lb.trouble());
    assert!(first.2.contains("eu-1"), "{first:?}");
    assert!(answers.iter().all(|x| *x == first), "{answers:#?}");
    let etag = first.1.unwrap();
    for _ in 0..2 {
        let (status, head, _) =
            http_get(lb_addr, "/v1/config", &format!("If-None-Match: {etag}\r\n"));
        assert_eq!(status, 304, "{head}");
    }
    // The rest of the admin port stays out of reach.
    for path in ["/metrics", "/admin/accounts", "/dashboard", "/readyz"] {
        let (status, head, _) = http_get(lb_addr, path, "");
        assert_eq!(status, 404, "{path}: {head}");
    }
}

/// README: with `on_store_down = "refuse"`, every node's `/readyz` is 503
/// while Redis is unreachable, so the shipped balancer takes them all out
/// of rotation: a client then gets HAProxy's own HTTP 503 before the
/// upgrade, not the relay's 503 frame; once Redis answers again the
/// nodes come back after their checks pass.
#[test]
fn with_refuse_the_balancer_takes_every_node_out_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    trusting_the_balancer(&mut cfg);
    let start = |name: &str| {
        let mut c = crate::node(&cfg, &redis, name);
        c.cluster.as_mut().unwrap().on_store_down = clio_relay::core::config::StoreDown::Refuse;
        Relay::start(c)
    };
    let (a, b) = (start("node-a"), start("node-b"));
    assert!(wait_until(Duration::from_secs(10), || crate::up(&a) && crate::up(&b)));
    let lb = HaProxy::start(&[
        (a.addr(), a.handle.admin_addr),
        (b.addr(), b.handle.admin_addr),
    ]);
    let lb_addr: std::net::SocketAddr = ([127, 0, 0, 1], lb.port).into();
    let token = a.token("phone");
    let stream = || {
        connect(lb_addr, &token, Via::Header).map(|(mut ws, _)| {
            // A refused stream's relay may have closed before these.
            let _ = ws.send(tungstenite::Message::text(config_message(None)));
            let _ = ws.send(tungstenite::Message::binary(audio_frames(1, 1).remove(0)));
            let _ = ws.send(tungstenite::Message::binary(Vec::<u8>::new()));
            read_all(&mut ws)
        })
    };
    assert!(wait_until(Duration::from_secs(10), || stream()
        .is_ok_and(|got| got.finished())));
    redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !crate::up(&a) && !crate::up(&b)));
    // At first a node may still be in rotation: its own 503 frame.
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            stream(),
            Err(tungstenite::Error::Http(ref r)) if r.status() == 503
                && String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
                    .contains("No server is available")
        )),
        "{}",
        lb.trouble()
    );
    redis.restart();
    assert!(wait_until(Duration::from_secs(20), || stream()
        .is_ok_and(|got| got.finished())));
}

/// A stream refused after the upgrade (here a device over its limit) got
/// its 429 and close 1013 directly from a relay, but through the shipped
/// balancer about 3 % of such clients saw 1006 under refusal churn: the
/// relay sent its FIN right after its close frame, and HAProxy (2.6),
/// once it has the server's FIN, reads the client's next bytes (its close
/// reply, or audio it had in flight) as a new HTTP request: a 400 logged
/// as `<BADREQ>` `CR--`, and a reset. A client whose write fails so drops
/// the frames it had not read yet. The relay
/// now sends its FIN after the client's close reply; here a client that
/// sends audio and then its reply after the refusal came gets a clean
/// end, not a reset.
#[test]
fn a_client_refused_after_the_upgrade_through_haproxy_is_not_reset() {
    use std::io::{Read, Write};
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |_| {});
    let (a, b) = crate::pair(&fake, &redis, "k1", |c| {
        trusting_the_balancer(c);
        c.devices.default = clio_relay::core::config::DeviceLimits {
            max_concurrent_streams: 1,
            ..Default::default()
        };
    });
    let lb = HaProxy::start(&[
        (a.addr(), a.handle.admin_addr),
        (b.addr(), b.handle.admin_addr),
    ]);
    let lb_addr: std::net::SocketAddr = ([127, 0, 0, 1], lb.port).into();
    let token = a.token("phone");
    // The device's one stream, held open.
    let (mut held, _) = connect(lb_addr, &token, Via::Header).unwrap();
    held.send(tungstenite::Message::text(config_message(None)))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        a.handle.metrics().streams_total() + b.handle.metrics().streams_total() == 1
    }));
    for round in 0..3 {
        let (mut tcp, head) = raw_upgrade(lb_addr, &token);
        assert!(
            String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        // Its config, after which a refusal comes (as Soniox's do).
        tcp.write_all(&client_frame(1, config_message(None).as_bytes()))
            .unwrap();
        // The refusal: the 429 frame and the close, whole.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let refused = |got: &[u8]| {
            let mut at = 0;
            let mut close = false;
            while let Ok(Some(h)) = clio_frame::frame::parse_header(
                &got[at..],
                clio_frame::frame::Sender::Server,
                1 << 20,
            ) {
                let end = at + h.header_len + h.payload_len as usize;
                if end > got.len() {
                    break;
                }
                close |= h.opcode == clio_frame::frame::Opcode::Close;
                at = end;
            }
            close
        };
        while !refused(&got) {
            let n = tcp.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "round {round}: the connection ended before the close"
            );
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(String::from_utf8_lossy(&got).contains("Device limit reached"));
        // What a client streaming in real time does next: a frame of audio
        // it had in flight, then its close reply.
        std::thread::sleep(Duration::from_millis(200));
        let audio = tcp.write_all(&client_frame(2, &[0u8; 3200]));
        std::thread::sleep(Duration::from_millis(100));
        let reply = tcp.write_all(&client_frame(8, &1013u16.to_be_bytes()));
        let mut rest = Vec::new();
        let end = tcp.read_to_end(&mut rest);
        assert!(
            audio.is_ok() && reply.is_ok() && end.is_ok(),
            "round {round}: audio {audio:?}, close reply {reply:?}, end {end:?}\n{}",
            lb.trouble()
        );
        assert!(rest.is_empty(), "round {round}: {rest:?}");
    }
    drop(held);
}

/// Behind the balancer the relay knows each client by the address in
/// the PROXY v2 header the shipped deploy/haproxy.cfg sends
/// (`send-proxy-v2`), with the nodes trusting the balancer
/// (`server.proxy_protocol_from`); it had known every client as HAProxy,
/// so `limits.max_unauthenticated_per_address` counted the balancer's
/// clients as one. With a bound of 1, a client's second connection
/// waiting to send its token in its first message is refused (429)
/// through the balancer, while another client's is let in, as they are
/// directly; and a stream goes through the balancer and the node to
/// fake-soniox.
#[test]
fn behind_haproxy_each_client_counts_as_its_own_address() {
    use std::io::{Read, Write};
    let redis = RedisServer::start();
    let fake = fake(&["k1"], |c| c.record_audio = true);
    let (a, _b) = crate::pair(&fake, &redis, "k1", |c| {
        trusting_the_balancer(c);
        c.limits.max_unauthenticated_per_address = 1;
    });
    // One node behind the balancer: every client reaches it.
    let lb = HaProxy::start(&[(a.addr(), a.handle.admin_addr)]);
    let lb_addr: std::net::SocketAddr = ([127, 0, 0, 1], lb.port).into();
    // An upgrade with no token (it is to come in the first message) from
    // `ip`; the connection, kept open, and the answer's status.
    let upgrade = |ip: [u8; 4], to: std::net::SocketAddr| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from((ip, 0)).into()).unwrap();
        s.connect(&to.into()).unwrap();
        let mut tcp: std::net::TcpStream = s.into();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        write!(
            tcp,
            "GET /v1/transcribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("an HTTP answer: {head:?}"));
        (tcp, status)
    };
    let clients = [[127, 0, 0, 2], [127, 0, 0, 2], [127, 0, 0, 3]];
    let direct: Vec<_> = clients.iter().map(|ip| upgrade(*ip, a.addr())).collect();
    let statuses: Vec<u16> = direct.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [101, 429, 101], "by address, directly");
    drop(direct);
    // The places of the direct connections are given back as they close.
    assert!(wait_until(Duration::from_secs(10), || {
        a.handle.metrics().unauthenticated == 0
    }));
    let through: Vec<_> = clients.iter().map(|ip| upgrade(*ip, lb_addr)).collect();
    let statuses: Vec<u16> = through.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        statuses,
        [101, 429, 101],
        "through the balancer, by the client's address too\n{}",
        lb.trouble()
    );
    // A whole stream through the balancer and the node.
    let frames = audio_frames(10, 7);
    let (mut ws, _) = connect(lb_addr, &a.token("phone"), Via::Header).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &frames);
    assert!(got.finished(), "{got:?}\n{}", lb.trouble());
    assert!(fake.wait_for(Duration::from_secs(10), |s| s.iter().any(|x| x.closed)));
    assert_eq!(fake.sessions()[0].audio, frames.concat());
}

/// A session token sent in the query (`?token=`, the README's third
/// place for it) never reaches HAProxy's log. The shipped config's
/// `option httplog` logged each request line whole, query and token
/// included, in every traffic line of a balancer whose log takes them
/// (`info`, as this harness's does): anyone who could read the balancer's
/// log could stream as that device until the token expired. The shipped
/// log-format is httplog's, with the request's method, path and version
/// in place of its line.
#[test]
fn a_query_token_is_not_in_haproxys_log() {
    let fake = fake(&["k1"], |_| {});
    let mut cfg = relay_config(&fake.url(), &[("a", "k1")]);
    trusting_the_balancer(&mut cfg);
    let relay = Relay::start(cfg);
    let lb = HaProxy::start(&[(relay.addr(), relay.handle.admin_addr)]);
    let lb_addr: std::net::SocketAddr = ([127, 0, 0, 1], lb.port).into();
    let token = relay.token("phone");
    let (mut ws, _) = connect(lb_addr, &token, Via::Query).unwrap();
    let got = stream_session(&mut ws, &config_message(None), &audio_frames(3, 1));
    assert!(got.finished(), "{got:?}\n{}", lb.trouble());
    drop(ws);
    // HAProxy logs a tunnel's line when it closes.
    let log = || std::fs::read_to_string(lb.dir.join("haproxy.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || log().contains(" 101 ")),
        "no line for the stream: {}",
        log()
    );
    let log = log();
    assert!(log.contains("/v1/transcribe"), "{log}");
    assert!(
        !log.contains(&token),
        "the token is in HAProxy's log:\n{log}"
    );
}
