//! The control socket (`--control PATH`): a Unix socket (mode 0600) that
//! speaks one JSON object per line, QMP-style: a request
//! `{"execute": "status"}` or `{"execute": "resolve", "arguments":
//! {"action": "resume", "destination-dead": true}}` gets one answer,
//! `{"return": {...}}` or `{"error": {"class": "...", "desc": "..."}}`.
//! `hpmig ctl PATH ...` is its client.
//!
//! Commands (QMP's names work too):
//! - `status` (`query-migrate`): where the migration stands, with QMP's
//!   `query-migrate` fields where one exists (`status`, `total-time-ms`,
//!   `expected-downtime-ms`, `downtime-ms`, `ram.total`, `ram.transferred`,
//!   `ram.remaining`, `ram.dirty-pages-rate`, `ram.mbps`,
//!   `ram.dirty-sync-count`) and hpmig's own (`phase`, `round`, `bytes` by
//!   kind, `streams`, `running-round`, `last-round`, the `config` in force);
//!   in doubt, the session.
//! - `set` (`migrate-set-parameters`): `{"bandwidth": "5Gbit"}` (or
//!   `max-bandwidth` in bytes/s; `"none"` lifts the cap) takes effect at
//!   every stream's next ring slot; `{"downtime": "100ms"}` (or
//!   `downtime-limit` in ms) at the controller's next decision.
//! - `cancel` (`migrate_cancel`): the guest runs on at the source and the
//!   destination discards; honoured until the Commit is sent, afterwards
//!   the error `TooLate` with the status; in doubt the error `InDoubt`
//!   (use `resolve`).
//! - `resolve`: an operator's decision on a migration in doubt: on the
//!   source `resume` with `destination-dead`; on the destination `discard`,
//!   or `run` with `source-fenced`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use hpmig_core::precopy::live::{CancelAnswer, Live};

use crate::units::{parse_downtime, parse_rate, parse_timeout};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::sync::mpsc::{channel as unbounded, Receiver, Sender};

/// An operator's resolution of a migration in doubt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Source: run the guest here again; the operator states the
    /// destination is dead (it will not run the guest).
    Resume { destination_dead: bool },
    /// Destination: drop the held copy.
    Discard,
    /// Destination: run the held copy; the operator states the source's
    /// guest is fenced (stopped for good).
    Run { source_fenced: bool },
}

/// The socket's server side: what `status` shows, and the resolutions
/// received, for the command's main loop to act on.
#[derive(Debug)]
pub struct Socket {
    path: PathBuf,
    status: Arc<Mutex<Value>>,
    /// The running migration and the configuration `status` echoes.
    live: Attached,
    resolutions: Receiver<(Resolve, Sender<Result<Value, String>>)>,
}

impl Socket {
    /// Listens on `path` (replacing a stale socket file), mode 0600.
    pub fn bind(path: &Path) -> Result<Socket> {
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let status = Arc::new(Mutex::new(json!({"state": "starting"})));
        let live: Attached = Arc::default();
        let (tx, resolutions) = unbounded();
        let (st, lv) = (Arc::clone(&status), Arc::clone(&live));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, lv, tx) = (Arc::clone(&st), Arc::clone(&lv), tx.clone());
                std::thread::spawn(move || serve(conn, &st, &lv, &tx));
            }
        });
        Ok(Socket {
            path: path.to_path_buf(),
            status,
            live,
            resolutions,
        })
    }

    /// From now on `status`, `set` and `cancel` act on `live`.
    pub fn attach(&self, live: Arc<Live>, config: Value) {
        *lock(&self.live) = Some((live, config, true));
    }

    /// The migration ended: `status` shows only what `set_status` says.
    pub fn detach(&self) {
        *lock(&self.live) = None;
    }

    /// From now on `status` shows `live`; `set` and `cancel` are refused
    /// (the destination: both are the source's to do).
    pub fn attach_view(&self, live: Arc<Live>, config: Value) {
        *lock(&self.live) = Some((live, config, false));
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets what `status` answers (with a migration attached: added to
    /// its fields).
    pub fn set_status(&self, v: Value) {
        *lock(&self.status) = v;
    }

    /// A resolution that arrived, if any, with where to send its answer.
    pub fn resolution(&self) -> Option<(Resolve, Sender<Result<Value, String>>)> {
        self.resolutions.try_recv().ok()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

type Attached = Arc<Mutex<Option<(Arc<Live>, Value, bool)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(
    conn: UnixStream,
    status: &Mutex<Value>,
    live: &Mutex<Option<(Arc<Live>, Value, bool)>>,
    tx: &Sender<(Resolve, Sender<Result<Value, String>>)>,
) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines().map_while(Result::ok) {
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, status, live, tx),
            Err(e) => Err(("GenericError", format!("not JSON: {e}"))),
        };
        let reply = match answer {
            Ok(v) => json!({"return": v}),
            Err((class, desc)) => json!({"error": {"class": class, "desc": desc}}),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

fn handle(
    req: &Value,
    status: &Mutex<Value>,
    live: &Mutex<Option<(Arc<Live>, Value, bool)>>,
    tx: &Sender<(Resolve, Sender<Result<Value, String>>)>,
) -> Result<Value, (&'static str, String)> {
    let args = &req["arguments"];
    let flag = |k: &str| args[k].as_bool().unwrap_or(false);
    let attached = lock(live).clone();
    let steerable = |a: Option<(Arc<Live>, Value, bool)>| {
        match a {
        Some((live, _, true)) => Ok(live),
        Some(_) => Err((
            "GenericError",
            "the source steers and cancels a migration: ask its control socket (the destination discards when the source cancels)".to_string(),
        )),
        None => Err(("GenericError", "no migration runs here".to_string())),
    }
    };
    match req["execute"].as_str() {
        Some("status" | "query-migrate") => {
            let fixed = lock(status).clone();
            Ok(match attached {
                Some((live, config, _)) => {
                    let mut v = crate::watch::status_json(&live.status(), &config);
                    if let (Some(v), Some(fixed)) = (v.as_object_mut(), fixed.as_object()) {
                        if fixed.get("state").and_then(Value::as_str) != Some("starting") {
                            v.extend(fixed.clone());
                        }
                    }
                    v
                }
                None => fixed,
            })
        }
        Some("set" | "migrate-set-parameters") => {
            let live = steerable(attached)?;
            set(&live, args).map_err(|e| ("GenericError", e))
        }
        Some("cancel" | "migrate_cancel") => {
            let live = steerable(attached)?;
            match live.cancel() {
                CancelAnswer::Accepted => Ok(json!({
                    "cancelling": true,
                    "guest": "keeps running on the source; the destination discards its copy",
                })),
                CancelAnswer::TooLate(stage) => Err((
                    "TooLate",
                    format!(
                        "too late to cancel: the Commit was sent (status: {})",
                        stage.as_str()
                    ),
                )),
                CancelAnswer::InDoubt => Err((
                    "InDoubt",
                    "in doubt: cancelling would neither resume nor discard the guest; use resolve"
                        .to_string(),
                )),
            }
        }
        Some("resolve") => {
            let r = match args["action"].as_str() {
                Some("resume") => Resolve::Resume {
                    destination_dead: flag("destination-dead"),
                },
                Some("discard") => Resolve::Discard,
                Some("run") => Resolve::Run {
                    source_fenced: flag("source-fenced"),
                },
                other => {
                    return Err((
                        "GenericError",
                        format!("unknown action {other:?} (resume, discard or run)"),
                    ))
                }
            };
            let (answer_tx, answer_rx) = unbounded();
            tx.send((r, answer_tx))
                .map_err(|_| ("GenericError", "nothing to resolve".to_string()))?;
            match answer_rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(("GenericError", e)),
                Err(_) => Err((
                    "GenericError",
                    "nothing is in doubt here to resolve".to_string(),
                )),
            }
        }
        other => Err(("CommandNotFound", format!("unknown command {other:?}"))),
    }
}

/// `set`: the bandwidth cap and the downtime target, as people write them
/// or in QMP's units (bytes/s, ms).
fn set(live: &Live, args: &Value) -> Result<Value, String> {
    let mut done = serde_json::Map::new();
    let obj = args
        .as_object()
        .filter(|o| !o.is_empty())
        .ok_or("set what? bandwidth (e.g. \"5Gbit\", \"none\") or downtime (e.g. \"100ms\")")?;
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("bandwidth", Value::String(s)) if s == "none" => {
                live.set_bandwidth(None);
                done.insert("bandwidth".into(), Value::Null);
            }
            ("bandwidth", Value::String(s)) => {
                let b = parse_rate(s).map_err(|e| format!("bandwidth: {e}"))?;
                live.set_bandwidth(Some(b));
                done.insert("bandwidth".into(), json!(b));
            }
            ("max-bandwidth", Value::Number(n)) => {
                let b = n
                    .as_u64()
                    .filter(|b| *b > 0)
                    .ok_or("max-bandwidth: bytes per second, a whole number above 0")?;
                live.set_bandwidth(Some(b));
                done.insert("bandwidth".into(), json!(b));
            }
            ("downtime", Value::String(s)) => {
                let d = parse_downtime(s).map_err(|e| format!("downtime: {e}"))?;
                live.set_downtime_target(d);
                done.insert("downtime-ms".into(), json!(d.as_secs_f64() * 1e3));
            }
            ("downtime-limit", Value::Number(n)) => {
                let ms = n
                    .as_u64()
                    .filter(|m| *m > 0)
                    .ok_or("downtime-limit: milliseconds, a whole number above 0")?;
                live.set_downtime_target(Duration::from_millis(ms));
                done.insert("downtime-ms".into(), json!(ms));
            }
            (k, v) => return Err(format!("cannot set {k} to {v} (bandwidth or downtime)")),
        }
    }
    Ok(Value::Object(done))
}

/// `hpmig ctl PATH ...`
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a running hpmig (`--control`, or the path it
    /// printed when it went in doubt).
    path: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Print the migration's state as JSON.
    Status,
    /// Print one line of progress every interval until the migration ends.
    Watch {
        /// Between two lines.
        #[arg(long, default_value = "1s", value_parser = parse_timeout)]
        interval: Duration,
    },
    /// Change the bandwidth cap or the downtime target while it runs:
    /// `bandwidth=5Gbit`, `bandwidth=none`, `downtime=100ms`.
    Set {
        #[arg(required = true, value_parser = key_value)]
        settings: Vec<(String, String)>,
    },
    /// Stop the migration; the guest keeps running on the source
    /// (refused once the Commit was sent).
    Cancel,
    /// Decide a migration in doubt by hand.
    Resolve {
        #[command(subcommand)]
        action: ResolveAction,
    },
}

#[derive(Subcommand, Debug)]
enum ResolveAction {
    /// Source: resume the paused guest here. Only when the destination is
    /// known dead (it will never run the guest): say so with --destination-dead.
    Resume {
        #[arg(long)]
        destination_dead: bool,
    },
    /// Destination: drop the held copy (the source's guest is the one).
    Discard,
    /// Destination: run the held copy without the source's decision. Only
    /// when the source's guest is fenced: say so with --source-fenced.
    Run {
        #[arg(long)]
        source_fenced: bool,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE (e.g. bandwidth=5Gbit)"))
}

/// One request, one answer.
fn ask(path: &Path, req: &Value) -> Result<Value> {
    Conn::open(path)?.ask(req)
}

/// `ctl watch`: a line per interval, and one at every change of status,
/// until the migration ends (the socket is polled five times a second, so
/// a process that ends right after its migration is still seen ending).
fn watch(path: &Path, interval: Duration) -> Result<bool> {
    const POLL: Duration = Duration::from_millis(200);
    let mut conn = Conn::open(path)?;
    let (mut last_status, mut printed) = (String::new(), None::<std::time::Instant>);
    loop {
        let reply = match conn.ask(&json!({"execute": "status"})) {
            Ok(r) => r,
            Err(e) if !last_status.is_empty() => {
                println!(
                    "the hpmig process ended before its last status showed here ({e}); last: {last_status}; its exit status and report say how it ended"
                );
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if let Some(e) = reply.get("error") {
            bail!("{}", e["desc"].as_str().unwrap_or("refused"));
        }
        let v = &reply["return"];
        let status = v["status"]
            .as_str()
            .or(v["state"].as_str())
            .unwrap_or("?")
            .to_string();
        let due = printed.is_none_or(|t| t.elapsed() + POLL / 2 >= interval);
        if due || status != last_status {
            printed = Some(std::time::Instant::now());
            println!(
                "{:>7.1} s  {:<10} {}; {} on the wire; expected downtime {}",
                v["total-time-ms"].as_f64().unwrap_or(0.0) / 1e3,
                status,
                v["phase"].as_str().unwrap_or(""),
                crate::units::human(v["ram"]["transferred"].as_u64().unwrap_or(0)),
                v["expected-downtime-ms"]
                    .as_f64()
                    .map_or("-".into(), |m| format!("{m:.1} ms")),
            );
        }
        match status.as_str() {
            "completed" => {
                if let Some(d) = v["downtime-ms"].as_f64() {
                    println!("migrated: downtime {d:.1} ms");
                }
                return Ok(true);
            }
            "failed" | "cancelled" | "in-doubt" => {
                if let Some(e) = v["error"].as_str() {
                    println!("{e}");
                }
                return Ok(false);
            }
            _ => {}
        }
        last_status = status;
        std::thread::sleep(POLL);
    }
}

/// One connection to a control socket, asked many times.
struct Conn {
    out: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &Path) -> Result<Conn> {
        let out = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        out.set_read_timeout(Some(Duration::from_secs(90)))?;
        let reader = BufReader::new(out.try_clone()?);
        Ok(Conn { out, reader })
    }

    fn ask(&mut self, req: &Value) -> Result<Value> {
        writeln!(self.out, "{req}").context("the socket closed")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the socket closed");
        }
        serde_json::from_str(&line).context("the answer is not JSON")
    }
}

/// Sends one request, prints the answer; exit status 0 on `return`.
pub fn run(a: &CtlArgs) -> Result<bool> {
    let req = match &a.command {
        CtlCommand::Status => json!({"execute": "status"}),
        CtlCommand::Watch { interval } => return watch(&a.path, *interval),
        CtlCommand::Set { settings } => {
            let args: serde_json::Map<String, Value> = settings
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            json!({"execute": "set", "arguments": args})
        }
        CtlCommand::Cancel => json!({"execute": "cancel"}),
        CtlCommand::Resolve { action } => {
            let arguments = match action {
                ResolveAction::Resume { destination_dead } => {
                    json!({"action": "resume", "destination-dead": destination_dead})
                }
                ResolveAction::Discard => json!({"action": "discard"}),
                ResolveAction::Run { source_fenced } => {
                    json!({"action": "run", "source-fenced": source_fenced})
                }
            };
            json!({"execute": "resolve", "arguments": arguments})
        }
    };
    let reply = ask(&a.path, &req)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    if let Some(e) = reply.get("error") {
        bail!("{}", e["desc"].as_str().unwrap_or("refused"));
    }
    Ok(true)
}

/// The control socket path a command uses when none was given: under
/// $XDG_RUNTIME_DIR, else /tmp/hpmig-UID (mode 0700).
pub fn default_path(role: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("hpmig"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => PathBuf::from(format!("/tmp/hpmig-{}", unsafe { libc::getuid() })),
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir.join(format!("{role}-{}.sock", std::process::id())))
}
