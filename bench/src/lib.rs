//! hpmig-bench: hpmig's benchmarks. The criterion micro-benchmarks are in
//! `benches/`; this library is the migration benchmark the `hpmig` binary
//! runs:
//!
//! - [`matrix`]: `hpmig bench`, the cells and how each one runs;
//! - [`link`]: the link both tools migrate over, a veth pair shaped with
//!   tc, and its byte counters;
//! - [`results`]: what a run measured, as types: bench.json (versioned),
//!   bench.csv, and the per-cell summaries the figures draw;
//! - [`stats`]: the median and spread over a cell's runs;
//! - [`model`]: `hpmig model`, predictions for guests and links larger
//!   than a test machine has, calibrated on a bench.json;
//! - [`plots`]: the figures (SVG), one set per guest size: bytes per
//!   round, time and downtime per link cap, the paper's comparison; and
//!   downtime against guest size; non-converged cells drawn hollow;
//! - [`qemu`]: QEMU as the peer, booting the micro-VM's workload as a
//!   multiboot image and migrating it with its own migration.
//!
//! Errors are `anyhow`: this is a harness whose every error ends as a line
//! `hpmig bench` prints, not a library a VMM embeds.

use hpmig_core::precopy::controller::{OnStall, Policy};

pub mod link;
pub mod matrix;
pub mod model;
pub mod plots;
pub mod qemu;
pub mod results;
pub mod stats;

/// The stop policy of every hpmig run of the benchmark: the controller's
/// defaults, at most 10 rounds, then a forced stop-and-copy (so every run
/// finishes and its downtime is measured). QEMU gets its downtime target as
/// its downtime limit.
pub fn policy() -> Policy {
    Policy {
        max_rounds: 10,
        on_stall: OnStall::ForceStop,
        ..Policy::default()
    }
}

// Bytes for people, as the `hpmig` binary prints them: `1.5 GiB`.
use hpmig_report::text::bytes as human;
