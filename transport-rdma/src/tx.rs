//! Source side of one stream: posts a filled ring slot as RDMA WRITEs.
//!
//! The slot is walked record by record with hpmig-core's
//! [`Records`] reader, the one every end uses (the worker wrote these
//! records, so one that does not decode is a bug here: the stream fails
//! with [`StreamError::Record`]). Segment and Page payloads are written straight from the ring
//! to region base + guest address at the destination, payloads for adjacent
//! guest addresses gathered into one work request (up to [`MAX_SGE`]
//! scatter entries). Every other byte (headers, zero markers, zstd payloads,
//! the round end) is packed, in order, into a destination staging slot,
//! gathered the same way. The batch's last work request carries the
//! immediate ([`crate::imm`]: worker, batch, staged length) that tells the
//! destination the batch has landed: an RC queue pair completes a later
//! message only after every earlier one is placed.
//!
//! Credits: the destination owns `slots` staging slots and returns one
//! (a SEND without payload) each time it has consumed a batch; the source
//! writes a batch only while it holds a credit, so no staging slot is
//! overwritten before it is read. A ring slot goes back to the worker once a
//! signaled completion at or after its last work request was polled.
//!
//! Round boundaries: records that the destination applies when it reads
//! them (a zero marker, a zstd page) and payloads that land in place must
//! not overtake one another for the same page. Within a round a page has one
//! kind of record, so the only hazard is across rounds; the first batch of a
//! round is therefore posted only after the destination consumed every batch
//! of the previous one (all credits back). That costs one round trip per
//! round, not per page.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hpmig_core::memory::find_region;
use hpmig_core::protocol::{Kind, Records, HEADER_LEN};
use hpmig_core::ring::SendBuf;
use hpmig_core::transport::{Interrupt, StreamTx, TransportError};

use hpmig_transport_tcp::Conn;

use crate::backoff::Backoff;
use crate::imm::imm;
use crate::setup::{Answer, RemoteRegion};
use crate::stream::StreamError;
use crate::verbs::{Completion, Cq, Mr, Qp, SendList, Sge, WcOpcode};

/// Work requests per `ibv_post_send` (one doorbell) at most.
pub const POST_CHUNK: usize = 64;
/// Every this many work requests one is signaled, so the send queue drains
/// even inside a batch larger than the queue.
const SIGNAL_EVERY: u64 = 32;
/// Scatter entries gathered into one work request at most (capped by the
/// device's max_sge).
pub const MAX_SGE: usize = 16;

/// Counters of one transport, shared by its streams.
#[derive(Debug, Default)]
pub struct RdmaStats {
    pub work_requests: AtomicU64,
    pub doorbells: AtomicU64,
    pub inline: AtomicU64,
    pub batches: AtomicU64,
    pub in_place_bytes: AtomicU64,
    pub staged_bytes: AtomicU64,
}

impl RdmaStats {
    /// Work requests per doorbell (posted chain) so far.
    pub fn per_doorbell(&self) -> f64 {
        let d = self.doorbells.load(Ordering::Relaxed).max(1);
        self.work_requests.load(Ordering::Relaxed) as f64 / d as f64
    }
}

/// Where the destination registered guest range `[gpa, gpa + len)`: the
/// region's index, the remote address and key; `None` unless all of it
/// lies in one region. `hint` is tried first.
fn remote_of(
    regions: &[RemoteRegion],
    gpa: u64,
    len: u64,
    hint: usize,
) -> Option<(usize, u64, u32)> {
    let at = find_region(regions.iter().map(|r| (r.gpa, r.len)), gpa, len, hint)?;
    let r = regions.get(at.region)?;
    Some((at.region, r.addr.checked_add(at.offset)?, r.rkey))
}

/// The remote address of the staging slot batch `seq` goes to: slot
/// `seq % slots` of the destination's staging area of `slots` slots of
/// `slot_size` bytes at `addr` (all three from its Answer). `None` for no
/// slots or an address that would wrap, never a division by zero or a
/// wrapped address.
fn staging_slot(addr: u64, slots: u32, slot_size: u64, seq: u32) -> Option<u64> {
    let slot = seq.checked_rem(slots)?;
    addr.checked_add(u64::from(slot).checked_mul(slot_size)?)
}

/// One work request being gathered: local pieces for one contiguous
/// remote range.
#[derive(Clone, Copy)]
struct Gather {
    sges: [Sge; MAX_SGE],
    n: usize,
    remote: u64,
    rkey: u32,
    bytes: u64,
}

impl Gather {
    fn new() -> Gather {
        Gather {
            sges: [Sge::default(); MAX_SGE],
            n: 0,
            remote: 0,
            rkey: 0,
            bytes: 0,
        }
    }

    /// Whether `len` bytes for `remote` continue this request.
    fn continues(&self, remote: u64, rkey: u32, max_sge: usize, local: u64) -> bool {
        self.n > 0
            && rkey == self.rkey
            && self.remote.checked_add(self.bytes) == Some(remote)
            && (self.n < max_sge || self.last_end() == local)
    }

    fn last_end(&self) -> u64 {
        self.sges[self.n - 1].end()
    }

    /// Appends a piece (merged with the previous one when adjacent).
    fn add(&mut self, local: u64, len: u32, lkey: u32) {
        if self.n > 0 && self.last_end() == local {
            self.sges[self.n - 1].length += len;
        } else {
            self.sges[self.n] = Sge {
                addr: local,
                length: len,
                lkey,
            };
            self.n += 1;
        }
        self.bytes += u64::from(len);
    }
}

/// The sending half of one RDMA stream.
#[derive(Debug)]
pub struct RdmaTx {
    // Field order is drop order: the queue pair goes first, then the ring's
    // registration, then the slots (whose Arc keeps the ring mapped).
    qp: Arc<Qp>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    ring_mr: Mr,
    free: Vec<SendBuf>,
    /// Posted slots, with the id of their last work request.
    inflight: VecDeque<(u64, SendBuf)>,
    worker: u32,
    regions: Vec<RemoteRegion>,
    /// Last region hit (guest addresses of a batch are mostly in one).
    hint: usize,
    staging_addr: u64,
    staging_rkey: u32,
    staging_slots: u32,
    staging_slot_size: u64,
    credits: u32,
    seq: u32,
    /// The previous batch closed a round: drain before posting.
    round_closed: bool,
    next_wr_id: u64,
    completed_wr_id: u64,
    sq_depth: u64,
    max_inline: u32,
    /// The chain being built (up to POST_CHUNK work requests of up to
    /// MAX_SGE pieces), posted when full and at the end of a batch.
    wrs: SendList,
    max_sge: usize,
    /// The page size the worker's records were written for (bounds the
    /// Segment and Page records the batch walk decodes).
    page_size: u32,
    stats: Arc<RdmaStats>,
    interrupt: Interrupt,
    timeout: Duration,
    /// The stream's TCP setup connection, kept open as a liveness signal:
    /// the destination closes it when its end of the stream goes away.
    liveness: Conn,
}

pub(crate) struct TxParts {
    pub qp: Arc<Qp>,
    pub send_cq: Arc<Cq>,
    pub recv_cq: Arc<Cq>,
    pub ring_mr: Mr,
    pub bufs: Vec<SendBuf>,
    pub worker: u32,
    pub answer: Answer,
    pub sq_depth: u32,
    pub max_sge: usize,
    pub page_size: u32,
    pub stats: Arc<RdmaStats>,
    pub interrupt: Interrupt,
    pub timeout: Duration,
    pub liveness: Conn,
}

impl RdmaTx {
    pub(crate) fn new(p: TxParts) -> RdmaTx {
        let max_inline = p.qp.max_inline;
        RdmaTx {
            qp: p.qp,
            send_cq: p.send_cq,
            recv_cq: p.recv_cq,
            ring_mr: p.ring_mr,
            free: p.bufs,
            inflight: VecDeque::new(),
            worker: p.worker,
            regions: p.answer.regions,
            hint: 0,
            staging_addr: p.answer.staging_addr,
            staging_rkey: p.answer.staging_rkey,
            staging_slots: p.answer.slots,
            staging_slot_size: u64::from(p.answer.slot_size),
            credits: p.answer.slots,
            seq: 0,
            round_closed: false,
            next_wr_id: 1,
            completed_wr_id: 0,
            sq_depth: u64::from(p.sq_depth),
            max_inline,
            wrs: SendList::new(POST_CHUNK, MAX_SGE),
            max_sge: p.max_sge.clamp(1, MAX_SGE),
            page_size: p.page_size,
            stats: p.stats,
            interrupt: p.interrupt,
            timeout: p.timeout,
            liveness: p.liveness,
        }
    }

    /// The queue pair (tests force it into the error state).
    pub fn queue_pair(&self) -> &Arc<Qp> {
        &self.qp
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

    /// Polls both queues once: frees slots whose writes completed and takes
    /// returned credits. Returns whether anything happened.
    fn progress(&mut self) -> Result<bool, TransportError> {
        let mut wc = [Completion::default(); 16];
        let mut any = false;
        let n = self
            .send_cq
            .poll(&mut wc)
            .map_err(StreamError::verbs(self.worker))?;
        for c in &wc[..n] {
            if !c.ok() {
                return Err(self.completion_error(c, "an RDMA WRITE"));
            }
            self.completed_wr_id = self.completed_wr_id.max(c.wr_id);
            any = true;
        }
        while let Some((last, _)) = self.inflight.front() {
            if *last > self.completed_wr_id {
                break;
            }
            if let Some((_, b)) = self.inflight.pop_front() {
                self.free.push(b);
            }
        }
        let n = self
            .recv_cq
            .poll(&mut wc)
            .map_err(StreamError::verbs(self.worker))?;
        for c in &wc[..n] {
            if !c.ok() {
                return Err(self.completion_error(c, "a credit receive"));
            }
            if c.opcode != WcOpcode::Recv {
                return Err(StreamError::Opcode {
                    worker: self.worker,
                    got: c.opcode,
                    expected: "a credit SEND",
                }
                .into());
            }
            self.qp
                .post_recv_empty(0)
                .map_err(StreamError::verbs(self.worker))?;
            self.credits += 1;
            any = true;
        }
        if self.credits > self.staging_slots {
            return Err(StreamError::Credits {
                worker: self.worker,
                credits: self.credits,
                slots: self.staging_slots,
            }
            .into());
        }
        Ok(any)
    }

    /// Polls until `done(self)` holds, failing on interrupt or after the
    /// stream's timeout without progress.
    fn wait(
        &mut self,
        what: &'static str,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), TransportError> {
        let mut backoff = Backoff::new(self.worker, self.timeout);
        while !done(self) {
            if self.progress()? {
                backoff.progressed();
                continue;
            }
            // Now and then look at the liveness connection: a destination
            // that went away returns no credits and posts no error; its
            // closed connection says so at once.
            if backoff.idle(&self.interrupt, what)? && self.liveness.peer_closed() {
                return Err(StreamError::PeerClosed {
                    worker: self.worker,
                    waiting_for: what,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Where the destination registered guest range `[gpa, gpa + len)`:
    /// the remote address and key. One lookup for every end (checked
    /// arithmetic, the last region hit tried first).
    fn region_of(&mut self, gpa: u64, len: u64) -> Result<(u64, u32), StreamError> {
        let Some((region, remote, rkey)) = remote_of(&self.regions, gpa, len, self.hint) else {
            return Err(StreamError::NotRegistered {
                worker: self.worker,
                gpa,
                len,
            });
        };
        self.hint = region;
        Ok((remote, rkey))
    }

    /// `addr + offset` of a remote address the destination gave.
    fn remote(&self, addr: u64, offset: u64) -> Result<u64, StreamError> {
        addr.checked_add(offset).ok_or(StreamError::RemoteWraps {
            worker: self.worker,
            addr,
            offset,
        })
    }

    /// Posts the work requests built in `wrs` as one chain.
    fn post(&mut self) -> Result<(), TransportError> {
        if self.wrs.is_empty() {
            return Ok(());
        }
        let depth = self.sq_depth;
        let need = self.wrs.len() as u64;
        self.wait("send queue space", |s| {
            s.next_wr_id - 1 - s.completed_wr_id + need <= depth
        })?;
        for wr in self.wrs.iter_mut() {
            wr.set_id(self.next_wr_id);
            if self.next_wr_id % SIGNAL_EVERY == 0 {
                wr.set_signaled();
            }
            self.next_wr_id += 1;
        }
        // SAFETY: every local address in `wrs` lies in the ring registered
        // as `ring_mr` (or is inline), and the slot it lies in stays in
        // `inflight`, untouched, until a signaled completion at or after
        // its last work request is polled (see `progress`).
        unsafe { self.qp.post_send(&mut self.wrs) }.map_err(StreamError::verbs(self.worker))?;
        self.wrs.clear();
        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
        self.stats.work_requests.fetch_add(need, Ordering::Relaxed);
        Ok(())
    }

    /// Turns `g` into the next work request of the chain (posting the
    /// chain first when it is full) and empties it.
    fn emit(&mut self, g: &mut Gather) -> Result<(), TransportError> {
        if g.n == 0 {
            return Ok(());
        }
        if self.wrs.is_full() {
            self.post()?;
        }
        let inline = g.bytes <= u64::from(self.max_inline);
        if self
            .wrs
            .push_write(&g.sges[..g.n], g.remote, g.rkey, inline)
            .is_none()
        {
            return Err(StreamError::Internal {
                worker: self.worker,
                what: "no room in the post list for a gathered work request",
            }
            .into());
        }
        if inline {
            self.stats.inline.fetch_add(1, Ordering::Relaxed);
        }
        g.n = 0;
        g.bytes = 0;
        Ok(())
    }

    /// Adds `len` local bytes at `local` for `remote` to `g`, emitting `g`
    /// first when they do not continue it.
    fn gather(
        &mut self,
        g: &mut Gather,
        local: u64,
        len: usize,
        remote: u64,
        rkey: u32,
    ) -> Result<(), TransportError> {
        if !g.continues(remote, rkey, self.max_sge, local) {
            self.emit(g)?;
            g.remote = remote;
            g.rkey = rkey;
        }
        g.add(local, len as u32, self.ring_mr.lkey);
        Ok(())
    }
}

impl StreamTx for RdmaTx {
    fn take_free(&mut self) -> Result<SendBuf, TransportError> {
        self.interrupt.check()?;
        self.wait("a ring slot to be sent", |s| !s.free.is_empty())?;
        let mut b = self.free.pop().ok_or(StreamError::Internal {
            worker: self.worker,
            what: "no free ring slot after waiting for one",
        })?;
        b.clear();
        Ok(b)
    }

    fn submit(&mut self, buf: SendBuf) -> Result<(), TransportError> {
        self.interrupt.check()?;
        if buf.is_empty() {
            self.free.push(buf);
            return Ok(());
        }
        if buf.len() as u64 > self.staging_slot_size {
            return Err(StreamError::StagingOverflow {
                worker: self.worker,
                len: buf.len(),
                slot_size: self.staging_slot_size,
            }
            .into());
        }
        if self.round_closed {
            let all = self.staging_slots;
            self.wait("the destination to finish the previous round", |s| {
                s.credits == all
            })?;
            self.round_closed = false;
        }
        self.wait("a staging credit", |s| s.credits > 0)?;
        self.credits -= 1;
        // Answer::check and Answer::decode made sure there is a slot and the
        // staging area does not wrap; checked all the same.
        let staging = staging_slot(
            self.staging_addr,
            self.staging_slots,
            self.staging_slot_size,
            self.seq,
        )
        .ok_or_else(|| StreamError::RemoteWraps {
            worker: self.worker,
            addr: self.staging_addr,
            offset: u64::from(self.seq % self.staging_slots.max(1))
                .saturating_mul(self.staging_slot_size),
        })?;
        let srkey = self.staging_rkey;
        let bytes = buf.filled();
        let base = bytes.as_ptr() as u64;
        let (mut placed, mut staged) = (Gather::new(), Gather::new());
        let mut staged_len = 0u64;
        let mut in_place = 0u64;
        // Offset of the current record in the slot.
        let mut at = 0usize;
        for record in Records::new(bytes, self.page_size) {
            let (header, payload) = record.map_err(|source| StreamError::Record {
                worker: self.worker,
                at,
                source,
            })?;
            let plen = payload.len();
            if header.kind == Kind::RoundEnd {
                self.round_closed = true;
            }
            let local = base + at as u64;
            let to_staging = self.remote(staging, staged_len)?;
            if matches!(header.kind, Kind::Segment | Kind::Page) && plen > 0 {
                self.gather(&mut staged, local, HEADER_LEN, to_staging, srkey)?;
                staged_len += HEADER_LEN as u64;
                let (remote, rkey) = self.region_of(header.arg, plen as u64)?;
                self.gather(&mut placed, local + HEADER_LEN as u64, plen, remote, rkey)?;
                in_place += plen as u64;
            } else {
                let whole = HEADER_LEN + plen;
                self.gather(&mut staged, local, whole, to_staging, srkey)?;
                staged_len += whole as u64;
            }
            at += HEADER_LEN + plen;
        }
        self.emit(&mut placed)?;
        self.emit(&mut staged)?;
        let (staged_bytes, staged_len) = (staged_len, staged_len as usize);
        // The last work request carries the immediate and is signaled.
        let imm = imm(self.worker, self.seq, staged_len);
        let Some(last) = self.wrs.last_mut() else {
            return Err(StreamError::Internal {
                worker: self.worker,
                what: "a batch made no work request",
            }
            .into());
        };
        last.set_imm(imm);
        last.set_signaled();
        self.post()?;
        let last_id = self.next_wr_id - 1;
        self.inflight.push_back((last_id, buf));
        self.seq = self.seq.wrapping_add(1);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .in_place_bytes
            .fetch_add(in_place, Ordering::Relaxed);
        self.stats
            .staged_bytes
            .fetch_add(staged_bytes, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for RdmaTx {
    fn drop(&mut self) {
        // Every posted batch must complete before the ring's registration
        // and the queue pair go away; on failure the queue pair is put in
        // the error state, which flushes what is left.
        if self
            .wait("the last batches to complete", |s| s.inflight.is_empty())
            .is_err()
        {
            let _ = self.qp.set_error();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_range_maps_to_its_region_and_a_hostile_one_to_none() {
        let regions = [
            RemoteRegion {
                gpa: 0,
                len: 0x10_0000,
                addr: 0x7000_0000,
                rkey: 1,
            },
            RemoteRegion {
                gpa: 0x1_0000_0000,
                len: 0x10_0000,
                addr: 0x9000_0000,
                rkey: 2,
            },
        ];
        assert_eq!(remote_of(&regions, 0x1000, 8, 0), Some((0, 0x7000_1000, 1)));
        // A wrong hint falls back to the search.
        assert_eq!(
            remote_of(&regions, 0x1_0000_0010, 16, 0),
            Some((1, 0x9000_0010, 2))
        );
        assert_eq!(
            remote_of(&regions, 0x1000, 8, 99),
            Some((0, 0x7000_1000, 1))
        );
        // Straddling a region's end, past every region, wrapping: none.
        assert_eq!(remote_of(&regions, 0xf_fff8, 16, 0), None);
        assert_eq!(remote_of(&regions, 0x2_0000_0000, 1, 1), None);
        assert_eq!(remote_of(&regions, u64::MAX - 4, 16, 0), None);
        // A remote address that would wrap is refused, not wrapped.
        let high = [RemoteRegion {
            addr: u64::MAX - 0x10,
            ..regions[0]
        }];
        assert_eq!(remote_of(&high, 0x1000, 8, 0), None);
    }

    #[test]
    fn a_staging_slot_is_inside_the_staging_area_or_none() {
        let slot = 256 << 10;
        assert_eq!(staging_slot(0x7000_0000, 8, slot, 0), Some(0x7000_0000));
        assert_eq!(
            staging_slot(0x7000_0000, 8, slot, 9),
            Some(0x7000_0000 + slot)
        );
        // No slots, an address or a slot offset that would wrap: none.
        assert_eq!(staging_slot(0x7000_0000, 0, slot, 3), None);
        assert_eq!(staging_slot(u64::MAX - slot, 8, slot, 2), None);
        assert_eq!(staging_slot(0, u32::MAX, u64::MAX, u32::MAX - 1), None);
    }
}
