//! Microbenchmarks of the frame path's kernels, each beside its baseline:
//! in-place re-masking against a plain byte loop, header parse and write,
//! and a whole read buffer of audio frames scanned and re-masked. No I/O:
//! this crate alone.
//!
//! `cargo bench -p clio-frame` (criterion prints throughput per input).

use std::hint::black_box;

use clio_frame::frame::{build_frame, parse_header, write_header, Opcode, Sender, MAX_HEADER_LEN};
use clio_frame::mask::{apply_mask, apply_mask_bytewise, rekey, MaskKeys};
use clio_frame::scanner::FrameScanner;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn masking(c: &mut Criterion) {
    let mut g = c.benchmark_group("remask");
    for size in [3200usize, 16 * 1024, 256 * 1024] {
        let mut buf = vec![0x5Au8; size];
        let key = rekey([1, 2, 3, 4], [9, 8, 7, 6]);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("apply_mask", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), key, 1))
        });
        g.bench_with_input(BenchmarkId::new("bytewise", size), &size, |b, _| {
            b.iter(|| apply_mask_bytewise(black_box(&mut buf), key, 1))
        });
    }
    g.finish();
}

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(1));
    for len in [125u64, 3200, 1 << 20] {
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut h, true, Opcode::Binary, Some([1, 2, 3, 4]), len);
        g.bench_with_input(BenchmarkId::new("parse", len), &len, |b, _| {
            b.iter(|| parse_header(black_box(&h[..n]), Sender::Client, 1 << 21))
        });
        g.bench_with_input(BenchmarkId::new("write", len), &len, |b, &len| {
            let mut out = [0u8; MAX_HEADER_LEN];
            b.iter(|| {
                write_header(
                    black_box(&mut out),
                    true,
                    Opcode::Binary,
                    Some([1, 2, 3, 4]),
                    black_box(len),
                )
            })
        });
    }
    g.finish();
}

/// A 16 KiB read buffer holding five 100 ms audio frames (3,206 bytes each):
/// what one client read looks like under load.
fn scan(c: &mut Criterion) {
    let mut wire = Vec::new();
    for i in 0..5u8 {
        wire.extend(build_frame(Opcode::Binary, &[i; 3200], Some([i, 1, 2, 3])));
    }
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    let mut masks = MaskKeys::default();
    g.bench_function("client_to_upstream_remask", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |w| {
                let mut s = FrameScanner::new(Sender::Client, 1 << 20);
                s.scan(black_box(w), Some(&mut masks))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // Baseline: unmask into a second buffer and mask again, the message-level way.
    g.bench_function("baseline_unmask_copy_mask", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |w| {
                let mut at = 0;
                let mut out = Vec::with_capacity(w.len());
                while at < w.len() {
                    let h = parse_header(&w[at..], Sender::Client, 1 << 20)
                        .unwrap()
                        .unwrap();
                    let end = at + h.header_len + h.payload_len as usize;
                    let mut payload = w[at + h.header_len..end].to_vec();
                    apply_mask_bytewise(&mut payload, h.mask.unwrap(), 0);
                    let key = masks.next_key();
                    apply_mask_bytewise(&mut payload, key, 0);
                    out.extend(build_frame(Opcode::Binary, &[], Some(key)));
                    out.extend_from_slice(&payload);
                    at = end;
                }
                out
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let server: Vec<u8> = (0..5)
        .flat_map(|_| build_frame(Opcode::Text, &[b'x'; 200], None))
        .collect();
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("upstream_to_client_pass", |b| {
        let mut w = server.clone();
        b.iter(|| {
            let mut s = FrameScanner::new(Sender::Server, 1 << 20);
            s.scan(black_box(&mut w), None)
        })
    });
    g.finish();
}

criterion_group!(benches, masking, headers, scan);
criterion_main!(benches);
