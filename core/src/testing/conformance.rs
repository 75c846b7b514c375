//! The transport conformance suite: what every transport must pass, run by
//! the in-process, TCP and RDMA transports alike. A transport's test file
//! implements [`Wire`] (how its two ends are made, and how its link is cut)
//! and expands [`crate::conformance_suite!`], one `#[test]` per check:
//!
//! - byte-exact: a guest written by its vCPUs while it moves lands byte for
//!   byte (1, 2 and 4 streams, page and segment granularity, two regions
//!   with a hole), zstd on and auto, a bounded shadow, and the guest runs on
//!   at the destination from its heartbeats;
//! - ordering: pages rewritten in every one of several rounds end with their
//!   last bytes (each page's records travel on one ordered stream);
//! - failure: a link cut in round 0 fails both ends with the guest running
//!   on at the source, and a retry succeeds; a cut during stop-and-copy
//!   resumes the paused guest; a pause that fails halfway is undone;
//! - hostile input: a wrong token, a layout that differs and a state record
//!   that does not fit are refused before the Ack, the guest running on at
//!   the source.
//!
//! Every check compares memories with [`super::assert_same_memory`], which
//! does not trust the digest code.

use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{
    assert_guest_runs, assert_same_memory, heartbeat, pattern_memory, LandedScribbler, Scribbler,
};
use crate::auth::Secret;
use crate::dirty::vmm::VmmBitmap;
use crate::guest::{Guest, GuestError};
use crate::handshake::{HandshakeError, Terms};
use crate::land::{accept, receive, receive_accepted, DestConfig, LandError, Received};
use crate::memory::{host_page_size, DestMemory, Layout, SourceMemory};
use crate::precopy::controller::{OnStall, Policy};
use crate::precopy::{migrate, Cause, MigrateError, MigrationReport, Phase, SourceConfig};
use crate::protocol::Granularity;
use crate::segment::compress::ZstdMode;
use crate::transport::{DestTransport, SourceTransport, TransportError};

const MIB: usize = 1 << 20;

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

/// Two regions with a hole between them, a pattern on every third page.
fn source_memory<W: Wire>(w: &W) -> SourceMemory {
    let mib = w.memory_mib();
    pattern_memory(&[
        (0, (mib - mib / 7) * MIB),
        (1 << 32, (mib / 7).max(1) * MIB),
    ])
}

/// Where the destination's memory comes from.
enum DestSide {
    /// Allocated after the handshake from the Hello's layout, as `hpmig
    /// dest` does.
    FromHello(DestConfig),
    /// Given before the handshake (its layout must match).
    Fixed(DestMemory, DestConfig),
}

/// What the destination thread ends with.
struct Landed {
    result: Result<Received, LandError>,
    memory: Option<DestMemory>,
    guest: Option<LandedScribbler>,
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
            DestSide::FromHello(cfg) => {
                let accepted = match accept(&mut t, &cfg, None) {
                    Ok(a) => a,
                    Err(e) => return failed(e),
                };
                let memory: DestMemory = match accepted.hello.layout.allocate() {
                    Ok(m) => m,
                    Err(e) => {
                        return failed(LandError::Control(TransportError::Other(e.to_string())))
                    }
                };
                let mut guest = LandedScribbler::new(&memory);
                let r = receive_accepted(&accepted, &memory, &mut t, &cfg, &mut guest);
                (memory, r, guest)
            }
            DestSide::Fixed(memory, cfg) => {
                let mut guest = LandedScribbler::new(&memory);
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
struct Run {
    report: Result<MigrationReport, MigrateError>,
    dest: Landed,
}

fn run_with<W: Wire>(
    w: &W,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
    side: DestSide,
    link: Link<W::Src, W::Dst>,
) -> Run {
    run_hooked(w, memory, guest, cfg, side, link, &mut |_| {})
}

fn run_hooked<W: Wire>(
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

fn run<W: Wire>(w: &W, memory: &SourceMemory, guest: &mut dyn Guest, cfg: &SourceConfig) -> Run {
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
fn assert_migrated(memory: &SourceMemory, guest: Scribbler, run: Run) -> MigrationReport {
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
fn assert_heartbeat_moves<B: vm_memory::bitmap::Bitmap + 'static>(
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

/// Byte-exact under dirtying with 1, 2 and 4 streams, both granularities.
pub fn byte_exact_under_dirtying<W: Wire>(w: &W) {
    for (streams, granularity) in [
        (1, Granularity::Segment),
        (2, Granularity::Page),
        (4, Granularity::Segment),
    ] {
        let memory = source_memory(w);
        let mut guest = Scribbler::start(memory.clone(), 2, None);
        thread::sleep(Duration::from_millis(20));
        let run = run(w, &memory, &mut guest, &config(granularity, streams));
        let report = assert_migrated(&memory, guest, run);
        assert!(
            report.rounds.len() >= 2,
            "{streams} streams: a pre-copy and a stop-and-copy round"
        );
    }
}

/// Pages rewritten between every two rounds end with their last bytes.
pub fn rounds_land_in_order<W: Wire>(w: &W) {
    let memory = pattern_memory(&[(0, 2 * MIB)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(50_000));
    let mut cfg = config(Granularity::Segment, 2);
    cfg.policy = Policy {
        downtime_target: Duration::ZERO,
        min_work_set: 0,
        max_rounds: 6,
        stall_rounds: 100,
        on_stall: OnStall::ForceStop,
    };
    // After each round, the same 64 pages get new bytes (the round's
    // number in one half of each page, then the other): each page has a
    // record in every round, and only the last may stand.
    let ps = host_page_size();
    let mut rewrite = |r: &crate::precopy::RoundReport| {
        use vm_memory::Bytes;
        if r.last {
            return; // the guest is paused: nothing writes any more
        }
        let round = r.metrics.round as usize;
        let fill = vec![round as u8 + 1; ps / 2];
        for p in 1..65 {
            let at = p * ps + (round % 2) * (ps / 2);
            memory
                .write_slice(&fill, vm_memory::GuestAddress(at as u64))
                .expect("in memory");
        }
    };
    let link = w.link(None);
    let side = DestSide::FromHello(DestConfig::default());
    let run = run_hooked(w, &memory, &mut guest, &cfg, side, link, &mut rewrite);
    let report = assert_migrated(&memory, guest, run);
    assert_eq!(
        report.rounds.len(),
        7,
        "six pre-copy rounds and the final one"
    );
}

/// zstd on (both granularities) and auto land byte for byte; `on` compresses.
pub fn zstd_is_byte_exact<W: Wire>(w: &W) {
    for (mode, granularity) in [
        (ZstdMode::On, Granularity::Page),
        (ZstdMode::On, Granularity::Segment),
        (ZstdMode::Auto, Granularity::Page),
    ] {
        let memory = source_memory(w);
        let mut guest = Scribbler::start(memory.clone(), 1, Some(200_000));
        let mut cfg = config(granularity, 2);
        cfg.zstd = mode;
        // A cap makes `auto` see a link slower than compression.
        cfg.bandwidth = Some(400 << 20);
        let run = run(w, &memory, &mut guest, &cfg);
        let zstd_dest = run.dest.result.as_ref().map(|r| r.stats.zstd_pages).ok();
        let report = assert_migrated(&memory, guest, run);
        let zstd_pages: u64 = report.rounds.iter().map(|r| r.stats.zstd_pages).sum();
        assert!(
            zstd_pages > 0,
            "{mode:?}/{granularity:?}: pattern pages compress"
        );
        assert_eq!(
            zstd_dest,
            Some(zstd_pages),
            "both ends count the same pages"
        );
    }
}

/// A shadow smaller than the guest still lands byte for byte.
pub fn bounded_shadow_is_byte_exact<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 2, None);
    let mut cfg = config(Granularity::Segment, 2);
    cfg.shadow_budget = Some(16 * host_page_size() as u64);
    let run = run(w, &memory, &mut guest, &cfg);
    assert_migrated(&memory, guest, run);
}

/// A link cut in round 0: both ends fail, the guest runs on at the source,
/// the destination keeps nothing; a retry succeeds.
pub fn cut_in_round_zero_fails_cleanly_and_a_retry_succeeds<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 2, None);
    let cfg = config(Granularity::Segment, 2);
    let link = w.link(Some(3 * MIB as u64));
    let run1 = run_with(
        w,
        &memory,
        &mut guest,
        &cfg,
        DestSide::FromHello(DestConfig::default()),
        link,
    );
    let err = run1.report.expect_err("a cut link fails the migration");
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
        run1.dest.result.is_err(),
        "the destination never completes a partial guest"
    );
    assert!(
        run1.dest
            .guest
            .as_ref()
            .is_none_or(|g| g.running().is_none()),
        "nothing runs at the destination"
    );
    assert_guest_runs(&guest);
    let run2 = run(w, &memory, &mut guest, &cfg);
    assert_migrated(&memory, guest, run2);
}

/// A guest whose pause cuts the link: the failure lands exactly in
/// stop-and-copy, after the guest was paused.
struct CutOnPause<'a> {
    inner: &'a mut Scribbler,
    cut: &'a (dyn Fn() + Send + Sync),
    resumed: u32,
}

impl Guest for CutOnPause<'_> {
    fn pause(&mut self) -> Result<(), GuestError> {
        (self.cut)();
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

/// A link cut during stop-and-copy resumes the paused guest.
pub fn cut_in_stop_and_copy_resumes_the_guest<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut inner = Scribbler::start(memory.clone(), 1, Some(100_000));
    let link = w.link(None);
    let cut = link.cut;
    let link = Link {
        dest: link.dest,
        source: link.source,
        cut: Box::new(|| {}),
    };
    let mut guest = CutOnPause {
        inner: &mut inner,
        cut: &*cut,
        resumed: 0,
    };
    let cfg = config(Granularity::Segment, 2);
    let run = run_with(
        w,
        &memory,
        &mut guest,
        &cfg,
        DestSide::FromHello(DestConfig::default()),
        link,
    );
    let err = run.report.expect_err("the cut fails the migration");
    assert!(
        matches!(
            err,
            MigrateError::Failed {
                phase: Phase::StopAndCopy | Phase::State | Phase::Acknowledge,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(guest.resumed, 1, "the paused guest was resumed once");
    assert!(run.dest.result.is_err());
    assert_guest_runs(&inner);
}

/// A pause that fails after stopping some vCPUs is undone: every vCPU runs on.
pub fn a_failed_pause_is_undone<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 2, Some(100_000));
    guest.fail_pause_after = Some(1);
    let run = run(w, &memory, &mut guest, &config(Granularity::Segment, 2));
    let err = run.report.expect_err("a failed pause fails the migration");
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
    assert!(run.dest.result.is_err());
    for vcpu in 0..2 {
        assert_heartbeat_moves(&memory, vcpu, heartbeat(&memory, vcpu));
    }
}

/// A destination whose memory layout differs refuses at the handshake.
pub fn a_different_layout_is_refused<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(100_000));
    let layout = Layout::of(&memory).expect("layout");
    let small = Layout::new(layout.page_size(), vec![layout.regions()[0]]).expect("layout");
    let dest_memory: DestMemory = small.allocate().expect("memory");
    let link = w.link(None);
    let side = DestSide::Fixed(dest_memory, DestConfig::default());
    let run = run_with(
        w,
        &memory,
        &mut guest,
        &config(Granularity::Segment, 2),
        side,
        link,
    );
    match run.report.expect_err("refused") {
        MigrateError::Failed {
            phase: Phase::Handshake,
            cause: Cause::Handshake(HandshakeError::Peer(msg)),
            ..
        } => assert!(msg.contains("memory layout mismatch"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        run.dest.result,
        Err(LandError::Handshake(HandshakeError::Refused(_)))
    ));
    assert_guest_runs(&guest);
}

/// A wrong or missing token is refused before anything is sent.
pub fn a_wrong_token_is_refused<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(100_000));
    for (src_token, dst_token) in [
        (&b"right"[..], &b"wrong"[..]),
        (&b""[..], &b"right"[..]),
        (&b"right"[..], &b""[..]),
    ] {
        let mut cfg = config(Granularity::Segment, 2);
        cfg.secret = Secret::from_token(src_token);
        let dcfg = DestConfig {
            terms: Terms {
                secret: Secret::from_token(dst_token),
                ..Terms::default()
            },
            ..DestConfig::default()
        };
        let link = w.link(None);
        let run = run_with(
            w,
            &memory,
            &mut guest,
            &cfg,
            DestSide::FromHello(dcfg),
            link,
        );
        let err = run.report.expect_err("refused");
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
        let derr = run.dest.result.expect_err("refused");
        // A token mismatch is found by whichever end checks first.
        assert!(
            matches!(derr, LandError::Handshake(HandshakeError::Auth(_)))
                || matches!(
                    err,
                    MigrateError::Failed {
                        cause: Cause::Handshake(HandshakeError::Auth(_)),
                        ..
                    }
                ),
            "{derr} / {err}"
        );
        assert!(
            run.dest.memory.is_none(),
            "no memory allocated for a stranger"
        );
        assert_guest_runs(&guest);
    }
}

/// A guest whose State record announces one vCPU more than it carries.
struct Miscounted<'a>(&'a mut Scribbler);

impl Guest for Miscounted<'_> {
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

/// A state record the destination cannot restore is refused before the
/// Ack, and the source resumes its guest.
pub fn a_state_that_does_not_fit_is_refused_before_the_ack<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut inner = Scribbler::start(memory.clone(), 1, Some(100_000));
    let mut guest = Miscounted(&mut inner);
    let run = run(w, &memory, &mut guest, &config(Granularity::Segment, 2));
    let err = run.report.expect_err("refused");
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
    assert!(matches!(run.dest.result, Err(LandError::Restore(_))));
    assert!(
        run.dest
            .guest
            .as_ref()
            .is_some_and(|g| g.running().is_none()),
        "nothing runs at the destination"
    );
    assert_guest_runs(&inner);
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
