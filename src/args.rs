//! Flag groups shared by the commands.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use hpmig_core::auth::Secret;
use hpmig_core::memory::Contents;
use hpmig_core::precopy::controller::{OnStall, Policy};
use hpmig_core::precopy::limiter::parse_rate;
use hpmig_core::precopy::SourceConfig;
use hpmig_core::protocol::Granularity;
use hpmig_core::segment::compress::ZstdMode;
use hpmig_core::verify::VerifyMode;
use hpmig_microvm::Workload;

use crate::outcome::usage;
use crate::units::{parse_bytes, parse_millis};
use hpmig_core::dirty::kvm::DirtyLogMode;
use hpmig_microvm::{BootSpec, GuestChoice};

/// The guest to boot.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest memory size (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub memory: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// How the guest dirties memory: sparse, dense, hotspot, aba, idle.
    #[arg(long, default_value = "sparse")]
    pub workload: Workload,
    /// Guest writes per second (all vCPUs together); unbounded if not given.
    #[arg(long)]
    pub dirty_rate: Option<u64>,
    /// How long the guest runs before migration starts.
    #[arg(long, default_value = "500ms", value_parser = parse_millis)]
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
        hpmig_microvm::kvm::memory_ranges(self.memory)
            .map_err(|e| usage(format!("--memory: {e}")))?;
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
    /// Diff workers, each with its own ring and data stream.
    #[arg(long, visible_alias = "streams", default_value_t = 2)]
    pub workers: usize,
    /// Pin worker threads to cores.
    #[arg(long)]
    pub pin: bool,
    /// Downtime target (e.g. 300ms).
    #[arg(long, default_value = "300ms", value_parser = parse_millis)]
    pub downtime: Duration,
    /// Most pre-copy rounds before stopping anyway.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Give up (guest stays on the source) instead of forcing stop-and-copy
    /// when rounds stop converging.
    #[arg(long)]
    pub abort_on_stall: bool,
    /// Cap the shadow copy (segment mode) at this size; default: full copy.
    #[arg(long, value_parser = parse_bytes)]
    pub shadow_budget: Option<u64>,
    /// zstd for wide pages: off, on, or auto (only while the link is slower
    /// than compression).
    #[arg(long, default_value = "off")]
    pub zstd: ZstdMode,
    /// Cap on all streams together (e.g. 10Gbit, 500MB).
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// What the switch-over proves: incremental (per-page hashes of what
    /// was sent and what landed, compared at switch-over; the source's
    /// memory checked against what it sent afterwards), strict (all memory
    /// digested on both ends while the guest is paused), or off.
    #[arg(long, default_value = "incremental")]
    pub verify: VerifyMode,
    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl MigrationArgs {
    pub fn config(&self, secret: Secret) -> SourceConfig {
        let mut cfg = SourceConfig::new(self.granularity);
        cfg.workers = self.workers;
        cfg.pin = self.pin;
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
