//! A running migration as an operator sees and steers it: the progress
//! line, `hpmig ctl` and `/metrics` read it, a VMM embedding the engine
//! reads it too. The engine publishes its progress here, in atomics
//! written once per ring slot and once per round (never per page), and
//! reads the operator's steering where it can honour it: the bandwidth cap
//! at every slot, the downtime target at the controller's next decision,
//! a cancel at the next slot or state change, until the Commit is sent.
//!
//! Share one [`Live`] between the engine ([`super::SourceConfig::live`])
//! and whoever watches: [`Live::status`] is a consistent-enough snapshot
//! (each figure is read once; figures of one round go together).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::limiter::RateLimiter;
use super::SwitchoverTimes;

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Not started yet, or in the handshake and setup.
    Setup = 0,
    /// A pre-copy round runs while the guest runs.
    PreCopy = 1,
    /// The guest is paused; the final round runs.
    StopAndCopy = 2,
    /// State and Complete sent, waiting for the destination's Ack.
    SwitchOver = 3,
    /// The Commit is sent: too late to cancel.
    Committing = 4,
    /// The guest runs on the destination.
    Migrated = 5,
    /// Failed; the guest runs on the source.
    Failed = 6,
    /// Cancelled by the operator; the guest runs on the source.
    Cancelled = 7,
    /// The Commit went out and no Outcome came back: the guest stays
    /// paused until the outcome is known or an operator resolves it.
    InDoubt = 8,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 9] = [
        Stage::Setup,
        Stage::PreCopy,
        Stage::StopAndCopy,
        Stage::SwitchOver,
        Stage::Committing,
        Stage::Migrated,
        Stage::Failed,
        Stage::Cancelled,
        Stage::InDoubt,
    ];

    /// The name `status` and events use (QMP's `status` where one matches).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::PreCopy => "active",
            Stage::StopAndCopy => "device",
            Stage::SwitchOver => "switchover",
            Stage::Committing => "committing",
            Stage::Migrated => "completed",
            Stage::Failed => "failed",
            Stage::Cancelled => "cancelled",
            Stage::InDoubt => "in-doubt",
        }
    }

    /// Whether the migration has ended (one way or another).
    pub fn ended(self) -> bool {
        matches!(
            self,
            Stage::Migrated | Stage::Failed | Stage::Cancelled | Stage::InDoubt
        )
    }
}

/// Bytes put on the wire, by what they carried. Their sum is the wire
/// bytes: every byte of a record is in exactly one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteKinds {
    /// Payload of segment records (the dirty data inside pages).
    pub segment: u64,
    /// Payload of whole-page records sent plain.
    pub whole: u64,
    /// Payload of whole pages sent zstd-compressed.
    pub zstd: u64,
    /// Record headers (zero-page records are a header only) and round ends.
    pub headers: u64,
}

impl ByteKinds {
    pub fn total(&self) -> u64 {
        self.segment + self.whole + self.zstd + self.headers
    }
}

impl std::ops::AddAssign for ByteKinds {
    fn add_assign(&mut self, o: Self) {
        self.segment += o.segment;
        self.whole += o.whole;
        self.zstd += o.zstd;
        self.headers += o.headers;
    }
}

impl std::ops::Sub for ByteKinds {
    type Output = ByteKinds;
    fn sub(self, o: Self) -> ByteKinds {
        ByteKinds {
            segment: self.segment - o.segment,
            whole: self.whole - o.whole,
            zstd: self.zstd - o.zstd,
            headers: self.headers - o.headers,
        }
    }
}

/// One stream's counters since the migration started.
#[derive(Debug, Default)]
struct StreamCounters {
    segment: AtomicU64,
    whole: AtomicU64,
    zstd: AtomicU64,
    headers: AtomicU64,
    /// Dirty pages the stream's worker has dealt with (sent or found unchanged).
    pages: AtomicU64,
}

/// One stream's figures, as [`Live::status`] reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStatus {
    pub bytes: ByteKinds,
    pub pages: u64,
}

/// The last finished round's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundStatus {
    pub round: u32,
    /// Pages the round dealt with.
    pub pages: u64,
    /// Bytes of guest data the round found changed (its work set).
    pub work_set_bytes: u64,
    pub wire_bytes: u64,
    pub duration: Duration,
    /// Pages dirtied per second while it ran (the dirty log after it,
    /// over its duration).
    pub dirty_pages_rate: f64,
    /// Wire bytes per second it achieved.
    pub link_rate: f64,
    /// The controller's projection of the pause, were it to stop now.
    pub expected_downtime: Duration,
    /// The controller's decision after it, in words.
    pub decision: String,
}

/// How the migration ended, for `status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ended {
    /// The guest's pause (zero if it never paused).
    pub downtime: Duration,
    /// Where the pause went.
    pub switchover: SwitchoverTimes,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// A snapshot of a running migration.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// The destination's view: bytes landed, not sent; no work-set figures.
    pub landing: bool,
    pub stage: Stage,
    /// The round running (or the last one).
    pub round: u32,
    pub elapsed: Duration,
    pub guest_bytes: u64,
    pub page_size: u64,
    /// Wire bytes so far, all streams, by kind.
    pub bytes: ByteKinds,
    /// Per stream.
    pub streams: Vec<StreamStatus>,
    /// Dirty pages the running round set out to send.
    pub round_pages: u64,
    /// Of those, dealt with so far.
    pub round_pages_done: u64,
    /// Wire bytes of the running round so far.
    pub round_bytes: u64,
    /// How long the running round has run.
    pub round_elapsed: Duration,
    pub last_round: Option<RoundStatus>,
    /// The bandwidth cap in force (bytes/s), if any.
    pub bandwidth: Option<u64>,
    pub downtime_target: Duration,
    pub ended: Option<Ended>,
}

impl Status {
    /// Guest bytes the running round has still to deal with (QMP's
    /// `remaining`): at most the guest's size.
    pub fn remaining_bytes(&self) -> u64 {
        let left = self.round_pages.saturating_sub(self.round_pages_done);
        (left * self.page_size).min(self.guest_bytes)
    }

    /// Wire bytes per second of the running round so far.
    pub fn round_rate(&self) -> f64 {
        let s = self.round_elapsed.as_secs_f64();
        if s > 0.0 {
            self.round_bytes as f64 / s
        } else {
            0.0
        }
    }

    /// When the running round should end, at its pace so far.
    pub fn round_eta(&self) -> Option<Duration> {
        let done = self.round_pages_done;
        let s = self.round_elapsed.as_secs_f64();
        if done == 0 || s <= 0.0 || self.stage != Stage::PreCopy {
            return None;
        }
        let left = self.round_pages.saturating_sub(done) as f64;
        Duration::try_from_secs_f64(left * s / done as f64).ok()
    }
}

/// The answer to [`Live::cancel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelAnswer {
    /// It will stop at its next slot or state change; the guest runs on
    /// the source and the destination discards what it holds.
    Accepted,
    /// The Commit was sent (or the migration ended): nothing to cancel.
    TooLate(Stage),
    /// In doubt: cancelling would neither resume nor discard; resolve it.
    InDoubt,
}

/// A running migration's shared progress and steering. See the module doc.
#[derive(Debug)]
pub struct Live {
    /// When the migration started (`None` before: elapsed is zero).
    started: Mutex<Option<Instant>>,
    stage: AtomicU8,
    round: AtomicU32,
    guest_bytes: AtomicU64,
    page_size: AtomicU64,
    streams: Box<[StreamCounters]>,
    /// Pages the running round set out to send.
    round_pages: AtomicU64,
    /// Nanoseconds from `started` to the running round's start.
    round_start_ns: AtomicU64,
    /// Pages and bytes all streams had dealt with when the round started.
    round_base_pages: AtomicU64,
    round_base_bytes: AtomicU64,
    last: Mutex<Option<RoundStatus>>,
    ended: Mutex<Option<Ended>>,
    limiter: Arc<RateLimiter>,
    target_ns: AtomicU64,
    /// The operator set the cap or the target: the configuration's values
    /// no longer apply.
    steered_cap: AtomicBool,
    steered_target: AtomicBool,
    cancel: AtomicBool,
    landing: AtomicBool,
    /// The controller decided to stop pre-copy: the pause is next.
    stopping: AtomicBool,
    /// A pre-copy round's end: its harvest and the controller's decision.
    round_end: AtomicBool,
    /// Held while deciding between cancelling and committing.
    gate: Mutex<()>,
    /// Called after every stage change (a heartbeat observer that sleeps
    /// while the guest can run nowhere is woken by it).
    on_stage: StageHook,
}

/// What [`Live::on_stage_change`] registered.
#[derive(Default)]
struct StageHook(std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>);

impl std::fmt::Debug for StageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "StageHook(set)"
        } else {
            "StageHook(none)"
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Live {
    fn default() -> Self {
        Live::new()
    }
}

impl Live {
    pub fn new() -> Live {
        Live {
            started: Mutex::new(None),
            stage: AtomicU8::new(Stage::Setup as u8),
            round: AtomicU32::new(0),
            guest_bytes: AtomicU64::new(0),
            page_size: AtomicU64::new(4096),
            streams: (0..usize::from(crate::protocol::MAX_STREAMS))
                .map(|_| StreamCounters::default())
                .collect(),
            round_pages: AtomicU64::new(0),
            round_start_ns: AtomicU64::new(0),
            round_base_pages: AtomicU64::new(0),
            round_base_bytes: AtomicU64::new(0),
            last: Mutex::new(None),
            ended: Mutex::new(None),
            limiter: Arc::new(RateLimiter::new(None)),
            target_ns: AtomicU64::new(0),
            steered_cap: AtomicBool::new(false),
            steered_target: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            landing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            round_end: AtomicBool::new(false),
            gate: Mutex::new(()),
            on_stage: StageHook::default(),
        }
    }

    // ----- steering (the operator's side) -----

    /// Sets the bandwidth cap (bytes/s; `None` lifts it). Takes effect at
    /// every stream's next ring slot, mid-round.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.steered_cap.store(true, Relaxed);
        self.limiter.set(bytes_per_sec);
    }

    /// Sets the downtime target; the controller uses it at its next decision.
    pub fn set_downtime_target(&self, target: Duration) {
        self.steered_target.store(true, Relaxed);
        self.target_ns.store(
            u64::try_from(target.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// Asks the migration to stop with the guest running on the source.
    /// Honoured until the Commit is sent.
    pub fn cancel(&self) -> CancelAnswer {
        let _g = lock(&self.gate);
        match self.stage() {
            Stage::InDoubt => CancelAnswer::InDoubt,
            s if s == Stage::Committing || s.ended() => CancelAnswer::TooLate(s),
            _ => {
                self.cancel.store(true, Relaxed);
                CancelAnswer::Accepted
            }
        }
    }

    // ----- reading -----

    pub fn stage(&self) -> Stage {
        let v = self.stage.load(Relaxed);
        Stage::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .unwrap_or(Stage::Setup)
    }

    /// Whether the switch-over is or may be near: a pre-copy round ends
    /// (its harvest and the controller's decision, which may be to stop),
    /// the controller decided to stop pre-copy (the drain and the pause are
    /// next), or the guest is paused or gone. What a heartbeat observer
    /// samples fast for. A round's end counts because the guest's last
    /// beat can precede the decision: the harvest write-protects what the
    /// guest dirtied, and under nested virtualization its next store can
    /// stall until the pause. Through the rounds themselves it is not
    /// near: a fast observer would take its CPU from the guest through
    /// every round of a migration that takes many.
    pub fn switchover_near(&self) -> bool {
        self.stopping.load(Relaxed)
            || self.round_end.load(Relaxed)
            || !matches!(self.stage(), Stage::Setup | Stage::PreCopy)
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Relaxed)
    }

    pub fn bandwidth(&self) -> Option<u64> {
        self.limiter.rate()
    }

    pub fn downtime_target(&self) -> Duration {
        Duration::from_nanos(self.target_ns.load(Relaxed))
    }

    /// A snapshot of everything.
    pub fn status(&self) -> Status {
        let started = *lock(&self.started);
        let streams: Vec<StreamStatus> = self
            .streams
            .iter()
            .map(|c| StreamStatus {
                bytes: ByteKinds {
                    segment: c.segment.load(Relaxed),
                    whole: c.whole.load(Relaxed),
                    zstd: c.zstd.load(Relaxed),
                    headers: c.headers.load(Relaxed),
                },
                pages: c.pages.load(Relaxed),
            })
            .collect();
        let used = streams
            .iter()
            .rposition(|s| s.pages > 0 || s.bytes.total() > 0)
            .map_or(0, |i| i + 1);
        let mut bytes = ByteKinds::default();
        let mut pages = 0;
        for s in &streams {
            bytes += s.bytes;
            pages += s.pages;
        }
        let elapsed = started.map_or(Duration::ZERO, |t| t.elapsed());
        let round_start = Duration::from_nanos(self.round_start_ns.load(Relaxed));
        Status {
            landing: self.landing.load(Relaxed),
            stage: self.stage(),
            round: self.round.load(Relaxed),
            elapsed,
            guest_bytes: self.guest_bytes.load(Relaxed),
            page_size: self.page_size.load(Relaxed),
            bytes,
            streams: streams[..used].to_vec(),
            round_pages: self.round_pages.load(Relaxed),
            round_pages_done: pages.saturating_sub(self.round_base_pages.load(Relaxed)),
            round_bytes: bytes
                .total()
                .saturating_sub(self.round_base_bytes.load(Relaxed)),
            round_elapsed: elapsed.saturating_sub(round_start),
            last_round: lock(&self.last).clone(),
            bandwidth: self.bandwidth(),
            downtime_target: self.downtime_target(),
            ended: lock(&self.ended).clone(),
        }
    }

    // ----- publishing (the engine's side) -----

    /// The limiter the workers ask before every slot.
    pub(crate) fn limiter(&self) -> Arc<RateLimiter> {
        Arc::clone(&self.limiter)
    }

    /// A migration starts: the configuration's cap and target apply unless
    /// the operator already set them.
    pub(crate) fn start(
        &self,
        guest_bytes: u64,
        page_size: u64,
        bandwidth: Option<u64>,
        target: Duration,
    ) {
        *lock(&self.started) = Some(Instant::now());
        self.guest_bytes.store(guest_bytes, Relaxed);
        self.page_size.store(page_size, Relaxed);
        if !self.steered_cap.load(Relaxed) {
            self.limiter.set(bandwidth);
        }
        if !self.steered_target.load(Relaxed) {
            self.target_ns.store(
                u64::try_from(target.as_nanos()).unwrap_or(u64::MAX),
                Relaxed,
            );
        }
        self.stopping.store(false, Relaxed);
        self.round_end.store(false, Relaxed);
        self.set_stage(Stage::Setup);
    }

    /// The controller decided to stop pre-copy: the pause comes next. The
    /// stage hook hears it too (a heartbeat observer at its slow pace must
    /// turn fast now: the drain and the pause can take less than its sleep).
    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Relaxed);
        self.stage_hook();
    }

    /// A pre-copy round's end begins (`true`: its harvest is next) or the
    /// controller decided to go on (`false`). The stage hook hears both.
    pub(crate) fn round_ending(&self, ending: bool) {
        self.round_end.store(ending, Relaxed);
        self.stage_hook();
    }

    fn stage_hook(&self) {
        if let Some(hook) = self.on_stage.0.get() {
            hook();
        }
    }

    pub(crate) fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Relaxed);
        self.stage_hook();
    }

    /// Calls `hook` after every stage change, and when
    /// [`Live::switchover_near`] may have changed, from now on
    /// (once per migration: a second hook is refused and returned). It runs
    /// on the engine's thread: it must be quick (an unpark, a flag).
    pub fn on_stage_change(
        &self,
        hook: Box<dyn Fn() + Send + Sync>,
    ) -> Result<(), Box<dyn Fn() + Send + Sync>> {
        self.on_stage.0.set(hook)
    }

    /// The Commit is about to go out: from now on a cancel is too late.
    /// `false` if a cancel came first (the Commit must not go out).
    pub(crate) fn begin_commit(&self) -> bool {
        let _g = lock(&self.gate);
        if self.cancelled() {
            return false;
        }
        self.set_stage(Stage::Committing);
        true
    }

    /// A round starts that will deal with `pages` dirty pages.
    pub(crate) fn round_started(&self, round: u32, pages: u64, last: bool) {
        let st = self.status();
        self.round_base_pages
            .store(st.streams.iter().map(|s| s.pages).sum(), Relaxed);
        self.round_base_bytes.store(st.bytes.total(), Relaxed);
        self.round_start_ns.store(
            u64::try_from(st.elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
        self.round_pages.store(pages, Relaxed);
        self.round.store(round, Relaxed);
        self.set_stage(if last {
            Stage::StopAndCopy
        } else {
            Stage::PreCopy
        });
    }

    /// The destination starts landing a guest of `guest_bytes`.
    pub(crate) fn start_landing(&self, guest_bytes: u64, page_size: u64) {
        self.landing.store(true, Relaxed);
        self.start(guest_bytes, page_size, None, Duration::ZERO);
    }

    /// The destination: a stream landed round `round` whole.
    pub(crate) fn round_landed(&self, round: u32) {
        self.round.fetch_max(round + 1, Relaxed);
    }

    pub(crate) fn round_done(&self, r: RoundStatus) {
        *lock(&self.last) = Some(r);
    }

    /// One stream put `bytes` on the wire and dealt with `pages` pages
    /// since its last call (once per ring slot).
    pub(crate) fn add(&self, stream: usize, bytes: ByteKinds, pages: u64) {
        if let Some(c) = self.streams.get(stream) {
            c.segment.fetch_add(bytes.segment, Relaxed);
            c.whole.fetch_add(bytes.whole, Relaxed);
            c.zstd.fetch_add(bytes.zstd, Relaxed);
            c.headers.fetch_add(bytes.headers, Relaxed);
            c.pages.fetch_add(pages, Relaxed);
        }
    }

    pub(crate) fn end(&self, stage: Stage, ended: Ended) {
        *lock(&self.ended) = Some(ended);
        self.set_stage(stage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_is_honoured_until_the_commit_and_too_late_after() {
        let live = Live::new();
        live.start(1 << 20, 4096, None, Duration::from_millis(300));
        live.round_started(0, 256, false);
        assert_eq!(live.cancel(), CancelAnswer::Accepted);
        assert!(live.cancelled());
        assert!(!live.begin_commit(), "a cancel before the Commit stops it");

        let live = Live::new();
        live.start(1 << 20, 4096, None, Duration::from_millis(300));
        assert!(live.begin_commit());
        assert_eq!(live.cancel(), CancelAnswer::TooLate(Stage::Committing));
        assert!(!live.cancelled());
        live.end(Stage::InDoubt, Ended::default());
        assert_eq!(live.cancel(), CancelAnswer::InDoubt);
    }

    #[test]
    fn the_operators_cap_and_target_outlive_the_configuration() {
        let live = Live::new();
        live.set_bandwidth(Some(5_000_000));
        live.set_downtime_target(Duration::from_millis(100));
        live.start(1 << 20, 4096, Some(1), Duration::from_millis(300));
        assert_eq!(live.bandwidth(), Some(5_000_000));
        assert_eq!(live.downtime_target(), Duration::from_millis(100));
        let fresh = Live::new();
        fresh.start(1 << 20, 4096, Some(7), Duration::from_millis(300));
        assert_eq!(fresh.bandwidth(), Some(7));
        assert_eq!(fresh.downtime_target(), Duration::from_millis(300));
    }

    #[test]
    fn progress_of_the_running_round() {
        let live = Live::new();
        live.start(1 << 20, 4096, None, Duration::from_millis(300));
        live.round_started(0, 256, false);
        let kinds = ByteKinds {
            whole: 4096 * 10,
            headers: 160,
            ..ByteKinds::default()
        };
        live.add(0, kinds, 10);
        live.add(1, kinds, 54);
        let s = live.status();
        assert_eq!(s.streams.len(), 2);
        assert_eq!(s.bytes.total(), 2 * kinds.total());
        assert_eq!(s.round_pages_done, 64);
        assert_eq!(s.remaining_bytes(), 192 * 4096);
        live.round_started(1, 8, false);
        let s = live.status();
        assert_eq!((s.round, s.round_pages_done, s.round_bytes), (1, 0, 0));
        assert_eq!(s.remaining_bytes(), 8 * 4096);
    }

    #[test]
    fn the_switchover_is_near_once_the_controller_stops() {
        let live = Live::new();
        assert!(!live.switchover_near(), "not before it starts");
        live.start(1 << 20, 4096, None, Duration::from_millis(300));
        live.round_started(0, 100, false);
        live.round_started(1, 50, false);
        assert!(!live.switchover_near(), "pre-copy rounds go on");
        let heard = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&heard);
        assert!(live
            .on_stage_change(Box::new(move || {
                h.fetch_add(1, Relaxed);
            }))
            .is_ok());
        // A round's end may be the last: near through its harvest and
        // decision, far again when the controller goes on.
        live.round_ending(true);
        assert!(live.switchover_near(), "round 1 ends");
        live.round_ending(false);
        assert!(!live.switchover_near(), "round 2 goes on");
        assert_eq!(heard.load(Relaxed), 2, "the stage hook heard both");
        live.round_ending(true);
        live.stopping();
        assert!(live.switchover_near(), "the controller stopped");
        assert_eq!(heard.load(Relaxed), 4, "the stage hook heard the decision");
        // The stop-and-copy round, and a new migration starts far again.
        live.start(1 << 20, 4096, None, Duration::from_millis(300));
        assert!(!live.switchover_near());
        live.round_started(0, 100, true);
        assert!(live.switchover_near());
    }
}
