//! A test guest of the smallest kind: `vcpus` host threads writing 8-byte
//! values at random offsets through vm-memory (so the VMM bitmap sees every
//! write), each keeping a heartbeat counter at byte `8 * i` of the first
//! page, which no other write touches. It implements [`Guest`] on the
//! source and, through [`LandedScribbler`], [`DestGuest`] on the
//! destination, where it continues from the heartbeats it finds.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::guest::{DestGuest, Guest, GuestError};
use crate::memory::{host_page_size, DestMemory, XorShift64};

const TAG: &str = "hpmig-scribbler-v1 vcpus=";

#[derive(Debug, Default)]
struct Shared {
    pause: AtomicBool,
    stop: AtomicBool,
    parked: AtomicU32,
    writes: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The running test guest.
#[derive(Debug)]
pub struct Scribbler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    vcpus: u32,
    paused: bool,
    /// Test hook: `pause` stops this many vCPUs, then fails.
    pub fail_pause_after: Option<u32>,
}

/// vCPU `vcpu`'s heartbeat in `memory`.
pub fn heartbeat<B: Bitmap + 'static>(memory: &GuestMemoryMmap<B>, vcpu: u32) -> u64 {
    let base = memory.iter().next().map_or(0, |r| r.start_addr().0);
    memory
        .read_obj::<u64>(GuestAddress(base + 8 * u64::from(vcpu)))
        .unwrap_or(0)
}

impl Scribbler {
    /// Starts `vcpus` writers (1 to 64) on `memory`, `rate` writes per
    /// second in all (`None`: flat out).
    pub fn start<B: Bitmap + Send + Sync + 'static>(
        memory: GuestMemoryMmap<B>,
        vcpus: u32,
        rate: Option<u64>,
    ) -> Scribbler {
        Self::spawn(memory, vcpus, rate, false)
    }

    /// Like [`Scribbler::start`], but every writer waits, parked, for
    /// [`Guest::resume`] before its first write.
    pub fn start_parked<B: Bitmap + Send + Sync + 'static>(
        memory: GuestMemoryMmap<B>,
        vcpus: u32,
        rate: Option<u64>,
    ) -> Scribbler {
        Self::spawn(memory, vcpus, rate, true)
    }

    fn spawn<B: Bitmap + Send + Sync + 'static>(
        memory: GuestMemoryMmap<B>,
        vcpus: u32,
        rate: Option<u64>,
        parked: bool,
    ) -> Scribbler {
        let vcpus = vcpus.clamp(1, 64);
        let shared = Arc::new(Shared::default());
        shared.pause.store(parked, Ordering::SeqCst);
        let threads = (0..vcpus)
            .map(|i| {
                let (memory, shared) = (memory.clone(), Arc::clone(&shared));
                let rate = rate.map(|r| (r / u64::from(vcpus)).max(1));
                std::thread::spawn(move || scribble(&memory, &shared, i, rate))
            })
            .collect();
        Scribbler {
            shared,
            threads,
            vcpus,
            paused: parked,
            fail_pause_after: None,
        }
    }

    /// Writes so far (the guest's own progress).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Waits until `parked` vCPUs are parked.
    fn wait_parked(&self, parked: u32) -> Result<(), GuestError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.parked.load(Ordering::SeqCst) < parked {
            if Instant::now() > deadline {
                return Err(GuestError::Pause("writers did not stop within 10 s".into()));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

fn scribble<B: Bitmap + 'static>(
    memory: &GuestMemoryMmap<B>,
    s: &Shared,
    i: u32,
    rate: Option<u64>,
) {
    let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let page = host_page_size() as u64;
    let hb = GuestAddress(regions.first().map_or(0, |r| r.0) + 8 * u64::from(i));
    let mut beat = memory.read_obj::<u64>(hb).unwrap_or(0);
    let mut rng = XorShift64::new(u64::from(i) + 1);
    let (start, mut done) = (Instant::now(), 0u64);
    loop {
        if s.pause.load(Ordering::Relaxed) {
            let Ok(mut g) = s.lock.lock() else { return };
            s.parked.fetch_add(1, Ordering::SeqCst);
            while s.pause.load(Ordering::SeqCst) {
                let Ok(next) = s.wake.wait(g) else { return };
                g = next;
            }
            s.parked.fetch_sub(1, Ordering::SeqCst);
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        for _ in 0..64 {
            // Any 8-byte word past the first page, in flat order over regions.
            let mut off = page + (rng.next_u64() % (total.saturating_sub(page) / 8).max(1)) * 8;
            let addr = regions
                .iter()
                .find_map(|&(base, len)| {
                    if off < len {
                        Some(base + off)
                    } else {
                        off -= len;
                        None
                    }
                })
                .unwrap_or(0);
            let _ = memory.write_obj(rng.next_u64(), GuestAddress(addr));
        }
        beat += 1;
        let _ = memory.write_obj(beat, hb);
        s.writes.fetch_add(64, Ordering::Relaxed);
        done += 64;
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(20)));
            }
        }
    }
}

impl Guest for Scribbler {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.shared.pause.store(true, Ordering::SeqCst);
        if let Some(n) = self.fail_pause_after {
            self.wait_parked(n.min(self.vcpus))?;
            return Err(GuestError::Pause(format!(
                "test hook: failed after {n} vCPU(s) stopped"
            )));
        }
        self.wait_parked(self.vcpus)?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        let _g = self
            .shared
            .lock
            .lock()
            .map_err(|e| GuestError::Resume(e.to_string()))?;
        self.shared.pause.store(false, Ordering::SeqCst);
        self.shared.wake.notify_all();
        self.paused = false;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        if !self.paused {
            return Err(GuestError::State("state read while running".into()));
        }
        Ok(format!("{TAG}{}", self.vcpus).into_bytes())
    }

    fn vcpus(&self) -> u32 {
        self.vcpus
    }
}

impl Drop for Scribbler {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The destination's side of a [`Scribbler`]: checks its state record
/// before the Ack and starts it on the received memory after the Commit,
/// its writers parked until [`LandedScribbler::release`], so a test can
/// compare memories first.
#[derive(Debug, Default)]
pub struct LandedScribbler {
    memory: Option<DestMemory>,
    vcpus: Option<u32>,
    running: Option<Scribbler>,
    /// Test hook: refuse every state record.
    pub refuse: bool,
    /// Test hook: at the handshake, refuse guests with more vCPUs.
    pub max_vcpus: Option<u32>,
}

impl LandedScribbler {
    pub fn new() -> LandedScribbler {
        LandedScribbler::default()
    }

    /// The guest started here after the Commit.
    pub fn running(&self) -> Option<&Scribbler> {
        self.running.as_ref()
    }

    /// Lets the started guest's writers run.
    pub fn release(&mut self) -> Result<(), GuestError> {
        match &mut self.running {
            Some(g) => g.resume(),
            None => Err(GuestError::Resume("no guest was started".into())),
        }
    }
}

impl DestGuest for LandedScribbler {
    fn admit(&mut self, vcpus: u32, _requirements: &[u8]) -> Result<(), GuestError> {
        match self.max_vcpus {
            Some(max) if vcpus > max => Err(GuestError::Config(format!(
                "the guest has {vcpus} vCPUs, this host runs at most {max}"
            ))),
            _ => Ok(()),
        }
    }

    fn restore(&mut self, memory: &DestMemory, vcpus: u32, state: &[u8]) -> Result<(), GuestError> {
        let carried = std::str::from_utf8(state)
            .ok()
            .and_then(|s| s.strip_prefix(TAG))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| GuestError::State("not a scribbler's state record".into()))?;
        if self.refuse {
            return Err(GuestError::State("test hook: state refused".into()));
        }
        if carried != vcpus {
            return Err(GuestError::State(format!(
                "the State record announces {vcpus} vCPUs but carries {carried}"
            )));
        }
        self.vcpus = Some(vcpus);
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn start(&mut self) -> Result<(), GuestError> {
        let (Some(vcpus), Some(memory)) = (self.vcpus, &self.memory) else {
            return Err(GuestError::Resume(
                "started without a restored state".into(),
            ));
        };
        self.running = Some(Scribbler::start_parked(
            memory.clone(),
            vcpus,
            Some(100_000),
        ));
        Ok(())
    }

    fn discard(&mut self) {
        self.vcpus = None;
    }
}
