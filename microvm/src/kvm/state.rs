//! The micro-VM's state record: every vCPU's registers, system registers,
//! XSAVE area, XCRs, MSRs, LAPIC, mp_state, events and debug registers, and
//! the VM's clock and interrupt controllers. Each KVM structure travels as
//! its own bytes (kvm-bindings derives zerocopy's byte conversions for
//! them), preceded by its length, which the reader checks against the
//! structure's size: a record from another KVM ABI is refused, never
//! misread.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use hpmig_core::guest::GuestError;

use crate::Workload;

const MAGIC: &[u8; 12] = b"hpmig-kvm-v1";
/// Most MSRs a record may carry.
const MAX_MSRS: usize = 1024;
/// Most vCPUs a record may carry.
pub const MAX_VCPUS: usize = 64;

/// One vCPU's state.
#[derive(Debug, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<kvm_msr_entry>,
}

/// The whole VM's state, and how its guest program was running.
#[derive(Debug)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub clock: kvm_clock_data,
    pub irqchips: Vec<kvm_irqchip>,
    pub workload: Workload,
    pub dirty_rate: Option<u64>,
}

fn put<T: IntoBytes + Immutable>(out: &mut Vec<u8>, v: &T) {
    let b = v.as_bytes();
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], GuestError> {
        if self.0.len() < n {
            return Err(GuestError::State("vCPU state record is truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GuestError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn get<T: FromBytes>(&mut self, what: &str) -> Result<T, GuestError> {
        let len = self.u32()? as usize;
        if len != std::mem::size_of::<T>() {
            return Err(GuestError::State(format!(
                "{what} is {len} bytes in the record, {} here: another KVM ABI",
                std::mem::size_of::<T>()
            )));
        }
        T::read_from_bytes(self.bytes(len)?)
            .map_err(|_| GuestError::State(format!("{what} does not decode")))
    }

    fn count(&mut self, max: usize, what: &str) -> Result<usize, GuestError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(GuestError::State(format!(
                "{n} {what} in the record, at most {max}"
            )));
        }
        Ok(n)
    }
}

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192 * (self.vcpus.len() + 1));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        for v in &self.vcpus {
            put(&mut out, &v.regs);
            put(&mut out, &v.sregs);
            put(&mut out, &v.xsave);
            put(&mut out, &v.xcrs);
            put(&mut out, &v.lapic);
            put(&mut out, &v.mp_state);
            put(&mut out, &v.events);
            put(&mut out, &v.debugregs);
            out.extend_from_slice(&(v.msrs.len() as u32).to_le_bytes());
            for m in &v.msrs {
                put(&mut out, m);
            }
        }
        put(&mut out, &self.clock);
        out.extend_from_slice(&(self.irqchips.len() as u32).to_le_bytes());
        for c in &self.irqchips {
            put(&mut out, c);
        }
        out.push(self.workload.to_u8());
        out.extend_from_slice(&self.dirty_rate.unwrap_or(0).to_le_bytes());
        out
    }

    /// True when `record` looks like a KVM state record (its magic).
    pub fn is_kvm_record(record: &[u8]) -> bool {
        record.starts_with(MAGIC)
    }

    pub fn decode(record: &[u8]) -> Result<VmState, GuestError> {
        let mut r = Reader(record);
        if r.bytes(MAGIC.len())? != MAGIC {
            return Err(GuestError::State("not a KVM micro-VM state record".into()));
        }
        let n = r.count(MAX_VCPUS, "vCPUs")?;
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = VcpuState {
                regs: r.get("regs")?,
                sregs: r.get("sregs")?,
                xsave: r.get("xsave")?,
                xcrs: r.get("xcrs")?,
                lapic: r.get("lapic")?,
                mp_state: r.get("mp_state")?,
                events: r.get("vcpu_events")?,
                debugregs: r.get("debugregs")?,
                msrs: Vec::new(),
            };
            let m = r.count(MAX_MSRS, "MSRs")?;
            for _ in 0..m {
                v.msrs.push(r.get("msr")?);
            }
            vcpus.push(v);
        }
        let clock = r.get("clock")?;
        let c = r.count(3, "irqchips")?;
        let mut irqchips = Vec::with_capacity(c);
        for _ in 0..c {
            irqchips.push(r.get("irqchip")?);
        }
        let w = r.bytes(1)?[0];
        let workload = Workload::from_u8(w)
            .ok_or_else(|| GuestError::State(format!("unknown workload {w}")))?;
        let rate = u64::from_le_bytes(
            r.bytes(8)?
                .try_into()
                .map_err(|_| GuestError::State("rate".into()))?,
        );
        let dirty_rate = (rate != 0).then_some(rate);
        if !r.0.is_empty() {
            return Err(GuestError::State(format!(
                "{} stray bytes after the state record",
                r.0.len()
            )));
        }
        Ok(VmState {
            vcpus,
            clock,
            irqchips,
            workload,
            dirty_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let vcpu = || {
            let mut v = VcpuState::default();
            v.regs.rip = 0x5_0000;
            v.regs.r15 = 77;
            v.msrs = vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }];
            v
        };
        let s = VmState {
            vcpus: vec![vcpu(), vcpu()],
            clock: kvm_clock_data {
                clock: 5,
                ..Default::default()
            },
            irqchips: vec![],
            workload: Workload::Aba,
            dirty_rate: Some(1000),
        };
        let bytes = s.encode();
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.r15, 77);
        assert_eq!(back.vcpus[0].msrs[0].data, 99);
        assert_eq!(back.clock.clock, 5);
        assert_eq!(
            (back.workload, back.dirty_rate),
            (Workload::Aba, Some(1000))
        );
        assert!(VmState::is_kvm_record(&bytes));
        for cut in [0, 5, 12, 20, bytes.len() - 1] {
            assert!(VmState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(VmState::decode(&long).is_err());
        let mut many = bytes.clone();
        many[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(VmState::decode(&many).is_err());
    }
}
