//! `diff`: scan + diff throughput of the segment encoder on pages with 0.1 %,
//! 1 %, 10 % and 100 % of their bytes changed, beside a memcmp-style baseline
//! that reads the same bytes (a full-length compare of each page with an
//! identical copy, so it never stops early).
//!
//! Per page the measured path is the worker's: copy the live page into the
//! snapshot and diff it against the shadow (one pass, as the worker does),
//! write the records into a buffer the size of a TCP worker's ring
//! ([`RingShape::COPIED`], the default transport's), and bring the shadow
//! up to date. 16 MiB of pages, larger than the caches, as in a real round.
//! `segment-*` is the default plan (segments, Words records or the whole
//! page, the cheapest); `segments-only-avx2` is what a version 3 peer gets
//! (no Words records, the block scan), in the same run.
//!
//! `fingerprint`: the same path with block fingerprints instead of a
//! shadow (`--shadow fingerprint`): copy the live page into the snapshot
//! and hash its 64-byte blocks (one pass, as the worker does),
//! compare with the stored fingerprints, plan the changed blocks, write the
//! records; on pages with 0.1 %, 1 %, 10 % and 100 % of their *blocks*
//! changed, beside the shadow diff and the memcmp baseline on the same
//! pages, and the hash alone. The target: at least half of
//! memcmp's rate.
//!
//! `page-hash`: the keyed page hash of incremental verification (each end
//! hashes every page it sends or lands), beside the memcmp baseline.
//!
//! Run: `cargo bench -p hpmig-bench --bench diff`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hpmig_core::memory::host_page_size;
use hpmig_core::memory::PageIndex;
use hpmig_core::protocol::Granularity;
use hpmig_core::ring::RingShape;
use hpmig_core::segment::diff::Differ;
use hpmig_core::segment::fingerprint::{BlockHasher, FingerprintStore, HashPath, BLOCK};
use hpmig_core::segment::{EncoderConfig, PageEncoder};
use hpmig_core::verify::PageHasher;

const PAGES: usize = 4096;

/// Live pages and shadows that differ in `permille` ‰ of their bytes, as
/// 8-byte writes at random offsets (100 % rewrites every byte).
fn pages(permille: usize) -> (Vec<u8>, Vec<u8>) {
    let ps = host_page_size();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let shadow: Vec<u8> = (0..PAGES * ps).map(|_| next() as u8).collect();
    let mut live = shadow.clone();
    for page in live.chunks_exact_mut(ps) {
        if permille >= 1000 {
            page.iter_mut().for_each(|b| *b = !*b);
            continue;
        }
        let words = (ps * permille / 1000).div_ceil(8);
        for _ in 0..words {
            let at = (next() as usize % (ps / 8)) * 8;
            // XOR with a value that has no zero byte: all 8 bytes change.
            let flip = next() | 0x0101_0101_0101_0101;
            for (i, b) in page[at..at + 8].iter_mut().enumerate() {
                *b ^= (flip >> (8 * i)) as u8;
            }
        }
    }
    (live, shadow)
}

/// Bytes of a TCP worker's ring: where the records are written.
fn ring_bytes() -> usize {
    RingShape::COPIED.slots * RingShape::COPIED.slot_size
}

/// The worker's path over every page: copy it into the snapshot and plan
/// it against its shadow, write its records (the ring-sized `out` reused),
/// update the shadow. A pass leaves the shadow holding what it sent, so the
/// passes alternate what they send between `live` and `original` (the
/// shadow's first contents): every pass finds the same bytes changed.
fn shadow_pass(
    enc: &mut PageEncoder,
    (live, original): (&[u8], &[u8]),
    shadow: &mut [u8],
    flip: &mut bool,
    snapshot: &mut [u8],
    out: &mut [u8],
) -> usize {
    let ps = snapshot.len();
    *flip = !*flip;
    let from = if *flip { live } else { original };
    let mut at = 0;
    for (p, (l, s)) in from
        .chunks_exact(ps)
        .zip(shadow.chunks_exact_mut(ps))
        .enumerate()
    {
        // SAFETY: `l` is a page of `from`, as long as `snapshot`, which is
        // a buffer of its own.
        let plan = unsafe { enc.copy_and_plan(l.as_ptr(), snapshot, s) };
        if out.len() - at < 2 * ps {
            at = 0;
        }
        at += enc.write(plan, (p * ps) as u64, snapshot, &mut out[at..]);
        enc.update_shadow(plan, snapshot, s);
    }
    black_box(at)
}

/// Times [`shadow_pass`] with `enc` over `pages` (live, shadow) as `name`
/// at `label`, on a shadow of its own.
fn bench_shadow(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    label: &str,
    mut enc: PageEncoder,
    (live, shadow): (&[u8], &[u8]),
    out: &mut [u8],
) {
    let mut snapshot = vec![0u8; host_page_size()];
    let (mut current, mut flip) = (shadow.to_vec(), false);
    group.bench_function(BenchmarkId::new(name, label), |b| {
        b.iter(|| {
            shadow_pass(
                &mut enc,
                (live, shadow),
                &mut current,
                &mut flip,
                &mut snapshot,
                out,
            )
        })
    });
}

/// The baseline: a full-length compare of each page with an identical copy.
fn memcmp_pass(live: &[u8], copy: &[u8], ps: usize) -> usize {
    let mut equal = 0usize;
    for (l, c) in live.chunks_exact(ps).zip(copy.chunks_exact(ps)) {
        equal += usize::from(black_box(l) == black_box(c));
    }
    black_box(equal)
}

fn bench_diff(c: &mut Criterion) {
    let ps = host_page_size();
    let mut group = c.benchmark_group("diff");
    group.throughput(Throughput::Bytes((PAGES * ps) as u64));
    group.sample_size(20);
    for permille in [1usize, 10, 100, 1000] {
        let label = format!("{:.1}%", permille as f64 / 10.0);
        let (live, shadow) = pages(permille);
        let copy = live.clone();
        let mut out = vec![0u8; ring_bytes()];
        // The default, the portable comparator, and the segments-only plan
        // a version 3 peer gets (no Words records; the block scan).
        for (differ, words) in [
            (Differ::detect(), true),
            (Differ::portable(), true),
            (Differ::detect(), false),
        ] {
            let name = match (differ.uses_avx2(), words) {
                (true, true) => "segment-avx2",
                (false, true) => "segment-portable",
                (true, false) => "segments-only-avx2",
                (false, false) => "segments-only-portable",
            };
            let mut cfg = EncoderConfig::new(Granularity::Segment);
            cfg.words = words;
            let enc = PageEncoder::with_differ(cfg, ps, differ);
            bench_shadow(&mut group, name, &label, enc, (&live, &shadow), &mut out);
        }
        group.bench_with_input(
            BenchmarkId::new("memcmp-baseline", &label),
            &permille,
            |b, _| b.iter(|| memcmp_pass(&live, &copy, ps)),
        );
    }
    group.finish();
}

/// Live pages and shadows that differ in `permille` ‰ of their 64-byte
/// blocks (each changed block differs in one 8-byte word).
fn pages_by_block(permille: u64) -> (Vec<u8>, Vec<u8>) {
    let ps = host_page_size();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let shadow: Vec<u8> = (0..PAGES * ps).map(|_| next() as u8).collect();
    let mut live = shadow.clone();
    for block in live.chunks_exact_mut(BLOCK) {
        if permille >= 1000 || next() % 1000 < permille {
            let at = (next() as usize % (BLOCK / 8)) * 8;
            let flip = next() | 0x0101_0101_0101_0101;
            for (i, b) in block[at..at + 8].iter_mut().enumerate() {
                *b ^= (flip >> (8 * i)) as u8;
            }
        }
    }
    (live, shadow)
}

fn bench_fingerprint(c: &mut Criterion) {
    let ps = host_page_size();
    let mut group = c.benchmark_group("fingerprint");
    group.throughput(Throughput::Bytes((PAGES * ps) as u64));
    group.sample_size(20);
    let key = 0x9e37_79b9_7f4a_7c15;
    for permille in [1u64, 10, 100, 1000] {
        let label = format!("{:.1}%", permille as f64 / 10.0);
        let (live, shadow) = pages_by_block(permille);
        let copy = live.clone();
        let mut snapshot = vec![0u8; ps];
        let mut out = vec![0u8; ring_bytes()];
        let best = BlockHasher::with_key(key).expect("a nonzero key");
        // The default path at every level; the slower ones (where the CPU
        // has them) at one level, to show how much slower.
        let hashers = HashPath::ALL.into_iter().filter_map(|p| {
            (p == best.path() || permille == 10)
                .then(|| best.clone().on(p))
                .flatten()
        });
        for hasher in hashers {
            let name = format!("fingerprint-{}", hasher.path().name());
            let store = FingerprintStore::new(hasher, ps, PAGES / 64);
            let mut part = store.parts(1).pop().expect("one part");
            for (p, s) in shadow.chunks_exact(ps).enumerate() {
                part.compare_and_store(PageIndex(p as u64), s);
            }
            let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), ps);
            // Each pass stores what it saw: alternate between the two
            // memories, so that every pass finds the same blocks changed.
            let mut flip = false;
            group.bench_with_input(BenchmarkId::new(&name, &label), &permille, |b, _| {
                b.iter(|| {
                    flip = !flip;
                    let from = if flip { &live } else { &shadow };
                    let mut at = 0;
                    for (p, l) in from.chunks_exact(ps).enumerate() {
                        // As the worker: copy and hash in one pass.
                        // SAFETY: `l` is `ps` readable bytes, `snapshot` a
                        // separate buffer of `ps`.
                        let changed = unsafe {
                            part.copy_compare_and_store(
                                PageIndex(p as u64),
                                l.as_ptr(),
                                &mut snapshot,
                            )
                        };
                        let Some(changed) = changed else {
                            continue;
                        };
                        let plan = enc.plan_blocks(&snapshot, changed);
                        if out.len() - at < 2 * ps {
                            at = 0;
                        }
                        at += enc.write(plan, (p * ps) as u64, &snapshot, &mut out[at..]);
                    }
                    black_box(at)
                })
            });
        }
        // The hash alone (no snapshot copy, no compare, no records): where
        // the fingerprint path's time goes.
        let hasher = BlockHasher::with_key(key).expect("a nonzero key");
        let mut prints = vec![0u64; ps / BLOCK];
        group.bench_with_input(BenchmarkId::new("hash-only", &label), &permille, |b, _| {
            b.iter(|| {
                let mut x = 0u64;
                for l in live.chunks_exact(ps) {
                    hasher.hash_blocks(black_box(l), &mut prints);
                    x ^= prints[0];
                }
                black_box(x)
            })
        });
        let enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), ps);
        bench_shadow(
            &mut group,
            "shadow-diff",
            &label,
            enc,
            (&live, &shadow),
            &mut out,
        );
        group.bench_with_input(
            BenchmarkId::new("memcmp-baseline", &label),
            &permille,
            |b, _| b.iter(|| memcmp_pass(&live, &copy, ps)),
        );
    }
    group.finish();
}

/// `page-hash`: the keyed page hash both ends take of every page sent and
/// landed (incremental verification), over 16 MiB of pages, beside the
/// memcmp baseline reading the same bytes twice over.
fn bench_page_hash(c: &mut Criterion) {
    let ps = host_page_size();
    let mut group = c.benchmark_group("page-hash");
    group.throughput(Throughput::Bytes((PAGES * ps) as u64));
    group.sample_size(20);
    let (live, _) = pages(1000);
    let copy = live.clone();
    let hasher = PageHasher::new(&[7; 32], ps);
    group.bench_function("hash", |b| {
        b.iter(|| {
            let mut sum = 0u128;
            for (p, page) in live.chunks_exact(ps).enumerate() {
                sum = sum.wrapping_add(hasher.hash((p * ps) as u64, page));
            }
            black_box(sum)
        })
    });
    group.bench_function("memcmp-baseline", |b| {
        b.iter(|| memcmp_pass(&live, &copy, ps))
    });
    group.finish();
}

criterion_group!(benches, bench_diff, bench_fingerprint, bench_page_hash);
criterion_main!(benches);
