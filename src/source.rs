//! `hpmig source --to ADDR`: boot the guest, migrate it to a waiting
//! `hpmig dest` over TCP. Also the source half of `hpmig demo`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hpmig_core::dirty::DirtySource;
use hpmig_core::memory::SourceMemory;
use hpmig_core::precopy::{migrate, MigrateError, MigrationReport, SourceConfig};
use hpmig_core::transport::SourceTransport;
use hpmig_microvm::kvm::heartbeat;
use hpmig_transport_tcp::{TcpOptions, TcpSource};

use crate::args::{GuestArgs, MigrationArgs, TokenArgs};
use crate::rdma::RdmaArgs;
use crate::report::{self, GuestFigures};
use crate::units::{human, parse_millis};
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
    /// Give up when the destination makes no progress for this long.
    #[arg(long, default_value = "30s", value_parser = parse_millis)]
    io_timeout: Duration,
}

/// A running guest, ready to migrate.
pub struct Booted {
    pub memory: SourceMemory,
    pub guest: RunningGuest,
    pub dirty: Box<dyn DirtySource>,
    pub rate_before: f64,
}

/// Boots the guest, says what runs, and lets it run for the warm-up,
/// measuring its own pace.
pub fn boot(g: &GuestArgs) -> Result<Booted> {
    g.check()?;
    let ranges = hpmig_microvm::kvm::memory_ranges(g.memory)?;
    let memory = SourceMemory::from_ranges(&ranges).context("allocating guest memory")?;
    if g.prefill {
        hpmig_core::memory::fill_random(&memory, 1);
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
    })
}

pub fn describe(g: &GuestArgs, m: &MigrationArgs, wire: &str) {
    println!(
        "hpmig: {} guest, {} vCPU(s), workload {}, {} granularity, {} worker(s)",
        human(g.memory),
        g.vcpus,
        g.workload.as_str(),
        m.granularity.as_str(),
        m.workers
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
    let spinner = report::Spinner::start();
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
        rate_before: b.rate_before,
        rate_during,
        cpu_seconds: report::cpu_seconds() - cpu0,
    };
    Ok((outcome, figures))
}

pub fn run(a: &SourceArgs) -> Result<bool> {
    let opts = TcpOptions {
        io_timeout: a.io_timeout,
        ..TcpOptions::default()
    };
    // Check the flags (and open the device) before the guest boots.
    let rdma = a.rdma.options(opts)?;
    let wire = match &rdma {
        Some(o) => format!("{}, control over TCP to {}", crate::rdma::wire(o), a.to),
        None => format!("TCP to {}", a.to),
    };
    describe(&a.guest, &a.migration, &wire);
    let cfg = a.migration.config(a.token.secret());
    #[cfg(feature = "rdma")]
    if let Some(o) = rdma {
        let mut transport = hpmig_transport_rdma::RdmaSource::connect(a.to.as_str(), o)
            .with_context(|| format!("connecting to {} over RDMA", a.to))?;
        let stats = transport.stats();
        let mut booted = boot(&a.guest)?;
        let ok = finish(a, migrate_booted(&mut booted, &mut transport, &cfg)?)?;
        println!("  rdma:          {}", crate::rdma::stats_line(&stats));
        return Ok(ok);
    }
    let mut booted = boot(&a.guest)?;
    let mut transport = TcpSource::connect(a.to.as_str(), opts)
        .with_context(|| format!("connecting to {}", a.to))?;
    finish(a, migrate_booted(&mut booted, &mut transport, &cfg)?)
}

fn finish(
    a: &SourceArgs,
    (outcome, figures): (Result<MigrationReport, MigrateError>, GuestFigures),
) -> Result<bool> {
    match outcome {
        Ok(r) => {
            report::summary(&r, &figures);
            if let Some(path) = &a.migration.json {
                report::write_json(path, &r, &figures)?;
            }
            Ok(r.verified)
        }
        Err(e) => {
            println!("\nmigration FAILED: {e}");
            Ok(false)
        }
    }
}
