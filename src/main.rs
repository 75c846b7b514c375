//! The `hpmig` command line. Everything it runs lives in the library crates;
//! this file only parses flags and prints.

mod demo;
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
    /// Boot a guest, let it dirty memory, migrate it live, and verify the copy.
    Demo(demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
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
