//! The handshake, both halves: the source's [`offer`] and the destination's
//! [`answer`], mirror images over one control exchange.
//!
//! ```text
//!  source (offer)                                 destination (answer)
//!   Hello {versions, granularity, streams,  --->  magic, version range, features,
//!          features, layout, nonce_s, MAC}        streams, layout (own + limits),
//!                                                 MAC: else Error, nothing allocated
//!   check MAC, version, features  <---  Welcome {version, features, nonce_d, MAC}
//!   Proof {MAC(nonce_s, nonce_d)}           --->  check: the session is open
//! ```
//!
//! Both ends leave with the same [`Session`] (it binds the data streams) and
//! the agreed features. See [`crate::auth`] for what the MACs prove. The
//! destination allocates nothing for the guest before `answer` succeeds.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::auth::{self, Secret, Session};
use crate::memory::Layout;
use crate::protocol::{
    self, encode_record, Granularity, GuestInfo, Hello, Kind, ProtocolError, Welcome, FEATURE_ZSTD,
    KNOWN_FEATURES,
};
use crate::transport::{Control, TransportError};

/// Why a handshake failed, on either side.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// the control exchange failed
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// the peer's offer or answer is not acceptable
    #[error("refused: {0}")]
    Refused(ProtocolError),
    /// the peer could not prove it holds the token
    #[error("the {0} failed authentication (wrong or missing token)")]
    Auth(&'static str),
    /// the source's guest is larger than this destination accepts
    #[error(
        "the source's guest has {bytes} bytes of memory, this destination accepts at most {max}"
    )]
    TooLarge { bytes: u64, max: u64 },
    /// the peer sent an Error record
    #[error("peer reported: {0}")]
    Peer(String),
    /// this destination cannot host the source's guest
    #[error("this destination cannot host the guest: {0}")]
    Admit(String),
    /// the connection brought a source's decision again, not a Hello: a
    /// source in doubt asking what became of its guest (the payload is the
    /// Decision's, for [`crate::land::answer_from_journal`])
    #[error("a decision delivered again, not a new migration")]
    Redelivered(Vec<u8>),
}

/// What the source offers.
#[derive(Clone, Debug)]
pub struct Offer<'a> {
    /// The newest version to offer (normally [`protocol::VERSION`]).
    pub version: u16,
    pub granularity: Granularity,
    pub streams: u16,
    /// Feature bits (protocol::FEATURE_*).
    pub features: u32,
    pub layout: &'a Layout,
    pub secret: &'a Secret,
    pub guest: GuestInfo,
    pub verify: crate::verify::VerifyMode,
}

/// What a destination accepts.
#[derive(Clone, Debug)]
pub struct Terms {
    pub max_streams: u16,
    /// Feature bits this destination can serve.
    pub features: u32,
    /// The shared secret the source must prove it holds.
    pub secret: Secret,
    /// Largest guest this destination will allocate memory for.
    pub max_memory: u64,
    /// Refuse a guest larger than the memory this host has available now
    /// (`MemAvailable`): for a destination that allocates after the
    /// handshake.
    pub check_free_memory: bool,
    /// The newest protocol version to agree to (normally
    /// [`protocol::VERSION`]; a test may speak an older one).
    pub max_version: u16,
}

impl Default for Terms {
    fn default() -> Self {
        Terms {
            max_streams: protocol::MAX_STREAMS,
            features: KNOWN_FEATURES,
            secret: Secret::none(),
            max_memory: 1 << 40,
            check_free_memory: false,
            max_version: protocol::VERSION,
        }
    }
}

/// What both ends agreed.
#[derive(Clone, Debug)]
pub struct Agreed {
    pub version: u16,
    /// The features both ends use.
    pub features: u32,
    pub session: Session,
}

impl Agreed {
    pub fn zstd(&self) -> bool {
        self.features & FEATURE_ZSTD != 0
    }
}

/// A source that passed the handshake: its offer, and what was agreed.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub hello: Hello,
    pub agreed: Agreed,
}

/// The source's half: sends the Hello, checks the Welcome (within `io`),
/// proves the token.
pub fn offer<C: Control>(
    control: &mut C,
    o: &Offer<'_>,
    io: Duration,
) -> Result<Agreed, HandshakeError> {
    let nonce_s = auth::nonce();
    let hello = Hello {
        version: o.version.clamp(protocol::MIN_VERSION, protocol::VERSION),
        min_version: protocol::MIN_VERSION,
        granularity: o.granularity,
        streams: o.streams,
        features: o.features,
        layout: o.layout.clone(),
        nonce: nonce_s,
        auth: o.secret.hello(&nonce_s),
        guest: o.guest.clone(),
        verify: o.verify,
    };
    control.send(&hello.encode())?;
    let reply = control.recv(Instant::now() + io)?;
    let welcome = match reply.header.kind {
        Kind::Welcome => Welcome::decode(&reply.payload).map_err(HandshakeError::Refused)?,
        Kind::Error => return Err(peer_error(&reply.payload)),
        got => {
            return Err(HandshakeError::Refused(ProtocolError::Unexpected {
                got,
                expected: "Welcome",
            }))
        }
    };
    if !(protocol::MIN_VERSION..=hello.version).contains(&welcome.version) {
        return Err(HandshakeError::Refused(ProtocolError::Version {
            peer_min: welcome.version,
            peer_max: welcome.version,
        }));
    }
    if !Secret::verify(o.secret.welcome(&nonce_s, &welcome.nonce), &welcome.auth) {
        return Err(HandshakeError::Auth("destination"));
    }
    if welcome.features & !o.features != 0 {
        return Err(HandshakeError::Refused(ProtocolError::Features(
            welcome.features & !o.features,
        )));
    }
    let proof = o.secret.proof(&nonce_s, &welcome.nonce);
    control.send(&encode_record(Kind::Proof, 0, 0, &proof))?;
    Ok(Agreed {
        version: welcome.version,
        features: welcome.features,
        session: o.secret.session(nonce_s, welcome.nonce),
    })
}

/// The destination's half: checks the Hello (version, magic, features,
/// stream count, guest size, the token and, with `expected`, the layout),
/// asks `admit` whether this host can run the guest, sends the Welcome and
/// checks the Proof, all by `deadline` (a stranger gets no longer). Nothing
/// is allocated for the guest before this succeeds.
pub fn answer<C: Control>(
    control: &mut C,
    terms: &Terms,
    expected: Option<&Layout>,
    deadline: Instant,
    admit: &mut dyn FnMut(&GuestInfo) -> Result<(), String>,
) -> Result<Accepted, HandshakeError> {
    let refused = HandshakeError::Refused;
    let first = control.recv(deadline)?;
    if first.header.kind == Kind::Decision {
        return Err(HandshakeError::Redelivered(first.payload));
    }
    if first.header.kind != Kind::Hello {
        return Err(refused(ProtocolError::Unexpected {
            got: first.header.kind,
            expected: "Hello",
        }));
    }
    let hello = Hello::decode(&first.payload).map_err(refused)?;
    if !Secret::verify(terms.secret.hello(&hello.nonce), &hello.auth) {
        return Err(HandshakeError::Auth("source"));
    }
    if hello.streams > terms.max_streams {
        return Err(refused(ProtocolError::Streams(hello.streams)));
    }
    if let Some(ours) = expected.filter(|l| **l != hello.layout) {
        return Err(refused(layout_mismatch(&hello.layout, ours)));
    }
    if hello.layout.total_bytes() > terms.max_memory {
        return Err(HandshakeError::TooLarge {
            bytes: hello.layout.total_bytes(),
            max: terms.max_memory,
        });
    }
    if terms.check_free_memory {
        if let Some(free) = available_memory() {
            if hello.layout.total_bytes() > free {
                return Err(HandshakeError::Admit(format!(
                    "the guest has {} bytes of memory and this host {} available",
                    hello.layout.total_bytes(),
                    free
                )));
            }
        }
    }
    admit(&hello.guest).map_err(HandshakeError::Admit)?;
    let features = hello.features & terms.features;
    let nonce_d = auth::nonce();
    let version = hello.agreed_version().min(terms.max_version);
    if hello.min_version > version {
        return Err(refused(ProtocolError::Version {
            peer_min: hello.min_version,
            peer_max: hello.version,
        }));
    }
    let welcome = Welcome {
        version,
        features,
        nonce: nonce_d,
        auth: terms.secret.welcome(&hello.nonce, &nonce_d),
    };
    control.send(&welcome.encode())?;
    let proof = control.recv(deadline)?;
    match proof.header.kind {
        Kind::Proof
            if Secret::verify(terms.secret.proof(&hello.nonce, &nonce_d), &proof.payload) => {}
        Kind::Proof => return Err(HandshakeError::Auth("source")),
        Kind::Error => return Err(peer_error(&proof.payload)),
        got => {
            return Err(refused(ProtocolError::Unexpected {
                got,
                expected: "Proof",
            }))
        }
    }
    let session = terms.secret.session(hello.nonce, nonce_d);
    Ok(Accepted {
        agreed: Agreed {
            version: welcome.version,
            features,
            session,
        },
        hello,
    })
}

/// This host's `MemAvailable`, if it can be read.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The refusal of a source whose layout differs from the destination's.
pub fn layout_mismatch(source: &Layout, dest: &Layout) -> ProtocolError {
    ProtocolError::Layout {
        source_layout: format!("{source:?}"),
        dest_layout: format!("{dest:?}"),
    }
}

fn peer_error(payload: &[u8]) -> HandshakeError {
    HandshakeError::Peer(String::from_utf8_lossy(payload).into_owned())
}
