//! `wire`: protocol encode and decode of a batch of segment records, and
//! zstd on page data (text-like, half-zero and random pages).
//!
//! Run: `cargo bench -p hpmig-bench --bench wire`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hpmig_core::protocol::{Header, Records, HEADER_LEN};
use hpmig_core::segment::compress::{PageCompressor, PageDecompressor};

const PS: usize = 4096;

/// A 256 KiB batch of 8-byte segments, as a sparse round sends.
fn batch() -> Vec<u8> {
    let mut b = Vec::with_capacity(256 << 10);
    let mut i = 0u64;
    while b.len() + HEADER_LEN + 8 <= 256 << 10 {
        b.extend_from_slice(&Header::segment(i * 4096 + (i % 500) * 8, 8).encode());
        b.extend_from_slice(&i.to_le_bytes());
        i += 1;
    }
    b
}

fn bench_protocol(c: &mut Criterion) {
    let b = batch();
    let mut g = c.benchmark_group("protocol");
    g.throughput(Throughput::Bytes(b.len() as u64));
    g.bench_function("decode-256KiB-of-8B-segments", |x| {
        x.iter(|| {
            Records::new(black_box(&b), PS as u32)
                .map_while(Result::ok)
                .map(|(h, p)| h.len as usize + p.len())
                .sum::<usize>()
        })
    });
    g.bench_function("encode-256KiB-of-8B-segments", |x| {
        let mut out = vec![0u8; b.len()];
        x.iter(|| {
            let mut at = 0;
            let mut i = 0u64;
            while at + HEADER_LEN + 8 <= out.len() {
                out[at..at + HEADER_LEN].copy_from_slice(&Header::segment(i * 4096, 8).encode());
                out[at + HEADER_LEN..at + HEADER_LEN + 8].copy_from_slice(&i.to_le_bytes());
                at += HEADER_LEN + 8;
                i += 1;
            }
            black_box(&mut out);
            at
        })
    });
    g.finish();
}

fn bench_zstd(c: &mut Criterion) {
    let text: Vec<u8> = b"hpmig moves guest memory; "
        .iter()
        .copied()
        .cycle()
        .take(PS)
        .collect();
    let half_zero: Vec<u8> = (0..PS)
        .map(|i| if i < PS / 2 { 0 } else { (i * 31 % 251) as u8 })
        .collect();
    let random = hpmig_core::memory::pseudo_random_bytes(88172645463325252, PS);
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(PS as u64));
    for (name, page) in [
        ("text", &text),
        ("half-zero", &half_zero),
        ("random", &random),
    ] {
        let mut comp = PageCompressor::new().expect("zstd");
        let mut out = vec![0u8; PS];
        g.bench_with_input(BenchmarkId::new("compress", name), page, |b, p| {
            b.iter(|| comp.compress(black_box(p), &mut out))
        });
        if let Some(n) = comp.compress(page, &mut out) {
            let mut d = PageDecompressor::new().expect("zstd");
            let mut back = vec![0u8; PS];
            let packed = out[..n].to_vec();
            g.bench_with_input(BenchmarkId::new("decompress", name), &packed, |b, p| {
                b.iter(|| d.decompress(black_box(p), &mut back))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_protocol, bench_zstd);
criterion_main!(benches);
