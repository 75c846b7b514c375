//! What a micro-VM needs of the host that is to run it, sent in the Hello
//! so a destination that cannot run it refuses before round 0: its vCPU
//! count (in the Hello itself), the size of the XSAVE area its state
//! carries, and the CPU features its guest was started with (the CPUID
//! leaves KVM offered on the source). A destination can run it when KVM is
//! there, its XSAVE area fits the record's, and it offers every feature bit
//! the guest may have seen.
//!
//! ```text
//!  "hpmig-kvm-req1" | xsave u32 | n u16 | n × (function u32, index u32, eax, ebx, ecx, edx u32)
//! ```

use hpmig_core::guest::GuestError;
use hpmig_core::protocol::Reader;
use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

const MAGIC: &[u8; 14] = b"hpmig-kvm-req1";
/// The leaves whose feature bits a guest may depend on: (function, index).
const LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (0xd, 0), (0xd, 1), (0x8000_0001, 0)];
/// The XSAVE area the micro-VM's state record carries.
pub const XSAVE_BYTES: u32 = 4096;

/// The CPUID leaves of `LEAVES` in `entries`.
fn feature_leaves(entries: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    LEAVES
        .iter()
        .filter_map(|&(f, i)| {
            entries
                .iter()
                .find(|e| e.function == f && (e.index == i || (f != 7 && f != 0xd)))
                .copied()
        })
        .collect()
}

fn host_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, GuestError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|c| c.as_slice().to_vec())
        .map_err(|e| GuestError::Config(format!("KVM_GET_SUPPORTED_CPUID: {e}")))
}

/// The requirements of a micro-VM started with `cpuid`.
pub fn encode(cpuid: &[kvm_cpuid_entry2]) -> Vec<u8> {
    let leaves = feature_leaves(cpuid);
    let mut b = Vec::with_capacity(MAGIC.len() + 6 + leaves.len() * 24);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&XSAVE_BYTES.to_le_bytes());
    b.extend_from_slice(&(leaves.len() as u16).to_le_bytes());
    for e in leaves {
        for v in [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Whether this host can run a micro-VM with `requirements` and `vcpus`.
/// Empty requirements (a version 1 source, or a guest that is not a
/// micro-VM) pass: the state record is checked before the Ack anyway.
pub fn admit(vcpus: u32, requirements: &[u8]) -> Result<(), GuestError> {
    if !requirements.starts_with(MAGIC) {
        return Ok(());
    }
    let bad = |e: hpmig_core::protocol::ProtocolError| {
        GuestError::Config(format!("the guest's requirements do not decode: {e}"))
    };
    let mut r = Reader::new(&requirements[MAGIC.len()..]);
    let xsave = r.u32().map_err(bad)?;
    let n = r.u16().map_err(bad)?;
    let mut wanted = Vec::with_capacity(usize::from(n).min(LEAVES.len()));
    for _ in 0..n {
        let v: [u32; 6] = [
            r.u32().map_err(bad)?,
            r.u32().map_err(bad)?,
            r.u32().map_err(bad)?,
            r.u32().map_err(bad)?,
            r.u32().map_err(bad)?,
            r.u32().map_err(bad)?,
        ];
        wanted.push(v);
    }
    if !(1..=super::MAX_VCPUS).contains(&vcpus) {
        return Err(GuestError::Config(format!(
            "the guest has {vcpus} vCPUs; the micro-VM runs 1 to {}",
            super::MAX_VCPUS
        )));
    }
    let kvm = Kvm::new()
        .map_err(|e| GuestError::Config(format!("this host cannot open /dev/kvm: {e}")))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| GuestError::Config(format!("KVM_CREATE_VM: {e}")))?;
    let host_xsave = vm.check_extension_int(kvm_ioctls::Cap::Xsave2).max(0) as u32;
    if host_xsave > xsave.max(XSAVE_BYTES) {
        return Err(GuestError::Config(format!(
            "this host's XSAVE area is {host_xsave} bytes; the guest's state carries {xsave}"
        )));
    }
    let host = host_cpuid(&kvm)?;
    for [f, i, eax, ebx, ecx, edx] in wanted {
        let have = host
            .iter()
            .find(|e| e.function == f && (e.index == i || (f != 7 && f != 0xd)));
        let (ha, hb, hc, hd) = have.map_or((0, 0, 0, 0), |e| (e.eax, e.ebx, e.ecx, e.edx));
        // Leaf 0xd.0 eax/edx: the XSAVE state components; elsewhere the
        // feature bits are in ebx, ecx, edx (and eax for 0xd.1).
        let missing = match (f, i) {
            (0xd, 0) => [(eax & !ha), 0, 0, (edx & !hd)],
            (0xd, 1) => [(eax & !ha), 0, 0, 0],
            (1, _) | (0x8000_0001, _) => [0, 0, ecx & !hc, edx & !hd],
            _ => [0, ebx & !hb, ecx & !hc, edx & !hd],
        };
        if missing.iter().any(|&m| m != 0) {
            return Err(GuestError::Config(format!(
                "this host lacks CPU features the guest was started with: CPUID leaf {f:#x}.{i} (eax, ebx, ecx, edx) bits {missing:#x?}"
            )));
        }
    }
    Ok(())
}

/// This host's requirements for a fresh micro-VM (what `encode` sends).
pub fn of_this_host() -> Result<Vec<u8>, GuestError> {
    let kvm = Kvm::new().map_err(|e| GuestError::Config(format!("opening /dev/kvm: {e}")))?;
    Ok(encode(&host_cpuid(&kvm)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_with_a_feature_the_host_lacks_is_refused_and_its_own_host_admits_it() {
        if !super::super::available() {
            assert!(
                std::env::var("HPMIG_REQUIRE_KVM").as_deref() != Ok("1"),
                "HPMIG_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
            );
            return;
        }
        let own = of_this_host().unwrap();
        admit(1, &own).expect("a host admits its own guests");
        assert!(admit(0, &own).is_err(), "no vCPU");
        assert!(admit(super::super::MAX_VCPUS + 1, &own).is_err());
        // A feature bit no host has: leaf 7.0 ebx bit 31 set everywhere.
        let kvm = Kvm::new().unwrap();
        let mut cpuid = host_cpuid(&kvm).unwrap();
        for e in cpuid.iter_mut().filter(|e| e.function == 7 && e.index == 0) {
            e.ebx = u32::MAX;
        }
        let e = admit(1, &encode(&cpuid)).unwrap_err();
        assert!(e.to_string().contains("lacks CPU features"), "{e}");
        assert!(
            admit(1, b"not ours").is_ok(),
            "other VMMs' requirements pass"
        );
        assert!(admit(1, &own[..own.len() - 3]).is_err(), "truncated");
    }
}
