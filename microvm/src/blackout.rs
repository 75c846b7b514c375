//! The pause as the guest sees it: a host thread that reads the guest's
//! heartbeat in source and destination memory every 500 µs while the
//! switch-over is far (pre-copy) and every 80 µs (12.5 kHz) at real-time
//! priority once it is near (the caller says when), from before the
//! migration until the destination's copy beats past the source's last
//! value. The blackout is the time from the source heartbeat's last change
//! to the destination heartbeat's first change past it, on one clock (the
//! demo and the benchmark run both ends in one process). The micro-VM's
//! guest beats after every store, so the resolution is the observer's
//! sample interval while the guest runs; the result reports it beside the
//! blackout, with the rate the observer achieved over the run and around
//! the switch-over, its longest gap there, and the CPU it took. Each sleep
//! and wake-up costs about 18 µs of CPU on this nested-virtualization host
//! (a C loop of `nanosleep`: 20 µs sleeps gave 23 kHz for 40 % of a core,
//! 80 µs sleeps 9 kHz for 17 %), CPU the guest and the engine compete for
//! during pre-copy: the slow pace there leaves it to them, and the fast one
//! is kept for the moments measured: each pre-copy round's end (its
//! harvest and the controller's decision: the guest's last beat can come
//! before the decision, when the harvest's write protection stalls it),
//! and from the decision to stop, through the pause, to the destination's
//! first beat (over a run the observer takes 4-6 % of a core).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::heartbeat;
use hpmig_core::memory::{DestMemory, SourceMemory};
use hpmig_core::precopy::live::{Live, Stage};

/// How often the observer samples both heartbeats once the switch-over is
/// near: 12.5 kHz, on a grid of absolute wake-up times (a wake-up that
/// comes late starts the grid again from then: no burst of catch-up
/// samples that would lift the rate without closing the gap).
const PERIOD: Duration = Duration::from_micros(80);

/// How often it samples while the switch-over is far.
const FAR_PERIOD: Duration = Duration::from_micros(500);

/// How far before the source's last beat the switch-over's sample rate is
/// counted from.
const WINDOW: Duration = Duration::from_millis(100);

/// Sample times kept for the switch-over's rate: at up to 40 kHz, more than
/// [`WINDOW`] plus a long pause.
const KEPT: usize = 1 << 14;

/// How fast to sample now: what the caller tells the observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Pre-copy: the switch-over is far (every 500 µs).
    Far,
    /// The switch-over is near, or a heartbeat may move any moment: every
    /// 80 µs, at real-time priority.
    Near,
    /// No heartbeat can move: the source's vCPUs are paused and the
    /// destination's have not been told to run (until the Commit). The
    /// observer takes one more sample, then sleeps until woken (see
    /// [`Observer::waker`]) or 500 µs pass; the sleep is left out of the
    /// switch-over's rate and gaps.
    Quiet,
}

/// The pace for a migration that `live` shows: quiet from the final round
/// (the guest is paused before it starts) until the Commit, near once the
/// controller decided to stop, far before.
pub fn pace_of(live: &Live) -> Pace {
    match live.stage() {
        Stage::StopAndCopy | Stage::SwitchOver => Pace::Quiet,
        _ if live.switchover_near() => Pace::Near,
        _ => Pace::Far,
    }
}

/// What the observer saw.
#[derive(Clone, Copy, Debug)]
pub struct Blackout {
    /// From the source's last beat to the destination's first beat past it.
    pub blackout: Duration,
    /// The median interval between the source beats seen in the last 1,000
    /// before the pause: the measurement's resolution (the guest's beat or
    /// the observer's sample, whichever is coarser).
    pub tick: Duration,
    /// Samples per second the observer achieved over the whole run.
    pub sample_hz: f64,
    /// Samples per second from the fast pace's start (at most 100 ms
    /// before the source's last beat) to the destination's first beat: the
    /// rate the blackout was measured at.
    pub sample_hz_switchover: f64,
    /// The longest interval between two samples in that window.
    pub max_gap: Duration,
    /// Time in that window the observer slept because no heartbeat could
    /// move ([`Pace::Quiet`]): not in the rate or the gaps.
    pub quiet: Duration,
    /// How far the blackout can be off: the source's last beat came after
    /// the sample before the one that saw it, the destination's first beat
    /// likewise, so the true blackout is within the longer of those two
    /// sample intervals of `blackout`.
    pub error: Duration,
    /// The observer thread's CPU time over its wall time (1 = a whole core).
    pub cpu_share: f64,
    /// Whether the latest fast stretch ran at real-time priority
    /// (SCHED_FIFO); false where the process may not ask for it, or the
    /// switch-over came without the caller saying it was near.
    pub realtime: bool,
    /// When the observer saw the source's last beat.
    pub source_last: Instant,
    /// When it saw the destination's first beat past it.
    pub dest_first: Instant,
    /// The source heartbeat's last value: with its time (`source_last`),
    /// the guest's progress until the pause (the brownout's end).
    pub source_last_beat: u64,
}

/// The blackout in three parts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Split {
    /// From the source's last beat until the pause: the guest had already
    /// stopped beating (a dirty-logging fault, or no CPU to run on).
    pub before_pause: Duration,
    /// From the pause until the destination started the vCPUs.
    pub paused: Duration,
    /// From then until the destination's first beat.
    pub after_start: Duration,
}

impl Blackout {
    /// The brownout: the guest's heartbeat rate from `start` (when it read
    /// `beat`) to its last beat on the source, over `beats_per_s_before`.
    /// The pause is excluded; 1 is no slowdown.
    pub fn brownout(&self, start: Instant, beat: u64, beats_per_s_before: f64) -> f64 {
        let secs = self
            .source_last
            .saturating_duration_since(start)
            .as_secs_f64();
        self.source_last_beat.saturating_sub(beat) as f64 / secs / beats_per_s_before
    }

    /// Splits the blackout at the pause (`paused_at`, when the source's
    /// `Guest::pause` returned) and at the destination's start
    /// (`started_at`), both on this process's clock.
    pub fn split(&self, paused_at: Instant, started_at: Instant) -> Split {
        Split {
            before_pause: paused_at.saturating_duration_since(self.source_last),
            paused: started_at.saturating_duration_since(paused_at),
            after_start: self.dest_first.saturating_duration_since(started_at),
        }
    }
}

#[derive(Debug)]
pub struct Observer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<Blackout>>>,
}

impl Drop for Observer {
    /// A migration that failed never calls `finish`: stop sampling anyway.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Observer {
    /// Watches the heartbeats of the micro-VM's `vcpus` vCPUs in its
    /// memory on both ends, as one: their sum, which moves when any vCPU
    /// beats, so the blackout runs from the last beat of any vCPU on the
    /// source to the first of any on the destination. `pace` says how
    /// fast to sample now (see [`pace_of`]).
    pub fn start(
        source: SourceMemory,
        dest: DestMemory,
        vcpus: u32,
        pace: impl Fn() -> Pace + Send + 'static,
    ) -> Observer {
        Observer::start_with(
            move || beats(&source, vcpus),
            move || beats(&dest, vcpus),
            pace,
        )
    }

    /// Watches the micro-VM's heartbeats (as [`Observer::start`]) through
    /// the migration that `live` shows: at [`pace_of`] its stage, woken
    /// from a slow or quiet sleep whenever that pace may change (the
    /// decision to stop, a round's end, the Commit) rather than up to
    /// 500 us later. A `live` serves one migration: if it already has a
    /// stage hook, that hook is kept and the sleeps end by their timeout.
    pub fn for_migration(
        source: SourceMemory,
        dest: DestMemory,
        vcpus: u32,
        live: &Arc<Live>,
    ) -> Observer {
        let watched = Arc::clone(live);
        let observer = Observer::start(source, dest, vcpus, move || pace_of(&watched));
        let _ = live.on_stage_change(Box::new(observer.waker()));
        observer
    }

    /// Wakes the observer from a slow or [`Pace::Quiet`] sleep: call it
    /// when the pace may have changed (for a migration,
    /// [`Live::on_stage_change`], which also hears the decision to stop).
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let thread = self.thread.as_ref().map(|t| t.thread().clone());
        move || {
            if let Some(t) = &thread {
                t.unpark();
            }
        }
    }

    /// Watches a heartbeat read by `source` and `dest` (another VMM's
    /// guest, whose memory the host maps: QEMU's in the benchmark).
    pub fn start_with(
        source: impl Fn() -> u64 + Send + 'static,
        dest: impl Fn() -> u64 + Send + 'static,
        pace: impl Fn() -> Pace + Send + 'static,
    ) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || observe(&source, &dest, &pace, &flag));
        Observer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops observing (waiting at most `grace` for the destination's first
    /// beat) and returns the blackout, if the destination beat past the
    /// source at all.
    pub fn finish(mut self, grace: Duration) -> Option<Blackout> {
        let thread = self.thread.take()?;
        let deadline = Instant::now() + grace;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::Relaxed);
        thread.join().ok().flatten()
    }
}

fn observe(
    source: &dyn Fn() -> u64,
    dest: &dyn Fn() -> u64,
    pace: &dyn Fn() -> Pace,
    stop: &AtomicBool,
) -> Option<Blackout> {
    // The default 50 µs timer slack would stretch each 50 µs sleep to about
    // 100 µs and more: ask for none, on this thread only.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this
    // thread's timer slack; no pointer is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    // While far it runs at normal priority. Once near it asks for
    // SCHED_FIFO (see `realtime`) and sleeps to absolute 80 us deadlines:
    // at normal priority, sleeping 25 us, it got 11.6 kHz on the median
    // around the switch-over but under 10 kHz in 9 of 30 runs, with gaps
    // of up to 6 ms (two cores busy with vCPUs, workers and landers; a C
    // loop beside three busy threads: gaps of 8-14 ms whatever its
    // sleep or EEVDF slice). Real-time, it is woken on time: the same loop
    // kept 12.5 kHz with gaps under 0.5 ms, for 21-23 % of a core. The
    // CPU it takes is bounded by the grid (one sample, ~18 us of sleep and
    // wake-up on this nested host, per 80 us), less than the 25 us pace at
    // normal priority took; nice -20 with 25 us sleeps (40 kHz asked) was
    // measured in an earlier session to stretch the pause, and is not
    // what this does.
    let start = Instant::now();
    let mut samples = 0u64;
    // The last KEPT sample times, a ring (allocated once, before sampling),
    // and whether each came after a quiet sleep.
    let mut times = vec![start; KEPT];
    let mut woke = vec![false; KEPT];
    // A sample was taken after the pace turned quiet (the next may sleep),
    // and the sample about to be taken follows a quiet sleep.
    let (mut quiet_sampled, mut after_quiet) = (false, false);
    let mut last_src = source();
    let mut src_changed = start;
    let mut fast = None;
    // Whether the fast pace got real-time priority, and its next wake-up.
    let (mut realtime, mut next) = (false, start);
    // The previous sample's time, and the interval before the sample that
    // saw the source's last change.
    let (mut prev, mut src_err) = (start, Duration::ZERO);
    // When the source's last 1,001 beats were seen, newest last.
    let mut src_beats: std::collections::VecDeque<Instant> = Default::default();
    loop {
        let now = Instant::now();
        times[(samples % KEPT as u64) as usize] = now;
        woke[(samples % KEPT as u64) as usize] = after_quiet;
        after_quiet = false;
        samples += 1;
        let s = source();
        if s != last_src {
            last_src = s;
            src_changed = now;
            src_err = now - prev;
            if src_beats.len() == 1001 {
                src_beats.pop_front();
            }
            src_beats.push_back(now);
        }
        // The destination's copy carries the source's value; a larger one
        // means its vCPUs ran. The source is paused by then, so `last_src`
        // is its final beat (read again after the destination: a source
        // that beat between the two reads is not over yet).
        if last_src > 0 && dest() > last_src && source() == last_src {
            let mut gaps: Vec<Duration> = src_beats
                .iter()
                .zip(src_beats.iter().skip(1))
                .map(|(a, b)| *b - *a)
                .collect();
            gaps.sort_unstable();
            let window = src_changed.checked_sub(WINDOW).unwrap_or(start);
            let from = fast.map_or(window, |f: Instant| f.max(window));
            let (sample_hz_switchover, max_gap, quiet) = window_rate(&times, &woke, samples, from);
            return Some(Blackout {
                blackout: now - src_changed,
                tick: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
                sample_hz: samples as f64 / start.elapsed().as_secs_f64(),
                sample_hz_switchover,
                max_gap,
                quiet,
                error: src_err.max(now - prev),
                cpu_share: thread_cpu().as_secs_f64() / start.elapsed().as_secs_f64(),
                realtime,
                source_last: src_changed,
                dest_first: now,
                source_last_beat: last_src,
            });
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        prev = now;
        let pace = pace();
        // Fast while near (but for quiet sleeps), from the start of the
        // latest near stretch: a pre-copy round's end is near, and the
        // rounds between are far again, at normal priority.
        if fast.is_none() && pace != Pace::Far {
            let now = Instant::now();
            fast = Some(now);
            realtime = promote();
            next = now;
        } else if fast.is_some() && pace == Pace::Far {
            fast = None;
            if realtime {
                demote();
            }
            realtime = false;
        }
        match pace {
            // This sample may have preceded the pause: one more on the
            // grid, taken after the pace turned quiet, sees the source's
            // final value at the grid's interval; then sleep until woken.
            Pace::Quiet if quiet_sampled => {
                std::thread::park_timeout(FAR_PERIOD);
                after_quiet = true;
                next = Instant::now();
                continue;
            }
            Pace::Quiet => quiet_sampled = true,
            Pace::Near | Pace::Far => quiet_sampled = false,
        }
        if fast.is_some() {
            next += PERIOD;
            let now = Instant::now();
            if next <= now {
                next = now + PERIOD;
            }
            sleep_until(next);
        } else {
            // Slow, but woken at once when the pace may have changed (the
            // controller's decision can come less than a sleep before the
            // pause).
            std::thread::park_timeout(FAR_PERIOD);
        }
    }
}

/// Asks for real-time priority (SCHED_FIFO, the lowest level) for this
/// thread; says whether it got it (it needs CAP_SYS_NICE or an RLIMIT_RTPRIO
/// that allows it: without, it samples at normal priority and the report's
/// rate and gap say what that gave).
fn promote() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread, the only one whose policy this changes.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Back to normal priority after [`promote`] (a round's end that was not
/// the last: the observer must not keep a real-time grid through the
/// rounds). It cannot fail for want of privilege: lowering its own
/// priority needs none.
fn demote() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `promote`: a valid sched_param, pid 0 is this thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
}

/// Sleeps until `deadline` on CLOCK_MONOTONIC (the clock `Instant` reads),
/// to an absolute time so that the time to go to sleep does not add up.
fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        std::thread::sleep(left);
        return;
    }
    let total = ts.tv_nsec as u128 + left.as_nanos();
    ts.tv_sec += (total / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (total % 1_000_000_000) as libc::c_long;
    // SAFETY: `ts` is a valid timespec; no remaining-time pointer is passed
    // (an interrupted sleep returns early, which only takes one sample
    // sooner).
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// The sum of the first `vcpus` vCPUs' heartbeats in `memory`.
fn beats<B: vm_memory::bitmap::Bitmap + 'static>(
    memory: &vm_memory::GuestMemoryMmap<B>,
    vcpus: u32,
) -> u64 {
    (0..vcpus.max(1)).map(|v| heartbeat(memory, v)).sum()
}

/// The sample rate and the longest gap between samples from `from` to the
/// newest sample, out of the ring `times` that holds the last `samples`
/// sample times (oldest overwritten first), leaving out the gaps before
/// samples marked in `woke` (quiet sleeps); and the time those took.
fn window_rate(
    times: &[Instant],
    woke: &[bool],
    samples: u64,
    from: Instant,
) -> (f64, Duration, Duration) {
    let kept = (samples as usize).min(times.len());
    let newest = (samples as usize + times.len() - 1) % times.len();
    let (mut count, mut max_gap, mut quiet) = (0u64, Duration::ZERO, Duration::ZERO);
    let (mut later, mut later_woke, mut oldest) = (times[newest], woke[newest], times[newest]);
    for back in 1..kept {
        let i = (newest + times.len() - back) % times.len();
        let t = times[i];
        if t < from {
            break;
        }
        if later_woke {
            quiet += later - t;
        } else {
            max_gap = max_gap.max(later - t);
            count += 1;
        }
        later = t;
        later_woke = woke[i];
        oldest = t;
    }
    let span = (times[newest] - oldest).saturating_sub(quiet).as_secs_f64();
    let hz = if span > 0.0 { count as f64 / span } else { 0.0 };
    (hz, max_gap, quiet)
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // CLOCK_THREAD_CPUTIME_ID needs no other argument.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rate_counts_only_samples_in_the_window_and_finds_the_gap() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // A ring of 8 that was written 9 samples, 10 us apart but for a
        // 30 us gap between 60 and 90: the first (0 us) was overwritten.
        let written = [0u64, 10, 20, 30, 40, 50, 60, 90, 100];
        let mut ring = vec![t0; 8];
        for (i, us) in written.iter().enumerate() {
            ring[i % 8] = at(*us);
        }
        let none = vec![false; 8];
        let (hz, gap, quiet) = window_rate(&ring, &none, written.len() as u64, at(35));
        // From 40 to 100 us: 4 intervals in 60 us.
        assert_eq!(gap, Duration::from_micros(30));
        assert_eq!(quiet, Duration::ZERO);
        assert!((hz - 4.0 / 60e-6).abs() < 1.0, "{hz}");
        // A window older than the ring: everything kept (10..100 us, 7
        // intervals in 90 us).
        let (hz, _, _) = window_rate(&ring, &none, written.len() as u64, t0);
        assert!((hz - 7.0 / 90e-6).abs() < 1.0, "{hz}");
        // The sample at 90 us came after a quiet sleep: the 30 us before it
        // is neither a gap nor time sampled (from 40 us: 3 intervals in
        // 60 - 30 us).
        let mut woke = none.clone();
        woke[7] = true;
        let (hz, gap, quiet) = window_rate(&ring, &woke, written.len() as u64, at(35));
        assert_eq!(gap, Duration::from_micros(10));
        assert_eq!(quiet, Duration::from_micros(30));
        assert!((hz - 3.0 / 30e-6).abs() < 1.0, "{hz}");
    }

    /// Runs the observer in a thread of its own on a scripted guest: the
    /// source beats every 10 us until `source_until`, the destination beats
    /// past it from 30 ms, and `pace` says the pace at each time since the
    /// start.
    fn scripted(
        source_until: Duration,
        pace: impl Fn(Duration) -> Pace + Send + 'static,
    ) -> Blackout {
        let t0 = Instant::now();
        let source = move || (t0.elapsed().min(source_until).as_micros() / 10) as u64 + 1;
        let dest = move || {
            if t0.elapsed() >= Duration::from_millis(30) {
                u64::MAX
            } else {
                0
            }
        };
        let stop = AtomicBool::new(false);
        std::thread::spawn(move || observe(&source, &dest, &move || pace(t0.elapsed()), &stop))
            .join()
            .expect("the observer ran")
            .expect("the destination beat")
    }

    /// A source that beats every 10 µs until 20 ms and a destination that
    /// beats past it from 30 ms: a 10 ms blackout, measured at the slow
    /// pace (never near), must be within its stated error of the truth.
    #[test]
    fn the_blackout_is_within_its_error_of_the_truth() {
        let b = scripted(Duration::from_millis(20), |_| Pace::Far);
        let truth = Duration::from_millis(10);
        let off = b.blackout.abs_diff(truth);
        // The sample time is taken just before the reads: allow for that.
        let slack = Duration::from_micros(100);
        assert!(off <= b.error + slack, "{b:?}");
        // At the slow pace the samples are ~500 us apart: so is the error.
        assert!(b.error >= FAR_PERIOD, "{b:?}");
        assert!(b.sample_hz > 0.0 && b.cpu_share > 0.0, "{b:?}");
    }

    /// Near from the start: the observer asks for real-time priority and
    /// says whether it got it, which is what the system allows (as root,
    /// as in CI: it must get it), and samples on the fast grid.
    #[test]
    fn near_it_samples_at_real_time_priority_where_allowed() {
        // What the system allows, asked in a thread of its own.
        let allowed = std::thread::spawn(promote).join().expect("the probe ran");
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(allowed, "root may ask for SCHED_FIFO");
        }
        let b = scripted(Duration::from_millis(20), |_| Pace::Near);
        assert_eq!(b.realtime, allowed, "{b:?}");
        // Real-time, on the fast grid, not the slow pace: 30 ms at 80 us is
        // ~375 samples; the test asks for twice the slow pace's rate.
        if b.realtime {
            assert!(b.sample_hz > 2.0 / FAR_PERIOD.as_secs_f64(), "{b:?}");
        }
    }

    /// At the slow pace, a wake-up cuts the sleep short: the controller's
    /// decision to stop (which wakes the observer) can come less than a
    /// slow sleep before the pause. Woken every 50 us, it samples far more
    /// often than the slow pace's 2 kHz.
    #[test]
    fn a_wake_up_cuts_the_slow_sleep_short() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let source = move || (t0.elapsed().min(ms(20)).as_micros() / 10) as u64 + 1;
        let dest = move || if t0.elapsed() >= ms(30) { u64::MAX } else { 0 };
        let observer = Observer::start_with(source, dest, || Pace::Far);
        let wake = observer.waker();
        while t0.elapsed() < ms(32) {
            wake();
            std::thread::sleep(Duration::from_micros(50));
        }
        let b = observer.finish(ms(100)).expect("the destination beat");
        assert!(b.sample_hz > 2.0 / FAR_PERIOD.as_secs_f64(), "{b:?}");
        assert!(!b.realtime, "never near: {b:?}");
    }

    /// Near for 10 ms, far for 15 ms (a round's end that was not the
    /// last), then near again: between, the observer is back at the slow
    /// pace, so over the run it samples well under the fast grid's rate
    /// (about 7 kHz here, 12.5 kHz if it stayed fast).
    #[test]
    fn a_round_end_that_was_not_the_last_slows_it_again() {
        let ms = Duration::from_millis;
        let b = scripted(ms(28), move |e| {
            if e >= ms(10) && e < ms(25) {
                Pace::Far
            } else {
                Pace::Near
            }
        });
        let grid = 1.0 / PERIOD.as_secs_f64();
        assert!(b.sample_hz < 0.8 * grid, "{b:?}");
        // The switch-over's rate counts from the latest near stretch only.
        if b.realtime {
            assert!(b.sample_hz_switchover > 0.8 * grid, "{b:?}");
        }
    }

    /// The source stops beating at 20 ms, the caller says quiet from 21 ms
    /// to 29 ms (no heartbeat can move) and near around it, the destination
    /// beats from 30 ms: the observer sleeps through the quiet time, leaves
    /// it out of the rate and the gaps, and the blackout is still within
    /// its error of the truth.
    #[test]
    fn it_sleeps_while_no_heartbeat_can_move() {
        let ms = Duration::from_millis;
        let b = scripted(ms(20), move |e| {
            if e >= ms(21) && e < ms(29) {
                Pace::Quiet
            } else {
                Pace::Near
            }
        });
        // Asleep for most of the 8 ms (not woken early: a 500 us timeout).
        assert!(b.quiet >= ms(5) && b.quiet <= ms(9), "{b:?}");
        // No gap spans the quiet time: each is at most a sleep's timeout
        // (and a late wake-up) away from the grid.
        assert!(b.max_gap < ms(5), "{b:?}");
        let off = b.blackout.abs_diff(ms(10));
        assert!(off <= b.error + Duration::from_micros(100), "{b:?}");
    }

    #[test]
    fn every_vcpus_beat_moves_the_sum() {
        use vm_memory::{Bytes, GuestAddress};
        let memory = DestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let at = |v: u64| GuestAddress(crate::kvm::program::HEARTBEAT + 8 * v);
        memory.write_obj(5u64, at(0)).unwrap();
        memory.write_obj(7u64, at(1)).unwrap();
        assert_eq!(beats(&memory, 1), 5);
        assert_eq!(beats(&memory, 2), 12);
        // vCPU 1 beats alone: the sum moves.
        memory.write_obj(8u64, at(1)).unwrap();
        assert_eq!(beats(&memory, 2), 13);
    }

    #[test]
    fn thread_cpu_advances_with_work() {
        let a = thread_cpu();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu() > a, "{x}");
    }
}
