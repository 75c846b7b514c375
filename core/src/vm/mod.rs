//! Guests hpmig can migrate: the [`Guest`] control trait, the workloads that
//! dirty memory, and the emulated guest (host threads writing through
//! vm-memory) used where there is no /dev/kvm and by the engine's tests.

pub mod emulated;
pub mod kvm;

use thiserror::Error;

/// Errors of controlling a guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// the guest could not be paused
    #[error("pausing the guest: {0}")]
    Pause(String),
    /// the guest could not be resumed
    #[error("resuming the guest: {0}")]
    Resume(String),
    /// the guest cannot be built as asked
    #[error("guest configuration: {0}")]
    Config(String),
    /// the guest's state could not be read or applied
    #[error("guest state: {0}")]
    State(String),
}

/// What the migration engine needs from the guest it moves.
pub trait Guest {
    /// Stops every vCPU; returns once none runs.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets the vCPUs run again (after a failed migration).
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The vCPU (and device) state, while paused.
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
    fn vcpus(&self) -> u32;
}

/// How a guest dirties its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// 8-byte writes at random offsets across all memory (the paper's case).
    Sparse,
    /// Whole pages rewritten in sequence.
    Dense,
    /// A small region (64 pages) rewritten constantly.
    Hotspot,
    /// Writes that later put the previous value back.
    Aba,
    /// Only the heartbeat.
    Idle,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Sparse,
        Workload::Dense,
        Workload::Hotspot,
        Workload::Aba,
        Workload::Idle,
    ];

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| *w as u8 == v)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Sparse => "sparse",
            Workload::Dense => "dense",
            Workload::Hotspot => "hotspot",
            Workload::Aba => "aba",
            Workload::Idle => "idle",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| {
                format!("unknown workload '{s}' (expected sparse, dense, hotspot, aba or idle)")
            })
    }
}
