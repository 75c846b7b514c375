//! The emulated guest: one host thread per "vCPU" running a [`Workload`]
//! through vm-memory, so every write lands in the VMM dirty bitmap. It
//! stands in for the KVM micro-VM where there is no /dev/kvm, and drives the
//! engine's own tests.
//!
//! Page 0 is the guest's own: vCPU `i` keeps its heartbeat counter at byte
//! `8 * i` there, and workloads never write page 0 otherwise. A guest started
//! on memory that already holds heartbeats (a migrated guest) continues from
//! them, so a heartbeat read after migration shows the guest kept running.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hpmig_core::vm_memory::bitmap::Bitmap;
use hpmig_core::vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use hpmig_core::guest::{Guest, GuestError};
use hpmig_core::memory::XorShift64;

use crate::Workload;

/// Most emulated vCPUs (their heartbeats share page 0).
pub const MAX_VCPUS: u32 = 64;
/// Pages rewritten by the hotspot workload.
pub const HOTSPOT_PAGES: u64 = 64;
const BATCH: u64 = 256;

/// The heartbeat of vCPU `vcpu` as stored in guest memory.
pub fn heartbeat<B: Bitmap + 'static>(memory: &GuestMemoryMmap<B>, vcpu: u32) -> u64 {
    let base = memory.iter().next().map(|r| r.start_addr().0).unwrap_or(0);
    memory
        .read_obj::<u64>(GuestAddress(base + 8 * u64::from(vcpu)))
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Shared {
    pause: AtomicBool,
    stop: AtomicBool,
    parked: AtomicU32,
    writes: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A running emulated guest.
#[derive(Debug)]
pub struct EmulatedGuest {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    vcpus: u32,
    paused: bool,
    config: EmulatedConfig,
}

/// How to start an emulated guest.
#[derive(Clone, Copy, Debug)]
pub struct EmulatedConfig {
    pub workload: Workload,
    pub vcpus: u32,
    /// Writes per second over all vCPUs; `None` runs flat out.
    pub dirty_rate: Option<u64>,
    pub seed: u64,
}

const STATE_TAG: &str = "hpmig-emulated-v1";

impl EmulatedConfig {
    /// The state record an emulated guest migrates with.
    pub fn state_record(&self) -> Vec<u8> {
        let rate = self.dirty_rate.map_or("max".to_string(), |r| r.to_string());
        format!(
            "{STATE_TAG} workload={} vcpus={} rate={rate}",
            self.workload.as_str(),
            self.vcpus
        )
        .into_bytes()
    }

    /// Reads a state record back; `None` if it is not an emulated guest's.
    pub fn from_state_record(record: &[u8], seed: u64) -> Option<EmulatedConfig> {
        let text = std::str::from_utf8(record).ok()?;
        let mut words = text.split(' ');
        if words.next()? != STATE_TAG {
            return None;
        }
        let mut cfg = EmulatedConfig {
            workload: Workload::Idle,
            vcpus: 1,
            dirty_rate: None,
            seed,
        };
        for w in words {
            match w.split_once('=')? {
                ("workload", v) => cfg.workload = v.parse().ok()?,
                ("vcpus", v) => {
                    cfg.vcpus = v.parse().ok().filter(|n| (1..=MAX_VCPUS).contains(n))?
                }
                ("rate", "max") => cfg.dirty_rate = None,
                ("rate", v) => cfg.dirty_rate = Some(v.parse().ok()?),
                _ => return None,
            }
        }
        Some(cfg)
    }
}

impl EmulatedGuest {
    pub fn start<B: Bitmap + Send + Sync + 'static>(
        memory: GuestMemoryMmap<B>,
        cfg: EmulatedConfig,
    ) -> Result<Self, GuestError> {
        let vcpus = cfg.vcpus.clamp(1, MAX_VCPUS);
        let shared = Arc::new(Shared::default());
        let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let page = hpmig_core::memory::host_page_size() as u64;
        if regions.iter().map(|r| r.1).sum::<u64>() < (HOTSPOT_PAGES + 2) * page {
            return Err(GuestError::State(
                "emulated guests need at least 66 pages".into(),
            ));
        }
        let threads = (0..vcpus)
            .map(|i| {
                let vcpu = Vcpu {
                    memory: memory.clone(),
                    regions: regions.clone(),
                    page,
                    index: i,
                    rate: cfg.dirty_rate.map(|r| (r / u64::from(vcpus)).max(1)),
                    rng: XorShift64::new(cfg.seed.wrapping_add(u64::from(i) + 1)),
                    shared: Arc::clone(&shared),
                };
                std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn(move || vcpu.run(cfg.workload))
                    .map_err(|e| GuestError::Resume(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(EmulatedGuest {
            shared,
            threads,
            vcpus,
            paused: false,
            config: EmulatedConfig { vcpus, ..cfg },
        })
    }

    /// Total workload writes so far (the guest's own progress).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }
}

impl Guest for EmulatedGuest {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.parked.load(Ordering::SeqCst) < self.vcpus {
            if Instant::now() > deadline {
                // Undo what stopped: a failed pause leaves the guest running.
                let _ = self.resume();
                return Err(GuestError::Pause(
                    "vCPU threads did not stop within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
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
        // The emulated vCPUs keep their registers in guest memory (the
        // heartbeats); the record says how to run them on.
        Ok(self.config.state_record())
    }

    fn vcpus(&self) -> u32 {
        self.vcpus
    }
}

impl Drop for EmulatedGuest {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Vcpu<B: Bitmap + 'static> {
    memory: GuestMemoryMmap<B>,
    regions: Vec<(u64, u64)>,
    page: u64,
    index: u32,
    rate: Option<u64>,
    rng: XorShift64,
    shared: Arc<Shared>,
}

impl<B: Bitmap + 'static> Vcpu<B> {
    fn next(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Guest address of byte `offset` of the flat memory (regions in order).
    fn addr(&self, mut offset: u64) -> GuestAddress {
        for &(base, size) in &self.regions {
            if offset < size {
                return GuestAddress(base + offset);
            }
            offset -= size;
        }
        GuestAddress(self.regions[0].0 + self.page)
    }

    fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// A random 8-aligned offset in `[first_page, first_page + pages)`, never page 0.
    fn random_offset(&mut self, first_page: u64, pages: u64) -> u64 {
        let span = pages * self.page / 8;
        (first_page * self.page) + (self.next() % span) * 8
    }

    fn park_if_asked(&self) -> bool {
        if self.shared.pause.load(Ordering::Relaxed) {
            let Ok(mut g) = self.shared.lock.lock() else {
                return true;
            };
            self.shared.parked.fetch_add(1, Ordering::SeqCst);
            while self.shared.pause.load(Ordering::SeqCst) {
                g = match self.shared.wake.wait(g) {
                    Ok(g) => g,
                    Err(_) => return true,
                };
            }
            self.shared.parked.fetch_sub(1, Ordering::SeqCst);
        }
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn run(mut self, workload: Workload) {
        let hb = self.addr(8 * u64::from(self.index));
        let mut beat = self.memory.read_obj::<u64>(hb).unwrap_or(0);
        let pages = self.total() / self.page;
        let mut dense_page = 1u64;
        let mut page_buf = vec![0u8; self.page as usize];
        let mut aba: Vec<(GuestAddress, u64)> = Vec::with_capacity(64);
        let start = Instant::now();
        let mut done = 0u64;
        loop {
            if self.park_if_asked() {
                return;
            }
            let mut writes = 0;
            match workload {
                Workload::Idle => std::thread::sleep(Duration::from_millis(1)),
                Workload::Sparse | Workload::Hotspot | Workload::Aba => {
                    let (first, n) = if workload == Workload::Hotspot {
                        (1, HOTSPOT_PAGES)
                    } else {
                        (1, pages - 1)
                    };
                    for _ in 0..BATCH {
                        let off = self.random_offset(first, n);
                        let a = self.addr(off);
                        let v = self.next();
                        if workload == Workload::Aba {
                            let old = self.memory.read_obj::<u64>(a).unwrap_or(0);
                            if aba.len() == aba.capacity() {
                                let (ra, rv) = aba.remove(0);
                                let _ = self.memory.write_obj(rv, ra);
                            }
                            aba.push((a, old));
                        }
                        let _ = self.memory.write_obj(v, a);
                    }
                    writes = BATCH;
                }
                Workload::Dense => {
                    let fill = self.next();
                    for (i, c) in page_buf.chunks_exact_mut(8).enumerate() {
                        c.copy_from_slice(&(fill ^ i as u64).to_le_bytes());
                    }
                    let a = self.addr(dense_page * self.page);
                    let _ = self.memory.write_slice(&page_buf, a);
                    dense_page = if dense_page + 1 >= pages {
                        1
                    } else {
                        dense_page + 1
                    };
                    writes = self.page / 8;
                }
            }
            beat += 1;
            let _ = self.memory.write_obj(beat, hb);
            self.shared.writes.fetch_add(writes, Ordering::Relaxed);
            done += writes;
            if let Some(rate) = self.rate {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip_and_reject_strangers() {
        let cfg = EmulatedConfig {
            workload: Workload::Aba,
            vcpus: 3,
            dirty_rate: Some(5000),
            seed: 1,
        };
        let back = EmulatedConfig::from_state_record(&cfg.state_record(), 1).unwrap();
        assert_eq!(
            (back.workload, back.vcpus, back.dirty_rate),
            (Workload::Aba, 3, Some(5000))
        );
        let flat = EmulatedConfig {
            dirty_rate: None,
            ..cfg
        };
        assert_eq!(
            EmulatedConfig::from_state_record(&flat.state_record(), 1)
                .unwrap()
                .dirty_rate,
            None
        );
        assert!(EmulatedConfig::from_state_record(b"kvm-state", 1).is_none());
        assert!(EmulatedConfig::from_state_record(b"hpmig-emulated-v1 vcpus=999", 1).is_none());
        assert!(EmulatedConfig::from_state_record(&[0xff, 0xfe], 1).is_none());
    }

    #[test]
    fn the_fuzzers_state_record_seed_decodes() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/handshake/emulated-state"
        );
        let seed = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        let cfg = EmulatedConfig::from_state_record(&seed, 0).expect("a valid record");
        assert_eq!(cfg.vcpus, 2);
    }
}
