//! The service after a migration went wrong, over real sockets: a source
//! cut mid-round after it authenticated leaves the service serving, and
//! its retry to the same address lands byte for byte; a Decision lost on
//! its way leaves the destination in doubt, and delivered again on a new
//! connection it reaches that migration through the service's acceptor
//! (and, once the migration is over, the journal answers it there).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{dest_config, migrate_to, migrate_with, serve_one, service, source_config, IO};
use hpmig_core::land::journal::{Journal, MemoryJournal};
use hpmig_core::land::LandError;
use hpmig_core::precopy::{redeliver, MigrateError};
use hpmig_core::protocol::switchover::OutcomeKind;
use hpmig_core::protocol::Kind;
use hpmig_core::testing::proxy::{Action, Plan, Proxy, RecordAt, Which};
use hpmig_core::testing::{assert_guest_runs, assert_same_memory, pattern_memory, Scribbler};

const MIB: usize = 1 << 20;

#[test]
fn a_source_cut_mid_round_after_authenticating_leaves_the_service_serving_its_retry() {
    let svc = service(Duration::from_secs(2), None);
    // The first data connection is cut 100 kB into round 0.
    let cut = Plan {
        which: Which::Conn {
            conn: 1,
            to_dest: true,
        },
        at: 100_000,
        action: Action::Cut,
    };
    let proxy = Proxy::start(svc.local_addr(), Some(cut), false).unwrap();
    let memory = pattern_memory(&[(0, 16 * MIB)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    let cfg = dest_config(None);
    // The proxy stops reading the cut connection without resetting it, so
    // the source learns of the cut when its writes time out: make that
    // soon (the destination's side fails at once).
    let mut impatient = source_config();
    impatient.deadlines.io = Duration::from_secs(1);
    thread::scope(|s| {
        let dest = s.spawn(|| {
            let first = serve_one(&svc, &cfg, Duration::from_secs(10));
            let second = serve_one(&svc, &cfg, Duration::from_secs(10));
            (first, second)
        });
        let (first, _) = migrate_with(proxy.addr(), &memory, &mut guest, &impatient);
        assert!(proxy.fired(), "the cut happened");
        assert!(
            matches!(first, Err(MigrateError::Failed { .. })),
            "the cut migration fails at the source: {first:?}"
        );
        assert_guest_runs(&guest);
        // The same address again: the service is still there.
        let (second, _) = migrate_to(proxy.addr(), &memory, &mut guest);
        let report = second.expect("the retry succeeds");
        let (first, second) = dest.join().unwrap();
        assert!(
            matches!(first.result, Err(LandError::Stream { .. })),
            "the cut migration fails at the destination, mid-round: {:?}",
            first.result
        );
        let received = second.result.expect("the retry lands");
        assert!(report.verified && received.verified);
        assert_same_memory(&memory, &second.memory);
    });
    let stats = svc.stats();
    assert_eq!(stats.authenticated, 2, "{stats:?}");
}

#[test]
fn a_decision_delivered_again_on_a_new_connection_reaches_the_migration_in_doubt() {
    let journal: Arc<dyn Journal> = Arc::new(MemoryJournal::default());
    let svc = service(Duration::from_secs(2), Some(Arc::clone(&journal)));
    let cfg = dest_config(Some(journal));

    // The migration's Decision is lost with the connection (its first
    // byte is where the proxy cuts).
    let plan = Plan {
        which: Which::Record(RecordAt {
            conn: 0,
            to_dest: true,
            kind: Kind::Decision,
            nth: 0,
            round: None,
        }),
        at: 0,
        action: Action::Cut,
    };
    let proxy = Proxy::start(svc.local_addr(), Some(plan), false).unwrap();
    let memory = pattern_memory(&[(0, 4 * MIB)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    let (served, mut source) = thread::scope(|s| {
        let dest = s.spawn(|| serve_one(&svc, &cfg, Duration::from_secs(10)));
        let (result, source) = migrate_to(proxy.addr(), &memory, &mut guest);
        assert!(proxy.fired(), "the Decision was cut");
        let pending = match result {
            Err(MigrateError::InDoubt {
                pending: Some(p), ..
            }) => p,
            other => panic!("the source is in doubt after losing its Decision: {other:?}"),
        };
        let mut source = source.unwrap();
        // A new connection to the same address, through the service.
        let outcome = redeliver(&mut source, &pending, IO).expect("an Outcome");
        assert_eq!(outcome.outcome, OutcomeKind::Started);
        (dest.join().unwrap(), (source, pending))
    });
    let received = served
        .result
        .expect("the migration in doubt took the Decision delivered again");
    assert!(received.verified);
    assert!(served.guest.running().is_some(), "the guest started here");
    assert_same_memory(&memory, &served.memory);
    let stats = svc.stats();
    assert_eq!(stats.decisions_routed, 1, "{stats:?}");

    // Once the migration is over, the journal answers through the service.
    drop(served.dest);
    let (src, pending) = &mut source;
    let again = redeliver(src, pending, IO).expect("an Outcome from the journal");
    assert_eq!(again.outcome, OutcomeKind::Started);
    // Counted just after the answer went out.
    let t = std::time::Instant::now();
    while svc.stats().journal_answers == 0 && t.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(svc.stats().journal_answers, 1, "{:?}", svc.stats());
}
