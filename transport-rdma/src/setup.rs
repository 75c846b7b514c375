//! Connection setup: what the two ends of one stream tell each other over
//! that stream's TCP connection (authenticated by its stream hello, see
//! `hpmig_transport_tcp`) before their queue pairs connect.
//!
//! Why a TCP side connection rather than rdma_cm: the migration already has
//! a TCP control connection and an authenticated per-stream handshake; the
//! same path carries the queue-pair numbers, GIDs, rkeys and the guest
//! memory table, works identically on InfiniBand and RoCE, and needs no
//! IP-over-the-RDMA-port routing nor librdmacm at run time.
//!
//! ```text
//! source -> dest  StreamOffer  magic "HPMIGRQ1", endpoint, active MTU,
//!                              slots, slot size
//! dest -> source  StreamAnswer magic "HPMIGRA1", endpoint, path MTU,
//!                              staging address, rkey, slots, slot size,
//!                              n, n x (gpa, length, address, rkey)
//! ```
//! Integers are little-endian; the guest memory table has at most
//! [`MAX_REGIONS`] entries and every length is checked before use.

use hpmig_core::transport::TransportError;
use hpmig_transport_tcp::Conn;
use std::io::IoSlice;

use crate::verbs::{Endpoint, Mtu};

const OFFER_MAGIC: [u8; 8] = *b"HPMIGRQ1";
const ANSWER_MAGIC: [u8; 8] = *b"HPMIGRA1";
const ENDPOINT_LEN: usize = 4 + 4 + 2 + 2 + 16;
const OFFER_LEN: usize = 8 + ENDPOINT_LEN + 4 + 4 + 4;
const ANSWER_FIXED: usize = 8 + ENDPOINT_LEN + 4 + 8 + 4 + 4 + 4 + 4;
const REGION_LEN: usize = 8 + 8 + 8 + 4 + 4;
/// Most guest memory regions a destination announces.
pub const MAX_REGIONS: usize = 1024;

/// The source's half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub endpoint: Endpoint,
    /// The source port's active MTU (sent as the verbs enum number).
    pub mtu: Mtu,
    pub slots: u32,
    pub slot_size: u32,
}

/// One guest memory region, registered for remote writes at the destination.
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
    pub regions: Vec<RemoteRegion>,
}

fn put_endpoint(b: &mut Vec<u8>, e: &Endpoint) {
    b.extend_from_slice(&e.qpn.to_le_bytes());
    b.extend_from_slice(&e.psn.to_le_bytes());
    b.extend_from_slice(&e.lid.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&e.gid);
}

struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        // Callers read fixed layouts whose total they checked first.
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn endpoint(&mut self) -> Endpoint {
        let qpn = self.u32();
        let psn = self.u32();
        let lid = self.u16();
        let _ = self.u16();
        Endpoint {
            qpn,
            psn,
            lid,
            gid: self.take(),
        }
    }
}

fn bad(what: String) -> TransportError {
    TransportError::Other(format!("RDMA stream setup: {what}"))
}

/// The MTU the verbs enum number `raw` names.
fn mtu(raw: u32) -> Result<Mtu, TransportError> {
    Mtu::from_raw(raw).ok_or_else(|| bad(format!("MTU {raw} is no verbs MTU")))
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

    pub fn decode(b: &[u8; OFFER_LEN]) -> Result<Offer, TransportError> {
        if b[..8] != OFFER_MAGIC {
            return Err(bad(
                "the source did not offer an RDMA stream (is it using TCP?)".into(),
            ));
        }
        let mut r = Rd(&b[8..]);
        Ok(Offer {
            endpoint: r.endpoint(),
            mtu: mtu(r.u32())?,
            slots: r.u32(),
            slot_size: r.u32(),
        })
    }

    pub fn send(&self, conn: &mut Conn) -> Result<(), TransportError> {
        conn.write_all(&mut [IoSlice::new(&self.encode())])
    }

    pub fn recv(conn: &mut Conn) -> Result<Offer, TransportError> {
        let mut b = [0u8; OFFER_LEN];
        conn.read_exact(&mut b)?;
        Offer::decode(&b)
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

    pub fn send(&self, conn: &mut Conn) -> Result<(), TransportError> {
        conn.write_all(&mut [IoSlice::new(&self.encode())])
    }

    pub fn recv(conn: &mut Conn) -> Result<Answer, TransportError> {
        let mut b = [0u8; ANSWER_FIXED];
        conn.read_exact(&mut b)?;
        if b[..8] != ANSWER_MAGIC {
            return Err(bad(
                "the destination did not answer with an RDMA stream (is it listening for TCP?)"
                    .into(),
            ));
        }
        let mut r = Rd(&b[8..]);
        let endpoint = r.endpoint();
        let mtu = mtu(r.u32())?;
        let staging_addr = r.u64();
        let staging_rkey = r.u32();
        let slots = r.u32();
        let slot_size = r.u32();
        let n = r.u32() as usize;
        if n == 0 || n > MAX_REGIONS {
            return Err(bad(format!(
                "the destination announced {n} memory regions (1 to {MAX_REGIONS} allowed)"
            )));
        }
        let mut table = vec![0u8; n * REGION_LEN];
        conn.read_exact(&mut table)?;
        let regions = table
            .chunks_exact(REGION_LEN)
            .map(|c| {
                let mut r = Rd(c);
                RemoteRegion {
                    gpa: r.u64(),
                    len: r.u64(),
                    addr: r.u64(),
                    rkey: r.u32(),
                }
            })
            .collect();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_round_trips_and_a_foreign_magic_is_refused() {
        let o = Offer {
            endpoint: Endpoint {
                qpn: 17,
                psn: 0x12345,
                lid: 3,
                gid: [7; 16],
            },
            mtu: Mtu::Mtu4096,
            slots: 8,
            slot_size: 256 << 10,
        };
        let b: [u8; OFFER_LEN] = o.encode().try_into().unwrap();
        assert_eq!(Offer::decode(&b).unwrap(), o);
        let mut tcp = b;
        tcp[..8].copy_from_slice(b"HPMIGSTR");
        assert!(Offer::decode(&tcp).is_err());
    }
}
