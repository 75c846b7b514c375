//! How a stream waits on its completion queues: spin a little (a
//! completion usually comes within microseconds), then sleep briefly
//! between polls, checking the endpoint's interrupt, and give up once
//! nothing progressed for the stream's timeout. Both halves of a stream
//! wait this way.

use std::time::{Duration, Instant};

use hpmig_core::transport::{Interrupt, TransportError};

use crate::stream::StreamError;

/// Polls spun before the first sleep (and between slow checks).
const SPINS: u32 = 256;
const SLEEP: Duration = Duration::from_micros(50);

#[derive(Debug)]
pub(crate) struct Backoff {
    worker: u32,
    timeout: Duration,
    since: Instant,
    idle: u32,
}

impl Backoff {
    pub(crate) fn new(worker: u32, timeout: Duration) -> Backoff {
        Backoff {
            worker,
            timeout,
            since: Instant::now(),
            idle: 0,
        }
    }

    /// Something completed: spin again, and restart the timeout.
    pub(crate) fn progressed(&mut self) {
        self.since = Instant::now();
        self.idle = 0;
    }

    /// The peer is still working with us: restart the timeout only.
    pub(crate) fn alive(&mut self) {
        self.since = Instant::now();
    }

    /// One turn without a completion: a spin at first, later a check of
    /// `interrupt` and the timeout and a short sleep. Returns true every
    /// `SPINS` sleeping turns, the cue for checks too slow for every turn.
    pub(crate) fn idle(
        &mut self,
        interrupt: &Interrupt,
        what: &'static str,
    ) -> Result<bool, TransportError> {
        self.idle += 1;
        if self.idle < SPINS {
            std::hint::spin_loop();
            return Ok(false);
        }
        interrupt.check()?;
        if self.since.elapsed() > self.timeout {
            return Err(StreamError::Stalled {
                worker: self.worker,
                timeout: self.timeout,
                waiting_for: what,
            }
            .into());
        }
        let slow_check = self.idle % SPINS == 0;
        std::thread::sleep(SLEEP);
        Ok(slow_check)
    }
}
