//! The built-in KVM micro-VM: guest memory in 1 GiB slots, 1 to
//! [`MAX_VCPUS`] vCPUs entered directly at CPL3 in 64-bit mode, running one
//! of the workload loops of [`program`]. It is what `hpmig demo`, `source`
//! and `dest` migrate when /dev/kvm is there.
//!
//! vCPU threads: each runs KVM_RUN in a loop; the guest exits with `out`
//! after every batch of writes, where the thread counts progress, throttles
//! to `--dirty-rate` and checks for a pause. A pause is asked with a flag
//! and a signal ([`sys::KICK`]) whose handler sets the vCPU's
//! `immediate_exit`, so KVM_RUN returns at once even mid-batch. A paused
//! thread serves state requests until it is resumed or stopped.

pub mod program;
pub mod requirements;
mod restore;
pub mod state;
mod sys;

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use hpmig_core::dirty::kvm::{DirtyLogMode, DirtyRing, KvmDirtyLog, KvmSlot, RING_ENTRIES};
use hpmig_core::guest::{Guest, GuestError};
use hpmig_core::memory::{Layout, SourceMemory};
use hpmig_core::vm_memory::bitmap::Bitmap;
use hpmig_core::vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::Workload;
use program::{
    Program, BELL_BATCH, BELL_IDLE, DATA, GUEST_PAGE, HOTSPOT_PAGES, SCRATCH, SCRATCH_PER_VCPU,
};
pub use restore::{PreparedVm, RestoredVm};
use state::{VcpuState, VmState};

/// Most vCPUs of a micro-VM.
pub const MAX_VCPUS: u32 = 4;
/// Largest memory slot.
pub const SLOT_BYTES: u64 = 1 << 30;
/// Writes per batch when the guest runs flat out.
const FLAT_OUT_BATCH: u64 = 4096;
/// Most pairs an aba batch remembers (its scratch area's size).
const ABA_MAX_BATCH: u64 = SCRATCH_PER_VCPU / 16;

/// True when this machine can run the micro-VM.
pub fn available() -> bool {
    Kvm::new().is_ok()
}

/// Guest memory comes in multiples of this (the page tables map 2 MiB
/// pages).
pub const MEMORY_ALIGN: u64 = 2 << 20;
/// Smallest guest: the program's own area, the hotspot and some data,
/// rounded up to [`MEMORY_ALIGN`].
pub const MIN_MEMORY: u64 =
    (DATA + (HOTSPOT_PAGES + 64) * GUEST_PAGE).next_multiple_of(MEMORY_ALIGN);
/// Largest guest.
pub const MAX_MEMORY: u64 = program::MAX_MEMORY;

/// The guest memory ranges of a micro-VM of `bytes`: contiguous from 0, in
/// slots of at most [`SLOT_BYTES`]. The emulated guest keeps this layout
/// too, so that either kind of destination can run what it receives.
pub fn memory_ranges(bytes: u64) -> Result<Vec<(GuestAddress, usize)>, GuestError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || bytes % MEMORY_ALIGN != 0 {
        return Err(GuestError::Config(format!(
            "guest memory must be a multiple of 2 MiB between {} MiB and {} GiB",
            MIN_MEMORY >> 20,
            MAX_MEMORY >> 30
        )));
    }
    Ok((0..bytes.div_ceil(SLOT_BYTES))
        .map(|i| {
            (
                GuestAddress(i * SLOT_BYTES),
                (bytes - i * SLOT_BYTES).min(SLOT_BYTES) as usize,
            )
        })
        .collect())
}

/// How to boot a micro-VM.
#[derive(Clone, Copy, Debug)]
pub struct KvmConfig {
    pub workload: Workload,
    pub vcpus: u32,
    /// Writes per second over all vCPUs; `None` runs flat out.
    pub dirty_rate: Option<u64>,
    pub seed: u64,
    pub dirty_log: DirtyLogMode,
}

fn kvm_err(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> GuestError {
    move |e| GuestError::State(format!("{call}: {e}"))
}

#[derive(Debug, Default)]
struct Shared {
    pause: AtomicBool,
    stop: AtomicBool,
    parked: AtomicU32,
    alive: AtomicU32,
    writes: AtomicU64,
    failure: Mutex<Option<String>>,
}

enum Cmd {
    Save(Sender<Result<VcpuState, GuestError>>),
    Resume,
}

struct VcpuThread {
    thread: Option<JoinHandle<()>>,
    cmds: Sender<Cmd>,
}

/// What a vCPU thread needs to run the workload.
#[derive(Clone, Copy, Debug)]
struct RunParams {
    /// Guest address of the doorbell.
    doorbell: u64,
    writes_per_batch: u64,
    /// Writes per second for this vCPU.
    rate: Option<u64>,
}

/// A VM just created: its fds, slots and (ring mode) dirty rings.
struct Created {
    kvm: Kvm,
    vm: Arc<VmFd>,
    fds: Vec<VcpuFd>,
    slots: Vec<KvmSlot>,
    rings: Vec<DirtyRing>,
    /// What the guest needs of a host (its CPUID, state sizes).
    requirements: Vec<u8>,
}

/// A running micro-VM.
pub struct KvmVm<B: Bitmap + 'static> {
    // Field order is drop order: threads and fds go before the memory they map.
    vcpus: Vec<VcpuThread>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    shared: Arc<Shared>,
    dirty: Option<KvmDirtyLog>,
    paused: bool,
    cfg: KvmConfig,
    /// Test hook: `pause` fails once this many vCPUs stopped, and leaves
    /// them stopped, as a VMM's pause that fails halfway would.
    pub fail_pause_after: Option<u32>,
    requirements: Vec<u8>,
    memory: GuestMemoryMmap<B>,
}

impl<B: Bitmap + 'static> std::fmt::Debug for KvmVm<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("cfg", &self.cfg)
            .field("paused", &self.paused)
            .finish()
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

fn params(cfg: &KvmConfig, memory_size: u64) -> (u64, RunParams) {
    let rate = cfg.dirty_rate.map(|r| (r / u64::from(cfg.vcpus)).max(1));
    // About one exit per millisecond when throttled, few exits flat out.
    let writes = rate.map_or(FLAT_OUT_BATCH, |r| (r / 1000).clamp(1, FLAT_OUT_BATCH));
    let (batch, per_batch) = match cfg.workload {
        Workload::Dense => {
            let pages = (writes / (GUEST_PAGE / 8)).max(1);
            (pages, pages * (GUEST_PAGE / 8))
        }
        Workload::Aba => (writes.min(ABA_MAX_BATCH), writes.min(ABA_MAX_BATCH)),
        _ => (writes, writes),
    };
    (
        batch,
        RunParams {
            doorbell: program::doorbell(memory_size),
            writes_per_batch: per_batch,
            rate,
        },
    )
}

impl<B: Bitmap + Send + Sync + 'static> KvmVm<B> {
    /// Creates the VM, its slots and vCPUs (not yet running).
    fn create(
        memory: &GuestMemoryMmap<B>,
        vcpus: u32,
        mode: DirtyLogMode,
    ) -> Result<Created, GuestError> {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(GuestError::State(format!(
                "the micro-VM has 1 to {MAX_VCPUS} vCPUs, not {vcpus}"
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        mode.enable(&vm)
            .map_err(|e| GuestError::Config(e.to_string()))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let mut slots = Vec::new();
        for (i, r) in memory.iter().enumerate() {
            let s = KvmSlot {
                slot: i as u32,
                gpa: r.start_addr().0,
                size: r.len(),
                host: r.as_ptr() as u64,
            };
            // SAFETY: the host range is vm-memory's mapping of this region,
            // which the KvmVm keeps alive (its `memory` field drops last).
            unsafe { vm.set_user_memory_region(s.region(0)) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(s);
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::new();
        let mut rings = Vec::new();
        for id in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if mode == DirtyLogMode::Ring {
                rings.push(
                    DirtyRing::map(fd.as_raw_fd(), RING_ENTRIES)
                        .map_err(|e| GuestError::State(format!("mapping the dirty ring: {e}")))?,
                );
            }
            fds.push(fd);
        }
        Ok(Created {
            kvm,
            vm: Arc::new(vm),
            fds,
            slots,
            rings,
            requirements: requirements::encode(cpuid.as_slice()),
        })
    }

    fn start(
        kvm: Kvm,
        vm: Arc<VmFd>,
        fds: Vec<VcpuFd>,
        memory: GuestMemoryMmap<B>,
        dirty: Option<KvmDirtyLog>,
        cfg: KvmConfig,
        run: RunParams,
    ) -> Result<Self, GuestError> {
        sys::install_kick_handler();
        let shared = Arc::new(Shared::default());
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let (tx, rx) = unbounded();
            let shared2 = Arc::clone(&shared);
            shared.alive.fetch_add(1, Ordering::SeqCst);
            let thread = std::thread::Builder::new()
                .name(format!("kvm-vcpu{i}"))
                .spawn(move || vcpu_loop(fd, &shared2, &rx, run))
                .map_err(|e| GuestError::Resume(format!("starting a vCPU thread: {e}")))?;
            vcpus.push(VcpuThread {
                thread: Some(thread),
                cmds: tx,
            });
        }
        Ok(KvmVm {
            vcpus,
            vm,
            _kvm: kvm,
            shared,
            dirty,
            paused: false,
            cfg,
            fail_pause_after: None,
            requirements: Vec::new(),
            memory,
        })
    }

    /// The KVM dirty log of this VM (once): combine it with the VMM bitmap.
    pub fn take_dirty_log(&mut self) -> Option<KvmDirtyLog> {
        self.dirty.take()
    }

    /// The guest's own progress: workload writes so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Why a vCPU stopped, if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        &self.memory
    }
}

impl KvmVm<vm_memory::bitmap::AtomicBitmap> {
    /// Boots a fresh micro-VM on `memory` (laid out by [`memory_ranges`])
    /// running `cfg.workload`.
    pub fn boot(memory: SourceMemory, cfg: KvmConfig) -> Result<Self, GuestError> {
        let size: u64 = memory.iter().map(|r| r.len()).sum();
        memory_ranges(size)?;
        let program = program::assemble()
            .map_err(|e| GuestError::State(format!("assembling the guest: {e}")))?;
        write_image(&memory, size, &program)?;
        let Created {
            kvm,
            vm,
            fds,
            slots,
            rings,
            requirements,
        } = Self::create(&memory, cfg.vcpus, cfg.dirty_log)?;
        let (batch, run) = params(&cfg, size);
        for (i, fd) in fds.iter().enumerate() {
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            sregs.cs = segment(0x33, true);
            for s in [
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                *s = segment(0x2b, false);
            }
            sregs.tr = kvm_segment {
                limit: 0x67,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            sregs.cr3 = program::PML4;
            sregs.cr4 = 0x620;
            sregs.cr0 = 0x8005_0033;
            sregs.efer = 0x500;
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let i = i as u64;
            let hb = program::HEARTBEAT + 8 * i;
            let (span, words) = (size - DATA, (size - DATA) / 8);
            let regs = kvm_regs {
                rip: program.entry(cfg.workload),
                rflags: 0x202,
                rbp: program::doorbell(size),
                r8: hb,
                r9: DATA,
                r10: match cfg.workload {
                    Workload::Dense => span,
                    Workload::Hotspot => HOTSPOT_PAGES * GUEST_PAGE / 8,
                    _ => words,
                },
                r11: (cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ (i + 1).wrapping_mul(0x2545_f491_4f6c_dd1d))
                    | 1,
                r12: SCRATCH + i * SCRATCH_PER_VCPU,
                r13: batch,
                r14: 0,
                r15: memory.read_obj::<u64>(GuestAddress(hb)).unwrap_or(0),
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            // With an in-kernel LAPIC, vCPUs other than the first wait for
            // INIT/SIPI; ours start running at once.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(runnable)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        let layout = Layout::of(&memory).map_err(|e| GuestError::State(e.to_string()))?;
        let dirty = KvmDirtyLog::new(Arc::clone(&vm), slots, layout, cfg.dirty_log, rings);
        let mut vm = Self::start(kvm, vm, fds, memory, Some(dirty), cfg, run)?;
        vm.requirements = requirements;
        Ok(vm)
    }
}

/// Writes page tables and code into fresh guest memory.
fn write_image<B: Bitmap + 'static>(
    memory: &GuestMemoryMmap<B>,
    size: u64,
    program: &Program,
) -> Result<(), GuestError> {
    let w =
        |e: vm_memory::GuestMemoryError| GuestError::State(format!("writing the guest image: {e}"));
    for (addr, value) in program::page_tables(size) {
        memory.write_obj(value, GuestAddress(addr)).map_err(w)?;
    }
    memory
        .write_slice(&program.code, GuestAddress(program::CODE))
        .map_err(w)
}

fn fail(shared: &Shared, why: String) {
    let mut f = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
    f.get_or_insert(why);
}

/// A vCPU thread: run, count, throttle; park on pause and serve requests.
fn vcpu_loop(mut fd: VcpuFd, shared: &Shared, cmds: &Receiver<Cmd>, run: RunParams) {
    sys::set_thread_run_struct(fd.get_kvm_run());
    // The pace: a batch every `period`. The next batch is due a period
    // after the last was due, or now if the guest fell behind (a
    // dirty-logging fault, no CPU to run on): it never catches up in a
    // burst, the rule the QEMU peer's guest keeps by TSC deadlines, so
    // both benchmark guests pace alike.
    let period = run
        .rate
        .map(|r| Duration::from_secs_f64(run.writes_per_batch as f64 / r as f64));
    let mut due = Instant::now();
    let msr_list = readable_msrs(&fd);
    'outer: loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if shared.pause.load(Ordering::SeqCst) {
            shared.parked.fetch_add(1, Ordering::SeqCst);
            loop {
                match cmds.recv() {
                    Ok(Cmd::Save(reply)) => {
                        let _ = reply.send(save_vcpu(&fd, &msr_list));
                    }
                    Ok(Cmd::Resume) => break,
                    Err(_) => {
                        shared.parked.fetch_sub(1, Ordering::SeqCst);
                        break 'outer;
                    }
                }
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        // Not before the batch is due; in slices of at most 50 ms, so that
        // a pause or a stop is seen while waiting for a slow pace.
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        match fd.run() {
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == run.doorbell + BELL_BATCH => {
                shared
                    .writes
                    .fetch_add(run.writes_per_batch, Ordering::Relaxed);
                if let Some(period) = period {
                    // A guest that fell behind starts again from now.
                    due = (due + period).max(Instant::now());
                }
            }
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == run.doorbell + BELL_IDLE => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                // The reaper (core::dirty::kvm) empties the ring within a few ms.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let what = format!("{other:?}");
                fail(
                    shared,
                    format!("unexpected vCPU exit: {what} ({})", describe(&fd)),
                );
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0)
            }
            Err(e) => {
                fail(shared, format!("KVM_RUN: {e}"));
                break;
            }
        }
    }
    sys::set_thread_run_struct(std::ptr::null_mut());
    shared.alive.fetch_sub(1, Ordering::SeqCst);
}

/// The MSRs KVM lists that this vCPU can actually read.
fn readable_msrs(fd: &VcpuFd) -> Vec<u32> {
    let Ok(kvm) = Kvm::new() else {
        return Vec::new();
    };
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .ok()
            .and_then(|mut m| fd.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, GuestError> {
    let entries: Vec<_> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| GuestError::State(format!("MSR list: {e:?}")))?;
    let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        msrs: msrs.as_slice()[..n].to_vec(),
    })
}

impl<B: Bitmap + Send + Sync + 'static> Guest for KvmVm<B> {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive = self.shared.alive.load(Ordering::SeqCst);
            let parked = self.shared.parked.load(Ordering::SeqCst);
            if let Some(n) = self.fail_pause_after.filter(|&n| parked >= n) {
                return Err(GuestError::Pause(format!(
                    "test hook: failing after {n} vCPU(s) stopped, leaving them stopped"
                )));
            }
            if parked >= alive {
                break;
            }
            if Instant::now() > deadline {
                // Undo what stopped: a failed pause leaves the guest running.
                let _ = self.resume();
                return Err(GuestError::Pause("vCPUs did not stop within 5 s".into()));
            }
            for v in &self.vcpus {
                if let Some(t) = &v.thread {
                    sys::kick(t.as_pthread_t());
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(why) = self.failure() {
            return Err(GuestError::Pause(format!("a vCPU stopped: {why}")));
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.shared.pause.store(false, Ordering::SeqCst);
        for v in &self.vcpus {
            v.cmds
                .send(Cmd::Resume)
                .map_err(|_| GuestError::Resume("a vCPU thread is gone".into()))?;
        }
        self.paused = false;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        if !self.paused {
            return Err(GuestError::State("state read while running".into()));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let (tx, rx) = bounded(1);
            v.cmds
                .send(Cmd::Save(tx))
                .map_err(|_| GuestError::State("a vCPU thread is gone".into()))?;
            vcpus.push(
                rx.recv()
                    .map_err(|_| GuestError::State("a vCPU thread is gone".into()))??,
            );
        }
        let clock = self.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
        Ok(VmState {
            vcpus,
            clock,
            irqchips,
            workload: self.cfg.workload,
            dirty_rate: self.cfg.dirty_rate,
        }
        .encode())
    }

    fn vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    fn requirements(&self) -> Vec<u8> {
        self.requirements.clone()
    }
}

impl<B: Bitmap + 'static> Drop for KvmVm<B> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.pause.store(false, Ordering::SeqCst);
        for v in &mut self.vcpus {
            // Closing the command channel ends a parked thread.
            let (dead, _) = unbounded();
            v.cmds = dead;
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                while !t.is_finished() {
                    sys::kick(t.as_pthread_t());
                    std::thread::sleep(Duration::from_micros(200));
                }
                let _ = t.join();
            }
        }
    }
}

/// Reads vCPU `vcpu`'s heartbeat from guest memory.
pub fn heartbeat<B: Bitmap + 'static>(memory: &GuestMemoryMmap<B>, vcpu: u32) -> u64 {
    memory
        .read_obj::<u64>(GuestAddress(program::HEARTBEAT + 8 * u64::from(vcpu)))
        .unwrap_or(0)
}

/// Where a vCPU stood, for error messages.
fn describe(fd: &VcpuFd) -> String {
    let regs = fd.get_regs().map(|r| {
        format!(
            "rip {:#x} rsp {:#x} rflags {:#x} r9 {:#x} r10 {:#x} r14 {:#x} rdx {:#x} rdi {:#x}",
            r.rip, r.rsp, r.rflags, r.r9, r.r10, r.r14, r.rdx, r.rdi
        )
    });
    let sregs = fd
        .get_sregs()
        .map(|s| format!("cr2 {:#x} cr3 {:#x} cs {:#x}", s.cr2, s.cr3, s.cs.selector));
    let ev = fd.get_vcpu_events().map(|e| {
        format!(
            "exception nr {} injected {} pending {} error {:#x}",
            e.exception.nr, e.exception.injected, e.exception.pending, e.exception.error_code
        )
    });
    format!("{regs:?}; {sregs:?}; {ev:?}")
}
