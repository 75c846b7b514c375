//! Socket I/O that gives up on interrupt or when the peer stalls.

use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hpmig_core::transport::{Interrupt, TransportError};

use crate::TcpOptions;

/// How often a blocked call wakes to check its interrupt.
pub(crate) const POLL: Duration = Duration::from_millis(100);

pub(crate) fn connect(addr: SocketAddr, opts: &TcpOptions) -> Result<TcpStream, TransportError> {
    TcpStream::connect_timeout(&addr, opts.connect_timeout).map_err(|source| TransportError::Io {
        context: "connecting to the destination",
        source,
    })
}

/// A connected socket with poll-sized timeouts: every blocking call wakes
/// to check the endpoint's interrupt, and gives up at its deadline.
#[derive(Debug)]
pub struct Conn {
    sock: TcpStream,
    interrupt: Interrupt,
    /// A write, or a read given no deadline of its own, must finish within
    /// this: a peer that trickles bytes cannot stretch it.
    timeout: Duration,
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Conn {
    pub(crate) fn new(
        sock: TcpStream,
        interrupt: Interrupt,
        timeout: Duration,
    ) -> Result<Conn, TransportError> {
        let cfg = |r: std::io::Result<()>| {
            r.map_err(|source| TransportError::Io {
                context: "configuring a connection",
                source,
            })
        };
        cfg(sock.set_nodelay(true))?;
        cfg(sock.set_read_timeout(Some(POLL)))?;
        cfg(sock.set_write_timeout(Some(POLL)))?;
        Ok(Conn {
            sock,
            interrupt,
            timeout,
        })
    }

    /// The socket, for a connection that changes hands (the destination
    /// service hands an authenticated one to its migration).
    pub(crate) fn into_stream(self) -> TcpStream {
        self.sock
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn check_interrupt(&self) -> Result<(), TransportError> {
        if self.interrupt.is_triggered() {
            let _ = self.sock.shutdown(Shutdown::Both);
        }
        self.interrupt.check()
    }

    /// Fails once `deadline` passed (or on interrupt).
    fn check(&self, deadline: Option<Instant>, what: &'static str) -> Result<(), TransportError> {
        self.check_interrupt()?;
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(TransportError::TimedOut {
                what,
                after: self.timeout,
            });
        }
        Ok(())
    }

    /// Reads at least one byte into `buf`, by `deadline` (`None`: as long
    /// as it takes, until interrupted).
    pub fn read_some_by(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, TransportError> {
        loop {
            match self.sock.read(buf) {
                Ok(0) => return Err(TransportError::Disconnected),
                Ok(n) => return Ok(n),
                Err(e) if would_block(&e) => self.check(deadline, "bytes")?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(TransportError::Disconnected)
                }
                Err(source) => {
                    return Err(TransportError::Io {
                        context: "reading from the peer",
                        source,
                    })
                }
            }
        }
    }

    /// Fills `buf` by `deadline` (`None`: until interrupted).
    pub fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.read_some_by(buf, deadline)?;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Fills `buf` within the connection's timeout.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let deadline = Instant::now() + self.timeout;
        self.read_exact_by(buf, Some(deadline))
    }

    /// Writes every byte of `bufs`, vectored, within the connection's
    /// timeout.
    pub fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), TransportError> {
        let deadline = Some(Instant::now() + self.timeout);
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.sock.write_vectored(bufs) {
                Ok(0) => return Err(TransportError::Disconnected),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if would_block(&e) => self.check(deadline, "room to send")?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(TransportError::Disconnected)
                }
                Err(source) => {
                    return Err(TransportError::Io {
                        context: "writing to the peer",
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether the peer closed (or reset) the connection, without waiting
    /// and without consuming anything it sent.
    pub fn peer_closed(&self) -> bool {
        if self.sock.set_nonblocking(true).is_err() {
            return true;
        }
        let r = self.sock.peek(&mut [0u8; 1]);
        let _ = self.sock.set_nonblocking(false);
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    /// Ends the sending side cleanly.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        let _ = self.sock.flush();
        let _ = self.sock.shutdown(Shutdown::Write);
        Ok(())
    }
}
