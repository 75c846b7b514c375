//! `hpmig model`: predicts pre-copy migrations of guests larger and links
//! faster than a test machine has, from what `hpmig bench` measured.
//!
//! The model replays hpmig's controller round by round:
//! - round 0 sends `b0 · M` bytes (`b0`: bytes per byte of guest memory the
//!   measured round 0 sent, per workload and method) and scans all of M;
//! - a round of duration T leaves the next one the data the guest dirtied in
//!   T. Random 8-byte stores at `w` stores/s over P pages touch
//!   D = P(1 − e^(−wT/P)) distinct pages with k = wT/D stores each; page
//!   pre-copy sends D · 4112 bytes, segment pre-copy D · min(24k, 4112)
//!   (header plus 8 bytes per store, at most the whole page). Sequential
//!   page rewrites (dense) dirty min(P, wT/512) whole pages, the hotspot
//!   workload the same 64 pages, idle nothing. `w` is the stores/s the guest
//!   kept up *during* migration (the bench's measured progress);
//! - a round lasts max(bytes / link, scanned bytes / scan rate), the scan
//!   rate measured on uncapped round 0s;
//! - the controller stops when the next round's bytes over the rate so far
//!   (all bytes over all round time) fit the 300 ms downtime target or are
//!   under 256 KiB, or after 10 rounds, or after 5 rounds
//!   without a smaller work set (the bench's policy); downtime is the last
//!   round plus a cost per guest byte (hpmig's digest check, mostly) plus a
//!   fixed cost, both fitted by least squares on the converged measured
//!   cells (with one guest size: the measured digest rate and the median
//!   residual).
//!
//! It cannot say: anything about a guest whose writes are not like the
//! measured workloads; link effects beyond a bandwidth cap (latency, loss,
//! congestion); the scan rate of a machine with more cores (it assumes this
//! host's, which measured workers scale sub-linearly, see README); or
//! memory bandwidth limits of 1 TiB hosts.
//!
//! It reads bench.json through [`crate::results`] (any schema up to
//! [`crate::results::SCHEMA`]) and calibrates only on hpmig's cells.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use hpmig_microvm::Workload;

use crate::human;
use crate::results::{BenchResults, Cell, Variant};
use crate::stats::{median, quantile};

/// What `hpmig model` predicts, from what.
#[derive(Clone, Debug)]
pub struct Options {
    /// The bench.json `hpmig bench` wrote.
    pub from: PathBuf,
    /// Guest sizes to predict, bytes.
    pub memory: Vec<u64>,
    /// Link speeds to predict, Gbit/s.
    pub link_gbit: Vec<f64>,
    /// Where to write model.csv (next to bench.json when `None`).
    pub out: Option<PathBuf>,
    /// Scan (snapshot + diff) rate of the target hosts, GB/s, instead of
    /// the measured one.
    pub scan_rate: Option<f64>,
    /// Digest rate of the target hosts, GB/s, instead of the measured one.
    pub digest_rate: Option<f64>,
}

const PAGE: f64 = 4096.0;
const PAGE_WIRE: f64 = 4096.0 + 16.0;
const SEGMENT_WIRE: f64 = 8.0 + 16.0;
const DOWNTIME_TARGET_S: f64 = 0.3;
const MIN_WORK_SET: f64 = 256.0 * 1024.0;
const MAX_ROUNDS: usize = 10;
const STALL_ROUNDS: usize = 5;
const HOTSPOT_PAGES: f64 = 64.0;

/// How a workload dirties memory, and what one method sends for it.
#[derive(Clone, Debug)]
struct Profile {
    workload: Workload,
    /// The dirty rate asked for (`None`: flat out); with the workload, the
    /// load the profile was measured under.
    dirty_rate: Option<u64>,
    /// The load as people read it (`sparse@100k/s`).
    load: String,
    variant: Variant,
    /// Stores per second the guest kept up during migration.
    writes_per_s: f64,
    /// Round-0 bytes per byte of guest memory.
    round0_per_byte: f64,
}

/// Machine constants calibrated on the measured cells.
#[derive(Clone, Copy, Debug)]
struct Machine {
    /// Guest bytes scanned (snapshot + diff) per second by all workers.
    scan_rate: f64,
    /// Guest bytes per second of downtime that grows with memory (the
    /// final digest, mostly).
    digest_rate: f64,
    /// Fixed downtime cost, seconds.
    fixed_downtime: f64,
}

/// What the model predicts for one migration.
#[derive(Clone, Copy, Debug)]
struct Prediction {
    rounds: usize,
    total_s: f64,
    downtime_s: f64,
    bytes: f64,
    converged: bool,
}

fn dirtied(p: &Profile, memory: f64, t: f64) -> (f64, f64) {
    let pages = memory / PAGE;
    let w = p.writes_per_s * t;
    let segment = p.variant.sends_segments();
    let (d, per_page) = match p.workload {
        Workload::Sparse => {
            let d = pages * (1.0 - (-w / pages).exp());
            (d, if d > 0.0 { w / d } else { 0.0 })
        }
        Workload::Dense => ((w / 512.0).min(pages), 512.0),
        Workload::Hotspot => (
            HOTSPOT_PAGES.min(w),
            if w > 0.0 {
                w / HOTSPOT_PAGES.min(w)
            } else {
                0.0
            },
        ),
        Workload::Aba | Workload::Idle => (0.0, 0.0),
    };
    let bytes = if segment {
        d * (SEGMENT_WIRE * per_page).min(PAGE_WIRE)
    } else {
        d * PAGE_WIRE
    };
    (bytes, d * PAGE)
}

fn predict(p: &Profile, m: &Machine, memory: f64, link: f64) -> Prediction {
    let round_time = |bytes: f64, scanned: f64| (bytes / link).max(scanned / m.scan_rate);
    let mut bytes = p.round0_per_byte * memory;
    let mut t = round_time(bytes, memory);
    let (mut total, mut sent, mut rounds) = (t, bytes, 1usize);
    let (mut best, mut since_best) = (f64::MAX, 0usize);
    loop {
        let (next, scanned) = dirtied(p, memory, t);
        if next < best {
            best = next;
            since_best = 0;
        } else {
            since_best += 1;
        }
        // As hpmig's controller: the next round's bytes over the rate
        // measured so far (total bytes over total round time).
        let fits = next / (sent / total) <= DOWNTIME_TARGET_S || next <= MIN_WORK_SET;
        if fits || rounds + 1 >= MAX_ROUNDS || since_best >= STALL_ROUNDS {
            // Stop and copy.
            let last = round_time(next, scanned);
            let downtime = last + memory / m.digest_rate + m.fixed_downtime;
            return Prediction {
                rounds: rounds + 1,
                total_s: total + downtime,
                downtime_s: downtime,
                bytes: sent + next,
                converged: fits,
            };
        }
        bytes = next;
        t = round_time(bytes, scanned);
        total += t;
        sent += bytes;
        rounds += 1;
    }
}

/// A measured cell: its settings and medians.
struct Measured {
    memory: f64,
    workload: Workload,
    dirty_rate: Option<u64>,
    load: String,
    variant: Variant,
    /// Link cap, bytes per second.
    link: Option<f64>,
    rounds: f64,
    total_s: f64,
    downtime_s: f64,
    verify_s: f64,
    progress: f64,
    rate_before: f64,
    round0_bytes: f64,
    round0_s: f64,
    /// Every run converged.
    converged: bool,
}

fn measured(doc: &BenchResults) -> Result<Vec<Measured>> {
    let mut out = Vec::new();
    for Cell { setting: c, runs } in &doc.cells {
        if c.variant.is_qemu() {
            continue;
        }
        let get = |f: fn(&crate::results::Run) -> f64| median(runs.iter().map(f));
        let first = |f: fn(&crate::results::Run) -> Option<f64>| median(runs.iter().filter_map(f));
        out.push(Measured {
            memory: c.memory_bytes as f64,
            workload: c.workload,
            dirty_rate: c.dirty_rate,
            load: c.load(),
            variant: c.variant,
            link: c.link.bytes_per_s().map(|b| b as f64),
            rounds: get(|r| r.rounds as f64),
            total_s: get(|r| r.total_ms) / 1e3,
            downtime_s: get(|r| r.downtime_ms) / 1e3,
            verify_s: get(|r| r.verify_ms) / 1e3,
            progress: get(|r| r.guest_progress),
            rate_before: c
                .dirty_rate
                .map_or_else(|| get(|r| r.guest_writes_per_s_before), |r| r as f64),
            round0_bytes: first(|r| r.bytes_per_round.first().map(|&b| b as f64)),
            round0_s: first(|r| r.ms_per_round.first().map(|ms| ms * 1e-3)),
            converged: runs.iter().all(|r| r.converged),
        });
    }
    if out.is_empty() {
        bail!("bench.json has no hpmig cells to calibrate on");
    }
    Ok(out)
}

/// A load (workload and dirty rate) and a method: what a profile is of.
type Key = (Workload, Option<u64>, Variant);

impl Measured {
    fn key(&self) -> Key {
        (self.workload, self.dirty_rate, self.variant)
    }
}

impl Profile {
    fn key(&self) -> Key {
        (self.workload, self.dirty_rate, self.variant)
    }
}

/// The profile measured under `c`'s load with `c`'s method.
fn same_load(p: &Profile, c: &Measured) -> bool {
    p.key() == c.key()
}

fn calibrate(cells: &[Measured]) -> (Vec<Profile>, Machine) {
    let scan_rate = median(
        cells
            .iter()
            .filter(|c| c.link.is_none() && c.round0_s > 0.0)
            .map(|c| c.memory / c.round0_s),
    );
    let digest_rate = median(
        cells
            .iter()
            .filter(|c| c.verify_s > 0.0)
            .map(|c| c.memory / c.verify_s),
    );
    let mut profiles: Vec<Profile> = Vec::new();
    for c in cells {
        if profiles.iter().any(|p| same_load(p, c)) {
            continue;
        }
        let same: Vec<&Measured> = cells.iter().filter(|x| x.key() == c.key()).collect();
        profiles.push(Profile {
            workload: c.workload,
            dirty_rate: c.dirty_rate,
            load: c.load.clone(),
            variant: c.variant,
            writes_per_s: median(same.iter().map(|x| x.rate_before * x.progress)),
            round0_per_byte: median(same.iter().map(|x| x.round0_bytes / x.memory)),
        });
    }
    let mut machine = Machine {
        scan_rate: if scan_rate.is_finite() {
            scan_rate
        } else {
            1e9
        },
        digest_rate: if digest_rate.is_finite() {
            digest_rate
        } else {
            2e9
        },
        fixed_downtime: 0.0,
    };
    // Downtime beyond the last round: a fixed cost plus a cost per guest
    // byte (the digest, and whatever else grows with memory), fitted by
    // least squares on what the model's last round leaves unexplained in
    // the converged cells (a forced stop's last round is too rough a guess).
    // With one guest size there is no slope to fit: the measured digest rate
    // and the median residual stand in.
    let bare = Machine {
        digest_rate: f64::INFINITY,
        ..machine
    };
    let residuals: Vec<(f64, f64)> = cells
        .iter()
        .filter(|c| c.converged)
        .filter_map(|c| {
            let p = profiles.iter().find(|p| same_load(p, c))?;
            let pred = predict(p, &bare, c.memory, c.link.unwrap_or(f64::INFINITY));
            Some((c.memory, c.downtime_s - pred.downtime_s))
        })
        .filter(|(_, r)| r.is_finite())
        .collect();
    let n = residuals.len() as f64;
    let (mx, my) = residuals
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = residuals.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    if slope > 0.0 {
        machine.digest_rate = 1.0 / slope;
        machine.fixed_downtime = (my - slope * mx).max(0.0);
    } else {
        machine.fixed_downtime =
            median(residuals.iter().map(|(m, r)| r - m / machine.digest_rate)).max(0.0);
    }
    (profiles, machine)
}

/// `hpmig model`: calibrates on `a.from`, prints its error on the measured
/// cells and the predictions, and writes them to model.csv.
pub fn run(a: &Options) -> Result<bool> {
    let cells = measured(&BenchResults::read(&a.from)?)?;
    let (profiles, mut m) = calibrate(&cells);
    println!(
        "hpmig model: calibrated on {} measured cells: scan {:.2} GB/s, downtime per guest byte as at {:.2} GB/s (the digest), fixed downtime {:.1} ms",
        cells.len(),
        m.scan_rate / 1e9,
        m.digest_rate / 1e9,
        m.fixed_downtime * 1e3
    );

    // Error on the measured cells.
    println!("\nerror on the measured cells (predicted vs measured medians):");
    let (mut e_total, mut e_down, mut same_rounds, mut n) = (Vec::new(), Vec::new(), 0, 0);
    for c in &cells {
        let Some(p) = profiles.iter().find(|p| same_load(p, c)) else {
            continue;
        };
        let pred = predict(p, &m, c.memory, c.link.unwrap_or(f64::INFINITY));
        e_total.push(((pred.total_s - c.total_s) / c.total_s).abs());
        e_down.push(((pred.downtime_s - c.downtime_s) / c.downtime_s).abs());
        if (pred.rounds as f64 - c.rounds).abs() <= 1.0 {
            same_rounds += 1;
        }
        n += 1;
    }
    let pct = |v: &[f64]| median(v.iter().copied()) * 100.0;
    let p90 = |v: &[f64]| quantile(v.iter().copied(), 0.9) * 100.0;
    println!(
        "  total time: median {:.0}% off, 90th percentile {:.0}%; downtime: median {:.0}%, 90th percentile {:.0}%; rounds within one: {same_rounds}/{n}",
        pct(&e_total),
        p90(&e_total),
        pct(&e_down),
        p90(&e_down)
    );

    if a.scan_rate.is_some() || a.digest_rate.is_some() {
        m.scan_rate = a.scan_rate.map_or(m.scan_rate, |g| g * 1e9);
        m.digest_rate = a.digest_rate.map_or(m.digest_rate, |g| g * 1e9);
        println!(
            "\npredictions use scan {:.2} GB/s, digest {:.2} GB/s",
            m.scan_rate / 1e9,
            m.digest_rate / 1e9
        );
    }
    println!(
        "\n{:<16} {:<13} {:>8} {:>9} {:>7} {:>12} {:>12} {:>12} {:>9}",
        "workload",
        "variant",
        "memory",
        "link",
        "rounds",
        "total bytes",
        "total s",
        "downtime s",
        "converges"
    );
    let mut csv = String::from(
        "workload,variant,memory_bytes,link_gbit,rounds,total_bytes,total_s,downtime_s,converged\n",
    );
    for p in &profiles {
        for &memory in &a.memory {
            for &gbit in &a.link_gbit {
                let r = predict(p, &m, memory as f64, gbit * 1e9 / 8.0);
                println!(
                    "{:<16} {:<13} {:>8} {:>7}Gb {:>7} {:>12} {:>12.1} {:>12.2} {:>9}",
                    p.load,
                    p.variant,
                    human(memory),
                    gbit,
                    r.rounds,
                    human(r.bytes as u64),
                    r.total_s,
                    r.downtime_s,
                    if r.converged { "yes" } else { "no" }
                );
                csv.push_str(&format!(
                    "{},{},{memory},{gbit},{},{:.0},{:.3},{:.3},{}\n",
                    p.load, p.variant, r.rounds, r.bytes, r.total_s, r.downtime_s, r.converged
                ));
            }
        }
    }
    let out = a.out.clone().unwrap_or_else(|| {
        a.from
            .parent()
            .map_or_else(|| PathBuf::from("model.csv"), |d| d.join("model.csv"))
    });
    std::fs::write(&out, csv).with_context(|| format!("writing {}", out.display()))?;
    println!("\n  predictions: {}", out.display());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(variant: Variant) -> Profile {
        Profile {
            workload: Workload::Sparse,
            dirty_rate: Some(100_000),
            load: "sparse@100k/s".into(),
            variant,
            writes_per_s: 50_000.0,
            round0_per_byte: 1.0,
        }
    }

    const M: Machine = Machine {
        scan_rate: 2e9,
        digest_rate: 3e9,
        fixed_downtime: 0.01,
    };

    #[test]
    fn segments_converge_where_pages_do_not() {
        let gib = (1u64 << 30) as f64;
        let link = 1e9 / 8.0;
        let page = predict(&sparse(Variant::Page), &M, gib, link);
        let seg = predict(&sparse(Variant::Segment), &M, gib, link);
        assert!(!page.converged && page.rounds >= 6, "{page:?}");
        assert!(seg.converged && seg.rounds == 2, "{seg:?}");
        assert!(seg.bytes < page.bytes / 2.0);
    }

    #[test]
    fn a_faster_link_never_takes_longer_and_idle_stops_after_round_zero() {
        let gib = (64u64 << 30) as f64;
        let slow = predict(&sparse(Variant::Page), &M, gib, 25e9 / 8.0);
        let fast = predict(&sparse(Variant::Page), &M, gib, 400e9 / 8.0);
        assert!(fast.total_s <= slow.total_s);
        let mut idle = sparse(Variant::Page);
        idle.workload = Workload::Idle;
        assert_eq!(predict(&idle, &M, gib, 25e9 / 8.0).rounds, 2);
    }
}
