//! The KVM dirty-log calls kvm-ioctls does not wrap: KVM_CLEAR_DIRTY_LOG,
//! KVM_RESET_DIRTY_RINGS and the mapped per-vCPU dirty ring. All of core's
//! KVM FFI is here.

use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn};

const KVMIO: libc::c_ulong = 0xAE;
const fn iowr(nr: libc::c_ulong, size: usize) -> libc::c_ulong {
    (3 << 30) | ((size as libc::c_ulong) << 16) | (KVMIO << 8) | nr
}
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = iowr(0xc0, std::mem::size_of::<kvm_clear_dirty_log>());
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = (KVMIO << 8) | 0xc7;
/// Flags of a dirty-ring entry.
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

fn errno_result(rc: libc::c_int, call: &'static str) -> Result<(), std::io::Error> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{call}: {e}")));
    }
    Ok(())
}

/// KVM_CLEAR_DIRTY_LOG: re-protects the pages set in `bitmap` (which starts
/// at `first_page`, a multiple of 64) of memory slot `slot`.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    bitmap: &mut [u64],
) -> Result<(), std::io::Error> {
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages: (bitmap.len() * 64) as u32,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `arg` points at a bitmap of num_pages bits that outlives the
    // call; the kernel reads it and the struct, nothing else.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &mut arg) };
    errno_result(rc, "KVM_CLEAR_DIRTY_LOG")
}

/// KVM_RESET_DIRTY_RINGS: re-protects the pages of every harvested entry.
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> Result<(), std::io::Error> {
    // SAFETY: an ioctl without argument on a VM fd.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
    errno_result(rc, "KVM_RESET_DIRTY_RINGS")
}

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    next: u32,
}

// SAFETY: the mapping is owned by this value alone and only accessed through
// &mut self; the kernel side synchronises through the entry flags.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `entries` entries of vCPU fd `fd`.
    pub fn map(fd: RawFd, entries: u32) -> Result<DirtyRing, std::io::Error> {
        let page = crate::memory::host_page_size();
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: mapping a KVM vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET pages
        // is how the dirty ring is shared; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                (kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as usize * page) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(DirtyRing {
            base,
            entries,
            next: 0,
        })
    }

    /// Whether at least `n` (1..=entries) entries are published and not yet
    /// collected. KVM publishes entries in ring order, so the `n`-th one
    /// from the next to collect being published means all before it are.
    pub fn holds_at_least(&self, n: u32) -> bool {
        let n = n.clamp(1, self.entries);
        let i = (self.next.wrapping_add(n - 1) % self.entries) as usize;
        // SAFETY: i < entries, inside the mapping; `flags` is the entry's
        // first field, u32-aligned, read atomically as `harvest` reads it.
        let flags = unsafe {
            &*(std::ptr::addr_of!((*self.base.as_ptr().add(i)).flags) as *const AtomicU32)
        };
        flags.load(Ordering::Acquire) & GFN_DIRTY != 0
    }

    /// Collects the dirty entries published so far as `(slot, page offset)`,
    /// marking each for reset.
    pub fn harvest(&mut self, mut each: impl FnMut(u32, u64)) {
        loop {
            let i = (self.next % self.entries) as usize;
            // SAFETY: i < entries, inside the mapping; the kernel publishes
            // an entry by setting DIRTY in `flags` (u32-aligned, first field),
            // which we read with acquire ordering before the other fields.
            let gfn = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: as above; AtomicU32 has the layout of u32.
            let flags = unsafe { &*(std::ptr::addr_of!((*gfn).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire).
            let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
            each(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly what `map` mapped, once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), len);
        }
    }
}
