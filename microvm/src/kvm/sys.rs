//! The vCPU kick signal: all of the micro-VM's raw FFI in one place (the
//! dirty-log calls are hpmig-core's, `hpmig_core::dirty::kvm`).

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) const KICK: libc::c_int = libc::SIGUSR1;

thread_local! {
    /// This thread's vCPU run structure, for the kick handler.
    static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    let run = RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped kvm_run, registered by
        // set_thread_run_struct and valid while the vCPU fd lives (the thread
        // clears it before dropping the fd); a byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we set a plain handler with
        // an empty mask and no SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK, &sa, std::ptr::null_mut());
        }
    });
}

/// Registers (or, with null, forgets) this thread's kvm_run for the handler.
pub(crate) fn set_thread_run_struct(run: *mut kvm_run) {
    RUN.with(|r| r.set(run));
}

/// Kicks a vCPU thread.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is the pthread of a live vCPU thread we spawned (its
    // JoinHandle is held by the caller); the handler is installed.
    unsafe {
        libc::pthread_kill(thread, KICK);
    }
}
