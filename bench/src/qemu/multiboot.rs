//! The micro-VM's workload as a multiboot image, so QEMU can boot the same
//! guest program (the benchmark's peer, see `hpmig bench --peer`). It owns
//! the image's layout and the 32- and 64-bit stubs; the workload loops and
//! the guest memory map are the micro-VM's ([`program`]).
//!
//! QEMU's multiboot loader enters 32-bit protected mode without paging at
//! `entry32`. The stub there copies the workload loops to [`CODE`] (where
//! [`program::assemble`] placed them), builds the same 1:1 page tables with
//! 2 MiB user pages as the micro-VM, loads a GDT with 64-bit kernel and
//! user segments, enables long mode and jumps to `entry64`, which loads the
//! micro-VM's register contract and `iretq`s to the workload at CPL3 — the
//! only way guest code runs natively on this project's machines (see
//! shared/notes/kvm.md). Interrupts stay disabled (no IDT is needed); the
//! doorbell is an ordinary RAM page, since no VMM listens for it, and the
//! loops pace themselves by the time-stamp counter
//! ([`program::assemble_paced`]) to the dirty rate asked for; the guest's
//! progress is its heartbeat at [`HEARTBEAT`].
//!
//! ```text
//! 0x0010_0000  multiboot header (a.out kludge: flat image, load = this address)
//! 0x0010_0040  entry32        0x0010_0200  GDT and its pointer
//! 0x0010_0400  entry64        0x0010_1000  workload loops (copied to CODE)
//! ```

use iced_x86::code_asm::*;

use hpmig_microvm::kvm::program::{
    self, CODE, DATA, GUEST_PAGE, HEARTBEAT, HOTSPOT_PAGES, PDPT, PD_BASE, PML4, SCRATCH,
};
use hpmig_microvm::Workload;

/// Where QEMU loads the image.
pub const LOAD: u64 = 0x10_0000;
const ENTRY32: u64 = LOAD + 0x40;
const GDT: u64 = LOAD + 0x200;
const GDT_PTR: u64 = GDT + 0x40;
const ENTRY64: u64 = LOAD + 0x400;
const BLOB: u64 = LOAD + 0x1000;
/// A RAM page the workload's doorbell stores land in (no VMM listens).
pub const DOORBELL_PAGE: u64 = 0x4_f000;
/// Largest guest the stub maps (its page directories must stay below the
/// doorbell page).
pub const MAX_MEMORY: u64 = 16 << 30;
const _: () = assert!(PD_BASE + (MAX_MEMORY >> 30) * GUEST_PAGE <= DOORBELL_PAGE);

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Flag 16: the header's address fields are valid (a flat image).
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;

/// Errors building the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("assembling the multiboot stub: {0}")]
    Asm(#[from] IcedError),
    #[error("a {0}-byte guest: the QEMU image maps 4 MiB to {MAX_MEMORY} bytes, in 2 MiB steps")]
    Size(u64),
    #[error("the multiboot stub outgrew its slot")]
    Layout,
}

/// The image for a guest of `memory_size` bytes running `workload` with
/// `writes_per_batch` stores per batch (the heartbeat counts stores), at most one batch per
/// `cycles_per_batch` time-stamp counter cycles (0: flat out), seeded with
/// `seed`.
pub fn image(
    workload: Workload,
    memory_size: u64,
    writes_per_batch: u64,
    cycles_per_batch: u64,
    seed: u64,
) -> Result<Vec<u8>, ImageError> {
    if !(4 << 20..=MAX_MEMORY).contains(&memory_size) || memory_size % (2 << 20) != 0 {
        return Err(ImageError::Size(memory_size));
    }
    let prog = program::assemble_paced()?;
    let gibs = memory_size.div_ceil(1 << 30);

    // 32-bit stub.
    let mut a = CodeAssembler::new(32)?;
    a.cli()?;
    // Copy the workload loops to CODE.
    a.mov(esi, BLOB as u32)?;
    a.mov(edi, CODE as u32)?;
    a.mov(ecx, prog.code.len() as u32)?;
    a.cld()?;
    a.rep().movsb()?;
    // PML4[0] -> PDPT; PDPT[g] -> PD_BASE + g pages; PD entries 2 MiB, user.
    a.mov(dword_ptr(PML4 as u32), (PDPT | 7) as u32)?;
    a.xor(ecx, ecx)?;
    let mut pdpt = a.create_label();
    a.set_label(&mut pdpt)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.add(eax, (PD_BASE | 7) as u32)?;
    a.mov(dword_ptr(ecx * 8 + PDPT as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, gibs as u32)?;
    a.jb(pdpt)?;
    a.xor(ecx, ecx)?;
    let mut pd = a.create_label();
    a.set_label(&mut pd)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 21)?;
    a.or(eax, 0x87)?;
    a.mov(dword_ptr(ecx * 8 + PD_BASE as u32), eax)?;
    a.mov(eax, ecx)?;
    a.shr(eax, 11)?;
    a.mov(dword_ptr(ecx * 8 + (PD_BASE + 4) as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, (gibs * 512) as u32)?;
    a.jb(pd)?;
    a.lgdt(ptr(GDT_PTR as u32))?;
    a.mov(eax, 0x620u32)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 0x500)?;
    a.wrmsr()?;
    a.mov(eax, 0x8005_0033u32)?;
    a.mov(cr0, eax)?;
    // jmp far 0x08:ENTRY64
    let mut far = vec![0xea];
    far.extend_from_slice(&(ENTRY64 as u32).to_le_bytes());
    far.extend_from_slice(&0x08u16.to_le_bytes());
    a.db(&far)?;
    let entry32 = a.assemble(ENTRY32)?;

    // 64-bit: the register contract, then iretq to CPL3.
    let mut b = CodeAssembler::new(64)?;
    b.mov(ax, 0x10u32)?;
    b.mov(ds, ax)?;
    b.mov(es, ax)?;
    b.mov(ss, ax)?;
    b.mov(rsp, SCRATCH - 16)?;
    let words = (memory_size - DATA) / 8;
    b.mov(r8, HEARTBEAT)?;
    b.mov(r9, DATA)?;
    b.mov(
        r10,
        match workload {
            Workload::Dense => memory_size - DATA,
            Workload::Hotspot => HOTSPOT_PAGES * GUEST_PAGE / 8,
            _ => words,
        },
    )?;
    b.mov(
        r11,
        (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d) | 1,
    )?;
    b.mov(r12, SCRATCH)?;
    let batch = match workload {
        Workload::Dense => (writes_per_batch / (GUEST_PAGE / 8)).max(1),
        _ => writes_per_batch.max(1),
    };
    b.mov(r13, batch)?;
    b.xor(r14, r14)?;
    b.xor(r15, r15)?;
    b.mov(rbp, DOORBELL_PAGE)?;
    b.mov(rax, cycles_per_batch)?;
    b.mov(qword_ptr(rbp + program::PACE_CYCLES as i32), rax)?;
    b.xor(eax, eax)?;
    b.mov(qword_ptr(rbp + program::PACE_DEADLINE as i32), rax)?;
    // iretq frame: ss, rsp, rflags (IF clear: no IDT), cs, rip.
    b.push(0x1bi32)?;
    b.push(SCRATCH as i32 - 64)?;
    b.push(0x2i32)?;
    b.push(0x23i32)?;
    b.mov(rax, prog.entry(workload))?;
    b.push(rax)?;
    b.iretq()?;
    let entry64 = b.assemble(ENTRY64)?;

    let mut img = vec![0u8; (BLOB - LOAD) as usize + prog.code.len()];
    let header = [
        MULTIBOOT_MAGIC,
        MULTIBOOT_AOUT_KLUDGE,
        0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(MULTIBOOT_AOUT_KLUDGE)),
        LOAD as u32,
        LOAD as u32,
        (LOAD + img.len() as u64) as u32,
        (LOAD + img.len() as u64) as u32,
        ENTRY32 as u32,
    ];
    for (i, w) in header.iter().enumerate() {
        img[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    let put = |img: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        let o = (at - LOAD) as usize;
        img[o..o + bytes.len()].copy_from_slice(bytes);
    };
    // GDT: null, kernel code64 (0x08), kernel data (0x10), user data (0x18,
    // selector 0x1b), user code64 (0x20, selector 0x23).
    let gdt: [u64; 5] = [
        0,
        0x0020_9a00_0000_0000,
        0x0000_9200_0000_0000,
        0x0000_f200_0000_0000,
        0x0020_fa00_0000_0000,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    put(&mut img, GDT, &gdt_bytes);
    let mut gdt_ptr = ((gdt_bytes.len() - 1) as u16).to_le_bytes().to_vec();
    gdt_ptr.extend_from_slice(&(GDT as u32).to_le_bytes());
    put(&mut img, GDT_PTR, &gdt_ptr);
    assert_fits(entry32.len(), GDT - ENTRY32)?;
    assert_fits(entry64.len(), BLOB - ENTRY64)?;
    put(&mut img, ENTRY32, &entry32);
    put(&mut img, ENTRY64, &entry64);
    put(&mut img, BLOB, &prog.code);
    Ok(img)
}

fn assert_fits(len: usize, room: u64) -> Result<(), ImageError> {
    if len as u64 > room {
        return Err(ImageError::Layout);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_has_a_valid_multiboot_header_and_decodable_stubs() {
        let img = image(Workload::Sparse, 64 << 20, 4096, 0, 1).unwrap();
        let w = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(w(0), MULTIBOOT_MAGIC);
        assert_eq!(w(0).wrapping_add(w(1)).wrapping_add(w(2)), 0, "checksum");
        assert_eq!(w(5) as usize, LOAD as usize + img.len());
        assert_eq!(w(7), ENTRY32 as u32);
        let at = |a: u64| &img[(a - LOAD) as usize..];
        for (bits, addr) in [(32, ENTRY32), (64, ENTRY64)] {
            let mut d = iced_x86::Decoder::with_ip(bits, at(addr), addr, 0);
            let mut n = 0;
            while n < 20 {
                assert!(!d.decode().is_invalid(), "{bits}-bit stub decodes");
                n += 1;
            }
        }
        assert!(image(Workload::Sparse, 3 << 20, 1, 0, 1).is_err());
        assert!(image(Workload::Sparse, 32 << 30, 1, 0, 1).is_err());
    }
}
