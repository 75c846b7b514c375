//! How figures read for people, in every table and summary hpmig prints:
//! one unit system throughout, binary (sizes in KiB, MiB, GiB and rates in
//! MiB/s), and durations in ms below a second, in s from one second on.

use std::time::Duration;

/// Bytes: `812 B`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A byte rate in MiB/s, the table's rate unit: `112.4 MiB/s`.
pub fn rate(bytes: u64, over: Duration) -> String {
    let secs = over.as_secs_f64();
    let mib = if secs > 0.0 {
        bytes as f64 / secs / f64::from(1u32 << 20)
    } else {
        0.0
    };
    format!("{mib:.1} MiB/s")
}

/// A duration: `21.3 s` from one second on, `412.7 ms` below; a whole
/// number of milliseconds (a target the user typed) without decimals:
/// `300 ms`.
pub fn duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

/// A duration given in ms (NaN: `-`), as [`duration`] writes it.
pub fn millis(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        return "-".into();
    }
    duration(Duration::from_secs_f64(ms / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_switch_to_seconds_at_one_second() {
        assert_eq!(duration(Duration::from_micros(21_287_800)), "21.3 s");
        assert_eq!(duration(Duration::from_secs(1)), "1.0 s");
        assert_eq!(duration(Duration::from_micros(999_400)), "999.4 ms");
        assert_eq!(duration(Duration::from_millis(300)), "300 ms");
        assert_eq!(duration(Duration::ZERO), "0 ms");
        assert_eq!(millis(1500.0), "1.5 s");
        assert_eq!(millis(f64::NAN), "-");
    }

    #[test]
    fn sizes_and_rates_are_binary() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
        assert_eq!(rate(100 << 20, Duration::from_secs(2)), "50.0 MiB/s");
        assert_eq!(rate(1, Duration::ZERO), "0.0 MiB/s");
    }
}
