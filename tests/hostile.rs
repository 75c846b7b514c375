//! A malicious sender against a real `hpmig dest`: a valid handshake, then
//! hostile records. The destination must refuse, exit non-zero, and keep its
//! peak memory within guest memory plus the allowance the README documents
//! (the largest State record, 16 MiB, plus 1 MiB per stream and 24 MiB for
//! the process itself).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use hpmig_core::auth::{nonce, Secret};
use hpmig_core::memory::{Layout, RegionSpec};
use hpmig_core::protocol::Granularity;
use hpmig_core::protocol::{
    encode_record, Header, Hello, Kind, Welcome, HEADER_LEN, MAX_STATE, MIN_VERSION, VERSION,
};
use vm_memory::GuestAddress;

const GUEST: u64 = 64 << 20;
const STREAMS: u16 = 4;
const PS: u64 = 4096;

fn read_record(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h, 0).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    (h, p)
}

#[test]
fn a_hostile_sender_cannot_grow_the_destination_past_guest_memory_and_allowance() {
    if hpmig_core::memory::host_page_size() as u64 != PS {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dest = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args([
            "dest",
            "--listen",
            &addr,
            "--max-memory",
            "64M",
            "--io-timeout",
            "3s",
            // One migration, then exit: the test reads its whole output.
            "--once",
        ])
        .env_remove("HPMIG_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut control = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            TcpStream::connect(&addr).ok()
        })
        .expect("the destination listens");

    // A valid handshake, without a token.
    let secret = Secret::none();
    let ns = nonce();
    let layout = Layout::new(
        PS as usize,
        vec![RegionSpec {
            base: GuestAddress(0),
            size: GUEST,
        }],
    )
    .unwrap();
    let hello = Hello {
        version: VERSION,
        min_version: MIN_VERSION,
        granularity: Granularity::Page,
        streams: STREAMS,
        features: hpmig_core::protocol::FEATURE_ZSTD,
        layout: layout.clone(),
        nonce: ns,
        auth: secret.hello(&ns),
        guest: hpmig_core::protocol::GuestInfo {
            vcpus: 1,
            requirements: Vec::new(),
        },
        verify: hpmig_core::verify::VerifyMode::Strict,
    };
    control.write_all(&hello.encode()).unwrap();
    let (h, p) = read_record(&mut control);
    assert_eq!(h.kind, Kind::Welcome);
    let w = Welcome::decode(&p).unwrap();
    control
        .write_all(&encode_record(
            Kind::Proof,
            0,
            0,
            &secret.proof(&ns, &w.nonce),
        ))
        .unwrap();
    let session = secret.session(ns, w.nonce);
    let mut streams: Vec<TcpStream> = (0..STREAMS)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            // The TCP transport's stream hello: magic, index, reserved, tag.
            let mut hello = b"HPMIGSTR".to_vec();
            hello.extend_from_slice(&i.to_le_bytes());
            hello.extend_from_slice(&[0, 0]);
            hello.extend_from_slice(&session.stream_tag(i));
            s.write_all(&hello).unwrap();
            s
        })
        .collect();
    let (h, _) = read_record(&mut control);
    assert_eq!(h.kind, Kind::Ready);

    // Hostile: every page of the guest written (the guest's own memory is
    // allowed), then the largest State record the protocol admits, then
    // compressed pages that are garbage.
    let words = layout.bitmap_words();
    for (i, s) in streams.iter_mut().enumerate() {
        let share = hpmig_core::memory::Share::of(words, i, STREAMS as usize);
        let mut batch = Vec::new();
        let first = share.first_page().0;
        for page in first..first + share.pages() as u64 {
            batch.extend_from_slice(&Header::page(page * PS, PS as u32).encode());
            batch.extend(std::iter::repeat_n(0xA5u8, PS as usize));
        }
        let _ = s.write_all(&batch);
    }
    let _ = control.write_all(&Header::new(Kind::State, 0, MAX_STATE, 1).encode());
    let _ = control.write_all(&vec![0x5Au8; MAX_STATE as usize]);
    for s in &mut streams {
        let junk = [
            &Header::new(Kind::PageZstd, 0, PS as u32, 0).encode()[..],
            &[0xEEu8; PS as usize],
        ]
        .concat();
        let _ = s.write_all(&junk);
    }
    let out = dest.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the destination must fail: {text}");
    assert!(text.contains("migration FAILED during"), "{text}");
    let peak = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("peak memory: "))
        .and_then(|l| l.split(' ').next().zip(l.split(' ').nth(1)))
        .map(|(n, unit)| {
            let n: f64 = n.parse().unwrap();
            n * match unit {
                "KiB" => 1024.0,
                "MiB" => 1048576.0,
                "GiB" => 1073741824.0,
                _ => 1.0,
            }
        })
        .expect("peak memory line");
    let allowance = (MAX_STATE as u64 + u64::from(STREAMS) * (1 << 20) + (24 << 20)) as f64;
    eprintln!(
        "destination peak {:.1} MiB for a {} MiB guest ({:.2}x guest memory; limit {:.1} MiB)",
        peak / 1048576.0,
        GUEST >> 20,
        peak / GUEST as f64,
        (GUEST as f64 + allowance) / 1048576.0
    );
    assert!(
        peak <= GUEST as f64 + allowance,
        "peak {peak} bytes: {text}"
    );
}
