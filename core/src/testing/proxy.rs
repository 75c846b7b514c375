//! The one fault-injecting TCP proxy of hpmig's tests: it forwards every
//! connection to a target and, on a plan, cuts, flips a byte, stalls or
//! calls a hook at a chosen byte of a chosen connection and direction, or at
//! a byte of a chosen record ([`Which::Record`]); it can also cut every
//! connection on demand, or capture every byte for a later plan.
//!
//! Connections are numbered in the order they arrive: 0 is the control
//! connection of a migration, 1.. its data (or setup) connections.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::{Kind, HEADER_LEN};

/// Bytes of the stream hello a TCP data connection opens with (magic,
/// stream index, reserved, session tag), skipped when following records.
pub const STREAM_HELLO_LEN: u64 = 8 + 2 + 2 + 32;

/// A hook the proxy calls at the planned byte.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// What to do at the planned byte.
#[derive(Clone)]
pub enum Action {
    /// Forward the bytes before it, then close both directions.
    Cut,
    /// Forward the bytes before it, then close every connection (the link
    /// went away) and refuse new ones.
    CutAll,
    /// Invert every bit of that byte and go on.
    Flip,
    /// Forward the bytes before it, then forward nothing for this long
    /// (holding the connection open), then close.
    Stall(Duration),
    /// Forward the bytes before it, call the hook (stop or kill a process,
    /// say), then forward the rest and go on.
    Hook(Hook),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Cut => f.write_str("Cut"),
            Action::CutAll => f.write_str("CutAll"),
            Action::Flip => f.write_str("Flip"),
            Action::Stall(d) => f.debug_tuple("Stall").field(d).finish(),
            Action::Hook(_) => f.write_str("Hook(..)"),
        }
    }
}

impl PartialEq for Action {
    fn eq(&self, other: &Action) -> bool {
        match (self, other) {
            (Action::Cut, Action::Cut)
            | (Action::CutAll, Action::CutAll)
            | (Action::Flip, Action::Flip) => true,
            (Action::Stall(a), Action::Stall(b)) => a == b,
            // Hooks are equal when they are the same hook.
            (Action::Hook(a), Action::Hook(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Action {}

/// Which bytes a plan counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Connection `n` (0 = control), one direction.
    Conn { conn: usize, to_dest: bool },
    /// All data connections (1..) towards the destination, counted together.
    AllData,
    /// The bytes of one record on one connection and direction
    /// ([`Plan::at`] is then the byte inside it; past its end means its
    /// last byte).
    Record(RecordAt),
}

/// One record on a connection: the `nth` (from 0) of `kind` on connection
/// `conn` in direction `to_dest`, counted in round `round` only when given
/// (rounds are counted by the RoundEnd records that passed: the RoundEnd
/// of round r is the first RoundEnd in round r). Data connections towards
/// the destination open with a stream hello ([`STREAM_HELLO_LEN`] bytes),
/// which is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordAt {
    pub conn: usize,
    pub to_dest: bool,
    pub kind: Kind,
    pub nth: u64,
    pub round: Option<u64>,
}

/// A fault at byte `at` of the bytes `which` counts.
#[derive(Clone, Debug)]
pub struct Plan {
    pub which: Which,
    pub at: u64,
    pub action: Action,
}

/// Every byte seen, per (connection, towards the destination).
pub type Capture = BTreeMap<(usize, bool), Vec<u8>>;

#[derive(Debug, Default)]
struct State {
    plan: Option<Plan>,
    capture: bool,
    captured: Mutex<Capture>,
    fired: AtomicBool,
    fired_at: Mutex<Option<Instant>>,
    cut_all: AtomicBool,
    stopped: AtomicBool,
    data_bytes: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Forwards connections made to [`Proxy::addr`] to `target`, applying
    /// `plan`; with `capture`, keeps every byte.
    pub fn start(target: SocketAddr, plan: Option<Plan>, capture: bool) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            plan,
            capture,
            ..State::default()
        });
        let st = Arc::clone(&state);
        let next = AtomicUsize::new(0);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if st.stopped.load(Ordering::SeqCst) {
                    return;
                }
                if st.cut_all.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let conn = next.fetch_add(1, Ordering::SeqCst);
                if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                    let mut all = st.conns.lock().unwrap_or_else(|p| p.into_inner());
                    all.push(a);
                    all.push(b);
                }
                let halves = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => [(c, s, true), (server, client, false)],
                    _ => continue,
                };
                for (from, to, to_dest) in halves {
                    let st = Arc::clone(&st);
                    thread::spawn(move || pump(from, to, conn, to_dest, &st));
                }
            }
        });
        Ok(Proxy { addr, state })
    }

    /// Where the source connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the planned byte went through.
    pub fn fired(&self) -> bool {
        self.state.fired.load(Ordering::SeqCst)
    }

    /// When the planned byte came by (before the action was taken).
    pub fn fired_at(&self) -> Option<Instant> {
        *self
            .state
            .fired_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts every connection now, and refuses new ones.
    pub fn cut_all(&self) {
        cut_everything(&self.state);
    }

    /// Closes every connection and the listener: the proxy is gone.
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        cut_everything(&self.state);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }

    /// Bytes the data connections carried towards the destination.
    pub fn data_bytes(&self) -> u64 {
        self.state.data_bytes.load(Ordering::SeqCst)
    }

    /// What was captured so far.
    pub fn captured(&self) -> Capture {
        self.state
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn cut_everything(st: &State) {
    st.cut_all.store(true, Ordering::SeqCst);
    for c in st.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = c.shutdown(Shutdown::Both);
    }
}

/// Follows the records of one connection and direction, to find where the
/// record a [`RecordAt`] names lies in the byte stream.
struct Follow {
    want: RecordAt,
    at: u64,
    /// Stream bytes still to skip (the data connection's hello).
    skip: u64,
    /// The header being read (held back until complete).
    header: Vec<u8>,
    /// Payload bytes of the current record still to come.
    payload_left: u64,
    /// Records seen per kind byte: (in all, in the current round).
    seen: BTreeMap<u8, (u64, u64)>,
    round: u64,
    /// Offset of the next byte to parse.
    pos: u64,
    /// The offset of the planned byte, once its record's header is known.
    target: Option<u64>,
}

impl Follow {
    fn new(want: RecordAt, at: u64) -> Follow {
        Follow {
            want,
            at,
            skip: if want.conn > 0 && want.to_dest {
                STREAM_HELLO_LEN
            } else {
                0
            },
            header: Vec::with_capacity(HEADER_LEN),
            payload_left: 0,
            seen: BTreeMap::new(),
            round: 0,
            pos: 0,
            target: None,
        }
    }

    /// Parses `chunk`; returns how many of its last bytes are an incomplete
    /// header, to hold back.
    fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut i = 0;
        while i < chunk.len() {
            let left = chunk.len() - i;
            if self.skip > 0 {
                let n = (self.skip as usize).min(left);
                self.skip -= n as u64;
                i += n;
            } else if self.payload_left > 0 {
                let n = (self.payload_left.min(left as u64)) as usize;
                self.payload_left -= n as u64;
                i += n;
            } else {
                let n = (HEADER_LEN - self.header.len()).min(left);
                self.header.extend_from_slice(&chunk[i..i + n]);
                i += n;
                if self.header.len() == HEADER_LEN {
                    let start = self.pos + i as u64 - HEADER_LEN as u64;
                    self.record(start);
                    self.header.clear();
                }
            }
        }
        self.pos += chunk.len() as u64;
        self.header.len()
    }

    /// A complete header starting at stream offset `start`.
    fn record(&mut self, start: u64) {
        let kind = self.header[0];
        let len = u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ]);
        self.payload_left = u64::from(len);
        let (all, this_round) = self.seen.entry(kind).or_insert((0, 0));
        let nth = match self.want.round {
            None => *all,
            Some(r) if r == self.round => *this_round,
            Some(_) => u64::MAX,
        };
        *all += 1;
        *this_round += 1;
        if self.target.is_none() && kind == self.want.kind as u8 && nth == self.want.nth {
            let last = HEADER_LEN as u64 + u64::from(len) - 1;
            self.target = Some(start + self.at.min(last));
        }
        if kind == Kind::RoundEnd as u8 {
            self.round += 1;
            for (_, r) in self.seen.values_mut() {
                *r = 0;
            }
        }
    }
}

/// What the pump does after the planned byte.
enum After {
    Go,
    End,
}

fn act(
    action: &Action,
    chunk: &mut [u8],
    i: usize,
    from: &TcpStream,
    to: &mut TcpStream,
    st: &State,
) -> After {
    st.fired.store(true, Ordering::SeqCst);
    *st.fired_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    match action {
        Action::Flip => {
            chunk[i] ^= 0xff;
            After::Go
        }
        Action::Hook(hook) => {
            if to.write_all(&chunk[..i]).is_err() {
                return After::End;
            }
            hook();
            // The rest of the chunk goes on below.
            After::Go
        }
        Action::CutAll => {
            let _ = to.write_all(&chunk[..i]);
            cut_everything(st);
            After::End
        }
        Action::Cut | Action::Stall(_) => {
            let _ = to.write_all(&chunk[..i]);
            if let Action::Stall(d) = action {
                thread::sleep(*d);
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            After::End
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, conn: usize, to_dest: bool, st: &State) {
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    let counts_all = conn > 0 && to_dest;
    let plan = st.plan.as_ref();
    let mut follow = match plan {
        Some(Plan {
            which: Which::Record(r),
            at,
            ..
        }) if r.conn == conn && r.to_dest == to_dest => Some(Follow::new(*r, *at)),
        _ => None,
    };
    let mut done = false;
    // Bytes held back (an incomplete header) and the chunk after them.
    let mut out: Vec<u8> = Vec::with_capacity(buf.len() + HEADER_LEN);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.cut_all.load(Ordering::SeqCst) {
            break;
        }
        if st.capture {
            st.captured
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((conn, to_dest))
                .or_default()
                .extend_from_slice(&buf[..n]);
        }
        let data_before = if counts_all {
            st.data_bytes.fetch_add(n as u64, Ordering::SeqCst)
        } else {
            0
        };
        // Where `out` starts in the counting the plan uses, and how many of
        // its bytes may go now.
        let (start, ready) = match (plan, follow.as_mut()) {
            (Some(_), Some(f)) if !done => {
                let held = out.len() as u64;
                let start = f.pos - held;
                out.extend_from_slice(&buf[..n]);
                let keep = f.feed(&buf[..n]);
                (start, out.len() - keep)
            }
            (Some(p), _) if matches!(p.which, Which::AllData) && counts_all => {
                // Counted with every other data connection's bytes.
                out.extend_from_slice(&buf[..n]);
                (data_before, n)
            }
            _ => {
                out.extend_from_slice(&buf[..n]);
                (off, out.len())
            }
        };
        let target = match (plan, &follow) {
            _ if done => None,
            (Some(p), None) => match p.which {
                Which::Conn {
                    conn: c,
                    to_dest: d,
                } if c == conn && d == to_dest => Some(p.at),
                Which::AllData if counts_all => Some(p.at),
                _ => None,
            },
            (Some(_), Some(f)) => f.target,
            (None, _) => None,
        };
        let ready_bytes = &mut out[..ready];
        if let (Some(p), Some(t)) = (plan, target) {
            if (start..start + ready as u64).contains(&t) {
                done = true;
                let i = (t - start) as usize;
                if let After::End = act(&p.action, ready_bytes, i, &from, &mut to, st) {
                    return;
                }
                let from_i = if matches!(p.action, Action::Hook(_)) {
                    i
                } else {
                    0
                };
                if to.write_all(&ready_bytes[from_i..]).is_err() {
                    break;
                }
                out.drain(..ready);
                off += ready as u64;
                continue;
            }
        }
        if to.write_all(ready_bytes).is_err() {
            break;
        }
        out.drain(..ready);
        off += ready as u64;
    }
    if !out.is_empty() {
        let _ = to.write_all(&out);
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{encode_record, Kind};

    /// Sends `bytes` through a proxy with `plan` in writes of `step` bytes;
    /// returns what arrived.
    fn through(plan: Plan, bytes: &[u8], step: usize) -> Vec<u8> {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap();
        let got = thread::spawn(move || {
            let (mut s, _) = target.accept().unwrap();
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
            v
        });
        let proxy = Proxy::start(addr, Some(plan), false).unwrap();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        for part in bytes.chunks(step) {
            // A cut closes this end too.
            if c.write_all(part).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let _ = c.shutdown(Shutdown::Write);
        let v = got.join().unwrap();
        assert!(proxy.fired() && proxy.fired_at().is_some());
        v
    }

    fn stream() -> (Vec<u8>, usize) {
        let mut v = Vec::new();
        for round in 0..3u64 {
            for i in 0..3u64 {
                v.extend(encode_record(Kind::Zero, 0, i, &[]));
            }
            if round == 1 {
                // The RoundEnd of round 1 starts here.
                let at = v.len();
                v.extend(encode_record(Kind::RoundEnd, 0, round, &[7; 16]));
                v.extend(encode_record(Kind::RoundEnd, 0, 99, &[7; 16]));
                return (v, at);
            }
            v.extend(encode_record(Kind::RoundEnd, 0, round, &[7; 16]));
        }
        unreachable!()
    }

    #[test]
    fn a_record_plan_hits_its_byte_whatever_the_chunks() {
        let (bytes, at) = stream();
        for step in [1, 5, 16, 17, 4096] {
            for (byte, want) in [(3, at + 3), (20, at + 20), (1000, at + 31)] {
                let plan = Plan {
                    which: Which::Record(RecordAt {
                        conn: 0,
                        to_dest: true,
                        kind: Kind::RoundEnd,
                        nth: 0,
                        round: Some(1),
                    }),
                    at: byte,
                    action: Action::Flip,
                };
                let got = through(plan, &bytes, step);
                let mut expect = bytes.clone();
                expect[want] ^= 0xff;
                assert_eq!(got, expect, "step {step}, byte {byte}");
            }
        }
    }

    #[test]
    fn a_hook_runs_between_the_bytes_before_and_the_rest() {
        let (bytes, at) = stream();
        let called = Arc::new(AtomicBool::new(false));
        let c = Arc::clone(&called);
        let plan = Plan {
            which: Which::Record(RecordAt {
                conn: 0,
                to_dest: true,
                kind: Kind::Zero,
                nth: 4,
                round: None,
            }),
            at: 0,
            action: Action::Hook(Arc::new(move || c.store(true, Ordering::SeqCst))),
        };
        assert_eq!(through(plan.clone(), &bytes, 7), bytes);
        assert!(called.load(Ordering::SeqCst));
        assert_eq!(plan.action, plan.action.clone());
        let cut = Plan {
            action: Action::Cut,
            ..plan
        };
        // The fifth Zero record: round 1's second, after round 0's 3 + RoundEnd.
        let fifth = 3 * 16 + 32 + 16;
        assert_eq!(through(cut, &bytes, 3), bytes[..fifth]);
        let _ = at;
    }
}
