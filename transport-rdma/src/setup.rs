//! Connection setup: what the two ends of one stream tell each other over
//! that stream's TCP connection (authenticated by its stream hello, see
//! `hpmig_transport_tcp`) before their queue pairs connect.
//!
//! Why a TCP side connection rather than rdma_cm: the migration already has
//! a TCP control connection and an authenticated per-stream handshake; the
//! same path carries the queue-pair numbers, GIDs, rkeys and the stream's
//! memory table, works identically on InfiniBand and RoCE, and needs no
//! IP-over-the-RDMA-port routing nor librdmacm at run time.
//!
//! ```text
//! source -> dest  StreamOffer  magic "HPMIGRQ2", endpoint, active MTU,
//!                              slots, slot size
//! dest -> source  StreamAnswer magic "HPMIGRA2", endpoint, path MTU,
//!                              staging address, rkey, slots granted,
//!                              slot size, n, n x (gpa, length, address, rkey)
//! ```
//! The Answer's table holds only the guest ranges this stream owns (its
//! share of bitmap words, `hpmig_core::memory::Share`: one contiguous range
//! per region the share touches, none for a stream whose share is empty),
//! each registered at the destination in the stream's own protection
//! domain under its own key; the staging key is the stream's too. The
//! source writes a payload through the key of the range that holds it
//! (`find_region`), and the destination's NIC refuses, with a remote access
//! error, any write through a stream's queue pair outside its ranges and
//! staging.
//!
//! Integers are little-endian, read with hpmig-core's [`Reader`], so a short
//! message is refused, never zero-filled. The table has at most
//! [`MAX_REGIONS`] entries (a share touches no more regions than a guest
//! memory layout may have), and every length and address range is checked
//! before use: an
//! Offer by [`Offer::grant`] at the destination (the shape of the staging
//! asked for, then [`STAGING_CAP`]: the destination may grant fewer slots
//! than asked), an Answer by [`Answer::decode`] and [`Answer::check`] at the
//! source.
//!
//! Versions: the last byte of both magics is the version of this exchange
//! ([`SETUP_VERSION`]); it is internal to the transport, so both ends must
//! speak the same one, and a message of another version is refused with
//! [`SetupError::Version`] before anything is set up. Version 2 scoped each
//! stream's keys to its own pages and added the staging cap; version 1 sent
//! every stream one table of whole regions under keys all streams shared.

use std::io::IoSlice;

use hpmig_core::memory::MAX_REGIONS;
use hpmig_core::protocol::{ProtocolError, Reader};
use hpmig_core::transport::TransportError;
use hpmig_transport_tcp::Conn;
use thiserror::Error;

use crate::imm::MAX_SLOT;
use crate::verbs::{Endpoint, Mtu};

/// The version of this exchange: the last byte of both magics.
pub const SETUP_VERSION: u8 = b'2';
const OFFER_MAGIC: [u8; 8] = *b"HPMIGRQ2";
const ANSWER_MAGIC: [u8; 8] = *b"HPMIGRA2";
const ENDPOINT_LEN: usize = 4 + 4 + 2 + 2 + 16;
const OFFER_LEN: usize = 8 + ENDPOINT_LEN + 4 + 4 + 4;
const ANSWER_FIXED: usize = 8 + ENDPOINT_LEN + 4 + 8 + 4 + 4 + 4 + 4;
const REGION_LEN: usize = 8 + 8 + 8 + 4 + 4;
/// Most staging slots a source may ask a destination for.
pub const MAX_SLOTS: u32 = 64;
/// Largest staging area one stream may ask a destination for.
pub const MAX_STAGING: usize = 16 << 20;
/// Most staging memory a destination registers (pins) for all the streams
/// of one migration together: **64 MiB**, on top of guest memory.
///
/// Each of `n` streams gets at most `STAGING_CAP / n` bytes (and never more
/// than [`MAX_STAGING`]): as many of the slots it asks for as fit in that
/// share ([`Offer::grant`]); a stream whose single slot does not fit is
/// refused with [`SetupError::StagingCap`]. With the source's default ring
/// (8 slots of 256 KiB) up to 32 streams get every slot they ask for, and
/// 256 streams one slot each.
pub const STAGING_CAP: usize = 64 << 20;

/// Errors of the setup exchange: an Offer or Answer that is short,
/// malformed, or asks for what the other end will not do.
#[derive(Debug, Error)]
pub enum SetupError {
    /// the source sent something other than an RDMA stream offer
    #[error("RDMA stream setup: the source did not offer an RDMA stream (is it using TCP?)")]
    ForeignOffer,
    /// the destination answered with something other than an RDMA stream answer
    #[error("RDMA stream setup: the destination did not answer with an RDMA stream (is it listening for TCP?)")]
    ForeignAnswer,
    /// the peer speaks another version of this exchange
    #[error("RDMA stream setup: the {what} is of setup version {got:?}, this end speaks version {:?}: run the same hpmig release at both ends", char::from(SETUP_VERSION))]
    Version { what: &'static str, got: char },
    /// an Offer ended before its last field
    #[error("RDMA stream setup: a short Offer: {0}")]
    ShortOffer(#[source] ProtocolError),
    /// an Answer ended before its last field
    #[error("RDMA stream setup: a short Answer: {0}")]
    ShortAnswer(#[source] ProtocolError),
    /// bytes follow a complete Offer or Answer
    #[error("RDMA stream setup: {extra} bytes after the {what}")]
    Trailing { what: &'static str, extra: usize },
    /// an MTU number that names no verbs MTU
    #[error("RDMA stream setup: the {what} names MTU {raw}, which is no verbs MTU (1 to 5)")]
    Mtu { what: &'static str, raw: u32 },
    /// the stream's memory table is longer than a layout may be
    #[error("RDMA stream setup: the destination announced {n} memory ranges for this stream (at most {MAX_REGIONS} allowed)")]
    RegionCount { n: u32 },
    /// a guest memory region whose guest or remote address range wraps
    #[error("RDMA stream setup: the destination's region {index} (guest {gpa:#x}, {len} bytes at {addr:#x}) wraps around the address space")]
    RegionWraps {
        index: usize,
        gpa: u64,
        len: u64,
        addr: u64,
    },
    /// the staging area's address range wraps
    #[error("RDMA stream setup: the destination's staging area at {addr:#x} ({slots} slots of {slot_size} bytes) wraps around the address space")]
    StagingWraps {
        addr: u64,
        slots: u32,
        slot_size: u32,
    },
    /// the source asked for a staging area this destination does not provide
    #[error("RDMA stream {stream}: the source asked for {slots} staging slots of {slot_size} bytes (at most {MAX_SLOTS}, page-multiple, {MAX_STAGING} bytes in all)")]
    StagingAsked {
        stream: usize,
        slots: u32,
        slot_size: u32,
    },
    /// not one slot of the source's fits in the stream's share of the staging cap
    #[error("RDMA stream {stream}: a staging slot of {slot_size} bytes exceeds this stream's {share}-byte share of the destination's {STAGING_CAP}-byte staging cap ({streams} streams); use fewer streams or smaller ring slots")]
    StagingCap {
        stream: usize,
        streams: usize,
        slot_size: u32,
        share: usize,
    },
    /// the destination's staging area cannot take this source's batches
    #[error("RDMA stream {stream}: the destination offered {slots} staging slots of {slot_size} bytes at MTU {mtu}; this source needs 1 to {asked} slots of at least {needed} bytes")]
    StagingOffered {
        stream: usize,
        slots: u32,
        slot_size: u32,
        mtu: Mtu,
        needed: usize,
        asked: u32,
    },
}

impl From<SetupError> for TransportError {
    fn from(e: SetupError) -> Self {
        TransportError::Device(Box::new(e))
    }
}

/// The source's half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub endpoint: Endpoint,
    /// The source port's active MTU (sent as the verbs enum number).
    pub mtu: Mtu,
    pub slots: u32,
    pub slot_size: u32,
}

/// One guest memory range a stream owns, registered at the destination for
/// that stream's remote writes: guest address, length, remote address and
/// key (which reaches this range and nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub gpa: u64,
    pub len: u64,
    pub addr: u64,
    pub rkey: u32,
}

/// The destination's half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub endpoint: Endpoint,
    /// The path MTU both ends use (the smaller active MTU).
    pub mtu: Mtu,
    pub staging_addr: u64,
    pub staging_rkey: u32,
    pub slots: u32,
    pub slot_size: u32,
    /// The guest ranges this stream owns (possibly none), each with its own
    /// key; each guest range and remote range lies within the address space
    /// (checked by [`Answer::decode`]).
    pub regions: Vec<RemoteRegion>,
}

fn put_endpoint(b: &mut Vec<u8>, e: &Endpoint) {
    b.extend_from_slice(&e.qpn.to_le_bytes());
    b.extend_from_slice(&e.psn.to_le_bytes());
    b.extend_from_slice(&e.lid.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&e.gid);
}

fn read_endpoint(r: &mut Reader<'_>) -> Result<Endpoint, ProtocolError> {
    let qpn = r.u32()?;
    let psn = r.u32()?;
    let lid = r.u16()?;
    let _reserved = r.u16()?;
    Ok(Endpoint {
        qpn,
        psn,
        lid,
        gid: r.bytes()?,
    })
}

/// The MTU the verbs enum number `raw` names.
fn mtu(what: &'static str, raw: u32) -> Result<Mtu, SetupError> {
    Mtu::from_raw(raw).ok_or(SetupError::Mtu { what, raw })
}

/// Checks a message's magic: `Ok` for this version's, [`SetupError::Version`]
/// for another version of this exchange, `foreign` for anything else.
fn magic(
    what: &'static str,
    got: [u8; 8],
    want: [u8; 8],
    foreign: SetupError,
) -> Result<(), SetupError> {
    if got == want {
        Ok(())
    } else if got[..7] == want[..7] {
        Err(SetupError::Version {
            what,
            got: char::from(got[7]),
        })
    } else {
        Err(foreign)
    }
}

/// Refuses bytes after a complete message.
fn ends(what: &'static str, r: &Reader<'_>) -> Result<(), SetupError> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(SetupError::Trailing { what, extra }),
    }
}

impl Offer {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OFFER_LEN);
        b.extend_from_slice(&OFFER_MAGIC);
        put_endpoint(&mut b, &self.endpoint);
        b.extend_from_slice(&self.mtu.raw().to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.slot_size.to_le_bytes());
        b
    }

    /// Decodes a whole Offer: short input, bytes after it or an MTU that
    /// names none are refused.
    pub fn decode(b: &[u8]) -> Result<Offer, SetupError> {
        let short = SetupError::ShortOffer;
        let mut r = Reader::new(b);
        let got = r.bytes::<8>().map_err(short)?;
        magic("Offer", got, OFFER_MAGIC, SetupError::ForeignOffer)?;
        let endpoint = read_endpoint(&mut r).map_err(short)?;
        let mtu = mtu("Offer", r.u32().map_err(short)?)?;
        let slots = r.u32().map_err(short)?;
        let slot_size = r.u32().map_err(short)?;
        ends("Offer", &r)?;
        Ok(Offer {
            endpoint,
            mtu,
            slots,
            slot_size,
        })
    }

    /// Whether a destination with pages of `page` bytes provides the
    /// staging this offer asks for (stream `stream`): 1 to [`MAX_SLOTS`]
    /// slots of a page multiple no larger than an immediate describes,
    /// [`MAX_STAGING`] bytes in all.
    pub fn check(&self, stream: usize, page: usize) -> Result<(), SetupError> {
        let slot_size = self.slot_size as usize;
        let total = (self.slots as usize).checked_mul(slot_size);
        if self.slots == 0
            || self.slots > MAX_SLOTS
            || slot_size == 0
            || page == 0
            || slot_size % page != 0
            || slot_size > MAX_SLOT
            || total.is_none_or(|t| t > MAX_STAGING)
        {
            return Err(SetupError::StagingAsked {
                stream,
                slots: self.slots,
                slot_size: self.slot_size,
            });
        }
        Ok(())
    }

    /// The staging slots a destination with pages of `page` bytes grants
    /// stream `stream` of `streams`: the offer must pass [`Offer::check`],
    /// and gets as many of the slots it asks for as fit in the stream's
    /// share of [`STAGING_CAP`] (at least one, or
    /// [`SetupError::StagingCap`]). The slots of all streams together never
    /// exceed the cap.
    pub fn grant(&self, stream: usize, streams: usize, page: usize) -> Result<u32, SetupError> {
        self.check(stream, page)?;
        let share = (STAGING_CAP / streams.max(1)).min(MAX_STAGING);
        // slot_size > 0: check made sure.
        let fit = share / self.slot_size as usize;
        match u32::try_from(fit).map_or(self.slots, |fit| fit.min(self.slots)) {
            0 => Err(SetupError::StagingCap {
                stream,
                streams,
                slot_size: self.slot_size,
                share,
            }),
            slots => Ok(slots),
        }
    }

    pub fn send(&self, conn: &mut Conn) -> Result<(), TransportError> {
        conn.write_all(&mut [IoSlice::new(&self.encode())])
    }

    pub fn recv(conn: &mut Conn) -> Result<Offer, TransportError> {
        let mut b = [0u8; OFFER_LEN];
        conn.read_exact(&mut b)?;
        Ok(Offer::decode(&b)?)
    }
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ANSWER_FIXED + self.regions.len() * REGION_LEN);
        b.extend_from_slice(&ANSWER_MAGIC);
        put_endpoint(&mut b, &self.endpoint);
        b.extend_from_slice(&self.mtu.raw().to_le_bytes());
        b.extend_from_slice(&self.staging_addr.to_le_bytes());
        b.extend_from_slice(&self.staging_rkey.to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.slot_size.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.gpa.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&r.addr.to_le_bytes());
            b.extend_from_slice(&r.rkey.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        b
    }

    /// The length of the region table that follows the fixed part `fixed`
    /// (which starts with the magic), once its count is allowed.
    fn table_len(fixed: &[u8]) -> Result<usize, SetupError> {
        let short = SetupError::ShortAnswer;
        let mut r = Reader::new(fixed);
        let got = r.bytes::<8>().map_err(short)?;
        magic("Answer", got, ANSWER_MAGIC, SetupError::ForeignAnswer)?;
        r.slice(ANSWER_FIXED - 8 - 4).map_err(short)?;
        let n = r.u32().map_err(short)?;
        if n as usize > MAX_REGIONS {
            return Err(SetupError::RegionCount { n });
        }
        Ok(n as usize * REGION_LEN)
    }

    /// Decodes a whole Answer: short input, bytes after it, an MTU that
    /// names none, a table longer than [`MAX_REGIONS`], and a
    /// staging area or region whose range wraps are refused.
    pub fn decode(b: &[u8]) -> Result<Answer, SetupError> {
        let short = SetupError::ShortAnswer;
        Answer::table_len(b)?;
        let mut r = Reader::new(b);
        r.bytes::<8>().map_err(short)?;
        let endpoint = read_endpoint(&mut r).map_err(short)?;
        let mtu = mtu("Answer", r.u32().map_err(short)?)?;
        let staging_addr = r.u64().map_err(short)?;
        let staging_rkey = r.u32().map_err(short)?;
        let slots = r.u32().map_err(short)?;
        let slot_size = r.u32().map_err(short)?;
        let n = r.u32().map_err(short)? as usize;
        if u64::from(slots)
            .checked_mul(u64::from(slot_size))
            .and_then(|size| staging_addr.checked_add(size))
            .is_none()
        {
            return Err(SetupError::StagingWraps {
                addr: staging_addr,
                slots,
                slot_size,
            });
        }
        let mut regions = Vec::with_capacity(n);
        for index in 0..n {
            let region = RemoteRegion {
                gpa: r.u64().map_err(short)?,
                len: r.u64().map_err(short)?,
                addr: r.u64().map_err(short)?,
                rkey: r.u32().map_err(short)?,
            };
            let _padding = r.u32().map_err(short)?;
            if region.gpa.checked_add(region.len).is_none()
                || region.addr.checked_add(region.len).is_none()
            {
                return Err(SetupError::RegionWraps {
                    index,
                    gpa: region.gpa,
                    len: region.len,
                    addr: region.addr,
                });
            }
            regions.push(region);
        }
        ends("Answer", &r)?;
        Ok(Answer {
            endpoint,
            mtu,
            staging_addr,
            staging_rkey,
            slots,
            slot_size,
            regions,
        })
    }

    /// Whether this answer's staging takes stream `stream`'s batches of up
    /// to `needed` bytes: 1 to `asked` slots (the destination may grant
    /// fewer than asked, never more), each that large.
    pub fn check(&self, stream: usize, needed: usize, asked: u32) -> Result<(), SetupError> {
        if self.slots == 0 || self.slots > asked || (self.slot_size as usize) < needed {
            return Err(SetupError::StagingOffered {
                stream,
                slots: self.slots,
                slot_size: self.slot_size,
                mtu: self.mtu,
                needed,
                asked,
            });
        }
        Ok(())
    }

    pub fn send(&self, conn: &mut Conn) -> Result<(), TransportError> {
        conn.write_all(&mut [IoSlice::new(&self.encode())])
    }

    /// Reads the fixed part, then the region table its count announces
    /// (the count is checked before anything is allocated for it).
    pub fn recv(conn: &mut Conn) -> Result<Answer, TransportError> {
        let mut b = vec![0u8; ANSWER_FIXED];
        conn.read_exact(&mut b)?;
        let table = Answer::table_len(&b)?;
        b.resize(ANSWER_FIXED + table, 0);
        conn.read_exact(&mut b[ANSWER_FIXED..])?;
        Ok(Answer::decode(&b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            qpn: 17,
            psn: 0x12345,
            lid: 3,
            gid: [7; 16],
        }
    }

    fn offer() -> Offer {
        Offer {
            endpoint: endpoint(),
            mtu: Mtu::Mtu4096,
            slots: 8,
            slot_size: 256 << 10,
        }
    }

    fn answer() -> Answer {
        Answer {
            endpoint: endpoint(),
            mtu: Mtu::Mtu1024,
            staging_addr: 0x7f00_0000_0000,
            staging_rkey: 0x55,
            slots: 8,
            slot_size: 256 << 10,
            regions: vec![
                RemoteRegion {
                    gpa: 0,
                    len: 1 << 30,
                    addr: 0x7e00_0000_0000,
                    rkey: 0x66,
                },
                RemoteRegion {
                    gpa: 1 << 32,
                    len: 1 << 20,
                    addr: 0x7d00_0000_0000,
                    rkey: 0x77,
                },
            ],
        }
    }

    #[test]
    fn offer_round_trips_and_a_foreign_magic_is_refused() {
        let o = offer();
        let b = o.encode();
        assert_eq!(b.len(), OFFER_LEN);
        assert_eq!(Offer::decode(&b).unwrap(), o);
        let mut tcp = b.clone();
        tcp[..8].copy_from_slice(b"HPMIGSTR");
        assert!(matches!(Offer::decode(&tcp), Err(SetupError::ForeignOffer)));
    }

    #[test]
    fn another_version_of_the_exchange_is_named_as_such() {
        let mut b = offer().encode();
        b[..8].copy_from_slice(b"HPMIGRQ1");
        let e = Offer::decode(&b).unwrap_err();
        assert!(matches!(e, SetupError::Version { got: '1', .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("version '1', this end speaks version '2'"),
            "{e}"
        );
        let mut b = answer().encode();
        b[..8].copy_from_slice(b"HPMIGRA1");
        assert!(matches!(
            Answer::decode(&b),
            Err(SetupError::Version {
                what: "Answer",
                got: '1'
            })
        ));
        assert!(matches!(
            Answer::table_len(&b[..ANSWER_FIXED]),
            Err(SetupError::Version { .. })
        ));
    }

    #[test]
    fn the_wire_layout_is_unchanged() {
        let b = offer().encode();
        assert_eq!(&b[..8], b"HPMIGRQ2");
        assert_eq!(&b[8..12], &17u32.to_le_bytes());
        assert_eq!(&b[16..18], &3u16.to_le_bytes());
        assert_eq!(&b[36..40], &5u32.to_le_bytes(), "MTU as the verbs number");
        let b = answer().encode();
        assert_eq!(&b[..8], b"HPMIGRA2");
        assert_eq!(b.len(), ANSWER_FIXED + 2 * REGION_LEN);
        assert_eq!(&b[36..40], &3u32.to_le_bytes());
        assert_eq!(&b[ANSWER_FIXED - 4..ANSWER_FIXED], &2u32.to_le_bytes());
    }

    #[test]
    fn answer_round_trips_with_or_without_ranges() {
        let a = answer();
        assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        // A stream whose share is empty owns no guest range.
        let none = Answer {
            regions: Vec::new(),
            ..answer()
        };
        assert_eq!(none.encode().len(), ANSWER_FIXED);
        assert_eq!(Answer::decode(&none.encode()).unwrap(), none);
    }

    #[test]
    fn a_truncated_answer_is_refused_not_zero_filled() {
        let b = answer().encode();
        for cut in 0..b.len() {
            match Answer::decode(&b[..cut]) {
                Err(SetupError::ShortAnswer(ProtocolError::Truncated { .. })) => {}
                other => panic!("{cut} of {} bytes: {other:?}", b.len()),
            }
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Answer::decode(&long),
            Err(SetupError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn a_truncated_offer_is_refused() {
        let b = offer().encode();
        for cut in 0..b.len() {
            assert!(
                matches!(Offer::decode(&b[..cut]), Err(SetupError::ShortOffer(_))),
                "{cut}"
            );
        }
    }

    #[test]
    fn a_region_count_outside_a_layouts_is_refused_before_the_table_is_read() {
        for n in [MAX_REGIONS as u32 + 1, u32::MAX] {
            let mut b = answer().encode();
            b[ANSWER_FIXED - 4..ANSWER_FIXED].copy_from_slice(&n.to_le_bytes());
            assert!(matches!(
                Answer::table_len(&b[..ANSWER_FIXED]),
                Err(SetupError::RegionCount { .. })
            ));
            assert!(Answer::decode(&b).is_err());
        }
    }

    #[test]
    fn unknown_mtus_and_wrapping_ranges_are_refused() {
        let mut b = answer().encode();
        b[36..40].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Answer::decode(&b),
            Err(SetupError::Mtu { raw: 0, .. })
        ));
        let mut a = answer();
        a.regions[1].gpa = u64::MAX - 10;
        assert!(matches!(
            Answer::decode(&a.encode()),
            Err(SetupError::RegionWraps { index: 1, .. })
        ));
        let mut a = answer();
        a.regions[0].addr = u64::MAX - 10;
        assert!(matches!(
            Answer::decode(&a.encode()),
            Err(SetupError::RegionWraps { index: 0, .. })
        ));
        let mut a = answer();
        a.staging_addr = u64::MAX - 4096;
        assert!(matches!(
            Answer::decode(&a.encode()),
            Err(SetupError::StagingWraps { .. })
        ));
    }

    #[test]
    fn staging_asked_and_offered_are_checked() {
        let page = 4096;
        assert!(offer().check(0, page).is_ok());
        for (slots, slot_size) in [
            (0, 4096),
            (MAX_SLOTS + 1, 4096),
            (8, 0),
            (8, 4097),
            (1, (MAX_SLOT as u32 + 1).next_multiple_of(4096)),
            (64, 1 << 19),
        ] {
            let o = Offer {
                slots,
                slot_size,
                ..offer()
            };
            assert!(
                matches!(
                    o.check(3, page),
                    Err(SetupError::StagingAsked { stream: 3, .. })
                ),
                "{slots} x {slot_size}"
            );
        }
        let a = answer();
        assert!(a.check(0, 256 << 10, 8).is_ok());
        assert!(a.check(0, 256 << 10, 64).is_ok(), "fewer slots than asked");
        assert!(a.check(0, 256 << 10, 7).is_err(), "more slots than asked");
        assert!(a.check(0, (256 << 10) + 1, 8).is_err());
        assert!(Answer { slots: 0, ..a }.check(0, 1, 8).is_err());
    }

    #[test]
    fn staging_is_granted_within_each_streams_share_of_the_cap() {
        let page = 4096;
        // 8 x 256 KiB: all of it up to 32 streams, then what fits.
        for (streams, granted) in [(1, 8), (2, 8), (32, 8), (33, 7), (64, 4), (256, 1)] {
            assert_eq!(
                offer().grant(0, streams, page).unwrap(),
                granted,
                "{streams}"
            );
        }
        // A share never exceeds MAX_STAGING, whatever the stream count.
        let big = Offer {
            slots: 64,
            slot_size: 1 << 19,
            ..offer()
        };
        assert!(big.grant(0, 1, page).is_err(), "32 MiB asked is malformed");
        let big = Offer {
            slots: 32,
            slot_size: 1 << 19,
            ..offer()
        };
        assert_eq!(big.grant(0, 1, page).unwrap(), 32);
        assert_eq!(big.grant(0, 8, page).unwrap(), 16);
        // Not one slot fits: refused with the figures.
        let e = big.grant(5, 256, page).unwrap_err();
        assert!(
            matches!(
                e,
                SetupError::StagingCap {
                    stream: 5,
                    streams: 256,
                    share: 262_144,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("67108864-byte staging cap"), "{e}");
        // The sum over every stream stays within the cap.
        for streams in [1usize, 3, 7, 32, 100, 256] {
            let o = Offer {
                slots: 64,
                slot_size: 1 << 18,
                ..offer()
            };
            let total: usize = (0..streams)
                .map(|s| o.grant(s, streams, page).map_or(0, |n| n as usize) << 18)
                .sum();
            assert!(total <= STAGING_CAP, "{streams} streams: {total}");
        }
        // A malformed offer is refused before any grant.
        let bad = Offer {
            slots: 0,
            ..offer()
        };
        assert!(matches!(
            bad.grant(1, 2, page),
            Err(SetupError::StagingAsked { stream: 1, .. })
        ));
    }
}
