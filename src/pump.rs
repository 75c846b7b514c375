//! `hpmig pump`: the RDMA transport alone, with no engine work, so that its
//! rate can be set beside `ib_write_bw`'s on the same device and beside a
//! migration's round 0 (which adds harvesting, copying pages into slots and
//! hashing them).
//!
//! The sending end opens the transport exactly as a migration's source does
//! ([`RdmaSource::connect`], the handshake, `open_streams` with one ring per
//! stream) and hands slots to each stream's `RdmaTx` as the precopy workers
//! do (`take_free`, `submit`). The slots were filled once, before the clock
//! starts: each holds `--size` bytes of Page records (pseudo-random pages,
//! each behind its 16-byte header). Per batch only the headers are rewritten,
//! to name the next pages of the stream's share (so the destination's writes
//! walk its memory as round 0's do); no page is copied, compared or hashed.
//! A batch is thus what round 0 of page granularity sends: its payloads
//! land in place as one RDMA WRITE (when they are adjacent and the device
//! takes that many scatter entries), its headers go to a staging slot with
//! the WRITE WITH IMMEDIATE that closes the batch.
//!
//! The receiving end (`--listen`, or a thread of this process when neither
//! `--listen` nor `--to` is given) accepts the streams as `hpmig dest` does
//! ([`RdmaDest`], guest memory registered per stream share) and reads every
//! batch through `RdmaRx` as a destination's landers do: each header, its
//! guest page located and checked against the layout, the payload asked for
//! where it landed, the staging slot's credit returned. It does not hash
//! pages or keep a ledger (that is the engine's work, not the transport's).
//!
//! The rate is the sender's: payload bytes (pages, not headers) over the time
//! from the first submitted batch to the completion of the last, as
//! `ib_write_bw` counts its messages at the sender.
//!
//! `--register SIZE` instead times `ibv_reg_mr` on guest memory allocated as
//! a destination allocates it, with the access a destination gives it
//! (local and remote write): once on fresh memory (never touched: the
//! registration pins, and so faults in, every page) and once on resident
//! memory (every page written first); then both again with transparent
//! huge pages asked for (`MADV_HUGEPAGE`), saying how much of the memory
//! the kernel backed with them.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::outcome::usage;
use crate::rdma::RdmaArgs;
use crate::units::{parse_duration, parse_size};

/// Flags of `hpmig pump`.
#[derive(Args, Debug)]
pub struct PumpArgs {
    #[command(flatten)]
    pub rdma: RdmaArgs,
    /// Wait here for a sending `hpmig pump --to` (e.g. 127.0.0.1:7100) and
    /// land what it sends.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["to", "register"])]
    pub listen: Option<String>,
    /// Send to an `hpmig pump --listen` at this address. With neither
    /// `--listen` nor `--to`, both ends run in this process over 127.0.0.1.
    #[arg(long, value_name = "ADDR", conflicts_with = "register")]
    pub to: Option<String>,
    /// Streams (one RC queue pair each, as a migration's workers).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Payload of one batch: pages written in place by one RDMA WRITE when
    /// the device takes that many scatter entries (a multiple of the page
    /// size).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub size: u64,
    /// Batches in flight per stream (ring slots of the sender).
    #[arg(long, default_value_t = 32)]
    pub depth: usize,
    /// How long to send.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub duration: Duration,
    /// The destination's guest memory the batches walk.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Instead of sending: time registering this much guest memory with
    /// the device (ibv_reg_mr), fresh and resident.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub register: Option<u64>,
}

/// Most streams: as many as a migration may have.
const MAX_PUMP_STREAMS: usize = hpmig_core::protocol::MAX_STREAMS as usize;
/// Most batches in flight per stream.
const MAX_DEPTH: usize = 4096;

/// The shape of one batch, worked out from the flags and the page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Pages per batch.
    pub pages: usize,
    pub page_size: usize,
    /// Bytes of one ring slot: every page behind its header, rounded up to
    /// whole pages.
    pub slot_size: usize,
}

// Used by the RDMA build (and the tests) only.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
impl Plan {
    /// The batch of `size` payload bytes: whole pages, at least one, within
    /// what one batch's immediate can describe; the ring slot also holds
    /// the closing round-end record.
    pub fn new(size: u64, page_size: usize) -> std::result::Result<Plan, String> {
        use hpmig_core::protocol::{HEADER_LEN, ROUND_END_LEN};
        let ps = page_size as u64;
        if size == 0 || size % ps != 0 {
            return Err(format!(
                "--size {size} is refused: it must be a whole number of {page_size}-byte pages"
            ));
        }
        let pages =
            usize::try_from(size / ps).map_err(|_| format!("--size {size} is too large"))?;
        // Ring slots are whole pages (Ring::new, the staging Offer); the
        // batch leaves the rest of its slot unsent.
        let slot_size = pages
            .checked_mul(HEADER_LEN + page_size)
            .and_then(|b| b.checked_next_multiple_of(page_size))
            .filter(|s| (HEADER_LEN + ROUND_END_LEN..=MAX_SLOT_BYTES).contains(s))
            .ok_or_else(|| {
                format!("--size {size} is refused: a batch's slot must stay under {MAX_SLOT_BYTES} bytes")
            })?;
        Ok(Plan {
            pages,
            page_size,
            slot_size,
        })
    }

    /// Payload bytes of one batch.
    pub fn payload(&self) -> u64 {
        (self.pages * self.page_size) as u64
    }

    /// Bytes of one batch: every page behind its header.
    pub fn batch_len(&self) -> usize {
        self.record_at(self.pages)
    }

    /// The offset of record `i`'s header in a slot.
    pub fn record_at(&self, i: usize) -> usize {
        i * (hpmig_core::protocol::HEADER_LEN + self.page_size)
    }
}

/// The largest ring slot a batch's immediate can describe (20 bits).
const MAX_SLOT_BYTES: usize = (1 << 20) - 1;

// Used by the RDMA build (and the tests) only.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
/// `bytes` over `d` in Gbit/s (10^9 bits per second); 0 for no time.
pub fn gbits(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 * 8.0 / s / 1e9
    } else {
        0.0
    }
}

// Used by the RDMA build (and the tests) only.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
/// `d` spent on `bytes` scaled to one GiB, in milliseconds.
pub fn ms_per_gib(d: Duration, bytes: u64) -> f64 {
    if bytes == 0 {
        return 0.0;
    }
    d.as_secs_f64() * 1e3 * (1u64 << 30) as f64 / bytes as f64
}

// Used by the RDMA build (and the tests) only.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
/// Batch `n`'s first page among a share of `pages` pages cut into whole
/// batches of `per` pages: batches walk the share and wrap around.
pub fn batch_start(n: u64, pages: usize, per: usize) -> Option<usize> {
    let batches = pages.checked_div(per).filter(|&b| b > 0)?;
    Some((n % batches as u64) as usize * per)
}

impl PumpArgs {
    /// Refuses what cannot run (exit status 2), before anything opens.
    fn check(&self) -> Result<Plan> {
        self.rdma.check()?;
        if self.rdma.rdma.is_none() {
            return Err(usage(
                "hpmig pump needs --rdma DEVICE (the verbs device to measure, as `hpmig devices` lists it)",
            ));
        }
        if !(1..=MAX_PUMP_STREAMS).contains(&self.streams) {
            return Err(usage(format!(
                "--streams {} is refused: 1 to {MAX_PUMP_STREAMS}",
                self.streams
            )));
        }
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return Err(usage(format!(
                "--depth {} is refused: 1 to {MAX_DEPTH}",
                self.depth
            )));
        }
        if self.duration.is_zero() {
            return Err(usage("--duration must be longer than 0"));
        }
        Plan::new(self.size, hpmig_core::memory::host_page_size()).map_err(usage)
    }
}

/// Runs `hpmig pump`.
pub fn run(a: &PumpArgs) -> Result<bool> {
    let plan = a.check()?;
    #[cfg(feature = "rdma")]
    {
        imp::run(a, plan)
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = plan;
        anyhow::bail!("{}", hpmig_transport_rdma::unavailable())
    }
}

#[cfg(feature = "rdma")]
mod imp {
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use anyhow::{anyhow, bail, Context as _, Result};
    use hpmig_core::auth::Secret;
    use hpmig_core::handshake::{self, Terms};
    use hpmig_core::memory::{DestMemory, Layout, PageIndex, RegionSpec, Share, XorShift64};
    use hpmig_core::protocol::{
        Granularity, GuestInfo, Header, Kind, RoundEnd, HEADER_LEN, ROUND_END_LEN, VERSION,
    };
    use hpmig_core::ring::Ring;
    use hpmig_core::transport::{DestTransport, SourceTransport, StreamRx, StreamTx};
    use hpmig_core::verify::VerifyMode;
    use hpmig_core::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    use hpmig_transport_rdma::verbs::{self, Context, Mr, Pd};
    use hpmig_transport_rdma::{RdmaDest, RdmaOptions, RdmaSource};
    use hpmig_transport_tcp::TcpOptions;

    use super::{batch_start, gbits, ms_per_gib, Plan, PumpArgs};
    use crate::units::{human, span};

    /// Runs `each` on every stream's item on a thread of its own; the
    /// results in stream order (a thread that panicked is an error).
    fn per_stream<I: Send, T: Send>(
        items: Vec<I>,
        each: impl Fn(I) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .into_iter()
                .map(|item| {
                    let each = &each;
                    s.spawn(move || each(item))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("a stream panicked")))
                })
                .collect()
        })
    }

    /// Largest guest memory a listening pump allocates for its peer.
    const MAX_PUMP_MEMORY: u64 = 64 << 30;

    pub fn run(a: &PumpArgs, plan: Plan) -> Result<bool> {
        let opts = a
            .rdma
            .options(TcpOptions::default())?
            .ok_or_else(|| anyhow!("hpmig pump needs --rdma DEVICE"))?;
        if let Some(bytes) = a.register {
            return register(&opts, bytes);
        }
        let layout = Layout::new(
            plan.page_size,
            vec![RegionSpec {
                base: GuestAddress(0),
                size: a.memory,
            }],
        )
        .map_err(|e| crate::outcome::usage(format!("--memory {}: {e}", a.memory)))?;
        if let Some(addr) = &a.listen {
            let listener = TcpListener::bind(addr).with_context(|| format!("--listen {addr}"))?;
            println!("pump: listening on {}", listener.local_addr()?);
            return receive(listener, opts).map(|_| true);
        }
        if let Some(to) = &a.to {
            return send(a, plan, &layout, to, opts);
        }
        // Both ends in this process.
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let dest_opts = opts.clone();
        let dest = std::thread::spawn(move || receive(listener, dest_opts));
        // A sender that failed before connecting leaves the receiving
        // thread waiting: the error is the answer, the thread ends with the
        // process.
        let ok = send(a, plan, &layout, &addr.to_string(), opts)?;
        dest.join()
            .map_err(|_| anyhow!("the receiving end panicked"))??;
        Ok(ok)
    }

    /// The sending end: see the module's documentation.
    fn send(
        a: &PumpArgs,
        plan: Plan,
        layout: &Layout,
        to: &str,
        opts: RdmaOptions,
    ) -> Result<bool> {
        let wire = crate::rdma::wire(&opts);
        let io = opts.tcp.io_timeout;
        let mut src = RdmaSource::connect(to, opts).with_context(|| format!("--to {to}"))?;
        let agreed = handshake::offer(
            src.control(),
            &handshake::Offer {
                version: VERSION,
                granularity: Granularity::Page,
                streams: a.streams as u16,
                features: 0,
                layout,
                secret: &Secret::none(),
                guest: GuestInfo::default(),
                verify: VerifyMode::Off,
            },
            io,
        )?;
        let rings = (0..a.streams)
            .map(|_| Ring::new(a.depth, plan.slot_size))
            .collect::<Result<Vec<_>, _>>()?;
        let mut txs = src.open_streams(rings, &agreed.session)?;
        // Each stream's pages: the share its worker would own.
        let shares: Vec<Vec<u64>> = (0..a.streams)
            .map(|i| {
                let share = Share::of(layout.bitmap_words(), i, a.streams);
                (0..share.pages() as u64)
                    .filter_map(|k| layout.page(PageIndex(share.first_page().0 + k)))
                    .map(|p| p.gpa.0)
                    .collect()
            })
            .collect();
        if let Some(small) = shares.iter().position(|s| s.len() < plan.pages) {
            bail!(
                "--memory {}: stream {small}'s share holds fewer pages than one batch of {}",
                human(a.memory),
                plan.pages
            );
        }
        // Fill every slot's pages once, before the clock starts; handing an
        // empty slot back returns it to the free list unsent.
        for (i, tx) in txs.iter_mut().enumerate() {
            let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15 ^ i as u64);
            let mut slots = Vec::with_capacity(a.depth);
            for _ in 0..a.depth {
                let mut b = tx.take_free()?;
                for r in 0..plan.pages {
                    let at = plan.record_at(r) + HEADER_LEN;
                    rng.fill(&mut b.spare()[at..at + plan.page_size]);
                }
                slots.push(b);
            }
            for b in slots {
                tx.submit(b)?;
            }
        }
        let stats = src.stats();
        let start = Instant::now();
        let deadline = start + a.duration;
        let results = per_stream(txs.into_iter().zip(&shares).collect(), |(tx, pages)| {
            pump_stream(tx, plan, pages, deadline)
        });
        let mut bytes = 0;
        let mut end = start;
        for r in results {
            let (b, e) = r?;
            bytes += b;
            end = end.max(e);
        }
        let took = end - start;
        println!(
            "pump: {wire}, {} streams, {} batches ({} pages of {} in place + {} B of headers staged), depth {}, {}",
            a.streams,
            human(plan.payload()),
            plan.pages,
            human(plan.page_size as u64),
            plan.pages * HEADER_LEN,
            a.depth,
            span(a.duration)
        );
        println!("pump: {}", crate::rdma::stats_line(&stats));
        println!(
            "pump: sent {} in {:.3} s: {:.3} Gbit/s",
            human(bytes),
            took.as_secs_f64(),
            gbits(bytes, took)
        );
        Ok(bytes > 0)
    }

    /// One stream: batches until `deadline`, then a round end that tells
    /// the receiving end to stop; returns the payload bytes sent and when
    /// the last batch completed.
    fn pump_stream(
        mut tx: hpmig_transport_rdma::RdmaTx,
        plan: Plan,
        pages: &[u64],
        deadline: Instant,
    ) -> Result<(u64, Instant)> {
        let ps = plan.page_size as u32;
        let mut n = 0u64;
        while Instant::now() < deadline {
            let mut b = tx.take_free()?;
            let first = batch_start(n, pages.len(), plan.pages)
                .ok_or_else(|| anyhow!("a share smaller than a batch"))?;
            let spare = b.spare();
            for (r, gpa) in pages[first..first + plan.pages].iter().enumerate() {
                let at = plan.record_at(r);
                spare[at..at + HEADER_LEN]
                    .copy_from_slice(&Header::new(Kind::Page, 0, ps, *gpa).encode());
            }
            b.advance(plan.batch_len());
            tx.submit(b)?;
            n += 1;
        }
        let mut b = tx.take_free()?;
        let end = RoundEnd {
            round: 0,
            last: true,
            records: n * plan.pages as u64,
            checksum: 0,
        };
        b.push(&end.encode());
        tx.submit(b)?;
        // Dropping the stream waits for every posted batch to complete.
        drop(tx);
        Ok((n * plan.payload(), Instant::now()))
    }

    /// The receiving end: one connection, then every stream's batches
    /// landed until its round end.
    fn receive(listener: TcpListener, opts: RdmaOptions) -> Result<()> {
        let io = opts.tcp.io_timeout;
        let mut dest = RdmaDest::accept(listener, opts)?;
        let accepted = handshake::answer(
            dest.control(),
            &Terms {
                max_memory: MAX_PUMP_MEMORY,
                ..Terms::default()
            },
            None,
            Instant::now() + io,
            &mut |_| Ok(()),
        )?;
        let layout = accepted.hello.layout.clone();
        let streams = usize::from(accepted.hello.streams);
        let memory: DestMemory = layout.allocate()?;
        let t0 = Instant::now();
        let rxs = dest.accept_streams(streams, &accepted.agreed.session, &memory)?;
        let setup = t0.elapsed();
        let hosts: Vec<(usize, u64)> = memory
            .iter()
            .map(|r| {
                let host = r
                    .as_volatile_slice()
                    .map(|s| s.ptr_guard_mut().as_ptr() as usize)
                    .unwrap_or(0);
                (host, r.len())
            })
            .collect();
        let results = per_stream(rxs, |rx| land_stream(rx, &layout, &hosts));
        let mut bytes = 0;
        let mut took = Duration::ZERO;
        for r in results {
            let (b, t) = r?;
            bytes += b;
            took = took.max(t);
        }
        println!(
            "pump: landed {} from {} ({streams} streams, guest memory {} registered in {:.2} s): {:.3} Gbit/s",
            human(bytes),
            dest.peer(),
            human(layout.total_bytes()),
            setup.as_secs_f64(),
            gbits(bytes, took)
        );
        Ok(())
    }

    /// Lands one stream's batches as a destination's lander reads them:
    /// each header, its page checked against the layout, the payload asked
    /// for where it must be. Returns the payload bytes and the time from
    /// the first header to the round end.
    fn land_stream(
        mut rx: hpmig_transport_rdma::RdmaRx,
        layout: &Layout,
        hosts: &[(usize, u64)],
    ) -> Result<(u64, Duration)> {
        let ps = layout.page_size() as u32;
        let mut bytes = 0u64;
        let mut first = None;
        loop {
            let h = rx.next_header(ps)?;
            let t = *first.get_or_insert_with(Instant::now);
            match h.kind {
                Kind::Page | Kind::Segment => {
                    let (_, loc) = layout.locate(h.arg, u64::from(h.len))?;
                    let (host, len) = hosts
                        .get(loc.region)
                        .copied()
                        .filter(|&(host, _)| host != 0)
                        .ok_or_else(|| anyhow!("guest region {} has no mapping", loc.region))?;
                    let offset = loc.offset + (h.arg - loc.gpa.0);
                    if offset + u64::from(h.len) > len {
                        bail!("guest address {:#x} is past its region", h.arg);
                    }
                    // SAFETY: [host + offset, + h.len) lies inside the
                    // region's mapping (checked just above), which lives as
                    // long as `memory` in `receive`; the page belongs to this
                    // stream's share (RdmaRx::next_header refused any other),
                    // so no other stream's lander touches it, and nothing
                    // writes through this slice: in place, read_payload only
                    // checks that the payload landed there.
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            (host + offset as usize) as *mut u8,
                            h.len as usize,
                        )
                    };
                    rx.read_payload(page)?;
                    bytes += u64::from(h.len);
                }
                Kind::RoundEnd => {
                    let mut p = [0u8; ROUND_END_LEN];
                    rx.read_payload(&mut p)?;
                    return Ok((bytes, t.elapsed()));
                }
                other => bail!("unexpected {other:?} record in a pump stream"),
            }
        }
    }

    /// Asks for transparent huge pages on every region of `memory`; the
    /// kernel may still use small pages (its THP setting, or no free 2 MiB
    /// blocks).
    fn advise_huge(memory: &DestMemory) {
        for region in memory.iter() {
            if let Ok(slice) = region.as_volatile_slice() {
                let (host, len) = (slice.ptr_guard_mut().as_ptr(), region.len() as usize);
                // SAFETY: [host, host + len) is the region's own mapping
                // (vm-memory checked its bounds); MADV_HUGEPAGE changes how
                // it is backed, never its contents.
                unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
            }
        }
    }

    /// This process's anonymous memory in transparent huge pages, from
    /// /proc/self/smaps_rollup (`None` where it cannot be read).
    fn anon_huge_bytes() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        let line = text.lines().find(|l| l.starts_with("AnonHugePages:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// `hpmig pump --register SIZE`: `ibv_reg_mr` on fresh and on resident
    /// guest memory, each with and without transparent huge pages asked for.
    fn register(opts: &RdmaOptions, bytes: u64) -> Result<bool> {
        let ps = hpmig_core::memory::host_page_size() as u64;
        let bytes = bytes.div_ceil(ps) * ps;
        let layout = Layout::new(
            ps as usize,
            vec![RegionSpec {
                base: GuestAddress(0),
                size: bytes,
            }],
        )
        .map_err(|e| crate::outcome::usage(format!("--register {bytes}: {e}")))?;
        let ctx = Context::open(&opts.device)?;
        let pd = Pd::new(&ctx)?;
        let time = |memory: &DestMemory| -> Result<(Duration, Duration)> {
            let region = memory
                .iter()
                .next()
                .ok_or_else(|| anyhow!("no guest region"))?;
            let slice = region.as_volatile_slice()?;
            let (host, len) = (slice.ptr_guard_mut().as_ptr(), region.len() as usize);
            let t = Instant::now();
            // SAFETY: [host, host + len) is the region's one mapping, which
            // `memory` keeps mapped past the registration's drop below.
            let mr = unsafe { Mr::register(&pd, host, len, verbs::ACCESS_REMOTE_WRITE) }?;
            let reg = t.elapsed();
            let t = Instant::now();
            drop(mr);
            Ok((reg, t.elapsed()))
        };
        let wire = crate::rdma::wire(opts);
        println!(
            "register: {} on {wire}, local and remote write (as a destination registers guest memory)",
            human(bytes)
        );
        // Each kind of memory in turn, the one before freed: with transparent
        // huge pages asked for (madvise), it says how much of it the kernel
        // did back with them.
        for (what, huge, resident) in [
            ("fresh", false, false),
            ("resident", false, true),
            ("fresh, huge pages asked", true, false),
            ("resident, huge pages asked", true, true),
        ] {
            let memory: DestMemory = layout.allocate()?;
            if huge {
                advise_huge(&memory);
            }
            if resident {
                hpmig_core::memory::prefault(&layout, &memory, 1);
            }
            let (reg, dereg) = time(&memory)?;
            let note = huge
                .then(anon_huge_bytes)
                .flatten()
                .map(|h| format!(", {} in huge pages", human(h)))
                .unwrap_or_default();
            println!(
                "register: {what:<8} ibv_reg_mr {:.1} ms ({:.1} ms/GiB), ibv_dereg_mr {:.1} ms{note}",
                reg.as_secs_f64() * 1e3,
                ms_per_gib(reg, bytes),
                dereg.as_secs_f64() * 1e3
            );
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_whole_pages_behind_their_headers_within_an_immediates_reach() {
        let p = Plan::new(64 << 10, 4096).expect("64 KiB");
        assert_eq!(p.pages, 16);
        assert_eq!(p.batch_len(), 16 * (4096 + 16));
        // The ring's slots are whole pages: 17 of them.
        assert_eq!(p.slot_size, 17 * 4096);
        assert_eq!(p.payload(), 65536);
        assert_eq!(p.record_at(0), 0);
        assert_eq!(p.record_at(2), 2 * 4112);
        // A 64 KiB host page: one page per batch.
        assert_eq!(Plan::new(64 << 10, 65536).map(|p| p.pages), Ok(1));
        // Not whole pages, nothing, or past the 20-bit slot length: refused.
        assert!(Plan::new(6000, 4096).is_err());
        assert!(Plan::new(0, 4096).is_err());
        assert!(Plan::new(1 << 20, 4096).is_err());
        assert!(Plan::new(u64::MAX - 4095, 4096).is_err());
    }

    #[test]
    fn rates_and_registration_costs_scale_as_stated() {
        assert_eq!(gbits(1_000_000_000, Duration::from_secs(8)), 1.0);
        assert_eq!(gbits(123, Duration::ZERO), 0.0);
        // 256 MiB in 50 ms is 200 ms per GiB.
        let ms = ms_per_gib(Duration::from_millis(50), 256 << 20);
        assert!((ms - 200.0).abs() < 1e-9, "{ms}");
        assert_eq!(ms_per_gib(Duration::from_secs(1), 0), 0.0);
    }

    #[test]
    fn batches_walk_the_share_in_whole_batches_and_wrap() {
        assert_eq!(batch_start(0, 100, 16), Some(0));
        assert_eq!(batch_start(5, 100, 16), Some(80));
        // 100 pages hold 6 whole batches: the 7th starts over.
        assert_eq!(batch_start(6, 100, 16), Some(0));
        assert_eq!(
            batch_start(u64::MAX, 96, 16),
            Some((u64::MAX % 6) as usize * 16)
        );
        // A share smaller than a batch, or batches of no pages: none.
        assert_eq!(batch_start(0, 15, 16), None);
        assert_eq!(batch_start(0, 15, 0), None);
    }
}
