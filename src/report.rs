//! What the commands print and write: the per-round table, the summary, the
//! JSON report.

use anyhow::{Context, Result};
use hpmig_microvm::blackout::Split;
use std::time::Instant;

use hpmig_core::memory::SourceMemory;
use hpmig_core::precopy::{MigrateError, MigrationReport, RoundReport};
use hpmig_core::verify::{SourceCheck, VerifyMode};

use crate::outcome::{guest_where, Outcome};

use crate::units::human;

pub fn table_header() {
    println!();
    println!(
        "{:>5} {:>11} {:>13} {:>13} {:>9} {:>10}  decision",
        "round", "dirty pages", "work set", "on the wire", "ms", "MB/s"
    );
}

pub fn table_row(r: &RoundReport) {
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
}

/// What the guest did around the migration.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestFigures {
    pub heartbeat_before: u64,
    /// Read on the destination after it resumed; `None` when this process
    /// cannot see the destination.
    pub heartbeat_after: Option<u64>,
    /// The pause as the guest saw it (`demo` only: it sees both ends).
    pub blackout: Option<hpmig_microvm::blackout::Blackout>,
    /// What guest memory held before the workload started.
    pub contents: Option<hpmig_core::memory::Contents>,
    /// When the destination started the guest's vCPUs (`demo` only).
    pub dest_started: Option<std::time::Instant>,
    pub rate_before: f64,
    pub rate_during: f64,
    /// CPU seconds this process spent during the migration (the emulated
    /// guest's own vCPU threads included).
    pub cpu_seconds: f64,
}

impl GuestFigures {
    /// The blackout in its three parts, where this process saw all of them.
    pub fn blackout_split(&self, r: &MigrationReport) -> Option<Split> {
        Some(
            self.blackout?
                .split(r.switchover.paused_at?, self.dest_started?),
        )
    }
}

pub fn summary(r: &MigrationReport, g: &GuestFigures) {
    println!();
    println!(
        "  total time:    {:.1} ms",
        r.total_time.as_secs_f64() * 1e3
    );
    println!(
        "  downtime:      {:.1} ms against a target of {:.0} ms{} (guest paused until its vCPUs run on the destination; {:.1} ms of it digesting memory to verify)",
        r.downtime.as_secs_f64() * 1e3,
        r.downtime_target.as_secs_f64() * 1e3,
        if r.downtime_target_met() {
            ""
        } else {
            ", NOT kept"
        },
        r.verify_time.as_secs_f64() * 1e3
    );
    if let Some(b) = &g.blackout {
        println!(
            "  blackout:      {:.1} ms as the guest saw it (its heartbeat read at {:.0} kHz on both ends, resolution {:.2} ms)",
            b.blackout.as_secs_f64() * 1e3,
            b.sample_hz / 1e3,
            b.tick.as_secs_f64() * 1e3
        );
        if let Some(s) = g.blackout_split(r) {
            println!(
                "                 = {:.1} ms from the last beat to the pause + {:.1} ms paused until the vCPUs started there + {:.1} ms to their first beat",
                s.before_pause.as_secs_f64() * 1e3,
                s.paused.as_secs_f64() * 1e3,
                s.after_start.as_secs_f64() * 1e3
            );
        }
    }
    let t = &r.switchover;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "  switch-over:   harvest {:.1} ms, final round {:.1} ms, until the Ack {:.1} ms, until the vCPUs run there {:.1} ms (pausing the guest took {:.1} ms before)",
        ms(t.harvest),
        ms(t.final_round),
        ms(t.acknowledge),
        ms(t.decision),
        ms(t.pause)
    );
    println!(
        "  on the wire:   {} total, {} after round 0",
        human(r.wire_bytes),
        human(r.wire_bytes_after_round0())
    );
    let zstd: u64 = r.rounds.iter().map(|x| x.stats.zstd_pages).sum();
    if zstd > 0 {
        println!("  zstd:          {zstd} wide pages went compressed");
    }
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
        "  verification:  {}",
        match (r.verify, r.verified) {
            (VerifyMode::Strict, true) => "strict: digest of all memory, destination equals source",
            (VerifyMode::Incremental, true) =>
                "incremental: what landed equals what was sent (the source's memory is checked next)",
            (VerifyMode::Off, _) => "off: only each round's record count and CRC",
            (_, false) => "NOT verified",
        }
    );
    match g.heartbeat_after {
        Some(after) => println!(
            "  heartbeat:     {} at switch-over, {after} on the destination afterwards ({})",
            g.heartbeat_before,
            if after > g.heartbeat_before {
                "guest runs on"
            } else {
                "did NOT advance"
            }
        ),
        None => println!(
            "  heartbeat:     {} at switch-over (the destination prints where it goes on)",
            g.heartbeat_before
        ),
    }
    println!(
        "  source cpu:    {} (the guest's vCPU threads included)",
        cpu_line(g.cpu_seconds, r.wire_bytes)
    );
    println!(
        "  guest writes:  {:.0}/s before, {:.0}/s during migration ({:.0}%)",
        g.rate_before,
        g.rate_during,
        if g.rate_before > 0.0 {
            100.0 * g.rate_during / g.rate_before
        } else {
            0.0
        }
    );
}

/// `--verify incremental`, once the guest left the source: checks the
/// source's memory, which no longer changes, against the ledger of what was
/// sent. A difference means the dirty log missed a write.
pub fn check_source(r: &MigrationReport, memory: &SourceMemory) -> Option<SourceCheck> {
    let sent = r.sent.as_ref()?;
    let t = Instant::now();
    let c = sent.check(memory);
    if c.pages_differ == 0 {
        println!(
            "  source check:  {} pages of the source's memory equal what was sent ({:.0} ms, after switch-over)",
            c.pages_checked,
            t.elapsed().as_secs_f64() * 1e3
        );
    } else {
        let first: Vec<String> = c.first.iter().map(|a| format!("{a:#x}")).collect();
        eprintln!(
            "hpmig: VERIFICATION ALARM: {} of {} pages of the source's memory differ from what was sent \
             (first at {}): the dirty log missed a write, and the destination runs a guest unlike the source's",
            c.pages_differ,
            c.pages_checked,
            first.join(", ")
        );
    }
    Some(c)
}

/// Writes the JSON report (see docs/report.md): how the command ended and
/// where the guest is, and on success the rounds and figures.
pub fn write_json(
    path: &std::path::Path,
    role: &str,
    end: Outcome,
    outcome: &Result<MigrationReport, MigrateError>,
    g: &GuestFigures,
    check: Option<&SourceCheck>,
) -> Result<()> {
    let mut doc = serde_json::json!({
        "schema": 1,
        "role": role,
        "outcome": end.as_str(),
        "exit_status": end as u8,
        "guest": guest_where(end, role),
    });
    match outcome {
        Ok(r) => {
            doc["rounds"] = r
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
                        "zstd_pages": x.stats.zstd_pages,
                        "zero_pages": x.stats.zero_pages,
                        "unchanged_pages": x.stats.unchanged_pages,
                        "stop_and_copy": x.last,
                    })
                })
                .collect();
            let split = g.blackout_split(r);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            doc["summary"] = serde_json::json!({
                "granularity": r.granularity.as_str(),
                "total_time_ms": r.total_time.as_secs_f64() * 1e3,
                "downtime_ms": r.downtime.as_secs_f64() * 1e3,
                "downtime_target_ms": r.downtime_target.as_secs_f64() * 1e3,
                "downtime_target_met": r.downtime_target_met(),
                "verify_ms": r.verify_time.as_secs_f64() * 1e3,
                "switchover_ms": {
                    "pause": r.switchover.pause.as_secs_f64() * 1e3,
                    "harvest": r.switchover.harvest.as_secs_f64() * 1e3,
                    "final_round": r.switchover.final_round.as_secs_f64() * 1e3,
                    "acknowledge": r.switchover.acknowledge.as_secs_f64() * 1e3,
                    "decision": r.switchover.decision.as_secs_f64() * 1e3,
                },
                "wire_bytes": r.wire_bytes,
                "wire_bytes_after_round0": r.wire_bytes_after_round0(),
                "rounds": r.rounds.len(),
                "converged": r.converged(),
                "stop_reason": format!("{:?}", r.stop),
                "verified": r.verified,
                "verify": r.verify.as_str(),
                "guest_contents": g.contents.map(|c| c.as_str()),
                "heartbeat_before": g.heartbeat_before,
                "heartbeat_after": g.heartbeat_after,
                "blackout_ms": g.blackout.map(|b| b.blackout.as_secs_f64() * 1e3),
                "blackout_resolution_ms": g.blackout.map(|b| b.tick.as_secs_f64() * 1e3),
                "blackout_before_pause_ms": split.map(|s| ms(s.before_pause)),
                "blackout_paused_ms": split.map(|s| ms(s.paused)),
                "blackout_after_start_ms": split.map(|s| ms(s.after_start)),
                "guest_rate_before": g.rate_before,
                "guest_rate_during": g.rate_during,
                "source_cpu_seconds": g.cpu_seconds,
            });
            if let Some(c) = check {
                doc["source_check"] = serde_json::json!({
                    "pages_checked": c.pages_checked,
                    "pages_differ": c.pages_differ,
                    "first": c.first,
                });
            }
        }
        Err(e) => {
            let (phase, round) = match e {
                MigrateError::Failed { phase, round, .. }
                | MigrateError::Cancelled { phase, round }
                | MigrateError::ResumeFailed { phase, round, .. } => (phase.to_string(), *round),
                MigrateError::Aborted { round, .. } => ("pre-copy".into(), *round),
                MigrateError::InDoubt { round, .. } => ("decision".into(), *round),
            };
            doc["failure"] = serde_json::json!({
                "phase": phase,
                "round": round,
                "cause": e.to_string(),
            });
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it is given, which
    // points to a zeroed, properly sized and aligned MaybeUninit; on failure
    // (-1) the zeroed value is used, which is a valid rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: either getrusage filled it or it is still all zeroes, a valid rusage.
    let u = unsafe { u.assume_init() };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// "1.2 s of CPU, 0.4 s per GB".
pub fn cpu_line(cpu: f64, bytes: u64) -> String {
    let per_gb = if bytes > 0 {
        cpu / (bytes as f64 / 1e9)
    } else {
        0.0
    };
    format!("{cpu:.2} s of CPU (user + system), {per_gb:.2} s per GB on the wire")
}

/// A spinner under the round table while a migration runs: the running
/// round's bytes so far, rate, work left and ETA, from the engine's
/// [`Live`], refreshed five times a second.
pub struct Spinner {
    bar: indicatif::ProgressBar,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    pub fn start(live: std::sync::Arc<hpmig_core::precopy::live::Live>) -> Spinner {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message("setting up");
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, st) = (bar.clone(), std::sync::Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                b.set_message(crate::watch::progress_line(&live.status()));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        Spinner {
            bar,
            stop,
            thread: Some(thread),
        }
    }

    /// Prints a finished round above the spinner.
    pub fn row(&self, r: &RoundReport) {
        self.bar.suspend(|| table_row(r));
    }

    pub fn finish(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

/// Peak resident memory of this process so far, in bytes.
pub fn peak_rss() -> u64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: as in cpu_seconds: getrusage fills a zeroed, properly sized rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: filled by getrusage or still all zeroes, either a valid rusage.
    let u = unsafe { u.assume_init() };
    if rc != 0 {
        return 0;
    }
    // Linux reports ru_maxrss in KiB.
    (u.ru_maxrss.max(0) as u64) * 1024
}
