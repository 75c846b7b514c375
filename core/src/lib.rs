//! hpmig-core: the migration engine a VMM embeds. No wire (transports are
//! their own crates), no device, no test VM.
//!
//! One pre-copy round, in the order the data flows (each step is a module):
//!
//! ```text
//!  harvest           diff                 ring           wire              land
//!  dirty::*   ──▶   segment::*    ──▶    ring     ──▶   transport  ──▶   land
//!  fetch+clear      snapshot page,       page-aligned   StreamTx /       bounds-check,
//!  dirty bitmap     diff vs shadow,      send slots     StreamRx,        write in place,
//!                   emit segments        per worker     protocol         verify rounds
//! ```
//!
//! [`precopy`] is the source (a state machine: handshake, setup, pre-copy
//! rounds, stop-and-copy, switch-over) and [`land`] its mirror image, the
//! destination; [`handshake`] holds both halves of the opening exchange.
//! [`memory`] holds the layout and page numbering both ends share,
//! [`protocol`] the wire format.
//!
//! The method is Cheng & Tan, "Efficient Method of Live Migration on Virtual
//! Machine Memory" (Computer Science 43(4), 2016): the pre-copy work set is
//! the dirty data inside pages, found by comparing each dirty page with the
//! copy last sent, instead of whole dirty pages.
//!
//! # Embedding hpmig in a VMM
//!
//! `examples/embed/` does all of this in one file, with plain threads as
//! the guest's vCPUs.
//!
//! **Guest memory** is vm-memory's `GuestMemoryMmap` (re-exported as
//! [`vm_memory`], so an embedder uses the very version hpmig does): on the
//! source with the `AtomicBitmap` flavour ([`memory::SourceMemory`]), whose
//! bitmap records every write the VMM makes through the vm-memory API; on
//! the destination without ([`memory::DestMemory`]). Both ends must have the
//! same regions ([`memory::Layout`]), at most [`memory::MAX_REGIONS`].
//!
//! **On the source** the VMM provides:
//! - a [`guest::Guest`]: `pause` must stop every vCPU *and every device that
//!   writes guest memory* (DMA, virtio rings, ...) and return only once none
//!   does; `resume` undoes it, and is also called after a `pause` that
//!   failed (it must cope with a half-done pause); `save_state` returns the
//!   vCPU and device state as bytes the destination's `DestGuest` can read;
//! - a [`dirty::DirtySource`] that sees every write to guest memory: for a
//!   KVM guest, [`dirty::kvm::KvmDirtyLog`] (bitmap, manual clear or dirty
//!   ring) combined with [`dirty::vmm::VmmBitmap`] through
//!   [`dirty::Combined`], since KVM does not log the VMM's own writes;
//! - a [`transport::SourceTransport`] (TCP: `hpmig-transport-tcp`; RDMA:
//!   `hpmig-transport-rdma`; in-process: [`transport::inproc`]).
//!
//! It calls [`precopy::migrate`] with a [`precopy::SourceConfig`]. `Ok` means
//! the destination acknowledged a (verified) copy and got the Commit: the
//! guest is the destination's now and stays paused here; drop it.
//! [`precopy::MigrateError`] says where the guest is on failure:
//! `Failed` and `Aborted` resumed it here (it runs on, nothing is lost);
//! `InDoubt` left it paused because the destination may run it (do not
//! resume it before learning the destination's outcome); `ResumeFailed`
//! means the migration failed and resuming failed too.
//!
//! **On the destination** the VMM provides a [`guest::DestGuest`]:
//! `restore` checks the state record against this host and applies it to
//! vCPUs that do not run yet (an error refuses the copy before the Ack, so
//! the source resumes its guest); `start` runs them, called only after the
//! source's Commit; `discard` drops a restored guest that must not run.
//! It calls [`land::receive`] with memory for the source's layout (or
//! [`land::accept`], then allocates memory for the Hello's layout, then
//! [`land::receive_accepted`], so nothing is allocated before the source
//! proved it holds the token). `Ok` means the guest runs here;
//! [`land::LandError`] means it was discarded (and its `phase()` says when).
//! The records assume zeroed memory: unless [`land::DestConfig`]'s
//! `memory_zeroed` vouches for it, `receive` checks and zeroes it before
//! round 0.

pub mod auth;
pub mod dirty;
pub mod guest;
pub mod handshake;
pub mod land;
pub mod memory;
pub mod precopy;
pub mod protocol;
pub mod ring;
pub mod segment;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod verify;

/// The guest-memory crate hpmig's types are built on, re-exported so an
/// embedder uses the very version hpmig does.
pub use vm_memory;
