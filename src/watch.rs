//! Watching and steering a running migration from outside: the control
//! socket (`--control`, see [`crate::control`]), Prometheus metrics
//! (`--metrics ADDR`), an event log (`--events PATH`), the progress line,
//! and SIGINT/SIGTERM, which cancel the way `hpmig ctl PATH cancel` does.
//! Everything here reads the engine's [`Live`]; every path and address is
//! opened by [`Watch::open`] before the guest boots.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use hpmig_core::precopy::live::{CancelAnswer, Live, Stage, Status};
use serde_json::{json, Value};

use crate::control::Socket;
use crate::units::human;

/// Flags to watch and steer a migration while it runs.
#[derive(Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// A control socket to ask and steer this migration: `hpmig ctl PATH
    /// status|watch|set|cancel` (mode 0600, one JSON object per line).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Append one JSON line per phase change and per round to this file.
    #[arg(long)]
    pub events: Option<PathBuf>,
}

/// The watchers of one command, opened before the guest boots.
#[derive(Debug)]
pub struct Watch {
    pub live: Arc<Live>,
    pub socket: Option<Socket>,
    events: Option<Arc<Mutex<File>>>,
    signalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Opens the control socket, the metrics listener and the event log,
    /// and catches SIGINT/SIGTERM.
    pub fn open(a: &WatchArgs) -> Result<Watch> {
        let live = Arc::new(Live::new());
        let socket = a.control.as_ref().map(|p| Socket::bind(p)).transpose()?;
        if let Some(s) = &socket {
            s.attach(Arc::clone(&live), Value::Null);
        }
        if let Some(addr) = &a.metrics {
            crate::metrics::serve(addr, Arc::new(Mutex::new(Arc::clone(&live))))?;
        }
        let events = a
            .events
            .as_ref()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| crate::outcome::usage(format!("--events {}: {e}", p.display())))
            })
            .transpose()?
            .map(|f| Arc::new(Mutex::new(f)));
        let signalled = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&signalled))
                .context("catching SIGINT/SIGTERM")?;
        }
        Ok(Watch {
            live,
            socket,
            events,
            signalled,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        })
    }

    /// The configuration `status` echoes (the JSON report's `config`), once
    /// the guest booted.
    pub fn configure(&self, config: &hpmig_report::Config) {
        if let Some(s) = &self.socket {
            s.attach(
                Arc::clone(&self.live),
                serde_json::to_value(config).unwrap_or(Value::Null),
            );
        }
    }

    /// Starts the watcher thread: it acts on signals and writes events,
    /// ten times a second.
    pub fn start(&mut self) {
        let live = Arc::clone(&self.live);
        let events = self.events.clone();
        let signalled = Arc::clone(&self.signalled);
        let stop = Arc::clone(&self.stop);
        self.thread = Some(std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut cancelled = false;
            loop {
                let last = stop.load(Ordering::Relaxed);
                if signalled.load(Ordering::Relaxed) && !cancelled {
                    cancelled = true;
                    match live.cancel() {
                        CancelAnswer::Accepted => eprintln!(
                            "\nhpmig: signal: cancelling (the guest keeps running on the source)"
                        ),
                        CancelAnswer::TooLate(s) => eprintln!(
                            "\nhpmig: signal: too late to cancel ({}): finishing",
                            s.as_str()
                        ),
                        CancelAnswer::InDoubt => eprintln!(
                            "\nhpmig: signal: in doubt, cancelling would neither resume nor discard; resolve with hpmig ctl"
                        ),
                    }
                }
                let st = live.status();
                if let Some(f) = &events {
                    seen.log(&st, f);
                }
                if last {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    /// Stops the watcher thread after one last look (the last events).
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What the event log has said already.
#[derive(Default)]
struct Seen {
    stage: Option<Stage>,
    round: Option<u32>,
}

impl Seen {
    fn log(&mut self, st: &Status, f: &Mutex<File>) {
        let mut lines = Vec::new();
        if let Some(r) = &st.last_round {
            if self.round != Some(r.round) {
                self.round = Some(r.round);
                lines.push(json!({
                    "event": "round",
                    "round": r.round,
                    "pages": r.pages,
                    "work-set-bytes": r.work_set_bytes,
                    "wire-bytes": r.wire_bytes,
                    "duration-ms": ms(r.duration),
                    "dirty-pages-rate": r.dirty_pages_rate,
                    "mbps": r.link_rate * 8.0 / 1e6,
                    "expected-downtime-ms": ms(r.expected_downtime),
                    "decision": r.decision,
                }));
            }
        }
        if self.stage != Some(st.stage) {
            self.stage = Some(st.stage);
            let mut e = json!({
                "event": "status",
                "status": st.stage.as_str(),
                "round": st.round,
                "transferred": st.bytes.total(),
            });
            if let Some(end) = &st.ended {
                e["downtime-ms"] = json!(ms(end.downtime));
                e["error"] = json!(end.error);
            }
            lines.push(e);
        }
        let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
        for mut l in lines {
            l["time-ms"] = json!(SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64));
            l["elapsed-ms"] = json!(ms(st.elapsed));
            let _ = writeln!(f, "{l}");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A duration for people: ms below a second, s above.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

/// The running round for people: "round 2: 412 MiB sent at 95.3 MiB/s,
/// 30 MiB left, ETA 0.3 s".
pub fn progress_line(st: &Status) -> String {
    match st.stage {
        Stage::PreCopy if st.landing => format!(
            "landing round {}: {} landed, {} of guest memory",
            st.round,
            human(st.bytes.total()),
            human(st.guest_bytes),
        ),
        Stage::PreCopy | Stage::StopAndCopy => {
            let mut s = format!(
                "round {}{}: {} sent at {}/s, {} of guest memory left",
                st.round,
                if st.stage == Stage::StopAndCopy {
                    " (guest paused)"
                } else {
                    ""
                },
                human(st.round_bytes),
                human(st.round_rate() as u64),
                human(st.remaining_bytes()),
            );
            if let Some(eta) = st.round_eta() {
                s += &format!(", ETA {}", duration(eta));
            }
            s
        }
        Stage::Setup => "setting up".into(),
        Stage::SwitchOver => "switching over: waiting for the destination's Ack".into(),
        Stage::Committing => "committing: waiting for the destination to run the guest".into(),
        s => s.as_str().into(),
    }
}

/// `status` as JSON, with QMP's `query-migrate` names where one exists.
pub fn status_json(st: &Status, config: &Value) -> Value {
    let mut config = match config {
        Value::Object(_) => config.clone(),
        _ => json!({}),
    };
    // What is in force now (the operator may have changed both).
    config["max-bandwidth"] = json!(st.bandwidth);
    config["downtime-limit-ms"] = json!(ms(st.downtime_target));
    let mut v = json!({
        "status": st.stage.as_str(),
        "phase": progress_line(st),
        "round": st.round,
        "total-time-ms": ms(st.elapsed),
        "ram": {
            "total": st.guest_bytes,
            "transferred": st.bytes.total(),
            "remaining": st.remaining_bytes(),
            "page-size": st.page_size,
            "dirty-sync-count": st.round,
            "dirty-pages-rate": st.last_round.as_ref().map_or(0.0, |r| r.dirty_pages_rate),
            "mbps": st.round_rate() * 8.0 / 1e6,
        },
        "bytes": {
            "segment": st.bytes.segment,
            "whole-page": st.bytes.whole,
            "zstd": st.bytes.zstd,
            "headers": st.bytes.headers,
        },
        "streams": st.streams.iter().map(|s| json!({
            "transferred": s.bytes.total(),
            "pages": s.pages,
        })).collect::<Vec<_>>(),
        "running-round": {
            "pages": st.round_pages,
            "pages-done": st.round_pages_done,
            "transferred": st.round_bytes,
            "elapsed-ms": ms(st.round_elapsed),
            "rate": st.round_rate(),
            "eta-ms": st.round_eta().map(ms),
        },
        "config": config,
    });
    if let Some(r) = &st.last_round {
        v["expected-downtime-ms"] = json!(ms(r.expected_downtime));
        v["last-round"] = json!({
            "round": r.round,
            "pages": r.pages,
            "work-set-bytes": r.work_set_bytes,
            "transferred": r.wire_bytes,
            "duration-ms": ms(r.duration),
            "dirty-pages-rate": r.dirty_pages_rate,
            "link-rate": r.link_rate,
            "decision": r.decision,
        });
    }
    if let Some(e) = &st.ended {
        v["downtime-ms"] = json!(ms(e.downtime));
        v["error"] = json!(e.error);
    }
    v
}
