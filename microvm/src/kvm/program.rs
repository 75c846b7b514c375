//! The micro-VM's guest: page tables for a direct 64-bit CPL3 entry, and the
//! workload loops, assembled at run time with iced-x86's code assembler.
//!
//! Guest physical memory map (all below `DATA`, 2 MiB, is ours):
//!
//! ```text
//!  0x0000_0000  heartbeat page: vCPU i's counter at 8 * i
//!  0x0000_1000  PML4          0x2000 PDPT     0x3000.. one PD per GiB
//!  0x0005_0000  code          0x0006_0000.. per-vCPU scratch (aba's lists)
//!  0x0020_0000  DATA: what the workloads write, to the end of memory
//! ```
//!
//! Every page is mapped 1:1 with 2 MiB pages carrying the U bit, so the
//! guest runs at CPL3 from its first instruction, which on these machines is
//! what makes it run natively (see shared/notes/kvm.md). The guest never
//! leaves CPL3: it reports each batch of writes with a store to its
//! doorbell, a page mapped just past the end of memory that no memory slot
//! backs, so KVM hands the store to the VMM as an MMIO exit (used to count
//! progress, throttle to `--dirty-rate`, and pause). A doorbell, not `out`:
//! under PVM port I/O at CPL3 depends on an emulated IOPL, and measured
//! here a guest's 65536th `out` to one port raised #GP.
//!
//! Register contract, set by the VMM at start (and carried in the vCPU
//! state across a migration):
//!
//! | reg | meaning |
//! |---|---|
//! | r8  | address of this vCPU's heartbeat |
//! | r9  | first byte the workload writes |
//! | r10 | words it may write (sparse, hotspot, aba) or bytes (dense) |
//! | r11 | xorshift state (never zero) |
//! | r12 | this vCPU's scratch area |
//! | r13 | writes per batch (dense: pages per batch) |
//! | r14 | dense: offset of the next page |
//! | r15 | heartbeat counter (stored at r8 after every store; dense: page) |
//! | rbp | the doorbell: +0 after a batch of writes, +8 for an idle tick |

use iced_x86::code_asm::*;

use crate::Workload;

/// Guest page size: architectural on x86, independent of the host's.
pub const GUEST_PAGE: u64 = 4096;
pub const HEARTBEAT: u64 = 0;
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD_BASE: u64 = 0x3000;
pub const CODE: u64 = 0x5_0000;
pub const SCRATCH: u64 = 0x6_0000;
/// Scratch bytes per vCPU: room for 4096 (address, old value) pairs.
pub const SCRATCH_PER_VCPU: u64 = 0x1_0000;
pub const DATA: u64 = 0x20_0000;
/// Largest guest: the page tables hold one PD page per GiB below CODE (77),
/// memory plus the doorbell's page must fit; a round 64 GiB does.
pub const MAX_MEMORY: u64 = 64 << 30;
const _: () = assert!((MAX_MEMORY >> 30) < (CODE - PD_BASE) / GUEST_PAGE);
/// Pages the hotspot workload rewrites.
pub const HOTSPOT_PAGES: u64 = 64;

/// Doorbell offset rung after a batch of writes.
pub const BELL_BATCH: u64 = 0;
/// Doorbell offset rung by an idle tick.
pub const BELL_IDLE: u64 = 8;

/// Guest address of the doorbell of a guest of `memory_size` bytes (a
/// multiple of 2 MiB): the first byte past memory.
pub fn doorbell(memory_size: u64) -> u64 {
    memory_size
}

/// The assembled program and where each workload starts.
#[derive(Clone, Debug)]
pub struct Program {
    pub code: Vec<u8>,
    pub sparse: u64,
    pub dense: u64,
    pub aba: u64,
    pub idle: u64,
}

impl Program {
    /// Guest address where `workload` starts (hotspot is sparse on a small range).
    pub fn entry(&self, workload: Workload) -> u64 {
        match workload {
            Workload::Sparse | Workload::Hotspot => self.sparse,
            Workload::Dense => self.dense,
            Workload::Aba => self.aba,
            Workload::Idle => self.idle,
        }
    }
}

/// `r11 = xorshift64(r11)`, clobbering rax.
fn xorshift(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (shift, left) in [(13, true), (7, false), (17, true)] {
        a.mov(rax, r11)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(r11, rax)?;
    }
    Ok(())
}

/// `rdx = r11 * r10 >> 64`: a random index below r10, clobbering rax.
fn random_index(a: &mut CodeAssembler) -> Result<(), IcedError> {
    xorshift(a)?;
    a.mov(rax, r11)?;
    a.mul(r10)
}

/// With a paced program, the doorbell page holds the pacing state: the
/// time-stamp counter value before which the next batch may not start, and
/// the TSC cycles per batch (0: flat out).
pub const PACE_DEADLINE: u64 = 16;
pub const PACE_CYCLES: u64 = 24;

/// One heartbeat: the counter goes up and is stored where the host reads
/// it. The workloads beat after every store (dense: every page), so a host
/// that watches the word sees the guest stop and start to within a store,
/// not a batch (the blackout observer's resolution).
fn tick(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.inc(r15)?;
    a.mov(qword_ptr(r8), r15)
}

/// Ring the doorbell at offset `bell`; a paced program then waits for its
/// next slot by the time-stamp counter.
fn bell(a: &mut CodeAssembler, bell: u64, paced: bool) -> Result<(), IcedError> {
    a.mov(byte_ptr(rbp + bell as i32), al)?;
    if paced {
        // rax = TSC; spin until it reaches the deadline; next deadline is
        // now + cycles per batch (rdx is free between batches).
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.cmp(rax, qword_ptr(rbp + PACE_DEADLINE as i32))?;
        a.jb(spin)?;
        a.add(rax, qword_ptr(rbp + PACE_CYCLES as i32))?;
        a.mov(qword_ptr(rbp + PACE_DEADLINE as i32), rax)?;
    }
    Ok(())
}

/// Assembles every workload loop at [`CODE`], paced by the micro-VM's VMM
/// at its doorbell exits.
pub fn assemble() -> Result<Program, IcedError> {
    assemble_with(false)
}

/// The same loops pacing themselves by the time-stamp counter (the
/// doorbell is a RAM page holding [`PACE_DEADLINE`] and [`PACE_CYCLES`]),
/// for a guest no hpmig VMM runs: QEMU's (see hpmig-bench's `qemu::multiboot`).
pub fn assemble_paced() -> Result<Program, IcedError> {
    assemble_with(true)
}

fn assemble_with(paced: bool) -> Result<Program, IcedError> {
    let mut a = CodeAssembler::new(64)?;

    // sparse / hotspot: r13 random 8-byte stores over r10 words from r9.
    let mut sparse = a.create_label();
    let mut s_inner = a.create_label();
    a.set_label(&mut sparse)?;
    a.mov(rbx, r13)?;
    a.set_label(&mut s_inner)?;
    random_index(&mut a)?;
    a.mov(qword_ptr(r9 + rdx * 8), r11)?;
    tick(&mut a)?;
    a.dec(rbx)?;
    a.jnz(s_inner)?;
    bell(&mut a, BELL_BATCH, paced)?;
    a.jmp(sparse)?;

    // dense: rewrite r13 whole pages in sequence, wrapping at r10 bytes.
    let mut dense = a.create_label();
    let mut d_page = a.create_label();
    let mut d_ok = a.create_label();
    a.set_label(&mut dense)?;
    a.mov(rbx, r13)?;
    a.set_label(&mut d_page)?;
    a.lea(rdi, qword_ptr(r9 + r14))?;
    a.mov(rax, r11)?;
    a.mov(rcx, GUEST_PAGE / 8)?;
    a.rep().stosq()?;
    a.add(r14, GUEST_PAGE as i32)?;
    a.cmp(r14, r10)?;
    a.jb(d_ok)?;
    a.xor(r14, r14)?;
    a.set_label(&mut d_ok)?;
    a.inc(r11)?;
    tick(&mut a)?;
    a.dec(rbx)?;
    a.jnz(d_page)?;
    bell(&mut a, BELL_BATCH, paced)?;
    a.jmp(dense)?;

    // aba: r13 random stores, remembering each old value in the scratch
    // list; report; then put every old value back, newest first (so a word
    // written twice ends with its original value); report again.
    let mut aba = a.create_label();
    let mut a_write = a.create_label();
    let mut a_restore = a.create_label();
    a.set_label(&mut aba)?;
    a.mov(rbx, r13)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut a_write)?;
    random_index(&mut a)?;
    a.lea(rsi, qword_ptr(r9 + rdx * 8))?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(qword_ptr(rdi), rsi)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.add(rdi, 16)?;
    a.mov(qword_ptr(rsi), r11)?;
    tick(&mut a)?;
    a.dec(rbx)?;
    a.jnz(a_write)?;
    bell(&mut a, BELL_BATCH, paced)?;
    a.mov(rbx, r13)?;
    a.set_label(&mut a_restore)?;
    a.sub(rdi, 16)?;
    a.mov(rsi, qword_ptr(rdi))?;
    a.mov(rax, qword_ptr(rdi + 8))?;
    a.mov(qword_ptr(rsi), rax)?;
    tick(&mut a)?;
    a.dec(rbx)?;
    a.jnz(a_restore)?;
    bell(&mut a, BELL_BATCH, paced)?;
    a.jmp(aba)?;

    // idle: only the heartbeat.
    let mut idle = a.create_label();
    a.set_label(&mut idle)?;
    tick(&mut a)?;
    bell(&mut a, BELL_IDLE, paced)?;
    a.jmp(idle)?;

    let r = a.assemble_options(
        CODE,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Program {
        sparse: r.label_ip(&sparse)?,
        dense: r.label_ip(&dense)?,
        aba: r.label_ip(&aba)?,
        idle: r.label_ip(&idle)?,
        code: r.inner.code_buffer,
    })
}

/// The page-table entries that map `memory_size` bytes, and the 2 MiB page
/// of the doorbell just past them, 1:1 with 2 MiB user pages:
/// `(guest address, value)` pairs to write.
pub fn page_tables(memory_size: u64) -> Vec<(u64, u64)> {
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    let mapped = doorbell(memory_size) + (2 << 20);
    let gibs = mapped.div_ceil(1 << 30);
    let mut entries = vec![(PML4, PDPT | PRESENT_RW_USER)];
    for g in 0..gibs {
        let pd = PD_BASE + g * GUEST_PAGE;
        entries.push((PDPT + g * 8, pd | PRESENT_RW_USER));
        for i in 0..512u64 {
            let addr = (g << 30) + (i << 21);
            if addr >= mapped {
                break;
            }
            entries.push((pd + i * 8, addr | PRESENT_RW_USER | HUGE));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_below_the_scratch_area() {
        let p = assemble().unwrap();
        assert!(!p.code.is_empty() && CODE + p.code.len() as u64 <= SCRATCH);
        for e in [p.sparse, p.dense, p.aba, p.idle] {
            assert!((CODE..CODE + p.code.len() as u64).contains(&e));
        }
        // Decodes back to instructions (the listing a newcomer can read).
        let mut d = iced_x86::Decoder::with_ip(64, &p.code, CODE, 0);
        let mut n = 0;
        while d.can_decode() {
            assert!(!d.decode().is_invalid());
            n += 1;
        }
        assert!(n > 30);
    }

    #[test]
    fn page_tables_map_all_memory_with_user_huge_pages() {
        let t = page_tables(3 << 30 | 1 << 21);
        let pds: Vec<_> = t.iter().filter(|(a, _)| *a >= PD_BASE).collect();
        assert_eq!(pds.len(), 3 * 512 + 2, "memory plus the doorbell's page");
        assert!(pds.iter().all(|(_, v)| v & 0x87 == 0x87));
        assert_eq!(
            t.iter()
                .filter(|(a, _)| (PDPT..PD_BASE).contains(a))
                .count(),
            4
        );
    }
}
