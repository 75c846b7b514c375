//! The source's switch-over, the mirror image of
//! [`crate::land`]'s: with the guest paused and the final round sent, the
//! vCPU state and Complete (carrying the digest to verify) go out, the
//! destination's Ack comes back, and the Commit gives the guest away.

use std::time::{Duration, Instant};

use super::{fail, peer_error, Cause, Failure, Phase};
use crate::guest::Guest;
use crate::memory::SourceMemory;
use crate::protocol::{self, Kind, ProtocolError, DIGEST_LEN, FLAG_HAS_DIGEST, FLAG_VERIFIED};
use crate::transport::Control;

/// What the Ack established.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Outcome {
    /// Time spent digesting memory (inside the downtime).
    pub verify_time: Duration,
    pub verified: bool,
    pub digest: Option<[u8; DIGEST_LEN]>,
}

/// Sends the state and Complete after final round `round`, and waits for
/// the destination's Ack. Any error here leaves the guest to be resumed.
pub(crate) fn complete<C: Control>(
    control: &mut C,
    guest: &mut dyn Guest,
    memory: &SourceMemory,
    verify: bool,
    round: u32,
) -> Result<Outcome, Failure> {
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
    let digest = verify.then(|| {
        // SAFETY: the guest is paused (the machine paused it before the
        // final round) and every worker finished its last round, so nothing
        // writes guest memory.
        let memory_digest = unsafe { crate::memory::digest(memory) };
        protocol::switch_over_digest(&memory_digest, &state)
    });
    let verify_time = verify_start.elapsed();
    let (flags, payload) = match digest {
        Some(d) => (FLAG_HAS_DIGEST, d),
        None => (0, [0; DIGEST_LEN]),
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
    let ack = control.recv().map_err(fail(Phase::Acknowledge, round))?;
    let verified = match ack.header.kind {
        Kind::Ack => {
            if ack.header.arg != u64::from(round) {
                return Err(ack_phase(Cause::Peer(format!(
                    "acknowledged round {}, not the final round {round}",
                    ack.header.arg
                ))));
            }
            match digest {
                Some(d) if ack.header.flags & FLAG_VERIFIED == 0 || ack.payload[..] != d => {
                    return Err(ack_phase(Cause::DigestMismatch));
                }
                Some(_) => true,
                None => false,
            }
        }
        Kind::Error => return Err(ack_phase(peer_error(&ack.payload))),
        got => {
            return Err(ack_phase(Cause::Protocol(ProtocolError::Unexpected {
                got,
                expected: "Ack",
            })))
        }
    };
    Ok(Outcome {
        verify_time,
        verified,
        digest,
    })
}

/// Commit: from here on the guest belongs to the destination. If this send
/// fails the Commit may or may not have arrived, so the guest stays paused
/// here rather than risk running twice.
pub(crate) fn commit<C: Control>(control: &mut C, round: u32) -> Result<(), Failure> {
    control
        .send(&protocol::encode_record(Kind::Commit, 0, 0, &[]))
        .map_err(|e| Failure {
            phase: Phase::Commit,
            round,
            cause: Cause::InDoubt(e),
        })
}
