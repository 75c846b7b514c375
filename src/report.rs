//! What the commands print and write: the per-round table, the summary, the
//! JSON report.

use anyhow::{Context, Result};
use hpmig_microvm::blackout::Split;
use hpmig_report::text::{bytes as human, duration, rate};
use hpmig_report::{ms, Config, Report, Round, Stop, Summary, SwitchoverMs};
use std::time::Instant;

use hpmig_core::memory::SourceMemory;
use hpmig_core::precopy::{MigrateError, MigrationReport, RoundReport};
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::verify::{SourceCheck, VerifyMode};

use crate::args::{GuestArgs, MigrationArgs};
use crate::outcome::{guest_where, Outcome};

/// The round table's header. Its units are binary throughout (sizes in
/// KiB/MiB/GiB, the rate in MiB/s); a round's time is in ms below a second
/// and in s from one second on.
pub fn table_header() {
    println!();
    println!(
        "{:>5} {:>11} {:>11} {:>11} {:>9} {:>12}  decision",
        "round", "dirty pages", "work set", "on the wire", "time", "rate"
    );
}

pub fn table_row(r: &RoundReport) {
    let m = &r.metrics;
    println!(
        "{:>5} {:>11} {:>11} {:>11} {:>9} {:>12}  {}",
        m.round,
        m.dirty_pages,
        human(m.work_set_bytes),
        human(m.wire_bytes),
        duration(m.duration),
        rate(m.wire_bytes, m.duration),
        hpmig_report::decision_text(r)
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
    /// This process's peak resident memory when the migration ended (`demo`:
    /// both ends' memory, in one process).
    pub peak_rss: u64,
    /// What the source kept to find changed bytes: the shadow copy, the
    /// block fingerprints, or nothing (page granularity).
    pub diff_store: DiffStore,
}

/// What the source keeps of what it sent, to find what changed since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStore {
    /// `shadow`, `fingerprints` or `none`.
    pub kind: &'static str,
    pub bytes: u64,
}

impl DiffStore {
    /// The store `cfg` keeps for a guest of `memory` bytes
    /// ([`SourceConfig::diff_store_bytes`](hpmig_core::precopy::SourceConfig::diff_store_bytes)).
    pub fn of(cfg: &hpmig_core::precopy::SourceConfig, memory: u64) -> DiffStore {
        use hpmig_core::precopy::ShadowMode;
        use hpmig_core::protocol::Granularity;
        DiffStore {
            kind: match (cfg.encoder.granularity, cfg.shadow) {
                (Granularity::Page, _) => "none",
                (_, ShadowMode::Fingerprint) => "fingerprints",
                (_, ShadowMode::Full) => "shadow",
            },
            bytes: cfg.diff_store_bytes(memory),
        }
    }
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
    println!("  total time:    {}", duration(r.total_time));
    println!(
        "  downtime:      {} against a target of {}{} (guest paused until its vCPUs run on the destination; {} of it digesting memory to verify)",
        duration(r.downtime),
        duration(r.downtime_target),
        if r.downtime_target_met() {
            ""
        } else {
            ", NOT kept"
        },
        duration(r.verify_time)
    );
    if let Some(b) = &g.blackout {
        println!(
            "  blackout:      {} (within {:.2} ms) as the guest saw it (its vCPUs' heartbeats read on both ends at {:.0} kHz around the switch-over, longest gap {:.2} ms, asleep {:.1} ms while neither could beat, {:.0} kHz over the run; the observer took {:.0}% of a core{})",
            duration(b.blackout),
            b.error.as_secs_f64() * 1e3,
            b.sample_hz_switchover / 1e3,
            b.max_gap.as_secs_f64() * 1e3,
            b.quiet.as_secs_f64() * 1e3,
            b.sample_hz / 1e3,
            b.cpu_share * 100.0,
            if b.realtime {
                ", at real-time priority near the switch-over"
            } else {
                ", at normal priority throughout"
            }
        );
        if let Some(s) = g.blackout_split(r) {
            println!(
                "                 = {} from the last beat to the pause + {} paused until the vCPUs started there + {} to their first beat",
                duration(s.before_pause),
                duration(s.paused),
                duration(s.after_start)
            );
        }
    }
    let t = &r.switchover;
    println!(
        "  switch-over:   harvest {}, final round {}, until the Ack {}, until the vCPUs run there {} (before: the destination drained the last pre-copy round in {}, the guest running; pausing the guest took {})",
        duration(t.harvest),
        duration(t.final_round),
        duration(t.acknowledge),
        duration(t.decision),
        duration(t.drain),
        duration(t.pause)
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
        "  rounds:        {} ({}: {})",
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
        "  memory:        peak {} resident in this process{}; {} kept to diff against ({})",
        human(g.peak_rss),
        if g.heartbeat_after.is_some() {
            " (both ends)"
        } else {
            ""
        },
        human(g.diff_store.bytes),
        match g.diff_store.kind {
            "fingerprints" => "block fingerprints, 8 bytes per 64",
            "shadow" => "a shadow copy of what was sent",
            _ => "page granularity keeps nothing",
        }
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
            "  source check:  {} pages of the source's memory equal what was sent ({}, after switch-over)",
            c.pages_checked,
            duration(t.elapsed())
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

/// The configuration a migration runs with, for the report: the guest's
/// flags, the migration's, the guest that booted and the transport
/// (`tcp`, `rdma`, `inproc`).
pub fn config(
    g: &GuestArgs,
    m: &MigrationArgs,
    guest: &hpmig_microvm::RunningGuest,
    transport: &str,
) -> Config {
    let policy = m.config(Default::default()).policy;
    Config {
        memory_bytes: g.memory,
        vcpus: g.vcpus,
        workload: g.workload.as_str().into(),
        dirty_rate: g.dirty_rate,
        contents: g.contents.as_str().into(),
        guest_kind: match guest {
            hpmig_microvm::RunningGuest::Kvm(_) => "kvm",
            hpmig_microvm::RunningGuest::Emulated(_) => "emulated",
        }
        .into(),
        dirty_log: g.dirty_log.as_str().into(),
        granularity: m.granularity.as_str().into(),
        workers: usize::from(m.workers),
        pin: m.pin,
        bandwidth_bytes_per_s: m.bandwidth,
        downtime_target_ms: ms(policy.downtime_target),
        max_rounds: policy.max_rounds,
        on_stall: hpmig_report::on_stall_name(policy.on_stall).into(),
        verify: m.verify.as_str().into(),
        zstd: match m.zstd {
            ZstdMode::Off => "off",
            ZstdMode::On => "on",
            ZstdMode::Auto => "auto",
        }
        .into(),
        shadow: m.shadow_mode().as_str().into(),
        shadow_budget_bytes: m.shadow_budget,
        transport: transport.into(),
    }
}

/// Writes the JSON report (its schema: docs/report.md): how the command
/// ended, where the guest is, the configuration, and on success the rounds
/// and figures.
pub fn write_json(
    path: &std::path::Path,
    role: &str,
    end: Outcome,
    outcome: &Result<MigrationReport, MigrateError>,
    g: &GuestFigures,
    check: Option<&SourceCheck>,
    config: &Config,
) -> Result<()> {
    let mut doc = Report {
        schema: hpmig_report::SCHEMA,
        hpmig_version: env!("CARGO_PKG_VERSION").into(),
        role: role.into(),
        outcome: end.as_str().into(),
        exit_status: end as u8,
        guest: guest_where(end, role).into(),
        config: config.clone(),
        rounds: None,
        summary: None,
        source_check: None,
        failure: None,
    };
    match outcome {
        Ok(r) => {
            doc.rounds = Some(r.rounds.iter().map(Round::from).collect());
            let split = g.blackout_split(r);
            doc.summary = Some(Summary {
                granularity: r.granularity.as_str().into(),
                total_time_ms: ms(r.total_time),
                downtime_ms: ms(r.downtime),
                downtime_target_ms: ms(r.downtime_target),
                downtime_target_met: r.downtime_target_met(),
                verify_ms: ms(r.verify_time),
                switchover_ms: SwitchoverMs::from(&r.switchover),
                wire_bytes: r.wire_bytes,
                wire_bytes_after_round0: r.wire_bytes_after_round0(),
                rounds: r.rounds.len(),
                converged: r.converged(),
                stop_reason: Stop::from(r.stop),
                stop_reason_text: r.stop.to_string(),
                verified: r.verified,
                verify: r.verify.as_str().into(),
                guest_contents: g.contents.map(|c| c.as_str().into()),
                heartbeat_before: g.heartbeat_before,
                heartbeat_after: g.heartbeat_after,
                blackout_ms: g.blackout.map(|b| ms(b.blackout)),
                blackout_resolution_ms: g.blackout.map(|b| ms(b.tick)),
                blackout_max_gap_ms: g.blackout.map(|b| ms(b.max_gap)),
                blackout_error_ms: g.blackout.map(|b| ms(b.error)),
                observer_sample_hz: g.blackout.map(|b| b.sample_hz),
                observer_sample_hz_switchover: g.blackout.map(|b| b.sample_hz_switchover),
                observer_cpu_share: g.blackout.map(|b| b.cpu_share),
                observer_realtime: g.blackout.map(|b| b.realtime),
                observer_quiet_ms: g.blackout.map(|b| ms(b.quiet)),
                blackout_before_pause_ms: split.map(|s| ms(s.before_pause)),
                blackout_paused_ms: split.map(|s| ms(s.paused)),
                blackout_after_start_ms: split.map(|s| ms(s.after_start)),
                guest_rate_before: g.rate_before,
                guest_rate_during: g.rate_during,
                source_cpu_seconds: g.cpu_seconds,
                peak_rss_bytes: Some(g.peak_rss),
                diff_store: Some(g.diff_store.kind.into()),
                diff_store_bytes: Some(g.diff_store.bytes),
            });
            doc.source_check = check.map(hpmig_report::SourceCheck::from);
        }
        Err(e) => {
            let (phase, round) = match e {
                MigrateError::Failed { phase, round, .. }
                | MigrateError::Cancelled { phase, round }
                | MigrateError::ResumeFailed { phase, round, .. } => (phase.to_string(), *round),
                MigrateError::Aborted { round, .. } => ("pre-copy".into(), *round),
                MigrateError::InDoubt { round, .. } => ("decision".into(), *round),
            };
            doc.failure = Some(hpmig_report::Failure {
                phase,
                round,
                cause: e.to_string(),
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

/// "1.2 s of CPU, 0.4 s per GiB" (binary, as every size hpmig prints).
pub fn cpu_line(cpu: f64, bytes: u64) -> String {
    let per_gib = if bytes > 0 {
        cpu / (bytes as f64 / f64::from(1u32 << 30))
    } else {
        0.0
    };
    format!("{cpu:.2} s of CPU (user + system), {per_gib:.2} s per GiB on the wire")
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
