//! The decision window, byte by byte, on the in-process transport: every
//! byte of the Ack, the Decision and the Outcome is cut (the record lost
//! and the connection broken) or flipped, and each run must end with the
//! guest running in exactly one place once the two ends can talk again (the
//! source delivers its decision again on a fresh connection, the
//! destination answers from its journal once its migration is over).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::guest::Guest;
use hpmig_core::land::journal::MemoryJournal;
use hpmig_core::land::{answer_from_journal, await_decision, receive, DestConfig, LandError};
use hpmig_core::memory::{DestMemory, Layout};
use hpmig_core::precopy::{migrate, redeliver, MigrateError, SourceConfig};
use hpmig_core::protocol::switchover::{OutcomeKind, ACK_LEN, DECISION_LEN, OUTCOME_LEN};
use hpmig_core::protocol::{Granularity, Kind, HEADER_LEN};
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::{pattern_memory, LandedScribbler, Scribbler};
use hpmig_core::transport::inproc::{pair, ControlAction, ControlFault, Faults};
use hpmig_core::transport::{Control, Deadlines, DestTransport};

const IO: Duration = Duration::from_millis(250);

/// Where the guest ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// Runs on the source (resumed); the destination holds nothing.
    Source,
    /// Runs on the destination; the source's stays paused.
    Destination,
}

fn source_config() -> SourceConfig {
    let mut cfg = config(Granularity::Segment, 1);
    cfg.deadlines = Deadlines {
        io: IO,
        handshake: Duration::from_secs(2),
    };
    cfg
}

fn dest_config() -> DestConfig {
    DestConfig {
        memory_zeroed: true,
        deadlines: Deadlines {
            io: IO,
            handshake: Duration::from_secs(2),
        },
        in_doubt_wait: Duration::from_secs(2),
        journal: Some(Arc::new(MemoryJournal::default())),
        ..DestConfig::default()
    }
}

/// One migration with `fault` on the first control connection; returns
/// where the guest runs once both ends settled.
fn run(fault: Option<ControlFault>) -> End {
    let memory = pattern_memory(&[(0, 1 << 20)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    let layout = Layout::of(&memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let faults = fault.map_or_else(Faults::none, Faults::control);
    let (mut src, mut dst) = pair(faults);
    let source_done = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&source_done);
    let dest = thread::spawn(move || {
        let cfg = dest_config();
        let mut landed = LandedScribbler::new();
        let mut result = receive(&dest_memory, &mut dst, &cfg, &mut landed).map(|_| ());
        // Still in doubt: wait for the decision again, then serve questions
        // from the journal (as `hpmig dest` would) until the source settled.
        while let Err(LandError::InDoubt(u)) = &result {
            if done.load(Ordering::SeqCst) {
                break;
            }
            let u = u.clone();
            let until = Instant::now() + Duration::from_millis(500);
            result = await_decision(&u, &mut dst, &cfg, &mut landed, until).map(|_| ());
        }
        while !done.load(Ordering::SeqCst) {
            if dst
                .accept_control(Instant::now() + Duration::from_millis(50))
                .unwrap_or(false)
            {
                let control = dst.control();
                if let Ok(r) = control.recv(Instant::now() + IO) {
                    if r.header.kind == Kind::Decision {
                        let _ = answer_from_journal(control, &r.payload, &cfg);
                    }
                }
            }
        }
        (result, landed.running().is_some())
    });
    let layout = Layout::of(&memory).unwrap();
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let cfg = source_config();
    let source_end = match migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {}) {
        Ok(_) => End::Destination,
        Err(MigrateError::InDoubt {
            pending: Some(p), ..
        }) => {
            // The guest stays paused until the destination says what it did.
            let mut end = None;
            for _ in 0..40 {
                match redeliver(&mut src, &p, IO) {
                    Ok(o) if o.outcome == OutcomeKind::Started => {
                        end = Some(End::Destination);
                        break;
                    }
                    Ok(o) if matches!(o.outcome, OutcomeKind::Discarded | OutcomeKind::Lost) => {
                        guest.resume().unwrap();
                        end = Some(End::Source);
                        break;
                    }
                    _ => thread::sleep(Duration::from_millis(50)),
                }
            }
            end.unwrap_or_else(|| panic!("{fault:?}: still in doubt after 40 deliveries"))
        }
        Err(MigrateError::InDoubt { pending: None, .. }) => {
            panic!("{fault:?}: in doubt with nothing to deliver again")
        }
        Err(_) => End::Source,
    };
    source_done.store(true, Ordering::SeqCst);
    let (dest_result, dest_runs) = dest.join().unwrap();
    // The source guest's own progress says whether it runs.
    let w = guest.writes();
    thread::sleep(Duration::from_millis(30));
    let source_runs = guest.writes() > w;
    assert_eq!(
        source_runs,
        source_end == End::Source,
        "{fault:?}: the source guest {} although the source ended with {source_end:?} (destination: {dest_result:?})",
        if source_runs { "runs" } else { "is paused" }
    );
    assert_ne!(
        source_runs,
        dest_runs,
        "{fault:?}: the guest runs {} (source ended {source_end:?}, destination {dest_result:?})",
        if source_runs { "twice" } else { "nowhere" }
    );
    source_end
}

#[test]
fn a_clean_switch_over_runs_the_guest_at_the_destination() {
    assert_eq!(run(None), End::Destination);
}

#[test]
fn every_byte_of_the_ack_the_decision_and_the_outcome_cut_or_flipped_leaves_one_guest() {
    let records = [
        (Kind::Ack, false, HEADER_LEN + ACK_LEN),
        (Kind::Decision, true, HEADER_LEN + DECISION_LEN),
        (Kind::Outcome, false, HEADER_LEN + OUTCOME_LEN),
    ];
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut runs = 0;
    for (kind, to_dest, len) in records {
        for at in 0..len {
            for action in [ControlAction::Cut, ControlAction::Flip] {
                let end = run(Some(ControlFault {
                    to_dest,
                    kind,
                    at,
                    action,
                }));
                *ends
                    .entry(format!("{kind:?} {action:?}: guest on the {end:?}"))
                    .or_default() += 1;
                runs += 1;
            }
        }
    }
    eprintln!("{runs} runs:");
    for (k, n) in &ends {
        eprintln!("  {n:4}  {k}");
    }
    assert_eq!(
        runs,
        2 * (3 * HEADER_LEN + ACK_LEN + DECISION_LEN + OUTCOME_LEN)
    );
}

/// Operators upgrade hosts by migrating guests off old ones: a destination
/// one protocol version newer accepts an older source (version 1 here:
/// a bare Commit, no Outcome).
#[test]
fn a_version_1_source_migrates_into_a_version_2_destination() {
    let memory = pattern_memory(&[(0, 4 << 20)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    let layout = Layout::of(&memory).unwrap();
    let dest_memory: DestMemory = layout.allocate().unwrap();
    let (mut src, mut dst) = pair(Faults::none());
    let dm = dest_memory.clone();
    let dest = thread::spawn(move || {
        let mut landed = LandedScribbler::new();
        let r = receive(&dm, &mut dst, &dest_config(), &mut landed);
        (r, landed)
    });
    let mut cfg = source_config();
    cfg.max_version = 1;
    let mut dirty = VmmBitmap::new(memory.clone(), layout).unwrap();
    let report = migrate(&memory, &mut dirty, &mut guest, &mut src, &cfg, &mut |_| {}).unwrap();
    let (received, mut landed) = dest.join().unwrap();
    let received = received.unwrap();
    assert!(report.verified && received.verified);
    assert_eq!(
        received.started_at, 0,
        "a version 1 source learns no start time"
    );
    hpmig_core::testing::assert_same_memory(&memory, &dest_memory);
    landed.release().unwrap();
    hpmig_core::testing::assert_guest_runs(landed.running().unwrap());
}
