//! The handshake and state decoders a destination runs on a peer's first
//! bytes: Hello, Welcome, and the vCPU state records (KVM and emulated).
//! Must never panic or allocate past the caps.
#![no_main]

use hpmig_core::protocol::{Hello, Welcome};
use hpmig_microvm::emulated::EmulatedConfig;
use hpmig_microvm::kvm::state::VmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        // A decoded Hello re-encodes to a Hello that decodes the same.
        let again = h.encode();
        assert_eq!(Hello::decode(&again[16..]).as_ref(), Ok(&h));
    }
    let _ = Welcome::decode(data);
    let _ = VmState::decode(data);
    let _ = EmulatedConfig::from_state_record(data, 0);
});
