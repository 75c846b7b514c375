//! The emulated guest's workloads through the engine (in-process
//! transport): every workload in both granularities, and 1 and 4 workers,
//! land byte for byte while the guest's vCPU threads keep writing, and the
//! guest runs on at the destination from its heartbeat.

#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::guest::{DestGuest, GuestError};
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::{migrate, MigrationReport};
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::{assert_same_memory, pattern_memory};
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_microvm::emulated::{heartbeat, EmulatedConfig, EmulatedGuest};
use hpmig_microvm::{Arrival, Workload};

const MIB: usize = 1 << 20;

/// The destination's guest, compared with the paused source right before
/// it starts.
struct Checked {
    inner: Arrival,
    source: SourceMemory,
    dest: DestMemory,
}

impl DestGuest for Checked {
    fn restore(&mut self, memory: &DestMemory, vcpus: u32, state: &[u8]) -> Result<(), GuestError> {
        self.inner.restore(memory, vcpus, state)
    }
    fn start(&mut self) -> Result<(), GuestError> {
        assert_same_memory(&self.source, &self.dest);
        self.inner.start()
    }
    fn discard(&mut self) {
        self.inner.discard()
    }
}

fn migrate_running(
    workload: Workload,
    granularity: Granularity,
    workers: usize,
) -> MigrationReport {
    let memory = pattern_memory(&[(0, 24 * MIB), (1 << 32, 4 * MIB)]);
    let mut guest = EmulatedGuest::start(
        memory.clone(),
        EmulatedConfig {
            workload,
            vcpus: 2,
            dirty_rate: None,
            seed: 42,
        },
    )
    .unwrap();
    thread::sleep(Duration::from_millis(30));
    let layout = Layout::of(&memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let mut checked = Checked {
        inner: Arrival::new(),
        source: memory.clone(),
        dest: dest_memory.clone(),
    };
    let dm = dest_memory.clone();
    let dest = thread::spawn(move || {
        receive(&dm, &mut dst, &DestConfig::default(), &mut checked).map(|r| (r, checked))
    });
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let report = migrate(
        &memory,
        &mut dirty,
        &mut guest,
        &mut src,
        &config(granularity, workers),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{workload:?}/{granularity:?}: {e}"));
    let (received, checked) = dest.join().unwrap().unwrap();
    assert!(report.verified && received.verified);
    let before = heartbeat(&memory, 0);
    assert!(before > 0, "the guest ran before migration");
    drop(guest);
    if workload != Workload::Idle {
        let t = Instant::now();
        while heartbeat(&dest_memory, 0) <= before && t.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            heartbeat(&dest_memory, 0) > before,
            "{workload:?}: the heartbeat advances on the destination"
        );
    }
    drop(checked);
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
