//! The transport conformance suite on a real verbs device: guest memory by
//! RDMA, the handshake, state and commit over TCP through the
//! fault-injecting proxy, whose cut takes the TCP connections (control and
//! each stream's liveness connection) away.
//!
//! The device comes from `HPMIG_RDMA_DEVICE` (the soft-RoCE harness,
//! `ci/softroce/run.sh`, sets it to its rxe0, so these run there on every
//! CI run). Without the variable they print why they did nothing.

#![cfg(feature = "rdma")]
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use hpmig_core::testing::conformance::{Link, Wire};
use hpmig_core::testing::proxy::Proxy;
use hpmig_transport_rdma::{RdmaDest, RdmaOptions, RdmaSource};
use hpmig_transport_tcp::TcpOptions;

struct Rdma;

fn options(dev: &str) -> RdmaOptions {
    let mut o = RdmaOptions::new(dev);
    // Soft-RoCE under software emulation is slow; stalls still fail.
    o.tcp = TcpOptions {
        io_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(20),
    };
    o
}

fn device() -> String {
    std::env::var("HPMIG_RDMA_DEVICE").unwrap_or_default()
}

impl Wire for Rdma {
    type Src = RdmaSource;
    type Dst = RdmaDest;

    fn available(&self) -> bool {
        if device().is_empty() {
            eprintln!(
                "HPMIG_RDMA_DEVICE is not set: no verbs device to test on (run ci/softroce/run.sh)"
            );
            return false;
        }
        true
    }

    fn memory_mib(&self) -> usize {
        16
    }

    fn link(&self, cut_after: Option<u64>) -> Link<RdmaSource, RdmaDest> {
        let dev = device();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy::start(listener.local_addr().unwrap(), None, false).unwrap();
        let (addr, watched) = (proxy.addr(), proxy.clone());
        let dest_dev = dev.clone();
        Link {
            dest: Box::new(move || RdmaDest::accept(listener, options(&dest_dev))),
            source: Box::new(move || {
                let t = RdmaSource::connect(addr, options(&dev))?;
                if let Some(limit) = cut_after {
                    // Data does not cross the proxy: count it where it is
                    // posted, and take the link away once enough went.
                    let stats = t.stats();
                    thread::spawn(move || {
                        let deadline = Instant::now() + Duration::from_secs(120);
                        while stats.in_place_bytes.load(Ordering::Relaxed)
                            + stats.staged_bytes.load(Ordering::Relaxed)
                            < limit
                            && Instant::now() < deadline
                        {
                            thread::sleep(Duration::from_millis(1));
                        }
                        watched.cut_all();
                    });
                }
                Ok(t)
            }),
            cut: Box::new(move || proxy.cut_all()),
        }
    }
}

hpmig_core::conformance_suite!(Rdma);
