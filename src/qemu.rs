//! `hpmig qemu-image`: its flags; the image is hpmig-bench's
//! ([`hpmig_bench::qemu::image`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use hpmig_bench::qemu::{image, QEMU};
use hpmig_microvm::Workload;

/// `hpmig qemu-image`: the guest program for running by hand in QEMU.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Where to write the image.
    #[arg(long)]
    out: PathBuf,
    /// Guest memory (QEMU's -m must be the same).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_bytes)]
    memory: u64,
    #[arg(long, default_value = "sparse")]
    workload: Workload,
    /// Guest stores per second (paced by the TSC); flat out when absent.
    #[arg(long)]
    dirty_rate: Option<u64>,
}

pub fn write_image(a: &ImageArgs) -> Result<bool> {
    std::fs::write(&a.out, image(a.workload, a.memory, a.dirty_rate)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: boot with {QEMU} -accel kvm -cpu host,-arch-capabilities -m {}M -kernel {}; vCPU 0's heartbeat is the 8 bytes at guest address 0",
        a.out.display(),
        a.memory >> 20,
        a.out.display()
    );
    Ok(true)
}
