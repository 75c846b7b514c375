//! A VMM embedding hpmig: its guest is a `GuestMemoryMmap` written by plain
//! threads (its "vCPUs"). It implements `Guest` (source) and `DestGuest`
//! (destination), hands the engine a dirty source, and migrates the guest
//! over TCP on loopback while it writes. Exits 0 only if the destination's
//! memory equals the source's byte for byte and the guest runs on there.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::guest::{DestGuest, Guest, GuestError};
use hpmig_core::land::{receive, DestConfig};
use hpmig_core::memory::{Layout, XorShift64};
use hpmig_core::precopy::{migrate, SourceConfig};
use hpmig_core::protocol::Granularity;
use hpmig_core::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use hpmig_core::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

const SIZE: usize = 32 << 20;

/// Our guest: `vcpus` threads writing random words; they stop writing while
/// `paused` (the engine's pause must stop every writer of guest memory).
struct Threads {
    paused: Arc<AtomicBool>,
    parked: Arc<AtomicU64>,
    vcpus: u64,
}

impl Threads {
    fn start<B: Bitmap + Send + Sync + 'static>(memory: GuestMemoryMmap<B>, vcpus: u64) -> Threads {
        let (paused, parked) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        for i in 0..vcpus {
            let (m, paused, parked) = (memory.clone(), paused.clone(), parked.clone());
            thread::spawn(move || {
                let mut rng = XorShift64::new(i);
                loop {
                    if paused.load(SeqCst) {
                        parked.fetch_add(1, SeqCst);
                        while paused.load(SeqCst) {
                            thread::sleep(Duration::from_micros(100));
                        }
                        parked.fetch_sub(1, SeqCst);
                    }
                    let at = 8 * (rng.next_u64() % (SIZE as u64 / 8));
                    let _ = m.write_obj(rng.next_u64(), GuestAddress(at));
                    thread::sleep(Duration::from_micros(10));
                }
            });
        }
        Threads {
            paused,
            parked,
            vcpus,
        }
    }
}

impl Guest for Threads {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.paused.store(true, SeqCst);
        while self.parked.load(SeqCst) < self.vcpus {
            thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.paused.store(false, SeqCst);
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(self.vcpus.to_le_bytes().to_vec()) // our whole "device state"
    }
    fn vcpus(&self) -> u32 {
        self.vcpus as u32
    }
}

/// The destination's side: checks the state before the Ack, runs after the Commit.
struct Arrival {
    memory: GuestMemoryMmap<()>,
    vcpus: Option<u64>,
    running: Option<Threads>,
    /// What arrived, kept to check it against the source below (a real VMM would not).
    arrived: Vec<u8>,
}

impl DestGuest for Arrival {
    fn restore(
        &mut self,
        _: &GuestMemoryMmap<()>,
        vcpus: u32,
        state: &[u8],
    ) -> Result<(), GuestError> {
        let carried = <[u8; 8]>::try_from(state).ok().map(u64::from_le_bytes);
        if carried != Some(u64::from(vcpus)) {
            return Err(GuestError::State("not our state record".into()));
        }
        self.vcpus = Some(u64::from(vcpus));
        Ok(())
    }
    fn start(&mut self) -> Result<(), GuestError> {
        let vcpus = self
            .vcpus
            .ok_or(GuestError::Resume("nothing restored".into()))?;
        self.arrived = vec![0; SIZE];
        let _ = self.memory.read_slice(&mut self.arrived, GuestAddress(0));
        self.running = Some(Threads::start(self.memory.clone(), vcpus));
        Ok(())
    }
    fn discard(&mut self) {
        self.vcpus = None;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), SIZE)])?;
    let mut guest = Threads::start(source.clone(), 2);
    let layout = Layout::of(&source)?;
    let dest = layout.allocate::<()>()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dm = dest.clone();
    let destination = thread::spawn(move || {
        let mut t = TcpDest::accept(listener, TcpOptions::default())?;
        let mut arrival = Arrival {
            memory: dm.clone(),
            vcpus: None,
            running: None,
            arrived: Vec::new(),
        };
        let cfg = DestConfig {
            memory_zeroed: true,
            ..DestConfig::default()
        }; // fresh from allocate()
        let received = receive(&dm, &mut t, &cfg, &mut arrival)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((received, arrival))
    });
    let mut transport = TcpSource::connect(addr, TcpOptions::default())?;
    let mut dirty = VmmBitmap::new(source.clone(), layout)?; // writes through vm-memory are logged
    let report = migrate(
        &source,
        &mut dirty,
        &mut guest,
        &mut transport,
        &SourceConfig::new(Granularity::Segment),
        &mut |r| {
            println!(
                "round {}: {} dirty pages, {} bytes on the wire",
                r.metrics.round, r.metrics.dirty_pages, r.metrics.wire_bytes
            )
        },
    )?;
    let (received, arrival) = destination
        .join()
        .map_err(|_| "destination panicked")?
        .map_err(|e| e.to_string())?;
    // The source guest stays paused after the Commit: compare every byte with what arrived.
    let mut now = vec![0u8; SIZE];
    source.read_slice(&mut now, GuestAddress(0))?;
    let differ = now
        .chunks(4096)
        .zip(arrival.arrived.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    println!(
        "{} rounds, verified: {}, pages that differ: {differ}",
        report.rounds.len(),
        received.verified
    );
    if differ > 0 || !report.verified || arrival.running.is_none() {
        return Err("the destination does not hold the source's guest".into());
    }
    Ok(())
}
