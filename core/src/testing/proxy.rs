//! The one fault-injecting TCP proxy of hpmig's tests: it forwards every
//! connection to a target and, on a plan, cuts, flips a byte or stalls at a
//! chosen byte of a chosen connection and direction; it can also cut every
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
use std::time::Duration;

/// What to do at the planned byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// Which bytes a plan counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Connection `n` (0 = control), one direction.
    Conn { conn: usize, to_dest: bool },
    /// All data connections (1..) towards the destination, counted together.
    AllData,
}

/// A fault at byte `at` of the bytes `which` counts.
#[derive(Clone, Copy, Debug)]
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
    cut_all: AtomicBool,
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

    /// Cuts every connection now, and refuses new ones.
    pub fn cut_all(&self) {
        cut_everything(&self.state);
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

fn pump(mut from: TcpStream, mut to: TcpStream, conn: usize, to_dest: bool, st: &State) {
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    let counts_all = conn > 0 && to_dest;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.cut_all.load(Ordering::SeqCst) {
            break;
        }
        let chunk = &mut buf[..n];
        if st.capture {
            st.captured
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((conn, to_dest))
                .or_default()
                .extend_from_slice(chunk);
        }
        // Where this chunk starts in the counting the plan uses.
        let start = match st.plan.map(|p| p.which) {
            Some(Which::AllData) if counts_all => {
                st.data_bytes.fetch_add(n as u64, Ordering::SeqCst)
            }
            _ => {
                if counts_all {
                    st.data_bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
                off
            }
        };
        let mine = st.plan.filter(|p| match p.which {
            Which::Conn {
                conn: c,
                to_dest: d,
            } => c == conn && d == to_dest,
            Which::AllData => counts_all,
        });
        if let Some(p) = mine.filter(|p| (start..start + n as u64).contains(&p.at)) {
            let i = (p.at - start) as usize;
            st.fired.store(true, Ordering::SeqCst);
            match p.action {
                Action::Flip => chunk[i] ^= 0xff,
                Action::CutAll => {
                    let _ = to.write_all(&chunk[..i]);
                    cut_everything(st);
                    return;
                }
                Action::Cut | Action::Stall(_) => {
                    let _ = to.write_all(&chunk[..i]);
                    if let Action::Stall(d) = p.action {
                        thread::sleep(d);
                    }
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        off += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
}
