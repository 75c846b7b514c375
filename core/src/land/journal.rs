//! The destination's session journal: what it did with each acknowledged
//! copy, written durably *before* it acts, so that a destination restarted
//! after a crash answers a source redelivering its decision truthfully.
//!
//! The events of one session, in order: `Acknowledged` (its verified copy
//! was acknowledged; the session's nonces are kept, so the restarted
//! destination can check and sign records for it), then at most one of
//! `Started` (the vCPUs are about to start, with the time) or `Discarded`.
//! A session whose last event is `Acknowledged` had its copy lost with the
//! process: it never ran, so the source may resume its guest.
//!
//! [`FileJournal`] keeps one small file per session in a directory and
//! fsyncs the file and the directory on every event.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::auth::SessionId;

/// One event of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalEvent {
    /// The copy was acknowledged; the session's nonces (source's, then
    /// destination's).
    Acknowledged { nonces: ([u8; 16], [u8; 16]) },
    /// The vCPUs started at this time (ns since the Unix epoch).
    Started { at: u64 },
    /// The copy was discarded.
    Discarded,
}

/// What the journal knows of a session: its nonces and last event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub nonces: ([u8; 16], [u8; 16]),
    pub last: JournalEvent,
}

/// Durable storage of session events.
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// Records `event` for `session`; returns only once it is durable.
    fn record(&self, session: SessionId, event: JournalEvent) -> std::io::Result<()>;
    /// What is known of `session`, if anything.
    fn lookup(&self, session: SessionId) -> std::io::Result<Option<SessionRecord>>;
}

/// A directory of session files, fsynced on every event.
#[derive(Debug)]
pub struct FileJournal {
    dir: PathBuf,
}

const ACK: u8 = b'A';
const STARTED: u8 = b'S';
const DISCARDED: u8 = b'D';

impl FileJournal {
    /// A journal in `dir`, created if missing (mode 0700).
    pub fn open(dir: impl AsRef<Path>) -> std::io::Result<FileJournal> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.as_ref().to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(FileJournal { dir })
    }

    fn path(&self, session: SessionId) -> PathBuf {
        self.dir.join(format!("{session}.session"))
    }
}

impl Journal for FileJournal {
    fn record(&self, session: SessionId, event: JournalEvent) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(40);
        match event {
            JournalEvent::Acknowledged { nonces } => {
                line.push(ACK);
                line.extend_from_slice(&nonces.0);
                line.extend_from_slice(&nonces.1);
            }
            JournalEvent::Started { at } => {
                line.push(STARTED);
                line.extend_from_slice(&at.to_le_bytes());
            }
            JournalEvent::Discarded => line.push(DISCARDED),
        }
        let path = self.path(session);
        let fresh = !path.exists();
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(&line)?;
        f.sync_all()?;
        if fresh {
            // The new file's name must be durable too.
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    fn lookup(&self, session: SessionId) -> std::io::Result<Option<SessionRecord>> {
        let mut bytes = Vec::new();
        match File::open(self.path(session)) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt session file");
        let mut rec: Option<SessionRecord> = None;
        let mut at = 0;
        while at < bytes.len() {
            let kind = bytes[at];
            at += 1;
            let take = |at: &mut usize, n: usize| -> std::io::Result<&[u8]> {
                let s = bytes.get(*at..*at + n).ok_or_else(bad)?;
                *at += n;
                Ok(s)
            };
            match kind {
                ACK => {
                    let mut ns = [0u8; 16];
                    let mut nd = [0u8; 16];
                    ns.copy_from_slice(take(&mut at, 16)?);
                    nd.copy_from_slice(take(&mut at, 16)?);
                    let nonces = (ns, nd);
                    rec = Some(SessionRecord {
                        nonces,
                        last: JournalEvent::Acknowledged { nonces },
                    });
                }
                STARTED | DISCARDED => {
                    let r = rec.as_mut().ok_or_else(bad)?;
                    r.last = if kind == STARTED {
                        let mut t = [0u8; 8];
                        t.copy_from_slice(take(&mut at, 8)?);
                        JournalEvent::Started {
                            at: u64::from_le_bytes(t),
                        }
                    } else {
                        JournalEvent::Discarded
                    };
                }
                _ => return Err(bad()),
            }
        }
        Ok(rec)
    }
}

/// A journal in this process's memory: what [`FileJournal`] keeps, minus
/// the durability (a restarted process knows nothing). For tests, and for
/// an embedder whose destination outlives its sessions anyway.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    sessions: std::sync::Mutex<std::collections::HashMap<SessionId, SessionRecord>>,
}

impl Journal for MemoryJournal {
    fn record(&self, session: SessionId, event: JournalEvent) -> std::io::Result<()> {
        let mut all = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            JournalEvent::Acknowledged { nonces } => {
                all.insert(
                    session,
                    SessionRecord {
                        nonces,
                        last: event,
                    },
                );
            }
            _ => match all.get_mut(&session) {
                Some(r) => r.last = event,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "an event for a session never acknowledged",
                    ))
                }
            },
        }
        Ok(())
    }

    fn lookup(&self, session: SessionId) -> std::io::Result<Option<SessionRecord>> {
        Ok(self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .copied())
    }
}

/// Now, in ns since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_reads_back_its_last_event() {
        let dir = std::env::temp_dir().join(format!("hpmig-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = FileJournal::open(&dir).unwrap();
        let (a, b) = (SessionId([1; 16]), SessionId([2; 16]));
        let nonces = ([3; 16], [4; 16]);
        assert_eq!(j.lookup(a).unwrap(), None);
        j.record(a, JournalEvent::Acknowledged { nonces }).unwrap();
        j.record(b, JournalEvent::Acknowledged { nonces }).unwrap();
        assert_eq!(
            j.lookup(a).unwrap().unwrap().last,
            JournalEvent::Acknowledged { nonces }
        );
        j.record(a, JournalEvent::Started { at: 99 }).unwrap();
        j.record(b, JournalEvent::Discarded).unwrap();
        // A second journal on the same directory: a restarted destination.
        let again = FileJournal::open(&dir).unwrap();
        let ra = again.lookup(a).unwrap().unwrap();
        assert_eq!(
            (ra.nonces, ra.last),
            (nonces, JournalEvent::Started { at: 99 })
        );
        assert_eq!(
            again.lookup(b).unwrap().unwrap().last,
            JournalEvent::Discarded
        );
        std::fs::write(dir.join(format!("{a}.session")), b"Z").unwrap();
        assert!(
            again.lookup(a).is_err(),
            "a corrupt file is an error, not a guess"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
