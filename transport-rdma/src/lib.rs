//! hpmig-transport-rdma: the libibverbs transport.
//!
//! Data flow of one stream (one RC queue pair per worker):
//!
//! ```text
//! source worker ring slot (registered)          destination
//!   header | payload | header | payload  --RDMA WRITE-->  guest memory (in place)
//!   headers, zero markers, zstd pages    --RDMA WRITE-->  staging slot (same offsets)
//!   last work request: WRITE WITH IMM    ------------->   receive completion: batch landed
//!                                        <----SEND-----   credit: staging slot consumed
//! ```
//!
//! The handshake, state and commit go over TCP exactly as with the TCP
//! transport (see `hpmig_transport_tcp`); each stream's queue pair is set
//! up over its own authenticated TCP connection ([`setup`]). The
//! destination registers, for remote writes, each stream's share of guest
//! memory (one range per region the share touches) and its staging ring,
//! in a protection domain of the stream's own: a stream's keys reach the
//! pages its stream owns and its staging, no byte more, and its queue pair
//! accepts no other stream's key; the NIC refuses anything else with a
//! remote access error before it lands (`share`). Within its own pages a
//! source that holds the session's token can still write what it likes —
//! the final digest comparison is what proves the result. Staging is
//! capped for all streams together ([`setup::STAGING_CAP`], 64 MiB).
//!
//! Built only with the `rdma` feature (it needs rdma-core's libibverbs);
//! without it, [`unavailable`] says how to get it.

#[cfg(feature = "rdma")]
mod backoff;
#[cfg(feature = "rdma")]
pub mod device;
#[cfg(feature = "rdma")]
mod imm;
#[cfg(feature = "rdma")]
mod rx;
#[cfg(feature = "rdma")]
pub mod setup;
#[cfg(feature = "rdma")]
mod share;
#[cfg(feature = "rdma")]
mod stream;
#[cfg(feature = "rdma")]
mod tx;
#[cfg(feature = "rdma")]
pub mod verbs;

#[cfg(feature = "rdma")]
mod transport;
#[cfg(feature = "rdma")]
pub use imm::{imm, imm_parts};
#[cfg(feature = "rdma")]
pub use rx::RdmaRx;
#[cfg(feature = "rdma")]
pub use stream::StreamError;
#[cfg(feature = "rdma")]
#[doc(hidden)]
pub use transport::Answers;
#[cfg(feature = "rdma")]
pub use transport::{EndpointError, QueuePairs, RdmaDest, RdmaOptions, RdmaSource};
#[cfg(feature = "rdma")]
pub use tx::{RdmaStats, RdmaTx, POST_CHUNK};

/// Whether this build has the RDMA transport.
pub const ENABLED: bool = cfg!(feature = "rdma");

/// What to tell a user who asked for RDMA in a build without it.
pub fn unavailable() -> String {
    "this hpmig was built without RDMA support: install rdma-core's development files \
     (Debian/Ubuntu: apt-get install libibverbs-dev librdmacm-dev libclang-dev clang) \
     and rebuild with `cargo build --release --features rdma`"
        .to_string()
}
