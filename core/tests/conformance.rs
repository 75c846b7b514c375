//! The transport conformance suite on the in-process transport: the engine
//! without a network, its link cut through [`Faults`].

#![allow(clippy::unwrap_used)]

use hpmig_core::testing::conformance::{Link, Wire};
use hpmig_core::transport::inproc::{pair, Faults, InProcDest, InProcSource};

struct InProc;

impl Wire for InProc {
    type Src = InProcSource;
    type Dst = InProcDest;

    fn link(&self, cut_after: Option<u64>) -> Link<InProcSource, InProcDest> {
        let faults = cut_after.map_or_else(Faults::none, Faults::cut_after);
        let (source, dest) = pair(faults.clone());
        Link {
            dest: Box::new(move || Ok(dest)),
            source: Box::new(move || Ok(source)),
            cut: Box::new(move || faults.cut_now()),
        }
    }
}

hpmig_core::conformance_suite!(InProc);
