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
//!
//! Deadlines: a control record must arrive whole by the deadline its
//! receiver gives (a peer that trickles bytes cannot push it back); a data
//! record, once its first byte arrived, must complete within the
//! transport's I/O timeout. A data stream may stay idle between records as
//! long as the control connection lives: the engine keeps it alive with
//! Alive records and interrupts the streams when it dies.

pub mod inproc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::auth::Session;
use crate::memory::DestMemory;
use crate::protocol::{Header, Kind, ProtocolError};
use crate::ring::{Ring, RingShape, SendBuf};

/// Errors of moving bytes.
#[derive(Debug, Error)]
pub enum TransportError {
    /// the peer went away
    #[error("peer disconnected")]
    Disconnected,
    /// this endpoint was interrupted because another part of it failed
    #[error("interrupted")]
    Interrupted,
    /// the peer did not deliver in time
    #[error("no {what} from the peer within {after:?}")]
    TimedOut {
        what: &'static str,
        after: std::time::Duration,
    },
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

/// How long either end waits on its peer. Every wait is bounded by one of
/// these: a frozen or trickling peer cannot hold an end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// A control record must arrive whole within this of the one before
    /// (the peer's Alive records count); a data record, once begun, must
    /// complete within it.
    pub io: Duration,
    /// The whole handshake of a peer not yet authenticated.
    pub handshake: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            io: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
        }
    }
}

impl Deadlines {
    /// How often an end that works without sending says it is alive.
    pub fn alive_period(&self) -> Duration {
        self.io / 4
    }
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
    /// Receives one whole record by `deadline` (else
    /// [`TransportError::TimedOut`]); its length was capped before the
    /// payload was read.
    fn recv(&mut self, deadline: Instant) -> Result<ControlRecord, TransportError>;

    /// The next record that is not an Alive, each record (Alive included)
    /// within `io` of the one before.
    fn recv_live(&mut self, io: Duration) -> Result<ControlRecord, TransportError> {
        loop {
            let r = self.recv(Instant::now() + io)?;
            if r.header.kind != Kind::Alive {
                return Ok(r);
            }
        }
    }
}

/// Runs `work` while this thread says Alive on `control` every `period`
/// (when `alive`: a version 1 peer knows no Alive record).
pub fn with_keepalive<C: Control + ?Sized, R: Send>(
    control: &mut C,
    alive: bool,
    period: Duration,
    work: impl FnOnce() -> R + Send,
) -> Result<R, TransportError> {
    if !alive {
        return Ok(work());
    }
    std::thread::scope(|s| {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        s.spawn(move || {
            let _ = done_tx.send(work());
        });
        loop {
            match done_rx.recv_timeout(period) {
                Ok(r) => return Ok(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    control.send(&crate::protocol::switchover::alive())?
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Other(
                        "the keepalive's work panicked".into(),
                    ))
                }
            }
        }
    })
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
    /// The ring each worker fills for this transport, unless the source's
    /// configuration sets one ([`crate::precopy::SourceConfig::ring`]).
    fn ring_shape(&self) -> RingShape {
        RingShape::IN_FLIGHT
    }
    /// Opens one data stream per ring (the ring's slots become the
    /// stream's), bound to the handshake's `session`.
    fn open_streams(
        &mut self,
        rings: Vec<Ring>,
        session: &Session,
    ) -> Result<Vec<Self::Tx>, TransportError>;
    fn interrupt(&self) -> Interrupt;
    /// Replaces the control connection with a fresh one to the same
    /// destination, for a decision that must be delivered again after the
    /// first connection broke. Data streams are not reopened.
    fn reconnect(&mut self) -> Result<(), TransportError>;
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
    /// Waits until `deadline` for a new control connection to this
    /// destination (a source delivering its decision again) and makes it
    /// the current one; `Ok(false)` when none came.
    fn accept_control(&mut self, deadline: Instant) -> Result<bool, TransportError>;
}

/// A flag that makes an endpoint's blocking calls give up.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Lets blocking calls run again: a source reconnecting to deliver its
    /// decision, after the migration's streams were interrupted and ended.
    pub fn clear(&self) {
        self.0.store(false, Ordering::Release);
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
