//! `hpmig model`: its flags; the model is hpmig-bench's
//! ([`hpmig_bench::model`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use hpmig_bench::model::{self, Options};

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// The bench.json `hpmig bench` wrote.
    #[arg(long)]
    from: PathBuf,
    /// Guest sizes to predict (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64G,256G,1T", value_parser = crate::units::parse_bytes)]
    memory: Vec<u64>,
    /// Link speeds to predict, Gbit/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "25,100,400")]
    link: Vec<f64>,
    /// Where to write model.csv (next to bench.json when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scan (snapshot + diff) rate of the target hosts, GB/s, instead of
    /// the measured one (e.g. from scripts/scaling.sh on such a host).
    #[arg(long)]
    scan_rate: Option<f64>,
    /// Digest rate of the target hosts, GB/s, instead of the measured one.
    #[arg(long)]
    digest_rate: Option<f64>,
}

pub fn run(a: &ModelArgs) -> Result<bool> {
    model::run(&Options {
        from: a.from.clone(),
        memory: a.memory.clone(),
        link_gbit: a.link.clone(),
        out: a.out.clone(),
        scan_rate: a.scan_rate,
        digest_rate: a.digest_rate,
    })
}
