//! The destination as a service: one listener that outlives every peer that
//! connects to it, hostile or not, and hands each authenticated source to
//! the caller as a migration of its own.
//!
//! ```text
//!  acceptor thread: accept ─▶ pool of unauthenticated connections (at most
//!  (never blocks on a peer)    max_unauthenticated; a newcomer at the cap
//!                              closes the OLDEST), one thread each, every
//!                              one bounded by handshake_timeout from accept
//!
//!  first bytes, peeked (nothing consumed)          what happens
//!   "HPMIGSTR" + index + tag (stream hello)   ──▶  routed to the migration
//!                                                  whose session the tag
//!                                                  proves, else dropped
//!   Hello header                              ──▶  whole Hello peeked; a
//!                                                  replayed one refused; then
//!                                                  handshake::answer within
//!                                                  the byte budget ──▶ Ok:
//!                                                  queued for next_migration
//!   Decision header                           ──▶  routed, unread, to the
//!                                                  migration that holds the
//!                                                  session (in doubt); else
//!                                                  answered from the journal
//!   anything else, too slow, too long         ──▶  Error record naming why,
//!                                                  closed
//! ```
//!
//! [`TcpService::next_migration`] returns each source that completed the
//! handshake with a [`TcpDest`] bound to its session: its data connections
//! and any connection that delivers its Decision again reach that
//! `TcpDest` through the acceptor. A migration that fails, however it
//! fails, ends only that `TcpDest`; the service serves the next source.
//!
//! What a stranger can cost: one thread, one socket and at most
//! [`ServiceOptions::max_handshake_bytes`] of buffer for at most
//! [`ServiceOptions::handshake_timeout`], for at most
//! [`ServiceOptions::max_unauthenticated`] strangers at once (an evicted
//! one's thread ends at once). Everything is bounded by a deadline; nothing
//! a peer sends can stop the acceptor.

mod opening;
mod registry;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use hpmig_core::handshake::{Accepted, Terms};
use hpmig_core::land::journal::Journal;
use hpmig_core::land::DestConfig;
use hpmig_core::protocol::{GuestInfo, DIGEST_LEN, HEADER_LEN, MAX_HELLO};
use hpmig_core::transport::TransportError;

use crate::{TcpDest, TcpOptions};
pub(crate) use registry::Route;
use registry::{Lanes, Pool, ReplayCache};

/// What a valid opening needs before authentication, and what a stranger
/// may send: the largest Hello and the Proof, with their headers.
pub const HANDSHAKE_BYTES: usize = HEADER_LEN + MAX_HELLO as usize + HEADER_LEN + DIGEST_LEN;

/// How often the acceptor looks for a new connection when none waits.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// How a [`TcpService`] serves.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Timeouts of each migration's connections once authenticated.
    pub tcp: TcpOptions,
    /// What a source must offer and prove (token, limits, features).
    pub terms: Terms,
    /// The whole opening of a connection not yet authenticated (its first
    /// bytes, then the handshake) must be done within this of its accept;
    /// bytes trickling in do not extend it.
    pub handshake_timeout: Duration,
    /// Most unauthenticated connections open at once; a newcomer at the
    /// cap closes the oldest (the oldest of those whose Hello did not
    /// already show the token, while there are any), never itself. Keep
    /// it above the number of data connections one source opens at once.
    pub max_unauthenticated: usize,
    /// Most bytes read from a connection before it authenticated.
    pub max_handshake_bytes: usize,
    /// Most authenticated migrations waiting for
    /// [`TcpService::next_migration`]; a source beyond is told the
    /// destination is busy.
    pub max_waiting: usize,
    /// The session journal a Decision for a session no migration holds is
    /// answered from (the same one the migrations' `DestConfig` records
    /// to); without one such a Decision is answered `Unknown`.
    pub journal: Option<Arc<dyn Journal>>,
    /// Whether this host can run the guest a Hello describes (its vCPUs
    /// and requirements, see `DestGuest::admit`): asked at the handshake,
    /// so a guest this host cannot run is refused before round 0.
    pub admit: Admit,
}

/// The service's question to the VMM at the handshake: can this host run
/// the guest? An error refuses the source with its message.
#[derive(Clone)]
pub struct Admit(pub Arc<AdmitFn>);

/// See [`Admit`].
pub type AdmitFn = dyn Fn(&GuestInfo) -> Result<(), String> + Send + Sync;

impl Default for Admit {
    fn default() -> Self {
        Admit(Arc::new(|_| Ok(())))
    }
}

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admit")
    }
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            tcp: TcpOptions::default(),
            terms: Terms::default(),
            handshake_timeout: Duration::from_secs(5),
            max_unauthenticated: 64,
            max_handshake_bytes: HANDSHAKE_BYTES,
            max_waiting: 4,
            journal: None,
            admit: Admit::default(),
        }
    }
}

/// What the service did so far, counted since it was bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connections accepted.
    pub connections: u64,
    /// Sources that completed the handshake.
    pub authenticated: u64,
    /// Data connections routed to their migration.
    pub streams_routed: u64,
    /// Decisions routed to the migration holding their session.
    pub decisions_routed: u64,
    /// Decisions answered from the journal.
    pub journal_answers: u64,
    /// Connections closed without being served (every reason below too).
    pub refused: u64,
    /// Closed because the opening did not complete in time.
    pub timed_out: u64,
    /// Closed as the oldest unauthenticated one when a newcomer came.
    pub evicted: u64,
    /// Hellos refused because their nonce was used before.
    pub replayed: u64,
}

/// The counters behind [`ServiceStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    connections: AtomicU64,
    authenticated: AtomicU64,
    streams_routed: AtomicU64,
    decisions_routed: AtomicU64,
    journal_answers: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    evicted: AtomicU64,
    replayed: AtomicU64,
}

pub(crate) fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the acceptor, the connection threads and every migration's route
/// share.
#[derive(Debug)]
pub(crate) struct Shared {
    opts: ServiceOptions,
    /// What `answer_from_journal` needs: the terms' secret and the journal.
    journal_cfg: DestConfig,
    stop: AtomicBool,
    pool: Mutex<Pool>,
    /// Connection threads alive (pool members, and evicted ones ending).
    threads: AtomicUsize,
    lanes: Lanes,
    replays: Mutex<ReplayCache>,
    /// Where authenticated migrations queue for `next_migration`; taken
    /// when the service stops, so none is queued after the queue drained.
    ready: Mutex<Option<Sender<(Accepted, TcpDest)>>>,
    counters: Counters,
}

impl Shared {
    /// Most connection threads alive at once: the pool, and as many again
    /// evicted and ending. Beyond it the acceptor waits.
    fn max_threads(&self) -> usize {
        2 * self.opts.max_unauthenticated + 16
    }
}

/// Locks `m`, going on with the data of a thread that panicked holding it
/// (every structure under these locks stays consistent between calls).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A destination that serves source after source on one listener (see the
/// module doc). Dropping it stops the acceptor and closes every connection
/// not yet authenticated; migrations already handed out go on, but no
/// further connection is routed to them.
#[derive(Debug)]
pub struct TcpService {
    shared: Arc<Shared>,
    ready: Receiver<(Accepted, TcpDest)>,
    acceptor: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl TcpService {
    /// Starts serving on `listener`.
    pub fn bind(listener: TcpListener, opts: ServiceOptions) -> Result<TcpService, TransportError> {
        if opts.max_unauthenticated == 0 || opts.max_waiting == 0 {
            return Err(TransportError::Other(
                "a service needs max_unauthenticated and max_waiting of at least 1".into(),
            ));
        }
        let io_err = |context| move |source| TransportError::Io { context, source };
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the listener's address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the listener"))?;
        let (ready_tx, ready_rx) = bounded(opts.max_waiting);
        let journal_cfg = DestConfig {
            terms: opts.terms.clone(),
            journal: opts.journal.clone(),
            ..DestConfig::default()
        };
        let shared = Arc::new(Shared {
            pool: Mutex::new(Pool::new(opts.max_unauthenticated)),
            opts,
            journal_cfg,
            stop: AtomicBool::new(false),
            threads: AtomicUsize::new(0),
            lanes: Lanes::default(),
            replays: Mutex::new(ReplayCache::default()),
            ready: Mutex::new(Some(ready_tx)),
            counters: Counters::default(),
        });
        let sh = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("hpmig-acceptor".into())
            .spawn(move || accept_loop(&sh, &listener))
            .map_err(io_err("starting the acceptor thread"))?;
        tracing::info!(%addr, "destination service listening");
        Ok(TcpService {
            shared,
            ready: ready_rx,
            acceptor: Some(acceptor),
            addr,
        })
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until `deadline` (`None`: as long as it takes) for a source
    /// that completed the handshake, and returns what it offered and
    /// agreed with its migration's end, for `land::receive_accepted` (the
    /// handshake is done: do not call `land::accept` on it). A source that
    /// hung up while it waited in the queue is skipped.
    ///
    /// The `TcpDest` gets its session's data connections and every
    /// connection that delivers its Decision again for as long as it
    /// lives: keep it while its copy is in doubt (`land::await_decision`
    /// on it). Once it is dropped, such a Decision is answered from the
    /// journal.
    pub fn next_migration(
        &self,
        deadline: Option<Instant>,
    ) -> Result<(Accepted, TcpDest), TransportError> {
        let started = Instant::now();
        loop {
            let next = match deadline {
                Some(d) => self.ready.recv_deadline(d),
                None => self
                    .ready
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            let (accepted, dest) = match next {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TransportError::TimedOut {
                        what: "authenticated source",
                        after: started.elapsed(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::Other("the service stopped".into()))
                }
            };
            if dest.control_closed() {
                tracing::info!(peer = %dest.peer(), "skipped a source that hung up while it waited");
                continue;
            }
            return Ok((accepted, dest));
        }
    }

    /// What the service did so far.
    pub fn stats(&self) -> ServiceStats {
        let c = &self.shared.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServiceStats {
            connections: n(&c.connections),
            authenticated: n(&c.authenticated),
            streams_routed: n(&c.streams_routed),
            decisions_routed: n(&c.decisions_routed),
            journal_answers: n(&c.journal_answers),
            refused: n(&c.refused),
            timed_out: n(&c.timed_out),
            evicted: n(&c.evicted),
            replayed: n(&c.replayed),
        }
    }

    /// Connections open and not yet authenticated, now.
    pub fn unauthenticated(&self) -> usize {
        lock(&self.shared.pool).len()
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        lock(&self.shared.pool).close_all();
        // Queued migrations hold the shared state through their routes:
        // drop them here, not with the channel (no more can come).
        lock(&self.shared.ready).take();
        while self.ready.try_recv().is_ok() {}
    }
}

/// Accepts until the service stops. No error of one connection, nor of
/// accept itself (out of descriptors), ends it.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::Acquire) {
        if shared.threads.load(Ordering::Acquire) >= shared.max_threads() {
            // Evicted connections' threads end within a poll.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match listener.accept() {
            Ok((sock, peer)) => {
                count(&shared.counters.connections);
                opening::admit(shared, sock, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed; the service goes on");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
