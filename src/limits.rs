//! `hpmig limits`: how fast this machine copies and compares memory with N
//! threads at once, each on buffers of its own: the ceilings that
//! `scripts/scaling.sh` sets beside round 0's rates (page granularity's
//! round 0 is bound by copying, segment granularity's round 0 with a full
//! shadow compares every page with a zero one).
//!
//! Each thread first-touches its two buffers (so on a NUMA host they lie on
//! its own node), then all threads copy one buffer onto the other
//! (`copy_from_slice`, glibc's memcpy) for [`MEASURE`], then compare the two
//! equal buffers whole (slice equality, glibc's memcmp) for as long. A rate
//! counts the bytes of one buffer per pass: bytes copied, or bytes of guest
//! memory a diff would have compared. The total is all threads' bytes over
//! the longest thread's time; with fewer threads than cores each is pinned
//! to a core of its own.
//!
//! After a line saying how it measured, it prints one line per measurement,
//! whose fields scripts read by position (awk: `$5` the total, `$9` per
//! thread), both in GiB/s:
//!
//! ```text
//! memcpy threads   4 total    12.34 GiB/s per thread    3.08 GiB/s
//! memcmp threads   4 total    20.10 GiB/s per thread    5.03 GiB/s
//! ```

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::Args;

use crate::outcome::usage;
use crate::units::{human, parse_size};

/// How long each of the two measurements runs.
const MEASURE: Duration = Duration::from_millis(500);

/// The byte both buffers are filled with: not zero, so no page of either is
/// the kernel's shared zero page.
const FILL: u8 = 0x5a;

/// The smallest buffer measured: smaller ones measure caches, not memory.
const MIN_SIZE: u64 = 1 << 20;

#[derive(Args, Debug)]
pub struct LimitsArgs {
    /// Threads measured together (1 to 256), each on buffers of its own and,
    /// with no more threads than cores, pinned to a core of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Size of each of a thread's two buffers (at least 1M; e.g. 256M), large
    /// enough that no cache holds them.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    size: u64,
}

/// What one thread did in one measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    bytes: u64,
    time: Duration,
}

/// Both measurements of one thread.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    copy: Pass,
    compare: Pass,
}

pub fn run(a: &LimitsArgs) -> Result<bool> {
    if a.size < MIN_SIZE {
        return Err(usage(format!(
            "--size {} is below 1M: that measures caches, not memory",
            human(a.size)
        )));
    }
    let size = usize::try_from(a.size).map_err(|_| usage("--size is too large"))?;
    let threads = usize::from(a.threads);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pin = threads <= cores.len();
    // Reserved here, untouched: each thread's first write places its pages.
    // A reservation that fails is an error, not an abort.
    let mut buffers = Vec::with_capacity(threads);
    for _ in 0..threads {
        let mut pair = (Vec::new(), Vec::new());
        for buf in [&mut pair.0, &mut pair.1] {
            buf.try_reserve_exact(size).map_err(|e| {
                anyhow!(
                    "reserving {threads} x 2 x {} of buffers: {e}",
                    human(a.size)
                )
            })?;
        }
        buffers.push(pair);
    }
    let start = Barrier::new(threads);
    let measured = std::thread::scope(|s| {
        let handles: Vec<_> = buffers
            .into_iter()
            .enumerate()
            .map(|(i, (src, dst))| {
                let core = if pin { cores.get(i).copied() } else { None };
                let start = &start;
                s.spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    measure(src, dst, size, start)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    let placement = if pin {
        "each pinned to a core of its own"
    } else {
        "not pinned (more threads than cores)"
    };
    println!(
        "limits: threads {threads}, {placement}, 2 x {} each, {:.1} s per measurement",
        human(a.size),
        MEASURE.as_secs_f64()
    );
    let copy: Vec<Pass> = measured.iter().map(|m| m.copy).collect();
    let compare: Vec<Pass> = measured.iter().map(|m| m.compare).collect();
    for (name, passes) in [("memcpy", &copy), ("memcmp", &compare)] {
        let total = gib_per_s(passes);
        if total <= 0.0 {
            return Err(anyhow!("{name}: a thread measured nothing"));
        }
        println!(
            "{name} threads {threads:>3} total {total:>8.2} GiB/s per thread {:>7.2} GiB/s",
            total / threads as f64
        );
    }
    Ok(true)
}

/// One thread's work: fill both buffers, wait for the others, copy for
/// [`MEASURE`], wait again, compare for as long.
fn measure(mut src: Vec<u8>, mut dst: Vec<u8>, size: usize, start: &Barrier) -> Measured {
    // Within the reserved capacity: no reallocation, every page written.
    src.resize(size, FILL);
    dst.resize(size, FILL);
    start.wait();
    let copy = timed(
        || {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        },
        size,
    );
    start.wait();
    let compare = timed(
        || {
            black_box(black_box(&src[..]) == black_box(&dst[..]));
        },
        size,
    );
    Measured { copy, compare }
}

/// Runs `pass` until [`MEASURE`] has gone by; each pass covers `size` bytes.
fn timed(mut pass: impl FnMut(), size: usize) -> Pass {
    let begin = Instant::now();
    let mut bytes = 0u64;
    loop {
        pass();
        bytes += size as u64;
        let time = begin.elapsed();
        if time >= MEASURE {
            return Pass { bytes, time };
        }
    }
}

/// All threads' bytes over the longest thread's time, in GiB/s.
fn gib_per_s(passes: &[Pass]) -> f64 {
    let bytes: u64 = passes.iter().map(|p| p.bytes).sum();
    let longest = passes.iter().map(|p| p.time).max().unwrap_or_default();
    if longest.is_zero() {
        return 0.0;
    }
    bytes as f64 / longest.as_secs_f64() / f64::from(1u32 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_all_bytes_over_the_longest_time() {
        let gib = 1u64 << 30;
        let passes = [
            Pass {
                bytes: 2 * gib,
                time: Duration::from_secs(1),
            },
            Pass {
                bytes: 2 * gib,
                time: Duration::from_secs(2),
            },
        ];
        assert!((gib_per_s(&passes) - 2.0).abs() < 1e-9);
        assert_eq!(gib_per_s(&[]), 0.0);
    }
}
