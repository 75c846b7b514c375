//! What the service tests share: a service with short deadlines, the
//! source's and the destination's configuration, and one migration driven
//! from each end.

#![allow(clippy::unwrap_used, dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hpmig_core::auth::Secret;
use hpmig_core::dirty::vmm::VmmBitmap;
use hpmig_core::guest::Guest;
use hpmig_core::handshake::Terms;
use hpmig_core::land::journal::Journal;
use hpmig_core::land::{receive_accepted, DestConfig, LandError, Received};
use hpmig_core::memory::{DestMemory, Layout, SourceMemory};
use hpmig_core::precopy::{migrate, MigrateError, MigrationReport, Phase, SourceConfig};
use hpmig_core::protocol::Granularity;
use hpmig_core::testing::conformance::config;
use hpmig_core::testing::LandedScribbler;
use hpmig_core::transport::Deadlines;
use hpmig_transport_tcp::{ServiceOptions, TcpDest, TcpOptions, TcpService, TcpSource};

pub const TOKEN: &[u8] = b"the service test's token";
pub const IO: Duration = Duration::from_secs(8);

pub fn tcp() -> TcpOptions {
    TcpOptions {
        io_timeout: IO,
        connect_timeout: Duration::from_secs(5),
    }
}

pub fn terms() -> Terms {
    Terms {
        secret: Secret::from_token(TOKEN),
        ..Terms::default()
    }
}

/// A service on a fresh loopback port.
pub fn service(handshake_timeout: Duration, journal: Option<Arc<dyn Journal>>) -> TcpService {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    TcpService::bind(
        listener,
        ServiceOptions {
            tcp: tcp(),
            terms: terms(),
            handshake_timeout,
            journal,
            ..ServiceOptions::default()
        },
    )
    .unwrap()
}

/// The source's configuration: the conformance suite's policy, the token,
/// deadlines long enough that no Alive record is due in these small
/// migrations (so their control bytes are the same from run to run).
pub fn source_config() -> SourceConfig {
    let mut cfg = config(Granularity::Segment, 2);
    cfg.secret = Secret::from_token(TOKEN);
    cfg.deadlines = Deadlines {
        io: IO,
        handshake: Duration::from_secs(5),
    };
    cfg
}

pub fn dest_config(journal: Option<Arc<dyn Journal>>) -> DestConfig {
    DestConfig {
        terms: terms(),
        memory_zeroed: true,
        deadlines: Deadlines {
            io: IO,
            handshake: Duration::from_secs(5),
        },
        in_doubt_wait: Duration::from_secs(10),
        journal,
        ..DestConfig::default()
    }
}

/// One migration served from `service`: when its source authenticated,
/// how it ended, the memory it landed in and the guest.
pub struct Served {
    pub authenticated_at: Instant,
    pub result: Result<Received, LandError>,
    pub memory: DestMemory,
    pub guest: LandedScribbler,
    pub dest: TcpDest,
}

pub fn serve_one(service: &TcpService, cfg: &DestConfig, within: Duration) -> Served {
    let (accepted, mut dest) = service
        .next_migration(Some(Instant::now() + within))
        .expect("a source authenticates");
    let authenticated_at = Instant::now();
    let memory: DestMemory = accepted.hello.layout.allocate().unwrap();
    let mut guest = LandedScribbler::new();
    let result = receive_accepted(&accepted, &memory, &mut dest, cfg, &mut guest);
    Served {
        authenticated_at,
        result,
        memory,
        guest,
        dest,
    }
}

/// A source migrating `memory` to `to`.
pub fn migrate_to(
    to: SocketAddr,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
) -> (Result<MigrationReport, MigrateError>, Option<TcpSource>) {
    migrate_with(to, memory, guest, &source_config())
}

/// A source migrating `memory` to `to` with `cfg`.
pub fn migrate_with(
    to: SocketAddr,
    memory: &SourceMemory,
    guest: &mut dyn Guest,
    cfg: &SourceConfig,
) -> (Result<MigrationReport, MigrateError>, Option<TcpSource>) {
    let mut t = match TcpSource::connect(to, tcp()) {
        Ok(t) => t,
        Err(e) => {
            return (
                Err(MigrateError::Failed {
                    phase: Phase::Setup,
                    round: 0,
                    cause: e.into(),
                }),
                None,
            )
        }
    };
    let mut dirty = VmmBitmap::new(memory.clone(), Layout::of(memory).unwrap()).unwrap();
    let r = migrate(memory, &mut dirty, guest, &mut t, cfg, &mut |_| {});
    (r, Some(t))
}
