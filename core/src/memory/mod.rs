//! Guest memory as hpmig sees it: the region layout, the page size, and the
//! flat page numbering that dirty bitmaps, worker shares and the wire agree on.
//!
//! Guest memory itself is vm-memory's [`GuestMemoryMmap`]: the source uses
//! the [`AtomicBitmap`] flavour so that host writes through the vm-memory API
//! are tracked ([`SourceMemory`]); the destination needs no bitmap
//! ([`DestMemory`]).
//!
//! Flat page numbering: region `r` owns bitmap words
//! `word_base[r] .. word_base[r] + ceil(pages_r / 64)`, so every region starts
//! on a 64-page word boundary and a bitmap word never spans two regions. A
//! flat page index is `word * 64 + bit`; padding bits past a region's end are
//! never set. [`PageIndex`], [`Share`] and [`RegionOffset`] carry this
//! arithmetic.

mod fill;
mod index;

use std::fmt;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use fill::{
    fill, fill_random, mixed_kind, pseudo_random_bytes, Contents, PageKind, XorShift64,
};
pub use index::{find_region, PageBits, PageIndex, RegionOffset, Share, PAGES_PER_WORD};

/// Guest memory on the source: tracked by vm-memory's atomic dirty bitmap.
pub type SourceMemory = GuestMemoryMmap<AtomicBitmap>;
/// Guest memory on the destination: written only by the applier.
pub type DestMemory = GuestMemoryMmap<()>;

/// Most regions a layout may have (also the wire cap).
pub const MAX_REGIONS: usize = 64;

/// The host page size, read from the system once (never assumed to be 4096).
pub fn host_page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions; a failure returns -1, checked below.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 {
            v as usize
        } else {
            4096
        }
    })
}

/// Errors of layout construction and address lookup.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    /// page size {0} is not a power of two between 512 and 1 MiB
    #[error("page size {0} is not a power of two between 512 and 1 MiB")]
    BadPageSize(usize),
    /// the layout has no regions or more than MAX_REGIONS
    #[error("a layout needs 1 to {MAX_REGIONS} regions, got {0}")]
    RegionCount(usize),
    /// a region is empty, unaligned, overlapping or out of order
    #[error("region {index} (base {base:#x}, size {size:#x}) is empty, not page-aligned, overflows, or overlaps/precedes the previous one")]
    BadRegion { index: usize, base: u64, size: u64 },
    /// an address range is not inside one page of one region
    #[error("guest range {gpa:#x}+{len} is not inside one page of guest memory")]
    OutOfRange { gpa: u64, len: u64 },
    /// vm-memory could not allocate guest memory
    #[error("allocating guest memory: {0}")]
    Alloc(String),
}

/// One guest memory region: guest physical base and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub base: GuestAddress,
    pub size: u64,
}

/// Where one page lives: its region, its byte offset in that region, and its
/// guest physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLoc {
    pub region: usize,
    pub offset: u64,
    pub gpa: GuestAddress,
}

/// The guest memory layout both ends agree on at the handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct Layout {
    page_size: usize,
    page_shift: u32,
    regions: Vec<RegionSpec>,
    /// First bitmap word of each region, plus the total word count at the end.
    word_base: Vec<usize>,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layout")
            .field("page_size", &self.page_size)
            .field("regions", &self.regions)
            .finish()
    }
}

impl Layout {
    /// Checks and builds a layout: regions sorted, disjoint, page-aligned, non-empty.
    pub fn new(page_size: usize, regions: Vec<RegionSpec>) -> Result<Self, MemoryError> {
        if !page_size.is_power_of_two() || !(512..=1 << 20).contains(&page_size) {
            return Err(MemoryError::BadPageSize(page_size));
        }
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(MemoryError::RegionCount(regions.len()));
        }
        let ps = page_size as u64;
        let mut word_base = Vec::with_capacity(regions.len() + 1);
        let mut words = 0usize;
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            let base = r.base.raw_value();
            let bad = MemoryError::BadRegion {
                index,
                base,
                size: r.size,
            };
            let end = base.checked_add(r.size).ok_or(bad.clone())?;
            if r.size == 0 || base % ps != 0 || r.size % ps != 0 || (index > 0 && base < prev_end) {
                return Err(bad);
            }
            prev_end = end;
            word_base.push(words);
            let pages = usize::try_from(r.size / ps).map_err(|_| bad.clone())?;
            words = words.checked_add(pages.div_ceil(64)).ok_or(bad)?;
        }
        word_base.push(words);
        Ok(Layout {
            page_size,
            page_shift: page_size.trailing_zeros(),
            regions,
            word_base,
        })
    }

    /// The layout of existing vm-memory guest memory, with the host page size.
    pub fn of<M: GuestMemoryBackend>(memory: &M) -> Result<Self, MemoryError> {
        let regions = memory
            .iter()
            .map(|r| RegionSpec {
                base: r.start_addr(),
                size: r.len(),
            })
            .collect();
        Layout::new(host_page_size(), regions)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }

    /// Total guest memory in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total guest pages (padding bits excluded).
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() >> self.page_shift
    }

    /// Number of 64-bit words in a dirty bitmap of this layout.
    pub fn bitmap_words(&self) -> usize {
        self.word_base[self.regions.len()]
    }

    /// First bitmap word of region `r`.
    pub fn region_word_base(&self, r: usize) -> usize {
        self.word_base[r]
    }

    /// Pages in region `r`.
    pub fn region_pages(&self, r: usize) -> u64 {
        self.regions[r].size >> self.page_shift
    }

    /// Region that owns bitmap word `word` (regions are few: a linear scan
    /// is cheaper than a search).
    fn region_of_word(&self, word: usize) -> Option<usize> {
        (0..self.regions.len()).find(|&r| word >= self.word_base[r] && word < self.word_base[r + 1])
    }

    /// The region that owns bitmap word `word` and the byte offset, in that
    /// region, of the word's first page; `None` past the end.
    pub fn word_start(&self, word: usize) -> Option<(usize, u64)> {
        let region = self.region_of_word(word)?;
        let first = PageIndex::from_word_bit(word - self.word_base[region], 0);
        Some((region, first.0 << self.page_shift))
    }

    /// The flat index of page `n` of region `region`; `None` past its end.
    pub fn page_index(&self, region: usize, n: u64) -> Option<PageIndex> {
        (region < self.regions.len() && n < self.region_pages(region))
            .then(|| PageIndex::from_word_bit(self.word_base[region], 0).offset(n))
    }

    /// Locates a flat page index; `None` for padding bits or past the end.
    pub fn page(&self, page: PageIndex) -> Option<PageLoc> {
        let region = self.region_of_word(page.word())?;
        let n = page.0 - PageIndex::from_word_bit(self.word_base[region], 0).0;
        if n >= self.region_pages(region) {
            return None;
        }
        let offset = n << self.page_shift;
        let gpa = self.regions[region].base.checked_add(offset)?;
        Some(PageLoc {
            region,
            offset,
            gpa,
        })
    }

    /// Where `[gpa, gpa + len)` lies, when one region holds all of it.
    pub fn find(&self, gpa: u64, len: u64) -> Option<RegionOffset> {
        find_region(
            self.regions.iter().map(|r| (r.base.raw_value(), r.size)),
            gpa,
            len,
            0,
        )
    }

    /// Finds the page that holds `[gpa, gpa + len)`, which must not cross a
    /// page end and must lie inside a region. This is the check every record
    /// from the wire passes before any byte is written.
    pub fn locate(&self, gpa: u64, len: u64) -> Result<(PageIndex, PageLoc), MemoryError> {
        let err = MemoryError::OutOfRange { gpa, len };
        let in_page = gpa & (self.page_size as u64 - 1);
        if in_page
            .checked_add(len)
            .is_none_or(|end| end > self.page_size as u64)
        {
            return Err(err);
        }
        let at = self.find(gpa, len.max(1)).ok_or(err.clone())?;
        let offset = at.offset & !(self.page_size as u64 - 1);
        let page = self
            .page_index(at.region, offset >> self.page_shift)
            .ok_or(err)?;
        let gpa = GuestAddress(self.regions[at.region].base.raw_value() + offset);
        Ok((
            page,
            PageLoc {
                region: at.region,
                offset,
                gpa,
            },
        ))
    }

    /// Allocates zeroed anonymous guest memory with this layout.
    pub fn allocate<B: vm_memory::bitmap::NewBitmap>(
        &self,
    ) -> Result<GuestMemoryMmap<B>, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .regions
            .iter()
            .map(|r| {
                Ok((
                    r.base,
                    usize::try_from(r.size)
                        .map_err(|_| MemoryError::Alloc("region too large".into()))?,
                ))
            })
            .collect::<Result<_, MemoryError>>()?;
        GuestMemoryMmap::<B>::from_ranges(&ranges).map_err(|e| MemoryError::Alloc(e.to_string()))
    }
}

/// Allocates zeroed destination memory for `layout` and faults every page in
/// with `threads` threads, so that receiving does not pay for first-touch
/// page faults (like QEMU's `-mem-prealloc`). Costs the guest's full size in
/// resident memory.
pub fn allocate_prefaulted(layout: &Layout, threads: usize) -> Result<DestMemory, MemoryError> {
    let memory: DestMemory = layout.allocate()?;
    prefault(layout, &memory, threads);
    Ok(memory)
}

/// Faults every page of `memory` (allocated zeroed for `layout`) in,
/// writable, with `threads` threads.
pub fn prefault(layout: &Layout, memory: &DestMemory, threads: usize) {
    use vm_memory::Bytes;
    let ps = layout.page_size() as u64;
    let threads = threads.max(1) as u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for r in memory.iter() {
                    let pages = r.len() / ps;
                    for p in (pages * t / threads)..(pages * (t + 1) / threads) {
                        // Fresh memory is zero: writing a zero byte changes nothing
                        // but makes the kernel back the page now.
                        let _ = memory.write_obj(0u8, GuestAddress(r.start_addr().0 + p * ps));
                    }
                }
            });
        }
    });
}

/// A BLAKE3 digest of all guest memory, regions in layout order.
///
/// # Safety
/// Nothing may write to `memory` during the call (the guest is paused, or
/// not yet running, and no stream is applying records).
pub unsafe fn digest<M: GuestMemoryBackend>(memory: &M) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for region in memory.iter() {
        let Ok(slice) = region.as_volatile_slice() else {
            continue;
        };
        let guard = slice.ptr_guard();
        // SAFETY: the slice covers the whole mapped region (vm-memory checked
        // its bounds); the caller guarantees no concurrent writer, so a shared
        // byte slice over it is sound for the duration of the hash.
        let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
        hasher.update(bytes);
    }
    *hasher.finalize().as_bytes()
}

/// Makes every page of `memory` zero, reading before writing so pages that
/// are zero (the usual case: fresh memory) are not dirtied; returns how many
/// pages were not. The destination's records assume zeroed memory (a zero
/// marker or a segment leaves the rest of its page as it was), so memory a
/// caller cannot vouch for is checked before round 0. Regions are scanned
/// by `threads` threads.
///
/// # Safety
/// Nothing else may read or write `memory` during the call.
pub unsafe fn ensure_zeroed(memory: &DestMemory, page_size: usize, threads: usize) -> u64 {
    let fixed = std::sync::atomic::AtomicU64::new(0);
    let chunks: Vec<(usize, usize)> = memory
        .iter()
        .filter_map(|r| {
            let slice = r.as_volatile_slice().ok()?;
            Some((slice.ptr_guard_mut().as_ptr() as usize, slice.len()))
        })
        .flat_map(|(base, len)| {
            const CHUNK: usize = 8 << 20;
            (0..len.div_ceil(CHUNK)).map(move |i| (base + i * CHUNK, CHUNK.min(len - i * CHUNK)))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(base, len)) = chunks.get(i) else {
                    return;
                };
                // SAFETY: [base, base + len) lies inside one mapped region
                // (cut from its volatile slice above); chunks are disjoint,
                // each taken by one thread, and the caller guarantees no one
                // else touches the memory meanwhile.
                let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
                for page in bytes.chunks_mut(page_size) {
                    if !is_zero(page) {
                        page.fill(0);
                        fixed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    fixed.into_inner()
}

/// True when every byte is zero (an OR over words, which the compiler
/// vectorises).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (words, tail) = bytes.split_at(bytes.len() & !7);
    words.chunks_exact(8).fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_zeroed_fixes_only_non_zero_pages() {
        use vm_memory::Bytes;
        let memory: DestMemory = two_regions().allocate().unwrap();
        memory.write_obj(7u8, GuestAddress(5 * 4096 + 9)).unwrap();
        memory
            .write_obj(7u8, GuestAddress((1 << 32) + 4095))
            .unwrap();
        // SAFETY: nothing else uses this memory.
        assert_eq!(unsafe { ensure_zeroed(&memory, 4096, 3) }, 2);
        // SAFETY: as above.
        assert_eq!(unsafe { ensure_zeroed(&memory, 4096, 1) }, 0);
        assert_eq!(
            memory.read_obj::<u8>(GuestAddress(5 * 4096 + 9)).unwrap(),
            0
        );
    }

    fn two_regions() -> Layout {
        Layout::new(
            4096,
            vec![
                RegionSpec {
                    base: GuestAddress(0),
                    size: 100 * 4096,
                },
                RegionSpec {
                    base: GuestAddress(1 << 32),
                    size: 3 * 4096,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn words_start_each_region_on_a_word_boundary() {
        let l = two_regions();
        assert_eq!(l.region_word_base(0), 0);
        assert_eq!(l.region_word_base(1), 2);
        assert_eq!(l.bitmap_words(), 3);
        assert_eq!(l.total_pages(), 103);
        assert_eq!(l.page(PageIndex(99)).unwrap().gpa, GuestAddress(99 * 4096));
        assert_eq!(l.page(PageIndex(100)), None, "padding bit");
        assert_eq!(
            l.page(PageIndex(129)).unwrap().gpa,
            GuestAddress((1 << 32) + 4096)
        );
        assert_eq!(l.page(PageIndex(131)), None, "past the end");
    }

    #[test]
    fn locate_rejects_ranges_outside_one_page() {
        let l = two_regions();
        assert_eq!(l.locate(4096 + 10, 20).unwrap().0, PageIndex(1));
        assert_eq!(
            l.locate((1 << 32) + 2 * 4096, 4096).unwrap().0,
            PageIndex(130)
        );
        assert!(l.locate(4096 + 10, 4096).is_err(), "crosses a page end");
        assert!(l.locate(100 * 4096, 8).is_err(), "hole between regions");
        assert!(
            l.locate(u64::MAX - 3, 2).is_err(),
            "near the top of the address space"
        );
        assert!(
            l.locate((1 << 32) + 3 * 4096, 1).is_err(),
            "past the last region"
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        let r = |b, s| RegionSpec {
            base: GuestAddress(b),
            size: s,
        };
        assert!(matches!(
            Layout::new(4000, vec![r(0, 4096)]),
            Err(MemoryError::BadPageSize(4000))
        ));
        assert!(matches!(
            Layout::new(4096, vec![]),
            Err(MemoryError::RegionCount(0))
        ));
        assert!(matches!(
            Layout::new(4096, vec![r(0, 4095)]),
            Err(MemoryError::BadRegion { .. })
        ));
        assert!(matches!(
            Layout::new(4096, vec![r(0, 8192), r(4096, 4096)]),
            Err(MemoryError::BadRegion { .. })
        ));
        assert!(matches!(
            Layout::new(4096, vec![r(u64::MAX - 4095, 8192)]),
            Err(MemoryError::BadRegion { .. })
        ));
    }
}
