//! The pause as the guest sees it: a host thread that reads the guest's
//! heartbeat in source and destination memory every 500 µs while the
//! switch-over is far (pre-copy) and every 25 µs once it is near
//! (the caller says when), from before the migration until the
//! destination's copy beats past the source's last value. The blackout is
//! the time from the source heartbeat's last change to the destination
//! heartbeat's first change past it, on one clock (the demo and the
//! benchmark run both ends in one process). The micro-VM's guest beats
//! after every store, so the resolution is the observer's sample interval
//! while the guest runs; the result reports it beside the blackout, with
//! the rate the observer achieved over the run and around the switch-over
//! and the CPU it took. Each sleep and wake-up costs about 18 µs of CPU on
//! this nested-virtualization host (a C loop of `nanosleep`: 20 µs sleeps
//! gave 23 kHz for 40 % of a core, 80 µs sleeps 9 kHz for 17 %), CPU the
//! guest and the engine compete for during pre-copy: the slow pace there
//! leaves it to them, and the fast one is kept for the moments measured:
//! from the controller's decision to stop, through the pause, to the
//! destination's first beat (fast from round 1 on, the observer took 7 %
//! of a core over a 1 GiB run at a million stores a second; from the
//! decision, 3-4 %).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::heartbeat;
use hpmig_core::memory::{DestMemory, SourceMemory};

/// How often the observer samples both heartbeats once the switch-over is
/// near: asked for 40 kHz, it gets what the scheduler gives (the result
/// reports it).
const PERIOD: Duration = Duration::from_micros(25);

/// How often it samples while the switch-over is far.
const FAR_PERIOD: Duration = Duration::from_micros(500);

/// How far before the source's last beat the switch-over's sample rate is
/// counted from.
const WINDOW: Duration = Duration::from_millis(100);

/// Sample times kept for the switch-over's rate: at up to 40 kHz, more than
/// [`WINDOW`] plus a long pause.
const KEPT: usize = 1 << 14;

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
    /// How far the blackout can be off: the source's last beat came after
    /// the sample before the one that saw it, the destination's first beat
    /// likewise, so the true blackout is within the longer of those two
    /// sample intervals of `blackout`.
    pub error: Duration,
    /// The observer thread's CPU time over its wall time (1 = a whole core).
    pub cpu_share: f64,
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
    /// source to the first of any on the destination. `near` says when the
    /// switch-over is near (sample fast from then on).
    pub fn start(
        source: SourceMemory,
        dest: DestMemory,
        vcpus: u32,
        near: impl Fn() -> bool + Send + 'static,
    ) -> Observer {
        Observer::start_with(
            move || beats(&source, vcpus),
            move || beats(&dest, vcpus),
            near,
        )
    }

    /// Watches a heartbeat read by `source` and `dest` (another VMM's
    /// guest, whose memory the host maps: QEMU's in the benchmark).
    pub fn start_with(
        source: impl Fn() -> u64 + Send + 'static,
        dest: impl Fn() -> u64 + Send + 'static,
        near: impl Fn() -> bool + Send + 'static,
    ) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || observe(&source, &dest, &near, &flag));
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
    near: &dyn Fn() -> bool,
    stop: &AtomicBool,
) -> Option<Blackout> {
    // The default 50 µs timer slack would stretch each 50 µs sleep to about
    // 100 µs and more: ask for none, on this thread only.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this
    // thread's timer slack; no pointer is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    // It runs at normal priority (with 50 us sleeps throughout it sampled at
    // 4-8 kHz on two busy cores: the scheduler wakes it late). Higher
    // priority was measured and rejected: at nice -20 with 25 us sleeps it
    // sampled at 14-15 kHz, but it took enough CPU from the vCPU threads to
    // stretch the pause and the stalls around it by tens of milliseconds,
    // and real-time priority starved the vCPU thread for hundreds; an
    // observer must not move what it measures.
    let start = Instant::now();
    let mut samples = 0u64;
    // The last KEPT sample times, a ring (allocated once, before sampling).
    let mut times = vec![start; KEPT];
    let mut last_src = source();
    let mut src_changed = start;
    let mut fast = None;
    // The previous sample's time, and the interval before the sample that
    // saw the source's last change.
    let (mut prev, mut src_err) = (start, Duration::ZERO);
    // When the source's last 1,001 beats were seen, newest last.
    let mut src_beats: std::collections::VecDeque<Instant> = Default::default();
    loop {
        let now = Instant::now();
        times[(samples % KEPT as u64) as usize] = now;
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
            let (sample_hz_switchover, max_gap) = window_rate(&times, samples, from);
            return Some(Blackout {
                blackout: now - src_changed,
                tick: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
                sample_hz: samples as f64 / start.elapsed().as_secs_f64(),
                sample_hz_switchover,
                max_gap,
                error: src_err.max(now - prev),
                cpu_share: thread_cpu().as_secs_f64() / start.elapsed().as_secs_f64(),
                source_last: src_changed,
                dest_first: now,
                source_last_beat: last_src,
            });
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        prev = now;
        // Once near, near for good: the question is not asked again.
        if fast.is_none() && near() {
            fast = Some(Instant::now());
        }
        std::thread::sleep(if fast.is_some() { PERIOD } else { FAR_PERIOD });
    }
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
/// sample times (oldest overwritten first).
fn window_rate(times: &[Instant], samples: u64, from: Instant) -> (f64, Duration) {
    let kept = (samples as usize).min(times.len());
    let newest = (samples as usize + times.len() - 1) % times.len();
    let (mut count, mut max_gap, mut oldest) = (0u64, Duration::ZERO, times[newest]);
    let mut later = times[newest];
    for back in 1..kept {
        let t = times[(newest + times.len() - back) % times.len()];
        if t < from {
            break;
        }
        max_gap = max_gap.max(later - t);
        later = t;
        oldest = t;
        count += 1;
    }
    let span = (times[newest] - oldest).as_secs_f64();
    let hz = if span > 0.0 { count as f64 / span } else { 0.0 };
    (hz, max_gap)
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
        let (hz, gap) = window_rate(&ring, written.len() as u64, at(35));
        // From 40 to 100 us: 4 intervals in 60 us.
        assert_eq!(gap, Duration::from_micros(30));
        assert!((hz - 4.0 / 60e-6).abs() < 1.0, "{hz}");
        // A window older than the ring: everything kept (10..100 us, 7
        // intervals in 90 us).
        let (hz, _) = window_rate(&ring, written.len() as u64, t0);
        assert!((hz - 7.0 / 90e-6).abs() < 1.0, "{hz}");
    }

    /// A source that beats every 10 µs until 20 ms and a destination that
    /// beats past it from 30 ms: a 10 ms blackout, measured at the slow
    /// pace (never near), must be within its stated error of the truth.
    #[test]
    fn the_blackout_is_within_its_error_of_the_truth() {
        let t0 = Instant::now();
        let source =
            move || (t0.elapsed().min(Duration::from_millis(20)).as_micros() / 10) as u64 + 1;
        let dest = move || {
            if t0.elapsed() >= Duration::from_millis(30) {
                u64::MAX
            } else {
                0
            }
        };
        let stop = AtomicBool::new(false);
        let b = observe(&source, &dest, &|| false, &stop).expect("the destination beat");
        let truth = Duration::from_millis(10);
        let off = b.blackout.abs_diff(truth);
        // The sample time is taken just before the reads: allow for that.
        let slack = Duration::from_micros(100);
        assert!(off <= b.error + slack, "{b:?}");
        // At the slow pace the samples are ~500 us apart: so is the error.
        assert!(b.error >= FAR_PERIOD, "{b:?}");
        assert!(b.sample_hz > 0.0 && b.cpu_share > 0.0, "{b:?}");
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
