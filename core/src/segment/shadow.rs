//! Shadow store: for every page, the bytes the destination holds.
//!
//! The diff compares each dirty page's snapshot with its shadow, and the
//! shadow is updated from the same snapshot the records were cut from, so
//! `shadow == destination` holds for every page after every round.
//!
//! Memory cost. By default the shadow is a full copy: one anonymous mapping
//! of the guest's size. It starts as zeros, exactly like the destination's
//! fresh guest memory, and pages the source never sends stay unbacked, so its
//! resident cost is the guest's non-zero pages (at most the guest's size).
//! With a budget (`--shadow-budget BYTES`) it holds at most BYTES / page size
//! pages; a page gets one of those slots the first time it is dirty again
//! after round 0 (re-dirtied pages are the ones the diff pays off for), and
//! that time, like every time a page has no slot, it goes whole.
//!
//! The store is cut into one [`ShadowPart`] per worker, matching the worker's
//! fixed share of bitmap words, so workers never share a shadow byte.

use std::sync::Arc;

use crate::memory::{Layout, PageBits, PageIndex, Share};

const NO_SLOT: u32 = u32::MAX;

/// A never-written shadow slot (see [`Shadow::Zero`]).
#[derive(Debug)]
pub struct ZeroSlot<'a> {
    bytes: &'a mut [u8],
    written: &'a mut PageBits,
    local: usize,
}

impl<'a> ZeroSlot<'a> {
    /// The slot, to be written; from now on the page counts as written.
    pub fn into_bytes(self) -> &'a mut [u8] {
        self.written.set(self.local);
        self.bytes
    }
}

/// The mapping behind a store; parts point into it.
#[derive(Debug)]
struct ShadowMap {
    base: *mut u8,
    len: usize,
    _map: memmap2::MmapMut,
}

// SAFETY: the map is only reached through ShadowParts, each of which owns a
// disjoint byte range of it (cut once in `ShadowStore::parts`); `base` is the
// mapping's own address, valid while `_map` lives, which every part's Arc
// guarantees.
unsafe impl Send for ShadowMap {}
// SAFETY: as above: shared access never touches the bytes, only the owning
// part does, through `&mut self`.
unsafe impl Sync for ShadowMap {}

/// Bytes released per madvise when a shadow is freed.
const RELEASE_CHUNK: usize = 64 << 20;

impl Drop for ShadowMap {
    /// Gives the pages back in chunks before the mapping goes: one munmap of
    /// gigabytes holds the process's mmap lock for writing while it frees
    /// every page (tens of milliseconds per GiB here), and every page fault
    /// in the process waits for it - a guest started on the destination in
    /// the same process (`hpmig demo`, the bench) or another guest of this
    /// VMM. MADV_DONTNEED frees them under the lock held for reading, so
    /// faults go on; the munmap that follows has no pages left to free.
    fn drop(&mut self) {
        let mut off = 0;
        while off < self.len {
            let n = RELEASE_CHUNK.min(self.len - off);
            // SAFETY: [base + off, base + off + n) lies inside the mapping
            // (off + n <= len), which `_map` keeps mapped until after this
            // returns; no part can touch it (the last Arc is being dropped),
            // and MADV_DONTNEED on private anonymous memory only drops its
            // pages.
            unsafe { libc::madvise(self.base.add(off).cast(), n, libc::MADV_DONTNEED) };
            off += n;
        }
    }
}

/// The shadow of all guest pages, before it is cut into worker parts.
#[derive(Debug)]
pub struct ShadowStore {
    map: ShadowMap,
    page_size: usize,
    words: usize,
    /// `Some(slots)` when a budget limits the store to `slots` pages.
    budget_slots: Option<usize>,
}

/// What a worker has for one page.
#[derive(Debug)]
pub enum Shadow<'a> {
    /// The bytes the destination holds: diff against them.
    Known(&'a mut [u8]),
    /// The destination holds zeros and the slot was never written: diff
    /// against zeros, and write the slot only through [`ZeroSlot::into_bytes`].
    Zero(ZeroSlot<'a>),
    /// A slot just given to this page: its bytes mean nothing, send the page
    /// whole and fill the slot from the snapshot.
    Fresh(&'a mut [u8]),
    /// No slot: send the page whole (or as a zero page).
    None,
}

fn map(bytes: usize) -> std::io::Result<ShadowMap> {
    let mut map = memmap2::MmapMut::map_anon(bytes.max(1))?;
    Ok(ShadowMap {
        base: map.as_mut_ptr(),
        len: map.len(),
        _map: map,
    })
}

impl ShadowStore {
    /// A full copy of the guest (see the module doc for its memory cost).
    pub fn full(layout: &Layout) -> std::io::Result<ShadowStore> {
        let words = layout.bitmap_words();
        let bytes = Share::of(words, 0, 1).pages() * layout.page_size();
        Ok(ShadowStore {
            map: map(bytes)?,
            page_size: layout.page_size(),
            words,
            budget_slots: None,
        })
    }

    /// At most `budget_bytes` of shadow (rounded down to whole pages).
    pub fn with_budget(layout: &Layout, budget_bytes: u64) -> std::io::Result<ShadowStore> {
        let slots = (budget_bytes / layout.page_size() as u64).min(layout.total_pages()) as usize;
        let bytes = slots * layout.page_size();
        Ok(ShadowStore {
            map: map(bytes)?,
            page_size: layout.page_size(),
            words: layout.bitmap_words(),
            budget_slots: Some(slots),
        })
    }

    /// Bytes of address space the store reserves.
    pub fn reserved_bytes(&self) -> usize {
        self.map.len
    }

    /// Cuts the store into the parts of `n` workers (see [`Share`]); each
    /// part keeps the mapping alive.
    pub fn parts(self, n: usize) -> Vec<ShadowPart> {
        let ps = self.page_size;
        let budget = self.budget_slots;
        let words = self.words;
        let map = Arc::new(self.map);
        let mut at = 0usize;
        let mut parts = Vec::with_capacity(n);
        for w in 0..n {
            let share = Share::of(words, w, n);
            let pages = share.pages();
            let (bytes, slot_of) = match budget {
                None => (pages * ps, None),
                Some(total) => (
                    Share::of(total, w, n).words.len() * ps,
                    Some(vec![NO_SLOT; pages]),
                ),
            };
            let written = if slot_of.is_none() {
                PageBits::new(pages)
            } else {
                PageBits::default()
            };
            parts.push(ShadowPart {
                map: Arc::clone(&map),
                start: at,
                len: bytes.min(map.len - at),
                share,
                slot_of,
                written,
                next_slot: 0,
                page_size: ps,
            });
            at += bytes.min(map.len - at);
        }
        parts
    }
}

/// One worker's part of the shadow store.
#[derive(Debug)]
pub struct ShadowPart {
    map: Arc<ShadowMap>,
    /// This part's bytes: `[start, start + len)` of the mapping.
    start: usize,
    len: usize,
    share: Share,
    /// Page -> slot, only under a budget.
    slot_of: Option<Vec<u32>>,
    /// Full store only: one bit per page, set once its slot was written.
    written: PageBits,
    next_slot: u32,
    page_size: usize,
}

impl ShadowPart {
    /// Slot `slot`'s bytes.
    fn slot(&mut self, slot: usize) -> &mut [u8] {
        let ps = self.page_size;
        assert!((slot + 1) * ps <= self.len, "shadow slot out of its part");
        // SAFETY: [start + slot*ps, start + (slot+1)*ps) lies inside this
        // part's range (asserted above), which lies inside the mapping and
        // is disjoint from every other part's; `&mut self` makes the access
        // exclusive for the returned borrow.
        unsafe { std::slice::from_raw_parts_mut(self.map.base.add(self.start + slot * ps), ps) }
    }

    /// The shadow of flat page `page`. `may_allocate` lets a page without a
    /// slot take a free one (the source passes it from round 1 on).
    pub fn lookup(&mut self, page: PageIndex, may_allocate: bool) -> Shadow<'_> {
        let Some(local) = self.share.local(page) else {
            return Shadow::None;
        };
        let Some(slot_of) = &mut self.slot_of else {
            let ps = self.page_size;
            assert!((local + 1) * ps <= self.len, "shadow page out of its part");
            // SAFETY: as in `slot`: the page lies inside this part's range
            // (asserted above), exclusive through `&mut self`. Written by
            // hand (not `self.slot`) so `written` can be borrowed beside it.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(self.map.base.add(self.start + local * ps), ps)
            };
            return if self.written.get(local) {
                Shadow::Known(bytes)
            } else {
                Shadow::Zero(ZeroSlot {
                    bytes,
                    written: &mut self.written,
                    local,
                })
            };
        };
        let slot = slot_of[local];
        if slot != NO_SLOT {
            return Shadow::Known(self.slot(slot as usize));
        }
        let free = self.len / self.page_size;
        if !may_allocate || self.next_slot as usize >= free {
            return Shadow::None;
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        slot_of[local] = slot;
        Shadow::Fresh(self.slot(slot as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;
    use vm_memory::GuestAddress;

    fn layout(pages: u64) -> Layout {
        Layout::new(
            4096,
            vec![RegionSpec {
                base: GuestAddress(0),
                size: pages * 4096,
            }],
        )
        .unwrap()
    }

    #[test]
    fn full_store_starts_zero_and_parts_are_disjoint() {
        let store = ShadowStore::full(&layout(256)).unwrap();
        let mut parts = store.parts(2);
        let Shadow::Zero(a) = parts[0].lookup(PageIndex(5), false) else {
            panic!("page 5 starts zero")
        };
        let a = a.into_bytes();
        assert!(a.iter().all(|&b| b == 0));
        a[0] = 1;
        assert!(
            matches!(parts[0].lookup(PageIndex(200), false), Shadow::None),
            "page 200 is worker 1's"
        );
        assert!(
            matches!(parts[1].lookup(PageIndex(200), false), Shadow::Zero(_)),
            "worker 1 owns page 200"
        );
        assert!(
            matches!(parts[0].lookup(PageIndex(6), false), Shadow::Zero(_)),
            "a zero slot not taken stays zero"
        );
        let Shadow::Known(a) = parts[0].lookup(PageIndex(5), false) else {
            panic!("page 5 was written")
        };
        assert_eq!(a[0], 1, "writes stay with their page");
    }

    #[test]
    fn budget_hands_out_slots_once_and_then_runs_dry() {
        let store = ShadowStore::with_budget(&layout(128), 2 * 4096).unwrap();
        let mut parts = store.parts(1);
        let p = &mut parts[0];
        assert!(
            matches!(p.lookup(PageIndex(3), false), Shadow::None),
            "no slot without permission"
        );
        assert!(matches!(p.lookup(PageIndex(3), true), Shadow::Fresh(_)));
        assert!(matches!(p.lookup(PageIndex(3), true), Shadow::Known(_)));
        assert!(matches!(p.lookup(PageIndex(9), true), Shadow::Fresh(_)));
        assert!(
            matches!(p.lookup(PageIndex(10), true), Shadow::None),
            "budget spent"
        );
    }
}
