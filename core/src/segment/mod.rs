//! The paper's method: a dirty page becomes dirty offset segments.
//!
//! For each dirty page a worker copies the live page once into a snapshot,
//! asks [`PageEncoder::plan`] how to send it, writes the records with
//! [`PageEncoder::write`] (payloads cut from the snapshot) and brings the
//! shadow up to date with [`PageEncoder::update_shadow`] (from the same
//! snapshot). The plan is the cheapest of:
//!
//! - nothing, when the snapshot equals the shadow (a write that put the old
//!   value back, or a page dirtied by a write of the same bytes);
//! - a zero marker (header only), when the page became all zero;
//! - segments `(page, offset, length)`, one header each, gaps of up to one
//!   header merged ([`diff`]);
//! - the page's changed 8-byte words behind one header and a mask (a
//!   Words record, protocol version 4), when that costs less than the
//!   segments: changes scattered over the page (at 10 % of its bytes in
//!   8-byte writes, ~45 segments cost ~45 headers, the words a 64-byte mask);
//! - the whole page ("wide"), when the cheaper of those would cost at least
//!   `wide_percent` % of a whole-page record: then one record beats many.
//!
//! Against a full shadow the worker copies the live page and finds its
//! changed words in one vector pass ([`PageEncoder::copy_and_plan`],
//! [`diff::Differ::copy_word_mask`]), prices the Words
//! record from the mask's count, and reads the segments off the mask's runs
//! only while they can still be cheaper ([`diff::spans_from_words`], stopped
//! early by [`diff::word_runs_lower_bound`]): no per-span work on a page
//! that goes as words.
//!
//! With a fingerprint store instead of a shadow ([`fingerprint`]), the
//! spans are whole 64-byte blocks whose fingerprint changed
//! ([`PageEncoder::plan_blocks`]); the choice between nothing, zero,
//! segments and whole is the same.
//!
//! [`Granularity::Page`] is classic pre-copy (every dirty page whole, zero
//! pages as markers) so both methods can be compared on the same run.

pub mod compress;
pub mod diff;
pub mod fingerprint;
pub mod shadow;

use crate::protocol::{words_mask_len, Granularity, Header, Kind, HEADER_LEN, WORD_LEN};
use diff::{Differ, Limit, Span};

/// How pages are encoded.
#[derive(Clone, Copy, Debug)]
pub struct EncoderConfig {
    pub granularity: Granularity,
    /// Gaps of at most this many bytes join two segments (default: one header).
    pub merge_gap: u32,
    /// A page whose segments cost at least this percentage of a whole-page
    /// record goes whole.
    pub wide_percent: u32,
    /// Words records may be sent (the peer speaks protocol version 4).
    pub words: bool,
}

impl EncoderConfig {
    pub fn new(granularity: Granularity) -> Self {
        EncoderConfig {
            granularity,
            merge_gap: HEADER_LEN as u32,
            wide_percent: 90,
            words: true,
        }
    }
}

/// How one dirty page will be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Unchanged,
    Zero,
    Whole,
    /// The spans are in the encoder until the next `plan`.
    Segments {
        count: u32,
        covered: u32,
    },
    /// One Words record with `count` changed 8-byte words; the mask is in
    /// the encoder until the next `plan`.
    Words {
        count: u32,
    },
}

/// Per-worker page encoder: owns the span buffer, reused for every page.
#[derive(Debug)]
pub struct PageEncoder {
    cfg: EncoderConfig,
    differ: Differ,
    spans: Vec<Span>,
    /// The last full-shadow plan's changed words (see [`Differ::word_mask`]).
    mask: Vec<u64>,
    page_size: usize,
}

impl PageEncoder {
    pub fn new(cfg: EncoderConfig, page_size: usize) -> Self {
        Self::with_differ(cfg, page_size, Differ::detect())
    }

    pub fn with_differ(cfg: EncoderConfig, page_size: usize, differ: Differ) -> Self {
        PageEncoder {
            cfg,
            differ,
            spans: Vec::with_capacity(page_size / 16),
            mask: vec![0; (page_size / WORD_LEN).div_ceil(64)],
            page_size,
        }
    }

    pub fn granularity(&self) -> Granularity {
        self.cfg.granularity
    }

    /// The spans of the last `Segments` plan.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Decides how to send `snapshot`, given the destination's copy
    /// (`shadow`, or `None` when the page has no shadow and must go whole).
    pub fn plan(&mut self, snapshot: &[u8], shadow: Option<&[u8]>) -> Plan {
        let shadow = match (self.cfg.granularity, shadow) {
            (Granularity::Segment, Some(s)) => s,
            _ => {
                return if self.differ.is_zero(snapshot) {
                    Plan::Zero
                } else {
                    Plan::Whole
                };
            }
        };
        let merge_gap = self.cfg.merge_gap.max(diff::MIN_MERGE_GAP);
        if !self.cfg.words || merge_gap < diff::WORD_RUN_MERGE_GAP {
            return self.plan_scan(snapshot, shadow);
        }
        let len = self.page_size.min(shadow.len()).min(snapshot.len());
        let (old, new) = (&shadow[..len], &snapshot[..len]);
        if self.wide_at() < len as u64 && self.differ.dense(old, new) {
            return self.zero_or_whole(snapshot);
        }
        let changed = self.differ.word_mask(old, new, &mut self.mask);
        self.plan_words(snapshot, shadow, changed)
    }

    /// Copies the live page at `live` into `snapshot` and plans it against
    /// `shadow`, as `snapshot.copy_from_slice(live)` then
    /// [`PageEncoder::plan`] would, in one pass over the page where it can
    /// ([`Differ::copy_word_mask`]). A page that is dense at the sampled
    /// blocks is copied without reading the rest of its shadow.
    ///
    /// # Safety
    /// `live` must be readable for `snapshot.len()` bytes, which must not
    /// overlap `snapshot`.
    pub unsafe fn copy_and_plan(
        &mut self,
        live: *const u8,
        snapshot: &mut [u8],
        shadow: &[u8],
    ) -> Plan {
        let fused = self.cfg.granularity == Granularity::Segment
            && self.cfg.words
            && self.cfg.merge_gap.max(diff::MIN_MERGE_GAP) >= diff::WORD_RUN_MERGE_GAP
            && shadow.len() >= snapshot.len()
            && snapshot.len() == self.page_size;
        if !fused {
            // SAFETY: the caller's contract.
            unsafe { std::ptr::copy_nonoverlapping(live, snapshot.as_mut_ptr(), snapshot.len()) };
            return self.plan(snapshot, Some(shadow));
        }
        let old = &shadow[..self.page_size];
        let dense_check = self.wide_at() < self.page_size as u64;
        // SAFETY: the caller's contract.
        match unsafe {
            self.differ
                .copy_word_mask(live, snapshot, old, &mut self.mask, dense_check)
        } {
            Some(changed) => self.plan_words(snapshot, shadow, changed),
            None => self.zero_or_whole(snapshot),
        }
    }

    /// A record costing this much or more is "wide": the page goes whole.
    fn wide_at(&self) -> u64 {
        let whole_cost = (HEADER_LEN + self.page_size) as u64;
        (whole_cost * u64::from(self.cfg.wide_percent)).div_ceil(100)
    }

    /// The plan of a page whose word mask is in `self.mask`, with `changed`
    /// bits: nothing, zero, segments, words or whole, the cheapest.
    fn plan_words(&mut self, snapshot: &[u8], shadow: &[u8], changed: u32) -> Plan {
        if changed == 0 {
            self.spans.clear();
            return Plan::Unchanged;
        }
        if self.differ.is_zero(snapshot) {
            return Plan::Zero;
        }
        let merge_gap = self.cfg.merge_gap.max(diff::MIN_MERGE_GAP);
        let wide_at = self.wide_at();
        let words_cost = (HEADER_LEN as u64)
            + u64::from(words_mask_len(self.page_size as u32))
            + u64::from(changed) * WORD_LEN as u64;
        // Segments win only below both the words' cost and the wide mark.
        let give_up = words_cost.min(wide_at);
        let bound = (merge_gap < 24).then(|| {
            u64::from(self.differ.word_runs_lower_bound(&self.mask)) * HEADER_LEN as u64
                + u64::from(changed)
        });
        if bound.is_none_or(|b| b < give_up) {
            let len = self.page_size.min(shadow.len()).min(snapshot.len());
            let rule = diff::SpanRule {
                merge_gap,
                span_cost: HEADER_LEN as u64,
                give_up,
            };
            let spans = self.differ.spans_from_words(
                &shadow[..len],
                &snapshot[..len],
                &self.mask,
                rule,
                &mut self.spans,
            );
            if let Some(covered) = spans {
                let count = self.spans.len() as u32;
                return Plan::Segments { count, covered };
            }
        }
        if words_cost < wide_at {
            Plan::Words { count: changed }
        } else {
            Plan::Whole
        }
    }

    fn zero_or_whole(&self, snapshot: &[u8]) -> Plan {
        if self.differ.is_zero(snapshot) {
            Plan::Zero
        } else {
            Plan::Whole
        }
    }

    /// [`PageEncoder::plan`] with the block scan of [`Differ::diff_limited`]
    /// and segments only: for a peer without Words records, and for merge
    /// gaps too small for [`diff::spans_from_words`].
    fn plan_scan(&mut self, snapshot: &[u8], shadow: &[u8]) -> Plan {
        let whole_cost = (HEADER_LEN + self.page_size) as u64;
        let wide = |cost: u64| cost * 100 >= whole_cost * u64::from(self.cfg.wide_percent);
        // Once the spans cost more than this, the page goes whole whatever the
        // rest of it holds: stop diffing there.
        let limit = Limit {
            span_cost: HEADER_LEN as u64,
            max_cost: whole_cost * u64::from(self.cfg.wide_percent) / 100,
        };
        let covered =
            self.differ
                .diff_limited(shadow, snapshot, self.cfg.merge_gap, limit, &mut self.spans);
        // `None`: the diff gave up (possibly before finding any span): the
        // page changed, and goes whole or zero.
        if covered.is_some() && self.spans.is_empty() {
            return Plan::Unchanged;
        }
        if self.differ.is_zero(snapshot) {
            return Plan::Zero;
        }
        let count = self.spans.len() as u32;
        match covered {
            Some(covered) if !wide(u64::from(count) * HEADER_LEN as u64 + u64::from(covered)) => {
                Plan::Segments { count, covered }
            }
            _ => Plan::Whole,
        }
    }

    /// Decides how to send `snapshot` when what the destination holds is
    /// known only by fingerprints: `changed` has one bit per 64-byte block
    /// (bit `b % 64` of word `b / 64`, as
    /// [`fingerprint::FingerprintPart::compare_and_store`] returns it), set
    /// where the block must be sent. Marked blocks become spans, merged
    /// across gaps of at most `merge_gap` bytes (so adjacent blocks always
    /// merge), then the page goes as nothing, zero, segments or whole as in
    /// [`PageEncoder::plan`]. Page granularity ignores `changed`.
    pub fn plan_blocks(&mut self, snapshot: &[u8], changed: &[u64]) -> Plan {
        if self.cfg.granularity == Granularity::Page {
            return self.plan(snapshot, None);
        }
        self.spans.clear();
        let block = fingerprint::BLOCK as u32;
        let page_end = (self.page_size.min(snapshot.len()) / fingerprint::BLOCK) as u32 * block;
        let mut covered = 0u32;
        // A run of marked blocks at a time (a whole page of them is one
        // step, not 64): its first block, then its length in set bits.
        'words: for (w, &bits) in changed.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let first = bits.trailing_zeros();
                let len = (bits >> first).trailing_ones();
                bits = bits
                    .checked_shr(first + len)
                    .map_or(0, |rest| rest << (first + len));
                let b = ((w * 64) as u32).saturating_add(first);
                let start = b.saturating_mul(block);
                if start >= page_end {
                    break 'words;
                }
                let end = start.saturating_add(len * block).min(page_end);
                match self.spans.last_mut() {
                    Some(last) if start - last.end <= self.cfg.merge_gap => {
                        covered += end - last.end;
                        last.end = end;
                    }
                    _ => {
                        covered += end - start;
                        self.spans.push(Span { start, end });
                    }
                }
                if end == page_end {
                    break 'words;
                }
            }
        }
        if self.spans.is_empty() {
            return Plan::Unchanged;
        }
        if self.differ.is_zero(snapshot) {
            return Plan::Zero;
        }
        let count = self.spans.len() as u32;
        let whole_cost = (HEADER_LEN + self.page_size) as u64;
        let cost = u64::from(count) * HEADER_LEN as u64 + u64::from(covered);
        if cost * 100 >= whole_cost * u64::from(self.cfg.wide_percent) {
            Plan::Whole
        } else {
            Plan::Segments { count, covered }
        }
    }

    /// Bytes `write` will produce for `plan`.
    pub fn encoded_len(&self, plan: Plan) -> usize {
        match plan {
            Plan::Unchanged => 0,
            Plan::Zero => HEADER_LEN,
            Plan::Whole => HEADER_LEN + self.page_size,
            Plan::Segments { count, covered } => count as usize * HEADER_LEN + covered as usize,
            Plan::Words { count } => {
                HEADER_LEN
                    + words_mask_len(self.page_size as u32) as usize
                    + count as usize * WORD_LEN
            }
        }
    }

    /// Records `write` will produce for `plan`.
    pub fn records(&self, plan: Plan) -> u64 {
        match plan {
            Plan::Unchanged => 0,
            Plan::Segments { count, .. } => count.into(),
            Plan::Zero | Plan::Whole | Plan::Words { .. } => 1,
        }
    }

    /// Bytes of `plan`'s encoding that are not guest data: headers, and a
    /// Words record's mask.
    pub fn overhead(&self, plan: Plan) -> u64 {
        let headers = self.records(plan) * HEADER_LEN as u64;
        match plan {
            Plan::Words { .. } => headers + u64::from(words_mask_len(self.page_size as u32)),
            _ => headers,
        }
    }

    /// Payload bytes of `plan`: its share of the round's work set.
    pub fn work_set_bytes(&self, plan: Plan) -> u64 {
        match plan {
            Plan::Unchanged | Plan::Zero => 0,
            Plan::Whole => self.page_size as u64,
            Plan::Segments { covered, .. } => covered.into(),
            Plan::Words { count } => u64::from(count) * WORD_LEN as u64,
        }
    }

    /// Writes the records of `plan` for the page at guest address `gpa` into
    /// `out`, which must hold at least [`PageEncoder::encoded_len`] bytes.
    /// Returns the bytes written (0 if `out` is too small: nothing is written).
    pub fn write(&self, plan: Plan, gpa: u64, snapshot: &[u8], out: &mut [u8]) -> usize {
        let need = self.encoded_len(plan);
        if out.len() < need {
            return 0;
        }
        match plan {
            Plan::Unchanged => {}
            Plan::Zero => out[..HEADER_LEN].copy_from_slice(&Header::zero(gpa).encode()),
            Plan::Whole => {
                out[..HEADER_LEN]
                    .copy_from_slice(&Header::page(gpa, self.page_size as u32).encode());
                out[HEADER_LEN..need].copy_from_slice(&snapshot[..self.page_size]);
            }
            Plan::Segments { .. } => {
                let mut at = 0;
                for s in &self.spans {
                    let (start, len) = (s.start as usize, s.len() as usize);
                    out[at..at + HEADER_LEN]
                        .copy_from_slice(&Header::segment(gpa + s.start as u64, s.len()).encode());
                    at += HEADER_LEN;
                    copy_span(out, at, snapshot, start, len);
                    at += len;
                }
            }
            Plan::Words { .. } => {
                let header = Header::new(Kind::Words, 0, (need - HEADER_LEN) as u32, gpa);
                out[..HEADER_LEN].copy_from_slice(&header.encode());
                let mut at = HEADER_LEN;
                for m in &self.mask {
                    out[at..at + 8].copy_from_slice(&m.to_le_bytes());
                    at += 8;
                }
                let words = &mut out[at..need];
                let mut to = 0;
                self.each_word(|w| {
                    words[to..to + WORD_LEN].copy_from_slice(&snapshot[w..w + WORD_LEN]);
                    to += WORD_LEN;
                });
            }
        }
        need
    }

    /// Calls `f` with the byte offset of each word the last Words plan
    /// marked, in order.
    #[inline(always)]
    fn each_word(&self, mut f: impl FnMut(usize)) {
        for (i, &m) in self.mask.iter().enumerate() {
            let mut bits = m;
            while bits != 0 {
                f((i * 64 + bits.trailing_zeros() as usize) * WORD_LEN);
                bits &= bits - 1;
            }
        }
    }

    /// Makes `shadow` hold what the destination holds after `plan`.
    pub fn update_shadow(&self, plan: Plan, snapshot: &[u8], shadow: &mut [u8]) {
        match plan {
            Plan::Unchanged => {}
            Plan::Zero => shadow.fill(0),
            Plan::Whole => shadow.copy_from_slice(snapshot),
            Plan::Segments { .. } => {
                for s in &self.spans {
                    let r = s.start as usize..s.end as usize;
                    shadow[r.clone()].copy_from_slice(&snapshot[r]);
                }
            }
            // A stretch of 512 bytes at a time: the mask marks every word
            // where the two differ, so a stretch with a marked word may as
            // well be copied whole (one copy of a fixed size; in the `diff`
            // bench at 10 % changed, faster than a copy per word or per
            // 64-byte line), and one without is not written at all.
            Plan::Words { .. } => {
                const SPAN: usize = 64 * WORD_LEN;
                let len = shadow.len().min(snapshot.len());
                for (i, &m) in self.mask.iter().enumerate() {
                    let at = i * SPAN;
                    if m != 0 && at < len {
                        let end = (at + SPAN).min(len);
                        shadow[at..end].copy_from_slice(&snapshot[at..end]);
                    }
                }
            }
        }
    }
}

/// Copies `src[start..start + len]` to `dst[at..]`. A short span is copied
/// as a fixed 32 bytes where both sides have room (the bytes past `len` are
/// overwritten by the next record, or lie past the records written): a
/// fixed-size copy is a few vector moves, where a copy of a length known
/// only at run time is a call per span.
#[inline(always)]
fn copy_span(dst: &mut [u8], at: usize, src: &[u8], start: usize, len: usize) {
    const SHORT: usize = 32;
    if len <= SHORT && start + SHORT <= src.len() && at + SHORT <= dst.len() {
        dst[at..at + SHORT].copy_from_slice(&src[start..start + SHORT]);
    } else {
        dst[at..at + len].copy_from_slice(&src[start..start + len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Kind, Records};
    use proptest::prelude::*;

    const P: usize = 4096;

    /// Applies decoded records to `page` (the destination's view).
    fn apply(page: &mut [u8], gpa: u64, bytes: &[u8]) {
        for r in Records::new(bytes, P as u32) {
            let (h, payload) = r.unwrap();
            let off = (h.arg - gpa) as usize;
            match h.kind {
                Kind::Segment | Kind::Page => {
                    page[off..off + payload.len()].copy_from_slice(payload)
                }
                Kind::Zero => page.fill(0),
                Kind::Words => {
                    assert_eq!(off, 0, "a Words record addresses its page");
                    let (mask, mut words) = payload.split_at(P / 64);
                    for i in 0..P / 8 {
                        if mask[i / 8] >> (i % 8) & 1 == 1 {
                            page[i * 8..i * 8 + 8].copy_from_slice(&words[..8]);
                            words = &words[8..];
                        }
                    }
                    assert!(words.is_empty(), "one word per mask bit");
                }
                k => panic!("unexpected {k:?}"),
            }
        }
    }

    fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), P),
            proptest::collection::vec((0usize..P, 1usize..64, any::<u8>()), 0..30),
            any::<bool>(),
        )
            .prop_map(|(old, edits, zero_new)| {
                let mut new = old.clone();
                for (at, len, v) in edits {
                    let end = (at + len).min(P);
                    new[at..end].fill(v);
                }
                if zero_new {
                    new.fill(0);
                }
                (old, new)
            })
    }

    /// Pages with scattered edits too: up to 600 words changed, a word
    /// apart or more.
    fn scattered_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), P),
            proptest::collection::vec((0usize..P / 8, 1u8..=255, 0usize..8), 0..600),
        )
            .prop_map(|(old, edits)| {
                let mut new = old.clone();
                for (word, x, byte) in edits {
                    new[word * 8 + byte] ^= x;
                }
                (old, new)
            })
    }

    proptest! {
        /// Every plan rebuilds the page, and is the cheapest of segments,
        /// words and whole: never dearer than the segments alone (the old
        /// encoder's plan), and with `words` off never a Words record.
        #[test]
        fn plans_rebuild_the_page_at_least_as_cheaply_as_segments(
            (old, new) in prop_oneof![page_pair(), scattered_pair()],
            words in any::<bool>(),
            portable in any::<bool>(),
        ) {
            let mut cfg = EncoderConfig::new(Granularity::Segment);
            cfg.words = words;
            let differ = if portable { Differ::portable() } else { Differ::detect() };
            let mut enc = PageEncoder::with_differ(cfg, P, differ);
            let plan = enc.plan(&new, Some(&old));
            let mut out = vec![0u8; 2 * P];
            let n = enc.write(plan, 8 * P as u64, &new, &mut out);
            prop_assert_eq!(n, enc.encoded_len(plan));
            let mut dest = old.clone();
            apply(&mut dest, 8 * P as u64, &out[..n]);
            prop_assert_eq!(&dest, &new);
            let mut shadow = old.clone();
            enc.update_shadow(plan, &new, &mut shadow);
            prop_assert_eq!(&shadow, &new);
            let mut seg_only = EncoderConfig::new(Granularity::Segment);
            seg_only.words = false;
            let mut scan = PageEncoder::with_differ(seg_only, P, differ);
            let old_plan = scan.plan(&new, Some(&old));
            let old_is_words = matches!(old_plan, Plan::Words { .. });
            prop_assert!(!old_is_words, "no Words without the feature");
            if !words {
                prop_assert_eq!(plan, old_plan);
            } else {
                prop_assert!(enc.encoded_len(plan) <= scan.encoded_len(old_plan));
                if matches!(plan, Plan::Segments { .. }) {
                    prop_assert_eq!(plan, old_plan, "the same segments, found from the mask");
                    prop_assert_eq!(enc.spans(), scan.spans());
                }
                if matches!(old_plan, Plan::Unchanged | Plan::Zero) {
                    prop_assert_eq!(plan, old_plan);
                }
            }
        }

        #[test]
        fn segments_rebuild_the_new_page((old, new) in page_pair(), gpa_page in 0u64..1000) {
            let gpa = gpa_page * P as u64;
            let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), P);
            let plan = enc.plan(&new, Some(&old));
            let mut out = vec![0u8; 2 * P];
            let n = enc.write(plan, gpa, &new, &mut out);
            prop_assert_eq!(n, enc.encoded_len(plan));
            // Never larger than page mode's record plus one header.
            prop_assert!(n <= 2 * HEADER_LEN + P);
            let mut dest = old.clone();
            apply(&mut dest, gpa, &out[..n]);
            prop_assert_eq!(&dest, &new);
            let mut shadow = old.clone();
            enc.update_shadow(plan, &new, &mut shadow);
            prop_assert_eq!(&shadow, &new);
            if let Plan::Segments { count, .. } = plan {
                let spans = enc.spans();
                prop_assert_eq!(spans.len() as u32, count);
                for w in spans.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "sorted and disjoint");
                }
                for s in spans {
                    prop_assert!(s.start < s.end && s.end as usize <= P, "inside the page");
                }
            }
        }

        #[test]
        fn changed_blocks_rebuild_the_new_page((old, new) in page_pair(), gpa_page in 0u64..1000) {
            let gpa = gpa_page * P as u64;
            let mut changed = vec![0u64; P / fingerprint::BLOCK / 64];
            for (b, (o, n)) in old.chunks(fingerprint::BLOCK).zip(new.chunks(fingerprint::BLOCK)).enumerate() {
                changed[b / 64] |= u64::from(o != n) << (b % 64);
            }
            let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), P);
            let plan = enc.plan_blocks(&new, &changed);
            prop_assert_eq!(plan == Plan::Unchanged, old == new);
            let mut out = vec![0u8; 2 * P];
            let n = enc.write(plan, gpa, &new, &mut out);
            prop_assert_eq!(n, enc.encoded_len(plan));
            prop_assert!(n <= 2 * HEADER_LEN + P);
            let mut dest = old.clone();
            apply(&mut dest, gpa, &out[..n]);
            prop_assert_eq!(&dest, &new);
            if let Plan::Segments { count, covered } = plan {
                let spans = enc.spans();
                prop_assert_eq!(spans.len() as u32, count);
                prop_assert_eq!(spans.iter().map(Span::len).sum::<u32>(), covered);
                for w in spans.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "adjacent blocks merged");
                }
                for s in spans {
                    prop_assert!(s.start % 64 == 0 && s.end % 64 == 0, "whole blocks");
                }
            }
        }

        #[test]
        fn block_runs_plan_as_block_by_block(
            changed in proptest::collection::vec(any::<u64>(), 1..3),
            thin in 0u32..4,
            merge_gap in 0u32..300,
        ) {
            // Thinned masks have short runs; more words than the page has
            // blocks test the cut at the page's end.
            let changed: Vec<u64> = changed
                .iter()
                .map(|&w| (0..thin).fold(w, |m, i| m & w.rotate_left(7 * i + 3)))
                .collect();
            let mut cfg = EncoderConfig::new(Granularity::Segment);
            cfg.merge_gap = merge_gap;
            let mut enc = PageEncoder::new(cfg, P);
            let page = vec![1u8; P];
            let plan = enc.plan_blocks(&page, &changed);
            // One block at a time, as the spans were first built.
            let mut want: Vec<Span> = Vec::new();
            for b in (0..changed.len() * 64).filter(|b| changed[b / 64] >> (b % 64) & 1 == 1) {
                let (start, end) = ((b * 64) as u32, (b * 64 + 64) as u32);
                if start as usize >= P {
                    break;
                }
                match want.last_mut() {
                    Some(last) if start - last.end <= merge_gap => last.end = end,
                    _ => want.push(Span { start, end }),
                }
            }
            prop_assert_eq!(plan == Plan::Unchanged, want.is_empty());
            if !want.is_empty() {
                prop_assert_eq!(enc.spans(), &want[..]);
            }
        }

        #[test]
        fn page_mode_always_sends_the_page((old, new) in page_pair()) {
            let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Page), P);
            let plan = enc.plan(&new, Some(&old));
            prop_assert!(matches!(plan, Plan::Whole | Plan::Zero));
            let mut out = vec![0u8; 2 * P];
            let n = enc.write(plan, 0, &new, &mut out);
            let mut dest = old.clone();
            apply(&mut dest, 0, &out[..n]);
            prop_assert_eq!(&dest, &new);
        }
    }

    #[test]
    fn sparse_writes_cost_bytes_not_pages() {
        let old = vec![5u8; P];
        let mut new = old.clone();
        new[8..16].copy_from_slice(&[1; 8]);
        new[2048..2056].copy_from_slice(&[2; 8]);
        let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), P);
        let plan = enc.plan(&new, Some(&old));
        assert_eq!(
            plan,
            Plan::Segments {
                count: 2,
                covered: 16
            }
        );
        assert_eq!(enc.encoded_len(plan), 2 * HEADER_LEN + 16);
        assert_eq!(
            enc.plan(&old, Some(&old)),
            Plan::Unchanged,
            "aba: old value restored"
        );
        assert_eq!(enc.plan(&vec![0; P], Some(&old)), Plan::Zero);
        assert_eq!(enc.plan(&new, None), Plan::Whole, "no shadow: whole");
        let dense: Vec<u8> = (0..P).map(|i| i as u8 ^ 0x5a).collect();
        assert_eq!(enc.plan(&dense, Some(&old)), Plan::Whole, "wide page");
    }

    #[test]
    fn scattered_words_go_as_one_words_record() {
        let old = vec![5u8; P];
        let mut new = old.clone();
        // Every fourth word: 128 segments (128 headers) or one Words record.
        for w in (0..P / 8).step_by(4) {
            new[w * 8 + 3] = 9;
        }
        let mut enc = PageEncoder::new(EncoderConfig::new(Granularity::Segment), P);
        let plan = enc.plan(&new, Some(&old));
        assert_eq!(plan, Plan::Words { count: 128 });
        assert_eq!(enc.encoded_len(plan), HEADER_LEN + 64 + 128 * 8);
        assert_eq!(enc.records(plan), 1);
        assert_eq!(enc.overhead(plan), (HEADER_LEN + 64) as u64);
        assert_eq!(enc.work_set_bytes(plan), 128 * 8);
        let mut out = vec![0u8; 2 * P];
        let n = enc.write(plan, 3 * P as u64, &new, &mut out);
        let (h, payload) = Records::new(&out[..n], P as u32).next().unwrap().unwrap();
        assert_eq!((h.kind, h.arg), (Kind::Words, 3 * P as u64));
        assert_eq!(
            payload[..8],
            [0x11u8; 8],
            "words 0, 4, 8 ... of the first 64"
        );
        assert_eq!(payload[64..72], new[..8]);
        // A peer without Words: the same page as segments.
        let mut v3 = EncoderConfig::new(Granularity::Segment);
        v3.words = false;
        let mut enc = PageEncoder::new(v3, P);
        assert_eq!(
            enc.plan(&new, Some(&old)),
            Plan::Segments {
                count: 128,
                covered: 128
            }
        );
    }

    #[test]
    fn write_refuses_a_short_buffer() {
        let enc = PageEncoder::new(EncoderConfig::new(Granularity::Page), P);
        let mut out = vec![0u8; P];
        assert_eq!(enc.write(Plan::Whole, 0, &vec![1; P], &mut out), 0);
    }
}
