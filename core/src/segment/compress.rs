//! zstd for wide pages: a page that goes whole may go compressed when that
//! saves at least an eighth of it. Compression writes straight into the ring
//! slot; decompression writes straight into the destination's guest page and
//! must produce exactly one page (no more can fit: the output buffer is the
//! page).

use std::time::Instant;

/// zstd level: the fastest regular level; wide guest pages are mostly
/// text-like or zero-rich, where level 1 already gets most of the gain.
pub const LEVEL: i32 = 1;

/// When wide pages are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZstdMode {
    Off,
    On,
    /// Only while the link is slower than compression (see
    /// `precopy::compress_this_round`).
    Auto,
}

impl std::str::FromStr for ZstdMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ZstdMode::Off),
            "on" => Ok(ZstdMode::On),
            "auto" => Ok(ZstdMode::Auto),
            other => Err(format!(
                "unknown zstd mode '{other}' (expected off, on or auto)"
            )),
        }
    }
}

/// A worker's compressor, reused for every page.
pub struct PageCompressor {
    ctx: zstd::bulk::Compressor<'static>,
    /// Uncompressed bytes fed in and seconds spent, for the `auto` rule.
    pub bytes_in: u64,
    pub secs: f64,
}

impl std::fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCompressor")
            .field("bytes_in", &self.bytes_in)
            .finish()
    }
}

impl PageCompressor {
    pub fn new() -> std::io::Result<Self> {
        Ok(PageCompressor {
            ctx: zstd::bulk::Compressor::new(LEVEL)?,
            bytes_in: 0,
            secs: 0.0,
        })
    }

    /// Compresses `page` into `out`; `Some(len)` when the result is at most
    /// seven eighths of the page, `None` when compression does not pay.
    pub fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        let t = Instant::now();
        let limit = page.len() - page.len() / 8;
        let room = limit.min(out.len());
        let r = self.ctx.compress_to_buffer(page, &mut out[..room]).ok();
        self.bytes_in += page.len() as u64;
        self.secs += t.elapsed().as_secs_f64();
        r.filter(|&n| n > 0 && n <= limit)
    }
}

/// A destination stream's decompressor, reused for every page.
pub struct PageDecompressor {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for PageDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageDecompressor")
    }
}

impl PageDecompressor {
    pub fn new() -> std::io::Result<Self> {
        Ok(PageDecompressor {
            ctx: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decompresses `src` into `page`, which it must fill exactly.
    pub fn decompress(&mut self, src: &[u8], page: &mut [u8]) -> Result<(), String> {
        match self.ctx.decompress_to_buffer(src, page) {
            Ok(n) if n == page.len() => Ok(()),
            Ok(n) => Err(format!(
                "compressed page expanded to {n} bytes, not {}",
                page.len()
            )),
            Err(e) => Err(format!("corrupt compressed page: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let page: Vec<u8> = (0..4096).map(|i| (i / 64) as u8).collect();
        let mut c = PageCompressor::new().unwrap();
        let mut out = vec![0u8; 4096];
        let n = c.compress(&page, &mut out).expect("compressible");
        assert!(n < 1024);
        let mut d = PageDecompressor::new().unwrap();
        let mut back = vec![0u8; 4096];
        d.decompress(&out[..n], &mut back).unwrap();
        assert_eq!(back, page);
        // Random bytes do not compress by an eighth.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        assert_eq!(c.compress(&noise, &mut out), None);
        // Garbage and short pages are errors, never panics or overruns.
        assert!(d.decompress(&[1, 2, 3, 4], &mut back).is_err());
        let half = zstd::bulk::compress(&page[..2048], 1).unwrap();
        assert!(
            d.decompress(&half, &mut back).is_err(),
            "must fill the page exactly"
        );
    }
}
