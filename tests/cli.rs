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
    // The report as docs/report.md describes it: versioned, every field
    // documented, decisions and the stop reason in words.
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["schema"], hpmig_report::SCHEMA, "{doc}");
    // The blackout comes with the observer's own figures: the rate it
    // achieved around the switch-over and the CPU it took.
    let summary = &v["summary"];
    assert!(summary["blackout_ms"].is_f64(), "{doc}");
    assert!(
        summary["observer_sample_hz_switchover"].as_f64() > Some(0.0),
        "{doc}"
    );
    let share = summary["observer_cpu_share"].as_f64().unwrap_or(-1.0);
    assert!(share > 0.0 && share <= 1.0, "{doc}");
    let mut written = std::collections::BTreeSet::new();
    json_paths(&v, "", &mut written);
    let documented = documented_report_fields();
    let undocumented: Vec<_> = written.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "fields missing from docs/report.md: {undocumented:?}"
    );
    assert_eq!(v["config"]["memory_bytes"], 32 << 20, "{doc}");
    assert_eq!(v["config"]["downtime_target_ms"], 5000.0, "{doc}");
    // The memory it cost: both ends' guests live in this one process, and
    // by default the source kept block fingerprints of what it sent (1/8).
    let s = &v["summary"];
    assert!(
        s["peak_rss_bytes"].as_u64().unwrap() > 2 * (32 << 20),
        "{doc}"
    );
    assert_eq!(v["config"]["shadow"], "fingerprint", "{doc}");
    assert_eq!(s["diff_store"], "fingerprints", "{doc}");
    assert_eq!(s["diff_store_bytes"], 4 << 20, "{doc}");
    assert!(text.contains("kept to diff against"), "{text}");
    let rounds = v["rounds"].as_array().unwrap();
    let decided = &rounds[rounds.len() - 2];
    assert_eq!(decided["decision"], "stop-and-copy", "{doc}");
    assert_eq!(decided["reason"], v["summary"]["stop_reason"], "{doc}");
    let reason = v["summary"]["stop_reason"].as_str().unwrap();
    assert!(
        ["clean", "small-work-set", "downtime-fits"].contains(&reason),
        "{doc}"
    );
    assert!(
        !text.contains("StopAndCopy") && !text.contains("Continue"),
        "{text}"
    );
    let _ = std::fs::remove_file(json);
}

#[test]
fn a_full_shadow_is_asked_for_and_the_report_says_so() {
    let json = std::env::temp_dir().join(format!("hpmig-cli-full-{}.json", std::process::id()));
    let demo = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["demo", "--memory", "32M", "--warmup", "50ms"];
        args.extend(["--downtime", "5s", "--json", json.to_str().unwrap()]);
        args.extend(extra);
        let (ok, text) = hpmig(&args);
        assert!(ok, "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(
            text.contains(&format!(
                "{} kept to diff against",
                hpmig_report::text::bytes(v["summary"]["diff_store_bytes"].as_u64().unwrap())
            )),
            "{text}"
        );
        v
    };
    let v = demo(&["--shadow", "full"]);
    assert_eq!(v["summary"]["diff_store"], "shadow", "{v}");
    assert_eq!(v["summary"]["diff_store_bytes"], 32 << 20, "{v}");
    // A budget alone asks for a (bounded) full shadow.
    let v = demo(&["--shadow-budget", "16M"]);
    assert_eq!(v["config"]["shadow"], "full", "{v}");
    assert_eq!(v["summary"]["diff_store_bytes"], 16 << 20, "{v}");
    let _ = std::fs::remove_file(json);
}

/// The paths of every field of a JSON value: `summary.switchover_ms.pause`,
/// `rounds[].round`.
fn json_paths(v: &serde_json::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                json_paths(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for v in a.iter().filter(|v| v.is_object()) {
                json_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// The fields docs/report.md documents: the first column of its tables.
fn documented_report_fields() -> std::collections::BTreeSet<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/report.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_missed_downtime_target_is_said_and_exits_7() {
    let json = std::env::temp_dir().join(format!("hpmig-cli-7-{}.json", std::process::id()));
    // No pause fits the smallest target (1 ms, under the switch-over's own
    // fixed cost); pre-copy still stops on its small work set.
    let (code, text) = hpmig_status(&[
        "demo",
        "--memory",
        "16M",
        "--warmup",
        "50ms",
        "--dirty-rate",
        "100000",
        "--downtime",
        "1ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(7), "{text}");
    assert!(
        text.contains("against a target of 1 ms, NOT kept"),
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
fn limits_prints_a_positive_memcpy_and_memcmp_rate_per_thread_count() {
    let (ok, text) = hpmig(&["limits", "--threads", "1", "--size", "16M"]);
    assert!(ok, "{text}");
    for name in ["memcpy", "memcmp"] {
        // The fields scripts/scaling.sh reads: $3 threads, $5 total, $9 per thread.
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in {text}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 10, "{line}");
        assert_eq!(
            (f[1], f[2], f[3], f[5], f[6], f[7], f[9]),
            ("threads", "1", "total", "GiB/s", "per", "thread", "GiB/s"),
            "{line}"
        );
        let total: f64 = f[4].parse().unwrap();
        let per_thread: f64 = f[8].parse().unwrap();
        assert!(total > 0.0 && total.is_finite(), "{line}");
        assert!((per_thread - total).abs() < 0.02, "one thread: {line}");
    }
    let (code, text) = hpmig_status(&["limits", "--size", "64K"]);
    assert_eq!(code, Some(2), "{text}");
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

#[test]
fn pump_without_the_feature_or_the_device_says_why_and_sends_nothing() {
    // Sending, and timing registrations: both need the device first.
    for extra in [&[][..], &["--register", "16M"][..]] {
        let mut args = vec!["pump", "--rdma", "nosuchdev0", "--duration", "1s"];
        args.extend_from_slice(extra);
        let (code, text) = hpmig_status(&args);
        assert!(code.is_some_and(|c| c != 0), "{code:?}: {text}");
        if cfg!(feature = "rdma") {
            assert!(text.contains("no RDMA device 'nosuchdev0'"), "{text}");
        } else {
            assert_eq!(code, Some(2), "a usage error: {text}");
            assert!(
                text.contains("--features rdma") && text.contains("libibverbs-dev"),
                "the message says how to build with RDMA: {text}"
            );
        }
        assert!(!text.contains("Gbit/s"), "nothing measured: {text}");
    }
    // No device named at all, or a batch of no whole pages: usage errors.
    let (code, text) = hpmig_status(&["pump"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("needs --rdma DEVICE"), "{text}");
    if cfg!(feature = "rdma") {
        let (code, text) = hpmig_status(&["pump", "--rdma", "nosuchdev0", "--size", "6000B"]);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("whole number of"), "{text}");
    }
}

/// The first duration on the summary line that starts with `label`, in ms
/// (printed as "412.7 ms" or, from a second on, "1.2 s").
fn ms_on(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            let n: f64 = w.next()?.parse().ok()?;
            match w.next()? {
                "ms" => Some(n),
                "s" => Some(n * 1e3),
                _ => None,
            }
        })
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

/// A child killed when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process this test spawned, signalled.
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a child of this test.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `hpmig dest` as a service on a fresh port, with a journal and a control
/// socket under `dir`; returns it once it listens, its address, and its
/// output from then on.
type Output = std::sync::Arc<std::sync::Mutex<String>>;
fn dest_service(dir: &std::path::Path) -> (Reaped, String, Output, std::thread::JoinHandle<()>) {
    use std::io::{BufRead, BufReader};
    let addr = format!("127.0.0.1:{}", free_port());
    let mut dest = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(["dest", "--listen", &addr, "--io-timeout", "1s"])
        .args(["--run-for", "300ms", "--journal"])
        .arg(dir.join("journal"))
        .arg("--control")
        .arg(dir.join("dest.sock"))
        .env("HPMIG_TOKEN", "tok")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(dest.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("waiting for one migration") {}
    assert!(line.contains("waiting for one migration"), "{line}");
    // The rest of its output, for the test to read.
    let rest = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let r = std::sync::Arc::clone(&rest);
    // Its stderr into the same text, line by line.
    let err = BufReader::new(dest.stderr.take().unwrap());
    let e = std::sync::Arc::clone(&rest);
    let err_reader = std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            e.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    let reader = std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            r.lock().unwrap().push_str(&(l + "\n"));
        }
        let _ = err_reader.join();
    });
    (Reaped(dest), addr, rest, reader)
}

/// `hpmig source` through `to`, the campaign's guest and policy (rounds
/// 0-3, then stop-and-copy round 4), the guest writing `rate` times a
/// second; the caller adds --io-timeout.
fn source_to(to: &str, rate: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hpmig"));
    c.args(["source", "--to", to, "--memory", "16M", "--prefill"])
        .args(["--granularity", "page", "--dirty-rate", rate])
        .args(["--downtime", "1ms", "--max-rounds", "4", "--warmup", "50ms"])
        .env("HPMIG_TOKEN", "tok")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// A fault at the first `kind` record from the destination, through the
/// proxy: the hook gets the source's pid.
fn proxy_at(
    dest_addr: &str,
    kind: hpmig_core::protocol::Kind,
    hook: impl Fn(i32) + Send + Sync + 'static,
) -> (
    hpmig_core::testing::proxy::Proxy,
    std::sync::Arc<std::sync::atomic::AtomicI32>,
) {
    use hpmig_core::testing::proxy::{Action, Plan, Proxy, RecordAt, Which};
    use std::sync::atomic::{AtomicI32, Ordering};
    let source_pid = std::sync::Arc::new(AtomicI32::new(0));
    let pid = std::sync::Arc::clone(&source_pid);
    let plan = Plan {
        which: Which::Record(RecordAt {
            conn: 0,
            to_dest: false,
            kind,
            nth: 0,
            round: None,
        }),
        at: 0,
        action: Action::Hook(std::sync::Arc::new(move || {
            hook(pid.load(Ordering::SeqCst))
        })),
    };
    let proxy = Proxy::start(dest_addr.parse().unwrap(), Some(plan), false).unwrap();
    (proxy, source_pid)
}

#[test]
fn a_source_killed_as_the_ack_passes_leaves_the_copy_in_doubt_on_the_control_socket() {
    use std::sync::atomic::Ordering;
    let dir = std::env::temp_dir().join(format!("hpmig-cli-ack-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut dest, addr, out, reader) = dest_service(&dir);
    let (proxy, source_pid) = proxy_at(&addr, hpmig_core::protocol::Kind::Ack, |source| {
        signal(source, libc::SIGKILL)
    });
    let mut source = source_to(&proxy.addr().to_string(), "100000")
        .args(["--io-timeout", "1s"])
        .spawn()
        .unwrap();
    source_pid.store(source.id() as i32, Ordering::SeqCst);
    let status = source.wait().unwrap();
    assert!(proxy.fired(), "the Ack never came by");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let killed = proxy.fired_at().unwrap();
    // The destination acknowledged and got no decision: within a few
    // seconds (its --io-timeout is 1 s) its control socket says so.
    let sock = dir.join("dest.sock");
    let mut last = String::new();
    while killed.elapsed() < std::time::Duration::from_secs(5) {
        let (ok, text) = hpmig(&["ctl", sock.to_str().unwrap(), "status"]);
        if ok && text.contains("in-doubt") {
            last = text;
            break;
        }
        last = text;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let in_doubt = last.contains("in-doubt");
    // The hint says, on one line, what an operator may do.
    let t = std::time::Instant::now();
    while !out.lock().unwrap().contains("--source-fenced")
        && t.elapsed() < std::time::Duration::from_secs(2)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hint = out.lock().unwrap().clone();
    let one_line = hint
        .lines()
        .any(|l| l.contains("By hand:") && l.contains("resolve run --source-fenced"));
    if in_doubt {
        // The source is gone for good: its guest is fenced; run the copy.
        let (ok, text) = hpmig(&[
            "ctl",
            sock.to_str().unwrap(),
            "resolve",
            "run",
            "--source-fenced",
        ]);
        assert!(ok, "{text}");
        let code = dest.0.wait().unwrap().code();
        reader.join().unwrap();
        let out = out.lock().unwrap().clone();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("(runs on)"), "{out}");
    } else {
        let _ = dest.0.kill();
        let _ = dest.0.wait();
    }
    proxy.stop();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        in_doubt,
        "5 s after the source died the destination's control socket says: {last}"
    );
    assert!(one_line, "the operator's hint is not one line: {hint}");
}

/// Whether the destination's stop lands before the guest's heartbeat first
/// moves there is a race (it did in 3 of 5 runs without the fix), so the
/// stop is tried three times.
#[test]
fn a_destination_frozen_as_it_sends_the_outcome_still_sees_its_guest_run() {
    for attempt in 0..3 {
        frozen_as_it_sends_the_outcome(attempt);
    }
}

fn frozen_as_it_sends_the_outcome(attempt: u32) {
    use std::sync::atomic::{AtomicI32, Ordering};
    let dir = std::env::temp_dir().join(format!(
        "hpmig-cli-outcome-stop-{}-{attempt}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut dest, addr, out, reader) = dest_service(&dir);
    let dest_pid = std::sync::Arc::new(AtomicI32::new(dest.0.id() as i32));
    let pid = std::sync::Arc::clone(&dest_pid);
    // Stopped for longer than its --run-for (300 ms), as a stalled host
    // would, right after it started the guest.
    let (proxy, _) = proxy_at(&addr, hpmig_core::protocol::Kind::Outcome, move |_| {
        let dest = pid.load(Ordering::SeqCst);
        signal(dest, libc::SIGSTOP);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            signal(dest, libc::SIGCONT);
        });
    });
    let source = source_to(&proxy.addr().to_string(), "100000")
        .args(["--io-timeout", "1s"])
        .status()
        .unwrap();
    assert!(proxy.fired(), "the Outcome never came by");
    assert!(matches!(source.code(), Some(0 | 7)), "source: {source:?}");
    let code = dest.0.wait().unwrap().code();
    reader.join().unwrap();
    proxy.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.lock().unwrap().clone();
    assert!(out.contains("(runs on)"), "attempt {attempt}: {out}");
    assert_eq!(code, Some(0), "attempt {attempt}: {out}");
}

/// The source says Alive at least every quarter of its --io-timeout, between
/// rounds too: a destination whose own bound (1.2 s) is well above that
/// period (0.75 s) but below the source's bound (3 s) never finds it quiet.
/// Before, a round started without an Alive and each worker that finished
/// put the next one off, so the control connection went quiet for over a
/// second between rounds (the fault campaign's retries failed so under
/// load, at 1 s on both ends).
#[test]
fn the_source_says_alive_within_its_period_between_rounds() {
    let dir = std::env::temp_dir().join(format!("hpmig-cli-alive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let dest = Reaped(
        Command::new(env!("CARGO_BIN_EXE_hpmig"))
            .args([
                "dest",
                "--listen",
                &addr,
                "--once",
                "--io-timeout",
                "1200ms",
            ])
            .args(["--run-for", "300ms", "--journal"])
            .arg(dir.join("journal"))
            .env("HPMIG_TOKEN", "tok")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Rounds of about 0.4 to 0.8 s: bandwidth-capped.
    let source = source_to(&addr, "100000")
        .args(["--io-timeout", "3s", "--bandwidth", "20MB"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let mut dest = dest;
    let d = dest.0.wait().unwrap();
    let mut text = String::new();
    use std::io::Read;
    if let Some(mut o) = dest.0.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(mut e) = dest.0.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let s = String::from_utf8_lossy(&source.stderr);
    assert!(
        matches!(source.status.code(), Some(0 | 7)),
        "source {:?}: {s}\ndest: {text}",
        source.status
    );
    assert_eq!(d.code(), Some(0), "dest: {text}");
    assert!(text.contains("(runs on)"), "{text}");
}

/// A source killed -9 right after its Proof went out: the destination
/// service waits for its data connections only as long as its
/// --io-timeout (1 s), then serves the next source. Before, it waited the
/// transport's fixed 10 s, serving no one (the fault campaign's
/// `Proof -> kill -9 sender @0` retry failed so).
#[test]
fn a_source_dead_after_its_proof_holds_the_destination_no_longer_than_its_io_timeout() {
    use std::sync::atomic::Ordering;
    let dir = std::env::temp_dir().join(format!("hpmig-cli-proof-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (_dest, addr, out, _reader) = dest_service(&dir);
    let plan_kind = hpmig_core::protocol::Kind::Proof;
    let (proxy, source_pid) = {
        use hpmig_core::testing::proxy::{Action, Plan, Proxy, RecordAt, Which};
        let pid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let p = std::sync::Arc::clone(&pid);
        let plan = Plan {
            which: Which::Record(RecordAt {
                conn: 0,
                to_dest: true,
                kind: plan_kind,
                nth: 0,
                round: None,
            }),
            at: 0,
            action: Action::Hook(std::sync::Arc::new(move || {
                signal(p.load(Ordering::SeqCst), libc::SIGKILL)
            })),
        };
        (
            Proxy::start(addr.parse().unwrap(), Some(plan), false).unwrap(),
            pid,
        )
    };
    let mut first = source_to(&proxy.addr().to_string(), "100000")
        .args(["--io-timeout", "1s"])
        .spawn()
        .unwrap();
    source_pid.store(first.id() as i32, Ordering::SeqCst);
    let _ = first.wait();
    assert!(proxy.fired(), "the Proof never came by");
    // At once, straight to the destination; this source waits up to 3 s
    // for each answer.
    let second = source_to(&addr, "100000")
        .args(["--io-timeout", "3s"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    proxy.stop();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(second.status.code(), Some(0 | 7)),
        "the next source: {:?}: {}\ndest: {}",
        second.status,
        String::from_utf8_lossy(&second.stderr),
        out.lock().unwrap()
    );
}

/// A `--once` destination restarted after it acknowledged (or ran) a copy
/// is asked by the source in doubt what became of its guest: it must
/// answer from its journal and wait on for the one migration, not take the
/// Decision for a bad Hello and exit (the source would stay paused).
#[test]
fn a_once_destination_answers_a_redelivered_decision_and_waits_on() {
    use hpmig_core::auth::{nonce, Secret, SessionId};
    use hpmig_core::protocol::switchover::{Decision, OutcomeKind, Verdict};
    use hpmig_core::protocol::{Header, Kind, HEADER_LEN};
    use std::io::{Read, Write};

    let addr = format!("127.0.0.1:{}", free_port());
    let journal = std::env::temp_dir().join(format!("hpmig-cli-once-{}", std::process::id()));
    let mut dest = Reaped(
        Command::new(env!("CARGO_BIN_EXE_hpmig"))
            .args(["dest", "--listen", &addr, "--once", "--journal"])
            .arg(&journal)
            .env_remove("HPMIG_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut conn = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::net::TcpStream::connect(&addr).ok()
        })
        .expect("the destination listens");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let session = Secret::none().session(nonce(), nonce());
    let decision = Decision {
        session: SessionId([7; 16]),
        verdict: Verdict::Commit,
        round: 3,
    };
    conn.write_all(&decision.encode(&session)).unwrap();
    let mut h = [0u8; HEADER_LEN];
    conn.read_exact(&mut h).unwrap();
    let h = Header::decode(&h, 0).unwrap();
    let mut p = vec![0u8; h.len as usize];
    conn.read_exact(&mut p).unwrap();
    assert_eq!(h.kind, Kind::Outcome, "answered with {:?}", h.kind);
    // No journal record of that session: Unknown (the source holds on).
    assert_eq!(p[17], OutcomeKind::Unknown as u8);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        dest.0.try_wait().unwrap().is_none(),
        "the destination ended instead of waiting for its migration"
    );
    let _ = std::fs::remove_dir_all(&journal);
}

/// `hpmig [-v...] dest` as a service: a connection that is no hpmig
/// source comes and is refused; returns everything the destination wrote
/// to stderr.
fn dest_stderr_after_a_stranger(verbose: &[&str], rust_log: Option<&str>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let addr = format!("127.0.0.1:{}", free_port());
    let journal = std::env::temp_dir().join(format!(
        "hpmig-cli-log-{}-{}",
        std::process::id(),
        verbose.len() + rust_log.map_or(0, |_| 9)
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hpmig"));
    cmd.args(verbose)
        .args(["dest", "--listen", &addr, "--handshake-timeout", "1s"])
        .arg("--journal")
        .arg(&journal)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let mut dest = Reaped(cmd.spawn().unwrap());
    let mut out = BufReader::new(dest.0.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("waiting for one migration") {}
    assert!(line.contains("waiting for one migration"), "{line}");
    let mut stranger = std::net::TcpStream::connect(&addr).unwrap();
    stranger
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = stranger.write_all(b"GET / HTTP/1.0\r\n\r\n");
    // The destination closes it once it sees it is not a source.
    let _ = stranger.read_to_end(&mut Vec::new());
    std::thread::sleep(std::time::Duration::from_millis(200));
    signal(dest.0.id() as i32, libc::SIGKILL);
    let mut err = String::new();
    dest.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = std::fs::remove_dir_all(journal);
    err
}

#[test]
fn the_libraries_log_to_stderr_warnings_by_default_more_with_v_or_rust_log() {
    // The transport's events: "listening" is info, a refused stranger debug.
    let quiet = dest_stderr_after_a_stranger(&[], None);
    assert!(
        !quiet.contains("listening") && !quiet.contains("closed a connection"),
        "{quiet}"
    );
    let info = dest_stderr_after_a_stranger(&["-v"], None);
    assert!(info.contains("destination service listening"), "{info}");
    assert!(!info.contains("closed a connection"), "{info}");
    let debug = dest_stderr_after_a_stranger(&["-vv"], None);
    assert!(debug.contains("closed a connection"), "{debug}");
    let env = dest_stderr_after_a_stranger(&[], Some("hpmig_transport_tcp=debug"));
    assert!(env.contains("closed a connection"), "{env}");
}
