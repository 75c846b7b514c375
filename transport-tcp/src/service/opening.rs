//! One connection's opening, from its accept until it is handed to a
//! migration or closed: its first bytes are peeked (not consumed) to tell
//! a data connection, a Hello and a Decision apart, then each gets its own
//! path (see the module doc of [`super`]). Every wait ends at the
//! connection's deadline, fixed at accept; every byte read is counted
//! against the budget before anything is allocated for it.

use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use hpmig_core::auth::{Secret, SessionId};
use hpmig_core::handshake::{self, Accepted, HandshakeError};
use hpmig_core::land::{answer_from_journal, LandError};
use hpmig_core::protocol::switchover::{Decision, DECISION_LEN};
use hpmig_core::protocol::{
    encode_error, ErrorCode, Header, Hello, Kind, ProtocolError, HEADER_LEN,
};
use hpmig_core::transport::{Control, ControlRecord, DestTransport, Interrupt, TransportError};
use thiserror::Error;

use super::registry::{Route, Ticket};
use super::{count, lock, Shared};
use crate::io::Conn;
use crate::{TcpControl, TcpDest, STREAM_HELLO_LEN, STREAM_MAGIC};

/// Longest a peek waits for more bytes before it looks at the deadline
/// (and whether the connection was evicted) again.
const PEEK_WAIT: Duration = Duration::from_millis(20);
/// First wait after a peek that found some bytes, but not enough.
const NAP: Duration = Duration::from_millis(1);
/// How long a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_millis(100);
/// Most bytes drained from a refused connection.
const LINGER_BYTES: usize = 64 << 10;
/// Stack of a connection thread (it holds no large buffer).
const STACK: usize = 256 << 10;

/// Why a connection was closed without being served; the message is what
/// the peer is told in an Error record.
#[derive(Debug, Error)]
pub(crate) enum Refusal {
    /// the first bytes open neither a record nor a stream hello
    #[error("not an hpmig peer: bad magic (it opened with \"{0}\")")]
    BadMagic(String),
    /// the first record is not one a connection may open with
    #[error("not an hpmig peer: {0}")]
    BadHeader(#[source] ProtocolError),
    /// the opening did not complete by its deadline
    #[error("handshake timed out: the opening was not complete within {0:?} of the connection")]
    TimedOut(Duration),
    /// the peer went away
    #[error("the peer closed the connection during its opening")]
    Closed,
    /// closed for a newcomer, as the oldest unauthenticated connection
    #[error("closed: {0} connections were waiting to authenticate and this was the oldest")]
    Evicted(usize),
    /// a Hello recorded from an earlier connection
    #[error("refused: a replayed Hello (its nonce was used before)")]
    Replayed,
    /// the peer sent more than a valid opening needs
    #[error("refused: more than {0} bytes before authentication")]
    TooLong(usize),
    /// the handshake refused the source (wrong token, terms not met)
    #[error("{0}")]
    Handshake(#[source] HandshakeError),
    /// a stream hello no live migration's session proves
    #[error("a data connection for no migration this destination holds")]
    UnknownStream,
    /// a data connection its migration has no room for
    #[error("a data connection its migration does not take (repeated, or past its stream count)")]
    SurplusStream,
    /// the queue of authenticated migrations is full
    #[error("busy: {0} authenticated migrations already wait to be served")]
    Busy(usize),
    /// the migration holding a session has deliveries waiting already
    #[error("refused: session {0} already has deliveries of its decision waiting")]
    Crowded(SessionId),
    /// a Decision the journal could not answer (bad MAC, journal failure)
    #[error("answering from the session journal: {0}")]
    Journal(#[source] LandError),
    /// the connection could not be set up or read
    #[error("setting up the connection: {0}")]
    Transport(#[source] TransportError),
    #[error("reading the opening: {0}")]
    Io(#[source] std::io::Error),
}

impl Refusal {
    /// Whether the peer may read an Error record: not one that is gone,
    /// nor a data connection (its sender reads nothing).
    fn tell(&self) -> bool {
        !matches!(
            self,
            Refusal::Closed | Refusal::UnknownStream | Refusal::SurplusStream
        )
    }

    fn transport(e: TransportError, timeout: Duration) -> Refusal {
        match e {
            TransportError::TimedOut { .. } => Refusal::TimedOut(timeout),
            TransportError::Disconnected => Refusal::Closed,
            e => Refusal::Transport(e),
        }
    }

    fn handshake(e: HandshakeError, timeout: Duration) -> Refusal {
        match e {
            HandshakeError::Transport(e) => Refusal::transport(e, timeout),
            e => Refusal::Handshake(e),
        }
    }
}

/// Takes a new connection into the pool (closing the oldest at the cap)
/// and starts its thread. Nothing here waits on the peer.
pub(crate) fn admit(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr) {
    if shared.stop.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = sock.set_nonblocking(false) {
        tracing::debug!(%peer, error = %e, "dropped a connection that could not be configured");
        return;
    }
    let ticket = match lock(&shared.pool).join(&sock) {
        Ok(ticket) => ticket,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "dropped a connection that could not be pooled");
            return;
        }
    };
    let id = ticket.id;
    // Fixed here: nothing the peer does later moves it.
    let deadline = Instant::now() + shared.opts.handshake_timeout;
    shared.threads.fetch_add(1, Ordering::AcqRel);
    let sh = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("hpmig-opening".into())
        .stack_size(STACK)
        .spawn(move || {
            let _done = Done {
                shared: &sh,
                id: ticket.id,
            };
            let at = Opening {
                shared: &sh,
                ticket: &ticket,
                peer,
                deadline,
            };
            at.serve(sock);
        });
    if let Err(e) = spawned {
        // The socket went with the closure.
        lock(&shared.pool).leave(id);
        shared.threads.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, error = %e, "dropped a connection: no thread to serve it");
    }
}

/// Takes a connection thread out of the pool and the count, however it
/// ends.
struct Done<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pool).leave(self.id);
        self.shared.threads.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection opens with.
enum First {
    /// A data connection's stream hello.
    Stream,
    /// A Hello record of this many bytes, header included.
    Hello(usize),
    /// A Decision record.
    Decision,
}

/// Decides from the first bytes (as many as came) what the connection is;
/// `None` while more are needed.
fn first_record(b: &[u8]) -> Option<Result<First, Refusal>> {
    let &first = b.first()?;
    let shown = || {
        b[..b.len().min(STREAM_MAGIC.len())]
            .escape_ascii()
            .to_string()
    };
    if first == STREAM_MAGIC[0] {
        let k = b.len().min(STREAM_MAGIC.len());
        if b[..k] != STREAM_MAGIC[..k] {
            return Some(Err(Refusal::BadMagic(shown())));
        }
        return (k == STREAM_MAGIC.len()).then_some(Ok(First::Stream));
    }
    if first != Kind::Hello as u8 && first != Kind::Decision as u8 {
        return Some(Err(Refusal::BadMagic(shown())));
    }
    let head: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
    Some(match Header::decode(head, 0) {
        Ok(h) if h.kind == Kind::Hello => Ok(First::Hello(HEADER_LEN + h.len as usize)),
        Ok(h) if h.kind == Kind::Decision => Ok(First::Decision),
        Ok(h) => Err(Refusal::BadHeader(ProtocolError::Unexpected {
            got: h.kind,
            expected: "a Hello, a Decision or a stream hello",
        })),
        Err(e) => Err(Refusal::BadHeader(e)),
    })
}

/// The control exchange of a peer not yet authenticated: what
/// [`TcpControl`] does, each record counted against the byte budget
/// before its payload is allocated or read.
struct Budgeted {
    conn: Conn,
    left: usize,
    /// The peer sent more than the budget allows.
    over: bool,
}

impl Budgeted {
    fn spend(&mut self, n: usize) -> Result<(), TransportError> {
        if n > self.left {
            self.over = true;
            return Err(TransportError::Other(
                "over the byte budget before authentication".into(),
            ));
        }
        self.left -= n;
        Ok(())
    }
}

impl Control for Budgeted {
    fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
        self.conn.write_all(&mut [IoSlice::new(record)])
    }

    fn recv(&mut self, deadline: Instant) -> Result<ControlRecord, TransportError> {
        self.spend(HEADER_LEN)?;
        let mut head = [0u8; HEADER_LEN];
        self.conn.read_exact_by(&mut head, Some(deadline))?;
        let header = Header::decode(&head, 0)?;
        let len = header.len as usize;
        self.spend(len)?;
        let mut payload = vec![0u8; len];
        self.conn.read_exact_by(&mut payload, Some(deadline))?;
        Ok(ControlRecord { header, payload })
    }
}

/// One connection being opened.
struct Opening<'a> {
    shared: &'a Arc<Shared>,
    ticket: &'a Ticket,
    peer: SocketAddr,
    /// Everything before authentication ends by this.
    deadline: Instant,
}

impl Opening<'_> {
    fn timeout(&self) -> Duration {
        self.shared.opts.handshake_timeout
    }

    fn serve(&self, sock: TcpStream) {
        let mut head = [0u8; HEADER_LEN];
        match self.peek(&sock, &mut head, first_record) {
            Ok(First::Stream) => self.stream(sock),
            Ok(First::Hello(len)) => self.hello(sock, len),
            Ok(First::Decision) => self.decision(sock),
            Err(why) => self.refuse(sock, why),
        }
    }

    /// Peeks into `buf` until `decide` says what the bytes so far are, by
    /// the deadline; consumes nothing.
    fn peek<T>(
        &self,
        sock: &TcpStream,
        buf: &mut [u8],
        decide: impl Fn(&[u8]) -> Option<Result<T, Refusal>>,
    ) -> Result<T, Refusal> {
        let mut nap = NAP;
        let mut had = 0;
        loop {
            // Bytes already queued would keep an evicted one peeking.
            if self.ticket.evicted() {
                return Err(Refusal::Closed);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Refusal::TimedOut(self.timeout()));
            }
            sock.set_read_timeout(Some(left.min(PEEK_WAIT)))
                .map_err(Refusal::Io)?;
            match sock.peek(buf) {
                Ok(0) => return Err(Refusal::Closed),
                Ok(n) => {
                    if let Some(r) = decide(&buf[..n]) {
                        return r;
                    }
                    // Some bytes, not enough: peek returns at once now,
                    // so wait before looking again.
                    if n == had {
                        std::thread::sleep(nap.min(left));
                        nap = (nap * 2).min(PEEK_WAIT);
                    } else {
                        had = n;
                        nap = NAP;
                    }
                }
                Err(e) if try_again(&e) => {}
                Err(e) => return Err(Refusal::Io(e)),
            }
        }
    }

    /// A Hello: refused when replayed, else the handshake, within the
    /// deadline and the byte budget.
    fn hello(&self, sock: TcpStream, len: usize) {
        let opts = &self.shared.opts;
        if len > opts.max_handshake_bytes {
            return self.refuse(sock, Refusal::TooLong(opts.max_handshake_bytes));
        }
        let mut record = vec![0u8; len];
        if let Err(why) = self.peek(&sock, &mut record, |b| (b.len() == len).then_some(Ok(()))) {
            return self.refuse(sock, why);
        }
        // A recorded Hello carries a valid MAC; only its nonce gives it away.
        if let Ok(h) = Hello::decode(&record[HEADER_LEN..]) {
            let authentic = Secret::verify(opts.terms.secret.hello(&h.nonce), &h.auth);
            if authentic && !lock(&self.shared.replays).first_use(h.nonce) {
                return self.refuse(sock, Refusal::Replayed);
            }
            // Without a token anyone can make that MAC: it proves nothing.
            if authentic && opts.terms.secret.is_set() {
                self.ticket.prove();
            }
        }
        let conn = match Conn::new(sock, Interrupt::default(), self.timeout()) {
            Ok(c) => c,
            Err(e) => return tracing::debug!(peer = %self.peer, error = %e, "dropped a connection"),
        };
        let mut control = Budgeted {
            conn,
            left: opts.max_handshake_bytes,
            over: false,
        };
        let admit = &opts.admit.0;
        match handshake::answer(&mut control, &opts.terms, None, self.deadline, &mut |g| {
            admit(g)
        }) {
            Ok(accepted) => self.hand_over(control.conn, accepted),
            Err(_) if control.over => self.refuse(
                control.conn.into_stream(),
                Refusal::TooLong(opts.max_handshake_bytes),
            ),
            Err(e) => self.refuse(
                control.conn.into_stream(),
                Refusal::handshake(e, self.timeout()),
            ),
        }
    }

    /// An authenticated source: out of the pool, its lane opened, queued
    /// for `next_migration`.
    fn hand_over(&self, conn: Conn, accepted: Accepted) {
        let sock = conn.into_stream();
        let max = self.shared.opts.max_unauthenticated;
        if !lock(&self.shared.pool).leave(self.ticket.id) {
            return self.refuse(sock, Refusal::Evicted(max));
        }
        let tcp = self.shared.opts.tcp;
        let interrupt = Interrupt::default();
        let conn = match Conn::new(sock, interrupt.clone(), tcp.io_timeout) {
            Ok(c) => c,
            Err(e) => {
                return tracing::warn!(peer = %self.peer, error = %e, "dropped an authenticated source")
            }
        };
        let session = accepted.agreed.session.id();
        let route = Route::open(
            self.shared,
            &accepted.agreed.session,
            accepted.hello.streams,
        );
        let dest = TcpDest::routed(TcpControl::new(conn), route, tcp, interrupt, self.peer);
        let queued = match lock(&self.shared.ready).as_ref() {
            Some(ready) => ready.try_send((accepted, dest)),
            None => Err(TrySendError::Disconnected((accepted, dest))),
        };
        match queued {
            Ok(()) => {
                count(&self.shared.counters.authenticated);
                tracing::info!(peer = %self.peer, %session, "a source authenticated");
            }
            Err(TrySendError::Full((_, mut dest)) | TrySendError::Disconnected((_, mut dest))) => {
                count(&self.shared.counters.refused);
                let why = Refusal::Busy(self.shared.opts.max_waiting);
                tracing::warn!(peer = %self.peer, "refused an authenticated source: {why}");
                let _ = dest
                    .control()
                    .send(&encode_error(ErrorCode::Refused, &why.to_string()));
            }
        }
    }

    /// A data connection: routed to the live migration whose session its
    /// tag proves.
    fn stream(&self, sock: TcpStream) {
        let mut conn = match Conn::new(sock, Interrupt::default(), self.timeout()) {
            Ok(c) => c,
            Err(e) => return tracing::debug!(peer = %self.peer, error = %e, "dropped a connection"),
        };
        let mut hello = [0u8; STREAM_HELLO_LEN];
        if let Err(e) = conn.read_exact_by(&mut hello, Some(self.deadline)) {
            return self.refuse(conn.into_stream(), Refusal::transport(e, self.timeout()));
        }
        let index = u16::from_le_bytes([hello[8], hello[9]]);
        let tag = &hello[12..];
        let lane = loop {
            if let Some(lane) = self.shared.lanes.data_for(index, tag) {
                break lane;
            }
            // A source opens its streams right after its Proof: its lane
            // may be a moment from open.
            if self.ticket.evicted() || Instant::now() >= self.deadline {
                return self.refuse(conn.into_stream(), Refusal::UnknownStream);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let sock = conn.into_stream();
        if !lock(&self.shared.pool).leave(self.ticket.id) {
            return self.refuse(sock, Refusal::Evicted(self.shared.opts.max_unauthenticated));
        }
        match lane.try_send((index, sock)) {
            Ok(()) => count(&self.shared.counters.streams_routed),
            Err(e) => self.refuse(e.into_inner().1, Refusal::SurplusStream),
        }
    }

    /// A Decision: to the migration holding its session, unread; else
    /// answered from the journal.
    fn decision(&self, sock: TcpStream) {
        let mut record = [0u8; HEADER_LEN + DECISION_LEN];
        if let Err(why) = self.peek(&sock, &mut record, |b| {
            (b.len() == HEADER_LEN + DECISION_LEN).then_some(Ok(()))
        }) {
            return self.refuse(sock, why);
        }
        let id = match Decision::session_of(&record[HEADER_LEN..]) {
            Ok(id) => id,
            Err(e) => return self.refuse(sock, Refusal::BadHeader(e)),
        };
        if let Some(lane) = self.shared.lanes.control_for(id) {
            if !lock(&self.shared.pool).leave(self.ticket.id) {
                return self.refuse(sock, Refusal::Evicted(self.shared.opts.max_unauthenticated));
            }
            return match lane.try_send(sock) {
                Ok(()) => {
                    count(&self.shared.counters.decisions_routed);
                    tracing::info!(peer = %self.peer, session = %id, "a decision came again for a migration held here");
                }
                Err(e) => self.refuse(e.into_inner(), Refusal::Crowded(id)),
            };
        }
        let mut conn = match Conn::new(sock, Interrupt::default(), self.timeout()) {
            Ok(c) => c,
            Err(e) => return tracing::debug!(peer = %self.peer, error = %e, "dropped a connection"),
        };
        if let Err(e) = conn.read_exact_by(&mut record, Some(self.deadline)) {
            return self.refuse(conn.into_stream(), Refusal::transport(e, self.timeout()));
        }
        let mut control = TcpControl::new(conn);
        match answer_from_journal(
            &mut control,
            &record[HEADER_LEN..],
            &self.shared.journal_cfg,
        ) {
            Ok(o) => {
                count(&self.shared.counters.journal_answers);
                tracing::info!(peer = %self.peer, session = %id, outcome = ?o.outcome, "answered a decision from the journal");
                lock(&self.shared.pool).leave(self.ticket.id);
                close(control.conn.into_stream());
            }
            Err(e) => self.refuse(control.conn.into_stream(), Refusal::Journal(e)),
        }
    }

    /// Tells the peer why (where it can read it) and closes.
    fn refuse(&self, sock: TcpStream, why: Refusal) {
        lock(&self.shared.pool).leave(self.ticket.id);
        let why = if self.ticket.evicted() {
            Refusal::Evicted(self.shared.opts.max_unauthenticated)
        } else {
            why
        };
        let c = &self.shared.counters;
        count(&c.refused);
        match why {
            Refusal::Evicted(_) => count(&c.evicted),
            Refusal::TimedOut(_) => count(&c.timed_out),
            Refusal::Replayed => count(&c.replayed),
            _ => {}
        }
        tracing::debug!(peer = %self.peer, "closed a connection: {why}");
        if why.tell() {
            let _ = sock.set_write_timeout(Some(LINGER));
            let _ = (&sock).write_all(&encode_error(ErrorCode::Refused, &why.to_string()));
        }
        close(sock);
    }
}

/// Ends the sending side, then reads what the peer sent (the peeked bytes
/// among it) for a moment before closing: closing with bytes unread resets
/// the connection, and the peer could lose the Error record unread.
fn close(sock: TcpStream) {
    let _ = sock.shutdown(Shutdown::Write);
    let until = Instant::now() + LINGER;
    if sock
        .set_read_timeout(Some(Duration::from_millis(10)))
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES && Instant::now() < until {
        match (&sock).read(&mut sink) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if try_again(&e) => {}
            Err(_) => break,
        }
    }
}

/// A read on a socket with a short timeout that found nothing yet: read again.
fn try_again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(b: &[u8]) -> Option<Result<&'static str, String>> {
        first_record(b).map(|r| {
            r.map(|f| match f {
                First::Stream => "stream",
                First::Hello(_) => "hello",
                First::Decision => "decision",
            })
            .map_err(|e| e.to_string())
        })
    }

    #[test]
    fn the_first_bytes_decide_as_soon_as_they_can() {
        assert!(first(b"").is_none());
        // Garbage and HTTP are refused on their first byte.
        assert!(first(b"G").unwrap().unwrap_err().contains("bad magic"));
        assert!(first(b"\xee\x01\x02")
            .unwrap()
            .unwrap_err()
            .contains("bad magic"));
        // The stream magic, as far as it came.
        assert!(first(b"HPMIG").is_none());
        assert!(first(b"HPMIGSTX").unwrap().is_err());
        assert_eq!(first(b"HPMIGSTR").unwrap().unwrap(), "stream");
        let hello = Header::new(Kind::Hello, 0, 200, 0).encode();
        assert!(first(&hello[..15]).is_none());
        assert_eq!(first(&hello).unwrap().unwrap(), "hello");
        match first_record(&hello) {
            Some(Ok(First::Hello(len))) => assert_eq!(len, HEADER_LEN + 200),
            _ => panic!("a Hello"),
        }
        let decision = Header::new(Kind::Decision, 0, DECISION_LEN as u32, 0).encode();
        assert_eq!(first(&decision).unwrap().unwrap(), "decision");
        // A Hello header of a length no Hello has, or reserved bits set.
        let huge = Header::new(Kind::Hello, 0, 1 << 20, 0).encode();
        assert!(first(&huge)
            .unwrap()
            .unwrap_err()
            .contains("not an hpmig peer"));
        let mut reserved = hello;
        reserved[2] = 1;
        assert!(first(&reserved).unwrap().is_err());
    }
}
