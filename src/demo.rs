//! `hpmig demo`: boot a guest, let it dirty memory, migrate it live to a
//! destination in the same process, verify the copy and show that the guest
//! runs on.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use hpmig_core::land::{receive, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout};
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_core::transport::{DestTransport, TransportError};
use hpmig_microvm::kvm::heartbeat;
use hpmig_microvm::Arrival;
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

use crate::args::{GuestArgs, MigrationArgs};
use crate::outcome::Outcome;
use crate::report;
use crate::source::{boot, describe, migrate_booted};
use hpmig_core::precopy::MigrateError;
use hpmig_core::verify::VerifyMode;
use hpmig_microvm::blackout::Observer;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Wire {
    /// TCP over loopback, as between two hosts.
    Tcp,
    /// In-process channels: the engine without a network.
    Inproc,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migration: MigrationArgs,
    /// The wire between source and destination.
    #[arg(long, value_enum, default_value = "tcp")]
    wire: Wire,
    /// Fault the destination's guest memory in before migrating (like
    /// QEMU's -mem-prealloc).
    #[arg(long)]
    prefault: bool,
    #[command(flatten)]
    rdma: crate::rdma::RdmaArgs,
    #[command(flatten)]
    watch: crate::watch::WatchArgs,
    /// Test hook: hold the guest paused this long between the Ack and the
    /// Commit.
    #[arg(long, hide = true, default_value = "0ms", value_parser = crate::units::parse_wait)]
    test_delay_commit: Duration,
}

pub fn run(a: &DemoArgs) -> Result<Outcome> {
    a.guest.check()?;
    a.migration.check()?;
    a.rdma.check()?;
    let rdma = a.rdma.options(TcpOptions::default())?;
    let wire = match (&rdma, a.wire) {
        (Some(o), _) => format!("{}, control over TCP on loopback", crate::rdma::wire(o)),
        (None, Wire::Tcp) => "TCP over loopback (127.0.0.1)".into(),
        (None, Wire::Inproc) => "in-process channels".into(),
    };
    describe(&a.guest, &a.migration, &wire);
    let mut watch = crate::watch::Watch::open(&a.watch)?;
    watch.start();
    let transport = match (&rdma, a.wire) {
        (Some(_), _) => "rdma",
        (None, Wire::Tcp) => "tcp",
        (None, Wire::Inproc) => "inproc",
    };
    let mut booted = boot(&a.guest)?;
    watch.configure(&report::config(
        &a.guest,
        &a.migration,
        &booted.guest,
        transport,
    ));
    let layout = Layout::of(&booted.memory)?;
    let dest_memory: DestMemory = if a.prefault {
        hpmig_core::memory::allocate_prefaulted(
            &layout,
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )?
    } else {
        layout.allocate()?
    };
    let mut cfg = a.migration.config(Default::default());
    cfg.delay_commit = a.test_delay_commit;
    cfg.live = std::sync::Arc::clone(&watch.live);
    let dm = dest_memory.clone();
    let observer = Observer::for_migration(
        booted.memory.clone(),
        dest_memory.clone(),
        a.guest.vcpus,
        &watch.live,
    );

    let (outcome, mut figures, dest) = match (rdma, a.wire) {
        #[cfg(feature = "rdma")]
        (Some(o), _) => {
            use hpmig_transport_rdma::{RdmaDest, RdmaSource};
            let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
            let addr = listener.local_addr()?;
            let dest_opts = o.clone();
            let dest = std::thread::spawn(move || land(dm, RdmaDest::accept(listener, dest_opts)));
            let mut t = RdmaSource::connect(addr, o)?;
            let stats = t.stats();
            let (o, f) = migrate_booted(&mut booted, &mut t, &cfg)?;
            drop(t);
            println!("  rdma:          {}", crate::rdma::stats_line(&stats));
            (o, f, dest.join())
        }
        #[cfg(not(feature = "rdma"))]
        (Some(o), _) => match o {},
        (None, Wire::Tcp) => {
            let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
            let addr = listener.local_addr()?;
            let dest = std::thread::spawn(move || {
                land(dm, TcpDest::accept(listener, TcpOptions::default()))
            });
            let mut t = TcpSource::connect(addr, TcpOptions::default())?;
            let (o, f) = migrate_booted(&mut booted, &mut t, &cfg)?;
            drop(t);
            (o, f, dest.join())
        }
        (None, Wire::Inproc) => {
            let (mut src, dst) = pair(Faults::none());
            let dest = std::thread::spawn(move || land(dm, Ok(dst)));
            let (o, f) = migrate_booted(&mut booted, &mut src, &cfg)?;
            drop(src);
            (o, f, dest.join())
        }
    };
    let dest = dest.map_err(|_| anyhow!("destination thread panicked"))?;
    let report = match &outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hpmig: migration FAILED: {e}");
            if let Err(d) = dest {
                eprintln!("hpmig: destination: {d}");
            }
            let end = match e {
                MigrateError::InDoubt { .. } => Outcome::InDoubt,
                MigrateError::Cancelled { .. } => Outcome::Cancelled,
                _ => Outcome::Failed,
            };
            if let Some(path) = &a.migration.json {
                let config = report::config(&a.guest, &a.migration, &booted.guest, transport);
                report::write_json(path, "source", end, &outcome, &figures, None, &config)?;
            }
            return Ok(end);
        }
    };
    let (received, mut arrival) = dest.context("destination failed after the source succeeded")?;
    let config = report::config(&a.guest, &a.migration, &booted.guest, transport);
    // The destination runs the guest since the Commit: watch its heartbeat.
    let deadline = Instant::now() + Duration::from_secs(2);
    while heartbeat(&dest_memory, 0) <= figures.heartbeat_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    figures.heartbeat_after = Some(heartbeat(&dest_memory, 0));
    figures.blackout = observer.finish(Duration::from_secs(1));
    // The source's paused micro-VM is torn down only now: on one host its
    // teardown (vCPU threads, KVM's page tables for all of its memory) would
    // otherwise take CPU from the destination guest's first moments, which
    // two hosts would not (the benchmark drops it after the observer too).
    drop(booted.guest);
    figures.dest_started = arrival.started_at();
    // The source's memory no longer changes: check it against what was sent
    // (after the destination's first beats: on one host the check would
    // otherwise take CPU from the guest's first moments there, which two
    // hosts would not).
    let check = report::check_source(report, &booted.memory);
    arrival.stop();

    report::summary(report, &figures);
    let checked = report.verify == VerifyMode::Off || (report.verified && received.verified);
    let ok = checked && figures.heartbeat_after > Some(figures.heartbeat_before);
    let alarm = check.as_ref().is_some_and(|c| c.pages_differ > 0);
    let end = match (
        alarm,
        ok,
        report.converged() && report.downtime_target_met(),
    ) {
        (true, _, _) => Outcome::VerifyAlarm,
        (false, false, _) => Outcome::Internal,
        (false, true, true) => Outcome::Migrated,
        (false, true, false) => Outcome::NotConverged,
    };
    if let Some(path) = &a.migration.json {
        report::write_json(
            path,
            "source",
            end,
            &outcome,
            &figures,
            check.as_ref(),
            &config,
        )?;
        println!("  report:        {}", path.display());
    }
    Ok(end)
}

/// The demo's destination: lands into `memory` (fresh from
/// `Layout::allocate`, so known zero) and runs the guest there.
fn land<T: DestTransport>(
    memory: DestMemory,
    transport: Result<T, TransportError>,
) -> Result<(Received, Arrival), LandError> {
    let mut t = transport?;
    let mut arrival = Arrival::new();
    let cfg = DestConfig {
        memory_zeroed: true,
        ..DestConfig::default()
    };
    receive(&memory, &mut t, &cfg, &mut arrival).map(|r| (r, arrival))
}
