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

use crate::memory::{worker_share, Layout, PageIndex};

const NO_SLOT: u32 = u32::MAX;

/// A never-written shadow slot (see [`Shadow::Zero`]).
#[derive(Debug)]
pub struct ZeroSlot<'a> {
    bytes: &'a mut [u8],
    word: &'a mut u64,
    mask: u64,
}

impl<'a> ZeroSlot<'a> {
    /// The slot, to be written; from now on the page counts as written.
    pub fn into_bytes(self) -> &'a mut [u8] {
        *self.word |= self.mask;
        self.bytes
    }
}

/// The shadow of all guest pages, before it is cut into worker parts.
#[derive(Debug)]
pub struct ShadowStore {
    map: memmap2::MmapMut,
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

impl ShadowStore {
    /// A full copy of the guest (see the module doc for its memory cost).
    pub fn full(layout: &Layout) -> std::io::Result<ShadowStore> {
        let words = layout.bitmap_words();
        let bytes = words * 64 * layout.page_size();
        Ok(ShadowStore {
            map: memmap2::MmapMut::map_anon(bytes.max(1))?,
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
            map: memmap2::MmapMut::map_anon(bytes.max(1))?,
            page_size: layout.page_size(),
            words: layout.bitmap_words(),
            budget_slots: Some(slots),
        })
    }

    /// Bytes of address space the store reserves.
    pub fn reserved_bytes(&self) -> usize {
        self.map.len()
    }

    /// Cuts the store into the parts of `n` workers (see [`worker_share`]).
    pub fn parts(&mut self, n: usize) -> Vec<ShadowPart<'_>> {
        let ps = self.page_size;
        let words = self.words;
        let budget = self.budget_slots;
        let mut rest: &mut [u8] = &mut self.map[..];
        let mut parts = Vec::with_capacity(n);
        for w in 0..n {
            let share = worker_share(words, w, n);
            let first_page = share.start as u64 * 64;
            let pages = (share.len() * 64) as u64;
            let (bytes, slot_of) = match budget {
                None => (pages as usize * ps, None),
                Some(total) => (
                    worker_share(total, w, n).len() * ps,
                    Some(vec![NO_SLOT; pages as usize]),
                ),
            };
            let (data, tail) = std::mem::take(&mut rest).split_at_mut(bytes);
            rest = tail;
            let written = if slot_of.is_none() {
                vec![0u64; share.len()]
            } else {
                Vec::new()
            };
            parts.push(ShadowPart {
                data,
                first_page,
                pages,
                slot_of,
                written,
                next_slot: 0,
                page_size: ps,
            });
        }
        parts
    }
}

/// One worker's part of the shadow store.
#[derive(Debug)]
pub struct ShadowPart<'a> {
    data: &'a mut [u8],
    first_page: u64,
    pages: u64,
    /// Page -> slot, only under a budget.
    slot_of: Option<Vec<u32>>,
    /// Full store only: one bit per page, set once its slot was written.
    written: Vec<u64>,
    next_slot: u32,
    page_size: usize,
}

impl ShadowPart<'_> {
    /// The shadow of flat page `page`. `may_allocate` lets a page without a
    /// slot take a free one (the source passes it from round 1 on).
    pub fn lookup(&mut self, page: PageIndex, may_allocate: bool) -> Shadow<'_> {
        let Some(local) = page
            .0
            .checked_sub(self.first_page)
            .filter(|&l| l < self.pages)
        else {
            return Shadow::None;
        };
        let ps = self.page_size;
        match &mut self.slot_of {
            None => {
                let at = local as usize * ps;
                let bytes = &mut self.data[at..at + ps];
                let word = &mut self.written[(local / 64) as usize];
                let mask = 1u64 << (local % 64);
                if *word & mask != 0 {
                    Shadow::Known(bytes)
                } else {
                    Shadow::Zero(ZeroSlot { bytes, word, mask })
                }
            }
            Some(slot_of) => {
                let slot = slot_of[local as usize];
                if slot != NO_SLOT {
                    let at = slot as usize * ps;
                    return Shadow::Known(&mut self.data[at..at + ps]);
                }
                let free = self.data.len() / ps;
                if !may_allocate || self.next_slot as usize >= free {
                    return Shadow::None;
                }
                let slot = self.next_slot;
                self.next_slot += 1;
                slot_of[local as usize] = slot;
                let at = slot as usize * ps;
                Shadow::Fresh(&mut self.data[at..at + ps])
            }
        }
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
        let mut store = ShadowStore::full(&layout(256)).unwrap();
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
        let mut store = ShadowStore::with_budget(&layout(128), 2 * 4096).unwrap();
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
