//! The migration benchmark matrix behind `hpmig bench`. It owns the cells
//! (guest size × load × link × method) and how one run of a cell goes: boot
//! a guest, migrate it over TCP on a shaped veth link ([`crate::link`]; or
//! loopback with each tool's own cap, `--link-emulation cap`),
//! and record rounds, bytes per round, total bytes, total time, downtime,
//! convergence and the guest's own progress during migration relative to
//! before. Cells repeat; the table printed as they finish and the reports
//! written at the end ([`crate::results`]) give the median and the spread
//! (min..max), and the figures ([`crate::plots`]) are drawn from them.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{Contents, DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::{migrate, ShadowMode, SourceConfig};
use hpmig_core::protocol::Granularity;
use hpmig_core::segment::compress::ZstdMode;
use hpmig_microvm::blackout::Observer;
use hpmig_microvm::kvm::heartbeat;
use hpmig_microvm::{self as guest, BootSpec, GuestChoice, Workload};
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

use crate::link::{self, Emulation, ShapedLink};
use crate::results::{BenchResults, Cell, Link, Run, Setting, Variant};
use crate::{human, plots, policy, qemu};
use hpmig_report::text::millis;

/// What `hpmig bench` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The small matrix (a few minutes on 2 cores), as CI runs it.
    pub quick: bool,
    /// Runs per cell (at least one).
    pub repeats: usize,
    /// Where the CSV and JSON reports and the figures go.
    pub out: PathBuf,
    /// Which guest to migrate.
    pub guest: GuestChoice,
    /// Only the comparison with QEMU (the full matrix includes it).
    pub peer: bool,
    /// Only these guest sizes of the full matrix; all when empty.
    pub memory: Vec<u64>,
    /// Guest size of the QEMU comparison.
    pub peer_memory: u64,
    /// Guest contents to run instead of the matrices' own; all when empty.
    pub contents: Vec<Contents>,
    /// Only these loads of the matrix, as the table names them
    /// (`sparse@100k/s`, `dense@max`, `idle`; the `/s` may be left off);
    /// all when empty.
    pub loads: Vec<String>,
    /// Only these links of the matrix, as the table names them (`1Gbit`,
    /// `uncapped`); all when empty.
    pub links: Vec<String>,
    /// How the link is emulated: a shaped veth pair (default) or each
    /// tool's own cap on loopback.
    pub link: Emulation,
}

/// A workload and its dirty rate.
type Load = (Workload, Option<u64>);

/// The comparison with QEMU on the same guest program: the sparse workload
/// at 100k stores/s (QEMU's guest paces itself by the TSC, hpmig's VMM at
/// its doorbell), hpmig page and segment next to QEMU plain, xbzrle and
/// multifd, at 1 and 10 Gbit/s.
fn peer_matrix(memory: u64, with_qemu: bool, contents: &[Contents]) -> Vec<Setting> {
    // hpmig's full shadow and its bounded fingerprints, and xbzrle at
    // either budget.
    let mut variants = vec![Variant::Page, Variant::Segment, Variant::SegmentFp];
    if with_qemu {
        variants.extend([
            Variant::Qemu,
            Variant::QemuXbzrle,
            Variant::QemuXbzrleBounded,
            Variant::QemuMultifd,
        ]);
    }
    let contents = if contents.is_empty() {
        &[Contents::Full][..]
    } else {
        contents
    };
    let mut cells = Vec::new();
    for &contents in contents {
        for link in [Link::gbit(1), Link::gbit(10)] {
            for &variant in &variants {
                cells.push(Setting {
                    memory_bytes: memory,
                    workload: Workload::Sparse,
                    contents,
                    dirty_rate: Some(100_000),
                    link,
                    variant,
                });
            }
        }
    }
    cells
}

/// Whether the `--loads` and `--links` filters keep `cell`: a filter keeps
/// what it names; an empty one keeps everything.
fn kept(cell: &Setting, loads: &[String], links: &[String]) -> bool {
    let named = |names: &[String], label: String| {
        names.is_empty()
            || names
                .iter()
                .any(|n| n.trim_end_matches("/s") == label.trim_end_matches("/s"))
    };
    named(loads, cell.load()) && named(links, cell.link.to_string())
}

fn matrix(
    quick: bool,
    only: &[Contents],
    only_loads: &[String],
    only_links: &[String],
) -> Vec<Setting> {
    use Variant::{Page, Segment, SegmentZstd};
    // Guests hold data: what each method sends for a page depends on it.
    // The full matrix adds the mixed blend; empty guests are not measured
    // by default (`Contents::Empty` stays for runs that ask for it).
    let contents = if !only.is_empty() {
        only.to_vec()
    } else if quick {
        vec![Contents::Full]
    } else {
        vec![Contents::Full, Contents::Mixed]
    };
    let (memories, loads, variants, links): (Vec<u64>, Vec<Load>, Vec<Variant>, Vec<Link>) =
        if quick {
            (
                vec![64 << 20],
                vec![
                    (Workload::Sparse, Some(100_000)),
                    (Workload::Dense, Some(20_000)),
                    (Workload::Idle, None),
                ],
                vec![Page, Segment],
                vec![Link::gbit(1), Link::UNCAPPED],
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
                vec![Page, Segment, SegmentZstd],
                vec![
                    Link::gbit(1),
                    Link::gbit(10),
                    Link::gbit(25),
                    Link::UNCAPPED,
                ],
            )
        };
    let mut cells = Vec::new();
    for &memory_bytes in &memories {
        for &contents in &contents {
            for &(workload, dirty_rate) in &loads {
                for &link in &links {
                    for &variant in &variants {
                        let cell = Setting {
                            memory_bytes,
                            workload,
                            contents,
                            dirty_rate,
                            link,
                            variant,
                        };
                        if kept(&cell, only_loads, only_links) {
                            cells.push(cell);
                        }
                    }
                }
            }
        }
    }
    cells
}

/// One run of a cell, over a fresh shaped link (or each tool's own cap).
fn run_cell(cell: &Setting, choice: GuestChoice, emulation: Emulation) -> Result<Run> {
    let link = match emulation {
        Emulation::Veth => Some(ShapedLink::create(cell.link.bytes_per_s())?),
        Emulation::Cap => None,
    };
    let link = link.as_ref();
    let hpmig =
        |granularity, zstd| run_hpmig(cell, granularity, zstd, ShadowMode::Full, choice, link);
    // The link carries the migration and next to nothing else (its IPv6
    // neighbour discovery is off): the guests boot and measure their rate
    // before it starts without a byte on it.
    let mut run = counted(link, || match cell.variant {
        Variant::Page => hpmig(Granularity::Page, ZstdMode::Off),
        Variant::Segment => hpmig(Granularity::Segment, ZstdMode::Off),
        Variant::SegmentZstd => hpmig(Granularity::Segment, ZstdMode::Auto),
        Variant::SegmentFp => run_hpmig(
            cell,
            Granularity::Segment,
            ZstdMode::Off,
            ShadowMode::Fingerprint,
            choice,
            link,
        ),
        Variant::Qemu => run_qemu(cell, qemu::Mode::Plain, link),
        Variant::QemuXbzrle => run_qemu(cell, qemu::Mode::Xbzrle, link),
        Variant::QemuMultifd => run_qemu(cell, qemu::Mode::Multifd, link),
        Variant::QemuXbzrleBounded => run_qemu(cell, qemu::Mode::Xbzrle, link),
    })?;
    run.link_emulation = emulation;
    Ok(run)
}

/// Counts the link's bytes over `f` (a migration) and puts them in its run:
/// `total_bytes` becomes every byte the link carried, both ways.
fn counted(link: Option<&ShapedLink>, f: impl FnOnce() -> Result<Run>) -> Result<Run> {
    let Some(link) = link else {
        let mut run = f()?;
        run.tool_bytes = run.total_bytes;
        return Ok(run);
    };
    let counter = link.count()?;
    let mut run = f()?;
    let c = counter.finish(link)?;
    run.tool_bytes = run.total_bytes;
    run.total_bytes = c.tx_bytes + c.rx_bytes;
    run.link_tx_bytes = Some(c.tx_bytes);
    run.link_rx_bytes = Some(c.rx_bytes);
    run.link_peak_rate = Some(c.peak_rate);
    run.cpu_bound = c.cpu_bound();
    Ok(run)
}

fn run_hpmig(
    cell: &Setting,
    granularity: Granularity,
    zstd: ZstdMode,
    shadow: ShadowMode,
    choice: GuestChoice,
    link: Option<&ShapedLink>,
) -> Result<Run> {
    // The peak resident memory from here on is this run's.
    reset_peak_rss();
    let memory = SourceMemory::from_ranges(&hpmig_microvm::kvm::memory_ranges(cell.memory_bytes)?)?;
    guest::fill_guest(&memory, cell.contents);
    let spec = BootSpec {
        choice,
        workload: cell.workload,
        vcpus: 1,
        dirty_rate: cell.dirty_rate,
        dirty_log: DirtyLogMode::Bitmap,
    };
    let (mut guest, mut dirty, _) = guest::boot(&memory, &spec)?;
    std::thread::sleep(Duration::from_millis(300));
    let (w0, b0, t0) = (guest.writes(), heartbeat(&memory, 0), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let secs = t0.elapsed().as_secs_f64();
    let rate_before = (guest.writes() - w0) as f64 / secs;
    let beats_per_s_before = (heartbeat(&memory, 0) - b0) as f64 / secs;

    let dest_memory: DestMemory = Layout::of(&memory)?.allocate()?;
    let listener = match link {
        Some(link) => link.listen()?,
        None => TcpListener::bind("127.0.0.1:0")?,
    };
    let addr = listener.local_addr()?;
    let wake = listener.try_clone()?;
    let dm = dest_memory.clone();
    let dest = std::thread::spawn(move || -> Result<hpmig_microvm::Arrival> {
        let mut t = TcpDest::accept(listener, TcpOptions::default())?;
        let cfg = DestConfig {
            memory_zeroed: true,
            ..DestConfig::default()
        };
        let mut arrival = hpmig_microvm::Arrival::new();
        receive(&dm, &mut t, &cfg, &mut arrival)?;
        // Running on: the observer waits for its first beat.
        Ok(arrival)
    });
    let mut cfg = SourceConfig::new(granularity);
    let observer = Observer::for_migration(memory.clone(), dest_memory.clone(), 1, &cfg.live);
    // On a shaped link the link is the only limit, as for QEMU.
    cfg.bandwidth = cell.link.bytes_per_s().filter(|_| link.is_none());
    cfg.zstd = zstd;
    cfg.shadow = shadow;
    cfg.policy = policy();
    let mut t = match TcpSource::connect(addr, TcpOptions::default()) {
        Ok(t) => t,
        Err(e) => {
            // The destination waits in accept without a deadline, and its
            // socket would keep the link's namespace alive: wake it.
            // SAFETY: shutdown(2) on `wake`, a duplicate of the listener's
            // descriptor that stays open for the call; it only changes the
            // socket's state (accept returns an error).
            unsafe { libc::shutdown(wake.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = dest.join();
            return Err(e.into());
        }
    };
    let (w1, h1, t1) = (guest.writes(), heartbeat(&memory, 0), Instant::now());
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
    let arrival = dest
        .join()
        .map_err(|_| anyhow!("destination thread panicked"))?;
    let blackout = observer.finish(Duration::from_secs(2));
    let mut arrival = arrival?;
    arrival.stop();
    let r = report?;
    let peak_rss_bytes = peak_rss();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let split = match (blackout, r.switchover.paused_at, arrival.started_at()) {
        (Some(b), Some(paused), Some(started)) => Some(b.split(paused, started)),
        _ => None,
    };
    // One clock: the source's pause to the destination's vCPUs running,
    // both seen by this process.
    let downtime = match (r.switchover.paused_at, arrival.started_at()) {
        (Some(paused), Some(started)) => started.saturating_duration_since(paused),
        _ => {
            return Err(anyhow!(
                "the run has no pause or no start to measure downtime by"
            ))
        }
    };
    // The guest's heartbeat rate from the start until its last beat on the
    // source, over its rate before: the brownout, the pause excluded.
    let brownout = blackout.map_or(f64::NAN, |b| b.brownout(t1, h1, beats_per_s_before));
    if !r.verified {
        return Err(anyhow!("digest not verified"));
    }
    Ok(Run {
        rounds: r.rounds.len(),
        bytes_per_round: r.rounds.iter().map(|x| x.metrics.wire_bytes).collect(),
        ms_per_round: r
            .rounds
            .iter()
            .map(|x| x.metrics.duration.as_secs_f64() * 1e3)
            .collect(),
        total_bytes: r.wire_bytes,
        total_ms: r.total_time.as_secs_f64() * 1e3,
        downtime_ms: ms(downtime),
        tool_downtime_ms: ms(r.downtime),
        brownout,
        verify_ms: r.verify_time.as_secs_f64() * 1e3,
        converged: r.converged(),
        guest_progress: if rate_before > 0.0 {
            rate_during / rate_before
        } else {
            1.0
        },
        guest_writes_per_s_before: rate_before,
        peak_rss_bytes,
        // What segment keeps to diff against: a full copy of guest memory,
        // or 8 bytes of fingerprint per 64-byte block.
        shadow_bytes: cfg.diff_store_bytes(cell.memory_bytes),
        xbzrle_cache_bytes: 0,
        blackout_ms: blackout.map_or(f64::NAN, |b| ms(b.blackout)),
        blackout_before_pause_ms: split.map_or(f64::NAN, |s| ms(s.before_pause)),
        blackout_after_start_ms: split.map_or(f64::NAN, |s| ms(s.after_start)),
        stop_reason: Some(r.stop.into()),
        per_round: r.rounds.iter().map(hpmig_report::Round::from).collect(),
        ..Run::default()
    })
}

/// Resets this process's peak resident memory (`VmHWM`) to its current
/// resident memory (Linux: `5` into /proc/self/clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident memory since the last reset, bytes
/// (`VmHWM` in /proc/self/status).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run_qemu(cell: &Setting, mode: qemu::Mode, link: Option<&ShapedLink>) -> Result<Run> {
    // xbzrle's cache at hpmig's budget for the same guest: its full shadow,
    // or its fingerprints' 1/8.
    let xbzrle_cache = match cell.variant {
        Variant::QemuXbzrle => cell.memory_bytes,
        Variant::QemuXbzrleBounded => cell.memory_bytes / 8,
        _ => 0,
    };
    let o = qemu::migrate(&qemu::Run {
        xbzrle_cache,
        workload: cell.workload,
        contents: cell.contents,
        dirty_rate: cell.dirty_rate,
        memory: cell.memory_bytes,
        mode,
        // On a shaped link the link is the only limit, as for hpmig.
        bandwidth: cell.link.bytes_per_s().filter(|_| link.is_none()),
        downtime_limit: policy().downtime_target,
        channels: SourceConfig::new(Granularity::Page).workers,
        dest: link.map(|l| (l.namespace().to_string(), l.dest_ip())),
        // hpmig's round cap, then its guest is stopped (hpmig forces its
        // stop-and-copy there); and a time cap for either.
        max_rounds: u64::from(policy().max_rounds),
        timeout: Duration::from_secs(60),
    })?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Run {
        // Its dirty syncs less the setup's: one per pass over memory, the
        // final one included, as hpmig counts rounds.
        rounds: o.dirty_syncs.saturating_sub(1) as usize,
        total_bytes: o.transferred,
        total_ms: o.total_ms,
        downtime_ms: o.downtime_ms,
        tool_downtime_ms: o.tool_downtime_ms,
        verify_ms: 0.0,
        converged: o.converged,
        guest_progress: o.progress,
        brownout: o.brownout,
        guest_writes_per_s_before: o.rate_before,
        xbzrle_cache_bytes: xbzrle_cache,
        blackout_ms: o.blackout.map_or(f64::NAN, |b| ms(b.blackout)),
        blackout_before_pause_ms: o.split.map_or(f64::NAN, |s| ms(s.before_pause)),
        blackout_after_start_ms: o.split.map_or(f64::NAN, |s| ms(s.after_start)),
        ..Run::default()
    })
}

/// `hpmig bench`: runs the matrix, printing a row per cell as it finishes,
/// then writes bench.csv, bench.json and the figures into `o.out`. False
/// when a run failed (the other runs are still reported).
pub fn run(o: &Options) -> Result<bool> {
    // SIGINT and SIGTERM end the QEMU peers and remove their directories.
    qemu::end_children_on_signals()?;
    let with_qemu = !o.quick && qemu::available();
    let mut cells = if o.peer {
        Vec::new()
    } else {
        matrix(o.quick, &o.contents, &o.loads, &o.links)
    };
    if !o.memory.is_empty() {
        cells.retain(|c| o.memory.contains(&c.memory_bytes));
    }
    if !o.quick {
        // A filtered matrix may already hold the comparison's hpmig cells.
        for cell in peer_matrix(o.peer_memory, with_qemu, &o.contents) {
            if !cells.contains(&cell) && kept(&cell, &o.loads, &o.links) {
                cells.push(cell);
            }
        }
    }
    let repeats = o.repeats.max(1);
    println!(
        "hpmig bench: {} cells x {repeats} runs ({})",
        cells.len(),
        if o.quick {
            "quick matrix"
        } else if o.peer {
            "the QEMU comparison"
        } else {
            "full matrix"
        }
    );
    match o.link {
        Emulation::Veth => {
            link::remove_stale();
            // Once, before any cell: a host without namespaces (not root, no
            // iproute2) is told so, not cell by cell.
            drop(ShapedLink::create(None).context(
                "the benchmark's shaped link (a veth pair into a network namespace) needs root and iproute2; --link-emulation cap runs on loopback with each tool's own cap instead",
            )?);
            println!("  link: a veth pair into a network namespace, shaped with tc tbf both ways; neither tool caps itself; bytes counted on the link")
        }
        Emulation::Cap => println!(
            "  link: TCP over loopback, each tool's own cap emulating the link (--link-emulation cap); bytes are each tool's own count"
        ),
    }
    if !o.quick {
        let qemu = qemu::QEMU;
        if with_qemu {
            println!("  peer: QEMU ({qemu}) on the same guest program, migrating with its own migration over the same link");
        } else {
            println!("  peer: {qemu} not found, so hpmig runs alone (apt-get install qemu-system-x86 adds the QEMU comparison)");
        }
    }
    println!();
    // Sizes binary (MiB, GiB), durations in ms below a second and in s
    // from one on (hpmig_report::text, as the round table).
    println!(
        "{:>9} {:<8} {:<16} {:<9} {:<15} {:>7} {:>11} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "memory",
        "contents",
        "workload",
        "link",
        "variant",
        "rounds",
        match o.link {
            Emulation::Veth => "link bytes",
            Emulation::Cap => "tool bytes",
        },
        "time",
        "downtime",
        "blackout",
        "converged",
        "progress",
        "brownout"
    );
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let mut done = Vec::new();
    let mut ok = true;
    for setting in cells {
        let mut runs = Vec::new();
        for _ in 0..repeats {
            match run_cell(&setting, o.guest, o.link) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    ok = false;
                    println!(
                        "  {} {} {} {} {}: run FAILED: {e:#}",
                        human(setting.memory_bytes),
                        setting.contents,
                        setting.load(),
                        setting.link,
                        setting.variant
                    );
                }
            }
        }
        if runs.is_empty() {
            continue;
        }
        let cell = Cell { setting, runs };
        let s = cell.summary();
        println!(
            "{:>9} {:<8} {:<16} {:<9} {:<15} {:>7} {:>11} {:>10} {:>10} {:>10} {:>9} {:>8.0}% {:>8.0}%{}",
            human(setting.memory_bytes),
            setting.contents,
            setting.load(),
            setting.link,
            setting.variant,
            s.rounds,
            human(s.total_bytes.median as u64),
            millis(s.total_ms.median),
            millis(s.downtime_ms.median),
            millis(s.blackout_ms.median),
            format!("{}/{}", s.converged_runs, s.runs),
            s.progress * 100.0,
            s.brownout * 100.0,
            if s.cpu_bound_runs > 0 {
                format!("  CPU-bound in {}/{} (below 0.9x the shaped rate)", s.cpu_bound_runs, s.runs)
            } else {
                String::new()
            }
        );
        done.push(cell);
    }
    let results = BenchResults::new(done);
    let (csv, json) = results.write(&o.out)?;
    println!("\n  results: {} and {}", csv.display(), json.display());
    let summaries: Vec<_> = results.cells.iter().map(Cell::summary).collect();
    for plot in plots::write(&o.out, &summaries, results.schema)? {
        println!("  plot:    {}", plot.display());
    }
    Ok(ok)
}
