//! `--shadow fingerprint` (hpmig_core::segment::fingerprint) on the
//! in-process wire: migrations of a writing guest land byte for byte; and a
//! block whose fingerprint misses a change (the test hook standing in for a
//! hash collision) is refused before the destination runs the guest, by
//! `--verify strict` and by `--verify incremental`, whose ledger hashes the
//! pages' bytes under its own key, never the fingerprints.

#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::Duration;

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::land::{receive, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{
    migrate, Cause, MigrateError, MigrationReport, Phase, RoundReport, ShadowMode, SourceConfig,
};
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::{assert_same_memory, pattern_memory, LandedScribbler, Scribbler};
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_core::verify::VerifyMode;
use hpmig_core::vm_memory::{Bytes, GuestAddress};

const MIB: usize = 1 << 20;

/// A policy that runs `rounds` pre-copy rounds, then stops and copies.
fn rounds(cfg: &mut SourceConfig, rounds: u32) {
    cfg.policy = Policy {
        downtime_target: Duration::ZERO,
        min_work_set: 0,
        max_rounds: rounds,
        stall_rounds: 100,
        on_stall: OnStall::ForceStop,
        switchover_cost: Duration::ZERO,
        ..Policy::default()
    };
}

fn run(
    memory: &SourceMemory,
    guest: &mut Scribbler,
    cfg: &SourceConfig,
    on_round: &mut dyn FnMut(&RoundReport),
) -> (
    Result<MigrationReport, MigrateError>,
    Result<Received, LandError>,
    DestMemory,
) {
    let layout = Layout::of(memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let dm = dest_memory.clone();
    let dest = thread::spawn(move || {
        let cfg = DestConfig {
            memory_zeroed: true,
            ..DestConfig::default()
        };
        receive(&dm, &mut dst, &cfg, &mut LandedScribbler::new())
    });
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let report = migrate(memory, &mut dirty, guest, &mut src, cfg, on_round);
    drop(src);
    (report, dest.join().unwrap(), dest_memory)
}

#[test]
fn fingerprints_land_a_writing_guest_byte_for_byte() {
    // (workers, vCPUs, writes per second; None: as fast as they go)
    for (workers, vcpus, rate) in [(1, 1, Some(50_000)), (2, 2, None), (4, 2, Some(400_000))] {
        let memory = pattern_memory(&[(0, 6 * MIB), (1 << 32, MIB)]);
        let mut guest = Scribbler::start(memory.clone(), vcpus, rate);
        thread::sleep(Duration::from_millis(10));
        let mut cfg = config(Granularity::Segment, workers);
        cfg.shadow = ShadowMode::Fingerprint;
        rounds(&mut cfg, 4);
        // Between rounds, also a write of the bytes a page already holds
        // (dirty, unchanged: nothing to send) and one of new bytes in a
        // page's last block.
        let m = memory.clone();
        let mut poke = |r: &RoundReport| {
            if r.last {
                return;
            }
            let mut same = [0u8; 64];
            m.read_slice(&mut same, GuestAddress(0x4_0000)).unwrap();
            m.write_slice(&same, GuestAddress(0x4_0000)).unwrap();
            let fill = [r.metrics.round as u8 + 1; 24];
            m.write_slice(&fill, GuestAddress(0x5_0fe0)).unwrap();
        };
        let (report, dest, dm) = run(&memory, &mut guest, &cfg, &mut poke);
        let report = report.unwrap_or_else(|e| panic!("{workers} workers: {e}"));
        assert!(
            dest.is_ok() && report.verified,
            "{workers} workers: {dest:?}"
        );
        assert_same_memory(&memory, &dm);
        let check = report.sent.as_ref().unwrap().check(&memory);
        assert_eq!(check.pages_differ, 0, "{check:?}");
        let later = report.rounds.iter().skip(1);
        let segments: u64 = later.map(|r| r.stats.segments).sum();
        assert!(
            segments > 0,
            "{workers} workers: block segments after round 0"
        );
        drop(guest);
    }
}

/// The byte the test hook's collision hides: in a page that holds a
/// pattern from round 0 (every third page does), in its first block.
const BLIND: u64 = 0x3_1008;

/// After round 0, a tracked write into the blind block: the page is dirty
/// and hashed, but the block's fingerprint reports "unchanged".
fn write_blind(memory: &SourceMemory) -> impl FnMut(&RoundReport) + '_ {
    move |r: &RoundReport| {
        if r.metrics.round == 0 && !r.last {
            memory.write_slice(&[0x5a; 8], GuestAddress(BLIND)).unwrap();
        }
    }
}

fn blind_config(verify: VerifyMode) -> SourceConfig {
    let mut cfg = config(Granularity::Segment, 2);
    cfg.shadow = ShadowMode::Fingerprint;
    cfg.fingerprint_blind = Some(BLIND);
    cfg.verify = verify;
    rounds(&mut cfg, 3);
    cfg
}

#[test]
fn a_change_the_fingerprints_miss_is_refused_before_the_destination_runs() {
    for verify in [VerifyMode::Strict, VerifyMode::Incremental] {
        let m = pattern_memory(&[(0, MIB)]);
        let mut guest = Scribbler::start_parked(m.clone(), 1, None);
        let (report, dest, _) = run(&m, &mut guest, &blind_config(verify), &mut write_blind(&m));
        let err = report.expect_err("refused");
        assert!(
            matches!(
                err,
                MigrateError::Failed {
                    cause: Cause::Peer(_),
                    ..
                }
            ),
            "{verify:?}: {err}"
        );
        assert!(
            matches!(dest, Err(LandError::DigestMismatch)),
            "{verify:?}: refused before the Ack: {dest:?}"
        );
    }
    // Unverified, the same collision goes through: the hook did hide the
    // write, and only the verification stood in its way.
    let m = pattern_memory(&[(0, MIB)]);
    let mut guest = Scribbler::start_parked(m.clone(), 1, None);
    let cfg = blind_config(VerifyMode::Off);
    let (report, dest, dm) = run(&m, &mut guest, &cfg, &mut write_blind(&m));
    assert!(report.is_ok() && dest.is_ok(), "unverified");
    let mut byte = [0u8; 1];
    dm.read_slice(&mut byte, GuestAddress(BLIND)).unwrap();
    assert_ne!(byte[0], 0x5a, "the destination lacks the hidden write");
}

#[test]
fn a_shadow_budget_with_fingerprints_is_refused_at_setup() {
    let m = pattern_memory(&[(0, MIB)]);
    let mut guest = Scribbler::start_parked(m.clone(), 1, None);
    let mut cfg = config(Granularity::Segment, 1);
    cfg.shadow = ShadowMode::Fingerprint;
    cfg.shadow_budget = Some(1 << 16);
    let (report, _, _) = run(&m, &mut guest, &cfg, &mut |_| {});
    assert!(
        matches!(
            report,
            Err(MigrateError::Failed {
                phase: Phase::Setup,
                ..
            })
        ),
        "{report:?}"
    );
}

/// Pages that stay zero from round 0 on are "unchanged" to their (zero)
/// fingerprints and get no record: both ledgers must leave them at 0.
#[test]
fn a_still_guest_with_zero_pages_verifies_incrementally() {
    let m = pattern_memory(&[(0, MIB)]);
    let mut guest = Scribbler::start_parked(m.clone(), 1, None);
    let mut cfg = config(Granularity::Segment, 2);
    cfg.shadow = ShadowMode::Fingerprint;
    rounds(&mut cfg, 3);
    let (report, dest, dm) = run(&m, &mut guest, &cfg, &mut |_| {});
    let report = report.unwrap();
    assert!(dest.is_ok() && report.verified);
    assert!(report.rounds[0].stats.unchanged_pages > 0, "zero pages");
    assert_same_memory(&m, &dm);
    let check = report.sent.as_ref().unwrap().check(&m);
    assert_eq!(check.pages_differ, 0, "{check:?}");
}
