//! The transport conformance suite over real TCP sockets on loopback, the
//! link running through the fault-injecting proxy.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::Duration;

use hpmig_core::testing::conformance::{Link, Wire};
use hpmig_core::testing::proxy::{Action, Plan, Proxy, Which};
use hpmig_transport_tcp::{TcpDest, TcpOptions, TcpSource};

fn opts() -> TcpOptions {
    TcpOptions {
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
    }
}

struct Tcp;

impl Wire for Tcp {
    type Src = TcpSource;
    type Dst = TcpDest;

    fn link(&self, cut_after: Option<u64>) -> Link<TcpSource, TcpDest> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = cut_after.map(|at| Plan {
            which: Which::AllData,
            at,
            action: Action::CutAll,
        });
        let proxy = Proxy::start(listener.local_addr().unwrap(), plan, false).unwrap();
        let addr = proxy.addr();
        Link {
            dest: Box::new(move || TcpDest::accept(listener, opts())),
            source: Box::new(move || TcpSource::connect(addr, opts())),
            cut: Box::new(move || proxy.cut_all()),
        }
    }
}

hpmig_core::conformance_suite!(Tcp);
