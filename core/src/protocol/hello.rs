//! The handshake's records: the source's [`Hello`] and the destination's
//! [`Welcome`] (the Proof is a bare digest, see [`crate::auth`]). What each
//! side does with them is [`crate::handshake`].

use vm_memory::GuestAddress;

use super::{
    Granularity, Header, Kind, ProtocolError, Reader, HEADER_LEN, KNOWN_FEATURES, MAGIC,
    MAX_STREAMS, MIN_VERSION, VERSION,
};
use crate::memory::{Layout, RegionSpec, MAX_REGIONS};
use crate::verify::VerifyMode;

/// Bytes of the fixed part of a Hello, before the regions.
pub const HELLO_FIXED: usize = 8 + 2 + 2 + 1 + 1 + 2 + 4 + 4 + 4 + 16 + 32;
/// Bytes of a Welcome.
pub const WELCOME_LEN: u32 = 2 + 2 + 4 + 16 + 32;

/// The source's opening offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub min_version: u16,
    pub granularity: Granularity,
    pub streams: u16,
    pub features: u32,
    pub layout: Layout,
    /// The source's nonce and proof of the shared secret (zero when the
    /// transport has no authentication).
    pub nonce: [u8; 16],
    pub auth: [u8; 32],
    /// From version 2: what the guest needs of a host, so a destination
    /// that cannot host it refuses before round 0.
    pub guest: GuestInfo,
    /// From version 2: what the switch-over will prove (version 1: a full
    /// digest, or none).
    pub verify: VerifyMode,
}

/// What a guest needs of the host that is to run it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInfo {
    pub vcpus: u32,
    /// The VMM's own description (CPU features, state sizes, ...), at most
    /// [`MAX_REQUIREMENTS`] bytes; the destination's `DestGuest::admit`
    /// reads it.
    pub requirements: Vec<u8>,
}

/// Largest guest requirements blob in a Hello.
pub const MAX_REQUIREMENTS: usize = 1024;

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let regions = self.layout.regions();
        let req = &self.guest.requirements[..self.guest.requirements.len().min(MAX_REQUIREMENTS)];
        let extension = if self.version >= 2 {
            4 + 2 + req.len() + 1
        } else {
            0
        };
        let len = HELLO_FIXED + regions.len() * 16 + extension;
        let mut b = Vec::with_capacity(HEADER_LEN + len);
        b.extend_from_slice(&Header::new(Kind::Hello, 0, len as u32, 0).encode());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.min_version.to_le_bytes());
        b.push(self.granularity as u8);
        b.push(0);
        b.extend_from_slice(&self.streams.to_le_bytes());
        b.extend_from_slice(&(self.layout.page_size() as u32).to_le_bytes());
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.auth);
        for r in regions {
            b.extend_from_slice(&r.base.0.to_le_bytes());
            b.extend_from_slice(&r.size.to_le_bytes());
        }
        if self.version >= 2 {
            b.extend_from_slice(&self.guest.vcpus.to_le_bytes());
            b.extend_from_slice(&(req.len() as u16).to_le_bytes());
            b.extend_from_slice(req);
            b.push(self.verify as u8);
        }
        b
    }

    /// Decodes a Hello payload. Checks the magic, the version range, the
    /// granularity, the stream count, the feature bits and the layout's own
    /// consistency; comparing the layout with ours is the destination's job.
    pub fn decode(p: &[u8]) -> Result<Hello, ProtocolError> {
        let mut r = Reader::new(p);
        if r.bytes::<8>()? != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        let version = r.u16()?;
        let min_version = r.u16()?;
        if min_version > VERSION || version < MIN_VERSION || min_version > version {
            return Err(ProtocolError::Version {
                peer_min: min_version,
                peer_max: version,
            });
        }
        let g = r.u8()?;
        let granularity = Granularity::from_u8(g).ok_or(ProtocolError::Granularity(g))?;
        if r.u8()? != 0 {
            return Err(ProtocolError::Reserved(Kind::Hello));
        }
        let streams = r.u16()?;
        if streams == 0 || streams > MAX_STREAMS {
            return Err(ProtocolError::Streams(streams));
        }
        let page_size = r.u32()?;
        let features = r.u32()?;
        if features & !KNOWN_FEATURES != 0 {
            return Err(ProtocolError::Features(features & !KNOWN_FEATURES));
        }
        let count = r.u32()? as usize;
        let nonce = r.bytes::<16>()?;
        let auth = r.bytes::<32>()?;
        if count > MAX_REGIONS {
            return Err(ProtocolError::Oversized {
                kind: Kind::Hello,
                len: count as u32,
                max: MAX_REGIONS as u32,
            });
        }
        let mut regions = Vec::with_capacity(count);
        for _ in 0..count {
            regions.push(RegionSpec {
                base: GuestAddress(r.u64()?),
                size: r.u64()?,
            });
        }
        let layout =
            Layout::new(page_size as usize, regions).map_err(|e| ProtocolError::Layout {
                source_layout: e.to_string(),
                dest_layout: "-".into(),
            })?;
        let (guest, verify) = if version >= 2 {
            let vcpus = r.u32()?;
            let n = usize::from(r.u16()?);
            if n > MAX_REQUIREMENTS {
                return Err(ProtocolError::Oversized {
                    kind: Kind::Hello,
                    len: n as u32,
                    max: MAX_REQUIREMENTS as u32,
                });
            }
            let guest = GuestInfo {
                vcpus,
                requirements: r.slice(n)?.to_vec(),
            };
            let v = r.u8()?;
            let verify = VerifyMode::from_u8(v).ok_or(ProtocolError::Reserved(Kind::Hello))?;
            (guest, verify)
        } else {
            (GuestInfo::default(), VerifyMode::Strict)
        };
        if !r.is_empty() {
            return Err(ProtocolError::Reserved(Kind::Hello));
        }
        Ok(Hello {
            version,
            min_version,
            granularity,
            streams,
            features,
            layout,
            nonce,
            auth,
            guest,
            verify,
        })
    }

    /// The version to speak with a peer that offered this Hello.
    pub fn agreed_version(&self) -> u16 {
        self.version.min(VERSION)
    }
}

/// The destination's acceptance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub features: u32,
    pub nonce: [u8; 16],
    pub auth: [u8; 32],
}

impl Welcome {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + WELCOME_LEN as usize);
        b.extend_from_slice(&Header::new(Kind::Welcome, 0, WELCOME_LEN, 0).encode());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.auth);
        b
    }

    pub fn decode(p: &[u8]) -> Result<Welcome, ProtocolError> {
        let mut r = Reader::new(p);
        let version = r.u16()?;
        if r.u16()? != 0 {
            return Err(ProtocolError::Reserved(Kind::Welcome));
        }
        let features = r.u32()?;
        Ok(Welcome {
            version,
            features,
            nonce: r.bytes()?,
            auth: r.bytes()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Records, RoundEnd, FEATURE_ZSTD};

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            min_version: MIN_VERSION,
            granularity: Granularity::Segment,
            streams: 4,
            features: FEATURE_ZSTD,
            layout: Layout::new(
                4096,
                vec![
                    RegionSpec {
                        base: GuestAddress(0),
                        size: 1 << 20,
                    },
                    RegionSpec {
                        base: GuestAddress(1 << 32),
                        size: 1 << 16,
                    },
                ],
            )
            .unwrap(),
            nonce: [7; 16],
            auth: [9; 32],
            guest: GuestInfo {
                vcpus: 2,
                requirements: b"needs".to_vec(),
            },
            verify: VerifyMode::Incremental,
        }
    }

    fn one_record(bytes: &[u8]) -> Result<(Header, &[u8]), ProtocolError> {
        let mut it = Records::new(bytes, 4096);
        let r = it.next().expect("a record");
        assert!(it.next().is_none());
        r
    }

    #[test]
    fn hello_round_trips() {
        let h = hello();
        let bytes = h.encode();
        let (head, payload) = one_record(&bytes).unwrap();
        assert_eq!(head.kind, Kind::Hello);
        assert_eq!(Hello::decode(payload).unwrap(), h);
    }

    #[test]
    fn welcome_and_round_end_round_trip() {
        let w = Welcome {
            version: 1,
            features: 0,
            nonce: [1; 16],
            auth: [2; 32],
        };
        let bytes = w.encode();
        let (_, p) = one_record(&bytes).unwrap();
        assert_eq!(Welcome::decode(p).unwrap(), w);
        let e = RoundEnd {
            round: 7,
            last: true,
            records: 12345,
            checksum: 0xdead_beef,
        };
        let bytes = e.encode();
        let (h, p) = one_record(&bytes).unwrap();
        assert_eq!(RoundEnd::decode(&h, p).unwrap(), e);
    }

    #[test]
    fn hello_refusals_are_distinct() {
        let good = hello().encode();
        let payload = &good[HEADER_LEN..];
        let mut bad = payload.to_vec();
        bad[0] ^= 1;
        assert_eq!(Hello::decode(&bad), Err(ProtocolError::BadMagic));
        let mut bad = payload.to_vec();
        bad[8..10].copy_from_slice(&9u16.to_le_bytes());
        bad[10..12].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(
            Hello::decode(&bad),
            Err(ProtocolError::Version {
                peer_min: 9,
                peer_max: 9
            })
        );
        let mut bad = payload.to_vec();
        bad[12] = 77;
        assert_eq!(Hello::decode(&bad), Err(ProtocolError::Granularity(77)));
        let mut bad = payload.to_vec();
        bad[14..16].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(Hello::decode(&bad), Err(ProtocolError::Streams(0)));
        let mut bad = payload.to_vec();
        bad[20..24].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(Hello::decode(&bad), Err(ProtocolError::Features(0x80)));
        assert!(matches!(
            Hello::decode(&payload[..payload.len() - 1]),
            Err(ProtocolError::Truncated { .. })
        ));
    }
}
