//! Harvest: where dirty pages come from.
//!
//! A [`DirtySource`] fetches and clears the pages written since its last
//! harvest and ORs them into a layout-shaped [`DirtyBitmap`]. The source
//! calls it at the start of every round, before any page is read, so a write
//! that races with the copy re-dirties its page for the next round.
//!
//! Here lives the VMM-side source ([`vmm::VmmBitmap`]: vm-memory's atomic
//! bitmap, set by every write made through the vm-memory API). The KVM
//! sources (dirty log, manual clear, dirty ring) implement the same trait and
//! are always combined with the VMM bitmap through [`Combined`], because
//! writes the host makes through its own mapping are not in KVM's log.

pub mod kvm;
pub mod vmm;

use thiserror::Error;

use crate::memory::{Layout, PageIndex};

/// Errors of harvesting.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// a bitmap of the wrong size came back
    #[error("dirty bitmap of region {region} has {got} bits, expected {expected}")]
    BitmapSize {
        region: usize,
        got: usize,
        expected: usize,
    },
    /// the hypervisor refused to hand over its log
    #[error("{call} failed: {source}")]
    Hypervisor {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Something that knows which guest pages were written.
pub trait DirtySource: Send {
    /// Fetches and clears the pages dirtied since the last call, ORing them
    /// into `into`. The first call starts (or restarts) tracking.
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), DirtyError>;
}

/// Two sources ORed together (KVM's log and the VMM's own bitmap).
#[derive(Debug)]
pub struct Combined<A, B>(pub A, pub B);

impl<A: DirtySource, B: DirtySource> DirtySource for Combined<A, B> {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), DirtyError> {
        self.0.harvest(into)?;
        self.1.harvest(into)
    }
}

/// One bit per guest page in the flat numbering of [`Layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    /// Bits that are real pages (padding bits past a region's end are 0).
    valid: Vec<u64>,
}

impl DirtyBitmap {
    pub fn new(layout: &Layout) -> Self {
        let mut valid = vec![0u64; layout.bitmap_words()];
        for r in 0..layout.regions().len() {
            let base = layout.region_word_base(r);
            let pages = layout.region_pages(r) as usize;
            for (i, w) in valid[base..base + pages.div_ceil(64)]
                .iter_mut()
                .enumerate()
            {
                let left = pages - i * 64;
                *w = if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                };
            }
        }
        DirtyBitmap {
            words: vec![0; valid.len()],
            valid,
        }
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs `bits` (one region's bitmap, in page order) in at `word_base`.
    /// Bits past the region's end are dropped.
    pub fn or_region(&mut self, word_base: usize, bits: &[u64]) {
        let end = (word_base + bits.len()).min(self.words.len());
        if word_base >= end {
            return;
        }
        let dst = self.words[word_base..end]
            .iter_mut()
            .zip(&self.valid[word_base..end]);
        for ((w, v), b) in dst.zip(bits) {
            *w |= b & v;
        }
    }

    /// Marks flat page `page` dirty; pages outside the layout are ignored.
    pub fn set_page(&mut self, page: PageIndex) {
        let w = page.word();
        if let (Some(word), Some(valid)) = (self.words.get_mut(w), self.valid.get(w)) {
            *word |= page.mask() & valid;
        }
    }

    /// Marks every page dirty (round 0).
    pub fn set_all(&mut self) {
        self.words.copy_from_slice(&self.valid);
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;
    use vm_memory::GuestAddress;

    #[test]
    fn padding_bits_are_never_set() {
        let l = Layout::new(
            4096,
            vec![
                RegionSpec {
                    base: GuestAddress(0),
                    size: 70 * 4096,
                },
                RegionSpec {
                    base: GuestAddress(1 << 30),
                    size: 4096,
                },
            ],
        )
        .unwrap();
        let mut b = DirtyBitmap::new(&l);
        b.set_all();
        assert_eq!(b.count(), 71);
        b.clear();
        b.or_region(0, &[u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(
            b.count(),
            71,
            "region 0's bits spill into region 1's word only where valid"
        );
        b.clear();
        b.or_region(2, &[u64::MAX]);
        assert_eq!(b.count(), 1);
    }
}
