//! The operator's interface on a real `hpmig source` / `hpmig dest` pair
//! over loopback, with a slow bandwidth cap so that round 0 runs long
//! enough to watch: `hpmig ctl PATH status` twice mid-round, `set
//! bandwidth=` and the rate it brings, `/metrics` against what the kernel
//! counted on the source's sockets (`ss -ti`), then `cancel`, which must
//! leave the guest running on the source with its own exit status.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ctl(sock: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .arg("ctl")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

fn status(sock: &std::path::Path) -> (Instant, Value) {
    let (code, text) = ctl(sock, &["status"]);
    let at = Instant::now();
    assert_eq!(code, Some(0), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (at, v["return"].clone())
}

fn transferred(v: &Value) -> f64 {
    v["ram"]["transferred"].as_f64().unwrap()
}

/// Bytes the source process wrote to sockets to `port` that the kernel
/// saw acknowledged (`bytes_acked`), plus those still queued (`Send-Q`).
fn kernel_bytes(port: u16) -> f64 {
    let out = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            "dport",
            &format!("= :{port}"),
        ])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0.0;
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        // "Recv-Q Send-Q Local Peer" then the info line.
        let send_q: f64 = l
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let info = lines.next().unwrap_or("");
        let acked = info
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_acked:"))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        total += acked + send_q;
    }
    total
}

/// The sum of `hpmig_wire_bytes_total` over streams and kinds.
fn scraped_bytes(metrics: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let text = body.split("\r\n\r\n").nth(1).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let samples: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "hpmig_wire_bytes_total")
        .collect();
    assert!(samples.len() >= 8, "two streams x four kinds: {text}");
    samples
        .iter()
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{other:?}"),
        })
        .sum()
}

/// Waits (30 s at most) for the source to end after `what`; its exit
/// status and everything it printed.
fn ended(source: &mut Reaped, what: &str) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = source.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "{what} did not end the source");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let (stdout, stderr) = (source.0.stdout.as_mut(), source.0.stderr.as_mut());
    stdout.unwrap().read_to_string(&mut out).unwrap();
    stderr.unwrap().read_to_string(&mut out).unwrap();
    (code, out)
}

/// `hpmig dest --once` on `addr` with its journal under `dir`, and what
/// `more` adds; returns after giving it half a second to listen.
fn dest(addr: &str, dir: &std::path::Path, more: impl FnOnce(&mut Command)) -> Reaped {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hpmig"));
    c.args(["dest", "--listen", addr, "--once", "--io-timeout", "10s"])
        .arg("--journal")
        .arg(dir.join("journal"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    more(&mut c);
    let d = Reaped(c.spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    d
}

/// `hpmig source` to `addr` with its control socket at `sock`: 64 MiB of
/// full pages at 3 MB/s, so that round 0 takes ~22 s, long enough to
/// watch; `more` adds flags. Its output is kept for [`ended`].
fn capped_source(addr: &str, sock: &std::path::Path, more: impl FnOnce(&mut Command)) -> Reaped {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hpmig"));
    c.args([
        "source", "--to", addr, "--memory", "64M", "--warmup", "50ms",
    ])
    .args(["--dirty-rate", "10000", "--bandwidth", "3MB/s"])
    .arg("--control")
    .arg(sock)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    more(&mut c);
    Reaped(c.spawn().unwrap())
}

/// Waits (30 s at most) until the migration behind `sock` is in a
/// pre-copy round and `also` holds of its status.
fn until_active(sock: &std::path::Path, also: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "round 0 never started");
        if sock.exists() {
            let (_, v) = status(sock);
            if v["status"] == "active" && also(&v) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_operator_watches_steers_scrapes_and_cancels_a_running_migration() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let dest_metrics = format!("127.0.0.1:{}", free_port());
    let sock = dir.path().join("source.sock");
    let dest_sock = dir.path().join("dest.sock");
    let events = dir.path().join("events.jsonl");
    let dest = dest(&addr, dir.path(), |c| {
        c.arg("--control")
            .arg(&dest_sock)
            .args(["--metrics", &dest_metrics]);
    });
    let mut source = capped_source(&addr, &sock, |c| {
        c.args(["--metrics", &metrics]).arg("--events").arg(&events);
    });
    // Wait for round 0 to be under way.
    until_active(&sock, |v| transferred(v) > 1e6);

    // Two status calls mid-round.
    let (t1, s1) = status(&sock);
    std::thread::sleep(Duration::from_secs(1));
    let (t2, s2) = status(&sock);
    for s in [&s1, &s2] {
        assert_eq!(s["status"], "active", "{s}");
        assert_eq!(s["round"], 0, "{s}");
        let total = s["ram"]["total"].as_u64().unwrap();
        assert_eq!(total, 64 << 20, "{s}");
        assert!(s["ram"]["remaining"].as_u64().unwrap() <= total, "{s}");
        for field in [
            "/ram/dirty-pages-rate",
            "/ram/mbps",
            "/total-time-ms",
            "/running-round/eta-ms",
            "/config/memory_bytes",
            "/config/workers",
            "/config/max-bandwidth",
            "/config/downtime-limit-ms",
            "/bytes/whole-page",
        ] {
            assert!(s.pointer(field).is_some(), "{field} missing: {s}");
        }
    }
    assert!(transferred(&s2) > transferred(&s1), "{s1}\n{s2}");
    // The destination shows what it landed; steering is the source's.
    let (_, d) = status(&dest_sock);
    assert_eq!(d["status"], "active", "{d}");
    assert_eq!(d["ram"]["total"], 64 << 20, "{d}");
    assert!(
        transferred(&d) > 0.0 && transferred(&d) <= transferred(&s2) * 1.5,
        "{d}"
    );
    let landed = scraped_bytes(&dest_metrics);
    assert!(landed > 0.0 && landed <= transferred(&s2) * 1.5, "{landed}");
    let (code, text) = ctl(&dest_sock, &["cancel"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("source"), "{text}");
    assert!(
        s2["ram"]["remaining"].as_u64() < s1["ram"]["remaining"].as_u64(),
        "{s1}\n{s2}"
    );
    let rate = |a: (Instant, &Value), b: (Instant, &Value)| {
        (transferred(b.1) - transferred(a.1)) / (b.0 - a.0).as_secs_f64()
    };
    let before = rate((t1, &s1), (t2, &s2));
    assert!(
        (before - 3e6).abs() < 0.15 * 3e6,
        "rate under a 3 MB/s cap: {before:.0} B/s"
    );

    // Triple the cap: the measured rate follows within a second.
    let (code, text) = ctl(&sock, &["set", "bandwidth=9MB/s"]);
    assert_eq!(code, Some(0), "{text}");
    std::thread::sleep(Duration::from_secs(1));
    let (t3, s3) = status(&sock);
    std::thread::sleep(Duration::from_secs(1));
    let (t4, s4) = status(&sock);
    let after = rate((t3, &s3), (t4, &s4));
    assert!(
        (after - 9e6).abs() < 0.15 * 9e6,
        "rate after set bandwidth=9MB/s: {after:.0} B/s (before: {before:.0})"
    );
    assert_eq!(s4["config"]["max-bandwidth"], 9_000_000, "{s4}");

    // /metrics against the kernel's count on the source's sockets.
    let m1 = scraped_bytes(&metrics);
    let kernel = kernel_bytes(port);
    let m2 = scraped_bytes(&metrics);
    assert!(
        kernel >= m1 * 0.99 && kernel <= m2 * 1.01,
        "kernel {kernel:.0} B, metrics {m1:.0}..{m2:.0} B"
    );

    // Cancel: the guest runs on at the source, which exits 6.
    let (code, text) = ctl(&sock, &["cancel"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, out) = ended(&mut source, "cancel");
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("cancelled by the operator"), "{out}");
    assert!(
        out.contains("runs on"),
        "the guest runs on at the source: {out}"
    );
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(log.contains(r#""status":"active""#), "{log}");
    assert!(log.contains(r#""status":"cancelled""#), "{log}");
    drop(dest);
}

#[test]
fn sigterm_and_sigint_cancel_like_the_control_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let sock = dir.path().join("source.sock");
        let dest = dest(&addr, dir.path(), |_| {});
        let mut source = capped_source(&addr, &sock, |_| {});
        until_active(&sock, |_| true);
        // SAFETY: kill(2) on a child of this test.
        unsafe {
            libc::kill(source.0.id() as i32, sig);
        }
        let (code, out) = ended(&mut source, &format!("signal {sig}"));
        assert_eq!(code, Some(6), "signal {sig}: {out}");
        assert!(out.contains("runs on"), "signal {sig}: {out}");
        drop(dest);
    }
}
