//! The bandwidth cap (`--bandwidth`): one limiter shared by all workers,
//! asked once per ring slot (never per page). It schedules slots in virtual
//! time: a slot of n bytes occupies the link for n / rate seconds after the
//! previous one, and its sender sleeps until its turn. Over any window the
//! bytes sent stay within one slot per worker of rate × window.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: Mutex::new(None),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec as u64
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: usize) {
        let now = Instant::now();
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec));
            start
        };
        if let Some(wait) = start.checked_duration_since(now) {
            std::thread::sleep(wait);
        }
    }
}
