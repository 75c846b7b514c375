//! The source side of a migration: rounds of harvest → diff → ring → wire,
//! the controller's verdict after each, then stop-and-copy and switch-over.
//!
//! The source is a state machine ([`machine::SourceState`]), the mirror
//! image of the destination's ([`crate::land`]):
//!
//! ```text
//!  Handshake ──▶ Setup ──▶ PreCopy(0) ──▶ PreCopy(r+1) ... ──▶ Drain(r) ──▶ StopAndCopy(r+1)
//!   offer         rings,     guest runs:      controller says    guest runs:   guest paused:
//!   (handshake)   streams,   harvest, diff,   continue / stop    Drain sent,   final harvest,
//!                 shadow,    send                                Drained back  final round
//!                 workers,                                       (version 3)        │
//!                 Ready                                                             ▼
//!                                   Migrated ◀── Decide ◀────── SwitchOver
//!                                   (guest is    Commit sent,    state, Complete
//!                                    the dest's)  Outcome back   (digest), Ack
//!
//!  any failure before a valid Ack ──▶ Abort sent (best effort), the guest
//!                                     resumed here (MigrateError::Failed)
//!  Outcome Discarded / Lost       ──▶ the copy never ran: resumed here
//!  no Outcome after the Commit    ──▶ in doubt: the guest stays paused
//!                                     (MigrateError::InDoubt, whose
//!                                     Pending `redeliver` delivers again)
//! ```
//!
//! Failure semantics: until the destination acknowledges that every byte is
//! applied (and, with verification, that the digests match), the guest
//! belongs to the source. Any failure before that resumes it here, and the
//! error names the phase and round. After the acknowledgement the guest stays
//! paused on the source: it now runs on the destination.

pub mod controller;
pub mod limiter;
pub mod live;
mod machine;
mod rounds;
mod switchover;
pub(crate) mod worker;

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::auth::Secret;
use crate::dirty::{DirtyError, DirtySource};
use crate::guest::{Guest, GuestError};
use crate::handshake::HandshakeError;
use crate::memory::{Layout, MemoryError, SourceMemory};
use crate::protocol::switchover::OutcomeKind;
use crate::protocol::{self, ErrorCode, Granularity, DIGEST_LEN};
use crate::ring::RingShape;
use crate::segment::compress::ZstdMode;
use crate::segment::EncoderConfig;
use crate::transport::{Control, Deadlines, SourceTransport, TransportError};
use crate::verify::{SentLedger, VerifyMode};
use controller::{Decision, Policy, Projection, RoundMetrics, StopReason};
pub use machine::SourceState;
pub use rounds::compress_this_round;
use std::sync::Arc;
pub use switchover::{redeliver, Pending};
pub use worker::WorkerStats;

/// How the source runs a migration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub encoder: EncoderConfig,
    /// Diff workers, each with its own ring and stream.
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the cores there are).
    pub pin: bool,
    pub policy: Policy,
    /// What the source remembers of what it sent (segment mode).
    pub shadow: ShadowMode,
    /// Cap the shadow at this many bytes (segment mode, [`ShadowMode::Full`]
    /// only); `None` = full copy.
    pub shadow_budget: Option<u64>,
    /// Each worker's ring; `None`: the transport's own
    /// ([`crate::transport::SourceTransport::ring_shape`]).
    pub ring: Option<RingShape>,
    /// What the switch-over proves (see [`crate::verify`]).
    pub verify: VerifyMode,
    /// Feature bits to offer (protocol::FEATURE_*).
    pub features: u32,
    /// The shared secret both ends prove they hold.
    pub secret: Secret,
    /// zstd for wide pages (offered to the destination unless `Off`).
    pub zstd: ZstdMode,
    /// Cap on the bytes all streams together put on the wire per second.
    pub bandwidth: Option<u64>,
    /// How long to wait on the destination (every wait is bounded by these).
    pub deadlines: Deadlines,
    /// The newest protocol version to offer (a test may speak an older one).
    pub max_version: u16,
    /// Test hook: wait this long between the Ack and the Commit, the guest
    /// paused (a test that the blackout measurement sees the whole pause).
    #[doc(hidden)]
    pub delay_commit: Duration,
    /// Test hook ([`ShadowMode::Fingerprint`]): from round 1 on, the
    /// fingerprint of the 64-byte block at this guest address reports
    /// "unchanged" whatever its bytes become, as an undetected collision
    /// would; the verification must refuse the copy.
    #[doc(hidden)]
    pub fingerprint_blind: Option<u64>,
    /// Progress published and steering read while it runs (see
    /// [`live`]); share a clone of the `Arc` to watch or steer.
    pub live: Arc<live::Live>,
}

impl SourceConfig {
    pub fn new(granularity: Granularity) -> Self {
        SourceConfig {
            encoder: EncoderConfig::new(granularity),
            workers: 2,
            pin: false,
            policy: Policy::default(),
            shadow: ShadowMode::default(),
            shadow_budget: None,
            ring: None,
            verify: VerifyMode::default(),
            features: 0,
            secret: Secret::none(),
            zstd: ZstdMode::Off,
            bandwidth: None,
            deadlines: Deadlines::default(),
            max_version: protocol::VERSION,
            delay_commit: Duration::ZERO,
            fingerprint_blind: None,
            live: Arc::new(live::Live::new()),
        }
    }

    /// The bytes the source keeps of what it sent, to find what changed,
    /// for a guest of `memory` bytes once every page was sent: the full
    /// shadow (at most `shadow_budget`), 8 bytes of fingerprint per 64-byte
    /// block, or nothing at page granularity.
    pub fn diff_store_bytes(&self, memory: u64) -> u64 {
        use crate::segment::fingerprint::BLOCK;
        match (self.encoder.granularity, self.shadow) {
            (Granularity::Page, _) => 0,
            (_, ShadowMode::Fingerprint) => memory / BLOCK as u64 * 8,
            (_, ShadowMode::Full) => self.shadow_budget.map_or(memory, |b| b.min(memory)),
        }
    }
}

/// What the source keeps of the bytes it sent, to find a re-dirtied page's
/// changed bytes (segment mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShadowMode {
    /// A byte-exact copy of every page sent (up to `shadow_budget`): the
    /// diff finds changed bytes exactly ([`crate::segment::shadow`]).
    #[default]
    Full,
    /// One keyed 64-bit hash per 64-byte block, 1/8 of guest memory: the
    /// changed blocks go whole ([`crate::segment::fingerprint`]).
    Fingerprint,
}

impl std::str::FromStr for ShadowMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(ShadowMode::Full),
            "fingerprint" => Ok(ShadowMode::Fingerprint),
            other => Err(format!(
                "unknown shadow '{other}' (expected full or fingerprint)"
            )),
        }
    }
}

impl ShadowMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowMode::Full => "full",
            ShadowMode::Fingerprint => "fingerprint",
        }
    }
}

/// The phases a migration goes through, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Setup,
    Handshake,
    PreCopy,
    /// Waiting, the guest still running, for the destination to land the
    /// last pre-copy round.
    Drain,
    StopAndCopy,
    State,
    Acknowledge,
    Decision,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Setup => "setup",
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::Drain => "drain",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::State => "state transfer",
            Phase::Acknowledge => "acknowledge",
            Phase::Decision => "decision",
        })
    }
}

/// Why a migration failed. In every case the guest runs on the source.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// something failed; the guest was resumed on the source
    #[error("migration failed during {phase} (round {round}): {cause}; the guest keeps running on the source")]
    Failed {
        phase: Phase,
        round: u32,
        #[source]
        cause: Cause,
    },
    /// the controller gave up under the abort policy
    #[error(
        "migration aborted after round {round}: {reason:?}; the guest keeps running on the source"
    )]
    Aborted { round: u32, reason: StopReason },
    /// the destination may run the guest (the Commit went out, no Outcome
    /// came back): the guest stays paused here until the outcome is known
    #[error("migration in doubt after round {round}: {cause}; the guest stays PAUSED on the source: the destination may run it; deliver the decision again or check the destination before resuming it")]
    InDoubt {
        round: u32,
        cause: Cause,
        /// What delivering the decision again needs (version 2 peers).
        pending: Option<Box<Pending>>,
    },
    /// the operator cancelled it before the Commit went out
    #[error("migration cancelled by the operator during {phase} (round {round}); the guest keeps running on the source")]
    Cancelled { phase: Phase, round: u32 },
    /// the guest could not be resumed after a failure: it is stopped
    #[error("migration failed during {phase} (round {round}): {cause}; resuming the guest on the source ALSO failed: {resume}")]
    ResumeFailed {
        phase: Phase,
        round: u32,
        cause: Cause,
        resume: GuestError,
    },
}

/// The underlying cause of a failed migration.
#[derive(Debug, Error)]
pub enum Cause {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// the destination refused or failed
    #[error("destination reported: {0}")]
    Peer(String),
    /// memory could not be set up
    #[error("{0}")]
    Setup(String),
    /// the handshake failed (refused, wrong token, ...)
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// no Outcome after the Commit: the destination may or may not run the guest
    #[error("no answer to the Commit ({0}); the destination may or may not have run the guest")]
    InDoubt(TransportError, Option<Box<Pending>>),
    /// the destination did not run the copy (it discarded it, or lost it
    /// restarting): the guest resumes here
    #[error("the destination did not run the guest ({0:?}): it resumes here")]
    NotStarted(OutcomeKind),
    /// the controller gave up (abort policy)
    #[error("the controller gave up: {0:?}")]
    Aborted(StopReason),
    /// the operator cancelled the migration
    #[error("cancelled by the operator")]
    Cancelled,
    /// digests differ after switch-over
    #[error("destination memory digest differs from the source's")]
    DigestMismatch,
}

/// One round as reported to the user.
#[derive(Clone, Debug)]
pub struct RoundReport {
    pub metrics: RoundMetrics,
    pub stats: WorkerStats,
    pub projection: Projection,
    pub decision: Decision,
    /// True for the stop-and-copy round.
    pub last: bool,
}

/// The outcome of a successful migration.
#[derive(Clone, Debug)]
pub struct MigrationReport {
    pub granularity: Granularity,
    pub rounds: Vec<RoundReport>,
    pub stop: StopReason,
    pub total_time: Duration,
    /// From pausing the guest to the destination's answer to the Commit
    /// (version 1: to the Commit sent).
    pub downtime: Duration,
    /// Where the downtime went, phase by phase.
    pub switchover: SwitchoverTimes,
    /// The policy's downtime target, to hold the downtime against.
    pub downtime_target: Duration,
    /// When the destination's vCPUs started, ns since the Unix epoch on its
    /// clock (0 from a version 1 destination).
    pub started_at: u64,
    /// The part of the downtime spent digesting memory for verification
    /// (the source's digest; the destination digests at the same time).
    pub verify_time: Duration,
    pub wire_bytes: u64,
    pub verified: bool,
    pub digest: Option<[u8; DIGEST_LEN]>,
    /// The verification the migration ran (a version 1 peer turns
    /// incremental into strict).
    pub verify: VerifyMode,
    /// Incremental verification: the ledger of what was sent, for the
    /// check of the source's memory once the guest left it
    /// ([`SentLedger::check`]).
    pub sent: Option<Arc<SentLedger>>,
}

/// The switch-over on the source's clock, phase by phase. `downtime` is
/// measured from the pause's end; the phases after it add up to it, up to
/// the bookkeeping between them. `drain` comes before the pause and is not
/// part of the downtime.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SwitchoverTimes {
    /// Drain sent until the destination's Drained: it landed (and hashed)
    /// the last pre-copy round. The guest still runs: NOT downtime (zero
    /// with a version 1 or 2 destination, which knows no drain).
    pub drain: Duration,
    /// When `Guest::pause` returned: the downtime's start, on this
    /// process's monotonic clock (for an observer in the same process).
    pub paused_at: Option<Instant>,
    /// `Guest::pause` itself (before the downtime starts: vCPUs may still run).
    pub pause: Duration,
    /// The last harvest of the dirty log, the guest paused.
    pub harvest: Duration,
    /// The final round: its records written and their RoundEnds sent.
    pub final_round: Duration,
    /// State and Complete sent, until the destination's Ack: its landing of
    /// the final round, its verification and its restore of the vCPUs.
    pub acknowledge: Duration,
    /// Commit sent, until the Outcome says the destination's vCPUs run
    /// (zero with a version 1 destination, which sends no Outcome).
    pub decision: Duration,
}

impl MigrationReport {
    /// Whether the guest's pause stayed within the policy's target.
    pub fn downtime_target_met(&self) -> bool {
        self.downtime <= self.downtime_target
    }

    /// Wire bytes of every round after round 0.
    pub fn wire_bytes_after_round0(&self) -> u64 {
        self.rounds
            .iter()
            .skip(1)
            .map(|r| r.metrics.wire_bytes)
            .sum()
    }

    pub fn converged(&self) -> bool {
        self.stop.converged()
    }
}

/// A failure inside the machine: where it happened and why.
pub(crate) struct Failure {
    pub phase: Phase,
    pub round: u32,
    pub cause: Cause,
    /// An Abort the destination should hear (it may hold a copy): sent
    /// again on a fresh connection once the guest runs here again.
    pub abort: Option<Box<Pending>>,
}

pub(crate) fn fail<E: Into<Cause>>(phase: Phase, round: u32) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        phase,
        round,
        cause: e.into(),
        abort: None,
    }
}

/// The cause for an Error record the destination sent.
pub(crate) fn peer_error(payload: &[u8]) -> Cause {
    Cause::Peer(String::from_utf8_lossy(payload).into_owned())
}

/// Migrates `memory` through `transport`. `dirty` must see every write to
/// guest memory (for a KVM guest: KVM's log combined with the VMM bitmap);
/// `on_round` is called after every round, for progress output.
///
/// On `Err`, the error says where the guest is: [`MigrateError::Failed`]
/// and [`MigrateError::Aborted`] resumed it here; [`MigrateError::InDoubt`]
/// left it paused, since the destination may run it.
pub fn migrate<T: SourceTransport>(
    memory: &SourceMemory,
    dirty: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    transport: &mut T,
    cfg: &SourceConfig,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<MigrationReport, MigrateError> {
    let live = Arc::clone(&cfg.live);
    let result = migrate_inner(memory, dirty, guest, transport, cfg, on_round);
    let (stage, error) = match &result {
        Ok(_) => (live::Stage::Migrated, None),
        Err(MigrateError::Cancelled { .. }) => (live::Stage::Cancelled, None),
        Err(e @ MigrateError::InDoubt { .. }) => (live::Stage::InDoubt, Some(e.to_string())),
        Err(e) => (live::Stage::Failed, Some(e.to_string())),
    };
    let (downtime, switchover) = result
        .as_ref()
        .map_or((Duration::ZERO, SwitchoverTimes::default()), |r| {
            (r.downtime, r.switchover)
        });
    live.end(
        stage,
        live::Ended {
            downtime,
            switchover,
            error,
        },
    );
    result
}

fn migrate_inner<T: SourceTransport>(
    memory: &SourceMemory,
    dirty: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    transport: &mut T,
    cfg: &SourceConfig,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<MigrationReport, MigrateError> {
    let layout = Layout::of(memory).map_err(|e| MigrateError::Failed {
        phase: Phase::Setup,
        round: 0,
        cause: e.into(),
    })?;
    cfg.live.start(
        layout.total_bytes(),
        layout.page_size() as u64,
        cfg.bandwidth,
        cfg.policy.downtime_target,
    );
    let mut source = machine::Source::new(layout, memory, dirty, guest, transport, cfg, on_round);
    let result = source.run();
    let pause_attempted = source.pause_attempted();
    let (guest, transport) = source.into_parts();
    match result {
        Ok(report) => Ok(report),
        Err(Failure {
            phase,
            round,
            cause,
            abort,
        }) => {
            let code = if matches!(cause, Cause::Peer(_)) {
                ErrorCode::Aborted
            } else {
                ErrorCode::Protocol
            };
            // Best effort: the peer may be gone already. After the Ack the
            // Abort below says it (the destination waits for a Decision).
            if abort.is_none() {
                let _ = transport
                    .control()
                    .send(&protocol::encode_error(code, &cause.to_string()));
            }
            if let Cause::Aborted(reason) = cause {
                return Err(MigrateError::Aborted { round, reason });
            }
            if let Cause::InDoubt(e, pending) = cause {
                return Err(MigrateError::InDoubt {
                    round,
                    cause: Cause::InDoubt(e, None),
                    pending,
                });
            }
            // A pause that failed may still have stopped some vCPUs: resume
            // whenever one was attempted.
            if pause_attempted {
                if let Err(resume) = guest.resume() {
                    return Err(MigrateError::ResumeFailed {
                        phase,
                        round,
                        cause,
                        resume,
                    });
                }
            }
            if let Some(abort) = abort {
                // The guest runs here again; now make sure the destination
                // drops its copy (it would hold it, in doubt, otherwise):
                // on this connection, else on a fresh one.
                let io = cfg.deadlines.io;
                if !switchover::abort(transport.control(), &abort, io) {
                    match switchover::redeliver(transport, &abort, io) {
                        Ok(o) => tracing::info!(outcome = ?o.outcome, "the destination heard the Abort"),
                        Err(e) => tracing::warn!(
                            "the destination did not confirm the Abort ({e}): it may hold a copy, which it will not run without a Commit"
                        ),
                    }
                }
            }
            if matches!(cause, Cause::Cancelled) {
                return Err(MigrateError::Cancelled { phase, round });
            }
            Err(MigrateError::Failed {
                phase,
                round,
                cause,
            })
        }
    }
}
