//! The destination's switch-over, the mirror image of the source's
//! ([`crate::precopy`]): verify what landed, restore the guest's state
//! before the Ack (a refusal then still lets the source resume), send the
//! Ack, and act on the source's decision.
//!
//! From protocol version 2 the decision is a MACed [`Decision`]: on Commit
//! the destination journals `Started` (durably, first), starts the guest and
//! answers `Outcome{Started, at}`; on Abort it discards the copy, journals
//! `Discarded` and answers so. Without a decision it holds its restored,
//! paused copy *in doubt* and waits for the source to deliver the decision
//! again on a new connection; only an operator may end that otherwise
//! ([`super::resolve`]). Version 1 sources send a bare Commit and expect no
//! answer; without it the copy is discarded, as version 1 did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::journal::{unix_nanos, Journal, JournalEvent};
use super::receive::Landed;
use super::{DestConfig, LandError};
use crate::auth::{Session, SessionId};
use crate::guest::DestGuest;
use crate::protocol::switchover::{Ack, Decision, Outcome, OutcomeKind, Verdict};
use crate::protocol::{self, Kind, ProtocolError, DIGEST_LEN, FLAG_VERIFIED};
use crate::transport::{Control, DestTransport};

/// What verification found.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Verified {
    pub final_round: u32,
    /// The source sent a digest and it matched.
    pub verified: bool,
    /// The digest of memory and state, as both ends compute it.
    pub digest: [u8; DIGEST_LEN],
}

/// Compares the landed memory and state with the source's digest.
pub(crate) fn verify(
    landed: &Landed,
    require_verified: bool,
) -> Result<(u32, Verified), LandError> {
    let (vcpus, state) = landed.state.as_ref().ok_or(LandError::NoState)?;
    let (final_round, source_digest, incremental) = landed.complete;
    // What both ends verify: memory (its ledger, or all of it) and state.
    let memory = if incremental {
        crate::verify::sum_bytes(landed.stats.ledger_sum)
    } else {
        landed.digest.unwrap_or([0; DIGEST_LEN])
    };
    let digest = protocol::switch_over_digest(&memory, state);
    let verified = match source_digest {
        Some(d) if d != digest => return Err(LandError::DigestMismatch),
        Some(_) => true,
        None if require_verified => return Err(LandError::Unverified),
        None => false,
    };
    Ok((
        *vcpus,
        Verified {
            final_round,
            verified,
            digest,
        },
    ))
}

/// Acknowledges the verified copy: version 2 with the session's MAC.
pub(crate) fn acknowledge<C: Control>(
    control: &mut C,
    v: &Verified,
    session: Option<&Session>,
) -> Result<(), LandError> {
    let ack = Ack {
        round: v.final_round,
        verified: v.verified,
        digest: v.digest,
    };
    let record = match session {
        Some(s) => ack.encode(s),
        None => {
            let flags = if v.verified { FLAG_VERIFIED } else { 0 };
            protocol::encode_record(Kind::Ack, flags, v.final_round.into(), &v.digest)
        }
    };
    control.send(&record)?;
    Ok(())
}

/// Version 1: waits for the bare Commit. Until it comes the source may
/// still resume its guest, so only a Commit lets this side run it.
pub(crate) fn await_commit_v1<C: Control>(control: &mut C, io: Duration) -> Result<(), LandError> {
    match control.recv_live(io) {
        Ok(r) if r.header.kind == Kind::Commit => Ok(()),
        Ok(r) if r.header.kind == Kind::Error => Err(LandError::NoCommit(
            String::from_utf8_lossy(&r.payload).into_owned(),
        )),
        Ok(r) => Err(LandError::NoCommit(format!(
            "unexpected {:?} record",
            r.header.kind
        ))),
        Err(e) => Err(LandError::NoCommit(e.to_string())),
    }
}

/// A copy acknowledged and not yet decided on: what a destination needs to
/// recognise the source's decision when it comes again.
#[derive(Clone, Debug)]
pub struct Undecided {
    pub session: Session,
    pub round: u32,
}

impl Undecided {
    pub fn id(&self) -> SessionId {
        self.session.id()
    }
}

/// Reads one decision for `u` from `control` within `io`; `None` when what
/// came is not one (nothing, a broken connection, a bad MAC, another
/// session: the copy stays in doubt).
pub(crate) fn read_decision<C: Control>(
    control: &mut C,
    u: &Undecided,
    io: Duration,
) -> Result<Decision, LandError> {
    let r = control.recv_live(io)?;
    if r.header.kind != Kind::Decision {
        return Err(ProtocolError::Unexpected {
            got: r.header.kind,
            expected: "Decision",
        }
        .into());
    }
    let d = Decision::decode(&r.payload, &u.session)?;
    if d.round != u.round {
        return Err(ProtocolError::BadMac(Kind::Decision).into());
    }
    Ok(d)
}

/// Acts on a decision: Commit journals `Started` (durable first), then
/// starts the guest; Abort discards it, then journals `Discarded`. Returns
/// the Outcome to answer with.
pub(crate) fn act(
    d: &Decision,
    guest: &mut dyn DestGuest,
    journal: Option<&Arc<dyn Journal>>,
) -> Result<Outcome, LandError> {
    let outcome = |kind, at| Outcome {
        session: d.session,
        verdict: d.verdict,
        outcome: kind,
        round: d.round,
        started_at: at,
    };
    match d.verdict {
        Verdict::Commit => {
            let at = unix_nanos();
            if let Some(j) = journal {
                j.record(d.session, JournalEvent::Started { at })
                    .map_err(LandError::Journal)?;
            }
            guest.start().map_err(LandError::Start)?;
            Ok(outcome(OutcomeKind::Started, at))
        }
        Verdict::Abort => {
            guest.discard();
            if let Some(j) = journal {
                j.record(d.session, JournalEvent::Discarded)
                    .map_err(LandError::Journal)?;
            }
            Ok(outcome(OutcomeKind::Discarded, 0))
        }
    }
}

/// Waits, until `until`, for the decision on `u` to arrive on a new
/// connection, acts on it and answers. A connection that brings anything
/// else is told why and dropped; one that asks about another session is
/// answered from the journal. `Err(LandError::InDoubt)` when none came.
pub(crate) fn await_redelivery<T: DestTransport>(
    transport: &mut T,
    u: &Undecided,
    guest: &mut dyn DestGuest,
    cfg: &DestConfig,
    until: Instant,
) -> Result<Outcome, LandError> {
    let io = cfg.deadlines.io;
    while Instant::now() < until {
        if !transport.accept_control((Instant::now() + io).min(until))? {
            continue;
        }
        let control = transport.control();
        let r = match control.recv(Instant::now() + io) {
            Ok(r) => r,
            Err(_) => continue,
        };
        if r.header.kind != Kind::Decision {
            let _ = control.send(&protocol::encode_error(
                protocol::ErrorCode::Refused,
                "this destination holds a copy in doubt and takes only its Decision",
            ));
            continue;
        }
        match Decision::session_of(&r.payload) {
            Ok(id) if id == u.id() => {}
            Ok(_) => {
                let _ = answer_from_journal(control, &r.payload, cfg);
                continue;
            }
            Err(_) => continue,
        }
        let d = match Decision::decode(&r.payload, &u.session) {
            Ok(d) if d.round == u.round => d,
            _ => {
                let _ = control.send(&protocol::encode_error(
                    protocol::ErrorCode::Refused,
                    "a Decision with a bad MAC",
                ));
                continue;
            }
        };
        let outcome = act(&d, guest, cfg.journal.as_ref())?;
        // The source learns the outcome from this answer; if it is lost it
        // asks again and the journal answers.
        let _ = control.send(&outcome.encode(Some(&u.session)));
        return Ok(outcome);
    }
    Err(LandError::InDoubt(u.clone()))
}

/// Answers a Decision for a session this process does not hold, from the
/// journal: `Started` or `Discarded` as recorded, `Lost` when the copy was
/// acknowledged and then lost with a restarted process (it never ran),
/// `Unknown` (without a MAC) when there is no record.
pub fn answer_from_journal<C: Control>(
    control: &mut C,
    decision: &[u8],
    cfg: &DestConfig,
) -> Result<Outcome, LandError> {
    let id = Decision::session_of(decision)?;
    let record = match &cfg.journal {
        Some(j) => j.lookup(id).map_err(LandError::Journal)?,
        None => None,
    };
    let Some(record) = record else {
        // Verdict and round are not known without the key; echo what came.
        let unknown = Outcome {
            session: id,
            verdict: decision
                .get(16)
                .and_then(|&v| (v == Verdict::Abort as u8).then_some(Verdict::Abort))
                .unwrap_or(Verdict::Commit),
            outcome: OutcomeKind::Unknown,
            round: 0,
            started_at: 0,
        };
        control.send(&unknown.encode(None))?;
        return Ok(unknown);
    };
    let session = cfg.terms.secret.session(record.nonces.0, record.nonces.1);
    let d = Decision::decode(decision, &session)?;
    let (outcome, at) = match record.last {
        JournalEvent::Started { at } => (OutcomeKind::Started, at),
        JournalEvent::Discarded => (OutcomeKind::Discarded, 0),
        JournalEvent::Acknowledged { .. } => (OutcomeKind::Lost, 0),
    };
    let o = Outcome {
        session: id,
        verdict: d.verdict,
        outcome,
        round: d.round,
        started_at: at,
    };
    control.send(&o.encode(Some(&session)))?;
    Ok(o)
}
