//! Microbenchmarks of a stream's open beside the frame path: token mint
//! and verify, the key ring's pick of an account, and the client's upgrade
//! (its request head parsed and the 101 answer built), and the device
//! table every open goes through beside the once-a-second sweep of it. (The frame path's
//! own kernels are `clio-frame`'s benchmark: `cargo bench -p clio-frame`.)
//!
//! `cargo bench --bench stream_open` (criterion prints throughput per input).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use clio_relay::core::config::DeviceLimits;
use clio_relay::core::devices::Devices;
use clio_relay::core::keyring::{AccountState, KeyRing, KeySlot, RingSlot};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::{Claims, TokenKeys};
use clio_relay::dataplane::http;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn tokens(c: &mut Criterion) {
    let keys = TokenKeys::new(&Secret::new("a".repeat(64)), None, Duration::from_secs(30));
    let token = keys
        .mint("device-1", Duration::from_secs(900), SystemTime::now())
        .unwrap();
    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mint", |b| {
        b.iter(|| {
            keys.mint(
                black_box("device-1"),
                Duration::from_secs(900),
                SystemTime::now(),
            )
        })
    });
    g.bench_function("verify", |b| {
        b.iter(|| keys.verify(black_box(&token), SystemTime::now()))
    });
    g.finish();
}

fn keyring(c: &mut Criterion) {
    let epoch = Instant::now();
    let accounts: Vec<_> = (0..8)
        .map(|i| RingSlot {
            account: AccountState::new(&format!("a{i}"), i, "r", "default", true, 1000, epoch),
            key: KeySlot::new(Secret::new(format!("k{i}")), 0),
        })
        .collect();
    let mut ring = KeyRing::new(&accounts);
    let pools = vec!["default".to_string()];
    let mut g = c.benchmark_group("keyring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pick_and_release_8_accounts", |b| {
        b.iter(|| drop(black_box(ring.pick(Instant::now(), 0, &pools))))
    });
    g.finish();
}

/// The head `relay-load` sends (the token in `Authorization`).
const LOAD_HEAD: &str = "GET /v1/transcribe HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer clio1.ZGV2aWNlLTE.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n\r\n";

/// A browser's head (the token in the subprotocol).
const BROWSER_HEAD: &str = "GET /v1/transcribe HTTP/1.1\r\nHost: relay.example.com\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\nUpgrade: websocket\r\nOrigin: https://app.example.com\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Protocol: soniox-api-key, clio1.ZGV2aWNlLTE.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n\r\n";

/// The baseline: the head turned into an `http::Request` (a header map,
/// each name and value copied) and the 101 built by tungstenite's
/// `create_response`, as the relay did until 2026-12-04.
fn answer_via_http_request(head: &[u8]) -> Option<Vec<u8>> {
    use tungstenite::http as h;
    let mut headers = vec![httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let mut b = h::Request::builder()
        .method(req.method?)
        .uri(req.path?)
        .version(h::Version::HTTP_11);
    let mut token = None;
    for x in req.headers.iter() {
        b = b.header(x.name, x.value);
        if x.name.eq_ignore_ascii_case("authorization") {
            token = std::str::from_utf8(x.value).ok().map(str::to_string);
        }
    }
    let request = b.body(()).ok()?;
    let path = request.uri().path().to_string();
    let resp = tungstenite::handshake::server::create_response(&request).ok()?;
    let mut out = String::with_capacity(256);
    out.push_str("HTTP/1.1 101 Switching Protocols\r\n");
    for (name, value) in resp.headers() {
        out.push_str(name.as_str());
        out.push_str(": ");
        out.push_str(value.to_str().ok()?);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    black_box((path, token));
    Some(out.into_bytes())
}

fn upgrade(c: &mut Criterion) {
    let mut g = c.benchmark_group("upgrade");
    g.throughput(Throughput::Elements(1));
    for (name, head) in [("relay_load", LOAD_HEAD), ("browser", BROWSER_HEAD)] {
        let head = head.as_bytes();
        g.bench_function(format!("{name}/in_place"), |b| {
            b.iter(|| {
                let req = http::parse_client_request(black_box(head)).unwrap();
                http::upgrade_response(&req).unwrap()
            })
        });
        g.bench_function(format!("{name}/via_http_request"), |b| {
            b.iter(|| answer_via_http_request(black_box(head)).unwrap())
        });
    }
    g.finish();
}

/// Devices a busy relay tracks: with a daily audio allowance, every device
/// that streamed today is kept all day.
const TRACKED_DEVICES: usize = 100_000;

fn claims(device: String) -> Claims {
    Claims {
        device_id: device,
        issued_at: 0,
        expires_at: u64::MAX,
        token_id: "0011223344556677".into(),
        key_id: "k1".into(),
        tier: None,
        pools: vec!["default".into()],
    }
}

/// The device table: an open's admission with 100,000 devices tracked,
/// and the admin thread's once-a-second sweep over all of them. The sweep
/// holds the table's lock for as long as it takes on each part it locks,
/// and an open on a shard waits for that lock.
fn devices(c: &mut Criterion) {
    let devices = Devices::default();
    devices.set_daily_audio(true);
    let limits = DeviceLimits {
        max_concurrent_streams: 4,
        streams_per_minute: 0,
        audio_seconds_per_day: 3600,
        max_stream_length: Duration::ZERO,
    };
    let now = SystemTime::now();
    for i in 0..TRACKED_DEVICES {
        let permit = devices
            .admit(&claims(format!("device-{i}")), &limits, now)
            .unwrap();
        assert!(permit.add_audio(1000, now));
    }
    let mut g = c.benchmark_group("devices");
    g.throughput(Throughput::Elements(1));
    let open = claims("device-7".into());
    g.bench_function("admit_with_100k_tracked", |b| {
        b.iter(|| devices.admit(black_box(&open), &limits, now).unwrap())
    });
    g.bench_function("sweep_100k_tracked", |b| {
        b.iter(|| devices.sweep(black_box(now), false))
    });
    // The worst case for an open: the sweep always under way beside it
    // (once a second in the relay, so an open meets it now and then).
    let sweeping = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|s| {
        s.spawn(|| {
            while sweeping.load(std::sync::atomic::Ordering::Relaxed) {
                devices.sweep(now, false);
            }
        });
        g.bench_function("admit_while_sweeping", |b| {
            b.iter(|| devices.admit(black_box(&open), &limits, now).unwrap())
        });
        sweeping.store(false, std::sync::atomic::Ordering::Relaxed);
    });
    g.finish();
    assert_eq!(
        devices.tracked(),
        TRACKED_DEVICES,
        "a device with audio today is kept"
    );
}

criterion_group!(benches, tokens, keyring, upgrade, devices);
criterion_main!(benches);
