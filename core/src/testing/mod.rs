//! Helpers for tests of hpmig and of transports built on it (feature
//! `testing`): a small test guest ([`Scribbler`]), guest memory with
//! recognisable content, a byte-for-byte comparison that does not trust the
//! digest code, and a check that a guest still runs.

pub mod conformance;
pub mod proxy;
mod scribbler;

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::memory::{host_page_size, SourceMemory};
pub use scribbler::{heartbeat, LandedScribbler, Scribbler};

/// Source memory with the given `(base, bytes)` regions; every third page
/// holds a pattern, the rest stays zero.
pub fn pattern_memory(regions: &[(u64, usize)]) -> SourceMemory {
    let ranges: Vec<_> = regions.iter().map(|&(b, s)| (GuestAddress(b), s)).collect();
    let mem = SourceMemory::from_ranges(&ranges).expect("test guest memory");
    let ps = host_page_size();
    let page: Vec<u8> = (0..ps).map(|i| (i * 7 + 3) as u8).collect();
    for r in mem.iter() {
        let pages = r.len() as usize / ps;
        for p in (1..pages).step_by(3) {
            mem.write_slice(&page, GuestAddress(r.start_addr().0 + (p * ps) as u64))
                .expect("in range");
        }
    }
    mem
}

/// Source memory with every page non-zero and incompressible-ish.
pub fn dense_memory(bytes: usize) -> SourceMemory {
    let mem = SourceMemory::from_ranges(&[(GuestAddress(0), bytes)]).expect("test guest memory");
    crate::memory::fill_random(&mem, 0x2545_f491_4f6c_dd1d);
    mem
}

/// Panics unless both memories have the same regions and bytes.
pub fn assert_same_memory<
    A: vm_memory::bitmap::Bitmap + 'static,
    B: vm_memory::bitmap::Bitmap + 'static,
>(
    a: &GuestMemoryMmap<A>,
    b: &GuestMemoryMmap<B>,
) {
    assert_eq!(a.num_regions(), b.num_regions(), "region count differs");
    for (ra, rb) in a.iter().zip(b.iter()) {
        assert_eq!(
            (ra.start_addr(), ra.len()),
            (rb.start_addr(), rb.len()),
            "region differs"
        );
        let mut x = vec![0u8; ra.len() as usize];
        let mut y = vec![0u8; rb.len() as usize];
        a.read_slice(&mut x, ra.start_addr()).expect("in range");
        b.read_slice(&mut y, rb.start_addr()).expect("in range");
        if x != y {
            let first = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(0);
            panic!(
                "memory differs, first at {:#x}",
                ra.start_addr().0 + first as u64
            );
        }
    }
}

/// Panics unless `guest` makes progress within 5 s.
pub fn assert_guest_runs(guest: &Scribbler) {
    let w = guest.writes();
    let t = Instant::now();
    while guest.writes() == w && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(guest.writes() > w, "the source guest keeps running");
}

/// Writes `value` at `gpa` behind the dirty log's back (through the host
/// mapping, not vm-memory's tracked API): the write a buggy dirty log
/// would miss. Test hook.
pub fn write_untracked(memory: &SourceMemory, gpa: u64, value: u8) {
    use vm_memory::GuestMemoryBackend;
    let Some(region) = memory.find_region(GuestAddress(gpa)) else {
        panic!("{gpa:#x} is not guest memory");
    };
    let offset = gpa - region.start_addr().0;
    let slice = region.as_volatile_slice().expect("a mapped region");
    let base = slice.ptr_guard_mut().as_ptr();
    assert!(offset < slice.len() as u64);
    // SAFETY: `offset` lies inside the region's mapping (asserted above); a
    // one-byte volatile store races with nothing that relies on it.
    unsafe { base.add(offset as usize).write_volatile(value) };
}
