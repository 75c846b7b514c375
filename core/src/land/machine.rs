//! The destination's state machine: [`DestState`] names every state, and
//! [`Dest::step`] is the one place that moves from one to the next (the
//! diagram is in the module doc of [`super`]).

use std::time::Instant;

use crate::precopy::live::{Ended, Stage};

use super::journal::JournalEvent;
use super::receive::{land_all, Check, Landed};
use super::switchover::{self, Undecided, Verified};
use super::{DestConfig, LandError, Received};
use crate::guest::DestGuest;
use crate::handshake::{self, layout_mismatch, Accepted, HandshakeError};
use crate::memory::{DestMemory, Layout};
use crate::protocol::switchover::{Outcome, Verdict};
use crate::protocol::{self, ErrorCode, Kind, ProtocolError};
use crate::transport::{with_keepalive, Control, DestTransport};
use crate::verify::{PageHasher, VerifyMode};
use std::sync::Arc;

/// Where the destination stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestState {
    /// Answer the source's handshake.
    Handshake,
    /// Accept the data streams into the given memory; tell the source Ready.
    Setup,
    /// Rounds land, until Complete and every stream's final round.
    Receiving,
    /// Compare the landed memory and state with the source's digest.
    Verify,
    /// Hand the state to the guest (vCPUs created, not running), journal
    /// the session, send the Ack.
    Restore,
    /// The Ack went out; waiting for the source's decision.
    Acknowledged,
    /// No decision came: the restored copy is held, paused, until the
    /// decision is delivered again or an operator resolves it.
    InDoubt,
    /// Done: the source committed and the guest runs here.
    Running,
    /// Done: the source aborted and the copy was discarded.
    Discarded,
}

/// Everything one migration on the destination holds.
pub(crate) struct Dest<'a, T: DestTransport> {
    accepted: Option<Accepted>,
    memory: &'a DestMemory,
    transport: &'a mut T,
    cfg: &'a DestConfig,
    guest: &'a mut dyn DestGuest,
    rxs: Vec<T::Rx>,
    landed: Option<Landed>,
    verified: Option<Verified>,
    vcpus: u32,
    /// The guest holds a restored state that must be discarded on failure.
    restored: bool,
    outcome: Option<Outcome>,
}

impl<'a, T: DestTransport> Dest<'a, T> {
    pub fn new(
        accepted: Option<Accepted>,
        memory: &'a DestMemory,
        transport: &'a mut T,
        cfg: &'a DestConfig,
        guest: &'a mut dyn DestGuest,
    ) -> Self {
        Dest {
            accepted,
            memory,
            transport,
            cfg,
            guest,
            rxs: Vec::new(),
            landed: None,
            verified: None,
            vcpus: 0,
            restored: false,
            outcome: None,
        }
    }

    /// Runs the machine to its end. On failure before the Ack the guest is
    /// discarded and the source told why; in doubt it is held.
    pub fn run(mut self) -> Result<Received, LandError> {
        let mut state = if self.accepted.is_some() {
            DestState::Setup
        } else {
            DestState::Handshake
        };
        let live = Arc::clone(&self.cfg.live);
        let result = loop {
            live.set_stage(match state {
                DestState::Handshake | DestState::Setup => Stage::Setup,
                DestState::Receiving => Stage::PreCopy,
                DestState::Verify | DestState::Restore => Stage::SwitchOver,
                DestState::Acknowledged => Stage::Committing,
                DestState::InDoubt => Stage::InDoubt,
                DestState::Running => Stage::Migrated,
                DestState::Discarded => Stage::Cancelled,
            });
            let next = self.step(state);
            if let Ok(next) = &next {
                tracing::debug!(target: "hpmig::dest", state = ?next, "destination state");
            }
            match next {
                Ok(DestState::Running) => break self.received(),
                Ok(DestState::Discarded) => break Err(LandError::Aborted),
                Ok(next) => state = next,
                Err(e) => break Err(e),
            }
        };
        let held = matches!(result, Err(LandError::InDoubt(_)) | Err(LandError::Aborted));
        if result.is_err() && self.restored && !held {
            self.guest.discard();
        }
        if !held {
            tell_source(self.transport, &result);
        }
        let (stage, error) = match &result {
            Ok(_) => (Stage::Migrated, None),
            Err(LandError::Aborted) => (Stage::Cancelled, None),
            Err(e @ LandError::InDoubt(_)) => (Stage::InDoubt, Some(e.to_string())),
            Err(e) => (Stage::Failed, Some(e.to_string())),
        };
        live.end(
            stage,
            Ended {
                error,
                ..Ended::default()
            },
        );
        result
    }

    fn v2(&self) -> bool {
        self.accepted
            .as_ref()
            .is_some_and(|a| a.agreed.version >= 2)
    }

    fn undecided(&self) -> Result<Undecided, LandError> {
        let a = self.accepted.as_ref().ok_or(LandError::NoState)?;
        let v = self.verified.ok_or(LandError::NoState)?;
        Ok(Undecided {
            session: a.agreed.session.clone(),
            round: v.final_round,
        })
    }

    /// One transition.
    fn step(&mut self, state: DestState) -> Result<DestState, LandError> {
        let io = self.cfg.deadlines.io;
        match state {
            DestState::Handshake => {
                let layout = Layout::of(self.memory).map_err(|e| {
                    HandshakeError::Refused(ProtocolError::Layout {
                        source_layout: "-".into(),
                        dest_layout: e.to_string(),
                    })
                })?;
                let deadline = Instant::now() + self.cfg.deadlines.handshake;
                let guest = &mut *self.guest;
                self.accepted = Some(handshake::answer(
                    self.transport.control(),
                    &self.cfg.terms,
                    Some(&layout),
                    deadline,
                    &mut |g| {
                        guest
                            .admit(g.vcpus, &g.requirements)
                            .map_err(|e| e.to_string())
                    },
                )?);
                Ok(DestState::Setup)
            }
            DestState::Setup => {
                self.setup()?;
                Ok(DestState::Receiving)
            }
            DestState::Receiving => {
                let accepted = self.accepted.as_ref().ok_or(LandError::NoState)?;
                let zstd = accepted.agreed.zstd();
                let layout = accepted.hello.layout.clone();
                let alive = self.v2().then_some(self.cfg.deadlines);
                let check = Check {
                    io,
                    alive,
                    drain: accepted.agreed.version >= 3,
                    hasher: (accepted.hello.verify == VerifyMode::Incremental).then(|| {
                        let key = accepted.agreed.session.page_hash_key();
                        Arc::new(PageHasher::new(&key, layout.page_size()))
                    }),
                    full_digest: accepted.hello.verify == VerifyMode::Strict,
                    fault: self.cfg.fault,
                    live: Arc::clone(&self.cfg.live),
                };
                let rxs = std::mem::take(&mut self.rxs);
                self.landed = Some(land_all(
                    self.transport,
                    rxs,
                    self.memory,
                    &layout,
                    zstd,
                    check,
                )?);
                Ok(DestState::Verify)
            }
            DestState::Verify => {
                let landed = self.landed.as_ref().ok_or(LandError::NoState)?;
                let (vcpus, verified) = switchover::verify(landed, self.cfg.require_verified)?;
                self.vcpus = vcpus;
                self.verified = Some(verified);
                Ok(DestState::Restore)
            }
            DestState::Restore => {
                let (vcpus, state) = self
                    .landed
                    .as_ref()
                    .and_then(|l| l.state.as_ref())
                    .ok_or(LandError::NoState)?;
                self.guest
                    .restore(self.memory, *vcpus, state)
                    .map_err(LandError::Restore)?;
                self.restored = true;
                let v = self.verified.ok_or(LandError::NoState)?;
                let session = self.v2().then(|| self.undecided()).transpose()?;
                if let (Some(u), Some(j)) = (&session, &self.cfg.journal) {
                    // Durable before the Ack: a restarted destination then
                    // knows this copy existed and never ran.
                    j.record(
                        u.id(),
                        JournalEvent::Acknowledged {
                            nonces: u.session.nonces(),
                        },
                    )
                    .map_err(LandError::Journal)?;
                }
                switchover::acknowledge(
                    self.transport.control(),
                    &v,
                    session.as_ref().map(|u| &u.session),
                )?;
                Ok(DestState::Acknowledged)
            }
            DestState::Acknowledged if !self.v2() => {
                switchover::await_commit_v1(self.transport.control(), io)?;
                self.guest.start().map_err(LandError::Start)?;
                self.restored = false;
                Ok(DestState::Running)
            }
            DestState::Acknowledged => {
                let u = self.undecided()?;
                match switchover::read_decision(self.transport.control(), &u, io) {
                    Ok(d) => {
                        let outcome = switchover::act(&d, self.guest, self.cfg.journal.as_ref())?;
                        self.decided(&u, outcome, true)
                    }
                    Err(e) => {
                        tracing::warn!(session = %u.id(), "no decision after the Ack ({e}): holding the copy in doubt");
                        Ok(DestState::InDoubt)
                    }
                }
            }
            DestState::InDoubt => {
                let u = self.undecided()?;
                let until = Instant::now() + self.cfg.in_doubt_wait;
                let outcome =
                    switchover::await_redelivery(self.transport, &u, self.guest, self.cfg, until)?;
                self.decided(&u, outcome, false)
            }
            DestState::Running => Ok(DestState::Running),
            DestState::Discarded => Ok(DestState::Discarded),
        }
    }

    /// After acting on a decision: answer it (when it came on the current
    /// connection) and end.
    fn decided(
        &mut self,
        u: &Undecided,
        outcome: Outcome,
        answer: bool,
    ) -> Result<DestState, LandError> {
        self.restored = false;
        if answer {
            // If this answer is lost the source asks again, and the journal
            // (or this process, still holding the session) answers.
            let _ = self
                .transport
                .control()
                .send(&outcome.encode(Some(&u.session)));
        }
        self.outcome = Some(outcome);
        Ok(match outcome.verdict {
            Verdict::Commit => DestState::Running,
            Verdict::Abort => DestState::Discarded,
        })
    }

    /// Checks the memory against the Hello, accepts the streams, says Ready.
    fn setup(&mut self) -> Result<(), LandError> {
        let accepted = self.accepted.as_ref().ok_or(LandError::NoState)?;
        let hello = &accepted.hello;
        self.cfg
            .live
            .start_landing(hello.layout.total_bytes(), hello.layout.page_size() as u64);
        let ours = Layout::of(self.memory).map_err(|e| {
            HandshakeError::Refused(ProtocolError::Layout {
                source_layout: format!("{:?}", hello.layout),
                dest_layout: e.to_string(),
            })
        })?;
        if hello.layout != ours {
            return Err(HandshakeError::Refused(layout_mismatch(&hello.layout, &ours)).into());
        }
        let streams = usize::from(hello.streams);
        let session = accepted.agreed.session.clone();
        let v2 = self.v2();
        if !self.cfg.memory_zeroed {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let (memory, page) = (self.memory, ours.page_size());
            let period = self.cfg.deadlines.alive_period();
            let fixed = with_keepalive(self.transport.control(), v2, period, || {
                // SAFETY: no stream is accepted yet and the guest does not
                // run: nothing else touches the memory.
                unsafe { crate::memory::ensure_zeroed(memory, page, threads) }
            })?;
            if fixed > 0 {
                tracing::info!(pages = fixed, "zeroed destination pages that were not zero");
            }
        }
        let vcpus = hello.guest.vcpus;
        self.rxs = self
            .transport
            .accept_streams(streams, &session, self.memory)?;
        // Out of the pause: whatever restoring costs per byte of guest memory.
        if vcpus > 0 {
            self.guest.prepare(self.memory, vcpus);
        }
        // Memory is allocated and every stream accepted: round 0 may start.
        self.transport
            .control()
            .send(&protocol::encode_record(Kind::Ready, 0, 0, &[]))?;
        Ok(())
    }

    fn received(&self) -> Result<Received, LandError> {
        let (accepted, landed, v) = match (&self.accepted, &self.landed, &self.verified) {
            (Some(a), Some(l), Some(v)) => (a, l, v),
            _ => return Err(LandError::NoState),
        };
        Ok(Received {
            granularity: accepted.hello.granularity,
            vcpus: self.vcpus,
            final_round: v.final_round,
            verified: v.verified,
            digest: v.digest,
            stats: landed.stats,
            started_at: self.outcome.map_or(0, |o| o.started_at),
        })
    }
}

/// Best effort: tell the source why we failed (it may be gone already).
pub(crate) fn tell_source<T: DestTransport, R>(transport: &mut T, result: &Result<R, LandError>) {
    if let Err(e) = result {
        let code = match e {
            LandError::Handshake(_) => ErrorCode::Refused,
            LandError::DigestMismatch => ErrorCode::DigestMismatch,
            _ => ErrorCode::Apply,
        };
        let _ = transport
            .control()
            .send(&protocol::encode_error(code, &e.to_string()));
    }
}
