//! The VMM's own dirty bitmap: vm-memory's [`AtomicBitmap`], set by every
//! write made through the vm-memory API, harvested with one `fetch_and(0)`
//! per word.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryBackend;

use super::{DirtyBitmap, DirtyError, DirtySource};
use crate::memory::{Layout, SourceMemory};

/// Harvests the atomic bitmaps of every region of a [`SourceMemory`].
#[derive(Debug, Clone)]
pub struct VmmBitmap {
    memory: SourceMemory,
    layout: Layout,
}

impl VmmBitmap {
    /// Checks that every region's bitmap tracks one bit per layout page.
    pub fn new(memory: SourceMemory, layout: Layout) -> Result<Self, DirtyError> {
        for (region, r) in memory.iter().enumerate() {
            let got = bitmap(r).len();
            let expected = layout.region_pages(region) as usize;
            if got != expected {
                return Err(DirtyError::BitmapSize {
                    region,
                    got,
                    expected,
                });
            }
        }
        Ok(VmmBitmap { memory, layout })
    }
}

fn bitmap(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = r;
    mapping.bitmap()
}

impl DirtySource for VmmBitmap {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), DirtyError> {
        for (region, r) in self.memory.iter().enumerate() {
            // One allocation per region per round (vm-memory's API), none per page.
            let words = bitmap(r).get_and_reset();
            into.or_region(self.layout.region_word_base(region), &words);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_through_vm_memory_are_harvested_once() {
        let ps = crate::memory::host_page_size() as u64;
        let memory: SourceMemory = SourceMemory::from_ranges(&[
            (GuestAddress(0), 64 * ps as usize),
            (GuestAddress(1 << 30), 8 * ps as usize),
        ])
        .unwrap();
        let layout = Layout::of(&memory).unwrap();
        let mut src = VmmBitmap::new(memory.clone(), layout.clone()).unwrap();
        let mut bits = DirtyBitmap::new(&layout);
        src.harvest(&mut bits).unwrap();
        bits.clear();
        memory.write_obj(7u64, GuestAddress(3 * ps + 8)).unwrap();
        memory
            .write_obj(7u64, GuestAddress((1 << 30) + 2 * ps))
            .unwrap();
        src.harvest(&mut bits).unwrap();
        assert_eq!(bits.words()[0], 1 << 3);
        assert_eq!(bits.words()[1], 1 << 2);
        bits.clear();
        src.harvest(&mut bits).unwrap();
        assert_eq!(bits.count(), 0, "harvest clears");
    }
}
