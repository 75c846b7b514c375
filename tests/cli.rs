//! The `hpmig` binary as a user runs it.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn hpmig(args: &[&str]) -> (bool, String) {
    let (code, text) = hpmig_status(args);
    (code == Some(0), text)
}

/// The exit status (see src/outcome.rs's table) and everything printed.
fn hpmig_status(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn demo_migrates_verifies_and_writes_json() {
    let json = std::env::temp_dir().join(format!("hpmig-cli-{}.json", std::process::id()));
    let (ok, text) = hpmig(&[
        "demo",
        "--memory",
        "32M",
        "--warmup",
        "50ms",
        "--dirty-rate",
        "100000",
        // A debug build on a loaded machine can pause for longer than the
        // default 300 ms; this test is about the flow, the next one about
        // the target.
        "--downtime",
        "5s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("incremental: what landed equals what was sent"),
        "{text}"
    );
    assert!(text.contains("source check:  8192 pages"), "{text}");
    assert!(text.contains("guest runs on"), "{text}");
    let doc = std::fs::read_to_string(&json).unwrap();
    for key in [
        "\"rounds\"",
        "\"dirty_pages\"",
        "\"work_set_bytes\"",
        "\"wire_bytes\"",
        "\"downtime_ms\"",
        "\"verified\": true",
        "\"downtime_target_met\": true",
        "\"pages_differ\": 0",
        "\"switchover_ms\"",
    ] {
        assert!(doc.contains(key), "{key} missing from {doc}");
    }
    let _ = std::fs::remove_file(json);
}

#[test]
fn a_missed_downtime_target_is_said_and_exits_7() {
    let json = std::env::temp_dir().join(format!("hpmig-cli-7-{}.json", std::process::id()));
    // No pause fits a zero target; pre-copy still stops on its small work set.
    let (code, text) = hpmig_status(&[
        "demo",
        "--memory",
        "16M",
        "--warmup",
        "50ms",
        "--dirty-rate",
        "100000",
        "--downtime",
        "0ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(7), "{text}");
    assert!(
        text.contains("against a target of 0 ms, NOT kept"),
        "{text}"
    );
    let doc = std::fs::read_to_string(&json).unwrap();
    assert!(doc.contains("\"downtime_target_met\": false"), "{doc}");
    assert!(
        doc.contains("\"outcome\": \"migrated-target-missed\""),
        "{doc}"
    );
    let _ = std::fs::remove_file(json);
}

#[test]
fn bad_flags_are_refused_with_a_reason_and_exit_status_2() {
    let (code, text) = hpmig_status(&["demo", "--memory", "12X"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("unknown size unit"), "{text}");
    let (code, text) = hpmig_status(&["demo", "--workload", "busy"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("unknown workload 'busy'"), "{text}");
    let (code, text) = hpmig_status(&["demo", "--memory", "100K"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("--memory") && text.contains("multiple of 2 MiB between"),
        "{text}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `hpmig dest` and `hpmig source` as two processes on loopback;
/// returns each one's exit status and output.
fn two_processes(
    dest_token: &str,
    source_token: &str,
) -> ((Option<i32>, String), (Option<i32>, String)) {
    let addr = format!("127.0.0.1:{}", free_port());
    let journal = std::env::temp_dir().join(format!("hpmig-cli-journal-{}", std::process::id()));
    let dest = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args([
            "dest",
            "--listen",
            &addr,
            "--run-for",
            "300ms",
            "--io-timeout",
            "10s",
            "--once",
            "--journal",
            journal.to_str().unwrap(),
        ])
        .env("HPMIG_TOKEN", dest_token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The destination binds before it prints; give it a moment, then retry connecting.
    let mut source = (None, String::new());
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
            .args([
                "source",
                "--to",
                &addr,
                "--memory",
                "16M",
                "--warmup",
                "50ms",
                "--dirty-rate",
                "100000",
                "--zstd",
                "auto",
                // A debug build may pause past the default target (exit 7).
                "--downtime",
                "5s",
            ])
            .env("HPMIG_TOKEN", source_token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        source = (out.status.code(), text);
        if !source.1.contains("connecting to") {
            break;
        }
    }
    let out = dest.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (source, (out.status.code(), text))
}

#[test]
fn source_and_dest_migrate_across_processes_and_exit_0() {
    let ((s_code, s), (d_code, d)) = two_processes("tok", "tok");
    assert_eq!(s_code, Some(0), "source: {s}\ndest: {d}");
    assert_eq!(d_code, Some(0), "dest: {d}");
    assert!(s.contains("what landed equals what was sent"), "{s}");
    assert!(s.contains("source check:"), "{s}");
    assert!(d.contains("(runs on)"), "{d}");
}

#[test]
fn a_source_with_the_wrong_token_is_refused_and_both_exit_3() {
    let ((s_code, s), (d_code, d)) = two_processes("right", "wrong");
    assert_eq!(
        (s_code, d_code),
        (Some(3), Some(3)),
        "failed, the guest runs on the source: source: {s}\ndest: {d}"
    );
    assert!(s.contains("authentication"), "{s}");
    assert!(d.contains("refused") && d.contains("authentication"), "{d}");
}

#[test]
fn demo_runs_over_the_in_process_wire_too() {
    let (ok, text) = hpmig(&[
        "demo",
        "--memory",
        "16M",
        "--warmup",
        "50ms",
        "--wire",
        "inproc",
        "--granularity",
        "page",
        // The flow is under test, not the pause (a debug build may miss the
        // default 300 ms target and exit 7).
        "--downtime",
        "5s",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("in-process channels"), "{text}");
}

#[test]
fn rdma_without_the_feature_or_the_device_says_why_and_boots_nothing() {
    let (ok, text) = hpmig(&[
        "demo",
        "--guest",
        "emulated",
        "--memory",
        "32M",
        "--rdma",
        "nosuchdev0",
    ]);
    assert!(!ok, "{text}");
    if cfg!(feature = "rdma") {
        assert!(text.contains("no RDMA device 'nosuchdev0'"), "{text}");
    } else {
        assert!(
            text.contains("--features rdma") && text.contains("libibverbs-dev"),
            "the message says how to build with RDMA: {text}"
        );
    }
    assert!(!text.contains("guest:"), "nothing booted: {text}");
    let (ok, text) = hpmig(&["devices"]);
    if cfg!(feature = "rdma") {
        // Either devices with their ports, or a plain statement of none.
        assert!(
            (ok && text.contains("hca_id:")) || (!ok && text.contains("no RDMA devices found")),
            "{text}"
        );
    } else {
        assert!(!ok && text.contains("--features rdma"), "{text}");
    }
}

/// The number before " ms" on the summary line that starts with `label`.
fn ms_on(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' figure in {text}"))
}

#[test]
fn the_blackout_the_guest_sees_covers_a_pause_between_ack_and_commit() {
    let run = |delay: &str| {
        let (code, text) = hpmig_status(&[
            "demo",
            "--memory",
            "16M",
            "--warmup",
            "50ms",
            "--dirty-rate",
            "100000",
            "--downtime",
            "5s",
            "--test-delay-commit",
            delay,
        ]);
        assert_eq!(code, Some(0), "{text}");
        (ms_on(&text, "blackout:"), ms_on(&text, "downtime:"), text)
    };
    let (plain, _, text) = run("0ms");
    assert!(plain > 0.0, "{text}");
    // 200 ms more pause between Ack and Commit: the host-side observer of
    // the guest's heartbeat must see all of it, and so must the downtime.
    let (held, downtime, text) = run("200ms");
    assert!(held >= 200.0, "blackout {held} ms: {text}");
    assert!(downtime >= 200.0, "downtime {downtime} ms: {text}");
}
