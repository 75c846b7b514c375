//! The pause as the guest sees it: a host thread that reads the guest's
//! heartbeat in source and destination memory every 50 µs (4-5 kHz on two
//! busy cores, reported with the result), from before the
//! migration until the destination's copy beats past the source's last
//! value. The blackout is the time from the source heartbeat's last change
//! to the destination heartbeat's first change past it, on one clock (the
//! demo and the benchmark run both ends in one process). The micro-VM's guest beats after
//! every store, so the resolution is the observer's sample interval while
//! the guest runs; the result reports it beside the blackout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::heartbeat;
use hpmig_core::memory::{DestMemory, SourceMemory};

/// How often the observer samples both heartbeats.
const PERIOD: Duration = Duration::from_micros(50);

/// What the observer saw.
#[derive(Clone, Copy, Debug)]
pub struct Blackout {
    /// From the source's last beat to the destination's first beat past it.
    pub blackout: Duration,
    /// The median interval between the source beats seen in the last 1,000
    /// before the pause: the measurement's resolution (the guest's beat or
    /// the observer's sample, whichever is coarser).
    pub tick: Duration,
    /// Samples per second the observer achieved.
    pub sample_hz: f64,
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
    /// Watches vCPU 0's heartbeat in the micro-VM's memory on both ends.
    pub fn start(source: SourceMemory, dest: DestMemory) -> Observer {
        Observer::start_with(move || heartbeat(&source, 0), move || heartbeat(&dest, 0))
    }

    /// Watches a heartbeat read by `source` and `dest` (another VMM's
    /// guest, whose memory the host maps: QEMU's in the benchmark).
    pub fn start_with(
        source: impl Fn() -> u64 + Send + 'static,
        dest: impl Fn() -> u64 + Send + 'static,
    ) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || observe(&source, &dest, &flag));
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
    stop: &AtomicBool,
) -> Option<Blackout> {
    // The default 50 µs timer slack would stretch each 50 µs sleep to about
    // 100 µs and more: ask for none, on this thread only.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this
    // thread's timer slack; no pointer is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    // At normal priority this thread samples at 4-5 kHz on two busy cores
    // (the scheduler wakes it late). Higher priority was measured and
    // rejected: at nice -20 with 25 us sleeps it sampled at 14-15 kHz, but
    // it took enough CPU from the vCPU threads to stretch the pause and the
    // stalls around it by tens of milliseconds, and real-time priority
    // starved the vCPU thread for hundreds; an observer must not move what
    // it measures.
    let start = Instant::now();
    let mut samples = 0u64;
    let mut last_src = source();
    let mut src_changed = start;
    // When the source's last 1,001 beats were seen, newest last.
    let mut src_beats: std::collections::VecDeque<Instant> = Default::default();
    loop {
        samples += 1;
        let now = Instant::now();
        let s = source();
        if s != last_src {
            last_src = s;
            src_changed = now;
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
            return Some(Blackout {
                blackout: now - src_changed,
                tick: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
                sample_hz: samples as f64 / start.elapsed().as_secs_f64(),
                source_last: src_changed,
                dest_first: now,
                source_last_beat: last_src,
            });
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        std::thread::sleep(PERIOD);
    }
}
