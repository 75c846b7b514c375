//! The switch-over's records from protocol version 2 on: the destination's
//! [`Ack`], the source's [`Decision`] and the destination's [`Outcome`],
//! each naming its session and carrying a MAC under the session's key (see
//! [`crate::auth::Session::record_mac`]), so a flipped bit or a stranger's
//! record is refused rather than acted on. What the two ends do with them
//! is in `precopy::switchover` and `land::switchover`.
//!
//! ```text
//!  Ack      digest 32 | MAC 32                          MAC over round, flags, digest
//!  Decision session 16 | verdict 1 | 0 0 0 | round u32 | MAC 32
//!  Outcome  session 16 | verdict 1 | outcome 1 | 0 0 | round u32 | started_at u64 | MAC 32
//! ```
//!
//! `started_at` is when the destination's vCPUs started, in nanoseconds
//! since the Unix epoch on its clock (0 when they did not). An Outcome of
//! [`OutcomeKind::Unknown`] comes from a destination that has no record of
//! the session: it cannot hold the session's key, so its MAC is zero and
//! proves nothing, and the only thing a source may do on it is wait.

use super::{encode_record, Kind, ProtocolError, Reader, DIGEST_LEN, HEADER_LEN};
use crate::auth::{Secret, Session, SessionId};

/// Bytes of a version 2 Ack payload.
pub const ACK_LEN: usize = DIGEST_LEN + 32;
/// Bytes of a Decision payload.
pub const DECISION_LEN: usize = 16 + 1 + 3 + 4 + 32;
/// Bytes of an Outcome payload.
pub const OUTCOME_LEN: usize = 16 + 1 + 1 + 2 + 4 + 8 + 32;

/// What the source decided about the copy the destination acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// The guest is the destination's: run it.
    Commit = 1,
    /// The source keeps (or resumed) its guest: discard the copy.
    Abort = 2,
}

/// What the destination did on a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OutcomeKind {
    /// Its vCPUs started (at `started_at`).
    Started = 1,
    /// The copy was discarded (an Abort, or an operator's discard).
    Discarded = 2,
    /// The destination restarted after its Ack and before any start: the
    /// copy is gone and never ran.
    Lost = 3,
    /// The destination has no record of the session.
    Unknown = 4,
}

impl Verdict {
    fn from_u8(v: u8) -> Result<Verdict, ProtocolError> {
        match v {
            1 => Ok(Verdict::Commit),
            2 => Ok(Verdict::Abort),
            _ => Err(ProtocolError::Reserved(Kind::Decision)),
        }
    }
}

impl OutcomeKind {
    fn from_u8(v: u8) -> Result<OutcomeKind, ProtocolError> {
        match v {
            1 => Ok(OutcomeKind::Started),
            2 => Ok(OutcomeKind::Discarded),
            3 => Ok(OutcomeKind::Lost),
            4 => Ok(OutcomeKind::Unknown),
            _ => Err(ProtocolError::Reserved(Kind::Outcome)),
        }
    }
}

/// The destination's acknowledgement of a verified (or unverified) copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub round: u32,
    pub verified: bool,
    pub digest: [u8; DIGEST_LEN],
}

impl Ack {
    fn mac_body(&self) -> [u8; 4 + 1 + DIGEST_LEN] {
        let mut b = [0u8; 4 + 1 + DIGEST_LEN];
        b[..4].copy_from_slice(&self.round.to_le_bytes());
        b[4] = u8::from(self.verified);
        b[5..].copy_from_slice(&self.digest);
        b
    }

    /// The record, version 2 (with its MAC under `session`).
    pub fn encode(&self, session: &Session) -> Vec<u8> {
        let mut p = Vec::with_capacity(ACK_LEN);
        p.extend_from_slice(&self.digest);
        p.extend_from_slice(&session.record_mac(b"ack", &self.mac_body()));
        let flags = if self.verified {
            super::FLAG_VERIFIED
        } else {
            0
        };
        encode_record(Kind::Ack, flags, self.round.into(), &p)
    }

    /// Decodes a version 2 Ack and checks its MAC.
    pub fn decode(arg: u64, flags: u8, p: &[u8], session: &Session) -> Result<Ack, ProtocolError> {
        let mut r = Reader::new(p);
        let digest = r.bytes::<DIGEST_LEN>()?;
        let mac = r.bytes::<32>()?;
        let ack = Ack {
            round: u32::try_from(arg).map_err(|_| ProtocolError::Reserved(Kind::Ack))?,
            verified: flags & super::FLAG_VERIFIED != 0,
            digest,
        };
        if !Secret::verify(session.record_mac(b"ack", &ack.mac_body()), &mac) {
            return Err(ProtocolError::BadMac(Kind::Ack));
        }
        Ok(ack)
    }
}

/// The source's decision about the acknowledged copy of round `round`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub session: SessionId,
    pub verdict: Verdict,
    pub round: u32,
}

impl Decision {
    fn body(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..16].copy_from_slice(&self.session.0);
        b[16] = self.verdict as u8;
        b[20..24].copy_from_slice(&self.round.to_le_bytes());
        b
    }

    pub fn encode(&self, session: &Session) -> Vec<u8> {
        let body = self.body();
        let mut p = Vec::with_capacity(DECISION_LEN);
        p.extend_from_slice(&body);
        p.extend_from_slice(&session.record_mac(b"decision", &body));
        encode_record(Kind::Decision, 0, 0, &p)
    }

    /// The session a Decision names, before its MAC can be checked (the
    /// receiver looks the session's key up by it).
    pub fn session_of(p: &[u8]) -> Result<SessionId, ProtocolError> {
        Ok(SessionId(Reader::new(p).bytes::<16>()?))
    }

    /// Decodes a Decision and checks its MAC under `session`.
    pub fn decode(p: &[u8], session: &Session) -> Result<Decision, ProtocolError> {
        let mut r = Reader::new(p);
        let id = SessionId(r.bytes::<16>()?);
        let verdict = Verdict::from_u8(r.u8()?)?;
        if r.bytes::<3>()? != [0; 3] {
            return Err(ProtocolError::Reserved(Kind::Decision));
        }
        let round = r.u32()?;
        let mac = r.bytes::<32>()?;
        let d = Decision {
            session: id,
            verdict,
            round,
        };
        if id != session.id() || !Secret::verify(session.record_mac(b"decision", &d.body()), &mac) {
            return Err(ProtocolError::BadMac(Kind::Decision));
        }
        Ok(d)
    }
}

/// The destination's answer to a decision, sent after acting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub session: SessionId,
    pub verdict: Verdict,
    pub outcome: OutcomeKind,
    pub round: u32,
    /// When the vCPUs started, ns since the Unix epoch (0 if they did not).
    pub started_at: u64,
}

impl Outcome {
    fn body(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.session.0);
        b[16] = self.verdict as u8;
        b[17] = self.outcome as u8;
        b[20..24].copy_from_slice(&self.round.to_le_bytes());
        b[24..32].copy_from_slice(&self.started_at.to_le_bytes());
        b
    }

    /// The record, its MAC under `session` (none for `Unknown`).
    pub fn encode(&self, session: Option<&Session>) -> Vec<u8> {
        let body = self.body();
        let mut p = Vec::with_capacity(OUTCOME_LEN);
        p.extend_from_slice(&body);
        p.extend_from_slice(&session.map_or([0; 32], |s| s.record_mac(b"outcome", &body)));
        encode_record(Kind::Outcome, 0, 0, &p)
    }

    /// Decodes an Outcome; every kind but `Unknown` must carry a valid MAC
    /// under `session` and name it.
    pub fn decode(p: &[u8], session: &Session) -> Result<Outcome, ProtocolError> {
        let mut r = Reader::new(p);
        let id = SessionId(r.bytes::<16>()?);
        let verdict = Verdict::from_u8(r.u8()?)?;
        let outcome = OutcomeKind::from_u8(r.u8()?)?;
        if r.bytes::<2>()? != [0; 2] {
            return Err(ProtocolError::Reserved(Kind::Outcome));
        }
        let round = r.u32()?;
        let started_at = r.u64()?;
        let mac = r.bytes::<32>()?;
        let o = Outcome {
            session: id,
            verdict,
            outcome,
            round,
            started_at,
        };
        if id != session.id() {
            return Err(ProtocolError::BadMac(Kind::Outcome));
        }
        if outcome != OutcomeKind::Unknown
            && !Secret::verify(session.record_mac(b"outcome", &o.body()), &mac)
        {
            return Err(ProtocolError::BadMac(Kind::Outcome));
        }
        Ok(o)
    }
}

/// Bytes of an Alive record on the wire.
pub const ALIVE_LEN: usize = HEADER_LEN;

/// A keepalive: "still here, still working" on a quiet control connection.
pub fn alive() -> [u8; HEADER_LEN] {
    super::Header::new(Kind::Alive, 0, 0, 0).encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Records;

    fn session(token: &[u8]) -> Session {
        Secret::from_token(token).session([1; 16], [2; 16])
    }

    fn payload(bytes: &[u8]) -> (super::super::Header, Vec<u8>) {
        let (h, p) = Records::new(bytes, 4096).next().unwrap().unwrap();
        (h, p.to_vec())
    }

    #[test]
    fn records_round_trip_and_refuse_a_flip_anywhere_or_another_session() {
        let s = session(b"t");
        let d = Decision {
            session: s.id(),
            verdict: Verdict::Commit,
            round: 7,
        };
        let o = Outcome {
            session: s.id(),
            verdict: Verdict::Commit,
            outcome: OutcomeKind::Started,
            round: 7,
            started_at: 123,
        };
        let a = Ack {
            round: 7,
            verified: true,
            digest: [9; 32],
        };
        let (_, dp) = payload(&d.encode(&s));
        assert_eq!(Decision::decode(&dp, &s), Ok(d));
        let (_, op) = payload(&o.encode(Some(&s)));
        assert_eq!(Outcome::decode(&op, &s), Ok(o));
        let (ah, ap) = payload(&a.encode(&s));
        assert_eq!(Ack::decode(ah.arg, ah.flags, &ap, &s), Ok(a));
        for i in 0..dp.len() * 8 {
            let mut bad = dp.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Decision::decode(&bad, &s).is_err(), "decision bit {i}");
        }
        for i in 0..op.len() * 8 {
            let mut bad = op.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Outcome::decode(&bad, &s).is_err(), "outcome bit {i}");
        }
        for i in 0..ap.len() * 8 {
            let mut bad = ap.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                Ack::decode(ah.arg, ah.flags, &bad, &s).is_err(),
                "ack bit {i}"
            );
        }
        assert!(
            Ack::decode(ah.arg ^ 1, ah.flags, &ap, &s).is_err(),
            "ack round"
        );
        assert!(
            Ack::decode(ah.arg, 0, &ap, &s).is_err(),
            "ack verified flag"
        );
        let other = session(b"u");
        assert!(Decision::decode(&dp, &other).is_err());
        assert!(Outcome::decode(&op, &other).is_err());
        assert_eq!(Decision::session_of(&dp), Ok(s.id()));
    }

    #[test]
    fn an_unknown_outcome_needs_no_mac_but_names_the_session() {
        let s = session(b"t");
        let o = Outcome {
            session: s.id(),
            verdict: Verdict::Commit,
            outcome: OutcomeKind::Unknown,
            round: 3,
            started_at: 0,
        };
        let (_, op) = payload(&o.encode(None));
        assert_eq!(Outcome::decode(&op, &s), Ok(o));
        let started = Outcome {
            outcome: OutcomeKind::Started,
            ..o
        };
        let (_, sp) = payload(&started.encode(None));
        assert!(
            Outcome::decode(&sp, &s).is_err(),
            "a Started outcome without the session's MAC is refused"
        );
    }
}
