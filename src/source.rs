//! `hpmig source --to ADDR`: boot the guest, migrate it to a waiting
//! `hpmig dest` over TCP. Also the source half of `hpmig demo`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hpmig_core::dirty::DirtySource;
use hpmig_core::guest::Guest;
use hpmig_core::memory::{Contents, SourceMemory};
use hpmig_core::precopy::{
    migrate, redeliver, MigrateError, MigrationReport, Pending, ShadowMode, SourceConfig,
};
use hpmig_core::protocol::switchover::{Decision, OutcomeKind, Verdict};
use hpmig_core::protocol::Granularity;
use hpmig_core::transport::SourceTransport;
use hpmig_microvm::kvm::heartbeat;
use hpmig_transport_tcp::{TcpOptions, TcpSource};
use serde_json::json;

use crate::args::{check_address, check_dir, GuestArgs, MigrationArgs, TokenArgs};
use crate::control::{self, Resolve};
use crate::outcome::Outcome;
use crate::rdma::RdmaArgs;
use crate::report::{self, GuestFigures};
use crate::units::{human, parse_timeout, rate, span};
use crate::watch::{Watch, WatchArgs};
use hpmig_microvm::{self as guest, RunningGuest};

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Where `hpmig dest` listens (HOST:PORT).
    #[arg(long)]
    to: String,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migration: MigrationArgs,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    rdma: RdmaArgs,
    /// Give up when the destination sends nothing for this long (it says
    /// Alive while it works): every wait on it is bounded by this (1 ms to
    /// 24 h).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    io_timeout: Duration,
    /// `--control`, `--metrics`, `--events`. Without `--control`, in
    /// doubt a control socket is opened anyway, at a path printed then.
    #[command(flatten)]
    watch: WatchArgs,
}

/// A running guest, ready to migrate.
pub struct Booted {
    pub memory: SourceMemory,
    pub guest: RunningGuest,
    pub dirty: Box<dyn DirtySource>,
    pub rate_before: f64,
    /// What its memory held before the workload started.
    pub contents: Contents,
}

/// Boots the guest, says what runs, and lets it run for the warm-up,
/// measuring its own pace.
pub fn boot(g: &GuestArgs) -> Result<Booted> {
    g.check()?;
    let ranges = hpmig_microvm::kvm::memory_ranges(g.memory)?;
    let memory = SourceMemory::from_ranges(&ranges).context("allocating guest memory")?;
    if g.contents != Contents::Empty {
        let t = Instant::now();
        hpmig_microvm::fill_guest(&memory, g.contents);
        println!(
            "  memory: {} contents, filled in {:.1} s",
            g.contents,
            t.elapsed().as_secs_f64()
        );
    }
    let (guest, dirty, line) = guest::boot(&memory, &g.spec())?;
    println!("  guest: {line}");
    std::thread::sleep(g.warmup);
    let (w0, t0) = (guest.writes(), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let rate_before = (guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();
    Ok(Booted {
        memory,
        guest,
        dirty,
        rate_before,
        contents: g.contents,
    })
}

/// The banner: every flag that changes the outcome, as it was understood.
pub fn describe(g: &GuestArgs, m: &MigrationArgs, wire: &str) {
    println!(
        "hpmig: {} guest, {} vCPU(s), workload {} at {}, {} contents",
        human(g.memory),
        g.vcpus,
        g.workload.as_str(),
        g.dirty_rate
            .map_or_else(|| "full speed".into(), |r| format!("{r} writes/s")),
        g.contents,
    );
    println!(
        "  plan:  {} granularity, {} worker(s), downtime target {}, at most {} rounds then {}",
        m.granularity.as_str(),
        m.workers,
        span(m.downtime),
        m.max_rounds,
        if m.abort_on_stall {
            "give up"
        } else {
            "stop-and-copy"
        },
    );
    println!(
        "  send:  {}, zstd {}, verify {}{}",
        m.bandwidth.map_or_else(
            || "no bandwidth cap".into(),
            |b| format!("bandwidth cap {} on all streams", rate(b))
        ),
        format!("{:?}", m.zstd).to_lowercase(),
        m.verify.as_str(),
        match (m.granularity, m.shadow_mode(), m.shadow_budget) {
            (Granularity::Page, _, _) => String::new(),
            (_, ShadowMode::Fingerprint, _) =>
                ", shadow: block fingerprints (1/8 of the guest)".to_string(),
            (_, ShadowMode::Full, Some(b)) => format!(", shadow: a copy of at most {}", human(b)),
            (_, ShadowMode::Full, None) => ", shadow: a full copy of the guest".to_string(),
        },
    );
    println!("  wire:  {wire}");
}

/// Migrates a booted guest through `transport`, printing each round and a
/// spinner while one runs.
pub fn migrate_booted<T: SourceTransport>(
    b: &mut Booted,
    transport: &mut T,
    cfg: &SourceConfig,
) -> Result<(Result<MigrationReport, MigrateError>, GuestFigures)> {
    report::table_header();
    let mut spinner = report::Spinner::start(std::sync::Arc::clone(&cfg.live));
    let (w0, t0, cpu0) = (b.guest.writes(), Instant::now(), report::cpu_seconds());
    let mut on_round = |r: &hpmig_core::precopy::RoundReport| spinner.row(r);
    let outcome = migrate(
        &b.memory,
        b.dirty.as_mut(),
        &mut b.guest,
        transport,
        cfg,
        &mut on_round,
    );
    spinner.finish();
    let rate_during = (b.guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();
    let figures = GuestFigures {
        heartbeat_before: heartbeat(&b.memory, 0),
        heartbeat_after: None,
        blackout: None,
        dest_started: None,
        contents: Some(b.contents),
        rate_before: b.rate_before,
        rate_during,
        cpu_seconds: report::cpu_seconds() - cpu0,
        peak_rss: report::peak_rss(),
        diff_store: report::DiffStore::of(
            cfg,
            hpmig_core::memory::Layout::of(&b.memory).map_or(0, |l| l.total_bytes()),
        ),
    };
    Ok((outcome, figures))
}

pub fn run(a: &SourceArgs) -> Result<Outcome> {
    let opts = TcpOptions {
        io_timeout: a.io_timeout,
        ..TcpOptions::default()
    };
    a.guest.check()?;
    a.migration.check()?;
    a.rdma.check()?;
    if let Some(path) = &a.watch.control {
        check_dir("--control", path)?;
    }
    // A name that does not resolve is refused as input, before anything
    // starts; a destination that does not answer is found by the connect
    // below, still before the guest boots.
    check_address("--to", &a.to)?;
    // Check the flags (and open the device) before the guest boots.
    let rdma = a.rdma.options(opts)?;
    let wire = match &rdma {
        Some(o) => format!("{}, control over TCP to {}", crate::rdma::wire(o), a.to),
        None => format!("TCP to {}", a.to),
    };
    describe(&a.guest, &a.migration, &wire);
    let mut watch = Watch::open(&a.watch)?;
    let mut cfg = a.migration.config(a.token.secret());
    cfg.deadlines.io = a.io_timeout;
    cfg.live = std::sync::Arc::clone(&watch.live);
    watch.start();
    #[cfg(feature = "rdma")]
    if let Some(o) = rdma {
        let mut transport = hpmig_transport_rdma::RdmaSource::connect(a.to.as_str(), o)
            .with_context(|| format!("--to {} (RDMA)", a.to))?;
        let stats = transport.stats();
        let mut booted = boot(&a.guest)?;
        watch.configure(&report::config(
            &a.guest,
            &a.migration,
            &booted.guest,
            "rdma",
        ));
        let outcome = migrate_booted(&mut booted, &mut transport, &cfg)?;
        let end = finish(a, &watch, &mut booted, &mut transport, outcome)?;
        println!("  rdma:          {}", crate::rdma::stats_line(&stats));
        return Ok(end);
    }
    // Connect before the guest boots: a wrong address costs nothing.
    let mut transport =
        TcpSource::connect(a.to.as_str(), opts).with_context(|| format!("--to {}", a.to))?;
    let mut booted = boot(&a.guest)?;
    watch.configure(&report::config(
        &a.guest,
        &a.migration,
        &booted.guest,
        "tcp",
    ));
    let outcome = migrate_booted(&mut booted, &mut transport, &cfg)?;
    finish(a, &watch, &mut booted, &mut transport, outcome)
}

/// Reports how the migration ended; in doubt, keeps the guest paused and
/// delivers the decision again until the destination answers or an
/// operator resolves it.
fn finish<T: SourceTransport>(
    a: &SourceArgs,
    watch: &Watch,
    booted: &mut Booted,
    transport: &mut T,
    (outcome, figures): (Result<MigrationReport, MigrateError>, GuestFigures),
) -> Result<Outcome> {
    let mut check = None;
    let end = match &outcome {
        Ok(r) => {
            report::summary(r, &figures);
            // The guest left this host: its memory no longer changes, and is
            // checked against what was sent.
            check = report::check_source(r, &booted.memory);
            if check.as_ref().is_some_and(|c| c.pages_differ > 0) {
                Outcome::VerifyAlarm
            } else if r.converged() && r.downtime_target_met() {
                Outcome::Migrated
            } else {
                Outcome::NotConverged
            }
        }
        Err(MigrateError::InDoubt { pending, .. }) => {
            eprintln!(
                "hpmig: {}",
                outcome
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            in_doubt(a, watch, booted, transport, pending.as_deref())?
        }
        Err(MigrateError::ResumeFailed { .. }) => {
            eprintln!(
                "hpmig: migration FAILED: {}",
                outcome
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            Outcome::Internal
        }
        Err(e @ MigrateError::Cancelled { .. }) => {
            eprintln!("hpmig: {e}");
            if resumed_runs_on(booted) {
                Outcome::Cancelled
            } else {
                Outcome::Internal
            }
        }
        Err(e) => {
            eprintln!("hpmig: migration FAILED: {e}");
            if resumed_runs_on(booted) {
                Outcome::Failed
            } else {
                Outcome::Internal
            }
        }
    };
    if let Some(path) = &a.migration.json {
        let transport = if a.rdma.rdma.is_some() { "rdma" } else { "tcp" };
        let config = report::config(&a.guest, &a.migration, &booted.guest, transport);
        report::write_json(
            path,
            "source",
            end,
            &outcome,
            &figures,
            check.as_ref(),
            &config,
        )?;
    }
    Ok(end)
}

/// After a failure the guest was resumed here: shows that it runs on (its
/// heartbeat moves within a second), so a user (and the fault campaign)
/// sees where the guest is. False if it does not move.
fn resumed_runs_on(booted: &Booted) -> bool {
    let before = heartbeat(&booted.memory, 0);
    let until = Instant::now() + Duration::from_secs(1);
    let mut after = before;
    while after <= before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        after = heartbeat(&booted.memory, 0);
    }
    eprintln!(
        "hpmig: guest resumed here: heartbeat {before} -> {after} ({})",
        if after > before {
            "runs on"
        } else {
            "did NOT advance"
        }
    );
    after > before
}

/// In doubt: the destination may run the guest. Delivers the decision
/// again every 2 s until it says what it did; `hpmig ctl PATH resolve
/// resume --destination-dead` may end the wait (refused if the destination
/// answers that the guest runs there).
fn in_doubt<T: SourceTransport>(
    a: &SourceArgs,
    watch: &Watch,
    booted: &mut Booted,
    transport: &mut T,
    pending: Option<&Pending>,
) -> Result<Outcome> {
    let own;
    let socket = match &watch.socket {
        Some(s) => s,
        None => {
            own = control::Socket::bind(&control::default_path("source")?)?;
            &own
        }
    };
    let path = socket.path().to_path_buf();
    socket.set_status(json!({
        "state": "in-doubt",
        "role": "source",
        "guest": "paused on the source",
        "session": pending.map(|p| p.session.id().to_string()),
    }));
    eprintln!(
        "hpmig: the guest stays PAUSED here; delivering the decision again every 2 s. \
         If the destination is known dead: hpmig ctl {} resolve resume --destination-dead",
        path.display()
    );
    let io = a.io_timeout;
    let resume = |booted: &mut Booted, why: &str| -> Result<Outcome> {
        booted.guest.resume().context("resuming the guest")?;
        eprintln!("hpmig: {why}: the guest runs on here");
        Ok(if resumed_runs_on(booted) {
            Outcome::Failed
        } else {
            Outcome::Internal
        })
    };
    loop {
        if let Some(p) = pending {
            match redeliver(transport, p, io).map(|o| o.outcome) {
                Ok(OutcomeKind::Started) => {
                    eprintln!("hpmig: the destination confirmed it runs the guest");
                    return Ok(Outcome::Migrated);
                }
                Ok(k @ (OutcomeKind::Discarded | OutcomeKind::Lost)) => {
                    return resume(
                        booted,
                        &format!("the destination did not run the guest ({k:?})"),
                    );
                }
                _ => {}
            }
        }
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            let Some((r, answer)) = socket.resolution() else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let Resolve::Resume {
                destination_dead: true,
            } = r
            else {
                let _ = answer.send(Err(
                    "on the source only `resume --destination-dead` resolves: the destination may run the guest".into(),
                ));
                continue;
            };
            // A last question, as an Abort: an answering destination is
            // believed over the statement that it is dead.
            let ran = pending.is_some_and(|p| {
                let abort = Pending {
                    decision: Decision {
                        verdict: Verdict::Abort,
                        ..p.decision
                    },
                    session: p.session.clone(),
                };
                matches!(redeliver(transport, &abort, io), Ok(o) if o.outcome == OutcomeKind::Started)
            });
            if ran {
                let _ = answer.send(Err(
                    "refused: the destination answered that the guest runs there".into(),
                ));
                return Ok(Outcome::Migrated);
            }
            let _ = answer.send(Ok(json!({"guest": "resumed on the source"})));
            return resume(booted, "resumed by the operator (destination stated dead)");
        }
    }
}
