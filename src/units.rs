//! Sizes, rates and durations as people type them, and the one place that
//! says what each unit means. Every value needs a unit: a bare `100` is
//! refused, because each of the three has read it differently (bytes,
//! bytes per second, milliseconds) and QEMU's `-m 100` means MiB.
//!
//! - **Sizes** (`--memory`, `--shadow-budget`, `--max-memory`) are binary,
//!   as QEMU's `-m`: `K`, `M`, `G`, `T` (and `KiB` … `TiB`) are 2¹⁰ … 2⁴⁰
//!   bytes, `B` is bytes. `KB` … `TB` are binary too: `1GB` is 2³⁰ bytes (a
//!   decimal 10⁹ is no multiple of 2 MiB, so no guest could have it).
//!   Fractions are fine when they come to whole bytes (`1.5G`).
//! - **Rates** (`--bandwidth`) say bits or bytes in the unit's last letter:
//!   `B` is bytes, `b` or `bit` is bits; `k`, `M`, `G`, `T` are decimal,
//!   `Ki` … `Ti` binary; `/s` or `ps` may follow. `100MB/s`, `100MBps` and
//!   `100MB` are 10⁸ B/s; `100Mbit`, `100Mbps` and `100Mb/s` are 10⁸ bit/s;
//!   `100MiB/s` is 100·2²⁰ B/s. Fractions are fine (`1.5Gbit`).
//! - **Durations**: `us`, `ms`, `s`, `m` (or `min`), `h`, fractions fine
//!   (`1.5s`, `300ms`).

use std::time::Duration;

/// The slowest `--bandwidth` cap: 1 Mbit/s (at which the smallest guest,
/// 4 MiB, already takes half a minute).
pub const MIN_RATE: u64 = 125_000;
/// The fastest `--bandwidth` cap: 10 TB/s, past any link.
pub const MAX_RATE: u64 = 10_000_000_000_000;

/// Most significant digits a number may have (they are exact in a u128
/// even after the largest unit multiplies them).
const MAX_DIGITS: usize = 24;

/// A decimal number as written, `digits / 10^scale`, and the unit after
/// it (trimmed). None if `s` does not start with a number.
fn number(s: &str) -> Option<(u128, u32, &str)> {
    let t = s.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let all = || int.chars().chain(frac.chars());
    if all().count() == 0 || all().count() > MAX_DIGITS || frac.contains('.') {
        return None;
    }
    let digits = all().fold(0u128, |n, c| n * 10 + u128::from(c as u8 - b'0'));
    Some((digits, frac.len() as u32, unit.trim()))
}

/// `digits / 10^scale * mult / div`, rounded down, and whether exactly.
/// None if it overflows a u64.
fn scale(digits: u128, scale: u32, mult: u128, div: u128) -> Option<(u64, bool)> {
    let num = digits.checked_mul(mult)?;
    let den = 10u128.pow(scale) * div;
    let whole = u64::try_from(num / den).ok()?;
    Some((whole, num % den == 0))
}

/// Parses a size: a number and a binary unit (`256M`, `1.5G`, `1GiB`,
/// `4096B`); see the module's rules.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, frac, unit) =
        number(s).ok_or_else(|| format!("'{s}' is not a size (try 256M or 1.5G)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => {
            let n = s.trim();
            return Err(format!(
                "'{n}' needs a unit: {n}M (MiB), {n}G (GiB), or {n}B for bytes"
            ));
        }
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown size unit '{unit}' in '{s}' (use K, M, G or T: binary, 1G = 1GiB = 2^30 bytes)"
            ))
        }
    };
    match scale(digits, frac, 1 << shift, 1) {
        None => Err(format!("'{s}' is too large")),
        Some((_, false)) => Err(format!("'{s}' is not a whole number of bytes")),
        Some((n, true)) => Ok(n),
    }
}

/// Parses a rate in bytes per second: a number and a unit that says bits
/// or bytes (`10Gbit`, `100MB/s`, `100MBps`, `100MiB/s`); see the module's
/// rules. Refused outside [`MIN_RATE`] ..= [`MAX_RATE`].
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let examples = |n: &str| format!("{n}MB/s (megabytes), {n}Mbit (megabits) or {n}MiB/s");
    let (digits, frac, unit) = number(s)
        .ok_or_else(|| format!("'{}' is not a rate (try {})", s.trim(), examples("100")))?;
    let n = s.trim()[..s.trim().len() - unit.len()].trim();
    let per_second = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("ps"))
        .or_else(|| unit.strip_suffix("PS"))
        .unwrap_or(unit);
    if per_second.is_empty() {
        return Err(format!("'{}' needs a unit: {}", s.trim(), examples(n)));
    }
    let lower = per_second.to_ascii_lowercase();
    let (prefix, bits) = if let Some(p) = lower
        .strip_suffix("bits")
        .or_else(|| lower.strip_suffix("bit"))
    {
        (p.to_string(), true)
    } else if let Some(p) = per_second.strip_suffix('B') {
        (p.to_ascii_lowercase(), false)
    } else if let Some(p) = per_second.strip_suffix('b') {
        (p.to_ascii_lowercase(), true)
    } else {
        return Err(format!(
            "'{}' does not say bytes or bits: {}",
            s.trim(),
            examples(n)
        ));
    };
    let mult: u128 = match prefix.as_str() {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown rate unit '{unit}' in '{}' (try {})",
                s.trim(),
                examples(n)
            ))
        }
    };
    let bytes = scale(digits, frac, mult, if bits { 8 } else { 1 }).map(|(b, _)| b);
    match bytes {
        Some(b) if (MIN_RATE..=MAX_RATE).contains(&b) => Ok(b),
        _ => Err(format!(
            "'{}' is outside the range {} to {}",
            s.trim(),
            rate(MIN_RATE),
            rate(MAX_RATE)
        )),
    }
}

/// Parses a duration: a number and a unit (`300ms`, `1.5s`, `2m`); see the
/// module's rules.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, frac, unit) =
        number(s).ok_or_else(|| format!("'{}' is not a duration (try 300ms or 1.5s)", s.trim()))?;
    let nanos: u128 = match unit {
        "" => {
            let n = s.trim();
            return Err(format!("'{n}' needs a unit: {n}ms or {n}s"));
        }
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" | "sec" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => {
            return Err(format!(
                "unknown duration unit '{unit}' in '{}' (use us, ms, s, m or h)",
                s.trim()
            ))
        }
    };
    scale(digits, frac, nanos, 1)
        .map(|(n, _)| Duration::from_nanos(n))
        .ok_or_else(|| format!("'{}' is too long", s.trim()))
}

/// A duration in `lo ..= hi`; the refusal names the range.
fn duration_within(s: &str, lo: Duration, hi: Duration) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| format!("{e} (from {} to {})", span(lo), span(hi)))?;
    if (lo..=hi).contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "'{}' is outside the range {} to {}",
            s.trim(),
            span(lo),
            span(hi)
        ))
    }
}

/// A duration for people, in its largest whole unit: `1 ms`, `24 h`.
pub fn span(d: Duration) -> String {
    const UNITS: [(&str, u128); 5] = [
        ("h", 3_600_000_000_000),
        ("min", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ];
    let ns = d.as_nanos();
    if ns == 0 {
        return "0 ms".into();
    }
    UNITS
        .iter()
        .find(|(_, n)| ns % n == 0)
        .map_or_else(|| format!("{d:?}"), |(u, n)| format!("{} {u}", ns / n))
}

/// The downtime target: 1 ms to 1 h. Zero is refused: no pause fits it,
/// and every target under the switch-over's own cost (about 20 ms) is
/// already one that only a small work set can meet.
pub fn parse_downtime(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_millis(1), Duration::from_secs(3600))
}

/// A timeout: 1 ms to 1 day (zero would give up at once).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_millis(1), Duration::from_secs(86_400))
}

/// A wait that may be none: 0 to 1 day.
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::ZERO, Duration::from_secs(86_400))
}

/// The most guest writes per second `--dirty-rate` takes (far past what
/// a vCPU does).
pub const MAX_DIRTY_RATE: u64 = 10_000_000_000;

/// A guest's writes per second: 1 to [`MAX_DIRTY_RATE`] (zero would be read
/// as no limit where the guest's state travels).
pub fn parse_dirty_rate(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_DIRTY_RATE).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{}' is not a number of writes per second from 1 to {MAX_DIRTY_RATE} (leave the flag out for full speed)",
            s.trim()
        )),
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `v` with a decimal prefix and at most two decimals: `12.5 M`.
fn decimal(v: f64, unit: &str) -> String {
    const PREFIXES: [&str; 5] = ["", "k", "M", "G", "T"];
    let mut v = v;
    let mut p = 0;
    while v >= 1000.0 && p < PREFIXES.len() - 1 {
        v /= 1000.0;
        p += 1;
    }
    let n = format!("{v:.2}");
    let n = n.trim_end_matches('0').trim_end_matches('.');
    format!("{n} {}{unit}", PREFIXES[p])
}

/// A rate for people, in bytes and bits: `12.5 MB/s (100 Mbit/s)`.
pub fn rate(bytes_per_sec: u64) -> String {
    let b = bytes_per_sec as f64;
    format!("{} ({})", decimal(b, "B/s"), decimal(b * 8.0, "bit/s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_are_binary_with_fractions_and_need_a_unit() {
        assert_eq!(parse_size("256M"), Ok(256 * MIB));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100MiB"), Ok(100 * MIB));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 2 k "), Ok(2048));
        // 1GB is binary, as QEMU's -m reads it.
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(1536 * MIB));
        assert_eq!(parse_size(".5T"), Ok(512 << 30));
        assert_eq!(parse_size("64G"), Ok(64 << 30));
    }

    #[test]
    fn sizes_refused_say_why_in_one_line() {
        let refused = |s: &str, why: &str| {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(why) && !e.contains('\n'), "{s}: {e}");
        };
        refused("100", "needs a unit: 100M (MiB)");
        refused("12X", "unknown size unit 'X'");
        refused("1.5.G", "not a size");
        refused("G", "not a size");
        refused("-1G", "not a size");
        refused("0.1K", "not a whole number of bytes");
        refused("999999999999T", "too large");
        refused("99999999999999999999999999999G", "not a size");
    }

    #[test]
    fn rates_say_bits_or_bytes_and_need_a_unit() {
        const MB: u64 = 1_000_000;
        // Capital B is bytes, whatever follows.
        for s in ["100MB/s", "100MBps", "100MB", "100 MB/s"] {
            assert_eq!(parse_rate(s), Ok(100 * MB), "{s}");
        }
        // b or bit is bits.
        for s in ["100Mbps", "100Mbit", "100Mbit/s", "100Mb/s", "100mbps"] {
            assert_eq!(parse_rate(s), Ok(100 * MB / 8), "{s}");
        }
        assert_eq!(parse_rate("100MiB/s"), Ok(100 * MIB));
        assert_eq!(parse_rate("10Gbit"), Ok(1_250_000_000));
        assert_eq!(parse_rate("1gbps"), Ok(125_000_000));
        assert_eq!(parse_rate("1.5Gbit/s"), Ok(187_500_000));
        assert_eq!(parse_rate("1Mbit"), Ok(MIN_RATE));
        assert_eq!(parse_rate("10TB/s"), Ok(MAX_RATE));
    }

    #[test]
    fn rates_refused_say_why_in_one_line() {
        let refused = |s: &str, why: &str| {
            let e = parse_rate(s).expect_err(s);
            assert!(e.contains(why) && !e.contains('\n'), "{s}: {e}");
        };
        refused("100", "'100' needs a unit: 100MB/s (megabytes), 100Mbit");
        refused("1000000", "needs a unit");
        refused("100M", "does not say bytes or bits");
        refused("100/s", "needs a unit");
        refused("fast", "not a rate");
        refused("10 furlongs", "does not say bytes or bits");
        refused("10 XB/s", "unknown rate unit");
        refused(
            "0MB/s",
            "outside the range 125 kB/s (1 Mbit/s) to 10 TB/s (80 Tbit/s)",
        );
        refused("100B/s", "outside the range");
        refused("100Tbit", "outside the range");
        refused("99999999999999999999TB", "outside the range");
    }

    #[test]
    fn durations_take_fractions_and_need_a_unit() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5h"), Ok(Duration::from_secs(1800)));
        assert!(parse_duration("300")
            .expect_err("bare")
            .contains("needs a unit: 300ms or 300s"));
        assert!(parse_duration("3 fortnights")
            .expect_err("unit")
            .contains("unknown duration unit"));
        assert!(parse_duration("99999999999999999999h")
            .expect_err("long")
            .contains("too long"));
    }

    #[test]
    fn ranges_are_named_when_refused() {
        let e = parse_downtime("0ms").expect_err("zero");
        assert!(e.contains("'0ms' is outside the range 1 ms to 1 h"), "{e}");
        let e = parse_downtime("0").expect_err("bare");
        assert!(
            e.contains("needs a unit: 0ms or 0s (from 1 ms to 1 h)"),
            "{e}"
        );
        assert_eq!(parse_dirty_rate("100000"), Ok(100_000));
        for bad in ["0", "-1", "1e5", "10000000001"] {
            let e = parse_dirty_rate(bad).expect_err(bad);
            assert!(e.contains("from 1 to 10000000000"), "{e}");
        }
        assert_eq!(parse_downtime("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_wait("0ms"), Ok(Duration::ZERO));
        assert!(parse_wait("25h")
            .expect_err("long")
            .contains("outside the range 0 ms to 24 h"));
        assert_eq!(span(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(span(Duration::from_secs(90)), "90 s");
    }

    #[test]
    fn people_read_sizes_and_rates() {
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(rate(12_500_000), "12.5 MB/s (100 Mbit/s)");
        assert_eq!(rate(1_250_000_000), "1.25 GB/s (10 Gbit/s)");
        assert_eq!(rate(100 << 20), "104.86 MB/s (838.86 Mbit/s)");
    }
}
