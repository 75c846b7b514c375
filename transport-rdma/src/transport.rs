//! The two ends: [`RdmaSource`] and [`RdmaDest`].

use std::net::{TcpListener, ToSocketAddrs};
use std::sync::Arc;

use hpmig_core::auth::Session;
use hpmig_core::memory::{DestMemory, Layout, MemoryError};
use hpmig_core::ring::{Ring, RingError};
use hpmig_core::transport::{DestTransport, Interrupt, SourceTransport, TransportError};
use hpmig_transport_tcp::{TcpControl, TcpDest, TcpOptions, TcpSource};
use thiserror::Error;
use vm_memory::GuestMemoryError;

use crate::device::{self, DeviceError};
use crate::imm::MAX_SLOT;
use crate::rx::{RdmaRx, RxParts};
use crate::setup::{Answer, Offer};
use crate::share::{self, StreamGuest};
use crate::tx::{RdmaStats, RdmaTx, TxParts, MAX_SGE};
use crate::verbs::{
    self, Context, Cq, Endpoint, Mr, Mtu, Path, Pd, PortState, Qp, QpCaps, VerbsError,
};

/// Send queue depth of a source stream (capped by the device).
const SQ_DEPTH: u32 = 1024;
/// Inline sizes tried, largest first, until the device accepts one.
const INLINE_TRIES: [u32; 4] = [256, 128, 64, 0];

/// Errors of opening an end of the transport: the device port and each
/// stream's local resources.
#[derive(Debug, Error)]
pub enum EndpointError {
    /// a verbs call failed
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    /// the device's GID table gave no usable GID
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// the port asked for is not active
    #[error("checking the port failed: port {port} of {device} is {state}, not PORT_ACTIVE")]
    PortNotActive {
        device: String,
        port: u8,
        state: PortState,
    },
    /// the port reports an active MTU that names no verbs MTU
    #[error("checking the port failed: port {port} of {device} reports no valid active MTU")]
    NoMtu { device: String, port: u8 },
    /// a ring slot is larger than a batch immediate can describe
    #[error("RDMA: ring slots of {slot_size} bytes exceed the {MAX_SLOT}-byte batch an immediate can describe")]
    SlotTooLarge { slot_size: usize },
    /// a stream index does not fit the stream hello's 16 bits
    #[error("RDMA stream {stream}: too many streams (at most {})", u16::MAX as usize + 1)]
    TooManyStreams { stream: usize },
    /// the staging ring could not be mapped
    #[error("RDMA stream {stream}: staging ring: {source}")]
    StagingRing {
        stream: usize,
        #[source]
        source: RingError,
    },
    /// a guest memory region has no host mapping to register
    #[error("guest memory region at {gpa:#x}: {source}")]
    GuestRegion {
        gpa: u64,
        #[source]
        source: GuestMemoryError,
    },
    /// the guest memory has no valid layout to split among the streams
    #[error("RDMA: the guest memory's layout: {0}")]
    Layout(#[source] MemoryError),
    /// a guest range of a stream's share does not fit its region's mapping
    #[error("RDMA stream {stream}: guest range {gpa:#x}+{len} of its share is not inside a mapped region")]
    GuestRange { stream: usize, gpa: u64, len: u64 },
}

impl From<EndpointError> for TransportError {
    fn from(e: EndpointError) -> Self {
        TransportError::Device(Box::new(e))
    }
}

/// Which device and port to use.
#[derive(Clone, Debug)]
pub struct RdmaOptions {
    /// Device name, as `hpmig devices` lists it (mlx5_0, rxe0, ...).
    pub device: String,
    pub port: u8,
    /// GID index; `None` picks one (see [`device::default_gid_index`]).
    pub gid_index: Option<u8>,
    /// Timeouts of the TCP control connection and of the data streams.
    pub tcp: TcpOptions,
}

impl RdmaOptions {
    /// Opens the device and checks its port is active (and has a usable
    /// GID), so a wrong name fails before anything else starts.
    pub fn check(&self) -> Result<(), TransportError> {
        Port::open(self).map(drop).map_err(Into::into)
    }

    pub fn new(device: &str) -> RdmaOptions {
        RdmaOptions {
            device: device.to_string(),
            port: 1,
            gid_index: None,
            tcp: TcpOptions::default(),
        }
    }
}

/// An opened device port, ready for queue pairs (each in a protection
/// domain its end chooses).
#[derive(Debug)]
struct Port {
    ctx: Arc<Context>,
    port: u8,
    gid_index: u8,
    lid: u16,
    gid: [u8; 16],
    active_mtu: Mtu,
}

impl Port {
    fn open(o: &RdmaOptions) -> Result<Port, EndpointError> {
        let ctx = Context::open(&o.device)?;
        let info = ctx.port(o.port)?;
        if info.state != PortState::Active {
            return Err(EndpointError::PortNotActive {
                device: o.device.clone(),
                port: o.port,
                state: info.state,
            });
        }
        let active_mtu = info.active_mtu.ok_or(EndpointError::NoMtu {
            device: o.device.clone(),
            port: o.port,
        })?;
        let gid_index = match o.gid_index {
            Some(i) => i,
            None => device::default_gid_index(&ctx, o.port)?,
        };
        let gid = ctx.gid(o.port, i32::from(gid_index))?;
        Ok(Port {
            ctx,
            port: o.port,
            gid_index,
            lid: info.lid,
            gid,
            active_mtu,
        })
    }

    fn endpoint(&self, qp: &Qp, psn: u32) -> Endpoint {
        Endpoint {
            qpn: qp.qpn,
            psn,
            lid: self.lid,
            gid: self.gid,
        }
    }

    fn path(&self, mtu: Mtu) -> Path {
        Path {
            port: self.port,
            gid_index: self.gid_index,
            mtu,
        }
    }

    /// A queue pair in `pd` of `caps`, with the largest inline size the
    /// device accepts (`caps.max_inline_data` is not used).
    fn queue_pair(
        &self,
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        caps: QpCaps,
        remote_write: bool,
    ) -> Result<Arc<Qp>, VerbsError> {
        let attempt = |inline| {
            let caps = QpCaps {
                max_inline_data: inline,
                ..caps
            };
            Qp::new(pd, send_cq, recv_cq, caps, self.port, remote_write)
        };
        // Each refusal tries the next smaller size; the last one's error is
        // the answer.
        INLINE_TRIES[1..]
            .iter()
            .fold(attempt(INLINE_TRIES[0]), |qp, &inline| {
                qp.or_else(|_| attempt(inline))
            })
            .map(Arc::new)
    }
}

fn post_recvs(qp: &Qp, n: u32) -> Result<(), VerbsError> {
    for i in 0..n {
        qp.post_recv_empty(u64::from(i))?;
    }
    Ok(())
}

fn psn(stream: usize) -> u32 {
    let mut b = [0u8; 4];
    // A random start PSN; any value works, a random one keeps stale packets
    // of an earlier connection from matching.
    let _ = getrandom::fill(&mut b);
    (u32::from_le_bytes(b) ^ stream as u32) & 0xff_ffff
}

/// A source stream between its offer and the destination's answer.
#[derive(Debug)]
struct OfferedStream {
    index: usize,
    conn: hpmig_transport_tcp::Conn,
    qp: Arc<Qp>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    ring_mr: Mr,
    bufs: Vec<hpmig_core::ring::SendBuf>,
    slot_size: usize,
    sq_depth: u32,
    max_sge: usize,
    psn: u32,
}

/// The source's end: TCP control plus one RC queue pair per worker.
#[derive(Debug)]
pub struct RdmaSource {
    tcp: TcpSource,
    port: Port,
    /// One protection domain for every stream: the source accepts no
    /// remote access, its ring registrations are local only.
    pd: Arc<Pd>,
    opts: RdmaOptions,
    stats: Arc<RdmaStats>,
    qps: QueuePairs,
    answers: Answers,
}

/// The queue pairs of a source's streams, filled in as they open (a fault
/// test puts one into the error state mid-migration).
pub type QueuePairs = Arc<std::sync::Mutex<Vec<Arc<Qp>>>>;

/// The destination's Answer to each of a source's streams, in stream order,
/// filled in as they open: the staging and guest ranges each stream's keys
/// reach. For tests that write through a stream's queue pair outside what
/// its keys reach; not part of the transport's API.
#[doc(hidden)]
pub type Answers = Arc<std::sync::Mutex<Vec<Answer>>>;

impl RdmaSource {
    /// Opens the device (failing early on a wrong name or a port that is
    /// not active), then the control connection to `addr`.
    pub fn connect(
        addr: impl ToSocketAddrs,
        opts: RdmaOptions,
    ) -> Result<RdmaSource, TransportError> {
        let port = Port::open(&opts)?;
        let pd = Pd::new(&port.ctx).map_err(EndpointError::from)?;
        let tcp = TcpSource::connect(addr, opts.tcp)?;
        Ok(RdmaSource {
            tcp,
            port,
            pd,
            opts,
            stats: Arc::default(),
            qps: QueuePairs::default(),
            answers: Answers::default(),
        })
    }

    pub fn stats(&self) -> Arc<RdmaStats> {
        Arc::clone(&self.stats)
    }

    /// The streams' queue pairs, as they open.
    pub fn queue_pairs(&self) -> QueuePairs {
        Arc::clone(&self.qps)
    }

    /// The destination's Answer to each stream, as they open (see
    /// [`Answers`]; for tests).
    #[doc(hidden)]
    pub fn answers(&self) -> Answers {
        Arc::clone(&self.answers)
    }

    /// Sets up stream `index`'s queue pair and sends its offer. The answers
    /// are read once every offer is out: the destination accepts all data
    /// connections before it answers any.
    fn offer_stream(
        &mut self,
        index: usize,
        ring: Ring,
        session: &Session,
    ) -> Result<OfferedStream, TransportError> {
        let slot_size = ring.slot_size();
        if slot_size > MAX_SLOT {
            return Err(EndpointError::SlotTooLarge { slot_size }.into());
        }
        let (base, len) = ring.region();
        // SAFETY: the ring's mapping lives as long as any of its slots; the
        // RdmaTx that owns this registration drops it before the slots.
        let ring_mr = unsafe { Mr::register(&self.pd, base as *mut u8, len, verbs::ACCESS_LOCAL) }?;
        let bufs = ring.into_bufs();
        let slots = bufs.len() as u32;
        let max_wr = u32::try_from(self.port.ctx.attr().max_qp_wr).unwrap_or(SQ_DEPTH);
        let sq_depth = SQ_DEPTH.min(max_wr);
        let send_cq = Cq::new(&self.port.ctx, sq_depth as i32)?;
        let recv_cq = Cq::new(&self.port.ctx, slots as i32 + 1)?;
        let max_sge = (self.port.ctx.attr().max_sge.max(1) as usize).min(MAX_SGE);
        let caps = QpCaps {
            max_send_wr: sq_depth,
            max_recv_wr: slots,
            max_send_sge: max_sge as u32,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        let qp = self
            .port
            .queue_pair(&self.pd, &send_cq, &recv_cq, caps, false)?;
        // Credits may come back as soon as the first batch lands.
        post_recvs(&qp, slots)?;
        let index16 =
            u16::try_from(index).map_err(|_| EndpointError::TooManyStreams { stream: index })?;
        let mut conn = self.tcp.connect_stream(index16, session)?;
        let my_psn = psn(index);
        Offer {
            endpoint: self.port.endpoint(&qp, my_psn),
            mtu: self.port.active_mtu,
            slots,
            slot_size: slot_size as u32,
        }
        .send(&mut conn)?;
        Ok(OfferedStream {
            index,
            conn,
            qp,
            send_cq,
            recv_cq,
            ring_mr,
            bufs,
            slot_size,
            sq_depth,
            max_sge,
            psn: my_psn,
        })
    }

    /// Reads stream `o`'s answer and connects its queue pair.
    fn connect_stream(&mut self, o: OfferedStream) -> Result<RdmaTx, TransportError> {
        let OfferedStream {
            index,
            mut conn,
            qp,
            send_cq,
            recv_cq,
            ring_mr,
            bufs,
            slot_size,
            sq_depth,
            max_sge,
            psn: my_psn,
        } = o;
        let answer = Answer::recv(&mut conn)?;
        let asked = u32::try_from(bufs.len()).unwrap_or(u32::MAX);
        answer.check(index, slot_size, asked)?;
        qp.connect(&answer.endpoint, my_psn, self.port.path(answer.mtu))?;
        self.qps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&qp));
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(answer.clone());
        Ok(RdmaTx::new(TxParts {
            qp,
            send_cq,
            recv_cq,
            ring_mr,
            bufs,
            worker: index as u32,
            answer,
            sq_depth,
            max_sge,
            // The source's layout is always `Layout::of` its memory, whose
            // pages are the host's (see hpmig_core::precopy::migrate): the
            // size its workers encode Page and Segment records for. A page
            // size beyond u32 fails every Page record at submit, loudly.
            page_size: u32::try_from(hpmig_core::memory::host_page_size()).unwrap_or(u32::MAX),
            stats: Arc::clone(&self.stats),
            interrupt: self.tcp.interrupt(),
            timeout: self.opts.tcp.io_timeout,
            liveness: conn,
        }))
    }
}

impl SourceTransport for RdmaSource {
    type Control = TcpControl;
    type Tx = RdmaTx;

    fn control(&mut self) -> &mut TcpControl {
        self.tcp.control()
    }

    fn open_streams(
        &mut self,
        rings: Vec<Ring>,
        session: &Session,
    ) -> Result<Vec<RdmaTx>, TransportError> {
        let offered = rings
            .into_iter()
            .enumerate()
            .map(|(i, ring)| self.offer_stream(i, ring, session))
            .collect::<Result<Vec<_>, _>>()?;
        offered
            .into_iter()
            .map(|o| self.connect_stream(o))
            .collect()
    }

    fn interrupt(&self) -> Interrupt {
        self.tcp.interrupt()
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        self.tcp.reconnect()
    }
}

/// The destination's end.
#[derive(Debug)]
pub struct RdmaDest {
    tcp: TcpDest,
    port: Port,
    opts: RdmaOptions,
}

impl RdmaDest {
    /// Opens the device, then waits for a source's control connection.
    pub fn accept(listener: TcpListener, opts: RdmaOptions) -> Result<RdmaDest, TransportError> {
        let tcp = TcpDest::accept(listener, opts.tcp)?;
        RdmaDest::over(tcp, opts)
    }

    /// The RDMA end of a migration whose TCP end (control, and the streams'
    /// setup connections) is `tcp`, e.g. one a `TcpService` handed out.
    pub fn over(tcp: TcpDest, opts: RdmaOptions) -> Result<RdmaDest, TransportError> {
        let port = Port::open(&opts)?;
        Ok(RdmaDest { tcp, port, opts })
    }

    /// Gives the listener back, for the next migration (`None` only for
    /// a TCP end a `TcpService` handed out, which this never holds).
    pub fn into_listener(self) -> Option<TcpListener> {
        self.tcp.into_listener()
    }

    /// The address the source connected from.
    pub fn peer(&self) -> std::net::SocketAddr {
        self.tcp.peer()
    }

    /// Reads stream `index`'s offer, grants its staging, and answers with
    /// the keys of `guest`: the stream's own protection domain, where its
    /// staging ring and queue pair are made too.
    fn accept_stream(
        &mut self,
        index: usize,
        streams: usize,
        mut conn: hpmig_transport_tcp::Conn,
        guest: StreamGuest,
    ) -> Result<RdmaRx, TransportError> {
        let offer = Offer::recv(&mut conn)?;
        // What the source asks, within this stream's share of STAGING_CAP.
        let granted = offer.grant(index, streams, hpmig_core::memory::host_page_size())?;
        let (slots, slot_size) = (granted as usize, offer.slot_size as usize);
        let staging = Ring::new(slots, slot_size).map_err(|source| EndpointError::StagingRing {
            stream: index,
            source,
        })?;
        let (base, len) = staging.region();
        // SAFETY: the staging ring is owned by the RdmaRx built below, which
        // drops this registration before the ring.
        let staging_mr =
            unsafe { Mr::register(&guest.pd, base as *mut u8, len, verbs::ACCESS_REMOTE_WRITE) }?;
        // granted <= MAX_SLOTS (Offer::grant), so these cannot overflow.
        let entries = granted as i32 + 1;
        let send_cq = Cq::new(&self.port.ctx, entries)?;
        let recv_cq = Cq::new(&self.port.ctx, entries)?;
        // One credit SEND per slot; receives for the batches' immediates.
        let caps = QpCaps {
            max_send_wr: granted + 1,
            max_recv_wr: granted,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        let qp = self
            .port
            .queue_pair(&guest.pd, &send_cq, &recv_cq, caps, true)?;
        post_recvs(&qp, granted)?;
        let my_psn = psn(index);
        let mtu = offer.mtu.min(self.port.active_mtu);
        qp.connect(&offer.endpoint, my_psn, self.port.path(mtu))?;
        let StreamGuest {
            pd: _,
            mrs,
            remote,
            local,
        } = guest;
        Answer {
            endpoint: self.port.endpoint(&qp, my_psn),
            mtu,
            staging_addr: staging_mr.addr,
            staging_rkey: staging_mr.rkey,
            slots: granted,
            slot_size: offer.slot_size,
            regions: remote,
        }
        .send(&mut conn)?;
        Ok(RdmaRx::new(RxParts {
            qp,
            send_cq,
            recv_cq,
            staging_mr,
            staging,
            slots: granted,
            slot_size,
            worker: index as u32,
            regions: local,
            guest: mrs,
            interrupt: self.tcp.interrupt(),
            timeout: self.opts.tcp.io_timeout,
            liveness: conn,
        }))
    }
}

impl DestTransport for RdmaDest {
    type Control = TcpControl;
    type Rx = RdmaRx;

    fn control(&mut self) -> &mut TcpControl {
        self.tcp.control()
    }

    fn accept_streams(
        &mut self,
        n: usize,
        session: &Session,
        memory: &DestMemory,
    ) -> Result<Vec<RdmaRx>, TransportError> {
        // Each stream's share of guest memory is registered, for remote
        // writes, in a protection domain of its own (see crate::share), once
        // and before any stream is accepted: the registrations of all
        // streams tile guest memory exactly once.
        let layout = Layout::of(memory).map_err(EndpointError::Layout)?;
        let regions = share::local_regions(memory)?;
        let guests = (0..n)
            .map(|i| StreamGuest::register(&self.port.ctx, &layout, &regions, i, n))
            .collect::<Result<Vec<_>, _>>()?;
        let conns = self.tcp.accept_stream_conns(n, session)?;
        conns
            .into_iter()
            .zip(guests)
            .enumerate()
            .map(|(i, (conn, guest))| self.accept_stream(i, n, conn, guest))
            .collect()
    }

    fn interrupt(&self) -> Interrupt {
        self.tcp.interrupt()
    }

    fn accept_control(&mut self, deadline: std::time::Instant) -> Result<bool, TransportError> {
        self.tcp.accept_control(deadline)
    }
}
