//! A diff worker: owns a fixed share of bitmap words, its part of the shadow
//! (or of the fingerprint store, `--shadow fingerprint`),
//! one page encoder, one snapshot buffer and one data stream. Each round it
//! scans its words with `trailing_zeros`, and for every dirty page copies the
//! live page once into the snapshot, plans, writes records into its current
//! ring slot, and updates the shadow from the snapshot. Nothing is allocated,
//! locked or called into the kernel per page; a slot is submitted (and the
//! bandwidth cap consulted) only when full and at the round's end.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::limiter::RateLimiter;
use super::live::{ByteKinds, Live};
use super::rounds::Remembered;
use super::Cause;
use crate::dirty::DirtyBitmap;
use crate::memory::{Layout, PageIndex, Share, SourceMemory};
use crate::protocol::{Header, Kind, RoundEnd, HEADER_LEN, ROUND_END_LEN};
use crate::ring::SendBuf;
use crate::segment::compress::PageCompressor;
use crate::segment::fingerprint::FingerprintPart;
use crate::segment::shadow::{Shadow, ShadowPart};
use crate::segment::{PageEncoder, Plan};
use crate::transport::{StreamTx, TransportError};
use crate::verify::{Ledger, PageHasher};

/// What the driver asks a worker to do.
#[derive(Debug)]
pub(crate) struct RoundCmd {
    pub round: u32,
    pub last: bool,
    /// Compress wide pages this round (zstd negotiated and worth it).
    pub compress: bool,
    pub bitmap: Arc<DirtyBitmap>,
}

/// One round's counts from one worker (summed over workers in reports).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerStats {
    pub dirty_pages: u64,
    pub unchanged_pages: u64,
    pub zero_pages: u64,
    pub whole_pages: u64,
    /// Whole pages that went zstd-compressed.
    pub zstd_pages: u64,
    /// Pages sent as segments or as one Words record.
    pub segment_pages: u64,
    /// Segment and Words records.
    pub segments: u64,
    /// Pages sent as one Words record (counted in the two above too).
    pub word_pages: u64,
    pub work_set_bytes: u64,
    pub wire_bytes: u64,
    /// Page bytes fed to zstd and seconds spent compressing them.
    pub zstd_bytes_in: u64,
    pub zstd_secs: f64,
    /// The sum of the worker's page-hash ledger after the round (all
    /// workers' summed: the source's ledger sum; 0 unless incremental).
    pub ledger_sum: u128,
    /// Wire bytes by what they carried (their sum is `wire_bytes`).
    pub bytes: ByteKinds,
}

impl std::ops::AddAssign for WorkerStats {
    fn add_assign(&mut self, o: Self) {
        self.dirty_pages += o.dirty_pages;
        self.unchanged_pages += o.unchanged_pages;
        self.zero_pages += o.zero_pages;
        self.whole_pages += o.whole_pages;
        self.zstd_pages += o.zstd_pages;
        self.segment_pages += o.segment_pages;
        self.segments += o.segments;
        self.word_pages += o.word_pages;
        self.work_set_bytes += o.work_set_bytes;
        self.wire_bytes += o.wire_bytes;
        self.zstd_bytes_in += o.zstd_bytes_in;
        self.zstd_secs += o.zstd_secs;
        self.ledger_sum = self.ledger_sum.wrapping_add(o.ledger_sum);
        self.bytes += o.bytes;
    }
}

pub(crate) type Done = (usize, Result<WorkerStats, Cause>);

pub(crate) struct Worker<T: StreamTx> {
    pub index: usize,
    pub memory: SourceMemory,
    pub layout: Layout,
    pub share: Share,
    pub shadow: Option<ShadowPart>,
    /// Instead of a shadow: this share's block fingerprints.
    pub fingerprints: Option<FingerprintPart>,
    pub encoder: PageEncoder,
    pub compressor: Option<PageCompressor>,
    pub limiter: Arc<RateLimiter>,
    /// Where the worker publishes its progress (stream `index`), and whose
    /// cancel ends a wait for the cap.
    pub live: Arc<Live>,
    /// Bytes by kind and pages, all rounds, as last published.
    pub published: (ByteKinds, u64),
    /// Incremental verification: the page hasher and this share's ledger
    /// of what was sent.
    pub ledger: Option<(Arc<PageHasher>, Ledger)>,
    pub tx: T,
}

/// The slot being filled, its round's checksum and counts.
struct Emitter {
    buf: SendBuf,
    crc: crc32fast::Hasher,
    hashed: usize,
    records: u64,
    wire: u64,
    /// This round's bytes by kind, and pages dealt with, so far.
    kinds: ByteKinds,
    pages: u64,
    /// What earlier rounds published.
    base: (ByteKinds, u64),
}

impl<T: StreamTx> Worker<T> {
    /// Serves rounds until the driver hangs up; returns the ledger of what
    /// was sent (incremental verification) and its part of the shadow, which
    /// the driver frees once the switch-over is over: unmapping gigabytes
    /// takes tens of milliseconds that must not fall into the downtime.
    pub fn run(
        mut self,
        cmds: Receiver<RoundCmd>,
        done: Sender<Done>,
    ) -> (Option<Ledger>, Remembered) {
        let page_size = self.layout.page_size();
        let mut snapshot = vec![0u8; page_size];
        let zero_page = vec![0u8; page_size];
        let buf = match self.tx.take_free() {
            Ok(b) => b,
            Err(e) => {
                let _ = done.send((self.index, Err(e.into())));
                return (
                    self.ledger.map(|(_, l)| l),
                    (self.shadow.take(), self.fingerprints.take()),
                );
            }
        };
        let mut em = Emitter {
            buf,
            crc: crc32fast::Hasher::new(),
            hashed: 0,
            records: 0,
            wire: 0,
            kinds: ByteKinds::default(),
            pages: 0,
            base: (ByteKinds::default(), 0),
        };
        while let Ok(cmd) = cmds.recv() {
            let result = self.round(&mut em, &mut snapshot, &zero_page, &cmd);
            drop(cmd.bitmap);
            let failed = result.is_err();
            let _ = done.send((self.index, result));
            if failed {
                break;
            }
        }
        (
            self.ledger.map(|(_, l)| l),
            (self.shadow.take(), self.fingerprints.take()),
        )
    }

    /// Submits the current slot and takes a free one.
    fn flush(&mut self, em: &mut Emitter) -> Result<(), TransportError> {
        em.crc.update(&em.buf.filled()[em.hashed..]);
        em.hashed = 0;
        if em.buf.is_empty() {
            return Ok(());
        }
        let next = self.tx.take_free()?;
        let full = std::mem::replace(&mut em.buf, next);
        let live = &self.live;
        self.limiter.acquire(full.len(), &|| live.cancelled());
        em.wire += full.len() as u64;
        self.tx.submit(full)?;
        self.publish(em);
        Ok(())
    }

    /// Tells the watchers what went out since the last slot.
    fn publish(&mut self, em: &Emitter) {
        let (mut kinds, mut pages) = em.base;
        kinds += em.kinds;
        pages += em.pages;
        let (was_kinds, was_pages) = self.published;
        self.live
            .add(self.index, kinds - was_kinds, pages - was_pages);
        self.published = (kinds, pages);
    }

    /// Makes room for `n` more bytes in the current slot.
    fn reserve(&mut self, em: &mut Emitter, n: usize) -> Result<(), TransportError> {
        if em.buf.remaining() < n {
            self.flush(em)?;
        }
        Ok(())
    }

    fn round(
        &mut self,
        em: &mut Emitter,
        snapshot: &mut [u8],
        zero_page: &[u8],
        cmd: &RoundCmd,
    ) -> Result<WorkerStats, Cause> {
        let ps = self.layout.page_size();
        let mut st = WorkerStats::default();
        let (zstd_in, zstd_secs) = self
            .compressor
            .as_ref()
            .map_or((0, 0.0), |c| (c.bytes_in, c.secs));
        em.records = 0;
        em.wire = 0;
        em.base = self.published;
        em.kinds = ByteKinds::default();
        em.pages = 0;
        if let Some(f) = &mut self.fingerprints {
            f.start_round(cmd.round);
        }
        let words = cmd.bitmap.words();
        // One small vector per round (regions are few), none per page.
        let memory = self.memory.clone();
        let regions: Vec<_> = memory.iter().collect();
        for w in self.share.words.clone() {
            let mut bits = words[w];
            if bits == 0 {
                continue;
            }
            let Some((region, first_offset)) = self.layout.word_start(w) else {
                continue;
            };
            let r = regions[region];
            let base = r.start_addr().0;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let page = PageIndex::from_word_bit(w, bit);
                let offset = first_offset + u64::from(bit) * ps as u64;
                // Harvest order: the bit was cleared before this read, so a
                // write racing with the copy re-dirties the page next round.
                let live = r.get_slice(MemoryRegionAddress(offset), ps).map_err(|e| {
                    Cause::Setup(format!("reading guest page {:#x}: {e}", base + offset))
                })?;
                st.dirty_pages += 1;
                em.pages += 1;
                let gpa = base + offset;
                let guard = live.ptr_guard();
                let src = guard.as_ptr();
                let plan = if let Some(f) = self.fingerprints.as_mut() {
                    // Copy and hash in one pass over the live page.
                    // SAFETY: `src` is `ps` bytes of mapped guest memory
                    // (get_slice checked the range), mapped while `memory`
                    // is held; `snapshot` is this worker's own `ps`-byte
                    // buffer, so the two do not overlap.
                    match unsafe { f.copy_compare_and_store(page, src, snapshot) } {
                        Some(changed) => self.encoder.plan_blocks(snapshot, changed),
                        None => self.encoder.plan(snapshot, None),
                    }
                } else {
                    match self.shadow.as_mut().map(|s| s.lookup(page, cmd.round > 0)) {
                        Some(Shadow::Known(sh)) => {
                            // Copy and diff in one pass over the live page.
                            // SAFETY: as above; the shadow is this worker's
                            // own page of its shadow part.
                            let plan = unsafe { self.encoder.copy_and_plan(src, snapshot, sh) };
                            self.encoder.update_shadow(plan, snapshot, sh);
                            plan
                        }
                        Some(Shadow::Zero(slot)) => {
                            // SAFETY: as above; `zero_page` is the worker's own.
                            let plan =
                                unsafe { self.encoder.copy_and_plan(src, snapshot, zero_page) };
                            if plan != Plan::Unchanged {
                                self.encoder
                                    .update_shadow(plan, snapshot, slot.into_bytes());
                            }
                            plan
                        }
                        Some(Shadow::Fresh(sh)) => {
                            live.copy_to(snapshot);
                            sh.copy_from_slice(snapshot);
                            self.encoder.plan(snapshot, None)
                        }
                        Some(Shadow::None) | None => {
                            live.copy_to(snapshot);
                            self.encoder.plan(snapshot, None)
                        }
                    }
                };
                let compressed = self.emit(em, plan, gpa, snapshot, cmd.compress)?;
                // "Unchanged" proves the destination holds the snapshot only
                // when it came from a byte-exact diff. A fingerprint's
                // "unchanged" may be a collision, which the ledger must not
                // inherit: it records the snapshot's hash then, unless the
                // page was never recorded and is zero (the destination's
                // memory starts zeroed, and its ledger holds 0 for a page
                // no record reached: so must this one).
                let record = match plan {
                    Plan::Unchanged if self.fingerprints.is_some() => {
                        self.ledger.as_ref().is_some_and(|(_, l)| l.recorded(page))
                            || !crate::memory::is_zero(snapshot)
                    }
                    Plan::Unchanged => false,
                    _ => true,
                };
                if let (Some((hasher, ledger)), true) = (&mut self.ledger, record) {
                    // What the destination holds from now on: the snapshot.
                    ledger.set(page, hasher.hash(gpa, snapshot));
                }
                st.work_set_bytes += self.encoder.work_set_bytes(plan);
                match plan {
                    Plan::Unchanged => st.unchanged_pages += 1,
                    Plan::Zero => st.zero_pages += 1,
                    Plan::Whole => {
                        st.whole_pages += 1;
                        st.zstd_pages += u64::from(compressed);
                    }
                    Plan::Segments { count, .. } => {
                        st.segment_pages += 1;
                        st.segments += u64::from(count);
                    }
                    // The page's dirty words, in one record.
                    Plan::Words { .. } => {
                        st.segment_pages += 1;
                        st.segments += 1;
                        st.word_pages += 1;
                    }
                }
            }
        }
        // Close the round: checksum everything before the RoundEnd, then send.
        self.reserve(em, HEADER_LEN + ROUND_END_LEN)?;
        em.crc.update(&em.buf.filled()[em.hashed..]);
        let checksum = std::mem::take(&mut em.crc).finalize();
        let end = RoundEnd {
            round: cmd.round,
            last: cmd.last,
            records: em.records,
            checksum,
        };
        em.buf.push(&end.encode());
        em.hashed = em.buf.len();
        em.kinds.headers += (HEADER_LEN + ROUND_END_LEN) as u64;
        self.flush(em)?;
        st.wire_bytes = em.wire;
        st.bytes = em.kinds;
        st.ledger_sum = self.ledger.as_ref().map_or(0, |(_, l)| l.sum());
        if let Some(c) = &self.compressor {
            st.zstd_bytes_in = c.bytes_in - zstd_in;
            st.zstd_secs = c.secs - zstd_secs;
        }
        Ok(st)
    }

    /// Writes `plan`'s records; returns whether a whole page went compressed.
    fn emit(
        &mut self,
        em: &mut Emitter,
        plan: Plan,
        gpa: u64,
        snapshot: &[u8],
        compress: bool,
    ) -> Result<bool, TransportError> {
        let need = self.encoder.encoded_len(plan);
        if need == 0 {
            return Ok(false);
        }
        self.reserve(em, need)?;
        let before = em.buf.len();
        let mut compressed = false;
        if let (Plan::Whole, true, Some(c)) = (plan, compress, self.compressor.as_mut()) {
            let out = em.buf.spare();
            if let Some(n) = c.compress(snapshot, &mut out[HEADER_LEN..need]) {
                out[..HEADER_LEN]
                    .copy_from_slice(&Header::new(Kind::PageZstd, 0, n as u32, gpa).encode());
                em.buf.advance(HEADER_LEN + n);
                compressed = true;
            }
        }
        let records = self.encoder.records(plan);
        if !compressed {
            let n = self.encoder.write(plan, gpa, snapshot, em.buf.spare());
            em.buf.advance(n);
        }
        // Headers, and a Words record's mask (a compressed page: its header).
        let headers = if compressed {
            HEADER_LEN as u64
        } else {
            self.encoder.overhead(plan)
        };
        let payload = ((em.buf.len() - before) as u64).saturating_sub(headers);
        em.kinds.headers += headers;
        match plan {
            Plan::Segments { .. } | Plan::Words { .. } => em.kinds.segment += payload,
            Plan::Whole if compressed => em.kinds.zstd += payload,
            Plan::Whole => em.kinds.whole += payload,
            Plan::Zero | Plan::Unchanged => {}
        }
        em.records += records;
        Ok(compressed)
    }
}
