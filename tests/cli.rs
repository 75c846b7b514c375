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
    assert!(text.contains("at least 1 MiB"), "{text}");
}
