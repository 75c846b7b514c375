//! hpmig-transport-rdma: the libibverbs transport. Segment payloads go as
//! RDMA WRITE (WITH IMMEDIATE to close a batch) to region base + guest
//! address, so they land in place in the destination's guest memory.
//!
//! Not built yet: it implements `hpmig_core::transport::{SourceTransport,
//! DestTransport}` once written, over the page-aligned rings of
//! `hpmig_core::ring` registered as memory regions.
