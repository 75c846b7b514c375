//! The checks of the conformance suite, one function each (see the
//! module doc of [`super`] for what they cover).

use std::thread;
use std::time::Duration;

use super::{
    assert_heartbeat_moves, assert_migrated, config, run, run_hooked, run_with, source_memory,
    DestSide, Link, Wire, MIB,
};
use crate::auth::Secret;
use crate::guest::{Guest, GuestError};
use crate::handshake::{HandshakeError, Terms};
use crate::land::{DestConfig, LandError};
use crate::memory::{host_page_size, DestMemory, Layout};
use crate::precopy::controller::{OnStall, Policy};
use crate::precopy::{Cause, MigrateError, Phase, ShadowMode};
use crate::protocol::Granularity;
use crate::segment::compress::ZstdMode;
use crate::testing::{assert_guest_runs, heartbeat, pattern_memory, Scribbler};

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

/// A policy that runs exactly `rounds` pre-copy rounds, then stops.
fn fixed_rounds(rounds: u32) -> Policy {
    Policy {
        downtime_target: Duration::ZERO,
        min_work_set: 0,
        max_rounds: rounds,
        stall_rounds: 100,
        on_stall: OnStall::ForceStop,
        // Transports are under test, not the controller's estimate of the
        // switch-over's fixed cost: rounds run as the target alone says.
        switchover_cost: Duration::ZERO,
        ..Policy::default()
    }
}

/// Pages rewritten between every two rounds end with their last bytes.
pub fn rounds_land_in_order<W: Wire>(w: &W) {
    let memory = pattern_memory(&[(0, 2 * MIB)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(50_000));
    let mut cfg = config(Granularity::Segment, 2);
    cfg.policy = fixed_rounds(6);
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

/// With a full shadow, pages whose rewrites are scattered over them go as
/// Words records (version 4) and land byte for byte, in every round, beside
/// pages with one changed word (segments); a version 3 source sends the same
/// rewrites as segments only.
pub fn scattered_rewrites_go_as_words<W: Wire>(w: &W) {
    for version in [crate::protocol::VERSION, 3] {
        let memory = pattern_memory(&[(0, 2 * MIB)]);
        let mut guest = Scribbler::start(memory.clone(), 1, Some(50_000));
        let mut cfg = config(Granularity::Segment, 2);
        cfg.shadow = ShadowMode::Full;
        cfg.max_version = version;
        cfg.policy = fixed_rounds(4);
        // After each round: every third word of pages 1..=32 gets the
        // round's value (scattered: one Words record beats ~170
        // segments), and one word of pages 33..=64 (one segment).
        let ps = host_page_size();
        let mut rewrite = |r: &crate::precopy::RoundReport| {
            use vm_memory::Bytes;
            if r.last {
                return;
            }
            let v = (r.metrics.round as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for p in 1..=64usize {
                let words: Vec<usize> = if p <= 32 {
                    (0..ps / 8).step_by(3).collect()
                } else {
                    vec![p % (ps / 8)]
                };
                for i in words {
                    let at = (p * ps + i * 8) as u64;
                    memory
                        .write_obj(v ^ i as u64, vm_memory::GuestAddress(at))
                        .expect("in memory");
                }
            }
        };
        let link = w.link(None);
        let side = DestSide::FromHello(DestConfig::default());
        let run = run_hooked(w, &memory, &mut guest, &cfg, side, link, &mut rewrite);
        let dest_words = run.dest.result.as_ref().map(|r| r.stats.word_pages).ok();
        let report = assert_migrated(&memory, guest, run);
        let words: u64 = report.rounds.iter().map(|r| r.stats.word_pages).sum();
        let segments: u64 = report.rounds.iter().skip(1).map(|r| r.stats.segments).sum();
        assert_eq!(
            dest_words,
            Some(words),
            "both ends count the same Words records"
        );
        if version >= 4 {
            assert!(
                words >= 32 * 3,
                "version {version}: the scattered pages go as Words in each of rounds 1-3, got {words}"
            );
        } else {
            assert_eq!(words, 0, "version {version}: no Words records");
        }
        assert!(
            segments > 0,
            "version {version}: the one-word pages go as segments"
        );
    }
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

/// Block fingerprints instead of a shadow land byte for byte, with pages
/// sent as block segments in the rounds after round 0.
pub fn fingerprint_shadow_is_byte_exact<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 2, None);
    let mut cfg = config(Granularity::Segment, 2);
    cfg.shadow = ShadowMode::Fingerprint;
    let run = run(w, &memory, &mut guest, &cfg);
    let report = assert_migrated(&memory, guest, run);
    let segments: u64 = report.rounds.iter().skip(1).map(|r| r.stats.segments).sum();
    assert!(segments > 0, "re-dirtied pages go as block segments");
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

/// A guest the destination cannot host is refused at the handshake, before
/// round 0 and before any memory is allocated there.
pub fn a_guest_it_cannot_host_is_refused_at_the_handshake<W: Wire>(w: &W) {
    let memory = source_memory(w);
    let mut guest = Scribbler::start(memory.clone(), 2, Some(100_000));
    let link = w.link(None);
    let side = DestSide::Hosting(DestConfig::default(), 1);
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
        } => assert!(msg.contains("cannot host the guest"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        run.dest.result,
        Err(LandError::Handshake(HandshakeError::Admit(_)))
    ));
    assert!(run.dest.memory.is_none(), "nothing allocated for it");
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
