//! The source side of a migration: rounds of harvest → diff → ring → wire,
//! the controller's verdict after each, then stop-and-copy and switch-over.
//!
//! Failure semantics: until the destination acknowledges that every byte is
//! applied (and, with verification, that the digests match), the guest
//! belongs to the source. Any failure before that resumes it here, and the
//! error names the phase and round. After the acknowledgement the guest stays
//! paused on the source: it now runs on the destination.

pub mod controller;
pub mod limiter;
pub(crate) mod worker;

use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded};
use thiserror::Error;
use vm_memory::GuestMemoryBackend;

use crate::auth::Secret;
use crate::dirty::{DirtyBitmap, DirtyError, DirtySource};
use crate::memory::{worker_share, Layout, MemoryError, SourceMemory};
use crate::protocol::{
    self, ErrorCode, Hello, Kind, Welcome, DIGEST_LEN, FLAG_HAS_DIGEST, FLAG_VERIFIED, HEADER_LEN,
};
use crate::ring::Ring;
use crate::segment::compress::{PageCompressor, ZstdMode};
use crate::segment::shadow::ShadowStore;
use crate::segment::{EncoderConfig, Granularity, PageEncoder};
use crate::transport::{Control, SourceTransport, TransportError};
use crate::vm::{Guest, GuestError};
use controller::{decide, Decision, Policy, Projection, RoundMetrics, StopReason};
pub use worker::WorkerStats;

/// How the source runs a migration.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub encoder: EncoderConfig,
    /// Diff workers, each with its own ring and stream.
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the cores there are).
    pub pin: bool,
    pub policy: Policy,
    /// Cap the shadow at this many bytes (segment mode); `None` = full copy.
    pub shadow_budget: Option<u64>,
    pub ring_slots: usize,
    pub slot_size: usize,
    /// Compare BLAKE3 digests of all guest memory at switch-over.
    pub verify: bool,
    /// Feature bits to offer (protocol::FEATURE_*).
    pub features: u32,
    /// The shared secret both ends prove they hold.
    pub secret: Secret,
    /// zstd for wide pages (offered to the destination unless `Off`).
    pub zstd: ZstdMode,
    /// Cap on the bytes all streams together put on the wire per second.
    pub bandwidth: Option<u64>,
}

impl SourceConfig {
    pub fn new(granularity: Granularity) -> Self {
        SourceConfig {
            encoder: EncoderConfig::new(granularity),
            workers: 2,
            pin: false,
            policy: Policy::default(),
            shadow_budget: None,
            ring_slots: 8,
            slot_size: 256 << 10,
            verify: true,
            features: 0,
            secret: Secret::none(),
            zstd: ZstdMode::Off,
            bandwidth: None,
        }
    }
}

/// The phases a migration goes through, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Setup,
    Handshake,
    PreCopy,
    StopAndCopy,
    State,
    Acknowledge,
    Commit,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Setup => "setup",
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::State => "state transfer",
            Phase::Acknowledge => "acknowledge",
            Phase::Commit => "commit",
        })
    }
}

/// Why a migration failed. In every case the guest runs on the source.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// something failed; the guest was resumed on the source
    #[error("migration failed during {phase} (round {round}): {cause}; the guest keeps running on the source")]
    Failed {
        phase: Phase,
        round: u32,
        #[source]
        cause: Cause,
    },
    /// the controller gave up under the abort policy
    #[error(
        "migration aborted after round {round}: {reason:?}; the guest keeps running on the source"
    )]
    Aborted { round: u32, reason: StopReason },
    /// the Commit may not have reached the destination: the guest stays
    /// paused on the source, since it may be running there
    #[error("migration in doubt after round {round}: {cause}; the guest stays PAUSED on the source: check the destination before resuming it")]
    InDoubt { round: u32, cause: Cause },
    /// the guest could not be resumed after a failure: it is stopped
    #[error("migration failed during {phase} (round {round}): {cause}; resuming the guest on the source ALSO failed: {resume}")]
    ResumeFailed {
        phase: Phase,
        round: u32,
        cause: Cause,
        resume: GuestError,
    },
}

/// The underlying cause of a failed migration.
#[derive(Debug, Error)]
pub enum Cause {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// the destination refused or failed
    #[error("destination reported: {0}")]
    Peer(String),
    /// memory could not be set up
    #[error("{0}")]
    Setup(String),
    /// the destination could not prove it holds the token
    #[error("the destination failed authentication (wrong or missing token)")]
    Auth,
    /// the Commit could not be sent: the destination may or may not run the guest
    #[error("sending Commit failed ({0}); the destination may or may not have received it")]
    InDoubt(TransportError),
    /// the controller gave up (abort policy)
    #[error("the controller gave up: {0:?}")]
    Aborted(StopReason),
    /// digests differ after switch-over
    #[error("destination memory digest differs from the source's")]
    DigestMismatch,
}

/// One round as reported to the user.
#[derive(Clone, Debug)]
pub struct RoundReport {
    pub metrics: RoundMetrics,
    pub stats: WorkerStats,
    pub projection: Projection,
    pub decision: Decision,
    /// True for the stop-and-copy round.
    pub last: bool,
}

/// The outcome of a successful migration.
#[derive(Clone, Debug)]
pub struct MigrationReport {
    pub granularity: Granularity,
    pub rounds: Vec<RoundReport>,
    pub stop: StopReason,
    pub total_time: Duration,
    /// From pausing the guest to the destination's acknowledgement.
    pub downtime: Duration,
    /// The part of the downtime spent digesting memory for verification
    /// (the source's digest; the destination digests at the same time).
    pub verify_time: Duration,
    pub wire_bytes: u64,
    pub verified: bool,
    pub digest: Option<[u8; DIGEST_LEN]>,
}

impl MigrationReport {
    /// Wire bytes of every round after round 0.
    pub fn wire_bytes_after_round0(&self) -> u64 {
        self.rounds
            .iter()
            .skip(1)
            .map(|r| r.metrics.wire_bytes)
            .sum()
    }

    pub fn converged(&self) -> bool {
        self.stop.converged()
    }
}

struct Failure {
    phase: Phase,
    round: u32,
    cause: Cause,
}

fn fail<E: Into<Cause>>(phase: Phase, round: u32) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        phase,
        round,
        cause: e.into(),
    }
}

/// Migrates `memory` through `transport`. `dirty` must see every write to
/// guest memory (for a KVM guest: KVM's log combined with the VMM bitmap);
/// `on_round` is called after every round, for progress output.
pub fn migrate<T: SourceTransport>(
    memory: &SourceMemory,
    dirty: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    transport: &mut T,
    cfg: &SourceConfig,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<MigrationReport, MigrateError> {
    let mut paused = false;
    match run(memory, dirty, guest, transport, cfg, on_round, &mut paused) {
        Ok(report) => Ok(report),
        Err(Failure {
            phase,
            round,
            cause,
        }) => {
            let code = if matches!(cause, Cause::Peer(_)) {
                ErrorCode::Aborted
            } else {
                ErrorCode::Protocol
            };
            // Best effort: the peer may be gone already.
            let _ = transport
                .control()
                .send(&protocol::encode_error(code, &cause.to_string()));
            if let Cause::Aborted(reason) = cause {
                return Err(MigrateError::Aborted { round, reason });
            }
            if let Cause::InDoubt(_) = cause {
                return Err(MigrateError::InDoubt { round, cause });
            }
            if paused {
                if let Err(resume) = guest.resume() {
                    return Err(MigrateError::ResumeFailed {
                        phase,
                        round,
                        cause,
                        resume,
                    });
                }
            }
            Err(MigrateError::Failed {
                phase,
                round,
                cause,
            })
        }
    }
}

fn run<T: SourceTransport>(
    memory: &SourceMemory,
    dirty: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    transport: &mut T,
    cfg: &SourceConfig,
    on_round: &mut dyn FnMut(&RoundReport),
    paused: &mut bool,
) -> Result<MigrationReport, Failure> {
    let start = Instant::now();
    let layout = Layout::of(memory).map_err(fail(Phase::Setup, 0))?;
    let page_size = layout.page_size();
    let workers = cfg.workers.clamp(1, usize::from(protocol::MAX_STREAMS));
    if cfg.slot_size < 2 * (HEADER_LEN + page_size) {
        return Err(fail(Phase::Setup, 0)(Cause::Setup(format!(
            "ring slot size {} is too small for page size {page_size}",
            cfg.slot_size
        ))));
    }

    // Handshake (see crate::auth for what the MACs prove).
    let offered = cfg.features
        | if cfg.zstd == ZstdMode::Off {
            0
        } else {
            protocol::FEATURE_ZSTD
        };
    let nonce_s = crate::auth::nonce();
    let hello = Hello {
        version: protocol::VERSION,
        min_version: protocol::MIN_VERSION,
        granularity: cfg.encoder.granularity,
        streams: workers as u16,
        features: offered,
        layout: layout.clone(),
        nonce: nonce_s,
        auth: cfg.secret.hello(&nonce_s),
    };
    let handshake = fail(Phase::Handshake, 0);
    let control = transport.control();
    control
        .send(&hello.encode())
        .map_err(fail(Phase::Handshake, 0))?;
    let reply = control.recv().map_err(fail(Phase::Handshake, 0))?;
    let welcome = match reply.header.kind {
        Kind::Welcome => {
            let w = Welcome::decode(&reply.payload).map_err(fail(Phase::Handshake, 0))?;
            if w.version < protocol::MIN_VERSION || w.version > protocol::VERSION {
                return Err(handshake(
                    protocol::ProtocolError::Version {
                        peer_min: w.version,
                        peer_max: w.version,
                    }
                    .into(),
                ));
            }
            w
        }
        Kind::Error => return Err(handshake(peer_error(&reply.payload))),
        got => {
            return Err(handshake(
                protocol::ProtocolError::Unexpected {
                    got,
                    expected: "Welcome",
                }
                .into(),
            ))
        }
    };
    if !Secret::verify(cfg.secret.welcome(&nonce_s, &welcome.nonce), &welcome.auth) {
        return Err(handshake(Cause::Auth));
    }
    if welcome.features & !offered != 0 {
        return Err(handshake(
            protocol::ProtocolError::Features(welcome.features & !offered).into(),
        ));
    }
    let proof = cfg.secret.proof(&nonce_s, &welcome.nonce);
    control
        .send(&protocol::encode_record(Kind::Proof, 0, 0, &proof))
        .map_err(fail(Phase::Handshake, 0))?;
    let session = cfg.secret.session(nonce_s, welcome.nonce);
    let zstd = welcome.features & protocol::FEATURE_ZSTD != 0 && cfg.zstd != ZstdMode::Off;
    let limiter = cfg
        .bandwidth
        .map(|b| std::sync::Arc::new(limiter::RateLimiter::new(b)));

    // Rings, streams, shadow.
    let rings = (0..workers)
        .map(|_| Ring::new(cfg.ring_slots, cfg.slot_size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(Phase::Setup, 0)(Cause::Setup(e.to_string())))?;
    let streams = transport
        .open_streams(rings, &session)
        .map_err(fail(Phase::Setup, 0))?;
    let mut store = match (cfg.encoder.granularity, cfg.shadow_budget) {
        (Granularity::Page, _) => None,
        (Granularity::Segment, None) => Some(ShadowStore::full(&layout)),
        (Granularity::Segment, Some(b)) => Some(ShadowStore::with_budget(&layout, b)),
    }
    .transpose()
    .map_err(|e| fail(Phase::Setup, 0)(Cause::Setup(format!("allocating the shadow: {e}"))))?;
    let mut shadow_parts = store
        .as_mut()
        .map(|s| s.parts(workers).into_iter().map(Some).collect::<Vec<_>>());
    let regions: Vec<_> = memory.iter().collect();
    let cores = if cfg.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let interrupt = transport.interrupt();
    // No data before the destination can land it.
    let ready = transport.control().recv().map_err(fail(Phase::Setup, 0))?;
    match ready.header.kind {
        Kind::Ready => {}
        Kind::Error => return Err(fail(Phase::Setup, 0)(peer_error(&ready.payload))),
        got => {
            return Err(fail(Phase::Setup, 0)(Cause::Protocol(
                protocol::ProtocolError::Unexpected {
                    got,
                    expected: "Ready",
                },
            )))
        }
    }

    std::thread::scope(|scope| {
        let (done_tx, done_rx) = unbounded();
        let mut cmd_txs = Vec::with_capacity(workers);
        for (index, tx) in streams.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = bounded(1);
            cmd_txs.push(cmd_tx);
            let w =
                worker::Worker {
                    index,
                    regions: regions.clone(),
                    layout: &layout,
                    share: worker_share(layout.bitmap_words(), index, workers),
                    shadow: shadow_parts.as_mut().and_then(|p| p[index].take()),
                    encoder: PageEncoder::new(cfg.encoder, page_size),
                    compressor: if zstd {
                        Some(PageCompressor::new().map_err(|e| {
                            fail(Phase::Setup, 0)(Cause::Setup(format!("zstd: {e}")))
                        })?)
                    } else {
                        None
                    },
                    limiter: limiter.clone(),
                    tx,
                };
            let done_tx = done_tx.clone();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            scope.spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                w.run(cmd_rx, done_tx)
            });
        }
        drop(done_tx);

        let mut rounds: Vec<RoundReport> = Vec::new();
        let mut history: Vec<RoundMetrics> = Vec::new();
        let mut bitmap = std::sync::Arc::new(DirtyBitmap::new(&layout));
        let mut round: u32 = 0;
        let mut pause_at = None;
        let mut best_plain_rate: Option<f64> = None;

        let result = (|| -> Result<StopReason, Failure> {
            // Start tracking before the first read, then send everything.
            {
                let b = std::sync::Arc::get_mut(&mut bitmap)
                    .ok_or_else(|| fail(Phase::PreCopy, 0)(Cause::Setup("bitmap shared".into())))?;
                dirty.harvest(b).map_err(fail(Phase::PreCopy, 0))?;
                b.set_all();
            }
            let mut last = false;
            let mut stop = StopReason::Clean;
            loop {
                let phase = if last {
                    Phase::StopAndCopy
                } else {
                    Phase::PreCopy
                };
                let t0 = Instant::now();
                let compress = zstd
                    && compress_this_round(
                        cfg.zstd,
                        cfg.bandwidth,
                        best_plain_rate,
                        zstd_rate(&rounds, workers),
                    );
                for tx in &cmd_txs {
                    let cmd = worker::RoundCmd {
                        round,
                        last,
                        compress,
                        bitmap: bitmap.clone(),
                    };
                    tx.send(cmd)
                        .map_err(|_| fail(phase, round)(TransportError::Interrupted))?;
                }
                let mut stats = WorkerStats::default();
                let mut first_err = None;
                for _ in 0..workers {
                    match done_rx.recv() {
                        Ok((_, Ok(s))) => stats += s,
                        Ok((_, Err(e))) => {
                            // Unblock the other workers, keep the first real cause.
                            interrupt.trigger();
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
                if let Some(e) = first_err {
                    return Err(fail(phase, round)(e));
                }
                let metrics = RoundMetrics {
                    round,
                    dirty_pages: stats.dirty_pages,
                    work_set_bytes: stats.work_set_bytes,
                    wire_bytes: stats.wire_bytes,
                    duration: t0.elapsed(),
                };
                let secs = metrics.duration.as_secs_f64();
                if !compress && secs > 0.0 && metrics.wire_bytes > 0 {
                    let rate = metrics.wire_bytes as f64 / secs;
                    best_plain_rate = Some(best_plain_rate.map_or(rate, |b: f64| b.max(rate)));
                }
                if last {
                    let report = RoundReport {
                        metrics,
                        stats,
                        projection: Projection::default(),
                        decision: Decision::StopAndCopy(stop),
                        last,
                    };
                    on_round(&report);
                    rounds.push(report);
                    return Ok(stop);
                }
                history.push(metrics);
                let b = std::sync::Arc::get_mut(&mut bitmap).ok_or_else(|| {
                    fail(phase, round)(Cause::Setup("bitmap still shared".into()))
                })?;
                b.clear();
                dirty.harvest(b).map_err(fail(phase, round))?;
                let (decision, projection) =
                    decide(&cfg.policy, &history, b.count(), page_size as u64);
                let report = RoundReport {
                    metrics,
                    stats,
                    projection,
                    decision,
                    last,
                };
                on_round(&report);
                rounds.push(report);
                match decision {
                    Decision::Continue => round += 1,
                    Decision::Abort(reason) => {
                        return Err(fail(Phase::PreCopy, round)(Cause::Aborted(reason)));
                    }
                    Decision::StopAndCopy(reason) => {
                        stop = reason;
                        guest.pause().map_err(fail(Phase::StopAndCopy, round + 1))?;
                        *paused = true;
                        pause_at = Some(Instant::now());
                        // Pages dirtied since the decision's harvest join the final round.
                        dirty
                            .harvest(b)
                            .map_err(fail(Phase::StopAndCopy, round + 1))?;
                        round += 1;
                        last = true;
                    }
                }
            }
        })();
        drop(cmd_txs);
        if result.is_err() {
            interrupt.trigger();
        }
        let stop = result?;

        // State, complete, acknowledge.
        let control = transport.control();
        let state = guest.save_state().map_err(fail(Phase::State, round))?;
        let vcpus = guest.vcpus();
        control
            .send(&protocol::encode_record(
                Kind::State,
                0,
                vcpus.into(),
                &state,
            ))
            .map_err(fail(Phase::State, round))?;
        let verify_start = Instant::now();
        let digest = if cfg.verify {
            // SAFETY: the guest is paused (guest.pause() above succeeded) and
            // every worker finished its last round, so nothing writes guest memory.
            let memory_digest = unsafe { crate::memory::digest(memory) };
            Some(protocol::switch_over_digest(&memory_digest, &state))
        } else {
            None
        };
        let verify_time = verify_start.elapsed();
        let (flags, payload) = match digest {
            Some(d) => (FLAG_HAS_DIGEST, d),
            None => (0, [0; DIGEST_LEN]),
        };
        control
            .send(&protocol::encode_record(
                Kind::Complete,
                flags,
                round.into(),
                &payload,
            ))
            .map_err(fail(Phase::Acknowledge, round))?;
        let ack = control.recv().map_err(fail(Phase::Acknowledge, round))?;
        let verified = match ack.header.kind {
            Kind::Ack => {
                let theirs = &ack.payload[..];
                if ack.header.arg != u64::from(round) {
                    return Err(fail(Phase::Acknowledge, round)(Cause::Peer(format!(
                        "acknowledged round {}, not the final round {round}",
                        ack.header.arg
                    ))));
                }
                match digest {
                    Some(d) if ack.header.flags & FLAG_VERIFIED == 0 || theirs != d => {
                        return Err(fail(Phase::Acknowledge, round)(Cause::DigestMismatch));
                    }
                    Some(_) => true,
                    None => false,
                }
            }
            Kind::Error => return Err(fail(Phase::Acknowledge, round)(peer_error(&ack.payload))),
            got => {
                return Err(fail(Phase::Acknowledge, round)(
                    protocol::ProtocolError::Unexpected {
                        got,
                        expected: "Ack",
                    },
                ));
            }
        };
        // Commit: from here on the guest belongs to the destination. If this
        // send fails the Commit may or may not have arrived, so the guest
        // stays paused here rather than risk running twice.
        if let Err(e) = control.send(&protocol::encode_record(Kind::Commit, 0, 0, &[])) {
            return Err(Failure {
                phase: Phase::Commit,
                round,
                cause: Cause::InDoubt(e),
            });
        }
        let downtime = pause_at.map(|t| t.elapsed()).unwrap_or_default();
        let wire_bytes = rounds.iter().map(|r| r.metrics.wire_bytes).sum();
        Ok(MigrationReport {
            granularity: cfg.encoder.granularity,
            rounds,
            stop,
            total_time: start.elapsed(),
            downtime,
            verify_time,
            wire_bytes,
            verified,
            digest,
        })
    })
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
fn zstd_rate(rounds: &[RoundReport], workers: usize) -> Option<f64> {
    let (bytes, secs) = rounds.iter().fold((0u64, 0f64), |(b, s), r| {
        (b + r.stats.zstd_bytes_in, s + r.stats.zstd_secs)
    });
    // Workers compress in parallel: each worker's seconds are its own.
    (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs * workers as f64)
}

fn peer_error(payload: &[u8]) -> Cause {
    Cause::Peer(String::from_utf8_lossy(payload).into_owned())
}
