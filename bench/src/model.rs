//! `hpmig model`: predicts pre-copy migrations of guests larger and links
//! faster than a test machine has, from what `hpmig bench` measured, and
//! says how far off it is on guest sizes it was not calibrated on.
//!
//! The model runs pre-copy round by round and lets hpmig's own controller
//! decide after each round:
//! - round 0 sends `b0 · M` bytes (`b0`: bytes per byte of guest memory the
//!   measured round 0 sent, per guest contents, workload and method) and
//!   scans all of M. `b0` is taken only from cells of the same contents
//!   (`--contents` of the bench): a full guest's round 0 sends about all of
//!   memory with either method, an empty guest's a few bytes per zero page,
//!   so carrying `b0` from empty guests to full ones predicts absurd page vs
//!   segment ratios. A contents bench.json has no cells for gets no
//!   prediction, and the model says so;
//! - a round of duration T leaves the next one the data the guest dirtied in
//!   T. Random 8-byte stores at `w` stores/s over P pages of size p touch
//!   D = P(1 − e^(−wT/P)) distinct pages with k = wT/D stores each; page
//!   pre-copy sends D · (p + h) bytes (h: a record header,
//!   [`HEADER_LEN`]), segment pre-copy D · min(k · (8 + h), p + h) (a
//!   header plus 8 bytes per store, at most the whole page). Sequential
//!   page rewrites (dense) dirty min(P, 8wT/p) whole pages, the hotspot
//!   workload the same 64 guest pages, idle nothing. `w` is the stores/s
//!   the guest kept up *during* migration (the bench's measured progress);
//! - round 0 lasts max(bytes / link, M / round-0 rate), later rounds
//!   max(bytes / link, dirty pages · p / scan rate). Both rates are
//!   measured on the uncapped cells: the round-0 rate on their round 0s,
//!   the scan rate on their later rounds' dirty pages ([`Round`] records
//!   them per round). They differ: a full guest's round 0 sends all of
//!   memory over the link into destination pages touched for the
//!   first time, at a third of the later rounds' rate here;
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
//! - downtime is the final round plus a fixed switch-over cost. hpmig's
//!   default verification (`--verify incremental`, see
//!   `hpmig_core::verify`) hashes only the final round's pages during the
//!   pause, so no whole-memory digest grows the downtime with the guest.
//!   The fixed cost is fitted on the converged cells, as the downtime the
//!   model's final round leaves unexplained; a cost per guest byte is
//!   fitted alongside (least squares, with two or more guest sizes) and
//!   kept only when it is positive by more than twice its standard error.
//!   `--digest-rate` adds a whole-memory digest back, to predict
//!   `--verify strict`.
//!
//! How far off it is: with more than one guest size in bench.json the model
//! calibrates on one size only (`--calibrate-on`, the smallest by default)
//! and reports its error on the cells of the other sizes, which it has not
//! seen: per cell and the median and largest relative error of total
//! bytes, total time, rounds and downtime. The error on the cells it was
//! calibrated on is printed next to it, labelled in-sample; the
//! predictions for large guests use a calibration on all cells.
//!
//! It cannot say: anything about a guest whose writes or contents are not
//! like the measured ones; link effects beyond a bandwidth cap (latency,
//! loss, congestion); the scan rate of a machine with more cores (it
//! assumes this host's, which measured workers scale sub-linearly, see
//! README); or memory bandwidth limits of 1 TiB hosts.
//!
//! It reads bench.json through [`crate::results`] (any schema up to
//! [`crate::results::SCHEMA`]) and calibrates only on hpmig's cells.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hpmig_core::memory::{host_page_size, Contents};
use hpmig_core::precopy::controller::{self, Decision, RoundMetrics};
use hpmig_core::protocol::HEADER_LEN;
use hpmig_microvm::kvm::program::{GUEST_PAGE, HOTSPOT_PAGES};
use hpmig_microvm::Workload;

use crate::human;
use crate::results::{BenchResults, Cell, Run, Variant};
use crate::stats::{median, quantile};
use hpmig_report::Round;

/// What `hpmig model` predicts, from what.
#[derive(Clone, Debug)]
pub struct Options {
    /// The bench.json `hpmig bench` wrote.
    pub from: PathBuf,
    /// Guest sizes to predict, bytes.
    pub memory: Vec<u64>,
    /// Link speeds to predict, Gbit/s.
    pub link_gbit: Vec<f64>,
    /// Guest contents to predict; every contents bench.json has cells for
    /// when empty.
    pub contents: Vec<Contents>,
    /// Guest size the held-out check calibrates on, bytes (the smallest
    /// measured when `None`); the check runs when bench.json holds more
    /// than one size.
    pub calibrate_on: Option<u64>,
    /// Where to write model.csv (next to bench.json when `None`).
    pub out: Option<PathBuf>,
    /// Scan (snapshot + diff) rate of the target hosts, GB/s, instead of
    /// the measured one.
    pub scan_rate: Option<f64>,
    /// Predict `--verify strict`: a whole-memory digest at this rate, GB/s,
    /// added to every downtime (`None`: the default incremental
    /// verification, no such term).
    pub digest_rate: Option<f64>,
}

/// Bytes per store of the micro-VM's workloads (8-byte words).
const STORE: f64 = 8.0;

/// How a workload dirties memory, and what one method sends for it.
#[derive(Clone, Debug)]
struct Profile {
    /// What guest memory held: round 0 depends on it.
    contents: Contents,
    workload: Workload,
    /// The dirty rate asked for (`None`: flat out); with the workload, the
    /// load the profile was measured under.
    dirty_rate: Option<u64>,
    /// The load as people read it (`sparse@100k/s`).
    load: String,
    variant: Variant,
    /// Stores per second the guest kept up during migration.
    writes_per_s: f64,
    /// Round-0 bytes per byte of guest memory, measured on guests of the
    /// same contents.
    round0_per_byte: f64,
}

/// Machine constants calibrated on the measured cells.
#[derive(Clone, Copy, Debug)]
struct Machine {
    /// Guest bytes per second of an uncapped round 0: all of memory
    /// scanned and, for a guest that holds data, most of it sent through
    /// the link and landed in destination memory touched for the first
    /// time.
    round0_rate: f64,
    /// Guest bytes of dirty pages per second an uncapped later round gets
    /// through (snapshot + diff, and the send when that is slower).
    scan_rate: f64,
    /// Downtime seconds per guest byte beyond the final round: zero unless
    /// the fit finds one ([`DowntimeFit`]) or `--digest-rate` asks for a
    /// whole-memory digest.
    downtime_per_byte: f64,
    /// Fixed switch-over cost, seconds.
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
    let mut t = (wire0 / link).max(memory / m.round0_rate);
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
    let downtime = last + memory * m.downtime_per_byte + m.fixed_downtime;
    Prediction {
        rounds: rounds.len() + 1,
        total_s: total + downtime,
        downtime_s: downtime,
        bytes: sent + next.wire,
        converged: stop.converged(),
    }
}

/// A measured cell: its settings and medians.
#[derive(Clone, Debug)]
struct Measured {
    memory: f64,
    contents: Contents,
    workload: Workload,
    dirty_rate: Option<u64>,
    load: String,
    variant: Variant,
    /// Link cap, bytes per second.
    link: Option<f64>,
    rounds: f64,
    total_bytes: f64,
    total_s: f64,
    downtime_s: f64,
    progress: f64,
    rate_before: f64,
    round0_bytes: f64,
    round0_s: f64,
    /// Guest bytes of dirty pages per second over the rounds after round
    /// 0 (NaN when bench.json has no per-round records).
    later_rate: f64,
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
            contents: c.contents,
            workload: c.workload,
            dirty_rate: c.dirty_rate,
            load: c.load(),
            variant: c.variant,
            link: c.link.bytes_per_s().map(|b| b as f64),
            rounds: get(|r| r.rounds as f64),
            // What hpmig itself sent, as the model counts it: on a shaped
            // link (schema 2) `total_bytes` is the link's, both ways.
            total_bytes: get(|r| match r.tool_bytes {
                0 => r.total_bytes as f64,
                b => b as f64,
            }),
            total_s: get(|r| r.total_ms) / 1e3,
            downtime_s: get(|r| r.downtime_ms) / 1e3,
            progress: get(|r| r.guest_progress),
            rate_before: c
                .dirty_rate
                .map_or_else(|| get(|r| r.guest_writes_per_s_before), |r| r as f64),
            round0_bytes: first(|r| r.bytes_per_round.first().map(|&b| b as f64)),
            round0_s: first(|r| r.ms_per_round.first().map(|ms| ms * 1e-3)),
            later_rate: median(runs.iter().map(|r| later_rate(&r.per_round))),
            converged: runs.iter().all(|r| r.converged),
        });
    }
    if out.is_empty() {
        bail!("bench.json has no hpmig cells to calibrate on");
    }
    Ok(out)
}

/// Dirty-page bytes per second of `rounds` after round 0 (NaN without
/// any).
fn later_rate(rounds: &[Round]) -> f64 {
    let page = host_page_size() as f64;
    let (bytes, secs) = rounds
        .iter()
        .filter(|r| r.round > 0)
        .fold((0.0, 0.0), |(b, t), r| {
            (b + r.dirty_pages as f64 * page, t + r.duration_ms * 1e-3)
        });
    if secs > 0.0 {
        bytes / secs
    } else {
        f64::NAN
    }
}

/// Guest contents, a load (workload and dirty rate) and a method: what a
/// profile is of.
type Key = (Contents, Workload, Option<u64>, Variant);

impl Measured {
    fn key(&self) -> Key {
        (self.contents, self.workload, self.dirty_rate, self.variant)
    }

    /// The link as the bench names it, Gbit/s or uncapped.
    fn link_label(&self) -> String {
        self.link
            .map_or_else(|| "uncapped".into(), |b| format!("{}", b * 8.0 / 1e9))
    }
}

impl Profile {
    fn key(&self) -> Key {
        (self.contents, self.workload, self.dirty_rate, self.variant)
    }
}

/// The profile measured under `c`'s contents and load with `c`'s method.
fn profile_of<'a>(profiles: &'a [Profile], c: &Measured) -> Option<&'a Profile> {
    profiles.iter().find(|p| p.key() == c.key())
}

/// The fixed switch-over cost and the cost per guest byte fitted beside
/// it, on what the model's final round leaves unexplained of the measured
/// downtimes (converged cells only: a forced stop's final round is too
/// rough a guess).
#[derive(Clone, Copy, Debug)]
struct DowntimeFit {
    /// Converged cells fitted on.
    points: usize,
    /// Distinct guest sizes among them (a slope needs two).
    sizes: usize,
    /// Least-squares slope, seconds per guest byte (NaN with one size).
    slope: f64,
    /// Its standard error (NaN with fewer than three points or one size).
    slope_se: f64,
    /// The slope was kept: positive by more than twice its standard error.
    kept: bool,
    /// Fixed cost, seconds: the intercept when the slope is kept, the
    /// median residual otherwise.
    fixed: f64,
}

impl DowntimeFit {
    /// Least squares of `residuals` (guest bytes, seconds) on a line.
    fn of(residuals: &[(f64, f64)]) -> DowntimeFit {
        let n = residuals.len() as f64;
        let mut sizes: Vec<f64> = residuals.iter().map(|&(m, _)| m).collect();
        sizes.sort_by(f64::total_cmp);
        sizes.dedup();
        let (mx, my) = residuals
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
        let (sxy, sxx) = residuals.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
            (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
        });
        let (slope, slope_se) = if sizes.len() >= 2 && sxx > 0.0 {
            let slope = sxy / sxx;
            let sse: f64 = residuals
                .iter()
                .map(|(x, y)| (y - my - slope * (x - mx)).powi(2))
                .sum();
            let se = if residuals.len() > 2 {
                (sse / (n - 2.0) / sxx).sqrt()
            } else {
                f64::NAN
            };
            (slope, se)
        } else {
            (f64::NAN, f64::NAN)
        };
        let kept = slope > 0.0 && slope > 2.0 * slope_se;
        let fixed = if kept {
            my - slope * mx
        } else {
            median(residuals.iter().map(|&(_, r)| r))
        };
        DowntimeFit {
            points: residuals.len(),
            sizes: sizes.len(),
            slope,
            slope_se,
            kept,
            fixed: if fixed.is_finite() {
                fixed.max(0.0)
            } else {
                0.0
            },
        }
    }

    /// The fit as people read it.
    fn describe(&self) -> String {
        let per_gib = |s: f64| s * (1u64 << 30) as f64 * 1e3;
        let slope = if self.sizes < 2 {
            "no per-GiB term (one guest size: no slope to fit)".to_string()
        } else {
            format!(
                "per-GiB term {:.1} ± {:.1} ms/GiB ({})",
                per_gib(self.slope),
                per_gib(self.slope_se),
                if self.kept {
                    "kept: positive by more than 2 standard errors"
                } else {
                    "dropped: not positive by more than 2 standard errors"
                }
            )
        };
        format!(
            "downtime = final round + {:.1} ms fixed; {slope}; fitted on {} converged cells of {} guest size{}",
            self.fixed * 1e3,
            self.points,
            self.sizes,
            if self.sizes == 1 { "" } else { "s" }
        )
    }
}

/// The model calibrated on some cells: the profiles of what they measured,
/// the machine, and how its downtime was fitted.
struct Calibration {
    profiles: Vec<Profile>,
    machine: Machine,
    downtime: DowntimeFit,
    /// The rates were measured (on uncapped cells), not assumed.
    rates_measured: bool,
}

impl Calibration {
    /// The machine it found, as people read it.
    fn describe(&self) -> String {
        let rates = format!(
            "round 0 at {:.2} GB/s, later rounds scan {:.2} GB/s",
            self.machine.round0_rate / 1e9,
            self.machine.scan_rate / 1e9
        );
        let rates = if self.rates_measured {
            rates
        } else {
            format!("{rates} assumed: no uncapped cells to measure them on")
        };
        format!("{rates}; {}", self.downtime.describe())
    }
}

fn calibrate(cells: &[Measured]) -> Calibration {
    let uncapped = || cells.iter().filter(|c| c.link.is_none());
    let round0_rate = median(
        uncapped()
            .filter(|c| c.round0_s > 0.0)
            .map(|c| c.memory / c.round0_s),
    );
    let round0_measured = round0_rate.is_finite();
    let round0_rate = if round0_measured { round0_rate } else { 1e9 };
    // Without per-round records (older bench.json), round 0's rate.
    let scan_rate = median(uncapped().map(|c| c.later_rate));
    let mut profiles: Vec<Profile> = Vec::new();
    for c in cells {
        if profile_of(&profiles, c).is_some() {
            continue;
        }
        // Only cells of the same contents, load and method: round 0 of a
        // full guest says nothing about an empty one's.
        let same: Vec<&Measured> = cells.iter().filter(|x| x.key() == c.key()).collect();
        profiles.push(Profile {
            contents: c.contents,
            workload: c.workload,
            dirty_rate: c.dirty_rate,
            load: c.load.clone(),
            variant: c.variant,
            writes_per_s: median(same.iter().map(|x| x.rate_before * x.progress)),
            round0_per_byte: median(same.iter().map(|x| x.round0_bytes / x.memory)),
        });
    }
    let bare = Machine {
        round0_rate,
        scan_rate: if scan_rate.is_finite() {
            scan_rate
        } else {
            round0_rate
        },
        downtime_per_byte: 0.0,
        fixed_downtime: 0.0,
    };
    let residuals: Vec<(f64, f64)> = cells
        .iter()
        .filter(|c| c.converged)
        .filter_map(|c| {
            let p = profile_of(&profiles, c)?;
            let pred = predict(p, &bare, c.memory, c.link.unwrap_or(f64::INFINITY));
            Some((c.memory, c.downtime_s - pred.downtime_s))
        })
        .filter(|(_, r)| r.is_finite())
        .collect();
    let downtime = DowntimeFit::of(&residuals);
    Calibration {
        profiles,
        machine: Machine {
            downtime_per_byte: if downtime.kept { downtime.slope } else { 0.0 },
            fixed_downtime: downtime.fixed,
            ..bare
        },
        downtime,
        rates_measured: round0_measured,
    }
}

/// Relative errors (|predicted − measured| / measured) of one prediction.
#[derive(Clone, Copy, Debug)]
struct Errors {
    total_bytes: f64,
    total_s: f64,
    rounds: f64,
    downtime_s: f64,
}

impl Errors {
    fn of(pred: &Prediction, c: &Measured) -> Errors {
        let rel = |p: f64, m: f64| ((p - m) / m).abs();
        Errors {
            total_bytes: rel(pred.bytes, c.total_bytes),
            total_s: rel(pred.total_s, c.total_s),
            rounds: rel(pred.rounds as f64, c.rounds),
            downtime_s: rel(pred.downtime_s, c.downtime_s),
        }
    }

    /// Each quantity's name and how to read it off, in model.csv's order.
    const QUANTITIES: [Quantity; 4] = [
        ("rounds", |e| e.rounds),
        ("total bytes", |e| e.total_bytes),
        ("total time", |e| e.total_s),
        ("downtime", |e| e.downtime_s),
    ];
}

/// A quantity's name and how to read its error off [`Errors`].
type Quantity = (&'static str, fn(&Errors) -> f64);

/// A quantity's relative errors over some cells: the median and the
/// largest.
struct ErrorStat {
    name: &'static str,
    median: f64,
    max: f64,
}

/// A measured cell, what a calibration predicted for it, and how far off.
struct Checked<'a> {
    cell: &'a Measured,
    pred: Prediction,
    err: Errors,
}

/// A calibration's predictions for measured cells.
struct Validation<'a> {
    rows: Vec<Checked<'a>>,
    /// Cells whose contents, load and method the calibration never saw.
    unmatched: usize,
}

/// What `cal` predicts for each of `targets`.
fn validate<'a>(cal: &Calibration, targets: &'a [Measured]) -> Validation<'a> {
    let mut rows = Vec::new();
    let mut unmatched = 0;
    for c in targets {
        let Some(p) = profile_of(&cal.profiles, c) else {
            unmatched += 1;
            continue;
        };
        let pred = predict(p, &cal.machine, c.memory, c.link.unwrap_or(f64::INFINITY));
        rows.push(Checked {
            cell: c,
            pred,
            err: Errors::of(&pred, c),
        });
    }
    Validation { rows, unmatched }
}

/// The held-out split: the cells of guest size `size`, to calibrate on,
/// and the cells of every other size, to check the calibration on.
fn held_out(cells: &[Measured], size: f64) -> (Vec<Measured>, Vec<Measured>) {
    cells.iter().cloned().partition(|c| c.memory == size)
}

/// Each quantity's relative errors over `rows`.
fn error_summary(rows: &[&Checked<'_>]) -> Vec<ErrorStat> {
    Errors::QUANTITIES
        .iter()
        .map(|&(name, f)| {
            let v = rows.iter().map(|r| f(&r.err));
            ErrorStat {
                name,
                median: median(v.clone()),
                max: quantile(v, 1.0),
            }
        })
        .collect()
}

/// Columns of model.csv: each row a held-out or in-sample check of a
/// measured cell (predicted, measured, relative errors), the median or max
/// of such errors over a guest size, or a prediction.
const CSV_HEADER: &str = "kind,contents,workload,variant,memory_bytes,link_gbit,rounds,total_bytes,total_s,downtime_s,converged,measured_rounds,measured_total_bytes,measured_total_s,measured_downtime_s,err_rounds,err_total_bytes,err_total_s,err_downtime\n";

/// Prints `v`'s rows (per cell when `per_cell`) and its error summary per
/// guest size, and appends them to `csv` as `kind`.
fn report(kind: &str, v: &Validation<'_>, per_cell: bool, csv: &mut String) {
    let mut sizes: Vec<f64> = v.rows.iter().map(|r| r.cell.memory).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    if per_cell {
        println!(
            "  {:<8} {:<16} {:<13} {:>9} {:>8} {:>15} {:>23} {:>17} {:>17}",
            "contents",
            "workload",
            "variant",
            "memory",
            "link",
            "rounds p/m",
            "total bytes p/m",
            "total s p/m",
            "downtime ms p/m"
        );
    }
    for r in &v.rows {
        let (c, p, e) = (r.cell, &r.pred, &r.err);
        if per_cell {
            println!(
                "  {:<8} {:<16} {:<13} {:>9} {:>8} {:>7}/{:<7} {:>11}/{:<11} {:>8.2}/{:<8.2} {:>8.1}/{:<8.1}",
                c.contents.as_str(),
                c.load,
                c.variant.to_string(),
                human(c.memory as u64),
                c.link_label(),
                p.rounds,
                c.rounds,
                human(p.bytes as u64),
                human(c.total_bytes as u64),
                p.total_s,
                c.total_s,
                p.downtime_s * 1e3,
                c.downtime_s * 1e3
            );
        }
        csv.push_str(&format!(
            "{kind},{},{},{},{},{},{},{:.0},{:.3},{:.4},{},{},{:.0},{:.3},{:.4},{:.3},{:.3},{:.3},{:.3}\n",
            c.contents,
            c.load,
            c.variant,
            c.memory,
            c.link_label(),
            p.rounds,
            p.bytes,
            p.total_s,
            p.downtime_s,
            p.converged,
            c.rounds,
            c.total_bytes,
            c.total_s,
            c.downtime_s,
            e.rounds,
            e.total_bytes,
            e.total_s,
            e.downtime_s
        ));
    }
    // Per guest size, and over all of them when there are several (the
    // CSV row's memory_bytes then left empty).
    let mut groups: Vec<Option<f64>> = sizes.iter().copied().map(Some).collect();
    if sizes.len() > 1 {
        groups.push(None);
    }
    for size in groups {
        let rows: Vec<&Checked<'_>> = v
            .rows
            .iter()
            .filter(|r| size.is_none_or(|s| r.cell.memory == s))
            .collect();
        let summary = error_summary(&rows);
        println!(
            "  {kind}, {} ({} cells), relative error median / max: {}",
            size.map_or_else(
                || "all sizes".into(),
                |s| format!("{} guests", human(s as u64))
            ),
            rows.len(),
            summary
                .iter()
                .map(|e| format!(
                    "{} {:.0}% / {:.0}%",
                    e.name,
                    e.median * 100.0,
                    e.max * 100.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let size = size.map_or_else(String::new, |s| format!("{s}"));
        let row = |stat: &str, f: fn(&ErrorStat) -> f64| {
            let e: Vec<String> = summary.iter().map(|x| format!("{:.3}", f(x))).collect();
            format!("{kind} {stat},,,,{size},,,,,,,,,,,{}\n", e.join(","))
        };
        csv.push_str(&row("median", |e| e.median));
        csv.push_str(&row("max", |e| e.max));
    }
    if v.unmatched > 0 {
        println!(
            "  {} cells not predicted: their contents, load and method were not among the calibration's",
            v.unmatched
        );
    }
}

/// `hpmig model`: checks the model on measured cells it was not calibrated
/// on (when bench.json holds more than one guest size) and on those it
/// was, then predicts the asked-for guests and links from a calibration on
/// all cells, and writes all of it to model.csv.
pub fn run(a: &Options) -> Result<bool> {
    let cells = measured(&BenchResults::read(&a.from)?)?;
    let mut csv = String::from(CSV_HEADER);
    let mut sizes: Vec<f64> = cells.iter().map(|c| c.memory).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();

    // Held out: calibrated on one size, checked on the others.
    if let Some(size) = a
        .calibrate_on
        .map(|s| s as f64)
        .or_else(|| (sizes.len() > 1).then(|| sizes[0]))
    {
        if !sizes.contains(&size) {
            bail!(
                "--calibrate-on {}: bench.json has no hpmig cells of that size",
                human(size as u64)
            );
        }
        let (calibration, unseen) = held_out(&cells, size);
        let cal = calibrate(&calibration);
        println!(
            "hpmig model: held-out check: calibrated on the {} cells of {} guests only ({}), predicting the {} cells of other sizes it has not seen",
            calibration.len(),
            human(size as u64),
            cal.describe(),
            unseen.len()
        );
        if unseen.is_empty() {
            println!("  no other sizes measured: nothing held out");
        }
        let v = validate(&cal, &unseen);
        report("held-out", &v, true, &mut csv);
        println!();
    } else {
        println!("hpmig model: bench.json holds one guest size: no held-out check, the error below is in-sample only\n");
    }

    // In-sample: calibrated on every cell, checked on the same cells.
    let cal = calibrate(&cells);
    println!(
        "in-sample (calibrated on all {} cells, checked on the same cells): {}",
        cells.len(),
        cal.describe()
    );
    report("in-sample", &validate(&cal, &cells), false, &mut csv);

    let mut m = cal.machine;
    if let Some(g) = a.scan_rate {
        (m.round0_rate, m.scan_rate) = (g * 1e9, g * 1e9);
        println!("\npredictions use {g:.2} GB/s for round 0 and the scan of later rounds");
    }
    if let Some(g) = a.digest_rate {
        m.downtime_per_byte += 1.0 / (g * 1e9);
        println!("\npredictions add a whole-memory digest at {g:.2} GB/s to every downtime (--verify strict)");
    }
    let measured_contents: Vec<Contents> = Contents::ALL
        .into_iter()
        .filter(|&k| cells.iter().any(|c| c.contents == k))
        .collect();
    let contents = if a.contents.is_empty() {
        measured_contents.clone()
    } else {
        a.contents.clone()
    };
    for k in &contents {
        if !measured_contents.contains(k) {
            println!(
                "\nno {k} guests in bench.json: no predictions for them (round 0 is not carried over from other contents)"
            );
        }
    }
    println!(
        "\n{:<8} {:<16} {:<13} {:>8} {:>9} {:>7} {:>12} {:>12} {:>12} {:>9}",
        "contents",
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
    for p in cal
        .profiles
        .iter()
        .filter(|p| contents.contains(&p.contents))
    {
        for &memory in &a.memory {
            for &gbit in &a.link_gbit {
                let r = predict(p, &m, memory as f64, gbit * 1e9 / 8.0);
                println!(
                    "{:<8} {:<16} {:<13} {:>8} {:>7}Gb {:>7} {:>12} {:>12.1} {:>12.2} {:>9}",
                    p.contents.as_str(),
                    p.load,
                    p.variant.to_string(),
                    human(memory),
                    gbit,
                    r.rounds,
                    human(r.bytes as u64),
                    r.total_s,
                    r.downtime_s,
                    if r.converged { "yes" } else { "no" }
                );
                csv.push_str(&format!(
                    "prediction,{},{},{},{memory},{gbit},{},{:.0},{:.3},{:.4},{},,,,,,,,\n",
                    p.contents,
                    p.load,
                    p.variant,
                    r.rounds,
                    r.bytes,
                    r.total_s,
                    r.downtime_s,
                    r.converged
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
    println!("\n  checks and predictions: {}", out.display());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(variant: Variant) -> Profile {
        Profile {
            contents: Contents::Full,
            workload: Workload::Sparse,
            dirty_rate: Some(100_000),
            load: "sparse@100k/s".into(),
            variant,
            writes_per_s: 50_000.0,
            round0_per_byte: 1.0,
        }
    }

    const M: Machine = Machine {
        round0_rate: 1e9,
        scan_rate: 2e9,
        downtime_per_byte: 0.0,
        fixed_downtime: 0.01,
    };

    const MIB: f64 = (1u64 << 20) as f64;

    /// What a bench run of `p` on machine `m` would have measured if the
    /// model were exact: the model's own prediction as a measured cell.
    fn measure(p: &Profile, m: &Machine, memory: f64, link: Option<f64>) -> Measured {
        let r = predict(p, m, memory, link.unwrap_or(f64::INFINITY));
        let round0_bytes = p.round0_per_byte * memory;
        Measured {
            memory,
            contents: p.contents,
            workload: p.workload,
            dirty_rate: p.dirty_rate,
            load: p.load.clone(),
            variant: p.variant,
            link,
            rounds: r.rounds as f64,
            total_bytes: r.bytes,
            total_s: r.total_s,
            downtime_s: r.downtime_s,
            progress: 1.0,
            rate_before: p.writes_per_s,
            round0_bytes,
            round0_s: (round0_bytes / link.unwrap_or(f64::INFINITY)).max(memory / m.round0_rate),
            later_rate: m.scan_rate,
            converged: r.converged,
        }
    }

    /// Cells of both methods under sparse@100k/s, 1 Gbit/s and uncapped, at
    /// each of `sizes`.
    fn cells(truth: &Machine, contents: Contents, round0: f64, sizes: &[f64]) -> Vec<Measured> {
        let mut out = Vec::new();
        for &memory in sizes {
            for variant in [Variant::Page, Variant::Segment] {
                let p = Profile {
                    contents,
                    round0_per_byte: round0,
                    ..sparse(variant)
                };
                for link in [Some(1e9 / 8.0), None] {
                    out.push(measure(&p, truth, memory, link));
                }
            }
        }
        out
    }

    #[test]
    fn the_held_out_check_calibrates_on_one_size_and_is_scored_on_the_others() {
        let (small, large) = (256.0 * MIB, 1024.0 * MIB);
        let mut all = cells(&M, Contents::Full, 1.0, &[small, large]);
        // The unseen cells measured something the small ones do not
        // explain: three times the round-0 bytes and total bytes.
        for c in all.iter_mut().filter(|c| c.memory == large) {
            c.round0_bytes *= 3.0;
            c.total_bytes *= 3.0;
        }
        let (calibration, unseen) = held_out(&all, small);
        assert!(calibration.iter().all(|c| c.memory == small));
        assert_eq!(calibration.len() + unseen.len(), all.len());
        let cal = calibrate(&calibration);
        // Calibrated on the small cells only: round 0 as they measured it.
        for p in &cal.profiles {
            assert!((p.round0_per_byte - 1.0).abs() < 1e-9, "{p:?}");
        }
        let v = validate(&cal, &unseen);
        assert_eq!((v.rows.len(), v.unmatched), (unseen.len(), 0));
        for r in &v.rows {
            // Scored only on the unseen size, and the model calibrated on
            // the small guests predicts the large ones: times, rounds and
            // downtime exactly (the cells follow the model), the bytes
            // two thirds below the inflated measurement.
            assert_eq!(r.cell.memory, large);
            assert!(r.err.total_s < 1e-6 && r.err.rounds == 0.0, "{:?}", r.err);
            assert!(r.err.downtime_s < 1e-6, "{:?}", r.err);
            assert!((r.err.total_bytes - 2.0 / 3.0).abs() < 1e-6, "{:?}", r.err);
        }
        // In-sample the inflated cells pull round 0 up: the check above
        // would not have caught the miss had it seen them.
        let all_in = calibrate(&all);
        assert!(all_in.profiles.iter().all(|p| p.round0_per_byte > 1.5));
    }

    #[test]
    fn round_0_comes_from_guests_of_the_same_contents() {
        let small = 256.0 * MIB;
        let mut all = cells(&M, Contents::Empty, 0.02, &[small]);
        all.extend(cells(&M, Contents::Full, 1.0, &[small]));
        let cal = calibrate(&all);
        let tib = (1u64 << 40) as f64;
        let link = 100e9 / 8.0;
        let of = |contents, variant| {
            let p = cal
                .profiles
                .iter()
                .find(|p| p.contents == contents && p.variant == variant)
                .expect("a profile per contents and method");
            (p.round0_per_byte, predict(p, &cal.machine, tib, link))
        };
        let ((e0, _), (f0, _)) = (
            of(Contents::Empty, Variant::Page),
            of(Contents::Full, Variant::Page),
        );
        assert!(
            (e0 - 0.02).abs() < 1e-9 && (f0 - 1.0).abs() < 1e-9,
            "{e0} {f0}"
        );
        // A full TiB guest: both methods send about all of it in round 0,
        // so page pre-copy is not predicted to send a hundred times what
        // segment pre-copy does.
        let (_, page) = of(Contents::Full, Variant::Page);
        let (_, seg) = of(Contents::Full, Variant::Segment);
        assert!(
            seg.bytes >= tib && page.bytes >= seg.bytes,
            "{page:?} {seg:?}"
        );
        assert!(page.bytes < 2.0 * seg.bytes, "{page:?} {seg:?}");
        // A contents without cells gets no profile: mixed guests are not
        // predicted from empty or full ones.
        let mixed = Measured {
            contents: Contents::Mixed,
            ..all[0].clone()
        };
        assert!(profile_of(&cal.profiles, &mixed).is_none());
        let v = validate(&cal, std::slice::from_ref(&mixed));
        assert_eq!((v.rows.len(), v.unmatched), (0, 1));
    }

    #[test]
    fn the_downtime_keeps_a_per_byte_term_only_when_the_data_has_one() {
        let gib = (1u64 << 30) as f64;
        let sizes = [0.25 * gib, gib, 4.0 * gib];
        // A fixed 20 ms, jittered ±2 ms: no slope.
        let flat: Vec<(f64, f64)> = sizes
            .iter()
            .flat_map(|&m| [(m, 0.018), (m, 0.022), (m, 0.020)])
            .collect();
        let fit = DowntimeFit::of(&flat);
        assert!(!fit.kept && (fit.fixed - 0.020).abs() < 1e-9, "{fit:?}");
        // A whole-memory digest at 4 GB/s on top: kept, and recovered.
        let digest: Vec<(f64, f64)> = flat.iter().map(|&(m, r)| (m, r + m / 4e9)).collect();
        let fit = DowntimeFit::of(&digest);
        assert!(fit.kept && (fit.slope * 4e9 - 1.0).abs() < 0.01, "{fit:?}");
        assert!((fit.fixed - 0.020).abs() < 1e-3, "{fit:?}");
        // One size: no slope to fit.
        assert_eq!(DowntimeFit::of(&flat[..3]).sizes, 1);
        assert!(!DowntimeFit::of(&flat[..3]).kept);
    }

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
