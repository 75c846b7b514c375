//! Destination side of one stream: records arrive by RDMA WRITE; this end
//! only reads headers.
//!
//! A batch is announced by the receive completion of its WRITE WITH
//! IMMEDIATE ([`crate::imm`]: worker, batch sequence, staged length, all
//! checked). Its headers and the payloads that cannot land in place sit
//! packed, in order, in a staging slot; Segment and Page payloads were
//! already written to guest memory by the NIC, so
//! [`StreamRx::read_payload`] only checks that the lander asks for them
//! exactly where they landed and copies nothing. Once the batch is read, a
//! SEND without payload returns its staging slot to the source as a credit.
//!
//! Staging bytes are copied out with raw reads before they are decoded:
//! they are memory a remote peer can write (the NIC), never referenced as a
//! Rust slice.

use std::sync::Arc;
use std::time::Duration;

use hpmig_core::memory::find_region;
use hpmig_core::protocol::{Header, Kind, ProtocolError, HEADER_LEN};
use hpmig_core::ring::Ring;
use hpmig_core::transport::{Interrupt, StreamRx, TransportError};

use hpmig_transport_tcp::Conn;

use crate::backoff::Backoff;
use crate::imm::imm_parts;
use crate::stream::StreamError;
use crate::verbs::{Completion, Cq, Mr, Qp, SendList, WcOpcode};

/// A guest memory range as the lander sees it: guest address, length and
/// where it is mapped here (a whole region, or a stream's part of one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: usize,
}

/// The host address of the staging slot batch `seq` lands in: slot
/// `seq % slots` of `slots` slots of `slot_size` bytes at `base`. `None`
/// for no slots or an address that would wrap.
fn slot_base(base: usize, slots: u32, slot_size: usize, seq: u32) -> Option<usize> {
    let slot = usize::try_from(seq.checked_rem(slots)?).ok()?;
    base.checked_add(slot.checked_mul(slot_size)?)
}

/// Where guest range `[gpa, gpa + len)` is mapped here: the region's index
/// and the host address; `None` unless all of it lies in one region.
/// `hint` is tried first.
fn host_in(regions: &[LocalRegion], gpa: u64, len: u32, hint: usize) -> Option<(usize, usize)> {
    let at = find_region(
        regions.iter().map(|r| (r.gpa, r.len)),
        gpa,
        u64::from(len),
        hint,
    )?;
    let r = regions.get(at.region)?;
    let host = r.host.checked_add(usize::try_from(at.offset).ok()?)?;
    Some((at.region, host))
}

#[derive(Debug)]
enum Pending {
    None,
    /// The payload already landed at this host address.
    InPlace {
        host: usize,
        len: usize,
    },
    /// The payload is in the staging slot at this offset.
    Staged {
        at: usize,
        len: usize,
    },
}

/// The receiving half of one RDMA stream.
#[derive(Debug)]
pub struct RdmaRx {
    // Drop order: queue pair, then the staging registration, then the ring.
    qp: Arc<Qp>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    _staging_mr: Mr,
    staging: Ring,
    slots: u32,
    slot_size: usize,
    worker: u32,
    /// The batch being read: (slot base address, length).
    cur: Option<(usize, usize)>,
    pos: usize,
    seq: u32,
    pending: Pending,
    /// The guest ranges this stream owns, the only ones its keys reach.
    regions: Vec<LocalRegion>,
    /// Last region hit (a batch's payloads are mostly in one).
    hint: usize,
    /// Keeps this stream's guest ranges registered while it can receive.
    _guest: Vec<Mr>,
    /// Credits sent whose completion was not polled yet.
    unacked_credits: u32,
    /// The credit SEND's one-entry work request list, reused.
    credit: SendList,
    interrupt: Interrupt,
    timeout: Duration,
    /// The stream's TCP setup connection, held open while this end lives
    /// (the source watches it).
    _liveness: Conn,
}

pub(crate) struct RxParts {
    pub qp: Arc<Qp>,
    pub send_cq: Arc<Cq>,
    pub recv_cq: Arc<Cq>,
    pub staging_mr: Mr,
    pub staging: Ring,
    pub slots: u32,
    pub slot_size: usize,
    pub worker: u32,
    pub regions: Vec<LocalRegion>,
    pub guest: Vec<Mr>,
    pub interrupt: Interrupt,
    pub timeout: Duration,
    pub liveness: Conn,
}

impl RdmaRx {
    pub(crate) fn new(p: RxParts) -> RdmaRx {
        RdmaRx {
            qp: p.qp,
            send_cq: p.send_cq,
            recv_cq: p.recv_cq,
            _staging_mr: p.staging_mr,
            staging: p.staging,
            slots: p.slots,
            slot_size: p.slot_size,
            worker: p.worker,
            cur: None,
            pos: 0,
            seq: 0,
            pending: Pending::None,
            regions: p.regions,
            hint: 0,
            _guest: p.guest,
            unacked_credits: 0,
            credit: SendList::new(1, 0),
            interrupt: p.interrupt,
            timeout: p.timeout,
            _liveness: p.liveness,
        }
    }

    fn completion_error(&self, c: &Completion, what: &'static str) -> TransportError {
        StreamError::Completion {
            worker: self.worker,
            what,
            status: c.status,
            opcode: c.opcode,
        }
        .into()
    }

    /// Reaps credit-send completions (each credit is signaled).
    fn reap_sends(&mut self) -> Result<(), TransportError> {
        let mut wc = [Completion::default(); 8];
        let n = self
            .send_cq
            .poll(&mut wc)
            .map_err(StreamError::verbs(self.worker))?;
        for c in &wc[..n] {
            if !c.ok() {
                return Err(self.completion_error(c, "a credit SEND"));
            }
            // Only this end's own credit SENDs complete here.
            self.unacked_credits = self.unacked_credits.saturating_sub(1);
        }
        Ok(())
    }

    /// Hands the current staging slot back to the source.
    fn return_credit(&mut self) -> Result<(), TransportError> {
        // The send queue holds `slots` credits at most (one per slot).
        while self.unacked_credits >= self.slots {
            self.reap_sends()?;
            self.interrupt.check()?;
        }
        self.credit.clear();
        let worker = self.worker;
        self.credit
            .push_send()
            .ok_or(StreamError::Internal {
                worker,
                what: "no room in the credit's post list",
            })?
            .set_signaled();
        // SAFETY: a SEND with no scatter entries names no local buffer.
        unsafe { self.qp.post_send(&mut self.credit) }.map_err(StreamError::verbs(self.worker))?;
        self.unacked_credits += 1;
        self.reap_sends()
    }

    /// Waits for the next batch's WRITE WITH IMMEDIATE.
    fn next_batch(&mut self) -> Result<(), TransportError> {
        let mut wc = [Completion::default(); 1];
        let mut backoff = Backoff::new(self.worker, self.timeout);
        loop {
            let n = self
                .recv_cq
                .poll(&mut wc)
                .map_err(StreamError::verbs(self.worker))?;
            if n == 1 {
                break;
            }
            self.reap_sends()?;
            if self.unacked_credits > 0 {
                backoff.alive();
            }
            backoff.idle(&self.interrupt, "a batch")?;
        }
        let c = wc[0];
        if !c.ok() {
            return Err(self.completion_error(&c, "a batch receive"));
        }
        if c.opcode != WcOpcode::RecvRdmaWithImm {
            return Err(StreamError::Opcode {
                worker: self.worker,
                got: c.opcode,
                expected: "an RDMA WRITE WITH IMMEDIATE",
            }
            .into());
        }
        let (worker, seq, len) = imm_parts(c.imm);
        if worker != self.worker & 0x3f || seq != self.seq & 0x3f || len > self.slot_size {
            return Err(StreamError::Immediate {
                worker: self.worker,
                got_worker: worker,
                got_batch: seq,
                got_len: len,
                want_worker: self.worker & 0x3f,
                want_batch: self.seq & 0x3f,
                max_len: self.slot_size,
            }
            .into());
        }
        self.qp
            .post_recv_empty(0)
            .map_err(StreamError::verbs(self.worker))?;
        // slots >= 1 (Offer::grant); slot * slot_size lies inside the
        // staging ring, whose size Ring::new computed with checked
        // arithmetic; checked all the same.
        let (base, _) = self.staging.region();
        let slot = slot_base(base as usize, self.slots, self.slot_size, self.seq).ok_or(
            StreamError::Internal {
                worker: self.worker,
                what: "a staging slot outside the address space",
            },
        )?;
        self.cur = Some((slot, len));
        self.pos = 0;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    /// Where guest range `[gpa, gpa + len)` (from the peer) is mapped
    /// here, if all of it lies in one of this stream's ranges (the only
    /// memory its payloads can have landed in): the one lookup, checked
    /// arithmetic, the last range hit tried first.
    fn host_of(&mut self, gpa: u64, len: u32) -> Option<usize> {
        let (region, host) = host_in(&self.regions, gpa, len, self.hint)?;
        self.hint = region;
        Some(host)
    }
}

impl StreamRx for RdmaRx {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        loop {
            match self.cur {
                Some((_, len)) if self.pos < len => break,
                Some(_) => {
                    self.cur = None;
                    self.return_credit()?;
                }
                None => self.next_batch()?,
            }
        }
        let Some((slot, len)) = self.cur else {
            return Err(StreamError::Internal {
                worker: self.worker,
                what: "no batch after waiting for one",
            }
            .into());
        };
        if len - self.pos < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                needed: HEADER_LEN,
                had: len - self.pos,
            }
            .into());
        }
        let mut head = [0u8; HEADER_LEN];
        // SAFETY: slot + pos + HEADER_LEN <= slot + len <= slot + slot_size,
        // inside the staging mapping (len was checked against slot_size when
        // the batch arrived); a raw copy, since the NIC may write it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (slot + self.pos) as *const u8,
                head.as_mut_ptr(),
                HEADER_LEN,
            )
        };
        let h = Header::decode(&head, page_size)?;
        self.pos += HEADER_LEN;
        let plen = h.len as usize;
        self.pending = if matches!(h.kind, Kind::Segment | Kind::Page) {
            let host = self
                .host_of(h.arg, h.len)
                .ok_or(StreamError::OutsideGuest {
                    worker: self.worker,
                    gpa: h.arg,
                    len: h.len,
                })?;
            Pending::InPlace { host, len: plen }
        } else {
            if len - self.pos < plen {
                return Err(ProtocolError::Truncated {
                    needed: plen,
                    had: len - self.pos,
                }
                .into());
            }
            let at = slot + self.pos;
            self.pos += plen;
            Pending::Staged { at, len: plen }
        };
        Ok(h)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::InPlace { host, len } => {
                if dst.as_ptr() as usize != host || dst.len() != len {
                    return Err(StreamError::Misplaced {
                        worker: self.worker,
                        landed_at: host,
                        len,
                        asked_at: dst.as_ptr() as usize,
                        asked_len: dst.len(),
                    }
                    .into());
                }
                Ok(())
            }
            Pending::Staged { at, len } => {
                if dst.len() != len {
                    return Err(StreamError::PayloadLength {
                        worker: self.worker,
                        len,
                        asked_len: dst.len(),
                    }
                    .into());
                }
                // SAFETY: [at, at + len) lies inside the current batch of
                // the staging mapping (checked in next_header); dst is a
                // distinct Rust buffer of exactly len bytes.
                unsafe { std::ptr::copy_nonoverlapping(at as *const u8, dst.as_mut_ptr(), len) };
                Ok(())
            }
            Pending::None => Err(StreamError::NoHeader {
                worker: self.worker,
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_lands_only_inside_one_region_whatever_its_address() {
        let regions = [
            LocalRegion {
                gpa: 0,
                len: 0xa_0000,
                host: 0x7f00_0000_0000,
            },
            LocalRegion {
                gpa: 0x10_0000,
                len: 0x100_0000,
                host: 0x7f10_0000_0000,
            },
        ];
        assert_eq!(
            host_in(&regions, 0x10_1000, 4096, 0),
            Some((1, 0x7f10_0000_1000))
        );
        assert_eq!(
            host_in(&regions, 0x9_f000, 4096, 1),
            Some((0, 0x7f00_0009_f000))
        );
        // In the hole, across a region's end, wrapping past u64::MAX.
        assert_eq!(host_in(&regions, 0xb_0000, 1, 0), None);
        assert_eq!(host_in(&regions, 0x9_ffff, 2, 0), None);
        assert_eq!(host_in(&regions, u64::MAX, 4096, 0), None);
        assert_eq!(host_in(&regions, u64::MAX - 10, u32::MAX, 1), None);
        // A region mapped so high that the offset would wrap: none.
        let high = [LocalRegion {
            gpa: 0,
            len: 0x10_0000,
            host: usize::MAX - 0x100,
        }];
        assert_eq!(host_in(&high, 0x1000, 8, 0), None);
    }

    #[test]
    fn a_staging_slot_lies_in_the_ring_or_is_none() {
        assert_eq!(slot_base(0x1000, 4, 0x2000, 5), Some(0x3000));
        assert_eq!(slot_base(0x1000, 0, 0x2000, 5), None);
        assert_eq!(slot_base(usize::MAX - 0x1000, 4, 0x2000, 1), None);
        assert_eq!(slot_base(0, u32::MAX, usize::MAX, 7), None);
    }
}
