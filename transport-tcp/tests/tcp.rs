//! Migrations over real TCP sockets on loopback.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use hpmig_core::auth::Secret;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::land::{accept, receive_accepted, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, MigrateError, MigrationReport, Phase, SourceConfig};
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::{assert_guest_runs, assert_same_memory, dense_memory, pattern_memory};
use hpmig_core::vm::emulated::{EmulatedConfig, EmulatedGuest};
use hpmig_core::vm::{Guest, Workload};
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

const MIB: usize = 1 << 20;

fn config(granularity: Granularity, workers: usize) -> SourceConfig {
    let mut cfg = SourceConfig::new(granularity);
    cfg.workers = workers;
    cfg.policy = Policy {
        downtime_target: Duration::from_millis(5),
        min_work_set: 64 << 10,
        max_rounds: 6,
        stall_rounds: 3,
        on_stall: OnStall::ForceStop,
    };
    cfg
}

fn opts() -> TcpOptions {
    TcpOptions {
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
    }
}

type DestOutcome = Result<(Received, DestMemory), LandError>;

/// A destination on a fresh loopback port, as `hpmig dest` runs one: it
/// allocates guest memory only after the handshake.
fn destination(dcfg: DestConfig) -> (SocketAddr, thread::JoinHandle<DestOutcome>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let mut t = TcpDest::accept(listener, opts()).map_err(LandError::Control)?;
        let accepted = accept(&mut t, &dcfg, None)?;
        let memory: DestMemory = accepted.hello.layout.allocate().unwrap();
        let received = receive_accepted(&accepted, &memory, &mut t)?;
        Ok((received, memory))
    });
    (addr, handle)
}

fn source(
    addr: SocketAddr,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
) -> Result<MigrationReport, MigrateError> {
    let mut t = TcpSource::connect(addr, opts()).unwrap();
    let mut dirty = VmmBitmap::new(memory.clone(), Layout::of(memory).unwrap()).unwrap();
    migrate(memory, &mut dirty, guest, &mut t, cfg, &mut |_| {})
}

fn start(memory: &SourceMemory, workload: Workload) -> EmulatedGuest {
    EmulatedGuest::start(
        memory.clone(),
        EmulatedConfig {
            workload,
            vcpus: 2,
            dirty_rate: None,
            seed: 9,
        },
    )
    .unwrap()
}

fn migrate_ok(
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
) -> (MigrationReport, Received) {
    let (addr, dest) = destination(DestConfig::default());
    let report = source(addr, memory, guest, cfg).expect("migration succeeds");
    let (received, dest_memory) = dest.join().unwrap().expect("destination accepts");
    assert!(report.verified && received.verified);
    assert_same_memory(memory, &dest_memory);
    (report, received)
}

#[test]
fn one_two_and_four_streams_are_byte_exact_under_dirtying() {
    for (streams, workload, granularity) in [
        (1, Workload::Sparse, Granularity::Segment),
        (2, Workload::Aba, Granularity::Segment),
        (4, Workload::Dense, Granularity::Page),
        (4, Workload::Hotspot, Granularity::Segment),
    ] {
        let memory = pattern_memory(&[(0, 24 * MIB), (1 << 32, 4 * MIB)]);
        let mut guest = start(&memory, workload);
        thread::sleep(Duration::from_millis(20));
        let (report, _) = migrate_ok(&memory, &mut guest, &config(granularity, streams));
        assert!(
            report.rounds.len() >= 2,
            "{streams} streams: a pre-copy and a stop-and-copy round"
        );
    }
}

#[test]
fn zstd_off_on_and_auto_are_byte_exact() {
    for mode in [ZstdMode::Off, ZstdMode::On, ZstdMode::Auto] {
        let memory = pattern_memory(&[(0, 32 * MIB)]);
        let mut guest = start(&memory, Workload::Dense);
        let mut cfg = config(Granularity::Page, 2);
        cfg.zstd = mode;
        let (report, received) = migrate_ok(&memory, &mut guest, &cfg);
        let zstd_pages: u64 = report.rounds.iter().map(|r| r.stats.zstd_pages).sum();
        assert_eq!(received.stats.zstd_pages, zstd_pages);
        match mode {
            ZstdMode::Off => assert_eq!(zstd_pages, 0),
            ZstdMode::On => assert!(zstd_pages > 0, "pattern pages compress"),
            ZstdMode::Auto => {} // its choice depends on measured rates
        }
    }
}

#[test]
fn the_bandwidth_cap_holds_within_ten_percent_over_two_seconds() {
    // 128 MiB of incompressible pages at 64 MB/s: round 0 takes about 2 s.
    let memory = dense_memory(128 * MIB);
    let mut guest = start(&memory, Workload::Idle);
    let mut cfg = config(Granularity::Page, 2);
    let cap = 64_000_000u64;
    cfg.bandwidth = Some(cap);
    let (report, _) = migrate_ok(&memory, &mut guest, &cfg);
    let r0 = &report.rounds[0].metrics;
    let secs = r0.duration.as_secs_f64();
    let rate = r0.wire_bytes as f64 / secs;
    assert!(secs > 1.8, "round 0 lasted {secs:.2} s");
    assert!(
        (0.9..=1.1).contains(&(rate / cap as f64)),
        "rate {rate:.0} B/s against a cap of {cap} B/s"
    );
}

#[test]
fn a_wrong_token_is_refused_and_the_guest_keeps_running() {
    let memory = pattern_memory(&[(0, 16 * MIB)]);
    let mut guest = start(&memory, Workload::Sparse);
    let (addr, dest) = destination(DestConfig {
        secret: Secret::from_token(b"right"),
        ..DestConfig::default()
    });
    let mut cfg = config(Granularity::Segment, 2);
    cfg.secret = Secret::from_token(b"wrong");
    let err = source(addr, &memory, &mut guest, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::Handshake,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("authentication"), "{err}");
    assert!(matches!(dest.join().unwrap(), Err(LandError::Auth)));
    assert_guest_runs(&guest);
}

/// Forwards connections to `target` and cuts all of them once `cut_after`
/// bytes went from the source to the destination.
fn cutting_proxy(target: SocketAddr, cut_after: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            conns
                .lock()
                .unwrap()
                .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
            if cut.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
            }
            let pump = |mut from: TcpStream, mut to: TcpStream, count: bool| {
                let (sent, cut, conns) = (sent.clone(), cut.clone(), conns.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if count
                            && sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > cut_after
                        {
                            cut.store(true, Ordering::SeqCst);
                            for c in conns.lock().unwrap().iter() {
                                let _ = c.shutdown(Shutdown::Both);
                            }
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            };
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                true,
            );
            pump(server, client, false);
        }
    });
    addr
}

#[test]
fn a_connection_cut_mid_round_leaves_the_source_running_and_a_retry_succeeds() {
    let memory = pattern_memory(&[(0, 32 * MIB)]);
    let mut guest = start(&memory, Workload::Sparse);
    let cfg = config(Granularity::Page, 2);
    let (dest_addr, dest) = destination(DestConfig::default());
    let proxy = cutting_proxy(dest_addr, 4 * MIB as u64);
    let err = source(proxy, &memory, &mut guest, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::PreCopy,
                round: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        dest.join().unwrap().is_err(),
        "the destination never completes a partial guest"
    );
    assert_guest_runs(&guest);
    // A second migration, to a fresh destination, succeeds.
    migrate_ok(&memory, &mut guest, &cfg);
}
