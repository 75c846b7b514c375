//! The keyed page hash both ends keep per page: `H(gpa, page)`, 128 bits.
//!
//! Construction (the NH-then-PRF shape of UMAC): NH, an almost-universal
//! hash over the page's 32-bit words with a per-migration random key as
//! long as the page, computed twice with the key shifted by two words
//! (Toeplitz), gives two 64-bit values; for two different pages of one
//! length they collide with probability at most 2⁻⁶⁴ over the key. A keyed
//! BLAKE3 of (guest address, both NH values) then makes the result a
//! pseudo-random function of (address, page): a page moved to another
//! address, or two pages swapped, hash differently. Sums of such values
//! (the [`super::Ledger`]) can only collide by an NH collision or by
//! chance, at most about 2⁻⁶⁴ per page that differs.
//!
//! The key never leaves the two ends of a migration: it is derived from the
//! session (token and both nonces), so a guest, or anyone on the wire,
//! cannot craft pages that collide under it. NH is a multiply-accumulate
//! over 32-bit words, which the compiler turns into AVX2 `vpmuludq` when
//! the CPU has it (chosen at run time).

/// A page hash.
pub type PageHash = u128;

/// Hashes pages of one size under one key.
#[derive(Clone)]
pub struct PageHasher {
    /// NH key: one 32-bit word per page word, plus two for the shift.
    nh: Vec<u32>,
    prf: [u8; 32],
    page_size: usize,
    avx2: bool,
}

impl std::fmt::Debug for PageHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHasher")
            .field("page_size", &self.page_size)
            .field("avx2", &self.avx2)
            .finish_non_exhaustive()
    }
}

impl PageHasher {
    /// The hasher for pages of `page_size` bytes (a multiple of 8) under
    /// `key` (32 random bytes, e.g. from the session).
    pub fn new(key: &[u8; 32], page_size: usize) -> PageHasher {
        let words = page_size / 4 + 2;
        let mut stream = blake3::Hasher::new_derive_key("hpmig 2026-12 page hash NH key")
            .update(key)
            .finalize_xof();
        let mut bytes = vec![0u8; words * 4];
        stream.fill(&mut bytes);
        let nh = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        PageHasher {
            nh,
            prf: blake3::derive_key("hpmig 2026-12 page hash PRF key", key),
            page_size,
            #[cfg(target_arch = "x86_64")]
            avx2: is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            avx2: false,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// `H(gpa, page)`; `page` must be `page_size` bytes.
    pub fn hash(&self, gpa: u64, page: &[u8]) -> PageHash {
        debug_assert_eq!(page.len(), self.page_size);
        let (a, b) = self.nh(page);
        let mut input = [0u8; 24];
        input[..8].copy_from_slice(&gpa.to_le_bytes());
        input[8..16].copy_from_slice(&a.to_le_bytes());
        input[16..].copy_from_slice(&b.to_le_bytes());
        let out = blake3::keyed_hash(&self.prf, &input);
        let mut h = [0u8; 16];
        h.copy_from_slice(&out.as_bytes()[..16]);
        u128::from_le_bytes(h)
    }

    fn nh(&self, page: &[u8]) -> (u64, u64) {
        let n = page.len().min(self.page_size) / 8 * 8;
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected!("avx2") said so.
            return unsafe { nh_avx2(&page[..n], &self.nh) };
        }
        nh(&page[..n], &self.nh)
    }
}

/// Two NH lanes over `m` (a multiple of 8 bytes) with key `k` and `k`
/// shifted by two words.
#[inline(always)]
fn nh(m: &[u8], k: &[u32]) -> (u64, u64) {
    let mut a = 0u64;
    let mut b = 0u64;
    for (i, c) in m.chunks_exact(8).enumerate() {
        let m0 = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let m1 = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        let (k0, k1, k2, k3) = (k[2 * i], k[2 * i + 1], k[2 * i + 2], k[2 * i + 3]);
        a = a.wrapping_add(u64::from(m0.wrapping_add(k0)) * u64::from(m1.wrapping_add(k1)));
        b = b.wrapping_add(u64::from(m0.wrapping_add(k2)) * u64::from(m1.wrapping_add(k3)));
    }
    (a, b)
}

/// [`nh`] with AVX2, four 8-byte chunks per step: the message words plus
/// each key (the second two words on) in one 32-bit add each, and one
/// `vpmuludq` per lane multiplies every chunk's two sums (its even 32-bit
/// word by its odd one). Sums mod 2⁶⁴ in any order, so it equals [`nh`].
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nh_avx2(m: &[u8], k: &[u32]) -> (u64, u64) {
    use std::arch::x86_64::*;
    const STEP: usize = 32;
    let words = m.len() / 8 * 2;
    // The key's words `2i..2i + 4` for every chunk `i`: `words + 2` of them.
    assert!(k.len() >= words + 2, "an NH key shorter than the message");
    let vectored = m.len() / STEP * STEP;
    let (mut acc_a, mut acc_b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut at = 0;
    while at < vectored {
        let w = at / 4;
        // SAFETY: `at + 32 <= m.len()`, and the key loads read words
        // `w..w + 8` and `w + 2..w + 10`, below `words + 2` (asserted above)
        // since `w + 8 <= words`; loadu has no alignment requirement.
        let (msg, k1, k2) = unsafe {
            (
                _mm256_loadu_si256(m.as_ptr().add(at).cast()),
                _mm256_loadu_si256(k.as_ptr().add(w).cast()),
                _mm256_loadu_si256(k.as_ptr().add(w + 2).cast()),
            )
        };
        let s1 = _mm256_add_epi32(msg, k1);
        let s2 = _mm256_add_epi32(msg, k2);
        acc_a = _mm256_add_epi64(acc_a, _mm256_mul_epu32(s1, _mm256_srli_epi64(s1, 32)));
        acc_b = _mm256_add_epi64(acc_b, _mm256_mul_epu32(s2, _mm256_srli_epi64(s2, 32)));
        at += STEP;
    }
    let lanes = |v: __m256i| {
        let mut out = [0u64; 4];
        // SAFETY: `out` is 32 writable bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        out.iter().fold(0u64, |s, &x| s.wrapping_add(x))
    };
    let (tail_a, tail_b) = nh(&m[vectored..], &k[vectored / 4..]);
    (
        lanes(acc_a).wrapping_add(tail_a),
        lanes(acc_b).wrapping_add(tail_b),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_depends_on_bytes_address_and_key_and_both_paths_agree() {
        let h = PageHasher::new(&[1; 32], 4096);
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        let base = h.hash(0x1000, &page);
        assert_eq!(base, h.hash(0x1000, &page));
        assert_ne!(base, h.hash(0x2000, &page), "the address counts");
        for at in [0, 1, 2047, 4095] {
            let mut p = page.clone();
            p[at] ^= 0x40;
            assert_ne!(base, h.hash(0x1000, &p), "byte {at}");
        }
        assert_ne!(base, PageHasher::new(&[2; 32], 4096).hash(0x1000, &page));
        assert_eq!(h.nh(&page), nh(&page, &h.nh), "vector and scalar NH agree");
        assert_ne!(h.hash(0, &[0; 4096]), h.hash(4096, &[0; 4096]));
    }

    #[test]
    fn the_vector_nh_equals_the_scalar_one_at_every_length_and_alignment() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            let key: Vec<u32> = (0..1026u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
            let msg: Vec<u8> = (0..4104u32).map(|i| (i * 131 % 255) as u8 ^ 0xa5).collect();
            for len in (0..=4096).step_by(8) {
                for skew in [0, 1, 3] {
                    let m = &msg[skew..skew + len];
                    // SAFETY: this CPU has AVX2 (checked above).
                    let v = unsafe { nh_avx2(m, &key) };
                    assert_eq!(v, nh(m, &key), "length {len}, skew {skew}");
                }
            }
        }
    }
}
