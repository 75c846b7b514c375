//! The guest a command runs: the KVM micro-VM where /dev/kvm works, the
//! emulated guest elsewhere (or when asked), behind one type.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::dirty::{Combined, DirtySource};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::vm::emulated::{EmulatedConfig, EmulatedGuest};
use hpmig_core::vm::kvm::dirty::DirtyLogMode;
use hpmig_core::vm::kvm::state::VmState;
use hpmig_core::vm::kvm::{self, KvmConfig, KvmVm};
use hpmig_core::vm::{Guest, GuestError, Workload};
use vm_memory::bitmap::AtomicBitmap;

/// Which guest to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestChoice {
    /// The KVM micro-VM when /dev/kvm can be opened, else the emulated guest.
    Auto,
    /// The KVM micro-VM (fails without /dev/kvm).
    Kvm,
    /// Host threads writing through vm-memory, as a guest would.
    Emulated,
}

/// A running source guest.
pub enum RunningGuest {
    Kvm(KvmVm<AtomicBitmap>),
    Emulated(EmulatedGuest),
}

/// What to boot.
pub struct BootSpec {
    pub choice: GuestChoice,
    pub workload: Workload,
    pub vcpus: u32,
    pub dirty_rate: Option<u64>,
    pub dirty_log: DirtyLogMode,
}

/// Boots the chosen guest on `memory`; returns it, the dirty source that
/// sees all its writes, and a line saying what runs.
pub fn boot(
    memory: &SourceMemory,
    spec: &BootSpec,
) -> Result<(RunningGuest, Box<dyn DirtySource>, String)> {
    let layout = Layout::of(memory)?;
    let vmm = VmmBitmap::new(memory.clone(), layout)?;
    let kvm = match spec.choice {
        GuestChoice::Kvm => true,
        GuestChoice::Emulated => false,
        GuestChoice::Auto => kvm::available(),
    };
    if kvm {
        let cfg = KvmConfig {
            workload: spec.workload,
            vcpus: spec.vcpus,
            dirty_rate: spec.dirty_rate,
            seed: 1,
            dirty_log: spec.dirty_log,
        };
        let mut vm = KvmVm::boot(memory.clone(), cfg).context("booting the KVM micro-VM")?;
        let log = vm
            .take_dirty_log()
            .context("the micro-VM has no dirty log")?;
        let line = format!(
            "KVM micro-VM (CPL3 guest program, KVM dirty log: {})",
            spec.dirty_log.as_str()
        );
        return Ok((RunningGuest::Kvm(vm), Box::new(Combined(log, vmm)), line));
    }
    let cfg = EmulatedConfig {
        workload: spec.workload,
        vcpus: spec.vcpus,
        dirty_rate: spec.dirty_rate,
        seed: 1,
    };
    let guest = EmulatedGuest::start(memory.clone(), cfg)?;
    let line = if spec.choice == GuestChoice::Auto {
        "emulated (/dev/kvm is not available here: vCPU threads writing through vm-memory stand in)"
            .to_string()
    } else {
        "emulated (vCPU threads writing through vm-memory)".to_string()
    };
    Ok((RunningGuest::Emulated(guest), Box::new(vmm), line))
}

impl RunningGuest {
    /// The guest's own progress: workload writes so far.
    pub fn writes(&self) -> u64 {
        match self {
            RunningGuest::Kvm(vm) => vm.writes(),
            RunningGuest::Emulated(g) => g.writes(),
        }
    }
}

impl Guest for RunningGuest {
    fn pause(&mut self) -> Result<(), GuestError> {
        match self {
            RunningGuest::Kvm(vm) => vm.pause(),
            RunningGuest::Emulated(g) => g.pause(),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        match self {
            RunningGuest::Kvm(vm) => vm.resume(),
            RunningGuest::Emulated(g) => g.resume(),
        }
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        match self {
            RunningGuest::Kvm(vm) => vm.save_state(),
            RunningGuest::Emulated(g) => g.save_state(),
        }
    }

    fn vcpus(&self) -> u32 {
        match self {
            RunningGuest::Kvm(vm) => vm.vcpus(),
            RunningGuest::Emulated(g) => g.vcpus(),
        }
    }
}

/// A guest running again on the destination.
pub enum Resumed {
    Kvm(KvmVm<()>),
    Emulated(EmulatedGuest),
}

/// Runs the guest described by `state` on received `memory`.
pub fn resume(memory: &DestMemory, state: &[u8]) -> Result<Resumed> {
    if VmState::is_kvm_record(state) {
        return Ok(Resumed::Kvm(
            KvmVm::restore(memory.clone(), state).context("restoring the KVM micro-VM")?,
        ));
    }
    let Some(cfg) = EmulatedConfig::from_state_record(state, 2) else {
        bail!("the guest state is neither a KVM micro-VM's nor an emulated guest's");
    };
    Ok(Resumed::Emulated(EmulatedGuest::start(
        memory.clone(),
        cfg,
    )?))
}

impl Resumed {
    /// Why the resumed guest stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        match self {
            Resumed::Kvm(vm) => vm.failure(),
            Resumed::Emulated(g) => (g.vcpus() == 0).then(|| "no vCPUs".to_string()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Resumed::Kvm(_) => "KVM micro-VM",
            Resumed::Emulated(_) => "emulated guest",
        }
    }
}
