//! KVM's dirty-page logs as [`DirtySource`]s, chosen with `--dirty-log`:
//!
//! - `bitmap`: KVM_GET_DIRTY_LOG, which fetches a slot's bitmap and
//!   write-protects the pages again in one call;
//! - `clear`: manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): fetch with
//!   KVM_GET_DIRTY_LOG, then re-protect with KVM_CLEAR_DIRTY_LOG in chunks of
//!   [`CLEAR_CHUNK_PAGES`] pages, only where pages were dirty;
//! - `ring`: the per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING), read entry by
//!   entry, then KVM_RESET_DIRTY_RINGS.
//!
//! In every mode a harvest fetches and re-protects before the round reads
//! any page, so a write racing with the copy is logged again. Logging is
//! switched on for all slots by the first harvest, so the guest pays for
//! write-protect faults only while a migration runs. The VMM's own bitmap is
//! ORed in by the caller ([`crate::dirty::Combined`]).
//!
//! A VMM that uses these: call [`DirtyLogMode::enable`] on its VM before it
//! creates vCPUs, map each vCPU's ring with [`DirtyRing::map`] (ring mode),
//! and hand the slots it registered to [`KvmDirtyLog::new`]. In ring mode a
//! reaper thread looks at the rings every [`REAP_PERIOD`] once logging
//! started (as QEMU's dirty-ring reaper does) and empties one that is half
//! full into a bitmap the next harvest takes: a vCPU whose ring filled up
//! (`KVM_EXIT_DIRTY_RING_FULL`) waits a millisecond or two for it, not for
//! the next round. Emptying only half-full rings matters: a reset
//! write-protects every page it collected again, so a page the guest writes
//! on after each reset faults each time; resetting every few milliseconds
//! cost the guest more than half its speed at a million new pages a second
//! (bitmap mode re-protects once per round).

mod sys;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

pub use sys::DirtyRing;

use crate::dirty::{DirtyBitmap, DirtyError, DirtySource};
use crate::memory::Layout;

/// Entries of each vCPU's dirty ring that [`DirtyLogMode::enable`] asks for
/// (16 bytes each).
pub const RING_ENTRIES: u32 = 65536;

/// How often the reaper looks at the dirty rings (ring mode): at a million
/// new pages a second a ring of [`RING_ENTRIES`] fills in 65 ms, half of it
/// (when the reaper empties it) in 33.
pub const REAP_PERIOD: Duration = Duration::from_millis(1);

/// Entries a ring holds before the reaper empties it: half the ring.
const REAP_AT: u32 = RING_ENTRIES / 2;

/// Pages re-protected per KVM_CLEAR_DIRTY_LOG call (a multiple of 64).
pub const CLEAR_CHUNK_PAGES: usize = 64 * 1024;

/// Which KVM log to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    Bitmap,
    Clear,
    Ring,
}

impl DirtyLogMode {
    pub const ALL: [DirtyLogMode; 3] = [
        DirtyLogMode::Bitmap,
        DirtyLogMode::Clear,
        DirtyLogMode::Ring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DirtyLogMode::Bitmap => "bitmap",
            DirtyLogMode::Clear => "clear",
            DirtyLogMode::Ring => "ring",
        }
    }
}

impl DirtyLogMode {
    /// Prepares `vm` for this mode; call before creating vCPUs (KVM refuses
    /// the dirty ring afterwards). `bitmap` needs nothing.
    pub fn enable(self, vm: &VmFd) -> Result<(), DirtyError> {
        let hypervisor = |call| {
            move |e: kvm_ioctls::Error| DirtyError::Hypervisor {
                call,
                source: std::io::Error::from_raw_os_error(e.errno()),
            }
        };
        match self {
            DirtyLogMode::Bitmap => Ok(()),
            DirtyLogMode::Clear => {
                let mut cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
                cap.args[0] = 3;
                vm.enable_cap(&cap)
                    .map_err(hypervisor("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))
            }
            DirtyLogMode::Ring => {
                let acq_rel =
                    vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) > 0;
                let which = if acq_rel {
                    kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL
                } else {
                    kvm_bindings::KVM_CAP_DIRTY_LOG_RING
                };
                let mut cap = kvm_enable_cap {
                    cap: which,
                    ..Default::default()
                };
                cap.args[0] = u64::from(RING_ENTRIES) * 16;
                vm.enable_cap(&cap)
                    .map_err(hypervisor("enabling KVM_CAP_DIRTY_LOG_RING"))
            }
        }
    }
}

impl std::str::FromStr for DirtyLogMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        DirtyLogMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown dirty log '{s}' (expected bitmap, clear or ring)"))
    }
}

/// A KVM memory slot as the VMM registered it: slot `i` must back region
/// `i` of the [`Layout`].
#[derive(Clone, Copy, Debug)]
pub struct KvmSlot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    /// Host address of the mapping behind it.
    pub host: u64,
}

impl KvmSlot {
    /// The region as KVM_SET_USER_MEMORY_REGION takes it, with `flags`.
    pub fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host,
        }
    }
}

/// The KVM dirty log of one micro-VM.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<KvmSlot>,
    layout: Layout,
    mode: DirtyLogMode,
    /// Ring mode: the rings and what was reaped from them since the last
    /// harvest, shared with the reaper thread.
    rings: Arc<Mutex<Reaped>>,
    /// Boxed: a VMM's guest type holds this log and stays small.
    reaper: Option<Box<(Arc<AtomicBool>, JoinHandle<()>)>>,
    logging: bool,
}

/// The dirty rings and the pages reaped from them, not yet harvested.
#[derive(Debug)]
struct Reaped {
    rings: Vec<DirtyRing>,
    pending: DirtyBitmap,
    /// A reset the reaper could not do, for the next harvest to report.
    error: Option<std::io::Error>,
}

impl Reaped {
    /// Whether a ring holds enough to be emptied before the next harvest.
    fn due(&self) -> bool {
        self.rings.iter().any(|r| r.holds_at_least(REAP_AT))
    }

    /// Empties every ring into `pending` and re-protects the pages.
    fn reap(&mut self, vm: &VmFd, layout: &Layout) -> Result<(), std::io::Error> {
        let pending = &mut self.pending;
        let mut any = false;
        for ring in &mut self.rings {
            ring.harvest(|slot, offset| {
                any = true;
                if let Some(page) = layout.page_index(slot as usize, offset) {
                    pending.set_page(page);
                }
            });
        }
        if any {
            sys::reset_dirty_rings(vm)?;
        }
        Ok(())
    }
}

fn lock(m: &Mutex<Reaped>) -> MutexGuard<'_, Reaped> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvmDirtyLog {
    /// The log of `vm`, whose slots back `layout`'s regions in order; `rings`
    /// are the vCPUs' mapped dirty rings (ring mode), else empty.
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<KvmSlot>,
        layout: Layout,
        mode: DirtyLogMode,
        rings: Vec<DirtyRing>,
    ) -> Self {
        let pending = DirtyBitmap::new(&layout);
        KvmDirtyLog {
            vm,
            slots,
            layout,
            mode,
            rings: Arc::new(Mutex::new(Reaped {
                rings,
                pending,
                error: None,
            })),
            reaper: None,
            logging: false,
        }
    }

    /// Ring mode: starts the thread that looks at the rings every
    /// [`REAP_PERIOD`] and empties them once one is half full.
    fn start_reaper(&mut self) -> Result<(), DirtyError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (st, rings, vm, layout) = (
            Arc::clone(&stop),
            Arc::clone(&self.rings),
            Arc::clone(&self.vm),
            self.layout.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("hpmig-reaper".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    std::thread::sleep(REAP_PERIOD);
                    let mut r = lock(&rings);
                    if !r.due() {
                        continue;
                    }
                    if let Err(e) = r.reap(&vm, &layout) {
                        r.error.get_or_insert(e);
                    }
                }
            })
            .map_err(|source| DirtyError::Hypervisor {
                call: "starting the dirty-ring reaper",
                source,
            })?;
        self.reaper = Some(Box::new((stop, thread)));
        Ok(())
    }

    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    fn hypervisor(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> DirtyError {
        move |e| DirtyError::Hypervisor {
            call,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }

    fn start_logging(&mut self) -> Result<(), DirtyError> {
        for s in &self.slots {
            // SAFETY: the same slot, address and host mapping as registered
            // at VM creation (the mapping outlives the VM); only the flags change.
            unsafe {
                self.vm
                    .set_user_memory_region(s.region(KVM_MEM_LOG_DIRTY_PAGES))
            }
            .map_err(Self::hypervisor(
                "KVM_SET_USER_MEMORY_REGION (enable dirty logging)",
            ))?;
        }
        self.logging = true;
        if self.mode == DirtyLogMode::Ring {
            self.start_reaper()?;
        }
        Ok(())
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        if let Some(r) = self.reaper.take() {
            let (stop, thread) = *r;
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

impl DirtySource for KvmDirtyLog {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if !self.logging {
            self.start_logging()?;
        }
        match self.mode {
            DirtyLogMode::Bitmap | DirtyLogMode::Clear => {
                for (i, s) in self.slots.iter().enumerate() {
                    let mut bits = self
                        .vm
                        .get_dirty_log(s.slot, s.size as usize)
                        .map_err(Self::hypervisor("KVM_GET_DIRTY_LOG"))?;
                    into.or_region(self.layout.region_word_base(i), &bits);
                    if self.mode == DirtyLogMode::Clear {
                        let words = CLEAR_CHUNK_PAGES / 64;
                        for (c, chunk) in bits.chunks_mut(words).enumerate() {
                            if chunk.iter().any(|&w| w != 0) {
                                sys::clear_dirty_log(
                                    &*self.vm,
                                    s.slot,
                                    (c * CLEAR_CHUNK_PAGES) as u64,
                                    chunk,
                                )
                                .map_err(|source| {
                                    DirtyError::Hypervisor {
                                        call: "KVM_CLEAR_DIRTY_LOG",
                                        source,
                                    }
                                })?;
                            }
                        }
                    }
                }
            }
            DirtyLogMode::Ring => {
                // What the reaper took since the last harvest, and what the
                // rings hold now; reset before any page of the round is read.
                let mut r = lock(&self.rings);
                let reaped = r.reap(&self.vm, &self.layout);
                let failed = r.error.take();
                if let Some(source) = reaped.err().or(failed) {
                    return Err(DirtyError::Hypervisor {
                        call: "KVM_RESET_DIRTY_RINGS",
                        source,
                    });
                }
                into.or_region(0, r.pending.words());
                r.pending.clear();
            }
        }
        Ok(())
    }
}
