//! The schema's promises: every field written is documented in
//! docs/report.md and every documented field is written, the version is
//! there, and names are the core's.

#![allow(clippy::unwrap_used)]

use super::*;
use hpmig_core::precopy::controller::{Projection, RoundMetrics};
use hpmig_core::precopy::WorkerStats;
use std::collections::BTreeSet;

const DOC: &str = include_str!("../../docs/report.md");

fn round(i: u32, decision: Decision, last: bool) -> Round {
    Round::from(&RoundReport {
        metrics: RoundMetrics {
            round: i,
            dirty_pages: 10,
            work_set_bytes: 100,
            wire_bytes: 200,
            duration: Duration::from_millis(3),
        },
        stats: WorkerStats::default(),
        projection: Projection::default(),
        decision,
        last,
    })
}

/// A report with every section present (no real run has both `summary`
/// and `failure`; the documentation has both).
fn everything() -> Report {
    Report {
        schema: SCHEMA,
        hpmig_version: "0.1.0".into(),
        role: "source".into(),
        outcome: "migrated".into(),
        exit_status: 0,
        guest: "runs on the destination".into(),
        config: Config::default(),
        rounds: Some(vec![
            round(0, Decision::StopAndCopy(StopReason::DowntimeFits), false),
            round(1, Decision::Continue, true),
        ]),
        summary: Some(Summary {
            granularity: "segment".into(),
            total_time_ms: 1.0,
            downtime_ms: 1.0,
            downtime_target_ms: 300.0,
            downtime_target_met: true,
            verify_ms: 0.0,
            switchover_ms: SwitchoverMs::default(),
            wire_bytes: 1,
            wire_bytes_after_round0: 0,
            rounds: 2,
            converged: true,
            stop_reason: Stop::DowntimeFits,
            stop_reason_text: StopReason::DowntimeFits.to_string(),
            verified: true,
            verify: "incremental".into(),
            guest_contents: Some("full".into()),
            heartbeat_before: 1,
            heartbeat_after: Some(2),
            blackout_ms: None,
            blackout_resolution_ms: None,
            blackout_max_gap_ms: None,
            blackout_error_ms: None,
            observer_sample_hz: None,
            observer_sample_hz_switchover: None,
            observer_cpu_share: None,
            observer_realtime: None,
            observer_quiet_ms: None,
            blackout_before_pause_ms: None,
            blackout_paused_ms: None,
            blackout_after_start_ms: None,
            guest_rate_before: 0.0,
            guest_rate_during: 0.0,
            source_cpu_seconds: 0.0,
            peak_rss_bytes: Some(1 << 30),
            diff_store: Some("fingerprints".into()),
            diff_store_bytes: Some(1 << 27),
        }),
        source_check: Some(SourceCheck::default()),
        failure: Some(Failure {
            phase: "pre-copy".into(),
            round: 3,
            cause: "the peer hung up".into(),
        }),
    }
}

/// The paths of every field in `v`: `summary.switchover_ms.pause`,
/// `rounds[].round`.
pub fn paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                paths(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for v in a.iter().filter(|v| v.is_object()) {
                paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// The fields docs/report.md documents: the first column of its tables.
fn documented() -> BTreeSet<String> {
    DOC.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_field_is_documented_and_every_documented_field_is_written() {
    let mut written = BTreeSet::new();
    paths(
        &serde_json::to_value(everything()).unwrap(),
        "",
        &mut written,
    );
    let documented = documented();
    let undocumented: Vec<_> = written.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "fields missing from docs/report.md: {undocumented:?}"
    );
    let stale: Vec<_> = documented.difference(&written).collect();
    assert!(
        stale.is_empty(),
        "docs/report.md documents fields the report no longer has: {stale:?}"
    );
}

#[test]
fn the_version_is_the_first_field_and_the_documents_title() {
    let json = serde_json::to_string(&everything()).unwrap();
    assert!(
        json.starts_with(&format!("{{\"schema\":{SCHEMA},")),
        "{json}"
    );
    assert!(DOC.starts_with(&format!(
        "# The JSON report (`--json FILE`), schema {SCHEMA}\n"
    )));
}

#[test]
fn decisions_and_reasons_are_written_by_the_cores_names() {
    for r in [
        StopReason::Clean,
        StopReason::SmallWorkSet,
        StopReason::DowntimeFits,
        StopReason::Stalled,
        StopReason::RoundCap,
    ] {
        let json = serde_json::to_value(Stop::from(r)).unwrap();
        assert_eq!(json, r.name());
        assert!(
            DOC.contains(&format!("`{}`", r.name())),
            "{} undocumented",
            r.name()
        );
    }
    for d in [
        Decision::Continue,
        Decision::StopAndCopy(StopReason::Clean),
        Decision::Abort(StopReason::Stalled),
    ] {
        assert_eq!(
            serde_json::to_value(DecisionKind::from(d)).unwrap(),
            d.name()
        );
    }
}

#[test]
fn a_round_says_its_decision_in_words_and_by_name() {
    let r = round(0, Decision::StopAndCopy(StopReason::SmallWorkSet), false);
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["decision"], "stop-and-copy");
    assert_eq!(v["reason"], "small-work-set");
    assert_eq!(
        v["decision_text"],
        "stop and copy: the work set is under the threshold"
    );
    let last = serde_json::to_value(round(1, Decision::Continue, true)).unwrap();
    assert!(last["decision"].is_null() && last["reason"].is_null());
    assert!(last["projected_downtime_ms"].is_null());
    let back: Report =
        serde_json::from_str(&serde_json::to_string(&everything()).unwrap()).unwrap();
    assert_eq!(back, everything());
}
