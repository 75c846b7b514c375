//! The service's bookkeeping: the [`Pool`] of connections not yet
//! authenticated (bounded; the oldest goes first), the Hello nonces seen
//! ([`ReplayCache`]), and the [`Lanes`] by which the acceptor reaches each
//! live migration, whose receiving end is that migration's [`Route`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use hpmig_core::auth::{Secret, Session, SessionId};
use hpmig_core::transport::{Interrupt, TransportError};

use super::{lock, opening, Shared};
use crate::io::POLL;

/// Connections delivering a decision again that one migration holds
/// before it takes them; more are refused.
const QUEUED_CONTROLS: usize = 4;
/// Hello nonces remembered.
const REPLAY_MEMORY: usize = 4096;

/// A member of the pool: its place, whether it was evicted, and whether
/// its Hello proved it holds the token.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub id: u64,
    evicted: Arc<AtomicBool>,
    proven: Arc<AtomicBool>,
}

impl Ticket {
    /// Whether the pool closed this connection for a newcomer.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Marks the connection as one whose Hello carried a valid MAC over a
    /// fresh nonce: it is closed for a newcomer only when no stranger that
    /// proved nothing is left to close.
    pub fn prove(&self) {
        self.proven.store(true, Ordering::Release);
    }
}

#[derive(Debug)]
struct Member {
    id: u64,
    /// A second handle on the socket, to shut it down from outside.
    sock: TcpStream,
    evicted: Arc<AtomicBool>,
    proven: Arc<AtomicBool>,
}

/// The connections open and not yet authenticated, oldest first.
#[derive(Debug)]
pub(crate) struct Pool {
    max: usize,
    next: u64,
    open: VecDeque<Member>,
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool {
            max,
            next: 0,
            open: VecDeque::with_capacity(max),
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Adds `sock`; at the cap, first closes the oldest member that proved
    /// nothing (else the oldest): its reads end at once and its thread
    /// finds it evicted. The newcomer is never the one closed.
    pub fn join(&mut self, sock: &TcpStream) -> std::io::Result<Ticket> {
        let handle = sock.try_clone()?;
        while self.open.len() >= self.max {
            let victim = self
                .open
                .iter()
                .position(|m| !m.proven.load(Ordering::Acquire))
                .unwrap_or(0);
            let Some(m) = self.open.remove(victim) else {
                break;
            };
            m.evicted.store(true, Ordering::Release);
            // Reading only: its thread still tells the peer why.
            let _ = m.sock.shutdown(Shutdown::Read);
        }
        let (evicted, proven) = (Arc::default(), Arc::default());
        self.next += 1;
        self.open.push_back(Member {
            id: self.next,
            sock: handle,
            evicted: Arc::clone(&evicted),
            proven: Arc::clone(&proven),
        });
        Ok(Ticket {
            id: self.next,
            evicted,
            proven,
        })
    }

    /// Takes member `id` out; false when it is no member (evicted).
    pub fn leave(&mut self, id: u64) -> bool {
        match self.open.iter().position(|m| m.id == id) {
            Some(i) => {
                self.open.remove(i);
                true
            }
            None => false,
        }
    }

    /// Closes every member (the service stops).
    pub fn close_all(&mut self) {
        for m in self.open.drain(..) {
            m.evicted.store(true, Ordering::Release);
            let _ = m.sock.shutdown(Shutdown::Both);
        }
    }
}

/// The nonces of the last [`REPLAY_MEMORY`] authentic Hellos: a source
/// draws a fresh nonce for every offer, so a Hello that shows one again is
/// a recording.
#[derive(Debug, Default)]
pub(crate) struct ReplayCache {
    seen: HashSet<[u8; 16]>,
    order: VecDeque<[u8; 16]>,
}

impl ReplayCache {
    /// Records `nonce`; false when it was seen before.
    pub fn first_use(&mut self, nonce: [u8; 16]) -> bool {
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back(nonce);
        if self.order.len() > REPLAY_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The acceptor's way to one live migration.
#[derive(Debug)]
struct Lane {
    session: Session,
    streams: u16,
    data: Sender<(u16, TcpStream)>,
    controls: Sender<TcpStream>,
}

/// Every live migration's lane, by session.
#[derive(Debug, Default)]
pub(crate) struct Lanes(Mutex<HashMap<SessionId, Lane>>);

impl Lanes {
    /// Where data connection `index` showing `tag` goes, if a live
    /// migration's session proves it.
    pub fn data_for(&self, index: u16, tag: &[u8]) -> Option<Sender<(u16, TcpStream)>> {
        lock(&self.0)
            .values()
            .find(|l| index < l.streams && Secret::verify(l.session.stream_tag(index), tag))
            .map(|l| l.data.clone())
    }

    /// Where a connection delivering a decision for `id` goes, if a live
    /// migration holds that session.
    pub fn control_for(&self, id: SessionId) -> Option<Sender<TcpStream>> {
        lock(&self.0).get(&id).map(|l| l.controls.clone())
    }
}

/// One migration's end of its lane: the data connections and the
/// connections delivering its decision again that the acceptor routed to
/// it. Dropping it closes the lane; decisions that came and were not taken
/// are then answered from the journal.
pub(crate) struct Route {
    id: SessionId,
    shared: Arc<Shared>,
    data: Receiver<(u16, TcpStream)>,
    controls: Receiver<TcpStream>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route").field("session", &self.id).finish()
    }
}

impl Route {
    /// Opens the lane of `session`, which announced `streams` data
    /// connections.
    pub fn open(shared: &Arc<Shared>, session: &Session, streams: u16) -> Route {
        let (data_tx, data) = bounded(usize::from(streams));
        let (controls_tx, controls) = bounded(QUEUED_CONTROLS);
        let id = session.id();
        lock(&shared.lanes.0).insert(
            id,
            Lane {
                session: session.clone(),
                streams,
                data: data_tx,
                controls: controls_tx,
            },
        );
        Route {
            id,
            shared: Arc::clone(shared),
            data,
            controls,
        }
    }

    /// The `n` data connections of `session` (their stream hellos read and
    /// checked by the acceptor), in stream order, within `within`.
    pub fn streams(
        &self,
        n: usize,
        session: &Session,
        interrupt: &Interrupt,
        within: Duration,
    ) -> Result<Vec<TcpStream>, TransportError> {
        if session.id() != self.id {
            return Err(TransportError::Other(format!(
                "data connections of session {} asked of the migration of session {}",
                session.id(),
                self.id
            )));
        }
        let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let mut missing = n;
        let deadline = Instant::now() + within;
        while missing > 0 {
            interrupt.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Other(format!(
                    "{missing} of {n} data connections did not arrive within {within:?}"
                )));
            }
            match self.data.recv_timeout(left.min(POLL)) {
                Ok((index, sock)) => match slots.get_mut(usize::from(index)) {
                    Some(slot @ None) => {
                        *slot = Some(sock);
                        missing -= 1;
                    }
                    _ => tracing::warn!(index, "dropped a repeated data connection"),
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Disconnected),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }

    /// A connection delivering this session's decision again (its Decision
    /// record still unread), by `deadline`; `None` when none came.
    pub fn control(
        &self,
        deadline: Instant,
        interrupt: &Interrupt,
    ) -> Result<Option<TcpStream>, TransportError> {
        loop {
            interrupt.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.controls.recv_timeout(left.min(POLL)) {
                Ok(sock) => return Ok(Some(sock)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Disconnected),
            }
        }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        lock(&self.shared.lanes.0).remove(&self.id);
        // The lane is closed: the acceptor's path for these is now the
        // journal's answer.
        while let Ok(sock) = self.controls.try_recv() {
            if let Ok(peer) = sock.peer_addr() {
                opening::admit(&self.shared, sock, peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_full_pool_closes_its_oldest_stranger_never_the_newcomer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let socks: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut pool = Pool::new(2);
        let a = pool.join(&socks[0]).unwrap();
        let b = pool.join(&socks[1]).unwrap();
        a.prove();
        // Full: the oldest that proved nothing (b) goes, not a.
        let c = pool.join(&socks[2]).unwrap();
        assert!(!a.evicted() && b.evicted() && !c.evicted());
        assert_eq!(pool.len(), 2);
        // a proved itself: the oldest stranger now is c.
        let d = pool.join(&socks[3]).unwrap();
        assert!(c.evicted() && !d.evicted() && !a.evicted());
        assert!(!pool.leave(b.id), "an evicted member is no member");
        assert!(pool.leave(a.id) && pool.leave(d.id));
        assert_eq!(pool.len(), 0);
    }

    #[test]
    fn a_nonce_is_new_once() {
        let mut seen = ReplayCache::default();
        assert!(seen.first_use([1; 16]));
        assert!(!seen.first_use([1; 16]));
        for i in 0..REPLAY_MEMORY as u32 {
            let mut n = [2; 16];
            n[..4].copy_from_slice(&i.to_le_bytes());
            assert!(seen.first_use(n));
        }
        // Forgotten after REPLAY_MEMORY newer ones.
        assert!(seen.first_use([1; 16]));
        assert_eq!(seen.order.len(), REPLAY_MEMORY);
    }
}
