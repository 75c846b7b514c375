//! The one little-endian reader for bytes from a peer: running out of
//! bytes is [`ProtocolError::Truncated`], never a zero-filled value.

use super::ProtocolError;

/// Little-endian reader that turns running out of bytes into `Truncated`.
#[derive(Debug)]
pub struct Reader<'a> {
    p: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(p: &'a [u8]) -> Self {
        Reader { p }
    }

    pub fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let (head, rest) = self
            .p
            .split_first_chunk::<N>()
            .ok_or(ProtocolError::Truncated {
                needed: N,
                had: self.p.len(),
            })?;
        self.p = rest;
        Ok(*head)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.bytes().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.bytes().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// The next `n` bytes as a slice.
    pub fn slice(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.p.len() < n {
            return Err(ProtocolError::Truncated {
                needed: n,
                had: self.p.len(),
            });
        }
        let (head, rest) = self.p.split_at(n);
        self.p = rest;
        Ok(head)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.p.len()
    }

    pub fn is_empty(&self) -> bool {
        self.p.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_truncated_never_zero_filled() {
        let mut r = Reader::new(&[1, 0, 2]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u16(), Err(ProtocolError::Truncated { needed: 2, had: 1 }));
        assert_eq!(r.u8(), Ok(2));
        assert!(r.is_empty());
    }
}
