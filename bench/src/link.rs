//! The link both tools migrate over, emulated outside both of them: a veth
//! pair between this process's network namespace (the source's end) and a
//! namespace created for the run (the destination's end), shaped with
//! `tc tbf` in both directions when the cell has a bandwidth cap. Neither
//! hpmig nor QEMU applies a cap of its own then, so both face the same
//! limit in every phase, their final stage included (QEMU lifts its own
//! `max-bandwidth` for its last stage; a shaped link does not care).
//!
//! The link counts its own bytes: the host end's `tx_bytes` (source to
//! destination) and `rx_bytes` (back), read from sysfs, are every byte
//! either tool sent, control, device state and data alike, plus the frame
//! headers (one per GSO super-packet, as veth counts them). A sampler reads
//! them every 10 ms so the rate the migration achieved on the link can be
//! compared with the shaped rate: a cell that never reached 0.9× of it was
//! limited by the CPU, not the link ([`Counted::cpu_bound`]). tbf charges a
//! header per segment where veth counts one per GSO packet, so a saturated
//! link reads about 0.955× of the shaped rate on this counter (measured
//! against the qdisc's own count: 0.958 at 1 Gbit/s); the 0.9 threshold is
//! about 0.94× in tbf's terms.
//!
//! # Namespaces never outlive the benchmark
//!
//! Each namespace is named `hpmig-bench-<pid>-<n>` and entered in a registry
//! while it exists; dropping a [`ShapedLink`] deletes it (and with it the
//! veth pair and its qdisc), and [`remove_all`] (called by the benchmark's
//! signal handler) deletes what is left. Namespaces of a benchmark that
//! died by SIGKILL are removed by the next one ([`remove_stale`]).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How a cell's link is emulated; written by name in bench.json.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Emulation {
    /// A veth pair shaped with tc: one limit for both tools, bytes counted
    /// on the link (the default).
    #[default]
    #[serde(rename = "veth-tbf")]
    Veth,
    /// Each tool's own bandwidth cap over loopback (hpmig's limiter, QEMU's
    /// `max-bandwidth`), as before the shaped link; bytes are each tool's
    /// own count. For hosts without network namespaces.
    #[serde(rename = "in-process-cap")]
    Cap,
}

impl Emulation {
    pub fn name(self) -> &'static str {
        match self {
            Emulation::Veth => "veth-tbf",
            Emulation::Cap => "in-process-cap",
        }
    }
}

impl std::str::FromStr for Emulation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "veth" | "veth-tbf" | "tc" => Ok(Emulation::Veth),
            "cap" | "in-process-cap" => Ok(Emulation::Cap),
            _ => Err(format!("link emulation '{s}': expected veth or cap")),
        }
    }
}

/// A cell's achieved rate below this share of the shaped rate marks it
/// CPU-bound.
pub const CPU_BOUND_BELOW: f64 = 0.9;

/// The window over which the achieved rate is taken (the best one of the
/// run): long against tbf's burst (1 ms of the rate), short against a
/// round 0.
const RATE_WINDOW: Duration = Duration::from_millis(200);
const SAMPLE: Duration = Duration::from_millis(10);

static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (apt-get install iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A veth pair into a namespace of its own, shaped to `rate` bytes per
/// second in both directions (unshaped when `None`).
#[derive(Debug)]
pub struct ShapedLink {
    ns: String,
    host_if: String,
    rate: Option<u64>,
    /// The source's end and the destination's: a /30 picked by process and
    /// link number (two benchmarks at once on one host share one with
    /// probability 1/50; run one at a time).
    source_ip: Ipv4Addr,
    dest_ip: Ipv4Addr,
}

impl ShapedLink {
    pub fn create(rate: Option<u64>) -> Result<ShapedLink> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = format!("hpmig-bench-{}-{n}", std::process::id());
        // Interface names hold 15 bytes.
        let host_if = format!("hb{}s{n}", std::process::id() % 100_000);
        let peer_if = format!("hb{}d{n}", std::process::id() % 100_000);
        NAMESPACES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ns.clone());
        let (b, c) = (200 + (std::process::id() % 50) as u8, (n % 64 * 4) as u8);
        let link = ShapedLink {
            ns,
            host_if,
            rate,
            source_ip: Ipv4Addr::new(10, b, c, 1),
            dest_ip: Ipv4Addr::new(10, b, c, 2),
        };
        let ns = link.ns.as_str();
        ip(&["netns", "add", ns])
            .context("creating a network namespace for the link (needs root)")?;
        ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            ns,
        ])?;
        // No IPv6 link-local address, so no neighbour discovery on the link:
        // it carries the migration alone.
        ip(&["link", "set", "dev", &link.host_if, "addrgenmode", "none"])?;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "dev",
            &peer_if,
            "addrgenmode",
            "none",
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.source_ip),
            "dev",
            &link.host_if,
        ])?;
        ip(&["link", "set", &link.host_if, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", link.dest_ip),
            "dev",
            &peer_if,
        ])?;
        ip(&["-n", ns, "link", "set", &peer_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        if let Some(rate) = rate {
            // Burst: 1 ms of the rate, and at least a few 64 KiB GSO
            // packets (a smaller bucket drops them whole). Queue: 20 ms.
            let burst = (rate / 1000).max(256 << 10).to_string();
            let rate = format!("{}bit", rate * 8);
            let tbf = [
                "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms",
            ];
            let mut host = vec!["qdisc", "add", "dev", &link.host_if];
            host.extend(tbf);
            run("tc", &host).context("shaping the link with tc tbf")?;
            let mut peer = vec!["-n", ns, "qdisc", "add", "dev", &peer_if];
            peer.extend(tbf);
            run("tc", &peer).context("shaping the link with tc tbf")?;
        }
        Ok(link)
    }

    /// The shaped rate, bytes per second.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// The destination end's address.
    pub fn dest_ip(&self) -> Ipv4Addr {
        self.dest_ip
    }

    /// The namespace's name, for `ip netns exec NAME ...`.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// A listener on the destination's end (any port). The socket belongs
    /// to the link's namespace for its life, whichever thread uses it.
    pub fn listen(&self) -> Result<TcpListener> {
        let path = format!("/var/run/netns/{}", self.ns);
        let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
        // setns moves only the calling thread: do it in a thread of its own.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<TcpListener> {
                // SAFETY: setns(2) on an open namespace file descriptor that
                // `ns` keeps open for the call; CLONE_NEWNET moves only this
                // thread, which ends right after binding.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the link's network namespace");
                }
                TcpListener::bind(SocketAddr::from((self.dest_ip, 0)))
                    .context("listening on the link's destination end")
            })
            .join()
            .map_err(|_| anyhow!("the namespace thread panicked"))?
        })
    }

    /// Bytes the host end sent (source to destination) and received.
    pub fn bytes(&self) -> Result<(u64, u64)> {
        Ok((
            counter(&self.host_if, "tx_bytes")?,
            counter(&self.host_if, "rx_bytes")?,
        ))
    }

    /// Starts counting: the link's bytes from now, and the best rate over a
    /// [`RATE_WINDOW`].
    pub fn count(&self) -> Result<Counter> {
        let start = self.bytes()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let host_if = self.host_if.clone();
        let thread = std::thread::spawn(move || sample(&host_if, &flag));
        Ok(Counter {
            start,
            rate: self.rate,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair and its qdiscs.
        let _ = ip(&["netns", "del", &self.ns]);
        NAMESPACES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|n| *n != self.ns);
    }
}

/// One of interface `host_if`'s byte counters (`tx_bytes`, `rx_bytes`).
fn counter(host_if: &str, what: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{host_if}/statistics/{what}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing {path}"))
}

/// Counting a link's bytes over a migration.
#[derive(Debug)]
pub struct Counter {
    start: (u64, u64),
    rate: Option<u64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<f64>>,
}

/// What the link carried during a migration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counted {
    /// Source to destination, and back.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// The best rate source to destination over a 200 ms window, bytes/s.
    pub peak_rate: f64,
    /// The shaped rate (None: unshaped).
    pub rate: Option<u64>,
}

impl Counted {
    /// The migration never reached 0.9× the shaped rate: the CPU, not the
    /// link, limited it. False for an unshaped link.
    pub fn cpu_bound(&self) -> bool {
        self.rate
            .is_some_and(|r| self.peak_rate < CPU_BOUND_BELOW * r as f64)
    }
}

impl Counter {
    pub fn finish(mut self, link: &ShapedLink) -> Result<Counted> {
        self.stop.store(true, Ordering::Relaxed);
        let peak_rate = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(f64::NAN);
        let (tx, rx) = link.bytes()?;
        Ok(Counted {
            tx_bytes: tx - self.start.0,
            rx_bytes: rx - self.start.1,
            peak_rate,
            rate: self.rate,
        })
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples tx_bytes every [`SAMPLE`] and returns the best rate over any
/// [`RATE_WINDOW`] (over the whole run if it was shorter).
fn sample(host_if: &str, stop: &AtomicBool) -> f64 {
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(b) = counter(host_if, "tx_bytes") {
            samples.push((Instant::now(), b));
        }
        std::thread::sleep(SAMPLE);
    }
    peak_rate(&samples, RATE_WINDOW)
}

/// The best rate over a window of at least `window` in `samples` (time,
/// cumulative bytes), taken over the span in which the migration moved
/// bytes: the sampler also runs while the guests boot and are checked,
/// and a window reaching into that idle time would read a short
/// migration as slow. Over that whole span if it is shorter than `window`.
fn peak_rate(samples: &[(Instant, u64)], window: Duration) -> f64 {
    // A sample step of at least this many bytes is the migration's, not
    // the link's own chatter (ARP, IPv6 neighbour discovery: < 1 KiB).
    const MOVING: u64 = 4 << 10;
    let moving = |w: &[(Instant, u64)]| w[1].1 - w[0].1 >= MOVING;
    let samples = match (
        samples.windows(2).position(moving),
        samples.windows(2).rposition(moving),
    ) {
        (Some(start), Some(end)) => &samples[start..=end + 1],
        _ => samples,
    };
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return f64::NAN;
    };
    let rate = |a: &(Instant, u64), b: &(Instant, u64)| {
        (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64().max(1e-9)
    };
    if last.0 - first.0 < window {
        return rate(first, last);
    }
    let mut best: f64 = 0.0;
    let mut j = 0;
    for (i, b) in samples.iter().enumerate() {
        // The latest sample at least `window` before b.
        while j + 1 < i && b.0 - samples[j + 1].0 >= window {
            j += 1;
        }
        if b.0 - samples[j].0 >= window {
            best = best.max(rate(&samples[j], b));
        }
    }
    best
}

/// Deletes every namespace this process still has (for the signal
/// handler: the process exits right after).
pub fn remove_all() {
    let names = std::mem::take(&mut *NAMESPACES.lock().unwrap_or_else(PoisonError::into_inner));
    for ns in names {
        let _ = ip(&["netns", "del", &ns]);
    }
}

/// Deletes the namespaces of benchmarks that no longer run (killed by
/// SIGKILL before they could).
pub fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("hpmig-bench-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_rate_is_the_best_window_not_the_average() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // 1 MB/s for 400 ms, then 10 MB/s for 400 ms.
        let mut s = Vec::new();
        let mut bytes = 0;
        for i in 0..=80u64 {
            s.push((ms(i * 10), bytes));
            bytes += if i < 40 { 10_000 } else { 100_000 };
        }
        let peak = peak_rate(&s, Duration::from_millis(200));
        assert!((peak - 10e6).abs() < 0.06e6, "{peak}");
        // Shorter than the window: the whole run's average.
        let short = peak_rate(&s[..11], Duration::from_millis(200));
        assert!((short - 1e6).abs() < 1e3, "{short}");
        assert!(peak_rate(&[], Duration::from_millis(200)).is_nan());
        // 100 ms at 10 MB/s between a second of boot and one of checks:
        // the migration's own rate, not diluted by the idle time around it.
        let mut s = Vec::new();
        let mut bytes = 0;
        for i in 0..=210u64 {
            s.push((ms(i * 10), bytes));
            bytes += if (100..110).contains(&i) { 100_000 } else { 0 };
        }
        let short = peak_rate(&s, Duration::from_millis(200));
        assert!((short - 10e6).abs() < 0.06e6, "{short}");
    }

    #[test]
    fn a_cell_below_nine_tenths_of_the_shaped_rate_is_cpu_bound() {
        let c = |peak: f64, rate| Counted {
            tx_bytes: 0,
            rx_bytes: 0,
            peak_rate: peak,
            rate,
        };
        assert!(c(0.85e8, Some(1e8 as u64)).cpu_bound());
        assert!(!c(0.95e8, Some(1e8 as u64)).cpu_bound());
        assert!(!c(1.0, None).cpu_bound());
    }
}
