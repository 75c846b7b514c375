//! QEMU as the benchmark's peer: the micro-VM's workload as a multiboot
//! image ([`multiboot`]), booted by two QEMU processes and migrated between
//! them with QEMU's own migration over the run's link (the destination in
//! the shaped link's namespace, [`crate::link`]; or loopback), driven
//! through QMP. The downtime comes from QMP's `STOP` (source) and `RESUME`
//! (destination) event stamps; the heartbeat is read by the host in both
//! guests' RAM files (the blackout observer's, as for hpmig); its
//! `query-migrate` figures are kept as QEMU's own. This module owns the
//! QEMU processes, their QMP conversation and the image's pacing.
//!
//! `STOP` is sent once the vCPUs are paused; `RESUME` just before QEMU
//! resumes them (its state notifiers and the vCPUs' wake-up come after),
//! while hpmig's start is stamped once its vCPU threads run: a difference
//! below a millisecond, in QEMU's favour. A forced run's destination is
//! continued by a `cont` from the bench, as libvirt continues a guest it
//! suspended; the QMP round trip (a few ms) counts in its downtime.
//!
//! # QEMU processes and scratch directories never outlive the benchmark
//!
//! Each run's image, guest RAM file and QMP sockets live in a directory
//! with a random name ([`tempfile`]), removed when the run ends. Every QEMU
//! process and every such directory is entered in one registry while it
//! exists, under the lock that spawns or creates it and that kills, reaps
//! or removes it. [`end_children_on_signals`] (installed by `hpmig bench`)
//! answers SIGINT and SIGTERM by taking that lock, killing and reaping the
//! QEMUs, removing the directories and exiting with 128 + the signal (130,
//! 143), after deleting the link namespaces left ([`crate::link::remove_all`]).
//! Should hpmig die by SIGKILL instead, each QEMU gets SIGKILL from the
//! kernel (`PR_SET_PDEATHSIG`); only its directory stays then (and its
//! namespace, which the next benchmark removes).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context, Result};
use hpmig_core::memory::Contents;
use hpmig_microvm::blackout::{Blackout, Observer, Pace, Split};
use hpmig_microvm::Workload;
use serde_json::{json, Value};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub mod multiboot;

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU's migration flavours compared (named in the results by
/// [`crate::results::Variant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Whole dirty pages, one stream.
    Plain,
    /// XOR + run-length deltas against a page cache (QEMU's nearest to
    /// dirty segments).
    Xbzrle,
    /// Whole pages over several channels.
    Multifd,
}

/// Whether `qemu-system-x86_64` can be run.
pub fn available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The QEMU processes and scratch directories that exist now.
struct Live {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    pids: Vec::new(),
    dirs: Vec::new(),
});

/// The registry, even if a thread panicked holding it (it stays valid:
/// every change is one push or one retain).
fn live() -> MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes SIGINT and SIGTERM end the benchmark cleanly: its QEMU processes
/// killed and reaped, its scratch directories removed, then exit with
/// 128 + the signal. For `hpmig bench` (the migration commands have their
/// own answer to these signals).
pub fn end_children_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT and SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            // Held until the exit: no QEMU is spawned and no directory
            // created after this.
            let live = live();
            for &pid in &live.pids {
                // SAFETY: kill(2) with a pid from the registry: a child of
                // this process not yet reaped (Qemu's drop reaps it and
                // leaves the registry under this lock), so the pid is still
                // that child's.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            for &pid in &live.pids {
                // SAFETY: waitpid(2) on that unreaped child; a null status
                // pointer is allowed.
                unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
            }
            for dir in &live.dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
            crate::link::remove_all();
            eprintln!(
                "hpmig bench: {}: ended {} QEMU process(es), removed {} scratch director{} and the link namespaces",
                if signal == SIGINT {
                    "interrupted"
                } else {
                    "terminated"
                },
                live.pids.len(),
                live.dirs.len(),
                if live.dirs.len() == 1 { "y" } else { "ies" }
            );
            std::process::exit(128 + signal);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// A QEMU process, in the registry from its spawn until it is reaped.
struct Qemu(Child);

impl Qemu {
    fn spawn(cmd: &mut Command) -> Result<Qemu> {
        // SAFETY: getpid(2) has no preconditions.
        let me = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: it makes two syscalls
        // (prctl, getppid) and builds an io::Error from a raw errno, which
        // does not allocate. PR_SET_PDEATHSIG fires when the thread that
        // forked exits; QEMUs are spawned by the thread that runs the
        // benchmark, which lives until the process ends.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody would kill us.
                if libc::getppid() != me {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut live = live();
        let child = cmd.spawn().with_context(|| format!("starting {QEMU}"))?;
        live.pids.push(child.id());
        Ok(Qemu(child))
    }

    /// Its exit status if it exited (then reaped, and out of the registry).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let mut live = live();
        let status = self.0.try_wait().ok().flatten()?;
        let pid = self.0.id();
        live.pids.retain(|&p| p != pid);
        Some(status)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let mut live = live();
        let _ = self.0.kill();
        let _ = self.0.wait();
        let pid = self.0.id();
        live.pids.retain(|&p| p != pid);
    }
}

/// A run's scratch directory: a random name, in the registry while it
/// exists, removed on drop.
struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    fn new() -> Result<Scratch> {
        // In memory where /dev/shm exists: the guest's RAM file lives here.
        let base = Some(PathBuf::from("/dev/shm"))
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let mut live = live();
        let dir = tempfile::Builder::new()
            .prefix("hpmig-qemu-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a directory in {}", base.display()))?;
        live.dirs.push(dir.path().to_path_buf());
        Ok(Scratch(Some(dir)))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut live = live();
        if let Some(dir) = self.0.take() {
            live.dirs.retain(|d| d != dir.path());
            let _ = dir.close();
        }
    }
}

/// One QEMU process with its QMP connection.
struct Vm {
    /// Held for its drop: killed and reaped with the Vm.
    _process: Qemu,
    qmp: BufReader<UnixStream>,
    /// The QMP events read so far, in order.
    events: Vec<Value>,
}

impl Vm {
    /// Starts QEMU on `image` with guest RAM in the file `ram`, mapped
    /// shared: what the host wrote there is what the guest finds, and the
    /// host reads the guest's heartbeat there. Both ends name their RAM
    /// block alike, as the migration requires. In the network namespace
    /// `netns` when given (the destination's end of a shaped link).
    fn start(
        image: &Path,
        memory: u64,
        ram: &Path,
        sock: &Path,
        incoming: bool,
        netns: Option<&str>,
    ) -> Result<Vm> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, QEMU]);
                c
            }
            None => Command::new(QEMU),
        };
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                memory >> 20,
                ram.display()
            ))
            .args(["-machine", "memory-backend=ram0"]);
        // arch-capabilities off: its MSR cannot be set under some nested
        // hypervisors (PVM among them), and the guest does not need it.
        cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-smp", "1", "-nodefaults"])
            .args(["-display", "none", "-serial", "none", "-monitor", "none"])
            .args(["-m", &format!("{}M", memory >> 20)])
            .arg("-kernel")
            .arg(image)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = Qemu::spawn(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Some(status) = child.exited() {
                        let mut err = String::new();
                        if let Some(mut e) = child.0.stderr.take() {
                            let _ = std::io::Read::read_to_string(&mut e, &mut err);
                        }
                        bail!("{QEMU} exited ({status}): {}", err.trim());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // The child is killed and reaped as it drops.
                Err(e) => return Err(e).context("connecting to QEMU's QMP socket"),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut vm = Vm {
            _process: child,
            qmp: BufReader::new(stream),
            events: Vec::new(),
        };
        vm.line()?; // the greeting
        vm.cmd("qmp_capabilities", json!({}))?;
        Ok(vm)
    }

    fn line(&mut self) -> Result<Value> {
        let mut s = String::new();
        if self.qmp.read_line(&mut s)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        Ok(serde_json::from_str(&s)?)
    }

    /// Runs a QMP command; returns its "return" value.
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let req = json!({ "execute": name, "arguments": args });
        let stream = self.qmp.get_mut();
        stream.write_all(format!("{req}\n").as_bytes())?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {}", e["desc"].as_str().unwrap_or("error"));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// When QEMU last emitted `event` (`STOP`, `RESUME`), in seconds of the
    /// host's real-time clock (QMP's event timestamp, microseconds).
    fn event_time(&self, event: &str) -> Option<f64> {
        let e = self.events.iter().rev().find(|e| e["event"] == event)?;
        let t = &e["timestamp"];
        Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? * 1e-6)
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`, ...).
    fn status(&mut self) -> Result<String> {
        let s = self.cmd("query-status", json!({}))?;
        Ok(s["status"].as_str().unwrap_or_default().to_string())
    }

    /// The guest's heartbeat (vCPU 0's counter at guest address 0).
    fn heartbeat(&mut self) -> Result<u64> {
        let out = self.cmd(
            "human-monitor-command",
            json!({ "command-line": "xp /1gx 0" }),
        )?;
        let text = out.as_str().unwrap_or_default();
        let hex = text
            .split(": ")
            .nth(1)
            .map(|h| h.trim().trim_start_matches("0x"))
            .ok_or_else(|| anyhow!("unexpected xp output {text:?}"))?;
        Ok(u64::from_str_radix(hex, 16)?)
    }
}

impl Vm {
    /// Waits until the workload runs: QEMU's firmware runs at CPL0, which
    /// nested virtualisation here emulates slowly, so boot takes seconds.
    /// Until then guest address 0 holds the firmware's interrupt vectors.
    fn wait_running(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = self.heartbeat()?;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.heartbeat()?;
            if now > last && now < 1 << 48 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the QEMU guest did not start its workload within {limit:?}");
            }
            last = now;
        }
    }
}

/// What one QEMU migration did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub dirty_syncs: u64,
    /// QEMU's own count (`ram.transferred`).
    pub transferred: u64,
    pub total_ms: f64,
    /// From the QMP `STOP` event on the source to the `RESUME` event on the
    /// destination: vCPUs paused to vCPUs running, on the host's clock.
    pub downtime_ms: f64,
    /// QEMU's own downtime figure (`query-migrate`), for comparison.
    pub tool_downtime_ms: f64,
    /// Completed on its own, not after the guest was stopped at the cap.
    pub converged: bool,
    /// Heartbeats per second during migration over before it.
    pub progress: f64,
    /// Heartbeats per second during pre-copy (until the source's last
    /// beat) over before it: the brownout, the pause excluded.
    pub brownout: f64,
    /// The pause as the guest saw it, read in both RAM files ...
    pub blackout: Option<Blackout>,
    /// ... split at the `STOP` and `RESUME` events.
    pub split: Option<Split>,
    /// Guest stores per second before migration (measured).
    pub rate_before: f64,
}

/// Settings of one comparison run, the same values hpmig's run gets.
#[derive(Clone, Debug)]
pub struct Run {
    pub workload: Workload,
    /// What the source guest's memory holds before its workload starts.
    pub contents: Contents,
    /// Guest stores per second (the guest paces itself); `None`: flat out.
    pub dirty_rate: Option<u64>,
    pub memory: u64,
    pub mode: Mode,
    /// QEMU's own cap, bytes per second; `None` leaves it effectively off
    /// (on a shaped link it is off).
    pub bandwidth: Option<u64>,
    pub downtime_limit: Duration,
    /// xbzrle's page cache, bytes (a power of two; xbzrle only).
    pub xbzrle_cache: u64,
    pub channels: usize,
    /// The destination's end of a shaped link: its network namespace and
    /// address. `None`: loopback.
    pub dest: Option<(String, Ipv4Addr)>,
    /// After this many dirty syncs past the setup's (hpmig's round cap),
    /// or after `timeout`, the source guest is stopped so the migration
    /// finishes as a stop-and-copy (`virsh migrate --timeout-suspend`).
    pub max_rounds: u64,
    pub timeout: Duration,
}

/// Stores per heartbeat, as the micro-VM batches them: about one heartbeat
/// per millisecond when paced.
fn per_batch(dirty_rate: Option<u64>) -> u64 {
    dirty_rate.map_or(4096, |r| (r / 1000).clamp(1, 4096))
}

/// The multiboot image of `workload` for QEMU (`qemu-system-x86_64 -accel
/// kvm -cpu host,-arch-capabilities -kernel IMAGE`).
pub fn image(workload: Workload, memory: u64, dirty_rate: Option<u64>) -> Result<Vec<u8>> {
    let per_batch = per_batch(dirty_rate);
    let cycles = dirty_rate.map_or(0, |r| (tsc_hz() * per_batch as f64 / r as f64) as u64);
    multiboot::image(workload, memory, per_batch, cycles, 7).context("building the QEMU image")
}

/// A QEMU guest's RAM as a file `name` in `dir`, holding `contents` (filled
/// by the function that fills hpmig's guests, page by page from the same
/// seed; an empty guest's file is all zeros), and the host's shared
/// mapping of it. Below the PC's 32-bit hole a file offset is the guest
/// address, so the guest finds the same bytes at the same addresses as
/// hpmig's; the multiboot loader then writes the program below `DATA`, as
/// hpmig's VMM does.
fn ram_file(
    dir: &Path,
    name: &str,
    memory: u64,
    contents: Contents,
) -> Result<(PathBuf, GuestMemoryMmap<()>)> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(memory)?;
    let ram = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        memory as usize,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .map_err(|e| anyhow!("mapping {}: {e}", path.display()))?;
    if contents != Contents::Empty {
        hpmig_microvm::fill_guest(&ram, contents);
    }
    Ok((path, ram))
}

/// vCPU 0's heartbeat in a RAM file's mapping (the multiboot guest keeps
/// the micro-VM's layout).
fn beat(ram: &GuestMemoryMmap<()>) -> u64 {
    hpmig_microvm::kvm::heartbeat(ram, 0)
}

/// Boots the workload in two QEMUs and migrates it from one to the other.
pub fn migrate(run: &Run) -> Result<Outcome> {
    let dir = Scratch::new()?;
    let image_path = dir.path().join("guest.img");
    std::fs::write(
        &image_path,
        image(run.workload, run.memory, run.dirty_rate)?,
    )?;
    let image = image_path;
    let (src_path, src_ram) = ram_file(dir.path(), "source.ram", run.memory, run.contents)?;
    let (dst_path, dst_ram) = ram_file(dir.path(), "dest.ram", run.memory, Contents::Empty)?;
    let mut src = Vm::start(
        &image,
        run.memory,
        &src_path,
        &dir.path().join("src.qmp"),
        false,
        None,
    )?;
    let mut dst = Vm::start(
        &image,
        run.memory,
        &dst_path,
        &dir.path().join("dst.qmp"),
        true,
        run.dest.as_ref().map(|(ns, _)| ns.as_str()),
    )?;
    src.wait_running(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(300));
    let (h0, t0) = (beat(&src_ram), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let rate_before = (beat(&src_ram) - h0) as f64 / t0.elapsed().as_secs_f64();
    if rate_before <= 0.0 {
        bail!("the QEMU guest does not run (its heartbeat stands still)");
    }

    let caps: Vec<Value> = match run.mode {
        Mode::Plain => vec![],
        Mode::Xbzrle => vec![json!({"capability": "xbzrle", "state": true})],
        Mode::Multifd => vec![json!({"capability": "multifd", "state": true})],
    };
    for vm in [&mut src, &mut dst] {
        if !caps.is_empty() {
            vm.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        }
    }
    let mut params = json!({
        "max-bandwidth": run.bandwidth.unwrap_or(1 << 40),
        "downtime-limit": run.downtime_limit.as_millis() as u64,
    });
    if run.mode == Mode::Xbzrle {
        params["xbzrle-cache-size"] = json!(run.xbzrle_cache);
    }
    if run.mode == Mode::Multifd {
        params["multifd-channels"] = json!(run.channels);
        dst.cmd(
            "migrate-set-parameters",
            json!({"multifd-channels": run.channels}),
        )?;
    }
    src.cmd("migrate-set-parameters", params)?;
    let uri = match &run.dest {
        // A namespace of its own: any port is free there.
        Some((_, ip)) => format!("tcp:{ip}:4444"),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            format!("tcp:127.0.0.1:{port}")
        }
    };
    dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
    let dst_ram = std::sync::Arc::new(dst_ram);
    let src_ram = std::sync::Arc::new(src_ram);
    // Near the switch-over once QEMU's expected downtime fits its limit
    // after its first pass (it stops at the end of that iteration), it is
    // stopped, or it left "setup"/"active": the observer samples fast from
    // then on, as for hpmig once its controller stops pre-copy
    // (`Live::switchover_near`). This loop polls every 10 ms, so QEMU's
    // signal can come that much later; each blackout states its error.
    let near = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (s, d) = (
            std::sync::Arc::clone(&src_ram),
            std::sync::Arc::clone(&dst_ram),
        );
        let near = std::sync::Arc::clone(&near);
        Observer::start_with(
            move || beat(&s),
            move || beat(&d),
            move || {
                if near.load(std::sync::atomic::Ordering::Relaxed) {
                    Pace::Near
                } else {
                    Pace::Far
                }
            },
        )
    };
    let (h1, t1) = (beat(&src_ram), Instant::now());
    src.cmd("migrate", json!({ "uri": uri }))?;
    // Past the round cap or the time cap the source guest is stopped, as
    // `virsh migrate --timeout-suspend` does, and the migration ends as a
    // stop-and-copy: every run finishes and has a downtime.
    let mut stopped = false;
    let (status, info) = loop {
        std::thread::sleep(Duration::from_millis(10));
        let info = src.cmd("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let limit = run.downtime_limit.as_millis() as u64;
        let fits = syncs >= 2
            && info["expected-downtime"]
                .as_u64()
                .is_some_and(|e| e <= limit);
        if fits || !matches!(status.as_str(), "setup" | "active") {
            near.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match status.as_str() {
            "completed" | "failed" | "cancelled" => break (status, info),
            // Only while it is still iterating: a stop once completion began
            // would mark a converged run as forced.
            "active" if !stopped && (syncs > run.max_rounds || t1.elapsed() > run.timeout) => {
                near.store(true, std::sync::atomic::Ordering::Relaxed);
                src.cmd("stop", json!({}))?;
                stopped = true;
            }
            _ if t1.elapsed() > run.timeout + Duration::from_secs(60) => {
                src.cmd("migrate_cancel", json!({}))?;
                bail!("QEMU's migration did not finish within a minute of stopping its guest");
            }
            _ => {}
        }
    };
    let elapsed = t1.elapsed().as_secs_f64();
    if status != "completed" {
        bail!(
            "QEMU's migration {status}: {}",
            info["error-desc"].as_str().unwrap_or("no reason given")
        );
    }
    // The destination runs the guest once it has loaded it, unless the
    // source's guest was stopped (its state says paused): then it is
    // continued, as libvirt continues a guest it suspended for a timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dst.status()?.as_str() {
            "running" => break,
            "inmigrate" | "finish-migrate" => {}
            "paused" | "postmigrate" | "prelaunch" if stopped => {
                dst.cmd("cont", json!({}))?;
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("QEMU's destination did not run the guest within 30 s of the migration");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let blackout = observer.finish(Duration::from_secs(2));
    // The source guest is paused now; its heartbeat is where it stopped.
    let h2 = beat(&src_ram);
    // QEMU's own check: the guest runs on at the destination.
    let d0 = beat(&dst_ram);
    std::thread::sleep(Duration::from_millis(100));
    if beat(&dst_ram) <= d0 {
        bail!("QEMU's destination guest does not run after migration");
    }
    let (stop, resume) = match (src.event_time("STOP"), dst.event_time("RESUME")) {
        (Some(stop), Some(resume)) => (stop, resume),
        _ => bail!("QEMU sent no STOP event on the source or no RESUME on the destination"),
    };
    // The events' real-time stamps on the observer's monotonic clock: one
    // reading of both clocks, close together, anchors the conversion.
    let (anchor_real, anchor) = (real_time(), Instant::now());
    let at = |real: f64| {
        let back = Duration::from_secs_f64((anchor_real - real).max(0.0));
        anchor.checked_sub(back).unwrap_or(anchor)
    };
    let split = blackout.map(|b| b.split(at(stop), at(resume)));
    let brownout = blackout.map_or(f64::NAN, |b| b.brownout(t1, h1, rate_before));
    let ram = &info["ram"];
    let total_ms = qemu_figure(&info, "total-time").unwrap_or(elapsed * 1e3);
    Ok(Outcome {
        dirty_syncs: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        transferred: ram["transferred"].as_u64().unwrap_or(0),
        total_ms,
        downtime_ms: (resume - stop) * 1e3,
        tool_downtime_ms: qemu_figure(&info, "downtime").unwrap_or(f64::NAN),
        converged: !stopped,
        progress: (h2 - h1) as f64 / elapsed / rate_before,
        brownout,
        blackout,
        split,
        // The heartbeat counts stores; dense's, pages of 8-byte stores.
        rate_before: rate_before
            * if run.workload == Workload::Dense {
                (hpmig_microvm::kvm::program::GUEST_PAGE / 8) as f64
            } else {
                1.0
            },
    })
}

/// The host's real-time clock, seconds (the clock of QMP's event stamps).
/// A time `query-migrate` reports for a completed migration, in ms; `None`
/// where it is absent or zero. QEMU has answered a completed migration
/// with `total-time` and `downtime` both 0 (one xbzrle run of 2026-12-03),
/// which no migration that moved data can take: read as unknown, not as
/// the fastest run.
fn qemu_figure(info: &serde_json::Value, key: &str) -> Option<f64> {
    info[key].as_f64().filter(|&ms| ms > 0.0)
}

fn real_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time-stamp counter's rate, measured over 50 ms (a KVM guest's TSC
/// runs at the host's).
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let read = || unsafe { std::arch::x86_64::_rdtsc() };
    let (c0, t0) = (read(), Instant::now());
    std::thread::sleep(Duration::from_millis(50));
    (read() - c0) as f64 / t0.elapsed().as_secs_f64()
}

#[cfg(test)]
mod figure_tests {
    use super::qemu_figure;
    use serde_json::json;

    #[test]
    fn a_zero_or_missing_time_from_qemu_reads_as_unknown() {
        let info = json!({ "status": "completed", "total-time": 4481, "downtime": 0 });
        assert_eq!(qemu_figure(&info, "total-time"), Some(4481.0));
        assert_eq!(qemu_figure(&info, "downtime"), None);
        assert_eq!(qemu_figure(&info, "setup-time"), None);
    }
}
