//! Wire: the small trait every transport implements.
//!
//! A transport carries one ordered control exchange and one ordered data
//! stream per worker. The source fills ring slots ([`SendBuf`]) and hands them
//! to its [`StreamTx`]; the destination pulls records from its [`StreamRx`]
//! one header at a time and reads each payload straight into the guest page
//! it lands in. The in-process transport ([`inproc`]) serves tests and the
//! library; TCP and RDMA live in their own crates.
//!
//! Interrupting: every endpoint has an [`Interrupt`]; once triggered, that
//! endpoint's blocking calls return [`TransportError::Interrupted`] soon,
//! while sending stays possible, so a side that failed in one thread can
//! unblock its others and still tell the peer why.

pub mod inproc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::auth::Session;
use crate::memory::DestMemory;
use crate::protocol::{Header, ProtocolError};
use crate::ring::{Ring, SendBuf};

/// Errors of moving bytes.
#[derive(Debug, Error)]
pub enum TransportError {
    /// the peer went away
    #[error("peer disconnected")]
    Disconnected,
    /// this endpoint was interrupted because another part of it failed
    #[error("interrupted")]
    Interrupted,
    /// an I/O call failed
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// the peer sent bytes that are not a valid record
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// a transport-specific failure (a device, a verbs call, ...), typed by
    /// the transport that raised it
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// a failure described in words only
    #[error("{0}")]
    Other(String),
}

/// A control record received whole.
#[derive(Clone, Debug)]
pub struct ControlRecord {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// The ordered control exchange (handshake, state, complete, acknowledge).
pub trait Control: Send {
    /// Sends one encoded record.
    fn send(&mut self, record: &[u8]) -> Result<(), TransportError>;
    /// Receives one record; its length was capped before the payload was read.
    fn recv(&mut self) -> Result<ControlRecord, TransportError>;
}

/// The sending half of one data stream.
pub trait StreamTx: Send {
    /// A free ring slot to fill, waiting until the wire released one.
    fn take_free(&mut self) -> Result<SendBuf, TransportError>;
    /// Sends the filled part of `buf`; the slot comes back through `take_free`.
    fn submit(&mut self, buf: SendBuf) -> Result<(), TransportError>;
}

/// The receiving half of one data stream.
pub trait StreamRx: Send {
    /// The next record's header, capped for `page_size`. Its payload must be
    /// read with [`StreamRx::read_payload`] before the next call.
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError>;
    /// Reads the current record's payload (exactly `dst.len()` bytes).
    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError>;
}

/// The source's end of a transport.
pub trait SourceTransport {
    type Control: Control;
    type Tx: StreamTx + 'static;
    fn control(&mut self) -> &mut Self::Control;
    /// Opens one data stream per ring (the ring's slots become the
    /// stream's), bound to the handshake's `session`.
    fn open_streams(
        &mut self,
        rings: Vec<Ring>,
        session: &Session,
    ) -> Result<Vec<Self::Tx>, TransportError>;
    fn interrupt(&self) -> Interrupt;
}

/// The destination's end of a transport.
pub trait DestTransport {
    type Control: Control;
    type Rx: StreamRx + 'static;
    fn control(&mut self) -> &mut Self::Control;
    /// Accepts the `n` data streams the source announced in its Hello; a
    /// connection that cannot show `session`'s tag is refused. `memory` is
    /// the guest memory the streams land in, already allocated: a transport
    /// that lands payloads itself (RDMA registers it for remote writes) uses
    /// it, the others ignore it.
    fn accept_streams(
        &mut self,
        n: usize,
        session: &Session,
        memory: &DestMemory,
    ) -> Result<Vec<Self::Rx>, TransportError>;
    fn interrupt(&self) -> Interrupt;
}

/// A flag that makes an endpoint's blocking calls give up.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// `Err(Interrupted)` once triggered.
    pub fn check(&self) -> Result<(), TransportError> {
        if self.is_triggered() {
            Err(TransportError::Interrupted)
        } else {
            Ok(())
        }
    }
}
