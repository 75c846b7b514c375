//! Receiving: one lander thread per data stream, and the control exchange
//! beside them, until the source's Complete and every stream's final round.
//! The mirror image of the source's worker pool ([`crate::precopy`]).

use super::lander::{GuestPages, StreamLander};
use super::{ApplyError, LandError, LandStats};
use crate::memory::{DestMemory, Layout};
use crate::protocol::{Kind, ProtocolError, DIGEST_LEN, FLAG_HAS_DIGEST};
use crate::transport::{Control, DestTransport, Interrupt, StreamRx, TransportError};

/// The vCPU state record: the vCPU count it announces, and its bytes.
pub(crate) type StateRecord = Option<(u32, Vec<u8>)>;
/// The Complete record: the final round, and the source's digest if it sent one.
pub(crate) type CompleteRecord = (u32, Option<[u8; DIGEST_LEN]>);

/// What the streams and the control exchange brought.
pub(crate) struct Landed {
    pub state: StateRecord,
    pub complete: CompleteRecord,
    pub stats: LandStats,
    /// BLAKE3 of all guest memory once every stream ended (with the source
    /// asking for verification), computed while the source digests its own.
    pub digest: [u8; DIGEST_LEN],
}

/// Lands every stream of `rxs` into `memory` until each delivered its final
/// round, while reading State and Complete from the control connection.
pub(crate) fn land_all<T: DestTransport>(
    transport: &mut T,
    rxs: Vec<T::Rx>,
    memory: &DestMemory,
    layout: &Layout,
    zstd: bool,
) -> Result<Landed, LandError> {
    let streams = rxs.len();
    let pages = GuestPages::new(memory);
    let interrupt = transport.interrupt();
    let control = transport.control();
    std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(i, mut rx)| {
                let mut lander = StreamLander::new(i, streams, layout, &pages, zstd);
                let interrupt = interrupt.clone();
                scope.spawn(move || {
                    run_stream(&mut lander, &mut rx, &interrupt)
                        .map(|last| (last, lander.stats))
                        .map_err(|e| (lander.next_round, e))
                })
            })
            .collect();
        // The control exchange runs beside the streams, so the digest below
        // can start as soon as the last stream ends, while the source is
        // still digesting its own memory.
        let control = {
            let interrupt = interrupt.clone();
            scope.spawn(move || {
                let r = control_until_complete(control);
                if r.is_err() {
                    interrupt.trigger();
                }
                r
            })
        };
        let mut stats = LandStats::default();
        let mut finals = Vec::with_capacity(streams);
        let mut stream_err = None;
        let mut interrupted = false;
        for (stream, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok((last, s))) => {
                    finals.push(last);
                    stats += s;
                }
                Ok(Err((_, ApplyError::Transport(TransportError::Interrupted)))) => {
                    interrupted = true
                }
                Ok(Err((round, cause))) => {
                    // Name the furthest round a failing stream reached: how
                    // far the destination got (a lagging stream that was
                    // merely reset says less).
                    let further = match &stream_err {
                        Some(LandError::Stream { round: r, .. }) => round > *r,
                        _ => true,
                    };
                    if further {
                        stream_err = Some(LandError::Stream {
                            stream,
                            round,
                            cause,
                        });
                    }
                }
                Err(_) => {
                    stream_err
                        .get_or_insert(LandError::Peer(format!("stream {stream} thread panicked")));
                }
            }
        }
        // A stream's own error is the root cause; the control error it caused is not.
        if let Some(e) = stream_err {
            interrupt.trigger();
            let _ = control.join();
            return Err(e);
        }
        if interrupted {
            // The control exchange failed first; its error is the cause.
            let control = control
                .join()
                .map_err(|_| LandError::Peer("control thread panicked".into()))?;
            return Err(control
                .err()
                .unwrap_or(LandError::Control(TransportError::Interrupted)));
        }
        // SAFETY: every lander thread has been joined and the guest has not
        // been started, so nothing writes guest memory during the digest.
        let digest = unsafe { crate::memory::digest(memory) };
        let (state, complete) = control
            .join()
            .map_err(|_| LandError::Peer("control thread panicked".into()))??;
        for (stream, &last) in finals.iter().enumerate() {
            if last != complete.0 {
                return Err(LandError::FinalRound {
                    stream,
                    expected: complete.0,
                    got: last,
                });
            }
        }
        Ok(Landed {
            state,
            complete,
            stats,
            digest,
        })
    })
}

/// Reads control records until Complete: keeps the State, stops on Error.
fn control_until_complete<C: Control>(
    control: &mut C,
) -> Result<(StateRecord, CompleteRecord), LandError> {
    let mut state = None;
    loop {
        let r = control.recv()?;
        match r.header.kind {
            Kind::State => {
                let vcpus = u32::try_from(r.header.arg).map_err(|_| ProtocolError::Unexpected {
                    got: Kind::State,
                    expected: "a vCPU count",
                })?;
                state = Some((vcpus, r.payload));
            }
            Kind::Complete => {
                let round = u32::try_from(r.header.arg).map_err(|_| ProtocolError::Unexpected {
                    got: Kind::Complete,
                    expected: "a round",
                })?;
                let digest = (r.header.flags & FLAG_HAS_DIGEST != 0)
                    .then(|| <[u8; DIGEST_LEN]>::try_from(&r.payload[..]).ok())
                    .flatten();
                return Ok((state, (round, digest)));
            }
            Kind::Error => {
                return Err(LandError::Peer(
                    String::from_utf8_lossy(&r.payload).into_owned(),
                ))
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "State, Complete or Error",
                }
                .into())
            }
        }
    }
}

/// Lands one stream until its final round; returns that round.
fn run_stream(
    lander: &mut StreamLander<'_>,
    rx: &mut dyn StreamRx,
    interrupt: &Interrupt,
) -> Result<u32, ApplyError> {
    let result = loop {
        match lander.step(rx) {
            Ok(Some(end)) if end.last => break Ok(end.round),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    if matches!(result, Err(ref e) if !matches!(e, ApplyError::Transport(TransportError::Interrupted)))
    {
        // Unblock the control loop and the other streams.
        interrupt.trigger();
    }
    result
}
