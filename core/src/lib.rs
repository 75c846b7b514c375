//! hpmig-core: everything in hpmig that is not a wire or a device.
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
//! [`precopy`] drives the rounds on the source (pinned workers, the
//! controller's stop decision, stop-and-copy, switch-over) and [`land`] is
//! the destination. [`memory`] holds the layout and page numbering both ends
//! share, [`protocol`] the wire format, [`vm`] the guests hpmig can run.
//!
//! The method is Cheng & Tan, "Efficient Method of Live Migration on Virtual
//! Machine Memory" (Computer Science 43(4), 2016): the pre-copy work set is
//! the dirty data inside pages, found by comparing each dirty page with the
//! copy last sent, instead of whole dirty pages.

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

/// The guest-memory crate hpmig's types are built on, re-exported so an
/// embedder uses the very version hpmig does.
pub use vm_memory;
