//! The `hpmig` command line. Everything it runs lives in the library crates;
//! these files parse flags, wire the pieces together and print.

mod args;
mod bench;
mod control;
mod demo;
mod dest;
mod limits;
mod metrics;
mod outcome;
mod pump;
mod rdma;
mod report;
mod source;
mod units;
mod watch;

use outcome::{Outcome, Usage};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hpmig",
    version,
    about = "Live migration of VM memory by dirty offset segments"
)]
struct Cli {
    /// More log lines on stderr: -v info, -vv debug, -vvv trace (warnings
    /// only without it). RUST_LOG, when set, decides instead (e.g.
    /// RUST_LOG=hpmig_transport_tcp=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
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
    /// Ask or tell a running hpmig through its control socket.
    Ctl(control::CtlArgs),
    /// Measure this host's memcpy and memcmp rates with N threads (scaling ceilings).
    Limits(limits::LimitsArgs),
    /// Measure the RDMA transport alone: slots sent as a migration's workers send them, no engine work; or --register's ibv_reg_mr cost.
    Pump(pump::PumpArgs),
}

/// Sends the libraries' `tracing` events to stderr: warnings and errors by
/// default, more with each `-v`, or what RUST_LOG says when it is set.
fn log_to_stderr(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Fails only when a subscriber is installed already; the first stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    log_to_stderr(cli.verbose);
    let done = |ok: anyhow::Result<bool>| {
        ok.map(|ok| {
            if ok {
                Outcome::Migrated
            } else {
                Outcome::Failed
            }
        })
    };
    let result = match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Source(a) => source::run(&a),
        Command::Dest(a) => dest::run(&a),
        Command::Bench(a) => done(bench::run(&a)),
        Command::Devices => done(rdma::devices()),
        Command::Model(a) => done(bench::model(&a)),
        Command::QemuImage(a) => done(bench::qemu_image(&a)),
        Command::Ctl(a) => done(control::run(&a)),
        Command::Limits(a) => done(limits::run(&a)),
        Command::Pump(a) => done(pump::run(&a)),
    };
    match result {
        Ok(outcome) => outcome.code(),
        Err(e) => {
            eprintln!("hpmig: error: {}", one_line(&e));
            if e.downcast_ref::<Usage>().is_some() {
                Outcome::Usage.code()
            } else {
                Outcome::Internal.code()
            }
        }
    }
}

/// An error and its causes on one line, each cause once. An error whose
/// message already ends with its source's (thiserror's `"{context}:
/// {source}"` beside `#[source]`) would otherwise print it twice under
/// anyhow's `{:#}`.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_its_error_already_says_is_printed_once() {
        /// As thiserror's `#[error("connecting: {source}")]` with `#[source]`.
        #[derive(Debug)]
        struct Connect {
            source: std::io::Error,
        }
        impl std::fmt::Display for Connect {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "connecting: {}", self.source)
            }
        }
        impl std::error::Error for Connect {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = anyhow::Error::new(Connect { source: refused }).context("--to 127.0.0.1:1");
        assert_eq!(
            one_line(&e),
            "--to 127.0.0.1:1: connecting: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }
}
