//! The control socket (`--control PATH`): a Unix socket (mode 0600) that
//! speaks one JSON object per line, QMP-style: a request
//! `{"execute": "status"}` or `{"execute": "resolve", "arguments":
//! {"action": "resume", "destination-dead": true}}` gets one answer,
//! `{"return": {...}}` or `{"error": {"class": "...", "desc": "..."}}`.
//! `hpmig ctl PATH ...` is its client.
//!
//! Commands: `status` (the state and, in doubt, the session), `resolve`
//! (an operator's decision on a migration in doubt: on the source `resume`
//! with `destination-dead`; on the destination `discard`, or `run` with
//! `source-fenced`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
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
        let (tx, resolutions) = unbounded();
        let st = Arc::clone(&status);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, tx) = (Arc::clone(&st), tx.clone());
                std::thread::spawn(move || serve(conn, &st, &tx));
            }
        });
        Ok(Socket {
            path: path.to_path_buf(),
            status,
            resolutions,
        })
    }

    /// Replaces what `status` answers.
    pub fn set_status(&self, v: Value) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = v;
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

fn serve(
    conn: UnixStream,
    status: &Mutex<Value>,
    tx: &Sender<(Resolve, Sender<Result<Value, String>>)>,
) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines().map_while(Result::ok) {
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, status, tx),
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
    tx: &Sender<(Resolve, Sender<Result<Value, String>>)>,
) -> Result<Value, (&'static str, String)> {
    let args = &req["arguments"];
    let flag = |k: &str| args[k].as_bool().unwrap_or(false);
    match req["execute"].as_str() {
        Some("status") => Ok(status.lock().unwrap_or_else(|p| p.into_inner()).clone()),
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

/// Sends one request, prints the answer; exit status 0 on `return`.
pub fn run(a: &CtlArgs) -> Result<bool> {
    let req = match &a.command {
        CtlCommand::Status => json!({"execute": "status"}),
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
    let mut conn = UnixStream::connect(&a.path)
        .with_context(|| format!("connecting to {}", a.path.display()))?;
    writeln!(conn, "{req}")?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line).context("the answer is not JSON")?;
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
