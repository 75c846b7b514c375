//! End-to-end migrations through the in-process transport: a vm-memory guest
//! keeps being written by its vCPU threads while it moves, and afterwards the
//! destination's memory must equal the source's byte for byte.

#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::Duration;

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::land::{receive, DestConfig, LandError, Received};
use hpmig_core::memory::{digest, host_page_size, DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, Cause, MigrateError, MigrationReport, Phase, SourceConfig};
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::{assert_guest_runs, assert_same_memory, pattern_memory};
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_core::vm::emulated::{heartbeat, EmulatedConfig, EmulatedGuest};
use hpmig_core::vm::{Guest, GuestError, Workload};

const MIB: usize = 1 << 20;

/// Two regions with a hole between them, a pattern on every third page.
fn source_memory() -> SourceMemory {
    pattern_memory(&[(0, 24 * MIB), (1 << 32, 4 * MIB)])
}

fn config(granularity: Granularity, workers: usize) -> SourceConfig {
    let mut cfg = SourceConfig::new(granularity);
    cfg.workers = workers;
    cfg.slot_size = 64 << 10;
    cfg.policy = Policy {
        downtime_target: Duration::from_millis(5),
        min_work_set: 64 << 10,
        max_rounds: 6,
        stall_rounds: 3,
        on_stall: OnStall::ForceStop,
    };
    cfg
}

struct Run {
    report: Result<MigrationReport, MigrateError>,
    dest: Result<Received, LandError>,
    dest_memory: DestMemory,
}

fn run(memory: &SourceMemory, guest: &mut dyn Guest, cfg: &SourceConfig, faults: Faults) -> Run {
    let layout = Layout::of(memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(faults);
    let dm = dest_memory.clone();
    let dest = thread::spawn(move || receive(&dm, &mut dst, &DestConfig::default()));
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let report = migrate(memory, &mut dirty, guest, &mut src, cfg, &mut |_| {});
    drop(src);
    let dest = dest.join().expect("destination thread");
    Run {
        report,
        dest,
        dest_memory,
    }
}

fn start(memory: &SourceMemory, workload: Workload, vcpus: u32) -> EmulatedGuest {
    EmulatedGuest::start(
        memory.clone(),
        EmulatedConfig {
            workload,
            vcpus,
            dirty_rate: None,
            seed: 42,
        },
    )
    .unwrap()
}

/// Migrates a running guest and checks the destination byte for byte.
fn migrate_running(
    workload: Workload,
    granularity: Granularity,
    workers: usize,
) -> MigrationReport {
    let memory = source_memory();
    let mut guest = start(&memory, workload, 2);
    thread::sleep(Duration::from_millis(30));
    let run = run(
        &memory,
        &mut guest,
        &config(granularity, workers),
        Faults::none(),
    );
    let report = run.report.expect("migration succeeds");
    let received = run.dest.expect("destination accepts");
    // The guest stays paused on the source after a successful migration.
    assert!(report.verified && received.verified);
    // SAFETY: the source guest is paused; the destination's landers are done.
    let (a, b) = unsafe { (digest(&memory), digest(&run.dest_memory)) };
    assert_eq!(
        a, b,
        "{workload:?}/{granularity:?}: destination memory differs"
    );
    // An independent check that does not trust the digest code.
    assert_same_memory(&memory, &run.dest_memory);
    // The guest goes on running on the destination, from its heartbeat.
    let before = heartbeat(&run.dest_memory, 0);
    assert_eq!(before, heartbeat(&memory, 0));
    assert!(before > 0, "the guest ran before migration");
    if workload != Workload::Idle {
        drop(guest);
        let resumed = EmulatedGuest::start(
            run.dest_memory.clone(),
            EmulatedConfig {
                workload,
                vcpus: 2,
                dirty_rate: None,
                seed: 7,
            },
        )
        .unwrap();
        let t = std::time::Instant::now();
        while heartbeat(&run.dest_memory, 0) <= before && t.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            heartbeat(&run.dest_memory, 0) > before,
            "heartbeat advances on the destination"
        );
        drop(resumed);
    }
    report
}

#[test]
fn every_workload_in_both_granularities_is_byte_exact() {
    for workload in Workload::ALL {
        for granularity in [Granularity::Page, Granularity::Segment] {
            let r = migrate_running(workload, granularity, 2);
            assert!(r.rounds.len() >= 2, "round 0 and a stop-and-copy round");
        }
    }
}

#[test]
fn one_and_four_workers_are_byte_exact() {
    migrate_running(Workload::Sparse, Granularity::Segment, 1);
    migrate_running(Workload::Sparse, Granularity::Segment, 4);
    migrate_running(Workload::Dense, Granularity::Page, 4);
}

#[test]
fn shadow_budget_is_byte_exact() {
    let memory = source_memory();
    let mut guest = start(&memory, Workload::Hotspot, 2);
    let mut cfg = config(Granularity::Segment, 2);
    cfg.shadow_budget = Some(16 * host_page_size() as u64);
    let run = run(&memory, &mut guest, &cfg, Faults::none());
    assert!(run.report.unwrap().verified);
    assert!(run.dest.unwrap().verified);
}

#[test]
fn a_refused_handshake_leaves_the_guest_running() {
    let memory = source_memory();
    let mut guest = start(&memory, Workload::Sparse, 1);
    let layout = Layout::of(&memory).unwrap();
    // A destination whose memory is smaller than the source's.
    let small = Layout::new(layout.page_size(), vec![layout.regions()[0]]).unwrap();
    let dest_memory: DestMemory = small.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let dest = thread::spawn(move || receive(&dest_memory, &mut dst, &DestConfig::default()));
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let err = migrate(
        &memory,
        &mut dirty,
        &mut guest,
        &mut src,
        &config(Granularity::Segment, 2),
        &mut |_| {},
    )
    .unwrap_err();
    match &err {
        MigrateError::Failed {
            phase: Phase::Handshake,
            cause: Cause::Peer(msg),
            ..
        } => {
            assert!(msg.contains("memory layout mismatch"), "{msg}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(dest.join().unwrap(), Err(LandError::Refused(_))));
    assert_guest_runs(&guest);
}

#[test]
fn a_cut_mid_round_fails_cleanly_and_a_retry_succeeds() {
    let memory = source_memory();
    let mut guest = start(&memory, Workload::Sparse, 2);
    let cfg = config(Granularity::Segment, 2);
    let run1 = run(&memory, &mut guest, &cfg, Faults::cut_after(3 * MIB as u64));
    let err = run1.report.unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::PreCopy,
                round: 0,
                ..
            }
        ),
        "cut in round 0: {err}"
    );
    assert!(
        run1.dest.is_err(),
        "the destination never completes a partial guest"
    );
    assert_guest_runs(&guest);

    let run2 = run(&memory, &mut guest, &cfg, Faults::none());
    assert!(run2.report.expect("retry").verified);
    // SAFETY: paused source, finished destination.
    unsafe { assert_eq!(digest(&memory), digest(&run2.dest_memory)) };
}

/// A guest whose pause cuts the connection: the failure lands exactly in
/// stop-and-copy, after the guest was paused.
struct CutOnPause {
    inner: EmulatedGuest,
    faults: Faults,
    resumed: u32,
}

impl Guest for CutOnPause {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.faults.cut_now();
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.resumed += 1;
        self.inner.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.inner.save_state()
    }
    fn vcpus(&self) -> u32 {
        self.inner.vcpus()
    }
}

#[test]
fn a_cut_during_stop_and_copy_resumes_the_paused_guest() {
    let memory = source_memory();
    let faults = Faults::none();
    let mut guest = CutOnPause {
        inner: start(&memory, Workload::Hotspot, 1),
        faults: faults.clone(),
        resumed: 0,
    };
    let run = run(
        &memory,
        &mut guest,
        &config(Granularity::Segment, 2),
        faults,
    );
    let err = run.report.unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::StopAndCopy,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(guest.resumed, 1, "the paused guest was resumed");
    assert!(run.dest.is_err());
    assert_guest_runs(&guest.inner);
}

#[test]
fn zstd_on_and_auto_are_byte_exact_and_on_compresses() {
    use hpmig_core::segment::compress::ZstdMode;
    for (mode, granularity) in [
        (ZstdMode::On, Granularity::Page),
        (ZstdMode::On, Granularity::Segment),
        (ZstdMode::Auto, Granularity::Page),
    ] {
        let memory = source_memory();
        let mut guest = start(&memory, Workload::Dense, 1);
        let mut cfg = config(granularity, 2);
        cfg.zstd = mode;
        // A cap makes `auto` see a link slower than compression.
        cfg.bandwidth = Some(400 << 20);
        let run = run(&memory, &mut guest, &cfg, Faults::none());
        let report = run.report.unwrap();
        assert!(
            report.verified && run.dest.as_ref().unwrap().verified,
            "{mode:?}"
        );
        let zstd_pages: u64 = report.rounds.iter().map(|r| r.stats.zstd_pages).sum();
        assert!(
            zstd_pages > 0,
            "{mode:?}/{granularity:?}: no page went compressed"
        );
        assert_eq!(run.dest.unwrap().stats.zstd_pages, zstd_pages);
    }
}

#[test]
fn a_wrong_token_is_refused_before_anything_is_sent() {
    use hpmig_core::auth::Secret;
    let memory = source_memory();
    let mut guest = start(&memory, Workload::Sparse, 1);
    let layout = Layout::of(&memory).unwrap();
    for (src_token, dst_token) in [
        (&b"right"[..], &b"wrong"[..]),
        (&b""[..], &b"right"[..]),
        (&b"right"[..], &b""[..]),
    ] {
        let dest_memory: DestMemory = layout.allocate().unwrap();
        let (mut src, mut dst) = pair(Faults::none());
        let dcfg = DestConfig {
            secret: Secret::from_token(dst_token),
            ..DestConfig::default()
        };
        let dest = thread::spawn(move || receive(&dest_memory, &mut dst, &dcfg));
        let mut cfg = config(Granularity::Segment, 2);
        cfg.secret = Secret::from_token(src_token);
        let mut dirty = VmmBitmap::new(memory.clone(), layout.clone()).unwrap();
        let err =
            migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {}).unwrap_err();
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
        let derr = dest.join().unwrap().unwrap_err();
        // A token mismatch is found by whichever end checks first.
        assert!(
            matches!(derr, LandError::Auth)
                || matches!(
                    err,
                    MigrateError::Failed {
                        cause: Cause::Auth,
                        ..
                    }
                ),
            "{derr} / {err}"
        );
        assert_guest_runs(&guest);
    }
}

/// A guest whose State record announces one vCPU more than it carries.
struct Miscounted(EmulatedGuest);

impl Guest for Miscounted {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.0.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.0.save_state()
    }
    fn vcpus(&self) -> u32 {
        self.0.vcpus() + 1
    }
}

#[test]
fn a_state_record_for_the_wrong_vcpu_count_is_refused_and_the_source_resumes() {
    let memory = source_memory();
    let mut guest = Miscounted(start(&memory, Workload::Sparse, 1));
    let run = run(
        &memory,
        &mut guest,
        &config(Granularity::Segment, 2),
        Faults::none(),
    );
    let err = run.report.unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::Acknowledge,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("announces 2 vCPUs but carries 1"),
        "{err}"
    );
    assert!(matches!(run.dest, Err(LandError::BadState(_))));
    assert_guest_runs(&guest.0);
}
