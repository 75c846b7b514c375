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
//! Every blocking call wakes at least every 100 ms to check the endpoint's
//! interrupt, and fails with a timeout when the peer made no progress for
//! `io_timeout`.
//!
//! The stream is not encrypted: see `hpmig_core::auth` for what the token
//! does and does not protect.

mod io;

use std::io::IoSlice;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use hpmig_core::auth::{Secret, Session};
use hpmig_core::memory::DestMemory;
use hpmig_core::protocol::{Header, ProtocolError, HEADER_LEN};
use hpmig_core::ring::{Ring, SendBuf};
use hpmig_core::transport::{
    Control, ControlRecord, DestTransport, Interrupt, SourceTransport, StreamRx, StreamTx,
    TransportError,
};

pub use io::Conn;

/// First bytes of a data connection.
const STREAM_MAGIC: [u8; 8] = *b"HPMIGSTR";
const STREAM_HELLO_LEN: usize = 8 + 2 + 2 + 32;
/// Receive buffer of a destination stream.
const RX_BUF: usize = 64 << 10;
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

/// The control connection of either end. Until its first record arrives it
/// gives up after `io_timeout` like any connection (a peer that connects
/// and says nothing cannot hold a destination); after that it waits as long
/// as the migration runs, since it is quiet during pre-copy. A peer that dies
/// meanwhile is found by the data streams' timeout, which interrupts it.
#[derive(Debug)]
pub struct TcpControl {
    conn: Conn,
    heard: bool,
}

impl Control for TcpControl {
    fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
        self.conn.write_all(&mut [IoSlice::new(record)])
    }

    fn recv(&mut self) -> Result<ControlRecord, TransportError> {
        let mut head = [0u8; HEADER_LEN];
        self.conn.read_exact(&mut head)?;
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
        self.conn.read_exact(&mut payload)?;
        if !self.heard {
            self.heard = true;
            self.conn.set_timeout(Duration::MAX);
        }
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
            control: TcpControl { conn, heard: false },
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

/// The destination's end: waits on a listener.
#[derive(Debug)]
pub struct TcpDest {
    control: TcpControl,
    listener: TcpListener,
    opts: TcpOptions,
    interrupt: Interrupt,
    peer: SocketAddr,
}

impl TcpDest {
    /// Waits for a source's control connection on `listener`.
    pub fn accept(listener: TcpListener, opts: TcpOptions) -> Result<TcpDest, TransportError> {
        listener
            .set_nonblocking(false)
            .map_err(|source| TransportError::Io {
                context: "configuring the listener",
                source,
            })?;
        let (sock, peer) = listener.accept().map_err(|source| TransportError::Io {
            context: "accepting the control connection",
            source,
        })?;
        let interrupt = Interrupt::default();
        let conn = Conn::new(sock, interrupt.clone(), opts.io_timeout)?;
        Ok(TcpDest {
            control: TcpControl { conn, heard: false },
            listener,
            opts,
            interrupt,
            peer,
        })
    }

    /// Accepts the `n` data connections of `session`, in stream order; a
    /// connection without a valid stream hello is dropped and waited past.
    pub fn accept_stream_conns(
        &mut self,
        n: usize,
        session: &Session,
    ) -> Result<Vec<Conn>, TransportError> {
        let io_err = |context| move |source| TransportError::Io { context, source };
        self.listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the listener"))?;
        let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        let mut missing = n;
        let deadline = Instant::now() + self.opts.connect_timeout;
        while missing > 0 {
            self.interrupt.check()?;
            if Instant::now() > deadline {
                return Err(TransportError::Other(format!(
                    "{missing} of {n} data connections did not arrive within {:?}",
                    self.opts.connect_timeout
                )));
            }
            let sock = match self.listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(io_err("accepting a data connection")(e)),
            };
            sock.set_nonblocking(false)
                .map_err(io_err("configuring a data connection"))?;
            let mut conn = Conn::new(sock, self.interrupt.clone(), self.opts.connect_timeout)?;
            let mut hello = [0u8; STREAM_HELLO_LEN];
            if conn.read_exact(&mut hello).is_err() || hello[..8] != STREAM_MAGIC {
                tracing::warn!("dropped a connection that is not an hpmig data stream");
                continue;
            }
            let index = u16::from_le_bytes([hello[8], hello[9]]);
            let fits = usize::from(index) < n && slots[usize::from(index)].is_none();
            if !fits || !Secret::verify(session.stream_tag(index), &hello[12..]) {
                tracing::warn!(
                    index,
                    "dropped a data connection with a wrong or repeated stream tag"
                );
                continue;
            }
            conn.set_timeout(self.opts.io_timeout);
            slots[usize::from(index)] = Some(conn);
            missing -= 1;
        }
        let _ = self.listener.set_nonblocking(false);
        Ok(slots.into_iter().flatten().collect())
    }

    /// The address the source connected from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Gives the listener back, for the next migration.
    pub fn into_listener(self) -> TcpListener {
        self.listener
    }
}

impl DestTransport for TcpDest {
    type Control = TcpControl;
    type Rx = TcpRx;

    fn control(&mut self) -> &mut TcpControl {
        &mut self.control
    }

    fn accept_streams(
        &mut self,
        n: usize,
        session: &Session,
        _memory: &DestMemory,
    ) -> Result<Vec<TcpRx>, TransportError> {
        Ok(self
            .accept_stream_conns(n, session)?
            .into_iter()
            .map(|conn| TcpRx {
                conn,
                buf: vec![0u8; RX_BUF].into_boxed_slice(),
                start: 0,
                end: 0,
            })
            .collect())
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }
}

/// The receiving half of one data connection.
#[derive(Debug)]
pub struct TcpRx {
    conn: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl StreamRx for TcpRx {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        if self.end - self.start < HEADER_LEN {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < HEADER_LEN {
                self.end += self.conn.read_some(&mut self.buf[self.end..])?;
            }
        }
        let head: &[u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
            .try_into()
            .map_err(|_| ProtocolError::Truncated {
                needed: HEADER_LEN,
                had: 0,
            })?;
        let h = Header::decode(head, page_size)?;
        self.start += HEADER_LEN;
        Ok(h)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let buffered = (self.end - self.start).min(dst.len());
        dst[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        // The rest goes straight from the socket into `dst` (guest memory).
        self.conn.read_exact(&mut dst[buffered..])
    }
}
