//! The fuzzers' seed corpus (fuzz/corpus, written by fuzz/seeds.py) must be
//! what it claims: valid handshakes and batches a real peer sends. This keeps
//! the seeds from drifting away from the protocol.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use hpmig_core::land::land_stream;
use hpmig_core::memory::{DestMemory, Layout, RegionSpec};
use hpmig_core::protocol::{Hello, Kind, Records, Welcome};
use vm_memory::{Bytes, GuestAddress};

fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn handshake_seeds_decode() {
    let h = Hello::decode(&seed("handshake", "hello")).unwrap();
    assert_eq!((h.streams, h.layout.regions().len()), (2, 2));
    assert_eq!(
        Hello::decode(&seed("handshake", "hello4")).unwrap().streams,
        4
    );
    Welcome::decode(&seed("handshake", "welcome")).unwrap();
    // The state-record seed is the emulated guest's: hpmig-microvm checks it.
}

#[test]
fn record_seeds_decode_whole() {
    let kinds: Vec<Kind> = Records::new(&seed("records", "rounds"), 4096)
        .map(|r| r.unwrap().0.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            Kind::Segment,
            Kind::Zero,
            Kind::Page,
            Kind::RoundEnd,
            Kind::Segment,
            Kind::Segment,
            Kind::RoundEnd
        ]
    );
    for name in ["hello", "welcome", "proof", "error"] {
        assert_eq!(
            Records::new(&seed("records", name), 4096).count(),
            1,
            "{name}"
        );
    }
}

/// The memory the apply seeds are written for: two regions of 64 pages.
fn seed_memory() -> DestMemory {
    let layout = Layout::new(
        4096,
        vec![
            RegionSpec {
                base: GuestAddress(0),
                size: 64 * 4096,
            },
            RegionSpec {
                base: GuestAddress(1 << 20),
                size: 64 * 4096,
            },
        ],
    )
    .unwrap();
    layout.allocate().unwrap()
}

#[test]
fn apply_seed_lands_two_rounds() {
    if hpmig_core::memory::host_page_size() != 4096 {
        return; // the seeds are written for 4 KiB pages
    }
    let memory = seed_memory();
    let bytes = seed("apply", "rounds");
    assert_eq!(
        land_stream(&memory, 0, 2, bytes[0] & 1 != 0, &bytes[1..]).unwrap(),
        2
    );
    let mut got = [0u8; 5];
    memory
        .read_slice(&mut got, GuestAddress(3 * 4096 + 10))
        .unwrap();
    assert_eq!(&got, b"hello");
}

#[test]
fn apply_seed_lands_a_words_record() {
    if hpmig_core::memory::host_page_size() != 4096 {
        return; // the seeds are written for 4 KiB pages
    }
    let memory = seed_memory();
    let bytes = seed("apply", "words");
    assert_eq!(land_stream(&memory, 0, 2, false, &bytes[1..]).unwrap(), 1);
    // Words 0 and 9 of page 3.
    let mut got = [0u8; 8];
    memory.read_slice(&mut got, GuestAddress(3 * 4096)).unwrap();
    assert_eq!(&got, b"hello\0\0\0");
    memory
        .read_slice(&mut got, GuestAddress(3 * 4096 + 72))
        .unwrap();
    assert_eq!(&got, b"word!\n\0\0");
}
