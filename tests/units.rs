//! The traps of issue 16 in units and flags, as a user meets them through
//! the real binary: each value is refused before anything starts (exit
//! status 2, one line that names the accepted range or form, nothing
//! booted) or read as it was meant, and the banner says how it was read.
//! The parsers' own cases are unit tests in src/units.rs.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

/// The exit status and everything printed.
fn hpmig(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Runs `args`, asserts it is refused (exit 2) on one line that contains
/// every one of `says`, and that no guest booted; returns that line.
fn refused(args: &[&str], says: &[&str]) -> String {
    let (code, text) = hpmig(args);
    assert_eq!(code, Some(2), "{args:?}: {text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: one line: {text}");
    for s in says {
        assert!(errors[0].contains(s), "{args:?}: '{s}' missing: {text}");
    }
    assert!(!text.contains("guest:"), "{args:?}: nothing boots: {text}");
    assert!(
        !text.contains("dirty pages"),
        "{args:?}: no round runs: {text}"
    );
    errors[0].to_string()
}

#[test]
fn a_rate_needs_a_unit_that_says_bits_or_bytes() {
    // A bare number was 100 bytes/s, a cap that never left round 0.
    refused(
        &["demo", "--bandwidth", "100"],
        &["'100' needs a unit", "100MB/s", "100Mbit"],
    );
    refused(&["demo", "--bandwidth", "100M"], &["bytes or bits"]);
    refused(
        &["demo", "--bandwidth", "100B/s"],
        &["outside the range 125 kB/s (1 Mbit/s) to 10 TB/s"],
    );
}

#[test]
fn sizes_and_durations_take_fractions_and_binary_units() {
    // 1.5G, 100MiB and 1.5s all parse (they were "unknown size unit
    // '.5g'"), so the refusal is about the one flag that is wrong.
    let line = refused(
        &[
            "demo",
            "--memory",
            "1.5G",
            "--shadow-budget",
            "100MiB",
            "--downtime",
            "1.5s",
            "--bandwidth",
            "100MiB",
            "--max-rounds",
            "0",
        ],
        &["--max-rounds", "1..=1000"],
    );
    assert!(!line.contains("--memory"), "{line}");
    refused(
        &["demo", "--memory", "256"],
        &["needs a unit", "256M (MiB)"],
    );
}

#[test]
fn memory_under_the_minimum_names_the_real_minimum_for_the_guest_chosen() {
    // 3M was refused by an error that named 3 MiB as the minimum.
    for (guest, who) in [("kvm", "KVM micro-VM"), ("emulated", "emulated guest")] {
        refused(
            &["demo", "--guest", guest, "--memory", "3M"],
            &["--memory 3.0 MiB", who, "between 4 MiB and 64 GiB"],
        );
    }
    refused(
        &["demo", "--memory", "4097M"],
        &["multiple of 2 MiB between 4 MiB and 64 GiB"],
    );
}

#[test]
fn zero_workers_rounds_downtime_and_rate_are_refused_with_their_range() {
    refused(&["demo", "--workers", "0"], &["--workers", "1..=256"]);
    refused(&["source", "--to", "x:1", "--streams", "0"], &["1..=256"]);
    refused(
        &["demo", "--max-rounds", "0"],
        &["--max-rounds", "1..=1000"],
    );
    refused(
        &["demo", "--downtime", "0"],
        &["--downtime", "needs a unit", "1 ms to 1 h"],
    );
    refused(
        &["demo", "--downtime", "0ms"],
        &["--downtime", "outside the range 1 ms to 1 h"],
    );
    refused(
        &["demo", "--dirty-rate", "0"],
        &["--dirty-rate", "from 1 to 10000000000"],
    );
    refused(
        &["dest", "--listen", "127.0.0.1:0", "--io-timeout", "0s"],
        &["--io-timeout", "1 ms to 24 h"],
    );
}

#[test]
fn a_report_that_could_not_be_written_is_refused_before_the_guest_boots() {
    let start = Instant::now();
    refused(
        &[
            "demo",
            "--memory",
            "16M",
            "--json",
            "/nonexistent-hpmig/r.json",
        ],
        &["--json /nonexistent-hpmig/r.json", "no directory"],
    );
    assert!(start.elapsed() < Duration::from_secs(10), "fails fast");
    let dir = std::env::temp_dir();
    refused(
        &["demo", "--json", dir.to_str().unwrap()],
        &["is a directory"],
    );
}

#[test]
fn a_destination_address_is_checked_before_the_guest_boots_and_its_cause_said_once() {
    refused(
        &["source", "--to", "no-such-host.invalid:7790"],
        &["--to no-such-host.invalid:7790"],
    );
    refused(&["source", "--to", "no-port"], &["--to no-port"]);
    refused(&["dest", "--listen", "bogus"], &["--listen bogus"]);
    // A port nothing listens on: found before the guest boots, the cause
    // printed once (it was "Connection refused (os error 111): Connection
    // refused (os error 111)").
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    let (code, text) = hpmig(&["source", "--to", &to, "--memory", "16M"]);
    assert_eq!(code, Some(1), "the environment, not the input: {text}");
    assert!(!text.contains("guest:"), "nothing boots: {text}");
    assert_eq!(text.matches("refused").count(), 1, "once: {text}");
    assert!(
        text.contains(&format!("hpmig: error: --to {to}: ")),
        "{text}"
    );
}

#[test]
fn rdma_in_a_build_without_it_is_refused_before_the_destination_waits() {
    if cfg!(feature = "rdma") {
        return;
    }
    refused(
        &["dest", "--listen", "127.0.0.1:0", "--rdma", "mlx5_0"],
        &["--rdma mlx5_0", "--features rdma"],
    );
    let (_, text) = hpmig(&["dest", "--listen", "127.0.0.1:0", "--rdma", "mlx5_0"]);
    assert!(!text.contains("waiting"), "{text}");
    assert!(!text.contains("peak memory"), "one line: {text}");
}

#[test]
fn the_banner_echoes_every_flag_that_changes_the_outcome() {
    let (code, text) = hpmig(&[
        "demo",
        "--memory",
        "16M",
        "--warmup",
        "50ms",
        "--wire",
        "inproc",
        "--dirty-rate",
        "50000",
        "--contents",
        "mixed",
        "--granularity",
        "page",
        "--workers",
        "3",
        // 100MBps is megabytes: it was read as megabits (12.6 MB/s).
        "--bandwidth",
        "100MBps",
        "--downtime",
        "1.5s",
        "--max-rounds",
        "7",
        "--verify",
        "strict",
        "--zstd",
        "auto",
    ]);
    assert!(matches!(code, Some(0 | 7)), "{text}");
    let banner: String = text.lines().take(4).collect::<Vec<_>>().join("\n");
    for says in [
        "16.0 MiB guest",
        "1 vCPU(s)",
        "workload sparse at 50000 writes/s",
        "mixed contents",
        "page granularity",
        "3 worker(s)",
        "downtime target 1500 ms",
        "at most 7 rounds then stop-and-copy",
        "bandwidth cap 100 MB/s (800 Mbit/s)",
        "verify strict",
        "zstd auto",
        "in-process channels",
    ] {
        assert!(
            banner.contains(says),
            "'{says}' missing from the banner:\n{text}"
        );
    }
}

#[test]
fn the_destination_echoes_what_it_accepts() {
    use std::io::BufRead;
    let journal = std::env::temp_dir().join(format!("hpmig-units-journal-{}", std::process::id()));
    let mut dest = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(["dest", "--listen", "127.0.0.1:0", "--once"])
        .args(["--max-memory", "1.5G", "--run-for", "1.5s", "--journal"])
        .arg(&journal)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(dest.stdout.take().unwrap()).lines();
    let banner = [lines.next(), lines.next()].map(|l| l.unwrap().unwrap());
    let _ = dest.kill();
    let _ = dest.wait();
    let _ = std::fs::remove_dir_all(&journal);
    assert!(
        banner[0].contains("waiting for one migration"),
        "{banner:?}"
    );
    assert!(
        banner[1].contains("guests up to 1.5 GiB, one source; runs the guest 1500 ms"),
        "{banner:?}"
    );
}

#[test]
fn the_shadow_takes_full_or_fingerprint_and_a_budget_only_with_full() {
    refused(
        &["demo", "--shadow", "fingerprint", "--shadow-budget", "64M"],
        &["--shadow-budget", "--shadow full"],
    );
    refused(&["demo", "--shadow", "bogus"], &["full or fingerprint"]);
}
