//! `hpmig demo`: boot a guest, let it dirty memory, migrate it live to a
//! destination, verify the copy and show that the guest runs on.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, MigrationReport, RoundReport, SourceConfig};
use hpmig_core::segment::Granularity;
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_core::vm::emulated::{heartbeat, EmulatedConfig, EmulatedGuest};
use hpmig_core::vm::Workload;
use vm_memory::GuestAddress;

use crate::units::{human, parse_bytes, parse_millis};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    memory: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// How the guest dirties memory: sparse, dense, hotspot, aba, idle.
    #[arg(long, default_value = "sparse")]
    workload: Workload,
    /// Guest writes per second (all vCPUs together); unbounded if not given.
    #[arg(long)]
    dirty_rate: Option<u64>,
    /// page (classic pre-copy) or segment (dirty offset segments).
    #[arg(long, default_value = "segment")]
    granularity: Granularity,
    /// Diff workers (one ring and stream each).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Pin worker threads to cores.
    #[arg(long)]
    pin: bool,
    /// Downtime target (e.g. 300ms).
    #[arg(long, default_value = "300ms", value_parser = parse_millis)]
    downtime: Duration,
    /// Most pre-copy rounds before stopping anyway.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Give up (guest stays on the source) instead of forcing stop-and-copy
    /// when rounds stop converging.
    #[arg(long)]
    abort_on_stall: bool,
    /// Cap the shadow copy (segment mode) at this size; default: full copy.
    #[arg(long, value_parser = parse_bytes)]
    shadow_budget: Option<u64>,
    /// How long the guest runs before migration starts.
    #[arg(long, default_value = "500ms", value_parser = parse_millis)]
    warmup: Duration,
    /// Write a JSON report here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(a: &DemoArgs) -> Result<bool> {
    let page = hpmig_core::memory::host_page_size() as u64;
    if a.memory < 1 << 20 || a.memory % page != 0 {
        bail!("--memory must be at least 1 MiB and a multiple of the page size ({page} bytes)");
    }
    println!(
        "hpmig demo: {} guest, {} vCPU(s), workload {}, {} granularity, {} worker(s)",
        human(a.memory),
        a.vcpus,
        a.workload.as_str(),
        a.granularity.as_str(),
        a.workers
    );
    println!("  guest: emulated (vCPU threads writing through vm-memory; the KVM micro-VM is not built yet)");
    println!("  wire:  in-process channels (the TCP and RDMA transports are not built yet)");

    let memory = SourceMemory::from_ranges(&[(GuestAddress(0), a.memory as usize)])
        .context("allocating guest memory")?;
    let layout = Layout::of(&memory)?;
    let mut guest = EmulatedGuest::start(
        memory.clone(),
        EmulatedConfig {
            workload: a.workload,
            vcpus: a.vcpus,
            dirty_rate: a.dirty_rate,
            seed: 1,
        },
    )?;
    std::thread::sleep(a.warmup);
    let w0 = guest.writes();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let rate_before = (guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();

    let dest_memory: DestMemory = layout.allocate()?;
    let (mut src, mut dst) = pair(Faults::none());
    let dm = dest_memory.clone();
    let dest = std::thread::spawn(move || receive(&dm, &mut dst, &DestConfig::default()));

    let mut cfg = SourceConfig::new(a.granularity);
    cfg.workers = a.workers;
    cfg.pin = a.pin;
    cfg.shadow_budget = a.shadow_budget;
    cfg.policy = Policy {
        downtime_target: a.downtime,
        max_rounds: a.max_rounds,
        on_stall: if a.abort_on_stall {
            OnStall::Abort
        } else {
            OnStall::ForceStop
        },
        ..Policy::default()
    };
    let mut dirty = VmmBitmap::new(memory.clone(), layout)?;

    println!();
    println!(
        "{:>5} {:>11} {:>13} {:>13} {:>9} {:>10}  decision",
        "round", "dirty pages", "work set", "on the wire", "ms", "MB/s"
    );
    let w_start = guest.writes();
    let t_start = Instant::now();
    let mut print_round = |r: &RoundReport| {
        let m = &r.metrics;
        let secs = m.duration.as_secs_f64();
        let rate = if secs > 0.0 {
            m.wire_bytes as f64 / secs / 1e6
        } else {
            0.0
        };
        let decision = if r.last {
            "stop-and-copy round".to_string()
        } else {
            format!("{:?}", r.decision)
        };
        println!(
            "{:>5} {:>11} {:>13} {:>13} {:>9.1} {:>10.1}  {decision}",
            m.round,
            m.dirty_pages,
            human(m.work_set_bytes),
            human(m.wire_bytes),
            secs * 1e3,
            rate
        );
    };
    let outcome = migrate(
        &memory,
        &mut dirty,
        &mut guest,
        &mut src,
        &cfg,
        &mut print_round,
    );
    let migrate_secs = t_start.elapsed().as_secs_f64();
    let rate_during = (guest.writes() - w_start) as f64 / migrate_secs;
    drop(src);
    let dest = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;

    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            println!("\nmigration FAILED: {e}");
            if let Err(d) = dest {
                println!("destination: {d}");
            }
            return Ok(false);
        }
    };
    let received = dest.context("destination failed after the source succeeded")?;
    let hb_before = heartbeat(&memory, 0);
    drop(guest);

    // Resume on the destination and watch the heartbeat move on.
    let resumed = EmulatedGuest::start(
        dest_memory.clone(),
        EmulatedConfig {
            workload: a.workload,
            vcpus: received.vcpus.max(1),
            dirty_rate: a.dirty_rate,
            seed: 2,
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while heartbeat(&dest_memory, 0) <= hb_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let hb_after = heartbeat(&dest_memory, 0);
    drop(resumed);

    let ok = report.verified && received.verified && hb_after > hb_before;
    print_summary(&report, hb_before, hb_after, rate_before, rate_during);
    if let Some(path) = &a.json {
        write_json(path, &report, hb_before, hb_after, rate_before, rate_during)?;
        println!("  report:        {}", path.display());
    }
    Ok(ok)
}

fn print_summary(
    r: &MigrationReport,
    hb_before: u64,
    hb_after: u64,
    rate_before: f64,
    rate_during: f64,
) {
    println!();
    println!(
        "  total time:    {:.1} ms",
        r.total_time.as_secs_f64() * 1e3
    );
    println!(
        "  downtime:      {:.1} ms (guest paused until the destination acknowledged; {:.1} ms of it digesting memory to verify)",
        r.downtime.as_secs_f64() * 1e3,
        r.verify_time.as_secs_f64() * 1e3
    );
    println!(
        "  on the wire:   {} total, {} after round 0",
        human(r.wire_bytes),
        human(r.wire_bytes_after_round0())
    );
    println!(
        "  rounds:        {} ({}, stop: {:?})",
        r.rounds.len(),
        if r.converged() {
            "converged"
        } else {
            "did NOT converge"
        },
        r.stop
    );
    println!(
        "  digest:        {}",
        if r.verified {
            "verified, destination equals source"
        } else {
            "NOT verified"
        }
    );
    println!("  heartbeat:     {hb_before} at switch-over, {hb_after} on the destination afterwards ({})",
        if hb_after > hb_before { "guest runs on" } else { "did NOT advance" });
    println!(
        "  guest writes:  {rate_before:.0}/s before, {rate_during:.0}/s during migration ({:.0}%)",
        if rate_before > 0.0 {
            100.0 * rate_during / rate_before
        } else {
            0.0
        }
    );
}

fn write_json(
    path: &std::path::Path,
    r: &MigrationReport,
    hb_before: u64,
    hb_after: u64,
    rate_before: f64,
    rate_during: f64,
) -> Result<()> {
    let rounds: Vec<_> = r
        .rounds
        .iter()
        .map(|x| {
            serde_json::json!({
                "round": x.metrics.round,
                "dirty_pages": x.metrics.dirty_pages,
                "work_set_bytes": x.metrics.work_set_bytes,
                "wire_bytes": x.metrics.wire_bytes,
                "duration_ms": x.metrics.duration.as_secs_f64() * 1e3,
                "segments": x.stats.segments,
                "whole_pages": x.stats.whole_pages,
                "zero_pages": x.stats.zero_pages,
                "unchanged_pages": x.stats.unchanged_pages,
                "stop_and_copy": x.last,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "granularity": r.granularity.as_str(),
        "rounds": rounds,
        "summary": {
            "total_time_ms": r.total_time.as_secs_f64() * 1e3,
            "downtime_ms": r.downtime.as_secs_f64() * 1e3,
            "verify_ms": r.verify_time.as_secs_f64() * 1e3,
            "wire_bytes": r.wire_bytes,
            "wire_bytes_after_round0": r.wire_bytes_after_round0(),
            "rounds": r.rounds.len(),
            "converged": r.converged(),
            "stop_reason": format!("{:?}", r.stop),
            "verified": r.verified,
            "heartbeat_before": hb_before,
            "heartbeat_after": hb_after,
            "guest_rate_before": rate_before,
            "guest_rate_during": rate_during,
        }
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}
