//! The bandwidth cap (`--bandwidth`): one limiter shared by all workers,
//! asked once per ring slot (never per page). It schedules slots in virtual
//! time: a slot of n bytes occupies the link for n / rate seconds after the
//! previous one, and its sender sleeps until its turn. Over any window the
//! bytes sent stay within one slot per worker of rate × window.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: Mutex::new(None),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec as u64
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: usize) {
        let now = Instant::now();
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec));
            start
        };
        if let Some(wait) = start.checked_duration_since(now) {
            std::thread::sleep(wait);
        }
    }
}

/// Parses a rate as people write link speeds: `10Gbit`, `500MB`, `1.5Gbit/s`,
/// `100Mbps`; bits when the unit says bit/bps, bytes otherwise (decimal).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a rate (try 10Gbit or 500MB)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let (mult, bits) = match unit.as_str() {
        "" | "b" => (1.0, false),
        "k" | "kb" => (1e3, false),
        "m" | "mb" => (1e6, false),
        "g" | "gb" => (1e9, false),
        "kbit" | "kbps" => (1e3, true),
        "mbit" | "mbps" => (1e6, true),
        "gbit" | "gbps" => (1e9, true),
        "tbit" | "tbps" => (1e12, true),
        other => {
            return Err(format!(
                "unknown rate unit '{other}' in '{s}' (use MB, GB, Mbit or Gbit)"
            ))
        }
    };
    let bytes = n * mult / if bits { 8.0 } else { 1.0 };
    if !(1.0..1e15).contains(&bytes) {
        return Err(format!("rate '{s}' is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_written() {
        assert_eq!(parse_rate("10Gbit"), Ok(1_250_000_000));
        assert_eq!(parse_rate("1gbps"), Ok(125_000_000));
        assert_eq!(parse_rate("500MB"), Ok(500_000_000));
        assert_eq!(parse_rate("1.5Gbit/s"), Ok(187_500_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("0").is_err());
    }
}
