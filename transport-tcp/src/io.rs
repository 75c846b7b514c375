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
/// to check the endpoint's interrupt and fails once the peer stalls.
#[derive(Debug)]
pub struct Conn {
    sock: TcpStream,
    interrupt: Interrupt,
    /// Fail after this long without progress.
    stall: Duration,
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
        stall: Duration,
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
            stall,
        })
    }

    pub fn set_timeout(&mut self, stall: Duration) {
        self.stall = stall;
    }

    pub(crate) fn check_interrupt(&self) -> Result<(), TransportError> {
        if self.interrupt.is_triggered() {
            let _ = self.sock.shutdown(Shutdown::Both);
        }
        self.interrupt.check()
    }

    fn stalled(&self, since: Instant, what: &'static str) -> Result<(), TransportError> {
        self.check_interrupt()?;
        if since.elapsed() > self.stall {
            return Err(TransportError::Io {
                context: what,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no progress for {:?}", self.stall),
                ),
            });
        }
        Ok(())
    }

    /// Reads at least one byte into `buf`.
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let since = Instant::now();
        loop {
            match self.sock.read(buf) {
                Ok(0) => return Err(TransportError::Disconnected),
                Ok(n) => return Ok(n),
                Err(e) if would_block(&e) => self.stalled(since, "waiting for the peer to send")?,
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

    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.read_some(buf)?;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Writes every byte of `bufs`, vectored.
    pub fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), TransportError> {
        let mut since = Instant::now();
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.sock.write_vectored(bufs) {
                Ok(0) => return Err(TransportError::Disconnected),
                Ok(n) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    since = Instant::now();
                }
                Err(e) if would_block(&e) => {
                    self.stalled(since, "waiting for the peer to receive")?
                }
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
