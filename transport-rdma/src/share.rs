//! What each stream's remote keys reach at the destination: the guest pages
//! its stream owns, and nothing else.
//!
//! Streams own fixed, disjoint shares of dirty-bitmap words
//! ([`Share`], the split the source's workers and the destination's landers
//! use), and a bitmap word never spans two regions, so a share is one
//! contiguous guest range per region it touches ([`share_ranges`]). The
//! destination registers each such range once, for remote writes, in a
//! protection domain of the stream's own ([`StreamGuest`]), where the
//! stream's staging ring and queue pair live too. So:
//!
//! - the registrations of all streams tile guest memory exactly once: what
//!   is registered adds up to the guest's size, no page twice;
//! - a stream's keys reach its own ranges and staging ring and no byte
//!   more: the NIC refuses a write past them with a remote access error,
//!   before anything lands;
//! - another stream's key is refused too: it belongs to another protection
//!   domain than the queue pair the write came through.

use std::sync::Arc;

use hpmig_core::memory::{DestMemory, Layout, Share};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::rx::LocalRegion;
use crate::setup::RemoteRegion;
use crate::transport::EndpointError;
use crate::verbs::{self, Context, Mr, Pd};

/// One contiguous guest range of a stream's share: `len` bytes at byte
/// `offset` of region `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub region: usize,
    pub offset: u64,
    pub len: u64,
}

/// The guest ranges stream `stream` of `streams` owns under `layout`: one
/// per region its share of bitmap words touches, in region order; none
/// when the share is empty (more streams than words).
pub(crate) fn share_ranges(layout: &Layout, stream: usize, streams: usize) -> Vec<Part> {
    let share = Share::of(layout.bitmap_words(), stream, streams);
    let regions = layout.regions();
    let mut parts = Vec::new();
    let mut word = share.words.start;
    while word < share.words.end {
        let Some((region, offset)) = layout.word_start(word) else {
            break;
        };
        // The region's words end where the next region's start.
        let region_end_word = if region + 1 < regions.len() {
            layout.region_word_base(region + 1)
        } else {
            layout.bitmap_words()
        };
        let stop = share.words.end.min(region_end_word);
        let end = if stop < region_end_word {
            layout.word_start(stop).map_or(0, |(_, o)| o)
        } else {
            regions[region].size
        };
        if end > offset {
            parts.push(Part {
                region,
                offset,
                len: end - offset,
            });
        }
        word = region_end_word;
    }
    parts
}

/// Every guest memory region as the destination maps it, in layout order.
pub(crate) fn local_regions(memory: &DestMemory) -> Result<Vec<LocalRegion>, EndpointError> {
    memory
        .iter()
        .map(|r| {
            let host = r
                .as_volatile_slice()
                .map(|s| s.ptr_guard_mut().as_ptr())
                .map_err(|source| EndpointError::GuestRegion {
                    gpa: r.start_addr().0,
                    source,
                })?;
            Ok(LocalRegion {
                gpa: r.start_addr().0,
                len: r.len(),
                host: host as usize,
            })
        })
        .collect()
}

/// What one stream reaches at the destination: its own protection domain
/// and, registered in it for remote writes, the guest ranges it owns.
#[derive(Debug)]
pub(crate) struct StreamGuest {
    pub pd: Arc<Pd>,
    /// The ranges' registrations (they pin the pages while the stream
    /// lives).
    pub mrs: Vec<Mr>,
    /// What the Answer tells the source: each range with its own key.
    pub remote: Vec<RemoteRegion>,
    /// Where the ranges are mapped here, for the lander's lookups.
    pub local: Vec<LocalRegion>,
}

impl StreamGuest {
    /// Makes stream `stream` of `streams` its protection domain and
    /// registers the guest ranges it owns under `layout` (the layout of
    /// `regions`, both in layout order) in it.
    pub fn register(
        ctx: &Arc<Context>,
        layout: &Layout,
        regions: &[LocalRegion],
        stream: usize,
        streams: usize,
    ) -> Result<StreamGuest, EndpointError> {
        let pd = Pd::new(ctx)?;
        let parts = share_ranges(layout, stream, streams);
        let mut g = StreamGuest {
            pd,
            mrs: Vec::with_capacity(parts.len()),
            remote: Vec::with_capacity(parts.len()),
            local: Vec::with_capacity(parts.len()),
        };
        for part in parts {
            let range = |gpa| EndpointError::GuestRange {
                stream,
                gpa,
                len: part.len,
            };
            let Some(whole) = regions.get(part.region) else {
                return Err(range(part.offset));
            };
            let gpa = whole.gpa.checked_add(part.offset).ok_or(range(whole.gpa))?;
            let inside = part
                .offset
                .checked_add(part.len)
                .is_some_and(|end| end <= whole.len);
            let host = usize::try_from(part.offset)
                .ok()
                .and_then(|o| whole.host.checked_add(o));
            let (Some(host), Ok(len), true) = (host, usize::try_from(part.len), inside) else {
                return Err(range(gpa));
            };
            // SAFETY: [host, host + len) lies inside one guest region's
            // mapping (offset + len <= the region's length, checked just
            // above), a mapping of the guest memory, which outlives the
            // migration these registrations serve; should it be unmapped
            // first, the registration still pins its pages, so the NIC
            // never writes memory the process reuses.
            let mr =
                unsafe { Mr::register(&g.pd, host as *mut u8, len, verbs::ACCESS_REMOTE_WRITE) }?;
            g.remote.push(RemoteRegion {
                gpa,
                len: part.len,
                addr: mr.addr,
                rkey: mr.rkey,
            });
            g.local.push(LocalRegion {
                gpa,
                len: part.len,
                host,
            });
            g.mrs.push(mr);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpmig_core::memory::RegionSpec;
    use vm_memory::GuestAddress;

    fn layout(page: usize, regions: &[(u64, u64)]) -> Layout {
        let specs = regions
            .iter()
            .map(|&(base, size)| RegionSpec {
                base: GuestAddress(base),
                size,
            })
            .collect();
        Layout::new(page, specs).unwrap()
    }

    /// Every byte of guest memory once, in order, across all streams; each
    /// stream's pages exactly its share's.
    fn tiles(l: &Layout, streams: usize) {
        let page = l.page_size() as u64;
        let mut all = Vec::new();
        for s in 0..streams {
            let share = Share::of(l.bitmap_words(), s, streams);
            let parts = share_ranges(l, s, streams);
            assert!(parts.len() <= l.regions().len());
            for p in &parts {
                assert!(p.len > 0 && p.offset % page == 0 && p.len % page == 0);
                let gpa = l.regions()[p.region].base.0 + p.offset;
                // The first and last page of the range are the stream's.
                for at in [gpa, gpa + p.len - page] {
                    let (index, _) = l.locate(at, 1).unwrap();
                    assert!(share.contains(index), "stream {s}: page at {at:#x}");
                }
            }
            all.extend(parts);
        }
        let mut next = (0usize, 0u64);
        for p in &all {
            if p.region != next.0 {
                assert_eq!(next.1, l.regions()[next.0].size, "region {} ends", next.0);
                next = (p.region, 0);
            }
            assert_eq!((p.region, p.offset), next, "no gap, no overlap");
            next.1 = p.offset + p.len;
        }
        assert_eq!(
            next,
            (l.regions().len() - 1, l.regions().last().unwrap().size)
        );
        let total: u64 = all.iter().map(|p| p.len).sum();
        assert_eq!(total, l.total_bytes(), "registered = guest memory");
    }

    #[test]
    fn shares_tile_guest_memory_one_range_per_region_touched() {
        // 12 MiB + 4 MiB of 4 KiB pages: 48 + 16 words.
        let two = layout(4096, &[(0, 12 << 20), (1 << 32, 4 << 20)]);
        assert_eq!(
            share_ranges(&two, 0, 2),
            [Part {
                region: 0,
                offset: 0,
                len: 8 << 20
            }]
        );
        assert_eq!(
            share_ranges(&two, 1, 2),
            [
                Part {
                    region: 0,
                    offset: 8 << 20,
                    len: 4 << 20
                },
                Part {
                    region: 1,
                    offset: 0,
                    len: 4 << 20
                }
            ]
        );
        for streams in [1, 2, 3, 5, 64, 65, 256] {
            tiles(&two, streams);
        }
        // Regions whose page counts are no multiple of 64 (padding bits),
        // a share spanning several regions, 64 KiB pages.
        let odd = layout(
            4096,
            &[(0, 100 * 4096), (1 << 30, 3 * 4096), (1 << 31, 129 * 4096)],
        );
        for streams in [1, 2, 3, 4, 7, 9] {
            tiles(&odd, streams);
        }
        assert_eq!(share_ranges(&odd, 0, 1).len(), 3);
        let wide = layout(65536, &[(0, 1 << 30), (1 << 32, 65536)]);
        for streams in [1, 2, 17, 256] {
            tiles(&wide, streams);
        }
    }

    #[test]
    fn a_stream_with_an_empty_share_owns_nothing() {
        // One word, four streams: three own nothing.
        let small = layout(4096, &[(0, 64 * 4096)]);
        let owned: Vec<usize> = (0..4).map(|s| share_ranges(&small, s, 4).len()).collect();
        assert_eq!(owned.iter().sum::<usize>(), 1);
        tiles(&small, 4);
    }
}
