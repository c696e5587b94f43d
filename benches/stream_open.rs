//! Microbenchmarks of a stream's open beside the frame path: token mint
//! and verify, and the key ring's pick of an account. (The frame path's
//! own kernels are `clio-frame`'s benchmark: `cargo bench -p clio-frame`.)
//!
//! `cargo bench --bench stream_open` (criterion prints throughput per input).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use clio_relay::core::keyring::{AccountState, KeyRing, KeySlot, RingSlot};
use clio_relay::core::secret::Secret;
use clio_relay::core::token::TokenKeys;
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

criterion_group!(benches, tokens, keyring);
criterion_main!(benches);
