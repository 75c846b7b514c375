//! The destination's switch-over, the mirror image of the source's
//! ([`crate::precopy`]): verify what landed, restore the guest's state
//! before the Ack (a refusal then still lets the source resume), send the
//! Ack, and start the guest only on the source's Commit.

use super::receive::Landed;
use super::LandError;
use crate::guest::DestGuest;
use crate::protocol::{self, Kind, DIGEST_LEN, FLAG_VERIFIED};
use crate::transport::Control;

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
pub(crate) fn verify(landed: &Landed) -> Result<(u32, Verified), LandError> {
    let (vcpus, state) = landed.state.as_ref().ok_or(LandError::NoState)?;
    // What both ends verify: memory and state together.
    let digest = protocol::switch_over_digest(&landed.digest, state);
    let (final_round, source_digest) = landed.complete;
    let verified = match source_digest {
        Some(d) if d != digest => return Err(LandError::DigestMismatch),
        Some(_) => true,
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

/// Hands the state to the guest, before the Ack.
pub(crate) fn restore(
    guest: &mut dyn DestGuest,
    vcpus: u32,
    state: &[u8],
) -> Result<(), LandError> {
    guest.restore(vcpus, state).map_err(LandError::Restore)
}

/// Acknowledges the verified copy.
pub(crate) fn acknowledge<C: Control>(control: &mut C, v: &Verified) -> Result<(), LandError> {
    let flags = if v.verified { FLAG_VERIFIED } else { 0 };
    control.send(&protocol::encode_record(
        Kind::Ack,
        flags,
        v.final_round.into(),
        &v.digest,
    ))?;
    Ok(())
}

/// Waits for the source's decision. Until it commits it may still resume
/// its guest, so only a Commit lets this side run it.
pub(crate) fn await_commit<C: Control>(control: &mut C) -> Result<(), LandError> {
    match control.recv() {
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
