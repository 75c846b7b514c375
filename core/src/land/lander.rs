//! A stream lander: applies one data stream's records to guest memory.
//!
//! It reads each record header, checks it against the guest memory layout
//! (inside one page of one region) and against the stream's own share of
//! pages, and only then reads the payload straight into the guest page (no
//! staging copy). Each round end is checked for order, record count and
//! CRC-32. The mirror image of the source's [`crate::precopy`] worker.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{ApplyError, LandFault, LandStats};
use crate::memory::{DestMemory, Layout, MemoryError, PageBits, PageIndex, Share, PAGES_PER_WORD};
use crate::protocol::{
    words_mask_len, Header, Kind, RoundEnd, HEADER_LEN, ROUND_END_LEN, WORD_LEN,
};
use crate::segment::compress::PageDecompressor;
use crate::transport::StreamRx;
use crate::verify::{Ledger, PageHasher};
use std::sync::Arc;

/// Host pointers of the destination's guest regions.
#[derive(Debug)]
pub(crate) struct GuestPages {
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

    /// Backs `[offset, offset + len)` of region `region` with memory now,
    /// in one call, where the kernel can (`MADV_POPULATE_WRITE`, Linux
    /// 5.14): one syscall for many pages instead of a page fault each. A
    /// kernel without it leaves the pages to fault in one by one as before.
    fn populate(&self, region: usize, offset: u64, len: u64) {
        let Some(&(base, rlen)) = self.regions.get(region) else {
            return;
        };
        if base.is_null() || offset >= rlen {
            return;
        }
        let len = len.min(rlen - offset);
        // SAFETY: [offset, offset + len) lies inside the region's mapping (checked
        // just above); MADV_POPULATE_WRITE only backs pages that are not yet
        // backed, leaving every byte's value as it was.
        unsafe {
            libc::madvise(
                base.add(offset as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    pub(crate) fn new(memory: &DestMemory) -> Self {
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
    pub(crate) stream: usize,
    layout: &'a Layout,
    pages: &'a GuestPages,
    share: Share,
    zstd: bool,
    /// Made on the first compressed page, with the buffer its payload lands
    /// in (compressed bytes cannot land in place).
    decompressor: Option<PageDecompressor>,
    scratch: Vec<u8>,
    crc: crc32fast::Hasher,
    records: u64,
    pub(crate) next_round: u32,
    pub(crate) stats: LandStats,
    /// One bit per page of the share, set once the page was written: a zero
    /// record for a page never written needs no write (and no page fault),
    /// since destination memory starts zeroed.
    written: PageBits,
    /// Data records in a row, with no zero record between, that landed on
    /// pages never written (each a page fault). Past a bitmap word's worth
    /// the memory is dense, and the next word's pages are populated at once.
    first_writes: u64,
    /// One bit per bitmap word of the share (64 pages of one region, one
    /// contiguous range of memory): set once its memory was populated in one
    /// call (see `first_writes`).
    populated: PageBits,
    /// Incremental verification: the page hasher and this share's ledger
    /// of what landed.
    ledger: Option<(Arc<PageHasher>, Ledger)>,
    /// The page the last record landed in, not yet hashed: (page, region,
    /// offset, gpa). It is hashed once its records are over (the next
    /// record is for another page, or the round ends).
    unhashed: Option<(PageIndex, usize, u64, u64)>,
    /// Test hook: one corruption applied after the round's CRC.
    fault: Option<LandFault>,
}

impl<'a> StreamLander<'a> {
    pub(crate) fn new(
        stream: usize,
        streams: usize,
        layout: &'a Layout,
        pages: &'a GuestPages,
        zstd: bool,
    ) -> Self {
        let share = Share::of(layout.bitmap_words(), stream, streams);
        StreamLander {
            stream,
            layout,
            pages,
            written: PageBits::new(share.pages()),
            first_writes: 0,
            populated: PageBits::new(share.words.len()),
            share,
            zstd,
            decompressor: None,
            scratch: Vec::new(),
            crc: crc32fast::Hasher::new(),
            records: 0,
            next_round: 0,
            stats: LandStats::default(),
            ledger: None,
            unhashed: None,
            fault: None,
        }
    }

    /// Keeps a ledger of what lands, under `hasher` (incremental
    /// verification).
    pub(crate) fn with_ledger(mut self, hasher: Option<Arc<PageHasher>>) -> Self {
        self.ledger = hasher.map(|h| (h, Ledger::new(self.share.clone())));
        self
    }

    /// Test hook: applies `fault` once, after the round's checksum saw the
    /// record intact (see [`LandFault`]).
    pub(crate) fn with_fault(mut self, fault: Option<LandFault>) -> Self {
        self.fault = fault;
        self
    }

    /// Hashes the page the last records landed in, read back from guest
    /// memory.
    fn hash_landed(&mut self) {
        let (Some((page, region, offset, gpa)), Some((hasher, ledger))) =
            (self.unhashed.take(), &mut self.ledger)
        else {
            return;
        };
        let ps = self.layout.page_size() as u64;
        let pages: &'a GuestPages = self.pages;
        // SAFETY: the page is in this stream's share (it was checked when its
        // record landed), and no other lander touches the share.
        if let Some(bytes) = unsafe { pages.page_mut(region, offset, ps) } {
            ledger.set(page, hasher.hash(gpa, bytes));
        }
    }

    /// Reads and applies the next record; returns the round end when one closes.
    pub fn step(&mut self, rx: &mut dyn StreamRx) -> Result<Option<RoundEnd>, ApplyError> {
        let ps = self.layout.page_size() as u32;
        let h = rx.next_header(ps)?;
        match h.kind {
            Kind::Segment | Kind::Words | Kind::Page | Kind::Zero | Kind::PageZstd => {
                self.data(h, rx).map(|()| None)
            }
            Kind::RoundEnd => {
                self.hash_landed();
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
                self.stats.bytes.headers += (HEADER_LEN + ROUND_END_LEN) as u64;
                self.next_round += 1;
                self.stats.rounds = self.next_round;
                self.stats.ledger_sum = self.ledger.as_ref().map_or(0, |(_, l)| l.sum());
                Ok(Some(end))
            }
            other => Err(ApplyError::Unexpected(other)),
        }
    }

    fn data(&mut self, h: Header, rx: &mut dyn StreamRx) -> Result<(), ApplyError> {
        let ps = self.layout.page_size() as u64;
        // Records that address a whole page (Words: any word of it).
        let whole = matches!(
            h.kind,
            Kind::Page | Kind::Words | Kind::Zero | Kind::PageZstd
        );
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
        let Some(local) = self.share.local(page) else {
            return Err(ApplyError::NotOwned {
                gpa: h.arg,
                stream: self.stream,
            });
        };
        if self.unhashed.is_some_and(|(p, ..)| p != page) {
            self.hash_landed();
        }
        let pages: &'a GuestPages = self.pages;
        // SAFETY: the page is in this stream's share (checked just above).
        let Some(dst) = (unsafe { pages.page_mut(loc.region, loc.offset, ps) }) else {
            return Err(ApplyError::OutOfRange(MemoryError::OutOfRange {
                gpa: h.arg,
                len,
            }));
        };
        let was_written = if h.kind == Kind::Zero {
            self.written.get(local)
        } else {
            self.written.set(local)
        };
        if h.kind == Kind::Zero {
            self.first_writes = 0;
        } else if !was_written {
            self.first_writes += 1;
            let word = local / PAGES_PER_WORD as usize;
            if self.first_writes > PAGES_PER_WORD && !self.populated.set(word) {
                let chunk = ps * PAGES_PER_WORD;
                pages.populate(loc.region, loc.offset & !(chunk - 1), chunk);
            }
        }
        self.crc.update(&h.encode());
        match h.kind {
            Kind::Segment => {
                let at = (h.arg - loc.gpa.0) as usize;
                let seg = &mut dst[at..at + h.len as usize];
                rx.read_payload(seg)?;
                self.crc.update(seg);
                self.stats.segments += 1;
                self.stats.payload_bytes += u64::from(h.len);
                self.stats.bytes.segment += u64::from(h.len);
                if self.next_round > 0 {
                    if let Some(fault) = self.fault.take() {
                        self.corrupt(fault, page, loc.region, loc.offset, at, h.len as usize);
                    }
                }
            }
            Kind::Words => {
                let len = h.len as usize;
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                let src = &mut self.scratch[..len];
                rx.read_payload(src)?;
                self.crc.update(src);
                let words = scatter_words(src, dst)?;
                self.stats.segments += 1;
                self.stats.word_pages += 1;
                self.stats.payload_bytes += words;
                self.stats.bytes.segment += words;
                self.stats.bytes.headers += u64::from(words_mask_len(ps as u32));
            }
            Kind::Page => {
                rx.read_payload(dst)?;
                self.crc.update(dst);
                self.stats.whole_pages += 1;
                self.stats.payload_bytes += ps;
                self.stats.bytes.whole += ps;
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
                self.stats.bytes.zstd += u64::from(h.len);
            }
            // Only data kinds reach here (checked by the caller).
            other => return Err(ApplyError::Unexpected(other)),
        }
        self.unhashed = Some((page, loc.region, loc.offset, loc.gpa.0));
        self.records += 1;
        self.stats.records += 1;
        self.stats.wire_bytes += (HEADER_LEN + h.len as usize) as u64;
        self.stats.bytes.headers += HEADER_LEN as u64;
        Ok(())
    }
}

/// Writes a Words record's payload (`record`: the mask, one bit per 8-byte
/// word of `page`, then the changed words in order) into `page`; returns the
/// bytes of words written. The payload's length must be the mask's plus 8
/// per set bit (checked before any byte is written).
fn scatter_words(record: &[u8], page: &mut [u8]) -> Result<u64, ApplyError> {
    let mask_len = words_mask_len(page.len() as u32) as usize;
    let Some((mask, words)) = record.split_at_checked(mask_len) else {
        return Err(ApplyError::Corrupt(
            "Words record shorter than its mask".into(),
        ));
    };
    let set: u32 = mask
        .chunks_exact(8)
        .map(|m| u64::from_le_bytes(m.try_into().unwrap_or_default()).count_ones())
        .sum();
    if set as usize * WORD_LEN != words.len() {
        return Err(ApplyError::Corrupt(format!(
            "Words record: its mask marks {set} words but it carries {} bytes",
            words.len()
        )));
    }
    let mut from = words.chunks_exact(WORD_LEN);
    for (i, m) in mask.chunks_exact(8).enumerate() {
        let mut bits = u64::from_le_bytes(m.try_into().unwrap_or_default());
        while bits != 0 {
            let at = (i * 64 + bits.trailing_zeros() as usize) * WORD_LEN;
            bits &= bits - 1;
            // The mask has one bit per word of the page, so `at` is inside
            // it; the count check above gives every set bit its word.
            if let (Some(word), Some(to)) = (from.next(), page.get_mut(at..at + WORD_LEN)) {
                to.copy_from_slice(word);
            }
        }
    }
    Ok(words.len() as u64)
}

impl StreamLander<'_> {
    /// The test hook's corruption, after the round's CRC saw the segment
    /// intact: one byte past the segment, in the next page; or the
    /// segment's bytes moved to the next page (its own page keeps what it
    /// had). Only when the next page is this stream's too.
    fn corrupt(
        &mut self,
        fault: LandFault,
        page: PageIndex,
        region: usize,
        offset: u64,
        at: usize,
        len: usize,
    ) {
        let ps = self.layout.page_size() as u64;
        let next = page.offset(1);
        if self.share.local(next).is_none() {
            self.fault = Some(fault);
            return;
        }
        let pages = self.pages;
        // SAFETY: both pages are in this stream's share (checked above and
        // when the record landed); nothing else touches them meanwhile.
        let pair = unsafe {
            (
                pages.page_mut(region, offset, ps),
                pages.page_mut(region, offset + ps, ps),
            )
        };
        let (Some(here), Some(there)) = pair else {
            self.fault = Some(fault);
            return;
        };
        match fault {
            LandFault::SpillIntoNextPage => there[0] ^= 0xff,
            LandFault::WrongPage => {
                there[at..at + len].copy_from_slice(&here[at..at + len]);
                here[at..at + len].iter_mut().for_each(|b| *b ^= 0xff);
            }
        }
    }
}
