//! The `hpmig` binary as a user runs it.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn hpmig(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
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
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("verified, destination equals source"),
        "{text}"
    );
    assert!(text.contains("guest runs on"), "{text}");
    let doc = std::fs::read_to_string(&json).unwrap();
    for key in [
        "\"rounds\"",
        "\"dirty_pages\"",
        "\"work_set_bytes\"",
        "\"wire_bytes\"",
        "\"downtime_ms\"",
        "\"verified\": true",
    ] {
        assert!(doc.contains(key), "{key} missing from {doc}");
    }
    let _ = std::fs::remove_file(json);
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let (ok, text) = hpmig(&["demo", "--memory", "12X"]);
    assert!(!ok);
    assert!(text.contains("unknown size unit"), "{text}");
    let (ok, text) = hpmig(&["demo", "--workload", "busy"]);
    assert!(!ok);
    assert!(text.contains("unknown workload 'busy'"), "{text}");
    let (ok, text) = hpmig(&["demo", "--memory", "100K"]);
    assert!(!ok);
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

/// Runs `hpmig dest` and `hpmig source` as two processes on loopback.
fn two_processes(dest_token: &str, source_token: &str) -> ((bool, String), (bool, String)) {
    let addr = format!("127.0.0.1:{}", free_port());
    let dest = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args([
            "dest",
            "--listen",
            &addr,
            "--run-for",
            "300ms",
            "--io-timeout",
            "10s",
        ])
        .env("HPMIG_TOKEN", dest_token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The destination binds before it prints; give it a moment, then retry connecting.
    let mut source = (false, String::new());
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let out = Command::new(env!("CARGO_BIN_EXE_hpmig"))
            .args([
                "source", "--to", &addr, "--memory", "16M", "--warmup", "50ms", "--zstd", "auto",
            ])
            .env("HPMIG_TOKEN", source_token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        source = (out.status.success(), text);
        if !source.1.contains("connecting to") {
            break;
        }
    }
    let out = dest.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (source, (out.status.success(), text))
}

#[test]
fn source_and_dest_migrate_across_processes() {
    let ((s_ok, s), (d_ok, d)) = two_processes("tok", "tok");
    assert!(s_ok, "source: {s}\ndest: {d}");
    assert!(d_ok, "dest: {d}");
    assert!(s.contains("verified, destination equals source"), "{s}");
    assert!(d.contains("(runs on)"), "{d}");
}

#[test]
fn a_source_with_the_wrong_token_is_refused() {
    let ((s_ok, s), (d_ok, d)) = two_processes("right", "wrong");
    assert!(!s_ok && !d_ok, "source: {s}\ndest: {d}");
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
