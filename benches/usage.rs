//! Microbenchmark of the admin thread's usage ledger: the ended streams of
//! one second (its `take_usage` pass) added to a book that already holds
//! the last [`RECENT_STREAMS`] streams, as a relay's book does after its
//! first hundred thousand streams.
//!
//! `cargo bench --bench usage` (criterion prints the time per pass).

use std::hint::black_box;

use clio_relay::control::usage::{UsageBook, RECENT_STREAMS};
use clio_relay::core::usage::UsageRecord;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

/// Ended streams per pass: 250 a second is a busy relay's rate.
const PER_PASS: usize = 250;

fn record(n: usize) -> UsageRecord {
    UsageRecord {
        day: 20_000,
        account: format!("acct-{}", n % 8),
        device: format!("device-{}", n % 1000),
        reference_id: format!("clio-{n:016x}"),
        audio_ms_relay: 10_000,
        audio_ms_upstream: Some(10_000),
        bytes_up: 320_000,
        bytes_down: 4_000,
        error: None,
        part: false,
    }
}

fn add(c: &mut Criterion) {
    let mut book = UsageBook::default();
    let mut next = 0;
    let batch = |next: &mut usize| {
        let b: Vec<_> = (*next..*next + PER_PASS).map(record).collect();
        *next += PER_PASS;
        b
    };
    while next < RECENT_STREAMS {
        let b = batch(&mut next);
        book.add(&b);
    }
    let mut g = c.benchmark_group("usage_book");
    g.throughput(Throughput::Elements(PER_PASS as u64));
    g.bench_function("add_a_pass_to_a_full_book", |b| {
        b.iter_batched(
            || batch(&mut next),
            |records| book.add(black_box(&records)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    let last = next - 1;
    assert!(book
        .reference_audio_ms(&format!("clio-{last:016x}"), &format!("acct-{}", last % 8))
        .is_some());
}

criterion_group!(benches, add);
criterion_main!(benches);
