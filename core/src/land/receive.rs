//! Receiving: one lander thread per data stream, and the control exchange
//! beside them, until the source's Complete and every stream's final round.
//! The mirror image of the source's worker pool ([`crate::precopy`]).
//!
//! Drain (protocol version 3): each lander publishes the last round it
//! landed whole (its RoundEnd and every record before it applied and
//! hashed); a Drain for round r on the control connection is answered with
//! Drained once every stream's published round is at least r, so the
//! source pauses its guest only once the destination has nothing of the
//! guest-running rounds left to land.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use super::lander::{GuestPages, StreamLander};
use super::{ApplyError, LandError, LandFault, LandStats};
use crate::memory::{DestMemory, Layout};
use crate::precopy::live::{ByteKinds, Live};
use crate::protocol::{self, Kind, ProtocolError, DIGEST_LEN, FLAG_HAS_DIGEST, FLAG_INCREMENTAL};
use crate::transport::{
    with_keepalive, Control, Deadlines, DestTransport, Interrupt, StreamRx, TransportError,
};
use crate::verify::PageHasher;
use std::sync::Arc;

/// Records a stream lands between two publications of its progress (64
/// whole pages: about one of the source's ring slots).
const PUBLISH_EVERY: u32 = 64;
/// How often a Drain looks whether every stream landed its round.
const DRAIN_POLL: Duration = Duration::from_micros(100);

/// The vCPU state record: the vCPU count it announces, and its bytes.
pub(crate) type StateRecord = Option<(u32, Vec<u8>)>;
/// The Complete record: the final round, the source's digest if it sent
/// one, and whether that digest is of the ledger (incremental).
pub(crate) type CompleteRecord = (u32, Option<[u8; DIGEST_LEN]>, bool);

/// How the landed memory is checked: per-page ledgers (incremental), or a
/// digest of all of it once the streams end (strict), and a test fault.
#[derive(Clone, Debug, Default)]
pub(crate) struct Check {
    /// Each control record within this of the one before.
    pub io: Duration,
    /// Say Alive while digesting (version 2 peers).
    pub alive: Option<Deadlines>,
    /// The source may ask for a drain (version 3 peers).
    pub drain: bool,
    pub hasher: Option<Arc<PageHasher>>,
    pub full_digest: bool,
    pub fault: Option<LandFault>,
    /// Where the streams publish what they landed.
    pub live: Arc<Live>,
}

/// What the streams and the control exchange brought.
pub(crate) struct Landed {
    pub state: StateRecord,
    pub complete: CompleteRecord,
    pub stats: LandStats,
    /// BLAKE3 of all guest memory once every stream ended (strict
    /// verification), computed while the source digests its own.
    pub digest: Option<[u8; DIGEST_LEN]>,
}

/// Lands every stream of `rxs` into `memory` until each delivered its final
/// round, while reading State and Complete from the control connection,
/// each record within `io` (the source's Alive records keep it alive: when
/// it goes silent, the streams are interrupted). With `alive`, this end
/// says Alive while it digests.
pub(crate) fn land_all<T: DestTransport>(
    transport: &mut T,
    rxs: Vec<T::Rx>,
    memory: &DestMemory,
    layout: &Layout,
    zstd: bool,
    check: Check,
) -> Result<Landed, LandError> {
    let (io, alive) = (check.io, check.alive);
    let live = Arc::clone(&check.live);
    let streams = rxs.len();
    let pages = GuestPages::new(memory);
    let interrupt = transport.interrupt();
    let control = transport.control();
    // Steps each stream took, for the watch after Complete: one counter per
    // stream, each on its own cache line, so landers never share one.
    let progress: Vec<Padded> = (0..streams).map(|_| Padded::default()).collect();
    // The rounds each stream landed whole, plus one (0: none yet), for the
    // drain: one counter per stream on its own cache line as well.
    let rounds: Vec<Padded> = (0..streams).map(|_| Padded::default()).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(i, mut rx)| {
                let mut lander = StreamLander::new(i, streams, layout, &pages, zstd)
                    .with_ledger(check.hasher.clone())
                    .with_fault(check.fault.filter(|_| i == 0));
                let interrupt = interrupt.clone();
                let progress = &progress[i].0;
                let landed_round = &rounds[i].0;
                let live = &*live;
                scope.spawn(move || {
                    let counters = (progress, landed_round);
                    run_stream(&mut lander, &mut rx, &interrupt, counters, live)
                        .map(|last| (last, lander.stats))
                        .map_err(|e| (lander.next_round, e))
                })
            })
            .collect();
        // The control exchange runs beside the streams, so the digest below
        // can start as soon as the last stream ends, while the source is
        // still digesting its own memory. Once Complete came, the source
        // waits for the Ack while the streams still land (and hash) the
        // final round: this end says Alive until they are done, so a final
        // round that takes longer than `io` to land is not taken for a dead
        // destination.
        let (streams_done, landing) = std::sync::mpsc::channel::<()>();
        let control = {
            let interrupt = interrupt.clone();
            let progress = &progress;
            let drain = check.drain.then(|| Drain {
                rounds: &rounds,
                progress,
                interrupt: interrupt.clone(),
                io,
                alive: alive.map(|d| d.alive_period()),
            });
            scope.spawn(move || {
                let mut r = control_until_complete(&mut *control, io, drain.as_ref());
                if r.is_err() {
                    interrupt.trigger();
                } else {
                    // The source sent all its data before Complete: a stream
                    // that lands nothing for `io` from here on is stuck.
                    let period = alive.map_or(io, |d| d.alive_period());
                    let mut stall = Stall::new(progress);
                    while let Err(RecvTimeoutError::Timeout) = landing.recv_timeout(period) {
                        if stall.stuck(io) {
                            r = Err(LandError::Peer(format!(
                                "the final round stopped arriving: no data for {io:?} after Complete"
                            )));
                            interrupt.trigger();
                            break;
                        }
                        if alive.is_some()
                            && control
                                .send(&crate::protocol::switchover::alive())
                                .is_err()
                        {
                            break;
                        }
                    }
                }
                (r, control)
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
        drop(streams_done);
        // A stream's own error is the root cause; the control error it caused is not.
        if let Some(e) = stream_err {
            interrupt.trigger();
            let _ = control.join();
            return Err(e);
        }
        let (result, control) = control
            .join()
            .map_err(|_| LandError::Peer("control thread panicked".into()))?;
        if interrupted {
            // The control exchange failed first; its error is the cause.
            return Err(result
                .err()
                .unwrap_or(LandError::Control(TransportError::Interrupted)));
        }
        let (state, complete) = result?;
        let period = alive.map_or(io, |d| d.alive_period());
        let digest = if check.full_digest {
            Some(with_keepalive(control, alive.is_some(), period, || {
                // SAFETY: every lander thread has been joined and the guest
                // has not been started, so nothing writes guest memory
                // meanwhile.
                unsafe { crate::memory::digest(memory) }
            })?)
        } else {
            None
        };
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

/// What answering a Drain watches: the streams' landed rounds and their
/// progress.
struct Drain<'a> {
    /// Per stream: the last round it landed whole, plus one.
    rounds: &'a [Padded],
    /// Per stream: the steps it took (moving while it lands).
    progress: &'a [Padded],
    interrupt: Interrupt,
    /// No stream may go this long without a step while one still lands
    /// the round.
    io: Duration,
    /// Say Alive this often while waiting (version 2 and later).
    alive: Option<Duration>,
}

impl Drain<'_> {
    /// Whether every stream landed `round` whole.
    fn landed(&self, round: u32) -> bool {
        let want = u64::from(round) + 1;
        self.rounds
            .iter()
            .all(|c| c.0.load(Ordering::Acquire) >= want)
    }

    /// Waits until every stream landed `round`, then sends Drained. While
    /// a stream still lands, this end says Alive (the source's wait stays
    /// alive); no step on any stream for `io` is a stuck stream, and a
    /// stream's failure (the interrupt) ends the wait. The source's Alive
    /// records meanwhile wait in the connection.
    fn answer<C: Control + ?Sized>(&self, control: &mut C, round: u32) -> Result<(), LandError> {
        let mut stall = Stall::new(self.progress);
        let mut alive_due = self.alive.map(|p| Instant::now() + p);
        while !self.landed(round) {
            self.interrupt.check()?;
            if stall.stuck(self.io) {
                return Err(TransportError::TimedOut {
                    what: "data of the round to drain",
                    after: self.io,
                }
                .into());
            }
            if let (Some(due), Some(period)) = (alive_due, self.alive) {
                if Instant::now() >= due {
                    control.send(&protocol::switchover::alive())?;
                    alive_due = Some(Instant::now() + period);
                }
            }
            std::thread::sleep(DRAIN_POLL);
        }
        control.send(&protocol::drained(round))?;
        Ok(())
    }
}

/// Reads control records until Complete, each within `io`: keeps the
/// State, answers a Drain (`drain`, version 3), stops on Error.
fn control_until_complete<C: Control + ?Sized>(
    control: &mut C,
    io: Duration,
    drain: Option<&Drain<'_>>,
) -> Result<(StateRecord, CompleteRecord), LandError> {
    let mut state = None;
    loop {
        let r = control.recv_live(io)?;
        match r.header.kind {
            Kind::Drain => {
                let Some(drain) = drain else {
                    return Err(ProtocolError::Unexpected {
                        got: Kind::Drain,
                        expected: "State, Complete or Error (Drain is version 3)",
                    }
                    .into());
                };
                let round = u32::try_from(r.header.arg).map_err(|_| ProtocolError::Unexpected {
                    got: Kind::Drain,
                    expected: "a round",
                })?;
                drain.answer(control, round)?;
            }
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
                let incremental = r.header.flags & FLAG_INCREMENTAL != 0;
                return Ok((state, (round, digest, incremental)));
            }
            Kind::Error => {
                return Err(LandError::Peer(
                    String::from_utf8_lossy(&r.payload).into_owned(),
                ))
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "State, Drain, Complete or Error",
                }
                .into())
            }
        }
    }
}

/// Lands one stream until its final round; returns that round.
/// A counter alone on its cache line.
#[derive(Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// Watches the streams' step counters: stuck once none of them moved for a
/// while (the watch after Complete, and a Drain's wait).
struct Stall<'a> {
    progress: &'a [Padded],
    /// The steps last seen, and when they last changed.
    seen: u64,
    moved: Instant,
}

impl<'a> Stall<'a> {
    fn new(progress: &'a [Padded]) -> Stall<'a> {
        Stall {
            progress,
            seen: Stall::steps(progress),
            moved: Instant::now(),
        }
    }

    /// The steps all streams took so far.
    fn steps(progress: &[Padded]) -> u64 {
        progress.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// Whether no stream took a step for `io` (looked at now).
    fn stuck(&mut self, io: Duration) -> bool {
        let now = Stall::steps(self.progress);
        if now != self.seen {
            (self.seen, self.moved) = (now, Instant::now());
            return false;
        }
        self.moved.elapsed() >= io
    }
}

fn run_stream(
    lander: &mut StreamLander<'_>,
    rx: &mut dyn StreamRx,
    interrupt: &Interrupt,
    (progress, landed_round): (&AtomicU64, &AtomicU64),
    live: &Live,
) -> Result<u32, ApplyError> {
    // What this stream told the watchers, published every PUBLISH_EVERY
    // records and at every round's end (never per record).
    let mut told = (ByteKinds::default(), 0u64);
    let mut publish = |lander: &StreamLander<'_>| {
        let s = &lander.stats;
        let pages = s.zero_pages + s.whole_pages + s.segments;
        live.add(lander.stream, s.bytes - told.0, pages - told.1);
        told = (s.bytes, pages);
    };
    let mut steps = 0u32;
    let result = loop {
        let step = lander.step(rx);
        progress.fetch_add(1, Ordering::Relaxed);
        steps = steps.wrapping_add(1);
        match step {
            Ok(Some(end)) => {
                publish(lander);
                live.round_landed(end.round);
                // The round's records and hashes are done (the lander
                // hashes its last page before it returns a RoundEnd).
                landed_round.store(u64::from(end.round) + 1, Ordering::Release);
                if end.last {
                    break Ok(end.round);
                }
            }
            Ok(None) if steps % PUBLISH_EVERY == 0 => publish(lander),
            Ok(None) => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Header, Records, HEADER_LEN};
    use crate::transport::ControlRecord;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Records sent, each with when it left.
    type Sent = Arc<Mutex<Vec<(Instant, Header)>>>;

    /// A control connection that hands out scripted records and notes
    /// every record sent.
    struct Scripted {
        incoming: VecDeque<Vec<u8>>,
        sent: Sent,
    }

    impl Control for Scripted {
        fn send(&mut self, record: &[u8]) -> Result<(), TransportError> {
            let head: &[u8; HEADER_LEN] = record[..HEADER_LEN].try_into().unwrap();
            let h = Header::decode(head, 4096)?;
            self.sent.lock().unwrap().push((Instant::now(), h));
            Ok(())
        }

        fn recv(&mut self, _deadline: Instant) -> Result<ControlRecord, TransportError> {
            let bytes = self
                .incoming
                .pop_front()
                .ok_or(TransportError::Disconnected)?;
            let (header, payload) = Records::new(&bytes, 4096).next().unwrap()?;
            Ok(ControlRecord {
                header,
                payload: payload.to_vec(),
            })
        }
    }

    fn complete(round: u32) -> Vec<u8> {
        protocol::encode_record(Kind::Complete, 0, round.into(), &[0; DIGEST_LEN])
    }

    fn counters(n: usize) -> Vec<Padded> {
        (0..n).map(|_| Padded::default()).collect()
    }

    #[test]
    fn drained_only_after_every_stream_landed_the_round() {
        let (rounds, progress) = (counters(3), counters(3));
        let sent = Sent::default();
        let mut control = Scripted {
            incoming: [protocol::drain(2).to_vec(), complete(3)].into(),
            sent: Arc::clone(&sent),
        };
        let drain = Drain {
            rounds: &rounds,
            progress: &progress,
            interrupt: Interrupt::default(),
            io: Duration::from_secs(5),
            alive: None,
        };
        // Streams 0 and 2 landed round 2 (2 landed rounds 3 too); stream 1
        // is still in round 2 (it landed round 1) and lands it later.
        rounds[0].0.store(3, Ordering::Release);
        rounds[1].0.store(2, Ordering::Release);
        rounds[2].0.store(4, Ordering::Release);
        let last_landed = std::thread::scope(|s| {
            let answer = s.spawn(|| control_until_complete(&mut control, drain.io, Some(&drain)));
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(5));
                progress[1].0.fetch_add(1, Ordering::Relaxed);
                assert!(
                    sent.lock().unwrap().is_empty(),
                    "Drained before stream 1 landed round 2"
                );
            }
            let t = Instant::now();
            rounds[1].0.store(3, Ordering::Release);
            let (_, (round, ..)) = answer.join().unwrap().unwrap();
            assert_eq!(round, 3);
            t
        });
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let (at, h) = sent[0];
        assert_eq!((h.kind, h.arg), (Kind::Drained, 2));
        assert!(at >= last_landed);
    }

    #[test]
    fn a_stuck_stream_fails_the_drain_and_nothing_is_drained() {
        let (rounds, progress) = (counters(2), counters(2));
        rounds[0].0.store(6, Ordering::Release);
        let sent = Sent::default();
        let mut control = Scripted {
            incoming: [protocol::drain(5).to_vec(), complete(6)].into(),
            sent: Arc::clone(&sent),
        };
        let drain = Drain {
            rounds: &rounds,
            progress: &progress,
            interrupt: Interrupt::default(),
            io: Duration::from_millis(50),
            alive: Some(Duration::from_millis(10)),
        };
        let t = Instant::now();
        let r = control_until_complete(&mut control, drain.io, Some(&drain));
        assert!(
            matches!(r, Err(LandError::Control(TransportError::TimedOut { .. }))),
            "{:?}",
            r.err()
        );
        assert!(t.elapsed() >= drain.io);
        // It said Alive while it waited, never Drained.
        let sent = sent.lock().unwrap();
        assert!(!sent.is_empty() && sent.iter().all(|(_, h)| h.kind == Kind::Alive));
    }

    #[test]
    fn a_drain_from_an_older_peer_is_refused() {
        let mut control = Scripted {
            incoming: [protocol::drain(0).to_vec(), complete(1)].into(),
            sent: Sent::default(),
        };
        let r = control_until_complete(&mut control, Duration::from_secs(1), None);
        assert!(
            matches!(
                r,
                Err(LandError::Protocol(ProtocolError::Unexpected {
                    got: Kind::Drain,
                    ..
                }))
            ),
            "{:?}",
            r.err()
        );
    }
}
