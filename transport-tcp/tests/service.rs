//! The destination service against a flood of hostile connections, over
//! real sockets: idle connections held open (more than the pool takes),
//! Hellos cut off after 24 bytes, Hellos trickled a byte at a time,
//! garbage, HTTP requests, a recorded Hello replayed, sources with the
//! wrong token, Decisions for sessions nobody holds and data connections
//! with made-up tags, well over a thousand in all. A real source that
//! comes while the flood is connected (and the pool is full of it) must
//! complete its handshake within a second and land byte for byte, and
//! every hostile peer must be told why it was closed (or, a data
//! connection, be closed).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{dest_config, migrate_to, serve_one, service, tcp};
use hpmig_core::auth::Secret;
use hpmig_core::handshake::{offer, HandshakeError, Offer};
use hpmig_core::memory::{Layout, XorShift64};
use hpmig_core::protocol::switchover::DECISION_LEN;
use hpmig_core::protocol::{Granularity, Header, Kind, Records, HEADER_LEN, VERSION};
use hpmig_core::testing::proxy::Proxy;
use hpmig_core::testing::{assert_same_memory, pattern_memory, Scribbler};
use hpmig_core::transport::SourceTransport;
use hpmig_transport_tcp::TcpSource;

const MIB: usize = 1 << 20;
/// The service's whole-opening deadline in this test.
const HANDSHAKE: Duration = Duration::from_secs(2);
/// Idle connections held open: more than the pool's 64.
const IDLE: usize = 250;
const HALF_HELLOS: usize = 16;
const TRICKLERS: usize = 8;
/// Connections of the kinds that expect an answer at once, at least.
const SHOTS: usize = 800;
const SHOOTERS: usize = 4;

/// What a hostile connection was told.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reply {
    /// An Error record with this message.
    Error(String),
    /// A record of another kind.
    Record(String),
    /// Closed without a record.
    Closed,
    /// Nothing, and still open, at the end of the wait.
    Silent,
}

impl Reply {
    /// The reply, shortened to what the assertions look at.
    fn says(&self, what: &str) -> bool {
        matches!(self, Reply::Error(m) if m.contains(what))
    }

    fn evicted(&self) -> bool {
        self.says("this was the oldest")
    }
}

/// Reads what the service sent on `sock` until it closed or `within`
/// passed; the first record decides.
fn reply(sock: &mut TcpStream, within: Duration) -> Reply {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(50))))
            .unwrap();
        match sock.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break true,
        }
    };
    match Records::new(&got, 4096).next() {
        Some(Ok((h, p))) if h.kind == Kind::Error => {
            // What garbage opened with varies; the rest of the message not.
            let m = String::from_utf8_lossy(p);
            Reply::Error(m.split(" (it opened with").next().unwrap_or("").to_owned())
        }
        Some(Ok((h, _))) => Reply::Record(format!("{:?}", h.kind)),
        Some(Err(e)) => Reply::Record(format!("undecodable: {e}")),
        None if closed => Reply::Closed,
        None => Reply::Silent,
    }
}

/// The kinds of hostile connection that expect an answer at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shot {
    Garbage,
    Http,
    Replay,
    WrongToken,
    UnknownDecision,
    /// A data connection with a made-up tag: held open, never answered.
    BogusStream,
}

const KINDS: [Shot; 6] = [
    Shot::Garbage,
    Shot::Http,
    Shot::Replay,
    Shot::WrongToken,
    Shot::UnknownDecision,
    Shot::BogusStream,
];

/// One hostile connection of kind `shot`; a bogus data connection is
/// handed back to be held.
fn fire(
    shot: Shot,
    to: SocketAddr,
    hello: &[u8],
    layout: &Layout,
    rng: &mut XorShift64,
) -> (Reply, Option<TcpStream>) {
    let within = Duration::from_secs(5);
    if shot == Shot::WrongToken {
        let mut t = TcpSource::connect(to, tcp()).unwrap();
        let wrong = Secret::from_token(b"not the token");
        let o = Offer {
            version: VERSION,
            granularity: Granularity::Segment,
            streams: 2,
            features: 0,
            layout,
            secret: &wrong,
            guest: Default::default(),
            verify: Default::default(),
        };
        let r = match offer(t.control(), &o, within) {
            Ok(_) => Reply::Record("a Welcome, and the Proof was taken".into()),
            Err(HandshakeError::Peer(m)) => Reply::Error(m),
            Err(e) => Reply::Record(format!("{e}")),
        };
        return (r, None);
    }
    let mut sock = TcpStream::connect(to).unwrap();
    let garbage_len = 1 + (rng.next_u64() % 300) as usize;
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let bytes = match shot {
        Shot::Garbage => {
            let mut b = random(garbage_len);
            // Not a Hello's or a Decision's kind byte, nor the stream magic's
            // first: those are other shots.
            if matches!(b[0], 1 | 16 | b'H') {
                b[0] = 0xee;
            }
            b
        }
        Shot::Http => b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".to_vec(),
        Shot::Replay => hello.to_vec(),
        Shot::UnknownDecision => {
            let mut b = Header::new(Kind::Decision, 0, DECISION_LEN as u32, 0)
                .encode()
                .to_vec();
            b.extend(random(DECISION_LEN));
            b
        }
        Shot::BogusStream => {
            let mut b = b"HPMIGSTR\x00\x00\x00\x00".to_vec();
            b.extend(random(32));
            b
        }
        Shot::WrongToken => Vec::new(),
    };
    sock.write_all(&bytes).unwrap();
    if shot == Shot::BogusStream {
        return (Reply::Silent, Some(sock));
    }
    (reply(&mut sock, within), None)
}

/// A connection that sends `bytes` one every 300 ms until the service
/// answers or closes; returns the answer and when it came.
fn trickle(to: SocketAddr, bytes: &[u8]) -> (Reply, Duration) {
    let start = Instant::now();
    let mut sock = TcpStream::connect(to).unwrap();
    for b in bytes {
        if sock.write_all(&[*b]).is_err() {
            break;
        }
        match reply(&mut sock, Duration::from_millis(300)) {
            Reply::Silent => {}
            r => return (r, start.elapsed()),
        }
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    (reply(&mut sock, Duration::from_secs(3)), start.elapsed())
}

#[test]
fn the_service_outlives_a_thousand_hostile_connections_and_serves_a_real_source_within_a_second() {
    let svc = service(HANDSHAKE, None);
    let addr = svc.local_addr();
    let cfg = dest_config(None);

    // A first migration, through a capturing proxy: its Hello is the one
    // replayed below.
    let capture = Proxy::start(addr, None, true).unwrap();
    let memory = pattern_memory(&[(0, 4 * MIB)]);
    let layout = Layout::of(&memory).unwrap();
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    thread::scope(|s| {
        let dest = s.spawn(|| serve_one(&svc, &cfg, Duration::from_secs(10)));
        migrate_to(capture.addr(), &memory, &mut guest)
            .0
            .expect("the first migration");
        dest.join()
            .unwrap()
            .result
            .expect("the first migration lands");
    });
    let control = &capture.captured()[&(0, true)];
    let (h, _) = Records::new(control, 4096).next().unwrap().unwrap();
    assert_eq!(h.kind, Kind::Hello);
    let hello = control[..HEADER_LEN + h.len as usize].to_vec();

    // The flood.
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let half: Vec<TcpStream> = (0..HALF_HELLOS)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&hello[..24]).unwrap();
            s
        })
        .collect();
    let fired = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let tally: Mutex<BTreeMap<(Shot, Reply), usize>> = Mutex::default();
    let held: Mutex<Vec<TcpStream>> = Mutex::default();
    let memory = pattern_memory(&[(0, 8 * MIB)]);
    let mut guest = Scribbler::start(memory.clone(), 1, Some(20_000));
    let (served, handshake, pool_at_connect, tricklers) = thread::scope(|s| {
        let tricklers: Vec<_> = (0..TRICKLERS)
            .map(|_| s.spawn(|| trickle(addr, &hello)))
            .collect();
        for w in 0..SHOOTERS {
            let (fired, stop, tally, held) = (&fired, &stop, &tally, &held);
            let (hello, layout) = (&hello, &layout);
            s.spawn(move || {
                let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15 ^ w as u64);
                let mut i = w;
                while !(stop.load(Ordering::SeqCst) && fired.load(Ordering::SeqCst) >= SHOTS) {
                    let shot = KINDS[i % KINDS.len()];
                    i += 1;
                    let (r, sock) = fire(shot, addr, hello, layout, &mut rng);
                    held.lock().unwrap().extend(sock);
                    *tally.lock().unwrap().entry((shot, r)).or_default() += 1;
                    fired.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // The flood is under way and every held connection connected.
        while fired.load(Ordering::SeqCst) < SHOTS / 4 {
            thread::sleep(Duration::from_millis(1));
        }
        let pool_at_connect = svc.unauthenticated();
        let t0 = Instant::now();
        let dest = s.spawn(|| serve_one(&svc, &cfg, Duration::from_secs(10)));
        let (report, _) = migrate_to(addr, &memory, &mut guest);
        let served = dest.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        report.expect("the real source migrates during the flood");
        let handshake = served.authenticated_at - t0;
        let tricklers: Vec<_> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
        (served, handshake, pool_at_connect, tricklers)
    });
    let received = served.result.expect("the real source's migration lands");
    assert!(received.verified);
    assert_same_memory(&memory, &served.memory);
    eprintln!(
        "real source: handshake done {:.1} ms after it connected, with {pool_at_connect} unauthenticated connections in the pool",
        handshake.as_secs_f64() * 1e3
    );
    // Full but for the shots being answered at that moment.
    assert!(
        pool_at_connect >= 64 - 2 * SHOOTERS,
        "the flood fills the pool when the real source comes: {pool_at_connect}"
    );
    assert!(
        handshake < Duration::from_secs(1),
        "the real source's handshake took {handshake:?} under the flood"
    );

    // Every held connection was told why it was closed.
    let mut held_replies: BTreeMap<(&str, Reply), usize> = BTreeMap::new();
    for (what, socks) in [("idle", idle), ("half Hello", half)] {
        for mut sock in socks {
            let r = reply(&mut sock, HANDSHAKE + Duration::from_secs(1));
            assert!(
                r.evicted() || r.says("handshake timed out"),
                "{what}: {r:?}"
            );
            *held_replies.entry((what, r)).or_default() += 1;
        }
    }
    for (r, after) in &tricklers {
        assert!(
            r.evicted() || r.says("handshake timed out"),
            "trickle: {r:?}"
        );
        *held_replies.entry(("trickle", r.clone())).or_default() += 1;
        assert!(*after < HANDSHAKE + Duration::from_millis(600), "{after:?}");
    }
    let tally = tally.into_inner().unwrap();
    eprintln!("held connections:");
    for ((what, r), n) in &held_replies {
        eprintln!("  {n:4}  {what}: {r:?}");
    }
    eprintln!("shots:");
    for ((shot, r), n) in &tally {
        eprintln!("  {n:4}  {shot:?}: {r:?}");
    }
    let mut shots = 0;
    let mut evicted_shots = 0;
    for ((shot, r), n) in &tally {
        shots += n;
        if r.evicted() {
            evicted_shots += n;
            continue;
        }
        let expected = match shot {
            Shot::Garbage => r.says("not an hpmig peer"),
            Shot::Http => r.says("not an hpmig peer: bad magic"),
            Shot::Replay => r.says("replayed Hello"),
            Shot::WrongToken => r.says("wrong or missing token"),
            Shot::UnknownDecision => *r == Reply::Record("Outcome".into()),
            Shot::BogusStream => *r == Reply::Silent,
        };
        assert!(expected, "{shot:?} got {r:?}");
    }
    assert!(
        evicted_shots * 20 < shots,
        "{evicted_shots} of {shots} shots were evicted"
    );
    // The bogus data connections were closed without a word (unless
    // evicted first, which they are told).
    for mut sock in held.into_inner().unwrap() {
        let r = reply(&mut sock, HANDSHAKE + Duration::from_secs(1));
        assert!(r == Reply::Closed || r.evicted(), "bogus stream: {r:?}");
    }
    let hostile = IDLE + HALF_HELLOS + TRICKLERS + shots;
    let stats = svc.stats();
    eprintln!("{hostile} hostile connections; service: {stats:?}");
    assert!(hostile >= 1000);
    assert_eq!(stats.authenticated, 2, "only the two real sources");
    // Each closed with a reason, or (a Decision) answered from the journal.
    assert_eq!(
        (stats.refused + stats.journal_answers) as usize,
        hostile,
        "{stats:?}"
    );
    assert!(stats.evicted > 0 && stats.replayed > 0, "{stats:?}");
}

#[test]
fn a_trickle_cannot_stretch_the_opening_past_its_deadline() {
    let svc = service(HANDSHAKE, None);
    let addr = svc.local_addr();
    // A Hello's first bytes, one every 300 ms.
    let mut hello = Header::new(Kind::Hello, 0, 200, 0).encode().to_vec();
    hello.extend([0u8; 200]);
    let trickler = thread::spawn(move || trickle(addr, &hello));
    let mut idle = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&[1, 0, 0, 0]).unwrap();
    let (r, after) = trickler.join().unwrap();
    assert!(r.says("handshake timed out"), "{r:?}");
    assert!(
        after < HANDSHAKE + Duration::from_millis(600),
        "answered after {after:?}"
    );
    for sock in [&mut idle, &mut half] {
        let r = reply(sock, Duration::from_secs(1));
        assert!(r.says("handshake timed out"), "{r:?}");
    }
    assert_eq!(svc.stats().timed_out, 3);
}
