//! The flags of `hpmig bench`, `hpmig model` and `hpmig qemu-image`; what
//! they run is hpmig-bench's ([`hpmig_bench::matrix`], [`hpmig_bench::model`],
//! [`hpmig_bench::qemu`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hpmig_bench::link::Emulation;
use hpmig_bench::qemu::QEMU;
use hpmig_bench::{matrix, model, plots};
use hpmig_core::memory::Contents;
use hpmig_microvm::{GuestChoice, Workload};

use crate::units::parse_size;

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
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    memory: Vec<u64>,
    /// Guest size of the QEMU comparison.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    peer_memory: u64,
    /// What guest memory holds before the workload starts (comma-separated:
    /// empty, full, mixed). Default: full in the quick matrix and the QEMU
    /// comparison, full and mixed in the full matrix.
    #[arg(long, value_delimiter = ',')]
    contents: Vec<Contents>,
    /// Only these loads of the matrix (comma-separated, as the table names
    /// them: sparse@100k, dense@max, hotspot@max, idle); all when absent.
    #[arg(long, value_delimiter = ',')]
    loads: Vec<String>,
    /// Only these links of the matrix (comma-separated, as the table names
    /// them: 1Gbit, 10Gbit, 25Gbit, uncapped); all when absent.
    #[arg(long, value_delimiter = ',')]
    links: Vec<String>,
    /// How the link is emulated: `veth` (a veth pair into a network
    /// namespace shaped with tc tbf: one limit for hpmig and QEMU, bytes
    /// counted on the link; needs root and iproute2) or `cap` (each tool's
    /// own bandwidth cap over loopback).
    #[arg(long, default_value = "veth")]
    link_emulation: Emulation,
    /// Run nothing: redraw the figures of DIR from its bench.json (one
    /// written by an older hpmig too) into DIR.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["quick", "peer", "memory", "contents", "loads", "links", "repeats", "out", "link_emulation"])]
    replot: Option<PathBuf>,
}

pub fn run(a: &BenchArgs) -> Result<bool> {
    if let Some(dir) = &a.replot {
        for plot in plots::replot(dir)? {
            println!("  plot:    {}", plot.display());
        }
        return Ok(true);
    }
    matrix::run(&matrix::Options {
        quick: a.quick,
        repeats: a.repeats,
        out: a.out.clone(),
        guest: a.guest,
        peer: a.peer,
        memory: a.memory.clone(),
        peer_memory: a.peer_memory,
        contents: a.contents.clone(),
        loads: a.loads.clone(),
        links: a.links.clone(),
        link: a.link_emulation,
    })
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// The bench.json `hpmig bench` wrote.
    #[arg(long)]
    from: PathBuf,
    /// Guest sizes to predict (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64G,256G,1T", value_parser = parse_size)]
    memory: Vec<u64>,
    /// Link speeds to predict, Gbit/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "25,100,400")]
    link: Vec<f64>,
    /// Guest contents to predict (comma-separated: empty, full, mixed);
    /// every contents bench.json has cells for when absent. A contents
    /// without cells gets no prediction.
    #[arg(long, value_delimiter = ',')]
    contents: Vec<Contents>,
    /// Guest size the held-out check calibrates on: the error is then
    /// measured on the cells of the other sizes. The smallest measured size
    /// when absent (no check when bench.json holds only one size).
    #[arg(long, value_parser = parse_size)]
    calibrate_on: Option<u64>,
    /// Where to write model.csv (next to bench.json when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scan (snapshot + diff) rate of the target hosts, GB/s, instead of
    /// the measured ones (round 0's and the later rounds'), e.g. from
    /// scripts/scaling.sh on such a host.
    #[arg(long)]
    scan_rate: Option<f64>,
    /// Predict `--verify strict`: add a whole-memory digest at this rate,
    /// GB/s, to every downtime. Without it the downtime has no such term,
    /// as with hpmig's default `--verify incremental`.
    #[arg(long)]
    digest_rate: Option<f64>,
}

pub fn model(a: &ModelArgs) -> Result<bool> {
    model::run(&model::Options {
        from: a.from.clone(),
        memory: a.memory.clone(),
        link_gbit: a.link.clone(),
        contents: a.contents.clone(),
        calibrate_on: a.calibrate_on,
        out: a.out.clone(),
        scan_rate: a.scan_rate,
        digest_rate: a.digest_rate,
    })
}

/// `hpmig qemu-image`: the guest program for running by hand in QEMU.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Where to write the image.
    #[arg(long)]
    out: PathBuf,
    /// Guest memory (QEMU's -m must be the same).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value = "sparse")]
    workload: Workload,
    /// Guest stores per second (paced by the TSC); flat out when absent.
    #[arg(long)]
    dirty_rate: Option<u64>,
}

pub fn qemu_image(a: &ImageArgs) -> Result<bool> {
    let image = hpmig_bench::qemu::image(a.workload, a.memory, a.dirty_rate)?;
    std::fs::write(&a.out, image).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: boot with {QEMU} -accel kvm -cpu host,-arch-capabilities -m {}M -kernel {}; vCPU 0's heartbeat is the 8 bytes at guest address 0",
        a.out.display(),
        a.memory >> 20,
        a.out.display()
    );
    Ok(true)
}
