//! The source's state machine: [`SourceState`] names every state, and
//! [`Source::step`] is the one place that moves from one to the next (the
//! diagram is in the module doc of [`super`]).

use std::sync::Arc;
use std::time::Instant;

use super::controller::Policy;
use super::controller::{decide, Decision, Projection, RoundMetrics, StopReason};
use super::live::{RoundStatus, Stage};
use super::rounds::{compress_this_round, zstd_rate, PoolSpec, WorkerPool};
use super::switchover::Pending;
use super::{
    fail, peer_error, switchover, Cause, Failure, MigrationReport, Phase, RoundReport, ShadowMode,
    SourceConfig, SwitchoverTimes,
};
use crate::dirty::{DirtyBitmap, DirtySource};
use crate::guest::Guest;
use crate::handshake::{self, Agreed, Offer};
use crate::memory::{Layout, SourceMemory};
use crate::protocol::switchover::{Decision as DecisionRecord, OutcomeKind, Verdict};
use crate::protocol::{self, Granularity, Kind, ProtocolError, HEADER_LEN};
use crate::ring::{Ring, RingShape};
use crate::segment::compress::ZstdMode;
use crate::segment::fingerprint::{BlockHasher, FingerprintStore, BLOCK};
use crate::segment::shadow::ShadowStore;
use crate::segment::EncoderConfig;
use crate::transport::TransportError;
use crate::transport::{Control, SourceTransport};
use crate::verify::{PageHasher, SentLedger, VerifyMode};

/// How often a running round looks for the operator's cancel.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the source stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Offer the handshake.
    Handshake,
    /// Rings, streams, shadow and workers; wait for the destination's Ready.
    Setup,
    /// Pre-copy round `round` runs while the guest runs.
    PreCopy { round: u32 },
    /// The controller stopped after pre-copy round `round`: the guest
    /// still runs while the destination finishes landing that round
    /// (Drain sent, Drained awaited; version 3 peers).
    Drain { round: u32 },
    /// The guest is paused; final round `round` sends what is left.
    StopAndCopy { round: u32 },
    /// The vCPU state and Complete (with the digest) go out; the Ack comes back.
    SwitchOver { round: u32 },
    /// The destination holds a verified copy: the Commit goes out, the
    /// destination's Outcome comes back.
    Decide { round: u32 },
    /// Done: the guest belongs to the destination.
    Migrated,
}

impl SourceState {
    /// The phase errors in this state are named after.
    pub fn phase(self) -> Phase {
        match self {
            SourceState::Handshake => Phase::Handshake,
            SourceState::Setup => Phase::Setup,
            SourceState::PreCopy { .. } => Phase::PreCopy,
            SourceState::Drain { .. } => Phase::Drain,
            SourceState::StopAndCopy { .. } => Phase::StopAndCopy,
            SourceState::SwitchOver { .. } => Phase::Acknowledge,
            SourceState::Decide { .. } | SourceState::Migrated => Phase::Decision,
        }
    }
}

/// Everything one migration on the source holds.
pub(crate) struct Source<'a, T: SourceTransport> {
    memory: &'a SourceMemory,
    dirty: &'a mut dyn DirtySource,
    guest: &'a mut dyn Guest,
    transport: &'a mut T,
    cfg: &'a SourceConfig,
    on_round: &'a mut dyn FnMut(&RoundReport),
    start: Instant,
    layout: Layout,
    workers: usize,
    agreed: Option<Agreed>,
    pool: Option<WorkerPool>,
    bitmap: Arc<DirtyBitmap>,
    history: Vec<RoundMetrics>,
    rounds: Vec<RoundReport>,
    stop: StopReason,
    best_plain_rate: Option<f64>,
    /// Set before `pause()` is called: a failed pause must be undone too.
    pause_attempted: bool,
    pause_at: Option<Instant>,
    /// Where the pause went, phase by phase (see [`SwitchoverTimes`]).
    times: SwitchoverTimes,
    acked: switchover::Acked,
    /// When the destination's vCPUs started (its clock, ns since the epoch).
    started_at: u64,
    /// The verification in force (the configured one, or strict for a
    /// version 1 peer, which knows no ledger).
    verify: VerifyMode,
    /// Incremental verification: the page hasher under the session's key.
    hasher: Option<Arc<PageHasher>>,
}

impl<'a, T: SourceTransport> Source<'a, T> {
    pub fn new(
        layout: Layout,
        memory: &'a SourceMemory,
        dirty: &'a mut dyn DirtySource,
        guest: &'a mut dyn Guest,
        transport: &'a mut T,
        cfg: &'a SourceConfig,
        on_round: &'a mut dyn FnMut(&RoundReport),
    ) -> Self {
        Source {
            memory,
            dirty,
            guest,
            transport,
            cfg,
            on_round,
            start: Instant::now(),
            bitmap: Arc::new(DirtyBitmap::new(&layout)),
            layout,
            workers: cfg.workers.clamp(1, usize::from(protocol::MAX_STREAMS)),
            agreed: None,
            pool: None,
            history: Vec::new(),
            rounds: Vec::new(),
            stop: StopReason::Clean,
            best_plain_rate: None,
            pause_attempted: false,
            pause_at: None,
            times: SwitchoverTimes::default(),
            acked: switchover::Acked::default(),
            started_at: 0,
            verify: cfg.verify,
            hasher: None,
        }
    }

    pub fn pause_attempted(&self) -> bool {
        self.pause_attempted
    }

    /// What the caller needs after a failure: the guest to resume and the
    /// transport to tell the peer why. Stops the workers first.
    pub fn into_parts(mut self) -> (&'a mut dyn Guest, &'a mut T) {
        if let Some(pool) = self.pool.take() {
            self.transport.interrupt().trigger();
            drop(pool);
        }
        (self.guest, self.transport)
    }

    /// Runs the machine to its end.
    pub fn run(&mut self) -> Result<MigrationReport, Failure> {
        let mut state = SourceState::Handshake;
        loop {
            // The operator's cancel, honoured until the Commit goes out
            // (`Decide` asks the gate itself).
            let cancel = self.cfg.live.cancelled() && !matches!(state, SourceState::Decide { .. });
            let next = if cancel {
                Err(self.cancelled(state))
            } else {
                self.step(state)
            };
            if let Ok(next) = &next {
                // Each phase's start, for `-v` and for lining up a profile
                // with the switch-over (the subscriber stamps the time).
                tracing::debug!(target: "hpmig::source", state = ?next, "source state");
            }
            state = match next {
                Ok(SourceState::Migrated) => return Ok(self.report()),
                Ok(next) => next,
                Err(mut e) => {
                    // Unblock the workers before anything else.
                    self.transport.interrupt().trigger();
                    if let (SourceState::SwitchOver { round }, Some(s), true) =
                        (state, self.session(), self.v2())
                    {
                        // The destination may hold a copy: tell it to drop it.
                        let pending = Pending {
                            decision: DecisionRecord {
                                session: s.id(),
                                verdict: Verdict::Abort,
                                round,
                            },
                            session: s,
                        };
                        e.abort = Some(Box::new(pending));
                    }
                    return Err(e);
                }
            };
        }
    }

    /// The failure a cancel in `state` ends with.
    fn cancelled(&self, state: SourceState) -> Failure {
        let round = match state {
            SourceState::PreCopy { round }
            | SourceState::Drain { round }
            | SourceState::StopAndCopy { round }
            | SourceState::SwitchOver { round }
            | SourceState::Decide { round } => round,
            _ => 0,
        };
        fail(state.phase(), round)(Cause::Cancelled)
    }

    fn v2(&self) -> bool {
        self.agreed.as_ref().is_some_and(|a| a.version >= 2)
    }

    /// The peer knows Drain.
    fn v3(&self) -> bool {
        self.agreed.as_ref().is_some_and(|a| a.version >= 3)
    }

    fn session(&self) -> Option<crate::auth::Session> {
        self.agreed.as_ref().map(|a| a.session.clone())
    }

    /// One transition.
    fn step(&mut self, state: SourceState) -> Result<SourceState, Failure> {
        match state {
            SourceState::Handshake => {
                self.handshake()?;
                Ok(SourceState::Setup)
            }
            SourceState::Setup => {
                self.setup()?;
                Ok(SourceState::PreCopy { round: 0 })
            }
            SourceState::PreCopy { round } => match self.precopy_round(round)? {
                Decision::Continue => Ok(SourceState::PreCopy { round: round + 1 }),
                Decision::Abort(reason) => Err(fail(Phase::PreCopy, round)(Cause::Aborted(reason))),
                Decision::StopAndCopy(reason) if self.v3() => {
                    self.stop = reason;
                    self.cfg.live.stopping();
                    Ok(SourceState::Drain { round })
                }
                Decision::StopAndCopy(reason) => {
                    self.stop = reason;
                    self.cfg.live.stopping();
                    self.pause(round + 1)?;
                    Ok(SourceState::StopAndCopy { round: round + 1 })
                }
            },
            SourceState::Drain { round } => {
                let t = Instant::now();
                self.drain(round)?;
                self.times.drain = t.elapsed();
                self.pause(round + 1)?;
                Ok(SourceState::StopAndCopy { round: round + 1 })
            }
            SourceState::StopAndCopy { round } => {
                let t = Instant::now();
                self.final_round(round)?;
                self.times.final_round = t.elapsed();
                Ok(SourceState::SwitchOver { round })
            }
            SourceState::SwitchOver { round } => {
                self.cfg.live.set_stage(Stage::SwitchOver);
                let session = self.v2().then(|| self.session()).flatten();
                let ledger_sum = self.rounds.last().map_or(0, |r| r.stats.ledger_sum);
                let t = Instant::now();
                self.acked = switchover::complete(
                    self.transport.control(),
                    self.guest,
                    self.memory,
                    (self.verify, ledger_sum),
                    round,
                    session.as_ref(),
                    self.cfg.deadlines.io,
                )?;
                self.times.acknowledge = t.elapsed();
                // Test hook: the guest stays paused between Ack and Commit.
                std::thread::sleep(self.cfg.delay_commit);
                Ok(SourceState::Decide { round })
            }
            SourceState::Decide { round } if !self.cfg.live.begin_commit() => {
                // Cancelled after the Ack: the destination holds a verified
                // copy and must hear the Abort.
                let mut e = self.cancelled(SourceState::Decide { round });
                e.abort = self.session().filter(|_| self.v2()).map(|session| {
                    Box::new(Pending {
                        decision: DecisionRecord {
                            session: session.id(),
                            verdict: Verdict::Abort,
                            round,
                        },
                        session,
                    })
                });
                Err(e)
            }
            SourceState::Decide { round } if !self.v2() => {
                switchover::commit_v1(self.transport.control(), round)?;
                Ok(SourceState::Migrated)
            }
            SourceState::Decide { round } => {
                let session = self.session().ok_or_else(|| {
                    fail(Phase::Decision, round)(Cause::Setup("no session".into()))
                })?;
                let pending = Pending {
                    decision: DecisionRecord {
                        session: session.id(),
                        verdict: Verdict::Commit,
                        round,
                    },
                    session,
                };
                let in_doubt = |e: TransportError, p: &Pending| Failure {
                    phase: Phase::Decision,
                    round,
                    cause: Cause::InDoubt(e, Some(Box::new(p.clone()))),
                    abort: None,
                };
                let t = Instant::now();
                match switchover::decide(self.transport.control(), &pending, self.cfg.deadlines.io)
                {
                    Ok(o) => match o.outcome {
                        OutcomeKind::Started => {
                            self.times.decision = t.elapsed();
                            self.started_at = o.started_at;
                            Ok(SourceState::Migrated)
                        }
                        OutcomeKind::Discarded | OutcomeKind::Lost => {
                            Err(fail(Phase::Decision, round)(Cause::NotStarted(o.outcome)))
                        }
                        OutcomeKind::Unknown => Err(in_doubt(
                            TransportError::Other(
                                "the destination has no record of the session".into(),
                            ),
                            &pending,
                        )),
                    },
                    Err(e) => Err(in_doubt(e, &pending)),
                }
            }
            SourceState::Migrated => Ok(SourceState::Migrated),
        }
    }

    /// The configuration's ring, or else the transport's.
    fn ring_shape(&self) -> RingShape {
        self.cfg.ring.unwrap_or_else(|| self.transport.ring_shape())
    }

    fn handshake(&mut self) -> Result<(), Failure> {
        let page_size = self.layout.page_size();
        let ring = self.ring_shape();
        if ring.slot_size < 2 * (HEADER_LEN + page_size) {
            return Err(fail(Phase::Setup, 0)(Cause::Setup(format!(
                "ring slot size {} is too small for page size {page_size}: it needs at least {}",
                ring.slot_size,
                2 * (HEADER_LEN + page_size)
            ))));
        }
        let features = self.cfg.features
            | if self.cfg.zstd == ZstdMode::Off {
                0
            } else {
                protocol::FEATURE_ZSTD
            };
        let offer = Offer {
            version: self.cfg.max_version,
            granularity: self.cfg.encoder.granularity,
            streams: self.workers as u16,
            features,
            layout: &self.layout,
            secret: &self.cfg.secret,
            verify: self.cfg.verify,
            guest: crate::protocol::GuestInfo {
                vcpus: self.guest.vcpus(),
                requirements: self.guest.requirements(),
            },
        };
        let agreed = handshake::offer(self.transport.control(), &offer, self.cfg.deadlines.io)
            .map_err(fail(Phase::Handshake, 0))?;
        if agreed.version < 2 && self.verify == VerifyMode::Incremental {
            self.verify = VerifyMode::Strict;
        }
        if self.verify == VerifyMode::Incremental {
            let key = agreed.session.page_hash_key();
            self.hasher = Some(Arc::new(PageHasher::new(&key, page_size)));
        }
        self.agreed = Some(agreed);
        Ok(())
    }

    fn setup(&mut self) -> Result<(), Failure> {
        let setup = |e: String| fail(Phase::Setup, 0)(Cause::Setup(e));
        let layout = &self.layout;
        let agreed = self
            .agreed
            .clone()
            .ok_or_else(|| setup("no handshake".into()))?;
        // Ring slots are whole pages (registrable memory); round the size up.
        let page = crate::memory::host_page_size();
        let ring = self.ring_shape();
        let slot_size = ring.slot_size.div_ceil(page) * page;
        let rings = (0..self.workers)
            .map(|_| Ring::new(ring.slots, slot_size))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| setup(e.to_string()))?;
        let streams = self
            .transport
            .open_streams(rings, &agreed.session)
            .map_err(fail(Phase::Setup, 0))?;
        let segment = self.cfg.encoder.granularity == Granularity::Segment;
        let shadow = match (segment, self.cfg.shadow, self.cfg.shadow_budget) {
            (false, ..) | (true, ShadowMode::Fingerprint, None) => None,
            (true, ShadowMode::Full, None) => Some(ShadowStore::full(layout)),
            (true, ShadowMode::Full, Some(b)) => Some(ShadowStore::with_budget(layout, b)),
            (true, ShadowMode::Fingerprint, Some(_)) => {
                return Err(setup(
                    "a shadow budget bounds the full shadow only, not fingerprints".into(),
                ))
            }
        }
        .transpose()
        .map_err(|e| setup(format!("allocating the shadow: {e}")))?;
        let fingerprints = if segment && self.cfg.shadow == ShadowMode::Fingerprint {
            let hasher = BlockHasher::random()
                .map_err(|e| setup(format!("drawing the fingerprint key: {e}")))?;
            let mut store =
                FingerprintStore::new(hasher, layout.page_size(), layout.bitmap_words());
            if let Some(gpa) = self.cfg.fingerprint_blind {
                let (page, _) = layout
                    .locate(gpa, 1)
                    .map_err(|e| setup(format!("fingerprint test hook: {e}")))?;
                store.blind_to(page, (gpa % layout.page_size() as u64) as usize / BLOCK);
            }
            Some(store.parts(self.workers))
        } else {
            None
        };
        let spec = PoolSpec {
            memory: self.memory,
            layout,
            encoder: EncoderConfig {
                words: self.cfg.encoder.words && agreed.version >= 4,
                ..self.cfg.encoder
            },
            shadow: shadow.map(|s| s.parts(self.workers)),
            fingerprints,
            zstd: agreed.zstd() && self.cfg.zstd != ZstdMode::Off,
            limiter: self.cfg.live.limiter(),
            live: Arc::clone(&self.cfg.live),
            pin: self.cfg.pin,
            interrupt: self.transport.interrupt(),
            hasher: self.hasher.clone(),
        };
        self.pool = Some(WorkerPool::start(streams, spec).map_err(fail(Phase::Setup, 0))?);
        // No data before the destination can land it.
        let ready = self
            .transport
            .control()
            .recv_live(self.cfg.deadlines.io)
            .map_err(fail(Phase::Setup, 0))?;
        match ready.header.kind {
            Kind::Ready => {}
            Kind::Error => return Err(fail(Phase::Setup, 0)(peer_error(&ready.payload))),
            got => {
                return Err(fail(Phase::Setup, 0)(ProtocolError::Unexpected {
                    got,
                    expected: "Ready",
                }))
            }
        }
        // Start tracking before the first read, then send everything.
        let mut bitmap = DirtyBitmap::new(&self.layout);
        self.dirty
            .harvest(&mut bitmap)
            .map_err(fail(Phase::PreCopy, 0))?;
        bitmap.set_all();
        self.bitmap = Arc::new(bitmap);
        Ok(())
    }

    /// Sends the pages of `self.bitmap` as round `round`.
    fn send_round(&mut self, round: u32, last: bool) -> Result<RoundReport, Failure> {
        let phase = if last {
            Phase::StopAndCopy
        } else {
            Phase::PreCopy
        };
        let t0 = Instant::now();
        let agreed_zstd = self.agreed.as_ref().is_some_and(Agreed::zstd);
        let compress = agreed_zstd
            && self.cfg.zstd != ZstdMode::Off
            && compress_this_round(
                self.cfg.zstd,
                self.cfg.live.bandwidth(),
                self.best_plain_rate,
                zstd_rate(&self.rounds, self.workers),
            );
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| fail(phase, round)(Cause::Setup("no workers".into())))?;
        let live = Arc::clone(&self.cfg.live);
        live.round_started(round, self.bitmap.count(), last);
        // A quiet control connection must still say Alive to the
        // destination while the round runs (version 2); a cancel stops the
        // round within a poll.
        let alive = self.agreed.as_ref().is_some_and(|a| a.version >= 2);
        let control = self.transport.control();
        let alive_period = self.cfg.deadlines.alive_period();
        let mut alive_due = Instant::now();
        let mut idle = || {
            if live.cancelled() {
                return Err(Cause::Cancelled);
            }
            if alive && Instant::now() >= alive_due {
                control.send(&crate::protocol::switchover::alive())?;
                alive_due = Instant::now() + alive_period;
            }
            Ok(())
        };
        let stats = pool
            .round(
                round,
                last,
                compress,
                &self.bitmap,
                alive_period.min(CANCEL_POLL),
                &mut idle,
            )
            .map_err(|e| {
                if live.cancelled() {
                    Cause::Cancelled
                } else {
                    e
                }
            })
            .map_err(fail(phase, round))?;
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
            self.best_plain_rate = Some(self.best_plain_rate.map_or(rate, |b| b.max(rate)));
        }
        Ok(RoundReport {
            metrics,
            stats,
            projection: Projection::default(),
            decision: Decision::Continue,
            last,
        })
    }

    /// The workers took their bitmap back: harvest into it again.
    fn harvest(&mut self, phase: Phase, round: u32) -> Result<(), Failure> {
        let b = Arc::get_mut(&mut self.bitmap)
            .ok_or_else(|| fail(phase, round)(Cause::Setup("bitmap still shared".into())))?;
        self.dirty.harvest(b).map_err(fail(phase, round))
    }

    fn precopy_round(&mut self, round: u32) -> Result<Decision, Failure> {
        let mut report = self.send_round(round, false)?;
        self.history.push(report.metrics);
        if let Some(b) = Arc::get_mut(&mut self.bitmap) {
            b.clear();
        }
        // The round's end may be the switch-over's start (see
        // `Live::switchover_near`).
        // A failed harvest ends the migration, whose final stage is near
        // anyway.
        self.cfg.live.round_ending(true);
        self.harvest(Phase::PreCopy, round)?;
        let page_size = self.layout.page_size() as u64;
        // The operator may have changed the target since the last decision.
        let policy = Policy {
            downtime_target: self.cfg.live.downtime_target(),
            ..self.cfg.policy
        };
        let dirty_now = self.bitmap.count();
        let (decision, projection) = decide(&policy, &self.history, dirty_now, page_size);
        if !matches!(decision, Decision::StopAndCopy(_)) {
            // Far again (not after the round's callback: it may take long).
            self.cfg.live.round_ending(false);
        }
        report.decision = decision;
        report.projection = projection;
        let m = report.metrics;
        let secs = m.duration.as_secs_f64();
        self.cfg.live.round_done(RoundStatus {
            round,
            pages: m.dirty_pages,
            work_set_bytes: m.work_set_bytes,
            wire_bytes: m.wire_bytes,
            duration: m.duration,
            dirty_pages_rate: if secs > 0.0 {
                dirty_now as f64 / secs
            } else {
                0.0
            },
            link_rate: if secs > 0.0 {
                m.wire_bytes as f64 / secs
            } else {
                0.0
            },
            expected_downtime: projection.downtime,
            decision: decision.to_string(),
        });
        (self.on_round)(&report);
        self.rounds.push(report);
        Ok(decision)
    }

    /// Asks the destination to land pre-copy round `round` whole and
    /// waits for its Drained, the guest still running, so the pause does
    /// not pay for that landing. The wait is bounded like any other (each
    /// control record within the I/O deadline; the destination says Alive
    /// while it still lands) and a cancel ends it within a poll, as it
    /// ends a round.
    fn drain(&mut self, round: u32) -> Result<(), Failure> {
        let failed = |cause: Cause| fail(Phase::Drain, round)(cause);
        let io = self.cfg.deadlines.io;
        let live = Arc::clone(&self.cfg.live);
        let interrupt = self.transport.interrupt();
        let control = self.transport.control();
        if let Err(e) = control.send(&protocol::drain(round)) {
            return Err(failed(e.into()));
        }
        let answer = std::thread::scope(|s| {
            let (done, finished) = crossbeam_channel::bounded::<()>(0);
            s.spawn(move || {
                // A cancel interrupts the wait below.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    finished.recv_timeout(CANCEL_POLL)
                {
                    if live.cancelled() {
                        interrupt.trigger();
                        return;
                    }
                }
            });
            let answer = control.recv_live(io);
            drop(done);
            answer
        });
        // A cancel that came with the answer still wins: the guest has
        // not been paused yet (and the watcher may have interrupted the
        // transport already).
        if self.cfg.live.cancelled() {
            return Err(failed(Cause::Cancelled));
        }
        let answer = answer.map_err(|e| failed(e.into()))?;
        match answer.header.kind {
            Kind::Drained if answer.header.arg == u64::from(round) => Ok(()),
            Kind::Drained => Err(failed(Cause::Peer(format!(
                "drained round {}, not round {round}",
                answer.header.arg
            )))),
            Kind::Error => Err(failed(peer_error(&answer.payload))),
            got => Err(failed(
                ProtocolError::Unexpected {
                    got,
                    expected: "Drained",
                }
                .into(),
            )),
        }
    }

    fn pause(&mut self, round: u32) -> Result<(), Failure> {
        self.pause_attempted = true;
        let t = Instant::now();
        self.guest
            .pause()
            .map_err(fail(Phase::StopAndCopy, round))?;
        let paused = Instant::now();
        self.times.pause = paused - t;
        self.times.paused_at = Some(paused);
        self.pause_at = Some(paused);
        // Pages dirtied since the decision's harvest join the final round.
        self.harvest(Phase::StopAndCopy, round)?;
        self.times.harvest = paused.elapsed();
        Ok(())
    }

    fn final_round(&mut self, round: u32) -> Result<(), Failure> {
        let mut report = self.send_round(round, true)?;
        report.decision = Decision::StopAndCopy(self.stop);
        (self.on_round)(&report);
        self.rounds.push(report);
        if let Some(pool) = &mut self.pool {
            pool.finish();
        }
        Ok(())
    }

    fn report(&mut self) -> MigrationReport {
        let downtime = self.pause_at.map(|t| t.elapsed()).unwrap_or_default();
        let rounds = std::mem::take(&mut self.rounds);
        let wire_bytes = rounds.iter().map(|r| r.metrics.wire_bytes).sum();
        MigrationReport {
            granularity: self.cfg.encoder.granularity,
            rounds,
            stop: self.stop,
            total_time: self.start.elapsed(),
            downtime,
            switchover: self.times,
            downtime_target: self.cfg.live.downtime_target(),
            verify_time: self.acked.verify_time,
            started_at: self.started_at,
            wire_bytes,
            verified: self.acked.verified,
            digest: self.acked.digest,
            verify: self.verify,
            sent: self.hasher.as_ref().and_then(|h| {
                let parts = self.pool.take()?.into_ledgers();
                Some(Arc::new(SentLedger {
                    parts,
                    hasher: PageHasher::clone(h),
                    layout: self.layout.clone(),
                }))
            }),
        }
    }
}
