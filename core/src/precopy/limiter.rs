//! The bandwidth cap (`--bandwidth`, `hpmig ctl set bandwidth=`): one
//! limiter shared by all workers, asked once per ring slot (never per page).
//! It schedules slots in virtual time: a slot of n bytes occupies the link
//! for n / rate seconds after the previous one, and its sender sleeps until
//! its turn. Over any window the bytes sent stay within one slot per worker
//! of rate × window. A sender waits in slices of [`SLICE`], so a new rate
//! (or a cancel) applies within one slice, mid-round.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a sender sleeps before it looks at the rate again.
pub const SLICE: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0: no cap.
    rate: AtomicU64,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A cap of `bytes_per_sec` (`None` or 0: none).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        RateLimiter {
            rate: AtomicU64::new(bytes_per_sec.unwrap_or(0)),
            next_free: Mutex::new(None),
        }
    }

    /// The cap in force.
    pub fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Relaxed)).filter(|r| *r > 0)
    }

    /// A new cap, from the next slot on; the schedule made at the old rate
    /// is forgotten.
    pub fn set(&self, bytes_per_sec: Option<u64>) {
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        self.rate.store(bytes_per_sec.unwrap_or(0), Relaxed);
        *next = None;
    }

    /// Waits until `bytes` may be sent, or until `stop` says to give up.
    pub fn acquire(&self, bytes: usize, stop: &dyn Fn() -> bool) {
        loop {
            let rate = self.rate.load(Relaxed);
            if rate == 0 {
                return;
            }
            let now = Instant::now();
            let wait = {
                let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
                let start = next.map_or(now, |t| t.max(now));
                let wait = start - now;
                if wait <= SLICE {
                    *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
                }
                wait
            };
            if wait <= SLICE {
                std::thread::sleep(wait);
                return;
            }
            if stop() {
                return;
            }
            std::thread::sleep(SLICE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_rate_applies_to_the_next_slot() {
        let l = RateLimiter::new(Some(1_000));
        let never = || false;
        l.acquire(100_000, &never); // books the link for 100 s at 1 kB/s
        l.set(Some(1_000_000_000));
        let t = Instant::now();
        l.acquire(1_000, &never);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        l.set(None);
        assert_eq!(l.rate(), None);
        l.set(Some(1_000));
        l.acquire(100_000, &never);
        let t = Instant::now();
        l.acquire(1_000, &|| true); // a cancel ends the wait
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}
