//! Guest contents for tests, benchmarks and test guests: one pseudo-random
//! generator ([`XorShift64`]) and what is built on it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// xorshift64* (Vigna): fast, good enough for data that must not compress
/// and for random write offsets; not for anything secret.
#[derive(Clone, Copy, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (any value; zero is mapped to a non-zero state).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` pseudo-random bytes from `seed`: data that does not compress.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift64::new(seed).fill(&mut v);
    v
}

/// Fills every region with pseudo-random bytes from `seed`: a guest whose
/// every page holds data that does not compress.
pub fn fill_random<B: vm_memory::bitmap::Bitmap + 'static>(memory: &GuestMemoryMmap<B>, seed: u64) {
    let chunk = pseudo_random_bytes(seed, 1 << 20);
    for r in memory.iter() {
        let mut off = 0u64;
        while off < r.len() {
            let n = (chunk.len() as u64).min(r.len() - off) as usize;
            // Both ranges lie inside the region, so the write cannot fail.
            let _ = memory.write_slice(&chunk[..n], GuestAddress(r.start_addr().0 + off));
            off += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_do_not_compress_and_differ_by_seed() {
        let a = pseudo_random_bytes(1, 4099);
        assert_eq!(a.len(), 4099);
        assert_ne!(a, pseudo_random_bytes(2, 4099));
        assert_eq!(a, pseudo_random_bytes(1, 4099));
        let z = zstd::bulk::compress(&a, 1).expect("zstd");
        assert!(z.len() > a.len() * 99 / 100, "{} of {}", z.len(), a.len());
    }
}
