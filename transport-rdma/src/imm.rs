//! The immediate that announces a batch: the last work request of every
//! batch is a WRITE WITH IMMEDIATE whose 32 bits name the stream, the
//! batch and how many bytes of it are staged, so the destination checks
//! all three before it reads a byte. The sender ([`crate::RdmaTx`]), the
//! receiver and the setup exchange (which caps a slot at [`MAX_SLOT`])
//! share these.

/// The immediate of a batch: worker (6 bits), batch sequence (6 bits),
/// length of the batch's staged bytes (20 bits).
pub fn imm(worker: u32, seq: u32, len: usize) -> u32 {
    ((worker & 0x3f) << 26) | ((seq & 0x3f) << 20) | (len as u32 & 0xf_ffff)
}

/// The parts of an immediate: (worker, sequence, length).
pub fn imm_parts(imm: u32) -> (u32, u32, usize) {
    (imm >> 26, (imm >> 20) & 0x3f, (imm & 0xf_ffff) as usize)
}

/// Largest slot an immediate can describe.
pub const MAX_SLOT: usize = (1 << 20) - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_immediate_names_worker_batch_and_length() {
        assert_eq!(imm_parts(imm(5, 66, 262_144)), (5, 2, 262_144));
        assert_eq!(imm_parts(imm(63, 63, MAX_SLOT)), (63, 63, MAX_SLOT));
    }
}
