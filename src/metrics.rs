//! `--metrics ADDR`: Prometheus (OpenMetrics text) on `http://ADDR/metrics`,
//! read from the engine's [`Live`] at every scrape. prometheus-client
//! encodes (the Prometheus project's own Rust client); tiny_http serves,
//! one thread, no async runtime.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `hpmig_wire_bytes_total` | counter | stream, kind | bytes put on the data streams, by what they carried (segment, whole_page, zstd, headers) |
//! | `hpmig_pages_total` | counter | stream | dirty pages dealt with (sent or found unchanged) |
//! | `hpmig_round` | gauge | | the round running (or the last) |
//! | `hpmig_guest_bytes` | gauge | | guest memory size |
//! | `hpmig_remaining_bytes` | gauge | | guest bytes the running round has still to deal with |
//! | `hpmig_round_rate_bytes_per_second` | gauge | | wire rate of the running round |
//! | `hpmig_work_set_bytes` | gauge | | changed guest bytes found by the last round |
//! | `hpmig_dirty_pages_per_second` | gauge | | pages dirtied per second during the last round |
//! | `hpmig_expected_downtime_seconds` | gauge | | the controller's projection after the last round |
//! | `hpmig_bandwidth_limit_bytes_per_second` | gauge | | the cap in force (0: none) |
//! | `hpmig_downtime_target_seconds` | gauge | | the target in force |
//! | `hpmig_downtime_seconds` | gauge | phase | the pause once over: total, harvest, final_round, acknowledge, decision |
//! | `hpmig_status` | gauge | status | 1 for the current status (setup, active, device, switchover, committing, completed, failed, cancelled, in-doubt) |

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use hpmig_core::precopy::live::{Live, Stage, Status};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamKind {
    stream: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

type F64 = Gauge<f64, AtomicU64>;

/// The registered metrics, refreshed from a [`Status`] before each scrape.
#[derive(Debug)]
struct Metrics {
    registry: Registry,
    bytes: Family<StreamKind, Counter>,
    pages: Family<StreamLabel, Counter>,
    round: Gauge,
    guest: Gauge,
    remaining: Gauge,
    round_rate: F64,
    work_set: Gauge,
    dirty_rate: F64,
    expected: F64,
    cap: Gauge,
    target: F64,
    downtime: Family<PhaseLabel, F64>,
    status: Family<StatusLabel, Gauge>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            bytes: Family::default(),
            pages: Family::default(),
            round: Gauge::default(),
            guest: Gauge::default(),
            remaining: Gauge::default(),
            round_rate: F64::default(),
            work_set: Gauge::default(),
            dirty_rate: F64::default(),
            expected: F64::default(),
            cap: Gauge::default(),
            target: F64::default(),
            downtime: Family::default(),
            status: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "hpmig_wire_bytes",
            "Bytes put on the data streams, by what they carried",
            m.bytes.clone(),
        );
        r.register(
            "hpmig_pages",
            "Dirty pages dealt with (sent or found unchanged)",
            m.pages.clone(),
        );
        r.register("hpmig_round", "The round running", m.round.clone());
        r.register("hpmig_guest_bytes", "Guest memory size", m.guest.clone());
        r.register(
            "hpmig_remaining_bytes",
            "Guest bytes the running round has still to deal with",
            m.remaining.clone(),
        );
        r.register(
            "hpmig_round_rate_bytes_per_second",
            "Wire rate of the running round",
            m.round_rate.clone(),
        );
        r.register(
            "hpmig_work_set_bytes",
            "Changed guest bytes found by the last round",
            m.work_set.clone(),
        );
        r.register(
            "hpmig_dirty_pages_per_second",
            "Pages dirtied per second during the last round",
            m.dirty_rate.clone(),
        );
        r.register(
            "hpmig_expected_downtime_seconds",
            "The controller's projection of the pause after the last round",
            m.expected.clone(),
        );
        r.register(
            "hpmig_bandwidth_limit_bytes_per_second",
            "The bandwidth cap in force (0: none)",
            m.cap.clone(),
        );
        r.register(
            "hpmig_downtime_target_seconds",
            "The downtime target in force",
            m.target.clone(),
        );
        r.register(
            "hpmig_downtime_seconds",
            "The guest's pause once over, and its phases",
            m.downtime.clone(),
        );
        r.register(
            "hpmig_status",
            "1 for the migration's current status",
            m.status.clone(),
        );
        m
    }

    fn refresh(&self, st: &Status) {
        use std::sync::atomic::Ordering::Relaxed;
        for (i, s) in st.streams.iter().enumerate() {
            for (kind, v) in [
                ("segment", s.bytes.segment),
                ("whole_page", s.bytes.whole),
                ("zstd", s.bytes.zstd),
                ("headers", s.bytes.headers),
            ] {
                let l = StreamKind {
                    stream: i.to_string(),
                    kind: kind.into(),
                };
                self.bytes.get_or_create(&l).inner().store(v, Relaxed);
            }
            let l = StreamLabel {
                stream: i.to_string(),
            };
            self.pages.get_or_create(&l).inner().store(s.pages, Relaxed);
        }
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.round.set(i64::from(st.round));
        self.guest.set(i(st.guest_bytes));
        self.remaining.set(i(st.remaining_bytes()));
        self.round_rate.set(st.round_rate());
        self.cap.set(i(st.bandwidth.unwrap_or(0)));
        self.target.set(st.downtime_target.as_secs_f64());
        if let Some(r) = &st.last_round {
            self.work_set.set(i(r.work_set_bytes));
            self.dirty_rate.set(r.dirty_pages_rate);
            self.expected.set(r.expected_downtime.as_secs_f64());
        }
        if let Some(e) = &st.ended {
            let t = e.switchover;
            for (phase, d) in [
                ("total", e.downtime),
                ("harvest", t.harvest),
                ("final_round", t.final_round),
                ("acknowledge", t.acknowledge),
                ("decision", t.decision),
            ] {
                let l = PhaseLabel {
                    phase: phase.into(),
                };
                self.downtime.get_or_create(&l).set(d.as_secs_f64());
            }
        }
        for s in Stage::ALL {
            let l = StatusLabel {
                status: s.as_str().into(),
            };
            self.status.get_or_create(&l).set(i64::from(s == st.stage));
        }
    }

    fn render(&self, st: &Status) -> String {
        self.refresh(st);
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Listens on `addr` (checked now, before anything starts) and serves
/// `/metrics` from a thread of its own for the rest of the process, from
/// the migration `live` shows at each scrape (the destination swaps in a
/// fresh one per migration).
pub fn serve(addr: &str, live: Arc<Mutex<Arc<Live>>>) -> Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| crate::outcome::usage(format!("--metrics {addr}: cannot listen: {e}")))?;
    let metrics = Metrics::new();
    std::thread::Builder::new()
        .name("hpmig-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let now = Arc::clone(&live.lock().unwrap_or_else(|p| p.into_inner()));
                    let body = metrics.render(&now.status());
                    let ct = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .map_err(|()| anyhow!("header"));
                    let mut r = tiny_http::Response::from_string(body);
                    if let Ok(h) = ct {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_parses_as_prometheus_text() {
        let live = Live::new();
        let body = Metrics::new().render(&live.status());
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
        assert!(scrape
            .samples
            .iter()
            .any(|s| s.metric == "hpmig_status" && s.labels.get("status") == Some("setup")));
    }
}
