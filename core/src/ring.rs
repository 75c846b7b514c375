//! Ring: each worker's send buffers, the memory the transports drain.
//!
//! A ring is one page-aligned anonymous mapping cut into equal slots. The
//! mapping never moves while any slot lives, so the RDMA transport can
//! register it once as a memory region and post slot addresses directly; the
//! TCP transport writes slots with one vectored write each. A slot travels as
//! a [`SendBuf`], which is not `Clone`: whoever holds it is the only one who
//! may touch its bytes. The worker fills a slot, hands it to its stream
//! (`StreamTx::submit`) and takes the next free one (`StreamTx::take_free`);
//! the transport gives a slot back only once its bytes have left (or, over
//! RDMA, once a later signaled completion proved they were read).

use std::sync::Arc;

use thiserror::Error;

/// Errors of ring construction.
#[derive(Debug, Error)]
pub enum RingError {
    /// ring geometry is zero-sized or not page-aligned
    #[error("ring of {slots} slots of {slot_size} bytes: need at least one slot and a non-zero, page-multiple slot size")]
    Geometry { slots: usize, slot_size: usize },
    /// the anonymous mapping failed
    #[error("mapping a {bytes}-byte send ring: {source}")]
    Map {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The mapping behind a ring. Owns the memory; slots point into it.
#[derive(Debug)]
struct RingMem {
    base: *mut u8,
    len: usize,
    _map: memmap2::MmapMut,
}

// SAFETY: RingMem only hands its memory out through SendBufs, each of which
// owns a disjoint slot; the raw pointer is the mapping's own base, valid for
// as long as `_map` lives (which the Arc in every SendBuf guarantees).
unsafe impl Send for RingMem {}
// SAFETY: as above: shared access to RingMem never touches slot bytes; each
// slot's bytes are reachable only through the one SendBuf that owns it.
unsafe impl Sync for RingMem {}

/// How many slots a worker's ring has, and how large each is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingShape {
    pub slots: usize,
    pub slot_size: usize,
}

impl RingShape {
    /// Eight slots of 256 KiB (2 MiB per worker), for a transport that keeps
    /// a slot's bytes in flight until the peer has read them (RDMA): room for
    /// the bandwidth-delay product while the worker fills the next slots.
    pub const IN_FLIGHT: RingShape = RingShape {
        slots: 8,
        slot_size: 256 << 10,
    };

    /// Four slots of 64 KiB (256 KiB per worker), for a transport whose send
    /// copies a slot out at once (TCP: the kernel copies it into the
    /// socket): a ring this small stays in the core's cache between the
    /// worker's copy in and the kernel's copy out. TCP round 0 of a 1 GiB
    /// guest full of data on the 2-core machine ran at 1.2-1.3x the rate it
    /// had with [`RingShape::IN_FLIGHT`].
    pub const COPIED: RingShape = RingShape {
        slots: 4,
        slot_size: 64 << 10,
    };
}

/// A ring of `slots` page-aligned send buffers of `slot_size` bytes each.
#[derive(Debug)]
pub struct Ring {
    mem: Arc<RingMem>,
    slot_size: usize,
    slots: usize,
}

impl Ring {
    pub fn new(slots: usize, slot_size: usize) -> Result<Ring, RingError> {
        let page = crate::memory::host_page_size();
        if slots == 0 || slot_size == 0 || slot_size % page != 0 {
            return Err(RingError::Geometry { slots, slot_size });
        }
        let bytes = slots
            .checked_mul(slot_size)
            .ok_or(RingError::Geometry { slots, slot_size })?;
        let mut map =
            memmap2::MmapMut::map_anon(bytes).map_err(|source| RingError::Map { bytes, source })?;
        let base = map.as_mut_ptr();
        Ok(Ring {
            mem: Arc::new(RingMem {
                base,
                len: bytes,
                _map: map,
            }),
            slot_size,
            slots,
        })
    }

    /// The whole mapping (for memory registration): base address and length.
    pub fn region(&self) -> (*const u8, usize) {
        (self.mem.base as *const u8, self.mem.len)
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Hands out every slot, empty.
    pub fn into_bufs(self) -> Vec<SendBuf> {
        (0..self.slots)
            .map(|index| SendBuf {
                mem: Arc::clone(&self.mem),
                offset: index * self.slot_size,
                cap: self.slot_size,
                len: 0,
            })
            .collect()
    }
}

/// One slot of a ring, owned by whoever holds it.
#[derive(Debug)]
pub struct SendBuf {
    mem: Arc<RingMem>,
    offset: usize,
    cap: usize,
    len: usize,
}

impl SendBuf {
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes still free in this slot.
    pub fn remaining(&self) -> usize {
        self.cap - self.len
    }

    /// Byte offset of this slot inside its ring's mapping.
    pub fn ring_offset(&self) -> usize {
        self.offset
    }

    /// The bytes written so far.
    pub fn filled(&self) -> &[u8] {
        // SAFETY: offset + len <= offset + cap <= the mapping's length (set up
        // in Ring::into_bufs and kept by `advance`), and this SendBuf is the
        // only owner of the slot, so no one writes these bytes meanwhile.
        unsafe { std::slice::from_raw_parts(self.mem.base.add(self.offset), self.len) }
    }

    /// The free part of the slot, to be written and then committed with [`SendBuf::advance`].
    pub fn spare(&mut self) -> &mut [u8] {
        // SAFETY: the range [offset+len, offset+cap) lies inside the mapping
        // and inside this slot, which `&mut self` owns exclusively.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.base.add(self.offset + self.len),
                self.cap - self.len,
            )
        }
    }

    /// Marks `n` more bytes as written. Never grows past the capacity.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.cap);
    }

    /// Appends `bytes` if they fit; returns whether they did.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.remaining() {
            return false;
        }
        self.spare()[..bytes.len()].copy_from_slice(bytes);
        self.advance(bytes.len());
        true
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_page_aligned_and_stable() {
        let page = crate::memory::host_page_size();
        let ring = Ring::new(4, 2 * page).unwrap();
        let (base, len) = ring.region();
        assert_eq!(base as usize % page, 0);
        assert_eq!(len, 8 * page);
        let mut bufs = ring.into_bufs();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.ring_offset(), i * 2 * page);
            assert!(b.push(&[i as u8; 10]));
        }
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.filled(), &[i as u8; 10]);
        }
        let b = &mut bufs[0];
        assert!(
            !b.push(&vec![0; 2 * page]),
            "a push past the capacity is refused"
        );
        assert_eq!(b.len(), 10);
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(Ring::new(0, 4096).is_err());
        assert!(Ring::new(1, 100).is_err());
    }
}
