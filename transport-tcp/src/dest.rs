//! The destination's end of the TCP transport: [`TcpDest`] (the control
//! connection, and where its data and redelivery connections come from) and
//! [`TcpRx`], the receiving half of one data connection.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hpmig_core::auth::{Secret, Session};
use hpmig_core::memory::DestMemory;
use hpmig_core::protocol::{Header, ProtocolError, HEADER_LEN};
use hpmig_core::transport::{DestTransport, Interrupt, StreamRx, TransportError};

use crate::io::Conn;
use crate::service::Route;
use crate::{TcpControl, TcpOptions, RX_BUF, STREAM_HELLO_LEN, STREAM_MAGIC};

/// The destination's end of one migration: its control connection, and
/// where its data and redelivery connections come from.
#[derive(Debug)]
pub struct TcpDest {
    control: TcpControl,
    incoming: Incoming,
    opts: TcpOptions,
    interrupt: Interrupt,
    peer: SocketAddr,
}

/// Where a migration's later connections come from.
#[derive(Debug)]
enum Incoming {
    /// Its own listener ([`TcpDest::accept`]): it accepts them itself.
    Listener(TcpListener),
    /// A [`crate::TcpService`]'s acceptor classifies them and routes this
    /// session's here.
    Service(Route),
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { context, source }
}

impl TcpDest {
    /// Waits for a source's control connection on `listener`: the first
    /// connection that comes is the one the handshake runs on. A
    /// destination that must survive strangers uses [`crate::TcpService`].
    pub fn accept(listener: TcpListener, opts: TcpOptions) -> Result<TcpDest, TransportError> {
        listener
            .set_nonblocking(false)
            .map_err(io_err("configuring the listener"))?;
        let (sock, peer) = listener
            .accept()
            .map_err(io_err("accepting the control connection"))?;
        let interrupt = Interrupt::default();
        let conn = Conn::new(sock, interrupt.clone(), opts.io_timeout)?;
        Ok(TcpDest {
            control: TcpControl { conn },
            incoming: Incoming::Listener(listener),
            opts,
            interrupt,
            peer,
        })
    }

    /// A migration a [`crate::TcpService`] authenticated on `control`.
    pub(crate) fn routed(
        control: TcpControl,
        route: Route,
        opts: TcpOptions,
        interrupt: Interrupt,
        peer: SocketAddr,
    ) -> TcpDest {
        TcpDest {
            control,
            incoming: Incoming::Service(route),
            opts,
            interrupt,
            peer,
        }
    }

    /// Accepts the `n` data connections of `session`, in stream order,
    /// within the connect timeout; a connection without a valid stream
    /// hello is dropped and waited past.
    pub fn accept_stream_conns(
        &mut self,
        n: usize,
        session: &Session,
    ) -> Result<Vec<Conn>, TransportError> {
        let socks = match &self.incoming {
            Incoming::Listener(l) => listener_streams(l, n, session, &self.opts, &self.interrupt)?,
            Incoming::Service(route) => {
                route.streams(n, session, &self.interrupt, self.opts.connect_timeout)?
            }
        };
        socks
            .into_iter()
            .map(|sock| Conn::new(sock, self.interrupt.clone(), self.opts.io_timeout))
            .collect()
    }

    /// Whether the source closed the control connection.
    pub(crate) fn control_closed(&self) -> bool {
        self.control.conn.peer_closed()
    }

    /// The address the source connected from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Gives the listener back, for the next migration; `None` for a
    /// migration a [`crate::TcpService`] handed out (its listener stays
    /// with the service, which serves the next one).
    pub fn into_listener(self) -> Option<TcpListener> {
        match self.incoming {
            Incoming::Listener(l) => Some(l),
            Incoming::Service(_) => None,
        }
    }
}

/// Accepts connections on `listener` until the `n` data connections of
/// `session` came (each with its stream hello read), in stream order.
fn listener_streams(
    listener: &TcpListener,
    n: usize,
    session: &Session,
    opts: &TcpOptions,
    interrupt: &Interrupt,
) -> Result<Vec<TcpStream>, TransportError> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("configuring the listener"))?;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut missing = n;
    let deadline = Instant::now() + opts.connect_timeout;
    while missing > 0 {
        interrupt.check()?;
        if Instant::now() > deadline {
            return Err(TransportError::Other(format!(
                "{missing} of {n} data connections did not arrive within {:?}",
                opts.connect_timeout
            )));
        }
        let sock = match listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(io_err("accepting a data connection")(e)),
        };
        sock.set_nonblocking(false)
            .map_err(io_err("configuring a data connection"))?;
        let mut conn = Conn::new(sock, interrupt.clone(), opts.connect_timeout)?;
        let mut hello = [0u8; STREAM_HELLO_LEN];
        if conn.read_exact(&mut hello).is_err() || hello[..8] != STREAM_MAGIC {
            tracing::warn!("dropped a connection that is not an hpmig data stream");
            continue;
        }
        let index = u16::from_le_bytes([hello[8], hello[9]]);
        let fits = usize::from(index) < n && slots[usize::from(index)].is_none();
        if !fits || !Secret::verify(session.stream_tag(index), &hello[12..]) {
            tracing::warn!(
                index,
                "dropped a data connection with a wrong or repeated stream tag"
            );
            continue;
        }
        slots[usize::from(index)] = Some(conn.into_stream());
        missing -= 1;
    }
    let _ = listener.set_nonblocking(false);
    Ok(slots.into_iter().flatten().collect())
}

/// Waits until `deadline` for a new connection on `listener`.
fn listener_control(
    listener: &TcpListener,
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<Option<TcpStream>, TransportError> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("configuring the listener"))?;
    let accepted = loop {
        interrupt.check()?;
        match listener.accept() {
            Ok((sock, _)) => break Some(sock),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("accepting a control connection")(e)),
        }
    };
    let _ = listener.set_nonblocking(false);
    if let Some(sock) = &accepted {
        sock.set_nonblocking(false)
            .map_err(io_err("configuring a control connection"))?;
    }
    Ok(accepted)
}

impl DestTransport for TcpDest {
    type Control = TcpControl;
    type Rx = TcpRx;

    fn control(&mut self) -> &mut TcpControl {
        &mut self.control
    }

    fn accept_streams(
        &mut self,
        n: usize,
        session: &Session,
        _memory: &DestMemory,
    ) -> Result<Vec<TcpRx>, TransportError> {
        Ok(self
            .accept_stream_conns(n, session)?
            .into_iter()
            .map(|conn| TcpRx {
                conn,
                buf: vec![0u8; RX_BUF].into_boxed_slice(),
                start: 0,
                end: 0,
                deadline: Instant::now(),
            })
            .collect())
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    fn accept_control(&mut self, deadline: Instant) -> Result<bool, TransportError> {
        let sock = match &self.incoming {
            Incoming::Listener(l) => listener_control(l, deadline, &self.interrupt)?,
            Incoming::Service(route) => route.control(deadline, &self.interrupt)?,
        };
        let Some(sock) = sock else {
            return Ok(false);
        };
        self.control = TcpControl {
            conn: Conn::new(sock, self.interrupt.clone(), self.opts.io_timeout)?,
        };
        Ok(true)
    }
}

/// The receiving half of one data connection.
#[derive(Debug)]
pub struct TcpRx {
    conn: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// By when the record under way must be complete.
    deadline: Instant,
}

impl StreamRx for TcpRx {
    fn next_header(&mut self, page_size: u32) -> Result<Header, TransportError> {
        if self.end == self.start {
            // Idle between records: as long as the control exchange lives.
            self.start = 0;
            self.end = self.conn.read_some_by(&mut self.buf, None)?;
        }
        // A record began: all of it must arrive within the timeout.
        self.deadline = Instant::now() + self.conn.timeout();
        if self.end - self.start < HEADER_LEN {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < HEADER_LEN {
                self.end += self
                    .conn
                    .read_some_by(&mut self.buf[self.end..], Some(self.deadline))?;
            }
        }
        let head: &[u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
            .try_into()
            .map_err(|_| ProtocolError::Truncated {
                needed: HEADER_LEN,
                had: 0,
            })?;
        let h = Header::decode(head, page_size)?;
        self.start += HEADER_LEN;
        Ok(h)
    }

    fn read_payload(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let buffered = (self.end - self.start).min(dst.len());
        dst[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        // The rest goes straight from the socket into `dst` (guest memory).
        self.conn
            .read_exact_by(&mut dst[buffered..], Some(self.deadline))
    }
}
