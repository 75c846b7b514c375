//! The drain before the pause (protocol version 3) over real TCP loopback,
//! through the fault proxy: the source pauses its guest only once the
//! destination said it landed the last pre-copy round; a cancel while it
//! waits leaves the guest running on the source; a version 2 source (which
//! knows no drain) still migrates into a version 3 destination, and a
//! version 3 source into a version 2 destination.
//!
//! It lives here, not in core/tests, because hpmig-core cannot depend on
//! its TCP transport.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::guest::{Guest, GuestError};
use hpmig_core::land::{accept, receive_accepted, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{migrate, MigrateError, MigrationReport, Phase, SourceConfig};
use hpmig_core::protocol::{Granularity, Header, Kind, Records, VERSION};
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::proxy::{Action, Capture, Plan, Proxy, RecordAt, Which};
use hpmig_core::testing::{
    assert_guest_runs, assert_same_memory, pattern_memory, LandedScribbler, Scribbler,
};
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

const MIB: usize = 1 << 20;
/// The last pre-copy round: the policy below stops after round 1.
const LAST_PRECOPY: u32 = 1;

fn opts() -> TcpOptions {
    TcpOptions {
        io_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
    }
}

/// Two streams; exactly two pre-copy rounds (0 and 1), then stop-and-copy
/// (round 2): the guest keeps writing, so only the round cap stops it.
fn source_config(max_version: u16) -> SourceConfig {
    let mut cfg = config(Granularity::Segment, 2);
    cfg.policy = Policy {
        downtime_target: Duration::ZERO,
        min_work_set: 0,
        max_rounds: LAST_PRECOPY + 1,
        on_stall: OnStall::ForceStop,
        ..cfg.policy
    };
    cfg.max_version = max_version;
    cfg
}

/// The source's guest, counting its pauses.
struct Counted {
    inner: Scribbler,
    pauses: Arc<AtomicU32>,
    /// When each pause was asked for.
    paused_at: Arc<Mutex<Option<Instant>>>,
}

impl Guest for Counted {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        *self.paused_at.lock().unwrap() = Some(Instant::now());
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.inner.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.inner.save_state()
    }
    fn vcpus(&self) -> u32 {
        self.inner.vcpus()
    }
}

/// A destination on a loopback port; its thread returns what it received,
/// its memory and its guest.
type DestThread = thread::JoinHandle<(Result<Received, LandError>, DestMemory, LandedScribbler)>;

fn start_dest(max_version: u16) -> (SocketAddr, DestThread) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let mut t = TcpDest::accept(listener, opts()).unwrap();
        let mut cfg = DestConfig::default();
        cfg.terms.max_version = max_version;
        let mut guest = LandedScribbler::new();
        let accepted = accept(&mut t, &cfg, None, &mut guest).unwrap();
        let memory: DestMemory = accepted.hello.layout.allocate().unwrap();
        let r = receive_accepted(&accepted, &memory, &mut t, &cfg, &mut guest);
        (r, memory, guest)
    });
    (addr, dest)
}

struct Run {
    result: Result<MigrationReport, MigrateError>,
    /// When the source finished (returned from `migrate`).
    returned: Instant,
    memory: SourceMemory,
    guest: Counted,
    dest: DestThread,
    proxy: Proxy,
}

/// One migration of 8 MiB through a proxy with `plan` (capturing), into a
/// destination that speaks up to `dest_version`.
fn migrate_through(
    cfg: &SourceConfig,
    dest_version: u16,
    plan: impl FnOnce(&SourceConfig) -> Option<Plan>,
) -> Run {
    let memory = pattern_memory(&[(0, 8 * MIB)]);
    let mut guest = Counted {
        inner: Scribbler::start(memory.clone(), 1, Some(50_000)),
        pauses: Arc::default(),
        paused_at: Arc::default(),
    };
    let (addr, dest) = start_dest(dest_version);
    let proxy = Proxy::start(addr, plan(cfg), true).unwrap();
    let mut t = TcpSource::connect(proxy.addr(), opts()).unwrap();
    let mut dirty = VmmBitmap::new(memory.clone(), Layout::of(&memory).unwrap()).unwrap();
    let result = migrate(&memory, &mut dirty, &mut guest, &mut t, cfg, &mut |_| {});
    Run {
        result,
        returned: Instant::now(),
        memory,
        guest,
        dest,
        proxy,
    }
}

/// The control records (kind, arg) of one direction of connection 0.
fn control_records(capture: &Capture, to_dest: bool) -> Vec<(Kind, u64)> {
    let bytes = capture.get(&(0, to_dest)).cloned().unwrap_or_default();
    Records::new(&bytes, 4096)
        .map_while(Result::ok)
        .map(|(h, _): (Header, _)| (h.kind, h.arg))
        .collect()
}

/// The RoundEnd of the last pre-copy round on the first data stream.
fn last_precopy_round_end() -> Which {
    Which::Record(RecordAt {
        conn: 1,
        to_dest: true,
        kind: Kind::RoundEnd,
        nth: 0,
        round: Some(LAST_PRECOPY.into()),
    })
}

#[test]
fn the_source_pauses_only_after_the_destination_landed_the_last_precopy_round() {
    // The proxy holds the last pre-copy round's RoundEnd on stream 0 for
    // 300 ms: the destination cannot have landed that round before it
    // passes. Without the drain the source pauses at once.
    let held_until: Arc<Mutex<Option<Instant>>> = Arc::default();
    let held = Arc::clone(&held_until);
    let cfg = source_config(VERSION);
    let run = migrate_through(&cfg, VERSION, move |_| {
        Some(Plan {
            which: last_precopy_round_end(),
            at: 0,
            action: Action::Hook(Arc::new(move || {
                thread::sleep(Duration::from_millis(300));
                *held.lock().unwrap() = Some(Instant::now());
            })),
        })
    });
    let report = run.result.unwrap();
    let (received, dest_memory, mut landed) = run.dest.join().unwrap();
    assert!(received.unwrap().verified && report.verified);
    assert!(run.proxy.fired(), "the RoundEnd was never held");
    assert_eq!(
        report.rounds.len() as u32,
        LAST_PRECOPY + 2,
        "two pre-copy rounds and the final one"
    );
    let held = held_until.lock().unwrap().unwrap();
    let paused = report.switchover.paused_at.unwrap();
    assert!(
        paused > held,
        "the guest paused {:?} before the held RoundEnd reached the destination",
        held - paused
    );
    assert_eq!(run.guest.pauses.load(Ordering::SeqCst), 1);
    assert!(
        report.switchover.drain >= Duration::from_millis(100),
        "drain {:?}",
        report.switchover.drain
    );
    // The drain ran before the pause: it is not part of the downtime.
    let asked = run.guest.paused_at.lock().unwrap().unwrap();
    assert!(asked > held);
    // On the wire: Drain for the last pre-copy round, Drained for it back.
    let capture = run.proxy.captured();
    let to_dest = control_records(&capture, true);
    let to_source = control_records(&capture, false);
    assert!(
        to_dest.contains(&(Kind::Drain, LAST_PRECOPY.into())),
        "{to_dest:?}"
    );
    assert!(
        to_source.contains(&(Kind::Drained, LAST_PRECOPY.into())),
        "{to_source:?}"
    );
    // Drain before the State (sent once paused).
    let pos = |k| to_dest.iter().position(|(kind, _)| *kind == k).unwrap();
    assert!(pos(Kind::Drain) < pos(Kind::State));
    assert_same_memory(&run.memory, &dest_memory);
    landed.release().unwrap();
    assert_guest_runs(landed.running().unwrap());
}

#[test]
fn a_cancel_during_the_drain_leaves_the_guest_running_on_the_source() {
    // The proxy holds the last pre-copy round's RoundEnd for 2 s; 400 ms
    // in (the source waits for Drained by then) the operator cancels.
    let cancelled_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let at = Arc::clone(&cancelled_at);
    let cfg = source_config(VERSION);
    let run = migrate_through(&cfg, VERSION, move |cfg| {
        let live = Arc::clone(&cfg.live);
        Some(Plan {
            which: last_precopy_round_end(),
            at: 0,
            action: Action::Hook(Arc::new(move || {
                thread::sleep(Duration::from_millis(400));
                *at.lock().unwrap() = Some(Instant::now());
                live.cancel();
                thread::sleep(Duration::from_secs(2));
            })),
        })
    });
    match run.result {
        Err(MigrateError::Cancelled {
            phase: Phase::Drain,
            round: LAST_PRECOPY,
        }) => {}
        other => panic!("expected a cancel during the drain, got {other:?}"),
    }
    // The wait ended on the cancel (within its poll), not on Drained.
    let cancelled = cancelled_at.lock().unwrap().unwrap();
    let took = run.returned - cancelled;
    assert!(
        took < Duration::from_secs(1),
        "returned {took:?} after the cancel"
    );
    // Never paused: the guest still runs here.
    assert_eq!(run.guest.pauses.load(Ordering::SeqCst), 0);
    let before = run.guest.inner.writes();
    thread::sleep(Duration::from_millis(100));
    assert!(
        run.guest.inner.writes() > before,
        "the source's guest is not running"
    );
    run.proxy.stop();
    let (received, ..) = run.dest.join().unwrap();
    assert!(received.is_err(), "the destination must not keep a copy");
}

#[test]
fn a_version_2_source_migrates_into_a_version_3_destination_without_a_drain() {
    let cfg = source_config(2);
    let run = migrate_through(&cfg, VERSION, |_| None);
    let report = run.result.unwrap();
    let (received, dest_memory, mut landed) = run.dest.join().unwrap();
    assert!(received.unwrap().verified && report.verified);
    assert_eq!(report.switchover.drain, Duration::ZERO);
    let capture = run.proxy.captured();
    let to_dest = control_records(&capture, true);
    assert!(
        !to_dest.iter().any(|(k, _)| *k == Kind::Drain),
        "{to_dest:?}"
    );
    assert!(to_dest.iter().any(|(k, _)| *k == Kind::Complete));
    assert_same_memory(&run.memory, &dest_memory);
    landed.release().unwrap();
    assert_guest_runs(landed.running().unwrap());
}

#[test]
fn a_version_3_source_migrates_into_a_version_2_destination_without_a_drain() {
    let cfg = source_config(VERSION);
    let run = migrate_through(&cfg, 2, |_| None);
    let report = run.result.unwrap();
    let (received, dest_memory, mut landed) = run.dest.join().unwrap();
    assert!(received.unwrap().verified && report.verified);
    assert_eq!(report.switchover.drain, Duration::ZERO);
    let capture = run.proxy.captured();
    let to_dest = control_records(&capture, true);
    assert!(
        !to_dest.iter().any(|(k, _)| *k == Kind::Drain),
        "{to_dest:?}"
    );
    // The Welcome agreed on version 2 (its first payload bytes).
    let welcome = capture.get(&(0, false)).unwrap();
    let (h, p) = Records::new(welcome, 4096).next().unwrap().unwrap();
    assert_eq!(h.kind, Kind::Welcome);
    assert_eq!(u16::from_le_bytes([p[0], p[1]]), 2);
    assert_same_memory(&run.memory, &dest_memory);
    landed.release().unwrap();
    assert_guest_runs(landed.running().unwrap());
}
