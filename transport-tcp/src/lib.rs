//! hpmig-transport-tcp: the multi-stream TCP transport.
//!
//! One control connection carries the handshake, state, complete and
//! acknowledge; then one data connection per worker ring carries that
//! worker's records, so a page's records stay in one ordered byte stream.
//! A data connection opens with a stream hello (magic, stream index, and the
//! session's tag for that index, see `hpmig_core::auth`); the destination
//! drops any connection that cannot show it.
//!
//! Source: each stream has a sender thread that takes filled ring slots,
//! gathers every slot already queued into one vectored write, and hands the
//! slots back as free. Destination: each stream reads record headers through
//! a 64 KiB buffer and reads the part of each payload that has not arrived
//! with earlier bytes straight into the guest page it lands in; only payload
//! bytes that came in the same read as a preceding header are copied out of
//! that buffer.
//!
//! The destination comes in two forms. [`TcpDest::accept`] takes the first
//! connection its listener gets as the source's control connection, and
//! later accepts that source's data (and decision redelivery) connections
//! itself: for a caller that trusts whoever connects first. [`TcpService`]
//! keeps the listener and an acceptor thread for as long as it lives:
//! every connection is classified by its first bytes, strangers are
//! bounded in number, bytes and time and told why they were closed, and
//! each source that completed the handshake comes out of
//! [`TcpService::next_migration`] as a `TcpDest` of its own, to which the
//! acceptor routes that session's data and redelivery connections.
//!
//! Every blocking call wakes at least every 100 ms to check the endpoint's
//! interrupt. A control record must arrive whole by the deadline the engine
//! gives; a data record, once its first byte arrived, must complete within
//! `io_timeout`, and so must every write: a peer that trickles bytes cannot
//! stretch either. Between records a data stream may idle as long as the
//! engine's control exchange stays alive.
//!
//! The stream is not encrypted: see `hpmig_core::auth` for what the token
//! does and does not protect.

mod dest;
mod io;
mod service;

use std::io::IoSlice;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use hpmig_core::auth::Session;
use hpmig_core::protocol::{Header, ProtocolError, HEADER_LEN};
use hpmig_core::ring::{Ring, RingShape, SendBuf};
use hpmig_core::transport::{
    Control, ControlRecord, Interrupt, SourceTransport, StreamTx, TransportError,
};

pub use dest::{TcpDest, TcpRx};
pub use io::Conn;
pub use service::{Admit, ServiceOptions, ServiceStats, TcpService, HANDSHAKE_BYTES};

/// First bytes of a data connection.
pub(crate) const STREAM_MAGIC: [u8; 8] = *b"HPMIGSTR";
pub(crate) const STREAM_HELLO_LEN: usize = 8 + 2 + 2 + 32;
/// Receive buffer of a destination stream.
pub(crate) const RX_BUF: usize = 64 << 10;
/// Most slots one vectored write gathers.
const MAX_GATHER: usize = 16;

/// Timeouts of a TCP endpoint.
#[derive(Clone, Copy, Debug)]
pub struct TcpOptions {
    /// Fail when the peer made no progress for this long.
    pub io_timeout: Duration,
    /// How long to wait for a connection to be set up.
    pub connect_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The control connection of either end: every record arrives whole by
/// the deadline its receiver gives.
#[derive(Debug)]
pub struct TcpControl {
    conn: Conn,
}

impl TcpControl {
    pub fn new(conn: Conn) -> TcpControl {
        TcpControl { conn }
    }
}

impl Control for TcpControl {
    fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
        self.conn.write_all(&mut [IoSlice::new(record)])
    }

    fn recv(&mut self, deadline: Instant) -> Result<ControlRecord, TransportError> {
        let mut head = [0u8; HEADER_LEN];
        self.conn.read_exact_by(&mut head, Some(deadline))?;
        // Data records never travel on the control connection; their page
        // size bound does not matter here.
        let header = Header::decode(&head, 0)?;
        if header.kind.is_data() {
            return Err(ProtocolError::Unexpected {
                got: header.kind,
                expected: "a control record",
            }
            .into());
        }
        // The length is capped per kind by decode (at most MAX_STATE).
        let mut payload = vec![0u8; header.len as usize];
        self.conn.read_exact_by(&mut payload, Some(deadline))?;
        Ok(ControlRecord { header, payload })
    }
}

/// The source's end: connects to a destination.
#[derive(Debug)]
pub struct TcpSource {
    control: TcpControl,
    addr: SocketAddr,
    opts: TcpOptions,
    interrupt: Interrupt,
}

impl TcpSource {
    /// Opens the control connection to `addr`.
    pub fn connect(
        addr: impl ToSocketAddrs,
        opts: TcpOptions,
    ) -> Result<TcpSource, TransportError> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Io {
                context: "resolving the destination address",
                source,
            })?
            .next()
            .ok_or_else(|| {
                TransportError::Other("the destination address resolved to nothing".into())
            })?;
        let interrupt = Interrupt::default();
        let sock = io::connect(addr, &opts)?;
        let conn = Conn::new(sock, interrupt.clone(), opts.io_timeout)?;
        Ok(TcpSource {
            control: TcpControl { conn },
            addr,
            opts,
            interrupt,
        })
    }

    /// Opens data connection `index` of `session`: connects and sends the
    /// stream hello that proves the session. Other transports (RDMA) use
    /// these connections to set up their own streams.
    pub fn connect_stream(&self, index: u16, session: &Session) -> Result<Conn, TransportError> {
        let sock = io::connect(self.addr, &self.opts)?;
        let mut conn = Conn::new(sock, self.interrupt.clone(), self.opts.io_timeout)?;
        let mut hello = [0u8; STREAM_HELLO_LEN];
        hello[..8].copy_from_slice(&STREAM_MAGIC);
        hello[8..10].copy_from_slice(&index.to_le_bytes());
        hello[12..].copy_from_slice(&session.stream_tag(index));
        conn.write_all(&mut [IoSlice::new(&hello)])?;
        Ok(conn)
    }
}

impl SourceTransport for TcpSource {
    type Control = TcpControl;
    type Tx = TcpTx;

    fn control(&mut self) -> &mut TcpControl {
        &mut self.control
    }

    /// A slot is copied into the socket as it is written, so a small ring,
    /// which stays in cache, is enough.
    fn ring_shape(&self) -> RingShape {
        RingShape::COPIED
    }

    fn open_streams(
        &mut self,
        rings: Vec<Ring>,
        session: &Session,
    ) -> Result<Vec<TcpTx>, TransportError> {
        let mut out = Vec::with_capacity(rings.len());
        for (index, ring) in rings.into_iter().enumerate() {
            let index = u16::try_from(index)
                .map_err(|_| TransportError::Other("too many streams".into()))?;
            let conn = self.connect_stream(index, session)?;
            out.push(TcpTx::start(conn, ring, self.interrupt.clone(), index)?);
        }
        Ok(out)
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        // The migration's streams are over; the new connection must work.
        self.interrupt.clear();
        let sock = io::connect(self.addr, &self.opts)?;
        self.control = TcpControl {
            conn: Conn::new(sock, self.interrupt.clone(), self.opts.io_timeout)?,
        };
        Ok(())
    }
}

/// The sending half of one data connection.
#[derive(Debug)]
pub struct TcpTx {
    full: Option<Sender<SendBuf>>,
    free: Receiver<SendBuf>,
    failed: Arc<Mutex<Option<TransportError>>>,
    interrupt: Interrupt,
    sender: Option<std::thread::JoinHandle<()>>,
}

impl TcpTx {
    fn start(
        mut conn: Conn,
        ring: Ring,
        interrupt: Interrupt,
        index: u16,
    ) -> Result<TcpTx, TransportError> {
        let (full_tx, full_rx) = unbounded::<SendBuf>();
        let (free_tx, free_rx) = unbounded::<SendBuf>();
        for b in ring.into_bufs() {
            let _ = free_tx.send(b);
        }
        let failed = Arc::new(Mutex::new(None));
        let failed2 = Arc::clone(&failed);
        let sender = std::thread::Builder::new()
            .name(format!("tcp-tx{index}"))
            .spawn(move || {
                if let Err(e) = send_loop(&mut conn, &full_rx, &free_tx) {
                    *failed2.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                // Dropping free_tx tells a waiting worker the stream is gone.
            })
            .map_err(|source| TransportError::Io {
                context: "starting a sender thread",
                source,
            })?;
        Ok(TcpTx {
            full: Some(full_tx),
            free: free_rx,
            failed,
            interrupt,
            sender: Some(sender),
        })
    }

    fn stream_error(&self) -> TransportError {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(TransportError::Disconnected)
    }
}

/// Sends filled slots until the worker hangs up, gathering queued slots into
/// one vectored write.
fn send_loop(
    conn: &mut Conn,
    full: &Receiver<SendBuf>,
    free: &Sender<SendBuf>,
) -> Result<(), TransportError> {
    let mut batch: Vec<SendBuf> = Vec::with_capacity(MAX_GATHER);
    loop {
        match full.recv_timeout(io::POLL) {
            Ok(b) => batch.push(b),
            Err(RecvTimeoutError::Timeout) => {
                conn.check_interrupt()?;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return conn.finish(),
        }
        while batch.len() < MAX_GATHER {
            match full.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b.filled())).collect();
        conn.write_all(&mut slices)?;
        drop(slices);
        for b in batch.drain(..) {
            let _ = free.send(b);
        }
    }
}

impl StreamTx for TcpTx {
    fn take_free(&mut self) -> Result<SendBuf, TransportError> {
        loop {
            self.interrupt.check()?;
            match self.free.recv_timeout(io::POLL) {
                Ok(mut b) => {
                    b.clear();
                    return Ok(b);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(self.stream_error()),
            }
        }
    }

    fn submit(&mut self, buf: SendBuf) -> Result<(), TransportError> {
        self.interrupt.check()?;
        let full = self.full.as_ref().ok_or(TransportError::Disconnected)?;
        full.send(buf).map_err(|_| self.stream_error())
    }
}

impl Drop for TcpTx {
    fn drop(&mut self) {
        // Hang up, then wait for the sender to put the queued slots on the wire.
        self.full = None;
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
    }
}
