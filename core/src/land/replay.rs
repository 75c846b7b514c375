//! Replaying a captured data stream: [`land_stream`] drives one
//! [`StreamLander`] from a byte buffer, with every check of a real
//! migration (the fuzz target `apply` and tests use it).

use super::lander::{GuestPages, StreamLander};
use super::ApplyError;
use crate::memory::{DestMemory, Layout};
use crate::protocol::{Header, ProtocolError, HEADER_LEN};
use crate::transport::{StreamRx, TransportError};

/// A data stream read from a byte buffer: one stream's records as they
/// would arrive. Drives [`land_stream`] (fuzzing, replaying captures).
#[derive(Debug)]
pub struct SliceRx<'b> {
    bytes: &'b [u8],
}

impl<'b> SliceRx<'b> {
    pub fn new(bytes: &'b [u8]) -> Self {
        SliceRx { bytes }
    }
}

impl StreamRx for SliceRx<'_> {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        let (h, rest) = self
            .bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(TransportError::Disconnected)?;
        self.bytes = rest;
        Ok(Header::decode(h, page_size)?)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let src = self
            .bytes
            .get(..dst.len())
            .ok_or(ProtocolError::Truncated {
                needed: dst.len(),
                had: self.bytes.len(),
            })?;
        dst.copy_from_slice(src);
        self.bytes = &self.bytes[dst.len()..];
        Ok(())
    }
}

/// Lands `bytes` as the records of stream `stream` of `streams` into
/// `memory`, until they run out or a record is refused; returns the rounds
/// it closed. Every check of a real migration applies.
pub fn land_stream(
    memory: &DestMemory,
    stream: usize,
    streams: usize,
    zstd: bool,
    bytes: &[u8],
) -> Result<u32, ApplyError> {
    let layout = Layout::of(memory)?;
    let pages = GuestPages::new(memory);
    let mut lander = StreamLander::new(stream, streams.max(1), &layout, &pages, zstd);
    let mut rx = SliceRx::new(bytes);
    let mut rounds = 0;
    while !rx.bytes.is_empty() {
        if lander.step(&mut rx)?.is_some() {
            rounds += 1;
        }
    }
    Ok(rounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::land::ApplyError;
    use crate::memory::RegionSpec;
    use crate::protocol::{Kind, RoundEnd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const PS: u64 = 4096;

    struct Fixture {
        memory: DestMemory,
    }

    fn fixture() -> Fixture {
        let ps = crate::memory::host_page_size() as u64;
        assert_eq!(ps, PS, "these tests assume 4 KiB host pages");
        let layout = Layout::new(
            PS as usize,
            vec![
                RegionSpec {
                    base: GuestAddress(0),
                    size: 128 * PS,
                },
                RegionSpec {
                    base: GuestAddress(1 << 30),
                    size: 64 * PS,
                },
            ],
        )
        .unwrap();
        Fixture {
            memory: layout.allocate().unwrap(),
        }
    }

    fn segment(gpa: u64, payload: &[u8]) -> Vec<u8> {
        [
            &Header::segment(gpa, payload.len() as u32).encode()[..],
            payload,
        ]
        .concat()
    }

    fn round_end(round: u32, records: u64, checksum: u32) -> Vec<u8> {
        RoundEnd {
            round,
            last: false,
            records,
            checksum,
        }
        .encode()
        .to_vec()
    }

    fn crc(records: &[&[u8]]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for r in records {
            h.update(r);
        }
        h.finalize()
    }

    /// Runs `bytes` through stream `stream` of 2; returns the first error.
    fn land(f: &Fixture, stream: usize, bytes: &[u8]) -> Result<(), ApplyError> {
        land_stream(&f.memory, stream, 2, false, bytes).map(|_| ())
    }

    fn untouched(f: &Fixture) -> bool {
        let mut buf = vec![0u8; (128 * PS) as usize];
        f.memory.read_slice(&mut buf, GuestAddress(0)).unwrap();
        buf.iter().all(|&b| b == 0)
    }

    #[test]
    fn a_valid_round_lands() {
        let f = fixture();
        let s = segment(3 * PS + 10, b"hello");
        let bytes = [s.clone(), round_end(0, 1, crc(&[&s]))].concat();
        land(&f, 0, &bytes).unwrap();
        let mut got = [0u8; 5];
        f.memory
            .read_slice(&mut got, GuestAddress(3 * PS + 10))
            .unwrap();
        assert_eq!(&got, b"hello");
    }

    fn words(gpa: u64, mask: &[u8; 64], words: &[u64]) -> Vec<u8> {
        let payload: Vec<u8> = mask
            .iter()
            .copied()
            .chain(words.iter().flat_map(|w| w.to_le_bytes()))
            .collect();
        crate::protocol::encode_record(Kind::Words, 0, gpa, &payload)
    }

    #[test]
    fn a_words_record_writes_its_words_and_only_them() {
        let f = fixture();
        f.memory
            .write_slice(&[7u8; PS as usize], GuestAddress(3 * PS))
            .unwrap();
        // Words 0, 9 and 511 of page 3.
        let mut mask = [0u8; 64];
        mask[0] = 1;
        mask[1] = 2;
        mask[63] = 0x80;
        let w = words(3 * PS, &mask, &[1, 2, 3]);
        let bytes = [w.clone(), round_end(0, 1, crc(&[&w]))].concat();
        land(&f, 0, &bytes).unwrap();
        let mut page = vec![0u8; PS as usize];
        f.memory
            .read_slice(&mut page, GuestAddress(3 * PS))
            .unwrap();
        let mut want = vec![7u8; PS as usize];
        want[..8].copy_from_slice(&1u64.to_le_bytes());
        want[72..80].copy_from_slice(&2u64.to_le_bytes());
        want[4088..].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(page, want);
    }

    #[test]
    fn a_words_record_whose_mask_and_words_disagree_writes_nothing() {
        let f = fixture();
        let mut mask = [0u8; 64];
        mask[5] = 0b11;
        // Two bits, one word; and two bits, three words.
        for w in [words(3 * PS, &mask, &[1]), words(3 * PS, &mask, &[1, 2, 3])] {
            let e = land(&f, 0, &w).unwrap_err();
            assert!(matches!(e, ApplyError::Corrupt(_)), "{e}");
        }
        // Unaligned, and for a page of the other stream.
        let e = land(&f, 0, &words(3 * PS + 8, &mask, &[1, 2])).unwrap_err();
        assert!(matches!(e, ApplyError::Unaligned { .. }), "{e}");
        let e = land(&f, 1, &words(PS, &mask, &[1, 2])).unwrap_err();
        assert!(matches!(e, ApplyError::NotOwned { stream: 1, .. }), "{e}");
        assert!(untouched(&f));
    }

    #[test]
    fn out_of_range_and_unowned_records_write_nothing() {
        let f = fixture();
        // In the hole between the regions.
        let e = land(&f, 0, &segment(200 * PS, b"x")).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfRange(_)), "{e}");
        // Crossing a page end.
        let e = land(&f, 0, &segment(2 * PS - 2, b"abcd")).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfRange(_)), "{e}");
        // Page 1 belongs to stream 0 of 2, not stream 1.
        let e = land(&f, 1, &segment(PS, b"x")).unwrap_err();
        assert!(matches!(e, ApplyError::NotOwned { stream: 1, .. }), "{e}");
        // A whole page at an unaligned address.
        let page = [
            &Header::page(PS + 1, PS as u32).encode()[..],
            &vec![1u8; PS as usize],
        ]
        .concat();
        let e = land(&f, 0, &page).unwrap_err();
        assert!(matches!(e, ApplyError::Unaligned { .. }), "{e}");
        assert!(untouched(&f));
    }

    #[test]
    fn round_end_checks_are_distinct() {
        let f = fixture();
        let s = segment(5 * PS, b"abc");
        let e = land(
            &f,
            0,
            &[s.clone(), round_end(0, 1, crc(&[&s]) ^ 1)].concat(),
        )
        .unwrap_err();
        assert!(matches!(e, ApplyError::Checksum { round: 0, .. }), "{e}");
        let e = land(&f, 0, &[s.clone(), round_end(0, 2, crc(&[&s]))].concat()).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Count {
                    expected: 2,
                    got: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = land(&f, 0, &round_end(1, 0, crc(&[]))).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::RoundOrder {
                    expected: 0,
                    got: 1
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn control_records_and_unnegotiated_zstd_are_refused_on_data_streams() {
        let f = fixture();
        let hello = Header::new(Kind::Ack, 0, 32, 0).encode();
        let e = land(&f, 0, &[&hello[..], &[0u8; 32]].concat()).unwrap_err();
        assert!(matches!(e, ApplyError::Unexpected(Kind::Ack)), "{e}");
        let z = [
            &Header::new(Kind::PageZstd, 0, 4, 0).encode()[..],
            &[1u8; 4],
        ]
        .concat();
        assert!(matches!(
            land(&f, 0, &z).unwrap_err(),
            ApplyError::NotNegotiated
        ));
        let mut unknown = Header::zero(0).encode();
        unknown[0] = 99;
        let e = land(&f, 0, &unknown).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Transport(TransportError::Protocol(ProtocolError::UnknownKind(99)))
            ),
            "{e}"
        );
        let big = Header::segment(0, PS as u32 + 1).encode();
        let e = land(&f, 0, &big).unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Transport(TransportError::Protocol(ProtocolError::Oversized { .. }))
            ),
            "{e}"
        );
        assert!(untouched(&f));
    }

    /// Which of region 0's 128 pages are backed by memory now.
    fn resident(f: &Fixture) -> Vec<bool> {
        let base = f.memory.get_host_address(GuestAddress(0)).unwrap();
        let mut vec = vec![0u8; 128];
        // SAFETY: region 0 is one mapping of 128 pages from `base`, and
        // `vec` holds one byte per page.
        let rc = unsafe { libc::mincore(base.cast(), (128 * PS) as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    fn page(n: u64) -> Vec<u8> {
        [
            &Header::page(n * PS, PS as u32).encode()[..],
            &vec![n as u8 | 1; PS as usize],
        ]
        .concat()
    }

    #[test]
    fn dense_data_populates_the_next_pages_at_once_and_sparse_data_does_not() {
        // 65 pages in a row, all data: past one bitmap word (64 pages) of
        // first writes, the word the 65th lands in is backed in one call.
        let f = fixture();
        let bytes: Vec<u8> = (0..65).flat_map(page).collect();
        land_stream(&f.memory, 0, 1, false, &bytes).unwrap();
        let r = resident(&f);
        assert!(r[..65].iter().all(|&b| b), "the pages written");
        assert!(
            r[65..].iter().all(|&b| b),
            "the rest of the second word: {r:?}"
        );
        let mut got = vec![0u8; PS as usize];
        f.memory
            .read_slice(&mut got, GuestAddress(64 * PS))
            .unwrap();
        assert!(
            got.iter().all(|&b| b == 64 | 1),
            "the populated word's data landed"
        );

        // Data with a zero page in every 16: never a word of first writes in
        // a row, so only the pages written are backed.
        let f = fixture();
        let bytes: Vec<u8> = (0..128)
            .flat_map(|n| {
                if n % 16 == 15 {
                    Header::zero(n * PS).encode().to_vec()
                } else {
                    page(n)
                }
            })
            .collect();
        land_stream(&f.memory, 0, 1, false, &bytes).unwrap();
        let r = resident(&f);
        for (n, &b) in r.iter().enumerate() {
            assert_eq!(b, n % 16 != 15, "page {n}");
        }
    }
}
