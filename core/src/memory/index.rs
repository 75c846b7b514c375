//! The numbers both ends agree on, as types that carry their arithmetic:
//! a flat page index and its (bitmap word, bit); a worker's fixed share of
//! bitmap words; a guest address range and the (region, offset) it lies at.
//! Nothing outside this file writes `word * 64 + bit` or compares a guest
//! address with a region's bounds by hand.

use std::ops::Range;

/// Pages per dirty-bitmap word.
pub const PAGES_PER_WORD: u64 = 64;

/// A flat page index: page `word * 64 + bit` is bit `bit` of dirty-bitmap
/// word `word` (see [`super::Layout`] for how regions map onto words).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// The page of bit `bit` (0..64) of bitmap word `word`.
    pub fn from_word_bit(word: usize, bit: u32) -> PageIndex {
        debug_assert!(u64::from(bit) < PAGES_PER_WORD);
        PageIndex(word as u64 * PAGES_PER_WORD + u64::from(bit))
    }

    /// The bitmap word that holds this page's bit.
    pub fn word(self) -> usize {
        (self.0 / PAGES_PER_WORD) as usize
    }

    /// The page's bit within its word, as a mask.
    pub fn mask(self) -> u64 {
        1u64 << (self.0 % PAGES_PER_WORD)
    }

    /// The page `n` pages after this one.
    pub fn offset(self, n: u64) -> PageIndex {
        PageIndex(self.0 + n)
    }
}

/// The bitmap words owned by worker (and stream) `w` of `n`: a fixed,
/// contiguous share for the whole migration, computed the same way at both
/// ends, so every record for a page travels on the one stream that owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub words: Range<usize>,
}

impl Share {
    /// Share `w` of `n` over `total_words` words.
    pub fn of(total_words: usize, w: usize, n: usize) -> Share {
        let n = n.max(1);
        Share {
            words: (total_words * w / n)..(total_words * (w + 1) / n),
        }
    }

    /// Pages the share spans (padding bits included).
    pub fn pages(&self) -> usize {
        self.words.len() * PAGES_PER_WORD as usize
    }

    pub fn first_page(&self) -> PageIndex {
        PageIndex::from_word_bit(self.words.start, 0)
    }

    pub fn contains(&self, page: PageIndex) -> bool {
        self.words.contains(&page.word())
    }

    /// The page's position within the share, when it is in it.
    pub fn local(&self, page: PageIndex) -> Option<usize> {
        self.contains(page)
            .then(|| (page.0 - self.first_page().0) as usize)
    }
}

/// One bit per page of a share, indexed by [`Share::local`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBits(Vec<u64>);

impl PageBits {
    pub fn new(pages: usize) -> PageBits {
        PageBits(vec![0; pages.div_ceil(PAGES_PER_WORD as usize)])
    }

    pub fn get(&self, local: usize) -> bool {
        let p = PageIndex(local as u64);
        self.0.get(p.word()).is_some_and(|w| w & p.mask() != 0)
    }

    /// Sets the bit; returns whether it was set before.
    pub fn set(&mut self, local: usize) -> bool {
        let p = PageIndex(local as u64);
        let Some(w) = self.0.get_mut(p.word()) else {
            return false;
        };
        let was = *w & p.mask() != 0;
        *w |= p.mask();
        was
    }

    pub fn clear(&mut self, local: usize) {
        let p = PageIndex(local as u64);
        if let Some(w) = self.0.get_mut(p.word()) {
            *w &= !p.mask();
        }
    }
}

/// Where a guest address range lies: the region that holds all of it, and
/// the byte offset of its start in that region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionOffset {
    pub region: usize,
    pub offset: u64,
}

/// The one lookup of a guest address range among regions `(base, len)`,
/// sorted and disjoint: `Some` only when all of `[gpa, gpa + len)` lies in
/// one region. Checked arithmetic throughout, so an address from a peer
/// cannot wrap past a bound. `hint` is tried first (a batch's addresses are
/// mostly in one region).
pub fn find_region(
    regions: impl ExactSizeIterator<Item = (u64, u64)> + Clone,
    gpa: u64,
    len: u64,
    hint: usize,
) -> Option<RegionOffset> {
    let end = gpa.checked_add(len)?;
    let hit = |(base, size): (u64, u64)| {
        gpa >= base
            && base
                .checked_add(size)
                .is_some_and(|region_end| end <= region_end)
    };
    let region = match regions.clone().nth(hint) {
        Some(r) if hit(r) => hint,
        _ => regions.clone().position(hit)?,
    };
    let (base, _) = regions.clone().nth(region)?;
    Some(RegionOffset {
        region,
        offset: gpa - base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_word_bit_round_trip() {
        let p = PageIndex::from_word_bit(3, 5);
        assert_eq!(p, PageIndex(197));
        assert_eq!((p.word(), p.mask()), (3, 1 << 5));
    }

    #[test]
    fn shares_cover_every_word_once_and_locate_their_pages() {
        for n in 1..9 {
            let mut next = 0;
            for w in 0..n {
                let s = Share::of(1000, w, n);
                assert_eq!(s.words.start, next);
                next = s.words.end;
            }
            assert_eq!(next, 1000);
        }
        let s = Share::of(10, 1, 2);
        assert_eq!(s.first_page(), PageIndex(320));
        assert_eq!(s.local(PageIndex(321)), Some(1));
        assert_eq!(s.local(PageIndex(319)), None);
        assert_eq!(s.local(PageIndex(640)), None);
    }

    #[test]
    fn page_bits_set_get_clear() {
        let mut b = PageBits::new(130);
        assert!(!b.set(129));
        assert!(b.set(129));
        assert!(b.get(129) && !b.get(128));
        b.clear(129);
        assert!(!b.get(129));
        assert!(!b.set(10_000), "out of range is ignored");
    }

    #[test]
    fn find_region_is_checked_and_uses_its_hint() {
        let regions = [(0u64, 0x1000u64), (0x10_0000, 0x2000)];
        let it = || regions.iter().copied();
        assert_eq!(
            find_region(it(), 0x10_0800, 0x800, 0),
            Some(RegionOffset {
                region: 1,
                offset: 0x800
            })
        );
        assert_eq!(find_region(it(), 0x800, 0x801, 1), None, "crosses the end");
        assert_eq!(find_region(it(), 0x2000, 1, 0), None, "in the hole");
        assert_eq!(find_region(it(), u64::MAX - 1, 4, 0), None, "wraps");
        let huge = [(u64::MAX - 0xfff, 0x2000u64)];
        assert_eq!(
            find_region(huge.iter().copied(), u64::MAX - 0x10, 1, 0),
            None,
            "a region whose end overflows holds nothing"
        );
    }
}
