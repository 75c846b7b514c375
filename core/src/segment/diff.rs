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
//! The encoder's default path against a full shadow works on words
//! instead: [`Differ::copy_word_mask`] copies the live page and sets one
//! bit per 8-byte word that changed, in one pass (AVX2: a 256-bit compare
//! per four words); [`spans_from_words`] reads byte-exact spans off the
//! mask's runs, one step per run; and the mask itself is what a Words
//! record carries. The block scan below serves a version 3 peer.
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
/// Distance between the sampled blocks of a page of `len` bytes.
fn sample_stride(len: usize) -> usize {
    len / SAMPLES / BLOCK * BLOCK
}

/// Bytes one word of a word mask covers: 64 words.
const MASK_SPAN: usize = 64 * WORD;
/// The smallest merge gap with which [`spans_from_words`] gives the spans
/// [`Differ::diff`] gives: two neighbouring changed words leave at most 14
/// unchanged bytes between their changes, and such a gap always merges.
pub const WORD_RUN_MERGE_GAP: u32 = 2 * (WORD as u32 - 1);

/// How [`spans_from_words`] merges spans and when it gives up.
#[derive(Clone, Copy, Debug)]
pub struct SpanRule {
    /// Spans whose gap is at most this many bytes are merged.
    pub merge_gap: u32,
    /// What a span costs beyond its bytes (a record header).
    pub span_cost: u64,
    /// Give up once the spans cost this much.
    pub give_up: u64,
}

/// The spans of a page from its word mask ([`Differ::word_mask`] of the
/// same `old` and `new`): each run of changed words is one span, trimmed
/// to its first and last changed byte, and spans whose gap is at most
/// `rule.merge_gap` bytes are merged. With a merge gap of at least
/// [`WORD_RUN_MERGE_GAP`] these are exactly [`Differ::diff`]'s spans, found
/// with one step per run instead of a scan of the page. Gives up with
/// `None` once the spans cost at least `rule.give_up` (each
/// `rule.span_cost` plus its bytes); otherwise returns the bytes they cover.
#[inline(always)]
pub fn spans_from_words(
    old: &[u8],
    new: &[u8],
    mask: &[u64],
    rule: SpanRule,
    out: &mut Vec<Span>,
) -> Option<u32> {
    let SpanRule {
        merge_gap,
        span_cost,
        give_up,
    } = rule;
    out.clear();
    let (mut cost, mut covered) = (0u64, 0u32);
    for (w, &bits) in mask.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let first = bits.trailing_zeros();
            let run = (bits >> first).trailing_ones();
            let done = first + run;
            bits = if done >= 64 {
                0
            } else {
                bits & (!0u64 << done)
            };
            let (a, b) = (w * 64 + first as usize, w * 64 + done as usize - 1);
            // Little-endian loads: the lowest-addressed byte is the lowest bits.
            let head = load(old, a) ^ load(new, a);
            let tail = load(old, b) ^ load(new, b);
            let start = (a * WORD) as u32 + head.trailing_zeros() / 8;
            let end = ((b + 1) * WORD) as u32 - tail.leading_zeros() / 8;
            match out.last_mut() {
                Some(last) if start - last.end <= merge_gap => {
                    cost += u64::from(end - last.end);
                    covered += end - last.end;
                    last.end = end;
                }
                _ => {
                    cost += span_cost + u64::from(end - start);
                    covered += end - start;
                    out.push(Span { start, end });
                }
            }
            if cost >= give_up {
                return None;
            }
        }
    }
    Some(covered)
}

/// [`spans_from_words`] with single-instruction bit scans.
///
/// # Safety
/// The CPU must have BMI1, LZCNT and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi1,lzcnt,popcnt")]
unsafe fn spans_from_words_fast(
    old: &[u8],
    new: &[u8],
    mask: &[u64],
    rule: SpanRule,
    out: &mut Vec<Span>,
) -> Option<u32> {
    spans_from_words(old, new, mask, rule, out)
}

/// How many runs of set bits `mask` (bits in order across its words) has
/// once every gap of one or two clear bits between set bits is filled: with
/// a merge gap below 24 bytes, no fewer spans than this can cover the
/// changed words it marks (words three apart are at least 24 bytes apart).
#[inline(always)]
pub fn word_runs_lower_bound(mask: &[u64]) -> u32 {
    let get = |i: usize| mask.get(i).copied().unwrap_or(0);
    let mut runs = 0;
    let mut carry = 0u64;
    for (w, &m) in mask.iter().enumerate() {
        let before = if w == 0 { 0 } else { get(w - 1) };
        let after = get(w + 1);
        // Bit i of `prev_k` is bit i - k of the whole mask; `next_k`, i + k.
        let prev1 = (m << 1) | (before >> 63);
        let prev2 = (m << 2) | (before >> 62);
        let next1 = (m >> 1) | (after << 63);
        let next2 = (m >> 2) | (after << 62);
        let filled = m | (prev1 & (next1 | next2)) | (prev2 & next1);
        runs += (filled & !((filled << 1) | carry)).count_ones();
        carry = filled >> 63;
    }
    runs
}

/// [`word_runs_lower_bound`] with the POPCNT instruction.
///
/// # Safety
/// The CPU must have POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn word_runs_fast(mask: &[u64]) -> u32 {
    word_runs_lower_bound(mask)
}

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
    /// Uses AVX2 when this CPU has it (with POPCNT, BMI1 and LZCNT, which
    /// every AVX2 CPU has: the bit counts of the word path are single
    /// instructions then, not the baseline target's emulation).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Differ {
                avx2: std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("popcnt")
                    && std::is_x86_feature_detected!("bmi1")
                    && std::is_x86_feature_detected!("lzcnt"),
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
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said so.
            return unsafe { scan_avx2(old, new, merge_gap, limit, out) };
        }
        scan(old, new, merge_gap, limit, out, block_equal_words)
    }

    /// Sets in `mask` one bit per 8-byte word (bit `i % 64` of `mask[i /
    /// 64]`) where `new` differs from `old`, clears the rest, and returns how
    /// many bits it set. `old` and `new` have the same length, a multiple of
    /// 64; `mask` has at least one entry per 512 bytes. One pass of vector
    /// compares with AVX2: no per-block branch, whatever the density.
    pub fn word_mask(&self, old: &[u8], new: &[u8], mask: &mut [u64]) -> u32 {
        let len = old.len().min(new.len()) & !(BLOCK - 1);
        let (old, new) = (&old[..len], &new[..len]);
        mask.fill(0);
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said
            // so for AVX2 and POPCNT; the lengths are equal, a multiple of 64.
            return unsafe { word_mask_avx2(old, new, mask) };
        }
        let chunks = old.chunks(MASK_SPAN).zip(new.chunks(MASK_SPAN));
        let mut set = 0;
        for (m, (o, n)) in mask.iter_mut().zip(chunks) {
            *m = (0..o.len() / WORD).fold(0u64, |acc, i| {
                acc | u64::from(load(o, i) != load(n, i)) << i
            });
            set += m.count_ones();
        }
        set
    }

    /// Copies `snapshot.len()` bytes from `src` into `snapshot` and sets
    /// `mask` as [`Differ::word_mask`] of `old` and the copy would, in one
    /// pass: each 32 bytes is loaded once, stored, and compared from the
    /// register, so the mask describes exactly the bytes copied even if
    /// `src` changes meanwhile, and the live page and the shadow stream
    /// from memory side by side (as a memcmp's two inputs do) instead of
    /// one after the other. Returns the mask's count.
    ///
    /// With `dense_check`, returns `None` instead when the copy is
    /// [`Differ::dense`] against `old` (the mask is then not set): on a
    /// page of 4 KiB the sampled blocks are the first of each 512 bytes,
    /// and while every one so far is dense the pass copies the rest of
    /// the 512 without reading `old`, so a page that changed everywhere
    /// costs a copy and eight blocks of its shadow.
    ///
    /// # Safety
    /// `src` must be readable for `snapshot.len()` bytes, which must not
    /// overlap `snapshot`.
    pub unsafe fn copy_word_mask(
        &self,
        src: *const u8,
        snapshot: &mut [u8],
        old: &[u8],
        mask: &mut [u64],
        dense_check: bool,
    ) -> Option<u32> {
        let len = snapshot.len().min(old.len()) & !(BLOCK - 1);
        let in_pass = len == SAMPLES * MASK_SPAN && snapshot.len() == len;
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said
            // so for AVX2 and POPCNT; `src` is the caller's contract.
            let (set, dense) =
                unsafe { copy_word_mask_avx2(src, snapshot, old, mask, dense_check && in_pass) };
            if dense {
                return None;
            }
            if !dense_check || in_pass {
                return Some(set);
            }
            // Another page size: check the samples of the copy now.
            return (!self.dense(old, snapshot)).then_some(set);
        }
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, snapshot.as_mut_ptr(), snapshot.len()) };
        if dense_check && self.dense(old, snapshot) {
            return None;
        }
        Some(self.word_mask(old, snapshot, mask))
    }

    /// [`word_runs_lower_bound`], with POPCNT where the CPU has it.
    pub fn word_runs_lower_bound(&self, mask: &[u64]) -> u32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said
            // so for POPCNT too.
            return unsafe { word_runs_fast(mask) };
        }
        word_runs_lower_bound(mask)
    }

    /// [`spans_from_words`], with single-instruction bit scans where the
    /// CPU has them.
    pub fn spans_from_words(
        &self,
        old: &[u8],
        new: &[u8],
        mask: &[u64],
        rule: SpanRule,
        out: &mut Vec<Span>,
    ) -> Option<u32> {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said
            // so for BMI1, LZCNT and POPCNT too.
            return unsafe { spans_from_words_fast(old, new, mask, rule, out) };
        }
        spans_from_words(old, new, mask, rule, out)
    }

    /// Whether each of eight blocks spread evenly over `old` and `new`
    /// (equal lengths, a multiple of 64, at least `SAMPLES` blocks) differs
    /// in at least 48 bytes (of 64): a page that changed almost everywhere,
    /// recognised without reading the rest of it. False for a shorter page.
    pub fn dense(&self, old: &[u8], new: &[u8]) -> bool {
        let len = old.len().min(new.len()) & !(BLOCK - 1);
        len >= SAMPLES * BLOCK && self.dense_everywhere(&old[..len], &new[..len])
    }

    /// Whether each of [`SAMPLES`] blocks spread evenly over `old` and `new`
    /// (equal lengths, a multiple of 64, at least `SAMPLES` blocks) differs
    /// in at least [`DENSE`] bytes. Both comparators count exactly, so both
    /// answer alike.
    fn dense_everywhere(&self, old: &[u8], new: &[u8]) -> bool {
        let stride = sample_stride(old.len());
        (0..SAMPLES)
            .all(|i| self.block_dense(&old[i * stride..][..BLOCK], &new[i * stride..][..BLOCK]))
    }

    /// Whether two 64-byte blocks differ in at least [`DENSE`] bytes.
    fn block_dense(&self, a: &[u8], b: &[u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected!
            // said so, and both slices are 64 bytes.
            return unsafe { block_diff_mask_avx2(a, b) }.count_ones() >= DENSE;
        }
        block_diff_count_words(a, b) >= DENSE
    }

    /// True when every byte of `page` is zero.
    pub fn is_zero(&self, page: &[u8]) -> bool {
        let (blocks, tail) = page.split_at(page.len() & !(BLOCK - 1));
        if tail.iter().any(|&b| b != 0) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is true only when is_x86_feature_detected! said so.
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

/// [`Differ::word_mask`] with AVX2: four words per compare.
///
/// # Safety
/// The CPU must have AVX2 and POPCNT; `old` and `new` have the same length,
/// a multiple of 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn word_mask_avx2(old: &[u8], new: &[u8], mask: &mut [u64]) -> u32 {
    let mut set = 0;
    let chunks = old.chunks(MASK_SPAN).zip(new.chunks(MASK_SPAN));
    for (m, (o, n)) in mask.iter_mut().zip(chunks) {
        // SAFETY: AVX2 is enabled here (this function's contract); the
        // chunks have the same length, a multiple of 64.
        *m = unsafe { word_mask_span_avx2(o, n) };
        set += m.count_ones();
    }
    set
}

/// One mask word: a bit per 8-byte word of `old` and `new` (the same
/// length, at most 512 bytes, a multiple of 32), set where they differ.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn word_mask_span_avx2(o: &[u8], n: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    // Four bits per 32 bytes at `at`, set where a word is equal.
    #[inline(always)]
    fn equal4(o: &[u8], n: &[u8], at: usize) -> u64 {
        assert!(at + 32 <= o.len() && at + 32 <= n.len());
        // SAFETY: both reads are in bounds (asserted just above; the
        // callers' loops make it true, so it folds away); loadu has no
        // alignment requirement; AVX2 is enabled in the caller.
        unsafe {
            let e = _mm256_cmpeq_epi64(
                _mm256_loadu_si256(o.as_ptr().add(at) as *const __m256i),
                _mm256_loadu_si256(n.as_ptr().add(at) as *const __m256i),
            );
            _mm256_movemask_pd(_mm256_castsi256_pd(e)) as u64
        }
    }
    let mut equal = 0u64;
    if o.len() == MASK_SPAN && n.len() == MASK_SPAN {
        // A whole span, unrolled: constant shifts.
        for i in 0..MASK_SPAN / 32 {
            equal |= equal4(o, n, 32 * i) << (4 * i);
        }
    } else {
        let len = o.len().min(n.len()).min(MASK_SPAN);
        for i in 0..len / 32 {
            equal |= equal4(o, n, 32 * i) << (4 * i);
        }
        // Words past a short span (fewer than 64) are not there: not changed.
        equal |= !0u64 << (len / WORD);
    }
    !equal
}

/// [`Differ::copy_word_mask`] with AVX2; returns the mask's count and,
/// with `dense_check` (only for a page of [`SAMPLES`] mask spans), whether
/// the page is dense at every sample (then the mask is not set).
///
/// # Safety
/// The CPU must have AVX2 and POPCNT; `src` must be readable for
/// `snapshot.len()` bytes, which must not overlap `snapshot`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn copy_word_mask_avx2(
    src: *const u8,
    snapshot: &mut [u8],
    old: &[u8],
    mask: &mut [u64],
    dense_check: bool,
) -> (u32, bool) {
    use std::arch::x86_64::*;
    #[inline(always)]
    fn check(at: usize, n: usize, dst: &[u8], old: &[u8]) {
        assert!(at + n <= dst.len() && at + n <= old.len());
    }
    // The helpers have AVX2 enabled themselves: without it, an __m256i
    // passed or returned goes through memory (a memcpy call per store).
    // Copies the 32 bytes at `at` and returns them (what was stored).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn copy32(src: *const u8, dst: &mut [u8], at: usize) -> __m256i {
        // SAFETY: the callers checked `at + 32 <= dst.len()`; `src` is
        // readable as far as `dst` is long (the caller's contract);
        // loadu/storeu have no alignment requirement; AVX2 is enabled in
        // the caller.
        unsafe {
            let v = _mm256_loadu_si256(src.add(at) as *const __m256i);
            _mm256_storeu_si256(dst.as_mut_ptr().add(at) as *mut __m256i, v);
            v
        }
    }
    // Four bits, set where a word of `v` equals `old`'s at `at`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn equal4(v: __m256i, old: &[u8], at: usize) -> u64 {
        // SAFETY: the callers checked `at + 32 <= old.len()`; AVX2 as above.
        unsafe {
            let e = _mm256_cmpeq_epi64(
                v,
                _mm256_loadu_si256(old.as_ptr().add(at) as *const __m256i),
            );
            _mm256_movemask_pd(_mm256_castsi256_pd(e)) as u64
        }
    }
    // Differing bytes of 32.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    unsafe fn differ32(v: __m256i, old: &[u8], at: usize) -> u32 {
        // SAFETY: as for `equal4`.
        unsafe {
            let e = _mm256_cmpeq_epi8(
                v,
                _mm256_loadu_si256(old.as_ptr().add(at) as *const __m256i),
            );
            32 - (_mm256_movemask_epi8(e) as u32).count_ones()
        }
    }
    let len = snapshot.len().min(old.len()) & !(BLOCK - 1);
    mask.fill(0);
    // While every sampled block so far is dense, spans after their first
    // block are copied without a compare: `unmasked` of them so far.
    let mut dense = dense_check;
    let mut unmasked = 0;
    for k in 0..mask.len() {
        let base = k * MASK_SPAN;
        if base >= len {
            break;
        }
        let span = (len - base).min(MASK_SPAN);
        if dense && span == MASK_SPAN {
            check(base, BLOCK, snapshot, old);
            // SAFETY: checked just above.
            let (lo, hi) = unsafe {
                (
                    copy32(src, snapshot, base),
                    copy32(src, snapshot, base + 32),
                )
            };
            // SAFETY: as above.
            let differ = unsafe { differ32(lo, old, base) + differ32(hi, old, base + 32) };
            if differ >= DENSE {
                for at in (base + BLOCK..base + MASK_SPAN).step_by(32) {
                    check(at, 32, snapshot, old);
                    // SAFETY: checked just above.
                    unsafe { copy32(src, snapshot, at) };
                }
                unmasked = k + 1;
                continue;
            }
            // Not dense after all: mask the spans copied unmasked, from the
            // copy, then this one as any other (its first block again).
            dense = false;
            for (m, (o, n)) in mask[..unmasked]
                .iter_mut()
                .zip(old.chunks(MASK_SPAN).zip(snapshot.chunks(MASK_SPAN)))
            {
                // SAFETY: AVX2 and POPCNT are enabled here (this function's
                // contract); the chunks are whole spans of equal length.
                *m = unsafe { word_mask_span_avx2(o, n) };
            }
        }
        let mut equal = 0u64;
        if span == MASK_SPAN {
            check(base, MASK_SPAN, snapshot, old);
            for i in 0..MASK_SPAN / 32 {
                // SAFETY: checked just above.
                equal |=
                    unsafe { equal4(copy32(src, snapshot, base + 32 * i), old, base + 32 * i) }
                        << (4 * i);
            }
        } else {
            for i in 0..span / 32 {
                check(base + 32 * i, 32, snapshot, old);
                // SAFETY: checked just above.
                equal |=
                    unsafe { equal4(copy32(src, snapshot, base + 32 * i), old, base + 32 * i) }
                        << (4 * i);
            }
            // Words past a short span (fewer than 64) are not there.
            equal |= !0u64 << (span / WORD);
        }
        mask[k] = !equal;
    }
    // Bytes past the masked length (none for a page) are copied too.
    if len < snapshot.len() {
        // SAFETY: `src` is readable for snapshot.len() bytes (the contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.add(len),
                snapshot.as_mut_ptr().add(len),
                snapshot.len() - len,
            )
        };
    }
    if dense {
        return (0, true);
    }
    (mask.iter().map(|m| m.count_ones()).sum(), false)
}

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
    fn the_run_bound_fills_gaps_of_one_or_two_words_only() {
        // Bits 0, 2 (gap 1), 5 (gap 2), 9 (gap 3), across a word: 63 and 65.
        let mut mask = [0u64; 2];
        for b in [0usize, 2, 5, 9, 63, 65] {
            mask[b / 64] |= 1 << (b % 64);
        }
        assert_eq!(word_runs_lower_bound(&mask), 3);
        assert_eq!(word_runs_lower_bound(&[0, 0]), 0);
        assert_eq!(word_runs_lower_bound(&[!0, !0]), 1);
        assert_eq!(word_runs_lower_bound(&[0x5555_5555_5555_5555; 2]), 1);
        assert_eq!(word_runs_lower_bound(&[0x1111_1111_1111_1111; 2]), 32);
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

        /// The word mask marks exactly the words with a changed byte,
        /// with either comparator, on a page of more than one mask word.
        #[test]
        fn word_mask_marks_exactly_the_changed_words(
            old in proptest::collection::vec(any::<u8>(), 1536),
            edits in proptest::collection::vec((0usize..1536, 1u8..=255), 0..300),
            len in 0usize..3,
        ) {
            let mut new = old.clone();
            for (i, x) in edits { new[i] ^= x; }
            // Whole mask words, and a short last one (576 = 512 + 64).
            let len = [64, 576, 1536][len];
            let (old, new) = (&old[..len], &new[..len]);
            let mut want = [0u64; 3];
            for w in 0..len / 8 {
                if old[w * 8..w * 8 + 8] != new[w * 8..w * 8 + 8] {
                    want[w / 64] |= 1 << (w % 64);
                }
            }
            for d in [Differ::portable(), Differ::detect()] {
                let mut mask = [!0u64; 3];
                let set = d.word_mask(old, new, &mut mask);
                prop_assert_eq!(mask, want);
                prop_assert_eq!(set, want.iter().map(|m| m.count_ones()).sum::<u32>());
            }
        }

        /// Spans read off the word mask are the byte scan's spans, and
        /// give up exactly when their cost reaches the limit; the run
        /// bound never exceeds their count.
        #[test]
        fn spans_from_words_are_the_scans_spans(
            old in proptest::collection::vec(any::<u8>(), 1024),
            edits in proptest::collection::vec((0usize..1024, 1u8..=255, 1usize..20), 0..60),
            gap in WORD_RUN_MERGE_GAP..40,
            give_up in 0u64..3000,
        ) {
            let mut new = old.clone();
            for (at, x, len) in edits {
                for b in &mut new[at..(at + len).min(1024)] { *b ^= x; }
            }
            let want = naive(&old, &new, gap);
            let mut mask = [0u64; 2];
            Differ::detect().word_mask(&old, &new, &mut mask);
            let mut out = Vec::new();
            let cost: u64 = want.iter().map(|s| 16 + u64::from(s.len())).sum();
            for d in [Differ::portable(), Differ::detect()] {
                let rule = |give_up| SpanRule { merge_gap: gap, span_cost: 16, give_up };
                let all = d.spans_from_words(&old, &new, &mask, rule(u64::MAX), &mut out);
                prop_assert_eq!(&out, &want);
                prop_assert_eq!(all, Some(want.iter().map(Span::len).sum::<u32>()));
                let limited = d.spans_from_words(&old, &new, &mask, rule(give_up), &mut out);
                prop_assert_eq!(limited.is_none(), cost >= give_up);
                prop_assert_eq!(d.word_runs_lower_bound(&mask), word_runs_lower_bound(&mask));
            }
            prop_assert_eq!(
                spans_from_words(
                    &old,
                    &new,
                    &mask,
                    SpanRule { merge_gap: gap, span_cost: 16, give_up: u64::MAX },
                    &mut out
                ),
                Some(want.iter().map(Span::len).sum::<u32>())
            );
            if gap < 24 {
                prop_assert!(word_runs_lower_bound(&mask) as usize <= want.len());
            }
        }

        /// Copying and masking in one pass gives the copy, and what
        /// `dense` then `word_mask` of the copy give, with either
        /// comparator: on 4 KiB pages (the in-pass dense check; samples
        /// dense or nearly, in every pattern) and on other lengths.
        #[test]
        fn copy_word_mask_is_a_copy_then_the_mask(
            old in proptest::collection::vec(any::<u8>(), 4096),
            samples in proptest::collection::vec((40usize..=64, 1u8..=255), SAMPLES),
            edits in proptest::collection::vec((0usize..4096, 1u8..=255), 0..200),
            len in 0usize..3,
            dense_check in any::<bool>(),
        ) {
            let len = [4096, 1024, 576][len];
            let old = &old[..len];
            let mut new = old.to_vec();
            let stride = sample_stride(len);
            for (i, (n, x)) in samples.into_iter().enumerate() {
                for b in &mut new[i * stride..i * stride + n] { *b ^= x; }
            }
            for (at, x) in edits { if at < len { new[at] ^= x; } }
            for d in [Differ::portable(), Differ::detect()] {
                let mut want_mask = [0u64; 8];
                let want_set = d.word_mask(old, &new, &mut want_mask);
                let want = if dense_check && d.dense(old, &new) { None } else { Some(want_set) };
                let mut snapshot = vec![0u8; len];
                let mut mask = [!0u64; 8];
                // SAFETY: `new` is `len` bytes, `snapshot` a buffer of its own.
                let got = unsafe {
                    d.copy_word_mask(new.as_ptr(), &mut snapshot, old, &mut mask, dense_check)
                };
                prop_assert_eq!(&snapshot, &new);
                prop_assert_eq!(got, want);
                if got.is_some() {
                    prop_assert_eq!(mask, want_mask);
                }
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
