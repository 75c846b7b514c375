//! The source's switch-over, the mirror image of [`crate::land`]'s: with
//! the guest paused and the final round sent, the vCPU state and Complete
//! (carrying the digest to verify) go out and the destination's Ack comes
//! back; then the source decides.
//!
//! From protocol version 2 the decision is a MACed Decision and the
//! destination answers with an Outcome once it acted: `Started` ends the
//! migration, `Discarded` or `Lost` mean the copy never ran (the guest is
//! resumed here). Without an answer the source is *in doubt*: it keeps its
//! guest paused, and delivers the decision again on a new connection
//! ([`redeliver`]) until it learns what happened. A source that gives up
//! before a valid Ack sends Abort, best effort, and resumes.

use std::time::{Duration, Instant};

use super::{fail, peer_error, Cause, Failure, Phase};
use crate::auth::Session;
use crate::guest::Guest;
use crate::memory::SourceMemory;
use crate::protocol::switchover::{Ack, Decision, Outcome, OutcomeKind};
use crate::protocol::{
    self, Kind, ProtocolError, DIGEST_LEN, FLAG_HAS_DIGEST, FLAG_INCREMENTAL, FLAG_VERIFIED,
};
use crate::transport::{with_keepalive, Control, SourceTransport, TransportError};
use crate::verify::VerifyMode;

/// What the Ack established.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Acked {
    /// Time spent digesting memory (inside the downtime).
    pub verify_time: Duration,
    pub verified: bool,
    pub digest: Option<[u8; DIGEST_LEN]>,
}

/// A decision the destination has not confirmed: what the source needs to
/// deliver it again ([`redeliver`]).
#[derive(Clone, Debug)]
pub struct Pending {
    pub session: Session,
    pub decision: Decision,
}

/// Sends the state and Complete after final round `round`, and waits for
/// the destination's Ack (its Alive records keep the wait alive while it
/// verifies). Any error here leaves the guest to be resumed.
pub(crate) fn complete<C: Control>(
    control: &mut C,
    guest: &mut dyn Guest,
    memory: &SourceMemory,
    (verify, ledger_sum): (VerifyMode, u128),
    round: u32,
    session: Option<&Session>,
    io: Duration,
) -> Result<Acked, Failure> {
    let state = guest.save_state().map_err(fail(Phase::State, round))?;
    control
        .send(&protocol::encode_record(
            Kind::State,
            0,
            guest.vcpus().into(),
            &state,
        ))
        .map_err(fail(Phase::State, round))?;
    let verify_start = Instant::now();
    let digest = match verify {
        VerifyMode::Strict => {
            let memory_digest = with_keepalive(control, session.is_some(), io / 4, || {
                // SAFETY: the guest is paused (the machine paused it before
                // the final round) and every worker finished its last round,
                // so nothing writes guest memory.
                unsafe { crate::memory::digest(memory) }
            })
            .map_err(fail(Phase::State, round))?;
            Some(protocol::switch_over_digest(&memory_digest, &state))
        }
        // The workers hashed the final round's pages as they sent them.
        VerifyMode::Incremental => Some(protocol::switch_over_digest(
            &crate::verify::sum_bytes(ledger_sum),
            &state,
        )),
        VerifyMode::Off => None,
    };
    let verify_time = verify_start.elapsed();
    let (flags, payload) = match (digest, verify) {
        (Some(d), VerifyMode::Incremental) => (FLAG_HAS_DIGEST | FLAG_INCREMENTAL, d),
        (Some(d), _) => (FLAG_HAS_DIGEST, d),
        (None, _) => (0, [0; DIGEST_LEN]),
    };
    let ack_phase = fail(Phase::Acknowledge, round);
    control
        .send(&protocol::encode_record(
            Kind::Complete,
            flags,
            round.into(),
            &payload,
        ))
        .map_err(fail(Phase::Acknowledge, round))?;
    let ack = control
        .recv_live(io)
        .map_err(fail(Phase::Acknowledge, round))?;
    let (ack_round, verified_flag, theirs) = match (ack.header.kind, session) {
        (Kind::Ack, Some(s)) => {
            let a = Ack::decode(ack.header.arg, ack.header.flags, &ack.payload, s)
                .map_err(fail(Phase::Acknowledge, round))?;
            (u64::from(a.round), a.verified, a.digest)
        }
        (Kind::Ack, None) => {
            let d = <[u8; DIGEST_LEN]>::try_from(&ack.payload[..]).map_err(|_| {
                ack_phase(Cause::Protocol(ProtocolError::Oversized {
                    kind: Kind::Ack,
                    len: ack.payload.len() as u32,
                    max: DIGEST_LEN as u32,
                }))
            })?;
            (ack.header.arg, ack.header.flags & FLAG_VERIFIED != 0, d)
        }
        (Kind::Error, _) => return Err(fail(Phase::Acknowledge, round)(peer_error(&ack.payload))),
        (got, _) => {
            return Err(fail(Phase::Acknowledge, round)(ProtocolError::Unexpected {
                got,
                expected: "Ack",
            }))
        }
    };
    if ack_round != u64::from(round) {
        return Err(fail(Phase::Acknowledge, round)(Cause::Peer(format!(
            "acknowledged round {ack_round}, not the final round {round}"
        ))));
    }
    let verified = match digest {
        Some(d) if !verified_flag || theirs != d => {
            return Err(fail(Phase::Acknowledge, round)(Cause::DigestMismatch));
        }
        Some(_) => true,
        None => false,
    };
    Ok(Acked {
        verify_time,
        verified,
        digest,
    })
}

/// Version 1's Commit: from here on the guest belongs to the destination.
/// If this send fails the Commit may or may not have arrived, so the guest
/// stays paused here rather than risk running twice.
pub(crate) fn commit_v1<C: Control>(control: &mut C, round: u32) -> Result<(), Failure> {
    control
        .send(&protocol::encode_record(Kind::Commit, 0, 0, &[]))
        .map_err(|e| Failure {
            phase: Phase::Decision,
            round,
            cause: Cause::InDoubt(e, None),
            abort: None,
        })
}

/// Version 2: sends the decision and waits for the destination's Outcome.
pub(crate) fn decide<C: Control>(
    control: &mut C,
    pending: &Pending,
    io: Duration,
) -> Result<Outcome, TransportError> {
    control.send(&pending.decision.encode(&pending.session))?;
    read_outcome(control, pending, io)
}

fn read_outcome<C: Control>(
    control: &mut C,
    pending: &Pending,
    io: Duration,
) -> Result<Outcome, TransportError> {
    let r = control.recv_live(io)?;
    match r.header.kind {
        Kind::Outcome => {
            let o = Outcome::decode(&r.payload, &pending.session)?;
            if o.verdict != pending.decision.verdict && o.outcome != OutcomeKind::Unknown {
                return Err(ProtocolError::BadMac(Kind::Outcome).into());
            }
            Ok(o)
        }
        Kind::Error => Err(TransportError::Other(format!(
            "destination reported: {}",
            String::from_utf8_lossy(&r.payload)
        ))),
        got => Err(ProtocolError::Unexpected {
            got,
            expected: "Outcome",
        }
        .into()),
    }
}

/// Delivers a pending decision again on a fresh control connection and
/// returns the destination's Outcome. The guest stays as it is (paused
/// after a Commit); what to do with the answer is the caller's:
/// `Started` — the migration is done; `Discarded` or `Lost` — the copy
/// never ran, the guest may resume here; `Unknown` — the destination has
/// no record (keep waiting, or an operator decides).
pub fn redeliver<T: SourceTransport>(
    transport: &mut T,
    pending: &Pending,
    io: Duration,
) -> Result<Outcome, TransportError> {
    transport.reconnect()?;
    decide(transport.control(), pending, io)
}

/// The Abort a source that gives up after Complete sends at once; true when
/// the destination confirmed it (else it is delivered again once the guest
/// runs here).
pub(crate) fn abort<C: Control>(control: &mut C, pending: &Pending, io: Duration) -> bool {
    decide(control, pending, io).is_ok_and(|o| o.outcome != OutcomeKind::Unknown)
}
