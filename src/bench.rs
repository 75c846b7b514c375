//! `hpmig bench`: the migration benchmark matrix. Each cell boots a guest,
//! migrates it over TCP on loopback (the cap emulates the link), and records
//! rounds, bytes per round, total bytes, total time, downtime, convergence
//! and the guest's own progress during migration relative to before; cells
//! repeat, and the report gives the median and the spread (min..max).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, SourceConfig};
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::protocol::Granularity;
use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_microvm::Workload;
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

use hpmig_microvm::{self as guest, BootSpec, GuestChoice};
use hpmig_bench::plots;
use hpmig_bench::qemu;
use crate::units::human;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The small matrix (a few minutes on 2 cores), as CI runs it.
    #[arg(long)]
    quick: bool,
    /// Runs per cell.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where the CSV and JSON reports go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Which guest to migrate.
    #[arg(long, value_enum, default_value = "auto")]
    guest: GuestChoice,
    /// Run only the comparison with QEMU on the same guest program (sparse
    /// flat out, 1 and 10 Gbit/s; QEMU plain, xbzrle, multifd next to
    /// hpmig page and segment). The full matrix includes it.
    #[arg(long, conflicts_with = "quick")]
    peer: bool,
    /// Only these guest sizes of the full matrix (comma-separated, e.g.
    /// 256M,1G); all three when absent.
    #[arg(long, value_delimiter = ',', value_parser = crate::units::parse_bytes)]
    memory: Vec<u64>,
    /// Guest size of the QEMU comparison.
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_bytes)]
    peer_memory: u64,
}

/// Who migrates, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Hpmig {
        granularity: Granularity,
        zstd: bool,
    },
    Qemu(qemu::Mode),
}

/// One cell of the matrix.
#[derive(Clone, Copy, Debug)]
struct Cell {
    workload: Workload,
    rate: Option<u64>,
    variant: Variant,
    cap: Option<u64>,
    memory: u64,
}

impl Cell {
    fn variant(&self) -> &'static str {
        match self.variant {
            Variant::Hpmig {
                granularity: Granularity::Page,
                ..
            } => "page",
            Variant::Hpmig { zstd: false, .. } => "segment",
            Variant::Hpmig { zstd: true, .. } => "segment+zstd",
            Variant::Qemu(m) => m.name(),
        }
    }

    fn link(&self) -> String {
        self.cap.map_or("uncapped".into(), |c| {
            format!("{}Gbit", c * 8 / 1_000_000_000)
        })
    }

    fn load(&self) -> String {
        match self.rate {
            Some(r) => format!("{}@{}k/s", self.workload.as_str(), r / 1000),
            None if self.workload == Workload::Idle => "idle".into(),
            None => format!("{}@max", self.workload.as_str()),
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Sample {
    rounds: usize,
    bytes_per_round: Vec<u64>,
    /// Each round's duration (hpmig only).
    ms_per_round: Vec<f64>,
    total_bytes: u64,
    total_ms: f64,
    downtime_ms: f64,
    converged: bool,
    /// Guest writes per second during migration over before it.
    progress: f64,
    /// Guest writes per second before migration (what the pacing achieved).
    rate_before: f64,
    /// Of the downtime, how long hpmig digested memory to verify the copy
    /// (QEMU verifies nothing: 0).
    verify_ms: f64,
}

/// A workload and its dirty rate.
type Load = (Workload, Option<u64>);
const PAGE: Variant = Variant::Hpmig {
    granularity: Granularity::Page,
    zstd: false,
};
const SEGMENT: Variant = Variant::Hpmig {
    granularity: Granularity::Segment,
    zstd: false,
};
const SEGMENT_ZSTD: Variant = Variant::Hpmig {
    granularity: Granularity::Segment,
    zstd: true,
};
const GBIT: u64 = 125_000_000;

/// The comparison with QEMU on the same guest program: the sparse workload
/// at 100k stores/s (QEMU's guest paces itself by the TSC, hpmig's VMM at
/// its doorbell), hpmig page and segment next to QEMU plain, xbzrle and
/// multifd, at 1 and 10 Gbit/s.
fn peer_matrix(memory: u64, qemu: bool) -> Vec<Cell> {
    let mut variants = vec![PAGE, SEGMENT];
    if qemu {
        variants.extend(
            [qemu::Mode::Plain, qemu::Mode::Xbzrle, qemu::Mode::Multifd].map(Variant::Qemu),
        );
    }
    let mut cells = Vec::new();
    for cap in [Some(GBIT), Some(10 * GBIT)] {
        for &variant in &variants {
            cells.push(Cell {
                workload: Workload::Sparse,
                rate: Some(100_000),
                variant,
                cap,
                memory,
            });
        }
    }
    cells
}

fn matrix(quick: bool) -> Vec<Cell> {
    let (memories, loads, variants, caps): (Vec<u64>, Vec<Load>, Vec<Variant>, Vec<Option<u64>>) =
        if quick {
            (
                vec![64 << 20],
                vec![
                    (Workload::Sparse, Some(100_000)),
                    (Workload::Dense, Some(20_000)),
                    (Workload::Idle, None),
                ],
                vec![PAGE, SEGMENT],
                vec![Some(GBIT), None],
            )
        } else {
            (
                vec![256 << 20, 1 << 30, 4 << 30],
                vec![
                    (Workload::Sparse, Some(10_000)),
                    (Workload::Sparse, Some(100_000)),
                    (Workload::Sparse, Some(1_000_000)),
                    (Workload::Dense, None),
                    (Workload::Hotspot, None),
                    (Workload::Idle, None),
                ],
                vec![PAGE, SEGMENT, SEGMENT_ZSTD],
                vec![Some(GBIT), Some(10 * GBIT), Some(25 * GBIT), None],
            )
        };
    let mut cells = Vec::new();
    for &memory in &memories {
        for &(workload, rate) in &loads {
            for &cap in &caps {
                for &variant in &variants {
                    cells.push(Cell {
                        workload,
                        rate,
                        variant,
                        cap,
                        memory,
                    });
                }
            }
        }
    }
    cells
}

fn run_cell(cell: &Cell, choice: GuestChoice) -> Result<Sample> {
    let (granularity, zstd) = match cell.variant {
        Variant::Hpmig { granularity, zstd } => (granularity, zstd),
        Variant::Qemu(mode) => return run_qemu_cell(cell, mode),
    };
    let memory = SourceMemory::from_ranges(&hpmig_microvm::kvm::memory_ranges(cell.memory)?)?;
    let spec = BootSpec {
        choice,
        workload: cell.workload,
        vcpus: 1,
        dirty_rate: cell.rate,
        dirty_log: DirtyLogMode::Bitmap,
    };
    let (mut guest, mut dirty, _) = guest::boot(&memory, &spec)?;
    std::thread::sleep(Duration::from_millis(300));
    let (w0, t0) = (guest.writes(), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let rate_before = (guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();

    let dest_memory: DestMemory = Layout::of(&memory)?.allocate()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dm = dest_memory.clone();
    let dest = std::thread::spawn(move || -> Result<()> {
        let mut t = TcpDest::accept(listener, TcpOptions::default())?;
        let cfg = DestConfig {
            memory_zeroed: true,
            ..DestConfig::default()
        };
        let mut arrival = hpmig_microvm::Arrival::new(&dm);
        receive(&dm, &mut t, &cfg, &mut arrival)?;
        arrival.stop();
        Ok(())
    });
    let mut cfg = SourceConfig::new(granularity);
    cfg.bandwidth = cell.cap;
    cfg.zstd = if zstd { ZstdMode::Auto } else { ZstdMode::Off };
    cfg.policy = policy();
    let mut t = TcpSource::connect(addr, TcpOptions::default())?;
    let (w1, t1) = (guest.writes(), Instant::now());
    let report = migrate(
        &memory,
        dirty.as_mut(),
        &mut guest,
        &mut t,
        &cfg,
        &mut |_| {},
    );
    let rate_during = (guest.writes() - w1) as f64 / t1.elapsed().as_secs_f64();
    drop(t);
    dest.join()
        .map_err(|_| anyhow!("destination thread panicked"))??;
    let r = report?;
    if !r.verified {
        return Err(anyhow!("digest not verified"));
    }
    Ok(Sample {
        rounds: r.rounds.len(),
        bytes_per_round: r.rounds.iter().map(|x| x.metrics.wire_bytes).collect(),
        ms_per_round: r
            .rounds
            .iter()
            .map(|x| x.metrics.duration.as_secs_f64() * 1e3)
            .collect(),
        total_bytes: r.wire_bytes,
        total_ms: r.total_time.as_secs_f64() * 1e3,
        downtime_ms: r.downtime.as_secs_f64() * 1e3,
        converged: r.converged(),
        progress: if rate_before > 0.0 {
            rate_during / rate_before
        } else {
            1.0
        },
        rate_before,
        verify_ms: r.verify_time.as_secs_f64() * 1e3,
    })
}

/// The stop policy of every hpmig run; QEMU gets the same downtime limit.
fn policy() -> Policy {
    Policy {
        max_rounds: 10,
        on_stall: OnStall::ForceStop,
        ..Policy::default()
    }
}

fn run_qemu_cell(cell: &Cell, mode: qemu::Mode) -> Result<Sample> {
    let o = qemu::migrate(&qemu::Run {
        workload: cell.workload,
        dirty_rate: cell.rate,
        memory: cell.memory,
        mode,
        bandwidth: cell.cap,
        downtime_limit: policy().downtime_target,
        channels: SourceConfig::new(Granularity::Page).workers,
        timeout: Duration::from_secs(20),
    })?;
    Ok(Sample {
        rounds: o.dirty_syncs as usize,
        bytes_per_round: Vec::new(),
        ms_per_round: Vec::new(),
        total_bytes: o.transferred,
        total_ms: o.total_ms,
        downtime_ms: o.downtime_ms,
        converged: o.converged,
        progress: o.progress,
        rate_before: o.rate_before,
        verify_ms: 0.0,
    })
}

/// Median and (min, max) of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

pub fn run(a: &BenchArgs) -> Result<bool> {
    let with_qemu = !a.quick && qemu::available();
    let mut cells = if a.peer { Vec::new() } else { matrix(a.quick) };
    if !a.memory.is_empty() {
        cells.retain(|c| a.memory.contains(&c.memory));
    }
    if !a.quick {
        cells.extend(peer_matrix(a.peer_memory, with_qemu));
    }
    let repeats = a.repeats.max(1);
    println!(
        "hpmig bench: {} cells x {repeats} runs ({})",
        cells.len(),
        if a.quick {
            "quick matrix"
        } else if a.peer {
            "the QEMU comparison"
        } else {
            "full matrix"
        }
    );
    println!("  wire: TCP over loopback, the cap emulating the link");
    if !a.quick {
        if with_qemu {
            println!("  peer: QEMU ({}) on the same guest program, migrating over loopback with its own migration", qemu::QEMU);
        } else {
            println!("  peer: {} not found, so hpmig runs alone (apt-get install qemu-system-x86 adds the QEMU comparison)", qemu::QEMU);
        }
    }
    println!();
    println!(
        "{:>7} {:<16} {:<9} {:<13} {:>7} {:>13} {:>10} {:>10} {:>9} {:>9}",
        "memory",
        "workload",
        "link",
        "variant",
        "rounds",
        "total bytes",
        "time ms",
        "down ms",
        "converged",
        "progress"
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut csv = String::from("memory_bytes,workload,dirty_rate,link,variant,runs,rounds_median,total_bytes_median,total_bytes_min,total_bytes_max,total_ms_median,total_ms_min,total_ms_max,downtime_ms_median,downtime_ms_min,downtime_ms_max,converged_runs,progress_median\n");
    let mut json = Vec::new();
    let mut points = Vec::new();
    let mut ok = true;
    for cell in &cells {
        let mut samples = Vec::new();
        for _ in 0..repeats {
            match run_cell(cell, a.guest) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    ok = false;
                    println!(
                        "  {} {} {} {}: run FAILED: {e:#}",
                        human(cell.memory),
                        cell.load(),
                        cell.link(),
                        cell.variant()
                    );
                }
            }
        }
        if samples.is_empty() {
            continue;
        }
        let (rounds, _, _) = stats(samples.iter().map(|s| s.rounds as f64).collect());
        let bytes = stats(samples.iter().map(|s| s.total_bytes as f64).collect());
        let time = stats(samples.iter().map(|s| s.total_ms).collect());
        let down = stats(samples.iter().map(|s| s.downtime_ms).collect());
        let (progress, _, _) = stats(samples.iter().map(|s| s.progress).collect());
        let converged = samples.iter().filter(|s| s.converged).count();
        println!(
            "{:>7} {:<16} {:<9} {:<13} {:>7} {:>13} {:>10.0} {:>10.1} {:>9} {:>8.0}%",
            human(cell.memory),
            cell.load(),
            cell.link(),
            cell.variant(),
            rounds,
            human(bytes.0 as u64),
            time.0,
            down.0,
            format!("{converged}/{}", samples.len()),
            progress * 100.0
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{:.0},{:.0},{:.0},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{:.3}\n",
            cell.memory,
            cell.workload.as_str(),
            cell.rate.unwrap_or(0),
            cell.link(),
            cell.variant(),
            samples.len(),
            rounds,
            bytes.0,
            bytes.1,
            bytes.2,
            time.0,
            time.1,
            time.2,
            down.0,
            down.1,
            down.2,
            converged,
            progress
        ));
        let mut by_bytes: Vec<&Sample> = samples.iter().collect();
        by_bytes.sort_by_key(|s| s.total_bytes);
        points.push(plots::Point {
            workload: cell.load(),
            memory: cell.memory,
            link: cell.link(),
            link_gbit: cell.cap.map(|c| c as f64 * 8.0 / 1e9),
            variant: cell.variant().to_string(),
            rounds,
            total_bytes: bytes.0,
            total_ms: time.0,
            downtime_ms: down.0,
            bytes_per_round: by_bytes[by_bytes.len() / 2].bytes_per_round.clone(),
        });
        json.push(serde_json::json!({
            "memory_bytes": cell.memory,
            "workload": cell.workload.as_str(),
            "dirty_rate": cell.rate,
            "link": cell.link(),
            "variant": cell.variant(),
            "runs": samples.iter().map(|s| serde_json::json!({
                "rounds": s.rounds,
                "bytes_per_round": s.bytes_per_round,
                "ms_per_round": s.ms_per_round,
                "total_bytes": s.total_bytes,
                "total_ms": s.total_ms,
                "downtime_ms": s.downtime_ms,
                "verify_ms": s.verify_ms,
                "converged": s.converged,
                "guest_progress": s.progress,
                "guest_writes_per_s_before": s.rate_before,
            })).collect::<Vec<_>>(),
        }));
    }
    let csv_path = a.out.join("bench.csv");
    std::fs::File::create(&csv_path)?.write_all(csv.as_bytes())?;
    let json_path = a.out.join("bench.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&serde_json::json!({ "cells": json }))?,
    )?;
    println!(
        "\n  results: {} and {}",
        csv_path.display(),
        json_path.display()
    );
    for plot in plots::write(&a.out, &points)? {
        println!("  plot:    {}", plot.display());
    }
    Ok(ok)
}
