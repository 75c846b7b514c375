//! Flag groups shared by the commands.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use hpmig_core::auth::Secret;
use hpmig_core::memory::Contents;
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::{ShadowMode, SourceConfig};
use hpmig_core::protocol::{Granularity, MAX_STREAMS};
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::verify::VerifyMode;
use hpmig_microvm::Workload;

use crate::outcome::usage;
use crate::units::{human, parse_dirty_rate, parse_downtime, parse_rate, parse_size, parse_wait};
use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_microvm::{BootSpec, GuestChoice};

/// The guest to boot.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest memory: a multiple of 2 MiB from 4 MiB to 64 GiB (e.g. 256M,
    /// 1.5G). Sizes are binary, as QEMU's -m: K, M, G, T (or KiB ... TiB)
    /// are 2^10 ... 2^40 bytes, and 1GB = 1G = 2^30 bytes.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// How the guest dirties memory: sparse, dense, hotspot, aba, idle.
    #[arg(long, default_value = "sparse")]
    pub workload: Workload,
    /// Guest writes per second (all vCPUs together, at least 1); unbounded
    /// if not given.
    #[arg(long, value_parser = parse_dirty_rate)]
    pub dirty_rate: Option<u64>,
    /// How long the guest runs before migration starts (0 ms to 24 h).
    #[arg(long, default_value = "500ms", value_parser = parse_wait)]
    pub warmup: Duration,
    /// What guest memory holds before the workload starts: full (every
    /// page pseudo-random and different), mixed (3/8 zero, 3/8 text-like,
    /// 2/8 random pages) or empty (zero but what the guest writes).
    #[arg(long, default_value = "full")]
    pub contents: Contents,
    /// Former name of `--contents full` (the default), kept so that old
    /// command lines still run.
    #[arg(long, hide = true, conflicts_with = "contents")]
    pub prefill: bool,
    /// Which guest: the KVM micro-VM (auto picks it when /dev/kvm works) or
    /// the emulated one.
    #[arg(long, value_enum, default_value = "auto")]
    pub guest: GuestChoice,
    /// KVM's dirty log: bitmap (KVM_GET_DIRTY_LOG), clear (manual protect,
    /// KVM_CLEAR_DIRTY_LOG) or ring (per-vCPU dirty rings).
    #[arg(long, default_value = "bitmap")]
    pub dirty_log: DirtyLogMode,
}

impl GuestArgs {
    /// Refuses what cannot boot, before anything starts (exit status 2).
    pub fn check(&self) -> Result<()> {
        use hpmig_microvm::kvm::{MAX_MEMORY, MEMORY_ALIGN, MIN_MEMORY};
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory) || self.memory % MEMORY_ALIGN != 0 {
            let kvm = match self.guest {
                GuestChoice::Kvm => true,
                GuestChoice::Emulated => false,
                GuestChoice::Auto => hpmig_microvm::kvm::available(),
            };
            let guest = if kvm {
                "the KVM micro-VM's memory"
            } else {
                // Its memory keeps the micro-VM's layout, so that either
                // kind of destination can run it.
                "the emulated guest's memory (laid out as the micro-VM's)"
            };
            return Err(usage(format!(
                "--memory {} is refused: {guest} must be a multiple of {} MiB between {} MiB and {} GiB",
                human(self.memory),
                MEMORY_ALIGN >> 20,
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 30
            )));
        }
        if !(1..=hpmig_microvm::kvm::MAX_VCPUS).contains(&self.vcpus) {
            return Err(usage(format!(
                "--vcpus must be between 1 and {}",
                hpmig_microvm::kvm::MAX_VCPUS
            )));
        }
        Ok(())
    }

    pub fn spec(&self) -> BootSpec {
        BootSpec {
            choice: self.guest,
            workload: self.workload,
            vcpus: self.vcpus,
            dirty_rate: self.dirty_rate,
            dirty_log: self.dirty_log,
        }
    }
}

/// How to migrate.
#[derive(Args, Debug, Clone)]
pub struct MigrationArgs {
    /// page (classic pre-copy) or segment (dirty offset segments).
    #[arg(long, default_value = "segment")]
    pub granularity: Granularity,
    /// Diff workers, each with its own ring and data stream (1 to 256).
    #[arg(long, visible_alias = "streams", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_STREAMS)))]
    pub workers: u16,
    /// Pin worker threads to cores.
    #[arg(long)]
    pub pin: bool,
    /// Downtime target, 1 ms to 1 h (e.g. 300ms, 1.5s; a unit is required).
    #[arg(long, default_value = "300ms", value_parser = parse_downtime)]
    pub downtime: Duration,
    /// Most pre-copy rounds before stopping anyway (1 to 1000).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_rounds: u32,
    /// Give up (guest stays on the source) instead of forcing stop-and-copy
    /// when rounds stop converging.
    #[arg(long)]
    pub abort_on_stall: bool,
    /// What the source keeps of what it sent (segment mode): fingerprint (a
    /// keyed 64-bit hash per 64-byte block, 1/8 of the guest's memory;
    /// changed blocks go whole) or full (a byte-exact copy of the guest,
    /// changed bytes found exactly, as much memory again as the guest).
    /// Default: fingerprint, or full when --shadow-budget is given.
    #[arg(long)]
    pub shadow: Option<ShadowMode>,
    /// Cap the full shadow copy (segment mode) at this size (e.g. 64M);
    /// default: full copy.
    #[arg(long, value_parser = parse_size)]
    pub shadow_budget: Option<u64>,
    /// zstd for wide pages: off, on, or auto (only while the link is slower
    /// than compression).
    #[arg(long, default_value = "off")]
    pub zstd: ZstdMode,
    /// Cap on all streams together, 1 Mbit/s to 10 TB/s. The unit is
    /// required and says bits or bytes: B is bytes, b or bit is bits (100MB/s
    /// = 100MBps = 100MB = 10^8 B/s; 100Mbit = 100Mbps = 10^8 bit/s; 100MiB/s
    /// = 100 * 2^20 B/s; 10Gbit; 1.5Gbit).
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// What the switch-over proves: incremental (per-page hashes of what
    /// was sent and what landed, compared at switch-over; the source's
    /// memory checked against what it sent afterwards), strict (all memory
    /// digested on both ends while the guest is paused), or off.
    #[arg(long, default_value = "incremental")]
    pub verify: VerifyMode,
    /// Write a JSON report here (its directory must exist and be writable;
    /// checked before anything starts).
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl MigrationArgs {
    /// The shadow asked for; by default block fingerprints (bounded: 1/8 of
    /// the guest), a full copy when only its budget was given.
    pub fn shadow_mode(&self) -> ShadowMode {
        self.shadow.unwrap_or(if self.shadow_budget.is_some() {
            ShadowMode::Full
        } else {
            ShadowMode::Fingerprint
        })
    }

    /// Refuses a report that could not be written, before anything starts
    /// (exit status 2).
    pub fn check(&self) -> Result<()> {
        if self.shadow == Some(ShadowMode::Fingerprint) && self.shadow_budget.is_some() {
            return Err(usage(
                "--shadow-budget bounds --shadow full only; fingerprints take 1/8 of the guest's memory",
            ));
        }
        if let Some(path) = &self.json {
            check_writable("--json", path)?;
        }
        Ok(())
    }

    pub fn config(&self, secret: Secret) -> SourceConfig {
        let mut cfg = SourceConfig::new(self.granularity);
        cfg.workers = usize::from(self.workers);
        cfg.pin = self.pin;
        cfg.shadow = self.shadow_mode();
        cfg.shadow_budget = self.shadow_budget;
        cfg.zstd = self.zstd;
        cfg.bandwidth = self.bandwidth;
        cfg.secret = secret;
        cfg.verify = self.verify;
        cfg.policy = Policy {
            downtime_target: self.downtime,
            max_rounds: self.max_rounds,
            on_stall: if self.abort_on_stall {
                OnStall::Abort
            } else {
                OnStall::ForceStop
            },
            ..Policy::default()
        };
        cfg
    }
}

/// The shared secret.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// Shared secret both ends must hold (prefer the HPMIG_TOKEN variable:
    /// a flag shows in the process list). The stream is NOT encrypted.
    #[arg(long, env = "HPMIG_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl TokenArgs {
    pub fn secret(&self) -> Secret {
        self.token
            .as_deref()
            .map_or_else(Secret::none, |t| Secret::from_token(t.as_bytes()))
    }
}

/// Refuses (exit status 2) a file `flag` names that could not be written
/// later: its directory missing, or no file can be made there. Leaves
/// nothing behind and an existing file as it was.
pub fn check_writable(flag: &str, path: &Path) -> Result<()> {
    let refuse = |why: String| usage(format!("{flag} {}: {why}", path.display()));
    if path.is_dir() {
        return Err(refuse("is a directory".into()));
    }
    if path.exists() {
        // Opened for writing, not truncated: the old report stays until
        // the new one replaces it.
        return std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| refuse(format!("cannot be written ({e})")));
    }
    check_dir(flag, path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| refuse(format!("cannot be created ({e})")))?;
    std::fs::remove_file(path).map_err(|e| refuse(format!("cannot be removed again ({e})")))
}

/// Refuses (exit status 2) a path `flag` names whose directory does not
/// exist (a socket made there later could not be).
pub fn check_dir(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(usage(format!(
            "{flag} {}: no directory {}",
            path.display(),
            dir.display()
        )))
    }
}

/// Refuses (exit status 2) a HOST:PORT `flag` names that does not resolve.
pub fn check_address(flag: &str, addr: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(usage(format!("{flag} {addr}: resolves to no address"))),
        Err(e) => Err(usage(format!("{flag} {addr}: {e}"))),
    }
}
