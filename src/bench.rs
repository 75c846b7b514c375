//! `hpmig bench`: its flags; the matrix is hpmig-bench's
//! ([`hpmig_bench::matrix`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use hpmig_bench::matrix::{self, Options};
use hpmig_microvm::GuestChoice;

use crate::units::parse_bytes;

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
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes)]
    memory: Vec<u64>,
    /// Guest size of the QEMU comparison.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    peer_memory: u64,
}

pub fn run(a: &BenchArgs) -> Result<bool> {
    matrix::run(&Options {
        quick: a.quick,
        repeats: a.repeats,
        out: a.out.clone(),
        guest: a.guest,
        peer: a.peer,
        memory: a.memory.clone(),
        peer_memory: a.peer_memory,
    })
}
