//! hpmig-microvm: the guests hpmig runs itself, for its demo, its tests and
//! its benchmark. Each embeds `hpmig_core` exactly as an outside VMM would,
//! through its public API only:
//!
//! - [`kvm`]: a KVM micro-VM whose guest program, entered at CPL3, dirties
//!   memory in a chosen [`Workload`] and keeps a heartbeat per vCPU; its
//!   vCPU state travels in a record ([`kvm::state`]) that the destination
//!   checks and restores before the Ack;
//! - [`emulated`]: host threads writing guest memory through vm-memory,
//!   where there is no /dev/kvm.
//!
//! [`boot`] starts either on the source (with the dirty source that sees all
//! its writes); [`Arrival`] is the destination's [`DestGuest`]: it refuses a
//! state record this host cannot run before the Ack, and runs the guest
//! after the Commit.

pub mod blackout;
pub mod emulated;
pub mod kvm;
mod workload;

use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::dirty::{Combined, DirtySource};
use hpmig_core::guest::{DestGuest, Guest, GuestError};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::vm_memory::bitmap::AtomicBitmap;

use emulated::{EmulatedConfig, EmulatedGuest};
use kvm::state::VmState;
use kvm::{KvmConfig, KvmVm};
pub use workload::Workload;

/// Which guest to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestChoice {
    /// The KVM micro-VM when /dev/kvm can be opened, else the emulated guest.
    Auto,
    /// The KVM micro-VM (fails without /dev/kvm).
    Kvm,
    /// Host threads writing through vm-memory, as a guest would.
    Emulated,
}

impl std::str::FromStr for GuestChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GuestChoice::Auto),
            "kvm" => Ok(GuestChoice::Kvm),
            "emulated" => Ok(GuestChoice::Emulated),
            other => Err(format!(
                "unknown guest '{other}' (expected auto, kvm or emulated)"
            )),
        }
    }
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct BootSpec {
    pub choice: GuestChoice,
    pub workload: Workload,
    pub vcpus: u32,
    pub dirty_rate: Option<u64>,
    pub dirty_log: DirtyLogMode,
}

/// A running source guest.
#[derive(Debug)]
pub enum RunningGuest {
    Kvm(KvmVm<AtomicBitmap>),
    Emulated(EmulatedGuest),
}

/// Boots the chosen guest on `memory`; returns it, the dirty source that
/// sees all its writes, and a line saying what runs.
pub fn boot(
    memory: &SourceMemory,
    spec: &BootSpec,
) -> Result<(RunningGuest, Box<dyn DirtySource>, String), GuestError> {
    let config = |e: &dyn std::fmt::Display| GuestError::Config(e.to_string());
    let layout = Layout::of(memory).map_err(|e| config(&e))?;
    let vmm = VmmBitmap::new(memory.clone(), layout).map_err(|e| config(&e))?;
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
        let mut vm = KvmVm::boot(memory.clone(), cfg)?;
        let log = vm
            .take_dirty_log()
            .ok_or_else(|| GuestError::Config("the micro-VM has no dirty log".into()))?;
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

    fn requirements(&self) -> Vec<u8> {
        match self {
            RunningGuest::Kvm(vm) => vm.requirements(),
            RunningGuest::Emulated(g) => g.requirements(),
        }
    }
}

/// A guest arriving on the destination: restored before the Ack (the vCPUs
/// exist and hold their state, but do not run), started after the Commit.
#[derive(Debug, Default)]
pub struct Arrival {
    memory: Option<DestMemory>,
    /// A micro-VM made before round 0 (`prepare`), for `restore` to use.
    prepared: Option<kvm::PreparedVm>,
    restored: Option<Restored>,
    running: Option<Resumed>,
    /// vCPU 0's heartbeat when the state was restored (memory complete).
    arrival_heartbeat: u64,
    /// When `start` began starting the vCPUs (before their threads were
    /// spawned, as QEMU's `RESUME` comes before its vCPUs wake): the end of
    /// the pause on this clock.
    started_at: Option<std::time::Instant>,
}

#[derive(Debug)]
enum Restored {
    Kvm(kvm::RestoredVm),
    Emulated(EmulatedConfig),
}

/// A guest running again on the destination.
#[derive(Debug)]
pub enum Resumed {
    Kvm(KvmVm<()>),
    Emulated(EmulatedGuest),
}

impl Arrival {
    /// A destination guest, to run on the memory the engine lands it in.
    pub fn new() -> Arrival {
        Arrival::default()
    }

    /// vCPU 0's heartbeat as it arrived (read when the state was restored,
    /// every byte landed): the guest runs on if it moves past this.
    pub fn arrival_heartbeat(&self) -> u64 {
        self.arrival_heartbeat
    }

    /// When the vCPUs were started here, once they were.
    pub fn started_at(&self) -> Option<std::time::Instant> {
        self.started_at
    }

    /// The guest, once it runs here.
    pub fn running(&self) -> Option<&Resumed> {
        self.running.as_ref()
    }

    /// Stops the guest that runs here, if one does.
    pub fn stop(&mut self) {
        self.running = None;
    }
}

impl DestGuest for Arrival {
    fn admit(&mut self, vcpus: u32, requirements: &[u8]) -> Result<(), GuestError> {
        // A micro-VM says what it needs; an emulated guest needs threads.
        kvm::requirements::admit(vcpus, requirements)?;
        if vcpus > emulated::MAX_VCPUS {
            return Err(GuestError::Config(format!(
                "the guest has {vcpus} vCPUs; at most {} run here",
                emulated::MAX_VCPUS
            )));
        }
        Ok(())
    }

    fn prepare(&mut self, memory: &DestMemory, vcpus: u32) {
        // Where /dev/kvm opens; an emulated guest's arrival drops it unused.
        if kvm::available() {
            // On failure `restore` creates the VM itself, and says why if
            // it cannot either.
            self.prepared = kvm::PreparedVm::new(memory, vcpus).ok();
        }
    }

    fn restore(&mut self, memory: &DestMemory, vcpus: u32, state: &[u8]) -> Result<(), GuestError> {
        let restored = if VmState::is_kvm_record(state) {
            let st = VmState::decode(state)?;
            check_vcpus(vcpus, st.vcpus.len() as u32)?;
            Restored::Kvm(kvm::RestoredVm::new(
                memory.clone(),
                st,
                self.prepared.take(),
            )?)
        } else if let Some(cfg) = EmulatedConfig::from_state_record(state, 2) {
            check_vcpus(vcpus, cfg.vcpus)?;
            Restored::Emulated(cfg)
        } else {
            return Err(GuestError::State(
                "the guest state is neither a KVM micro-VM's nor an emulated guest's".into(),
            ));
        };
        self.restored = Some(restored);
        self.arrival_heartbeat = kvm::heartbeat(memory, 0);
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn start(&mut self) -> Result<(), GuestError> {
        // Stamped before the vCPU threads exist: once spawned they may run
        // (and beat) before `start` returns, and a stamp taken after it
        // came up to 5 ms late under load, which the downtime then counted.
        let starting = std::time::Instant::now();
        let running = match self.restored.take() {
            Some(Restored::Kvm(vm)) => Resumed::Kvm(vm.start()?),
            Some(Restored::Emulated(cfg)) => {
                let memory = self
                    .memory
                    .clone()
                    .ok_or_else(|| GuestError::Resume("no memory to run on".into()))?;
                Resumed::Emulated(EmulatedGuest::start(memory, cfg)?)
            }
            None => return Err(GuestError::Resume("no restored guest to start".into())),
        };
        self.running = Some(running);
        self.started_at = Some(starting);
        Ok(())
    }

    fn discard(&mut self) {
        self.restored = None;
    }
}

/// The State record's announced vCPU count must be what it carries.
fn check_vcpus(announced: u32, carried: u32) -> Result<(), GuestError> {
    if announced != carried {
        return Err(GuestError::State(format!(
            "the State record announces {announced} vCPUs but carries {carried}"
        )));
    }
    Ok(())
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

/// Fills a guest's memory with `contents` (see [`hpmig_core::memory::fill`])
/// before it boots, leaving the guest's own area below
/// [`kvm::program::DATA`] (heartbeats, page tables, code) zero, as a VMM
/// that loads the program expects: a heartbeat then starts at 0. The QEMU
/// peer's RAM file is filled by the same function, so both tools' guests
/// hold the same bytes.
pub fn fill_guest<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
    memory: &vm_memory::GuestMemoryMmap<B>,
    contents: hpmig_core::memory::Contents,
) {
    use vm_memory::{Bytes, GuestAddress};
    hpmig_core::memory::fill(memory, contents, 1);
    if contents != hpmig_core::memory::Contents::Empty {
        let zeros = vec![0u8; kvm::program::DATA as usize];
        // Every guest is at least 4 MiB (kvm::MIN_MEMORY), so the range lies in memory.
        let _ = memory.write_slice(&zeros, GuestAddress(0));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_filled_guest_keeps_its_own_area_zero_and_its_data_full() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let m: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        fill_guest(&m, hpmig_core::memory::Contents::Full);
        let mut low = vec![1u8; kvm::program::DATA as usize];
        m.read_slice(&mut low, GuestAddress(0)).expect("read");
        assert!(
            low.iter().all(|&b| b == 0),
            "the guest's own area was filled"
        );
        let mut page = [0u8; 4096];
        m.read_slice(&mut page, GuestAddress(kvm::program::DATA))
            .expect("read");
        assert!(
            page.iter().filter(|&&b| b == 0).count() < 64,
            "data not filled"
        );
    }

    use super::*;
    use hpmig_core::vm_memory::GuestAddress;

    fn memory() -> DestMemory {
        DestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    #[test]
    fn a_state_record_for_the_wrong_vcpu_count_is_refused() {
        let two = EmulatedConfig {
            workload: Workload::Idle,
            vcpus: 2,
            dirty_rate: None,
            seed: 0,
        }
        .state_record();
        let mut a = Arrival::new();
        let m = memory();
        assert!(a.restore(&m, 2, &two).is_ok());
        let e = a.restore(&m, 3, &two).unwrap_err();
        assert!(
            e.to_string().contains("announces 3 vCPUs but carries 2"),
            "{e}"
        );
        assert!(matches!(
            a.restore(&m, 1, b"hpmig-kvm-v1 garbage"),
            Err(GuestError::State(_))
        ));
        assert!(
            a.restore(&m, 7, b"some other VMM's state").is_err(),
            "a record the micro-VM cannot run is refused before the Ack"
        );
    }
}
