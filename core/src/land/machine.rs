//! The destination's state machine: [`DestState`] names every state, and
//! [`Dest::step`] is the one place that moves from one to the next (the
//! diagram is in the module doc of [`super`]).

use super::receive::{land_all, Landed};
use super::switchover::{self, Verified};
use super::{DestConfig, LandError, Received};
use crate::guest::DestGuest;
use crate::handshake::{self, layout_mismatch, Accepted, HandshakeError};
use crate::memory::{DestMemory, Layout};
use crate::protocol::{self, ErrorCode, Kind, ProtocolError};
use crate::transport::{Control, DestTransport};

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
    /// Hand the state to the guest (vCPUs created, not running).
    Restore,
    /// The Ack went out; waiting for the source's decision.
    Acknowledged,
    /// Done: the source committed and the guest runs here.
    Running,
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
        }
    }

    /// Runs the machine to its end; on failure the guest is discarded and
    /// the source told why.
    pub fn run(mut self) -> Result<Received, LandError> {
        let mut state = if self.accepted.is_some() {
            DestState::Setup
        } else {
            DestState::Handshake
        };
        let result = loop {
            match self.step(state) {
                Ok(DestState::Running) => break self.received(),
                Ok(next) => state = next,
                Err(e) => break Err(e),
            }
        };
        if result.is_err() && self.restored {
            self.guest.discard();
        }
        tell_source(self.transport, &result);
        result
    }

    /// One transition.
    fn step(&mut self, state: DestState) -> Result<DestState, LandError> {
        match state {
            DestState::Handshake => {
                let layout = Layout::of(self.memory).map_err(|e| {
                    HandshakeError::Refused(ProtocolError::Layout {
                        source_layout: "-".into(),
                        dest_layout: e.to_string(),
                    })
                })?;
                self.accepted = Some(handshake::answer(
                    self.transport.control(),
                    &self.cfg.terms,
                    Some(&layout),
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
                let rxs = std::mem::take(&mut self.rxs);
                self.landed = Some(land_all(self.transport, rxs, self.memory, &layout, zstd)?);
                Ok(DestState::Verify)
            }
            DestState::Verify => {
                let landed = self.landed.as_ref().ok_or(LandError::NoState)?;
                let (vcpus, verified) = switchover::verify(landed)?;
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
                switchover::restore(self.guest, *vcpus, state)?;
                self.restored = true;
                let v = self.verified.ok_or(LandError::NoState)?;
                switchover::acknowledge(self.transport.control(), &v)?;
                Ok(DestState::Acknowledged)
            }
            DestState::Acknowledged => {
                switchover::await_commit(self.transport.control())?;
                self.guest.start().map_err(LandError::Start)?;
                self.restored = false;
                Ok(DestState::Running)
            }
            DestState::Running => Ok(DestState::Running),
        }
    }

    /// Checks the memory against the Hello, accepts the streams, says Ready.
    fn setup(&mut self) -> Result<(), LandError> {
        let accepted = self.accepted.as_ref().ok_or(LandError::NoState)?;
        let hello = &accepted.hello;
        let ours = Layout::of(self.memory).map_err(|e| {
            HandshakeError::Refused(ProtocolError::Layout {
                source_layout: format!("{:?}", hello.layout),
                dest_layout: e.to_string(),
            })
        })?;
        if hello.layout != ours {
            return Err(HandshakeError::Refused(layout_mismatch(&hello.layout, &ours)).into());
        }
        if !self.cfg.memory_zeroed {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            // SAFETY: no stream is accepted yet and the guest does not run:
            // nothing else touches the memory.
            let fixed =
                unsafe { crate::memory::ensure_zeroed(self.memory, ours.page_size(), threads) };
            if fixed > 0 {
                tracing::info!(pages = fixed, "zeroed destination pages that were not zero");
            }
        }
        let streams = usize::from(hello.streams);
        let session = accepted.agreed.session.clone();
        self.rxs = self
            .transport
            .accept_streams(streams, &session, self.memory)?;
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
