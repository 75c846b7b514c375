//! A diff worker: owns a fixed share of bitmap words, its part of the shadow,
//! one page encoder, one snapshot buffer and one data stream. Each round it
//! scans its words with `trailing_zeros`, and for every dirty page copies the
//! live page once into the snapshot, plans, writes records into its current
//! ring slot, and updates the shadow from the snapshot. Nothing is allocated,
//! locked or called into the kernel per page; a slot is submitted only when
//! full and at the round's end.

use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

use super::Cause;
use crate::dirty::DirtyBitmap;
use crate::memory::{Layout, PageIndex};
use crate::protocol::{RoundEnd, HEADER_LEN, ROUND_END_LEN};
use crate::ring::SendBuf;
use crate::segment::shadow::{Shadow, ShadowPart};
use crate::segment::{PageEncoder, Plan};
use crate::transport::{StreamTx, TransportError};

/// What the driver asks a worker to do.
#[derive(Debug)]
pub(crate) struct RoundCmd {
    pub round: u32,
    pub last: bool,
    pub bitmap: Arc<DirtyBitmap>,
}

/// One round's counts from one worker (summed over workers in reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub dirty_pages: u64,
    pub unchanged_pages: u64,
    pub zero_pages: u64,
    pub whole_pages: u64,
    pub segment_pages: u64,
    pub segments: u64,
    pub work_set_bytes: u64,
    pub wire_bytes: u64,
}

impl std::ops::AddAssign for WorkerStats {
    fn add_assign(&mut self, o: Self) {
        self.dirty_pages += o.dirty_pages;
        self.unchanged_pages += o.unchanged_pages;
        self.zero_pages += o.zero_pages;
        self.whole_pages += o.whole_pages;
        self.segment_pages += o.segment_pages;
        self.segments += o.segments;
        self.work_set_bytes += o.work_set_bytes;
        self.wire_bytes += o.wire_bytes;
    }
}

pub(crate) type Done = (usize, Result<WorkerStats, Cause>);

pub(crate) struct Worker<'a, T: StreamTx> {
    pub index: usize,
    pub regions: Vec<&'a GuestRegionMmap<AtomicBitmap>>,
    pub layout: &'a Layout,
    pub share: Range<usize>,
    pub shadow: Option<ShadowPart<'a>>,
    pub encoder: PageEncoder,
    pub tx: T,
}

/// Per-round emission state: the slot being filled and its checksum.
struct Emitter<'t, T: StreamTx> {
    tx: &'t mut T,
    buf: SendBuf,
    crc: crc32fast::Hasher,
    hashed: usize,
    records: u64,
    wire: u64,
}

impl<T: StreamTx> Emitter<'_, T> {
    /// Submits the current slot and takes a free one.
    fn flush(&mut self) -> Result<(), TransportError> {
        self.crc.update(&self.buf.filled()[self.hashed..]);
        self.hashed = 0;
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self.tx.take_free()?;
        let full = std::mem::replace(&mut self.buf, next);
        self.wire += full.len() as u64;
        self.tx.submit(full)
    }

    /// Room for `n` more bytes in the current slot.
    fn reserve(&mut self, n: usize) -> Result<&mut [u8], TransportError> {
        if self.buf.remaining() < n {
            self.flush()?;
        }
        Ok(self.buf.spare())
    }
}

impl<T: StreamTx> Worker<'_, T> {
    pub fn run(mut self, cmds: Receiver<RoundCmd>, done: Sender<Done>) {
        let page_size = self.layout.page_size();
        let mut snapshot = vec![0u8; page_size];
        let zero_page = vec![0u8; page_size];
        let mut buf = match self.tx.take_free() {
            Ok(b) => b,
            Err(e) => {
                let _ = done.send((self.index, Err(e.into())));
                return;
            }
        };
        while let Ok(cmd) = cmds.recv() {
            let mut em = Emitter {
                tx: &mut self.tx,
                buf,
                crc: crc32fast::Hasher::new(),
                hashed: 0,
                records: 0,
                wire: 0,
            };
            let result = round(
                &mut em,
                &self.regions,
                self.layout,
                self.share.clone(),
                &mut self.shadow,
                &mut self.encoder,
                &mut snapshot,
                &zero_page,
                &cmd,
            );
            drop(cmd.bitmap);
            buf = em.buf;
            let failed = result.is_err();
            let _ = done.send((self.index, result));
            if failed {
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn round<T: StreamTx>(
    em: &mut Emitter<'_, T>,
    regions: &[&GuestRegionMmap<AtomicBitmap>],
    layout: &Layout,
    share: Range<usize>,
    shadow: &mut Option<ShadowPart<'_>>,
    enc: &mut PageEncoder,
    snapshot: &mut [u8],
    zero_page: &[u8],
    cmd: &RoundCmd,
) -> Result<WorkerStats, Cause> {
    let ps = layout.page_size();
    let mut st = WorkerStats::default();
    let words = cmd.bitmap.words();
    for w in share {
        let mut bits = words[w];
        if bits == 0 {
            continue;
        }
        let Some((region, first_offset)) = layout.word_start(w) else {
            continue;
        };
        let r = regions[region];
        let base = r.start_addr().0;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let offset = first_offset + bit * ps as u64;
            // Harvest order: the bit was cleared before this read, so a write
            // racing with the copy re-dirties the page for the next round.
            let live = r.get_slice(MemoryRegionAddress(offset), ps).map_err(|e| {
                Cause::Setup(format!("reading guest page {:#x}: {e}", base + offset))
            })?;
            live.copy_to(snapshot);
            st.dirty_pages += 1;
            let page = PageIndex(w as u64 * 64 + bit);
            let gpa = base + offset;
            let plan = match shadow.as_mut().map(|s| s.lookup(page, cmd.round > 0)) {
                Some(Shadow::Known(sh)) => {
                    let plan = enc.plan(snapshot, Some(sh));
                    emit(em, enc, plan, gpa, snapshot)?;
                    enc.update_shadow(plan, snapshot, sh);
                    plan
                }
                Some(Shadow::Zero(slot)) => {
                    let plan = enc.plan(snapshot, Some(zero_page));
                    emit(em, enc, plan, gpa, snapshot)?;
                    if plan != Plan::Unchanged {
                        enc.update_shadow(plan, snapshot, slot.into_bytes());
                    }
                    plan
                }
                Some(Shadow::Fresh(sh)) => {
                    let plan = enc.plan(snapshot, None);
                    emit(em, enc, plan, gpa, snapshot)?;
                    sh.copy_from_slice(snapshot);
                    plan
                }
                Some(Shadow::None) | None => {
                    let plan = enc.plan(snapshot, None);
                    emit(em, enc, plan, gpa, snapshot)?;
                    plan
                }
            };
            st.work_set_bytes += enc.work_set_bytes(plan);
            match plan {
                Plan::Unchanged => st.unchanged_pages += 1,
                Plan::Zero => st.zero_pages += 1,
                Plan::Whole => st.whole_pages += 1,
                Plan::Segments { count, .. } => {
                    st.segment_pages += 1;
                    st.segments += u64::from(count);
                }
            }
        }
    }
    // Close the round: checksum everything before the RoundEnd, then send.
    em.reserve(HEADER_LEN + ROUND_END_LEN)?;
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
    em.flush()?;
    em.crc = crc32fast::Hasher::new();
    st.wire_bytes = em.wire;
    Ok(st)
}

fn emit<T: StreamTx>(
    em: &mut Emitter<'_, T>,
    enc: &PageEncoder,
    plan: Plan,
    gpa: u64,
    snapshot: &[u8],
) -> Result<(), TransportError> {
    let need = enc.encoded_len(plan);
    if need == 0 {
        return Ok(());
    }
    let out = em.reserve(need)?;
    let n = enc.write(plan, gpa, snapshot, out);
    em.buf.advance(n);
    em.records += match plan {
        Plan::Segments { count, .. } => u64::from(count),
        _ => 1,
    };
    Ok(())
}
