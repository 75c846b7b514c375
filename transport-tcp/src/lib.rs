//! hpmig-transport-tcp: the multi-stream TCP transport (one connection per
//! worker ring plus a control connection), payloads read straight into guest
//! memory at the destination.
//!
//! Not built yet: it implements `hpmig_core::transport::{SourceTransport,
//! DestTransport}` once written. Until then the engine runs over
//! `hpmig_core::transport::inproc`.
