//! Land: the destination side of a migration, the mirror image of
//! [`crate::precopy`].
//!
//! The destination is a state machine ([`DestState`]):
//!
//! ```text
//!  Handshake ──▶ Setup ──▶ Receiving ──────────▶ Verify ──▶ Restore ──▶ Acknowledged ──▶ Running
//!   answer        memory     one lander per        every       DestGuest::   Ack sent;       Commit:
//!   (handshake)   given,     stream; rounds        stream's    restore       wait for the    DestGuest::
//!                 streams    land in place;        final       (before the   decision        start
//!                 accepted,  control: State,       round,      Ack, so a
//!                 Ready      Complete              digests     refusal still
//!                                                  compared    lets the source
//!                                                              resume)
//!  any failure ──▶ the guest is discarded (DestGuest::discard), the source is told why
//! ```
//!
//! While Receiving, a version 3 source's Drain for round r is answered with
//! Drained once every stream landed (and hashed) round r, so the source
//! pauses its guest only after that (see `receive`).
//!
//! [`StreamLander`] applies one stream: each record header is checked against the
//! guest memory layout (inside one page of one region) and against the
//! stream's own share of pages before its payload is read straight into the
//! guest page; round ends are checked for order, count and CRC-32.
//! [`receive`] runs the machine from the handshake, [`accept`] plus
//! [`receive_accepted`] split it where the caller allocates memory between
//! the two (after the source proved it holds the token).
//!
//! The records assume destination memory starts zeroed (a zero marker or a
//! segment leaves the rest of its page as it was). Unless the caller vouches
//! for it ([`DestConfig::memory_zeroed`], e.g. memory fresh from
//! [`Layout::allocate`]), Setup checks every page before round 0 and zeroes
//! those that are not.

pub mod journal;
mod lander;
mod machine;
mod receive;
mod replay;
mod switchover;

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::guest::{DestGuest, GuestError};
use crate::handshake::{self, Accepted, HandshakeError, Terms};
use crate::memory::{DestMemory, Layout, MemoryError};
use crate::protocol::switchover::{Outcome, OutcomeKind, Verdict};
use crate::protocol::{Granularity, Kind, ProtocolError, DIGEST_LEN};
use crate::transport::{Deadlines, DestTransport, TransportError};
use journal::{Journal, JournalEvent};
pub use lander::StreamLander;
pub use machine::DestState;
pub use replay::{land_stream, SliceRx};
pub use switchover::{answer_from_journal, Undecided};

/// Why a record was not applied. Nothing of the record was written.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    OutOfRange(#[from] MemoryError),
    /// a page address that is not page-aligned for a whole-page record
    #[error("{kind:?} record at unaligned address {gpa:#x}")]
    Unaligned { kind: Kind, gpa: u64 },
    /// a record for a page another stream owns
    #[error("record for guest address {gpa:#x} on stream {stream}, which does not own that page")]
    NotOwned { gpa: u64, stream: usize },
    /// the round-end checksum does not match the records received
    #[error("round {round}: checksum mismatch (source {expected:#010x}, received {got:#010x})")]
    Checksum { round: u32, expected: u32, got: u32 },
    /// the round-end record count does not match
    #[error("round {round}: {got} records received, source sent {expected}")]
    Count { round: u32, expected: u64, got: u64 },
    /// a round ended out of order
    #[error("round {got} ended where round {expected} was due")]
    RoundOrder { expected: u32, got: u32 },
    /// a record type that has no place on a data stream
    #[error("unexpected {0:?} record on a data stream")]
    Unexpected(Kind),
    /// a compressed page that does not decompress to exactly one page
    #[error("{0}")]
    Corrupt(String),
    /// a compressed page without the zstd feature
    #[error("compressed page received, but zstd was not negotiated")]
    NotNegotiated,
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why the destination gave up. In every case the guest must not run.
#[derive(Debug, Error)]
pub enum LandError {
    /// the handshake failed: refused, wrong token, too large
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// a data stream failed in a round
    #[error("stream {stream}, round {round}: {cause}")]
    Stream {
        stream: usize,
        round: u32,
        #[source]
        cause: ApplyError,
    },
    /// the control exchange failed
    #[error("control exchange: {0}")]
    Control(#[from] TransportError),
    /// the control exchange broke protocol
    #[error("control exchange: {0}")]
    Protocol(#[from] ProtocolError),
    /// the source reported an error and gave up
    #[error("source reported: {0}")]
    Peer(String),
    /// the source completed, but a stream ended in another round
    #[error("stream {stream} ended in round {got}, source completed round {expected}")]
    FinalRound {
        stream: usize,
        expected: u32,
        got: u32,
    },
    /// the guest refused its state record (it does not fit this host, or
    /// does not decode)
    #[error("restoring the guest's state: {0}")]
    Restore(#[source] GuestError),
    /// the source completed without sending vCPU state
    #[error("source completed without sending vCPU state")]
    NoState,
    /// the guest could not be started after the Commit
    #[error("starting the guest after the Commit: {0}")]
    Start(#[source] GuestError),
    /// the source did not commit after the acknowledgement: it may have
    /// resumed its guest, so this one must not run
    #[error(
        "no Commit from the source after the acknowledgement ({0}); the guest must not run here"
    )]
    NoCommit(String),
    /// the memory digest differs from the source's
    #[error("guest memory digest differs from the source's")]
    DigestMismatch,
    /// the source sent no digest, and this destination requires one
    #[error("the source completed without a digest to verify, and this destination requires verification (--require-verified)")]
    Unverified,
    /// the source decided to keep its guest: the copy was discarded
    #[error("the source aborted after the acknowledgement; the copy was discarded")]
    Aborted,
    /// no decision arrived for an acknowledged copy: it is held, paused,
    /// until the source's decision comes again or an operator resolves it
    #[error("in doubt: the copy of session {} (round {}) was acknowledged and no decision arrived; it is held paused here, neither run nor discarded, until the source's decision arrives or an operator resolves it", .0.id(), .0.round)]
    InDoubt(Undecided),
    /// the session journal could not be written: the destination cannot
    /// promise to answer truthfully after a restart, so it does not act
    #[error("session journal: {0}")]
    Journal(#[source] std::io::Error),
    /// not a migration: a source's decision came again and was answered
    /// from the journal with this outcome
    #[error("answered a decision delivered again, from the journal: {0:?}")]
    Answered(OutcomeKind),
}

impl LandError {
    /// The phase of the migration the destination was in when it failed.
    pub fn phase(&self) -> String {
        match self {
            LandError::Handshake(_) => "handshake".into(),
            LandError::Stream { round, .. } => format!("round {round}"),
            LandError::Control(_) | LandError::Protocol(_) | LandError::Peer(_) => {
                "pre-copy (control exchange)".into()
            }
            LandError::FinalRound { .. } | LandError::NoState | LandError::Restore(_) => {
                "state transfer".into()
            }
            LandError::DigestMismatch | LandError::Unverified => "acknowledge".into(),
            LandError::NoCommit(_)
            | LandError::Start(_)
            | LandError::Aborted
            | LandError::InDoubt(_)
            | LandError::Journal(_)
            | LandError::Answered(_) => "decision".into(),
        }
    }
}

/// A lander fault a test injects (never set outside tests): applied once,
/// to a segment of a round after round 0, after the round's CRC saw the
/// record intact — what incremental verification must catch and a CRC
/// cannot.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandFault {
    /// One byte written past the segment, into the next page.
    SpillIntoNextPage,
    /// The segment landed in the next page instead of its own.
    WrongPage,
}

/// What the destination accepts, and how long it waits.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// The handshake's terms: token, stream and memory limits, features.
    pub terms: Terms,
    /// The memory handed to [`receive`] is known to be zero (freshly mapped
    /// anonymous memory): skip the check before round 0.
    pub memory_zeroed: bool,
    /// Refuse a copy the source did not send a digest for.
    pub require_verified: bool,
    pub deadlines: Deadlines,
    /// How long [`receive`] waits for a decision delivered again once the
    /// first did not come, before it returns [`LandError::InDoubt`] (the
    /// copy still held; [`await_decision`] waits on).
    pub in_doubt_wait: Duration,
    /// Where sessions are journaled before the destination acts on a
    /// decision; without one, a restarted destination cannot answer a
    /// source that asks what became of its guest (it says Unknown, and the
    /// source holds its guest).
    pub journal: Option<Arc<dyn Journal>>,
    /// Test hook (see [`LandFault`]).
    #[doc(hidden)]
    pub fault: Option<LandFault>,
    /// Progress published while it lands (see [`crate::precopy::live`]):
    /// the stage, the round, bytes landed by kind per stream.
    pub live: Arc<crate::precopy::live::Live>,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            terms: Terms::default(),
            memory_zeroed: false,
            require_verified: false,
            deadlines: Deadlines::default(),
            in_doubt_wait: Duration::from_secs(60),
            live: Arc::default(),
            journal: None,
            fault: None,
        }
    }
}

/// Counts from one stream (summed over streams in [`Received`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LandStats {
    pub records: u64,
    /// Bytes received on the data streams, headers included.
    pub wire_bytes: u64,
    pub payload_bytes: u64,
    pub zero_pages: u64,
    pub whole_pages: u64,
    pub zstd_pages: u64,
    /// Segment and Words records.
    pub segments: u64,
    /// Words records (counted in `segments` too).
    pub word_pages: u64,
    pub rounds: u32,
    /// The sum of the stream's page-hash ledger (all streams' summed: the
    /// destination's ledger sum; 0 unless incremental).
    pub ledger_sum: u128,
    /// Wire bytes by what they carried (their sum is `wire_bytes`).
    pub bytes: crate::precopy::live::ByteKinds,
}

impl std::ops::AddAssign for LandStats {
    /// Sums the counts of two streams; `rounds` is the most either closed.
    fn add_assign(&mut self, o: Self) {
        self.records += o.records;
        self.wire_bytes += o.wire_bytes;
        self.payload_bytes += o.payload_bytes;
        self.zero_pages += o.zero_pages;
        self.whole_pages += o.whole_pages;
        self.zstd_pages += o.zstd_pages;
        self.segments += o.segments;
        self.word_pages += o.word_pages;
        self.rounds = self.rounds.max(o.rounds);
        self.bytes += o.bytes;
        self.ledger_sum = self.ledger_sum.wrapping_add(o.ledger_sum);
    }
}

/// A completed migration: the guest runs here now.
#[derive(Clone, Debug)]
pub struct Received {
    pub granularity: Granularity,
    pub vcpus: u32,
    pub final_round: u32,
    /// The source sent a digest and it matched.
    pub verified: bool,
    pub digest: [u8; DIGEST_LEN],
    pub stats: LandStats,
    /// When the guest's vCPUs started here, ns since the Unix epoch (0 for
    /// a version 1 source, which learns nothing of it).
    pub started_at: u64,
}

/// Answers the handshake on `transport` (see [`crate::handshake::answer`]);
/// with `expected`, a source whose layout differs is refused there too, and
/// so is a guest `guest` cannot host ([`DestGuest::admit`]). On failure the
/// source is told why. Nothing is allocated for the guest.
pub fn accept<T: DestTransport>(
    transport: &mut T,
    cfg: &DestConfig,
    expected: Option<&Layout>,
    guest: &mut dyn DestGuest,
) -> Result<Accepted, LandError> {
    let deadline = Instant::now() + cfg.deadlines.handshake;
    let mut admit = |g: &crate::protocol::GuestInfo| {
        guest
            .admit(g.vcpus, &g.requirements)
            .map_err(|e| e.to_string())
    };
    let result = handshake::answer(
        transport.control(),
        &cfg.terms,
        expected,
        deadline,
        &mut admit,
    );
    if let Err(HandshakeError::Redelivered(decision)) = &result {
        // A source in doubt, not a new migration: answer from the journal
        // (what a restarted destination knows), and say so to the caller.
        let answered = answer_from_journal(transport.control(), decision, cfg)?;
        return Err(LandError::Answered(answered.outcome));
    }
    let result = result.map_err(LandError::from);
    machine::tell_source(transport, &result);
    result
}

/// Receives one migration into `memory`: the handshake, then everything
/// [`receive_accepted`] does.
pub fn receive<T: DestTransport>(
    memory: &DestMemory,
    transport: &mut T,
    cfg: &DestConfig,
    guest: &mut dyn DestGuest,
) -> Result<Received, LandError> {
    machine::Dest::new(None, memory, transport, cfg, guest).run()
}

/// Lands an accepted migration into `memory`, which must have the Hello's
/// layout; restores the guest's state into `guest` before acknowledging, and
/// starts it once the source committed. On `Err` the guest was discarded.
pub fn receive_accepted<T: DestTransport>(
    accepted: &Accepted,
    memory: &DestMemory,
    transport: &mut T,
    cfg: &DestConfig,
    guest: &mut dyn DestGuest,
) -> Result<Received, LandError> {
    machine::Dest::new(Some(accepted.clone()), memory, transport, cfg, guest).run()
}

/// Waits, until `until`, for the decision on an in-doubt copy to arrive
/// again (a source reconnecting to deliver it), acts on it, answers the
/// source. `Err(LandError::InDoubt)` again when none came: the copy is
/// still held.
pub fn await_decision<T: DestTransport>(
    undecided: &Undecided,
    transport: &mut T,
    cfg: &DestConfig,
    guest: &mut dyn DestGuest,
    until: Instant,
) -> Result<Outcome, LandError> {
    switchover::await_redelivery(transport, undecided, guest, cfg, until)
}

/// Holds an in-doubt copy until the source's decision arrives again (then
/// acts on it and returns the outcome), or `stop` — asked about once a
/// second — says an operator resolves it instead (`None`).
pub fn hold<T: DestTransport>(
    undecided: &Undecided,
    transport: &mut T,
    cfg: &DestConfig,
    guest: &mut dyn DestGuest,
    stop: &mut dyn FnMut() -> bool,
) -> Option<Result<Outcome, LandError>> {
    loop {
        if stop() {
            return None;
        }
        let until = Instant::now() + Duration::from_secs(1);
        match switchover::await_redelivery(transport, undecided, guest, cfg, until) {
            Err(LandError::InDoubt(_)) => {}
            other => return Some(other),
        }
    }
}

/// What an operator may do with a copy held in doubt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Drop the copy (always allowed: the source's guest is the one that
    /// may run).
    Discard,
    /// Run the copy here without the source's decision: only on the
    /// operator's statement that the source's guest is fenced (stopped for
    /// good and cannot resume).
    Run { source_fenced: bool },
}

/// An operator's decision on a copy held in doubt (see [`Resolution`]).
/// Refused when it would risk the guest running twice.
pub fn resolve(
    undecided: &Undecided,
    cfg: &DestConfig,
    guest: &mut dyn DestGuest,
    resolution: Resolution,
) -> Result<Outcome, LandError> {
    let id = undecided.id();
    let (verdict, kind, at) = match resolution {
        Resolution::Discard => {
            guest.discard();
            if let Some(j) = &cfg.journal {
                j.record(id, JournalEvent::Discarded)
                    .map_err(LandError::Journal)?;
            }
            (Verdict::Abort, OutcomeKind::Discarded, 0)
        }
        Resolution::Run {
            source_fenced: false,
        } => {
            return Err(LandError::InDoubt(undecided.clone()));
        }
        Resolution::Run {
            source_fenced: true,
        } => {
            let at = journal::unix_nanos();
            if let Some(j) = &cfg.journal {
                j.record(id, JournalEvent::Started { at })
                    .map_err(LandError::Journal)?;
            }
            guest.start().map_err(LandError::Start)?;
            (Verdict::Commit, OutcomeKind::Started, at)
        }
    };
    Ok(Outcome {
        session: id,
        verdict,
        outcome: kind,
        round: undecided.round,
        started_at: at,
    })
}
