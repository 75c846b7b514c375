//! Send work requests: a reusable chain ([`SendList`]) of RDMA WRITEs and
//! SENDs, and the local pieces ([`Sge`]) they gather. Posting it is
//! [`super::Qp::post_send`].

use rdma_sys::{ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode};

/// One local piece of a work request: `length` bytes at `addr` of the
/// registered region whose local key is `lkey`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

impl Sge {
    /// The address just past the piece.
    pub fn end(&self) -> u64 {
        self.addr + u64::from(self.length)
    }
}

/// A send work request inside a [`SendList`]: its id and flags may be set;
/// what it writes is fixed when it is pushed.
#[repr(transparent)]
pub struct SendWr(ibv_send_wr);

impl SendWr {
    pub fn id(&self) -> u64 {
        self.0.wr_id
    }

    pub fn set_id(&mut self, id: u64) {
        self.0.wr_id = id;
    }

    /// Asks for a completion of this work request.
    pub fn set_signaled(&mut self) {
        self.0.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
    }

    pub fn is_signaled(&self) -> bool {
        self.0.send_flags & ibv_send_flags::IBV_SEND_SIGNALED.0 != 0
    }

    pub fn is_inline(&self) -> bool {
        self.0.send_flags & ibv_send_flags::IBV_SEND_INLINE.0 != 0
    }

    /// Carries `imm` (host order): an RDMA WRITE becomes a WRITE WITH
    /// IMMEDIATE and a SEND a SEND WITH IMMEDIATE; the receiver's completion
    /// shows it.
    pub fn set_imm(&mut self, imm: u32) {
        self.0.opcode = match self.0.opcode {
            ibv_wr_opcode::IBV_WR_SEND => ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            _ => ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
        };
        self.0.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
    }
}

impl std::fmt::Debug for SendWr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendWr")
            .field("wr_id", &self.0.wr_id)
            .field("opcode", &self.0.opcode)
            .field("send_flags", &self.0.send_flags)
            .field("num_sge", &self.0.num_sge)
            .finish()
    }
}

/// A zeroed send work request: no next, no scatter entries, opcode 0.
fn zeroed_send_wr() -> SendWr {
    // SAFETY: ibv_send_wr is plain data (integers, raw pointers, unions of
    // those); all-zero is a valid value (null pointers, opcode 0).
    SendWr(unsafe { std::mem::zeroed() })
}

/// Work requests posted together as one chain, with room for `sge_per_wr`
/// scatter entries each. Both slabs are allocated once, by [`SendList::new`],
/// and reused: pushing copies, posting links them in place.
pub struct SendList {
    wrs: Box<[SendWr]>,
    sges: Box<[ibv_sge]>,
    sge_per_wr: usize,
    len: usize,
}

// SAFETY: the raw pointers inside the work requests are null or point into
// this list's own slabs; they are written by `link` and read only by
// ibv_post_send, both under `&mut self`.
unsafe impl Send for SendList {}

impl std::fmt::Debug for SendList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SendList({} of {} work requests, {} scatter entries each)",
            self.len,
            self.wrs.len(),
            self.sge_per_wr
        )
    }
}

impl SendList {
    /// Room for `capacity` work requests of up to `sge_per_wr` scatter
    /// entries each.
    pub fn new(capacity: usize, sge_per_wr: usize) -> SendList {
        let zero_sge = ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        };
        SendList {
            wrs: (0..capacity).map(|_| zeroed_send_wr()).collect(),
            sges: vec![zero_sge; capacity * sge_per_wr].into_boxed_slice(),
            sge_per_wr,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.wrs.len()
    }

    /// Forgets the work requests (after they were posted).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends an RDMA WRITE of the local pieces `sges`, in order, to
    /// `remote_addr` of the peer's region with key `rkey`, sent inline when
    /// `inline`. `None` (and nothing appended) when the list is full or
    /// `sges` has more pieces than a work request here holds.
    pub fn push_write(
        &mut self,
        sges: &[Sge],
        remote_addr: u64,
        rkey: u32,
        inline: bool,
    ) -> Option<&mut SendWr> {
        let wr = self.push(sges)?;
        wr.0.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        if inline {
            wr.0.send_flags = ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.0.wr.rdma.remote_addr = remote_addr;
        wr.0.wr.rdma.rkey = rkey;
        Some(wr)
    }

    /// Appends a SEND without payload. `None` when the list is full.
    pub fn push_send(&mut self) -> Option<&mut SendWr> {
        let wr = self.push(&[])?;
        wr.0.opcode = ibv_wr_opcode::IBV_WR_SEND;
        Some(wr)
    }

    /// Appends a zeroed work request with `sges` copied into its slab.
    fn push(&mut self, sges: &[Sge]) -> Option<&mut SendWr> {
        if self.is_full() || sges.len() > self.sge_per_wr {
            return None;
        }
        let at = self.len * self.sge_per_wr;
        for (slot, s) in self.sges[at..at + sges.len()].iter_mut().zip(sges) {
            *slot = ibv_sge {
                addr: s.addr,
                length: s.length,
                lkey: s.lkey,
            };
        }
        let wr = &mut self.wrs[self.len];
        *wr = zeroed_send_wr();
        wr.0.num_sge = sges.len() as i32;
        self.len += 1;
        Some(wr)
    }

    /// The work requests appended so far.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut SendWr> {
        self.wrs[..self.len].iter_mut()
    }

    /// The last work request appended.
    pub fn last_mut(&mut self) -> Option<&mut SendWr> {
        self.wrs[..self.len].last_mut()
    }

    /// Points each work request at its scatter entries and the next one
    /// (the last at none); returns the first, or `None` when empty.
    pub(super) fn link(&mut self) -> Option<*mut ibv_send_wr> {
        if self.len == 0 {
            return None;
        }
        let wrs = self.wrs.as_mut_ptr().cast::<ibv_send_wr>();
        let sges = self.sges.as_mut_ptr();
        for i in 0..self.len {
            // SAFETY: i < len <= wrs.len(), so `wrs.add(i)` (and `add(i + 1)`
            // when i + 1 < len) lies in the slab; SendWr is a transparent
            // ibv_send_wr. Every pushed work request has num_sge <=
            // sge_per_wr, so its entries i * sge_per_wr.. lie in `sges`. No
            // reference into either slab is live meanwhile.
            unsafe {
                let wr = &mut *wrs.add(i);
                wr.next = if i + 1 < self.len {
                    wrs.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
                wr.sg_list = if wr.num_sge > 0 {
                    sges.add(i * self.sge_per_wr)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        Some(wrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_list_copies_pieces_refuses_overflow_and_links_in_place() {
        let mut list = SendList::new(3, 2);
        let piece = |addr| Sge {
            addr,
            length: 8,
            lkey: 7,
        };
        assert!(list.link().is_none(), "an empty list posts nothing");
        assert!(list.push_write(&[piece(0x10)], 0x1000, 9, true).is_some());
        assert!(
            list.push_write(&[piece(0), piece(1), piece(2)], 0, 9, false)
                .is_none(),
            "more pieces than a work request holds"
        );
        assert!(list
            .push_write(&[piece(0x20), piece(0x40)], 0x2000, 9, false)
            .is_some());
        let last = list.push_send().unwrap();
        last.set_imm(0x0102_0304);
        last.set_signaled();
        assert!(list.is_full());
        assert!(list.push_send().is_none(), "a full list takes no more");
        assert_eq!(list.len(), 3);

        let first = list.link().unwrap();
        let base = list.wrs.as_ptr().cast::<ibv_send_wr>();
        assert_eq!(first.cast_const(), base);
        let wrs = &list.wrs;
        assert!(wrs[0].is_inline() && !wrs[1].is_inline());
        // SAFETY: in-bounds offsets of the three-entry slab.
        let (w1, w2) = unsafe { (base.add(1), base.add(2)) };
        assert_eq!(wrs[0].0.next.cast_const(), w1);
        assert_eq!(wrs[1].0.next.cast_const(), w2);
        assert!(wrs[2].0.next.is_null(), "the chain ends at the last");
        assert_eq!(wrs[1].0.num_sge, 2);
        // SAFETY: in bounds: entry 1 owns scatter slots 2 and 3 of 6.
        let sg = unsafe { list.sges.as_ptr().add(2) };
        assert_eq!(wrs[1].0.sg_list.cast_const(), sg);
        assert_eq!((list.sges[3].addr, list.sges[3].length), (0x40, 8));
        assert!(wrs[2].0.sg_list.is_null(), "a SEND without payload");
        assert_eq!(wrs[2].0.opcode, ibv_wr_opcode::IBV_WR_SEND_WITH_IMM);
        assert!(wrs[2].is_signaled() && !wrs[0].is_signaled());
        // SAFETY: reading the union member just written by set_imm.
        let imm = unsafe { wrs[2].0.imm_data_invalidated_rkey_union.imm_data };
        assert_eq!(u32::from_be(imm), 0x0102_0304);

        list.clear();
        assert!(list.is_empty() && list.link().is_none());
    }
}
