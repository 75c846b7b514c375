//! The engine's live view ([`hpmig_core::precopy::live`]) on a real
//! migration over the in-process wire: the bytes it publishes by kind add
//! up to the wire bytes of every round and of the report, and a cancel
//! from another thread ends the migration with the guest running here and
//! the destination told.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::land::{receive, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::live::{CancelAnswer, Stage};
use hpmig_core::precopy::{migrate, MigrateError};
use hpmig_core::protocol::Granularity;
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::{pattern_memory, LandedScribbler, Scribbler};
use hpmig_core::transport::inproc::{pair, Faults, InProcSource};

fn memory() -> SourceMemory {
    pattern_memory(&[(0, 4 << 20)])
}

/// A 4 MiB guest writing 50,000 times a second, its dirty log, and a
/// destination landing it over the in-process wire on a thread of its own.
struct Run {
    memory: SourceMemory,
    guest: Scribbler,
    dirty: VmmBitmap,
    src: InProcSource,
    dest: thread::JoinHandle<Result<Received, LandError>>,
}

impl Run {
    fn start() -> Run {
        let memory = memory();
        let guest = Scribbler::start(memory.clone(), 1, Some(50_000));
        let layout = Layout::of(&memory).unwrap();
        let dest_memory: DestMemory = layout.allocate().unwrap();
        let (src, mut dst) = pair(Faults::none());
        let dest = thread::spawn(move || {
            let cfg = DestConfig {
                memory_zeroed: true,
                ..DestConfig::default()
            };
            receive(&dest_memory, &mut dst, &cfg, &mut LandedScribbler::new())
        });
        let dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
        Run {
            memory,
            guest,
            dirty,
            src,
            dest,
        }
    }
}

#[test]
fn the_bytes_published_by_kind_add_up_to_the_wire_bytes() {
    for (granularity, zstd) in [
        (Granularity::Segment, ZstdMode::Off),
        (Granularity::Segment, ZstdMode::On),
        (Granularity::Page, ZstdMode::Off),
    ] {
        let Run {
            memory,
            mut guest,
            mut dirty,
            mut src,
            dest,
        } = Run::start();
        let mut cfg = config(granularity, 2);
        cfg.zstd = zstd;
        let live = Arc::clone(&cfg.live);
        let report = migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {})
            .unwrap_or_else(|e| panic!("{granularity:?} {zstd:?}: {e}"));
        drop(src);
        dest.join().unwrap().unwrap();
        for r in &report.rounds {
            assert_eq!(
                r.stats.bytes.total(),
                r.stats.wire_bytes,
                "{granularity:?} {zstd:?} round {}: {:?}",
                r.metrics.round,
                r.stats.bytes
            );
        }
        let st = live.status();
        assert_eq!(st.stage, Stage::Migrated);
        assert_eq!(st.bytes.total(), report.wire_bytes, "{st:?}");
        assert_eq!(st.streams.len(), 2);
        assert!(st.bytes.headers > 0);
        match (granularity, zstd) {
            (Granularity::Segment, ZstdMode::On) => assert!(st.bytes.zstd > 0, "{st:?}"),
            (Granularity::Segment, _) => assert!(st.bytes.segment > 0, "{st:?}"),
            _ => assert_eq!(st.bytes.segment, 0, "{st:?}"),
        }
        assert!(st.ended.is_some());
        assert_eq!(live.cancel(), CancelAnswer::TooLate(Stage::Migrated));
    }
}

#[test]
fn a_cancel_mid_round_resumes_the_guest_here_and_tells_the_destination() {
    let Run {
        memory,
        mut guest,
        mut dirty,
        mut src,
        dest,
    } = Run::start();
    let mut cfg = config(Granularity::Segment, 2);
    // 4 MiB at 1 MB/s: round 0 runs for seconds.
    cfg.bandwidth = Some(1_000_000);
    let live = Arc::clone(&cfg.live);
    let canceller = thread::spawn(move || {
        let t = Instant::now();
        while live.status().bytes.total() < 200_000 && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(10));
        }
        let answer = live.cancel();
        (answer, Instant::now(), live)
    });
    let result = migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {});
    let ended = Instant::now();
    let (answer, asked, live) = canceller.join().unwrap();
    assert_eq!(answer, CancelAnswer::Accepted);
    assert!(
        matches!(result, Err(MigrateError::Cancelled { round: 0, .. })),
        "{result:?}"
    );
    assert!(
        ended - asked < Duration::from_secs(1),
        "the cancel took {:?}",
        ended - asked
    );
    assert_eq!(live.stage(), Stage::Cancelled);
    let w = guest.writes();
    thread::sleep(Duration::from_millis(100));
    assert!(guest.writes() > w, "the guest runs on at the source");
    drop(src);
    assert!(dest.join().unwrap().is_err(), "the destination discards");
}

#[test]
fn a_cancel_after_the_ack_aborts_the_held_copy_and_resumes_the_guest_here() {
    let Run {
        memory,
        mut guest,
        mut dirty,
        mut src,
        dest,
    } = Run::start();
    let mut cfg = config(Granularity::Segment, 2);
    // The guest stays paused a second between the Ack and the Commit.
    cfg.delay_commit = Duration::from_secs(1);
    let live = Arc::clone(&cfg.live);
    let canceller = thread::spawn(move || {
        let t = Instant::now();
        while live.stage() != Stage::SwitchOver && t.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(5));
        }
        // Past the Ack (it comes within milliseconds here), before the Commit.
        thread::sleep(Duration::from_millis(300));
        (live.cancel(), live)
    });
    let result = migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {});
    let (answer, live) = canceller.join().unwrap();
    assert_eq!(answer, CancelAnswer::Accepted);
    assert!(
        matches!(result, Err(MigrateError::Cancelled { .. })),
        "{result:?}"
    );
    assert_eq!(live.stage(), Stage::Cancelled);
    let w = guest.writes();
    thread::sleep(Duration::from_millis(100));
    assert!(guest.writes() > w, "the guest runs on at the source");
    drop(src);
    assert!(
        matches!(
            dest.join().unwrap(),
            Err(hpmig_core::land::LandError::Aborted)
        ),
        "the destination discards the copy it held"
    );
}
