//! What the engine needs from the VMM that runs the guest, on each side.
//!
//! On the source, a [`Guest`]: the engine pauses it for the final round,
//! reads its vCPU and device state, and resumes it if the migration fails.
//! On the destination, a [`DestGuest`]: the engine hands it the state record
//! to check and restore *before* it acknowledges the copy (so a state that
//! cannot be restored fails the migration while the source can still resume
//! its guest), starts it only once the source committed, and discards it
//! otherwise. The two are mirror images: `pause`/`save_state` on one side,
//! `restore`/`start` on the other; `resume` and `discard` undo them.

use thiserror::Error;

use crate::memory::DestMemory;

/// Errors of controlling a guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// the guest could not be paused
    #[error("pausing the guest: {0}")]
    Pause(String),
    /// the guest could not be resumed
    #[error("resuming the guest: {0}")]
    Resume(String),
    /// the guest cannot be built as asked
    #[error("guest configuration: {0}")]
    Config(String),
    /// the guest's state could not be read or applied
    #[error("guest state: {0}")]
    State(String),
}

/// The source's guest: what the engine needs from the guest it moves.
///
/// Contract: after `pause` returns `Ok`, nothing writes guest memory (every
/// vCPU is stopped, and so is every device that writes guest memory: DMA,
/// virtio queues, ...) until `resume`. If `pause` fails, the engine calls
/// `resume` anyway: a pause that stopped some vCPUs and then failed must
/// leave the guest able to run again.
pub trait Guest {
    /// Stops every vCPU and every device writing guest memory; returns once
    /// none runs.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets the guest run again (after a failed migration, or a failed
    /// pause). Must be safe to call whatever `pause` left behind.
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The vCPU (and device) state, while paused. Any bytes: the engine
    /// carries them to the destination's [`DestGuest::restore`] unchanged.
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// vCPUs the state record describes.
    fn vcpus(&self) -> u32;
    /// What the guest needs of a host (CPU features, state sizes, ...), as
    /// bytes the destination's [`DestGuest::admit`] reads, at most
    /// [`crate::protocol::MAX_REQUIREMENTS`]: sent in the Hello so a host
    /// that cannot run the guest refuses before round 0.
    fn requirements(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The destination's guest: what the engine needs from the VMM that will
/// run the guest it receives.
///
/// The engine calls `restore` once every byte of memory landed (and was
/// verified, when the source asked for it), before it acknowledges the copy
/// to the source; then exactly one of `start` (the source committed: the
/// guest is now this side's) or `discard` (anything else).
pub trait DestGuest {
    /// Whether this host can run a guest of `vcpus` vCPUs needing
    /// `requirements` (the source's [`Guest::requirements`]); asked at the
    /// handshake, before any memory is allocated. An error refuses the
    /// source with its message.
    fn admit(&mut self, vcpus: u32, requirements: &[u8]) -> Result<(), GuestError> {
        let _ = (vcpus, requirements);
        Ok(())
    }
    /// Called once guest memory is allocated, before round 0: prepares
    /// what restoring needs that costs time in proportion to guest memory
    /// (for a VM: creating it and registering its memory), so that none of
    /// it falls into the pause. Optional: a failure here only means that
    /// `restore` does the work itself.
    fn prepare(&mut self, memory: &DestMemory, vcpus: u32) {
        let _ = (memory, vcpus);
    }
    /// Checks the state record against this host and applies it to vCPUs
    /// that are created but not running, on `memory` (where every byte
    /// landed). An error here refuses the copy: the source is told and
    /// resumes its guest.
    fn restore(&mut self, memory: &DestMemory, vcpus: u32, state: &[u8]) -> Result<(), GuestError>;
    /// Starts the restored vCPUs. Called only after the source gave the
    /// guest up (its Commit), so nothing but starting may remain here.
    fn start(&mut self) -> Result<(), GuestError>;
    /// Drops a restored guest that must not run (no Commit).
    fn discard(&mut self);
}
