//! relay-load, in-process, against an echoing fake Soniox: through a real
//! relay (in-process, or the binary where upstream's name has a dead
//! address first) and directly. Asserts correctness only (every frame back
//! exactly once, in order; no failed stream), never speed.

use std::sync::Arc;
use std::time::Duration;

use clio_relay::core::config::{
    AccountConfig, AdminConfig, AuthMode, Config, LimitsConfig, ServerConfig, TokensConfig,
    UpstreamConfig,
};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
use fake_soniox::{FakeConfig, FakeKey, FakeSoniox, Faults};
use relay_load::{self, AuthVia, Credentials, LoadOptions, LoadReport, Mode, Pace, Target};

const KEY: &str = "load-test-key";

fn echo_fake() -> FakeSoniox {
    FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 100)],
        echo: true,
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts")
}

fn relay_config(upstream: &str) -> Config {
    let mut account = AccountConfig::new("acct-1", Secret::new(KEY));
    account.max_concurrent_streams = 100;
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            shards: 1,
            max_streams: 100,
            max_streams_set: true,
            allow: Vec::new(),
            proxy_protocol_from: Vec::new(),
        },
        upstream: UpstreamConfig {
            url: upstream.to_string(),
            auth: AuthMode::Header,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
        },
        tokens: TokensConfig::new(Secret::new(
            "a load-test token secret, well over 32 bytes long",
        )),
        limits: LimitsConfig::default(),
        accounts: vec![account],
        admin: AdminConfig {
            state_dir: std::env::temp_dir().join(format!("clio-load-smoke-{}", std::process::id())),
            ..AdminConfig::default()
        },
        devices: Default::default(),
        usage: Default::default(),
        failover: Default::default(),
        tls: None,
        cluster: None,
        pools: Vec::new(),
        secret_files: Vec::new(),
    }
}

/// 20 streams × 2 s of audio at ×4 pace, two executors.
fn smoke_options(target: Target, auth: AuthVia, credentials: Credentials) -> LoadOptions {
    LoadOptions {
        target,
        auth,
        credentials,
        streams: 20,
        ramp_per_sec: 200.0,
        stream_seconds: 2.0,
        pace: Pace::Times(4.0),
        duration: Duration::from_secs(30),
        threads: 2,
        ..LoadOptions::default()
    }
}

fn assert_clean(r: &LoadReport, streams: u64) {
    let summary = r.table();
    assert!(r.streams_failed.is_empty(), "failed streams:\n{summary}");
    assert_eq!(r.streams_ok, streams, "{summary}");
    assert_eq!(r.streams_cut, 0, "{summary}");
    assert_eq!(r.lost, 0, "{summary}");
    assert_eq!(r.duplicated, 0, "{summary}");
    assert_eq!(r.reordered, 0, "{summary}");
    assert_eq!(r.unexpected, 0, "{summary}");
    assert!(r.frames_sent > 0, "{summary}");
    assert_eq!(r.frames_received, r.frames_sent, "{summary}");
    assert_eq!(r.rtt.len(), r.frames_sent, "{summary}");
    assert_eq!(r.connect.len(), streams, "{summary}");
    assert!(r.clean());
}

#[test]
fn through_the_relay_every_frame_comes_back_once_in_order() {
    let fake = echo_fake();
    let cfg = relay_config(&fake.url());
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = Arc::new(TokenKeys::from_config(&cfg.tokens));
    let opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::Header,
        Credentials::Mint(keys, Duration::from_secs(600)),
    );
    let report = relay_load::run(&opts).expect("load runs");
    assert_clean(&report, 20);
    assert_eq!(report.frames_sent, 20 * 20);
    relay.shutdown();
}

#[test]
fn tokens_in_the_first_message_and_from_a_list() {
    let fake = echo_fake();
    let cfg = relay_config(&fake.url());
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = TokenKeys::from_config(&cfg.tokens);
    let tokens: Vec<String> = (0..3)
        .map(|i| {
            keys.mint(
                &format!("dev-{i}"),
                Duration::from_secs(600),
                std::time::SystemTime::now(),
            )
            .unwrap()
        })
        .collect();
    let mut opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::FirstMessage,
        Credentials::List(Arc::new(tokens)),
    );
    opts.streams = 6;
    opts.pace = Pace::Flood;
    let report = relay_load::run(&opts).expect("load runs");
    assert_clean(&report, 6);
    relay.shutdown();
}

#[test]
fn directly_against_fake_soniox() {
    let fake = echo_fake();
    let opts = smoke_options(
        Target::direct(fake.addr()),
        AuthVia::Header,
        Credentials::Fixed(KEY.into()),
    );
    let report = relay_load::run(&opts).expect("load runs");
    assert_clean(&report, 20);
    assert_eq!(report.frames_sent, 20 * 20);
}

#[test]
fn refusals_are_counted_by_code() {
    let fake = echo_fake();
    let cfg = relay_config(&fake.url());
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let mut opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::Header,
        Credentials::Fixed("clio1.not-a-token".into()),
    );
    opts.streams = 3;
    let report = relay_load::run(&opts).expect("load runs");
    assert_eq!(
        report.streams_failed.get("http 401"),
        Some(&3),
        "{}",
        report.table()
    );
    assert_eq!(report.streams_ok, 0);
    // Directly, a wrong key is refused by fake-soniox the same way.
    let mut opts = smoke_options(
        Target::direct(fake.addr()),
        AuthVia::Header,
        Credentials::Fixed("wrong-key".into()),
    );
    opts.streams = 2;
    let report = relay_load::run(&opts).expect("load runs");
    assert_eq!(
        report.streams_failed.get("http 401"),
        Some(&2),
        "{}",
        report.table()
    );
    relay.shutdown();
}

/// A relay whose `server.allow` does not list the client closes its
/// connections unanswered. relay-load said only "reset" or "eof" for
/// them, with no hint; it now counts them as `closed unanswered` and its
/// hint names `server.allow`.
#[test]
fn a_client_not_on_server_allow_gets_a_hint() {
    let fake = echo_fake();
    let mut cfg = relay_config(&fake.url());
    cfg.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = Arc::new(TokenKeys::from_config(&cfg.tokens));
    let mut opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::Header,
        Credentials::Mint(keys, Duration::from_secs(600)),
    );
    opts.streams = 3;
    let report = relay_load::run(&opts).expect("load runs");
    let table = report.table();
    assert_eq!(
        report.streams_failed.get("closed unanswered"),
        Some(&3),
        "{table}"
    );
    assert!(
        table.contains("hint: 3 streams had their connection closed before any answer")
            && table.contains("server.allow"),
        "{table}"
    );
    relay.shutdown();
}

/// A token minted on a machine whose clock is minutes off the relay's is
/// refused with 401, and relay-load's only hint was that the credentials
/// were not the relay's, so a newcomer went looking for the wrong
/// secret. It now reads why the relay refused (its answer's
/// `error_message`) and names the clock; a wrong secret still gets the
/// old hint.
#[test]
fn a_token_from_a_clock_minutes_off_gets_a_hint_naming_the_clock() {
    let fake = echo_fake();
    let cfg = relay_config(&fake.url());
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = TokenKeys::from_config(&cfg.tokens);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let run = |tokens: Vec<String>| {
        let mut opts = smoke_options(
            Target::relay(relay.client_addr),
            AuthVia::Header,
            Credentials::List(Arc::new(tokens)),
        );
        opts.streams = 2;
        relay_load::run(&opts).expect("load runs")
    };
    let mint = |issued: u64, expires: u64, n: u32| {
        (0..2)
            .map(|i| {
                keys.mint_exact("load-1", None, issued, expires, &format!("tid{n}{i}"))
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    // The minting clock 5 minutes ahead: issued in the future.
    let r = run(mint(now + 300, now + 1200, 0));
    let table = r.table();
    assert_eq!(r.streams_failed.get("http 401"), Some(&2), "{table}");
    assert!(
        table.contains("\"session token refused: session token issued in the future\" x2")
            && table.contains("is ahead of the relay's by more than tokens.clock_skew")
            && !table.contains("the credentials are not the relay's"),
        "{table}"
    );
    assert_eq!(
        r.to_json()["refusal_reasons"][0]["message"],
        "session token refused: session token issued in the future"
    );
    // 20 minutes behind, a 15-minute token: expired on arrival.
    let r = run(mint(now - 1200, now - 300, 1));
    let table = r.table();
    assert!(
        table.contains("session token expired") && table.contains("synchronise the clocks"),
        "{table}"
    );
    // Another secret: the credentials' hint, as before.
    let other = TokenKeys::from_config(&TokensConfig::new(Secret::new(
        "another load-test token secret, well over 32 bytes",
    )));
    let tokens = (0..2)
        .map(|i| {
            other
                .mint_exact("load-1", None, now, now + 600, &format!("tid2{i}"))
                .unwrap()
        })
        .collect();
    let table = run(tokens).table();
    assert!(
        table.contains("signed with an unknown key")
            && table.contains("the credentials are not the relay's")
            && !table.contains("clock"),
        "{table}"
    );
    relay.shutdown();
}

#[test]
fn churn_and_idle_modes_end_by_themselves() {
    let fake = echo_fake();
    let mut opts = smoke_options(
        Target::direct(fake.addr()),
        AuthVia::Header,
        Credentials::Fixed(KEY.into()),
    );
    opts.mode = Mode::Churn;
    opts.streams = 4;
    opts.duration = Duration::from_secs(2);
    let report = relay_load::run(&opts).expect("churn runs");
    assert!(report.streams_failed.is_empty(), "{}", report.table());
    assert!(report.streams_ok > 0, "{}", report.table());
    assert_eq!(report.lost + report.duplicated + report.reordered, 0);

    opts.mode = Mode::Idle;
    opts.streams = 5;
    opts.keepalive_every = Duration::from_millis(300);
    // Held until 8 s, the last fifth (2 s) for closing: room for a loaded
    // host's stalls before the end cuts a stream still closing.
    opts.duration = Duration::from_secs(10);
    let report = relay_load::run(&opts).expect("idle runs");
    assert!(report.streams_failed.is_empty(), "{}", report.table());
    assert_eq!(report.idle_held, 5, "{}", report.table());
    assert_eq!(report.streams_ok, 5, "{}", report.table());
    assert_eq!(report.frames_sent, 0);
}

/// An idle stream's `finished` gets the whole read timeout from its end of
/// audio, however long the stream was held before: a hold longer than the
/// timeout and a slow finalization still end cleanly.
#[test]
fn an_idle_stream_waits_for_finished_from_its_end_not_its_start() {
    let fake = FakeSoniox::start(FakeConfig {
        echo: true,
        keys: vec![FakeKey::new(KEY, 100)],
        faults: Faults {
            finish_delay: Duration::from_millis(1500),
            ..Faults::default()
        },
        // Past the 20 s hold: fake-soniox's own 20 s default raced the
        // end of audio sent at 20 s (one stream got its 408 in a CI run).
        idle_timeout: Duration::from_secs(60),
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let mut opts = smoke_options(
        Target::direct(fake.addr()),
        AuthVia::Header,
        Credentials::Fixed(KEY.into()),
    );
    opts.mode = Mode::Idle;
    opts.streams = 3;
    // Held until 20 s (the run's last 5 s are for closing); reads time out
    // every 3 s while held, so one is 2 s old when the end of audio goes
    // out at 20 s, and `finished` comes 1.5 s later, at 21.5 s: past that
    // read's deadline, and 3.5 s before the run's end cuts what is left (a
    // host stalled on its disk by builds beside the tests has delayed
    // `finished` past 2 s of room; the test ends when the streams do).
    opts.keepalive_every = Duration::from_secs(30);
    opts.io_timeout = Duration::from_secs(3);
    opts.duration = Duration::from_secs(25);
    let report = relay_load::run(&opts).expect("idle runs");
    assert!(report.streams_failed.is_empty(), "{}", report.table());
    assert_eq!(report.streams_ok, 3, "{}", report.table());
}

#[test]
fn through_the_relay_with_faults_every_frame_comes_back_once_in_order() {
    // Half the upstream connections fail (drop, 503, 500) within their
    // first 12 frames; the relay resumes them. Frames of 500 ms (16,000
    // bytes) are often split across the relay's reads, so failures cut
    // frames: upstream must still get each client frame as one frame (an
    // echo of a piece would be an unexpected token).
    let fake = FakeSoniox::start(FakeConfig {
        keys: vec![FakeKey::new(KEY, 100)],
        echo: true,
        faults: Faults {
            random: Some(fake_soniox::RandomFaults {
                share: 0.5,
                kinds: vec![
                    fake_soniox::FaultKind::Drop,
                    fake_soniox::FaultKind::Error(503),
                    fake_soniox::FaultKind::Error(500),
                ],
                within_frames: 12,
                seed: 7,
            }),
            ..Faults::default()
        },
        ..FakeConfig::default()
    })
    .expect("fake-soniox starts");
    let mut cfg = relay_config(&fake.url());
    cfg.failover.max_resumes = 30;
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = Arc::new(TokenKeys::from_config(&cfg.tokens));
    let mut opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::Header,
        Credentials::Mint(keys, Duration::from_secs(600)),
    );
    opts.streams = 30;
    opts.stream_seconds = 8.0;
    opts.frame_ms = 500;
    opts.pace = Pace::Times(8.0);
    let report = relay_load::run(&opts).expect("load runs");
    assert_clean(&report, 30);
    let m = relay.metrics();
    assert!(m.streams_resumed() >= 5, "{}", m.streams_resumed());
    relay.shutdown();
}

/// A relay binary with one shard, upstream `ws://upstream.test:PORT`
/// (`connect_timeout` 2 s), run in a mount namespace whose `/etc/hosts` is
/// `dir/hosts` (written with `hosts` first: edited later, the relay sees
/// the change), its log in `dir/relay.log`. `Err` with the reason where
/// that cannot be made here (no `unshare`, not allowed), or where the
/// resolver does not answer `first` first for the name.
fn relay_with_hosts(
    dir: &std::path::Path,
    hosts: &str,
    first: &str,
    port: u16,
) -> Result<(std::process::Child, std::net::SocketAddr), String> {
    use std::process::{Command, Stdio};
    std::fs::create_dir_all(dir).unwrap();
    let hosts_file = dir.join("hosts");
    std::fs::write(&hosts_file, hosts).unwrap();
    let probe = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && getent ahosts upstream.test")
        .arg(&hosts_file)
        .output()
        .map_err(|e| format!("unshare not runnable ({e})"))?;
    let answer = String::from_utf8_lossy(&probe.stdout);
    if !probe.status.success() || !answer.starts_with(first) {
        return Err(format!(
            "no namespace with these hosts, or {first} not first: {answer}{}",
            String::from_utf8_lossy(&probe.stderr)
        ));
    }
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (client, admin) = (free(), free());
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{client}\"\nadmin_listen = \"{admin}\"\nshards = 1\n\n\
             [upstream]\nurl = \"ws://upstream.test:{port}/transcribe-websocket\"\n\
             connect_timeout = \"2s\"\n\n\
             [tokens]\nsecret_env = \"HOSTS_SECRET\"\n\n\
             [admin]\nstate_dir = \"{}\"\n\n\
             [[account]]\nid = \"a\"\nkey_env = \"HOSTS_KEY\"\nmax_concurrent_streams = 100\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let mut relay = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$1\" run --config \"$2\"")
        .arg(&hosts_file)
        .arg(env!("CARGO_BIN_EXE_clio-relay"))
        .arg(&config)
        .env("HOSTS_SECRET", HOSTS_SECRET)
        .env("HOSTS_KEY", KEY)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    let up = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(client).is_err() {
        assert!(relay.try_wait().unwrap().is_none(), "the relay exited");
        assert!(std::time::Instant::now() < up, "the relay never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((relay, client))
}

/// The token secret of [`relay_with_hosts`]'s relay.
const HOSTS_SECRET: &str = "a load-test token secret, well over 32 bytes long";

/// `streams` streams through `relay_with_hosts`'s relay at `client`.
fn load_through(client: std::net::SocketAddr, streams: usize) -> Result<LoadReport, String> {
    let keys = Arc::new(TokenKeys::from_config(&TokensConfig::new(Secret::new(
        HOSTS_SECRET,
    ))));
    let mut opts = smoke_options(
        Target::relay(client),
        AuthVia::Header,
        Credentials::Mint(keys, Duration::from_secs(600)),
    );
    opts.streams = streams;
    relay_load::run(&opts).map_err(|e| e.to_string())
}

/// An upstream name whose first address never answers the handshake (as
/// an IPv6 address behind a broken route would; here `::1` with a full
/// accept queue, so the kernel drops the SYNs) and whose second is
/// fake-soniox: every stream still opens, on the second address
/// ([`relay_with_hosts`]; skipped, with the reason, where it cannot run).
/// Tried one after the other, each open waited out `connect_timeout` on
/// the first address and failed.
#[test]
fn an_upstream_address_that_never_answers_is_passed_by() {
    let fake = echo_fake();
    let port = fake.addr().port();
    let hole = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    let hole_addr: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    if let Err(e) = hole.bind(&hole_addr.into()) {
        eprintln!("not checked: no IPv6 loopback here ({e})");
        return;
    }
    hole.listen(0).unwrap();
    let _queued = std::net::TcpStream::connect(hole_addr).unwrap();
    let dir = std::env::temp_dir().join(format!("clio-load-hole-{}", std::process::id()));
    let hosts = "::1 upstream.test\n127.0.0.1 upstream.test\n";
    let (mut relay, client) = match relay_with_hosts(&dir, hosts, "::1", port) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    let report = load_through(client, 4);
    let _ = relay.kill();
    let _ = relay.wait();
    std::fs::remove_dir_all(&dir).ok();
    assert_clean(&report.unwrap(), 4);
}

/// The resolver stops knowing upstream's name after the relay resolved it
/// (the name gone from `/etc/hosts`, no DNS server to ask: a resolver
/// outage): past the 30 s its addresses serve, streams still open, to the
/// addresses it had, while the relay asks again in the background and
/// says once that the name did not resolve. Before, the first open past
/// the 30 s waited for the resolver and failed with it.
#[test]
fn streams_open_through_a_resolver_outage() {
    let fake = echo_fake();
    let dir = std::env::temp_dir().join(format!("clio-load-dns-{}", std::process::id()));
    let hosts = "127.0.0.1 upstream.test\n";
    let (mut relay, client) = match relay_with_hosts(&dir, hosts, "127.0.0.1", fake.addr().port()) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("not checked: {why}");
            return;
        }
    };
    let before = load_through(client, 2);
    // In place (the same file, so the namespace's bind mount sees it).
    std::fs::write(dir.join("hosts"), "").unwrap();
    std::thread::sleep(clio_relay::core::dial::DNS_TTL + Duration::from_secs(1));
    let during = load_through(client, 4);
    let log = dir.join("relay.log");
    let said = |text: &str| std::fs::read_to_string(&log).unwrap().contains(text);
    // The refresh runs beside the opens: its failure may come after them.
    let mut warned = false;
    for _ in 0..300 {
        warned = said("the upstream name did not resolve");
        if warned {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = relay.kill();
    let _ = relay.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_clean(&before.unwrap(), 2);
    assert_clean(&during.unwrap(), 4);
    assert!(warned, "the failed refresh is said: {text}");
    assert_eq!(
        text.matches("the upstream name did not resolve").count(),
        1,
        "once per outage: {text}"
    );
}

/// Streams a relay refuses with 429 (here its one account at its
/// `max_concurrent_streams` of 1) get a hint that quotes the relay's
/// answer, which names the limit; the line alone can only list the
/// limits it may be. Before, the answer was in the JSON's
/// `refusal_reasons` only.
#[test]
fn a_relays_429_is_quoted_in_its_hint() {
    let fake = echo_fake();
    let mut cfg = relay_config(&fake.url());
    cfg.accounts[0].max_concurrent_streams = 1;
    let relay = clio_relay::cli::server::start(&cfg).expect("relay starts");
    let keys = Arc::new(TokenKeys::from_config(&cfg.tokens));
    let mut opts = smoke_options(
        Target::relay(relay.client_addr),
        AuthVia::Header,
        Credentials::Mint(keys, Duration::from_secs(600)),
    );
    opts.streams = 3;
    opts.ramp_per_sec = 0.0;
    // Long enough that the three overlap however slow the machine is.
    opts.pace = Pace::Times(1.0);
    let report = relay_load::run(&opts).expect("load runs");
    relay.shutdown();
    let table = report.table();
    let refused = report.streams_failed.get("http 429").copied().unwrap_or(0)
        + report.streams_failed.get("error 429").copied().unwrap_or(0);
    assert!(refused >= 1, "{table}");
    let said: Vec<&String> = report
        .refusal_reasons
        .iter()
        .filter(|((f, _), _)| f.ends_with(" 429"))
        .map(|((_, m), _)| m)
        .collect();
    assert!(!said.is_empty(), "the relay said nothing: {table}");
    let hint = table
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "hint: {refused} streams refused with 429 (answered "
            ))
        })
        .unwrap_or_else(|| panic!("no quoting 429 hint: {table}"));
    for m in said {
        assert!(
            hint.contains(&format!("{m:?} x")),
            "{m:?} not quoted: {hint}"
        );
    }
}
