//! The KVM micro-VM: boots at CPL3, runs every workload, and migrates while
//! running with every dirty-log mode, byte for byte, its heartbeat moving on
//! at the destination. Where /dev/kvm is missing these tests say so and pass,
//! unless HPMIG_REQUIRE_KVM=1 (as ci/test.sh sets wherever /dev/kvm exists),
//! under which a missing /dev/kvm fails them.

#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::dirty::Combined;
use hpmig_core::guest::{DestGuest, GuestError};
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, MigrateError, Phase, SourceConfig};
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::assert_same_memory;
use hpmig_core::transport::inproc::{pair, Faults};
use hpmig_core::vm_memory;
use hpmig_microvm::kvm::{available, heartbeat, memory_ranges, KvmConfig, KvmVm};
use hpmig_microvm::{Arrival, Workload};

const MIB: u64 = 1 << 20;

fn kvm_or_skip() -> bool {
    if available() {
        return true;
    }
    assert!(
        std::env::var("HPMIG_REQUIRE_KVM").as_deref() != Ok("1"),
        "HPMIG_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
    );
    eprintln!("skipped: /dev/kvm is not available");
    false
}

fn boot(
    bytes: u64,
    workload: Workload,
    vcpus: u32,
    dirty_log: DirtyLogMode,
) -> KvmVm<vm_memory::bitmap::AtomicBitmap> {
    let memory = SourceMemory::from_ranges(&memory_ranges(bytes).unwrap()).unwrap();
    KvmVm::boot(
        memory,
        KvmConfig {
            workload,
            vcpus,
            dirty_rate: None,
            seed: 3,
            dirty_log,
        },
    )
    .unwrap()
}

fn wait_for_heartbeat<B: vm_memory::bitmap::Bitmap + 'static>(
    memory: &vm_memory::GuestMemoryMmap<B>,
    vcpu: u32,
    above: u64,
) -> u64 {
    let t = Instant::now();
    while heartbeat(memory, vcpu) <= above && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(2));
    }
    heartbeat(memory, vcpu)
}

#[test]
fn every_workload_runs_at_cpl3() {
    if !kvm_or_skip() {
        return;
    }
    for w in Workload::ALL {
        let vm = boot(16 * MIB, w, 1, DirtyLogMode::Bitmap);
        let hb = wait_for_heartbeat(vm.memory(), 0, 3);
        assert!(hb > 3, "{w:?}: heartbeat {hb}, failure {:?}", vm.failure());
        if w != Workload::Idle {
            // The heartbeat counts stores; the VMM counts a batch's writes
            // when the batch rings its doorbell.
            let t = Instant::now();
            while vm.writes() == 0 && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(vm.writes() > 0, "{w:?} wrote nothing");
        }
    }
}

/// The destination's memory is fresh from `Layout::allocate`: zero.
fn fresh() -> DestConfig {
    DestConfig {
        memory_zeroed: true,
        ..DestConfig::default()
    }
}

fn config(granularity: Granularity) -> SourceConfig {
    let mut cfg = SourceConfig::new(granularity);
    cfg.workers = 2;
    cfg.policy = Policy {
        downtime_target: Duration::from_millis(20),
        min_work_set: 256 << 10,
        max_rounds: 8,
        stall_rounds: 3,
        on_stall: OnStall::ForceStop,
        // Transports are under test, not the controller's estimate of the
        // switch-over's fixed cost: rounds run as the target alone says.
        switchover_cost: Duration::ZERO,
        ..Policy::default()
    };
    cfg
}

/// The destination's micro-VM, compared byte for byte with the paused
/// source in the one moment between the Commit and its start.
struct Checked {
    inner: Arrival,
    source: SourceMemory,
    dest: DestMemory,
    heartbeats: Vec<u64>,
}

impl DestGuest for Checked {
    fn restore(&mut self, memory: &DestMemory, vcpus: u32, state: &[u8]) -> Result<(), GuestError> {
        self.inner.restore(memory, vcpus, state)
    }
    fn start(&mut self) -> Result<(), GuestError> {
        // The source sent its Commit: its guest is paused for good.
        assert_same_memory(&self.source, &self.dest);
        self.heartbeats = (0..4).map(|v| heartbeat(&self.dest, v)).collect();
        self.inner.start()
    }
    fn discard(&mut self) {
        self.inner.discard()
    }
}

/// Migrates a running micro-VM through the in-process transport, checks the
/// destination byte for byte, then runs it there and watches its heartbeat.
fn migrate_running(
    bytes: u64,
    workload: Workload,
    vcpus: u32,
    mode: DirtyLogMode,
    granularity: Granularity,
) {
    let mut vm = boot(bytes, workload, vcpus, mode);
    let memory = vm.memory().clone();
    wait_for_heartbeat(&memory, 0, 2);
    let layout = Layout::of(&memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let mut checked = Checked {
        inner: Arrival::new(),
        source: memory.clone(),
        dest: dest_memory.clone(),
        heartbeats: Vec::new(),
    };
    let dm = dest_memory.clone();
    let dest =
        thread::spawn(move || receive(&dm, &mut dst, &fresh(), &mut checked).map(|r| (r, checked)));
    let mut dirty = Combined(
        vm.take_dirty_log().unwrap(),
        VmmBitmap::new(memory.clone(), layout).unwrap(),
    );
    let report = migrate(
        &memory,
        &mut dirty,
        &mut vm,
        &mut src,
        &config(granularity),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{workload:?}/{mode:?}: {e} (vCPU: {:?})", vm.failure()));
    let (received, checked) = dest.join().unwrap().unwrap();
    assert!(report.verified && received.verified);
    let before: Vec<u64> = (0..vcpus).map(|v| heartbeat(&memory, v)).collect();
    assert_eq!(
        before[..],
        checked.heartbeats[..vcpus as usize],
        "heartbeats arrived"
    );
    drop(vm);
    let resumed = checked.inner.running().expect("started after the Commit");
    for (v, &b) in before.iter().enumerate() {
        let after = wait_for_heartbeat(&dest_memory, v as u32, b);
        assert!(
            after > b,
            "{workload:?}/{mode:?}: vCPU {v} heartbeat stuck at {b} on the destination ({:?})",
            resumed.failure()
        );
    }
}

#[test]
fn every_workload_with_every_dirty_log_migrates_byte_exact() {
    if !kvm_or_skip() {
        return;
    }
    for mode in DirtyLogMode::ALL {
        for workload in Workload::ALL {
            migrate_running(64 * MIB, workload, 1, mode, Granularity::Segment);
        }
    }
}

#[test]
fn page_granularity_migrates_byte_exact() {
    if !kvm_or_skip() {
        return;
    }
    migrate_running(
        64 * MIB,
        Workload::Sparse,
        1,
        DirtyLogMode::Bitmap,
        Granularity::Page,
    );
    migrate_running(
        64 * MIB,
        Workload::Dense,
        1,
        DirtyLogMode::Clear,
        Granularity::Page,
    );
}

#[test]
fn two_vcpus_migrate_byte_exact() {
    if !kvm_or_skip() {
        return;
    }
    migrate_running(
        64 * MIB,
        Workload::Sparse,
        2,
        DirtyLogMode::Ring,
        Granularity::Segment,
    );
    migrate_running(
        64 * MIB,
        Workload::Aba,
        2,
        DirtyLogMode::Clear,
        Granularity::Segment,
    );
}

#[test]
fn a_one_gib_guest_in_several_slots_migrates_byte_exact() {
    if !kvm_or_skip() {
        return;
    }
    migrate_running(
        1024 * MIB + 64 * MIB,
        Workload::Sparse,
        1,
        DirtyLogMode::Bitmap,
        Granularity::Segment,
    );
}

#[test]
fn a_pause_that_fails_after_vcpu_0_stopped_leaves_every_vcpu_running() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = boot(64 * MIB, Workload::Sparse, 2, DirtyLogMode::Bitmap);
    vm.fail_pause_after = Some(1);
    let memory = vm.memory().clone();
    wait_for_heartbeat(&memory, 1, 2);
    let layout = Layout::of(&memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let dm = dest_memory.clone();
    let dest =
        thread::spawn(move || receive(&dm, &mut dst, &fresh(), &mut Arrival::new()).map(|_| ()));
    let mut dirty = Combined(
        vm.take_dirty_log().unwrap(),
        VmmBitmap::new(memory.clone(), layout).unwrap(),
    );
    let err = migrate(
        &memory,
        &mut dirty,
        &mut vm,
        &mut src,
        &config(Granularity::Segment),
        &mut |_| {},
    )
    .unwrap_err();
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
    drop(src);
    assert!(
        dest.join().unwrap().is_err(),
        "the destination keeps nothing"
    );
    for v in 0..2 {
        let b = heartbeat(&memory, v);
        let after = wait_for_heartbeat(&memory, v, b);
        assert!(after > b, "vCPU {v} stuck at {b} after the failed pause");
    }
}

/// Ring mode: once logging started, a vCPU whose ring fills must not wait
/// for the next round's harvest (the reaper empties the rings): with no
/// harvest at all for seconds, the guest writes on, far past what one ring
/// holds. Without a reaper it stops after about RING_ENTRIES new pages.
#[test]
fn with_the_dirty_ring_the_guest_writes_on_between_harvests() {
    use hpmig_core::dirty::kvm::RING_ENTRIES;
    use hpmig_core::dirty::{DirtyBitmap, DirtySource};
    if !kvm_or_skip() {
        return;
    }
    // 1 GiB: 262,144 pages, four rings' worth of distinct pages.
    let mut vm = boot(1024 * MIB, Workload::Sparse, 1, DirtyLogMode::Ring);
    let layout = Layout::of(vm.memory()).unwrap();
    let mut log = vm.take_dirty_log().unwrap();
    let mut bits = DirtyBitmap::new(&layout);
    log.harvest(&mut bits).unwrap(); // logging starts here
    let w0 = vm.writes();
    let target = w0 + 4 * u64::from(RING_ENTRIES);
    let t = Instant::now();
    while vm.writes() < target && t.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        vm.writes() >= target,
        "the guest stalled: {} writes in {:?} with no harvest",
        vm.writes() - w0,
        t.elapsed()
    );
    // Nothing reaped is lost: the next harvest has the pages written.
    bits.clear();
    log.harvest(&mut bits).unwrap();
    assert!(bits.count() > u64::from(RING_ENTRIES), "{}", bits.count());
}
