//! The `hpmig` command line. Everything it runs lives in the library crates;
//! these files parse flags, wire the pieces together and print.

mod args;
mod bench;
mod demo;
mod dest;
mod rdma;
mod report;
mod source;
mod units;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hpmig",
    version,
    about = "Live migration of VM memory by dirty offset segments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest, let it dirty memory, migrate it live in this process, verify the copy.
    Demo(demo::DemoArgs),
    /// Boot a guest and migrate it to a waiting `hpmig dest`.
    Source(source::SourceArgs),
    /// Wait for one migration, then run the guest it brought.
    Dest(dest::DestArgs),
    /// Run the migration benchmark matrix; write CSV and JSON.
    Bench(bench::BenchArgs),
    /// List the RDMA devices: ports, state, MTU, GID table (like ibv_devinfo).
    Devices,
    /// Predict migrations of large guests on fast links from a bench run.
    Model(bench::ModelArgs),
    /// Write the workload as a multiboot image QEMU boots (the bench's peer).
    QemuImage(bench::ImageArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Source(a) => source::run(&a),
        Command::Dest(a) => dest::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Devices => rdma::devices(),
        Command::Model(a) => bench::model(&a),
        Command::QemuImage(a) => bench::qemu_image(&a),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hpmig: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
