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
/// One bitmap word per region: stream 0 of 2 owns region 0, stream 1 region 1.
const PAGES: u64 = 64;

fn memory() -> &'static DestMemory {
    static M: OnceLock<DestMemory> = OnceLock::new();
    M.get_or_init(|| {
        Layout::new(
            PS as usize,
            vec![
                RegionSpec { base: GuestAddress(0), size: PAGES * PS },
                RegionSpec { base: GuestAddress(1 << 20), size: PAGES * PS },
            ],
        )
        .and_then(|l| l.allocate())
        .expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let memory = memory();
    let _ = land_stream(memory, 0, 2, flags & 1 != 0, bytes);
    let mut page = [0u8; PS as usize];
    for p in 0..PAGES {
        memory.read_slice(&mut page, GuestAddress((1 << 20) + p * PS)).expect("in range");
        assert!(page.iter().all(|&b| b == 0), "stream 0 wrote a page it does not own");
    }
    // Start the next input from zeroed memory, as a destination does.
    page.fill(0);
    for p in 0..PAGES {
        memory.write_slice(&page, GuestAddress(p * PS)).expect("in range");
    }
});
