//! `hpmig dest --listen ADDR`: receive a migration, run the guest it
//! brought, and show that it runs on. A copy acknowledged without the
//! source's decision is held (paused, in doubt) until the decision comes
//! again or an operator resolves it (`hpmig ctl`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hpmig_core::guest::DestGuest;
use hpmig_core::handshake::{Accepted, Terms};
use hpmig_core::land::journal::FileJournal;
use hpmig_core::land::{
    accept, hold, receive_accepted, resolve, DestConfig, LandError, Resolution, Undecided,
};
use hpmig_core::memory::DestMemory;
use hpmig_core::protocol::switchover::OutcomeKind;
use hpmig_core::transport::{Deadlines, DestTransport};
use hpmig_microvm::kvm::heartbeat;
use hpmig_microvm::Arrival;
use hpmig_transport_tcp::{Admit, ServiceOptions, TcpDest, TcpOptions, TcpService};
use serde_json::json;

use crate::args::{check_address, check_dir, TokenArgs};
use crate::control::{self, Resolve};
use crate::outcome::Outcome;
use crate::report;
use crate::units::{human, parse_size, parse_timeout, parse_wait, span};

#[derive(Args, Debug)]
pub struct DestArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    rdma: crate::rdma::RdmaArgs,
    /// Refuse guests larger than this (and larger than the memory this
    /// host has available); binary units, as --memory.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    max_memory: u64,
    /// How long to run the received guest before exiting (0 ms to 24 h).
    #[arg(long, default_value = "2s", value_parser = parse_wait)]
    run_for: Duration,
    /// Fault all guest memory in before receiving (faster receive, full
    /// resident size from the start; like QEMU's -mem-prealloc).
    #[arg(long)]
    prefault: bool,
    /// Give up when the source sends nothing for this long (it says Alive
    /// while it works): every wait on it is bounded by this (1 ms to 24 h).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    io_timeout: Duration,
    /// How long a peer has for the whole handshake (1 ms to 24 h).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    handshake_timeout: Duration,
    /// Refuse a copy the source did not send a digest for.
    #[arg(long)]
    require_verified: bool,
    /// Where sessions are journaled (fsync'd) before the guest starts, so
    /// a restarted destination tells a source truthfully what became of
    /// its guest [default: $XDG_STATE_HOME/hpmig/journal, or
    /// ~/.local/state/hpmig/journal, or /var/lib/hpmig/journal as root].
    #[arg(long)]
    journal: Option<PathBuf>,
    /// A control socket to ask and steer this destination (`hpmig ctl`);
    /// in doubt one is opened anyway, at a path printed then.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics of the migration landing here on
    /// http://ADDR/metrics (e.g. 127.0.0.1:9465).
    #[arg(long)]
    metrics: Option<String>,
    /// End after the first source, whatever its migration's outcome
    /// (without it, a migration that fails waits for the next attempt).
    #[arg(long)]
    once: bool,
}

pub fn run(a: &DestArgs) -> Result<Outcome> {
    check(a)?;
    let result = receive_and_run(a);
    println!("  peak memory: {} resident", human(report::peak_rss()));
    result
}

/// Refuses what cannot work, before anything starts (exit status 2, one
/// line).
fn check(a: &DestArgs) -> Result<()> {
    a.rdma.check()?;
    check_address("--listen", &a.listen)?;
    if let Some(path) = &a.control {
        check_dir("--control", path)?;
    }
    Ok(())
}

/// The journal directory when none was given.
fn default_journal() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("hpmig/journal");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/hpmig/journal");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/hpmig/journal")
}

fn config(a: &DestArgs) -> Result<DestConfig> {
    let dir = a.journal.clone().unwrap_or_else(default_journal);
    let journal = FileJournal::open(&dir)
        .with_context(|| format!("opening the session journal {}", dir.display()))?;
    Ok(DestConfig {
        terms: Terms {
            secret: a.token.secret(),
            max_memory: a.max_memory,
            check_free_memory: true,
            ..Terms::default()
        },
        // Allocated after the handshake, fresh and zero.
        memory_zeroed: true,
        require_verified: a.require_verified,
        deadlines: Deadlines {
            io: a.io_timeout,
            handshake: a.handshake_timeout,
        },
        journal: Some(Arc::new(journal)),
        // A copy held in doubt goes straight to this command's own hold
        // (`in_doubt`), which shows it on the control socket, serves an
        // operator and waits for the source's redelivery. Waiting inside the
        // engine first would hold it silently, unresolvable, for a minute.
        in_doubt_wait: Duration::ZERO,
        ..DestConfig::default()
    })
}

fn receive_and_run(a: &DestArgs) -> Result<Outcome> {
    let cfg = config(a)?;
    let opts = TcpOptions {
        io_timeout: a.io_timeout,
        // The wait for an authenticated source's data connections is a
        // wait on the source too: a source that died after its Proof must
        // not hold the destination (and every other source) for longer.
        connect_timeout: a.io_timeout.min(TcpOptions::default().connect_timeout),
    };
    let rdma = a.rdma.options(opts)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    // The control socket from the start: `status` shows each migration as
    // it lands, and in doubt `resolve` decides it.
    let socket = a
        .control
        .as_deref()
        .map(control::Socket::bind)
        .transpose()?;
    if let Some(s) = &socket {
        s.set_status(json!({"state": "waiting", "role": "dest", "listen": a.listen}));
    }
    let metrics = match &a.metrics {
        Some(addr) => {
            let shown = Arc::new(std::sync::Mutex::new(Arc::clone(&cfg.live)));
            crate::metrics::serve(addr, Arc::clone(&shown))?;
            Some(shown)
        }
        None => None,
    };
    let watchers = Watchers {
        socket: socket.as_ref(),
        metrics,
    };
    let socket = &watchers;
    if a.once {
        return once(a, &cfg, socket, listener, opts, rdma);
    }
    let service = TcpService::bind(
        listener,
        ServiceOptions {
            tcp: opts,
            terms: cfg.terms.clone(),
            handshake_timeout: a.handshake_timeout,
            journal: cfg.journal.clone(),
            admit: Admit(Arc::new(|g| {
                Arrival::new()
                    .admit(g.vcpus, &g.requirements)
                    .map_err(|e| e.to_string())
            })),
            ..ServiceOptions::default()
        },
    )?;
    println!(
        "hpmig dest: waiting for one migration on {}",
        service.local_addr()
    );
    describe(a);
    if !a.token.secret().is_set() {
        println!("  no token: any peer that can reach this port may migrate a guest here");
    }
    #[cfg(feature = "rdma")]
    if let Some(o) = &rdma {
        println!("  data by RDMA on {} port {}", o.device, o.port);
    }
    loop {
        // Sources that fail the handshake never reach here: the service
        // refuses them and goes on.
        let (accepted, tcp) = service.next_migration(None)?;
        let peer = tcp.peer();
        #[cfg(feature = "rdma")]
        let end = match &rdma {
            Some(o) => {
                let mut t = hpmig_transport_rdma::RdmaDest::over(tcp, o.clone())?;
                land_and_run(a, &cfg, socket, &accepted, &mut t, peer)?
            }
            None => land_and_run(a, &cfg, socket, &accepted, &mut { tcp }, peer)?,
        };
        #[cfg(not(feature = "rdma"))]
        let end = {
            let _ = &rdma;
            land_and_run(a, &cfg, socket, &accepted, &mut { tcp }, peer)?
        };
        if end != Outcome::Failed {
            return Ok(end);
        }
        println!("hpmig dest: waiting for the next attempt");
    }
}

/// The rest of the banner: the flags that decide what is accepted and how
/// long the guest runs.
fn describe(a: &DestArgs) {
    println!(
        "  accepts: guests up to {}{}, {}; runs the guest {}{}",
        human(a.max_memory),
        if a.require_verified {
            ", verified copies only"
        } else {
            ""
        },
        if a.once {
            "one source"
        } else {
            "until one migration succeeds"
        },
        span(a.run_for),
        if a.prefault {
            ", memory prefaulted"
        } else {
            ""
        },
    );
}

/// What shows the migrations landing here: the control socket and the
/// metrics endpoint (each shows the migration of the moment).
struct Watchers<'a> {
    socket: Option<&'a control::Socket>,
    metrics: Option<Arc<std::sync::Mutex<Arc<hpmig_core::precopy::live::Live>>>>,
}

/// `--once`: the first connection is the one migration, whatever it brings
/// (a refused handshake ends the command).
fn once(
    a: &DestArgs,
    cfg: &DestConfig,
    socket: &Watchers<'_>,
    listener: TcpListener,
    opts: TcpOptions,
    rdma: Option<crate::rdma::RdmaOptions>,
) -> Result<Outcome> {
    println!(
        "hpmig dest: waiting for one migration on {}",
        listener.local_addr()?
    );
    describe(a);
    loop {
        let l = listener.try_clone().context("accepting the source")?;
        let tcp = TcpDest::accept(l, opts).context("accepting the source")?;
        let peer = tcp.peer();
        #[cfg(feature = "rdma")]
        let end = match &rdma {
            Some(o) => {
                let mut t = hpmig_transport_rdma::RdmaDest::over(tcp, o.clone())?;
                accept_and_land(a, cfg, socket, &mut t, peer)?
            }
            None => accept_and_land(a, cfg, socket, &mut { tcp }, peer)?,
        };
        #[cfg(not(feature = "rdma"))]
        let end = {
            let _ = &rdma;
            accept_and_land(a, cfg, socket, &mut { tcp }, peer)?
        };
        // A source in doubt that asked what became of its guest (this
        // process restarted) was answered from the journal: that was not
        // the one migration, so wait on for it.
        if let Some(end) = end {
            return Ok(end);
        }
    }
}

fn accept_and_land<T: DestTransport>(
    a: &DestArgs,
    cfg: &DestConfig,
    socket: &Watchers<'_>,
    transport: &mut T,
    peer: std::net::SocketAddr,
) -> Result<Option<Outcome>> {
    match accept(transport, cfg, None, &mut Arrival::new()) {
        Ok(accepted) => land_and_run(a, cfg, socket, &accepted, transport, peer).map(Some),
        Err(e @ LandError::Answered(_)) => {
            println!("  source {peer}: {e}");
            Ok(None)
        }
        Err(e) => {
            eprintln!("hpmig dest: refused {peer} during {}: {e}", e.phase());
            Ok(Some(Outcome::Failed))
        }
    }
}

/// Lands an authenticated source's migration and runs the guest it brought.
fn land_and_run<T: DestTransport>(
    a: &DestArgs,
    cfg: &DestConfig,
    socket: &Watchers<'_>,
    accepted: &Accepted,
    transport: &mut T,
    peer: std::net::SocketAddr,
) -> Result<Outcome> {
    let end = land_and_run_once(a, cfg, socket, accepted, transport, peer);
    // Over (or failed): the control socket stops showing this migration.
    if let Some(s) = socket.socket {
        s.detach();
        s.set_status(json!({
            "state": "waiting",
            "role": "dest",
            "listen": a.listen,
            "last-migration": end.as_ref().map_or("internal-error", |e| e.as_str()),
        }));
    }
    end
}

fn land_and_run_once<T: DestTransport>(
    a: &DestArgs,
    cfg: &DestConfig,
    socket: &Watchers<'_>,
    accepted: &Accepted,
    transport: &mut T,
    peer: std::net::SocketAddr,
) -> Result<Outcome> {
    // A fresh live view per migration, shown on the control socket.
    let mut cfg = cfg.clone();
    cfg.live = Arc::new(hpmig_core::precopy::live::Live::new());
    if let Some(m) = &socket.metrics {
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&cfg.live);
    }
    if let Some(s) = socket.socket {
        s.set_status(json!({"state": "receiving", "role": "dest"}));
        s.attach_view(
            Arc::clone(&cfg.live),
            json!({"role": "dest", "source": peer.to_string()}),
        );
    }
    let cfg = &cfg;
    let mut arrival = Arrival::new();
    let hello = &accepted.hello;
    println!(
        "  source {peer}: {} guest, {} vCPU(s), {} granularity, {} stream(s), protocol {}",
        human(hello.layout.total_bytes()),
        hello.guest.vcpus,
        hello.granularity.as_str(),
        hello.streams,
        accepted.agreed.version,
    );
    let memory: DestMemory = if a.prefault {
        let t = Instant::now();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let m = hpmig_core::memory::allocate_prefaulted(&hello.layout, threads)?;
        println!(
            "  prefaulted {} of guest memory in {}",
            human(hello.layout.total_bytes()),
            hpmig_report::text::duration(t.elapsed())
        );
        m
    } else {
        hello.layout.allocate()?
    };
    let cpu0 = report::cpu_seconds();
    let received = match receive_accepted(accepted, &memory, transport, cfg, &mut arrival) {
        Ok(r) => r,
        Err(LandError::InDoubt(u)) => {
            eprintln!("hpmig dest: {}", LandError::InDoubt(u.clone()));
            let end = in_doubt(cfg, socket, transport, &mut arrival, &u)?;
            if end == Outcome::Migrated {
                run_for(a, &memory, &mut arrival);
            }
            return Ok(end);
        }
        Err(e) => {
            eprintln!(
                "hpmig dest: migration FAILED during {}: {e}; the received guest is discarded and not run",
                e.phase()
            );
            return Ok(Outcome::Failed);
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
    Ok(if run_for(a, &memory, &mut arrival) {
        Outcome::Migrated
    } else {
        Outcome::Internal
    })
}

/// Runs the received guest for `--run-for`; true if its heartbeat moved.
fn run_for(a: &DestArgs, memory: &DestMemory, arrival: &mut Arrival) -> bool {
    let before = arrival.arrival_heartbeat();
    std::thread::sleep(a.run_for);
    let mut after = heartbeat(memory, 0);
    // This process may itself have been stopped (SIGSTOP, a stalled host)
    // for the whole window, so a still heartbeat is watched a while longer
    // before the guest is called stopped.
    let grace = Instant::now() + a.run_for.max(Duration::from_secs(1));
    while after <= before && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(10));
        after = heartbeat(memory, 0);
    }
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
    after > before
}

/// Holds the acknowledged copy, paused, until the source's decision comes
/// again or an operator resolves it.
fn in_doubt<T: DestTransport>(
    cfg: &DestConfig,
    socket: &Watchers<'_>,
    transport: &mut T,
    arrival: &mut Arrival,
    u: &Undecided,
) -> Result<Outcome> {
    let own;
    let socket = match socket.socket {
        Some(s) => s,
        None => {
            own = control::Socket::bind(&control::default_path("dest")?)?;
            &own
        }
    };
    let path = socket.path().to_path_buf();
    socket.set_status(json!({
        "state": "in-doubt",
        "role": "dest",
        "guest": "held paused at the destination",
        "session": u.id().to_string(),
        "round": u.round,
    }));
    eprintln!(
        "hpmig dest: holding the copy, waiting for the source's decision. By hand: \
         hpmig ctl {p} resolve discard, or (only if the source's guest is fenced) \
         hpmig ctl {p} resolve run --source-fenced",
        p = path.display()
    );
    loop {
        // Hold until the decision comes again, or an operator asks.
        let mut asked = None;
        let mut stop = || {
            let Some((r, answer)) = socket.resolution() else {
                return false;
            };
            match r {
                Resolve::Discard => asked = Some((Resolution::Discard, answer)),
                Resolve::Run { source_fenced } => {
                    asked = Some((Resolution::Run { source_fenced }, answer))
                }
                Resolve::Resume { .. } => {
                    let _ = answer.send(Err(
                        "on the destination: discard, or run --source-fenced".into()
                    ));
                    return false;
                }
            }
            true
        };
        let outcome = match hold(u, transport, cfg, arrival, &mut stop) {
            Some(Ok(o)) => o.outcome,
            Some(Err(e)) => {
                eprintln!("hpmig dest: {e}");
                return Ok(Outcome::InDoubt);
            }
            None => {
                let Some((resolution, answer)) = asked else {
                    continue;
                };
                match resolve(u, cfg, arrival, resolution) {
                    Ok(o) => {
                        let _ = answer.send(Ok(json!({"outcome": format!("{:?}", o.outcome)})));
                        o.outcome
                    }
                    Err(e) => {
                        let _ = answer.send(Err(format!(
                            "refused: {e} (running it needs --source-fenced)"
                        )));
                        continue;
                    }
                }
            }
        };
        return Ok(match outcome {
            OutcomeKind::Started => Outcome::Migrated,
            _ => Outcome::Failed,
        });
    }
}
