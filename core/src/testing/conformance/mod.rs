//! The transport conformance suite: what every transport must pass, run by
//! the in-process, TCP and RDMA transports alike. A transport's test file
//! implements [`Wire`] (how its two ends are made, and how its link is cut)
//! and expands [`crate::conformance_suite!`], one `#[test]` per check:
//!
//! - byte-exact: a guest written by its vCPUs while it moves lands byte for
//!   byte (1, 2 and 4 streams, page and segment granularity, two regions
//!   with a hole), zstd on and auto, a bounded shadow, block fingerprints
//!   instead of a shadow, and the guest runs on at the destination from its
//!   heartbeats;
//! - ordering: pages rewritten in every one of several rounds end with their
//!   last bytes (each page's records travel on one ordered stream), and
//!   pages rewritten at scattered words go as Words records (a version 3
//!   source: as segments);
//! - failure: a link cut in round 0 fails both ends with the guest running
//!   on at the source, and a retry succeeds; a cut during stop-and-copy
//!   resumes the paused guest; a pause that fails halfway is undone;
//! - hostile input: a wrong token, a layout that differs and a state record
//!   that does not fit are refused before the Ack, the guest running on at
//!   the source.
//!
//! Every check compares memories with [`super::assert_same_memory`], which
//! does not trust the digest code.

mod checks;

use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{
    assert_guest_runs, assert_same_memory, heartbeat, pattern_memory, LandedScribbler, Scribbler,
};
use crate::dirty::vmm::VmmBitmap;
use crate::guest::Guest;
use crate::land::{accept, receive, receive_accepted, DestConfig, LandError, Received};
use crate::memory::{DestMemory, Layout, SourceMemory};
use crate::precopy::controller::{OnStall, Policy};
use crate::precopy::{migrate, MigrateError, MigrationReport, Phase, SourceConfig};
use crate::protocol::Granularity;
use crate::ring::RingShape;
use crate::transport::{DestTransport, SourceTransport, TransportError};

const MIB: usize = 1 << 20;

pub use checks::*;

/// The two ends of one migration's link, not yet connected.
pub struct Link<S, D> {
    /// Makes the destination's end; runs in the destination's thread and
    /// blocks until the source connects.
    pub dest: Box<dyn FnOnce() -> Result<D, TransportError> + Send>,
    /// Makes the source's end.
    pub source: Box<dyn FnOnce() -> Result<S, TransportError> + Send>,
    /// Breaks the link now: every stream and the control exchange.
    pub cut: Box<dyn Fn() + Send + Sync>,
}

impl<S, D> std::fmt::Debug for Link<S, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

/// A transport under test.
pub trait Wire: Sync {
    type Src: SourceTransport;
    type Dst: DestTransport + 'static;
    /// A fresh link; with `cut_after`, it breaks once that many data bytes
    /// crossed towards the destination.
    fn link(&self, cut_after: Option<u64>) -> Link<Self::Src, Self::Dst>;
    /// Guest memory of the suite's migrations, MiB (smaller on slow wires).
    fn memory_mib(&self) -> usize {
        28
    }
    /// False where the transport cannot run here (no device); the suite's
    /// tests then return at once, after the wire said why.
    fn available(&self) -> bool {
        true
    }
}

/// The policy of the suite: a few rounds, then stop.
pub fn config(granularity: Granularity, workers: usize) -> SourceConfig {
    let mut cfg = SourceConfig::new(granularity);
    cfg.workers = workers;
    cfg.ring = Some(RingShape {
        slots: 8,
        slot_size: 64 << 10,
    });
    cfg.policy = Policy {
        downtime_target: Duration::from_millis(5),
        min_work_set: 64 << 10,
        max_rounds: 6,
        stall_rounds: 3,
        on_stall: OnStall::ForceStop,
        // Transports are under test, not the controller's estimate of the
        // switch-over's fixed cost: rounds run as the target alone says.
        switchover_cost: Duration::ZERO,
        ..Policy::default()
    };
    cfg
}

/// Two regions with a hole between them, a pattern on every third page.
pub(super) fn source_memory<W: Wire>(w: &W) -> SourceMemory {
    let mib = w.memory_mib();
    pattern_memory(&[
        (0, (mib - mib / 7) * MIB),
        (1 << 32, (mib / 7).max(1) * MIB),
    ])
}

/// Where the destination's memory comes from.
pub(super) enum DestSide {
    /// Allocated after the handshake from the Hello's layout, as `hpmig
    /// dest` does.
    FromHello(DestConfig),
    /// As `FromHello`, on a host that runs guests of at most this many vCPUs.
    Hosting(DestConfig, u32),
    /// Given before the handshake (its layout must match).
    Fixed(DestMemory, DestConfig),
}

/// What the destination thread ends with.
pub(super) struct Landed {
    pub(super) result: Result<Received, LandError>,
    pub(super) memory: Option<DestMemory>,
    pub(super) guest: Option<LandedScribbler>,
}

fn destination<W: Wire>(
    dest: Box<dyn FnOnce() -> Result<W::Dst, TransportError> + Send>,
    side: DestSide,
) -> JoinHandle<Landed> {
    thread::spawn(move || {
        let failed = |e: LandError| Landed {
            result: Err(e),
            memory: None,
            guest: None,
        };
        let mut t = match dest() {
            Ok(t) => t,
            Err(e) => return failed(LandError::Control(e)),
        };
        let (memory, result, guest) = match side {
            DestSide::FromHello(_) | DestSide::Hosting(..) => {
                let mut guest = LandedScribbler::new();
                let cfg = match side {
                    DestSide::Hosting(cfg, max) => {
                        guest.max_vcpus = Some(max);
                        cfg
                    }
                    DestSide::FromHello(cfg) | DestSide::Fixed(_, cfg) => cfg,
                };
                let accepted = match accept(&mut t, &cfg, None, &mut guest) {
                    Ok(a) => a,
                    Err(e) => return failed(e),
                };
                let memory: DestMemory = match accepted.hello.layout.allocate() {
                    Ok(m) => m,
                    Err(e) => {
                        return failed(LandError::Control(TransportError::Other(e.to_string())))
                    }
                };
                let r = receive_accepted(&accepted, &memory, &mut t, &cfg, &mut guest);
                (memory, r, guest)
            }
            DestSide::Fixed(memory, cfg) => {
                let mut guest = LandedScribbler::new();
                let r = receive(&memory, &mut t, &cfg, &mut guest);
                (memory, r, guest)
            }
        };
        Landed {
            result,
            memory: Some(memory),
            guest: Some(guest),
        }
    })
}

/// One migration through a wire.
pub(super) struct Run {
    pub(super) report: Result<MigrationReport, MigrateError>,
    pub(super) dest: Landed,
}

pub(super) fn run_with<W: Wire>(
    w: &W,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
    side: DestSide,
    link: Link<W::Src, W::Dst>,
) -> Run {
    run_hooked(w, memory, guest, cfg, side, link, &mut |_| {})
}

pub(super) fn run_hooked<W: Wire>(
    w: &W,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
    side: DestSide,
    link: Link<W::Src, W::Dst>,
    on_round: &mut dyn FnMut(&crate::precopy::RoundReport),
) -> Run {
    let dest = destination::<W>(link.dest, side);
    let report = match (link.source)() {
        Ok(mut t) => {
            let layout = Layout::of(memory).expect("layout");
            let mut dirty = VmmBitmap::new(memory.clone(), layout).expect("dirty bitmap");
            migrate(memory, &mut dirty, guest, &mut t, cfg, on_round)
        }
        Err(e) => Err(MigrateError::Failed {
            phase: Phase::Setup,
            round: 0,
            cause: e.into(),
        }),
    };
    let _ = w;
    Run {
        report,
        dest: dest.join().expect("destination thread"),
    }
}

pub(super) fn run<W: Wire>(
    w: &W,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
) -> Run {
    let link = w.link(None);
    run_with(
        w,
        memory,
        guest,
        cfg,
        DestSide::FromHello(DestConfig::default()),
        link,
    )
}

/// Asserts a run succeeded, byte for byte, and that the guest runs on at
/// the destination from the heartbeats it arrived with.
pub(super) fn assert_migrated(
    memory: &SourceMemory,
    guest: Scribbler,
    run: Run,
) -> MigrationReport {
    let report = run.report.expect("the migration succeeds");
    let received = run.dest.result.expect("the destination lands it");
    assert!(report.verified && received.verified, "both ends verified");
    let dest = run.dest.memory.expect("destination memory");
    // The source guest stays paused; the destination's is parked until released.
    assert_same_memory(memory, &dest);
    let arrived = heartbeat(&dest, 0);
    assert_eq!(arrived, heartbeat(memory, 0), "the heartbeat arrived");
    assert!(arrived > 0, "the guest ran before it moved");
    drop(guest);
    let mut landed = run.dest.guest.expect("the destination's guest");
    landed
        .release()
        .expect("the guest was started after the Commit");
    assert_guest_runs(landed.running().expect("started"));
    assert_heartbeat_moves(&dest, 0, arrived);
    report
}

/// Panics unless vCPU `vcpu`'s heartbeat passes `from` within 5 s.
pub(super) fn assert_heartbeat_moves<B: vm_memory::bitmap::Bitmap + 'static>(
    memory: &vm_memory::GuestMemoryMmap<B>,
    vcpu: u32,
    from: u64,
) {
    let t = std::time::Instant::now();
    while heartbeat(memory, vcpu) <= from && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(2));
    }
    assert!(
        heartbeat(memory, vcpu) > from,
        "vCPU {vcpu} runs on from {from}"
    );
}

/// Expands to one `#[test]` per check of the suite for the [`Wire`] `$wire`.
#[macro_export]
macro_rules! conformance_suite {
    ($wire:expr) => {
        #[test]
        fn byte_exact_under_dirtying() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::byte_exact_under_dirtying(&$wire)
        }
        #[test]
        fn rounds_land_in_order() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::rounds_land_in_order(&$wire)
        }
        #[test]
        fn scattered_rewrites_go_as_words() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::scattered_rewrites_go_as_words(&$wire)
        }
        #[test]
        fn zstd_is_byte_exact() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::zstd_is_byte_exact(&$wire)
        }
        #[test]
        fn bounded_shadow_is_byte_exact() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::bounded_shadow_is_byte_exact(&$wire)
        }
        #[test]
        fn fingerprint_shadow_is_byte_exact() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::fingerprint_shadow_is_byte_exact(&$wire)
        }
        #[test]
        fn cut_in_round_zero_fails_cleanly_and_a_retry_succeeds() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::cut_in_round_zero_fails_cleanly_and_a_retry_succeeds(
                &$wire,
            )
        }
        #[test]
        fn cut_in_stop_and_copy_resumes_the_guest() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::cut_in_stop_and_copy_resumes_the_guest(&$wire)
        }
        #[test]
        fn a_failed_pause_is_undone() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::a_failed_pause_is_undone(&$wire)
        }
        #[test]
        fn a_different_layout_is_refused() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::a_different_layout_is_refused(&$wire)
        }
        #[test]
        fn a_guest_it_cannot_host_is_refused_at_the_handshake() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::a_guest_it_cannot_host_is_refused_at_the_handshake(&$wire)
        }
        #[test]
        fn a_wrong_token_is_refused() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::a_wrong_token_is_refused(&$wire)
        }
        #[test]
        fn a_state_that_does_not_fit_is_refused_before_the_ack() {
            if !$crate::testing::conformance::Wire::available(&$wire) {
                return;
            }
            $crate::testing::conformance::a_state_that_does_not_fit_is_refused_before_the_ack(
                &$wire,
            )
        }
    };
}
