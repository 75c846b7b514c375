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

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::units::human;

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// The bench.json `hpmig bench` wrote.
    #[arg(long)]
    from: PathBuf,
    /// Guest sizes to predict (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64G,256G,1T", value_parser = crate::units::parse_bytes)]
    memory: Vec<u64>,
    /// Link speeds to predict, Gbit/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "25,100,400")]
    link: Vec<f64>,
    /// Where to write model.csv (next to bench.json when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scan (snapshot + diff) rate of the target hosts, GB/s, instead of
    /// the measured one (e.g. from scripts/scaling.sh on such a host).
    #[arg(long)]
    scan_rate: Option<f64>,
    /// Digest rate of the target hosts, GB/s, instead of the measured one.
    #[arg(long)]
    digest_rate: Option<f64>,
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
    workload: String,
    variant: String,
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
    let segment = p.variant.starts_with("segment");
    let (d, per_page) = match p.workload.split('@').next().unwrap_or("") {
        "sparse" => {
            let d = pages * (1.0 - (-w / pages).exp());
            (d, if d > 0.0 { w / d } else { 0.0 })
        }
        "dense" => ((w / 512.0).min(pages), 512.0),
        "hotspot" => (
            HOTSPOT_PAGES.min(w),
            if w > 0.0 {
                w / HOTSPOT_PAGES.min(w)
            } else {
                0.0
            },
        ),
        _ => (0.0, 0.0),
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

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn link_bytes(link: &str) -> Option<f64> {
    link.strip_suffix("Gbit")
        .and_then(|g| g.parse::<f64>().ok())
        .map(|g| g * 1e9 / 8.0)
}

/// A measured cell: its settings and medians.
struct Measured {
    memory: f64,
    workload: String,
    variant: String,
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

fn measured(doc: &Value) -> Result<Vec<Measured>> {
    let mut out = Vec::new();
    for c in doc["cells"].as_array().context("bench.json has no cells")? {
        let variant = c["variant"].as_str().unwrap_or_default().to_string();
        if variant.starts_with("qemu") {
            continue;
        }
        let runs = c["runs"].as_array().context("a cell without runs")?;
        let get = |k: &str| median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
        let first = |k: &str, scale: f64| {
            median(
                runs.iter()
                    .filter_map(|r| r[k].as_array()?.first()?.as_f64())
                    .map(|x| x * scale)
                    .collect(),
            )
        };
        let rate = c["dirty_rate"].as_f64();
        let name = c["workload"].as_str().unwrap_or_default();
        out.push(Measured {
            memory: c["memory_bytes"].as_f64().unwrap_or(0.0),
            // The load: a workload at its dirty rate.
            workload: match rate {
                Some(r) => format!("{name}@{}k/s", r / 1000.0),
                None => name.to_string(),
            },
            variant,
            link: link_bytes(c["link"].as_str().unwrap_or_default()),
            rounds: get("rounds"),
            total_s: get("total_ms") / 1e3,
            downtime_s: get("downtime_ms") / 1e3,
            verify_s: get("verify_ms") / 1e3,
            progress: get("guest_progress"),
            rate_before: rate.unwrap_or_else(|| get("guest_writes_per_s_before")),
            round0_bytes: first("bytes_per_round", 1.0),
            round0_s: first("ms_per_round", 1e-3),
            converged: runs.iter().all(|r| r["converged"].as_bool() == Some(true)),
        });
    }
    if out.is_empty() {
        bail!("bench.json has no hpmig cells to calibrate on");
    }
    Ok(out)
}

fn calibrate(cells: &[Measured]) -> (Vec<Profile>, Machine) {
    let scan_rate = median(
        cells
            .iter()
            .filter(|c| c.link.is_none() && c.round0_s > 0.0)
            .map(|c| c.memory / c.round0_s)
            .collect(),
    );
    let digest_rate = median(
        cells
            .iter()
            .filter(|c| c.verify_s > 0.0)
            .map(|c| c.memory / c.verify_s)
            .collect(),
    );
    let mut profiles: Vec<Profile> = Vec::new();
    for c in cells {
        if profiles
            .iter()
            .any(|p| p.workload == c.workload && p.variant == c.variant)
        {
            continue;
        }
        let same: Vec<&Measured> = cells
            .iter()
            .filter(|x| x.workload == c.workload && x.variant == c.variant)
            .collect();
        profiles.push(Profile {
            workload: c.workload.clone(),
            variant: c.variant.clone(),
            writes_per_s: median(same.iter().map(|x| x.rate_before * x.progress).collect()),
            round0_per_byte: median(same.iter().map(|x| x.round0_bytes / x.memory).collect()),
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
            let p = profiles
                .iter()
                .find(|p| p.workload == c.workload && p.variant == c.variant)?;
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
        machine.fixed_downtime = median(
            residuals
                .iter()
                .map(|(m, r)| r - m / machine.digest_rate)
                .collect(),
        )
        .max(0.0);
    }
    (profiles, machine)
}

pub fn run(a: &ModelArgs) -> Result<bool> {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(&a.from)
            .with_context(|| format!("reading {}", a.from.display()))?,
    )
    .with_context(|| format!("parsing {}", a.from.display()))?;
    let cells = measured(&doc)?;
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
        let Some(p) = profiles
            .iter()
            .find(|p| p.workload == c.workload && p.variant == c.variant)
        else {
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
    let pct = |v: &[f64]| median(v.to_vec()) * 100.0;
    let p90 = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s.get(s.len() * 9 / 10).copied().unwrap_or(f64::NAN) * 100.0
    };
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
            for &gbit in &a.link {
                let r = predict(p, &m, memory as f64, gbit * 1e9 / 8.0);
                println!(
                    "{:<16} {:<13} {:>8} {:>7}Gb {:>7} {:>12} {:>12.1} {:>12.2} {:>9}",
                    p.workload,
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
                    p.workload, p.variant, r.rounds, r.bytes, r.total_s, r.downtime_s, r.converged
                ));
            }
        }
    }
    let out = a.out.clone().unwrap_or_else(|| {
        a.from
            .parent()
            .map_or_else(|| PathBuf::from("model.csv"), |d| d.join("model.csv"))
    });
    std::fs::File::create(&out)
        .and_then(|mut f| f.write_all(csv.as_bytes()))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\n  predictions: {}", out.display());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(variant: &str) -> Profile {
        Profile {
            workload: "sparse@100k/s".into(),
            variant: variant.into(),
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
        let page = predict(&sparse("page"), &M, gib, link);
        let seg = predict(&sparse("segment"), &M, gib, link);
        assert!(!page.converged && page.rounds >= 6, "{page:?}");
        assert!(seg.converged && seg.rounds == 2, "{seg:?}");
        assert!(seg.bytes < page.bytes / 2.0);
    }

    #[test]
    fn a_faster_link_never_takes_longer_and_idle_stops_after_round_zero() {
        let gib = (64u64 << 30) as f64;
        let slow = predict(&sparse("page"), &M, gib, 25e9 / 8.0);
        let fast = predict(&sparse("page"), &M, gib, 400e9 / 8.0);
        assert!(fast.total_s <= slow.total_s);
        let mut idle = sparse("page");
        idle.workload = "idle".into();
        assert_eq!(predict(&idle, &M, gib, 25e9 / 8.0).rounds, 2);
    }
}
