//! Fingerprint store: for every page, one keyed 64-bit hash per 64-byte
//! block of what was last sent, in place of a byte-exact shadow
//! (`--shadow fingerprint`).
//!
//! Memory cost: 8 bytes per 64-byte block, 1/8 of guest memory, against
//! the full shadow's 1/1. A dirty page's snapshot is hashed block by block;
//! the blocks whose hash differs from the stored one are sent (adjacent
//! ones merged into one segment, see [`super::PageEncoder::plan_blocks`]),
//! the others are not, and the stored hashes become the snapshot's. A
//! segment is a whole block: with no old bytes there is nothing to trim it
//! to. The store starts all zero, which is exactly the hash of the zero
//! blocks the destination's fresh memory holds (see below), so no "never
//! sent" state is needed.
//!
//! ## The hash and its bound
//!
//! A block is eight little-endian 64-bit words `m₀ … m₇`, read as elements
//! of GF(2⁶⁴) = GF(2)\[x\]/(x⁶⁴ + x⁴ + x³ + x + 1) (irreducible: Rabin's
//! test, see the tests). With a key `k ≠ 0` drawn from the OS's random source once
//! per migration,
//!
//! ```text
//! H_k(m) = m₀·k⁸ + m₁·k⁷ + … + m₇·k¹        (in GF(2⁶⁴), + is XOR)
//! ```
//!
//! For two different blocks `m ≠ m'`, `H_k(m) = H_k(m')` means
//! `k · Σ (mᵢ + m'ᵢ) k^(7-i) = 0`, and since `k ≠ 0`, that `k` is a root of
//! a nonzero polynomial of degree at most 7: at most 7 of the 2⁶⁴ − 1
//! nonzero keys. So an undetected change of a block has probability at most
//! 7 / (2⁶⁴ − 1) < 2⁻⁶¹ per block compared, for contents chosen without
//! knowledge of the key. (Over a whole migration the bound adds up: 2³⁰
//! block comparisons, 64 GiB of dirty pages, stay below 2⁻³¹.) The all-zero
//! block hashes to 0 and the constant term is absent, so a zeroed store
//! describes zeroed memory.
//!
//! The key is what makes "chosen without knowledge of the key" hold: it
//! comes from `getrandom` per migration, lives only in this process, and
//! neither the key nor any hash goes on the wire, so neither the guest nor
//! the network can aim writes at a collision. What a collision would do —
//! leave a stale block on the destination — is caught by `--verify`:
//! `strict` digests all memory, and `incremental`'s per-page ledger hashes
//! every dirty page's snapshot with its own key (never from these
//! fingerprints), so a page whose fingerprint missed a change is refused
//! before the destination runs it.
//!
//! ## Speed
//!
//! The powers `k⁸ … k¹` are computed once, so a block costs eight
//! independent carry-less 64×64 multiplications, XORed together, and one
//! reduction of the 128-bit sum (reduction modulo the polynomial is
//! linear, so reducing the XOR of the products gives exactly the XOR of the
//! reduced products), done with shifts because the modulus is sparse. Three paths, chosen at run
//! time by [`HashPath::detect`], give the same values bit for bit (a test
//! runs them all on random data):
//!
//! - `Vpclmul` (x86-64 with AVX2 and VPCLMULQDQ): two multiplications per
//!   instruction on 256-bit registers, four blocks in flight, and one
//!   reduction for the four, a 64-bit lane each. The instruction is
//!   written as inline assembly: its intrinsic needs a newer Rust (1.89)
//!   than this crate's minimum; its VEX form needs AVX, not AVX-512.
//! - `Clmul` (x86-64 with PCLMULQDQ): one multiplication per instruction,
//!   two blocks per reduction, one per lane of a 128-bit register.
//! - `Portable`: a bit-serial multiplication, some 50 times slower.
//!
//! The worker copies a live page into its snapshot and hashes it in one
//! pass ([`FingerprintPart::copy_compare_and_store`]): on the `Vpclmul`
//! and `Clmul` paths every 32 (16) bytes are loaded once, stored into the
//! snapshot and hashed from the same register, so the page is read from
//! memory once instead of copied and then read again, and the fingerprints
//! are those of the snapshot's bytes even while the guest writes the page.
//!
//! In the `diff` bench's `hash-only` figures on an AMD EPYC with both,
//! `Vpclmul` hashes about twice as fast as `Clmul` (some 25 GiB/s, about
//! memcmp's rate on the same pages).

use crate::memory::{PageIndex, Share};

/// `n` zeroed fingerprints, their memory populated for writing now. Left
/// to the kernel's zero page, each 4 KiB of the store would be read first
/// (the compare) and then written: a copy-on-write fault whose TLB flush
/// interrupts every CPU running this process, once per 8 guest pages in
/// round 0 — measured, it made round 0 with fingerprints 0.5–0.7× page
/// mode's rate on this machine. Every page is compared in round 0 anyway,
/// so populating costs no memory the round would not take.
fn populated(n: usize) -> Vec<u64> {
    let mut v = vec![0u64; n];
    let bytes = std::mem::size_of_val(v.as_slice());
    let page = crate::memory::host_page_size();
    let start = (v.as_mut_ptr() as usize).next_multiple_of(page);
    let end = (v.as_mut_ptr() as usize + bytes) / page * page;
    if end > start {
        // SAFETY: [start, end) lies inside `v`'s allocation (rounded inwards
        // to whole pages), which `v` owns and keeps alive for the call;
        // MADV_POPULATE_WRITE only faults those pages in writable, keeping
        // their (zero) contents. On a kernel without it (before 5.14) it
        // fails with EINVAL and changes nothing: the faults then come as
        // the store is first written, as before.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
    v
}

/// Bytes per fingerprinted block.
pub const BLOCK: usize = 64;
const WORDS: usize = BLOCK / 8;

/// How a [`BlockHasher`] multiplies: every path gives the same hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashPath {
    /// Bit-serial multiplication, on any CPU.
    Portable,
    /// PCLMULQDQ: one 64×64 carry-less product per instruction.
    Clmul,
    /// VPCLMULQDQ on 256-bit registers (with AVX2): two per instruction.
    Vpclmul,
}

impl HashPath {
    /// The fastest path this CPU has.
    pub fn detect() -> HashPath {
        HashPath::ALL
            .into_iter()
            .rev()
            .find(|p| p.available())
            .unwrap_or(HashPath::Portable)
    }

    /// Every path, slowest first.
    pub const ALL: [HashPath; 3] = [HashPath::Portable, HashPath::Clmul, HashPath::Vpclmul];

    /// Whether this CPU has the instructions of the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let clmul = std::is_x86_feature_detected!("pclmulqdq");
            match self {
                HashPath::Portable => true,
                HashPath::Clmul => clmul,
                HashPath::Vpclmul => {
                    clmul
                        && std::is_x86_feature_detected!("avx2")
                        && std::is_x86_feature_detected!("vpclmulqdq")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == HashPath::Portable
        }
    }

    /// A short name, for benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            HashPath::Portable => "portable",
            HashPath::Clmul => "clmul",
            HashPath::Vpclmul => "vpclmul",
        }
    }
}

/// The keyed block hash of the module doc.
#[derive(Clone)]
pub struct BlockHasher {
    /// `k⁸, k⁷, …, k¹`: word `i` of a block is multiplied by `powers[i]`.
    powers: [u64; WORDS],
    /// Only ever a path whose `available()` was true.
    path: HashPath,
}

impl std::fmt::Debug for BlockHasher {
    /// Never shows the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHasher")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl BlockHasher {
    /// A hasher under a fresh random key (never zero).
    pub fn random() -> Result<BlockHasher, getrandom::Error> {
        loop {
            let mut k = [0u8; 8];
            getrandom::fill(&mut k)?;
            if let Some(h) = BlockHasher::with_key(u64::from_le_bytes(k)) {
                return Ok(h);
            }
        }
    }

    /// A hasher under `key`; `None` for 0, which would hash every block to 0.
    /// Tests and benchmarks only: a migration's key must be random.
    pub fn with_key(key: u64) -> Option<BlockHasher> {
        if key == 0 {
            return None;
        }
        let mut powers = [0u64; WORDS];
        let mut p = key;
        for slot in powers.iter_mut().rev() {
            *slot = p;
            p = gf_mul(p, key);
        }
        Some(BlockHasher {
            powers,
            path: HashPath::detect(),
        })
    }

    /// The same hasher on `path` (to test and measure each path); `None`
    /// when this CPU lacks its instructions.
    pub fn on(mut self, path: HashPath) -> Option<BlockHasher> {
        if !path.available() {
            return None;
        }
        self.path = path;
        Some(self)
    }

    /// The same hasher without carry-less instructions (the fallback).
    pub fn portable(self) -> BlockHasher {
        BlockHasher {
            path: HashPath::Portable,
            ..self
        }
    }

    pub fn path(&self) -> HashPath {
        self.path
    }

    /// The hash of one 64-byte block.
    pub fn hash_block(&self, block: &[u8; BLOCK]) -> u64 {
        let mut out = [0u64; 1];
        self.hash_blocks(block, &mut out);
        out[0]
    }

    /// Copies `dst.len()` bytes from `src` into `dst` and hashes the
    /// 64-byte blocks of `dst` into `out`, as [`BlockHasher::hash_blocks`]
    /// would after the copy: the hashes are those of the bytes in `dst`
    /// even if `src` changes meanwhile (a running guest's page). On the
    /// carry-less paths in one pass: every 32 (16) bytes loaded once,
    /// stored and hashed, so the page is read from memory only once.
    ///
    /// # Safety
    /// `src` must be readable for `dst.len()` bytes, which must not
    /// overlap `dst`.
    pub unsafe fn copy_and_hash_blocks(&self, src: *const u8, dst: &mut [u8], out: &mut [u64]) {
        let n = (dst.len() / BLOCK).min(out.len());
        let (d, whole, tail) = (dst.as_mut_ptr(), n * BLOCK, dst.len() - n * BLOCK);
        // SAFETY: `src` is readable for dst.len() = whole + tail bytes (our
        // contract), `dst` writable for as many, and they do not overlap;
        // each path's CPU features are present, see `hash_raw`.
        unsafe {
            if self.path == HashPath::Portable {
                std::ptr::copy_nonoverlapping(src, d, dst.len());
                self.hash_blocks(dst, out);
                return;
            }
            self.hash_raw(src, Some(d), &mut out[..n]);
            std::ptr::copy_nonoverlapping(src.add(whole), d.add(whole), tail);
        }
    }

    /// `copy_hash_vpclmul` or `copy_hash_clmul`, as `path` says.
    ///
    /// # Safety
    /// `path` is not `Portable`; `src` readable, and `dst` (if given)
    /// writable, for `64 · out.len()` bytes, the two not overlapping.
    unsafe fn hash_raw(&self, src: *const u8, dst: Option<*mut u8>, out: &mut [u64]) {
        match self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `path` is Vpclmul only when `HashPath::available` saw
            // is_x86_feature_detected! report pclmulqdq, avx2 and
            // vpclmulqdq; the lengths are our contract.
            HashPath::Vpclmul => unsafe { copy_hash_vpclmul(src, dst, &self.powers, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `path` is Clmul only when `HashPath::available` saw
            // is_x86_feature_detected! report pclmulqdq (sse2 is
            // x86-64's); the lengths are our contract.
            HashPath::Clmul => unsafe { copy_hash_clmul(src, dst, &self.powers, out) },
            // Off x86-64 every hasher is Portable (`HashPath::available`).
            _ => unreachable!("the portable path has no raw form"),
        }
    }

    /// Hashes the 64-byte blocks of `bytes` into `out`, one per block, as
    /// many as both hold (a tail shorter than a block is not hashed).
    pub fn hash_blocks(&self, bytes: &[u8], out: &mut [u64]) {
        let n = (bytes.len() / BLOCK).min(out.len());
        let (bytes, out) = (&bytes[..n * BLOCK], &mut out[..n]);
        #[cfg(target_arch = "x86_64")]
        if self.path != HashPath::Portable {
            // SAFETY: not Portable; `bytes` holds `n` = out.len() blocks to
            // read, and nothing is copied.
            return unsafe { self.hash_raw(bytes.as_ptr(), None, out) };
        }
        for (b, o) in bytes.chunks_exact(BLOCK).zip(out.iter_mut()) {
            let mut hi = 0u64;
            let mut lo = 0u64;
            for (i, w) in b.chunks_exact(8).enumerate() {
                let mut x = [0u8; 8];
                x.copy_from_slice(w);
                let (h, l) = clmul_portable(u64::from_le_bytes(x), self.powers[i]);
                hi ^= h;
                lo ^= l;
            }
            *o = reduce(hi, lo);
        }
    }
}

/// Carry-less product of `a` and `b`: `(high 64 bits, low 64 bits)`.
fn clmul_portable(a: u64, b: u64) -> (u64, u64) {
    let mut acc = 0u128;
    for i in 0..64 {
        // Branch-free: the mask is all ones when bit i of b is set.
        let mask = 0u128.wrapping_sub(u128::from((b >> i) & 1));
        acc ^= (u128::from(a) << i) & mask;
    }
    ((acc >> 64) as u64, acc as u64)
}

/// `hi·x⁶⁴ + lo` reduced modulo x⁶⁴ + x⁴ + x³ + x + 1: x⁶⁴ ≡ x⁴ + x³ + x + 1.
#[inline(always)]
fn reduce(hi: u64, lo: u64) -> u64 {
    // hi·(x⁴ + x³ + x + 1): its low 64 bits, and the (at most 4) bits above.
    let folded = hi ^ (hi << 1) ^ (hi << 3) ^ (hi << 4);
    let over = (hi >> 63) ^ (hi >> 61) ^ (hi >> 60);
    // `over` has degree < 4, so over·(x⁴ + x³ + x + 1) fits in 64 bits.
    lo ^ folded ^ over ^ (over << 1) ^ (over << 3) ^ (over << 4)
}

/// Multiplication in GF(2⁶⁴).
fn gf_mul(a: u64, b: u64) -> u64 {
    let (hi, lo) = clmul_portable(a, b);
    reduce(hi, lo)
}

/// [`reduce`] in every 64-bit lane of vectors `hi` and `lo`, with the
/// vector XOR and shift intrinsics of their width (in a function with the
/// target features they need).
#[cfg(target_arch = "x86_64")]
macro_rules! reduce_lanes {
    ($xor:ident, $shl:ident, $shr:ident, $hi:expr, $lo:expr) => {{
        let (hi, lo) = ($hi, $lo);
        let xor3 = |a, b, c| $xor(a, $xor(b, c));
        let folded = $xor(xor3(hi, $shl::<1>(hi), $shl::<3>(hi)), $shl::<4>(hi));
        let over = xor3($shr::<63>(hi), $shr::<61>(hi), $shr::<60>(hi));
        let over = $xor(
            xor3(over, $shl::<1>(over), $shl::<3>(over)),
            $shl::<4>(over),
        );
        xor3(lo, folded, over)
    }};
}

/// Hashes the `out.len()` blocks at `src` into `out`; with `dst`, copies
/// them there too, as [`copy_hash_vpclmul`] does, 16 bytes at a time.
///
/// # Safety
/// The CPU must have PCLMULQDQ; `src` must be readable, and `dst` (if
/// given) writable, for `64 · out.len()` bytes, the two not overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq")]
unsafe fn copy_hash_clmul(
    src: *const u8,
    dst: Option<*mut u8>,
    powers: &[u64; WORDS],
    out: &mut [u64],
) {
    use std::arch::x86_64::*;
    // Key pairs, low lane for the even word, high lane for the odd one.
    let k = |i: usize| _mm_set_epi64x(powers[i + 1] as i64, powers[i] as i64);
    let k = [k(0), k(2), k(4), k(6)];
    // SAFETY: the CPU has PCLMULQDQ (this function's contract); `sum` is
    // called below only for blocks b < out.len(), which lie at offset 64·b
    // of `src` and `dst`, 64 bytes each.
    let sum = |b: usize| unsafe {
        let off = b * BLOCK;
        block_sum_clmul(src.add(off), dst.map(|d| d.add(off)), &k)
    };
    // Two blocks at a time: their 128-bit sums are reduced side by side,
    // one 64-bit lane each, with shifts (which leave the multiplier free).
    let mut outs = out.chunks_exact_mut(2);
    let mut at = 0;
    for o in &mut outs {
        let (x, y) = (sum(at), sum(at + 1));
        at += 2;
        let hi = _mm_unpackhi_epi64(x, y);
        let lo = _mm_unpacklo_epi64(x, y);
        let r = reduce_lanes!(_mm_xor_si128, _mm_slli_epi64, _mm_srli_epi64, hi, lo);
        // SAFETY: `o` is two u64, 16 bytes; storeu has no alignment requirement.
        unsafe { _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, r) };
    }
    if let [o] = outs.into_remainder() {
        let x = sum(at);
        let lo = _mm_cvtsi128_si64(x) as u64;
        let hi = _mm_cvtsi128_si64(_mm_unpackhi_epi64(x, x)) as u64;
        *o = reduce(hi, lo);
    }
}

/// The unreduced 128-bit sum `Σ mᵢ·k^(8-i)` of the block at `p`; with
/// `copy`, the block's bytes as loaded are stored there.
///
/// # Safety
/// The CPU must have PCLMULQDQ, `p` must point to 64 readable bytes and
/// `copy` (if given) to 64 writable ones.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq")]
#[inline]
unsafe fn block_sum_clmul(
    p: *const u8,
    copy: Option<*mut u8>,
    k: &[std::arch::x86_64::__m128i; 4],
) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let p = p as *const __m128i;
    // SAFETY: 64 readable bytes at `p` (the caller's contract), so the four
    // 16-byte loads at p..p+4 are in bounds; loadu needs no alignment.
    let m = unsafe {
        [
            _mm_loadu_si128(p),
            _mm_loadu_si128(p.add(1)),
            _mm_loadu_si128(p.add(2)),
            _mm_loadu_si128(p.add(3)),
        ]
    };
    if let Some(c) = copy {
        let c = c as *mut __m128i;
        for (i, m) in m.iter().enumerate() {
            // SAFETY: 64 writable bytes at `c` (the caller's contract);
            // storeu needs no alignment.
            unsafe { _mm_storeu_si128(c.add(i), *m) };
        }
    }
    let pair = |i: usize| {
        _mm_xor_si128(
            _mm_clmulepi64_si128::<0x00>(m[i], k[i]),
            _mm_clmulepi64_si128::<0x11>(m[i], k[i]),
        )
    };
    _mm_xor_si128(
        _mm_xor_si128(pair(0), pair(1)),
        _mm_xor_si128(pair(2), pair(3)),
    )
}

/// Hashes the `out.len()` blocks at `src` into `out`; with `dst`, copies
/// them there too, each 32 bytes loaded once into a register that is both
/// stored and hashed, so the hashes are those of the bytes in `dst` even if
/// `src` changes meanwhile.
///
/// # Safety
/// The CPU must have AVX2, PCLMULQDQ and VPCLMULQDQ; `src` must be
/// readable, and `dst` (if given) writable, for `64 · out.len()` bytes,
/// the two not overlapping.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,pclmulqdq")]
unsafe fn copy_hash_vpclmul(
    src: *const u8,
    dst: Option<*mut u8>,
    powers: &[u64; WORDS],
    out: &mut [u64],
) {
    use std::arch::x86_64::*;
    // The keys of a block's two 32-byte halves, word for word.
    let k = |i: usize| {
        _mm256_set_epi64x(
            powers[i + 3] as i64,
            powers[i + 2] as i64,
            powers[i + 1] as i64,
            powers[i] as i64,
        )
    };
    let k = [k(0), k(4)];
    // Four blocks at a time: four independent product chains for the
    // multiplier, and one reduction for all four, a 64-bit lane each.
    let mut outs = out.chunks_exact_mut(4);
    let mut at = 0;
    for o in &mut outs {
        // SAFETY: the CPU has VPCLMULQDQ and AVX2 (this function's
        // contract); blocks at..at+4 are in `src` and `dst`, whose lengths
        // are 64 bytes per element of `out`.
        let [a, b, c, d] = [0, 1, 2, 3].map(|j| unsafe {
            let off = (at + j) * BLOCK;
            block_sum_vpclmul(src.add(off), dst.map(|d| d.add(off)), &k)
        });
        at += 4;
        // Each is a block's sum in two 128-bit halves: add the halves,
        // two blocks to a register, `[a, b]` and `[c, d]`.
        let halves = |x, y| {
            _mm256_xor_si256(
                _mm256_permute2x128_si256::<0x20>(x, y),
                _mm256_permute2x128_si256::<0x31>(x, y),
            )
        };
        let (ab, cd) = (halves(a, b), halves(c, d));
        // 64-bit lanes a, c, b, d: the high words, the low words.
        let hi = _mm256_unpackhi_epi64(ab, cd);
        let lo = _mm256_unpacklo_epi64(ab, cd);
        let r = reduce_lanes!(
            _mm256_xor_si256,
            _mm256_slli_epi64,
            _mm256_srli_epi64,
            hi,
            lo
        );
        // Lanes a, c, b, d back to a, b, c, d.
        let r = _mm256_permute4x64_epi64::<0b11_01_10_00>(r);
        // SAFETY: `o` is four u64, 32 bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, r) };
    }
    let off = at * BLOCK;
    // SAFETY: the CPU has PCLMULQDQ (this function's contract); the
    // blocks from `at` on are the rest of `src` and `dst`.
    unsafe {
        copy_hash_clmul(
            src.add(off),
            dst.map(|d| d.add(off)),
            powers,
            outs.into_remainder(),
        )
    }
}

/// The unreduced sum `Σ mᵢ·k^(8-i)` of the block at `p`, as two 128-bit
/// halves (words 0, 1, 4, 5 and words 2, 3, 6, 7) whose XOR is the sum;
/// with `copy`, the block's bytes as loaded are stored there.
///
/// # Safety
/// The CPU must have AVX2 and VPCLMULQDQ, `p` must point to 64 readable
/// bytes and `copy` (if given) to 64 writable ones.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_sum_vpclmul(
    p: *const u8,
    copy: Option<*mut u8>,
    k: &[std::arch::x86_64::__m256i; 2],
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let p = p as *const __m256i;
    // SAFETY: 64 readable bytes at `p` (the caller's contract): two
    // 32-byte loads; loadu needs no alignment.
    let (x, y) = unsafe { (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))) };
    if let Some(c) = copy {
        let c = c as *mut __m256i;
        // SAFETY: 64 writable bytes at `c` (the caller's contract);
        // storeu needs no alignment.
        unsafe {
            _mm256_storeu_si256(c, x);
            _mm256_storeu_si256(c.add(1), y);
        }
    }
    // SAFETY: the CPU has VPCLMULQDQ and AVX2 (the caller's contract).
    unsafe {
        _mm256_xor_si256(
            _mm256_xor_si256(vpclmul::<false>(x, k[0]), vpclmul::<true>(x, k[0])),
            _mm256_xor_si256(vpclmul::<false>(y, k[1]), vpclmul::<true>(y, k[1])),
        )
    }
}

/// VPCLMULQDQ on 256-bit registers: in each 128-bit lane, the carry-less
/// product of the two even words (`ODD` false) or of the two odd ones.
/// Inline assembly, because the intrinsic needs a newer Rust than this
/// crate's minimum; the VEX form needs AVX, not AVX-512.
///
/// # Safety
/// The CPU must have AVX2 and VPCLMULQDQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn vpclmul<const ODD: bool>(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    let r;
    if ODD {
        // SAFETY: the CPU has VPCLMULQDQ (the caller's contract); the
        // instruction reads and writes registers only.
        unsafe {
            std::arch::asm!(
                "vpclmulqdq {r}, {a}, {b}, 0x11",
                r = lateout(ymm_reg) r, a = in(ymm_reg) a, b = in(ymm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    } else {
        // SAFETY: as above.
        unsafe {
            std::arch::asm!(
                "vpclmulqdq {r}, {a}, {b}, 0x00",
                r = lateout(ymm_reg) r, a = in(ymm_reg) a, b = in(ymm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    }
    r
}

/// The fingerprints of all guest pages, before they are cut into worker
/// parts (like [`super::shadow::ShadowStore`]).
#[derive(Debug)]
pub struct FingerprintStore {
    hasher: BlockHasher,
    page_size: usize,
    words: usize,
    /// Test hook: the block whose fingerprint never sees a change.
    blind: Option<(PageIndex, usize)>,
}

impl FingerprintStore {
    /// A store for `words` bitmap words of pages of `page_size` bytes (a
    /// multiple of [`BLOCK`]) under `hasher`. Nothing is allocated until
    /// [`FingerprintStore::parts`], and then lazily: untouched pages cost
    /// nothing resident.
    pub fn new(hasher: BlockHasher, page_size: usize, words: usize) -> FingerprintStore {
        FingerprintStore {
            hasher,
            page_size,
            words,
            blind: None,
        }
    }

    /// Test hook: from round 1 on (see [`FingerprintPart::start_round`]) the
    /// fingerprint of block `block` of `page` reports "unchanged" whatever
    /// its bytes become, as an undetected collision would (the verification
    /// must refuse the copy).
    #[doc(hidden)]
    pub fn blind_to(&mut self, page: PageIndex, block: usize) {
        self.blind = Some((page, block));
    }

    /// Bytes the store takes once every page was sent.
    pub fn bytes(&self) -> u64 {
        Share::of(self.words, 0, 1).pages() as u64 * (self.page_size / BLOCK * 8) as u64
    }

    /// Cuts the store into the parts of `n` workers (see [`Share`]). Each
    /// part's memory is populated now, before round 0 (see `populated`).
    pub fn parts(self, n: usize) -> Vec<FingerprintPart> {
        let blocks = self.page_size / BLOCK;
        (0..n)
            .map(|w| {
                let share = Share::of(self.words, w, n);
                FingerprintPart {
                    prints: populated(share.pages() * blocks),
                    fresh: vec![0u64; blocks],
                    changed: vec![0u64; blocks.div_ceil(64)],
                    blind: self.blind.and_then(|(p, b)| Some((share.local(p)?, b))),
                    blind_armed: false,
                    share,
                    blocks,
                    hasher: self.hasher.clone(),
                }
            })
            .collect()
    }
}

/// One worker's part of the fingerprint store, with its scratch buffers.
#[derive(Debug)]
pub struct FingerprintPart {
    share: Share,
    /// Blocks per page.
    blocks: usize,
    /// `blocks` fingerprints per page of the share.
    prints: Vec<u64>,
    /// The snapshot's fingerprints, while a page is compared.
    fresh: Vec<u64>,
    /// One bit per block of the last page compared: its fingerprint changed.
    changed: Vec<u64>,
    hasher: BlockHasher,
    /// Test hook, as a (local page, block) pair, and whether it acts.
    blind: Option<(usize, usize)>,
    blind_armed: bool,
}

impl FingerprintPart {
    /// A round begins (the test hook acts from round 1 on).
    pub fn start_round(&mut self, round: u32) {
        self.blind_armed = round > 0;
    }

    /// Hashes `snapshot`, the new bytes of page `page`, block by block;
    /// returns one bit per block (bit `b % 64` of word `b / 64`), set where
    /// the fingerprint differs from the one stored, and stores the new
    /// ones: the caller sends every marked block (or more), after which the
    /// destination holds blocks with exactly these fingerprints. `None`
    /// when the page is not in this part's share (nothing is stored).
    pub fn compare_and_store(&mut self, page: PageIndex, snapshot: &[u8]) -> Option<&[u64]> {
        let local = self.share.local(page)?;
        self.prints
            .get(local * self.blocks..(local + 1) * self.blocks)?;
        self.hasher.hash_blocks(snapshot, &mut self.fresh);
        Some(self.compare(local))
    }

    /// Copies the live page at `live` into `snapshot` (its length) and
    /// then does what [`FingerprintPart::compare_and_store`] does with the
    /// snapshot, in one pass over the page where the hasher can (see
    /// [`BlockHasher::copy_and_hash_blocks`]); the copy is made also when
    /// the page is not in this part's share.
    ///
    /// # Safety
    /// `live` must be readable for `snapshot.len()` bytes, which must not
    /// overlap `snapshot`.
    pub unsafe fn copy_compare_and_store(
        &mut self,
        page: PageIndex,
        live: *const u8,
        snapshot: &mut [u8],
    ) -> Option<&[u64]> {
        let mine = self
            .share
            .local(page)
            .filter(|l| self.prints.len() >= (l + 1) * self.blocks);
        let Some(local) = mine else {
            // SAFETY: our contract.
            unsafe { std::ptr::copy_nonoverlapping(live, snapshot.as_mut_ptr(), snapshot.len()) };
            return None;
        };
        // SAFETY: our contract.
        unsafe {
            self.hasher
                .copy_and_hash_blocks(live, snapshot, &mut self.fresh)
        };
        Some(self.compare(local))
    }

    /// Marks the blocks of local page `local` whose fresh fingerprint
    /// differs from the stored one, and stores the fresh ones.
    fn compare(&mut self, local: usize) -> &[u64] {
        let at = local * self.blocks;
        let stored = &mut self.prints[at..at + self.blocks];
        if let (Some((p, b)), true) = (self.blind, self.blind_armed) {
            if p == local && b < self.blocks {
                self.fresh[b] = stored[b];
            }
        }
        // Branch-free, a word of the mask at a time.
        for ((c, s), f) in self
            .changed
            .iter_mut()
            .zip(stored.chunks(64))
            .zip(self.fresh.chunks(64))
        {
            let mut m = 0u64;
            for (i, (s, f)) in s.iter().zip(f).enumerate() {
                m |= u64::from(s != f) << i;
            }
            *c = m;
        }
        stored.copy_from_slice(&self.fresh);
        &self.changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u64) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        let mut x = seed | 1;
        for c in b.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn field_arithmetic_is_sound() {
        // x · x⁶³ = x⁶⁴ ≡ x⁴ + x³ + x + 1.
        assert_eq!(gf_mul(2, 1 << 63), 0x1b);
        assert_eq!(gf_mul(0xdead_beef, 1), 0xdead_beef);
        let (a, b, c) = (
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0x5555_aaaa_3333_cccc,
        );
        assert_eq!(gf_mul(a, b), gf_mul(b, a), "commutative");
        assert_eq!(
            gf_mul(a, b ^ c),
            gf_mul(a, b) ^ gf_mul(a, c),
            "distributive"
        );
        assert_eq!(
            gf_mul(gf_mul(a, b), c),
            gf_mul(a, gf_mul(b, c)),
            "associative"
        );
        // Rabin's test, first half: x^(2⁶⁴) = x (the second half, that
        // gcd(x^(2³²) − x, modulus) = 1, was checked once by hand; together
        // they prove the modulus irreducible).
        let mut y = 2u64;
        for _ in 0..64 {
            y = gf_mul(y, y);
        }
        assert_eq!(y, 2);
        // No zero divisors among a few products (the modulus is irreducible).
        for x in [1u64, 3, 0x1b, u64::MAX, a, b] {
            assert_ne!(gf_mul(x, a), 0);
        }
    }

    #[test]
    fn the_hash_is_the_polynomial_on_every_path() {
        let k = 0x9e37_79b9_7f4a_7c15;
        let h = BlockHasher::with_key(k).unwrap();
        let b = block(7);
        // Horner's rule, written out: ((m₀k + m₁)k + …)k.
        let mut want = 0u64;
        for w in b.chunks_exact(8) {
            want = gf_mul(want ^ u64::from_le_bytes(w.try_into().unwrap()), k);
        }
        for path in HashPath::ALL {
            let Some(h) = h.clone().on(path) else {
                continue;
            };
            assert_eq!(h.hash_block(&b), want, "{path:?}");
            assert_eq!(h.hash_block(&[0; BLOCK]), 0, "zero block, zero store");
        }
        assert_eq!(h.path(), HashPath::detect());
        assert!(h.clone().on(HashPath::Portable).is_some());
        assert_eq!(h.clone().portable().path(), HashPath::Portable);
        assert!(BlockHasher::with_key(0).is_none());
    }

    #[test]
    fn every_path_agrees_bit_for_bit_on_random_data() {
        let h = BlockHasher::random().unwrap();
        let paths: Vec<BlockHasher> = HashPath::ALL
            .into_iter()
            .filter_map(|p| h.clone().on(p))
            .collect();
        eprintln!(
            "paths here: {:?}",
            paths.iter().map(BlockHasher::path).collect::<Vec<_>>()
        );
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).unwrap();
        let seed = u64::from_le_bytes(seed);
        // Every count up to a page and a bit: whole groups of four, two,
        // and every remainder; a ragged tail that is not hashed.
        let bytes: Vec<u8> = (0..70).flat_map(|i| block(seed ^ i)).collect();
        for n in 0..=70 {
            let bytes = &bytes[..(n * BLOCK + n % 3 * 8).min(bytes.len())];
            let want: Vec<u64> = bytes
                .chunks_exact(BLOCK)
                .map(|b| {
                    b.chunks_exact(8).fold(0, |acc, w| {
                        gf_mul(
                            acc ^ u64::from_le_bytes(w.try_into().unwrap()),
                            h.powers[WORDS - 1],
                        )
                    })
                })
                .collect();
            for p in &paths {
                let mut got = vec![!0u64; n + 1];
                p.hash_blocks(bytes, &mut got);
                assert_eq!(
                    got[..n],
                    want[..],
                    "{:?}, {n} blocks, seed {seed:#x}",
                    p.path()
                );
                assert_eq!(got[n], !0, "{:?} wrote past the blocks", p.path());
                // Copying and hashing in one pass: the same hashes, the
                // same bytes, the tail copied too.
                let mut copy = vec![0u8; bytes.len()];
                let mut again = vec![!0u64; n + 1];
                // SAFETY: `bytes` is readable for copy.len() bytes, a
                // separate allocation.
                unsafe { p.copy_and_hash_blocks(bytes.as_ptr(), &mut copy, &mut again) };
                assert_eq!(again, got, "{:?}, {n} blocks, copying", p.path());
                assert_eq!(copy, bytes, "{:?}, {n} blocks, the copy", p.path());
            }
        }
    }

    #[test]
    fn every_single_bit_flip_changes_the_hash() {
        let h = BlockHasher::random().unwrap();
        let b = block(99);
        let base = h.hash_block(&b);
        for bit in 0..BLOCK * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(h.hash_block(&c), base, "bit {bit}");
        }
    }

    #[test]
    fn compare_marks_changed_blocks_and_remembers_the_new_ones() {
        let ps = 4096;
        let mut store = FingerprintStore::new(BlockHasher::random().unwrap(), ps, 2);
        store.blind_to(PageIndex(70), 5);
        let mut parts = store.parts(2);
        let mut page = vec![0u8; ps];
        let p = PageIndex(3);
        assert_eq!(parts[0].compare_and_store(p, &page).unwrap(), &[0]);
        page[100] = 1;
        page[4095] = 2;
        assert_eq!(
            parts[0].compare_and_store(p, &page).unwrap(),
            &[(1 << 1) | (1 << 63)]
        );
        assert_eq!(parts[0].compare_and_store(p, &page).unwrap(), &[0], "sent");
        // Copying from the live page first: the same marks, the same store.
        let mut snapshot = vec![0u8; ps];
        page[200] = 3;
        // SAFETY: `page` is readable for ps bytes, a separate allocation.
        let marks = unsafe { parts[0].copy_compare_and_store(p, page.as_ptr(), &mut snapshot) };
        assert_eq!(marks.unwrap(), &[1 << 3]);
        assert_eq!(snapshot, page);
        assert_eq!(
            parts[0].compare_and_store(p, &page).unwrap(),
            &[0],
            "stored"
        );
        snapshot.fill(0);
        // SAFETY: as above.
        let other = unsafe { parts[1].copy_compare_and_store(p, page.as_ptr(), &mut snapshot) };
        assert!(other.is_none(), "not its page");
        assert_eq!(snapshot, page, "copied all the same");
        page[200] = 0;
        assert!(
            parts[1].compare_and_store(p, &page).is_none(),
            "not its page"
        );
        // The blind block: its change goes unseen from round 1, its
        // neighbour's does not.
        let q = PageIndex(70);
        parts[1].start_round(1);
        page[5 * 64] = 9;
        page[6 * 64] = 9;
        assert_eq!(
            parts[1].compare_and_store(q, &page).unwrap(),
            &[1 << 6 | 1 << 1 | 1 << 63]
        );
    }
}
