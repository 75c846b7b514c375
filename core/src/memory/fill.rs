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
/// every page holds data that does not compress ([`Contents::Full`]).
pub fn fill_random<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
    memory: &GuestMemoryMmap<B>,
    seed: u64,
) {
    fill(memory, Contents::Full, seed);
}

/// What a guest's memory holds before its workload starts: a dimension of
/// every benchmark, because what a page holds decides what each method
/// sends for it (a zero page costs segment pre-copy nothing and page
/// pre-copy a whole page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Contents {
    /// Left as allocated: zero everywhere but what the guest writes.
    Empty,
    /// Every page pseudo-random, each page different: nothing compresses,
    /// nothing repeats, no page is zero. What a guest that has used all its
    /// memory looks like to a migration, and the default.
    #[default]
    Full,
    /// A blend chosen per 4 KiB page by a hash of its index: 3/8 zero
    /// pages, 3/8 text-like pages (words from a 64-word vocabulary; zstd
    /// level 1 shrinks them about 3-4x, measured in this module's test), and
    /// 2/8 pseudo-random pages.
    Mixed,
}

impl Contents {
    pub const ALL: [Contents; 3] = [Contents::Empty, Contents::Full, Contents::Mixed];

    pub fn as_str(self) -> &'static str {
        match self {
            Contents::Empty => "empty",
            Contents::Full => "full",
            Contents::Mixed => "mixed",
        }
    }
}

impl std::fmt::Display for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Contents {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Contents::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown guest contents {s:?} (empty, full or mixed)"))
    }
}

/// What a mixed guest's page of index `page` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    Zero,
    Text,
    Random,
}

/// The kind of page `page` of a [`Contents::Mixed`] guest.
pub fn mixed_kind(page: u64) -> PageKind {
    match XorShift64::new(page ^ 0x6d69_7865_6400_0000).next_u64() % 8 {
        0..=2 => PageKind::Zero,
        3..=5 => PageKind::Text,
        _ => PageKind::Random,
    }
}

const WORDS: [&str; 64] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "memory",
    "page",
    "guest",
    "migration",
    "kernel",
    "process",
    "buffer",
    "request",
    "server",
    "client",
    "value",
    "error",
    "return",
    "struct",
    "function",
    "thread",
];

/// Fills `page` with text-like bytes: words from [`WORDS`], spaces and
/// newlines, drawn from `rng`.
fn text_page(page: &mut [u8], rng: &mut XorShift64) {
    let mut i = 0;
    while i < page.len() {
        let r = rng.next_u64();
        let word = WORDS[(r % 64) as usize].as_bytes();
        let n = word.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&word[..n]);
        i += n;
        if i < page.len() {
            page[i] = if (r >> 8) % 12 == 0 { b'\n' } else { b' ' };
            i += 1;
        }
    }
}

/// Bytes each fill task writes at once.
const FILL_CHUNK: u64 = 1 << 20;
const FILL_PAGE: usize = 4096;

/// Fills every region with `contents` from `seed`, on every core (a 4 GiB
/// guest in seconds, not tens). The same `(contents, seed)` always gives
/// the same bytes at the same guest address. [`Contents::Empty`] writes
/// nothing: the memory stays as it was allocated.
pub fn fill<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
    memory: &GuestMemoryMmap<B>,
    contents: Contents,
    seed: u64,
) {
    if contents == Contents::Empty {
        return;
    }
    // (guest address, length) of each chunk, in order.
    let chunks: Vec<(u64, u64)> = memory
        .iter()
        .flat_map(|r| {
            let (start, len) = (r.start_addr().0, r.len());
            (0..len.div_ceil(FILL_CHUNK))
                .map(move |i| (start + i * FILL_CHUNK, FILL_CHUNK.min(len - i * FILL_CHUNK)))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = vec![0u8; FILL_CHUNK as usize];
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(addr, len)) = chunks.get(i) else {
                        break;
                    };
                    let buf = &mut buf[..len as usize];
                    for (p, page) in buf.chunks_mut(FILL_PAGE).enumerate() {
                        let index = addr / FILL_PAGE as u64 + p as u64;
                        // One generator per page: every page differs, and
                        // a page's bytes do not depend on the thread count.
                        let mut rng = XorShift64::new(seed ^ index.wrapping_mul(0x9e37_79b9));
                        match (contents, mixed_kind(index)) {
                            (Contents::Mixed, PageKind::Zero) => page.fill(0),
                            (Contents::Mixed, PageKind::Text) => text_page(page, &mut rng),
                            _ => rng.fill(page),
                        }
                    }
                    // The chunk lies inside its region, so the write cannot
                    // fail.
                    let _ = memory.write_slice(buf, GuestAddress(addr));
                }
            });
        }
    });
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
    #[test]
    fn full_pages_all_differ_and_do_not_compress() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        fill(&mem, Contents::Full, 9);
        let mut seen = std::collections::HashSet::new();
        let mut page = vec![0u8; 4096];
        for p in 0..1024u64 {
            mem.read_slice(&mut page, GuestAddress(p * 4096))
                .expect("read");
            assert!(seen.insert(page.clone()), "page {p} repeats an earlier one");
        }
        let mut all = vec![0u8; 4 << 20];
        mem.read_slice(&mut all, GuestAddress(0)).expect("read");
        let z = zstd::bulk::compress(&all, 3).expect("zstd");
        assert!(
            z.len() > all.len() * 99 / 100,
            "{} of {}",
            z.len(),
            all.len()
        );
        // Deterministic by seed, different across seeds.
        let again: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        fill(&again, Contents::Full, 9);
        let mut b = vec![0u8; 4 << 20];
        again.read_slice(&mut b, GuestAddress(0)).expect("read");
        assert_eq!(all, b);
        fill(&again, Contents::Full, 10);
        again.read_slice(&mut b, GuestAddress(0)).expect("read");
        assert_ne!(all, b);
    }

    #[test]
    fn mixed_is_the_documented_blend() {
        let pages = 4096u64;
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages as usize * 4096)])
                .expect("memory");
        fill(&mem, Contents::Mixed, 3);
        let (mut zero, mut text, mut random) = (0u64, Vec::new(), Vec::new());
        let mut page = vec![0u8; 4096];
        for p in 0..pages {
            mem.read_slice(&mut page, GuestAddress(p * 4096))
                .expect("read");
            match mixed_kind(p) {
                PageKind::Zero => {
                    assert!(page.iter().all(|&b| b == 0), "page {p}");
                    zero += 1;
                }
                PageKind::Text => {
                    assert!(page.iter().all(|&b| b.is_ascii()), "page {p}");
                    text.extend_from_slice(&page);
                }
                PageKind::Random => random.extend_from_slice(&page),
            }
        }
        let share = |n: u64| n as f64 / pages as f64;
        assert!(
            (share(zero) - 3.0 / 8.0).abs() < 0.03,
            "zero {}",
            share(zero)
        );
        assert!((share(text.len() as u64 / 4096) - 3.0 / 8.0).abs() < 0.03);
        assert!((share(random.len() as u64 / 4096) - 2.0 / 8.0).abs() < 0.03);
        // Text pages compress about 3-4x page by page (as zstd sees wide
        // pages); random ones do not.
        let per_page = |bytes: &[u8]| -> f64 {
            let packed: usize = bytes
                .chunks(4096)
                .map(|p| zstd::bulk::compress(p, 1).expect("zstd").len())
                .sum();
            bytes.len() as f64 / packed as f64
        };
        let t = per_page(&text);
        assert!((2.5..5.0).contains(&t), "text pages compress {t:.2}x");
        assert!(per_page(&random) < 1.01);
    }

    #[test]
    fn empty_writes_nothing_and_names_parse() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        mem.write_slice(&[7u8; 16], GuestAddress(4096))
            .expect("write");
        fill(&mem, Contents::Empty, 1);
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(4096)).expect("read");
        assert_eq!(b, [7u8; 16]);
        for c in Contents::ALL {
            assert_eq!(c.as_str().parse::<Contents>(), Ok(c));
        }
        assert!("zeros".parse::<Contents>().is_err());
    }
}
