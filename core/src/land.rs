//! Land: the destination side of a migration.
//!
//! [`receive`] answers the handshake, then runs one [`StreamLander`] thread
//! per data stream. A lander reads each record header, checks it against the
//! guest memory layout (inside one page of one region) and against the
//! stream's own share of pages, and only then reads the payload straight into
//! the guest page (no staging copy). Each stream's round ends are checked for
//! order, record count and CRC-32. After the source's Complete, every stream
//! must have delivered its final round; then the destination digests guest
//! memory, compares with the source's digest, and acknowledges. Only a
//! successful [`receive`] may lead to the guest being resumed: on any error
//! the caller discards the memory.
//!
//! Precondition: destination guest memory starts zeroed (fresh anonymous
//! memory, as [`crate::memory::Layout::allocate`] gives): the source's
//! shadow assumes it.

use std::ops::Range;

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::auth::{Secret, Session};
use crate::memory::{worker_share, DestMemory, Layout, MemoryError};
use crate::protocol::{
    self, ErrorCode, Header, Hello, Kind, ProtocolError, RoundEnd, Welcome, DIGEST_LEN,
    FLAG_HAS_DIGEST, FLAG_VERIFIED, HEADER_LEN, KNOWN_FEATURES, ROUND_END_LEN,
};
use crate::segment::compress::PageDecompressor;
use crate::segment::Granularity;
use crate::transport::{Control, DestTransport, Interrupt, StreamRx, TransportError};

/// Why a record was not applied. Nothing of the record was written.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    OutOfRange(#[from] MemoryError),
    /// a page address that is not page-aligned for a whole-page record
    #[error("{kind:?} record at unaligned address {gpa:#x}")]
    Unaligned { kind: Kind, gpa: u64 },
    /// a record for a page another stream owns
    #[error("record for guest address {gpa:#x} on stream {stream}, which does not own that page")]
    NotOwned { gpa: u64, stream: usize },
    /// the round-end checksum does not match the records received
    #[error("round {round}: checksum mismatch (source {expected:#010x}, received {got:#010x})")]
    Checksum { round: u32, expected: u32, got: u32 },
    /// the round-end record count does not match
    #[error("round {round}: {got} records received, source sent {expected}")]
    Count { round: u32, expected: u64, got: u64 },
    /// a round ended out of order
    #[error("round {got} ended where round {expected} was due")]
    RoundOrder { expected: u32, got: u32 },
    /// a record type that has no place on a data stream
    #[error("unexpected {0:?} record on a data stream")]
    Unexpected(Kind),
    /// a compressed page that does not decompress to exactly one page
    #[error("{0}")]
    Corrupt(String),
    /// a compressed page without the zstd feature
    #[error("compressed page received, but zstd was not negotiated")]
    NotNegotiated,
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why the destination gave up. In every case the guest must not run.
#[derive(Debug, Error)]
pub enum LandError {
    /// the source's Hello was refused
    #[error("refused the source: {0}")]
    Refused(ProtocolError),
    /// a data stream failed in a round
    #[error("stream {stream}, round {round}: {cause}")]
    Stream {
        stream: usize,
        round: u32,
        #[source]
        cause: ApplyError,
    },
    /// the control exchange failed
    #[error("control exchange: {0}")]
    Control(#[from] TransportError),
    /// the control exchange broke protocol
    #[error("control exchange: {0}")]
    Protocol(#[from] ProtocolError),
    /// the source reported an error and gave up
    #[error("source reported: {0}")]
    Peer(String),
    /// the source completed, but a stream ended in another round
    #[error("stream {stream} ended in round {got}, source completed round {expected}")]
    FinalRound {
        stream: usize,
        expected: u32,
        got: u32,
    },
    /// the vCPU state record is inconsistent or does not decode
    #[error("vCPU state record: {0}")]
    BadState(String),
    /// the source completed without sending vCPU state
    #[error("source completed without sending vCPU state")]
    NoState,
    /// the source could not prove it holds the token
    #[error("the source failed authentication (wrong or missing token)")]
    Auth,
    /// the source's guest is larger than this destination accepts
    #[error(
        "the source's guest has {bytes} bytes of memory, this destination accepts at most {max}"
    )]
    TooLarge { bytes: u64, max: u64 },
    /// the source did not commit after the acknowledgement: it may have
    /// resumed its guest, so this one must not run
    #[error(
        "no Commit from the source after the acknowledgement ({0}); the guest must not run here"
    )]
    NoCommit(String),
    /// the memory digest differs from the source's
    #[error("guest memory digest differs from the source's")]
    DigestMismatch,
}

impl LandError {
    /// The phase of the migration the destination was in when it failed.
    pub fn phase(&self) -> String {
        match self {
            LandError::Refused(_) | LandError::Auth | LandError::TooLarge { .. } => {
                "handshake".into()
            }
            LandError::Stream { round, .. } => format!("round {round}"),
            LandError::Control(_) | LandError::Protocol(_) | LandError::Peer(_) => {
                "pre-copy (control exchange)".into()
            }
            LandError::FinalRound { .. } | LandError::NoState | LandError::BadState(_) => {
                "state transfer".into()
            }
            LandError::DigestMismatch => "acknowledge".into(),
            LandError::NoCommit(_) => "commit".into(),
        }
    }
}

/// What the destination accepts.
#[derive(Clone, Debug)]
pub struct DestConfig {
    pub max_streams: u16,
    /// Feature bits this destination can serve.
    pub features: u32,
    /// The shared secret the source must prove it holds.
    pub secret: Secret,
    /// Largest guest this destination will allocate memory for.
    pub max_memory: u64,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            max_streams: protocol::MAX_STREAMS,
            features: KNOWN_FEATURES,
            secret: Secret::none(),
            max_memory: 1 << 40,
        }
    }
}

/// A source that passed the handshake: its offer, and the session it opened.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub hello: Hello,
    /// The features both ends use.
    pub features: u32,
    session: Session,
}

/// Counts from one stream (summed over streams in [`Received`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LandStats {
    pub records: u64,
    /// Bytes received on the data streams, headers included.
    pub wire_bytes: u64,
    pub payload_bytes: u64,
    pub zero_pages: u64,
    pub whole_pages: u64,
    pub zstd_pages: u64,
    pub segments: u64,
    pub rounds: u32,
}

impl std::ops::AddAssign for LandStats {
    /// Sums the counts of two streams; `rounds` is the most either closed.
    fn add_assign(&mut self, o: Self) {
        self.records += o.records;
        self.wire_bytes += o.wire_bytes;
        self.payload_bytes += o.payload_bytes;
        self.zero_pages += o.zero_pages;
        self.whole_pages += o.whole_pages;
        self.zstd_pages += o.zstd_pages;
        self.segments += o.segments;
        self.rounds = self.rounds.max(o.rounds);
    }
}

/// A completed migration, ready to resume.
#[derive(Clone, Debug)]
pub struct Received {
    pub granularity: Granularity,
    pub vcpus: u32,
    pub state: Vec<u8>,
    pub final_round: u32,
    /// The source sent a digest and it matched.
    pub verified: bool,
    pub digest: [u8; DIGEST_LEN],
    pub stats: LandStats,
}

/// Host pointers of the destination's guest regions.
#[derive(Debug)]
struct GuestPages {
    regions: Vec<(*mut u8, u64)>,
}

// SAFETY: the pointers are only dereferenced by StreamLander::page_mut under
// its ownership rule (a stream writes only pages of its own share), and the
// mapping outlives every lander (they live inside `receive`'s scope, which
// borrows the memory).
unsafe impl Send for GuestPages {}
// SAFETY: as above; shared references never write through the pointers.
unsafe impl Sync for GuestPages {}

impl GuestPages {
    /// The `page_size` bytes at `offset` in region `region`, writable.
    ///
    /// # Safety
    /// The caller checked that the page belongs to its stream's share;
    /// shares are disjoint, so no other lander touches it, and the guest does
    /// not run while landers do.
    // A shared GuestPages hands out disjoint pages to the streams that own
    // them: the exclusivity is the caller's contract, not the borrow's.
    #[allow(clippy::mut_from_ref)]
    unsafe fn page_mut(&self, region: usize, offset: u64, page_size: u64) -> Option<&mut [u8]> {
        let (base, len) = *self.regions.get(region)?;
        if base.is_null() || offset.checked_add(page_size)? > len {
            return None;
        }
        // SAFETY: [offset, offset + page_size) lies inside the region's
        // mapping (checked just above); exclusivity is the caller's contract.
        Some(unsafe {
            std::slice::from_raw_parts_mut(base.add(offset as usize), page_size as usize)
        })
    }

    fn new(memory: &DestMemory) -> Self {
        let regions = memory
            .iter()
            .map(|r| {
                let len = r.len();
                let ptr = r
                    .as_volatile_slice()
                    .map(|s| s.ptr_guard_mut().as_ptr())
                    .unwrap_or(std::ptr::null_mut());
                (ptr, len)
            })
            .collect();
        GuestPages { regions }
    }
}

/// Applies one data stream's records to guest memory.
#[derive(Debug)]
pub struct StreamLander<'a> {
    stream: usize,
    layout: &'a Layout,
    pages: &'a GuestPages,
    share: Range<usize>,
    zstd: bool,
    /// Made on the first compressed page, with the buffer its payload lands
    /// in (compressed bytes cannot land in place).
    decompressor: Option<PageDecompressor>,
    scratch: Vec<u8>,
    crc: crc32fast::Hasher,
    records: u64,
    next_round: u32,
    stats: LandStats,
    /// One bit per page of the share, set once the page was written: a zero
    /// record for a page never written needs no write (and no page fault),
    /// since destination memory starts zeroed.
    written: Vec<u64>,
}

impl<'a> StreamLander<'a> {
    fn new(
        stream: usize,
        streams: usize,
        layout: &'a Layout,
        pages: &'a GuestPages,
        zstd: bool,
    ) -> Self {
        StreamLander {
            stream,
            layout,
            pages,
            share: worker_share(layout.bitmap_words(), stream, streams),
            zstd,
            decompressor: None,
            scratch: Vec::new(),
            crc: crc32fast::Hasher::new(),
            records: 0,
            next_round: 0,
            stats: LandStats::default(),
            written: vec![0; worker_share(layout.bitmap_words(), stream, streams).len()],
        }
    }

    /// Reads and applies the next record; returns the round end when one closes.
    pub fn step(&mut self, rx: &mut dyn StreamRx) -> Result<Option<RoundEnd>, ApplyError> {
        let ps = self.layout.page_size() as u32;
        let h = rx.next_header(ps)?;
        match h.kind {
            Kind::Segment | Kind::Page | Kind::Zero | Kind::PageZstd => {
                self.data(h, rx).map(|()| None)
            }
            Kind::RoundEnd => {
                let mut p = [0u8; ROUND_END_LEN];
                rx.read_payload(&mut p)?;
                let end = RoundEnd::decode(&h, &p).map_err(|e| ApplyError::Transport(e.into()))?;
                if end.round != self.next_round {
                    return Err(ApplyError::RoundOrder {
                        expected: self.next_round,
                        got: end.round,
                    });
                }
                let got = std::mem::take(&mut self.crc).finalize();
                if end.records != self.records {
                    return Err(ApplyError::Count {
                        round: end.round,
                        expected: end.records,
                        got: self.records,
                    });
                }
                if end.checksum != got {
                    return Err(ApplyError::Checksum {
                        round: end.round,
                        expected: end.checksum,
                        got,
                    });
                }
                self.records = 0;
                self.stats.wire_bytes += (HEADER_LEN + ROUND_END_LEN) as u64;
                self.next_round += 1;
                self.stats.rounds = self.next_round;
                Ok(Some(end))
            }
            other => Err(ApplyError::Unexpected(other)),
        }
    }

    fn data(&mut self, h: Header, rx: &mut dyn StreamRx) -> Result<(), ApplyError> {
        let ps = self.layout.page_size() as u64;
        let whole = matches!(h.kind, Kind::Page | Kind::Zero | Kind::PageZstd);
        if whole && h.arg % ps != 0 {
            return Err(ApplyError::Unaligned {
                kind: h.kind,
                gpa: h.arg,
            });
        }
        if h.kind == Kind::PageZstd && !self.zstd {
            return Err(ApplyError::NotNegotiated);
        }
        let len = if whole { ps } else { u64::from(h.len) };
        let (page, loc) = self.layout.locate(h.arg, len)?;
        if !self.share.contains(&((page.0 / 64) as usize)) {
            return Err(ApplyError::NotOwned {
                gpa: h.arg,
                stream: self.stream,
            });
        }
        let pages: &'a GuestPages = self.pages;
        // SAFETY: the page is in this stream's share (checked just above).
        let Some(dst) = (unsafe { pages.page_mut(loc.region, loc.offset, ps) }) else {
            return Err(ApplyError::OutOfRange(MemoryError::OutOfRange {
                gpa: h.arg,
                len,
            }));
        };
        let local = page.0 - self.share.start as u64 * 64;
        let (word, bit) = ((local / 64) as usize, 1u64 << (local % 64));
        let was_written = self.written[word] & bit != 0;
        if h.kind != Kind::Zero {
            self.written[word] |= bit;
        }
        self.crc.update(&h.encode());
        match h.kind {
            Kind::Segment => {
                let at = (h.arg - loc.gpa.0) as usize;
                let dst = &mut dst[at..at + h.len as usize];
                rx.read_payload(dst)?;
                self.crc.update(dst);
                self.stats.segments += 1;
                self.stats.payload_bytes += u64::from(h.len);
            }
            Kind::Page => {
                rx.read_payload(dst)?;
                self.crc.update(dst);
                self.stats.whole_pages += 1;
                self.stats.payload_bytes += ps;
            }
            Kind::Zero => {
                if was_written {
                    dst.fill(0);
                }
                self.stats.zero_pages += 1;
            }
            Kind::PageZstd => {
                if self.scratch.len() < ps as usize {
                    self.scratch.resize(ps as usize, 0);
                }
                let src = &mut self.scratch[..h.len as usize];
                rx.read_payload(src)?;
                self.crc.update(src);
                let d = match &mut self.decompressor {
                    Some(d) => d,
                    None => self.decompressor.insert(
                        PageDecompressor::new()
                            .map_err(|e| ApplyError::Corrupt(format!("zstd: {e}")))?,
                    ),
                };
                d.decompress(src, dst).map_err(ApplyError::Corrupt)?;
                self.stats.whole_pages += 1;
                self.stats.zstd_pages += 1;
                self.stats.payload_bytes += ps;
            }
            // Only data kinds reach here (checked by the caller).
            other => return Err(ApplyError::Unexpected(other)),
        }
        self.records += 1;
        self.stats.records += 1;
        self.stats.wire_bytes += (HEADER_LEN + h.len as usize) as u64;
        Ok(())
    }
}

/// Answers the handshake: checks the Hello (version, magic, features,
/// stream count, guest size against `max_memory`, the token), sends Welcome
/// and checks the source's Proof. Nothing is allocated for the guest before
/// this succeeds. With `expected`, a source whose layout differs is refused
/// here too. On failure the source is told why.
pub fn accept<T: DestTransport>(
    transport: &mut T,
    cfg: &DestConfig,
    expected: Option<&Layout>,
) -> Result<Accepted, LandError> {
    let result = accept_inner(transport, cfg, expected);
    tell_source(transport, &result);
    result
}

fn accept_inner<T: DestTransport>(
    transport: &mut T,
    cfg: &DestConfig,
    expected: Option<&Layout>,
) -> Result<Accepted, LandError> {
    let refused = |e: ProtocolError| LandError::Refused(e);
    let first = transport.control().recv()?;
    if first.header.kind != Kind::Hello {
        return Err(refused(ProtocolError::Unexpected {
            got: first.header.kind,
            expected: "Hello",
        }));
    }
    let hello = Hello::decode(&first.payload).map_err(refused)?;
    if !Secret::verify(cfg.secret.hello(&hello.nonce), &hello.auth) {
        return Err(LandError::Auth);
    }
    if hello.streams > cfg.max_streams {
        return Err(refused(ProtocolError::Streams(hello.streams)));
    }
    if let Some(ours) = expected.filter(|l| **l != hello.layout) {
        return Err(refused(layout_mismatch(&hello.layout, ours)));
    }
    if hello.layout.total_bytes() > cfg.max_memory {
        return Err(LandError::TooLarge {
            bytes: hello.layout.total_bytes(),
            max: cfg.max_memory,
        });
    }
    let features = hello.features & cfg.features;
    let nonce_d = crate::auth::nonce();
    let welcome = Welcome {
        version: hello.agreed_version(),
        features,
        nonce: nonce_d,
        auth: cfg.secret.welcome(&hello.nonce, &nonce_d),
    };
    transport.control().send(&welcome.encode())?;
    let proof = transport.control().recv()?;
    match proof.header.kind {
        Kind::Proof if Secret::verify(cfg.secret.proof(&hello.nonce, &nonce_d), &proof.payload) => {
        }
        Kind::Proof => return Err(LandError::Auth),
        Kind::Error => {
            return Err(LandError::Peer(
                String::from_utf8_lossy(&proof.payload).into_owned(),
            ))
        }
        got => {
            return Err(refused(ProtocolError::Unexpected {
                got,
                expected: "Proof",
            }))
        }
    }
    let session = cfg.secret.session(hello.nonce, nonce_d);
    Ok(Accepted {
        hello,
        features,
        session,
    })
}

/// Receives one migration into `memory` (which must start zeroed): the
/// handshake, then everything [`receive_accepted`] does.
pub fn receive<T: DestTransport>(
    memory: &DestMemory,
    transport: &mut T,
    cfg: &DestConfig,
) -> Result<Received, LandError> {
    let layout = Layout::of(memory).map_err(|e| {
        LandError::Refused(ProtocolError::Layout {
            source_layout: "-".into(),
            dest_layout: e.to_string(),
        })
    })?;
    let accepted = accept(transport, cfg, Some(&layout))?;
    receive_accepted(&accepted, memory, transport)
}

/// Lands an accepted migration into `memory`, which must have the Hello's
/// layout and start zeroed (see [`Layout::allocate`]).
pub fn receive_accepted<T: DestTransport>(
    accepted: &Accepted,
    memory: &DestMemory,
    transport: &mut T,
) -> Result<Received, LandError> {
    let result = receive_inner(accepted, memory, transport);
    tell_source(transport, &result);
    result
}

/// Refuses a State record whose announced vCPU count differs from the state
/// it carries, for the formats hpmig knows (a library user's own format
/// passes through unchecked).
fn check_state(vcpus: u32, state: &[u8]) -> Result<(), LandError> {
    use crate::vm::emulated::EmulatedConfig;
    use crate::vm::kvm::state::VmState;
    let carried = if VmState::is_kvm_record(state) {
        VmState::decode(state)
            .map_err(|e| LandError::BadState(e.to_string()))?
            .vcpus
            .len() as u32
    } else if let Some(cfg) = EmulatedConfig::from_state_record(state, 0) {
        cfg.vcpus
    } else {
        return Ok(());
    };
    if carried != vcpus {
        return Err(LandError::BadState(format!(
            "the State record announces {vcpus} vCPUs but carries {carried}"
        )));
    }
    Ok(())
}

fn layout_mismatch(source: &Layout, dest: &Layout) -> ProtocolError {
    ProtocolError::Layout {
        source_layout: format!("{source:?}"),
        dest_layout: format!("{dest:?}"),
    }
}

/// Best effort: tell the source why we failed (it may be gone already).
fn tell_source<T: DestTransport, R>(transport: &mut T, result: &Result<R, LandError>) {
    if let Err(e) = result {
        let code = match e {
            LandError::Refused(_) | LandError::Auth | LandError::TooLarge { .. } => {
                ErrorCode::Refused
            }
            LandError::DigestMismatch => ErrorCode::DigestMismatch,
            _ => ErrorCode::Apply,
        };
        let _ = transport
            .control()
            .send(&protocol::encode_error(code, &e.to_string()));
    }
}

fn receive_inner<T: DestTransport>(
    accepted: &Accepted,
    memory: &DestMemory,
    transport: &mut T,
) -> Result<Received, LandError> {
    let hello = &accepted.hello;
    let ours = Layout::of(memory).map_err(|e| {
        LandError::Refused(ProtocolError::Layout {
            source_layout: format!("{:?}", hello.layout),
            dest_layout: e.to_string(),
        })
    })?;
    if hello.layout != ours {
        return Err(LandError::Refused(layout_mismatch(&hello.layout, &ours)));
    }
    let features = accepted.features;
    let streams = usize::from(hello.streams);
    let rxs = transport.accept_streams(streams, &accepted.session, memory)?;
    // Memory is allocated and every stream accepted: round 0 may start.
    transport
        .control()
        .send(&protocol::encode_record(Kind::Ready, 0, 0, &[]))?;
    let pages = GuestPages::new(memory);
    let interrupt = transport.interrupt();
    let zstd = features & protocol::FEATURE_ZSTD != 0;

    let control = transport.control();
    let (state, complete, stats, digest) = std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(i, mut rx)| {
                let mut lander = StreamLander::new(i, streams, &ours, &pages, zstd);
                let interrupt = interrupt.clone();
                scope.spawn(move || {
                    run_stream(&mut lander, &mut rx, &interrupt)
                        .map(|last| (last, lander.stats))
                        .map_err(|e| (lander.next_round, e))
                })
            })
            .collect();
        // The control exchange runs beside the streams, so the digest below
        // can start as soon as the last stream ends, while the source is
        // still digesting its own memory.
        let control = {
            let interrupt = interrupt.clone();
            scope.spawn(move || {
                let r = control_until_complete(control);
                if r.is_err() {
                    interrupt.trigger();
                }
                r
            })
        };
        let mut stats = LandStats::default();
        let mut finals = Vec::with_capacity(streams);
        let mut stream_err = None;
        let mut interrupted = false;
        for (stream, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok((last, s))) => {
                    finals.push(last);
                    stats += s;
                }
                Ok(Err((_, ApplyError::Transport(TransportError::Interrupted)))) => {
                    interrupted = true
                }
                Ok(Err((round, cause))) => {
                    // Name the furthest round a failing stream reached: how
                    // far the destination got (a lagging stream that was
                    // merely reset says less).
                    let further = match &stream_err {
                        Some(LandError::Stream { round: r, .. }) => round > *r,
                        _ => true,
                    };
                    if further {
                        stream_err = Some(LandError::Stream {
                            stream,
                            round,
                            cause,
                        });
                    }
                }
                Err(_) => {
                    stream_err
                        .get_or_insert(LandError::Peer(format!("stream {stream} thread panicked")));
                }
            }
        }
        // A stream's own error is the root cause; the control error it caused is not.
        if let Some(e) = stream_err {
            interrupt.trigger();
            let _ = control.join();
            return Err(e);
        }
        if interrupted {
            // The control exchange failed first; its error is the cause.
            let control = control
                .join()
                .map_err(|_| LandError::Peer("control thread panicked".into()))?;
            return Err(control
                .err()
                .unwrap_or(LandError::Control(TransportError::Interrupted)));
        }
        // SAFETY: every lander thread has been joined and the guest has not
        // been started, so nothing writes guest memory during the digest.
        let digest = unsafe { crate::memory::digest(memory) };
        let (state, complete) = control
            .join()
            .map_err(|_| LandError::Peer("control thread panicked".into()))??;
        for (stream, &last) in finals.iter().enumerate() {
            if last != complete.0 {
                return Err(LandError::FinalRound {
                    stream,
                    expected: complete.0,
                    got: last,
                });
            }
        }
        Ok((state, complete, stats, digest))
    })?;
    let (vcpus, state) = state.ok_or(LandError::NoState)?;
    check_state(vcpus, &state)?;
    // What both ends verify: memory and state together.
    let digest = protocol::switch_over_digest(&digest, &state);
    let (final_round, source_digest) = complete;
    let verified = match source_digest {
        Some(d) if d != digest => return Err(LandError::DigestMismatch),
        Some(_) => true,
        None => false,
    };
    let flags = if verified { FLAG_VERIFIED } else { 0 };
    transport.control().send(&protocol::encode_record(
        Kind::Ack,
        flags,
        final_round.into(),
        &digest,
    ))?;
    // The source may still resume its guest until it commits: wait for it.
    match transport.control().recv() {
        Ok(r) if r.header.kind == Kind::Commit => {}
        Ok(r) if r.header.kind == Kind::Error => {
            return Err(LandError::NoCommit(
                String::from_utf8_lossy(&r.payload).into_owned(),
            ));
        }
        Ok(r) => {
            return Err(LandError::NoCommit(format!(
                "unexpected {:?} record",
                r.header.kind
            )))
        }
        Err(e) => return Err(LandError::NoCommit(e.to_string())),
    }
    Ok(Received {
        granularity: hello.granularity,
        vcpus,
        state,
        final_round,
        verified,
        digest,
        stats,
    })
}

type StateRecord = Option<(u32, Vec<u8>)>;
type CompleteRecord = (u32, Option<[u8; DIGEST_LEN]>);

/// Reads control records until Complete: keeps the State, stops on Error.
fn control_until_complete<C: Control>(
    control: &mut C,
) -> Result<(StateRecord, CompleteRecord), LandError> {
    let mut state = None;
    loop {
        let r = control.recv()?;
        match r.header.kind {
            Kind::State => {
                let vcpus = u32::try_from(r.header.arg).map_err(|_| ProtocolError::Unexpected {
                    got: Kind::State,
                    expected: "a vCPU count",
                })?;
                state = Some((vcpus, r.payload));
            }
            Kind::Complete => {
                let round = u32::try_from(r.header.arg).map_err(|_| ProtocolError::Unexpected {
                    got: Kind::Complete,
                    expected: "a round",
                })?;
                let digest = (r.header.flags & FLAG_HAS_DIGEST != 0)
                    .then(|| <[u8; DIGEST_LEN]>::try_from(&r.payload[..]).ok())
                    .flatten();
                return Ok((state, (round, digest)));
            }
            Kind::Error => {
                return Err(LandError::Peer(
                    String::from_utf8_lossy(&r.payload).into_owned(),
                ))
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "State, Complete or Error",
                }
                .into())
            }
        }
    }
}

/// Lands one stream until its final round; returns that round.
fn run_stream(
    lander: &mut StreamLander<'_>,
    rx: &mut dyn StreamRx,
    interrupt: &Interrupt,
) -> Result<u32, ApplyError> {
    let result = loop {
        match lander.step(rx) {
            Ok(Some(end)) if end.last => break Ok(end.round),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    if matches!(result, Err(ref e) if !matches!(e, ApplyError::Transport(TransportError::Interrupted)))
    {
        // Unblock the control loop and the other streams.
        interrupt.trigger();
    }
    result
}

/// A data stream read from a byte buffer: one stream's records as they
/// would arrive. Drives [`land_stream`] (fuzzing, replaying captures).
#[derive(Debug)]
pub struct SliceRx<'b> {
    bytes: &'b [u8],
}

impl<'b> SliceRx<'b> {
    pub fn new(bytes: &'b [u8]) -> Self {
        SliceRx { bytes }
    }
}

impl StreamRx for SliceRx<'_> {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        let (h, rest) = self
            .bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(TransportError::Disconnected)?;
        self.bytes = rest;
        Ok(Header::decode(h, page_size)?)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let src = self
            .bytes
            .get(..dst.len())
            .ok_or(ProtocolError::Truncated {
                needed: dst.len(),
                had: self.bytes.len(),
            })?;
        dst.copy_from_slice(src);
        self.bytes = &self.bytes[dst.len()..];
        Ok(())
    }
}

/// Lands `bytes` as the records of stream `stream` of `streams` into
/// `memory`, until they run out or a record is refused; returns the rounds
/// it closed. Every check of a real migration applies.
pub fn land_stream(
    memory: &DestMemory,
    stream: usize,
    streams: usize,
    zstd: bool,
    bytes: &[u8],
) -> Result<u32, ApplyError> {
    let layout = Layout::of(memory)?;
    let pages = GuestPages::new(memory);
    let mut lander = StreamLander::new(stream, streams.max(1), &layout, &pages, zstd);
    let mut rx = SliceRx::new(bytes);
    let mut rounds = 0;
    while !rx.bytes.is_empty() {
        if lander.step(&mut rx)?.is_some() {
            rounds += 1;
        }
    }
    Ok(rounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;
    use crate::protocol::Header;
    use vm_memory::{Bytes, GuestAddress};

    const PS: u64 = 4096;

    struct Fixture {
        memory: DestMemory,
    }

    fn fixture() -> Fixture {
        let ps = crate::memory::host_page_size() as u64;
        assert_eq!(ps, PS, "these tests assume 4 KiB host pages");
        let layout = Layout::new(
            PS as usize,
            vec![
                RegionSpec {
                    base: GuestAddress(0),
                    size: 128 * PS,
                },
                RegionSpec {
                    base: GuestAddress(1 << 30),
                    size: 64 * PS,
                },
            ],
        )
        .unwrap();
        Fixture {
            memory: layout.allocate().unwrap(),
        }
    }

    fn segment(gpa: u64, payload: &[u8]) -> Vec<u8> {
        [
            &Header::segment(gpa, payload.len() as u32).encode()[..],
            payload,
        ]
        .concat()
    }

    fn round_end(round: u32, records: u64, checksum: u32) -> Vec<u8> {
        RoundEnd {
            round,
            last: false,
            records,
            checksum,
        }
        .encode()
        .to_vec()
    }

    fn crc(records: &[&[u8]]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for r in records {
            h.update(r);
        }
        h.finalize()
    }

    /// Runs `bytes` through stream `stream` of 2; returns the first error.
    fn land(f: &Fixture, stream: usize, bytes: &[u8]) -> Result<(), ApplyError> {
        land_stream(&f.memory, stream, 2, false, bytes).map(|_| ())
    }

    fn untouched(f: &Fixture) -> bool {
        let mut buf = vec![0u8; (128 * PS) as usize];
        f.memory.read_slice(&mut buf, GuestAddress(0)).unwrap();
        buf.iter().all(|&b| b == 0)
    }

    #[test]
    fn a_valid_round_lands() {
        let f = fixture();
        let s = segment(3 * PS + 10, b"hello");
        let bytes = [s.clone(), round_end(0, 1, crc(&[&s]))].concat();
        land(&f, 0, &bytes).unwrap();
        let mut got = [0u8; 5];
        f.memory
            .read_slice(&mut got, GuestAddress(3 * PS + 10))
            .unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn out_of_range_and_unowned_records_write_nothing() {
        let f = fixture();
        // In the hole between the regions.
        let e = land(&f, 0, &segment(200 * PS, b"x")).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfRange(_)), "{e}");
        // Crossing a page end.
        let e = land(&f, 0, &segment(2 * PS - 2, b"abcd")).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfRange(_)), "{e}");
        // Page 1 belongs to stream 0 of 2, not stream 1.
        let e = land(&f, 1, &segment(PS, b"x")).unwrap_err();
        assert!(matches!(e, ApplyError::NotOwned { stream: 1, .. }), "{e}");
        // A whole page at an unaligned address.
        let page = [
            &Header::page(PS + 1, PS as u32).encode()[..],
            &vec![1u8; PS as usize],
        ]
        .concat();
        let e = land(&f, 0, &page).unwrap_err();
        assert!(matches!(e, ApplyError::Unaligned { .. }), "{e}");
        assert!(untouched(&f));
    }

    #[test]
    fn round_end_checks_are_distinct() {
        let f = fixture();
        let s = segment(5 * PS, b"abc");
        let e = land(
            &f,
            0,
            &[s.clone(), round_end(0, 1, crc(&[&s]) ^ 1)].concat(),
        )
        .unwrap_err();
        assert!(matches!(e, ApplyError::Checksum { round: 0, .. }), "{e}");
        let e = land(&f, 0, &[s.clone(), round_end(0, 2, crc(&[&s]))].concat()).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Count {
                    expected: 2,
                    got: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = land(&f, 0, &round_end(1, 0, crc(&[]))).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::RoundOrder {
                    expected: 0,
                    got: 1
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn control_records_and_unnegotiated_zstd_are_refused_on_data_streams() {
        let f = fixture();
        let hello = Header::new(Kind::Ack, 0, 32, 0).encode();
        let e = land(&f, 0, &[&hello[..], &[0u8; 32]].concat()).unwrap_err();
        assert!(matches!(e, ApplyError::Unexpected(Kind::Ack)), "{e}");
        let z = [
            &Header::new(Kind::PageZstd, 0, 4, 0).encode()[..],
            &[1u8; 4],
        ]
        .concat();
        assert!(matches!(
            land(&f, 0, &z).unwrap_err(),
            ApplyError::NotNegotiated
        ));
        let mut unknown = Header::zero(0).encode();
        unknown[0] = 99;
        let e = land(&f, 0, &unknown).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Transport(TransportError::Protocol(ProtocolError::UnknownKind(99)))
            ),
            "{e}"
        );
        let big = Header::segment(0, PS as u32 + 1).encode();
        let e = land(&f, 0, &big).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Transport(TransportError::Protocol(ProtocolError::Oversized { .. }))
            ),
            "{e}"
        );
        assert!(untouched(&f));
    }

    #[test]
    fn a_state_record_for_the_wrong_vcpu_count_is_refused() {
        use crate::vm::emulated::EmulatedConfig;
        use crate::vm::Workload;
        let two = EmulatedConfig {
            workload: Workload::Idle,
            vcpus: 2,
            dirty_rate: None,
            seed: 0,
        }
        .state_record();
        assert!(check_state(2, &two).is_ok());
        let e = check_state(3, &two).unwrap_err();
        assert!(
            e.to_string().contains("announces 3 vCPUs but carries 2"),
            "{e}"
        );
        assert!(matches!(
            check_state(1, b"hpmig-kvm-v1 garbage"),
            Err(LandError::BadState(_))
        ));
        assert!(
            check_state(7, b"some other VMM's state").is_ok(),
            "unknown formats pass through"
        );
    }
}
