//! `hpmig dest --listen ADDR`: wait for one migration, run the guest it
//! brought, and show that it runs on.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hpmig_core::handshake::Terms;
use hpmig_core::land::{accept, receive_accepted, DestConfig};
use hpmig_core::memory::DestMemory;
use hpmig_core::transport::DestTransport;
use hpmig_microvm::kvm::heartbeat;
use hpmig_microvm::Arrival;
use hpmig_transport_tcp::{TcpDest, TcpOptions};

use crate::args::TokenArgs;
use crate::report;
use crate::units::{human, parse_bytes, parse_millis};

#[derive(Args, Debug)]
pub struct DestArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    rdma: crate::rdma::RdmaArgs,
    /// Refuse guests larger than this.
    #[arg(long, default_value = "64G", value_parser = parse_bytes)]
    max_memory: u64,
    /// How long to run the received guest before exiting.
    #[arg(long, default_value = "2s", value_parser = parse_millis)]
    run_for: Duration,
    /// Fault all guest memory in before receiving (faster receive, full
    /// resident size from the start; like QEMU's -mem-prealloc).
    #[arg(long)]
    prefault: bool,
    /// Give up when the source makes no progress for this long.
    #[arg(long, default_value = "30s", value_parser = parse_millis)]
    io_timeout: Duration,
}

pub fn run(a: &DestArgs) -> Result<bool> {
    let result = receive_and_run(a);
    println!("  peak memory: {} resident", human(report::peak_rss()));
    result
}

fn receive_and_run(a: &DestArgs) -> Result<bool> {
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    println!(
        "hpmig dest: waiting for one migration on {}",
        listener.local_addr()?
    );
    if !a.token.secret().is_set() {
        println!("  no token: any peer that can reach this port may migrate a guest here");
    }
    let opts = TcpOptions {
        io_timeout: a.io_timeout,
        ..TcpOptions::default()
    };
    #[cfg(feature = "rdma")]
    if let Some(o) = a.rdma.options(opts)? {
        println!("  data by RDMA on {} port {}", o.device, o.port);
        let mut transport =
            hpmig_transport_rdma::RdmaDest::accept(listener, o).context("accepting the source")?;
        let peer = transport.peer();
        return land_and_run(a, &mut transport, peer);
    }
    #[cfg(not(feature = "rdma"))]
    a.rdma.options(opts)?;
    let mut transport = TcpDest::accept(listener, opts).context("accepting the source")?;
    let peer = transport.peer();
    land_and_run(a, &mut transport, peer)
}

/// Answers the handshake, lands the migration, runs the guest it brought.
fn land_and_run<T: DestTransport>(
    a: &DestArgs,
    transport: &mut T,
    peer: std::net::SocketAddr,
) -> Result<bool> {
    let cfg = DestConfig {
        terms: Terms {
            secret: a.token.secret(),
            max_memory: a.max_memory,
            ..Terms::default()
        },
        // Allocated below, fresh and zero, after the handshake.
        memory_zeroed: true,
    };
    let accepted = match accept(transport, &cfg, None) {
        Ok(x) => x,
        Err(e) => {
            println!("refused {peer} during {}: {e}", e.phase());
            return Ok(false);
        }
    };
    let hello = &accepted.hello;
    println!(
        "  source {peer}: {} guest, {} granularity, {} stream(s)",
        human(hello.layout.total_bytes()),
        hello.granularity.as_str(),
        hello.streams
    );
    let memory: DestMemory = if a.prefault {
        let t = std::time::Instant::now();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let m = hpmig_core::memory::allocate_prefaulted(&hello.layout, threads)?;
        println!(
            "  prefaulted {} of guest memory in {:.0} ms",
            human(hello.layout.total_bytes()),
            t.elapsed().as_secs_f64() * 1e3
        );
        m
    } else {
        hello.layout.allocate()?
    };
    let cpu0 = report::cpu_seconds();
    let mut arrival = Arrival::new(&memory);
    let received = match receive_accepted(&accepted, &memory, transport, &cfg, &mut arrival) {
        Ok(r) => r,
        Err(e) => {
            println!(
                "migration FAILED during {}: {e}; the received guest is discarded and not run",
                e.phase()
            );
            return Ok(false);
        }
    };
    println!(
        "  received: final round {}, {} records, digest {}",
        received.final_round,
        received.stats.records,
        if received.verified {
            "verified"
        } else {
            "not checked"
        }
    );
    println!(
        "  dest cpu: {}",
        report::cpu_line(report::cpu_seconds() - cpu0, received.stats.wire_bytes)
    );
    let before = arrival.arrival_heartbeat();
    std::thread::sleep(a.run_for);
    let after = heartbeat(&memory, 0);
    let kind = arrival.running().map_or("guest", |g| g.kind());
    if let Some(why) = arrival.running().and_then(|g| g.failure()) {
        println!("  the resumed guest stopped: {why}");
    }
    arrival.stop();
    println!(
        "  {kind} resumed: heartbeat {before} at arrival, {after} after {:?} ({})",
        a.run_for,
        if after > before {
            "runs on"
        } else {
            "did NOT advance"
        }
    );
    Ok(after > before)
}
