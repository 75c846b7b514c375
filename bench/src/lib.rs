//! hpmig-bench: hpmig's benchmarks. The criterion micro-benchmarks are in
//! `benches/`; this library is the migration benchmark the `hpmig` binary
//! runs:
//!
//! - [`plots`]: the figures (SVG): bytes per round, time and downtime
//!   against the link, the paper's comparison;
//! - [`qemu`]: QEMU as the peer, booting the micro-VM's workload as a
//!   multiboot image and migrating it with its own migration.
//!
//! Errors are `anyhow`: this is a harness whose every error ends as a line
//! `hpmig bench` prints, not a library a VMM embeds.

pub mod plots;
pub mod qemu;
