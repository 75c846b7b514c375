//! What can go wrong on a stream once it is set up, at either end: a work
//! request that completed with an error, a peer that went away or broke
//! the credit or immediate rules, a batch or payload that does not fit
//! where it must land. Every message starts with the stream's number.

use std::time::Duration;

use hpmig_core::protocol::ProtocolError;
use hpmig_core::transport::TransportError;
use thiserror::Error;

use crate::verbs::{VerbsError, WcOpcode, WcStatus};

/// Errors of one stream's sending or receiving half.
#[derive(Debug, Error)]
pub enum StreamError {
    /// a work request completed with an error status
    #[error("RDMA stream {worker}: {what} completed with status {status} (ibv_poll_cq, opcode {opcode})")]
    Completion {
        worker: u32,
        what: &'static str,
        status: WcStatus,
        opcode: WcOpcode,
    },
    /// a verbs call on the stream's queue pair or completion queues failed
    #[error("RDMA stream {worker}: {source}")]
    Verbs {
        worker: u32,
        #[source]
        source: VerbsError,
    },
    /// a receive completed with an opcode this end does not expect
    #[error("RDMA stream {worker}: unexpected receive opcode {got} (expected {expected})")]
    Opcode {
        worker: u32,
        got: WcOpcode,
        expected: &'static str,
    },
    /// the destination returned more credits than it has staging slots
    #[error("RDMA stream {worker}: the destination returned more credits ({credits}) than it has slots ({slots})")]
    Credits {
        worker: u32,
        credits: u32,
        slots: u32,
    },
    /// the destination closed the stream while this end waited for it
    #[error("RDMA stream {worker}: the destination closed the stream while this end waited for {waiting_for}")]
    PeerClosed {
        worker: u32,
        waiting_for: &'static str,
    },
    /// nothing completed for the stream's timeout
    #[error("RDMA stream {worker}: no progress for {timeout:?} while waiting for {waiting_for}")]
    Stalled {
        worker: u32,
        timeout: Duration,
        waiting_for: &'static str,
    },
    /// a batch is larger than the destination's staging slot
    #[error("RDMA stream {worker}: a {len}-byte batch does not fit the destination's {slot_size}-byte staging slot")]
    StagingOverflow {
        worker: u32,
        len: usize,
        slot_size: u64,
    },
    /// a record of the worker's batch does not decode (a bug on this side)
    #[error("RDMA stream {worker}: the record at byte {at} of a batch does not decode: {source}")]
    Record {
        worker: u32,
        at: usize,
        #[source]
        source: ProtocolError,
    },
    /// a remote address the destination gave wraps around the address space
    #[error(
        "RDMA stream {worker}: remote address {addr:#x}+{offset} wraps around the address space"
    )]
    RemoteWraps { worker: u32, addr: u64, offset: u64 },
    /// a payload's guest range is in none the destination registered for the stream
    #[error("RDMA stream {worker}: guest address {gpa:#x}+{len} is in no range the destination registered for this stream")]
    NotRegistered { worker: u32, gpa: u64, len: u64 },
    /// a batch's immediate names another stream, batch, or too long a length
    #[error("RDMA stream {worker}: batch immediate names worker {got_worker} batch {got_batch} of {got_len} bytes; expected worker {want_worker} batch {want_batch} of at most {max_len} bytes")]
    Immediate {
        worker: u32,
        got_worker: u32,
        got_batch: u32,
        got_len: usize,
        want_worker: u32,
        want_batch: u32,
        max_len: usize,
    },
    /// a payload's guest range is outside the guest memory the stream owns
    #[error("RDMA stream {worker}: a payload for guest address {gpa:#x} ({len} bytes) is outside the guest memory this stream owns")]
    OutsideGuest { worker: u32, gpa: u64, len: u32 },
    /// the lander asked for an in-place payload somewhere it did not land
    #[error("RDMA stream {worker}: the payload landed at {landed_at:#x} ({len} bytes) but was asked for at {asked_at:#x} ({asked_len} bytes)")]
    Misplaced {
        worker: u32,
        landed_at: usize,
        len: usize,
        asked_at: usize,
        asked_len: usize,
    },
    /// the lander read a staged payload into a buffer of another length
    #[error("RDMA stream {worker}: a {len}-byte payload was read into {asked_len} bytes")]
    PayloadLength {
        worker: u32,
        len: usize,
        asked_len: usize,
    },
    /// the lander read a payload before a header
    #[error("RDMA stream {worker}: a payload was read without a header")]
    NoHeader { worker: u32 },
    /// this end broke its own bookkeeping (a bug)
    #[error("RDMA stream {worker}: {what} (a bug)")]
    Internal { worker: u32, what: &'static str },
}

impl StreamError {
    /// Wraps a verbs error of stream `worker`.
    pub(crate) fn verbs(worker: u32) -> impl Fn(VerbsError) -> StreamError {
        move |source| StreamError::Verbs { worker, source }
    }
}

impl From<StreamError> for TransportError {
    fn from(e: StreamError) -> Self {
        TransportError::Device(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_error_keeps_its_words_and_stays_typed_inside_transport_error() {
        let e: TransportError = StreamError::Completion {
            worker: 3,
            what: "an RDMA WRITE",
            status: WcStatus::FLUSH_ERR,
            opcode: WcOpcode::RdmaWrite,
        }
        .into();
        let text = e.to_string();
        assert!(text.starts_with("RDMA stream 3: an RDMA WRITE completed with status "));
        assert!(
            text.contains("(5) (ibv_poll_cq, opcode IBV_WC_RDMA_WRITE (1))"),
            "{text}"
        );
        let TransportError::Device(inner) = &e else {
            panic!("not a device error: {e:?}");
        };
        assert!(matches!(
            inner.downcast_ref::<StreamError>(),
            Some(StreamError::Completion { worker: 3, .. })
        ));

        let e: TransportError = StreamError::verbs(7)(VerbsError::Call {
            call: "ibv_post_send",
            source: std::io::Error::from_raw_os_error(12),
        })
        .into();
        let text = e.to_string();
        assert!(
            text.starts_with("RDMA stream 7: ibv_post_send failed: "),
            "{text}"
        );
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("ibv_post_send failed: Cannot allocate memory (os error 12)"),
            "the verbs error is the cause"
        );
    }
}
