//! An in-process transport over crossbeam channels: slots move from the
//! source's workers to the destination's stream threads and back, with no
//! copy. For tests, benchmarks of the engine without a wire, and library users
//! who migrate between two VMs in one process.
//!
//! [`Faults`] lets a test cut every stream after a chosen number of bytes,
//! as a dropped connection would, and cut, flip or stall the control
//! exchange at a chosen byte either way. A source may dial the destination
//! again for a fresh (clean) control connection, as a TCP source would.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use super::*;
use crate::protocol::HEADER_LEN;

const POLL: Duration = Duration::from_millis(20);

/// What to do to the control exchange at a chosen byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlAction {
    /// The record holding the byte is lost and the connection breaks.
    Cut,
    /// The byte's bits are inverted; the record goes on.
    Flip,
    /// The record holding the byte and everything after it are held back
    /// (a frozen peer); the connection stays open.
    Stall,
}

/// A fault at byte `at` of the first record of kind `kind` sent one way
/// (`to_dest`) on the first control connection.
#[derive(Clone, Copy, Debug)]
pub struct ControlFault {
    pub to_dest: bool,
    pub kind: crate::protocol::Kind,
    pub at: usize,
    pub action: ControlAction,
}

/// Failure injection shared by both ends.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Data bytes that may still cross before every stream is cut; negative
    /// means no limit.
    budget: Arc<AtomicI64>,
    /// A fault on the first control connection (reconnections are clean).
    control: Option<ControlFault>,
    /// Set once the control fault fired.
    fired: Arc<AtomicBool>,
}

impl Faults {
    pub fn none() -> Self {
        Faults {
            budget: Arc::new(AtomicI64::new(-1)),
            control: None,
            fired: Arc::default(),
        }
    }

    /// Cut all data streams once `bytes` data bytes have crossed.
    pub fn cut_after(bytes: u64) -> Self {
        Faults {
            budget: Arc::new(AtomicI64::new(bytes.min(i64::MAX as u64) as i64)),
            ..Faults::none()
        }
    }

    /// A fault on the first control connection.
    pub fn control(fault: ControlFault) -> Self {
        Faults {
            control: Some(fault),
            ..Faults::none()
        }
    }

    /// Cut all data streams now (before their next batch).
    pub fn cut_now(&self) {
        self.budget.store(0, Ordering::Release);
    }

    /// Whether the control fault fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Takes `n` bytes from the budget; false once it is spent.
    fn spend(&self, n: usize) -> bool {
        let mut cur = self.budget.load(Ordering::Acquire);
        loop {
            if cur < 0 {
                return true;
            }
            let next = cur - n as i64;
            if next < 0 {
                self.budget.store(0, Ordering::Release);
                return false;
            }
            match self
                .budget
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }
}

/// A connected pair of in-process endpoints.
pub fn pair(faults: Faults) -> (InProcSource, InProcDest) {
    let (to_dest, from_source) = unbounded();
    let (to_source, from_dest) = unbounded();
    let (streams_tx, streams_rx) = unbounded();
    let (dial, incoming) = unbounded();
    let src_int = Interrupt::default();
    let dst_int = Interrupt::default();
    (
        InProcSource {
            control: InProcControl {
                tx: to_dest,
                rx: from_dest,
                interrupt: src_int.clone(),
                faults: Some((faults.clone(), true)),
                stalled: false,
            },
            streams: streams_tx,
            faults: faults.clone(),
            interrupt: src_int,
            dial,
        },
        InProcDest {
            control: InProcControl {
                tx: to_source,
                rx: from_source,
                interrupt: dst_int.clone(),
                faults: Some((faults, false)),
                stalled: false,
            },
            streams: streams_rx,
            interrupt: dst_int,
            incoming,
        },
    )
}

/// Receives from `rx`, giving up on interrupt, disconnection or `deadline`.
fn recv_polling<T>(
    rx: &Receiver<T>,
    interrupt: &Interrupt,
    deadline: Option<Instant>,
) -> Result<T, TransportError> {
    let start = Instant::now();
    loop {
        interrupt.check()?;
        let wait = match deadline {
            Some(d) => d
                .checked_duration_since(Instant::now())
                .ok_or(TransportError::TimedOut {
                    what: "record",
                    after: start.elapsed(),
                })?
                .min(POLL),
            None => POLL,
        };
        match rx.recv_timeout(wait) {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Disconnected),
        }
    }
}

/// One endpoint's control channel.
#[derive(Debug)]
pub struct InProcControl {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    interrupt: Interrupt,
    /// The faults of the first connection, and which way this end sends.
    faults: Option<(Faults, bool)>,
    /// A stall fault fired: nothing more leaves this end.
    stalled: bool,
}

impl Control for InProcControl {
    fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
        let mut record = record.to_vec();
        if let Some((faults, to_dest)) = &self.faults {
            if self.stalled {
                return Ok(());
            }
            let mine = faults.control.filter(|f| {
                f.to_dest == *to_dest
                    && record.first() == Some(&(f.kind as u8))
                    && f.at < record.len()
                    && !faults.fired.load(Ordering::Acquire)
            });
            if let Some(f) = mine {
                faults.fired.store(true, Ordering::Release);
                match f.action {
                    ControlAction::Flip => record[f.at] ^= 0xff,
                    ControlAction::Stall => {
                        self.stalled = true;
                        return Ok(());
                    }
                    ControlAction::Cut => {
                        // Both directions of this connection are gone.
                        let (dead, _) = bounded(0);
                        self.tx = dead;
                        let (_, dead) = bounded(0);
                        self.rx = dead;
                        return Err(TransportError::Disconnected);
                    }
                }
            }
        }
        self.tx
            .send(record)
            .map_err(|_| TransportError::Disconnected)
    }

    fn recv(&mut self, deadline: Instant) -> Result<ControlRecord, TransportError> {
        let bytes = recv_polling(&self.rx, &self.interrupt, Some(deadline))?;
        let mut records = crate::protocol::Records::new(&bytes, u32::MAX);
        let (header, payload) = records.next().ok_or(ProtocolError::Truncated {
            needed: HEADER_LEN,
            had: 0,
        })??;
        Ok(ControlRecord {
            header,
            payload: payload.to_vec(),
        })
    }
}

/// A fresh, clean control connection: the source's end and the destination's.
fn connection(src_int: &Interrupt, dst_int: &Interrupt) -> (InProcControl, InProcControl) {
    let (to_dest, from_source) = unbounded();
    let (to_source, from_dest) = unbounded();
    let end = |tx, rx, interrupt: &Interrupt| InProcControl {
        tx,
        rx,
        interrupt: interrupt.clone(),
        faults: None,
        stalled: false,
    };
    (
        end(to_dest, from_dest, src_int),
        end(to_source, from_source, dst_int),
    )
}

type StreamEnds = (Receiver<SendBuf>, Sender<SendBuf>);

/// The source end.
#[derive(Debug)]
pub struct InProcSource {
    control: InProcControl,
    streams: Sender<StreamEnds>,
    faults: Faults,
    interrupt: Interrupt,
    /// Where a new control connection's destination end goes.
    dial: Sender<InProcControl>,
}

impl SourceTransport for InProcSource {
    type Control = InProcControl;
    type Tx = InProcTx;

    fn control(&mut self) -> &mut InProcControl {
        &mut self.control
    }

    fn open_streams(
        &mut self,
        rings: Vec<Ring>,
        _session: &Session,
    ) -> Result<Vec<InProcTx>, TransportError> {
        let mut out = Vec::with_capacity(rings.len());
        for ring in rings {
            let bufs = ring.into_bufs();
            let (full_tx, full_rx) = bounded(bufs.len());
            let (free_tx, free_rx) = bounded(bufs.len());
            for b in bufs {
                free_tx.send(b).map_err(|_| TransportError::Disconnected)?;
            }
            self.streams
                .send((full_rx, free_tx))
                .map_err(|_| TransportError::Disconnected)?;
            out.push(InProcTx {
                full: full_tx,
                free: free_rx,
                faults: self.faults.clone(),
                interrupt: self.interrupt.clone(),
            });
        }
        Ok(out)
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        // The migration's streams are over; the new connection must work.
        self.interrupt.clear();
        let (mine, theirs) = connection(&self.interrupt, &Interrupt::default());
        self.dial
            .send(theirs)
            .map_err(|_| TransportError::Disconnected)?;
        self.control = mine;
        Ok(())
    }
}

/// The destination end.
#[derive(Debug)]
pub struct InProcDest {
    control: InProcControl,
    streams: Receiver<StreamEnds>,
    interrupt: Interrupt,
    /// New control connections from the source.
    incoming: Receiver<InProcControl>,
}

impl DestTransport for InProcDest {
    type Control = InProcControl;
    type Rx = InProcRx;

    fn control(&mut self) -> &mut InProcControl {
        &mut self.control
    }

    fn accept_streams(
        &mut self,
        n: usize,
        _session: &Session,
        _memory: &crate::memory::DestMemory,
    ) -> Result<Vec<InProcRx>, TransportError> {
        (0..n)
            .map(|_| {
                let (full, free) = recv_polling(&self.streams, &self.interrupt, None)?;
                Ok(InProcRx {
                    full,
                    free,
                    cur: None,
                    pos: 0,
                    interrupt: self.interrupt.clone(),
                })
            })
            .collect()
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    fn accept_control(&mut self, deadline: Instant) -> Result<bool, TransportError> {
        match recv_polling(&self.incoming, &self.interrupt, Some(deadline)) {
            Ok(mut c) => {
                c.interrupt = self.interrupt.clone();
                self.control = c;
                Ok(true)
            }
            Err(TransportError::TimedOut { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The source half of one stream.
#[derive(Debug)]
pub struct InProcTx {
    full: Sender<SendBuf>,
    free: Receiver<SendBuf>,
    faults: Faults,
    interrupt: Interrupt,
}

impl StreamTx for InProcTx {
    fn take_free(&mut self) -> Result<SendBuf, TransportError> {
        let mut b = recv_polling(&self.free, &self.interrupt, None)?;
        b.clear();
        Ok(b)
    }

    fn submit(&mut self, buf: SendBuf) -> Result<(), TransportError> {
        self.interrupt.check()?;
        if !self.faults.spend(buf.len()) {
            // A cut connection: this stream is gone for both ends.
            let (dead, _) = bounded(0);
            self.full = dead;
            return Err(TransportError::Disconnected);
        }
        self.full
            .send(buf)
            .map_err(|_| TransportError::Disconnected)
    }
}

/// The destination half of one stream.
#[derive(Debug)]
pub struct InProcRx {
    full: Receiver<SendBuf>,
    free: Sender<SendBuf>,
    cur: Option<SendBuf>,
    pos: usize,
    interrupt: Interrupt,
}

impl StreamRx for InProcRx {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        loop {
            match &self.cur {
                Some(b) if self.pos < b.len() => break,
                _ => {
                    if let Some(done) = self.cur.take() {
                        // The peer may be gone already; the slot is simply dropped then.
                        let _ = self.free.send(done);
                    }
                    self.cur = Some(recv_polling(&self.full, &self.interrupt, None)?);
                    self.pos = 0;
                }
            }
        }
        let buf = self
            .cur
            .as_ref()
            .ok_or(TransportError::Disconnected)?
            .filled();
        let rest = &buf[self.pos..];
        let head = rest
            .first_chunk::<HEADER_LEN>()
            .ok_or(ProtocolError::Truncated {
                needed: HEADER_LEN,
                had: rest.len(),
            })?;
        let h = Header::decode(head, page_size)?;
        self.pos += HEADER_LEN;
        Ok(h)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let buf = self
            .cur
            .as_ref()
            .ok_or(TransportError::Disconnected)?
            .filled();
        let rest = &buf[self.pos..];
        let src = rest.get(..dst.len()).ok_or(ProtocolError::Truncated {
            needed: dst.len(),
            had: rest.len(),
        })?;
        dst.copy_from_slice(src);
        self.pos += dst.len();
        Ok(())
    }
}
