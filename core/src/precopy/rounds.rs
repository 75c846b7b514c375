//! The source's worker pool: one pinned diff worker per data stream, each
//! with its fixed share of pages, its part of the shadow and its ring. The
//! driver hands every worker the same round command and sums what they
//! report; workers talk to it through channels, never through a lock per
//! page.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use super::limiter::RateLimiter;
use super::live::{ByteKinds, Live};
use super::worker::{Done, RoundCmd, Worker, WorkerStats};
use super::{Cause, RoundReport};
use crate::dirty::DirtyBitmap;
use crate::memory::{Layout, Share, SourceMemory};
use crate::segment::compress::{PageCompressor, ZstdMode};
use crate::segment::fingerprint::FingerprintPart;
use crate::segment::shadow::ShadowPart;
use crate::segment::{EncoderConfig, PageEncoder};
use crate::transport::{Interrupt, StreamTx, TransportError};
use crate::verify::{Ledger, PageHasher};

/// What every worker is built from.
pub(crate) struct PoolSpec<'a> {
    pub memory: &'a SourceMemory,
    pub layout: &'a Layout,
    pub encoder: EncoderConfig,
    pub shadow: Option<Vec<ShadowPart>>,
    /// Instead of a shadow: the fingerprint store's parts.
    pub fingerprints: Option<Vec<FingerprintPart>>,
    pub zstd: bool,
    pub limiter: Arc<RateLimiter>,
    /// Where every worker publishes its progress, once per slot.
    pub live: Arc<Live>,
    pub pin: bool,
    pub interrupt: Interrupt,
    /// Incremental verification: every worker keeps a ledger under it.
    pub hasher: Option<Arc<PageHasher>>,
}

/// The running workers.
pub(crate) struct WorkerPool {
    cmds: Vec<Sender<RoundCmd>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<(Option<Ledger>, Remembered)>>,
    interrupt: Interrupt,
}

impl WorkerPool {
    /// Starts one worker per stream.
    pub fn start<T: StreamTx + 'static>(
        streams: Vec<T>,
        spec: PoolSpec<'_>,
    ) -> Result<WorkerPool, Cause> {
        let n = streams.len();
        let page_size = spec.layout.page_size();
        let cores = if spec.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut shadow = spec
            .shadow
            .map(|parts| parts.into_iter().map(Some).collect::<Vec<_>>());
        let mut fingerprints = spec
            .fingerprints
            .map(|parts| parts.into_iter().map(Some).collect::<Vec<_>>());
        let (done_tx, done) = unbounded();
        let mut pool = WorkerPool {
            cmds: Vec::with_capacity(n),
            done,
            threads: Vec::with_capacity(n),
            interrupt: spec.interrupt,
        };
        for (index, tx) in streams.into_iter().enumerate() {
            let compressor = if spec.zstd {
                Some(PageCompressor::new().map_err(|e| Cause::Setup(format!("zstd: {e}")))?)
            } else {
                None
            };
            let worker = Worker {
                index,
                memory: spec.memory.clone(),
                layout: spec.layout.clone(),
                share: Share::of(spec.layout.bitmap_words(), index, n),
                shadow: shadow.as_mut().and_then(|p| p[index].take()),
                fingerprints: fingerprints.as_mut().and_then(|p| p[index].take()),
                encoder: PageEncoder::new(spec.encoder, page_size),
                compressor,
                limiter: Arc::clone(&spec.limiter),
                live: Arc::clone(&spec.live),
                published: (ByteKinds::default(), 0),
                ledger: spec.hasher.as_ref().map(|h| {
                    (
                        Arc::clone(h),
                        Ledger::new(Share::of(spec.layout.bitmap_words(), index, n)),
                    )
                }),
                tx,
            };
            let (cmd_tx, cmd_rx) = bounded(1);
            let done_tx = done_tx.clone();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("hpmig-worker{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    worker.run(cmd_rx, done_tx)
                })
                .map_err(|e| Cause::Setup(format!("starting a worker thread: {e}")))?;
            pool.cmds.push(cmd_tx);
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Runs one round on every worker and sums their counts, calling
    /// `idle` as it starts and every `period` while it waits. On failure the other workers
    /// are interrupted and the first real cause returned.
    pub fn round(
        &self,
        round: u32,
        last: bool,
        compress: bool,
        bitmap: &Arc<DirtyBitmap>,
        period: Duration,
        idle: &mut dyn FnMut() -> Result<(), Cause>,
    ) -> Result<WorkerStats, Cause> {
        for tx in &self.cmds {
            let cmd = RoundCmd {
                round,
                last,
                compress,
                bitmap: Arc::clone(bitmap),
            };
            tx.send(cmd)
                .map_err(|_| Cause::Transport(TransportError::Interrupted))?;
        }
        let mut stats = WorkerStats::default();
        let mut first_err = None;
        let mut left = self.cmds.len();
        // `idle` is due at the round's start (the work between rounds was
        // quiet too) and then every `period` by the clock: a worker that
        // finishes does not put the next call off.
        let mut due = Instant::now();
        while left > 0 {
            if Instant::now() >= due {
                if let Err(e) = idle() {
                    self.interrupt.trigger();
                    first_err.get_or_insert(e);
                }
                due = Instant::now() + period;
            }
            let done = match self.done.recv_deadline(due) {
                Ok(d) => Ok(d),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => Err(()),
            };
            left -= 1;
            match done {
                Ok((_, Ok(s))) => stats += s,
                Ok((_, Err(e))) => {
                    // Unblock the other workers, keep the first real cause.
                    self.interrupt.trigger();
                    if first_err.is_none()
                        || matches!(
                            first_err,
                            Some(Cause::Transport(TransportError::Interrupted))
                        )
                    {
                        first_err = Some(e);
                    }
                }
                Err(_) => {
                    first_err.get_or_insert(Cause::Transport(TransportError::Interrupted));
                    break;
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// No more rounds: each worker drops its stream, which puts what is
    /// still queued on the wire. Threads are joined when the pool drops.
    pub fn finish(&mut self) {
        self.cmds.clear();
    }

    /// Ends the workers (their streams flushed) and returns their ledgers
    /// of what was sent, in worker order (empty without incremental
    /// verification).
    pub fn into_ledgers(mut self) -> Vec<Ledger> {
        self.cmds.clear();
        let (ledgers, shadows): (Vec<_>, Vec<_>) =
            self.threads.drain(..).filter_map(|t| t.join().ok()).unzip();
        free_in_background(shadows);
        ledgers.into_iter().flatten().collect()
    }
}

/// What a worker remembers of what it sent: its part of the shadow, or of
/// the fingerprint store.
pub(crate) type Remembered = (Option<ShadowPart>, Option<FingerprintPart>);

/// Frees the shadow's (or the fingerprints') parts on a thread of their
/// own: the caller (the switch-over, or a failure resuming the guest) need
/// not wait for the unmapping.
fn free_in_background(shadows: Vec<Remembered>) {
    if shadows.iter().any(|(s, f)| s.is_some() || f.is_some()) {
        let _ = std::thread::Builder::new()
            .name("hpmig-free".into())
            .spawn(move || drop(shadows));
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.cmds.clear();
        let shadows = self
            .threads
            .drain(..)
            .filter_map(|t| t.join().ok())
            .map(|(_, shadow)| shadow)
            .collect();
        free_in_background(shadows);
    }
}

/// Whether wide pages go zstd-compressed in the next round.
///
/// `On` always, `Off` never. `Auto` compresses while the link is slower than
/// compression: the link's rate is the bandwidth cap when one is set, else
/// the best wire rate measured in a round that did not compress (so without
/// a cap round 0 goes uncompressed and measures the link); compression's
/// rate is what all workers together fed zstd per second of compressing, as
/// measured so far. With no measurement yet, compression is tried, which
/// measures it.
pub fn compress_this_round(
    mode: ZstdMode,
    cap: Option<u64>,
    best_plain_rate: Option<f64>,
    zstd_rate: Option<f64>,
) -> bool {
    match mode {
        ZstdMode::Off => false,
        ZstdMode::On => true,
        ZstdMode::Auto => {
            let link = match (cap, best_plain_rate) {
                (Some(c), Some(r)) => (c as f64).min(r),
                (Some(c), None) => c as f64,
                (None, Some(r)) => r,
                (None, None) => return false,
            };
            zstd_rate.is_none_or(|z| link < z)
        }
    }
}

/// Compression throughput of all `workers` together, from the rounds so far.
pub(crate) fn zstd_rate(rounds: &[RoundReport], workers: usize) -> Option<f64> {
    let (bytes, secs) = rounds.iter().fold((0u64, 0f64), |(b, s), r| {
        (b + r.stats.zstd_bytes_in, s + r.stats.zstd_secs)
    });
    // Workers compress in parallel: each worker's seconds are its own.
    (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs * workers as f64)
}
