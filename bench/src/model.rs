//! `hpmig model`: predicts pre-copy migrations of guests larger and links
//! faster than a test machine has, from what `hpmig bench` measured.
//!
//! The model runs pre-copy round by round and lets hpmig's own controller
//! decide after each round:
//! - round 0 sends `b0 · M` bytes (`b0`: bytes per byte of guest memory the
//!   measured round 0 sent, per workload and method) and scans all of M;
//! - a round of duration T leaves the next one the data the guest dirtied in
//!   T. Random 8-byte stores at `w` stores/s over P pages of size p touch
//!   D = P(1 − e^(−wT/P)) distinct pages with k = wT/D stores each; page
//!   pre-copy sends D · (p + h) bytes (h: a record header,
//!   [`HEADER_LEN`]), segment pre-copy D · min(k · (8 + h), p + h) (a
//!   header plus 8 bytes per store, at most the whole page). Sequential
//!   page rewrites (dense) dirty min(P, 8wT/p) whole pages, the hotspot
//!   workload the same 64 guest pages, idle nothing. `w` is the stores/s
//!   the guest kept up *during* migration (the bench's measured progress);
//! - a round lasts max(bytes / link, scanned bytes / scan rate), the scan
//!   rate measured on uncapped round 0s;
//! - after each round the model hands the rounds so far, as the
//!   [`RoundMetrics`] the source would have recorded (dirty pages, work
//!   set, wire bytes, duration), and the pages dirtied during the last one
//!   to [`controller::decide`] with the bench's own policy
//!   ([`crate::policy`]), as the source does after a real round. So the
//!   model stops where hpmig would: when the projected downtime fits the
//!   target, the projected work set is small, the work set stalls or the
//!   round cap is reached; whatever the controller's rules are, not a copy
//!   of them. Round 0's work set is taken as its bytes less a header per
//!   page (the bench records only wire bytes per round). p is this host's
//!   page size ([`host_page_size`]);
//! - downtime is the last round plus a cost per guest byte (hpmig's digest
//!   check, mostly) plus a fixed cost, both fitted by least squares on the
//!   converged measured cells (with one guest size: the measured digest
//!   rate and the median residual).
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
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hpmig_core::memory::host_page_size;
use hpmig_core::precopy::controller::{self, Decision, RoundMetrics};
use hpmig_core::protocol::HEADER_LEN;
use hpmig_microvm::kvm::program::{GUEST_PAGE, HOTSPOT_PAGES};
use hpmig_microvm::Workload;

use crate::human;
use crate::results::{BenchResults, Cell, Run, Variant};
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

/// Bytes per store of the micro-VM's workloads (8-byte words).
const STORE: f64 = 8.0;

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

/// What the guest dirtied in one round, and what sending it costs.
#[derive(Clone, Copy, Debug)]
struct Dirtied {
    /// Distinct pages (of the host's page size).
    pages: f64,
    /// Payload bytes to send (the round's work set).
    work: f64,
    /// Bytes on the wire, headers included.
    wire: f64,
}

/// What `p`'s guest of `memory` bytes dirties in `t` seconds, in pages of
/// `page` bytes.
fn dirtied(p: &Profile, memory: f64, t: f64, page: f64) -> Dirtied {
    let pages = memory / page;
    let header = HEADER_LEN as f64;
    let w = p.writes_per_s * t;
    let hotspot = (HOTSPOT_PAGES as f64 * GUEST_PAGE as f64 / page).max(1.0);
    // Distinct pages, and stores per page.
    let (d, per_page) = match p.workload {
        Workload::Sparse => {
            let d = pages * (1.0 - (-w / pages).exp());
            (d, if d > 0.0 { w / d } else { 0.0 })
        }
        Workload::Dense => ((w * STORE / page).min(pages), page / STORE),
        Workload::Hotspot => (
            hotspot.min(w),
            if w > 0.0 { w / hotspot.min(w) } else { 0.0 },
        ),
        Workload::Aba | Workload::Idle => (0.0, 0.0),
    };
    let (work, wire) = if p.variant.sends_segments() {
        let work = (STORE * per_page).min(page);
        let wire = ((STORE + header) * per_page).min(page + header);
        (d * work, d * wire)
    } else {
        (d * page, d * (page + header))
    };
    Dirtied {
        pages: d,
        work,
        wire,
    }
}

/// Seconds as a round's duration (a duration too long to hold is held as
/// the longest one).
fn duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

fn predict(p: &Profile, m: &Machine, memory: f64, link: f64) -> Prediction {
    let policy = crate::policy();
    let page = host_page_size() as f64;
    let round_time = |bytes: f64, scanned: f64| (bytes / link).max(scanned / m.scan_rate);
    let pages = memory / page;
    let wire0 = p.round0_per_byte * memory;
    let mut t = round_time(wire0, memory);
    let mut rounds = vec![RoundMetrics {
        round: 0,
        dirty_pages: pages as u64,
        work_set_bytes: (wire0 - pages * HEADER_LEN as f64).max(0.0) as u64,
        wire_bytes: wire0 as u64,
        duration: duration(t),
    }];
    let (mut total, mut sent) = (t, wire0);
    let (stop, next) = loop {
        let next = dirtied(p, memory, t, page);
        let dirty_now = next.pages.ceil() as u64;
        match controller::decide(&policy, &rounds, dirty_now, page as u64).0 {
            Decision::Continue => {}
            Decision::StopAndCopy(stop) => break (stop, next),
            // Not with the bench's policy (it forces a stop): the guest
            // would stay on the source.
            Decision::Abort(_) => {
                return Prediction {
                    rounds: rounds.len(),
                    total_s: total,
                    downtime_s: 0.0,
                    bytes: sent,
                    converged: false,
                }
            }
        }
        t = round_time(next.wire, next.pages * page);
        rounds.push(RoundMetrics {
            round: rounds.len() as u32,
            dirty_pages: dirty_now,
            work_set_bytes: next.work as u64,
            wire_bytes: next.wire as u64,
            duration: duration(t),
        });
        total += t;
        sent += next.wire;
    };
    // Stop and copy: the pages dirtied during the last round.
    let last = round_time(next.wire, next.pages * page);
    let downtime = last + memory / m.digest_rate + m.fixed_downtime;
    Prediction {
        rounds: rounds.len() + 1,
        total_s: total + downtime,
        downtime_s: downtime,
        bytes: sent + next.wire,
        converged: stop.converged(),
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
        let get = |f: fn(&Run) -> f64| median(runs.iter().map(f));
        let first = |f: fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f));
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
        // Pages: every round re-sends most of memory; once the work set
        // shrinks by less than the controller's minimum improvement its
        // stall rule forces a stop, before the round cap would (cap + 1
        // rounds with the stop-and-copy round).
        let cap = crate::policy().max_rounds as usize;
        assert!(!page.converged && page.rounds <= cap, "{page:?}");
        // Segments: round 0 sent every page whole, so the controller
        // projects round 1 from whole pages and runs it; round 1's few bytes
        // per page then project a small work set, and a round 1 far longer
        // than that final round buys one more round to shrink it: rounds 0,
        // 1 and 2 and the stop-and-copy round.
        assert!(seg.converged && seg.rounds == 4, "{seg:?}");
        assert!(seg.bytes < page.bytes / 2.0);
    }

    #[test]
    fn a_guest_whose_round_0_was_mostly_zero_pages_stops_after_it() {
        // As measured (docs/results): round 0 of a fresh guest sends zero
        // pages as markers, a few bytes per page, so the controller
        // projects the pages dirtied meanwhile as cheap and stops at once.
        let gib = (1u64 << 30) as f64;
        for variant in [Variant::Page, Variant::Segment] {
            let fresh = Profile {
                round0_per_byte: 0.02,
                ..sparse(variant)
            };
            let r = predict(&fresh, &M, gib, 1e9 / 8.0);
            assert!(r.converged && r.rounds == 2, "{variant}: {r:?}");
        }
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
