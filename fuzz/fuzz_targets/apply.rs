//! The destination applier over a small guest (two regions with a hole):
//! any bytes as stream 0 of 2, with and without zstd. Must never panic and
//! never write outside guest memory (AddressSanitizer watches), and must not
//! touch the pages stream 0 does not own.
#![no_main]

use std::sync::OnceLock;

use hpmig_core::land::land_stream;
use hpmig_core::memory::{DestMemory, Layout, RegionSpec};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const PS: u64 = 4096;

fn layout() -> &'static Layout {
    static L: OnceLock<Layout> = OnceLock::new();
    L.get_or_init(|| {
        Layout::new(
            PS as usize,
            vec![
                RegionSpec { base: GuestAddress(0), size: 128 * PS },
                RegionSpec { base: GuestAddress(1 << 20), size: 128 * PS },
            ],
        )
        .expect("layout")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let memory: DestMemory = layout().allocate().expect("guest memory");
    let _ = land_stream(&memory, 0, 2, flags & 1 != 0, bytes);
    // Stream 0 of 2 owns the first half of the bitmap words: region 0's
    // pages. Region 1 belongs to stream 1 and must still be zero.
    let mut other = vec![0u8; (128 * PS) as usize];
    memory.read_slice(&mut other, GuestAddress(1 << 20)).expect("in range");
    assert!(other.iter().all(|&b| b == 0), "stream 0 wrote a page it does not own");
});
