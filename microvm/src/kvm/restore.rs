//! The destination's micro-VM: created from a state record and restored
//! before the Ack ([`RestoredVm::new`]), run only after the Commit
//! ([`RestoredVm::start`]); dropping it discards it.

use std::sync::Arc;

use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_core::guest::GuestError;
use hpmig_core::memory::DestMemory;
use hpmig_core::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use kvm_bindings::Msrs;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::state::VmState;
use super::{kvm_err, params, Created, KvmConfig, KvmVm};

/// A micro-VM rebuilt on the destination from a state record: created,
/// every vCPU's state applied, nothing running yet. [`RestoredVm::start`]
/// runs it (after the Commit); dropping it discards it.
pub struct RestoredVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    fds: Vec<VcpuFd>,
    memory: DestMemory,
    cfg: KvmConfig,
}

impl std::fmt::Debug for RestoredVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredVm")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A micro-VM created on the destination's guest memory before round 0
/// (its memory slots registered, its vCPUs created): what restoring costs
/// in proportion to guest memory (about 6 ms per GiB here), done before the
/// pause instead of in it.
pub struct PreparedVm {
    created: Created,
    vcpus: u32,
    /// The host addresses of the memory it was prepared on.
    hosts: Vec<usize>,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

fn hosts(memory: &DestMemory) -> Vec<usize> {
    memory.iter().map(|r| r.as_ptr() as usize).collect()
}

impl PreparedVm {
    pub fn new(memory: &DestMemory, vcpus: u32) -> Result<Self, GuestError> {
        Ok(PreparedVm {
            created: KvmVm::create(memory, vcpus, DirtyLogMode::Bitmap)?,
            vcpus,
            hosts: hosts(memory),
        })
    }
}

impl RestoredVm {
    /// Creates a micro-VM on received `memory` (or takes `prepared`, if it
    /// was made for this memory and vCPU count) and applies `st` to it.
    /// Fails on anything this host cannot take (vCPU count, XSAVE size,
    /// MSRs).
    pub fn new(
        memory: DestMemory,
        st: VmState,
        prepared: Option<PreparedVm>,
    ) -> Result<Self, GuestError> {
        let vcpus = st.vcpus.len() as u32;
        let Created { kvm, vm, fds, .. } =
            match prepared.filter(|p| p.vcpus == vcpus && p.hosts == hosts(&memory)) {
                Some(p) => p.created,
                None => KvmVm::create(&memory, vcpus, DirtyLogMode::Bitmap)?,
            };
        let mut clock = st.clock;
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in &st.irqchips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        // No XSTATE feature is enabled dynamically here, so the XSAVE area
        // must fit the legacy 4096-byte kvm_xsave; refuse if KVM says otherwise.
        let xsave2 = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if xsave2 > 4096 {
            return Err(GuestError::State(format!(
                "this host's XSAVE area is {xsave2} bytes; the micro-VM carries 4096"
            )));
        }
        for (fd, v) in fds.iter().zip(&st.vcpus) {
            fd.set_sregs(&v.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&v.regs).map_err(kvm_err("KVM_SET_REGS"))?;
            // SAFETY: KVM_SET_XSAVE copies at most the XSAVE2 size, checked
            // above to fit the 4096-byte kvm_xsave we pass.
            unsafe { fd.set_xsave(&v.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
            fd.set_xcrs(&v.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
            fd.set_lapic(&v.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            let msrs = Msrs::from_entries(&v.msrs)
                .map_err(|e| GuestError::State(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n != v.msrs.len() {
                return Err(GuestError::State(format!(
                    "KVM_SET_MSRS set {n} of {} MSRs",
                    v.msrs.len()
                )));
            }
            fd.set_mp_state(v.mp_state)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            fd.set_vcpu_events(&v.events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
            fd.set_debug_regs(&v.debugregs)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        let cfg = KvmConfig {
            workload: st.workload,
            vcpus,
            dirty_rate: st.dirty_rate,
            seed: 0,
            dirty_log: DirtyLogMode::Bitmap,
        };
        Ok(RestoredVm {
            kvm,
            vm,
            fds,
            memory,
            cfg,
        })
    }

    /// Runs the restored vCPUs: the destination's last step.
    pub fn start(self) -> Result<KvmVm<()>, GuestError> {
        let size: u64 = self.memory.iter().map(|r| r.len()).sum();
        let (_, run) = params(&self.cfg, size);
        KvmVm::start(
            self.kvm,
            self.vm,
            self.fds,
            self.memory,
            None,
            self.cfg,
            run,
        )
    }
}
