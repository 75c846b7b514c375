//! A small safe layer over libibverbs (through `rdma-sys`).
//!
//! One owner per verbs resource, each destroying it on `Drop`; a child holds
//! an `Arc` of its parent (memory region and queue pair → protection domain
//! → device context; completion queue → context), so no parent is freed
//! while a child lives. Posting is `unsafe`: the caller promises that the
//! buffers a work request names stay valid and unchanged until its
//! completion is polled (or, unsignaled, until a later signaled work request
//! of the same queue pair completes).
//!
//! libibverbs objects may be used from several threads; the raw pointers
//! below are only ever passed back to libibverbs.
//!
//! This module (with `codes` and `wr`) is the crate's only door to
//! `rdma_sys`: the rest of the crate sees the safe types ([`Mtu`],
//! [`PortState`], [`WcStatus`], [`WcOpcode`], [`QpCaps`], [`Sge`],
//! [`SendList`]) and never an `ibv_*` type.

use std::ffi::CStr;
use std::sync::Arc;

use hpmig_core::transport::TransportError;
use rdma_sys::*;
use thiserror::Error;

mod codes;
mod wr;

pub use codes::{Mtu, PortState, WcOpcode, WcStatus};
pub use wr::{SendList, SendWr, Sge};

/// Errors of verbs calls: which call failed, and the errno (or count) it
/// gave.
#[derive(Debug, Error)]
pub enum VerbsError {
    /// a verbs call failed with an errno
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// ibv_poll_cq returned a negative count
    #[error("ibv_poll_cq failed: returned {rc}")]
    Poll { rc: i32 },
    /// the device list could not be read while looking for a device by name
    #[error("no RDMA device '{name}': ibv_get_device_list failed: {source} (does this kernel have RDMA support loaded? see `hpmig devices`)")]
    DeviceList {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// no verbs device has the name asked for
    #[error("no RDMA device '{name}'{}", present_devices(.present))]
    NoSuchDevice { name: String, present: Vec<String> },
}

/// The tail of [`VerbsError::NoSuchDevice`]'s message: what the host has.
fn present_devices(names: &[String]) -> String {
    if names.is_empty() {
        ": this host has no verbs devices".to_string()
    } else {
        format!("; this host has: {}", names.join(", "))
    }
}

impl From<VerbsError> for TransportError {
    fn from(e: VerbsError) -> Self {
        TransportError::Device(Box::new(e))
    }
}

/// The error of a call that set errno (or returned it, as the post and
/// modify calls do: a positive return value is the errno).
fn errno(call: &'static str, rc: i32) -> VerbsError {
    let source = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    VerbsError::Call { call, source }
}

/// Names of the verbs devices on this host. A kernel without RDMA support
/// (libibverbs answers ENOSYS) has none.
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count to `n` and returns a list
    // we free below; each entry is valid until then.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Unsupported {
            return Ok(Vec::new());
        }
        return Err(VerbsError::Call {
            call: "ibv_get_device_list",
            source: err,
        });
    }
    let names = (0..n.max(0) as usize)
        .map(|i| {
            // SAFETY: i < n, the list's length; ibv_get_device_name returns
            // a NUL-terminated string owned by the device entry.
            unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// An open device.
#[derive(Debug)]
pub struct Context {
    ctx: *mut ibv_context,
    name: String,
    attr: DeviceAttr,
}

/// What hpmig reads of `ibv_device_attr`.
#[derive(Clone, Debug)]
pub struct DeviceAttr {
    pub fw_ver: String,
    pub node_guid: u64,
    pub max_qp_wr: i32,
    pub max_sge: i32,
    pub phys_port_cnt: u8,
}

// SAFETY: libibverbs contexts are thread-safe; the pointer is only passed to it.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// What one port reports.
#[derive(Clone, Debug)]
pub struct PortInfo {
    pub state: PortState,
    /// `None` for a value that names no MTU.
    pub active_mtu: Option<Mtu>,
    pub max_mtu: Option<Mtu>,
    pub lid: u16,
    pub gid_table_len: i32,
    pub link_layer: u8,
}

impl Context {
    /// Opens the device called `name` (as `ibv_devices` lists it).
    pub fn open(name: &str) -> Result<Arc<Context>, VerbsError> {
        let mut n = 0;
        // SAFETY: as in device_names.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(VerbsError::DeviceList {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut found = std::ptr::null_mut();
        let mut names = Vec::new();
        for i in 0..n.max(0) as usize {
            // SAFETY: i < n; see device_names.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a valid entry of the list.
            let dev_name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if dev_name == name {
                found = dev;
            }
            names.push(dev_name);
        }
        let ctx = if found.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: `found` is an entry of the still-live list; the opened
            // context does not depend on the list once open.
            unsafe { ibv_open_device(found) }
        };
        let open_err = errno("ibv_open_device", 0);
        // SAFETY: freed once, after the last use of its entries.
        unsafe { ibv_free_device_list(list) };
        if found.is_null() {
            return Err(VerbsError::NoSuchDevice {
                name: name.to_string(),
                present: names,
            });
        }
        if ctx.is_null() {
            return Err(open_err);
        }
        // SAFETY: ibv_device_attr is plain data; all-zero is a valid value.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open; attr is a valid out-parameter.
        let rc = unsafe { ibv_query_device(ctx, &mut attr) };
        let context = Context {
            ctx,
            name: name.to_string(),
            attr: DeviceAttr {
                fw_ver: attr
                    .fw_ver
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8 as char)
                    .collect(),
                node_guid: u64::from_be(attr.node_guid),
                max_qp_wr: attr.max_qp_wr,
                max_sge: attr.max_sge,
                phys_port_cnt: attr.phys_port_cnt,
            },
        };
        if rc != 0 {
            return Err(errno("ibv_query_device", rc));
        }
        Ok(Arc::new(context))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn attr(&self) -> &DeviceAttr {
        &self.attr
    }

    pub fn port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        // SAFETY: plain data, all-zero is valid.
        let mut a: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; `a` is a valid out-parameter of the
        // size the call is told.
        let rc = unsafe { ___ibv_query_port(self.ctx, port, &mut a) };
        if rc != 0 {
            return Err(errno("ibv_query_port", rc));
        }
        Ok(PortInfo {
            state: PortState::from_raw(a.state),
            active_mtu: Mtu::from_raw(a.active_mtu),
            max_mtu: Mtu::from_raw(a.max_mtu),
            lid: a.lid,
            gid_table_len: a.gid_tbl_len,
            link_layer: a.link_layer,
        })
    }

    pub fn gid(&self, port: u8, index: i32) -> Result<[u8; 16], VerbsError> {
        // SAFETY: plain data, all-zero is valid.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; `gid` is a valid out-parameter.
        let rc = unsafe { ibv_query_gid(self.ctx, port, index, &mut gid) };
        if rc != 0 {
            return Err(errno("ibv_query_gid", rc));
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child holds an Arc of this context, so none is left.
        unsafe { ibv_close_device(self.ctx) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: *mut ibv_pd,
    ctx: Arc<Context>,
}

// SAFETY: see Context.
unsafe impl Send for Pd {}
// SAFETY: see Context.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, VerbsError> {
        // SAFETY: the context is open (held by the Arc).
        let pd = unsafe { ibv_alloc_pd(ctx.ctx) };
        if pd.is_null() {
            return Err(errno("ibv_alloc_pd", 0));
        }
        Ok(Arc::new(Pd {
            pd,
            ctx: Arc::clone(ctx),
        }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: no MR or QP is left (each holds an Arc of this PD).
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    mr: *mut ibv_mr,
    _pd: Arc<Pd>,
    pub addr: u64,
    pub len: usize,
    pub lkey: u32,
    pub rkey: u32,
}

// SAFETY: see Context.
unsafe impl Send for Mr {}
// SAFETY: see Context.
unsafe impl Sync for Mr {}

/// Local writes only (a send buffer, a staging ring written by our own NIC
/// needs REMOTE_WRITE as well).
pub const ACCESS_LOCAL: u32 = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
/// Local and remote writes: memory the peer writes into.
pub const ACCESS_REMOTE_WRITE: u32 =
    ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;

impl Mr {
    /// Registers `[addr, addr + len)`.
    ///
    /// # Safety
    /// The range is one mapping that stays mapped for as long as the
    /// returned region lives (the NIC reads or writes it until then).
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: u32,
    ) -> Result<Mr, VerbsError> {
        // SAFETY: the PD is live; the range's validity is the caller's contract.
        let mr = unsafe { ibv_reg_mr(pd.pd, addr.cast(), len, access as i32) };
        if mr.is_null() {
            return Err(errno("ibv_reg_mr", 0));
        }
        // SAFETY: ibv_reg_mr returned a valid region.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Mr {
            mr,
            _pd: Arc::clone(pd),
            addr: addr as u64,
            len,
            lkey,
            rkey,
        })
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by `register`, deregistered once.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    cq: *mut ibv_cq,
    _ctx: Arc<Context>,
}

// SAFETY: see Context.
unsafe impl Send for Cq {}
// SAFETY: see Context.
unsafe impl Sync for Cq {}

/// One work completion, copied out of the queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    /// The immediate, in host order (meaningful with a `*_WITH_IMM` opcode).
    pub imm: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }
}

impl Cq {
    pub fn new(ctx: &Arc<Context>, entries: i32) -> Result<Arc<Cq>, VerbsError> {
        // SAFETY: the context is open; no completion channel, no vector.
        let cq = unsafe {
            ibv_create_cq(
                ctx.ctx,
                entries,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(errno("ibv_create_cq", 0));
        }
        Ok(Arc::new(Cq {
            cq,
            _ctx: Arc::clone(ctx),
        }))
    }

    /// Polls up to `out.len()` completions into `out`; returns how many.
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize, VerbsError> {
        const N: usize = 32;
        // SAFETY: plain data, all-zero is valid.
        let mut wc: [ibv_wc; N] = unsafe { std::mem::zeroed() };
        let want = out.len().min(N) as i32;
        // SAFETY: the CQ is live and `wc` has room for `want` entries.
        let n = unsafe { ibv_poll_cq(self.cq, want, wc.as_mut_ptr()) };
        if n < 0 {
            return Err(VerbsError::Poll { rc: n });
        }
        for (o, w) in out.iter_mut().zip(&wc[..n as usize]) {
            *o = Completion {
                wr_id: w.wr_id,
                status: WcStatus::from_raw(w.status),
                opcode: WcOpcode::from_raw(w.opcode),
                byte_len: w.byte_len,
                // SAFETY: both union members are a u32.
                imm: u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data }),
            };
        }
        Ok(n as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc of it, so none is left.
        unsafe { ibv_destroy_cq(self.cq) };
    }
}

/// How to reach a queue pair: what the two ends exchange to connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// Path settings of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    pub port: u8,
    pub gid_index: u8,
    pub mtu: Mtu,
}

/// The sizes of a queue pair's queues (`ibv_qp_cap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// Scatter entries per send work request.
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    /// Largest payload sent inline (the device may raise it).
    pub max_inline_data: u32,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct Qp {
    qp: *mut ibv_qp,
    _pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
    /// Largest payload this queue pair sends inline.
    pub max_inline: u32,
    pub qpn: u32,
}

// SAFETY: see Context.
unsafe impl Send for Qp {}
// SAFETY: see Context.
unsafe impl Sync for Qp {}

fn modify(
    qp: *mut ibv_qp,
    attr: &mut ibv_qp_attr,
    mask: u32,
    call: &'static str,
) -> Result<(), VerbsError> {
    // SAFETY: the QP is live; attr is a valid, initialised attribute set.
    let rc = unsafe { ibv_modify_qp(qp, attr, mask as i32) };
    if rc != 0 {
        return Err(errno(call, rc));
    }
    Ok(())
}

impl Qp {
    /// Creates an RC queue pair and moves it to INIT on `port`, accepting
    /// remote writes when `remote_write`.
    pub fn new(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        caps: QpCaps,
        port: u8,
        remote_write: bool,
    ) -> Result<Qp, VerbsError> {
        // SAFETY: plain data, all-zero is valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.cq;
        init.recv_cq = recv_cq.cq;
        init.cap = ibv_qp_cap {
            max_send_wr: caps.max_send_wr,
            max_recv_wr: caps.max_recv_wr,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge,
            max_inline_data: caps.max_inline_data,
        };
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: the PD and CQs are live (and kept alive by the Arcs below).
        let qp = unsafe { ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(errno("ibv_create_qp", 0));
        }
        // SAFETY: ibv_create_qp returned a valid QP.
        let qpn = unsafe { (*qp).qp_num };
        let q = Qp {
            qp,
            _pd: Arc::clone(pd),
            _send_cq: Arc::clone(send_cq),
            _recv_cq: Arc::clone(recv_cq),
            max_inline: init.cap.max_inline_data,
            qpn,
        };
        // SAFETY: plain data, all-zero is valid.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = if remote_write {
            ACCESS_REMOTE_WRITE
        } else {
            ACCESS_LOCAL
        };
        use ibv_qp_attr_mask as m;
        modify(
            qp,
            &mut a,
            (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
            "ibv_modify_qp(INIT)",
        )?;
        Ok(q)
    }

    /// Connects to `remote` (RTR, then RTS), sending from `local_psn`.
    pub fn connect(&self, remote: &Endpoint, local_psn: u32, path: Path) -> Result<(), VerbsError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: plain data, all-zero is valid.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path.mtu.raw();
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = path.port;
        a.ah_attr.grh.dgid.raw = remote.gid;
        a.ah_attr.grh.sgid_index = path.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        modify(
            self.qp,
            &mut a,
            (m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER)
                .0,
            "ibv_modify_qp(RTR)",
        )?;
        // SAFETY: plain data, all-zero is valid.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.sq_psn = local_psn;
        a.max_rd_atomic = 1;
        modify(
            self.qp,
            &mut a,
            (m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC)
                .0,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Moves the queue pair to the error state: every outstanding work
    /// request completes with a flush error (used on failure, and by tests).
    pub fn set_error(&self) -> Result<(), VerbsError> {
        // SAFETY: plain data, all-zero is valid.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        modify(
            self.qp,
            &mut a,
            ibv_qp_attr_mask::IBV_QP_STATE.0,
            "ibv_modify_qp(ERR)",
        )
    }

    /// Posts every work request of `list`, in order, as one chain (one
    /// doorbell). The list is left as it was; clear it to reuse it.
    ///
    /// # Safety
    /// Every local buffer the list's scatter entries name lies in a region
    /// registered on this queue pair's protection domain (or is sent
    /// inline), and stays valid and unchanged until the work request's
    /// completion is polled (or, unsignaled, until a later signaled work
    /// request of this queue pair completes).
    pub unsafe fn post_send(&self, list: &mut SendList) -> Result<(), VerbsError> {
        let Some(first) = list.link() else {
            return Ok(());
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `link` made the chain well formed (every
        // `next` and `sg_list` points into the list's own slabs, which
        // `list`'s borrow keeps in place for this call); the buffers the
        // entries name are the caller's contract.
        let rc = unsafe { ibv_post_send(self.qp, first, &mut bad) };
        if rc != 0 {
            return Err(errno("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Posts a receive work request with id `wr_id` and no buffer: it
    /// accepts a WRITE WITH IMMEDIATE or a SEND without payload. Safe, as
    /// it names no memory.
    pub fn post_recv_empty(&self, wr_id: u64) -> Result<(), VerbsError> {
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` is one work request with no next and
        // no scatter entry, so libibverbs reads nothing but `wr` itself.
        let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(errno("ibv_post_recv", rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once; its CQs and PD outlive it
        // (held by the Arcs of this struct).
        unsafe { ibv_destroy_qp(self.qp) };
    }
}
