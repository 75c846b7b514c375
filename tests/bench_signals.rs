//! `hpmig bench --peer` stopped by a signal leaves no QEMU process and no
//! scratch directory behind. Needs qemu-system-x86_64 and /dev/kvm; skips
//! without them unless HPMIG_REQUIRE_QEMU=1 (ci/test.sh sets it wherever
//! /dev/kvm exists, having installed QEMU), where it fails instead.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether QEMU can run a KVM guest here; panics when it must and cannot.
fn qemu_usable() -> bool {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let required = std::env::var("HPMIG_REQUIRE_QEMU").as_deref() == Ok("1");
    assert!(
        (qemu && kvm) || !required,
        "HPMIG_REQUIRE_QEMU=1 but qemu-system-x86_64 {} and /dev/kvm {}",
        if qemu { "runs" } else { "does not run" },
        if kvm { "opens" } else { "does not open" }
    );
    qemu && kvm
}

/// The QEMU children of `parent`: their pids and the directories their
/// images are in (`-kernel DIR/guest.img`).
fn qemu_children(parent: u32) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if ppid_and_name(pid).is_some_and(|(ppid, name)| ppid == parent && is_qemu(&name)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let dir = args
                .iter()
                .position(|a| *a == b"-kernel")
                .and_then(|i| args.get(i + 1))
                .map(|k| PathBuf::from(String::from_utf8_lossy(k).into_owned()))
                .and_then(|k| k.parent().map(PathBuf::from))
                .unwrap();
            found.push((pid, dir));
        }
    }
    found
}

/// A process's parent and name (from /proc/PID/stat), if it exists and is
/// no zombie.
fn ppid_and_name(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (NAME) STATE PPID ...": NAME may hold spaces, so split at the
    // last ')'.
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let mut fields = tail.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    (state != "Z").then_some((ppid, name))
}

/// The network namespaces of `hpmig bench` process `pid` (its shaped
/// links).
fn namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("hpmig-bench-{pid}-");
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn is_qemu(name: &str) -> bool {
    name.starts_with("qemu-system")
}

#[test]
fn sigterm_ends_the_benchmarks_qemu_processes_and_removes_their_directories_and_links() {
    if !qemu_usable() {
        eprintln!("skipped: needs qemu-system-x86_64 and /dev/kvm (HPMIG_REQUIRE_QEMU=1 makes it fail instead)");
        return;
    }
    let out = std::env::temp_dir().join(format!("hpmig-bench-signals-{}", std::process::id()));
    let mut bench = Command::new(env!("CARGO_BIN_EXE_hpmig"))
        .args(["bench", "--peer", "--repeats", "1", "--peer-memory", "16M"])
        .args(["--contents", "empty", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = bench.id();
    // hpmig's own cells run first; then the first QEMU pair starts.
    let deadline = Instant::now() + Duration::from_secs(300);
    let qemus = loop {
        let q = qemu_children(pid);
        if !q.is_empty() {
            break q;
        }
        if let Some(status) = bench.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut err).unwrap();
            panic!("hpmig bench ended ({status}) before a QEMU ran: {err}");
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            let _ = bench.wait();
            panic!("no QEMU within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dirs: Vec<&PathBuf> = qemus.iter().map(|(_, d)| d).collect();
    assert!(
        dirs.iter().all(|d| d.exists()),
        "QEMU's directory: {dirs:?}"
    );

    // The QEMU pair migrates over a shaped link in a namespace of its own.
    let links = namespaces(pid);
    assert!(!links.is_empty(), "no link namespace while QEMU runs");

    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = bench.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            let _ = bench.wait();
            panic!("hpmig bench did not end within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert!(err.contains("terminated: ended"), "{err}");
    for (qemu, dir) in &qemus {
        assert!(
            !ppid_and_name(*qemu).is_some_and(|(_, name)| is_qemu(&name)),
            "QEMU {qemu} survived hpmig bench: {err}"
        );
        assert!(
            !dir.exists(),
            "{} survived hpmig bench: {err}",
            dir.display()
        );
    }
    assert_eq!(
        namespaces(pid),
        Vec::<String>::new(),
        "link namespaces {links:?} survived hpmig bench: {err}"
    );
    let _ = std::fs::remove_dir_all(out);
}
