//! What a migration proves about the copy, and when: `--verify
//! strict|incremental|off` ([`VerifyMode`]).
//!
//! Two different failures can leave the destination's memory unlike the
//! source's:
//!
//! - **(a) the wire or the lander changed bytes**: what was sent is not
//!   what landed (a corrupted payload, a record applied at the wrong place,
//!   a stray write);
//! - **(b) the dirty log missed a write**: what was sent is not the
//!   source's live memory (a write the log did not record was never sent).
//!
//! `strict` digests all guest memory on both ends while the guest is
//! paused (BLAKE3, then compared): it catches (a) and (b) before the
//! destination may run the guest, at a cost in downtime proportional to all
//! of memory (about 0.25 s per GiB here).
//!
//! `incremental` (the default) splits them:
//! - (a) before the Ack, in time proportional to the final round: both ends
//!   keep a [`Ledger`], a keyed hash per page ([`PageHasher`]: the page's
//!   address and bytes, under a key derived from the session that never
//!   leaves the two ends) and the sum of all of them. The source hashes the
//!   snapshot it sent a page from; the destination hashes the page *read
//!   back from guest memory* after its records landed (zero records
//!   included, so a page that was never zeroed is caught). The sums are
//!   compared with the state record's bytes at switch-over; only the final
//!   round's pages are hashed then. Why it proves (a): each side's sum is
//!   Σ H(gpa, bytes) over the pages' current contents *as each side sees
//!   them*; they are equal only if every page differs in no hash, and a
//!   differing page keeps its hash with probability about 2⁻⁶⁴.
//!   What it cannot see: a stray write into a page that gets no record
//!   after the write (its hash is never recomputed), and a page that never
//!   got any record (the records assume the destination's memory starts
//!   zeroed, which `land` checks unless the caller vouches for it).
//! - (b) after the destination runs, in the background: the source's memory
//!   no longer changes once the guest left it, so the source rehashes every
//!   page of its live memory and compares it with the ledger of what it
//!   sent ([`Ledger::check`]). A difference means the dirty log missed a
//!   write: the destination runs a guest that differs from the source's;
//!   hpmig raises an alarm (exit status 5, the report's `source_check`),
//!   because the guest cannot be moved back without losing its progress.
//!
//! `off` proves nothing beyond each round's record count and CRC-32.

mod hash;

use std::sync::atomic::{AtomicU64, Ordering};

pub use hash::{PageHash, PageHasher};

use crate::memory::{Layout, PageIndex, Share, SourceMemory};

/// What the switch-over proves (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum VerifyMode {
    /// No digest: only each round's count and CRC.
    Off = 0,
    /// Ledgers of per-page hashes compared at switch-over; the source's
    /// live memory checked in the background after it.
    #[default]
    Incremental = 1,
    /// All of memory digested on both ends during the pause.
    Strict = 2,
}

impl VerifyMode {
    pub fn from_u8(v: u8) -> Option<VerifyMode> {
        match v {
            0 => Some(VerifyMode::Off),
            1 => Some(VerifyMode::Incremental),
            2 => Some(VerifyMode::Strict),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Off => "off",
            VerifyMode::Incremental => "incremental",
            VerifyMode::Strict => "strict",
        }
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(VerifyMode::Off),
            "incremental" => Ok(VerifyMode::Incremental),
            "strict" => Ok(VerifyMode::Strict),
            other => Err(format!(
                "unknown verification '{other}' (expected strict, incremental or off)"
            )),
        }
    }
}

/// A ledger sum as the 32 bytes the switch-over digest takes.
pub fn sum_bytes(sum: u128) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&sum.to_le_bytes());
    b
}

/// The hash of every page of one share, as this end last saw the page, and
/// their sum. A page never recorded holds 0 (a real hash is 0 with
/// probability 2⁻¹²⁸).
#[derive(Clone)]
pub struct Ledger {
    share: Share,
    hashes: Vec<PageHash>,
    sum: u128,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("share", &self.share)
            .field("sum", &format_args!("{:#034x}", self.sum))
            .finish_non_exhaustive()
    }
}

impl Ledger {
    pub fn new(share: Share) -> Ledger {
        Ledger {
            hashes: vec![0; share.pages()],
            share,
            sum: 0,
        }
    }

    /// Records `page`'s new hash (pages outside the share are ignored).
    pub fn set(&mut self, page: PageIndex, hash: PageHash) {
        if let Some(slot) = self.share.local(page).and_then(|l| self.hashes.get_mut(l)) {
            self.sum = self.sum.wrapping_sub(*slot).wrapping_add(hash);
            *slot = hash;
        }
    }

    /// Whether `page` was ever recorded (a page that was not is zero on
    /// both ends).
    pub fn recorded(&self, page: PageIndex) -> bool {
        self.share
            .local(page)
            .and_then(|l| self.hashes.get(l))
            .is_some_and(|&h| h != 0)
    }

    /// The sum of the share's page hashes.
    pub fn sum(&self) -> u128 {
        self.sum
    }

    /// Rehashes the share's pages from `memory` (which no one writes any
    /// more) and counts those that differ from what was recorded (a page
    /// never recorded must still be zero). Returns the count and up to
    /// eight of their addresses.
    pub fn check(
        &self,
        memory: &SourceMemory,
        layout: &Layout,
        hasher: &PageHasher,
    ) -> (u64, Vec<u64>) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let regions: Vec<_> = memory.iter().collect();
        let zero = vec![0u8; layout.page_size()];
        let mut page_buf = vec![0u8; layout.page_size()];
        let (mut differ, mut first) = (0u64, Vec::new());
        for (local, &recorded) in self.hashes.iter().enumerate() {
            let page = self.share.first_page().offset(local as u64);
            let Some(loc) = layout.page(page) else {
                continue;
            };
            let Ok(live) =
                regions[loc.region].get_slice(MemoryRegionAddress(loc.offset), zero.len())
            else {
                continue;
            };
            live.copy_to(&mut page_buf[..]);
            let expected = if recorded == 0 {
                hasher.hash(loc.gpa.0, &zero)
            } else {
                recorded
            };
            if hasher.hash(loc.gpa.0, &page_buf) != expected {
                differ += 1;
                if first.len() < 8 {
                    first.push(loc.gpa.0);
                }
            }
        }
        (differ, first)
    }
}

/// The ledgers of what the source sent, one per worker, kept after the
/// migration for the background check of its live memory.
#[derive(Debug)]
pub struct SentLedger {
    pub(crate) parts: Vec<Ledger>,
    pub(crate) hasher: PageHasher,
    pub(crate) layout: Layout,
}

/// The background check's finding: pages whose live bytes differ from what
/// was sent (the dirty log missed a write to them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceCheck {
    pub pages_checked: u64,
    pub pages_differ: u64,
    /// Up to eight guest addresses of pages that differ.
    pub first: Vec<u64>,
}

impl SentLedger {
    /// Checks the source's live memory against what was sent, one thread
    /// per ledger part. Call it once the guest no longer runs here.
    pub fn check(&self, memory: &SourceMemory) -> SourceCheck {
        let differ = AtomicU64::new(0);
        let first = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for part in &self.parts {
                let (differ, first) = (&differ, &first);
                s.spawn(move || {
                    let (n, addrs) = part.check(memory, &self.layout, &self.hasher);
                    differ.fetch_add(n, Ordering::Relaxed);
                    let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
                    f.extend(addrs);
                    f.sort_unstable();
                    f.truncate(8);
                });
            }
        });
        SourceCheck {
            pages_checked: self.layout.total_pages(),
            pages_differ: differ.into_inner(),
            first: first.into_inner().unwrap_or_else(|p| p.into_inner()),
        }
    }
}
