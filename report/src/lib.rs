//! hpmig-report: the JSON report of one migration (`hpmig demo|source
//! --json FILE`) as serde types, shared by the `hpmig` binary, which writes
//! it, and the benchmark, which keeps each run's rounds and stop reason in
//! the same form; and how the figures read for people ([`text`]).
//!
//! # The schema and its version
//!
//! Every field, its unit and its meaning are written down in
//! `docs/report.md`; a test fails when a field of [`Report`] is missing
//! there. [`SCHEMA`] is the layout's version, the `schema` field of every
//! report. It goes up by one whenever a field is removed or renamed or
//! changes its meaning, unit or spelling, so that a reader never takes one
//! figure for another; adding a field does not change it. A reader should
//! refuse a schema newer than the one it knows.
//!
//! | schema | change |
//! |---|---|
//! | 1 | the first layout (stop reason as a Rust debug name, no configuration) |
//! | 2 | `config` echoed; per round `decision`, `reason`, `decision_text` and the projection; `summary.stop_reason` in words (`small-work-set`) |

use hpmig_core::precopy::controller::{Decision, OnStall, StopReason};
use hpmig_core::precopy::{RoundReport, SwitchoverTimes};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub mod text;

/// The version of the report's layout this crate writes.
pub const SCHEMA: u32 = 2;

/// One migration's report: how the command ended, what it was asked to do,
/// and on success each round and the figures of the whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The layout's version: [`SCHEMA`].
    pub schema: u32,
    /// The hpmig that wrote it (its crate version).
    pub hpmig_version: String,
    /// Which end wrote it: `source` (`demo` reports as the source).
    pub role: String,
    /// How the command ended, in a word (`migrated`, `failed`, ...; the
    /// exit status table).
    pub outcome: String,
    pub exit_status: u8,
    /// Where the guest is now, in words.
    pub guest: String,
    /// What the migration was asked to do.
    pub config: Config,
    /// Every round, the stop-and-copy round last (absent on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<Vec<Round>>,
    /// The figures of the whole migration (absent on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// `--verify incremental`: the source's memory checked against what
    /// was sent, after switch-over (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_check: Option<SourceCheck>,
    /// Where and why the migration failed (absent on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// The configuration the migration ran with, echoed so that a report can
/// be read without the command line that made it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The guest's workload: `sparse`, `dense`, `hotspot`, `aba`, `idle`.
    pub workload: String,
    /// Guest stores per second asked for; `None`: flat out.
    pub dirty_rate: Option<u64>,
    /// What guest memory held before the workload: `full`, `mixed`, `empty`.
    pub contents: String,
    /// The guest that ran: `kvm` (the micro-VM) or `emulated`.
    pub guest_kind: String,
    /// KVM's dirty log: `bitmap`, `clear`, `ring`.
    pub dirty_log: String,
    /// `page` or `segment`.
    pub granularity: String,
    pub workers: usize,
    pub pin: bool,
    /// The cap on all streams together, bytes per second; `None`: no cap.
    pub bandwidth_bytes_per_s: Option<u64>,
    pub downtime_target_ms: f64,
    pub max_rounds: u32,
    /// What happens when rounds stop paying off: `force-stop` or `abort`.
    pub on_stall: String,
    /// `incremental`, `strict`, `off`.
    pub verify: String,
    /// `off`, `on`, `auto`.
    pub zstd: String,
    /// What segment mode diffs against: `full` (a byte copy of what was
    /// sent) or `fingerprint` (a keyed hash per 64-byte block).
    pub shadow: String,
    /// The shadow copy's cap, bytes; `None`: a full copy.
    pub shadow_budget_bytes: Option<u64>,
    /// `tcp`, `rdma` or `inproc`.
    pub transport: String,
}

/// The policy's `on_stall` by name.
pub fn on_stall_name(o: OnStall) -> &'static str {
    match o {
        OnStall::ForceStop => "force-stop",
        OnStall::Abort => "abort",
    }
}

/// What the controller decided after a pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    /// Another pre-copy round.
    Continue,
    /// Pause the guest and send what is left.
    StopAndCopy,
    /// Give up; the guest stays on the source.
    Abort,
}

/// Why pre-copy ended ([`StopReason`] by name: `small-work-set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    Clean,
    SmallWorkSet,
    DowntimeFits,
    Stalled,
    RoundCap,
}

impl From<StopReason> for Stop {
    fn from(r: StopReason) -> Stop {
        match r {
            StopReason::Clean => Stop::Clean,
            StopReason::SmallWorkSet => Stop::SmallWorkSet,
            StopReason::DowntimeFits => Stop::DowntimeFits,
            StopReason::Stalled => Stop::Stalled,
            StopReason::RoundCap => Stop::RoundCap,
        }
    }
}

impl From<Decision> for DecisionKind {
    fn from(d: Decision) -> DecisionKind {
        match d {
            Decision::Continue => DecisionKind::Continue,
            Decision::StopAndCopy(_) => DecisionKind::StopAndCopy,
            Decision::Abort(_) => DecisionKind::Abort,
        }
    }
}

/// One round's figures and the decision taken after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    /// The stop-and-copy round (the guest paused), the last one.
    pub stop_and_copy: bool,
    pub dirty_pages: u64,
    /// Payload bytes the round had to send (the paper's work set).
    pub work_set_bytes: u64,
    /// Bytes on the wire, record headers included.
    pub wire_bytes: u64,
    pub duration_ms: f64,
    pub segments: u64,
    pub whole_pages: u64,
    pub zstd_pages: u64,
    pub zero_pages: u64,
    pub unchanged_pages: u64,
    /// What the controller decided after this round; `None` after the
    /// stop-and-copy round, which decides nothing.
    pub decision: Option<DecisionKind>,
    /// Why pre-copy ended, with a `stop-and-copy` or `abort` decision.
    pub reason: Option<Stop>,
    /// The decision as a sentence.
    pub decision_text: String,
    /// The next round's work set as the controller projected it (`None`
    /// for the stop-and-copy round).
    pub projected_work_set_bytes: Option<u64>,
    /// The pause the controller projected for a stop-and-copy now.
    pub projected_downtime_ms: Option<f64>,
}

impl From<&RoundReport> for Round {
    fn from(x: &RoundReport) -> Round {
        let (m, s) = (&x.metrics, &x.stats);
        let decided = !x.last;
        Round {
            round: m.round,
            stop_and_copy: x.last,
            dirty_pages: m.dirty_pages,
            work_set_bytes: m.work_set_bytes,
            wire_bytes: m.wire_bytes,
            duration_ms: ms(m.duration),
            segments: s.segments,
            whole_pages: s.whole_pages,
            zstd_pages: s.zstd_pages,
            zero_pages: s.zero_pages,
            unchanged_pages: s.unchanged_pages,
            decision: decided.then(|| x.decision.into()),
            reason: x.decision.reason().filter(|_| decided).map(Stop::from),
            decision_text: decision_text(x),
            projected_work_set_bytes: decided.then_some(x.projection.work_set_bytes),
            projected_downtime_ms: decided.then(|| ms(x.projection.downtime)),
        }
    }
}

/// A round's decision in words, as the round table prints it.
pub fn decision_text(x: &RoundReport) -> String {
    if x.last {
        "the stop-and-copy round (guest paused)".into()
    } else {
        x.decision.to_string()
    }
}

/// The switch-over, phase by phase, ms (see [`SwitchoverTimes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchoverMs {
    /// Before the pause, the guest running: not part of the downtime
    /// (absent from reports of builds before the drain: 0).
    #[serde(default)]
    pub drain: f64,
    pub pause: f64,
    pub harvest: f64,
    pub final_round: f64,
    pub acknowledge: f64,
    pub decision: f64,
}

impl From<&SwitchoverTimes> for SwitchoverMs {
    fn from(t: &SwitchoverTimes) -> SwitchoverMs {
        SwitchoverMs {
            drain: ms(t.drain),
            pause: ms(t.pause),
            harvest: ms(t.harvest),
            final_round: ms(t.final_round),
            acknowledge: ms(t.acknowledge),
            decision: ms(t.decision),
        }
    }
}

/// The figures of a whole migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub granularity: String,
    pub total_time_ms: f64,
    pub downtime_ms: f64,
    pub downtime_target_ms: f64,
    pub downtime_target_met: bool,
    pub verify_ms: f64,
    pub switchover_ms: SwitchoverMs,
    pub wire_bytes: u64,
    pub wire_bytes_after_round0: u64,
    /// Rounds, the stop-and-copy round included.
    pub rounds: usize,
    pub converged: bool,
    pub stop_reason: Stop,
    /// The stop reason as a sentence.
    pub stop_reason_text: String,
    pub verified: bool,
    pub verify: String,
    pub guest_contents: Option<String>,
    pub heartbeat_before: u64,
    pub heartbeat_after: Option<u64>,
    pub blackout_ms: Option<f64>,
    pub blackout_resolution_ms: Option<f64>,
    /// The longest interval between two of the observer's samples from its
    /// fast pace's start (at most 100 ms before the source's last beat) to
    /// the destination's first beat.
    #[serde(default)]
    pub blackout_max_gap_ms: Option<f64>,
    /// The true blackout is within this of `blackout_ms`: the longer of the
    /// sample intervals that ended at the source's last beat and at the
    /// destination's first.
    #[serde(default)]
    pub blackout_error_ms: Option<f64>,
    /// Samples per second the heartbeat observer achieved over the run, and
    /// in that window around the switch-over.
    #[serde(default)]
    pub observer_sample_hz: Option<f64>,
    #[serde(default)]
    pub observer_sample_hz_switchover: Option<f64>,
    /// The observer thread's CPU time over its wall time (1 = one core).
    #[serde(default)]
    pub observer_cpu_share: Option<f64>,
    /// Whether the observer sampled at real-time priority (SCHED_FIFO)
    /// around the switch-over.
    #[serde(default)]
    pub observer_realtime: Option<bool>,
    /// Time around the switch-over the observer slept because no heartbeat
    /// could move (the source paused, the destination not yet told to
    /// run): left out of `observer_sample_hz_switchover` and the gaps.
    #[serde(default)]
    pub observer_quiet_ms: Option<f64>,
    pub blackout_before_pause_ms: Option<f64>,
    pub blackout_paused_ms: Option<f64>,
    pub blackout_after_start_ms: Option<f64>,
    /// Guest stores per second before and during the migration.
    pub guest_rate_before: f64,
    pub guest_rate_during: f64,
    pub source_cpu_seconds: f64,
    /// The reporting process's peak resident memory (`demo`: both ends).
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// What the source kept to find changed bytes: `shadow`,
    /// `fingerprints` or `none` (page granularity), and its size.
    #[serde(default)]
    pub diff_store: Option<String>,
    #[serde(default)]
    pub diff_store_bytes: Option<u64>,
}

/// The check of the source's memory against what was sent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceCheck {
    pub pages_checked: u64,
    pub pages_differ: u64,
    /// Up to eight guest addresses of pages that differ.
    pub first: Vec<u64>,
}

impl From<&hpmig_core::verify::SourceCheck> for SourceCheck {
    fn from(c: &hpmig_core::verify::SourceCheck) -> SourceCheck {
        SourceCheck {
            pages_checked: c.pages_checked,
            pages_differ: c.pages_differ,
            first: c.first.clone(),
        }
    }
}

/// Where a migration failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The phase: `handshake`, `setup`, `pre-copy`, `stop-and-copy`,
    /// `state transfer`, `acknowledge`, `decision`.
    pub phase: String,
    pub round: u32,
    /// The error, as a sentence.
    pub cause: String,
}

/// A duration in milliseconds, as the report writes durations.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
