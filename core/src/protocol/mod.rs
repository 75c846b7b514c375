//! Wire protocol: every byte that crosses between source and destination.
//!
//! ```text
//!  source                                              destination
//!    | control: Hello {magic, version, page size,            |
//!    |   granularity, features, streams, layout, auth}  ---> | check all, allocate nothing before
//!    | <--- Welcome {version, features, auth} or Error       |
//!    | control: Proof {auth}                             ---> | check, then allocate guest memory
//!    | (data connections open)                               | accept every stream
//!    | <--- Ready                                            | memory ready to land in
//!    |                                                       |
//!    | stream s (one per worker, each owns fixed pages):     |
//!    |   round r: Segment | Words | Zero | Page | PageZstd ---> | bounds-check, write in place
//!    |            RoundEnd {r, records, checksum}       ---> | verify count + checksum
//!    |   ... rounds 0..n-1 while the guest runs              |
//!    | control: Drain {r = n-1}                         ---> | wait until every stream landed
//!    | <--- Drained {r}                                      | (and hashed) round r
//!    | source pauses its guest only now                      |
//!    |   round n, its RoundEnd FINAL                    ---> |
//!    | control: State {vCPU state}                      ---> |
//!    | control: Complete {final round, source digest}   ---> | wait for every stream's FINAL,
//!    | <--- Ack {destination digest, verified}  or Error     | digest guest memory, compare,
//!    |                                                       | restore the vCPU state (not run)
//!    | control: Commit                                  ---> | only now may it run the guest
//!    | source keeps its guest paused (moved)                 |
//! ```
//!
//! Drain (version 3): before it pauses its guest, the source asks the
//! destination to finish landing the last pre-copy round, so the pause
//! does not also pay for that round's landing and hashing. The wait is
//! bounded like every other (each control record within the I/O deadline;
//! the destination says Alive while its streams still make progress); a
//! failure there fails the migration with the guest still running on the
//! source. A version 1 or 2 peer skips the drain.
//!
//! Words (version 4): one page's changed 8-byte words behind one header,
//! for a page whose changes are too scattered for segments (at 10 % of its
//! bytes changed in 8-byte writes a 4 KiB page makes ~45 segments, 45
//! headers). Its payload is a mask with one bit per word of the page (bit
//! `i % 64` of little-endian u64 `i / 64`, set where word `i` changed),
//! then the changed words in address order: [`words_mask_len`] + 8 bytes
//! per set bit, which the destination checks before it writes a byte.
//!
//! Switch-over: until the source sends Commit it may still resume its guest
//! (a lost Ack makes it do so), so the destination must not run the guest
//! before Commit. The one window no protocol closes: a Commit lost after the
//! source sent it leaves the guest paused on the source and not started on
//! the destination; both ends say so, and neither runs it twice.
//!
//! Every record is a 16-byte header followed by `len` payload bytes:
//!
//! ```text
//!  0      1      2        4        8                16
//!  | kind | flags| 0 (u16)| len u32| arg u64         | payload ...
//! ```
//!
//! Integers are little-endian. `arg` is the guest physical address for data
//! records, the round for `RoundEnd`, `Drain` and `Drained`, the vCPU count for `State`, the final
//! round for `Complete`, the error code for `Error`. [`Header::decode`] caps
//! `len` per kind before anyone allocates or reads a payload, so decoding
//! never panics and never allocates more than [`MAX_STATE`] for any input.
//!
//! Versioning: the source offers its [`VERSION`] and the oldest it can speak
//! ([`MIN_VERSION`]); the destination answers with the highest version both
//! support, or an `Error` naming the versions when there is none. A change to
//! any record's layout bumps the version.
//!
//! Record order: a page's records always travel on the stream that owns the
//! page (its worker's fixed share of bitmap words, see
//! [`crate::memory::Share`]), and a stream is ordered, so round r's
//! bytes for a page can never overtake round r+1's. The destination rejects a
//! record for a page its stream does not own.

mod hello;
mod reader;
pub mod switchover;

use thiserror::Error;

use crate::memory::MAX_REGIONS;

pub use hello::{GuestInfo, Hello, Welcome, HELLO_FIXED, MAX_REQUIREMENTS, WELCOME_LEN};
pub use reader::Reader;

/// Bytes in every record header.
pub const HEADER_LEN: usize = 16;
/// First bytes of a Hello.
pub const MAGIC: [u8; 8] = *b"HPMIG\r\n\x1a";
/// The protocol version this build speaks best. Version 2 adds the
/// authenticated switch-over (MACed Ack, Decision, Outcome) and Alive;
/// version 3 adds the drain before the pause (Drain, Drained); version 4
/// adds the Words record.
pub const VERSION: u16 = 4;
/// The oldest version this build still speaks.
pub const MIN_VERSION: u16 = 1;
/// Largest vCPU state record.
pub const MAX_STATE: u32 = 16 << 20;
/// Largest error message.
pub const MAX_ERROR_MESSAGE: u32 = 4096;
/// Most data streams a migration may use.
pub const MAX_STREAMS: u16 = 256;
/// Largest Hello.
pub const MAX_HELLO: u32 = (HELLO_FIXED + MAX_REGIONS * 16 + 7 + MAX_REQUIREMENTS) as u32;
/// Bytes of a RoundEnd payload.
pub const ROUND_END_LEN: usize = 16;
/// Bytes of a digest.
pub const DIGEST_LEN: usize = 32;
/// Bytes of the unit a Words record carries.
pub const WORD_LEN: usize = 8;

/// Bytes of a Words record's mask for pages of `page_size` bytes: one bit
/// per 8-byte word.
pub const fn words_mask_len(page_size: u32) -> u32 {
    page_size / (WORD_LEN as u32 * 8)
}

/// Feature bit: wide pages may travel zstd-compressed.
pub const FEATURE_ZSTD: u32 = 1;
/// Features this build understands.
pub const KNOWN_FEATURES: u32 = FEATURE_ZSTD;

/// RoundEnd flag: this is the stream's last round.
pub const FLAG_FINAL: u8 = 1;
/// Ack flag: the destination's digest equals the source's.
pub const FLAG_VERIFIED: u8 = 1;
/// Complete flag: the source sent a digest to verify.
pub const FLAG_HAS_DIGEST: u8 = 1;
/// Complete flag: the digest is of the page-hash ledger (incremental), not
/// of all memory.
pub const FLAG_INCREMENTAL: u8 = 2;

/// What a dirty page is sent as (negotiated in the Hello).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Granularity {
    /// Classic pre-copy: every dirty page goes whole.
    Page = 1,
    /// The paper: only the dirty offset segments inside each page.
    Segment = 2,
}

impl Granularity {
    pub fn from_u8(v: u8) -> Option<Granularity> {
        match v {
            1 => Some(Granularity::Page),
            2 => Some(Granularity::Segment),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Page => "page",
            Granularity::Segment => "segment",
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "page" => Ok(Granularity::Page),
            "segment" => Ok(Granularity::Segment),
            other => Err(format!(
                "unknown granularity '{other}' (expected page or segment)"
            )),
        }
    }
}

/// Errors of decoding and checking what came from the peer. Each names what
/// was wrong, so a refusal says why.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// the input ended inside a record
    #[error("truncated record: needed {needed} bytes, had {had}")]
    Truncated { needed: usize, had: usize },
    /// the kind byte names no record
    #[error("unknown record type {0}")]
    UnknownKind(u8),
    /// reserved header bits were not zero
    #[error("reserved header bits set in a {0:?} record")]
    Reserved(Kind),
    /// a length above what its kind allows
    #[error("{kind:?} record of {len} bytes, limit {max}")]
    Oversized { kind: Kind, len: u32, max: u32 },
    /// a length below what its kind needs
    #[error("{kind:?} record of {len} bytes, needs {min}")]
    Undersized { kind: Kind, len: u32, min: u32 },
    /// not an hpmig peer
    #[error("bad magic: not an hpmig peer")]
    BadMagic,
    /// no protocol version in common
    #[error("protocol version mismatch: peer speaks {peer_min}..={peer_max}, we speak {MIN_VERSION}..={VERSION}")]
    Version { peer_min: u16, peer_max: u16 },
    /// the peer's guest memory layout differs from ours
    #[error("memory layout mismatch: source has {source_layout}, destination has {dest_layout}")]
    Layout {
        source_layout: String,
        dest_layout: String,
    },
    /// the peer named an unknown granularity
    #[error("unknown granularity {0}")]
    Granularity(u8),
    /// the peer asked for features we do not have
    #[error("unknown feature bits {0:#x}")]
    Features(u32),
    /// the stream count is zero or too large
    #[error("stream count {0} is not in 1..={MAX_STREAMS}")]
    Streams(u16),
    /// a record arrived where the exchange does not allow it
    #[error("unexpected {got:?} record, expected {expected}")]
    Unexpected { got: Kind, expected: &'static str },
    /// the peer's error message is not text
    #[error("error message is not UTF-8")]
    NotUtf8,
    /// a switch-over record's MAC or session does not check out
    #[error("{0:?} record with a bad MAC or for another session")]
    BadMac(Kind),
}

/// Record kinds. 0 is never valid, so zeroed memory is never a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    Welcome = 2,
    Segment = 3,
    Zero = 4,
    Page = 5,
    PageZstd = 6,
    RoundEnd = 7,
    State = 8,
    Complete = 9,
    Ack = 10,
    Error = 11,
    Proof = 12,
    Ready = 13,
    /// Version 1's decision: run the guest.
    Commit = 14,
    Alive = 15,
    Decision = 16,
    Outcome = 17,
    /// Version 3, source → destination: say when every stream landed the
    /// round in `arg` (its records applied and hashed).
    Drain = 18,
    /// Version 3, destination → source: every stream landed the round in
    /// `arg`.
    Drained = 19,
    /// Version 4: the changed 8-byte words of the page at `arg` (a mask,
    /// then the words).
    Words = 20,
}

impl Kind {
    fn from_u8(v: u8) -> Result<Kind, ProtocolError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Segment,
            4 => Kind::Zero,
            5 => Kind::Page,
            6 => Kind::PageZstd,
            7 => Kind::RoundEnd,
            8 => Kind::State,
            9 => Kind::Complete,
            10 => Kind::Ack,
            11 => Kind::Error,
            12 => Kind::Proof,
            13 => Kind::Ready,
            14 => Kind::Commit,
            15 => Kind::Alive,
            16 => Kind::Decision,
            17 => Kind::Outcome,
            18 => Kind::Drain,
            19 => Kind::Drained,
            20 => Kind::Words,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }

    /// Records that carry guest memory on a data stream.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Kind::Segment | Kind::Words | Kind::Zero | Kind::Page | Kind::PageZstd
        )
    }

    /// Payload length bounds `(min, max)` for this kind.
    fn len_bounds(self, page_size: u32) -> (u32, u32) {
        match self {
            Kind::Invalid => (0, 0),
            Kind::Hello => (HELLO_FIXED as u32, MAX_HELLO),
            Kind::Welcome => (WELCOME_LEN, WELCOME_LEN),
            Kind::Segment => (1, page_size),
            // The mask and at least one word, at most every word (saturated:
            // before the handshake the page size may be anything).
            Kind::Words => (
                words_mask_len(page_size).saturating_add(WORD_LEN as u32),
                words_mask_len(page_size).saturating_add(page_size),
            ),
            Kind::Zero | Kind::Ready | Kind::Commit | Kind::Alive | Kind::Drain | Kind::Drained => {
                (0, 0)
            }
            Kind::Page => (page_size, page_size),
            Kind::PageZstd => (1, page_size),
            Kind::RoundEnd => (ROUND_END_LEN as u32, ROUND_END_LEN as u32),
            Kind::State => (0, MAX_STATE),
            Kind::Complete | Kind::Proof => (DIGEST_LEN as u32, DIGEST_LEN as u32),
            // Version 1: the digest; version 2: digest and MAC.
            Kind::Ack => (DIGEST_LEN as u32, switchover::ACK_LEN as u32),
            Kind::Decision => (
                switchover::DECISION_LEN as u32,
                switchover::DECISION_LEN as u32,
            ),
            Kind::Outcome => (
                switchover::OUTCOME_LEN as u32,
                switchover::OUTCOME_LEN as u32,
            ),
            Kind::Error => (0, MAX_ERROR_MESSAGE),
        }
    }
}

/// A decoded, length-checked record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub len: u32,
    pub arg: u64,
}

impl Header {
    pub fn new(kind: Kind, flags: u8, len: u32, arg: u64) -> Self {
        Header {
            kind,
            flags,
            len,
            arg,
        }
    }

    /// A segment of `len` bytes at guest address `gpa`.
    pub fn segment(gpa: u64, len: u32) -> Self {
        Header::new(Kind::Segment, 0, len, gpa)
    }

    /// A page that is all zero at `gpa`.
    pub fn zero(gpa: u64) -> Self {
        Header::new(Kind::Zero, 0, 0, gpa)
    }

    /// A whole page at `gpa`.
    pub fn page(gpa: u64, page_size: u32) -> Self {
        Header::new(Kind::Page, 0, page_size, gpa)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decodes and caps a header. `page_size` bounds the data records; use
    /// the negotiated one (any value before the handshake: data records are
    /// refused there anyway).
    pub fn decode(b: &[u8; HEADER_LEN], page_size: u32) -> Result<Header, ProtocolError> {
        let kind = Kind::from_u8(b[0])?;
        if b[2] != 0 || b[3] != 0 {
            return Err(ProtocolError::Reserved(kind));
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let arg = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        // Flags only where a kind defines them, arg only where it means something.
        let flags_allowed = match kind {
            Kind::RoundEnd => FLAG_FINAL,
            Kind::Complete => FLAG_HAS_DIGEST | FLAG_INCREMENTAL,
            Kind::Ack => FLAG_VERIFIED,
            _ => 0,
        };
        let arg_unused = matches!(
            kind,
            Kind::Hello
                | Kind::Welcome
                | Kind::Proof
                | Kind::Ready
                | Kind::Commit
                | Kind::Alive
                | Kind::Decision
                | Kind::Outcome
        );
        if b[1] & !flags_allowed != 0 || (arg_unused && arg != 0) {
            return Err(ProtocolError::Reserved(kind));
        }
        let (min, max) = kind.len_bounds(page_size);
        if len > max {
            return Err(ProtocolError::Oversized { kind, len, max });
        }
        if len < min {
            return Err(ProtocolError::Undersized { kind, len, min });
        }
        Ok(Header {
            kind,
            flags: b[1],
            len,
            arg,
        })
    }
}

/// Iterates the records of a byte buffer (a batch from one stream).
#[derive(Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    page_size: u32,
}

impl<'a> Records<'a> {
    pub fn new(buf: &'a [u8], page_size: u32) -> Self {
        Records { buf, page_size }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(Header, &'a [u8]), ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let Some((head, rest)) = self.buf.split_first_chunk::<HEADER_LEN>() else {
            let had = self.buf.len();
            self.buf = &[];
            return Some(Err(ProtocolError::Truncated {
                needed: HEADER_LEN,
                had,
            }));
        };
        let header = match Header::decode(head, self.page_size) {
            Ok(h) => h,
            Err(e) => {
                self.buf = &[];
                return Some(Err(e));
            }
        };
        let len = header.len as usize;
        if rest.len() < len {
            let had = rest.len();
            self.buf = &[];
            return Some(Err(ProtocolError::Truncated { needed: len, had }));
        }
        let (payload, rest) = rest.split_at(len);
        self.buf = rest;
        Some(Ok((header, payload)))
    }
}

/// A stream's round-end record: how many data records it sent this round and
/// the CRC-32 of all their bytes (headers and payloads, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub last: bool,
    pub records: u64,
    pub checksum: u32,
}

impl RoundEnd {
    pub fn encode(&self) -> [u8; HEADER_LEN + ROUND_END_LEN] {
        let mut b = [0u8; HEADER_LEN + ROUND_END_LEN];
        let flags = if self.last { FLAG_FINAL } else { 0 };
        b[..HEADER_LEN].copy_from_slice(
            &Header::new(
                Kind::RoundEnd,
                flags,
                ROUND_END_LEN as u32,
                self.round.into(),
            )
            .encode(),
        );
        b[16..24].copy_from_slice(&self.records.to_le_bytes());
        b[24..28].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    pub fn decode(h: &Header, p: &[u8]) -> Result<RoundEnd, ProtocolError> {
        let mut r = Reader::new(p);
        let round = u32::try_from(h.arg).map_err(|_| ProtocolError::Oversized {
            kind: Kind::RoundEnd,
            len: u32::MAX,
            max: u32::MAX - 1,
        })?;
        let (records, checksum) = (r.u64()?, r.u32()?);
        if r.u32()? != 0 {
            return Err(ProtocolError::Reserved(Kind::RoundEnd));
        }
        Ok(RoundEnd {
            round,
            last: h.flags & FLAG_FINAL != 0,
            records,
            checksum,
        })
    }
}

/// The digest a migration verifies: guest memory's digest, and the vCPU
/// state record, hashed together, so a corrupted state fails as surely as a
/// corrupted page.
pub fn switch_over_digest(memory: &[u8; DIGEST_LEN], state: &[u8]) -> [u8; DIGEST_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(b"hpmig switch-over digest v1");
    h.update(memory);
    h.update(&(state.len() as u64).to_le_bytes());
    h.update(state);
    *h.finalize().as_bytes()
}

/// The source's Drain: "say when every stream landed round `round`".
pub fn drain(round: u32) -> [u8; HEADER_LEN] {
    Header::new(Kind::Drain, 0, 0, round.into()).encode()
}

/// The destination's Drained: "every stream landed round `round`".
pub fn drained(round: u32) -> [u8; HEADER_LEN] {
    Header::new(Kind::Drained, 0, 0, round.into()).encode()
}

/// Encodes a control record with an arbitrary payload.
pub fn encode_record(kind: Kind, flags: u8, arg: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(&Header::new(kind, flags, payload.len() as u32, arg).encode());
    b.extend_from_slice(payload);
    b
}

/// Error codes carried in `Error` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ErrorCode {
    Refused = 1,
    Protocol = 2,
    Apply = 3,
    DigestMismatch = 4,
    Aborted = 5,
}

/// An `Error` record with a message capped at [`MAX_ERROR_MESSAGE`] bytes.
pub fn encode_error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE as usize);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    encode_record(Kind::Error, 0, code as u64, &message.as_bytes()[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_record(bytes: &[u8]) -> Result<(Header, &[u8]), ProtocolError> {
        let mut it = Records::new(bytes, 4096);
        let r = it.next().expect("a record");
        assert!(it.next().is_none());
        r
    }

    #[test]
    fn decoder_rejects_truncated_oversized_and_unknown() {
        let seg = [&Header::segment(4096, 8).encode()[..], &[1u8; 8]].concat();
        assert!(one_record(&seg).is_ok());
        assert_eq!(
            one_record(&seg[..10]),
            Err(ProtocolError::Truncated {
                needed: 16,
                had: 10
            })
        );
        assert_eq!(
            one_record(&seg[..20]),
            Err(ProtocolError::Truncated { needed: 8, had: 4 })
        );
        let big = Header::segment(0, 4097).encode();
        assert_eq!(
            one_record(&big),
            Err(ProtocolError::Oversized {
                kind: Kind::Segment,
                len: 4097,
                max: 4096
            })
        );
        let mut unknown = Header::zero(0).encode();
        unknown[0] = 200;
        assert_eq!(one_record(&unknown), Err(ProtocolError::UnknownKind(200)));
        let mut reserved = Header::zero(0).encode();
        reserved[3] = 1;
        assert_eq!(
            one_record(&reserved),
            Err(ProtocolError::Reserved(Kind::Zero))
        );
        let state = Header::new(Kind::State, 0, MAX_STATE + 1, 1).encode();
        assert!(matches!(
            one_record(&state),
            Err(ProtocolError::Oversized {
                kind: Kind::State,
                ..
            })
        ));
        let short_page = Header::new(Kind::Page, 0, 100, 0).encode();
        assert!(matches!(
            one_record(&short_page),
            Err(ProtocolError::Undersized {
                kind: Kind::Page,
                ..
            })
        ));
    }

    #[test]
    fn drain_and_drained_round_trip() {
        for (bytes, kind) in [(drain(7), Kind::Drain), (drained(7), Kind::Drained)] {
            let (h, p) = one_record(&bytes).unwrap();
            assert_eq!((h.kind, h.flags, h.len, h.arg), (kind, 0, 0, 7));
            assert!(p.is_empty());
            assert_eq!(bytes[0], kind as u8);
            // No payload and no flags: either is refused.
            let long = Header::new(kind, 0, 1, 7).encode();
            assert_eq!(
                one_record(&[&long[..], &[0]].concat()),
                Err(ProtocolError::Oversized {
                    kind,
                    len: 1,
                    max: 0
                })
            );
            let mut flagged = bytes;
            flagged[1] = 1;
            assert_eq!(one_record(&flagged), Err(ProtocolError::Reserved(kind)));
        }
        assert_eq!(Kind::Drain as u8, 18);
        assert_eq!(Kind::Drained as u8, 19);
        // The kind after the newest is still unknown.
        let mut next = drained(0);
        next[0] = 21;
        assert_eq!(one_record(&next), Err(ProtocolError::UnknownKind(21)));
    }

    #[test]
    fn words_records_hold_a_mask_and_at_least_one_word() {
        assert_eq!(Kind::Words as u8, 20);
        assert!(Kind::Words.is_data());
        assert_eq!(words_mask_len(4096), 64);
        let mask = 64usize;
        let ok = Header::new(Kind::Words, 0, (mask + 8) as u32, 4096).encode();
        let rec = [&ok[..], &[0u8; 72][..]].concat();
        assert!(one_record(&rec).is_ok());
        let full = Header::new(Kind::Words, 0, (mask + 4096) as u32, 0).encode();
        let rec = [&full[..], &vec![0u8; mask + 4096][..]].concat();
        assert!(one_record(&rec).is_ok());
        let short = Header::new(Kind::Words, 0, mask as u32, 0).encode();
        assert_eq!(
            one_record(&[&short[..], &[0u8; 64][..]].concat()),
            Err(ProtocolError::Undersized {
                kind: Kind::Words,
                len: 64,
                min: 72
            })
        );
        let long = Header::new(Kind::Words, 0, (mask + 4097) as u32, 0).encode();
        assert_eq!(
            one_record(&long),
            Err(ProtocolError::Oversized {
                kind: Kind::Words,
                len: 4161,
                max: 4160
            })
        );
        let mut flagged = ok;
        flagged[1] = 1;
        assert_eq!(
            one_record(&flagged),
            Err(ProtocolError::Reserved(Kind::Words))
        );
        // Any page size decodes without overflow (before the handshake the
        // page size is whatever the caller passes; found by the fuzzer).
        for ps in [0, 1, 63, u32::MAX - 1, u32::MAX] {
            let _ = Header::decode(&Header::new(Kind::Words, 0, u32::MAX, 0).encode(), ps);
        }
    }

    #[test]
    fn error_messages_are_capped_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let bytes = encode_error(ErrorCode::Refused, &long);
        let (h, p) = one_record(&bytes).unwrap();
        assert!(h.len <= MAX_ERROR_MESSAGE);
        assert!(std::str::from_utf8(p).is_ok());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for (h, p) in Records::new(&bytes, 4096).map_while(Result::ok) {
                prop_assert_eq!(p.len(), h.len as usize);
                let _ = Hello::decode(p);
                let _ = Welcome::decode(p);
                let _ = RoundEnd::decode(&h, p);
            }
        }
    }
}
