//! Diff: find the byte spans where a page snapshot differs from its shadow.
//!
//! The scan compares 64-byte blocks and only looks inside a block when it
//! differs. With AVX2 (detected at run time) one byte compare of the block's
//! two vectors gives a 64-bit mask of its differing bytes, and the spans are
//! read off the mask's runs of ones with trailing-zero counts: a block that
//! changed whole is one step, not eight. Without AVX2 it goes a word at a
//! time and trims each differing word to its first and last differing
//! byte. Either way a span is exact to the byte. Two spans whose gap is at most `merge_gap`
//! bytes are merged: sending the gap costs less than a new segment header.
//!
//! A page that changed almost everywhere goes whole without a diff: when a
//! diff may give up (a cost limit below the page's size), it first compares
//! eight blocks spread evenly over the page, and if each differs in at
//! least three quarters of its bytes the page goes whole. Such a page's
//! spans nearly always cost more than the limit, and the rest of its shadow
//! is not read: that read was most of the work at 100 % changed (the `diff`
//! bench: 0.57x memcmp's rate with it, 0.79x without). The price, in the
//! rare page whose changes hit exactly the sampled blocks and little else,
//! is bytes, never correctness: a whole page is always a valid encoding,
//! and at worst it costs a page where eight dense segments would have
//! cost at least 8 x (48 + a header).

/// A half-open byte range `[start, end)` inside one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

const BLOCK: usize = 64;
/// Blocks sampled, evenly spread, to recognise a page that changed almost
/// everywhere.
const SAMPLES: usize = 8;
/// Differing bytes (of 64) that make a sampled block dense.
const DENSE: u32 = 48;
const WORD: usize = 8;
/// Gaps inside one word are never split.
pub const MIN_MERGE_GAP: u32 = (WORD - 1) as u32;

/// The block comparator chosen once for this host.
#[derive(Clone, Copy, Debug)]
pub struct Differ {
    avx2: bool,
}

impl Default for Differ {
    fn default() -> Self {
        Self::detect()
    }
}

impl Differ {
    /// Uses AVX2 when this CPU has it.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Differ {
                avx2: std::is_x86_feature_detected!("avx2"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Differ { avx2: false }
        }
    }

    /// The portable word-at-a-time comparator, whatever the CPU has.
    pub fn portable() -> Self {
        Differ { avx2: false }
    }

    pub fn uses_avx2(&self) -> bool {
        self.avx2
    }

    /// Appends to `out` (cleared first) the spans where `new` differs from
    /// `old`, merged across gaps of at most `merge_gap` bytes, and returns the
    /// bytes they cover. `old` and `new` must have the same length, a multiple
    /// of 64 (every page size is). No allocation once `out` has grown.
    pub fn diff(&self, old: &[u8], new: &[u8], merge_gap: u32, out: &mut Vec<Span>) -> u32 {
        let limit = Limit {
            span_cost: 0,
            max_cost: u64::MAX,
        };
        self.diff_limited(old, new, merge_gap, limit, out)
            .unwrap_or(0)
    }

    /// Like [`Differ::diff`], but gives up with `None` as soon as the spans
    /// found so far cost more than `limit.max_cost` (each span costs
    /// `limit.span_cost` plus its length): such a page goes whole, and the
    /// rest of it need not be scanned. Where the limit is below the page's
    /// length it also gives up, before scanning, on a page whose eight
    /// evenly spread sample blocks each differ in at least 48 of their 64
    /// bytes (see the module's doc).
    pub fn diff_limited(
        &self,
        old: &[u8],
        new: &[u8],
        merge_gap: u32,
        limit: Limit,
        out: &mut Vec<Span>,
    ) -> Option<u32> {
        out.clear();
        let merge_gap = merge_gap.max(MIN_MERGE_GAP);
        let len = old.len().min(new.len()) & !(BLOCK - 1);
        let (old, new) = (&old[..len], &new[..len]);
        if limit.max_cost < len as u64 && len >= SAMPLES * BLOCK && self.dense_everywhere(old, new)
        {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected!("avx2") said so.
            return unsafe { scan_avx2(old, new, merge_gap, limit, out) };
        }
        scan(old, new, merge_gap, limit, out, block_equal_words)
    }

    /// Whether each of [`SAMPLES`] blocks spread evenly over `old` and `new`
    /// (equal lengths, a multiple of 64, at least `SAMPLES` blocks) differs
    /// in at least [`DENSE`] bytes. Both comparators count exactly, so both
    /// answer alike.
    fn dense_everywhere(&self, old: &[u8], new: &[u8]) -> bool {
        let stride = old.len() / SAMPLES / BLOCK * BLOCK;
        (0..SAMPLES).all(|i| {
            let (a, b) = (&old[i * stride..][..BLOCK], &new[i * stride..][..BLOCK]);
            #[cfg(target_arch = "x86_64")]
            if self.avx2 {
                // SAFETY: `avx2` is true only when is_x86_feature_detected!("avx2")
                // said so, and both slices are 64 bytes.
                return unsafe { block_diff_mask_avx2(a, b) }.count_ones() >= DENSE;
            }
            block_diff_count_words(a, b) >= DENSE
        })
    }

    /// True when every byte of `page` is zero.
    pub fn is_zero(&self, page: &[u8]) -> bool {
        let (blocks, tail) = page.split_at(page.len() & !(BLOCK - 1));
        if tail.iter().any(|&b| b != 0) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected!("avx2") said so.
            return unsafe { zero_avx2(blocks) };
        }
        blocks
            .chunks_exact(BLOCK)
            .all(|b| block_equal_words(b, &ZERO_BLOCK))
    }
}

/// When to stop diffing a page that is going whole anyway.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// What one more span costs beyond its bytes (a record header).
    pub span_cost: u64,
    /// Give up once the spans cost more than this.
    pub max_cost: u64,
}

/// The page scan, generic over the block comparator so that each target's
/// comparator is inlined into its own copy of the loop.
#[inline(always)]
fn scan(
    old: &[u8],
    new: &[u8],
    merge_gap: u32,
    limit: Limit,
    out: &mut Vec<Span>,
    equal: impl Fn(&[u8], &[u8]) -> bool,
) -> Option<u32> {
    let mut block = 0;
    let mut cost = 0u64;
    while block < old.len() {
        let o = &old[block..block + BLOCK];
        let n = &new[block..block + BLOCK];
        if !equal(o, n) {
            cost += words_diff(o, n, block as u32, merge_gap, limit.span_cost, out);
            if cost > limit.max_cost {
                return None;
            }
        }
        block += BLOCK;
    }
    Some(out.iter().map(Span::len).sum())
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(
    old: &[u8],
    new: &[u8],
    merge_gap: u32,
    limit: Limit,
    out: &mut Vec<Span>,
) -> Option<u32> {
    let mut block = 0;
    let mut cost = 0u64;
    while block < old.len() {
        // SAFETY: AVX2 is present (this function's contract) and both
        // slices are 64 bytes (`old.len()` is a multiple of 64).
        let mask =
            unsafe { block_diff_mask_avx2(&old[block..block + BLOCK], &new[block..block + BLOCK]) };
        if mask != 0 {
            cost += runs_diff(mask, block as u32, merge_gap, limit.span_cost, out);
            if cost > limit.max_cost {
                return None;
            }
        }
        block += BLOCK;
    }
    Some(out.iter().map(Span::len).sum())
}

/// One bit per byte of a 64-byte block, set where `a` and `b` differ.
///
/// # Safety
/// The CPU must have AVX2 and both slices must be 64 bytes long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_diff_mask_avx2(a: &[u8], b: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr() as *const __m256i, b.as_ptr() as *const __m256i);
    // SAFETY: the caller passes two 64-byte slices, so both 32-byte halves of
    // each are in bounds; loadu has no alignment requirement.
    let (lo, hi) = unsafe {
        (
            _mm256_cmpeq_epi8(_mm256_loadu_si256(pa), _mm256_loadu_si256(pb)),
            _mm256_cmpeq_epi8(_mm256_loadu_si256(pa.add(1)), _mm256_loadu_si256(pb.add(1))),
        )
    };
    let equal = u64::from(_mm256_movemask_epi8(lo) as u32)
        | (u64::from(_mm256_movemask_epi8(hi) as u32) << 32);
    !equal
}

/// The spans of one block from its mask of differing bytes (bit i: byte
/// `base + i`), merged with the spans before them as [`words_diff`] does;
/// returns what it added to the spans' cost.
#[inline(always)]
fn runs_diff(mut mask: u64, base: u32, merge_gap: u32, span_cost: u64, out: &mut Vec<Span>) -> u64 {
    let mut added = 0u64;
    while mask != 0 {
        let first = mask.trailing_zeros();
        // Ones from `first` on: the zeros of the inverted, shifted mask.
        let run = (!(mask >> first)).trailing_zeros();
        let (start, end) = (base + first, base + first + run);
        match out.last_mut() {
            Some(last) if start - last.end <= merge_gap => {
                added += u64::from(end - last.end);
                last.end = end;
            }
            _ => {
                added += span_cost + u64::from(end - start);
                out.push(Span { start, end });
            }
        }
        let done = first + run;
        mask = if done >= 64 {
            0
        } else {
            mask & (!0u64 << done)
        };
    }
    added
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn zero_avx2(blocks: &[u8]) -> bool {
    blocks.chunks_exact(BLOCK).all(|b| {
        // SAFETY: AVX2 is present (this function's contract) and every chunk is 64 bytes.
        unsafe { block_equal_avx2(b, &ZERO_BLOCK) }
    })
}

static ZERO_BLOCK: [u8; BLOCK] = [0; BLOCK];

#[inline(always)]
fn load(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; WORD];
    w.copy_from_slice(&b[i * WORD..(i + 1) * WORD]);
    u64::from_le_bytes(w)
}

/// How many bytes of two 64-byte blocks differ, a word at a time.
fn block_diff_count_words(a: &[u8], b: &[u8]) -> u32 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    (0..BLOCK / WORD)
        .map(|i| {
            let x = load(a, i) ^ load(b, i);
            // A byte's top bit ends up set iff the byte is non-zero: its low
            // seven bits plus 0x7f carry into it (never past it), or it was set.
            ((((x & LOW7) + LOW7) | x) & !LOW7).count_ones()
        })
        .sum()
}

#[inline(always)]
fn block_equal_words(a: &[u8], b: &[u8]) -> bool {
    let mut acc = 0u64;
    for i in 0..BLOCK / WORD {
        acc |= load(a, i) ^ load(b, i);
    }
    acc == 0
}

/// # Safety
/// The CPU must have AVX2 and both slices must be 64 bytes long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_equal_avx2(a: &[u8], b: &[u8]) -> bool {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr() as *const __m256i, b.as_ptr() as *const __m256i);
    // SAFETY: the caller passes two 64-byte slices, so both 32-byte halves of
    // each are in bounds; loadu has no alignment requirement.
    let x = unsafe {
        _mm256_or_si256(
            _mm256_xor_si256(_mm256_loadu_si256(pa), _mm256_loadu_si256(pb)),
            _mm256_xor_si256(_mm256_loadu_si256(pa.add(1)), _mm256_loadu_si256(pb.add(1))),
        )
    };
    _mm256_testz_si256(x, x) == 1
}

/// Word-level scan of one differing block starting at byte `base`; returns
/// what it added to the spans' cost (bytes, plus `span_cost` per new span).
#[inline(never)]
fn words_diff(
    old: &[u8],
    new: &[u8],
    base: u32,
    merge_gap: u32,
    span_cost: u64,
    out: &mut Vec<Span>,
) -> u64 {
    let mut added = 0u64;
    for i in 0..BLOCK / WORD {
        let x = load(old, i) ^ load(new, i);
        if x == 0 {
            continue;
        }
        // Little-endian load: the lowest-addressed byte is the lowest bits.
        let start = base + (i * WORD) as u32 + x.trailing_zeros() / 8;
        let end = base + ((i + 1) * WORD) as u32 - x.leading_zeros() / 8;
        match out.last_mut() {
            Some(last) if start - last.end <= merge_gap => {
                added += u64::from(end - last.end);
                last.end = end;
            }
            _ => {
                added += span_cost + u64::from(end - start);
                out.push(Span { start, end });
            }
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(old: &[u8], new: &[u8], gap: u32) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        for i in 0..old.len() {
            if old[i] != new[i] {
                let i = i as u32;
                match out.last_mut() {
                    Some(l) if i - l.end <= gap => l.end = i + 1,
                    _ => out.push(Span {
                        start: i,
                        end: i + 1,
                    }),
                }
            }
        }
        out
    }

    #[test]
    fn single_byte_changes_are_exact() {
        let old = vec![0u8; 4096];
        for pos in [0usize, 1, 7, 8, 63, 64, 4095] {
            let mut new = old.clone();
            new[pos] = 1;
            for d in [Differ::portable(), Differ::detect()] {
                let mut out = Vec::new();
                assert_eq!(d.diff(&old, &new, 16, &mut out), 1);
                assert_eq!(
                    out,
                    vec![Span {
                        start: pos as u32,
                        end: pos as u32 + 1
                    }]
                );
            }
        }
    }

    #[test]
    fn gaps_up_to_merge_gap_are_merged() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[100] = 1;
        new[117] = 1; // gap of 16 bytes: 101..117
        new[200] = 1; // gap of 82
        let mut out = Vec::new();
        Differ::detect().diff(&old, &new, 16, &mut out);
        assert_eq!(
            out,
            vec![
                Span {
                    start: 100,
                    end: 118
                },
                Span {
                    start: 200,
                    end: 201
                }
            ]
        );
        Differ::detect().diff(&old, &new, 15, &mut out);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(Differ::detect().is_zero(&p));
        assert!(Differ::portable().is_zero(&p));
        p[4095] = 9;
        assert!(!Differ::detect().is_zero(&p));
        assert!(!Differ::portable().is_zero(&p));
    }

    /// A page whose eight sampled blocks (one per 512 bytes) each changed
    /// in 48 of their bytes goes whole at once, though its exact spans
    /// would cost less than the limit; with one sample short of dense, or
    /// with no limit, it is diffed exactly.
    #[test]
    fn a_page_dense_at_every_sample_goes_whole_without_a_diff() {
        let old = vec![0u8; 4096];
        let dense = |skip: Option<usize>| {
            let mut new = old.clone();
            for i in 0..SAMPLES {
                let bytes = if Some(i) == skip { DENSE - 1 } else { DENSE };
                new[i * 512..i * 512 + bytes as usize].fill(0xa5);
            }
            new
        };
        let limit = Limit {
            span_cost: 16,
            max_cost: 3700,
        };
        for d in [Differ::portable(), Differ::detect()] {
            let mut out = Vec::new();
            // Exact, it would be 8 spans costing 8 x (16 + 48) = 512.
            assert_eq!(
                d.diff_limited(&old, &dense(None), 16, limit, &mut out),
                None,
                "{d:?}"
            );
            let covered = d.diff_limited(&old, &dense(Some(3)), 16, limit, &mut out);
            assert_eq!(covered, Some(7 * DENSE + DENSE - 1), "{d:?}");
            assert_eq!(out.len(), 8);
            assert_eq!(d.diff(&old, &dense(None), 16, &mut out), 8 * DENSE);
        }
    }

    #[test]
    fn the_word_count_of_differing_bytes_is_exact() {
        let a = [0u8; BLOCK];
        let mut b = [0u8; BLOCK];
        assert_eq!(block_diff_count_words(&a, &b), 0);
        for (i, v) in [0x01u8, 0x80, 0x7f, 0xff, 0x10].into_iter().enumerate() {
            b[i * 13] = v;
        }
        assert_eq!(block_diff_count_words(&a, &b), 5);
        b.fill(0xff);
        assert_eq!(block_diff_count_words(&a, &b), 64);
    }

    proptest! {
        /// Pages dense or nearly dense at the sampled blocks (runs of
        /// 40-64 changed bytes at each, across the 48-byte threshold):
        /// both comparators give up alike, and agree on the spans where
        /// they do not.
        #[test]
        fn both_comparators_agree_at_the_dense_threshold(
            old in proptest::collection::vec(any::<u8>(), 1024),
            runs in proptest::collection::vec((40usize..=64, 1u8..=255), SAMPLES),
            max_cost in 0u64..1024,
        ) {
            let mut new = old.clone();
            for (i, (len, x)) in runs.into_iter().enumerate() {
                for b in &mut new[i * 128..i * 128 + len] {
                    *b ^= x;
                }
            }
            let limit = Limit { span_cost: 16, max_cost };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let x = Differ::portable().diff_limited(&old, &new, 16, limit, &mut a);
            let y = Differ::detect().diff_limited(&old, &new, 16, limit, &mut b);
            prop_assert_eq!(x, y);
            if x.is_some() {
                prop_assert_eq!(a, b);
            }
        }

        #[test]
        fn matches_a_byte_by_byte_reference(
            old in proptest::collection::vec(any::<u8>(), 1024),
            edits in proptest::collection::vec((0usize..1024, any::<u8>()), 0..40),
            gap in MIN_MERGE_GAP..40,
        ) {
            let mut new = old.clone();
            for (i, v) in edits { new[i] = v; }
            let want = naive(&old, &new, gap);
            for d in [Differ::portable(), Differ::detect()] {
                let mut out = Vec::new();
                let covered = d.diff(&old, &new, gap, &mut out);
                prop_assert_eq!(&out, &want);
                prop_assert_eq!(covered, want.iter().map(Span::len).sum::<u32>());
            }
        }

        #[test]
        fn both_scans_give_up_at_the_same_limit(
            old in proptest::collection::vec(any::<u8>(), 1024),
            edits in proptest::collection::vec((0usize..1024, any::<u8>()), 0..200),
            gap in MIN_MERGE_GAP..40,
            span_cost in 0u64..32,
            max_cost in 0u64..1500,
        ) {
            let mut new = old.clone();
            for (i, v) in edits { new[i] = v; }
            let limit = Limit { span_cost, max_cost };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let x = Differ::portable().diff_limited(&old, &new, gap, limit, &mut a);
            let y = Differ::detect().diff_limited(&old, &new, gap, limit, &mut b);
            prop_assert_eq!(x, y);
            if x.is_some() {
                prop_assert_eq!(a, b);
            }
        }
    }
}
