//! The benchmark's results as types: what `hpmig bench` writes to
//! `bench.json` and `bench.csv`, what `hpmig model` reads back and what the
//! figures draw. One cell is one [`Setting`] (guest size, workload and its
//! dirty rate, link, method) with its [`Run`]s; a [`Summary`] is a cell's
//! runs reduced to medians and ranges ([`crate::stats`]).
//!
//! # bench.json and its schema version
//!
//! ```text
//! { "schema": 2,
//!   "cells": [ { "memory_bytes": 67108864, "workload": "sparse",
//!                "contents": "full",            (empty, full, mixed: what
//!                                                guest memory held first;
//!                                                absent in files written
//!                                                before it, whose guests
//!                                                were empty)
//!                "dirty_rate": 100000,          (null: flat out)
//!                "link": "1Gbit",               ("uncapped": no cap)
//!                "variant": "segment",          (page, segment, segment+zstd,
//!                                                qemu, qemu-xbzrle, qemu-multifd)
//!                "converged_runs": 3,           (runs whose pre-copy converged,
//!                "all_converged": true,          and whether that is all of
//!                                                them: written for readers,
//!                                                derived from the runs when
//!                                                read back; absent in older
//!                                                files)
//!                "runs": [ { "rounds", "bytes_per_round", "ms_per_round",
//!                            "total_bytes", "total_ms", "downtime_ms",
//!                            "verify_ms", "converged", "guest_progress",
//!                            "guest_writes_per_s_before",
//!                            "shadow_bytes",    (hpmig segment: the memory it
//!                                                keeps to diff against; 0
//!                                                for page and QEMU)
//!                            "xbzrle_cache_bytes", (QEMU xbzrle's cache; 0
//!                                                otherwise)
//!                            "blackout_ms",     (the pause as the guest saw
//!                                                it; null where not measured)
//!                            "blackout_before_pause_ms",
//!                            "blackout_after_start_ms",
//!                            "stop_reason",     (hpmig: why pre-copy ended,
//!                                                by name: small-work-set;
//!                                                null for QEMU)
//!                            "per_round": [ ... ],
//!                                               (hpmig: each round as the
//!                                                JSON report's rounds[],
//!                                                its decision included;
//!                                                empty for QEMU)
//!                            "link_emulation",  (veth-tbf: the shaped link
//!                                                of crate::link, one limit
//!                                                for both tools;
//!                                                in-process-cap: each
//!                                                tool's own cap)
//!                            "tool_bytes",      (the tool's own count)
//!                            "link_tx_bytes", "link_rx_bytes",
//!                                               (counted on the link; null
//!                                                on the in-process cap)
//!                            "link_peak_rate",  (bytes/s, best 200 ms)
//!                            "cpu_bound",       (peak < 0.9x the shaped rate)
//!                            "tool_downtime_ms", (each tool's own figure)
//!                            "brownout",
//!                            "peak_rss_bytes" } ... ] }, ... ] }
//!                                               (hpmig: the bench process's
//!                                                peak during the run, both
//!                                                ends; null for QEMU)
//!                                               (guest progress during
//!                                                pre-copy, pause excluded)
//! ```
//!
//! Schema 2 (this one) changed two meanings: `total_bytes` is what the
//! link carried both ways on a shaped link (every byte, control and state
//! included; the tool's own count is `tool_bytes`), and `downtime_ms` is
//! measured on one host clock for both tools, from the source's vCPUs
//! pausing to the destination's running (hpmig: `Guest::pause` returning
//! to the destination's start; QEMU: the QMP `STOP` event on the source to
//! `RESUME` on the destination); the tools' own figures are
//! `tool_downtime_ms`. Schema 1 had the tools' own figures in both.
//!
//! `stop_reason` and `per_round` are the types of hpmig's JSON report
//! ([`hpmig_report`], docs/report.md); files written before them lack
//! them and read back as null and empty.
//!
//! `schema` is the version of this layout, the first field of the file. It
//! is 2 for the layout above and goes up by one whenever a field is removed
//! or renamed or changes its meaning or unit, so that a reader never takes
//! one figure for another; adding a field does not change it. A reader
//! refuses a schema newer than [`SCHEMA`]. A file without the field was
//! written before it existed (the runs in `docs/results/`); its layout is
//! that of schema 1, so it is read as such and reports schema 0.
//!
//! Figures that are not numbers (QEMU reported no downtime for a migration
//! it did not finish) are written as `null` and read back as NaN.
//!
//! `bench.csv` has one row per cell: the cell's setting and its
//! [`Summary`].

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hpmig_core::memory::Contents;
use hpmig_microvm::Workload;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::link::Emulation;
use crate::stats::{median, spread, Spread};

/// The version of the bench.json layout this code writes and reads.
pub const SCHEMA: u32 = 2;

/// Everything one `hpmig bench` run measured: the content of bench.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    /// The layout's version: [`SCHEMA`] when written; 0 when read from a
    /// file older than the field.
    #[serde(default)]
    pub schema: u32,
    /// The cells with at least one successful run, in the order they ran.
    pub cells: Vec<Cell>,
}

/// One cell of the matrix and its runs. Written with `converged_runs` and
/// `all_converged` (see [`Cell::serialize`]); a reader derives them from
/// the runs again.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Cell {
    #[serde(flatten)]
    pub setting: Setting,
    pub runs: Vec<Run>,
}

/// A cell as bench.json writes it: its setting, whether it converged (so
/// that a reader of the file need not count `converged` over the runs to
/// tell a force-stopped cell from a converged one), then the runs.
#[derive(Serialize)]
struct CellOut<'a> {
    #[serde(flatten)]
    setting: &'a Setting,
    /// Runs whose pre-copy converged ...
    converged_runs: usize,
    /// ... and whether that is every run.
    all_converged: bool,
    runs: &'a [Run],
}

impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let converged_runs = self.runs.iter().filter(|r| r.converged).count();
        CellOut {
            setting: &self.setting,
            converged_runs,
            all_converged: converged_runs == self.runs.len(),
            runs: &self.runs,
        }
        .serialize(s)
    }
}

/// What a cell migrates, over what, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// Guest memory size.
    pub memory_bytes: u64,
    #[serde(with = "by_name")]
    pub workload: Workload,
    /// What guest memory held before the workload started.
    #[serde(with = "by_name", default = "empty_before_the_field")]
    pub contents: Contents,
    /// Guest stores per second asked for; `None`: flat out.
    pub dirty_rate: Option<u64>,
    pub link: Link,
    pub variant: Variant,
}

/// One migration's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Rounds, the stop-and-copy round included (QEMU: its dirty syncs).
    pub rounds: usize,
    /// Bytes on the wire per round (hpmig only; empty for QEMU).
    pub bytes_per_round: Vec<u64>,
    /// Each round's duration, ms (hpmig only).
    pub ms_per_round: Vec<f64>,
    pub total_bytes: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub total_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub downtime_ms: f64,
    /// Of the downtime, how long hpmig digested memory to verify the copy
    /// (QEMU verifies nothing: 0).
    #[serde(deserialize_with = "nan_if_null")]
    pub verify_ms: f64,
    /// Pre-copy converged rather than being cut short.
    pub converged: bool,
    /// Guest writes per second during migration over before it.
    #[serde(deserialize_with = "nan_if_null")]
    pub guest_progress: f64,
    /// Guest writes per second before migration (what the pacing achieved).
    #[serde(deserialize_with = "nan_if_null")]
    pub guest_writes_per_s_before: f64,
    /// The memory budget of the method's deltas: hpmig segment's shadow
    /// copy (0 for page and QEMU).
    #[serde(default)]
    pub shadow_bytes: u64,
    /// QEMU xbzrle's page cache, sized to hpmig's shadow (0 otherwise).
    #[serde(default)]
    pub xbzrle_cache_bytes: u64,
    /// The pause as the guest saw it: its heartbeat's last change on the
    /// source to its first on the destination, read by a host thread on
    /// both ends (hpmig only so far; NaN/null where not measured).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub blackout_ms: f64,
    /// Of the blackout, the time before the pause (the guest had stopped
    /// beating already) ...
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub blackout_before_pause_ms: f64,
    /// ... and after the destination started the vCPUs, until their first
    /// beat. The rest is the downtime's part until the start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub blackout_after_start_ms: f64,
    /// hpmig: why pre-copy ended (`None` for QEMU).
    #[serde(default)]
    pub stop_reason: Option<hpmig_report::Stop>,
    /// hpmig: each round as its JSON report writes it, the controller's
    /// decision included (empty for QEMU).
    #[serde(default)]
    pub per_round: Vec<hpmig_report::Round>,
    /// How the link was emulated ([`crate::link`]); files written before
    /// the shaped link ran on each tool's own cap.
    #[serde(default = "cap_before_the_field")]
    pub link_emulation: Emulation,
    /// The tool's own byte count (hpmig: its streams' wire bytes; QEMU:
    /// `ram.transferred`). On a shaped link `total_bytes` is the link's.
    #[serde(default)]
    pub tool_bytes: u64,
    /// Bytes the shaped link carried, source to destination and back
    /// (`None` on the in-process cap).
    #[serde(default)]
    pub link_tx_bytes: Option<u64>,
    #[serde(default)]
    pub link_rx_bytes: Option<u64>,
    /// The best source-to-destination rate on the link over 200 ms,
    /// bytes per second.
    #[serde(default)]
    pub link_peak_rate: Option<f64>,
    /// The migration never reached 0.9x the shaped rate: the CPU, not the
    /// link, limited it.
    #[serde(default)]
    pub cpu_bound: bool,
    /// Each tool's own downtime figure (hpmig: the source's, from the
    /// pause until it learnt the destination runs; QEMU: `query-migrate`'s).
    /// `downtime_ms` is the one-clock figure.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub tool_downtime_ms: f64,
    /// The guest's progress during pre-copy, the pause excluded (its
    /// heartbeat's rate from the migration's start to its last beat on the
    /// source, over its rate before): 1 is no slowdown.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub brownout: f64,
    /// hpmig: the bench process's peak resident memory during the run (its
    /// peak reset at the start): both ends — the source's guest and what it
    /// keeps to diff against, the destination's guest — in one process.
    /// `None` for QEMU (its processes are its own).
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
}

/// Runs written before the shaped link ran on each tool's own cap.
fn cap_before_the_field() -> Emulation {
    Emulation::Cap
}

fn nan() -> f64 {
    f64::NAN
}

/// Who migrates, and how. Written by name: `page`, `segment`,
/// `segment+zstd`, `segment-fp`, `qemu`, `qemu-xbzrle`, `qemu-xbzrle-1/8`,
/// `qemu-multifd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Variant {
    /// hpmig, whole dirty pages.
    #[serde(rename = "page")]
    Page,
    /// hpmig, dirty offset segments (the paper's method).
    #[serde(rename = "segment")]
    Segment,
    /// hpmig, segments, wide pages zstd-compressed when that pays.
    #[serde(rename = "segment+zstd")]
    SegmentZstd,
    /// QEMU's migration, plain.
    #[serde(rename = "qemu")]
    Qemu,
    /// QEMU with XBZRLE page deltas.
    #[serde(rename = "qemu-xbzrle")]
    QemuXbzrle,
    /// QEMU with multifd channels.
    #[serde(rename = "qemu-multifd")]
    QemuMultifd,
    /// hpmig, segments found with block fingerprints instead of a full
    /// shadow (`--shadow fingerprint`, the CLI's default): 1/8 of the
    /// guest's memory.
    #[serde(rename = "segment-fp")]
    SegmentFp,
    /// QEMU xbzrle with its cache at the fingerprints' budget, 1/8 of the
    /// guest.
    #[serde(rename = "qemu-xbzrle-1/8")]
    QemuXbzrleBounded,
}

impl Variant {
    /// Every variant, in the order the figures list them.
    pub const ALL: [Variant; 8] = [
        Variant::Page,
        Variant::Segment,
        Variant::SegmentZstd,
        Variant::Qemu,
        Variant::QemuXbzrle,
        Variant::QemuMultifd,
        Variant::SegmentFp,
        Variant::QemuXbzrleBounded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Page => "page",
            Variant::Segment => "segment",
            Variant::SegmentZstd => "segment+zstd",
            Variant::Qemu => "qemu",
            Variant::QemuXbzrle => "qemu-xbzrle",
            Variant::QemuMultifd => "qemu-multifd",
            Variant::SegmentFp => "segment-fp",
            Variant::QemuXbzrleBounded => "qemu-xbzrle-1/8",
        }
    }

    /// QEMU migrates, not hpmig.
    pub fn is_qemu(self) -> bool {
        matches!(
            self,
            Variant::Qemu | Variant::QemuXbzrle | Variant::QemuMultifd | Variant::QemuXbzrleBounded
        )
    }

    /// hpmig sending dirty offset segments rather than whole pages.
    pub fn sends_segments(self) -> bool {
        matches!(
            self,
            Variant::Segment | Variant::SegmentZstd | Variant::SegmentFp
        )
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A link: its bandwidth cap in bytes per second, or none. Written as its
/// label, `1Gbit` or `uncapped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Link(pub Option<u64>);

impl Link {
    pub const UNCAPPED: Link = Link(None);

    /// A link capped at `gbit` Gbit/s.
    pub const fn gbit(gbit: u64) -> Link {
        Link(Some(gbit * 125_000_000))
    }

    /// The cap in bytes per second.
    pub fn bytes_per_s(self) -> Option<u64> {
        self.0
    }

    /// The cap in Gbit/s.
    pub fn gbit_per_s(self) -> Option<f64> {
        self.0.map(|c| c as f64 * 8.0 / 1e9)
    }

    /// Reads a label as [`Link`]'s `Display` writes it.
    pub fn parse(label: &str) -> Option<Link> {
        if label == "uncapped" {
            return Some(Link::UNCAPPED);
        }
        let gbit: f64 = label.strip_suffix("Gbit")?.parse().ok()?;
        (gbit.is_finite() && gbit > 0.0).then(|| Link(Some((gbit * 125e6).round() as u64)))
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.0 {
            None => "uncapped".to_string(),
            Some(c) if (c * 8) % 1_000_000_000 == 0 => format!("{}Gbit", c * 8 / 1_000_000_000),
            Some(_) => format!("{}Gbit", self.gbit_per_s().unwrap_or_default()),
        };
        f.pad(&label)
    }
}

impl Serialize for Link {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Link {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Link, D::Error> {
        let label = String::deserialize(d)?;
        Link::parse(&label).ok_or_else(|| {
            serde::de::Error::custom(format!("link '{label}': expected NGbit or uncapped"))
        })
    }
}

/// What is written by name in bench.json: a workload, guest contents.
trait Named: std::str::FromStr<Err = String> {
    fn name(&self) -> &'static str;
}

impl Named for Workload {
    fn name(&self) -> &'static str {
        self.as_str()
    }
}

impl Named for Contents {
    fn name(&self) -> &'static str {
        self.as_str()
    }
}

/// A [`Named`] value by its name, as its `as_str` writes it.
mod by_name {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: super::Named>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: super::Named>(d: D) -> Result<T, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Files written before the `contents` field ran on guests that were never
/// filled.
fn empty_before_the_field() -> Contents {
    Contents::Empty
}

/// A float that serde_json wrote as `null` (it writes NaN so) is NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Setting {
    /// The load as people read it: `sparse@100k/s`, `dense@max`, `idle`.
    pub fn load(&self) -> String {
        match self.dirty_rate {
            Some(r) => format!("{}@{}k/s", self.workload.as_str(), r / 1000),
            None if self.workload == Workload::Idle => "idle".into(),
            None => format!("{}@max", self.workload.as_str()),
        }
    }
}

/// A cell's runs reduced to the figures bench.csv, the table and the
/// figures show.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub setting: Setting,
    /// Successful runs.
    pub runs: usize,
    pub rounds: f64,
    pub total_bytes: Spread,
    pub total_ms: Spread,
    pub downtime_ms: Spread,
    /// The guest-observed blackout (NaN where no run measured it).
    pub blackout_ms: Spread,
    /// Runs whose pre-copy converged.
    pub converged_runs: usize,
    /// Median guest progress during migration (writes per second during
    /// over before).
    pub progress: f64,
    /// Bytes per round of the run with the median total bytes (hpmig only).
    pub bytes_per_round: Vec<u64>,
    /// Median brownout: the guest's progress during pre-copy, pause
    /// excluded (NaN where not measured).
    pub brownout: f64,
    /// Runs limited by the CPU rather than the shaped link.
    pub cpu_bound_runs: usize,
    /// Runs whose `total_bytes` the shaped link counted (the others hold
    /// each tool's own count).
    pub link_counted_runs: usize,
}

impl Summary {
    /// Every run's pre-copy converged; a cell where some run was
    /// force-stopped at the round cap (or QEMU's guest stopped at the cap) is not a result
    /// like the others, and the figures draw it hollow.
    pub fn all_converged(&self) -> bool {
        self.converged_runs == self.runs
    }
}

impl Cell {
    /// The cell's medians and ranges.
    pub fn summary(&self) -> Summary {
        let runs = &self.runs;
        let mut by_bytes: Vec<&Run> = runs.iter().collect();
        by_bytes.sort_by_key(|r| r.total_bytes);
        Summary {
            setting: self.setting,
            runs: runs.len(),
            rounds: median(runs.iter().map(|r| r.rounds as f64)),
            total_bytes: spread(runs.iter().map(|r| r.total_bytes as f64)),
            total_ms: spread(runs.iter().map(|r| r.total_ms)),
            downtime_ms: spread(runs.iter().map(|r| r.downtime_ms)),
            blackout_ms: spread(runs.iter().map(|r| r.blackout_ms)),
            converged_runs: runs.iter().filter(|r| r.converged).count(),
            progress: median(runs.iter().map(|r| r.guest_progress)),
            bytes_per_round: by_bytes
                .get(by_bytes.len() / 2)
                .map(|r| r.bytes_per_round.clone())
                .unwrap_or_default(),
            brownout: median(runs.iter().map(|r| r.brownout)),
            cpu_bound_runs: runs.iter().filter(|r| r.cpu_bound).count(),
            link_counted_runs: runs
                .iter()
                .filter(|r| r.link_emulation == Emulation::Veth)
                .count(),
        }
    }
}

const CSV_HEADER: &str = "memory_bytes,workload,contents,dirty_rate,link,variant,runs,rounds_median,total_bytes_median,total_bytes_min,total_bytes_max,total_ms_median,total_ms_min,total_ms_max,downtime_ms_median,downtime_ms_min,downtime_ms_max,blackout_ms_median,blackout_ms_min,blackout_ms_max,converged_runs,progress_median,brownout_median,cpu_bound_runs,link_emulation\n";

impl BenchResults {
    /// Results of the current schema.
    pub fn new(cells: Vec<Cell>) -> BenchResults {
        BenchResults {
            schema: SCHEMA,
            cells,
        }
    }

    /// Reads a bench.json of this schema or an older one.
    pub fn read(path: &Path) -> Result<BenchResults> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: BenchResults =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if doc.schema > SCHEMA {
            bail!(
                "{} has schema {}, this hpmig reads up to {SCHEMA}",
                path.display(),
                doc.schema
            );
        }
        Ok(doc)
    }

    /// bench.csv: a header, then one row per cell.
    pub fn csv(&self) -> String {
        let mut csv = String::from(CSV_HEADER);
        for cell in &self.cells {
            let s = cell.summary();
            let (b, t, d) = (s.total_bytes, s.total_ms, s.downtime_ms);
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{:.0},{:.0},{:.0},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{:.3},{:.3},{},{}\n",
                s.setting.memory_bytes,
                s.setting.workload.as_str(),
                s.setting.contents,
                s.setting.dirty_rate.unwrap_or(0),
                s.setting.link,
                s.setting.variant,
                s.runs,
                s.rounds,
                b.median,
                b.min,
                b.max,
                t.median,
                t.min,
                t.max,
                d.median,
                d.min,
                d.max,
                s.blackout_ms.median,
                s.blackout_ms.min,
                s.blackout_ms.max,
                s.converged_runs,
                s.progress,
                s.brownout,
                s.cpu_bound_runs,
                cell.runs
                    .first()
                    .map_or("", |r| r.link_emulation.name())
            ));
        }
        csv
    }

    /// Writes bench.csv and bench.json into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let csv = dir.join("bench.csv");
        std::fs::write(&csv, self.csv()).with_context(|| format!("writing {}", csv.display()))?;
        let json = dir.join("bench.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        Ok((csv, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(total_bytes: u64, downtime_ms: f64) -> Run {
        Run {
            rounds: 2,
            bytes_per_round: vec![total_bytes - 10, 10],
            ms_per_round: vec![5.0, 0.5],
            total_bytes,
            total_ms: 12.5,
            downtime_ms,
            converged: true,
            guest_progress: 0.5,
            guest_writes_per_s_before: 1e5,
            ..Run::default()
        }
    }

    fn cell(variant: Variant, link: Link, runs: Vec<Run>) -> Cell {
        Cell {
            setting: Setting {
                memory_bytes: 64 << 20,
                workload: Workload::Sparse,
                contents: Contents::Mixed,
                dirty_rate: Some(100_000),
                link,
                variant,
            },
            runs,
        }
    }

    #[test]
    fn bench_json_round_trips_with_the_schema_first_and_nan_as_null() {
        let doc = BenchResults::new(vec![
            cell(Variant::SegmentZstd, Link::gbit(10), vec![run(1000, 3.0)]),
            cell(Variant::QemuXbzrle, Link::UNCAPPED, vec![run(2000, 4.0)]),
        ]);
        let text = serde_json::to_string_pretty(&doc).unwrap();
        assert!(
            text.trim_start().starts_with("{\n  \"schema\": 2,"),
            "{text}"
        );
        for key in [
            "\"variant\": \"segment+zstd\"",
            "\"variant\": \"qemu-xbzrle\"",
            "\"link\": \"10Gbit\"",
            "\"link\": \"uncapped\"",
            "\"workload\": \"sparse\"",
            "\"contents\": \"mixed\"",
            "\"converged\": true",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
        assert_eq!(serde_json::from_str::<BenchResults>(&text).unwrap(), doc);

        // A cell says whether it converged, before its runs.
        let mut cut = doc.clone();
        cut.cells[0].runs.push(Run {
            converged: false,
            ..run(900, 5.0)
        });
        let text = serde_json::to_string(&cut).unwrap();
        assert!(
            text.contains("\"variant\":\"segment+zstd\",\"converged_runs\":1,\"all_converged\":false,\"runs\":"),
            "{text}"
        );
        assert!(
            text.contains("\"converged_runs\":1,\"all_converged\":true"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<BenchResults>(&text).unwrap(), cut);
        assert!(!cut.cells[0].summary().all_converged());
        assert!(cut.cells[1].summary().all_converged());

        let mut nan = doc.clone();
        nan.cells[1].runs[0].downtime_ms = f64::NAN;
        let text = serde_json::to_string(&nan).unwrap();
        assert!(text.contains("\"downtime_ms\":null"), "{text}");
        let back: BenchResults = serde_json::from_str(&text).unwrap();
        assert!(back.cells[1].runs[0].downtime_ms.is_nan());
    }

    #[test]
    fn a_file_without_schema_reads_as_schema_zero_and_a_newer_one_is_refused() {
        let old = r#"{"cells":[{"memory_bytes":268435456,"workload":"dense","dirty_rate":null,
            "link":"1Gbit","variant":"qemu","runs":[{"rounds":3,"bytes_per_round":[],
            "ms_per_round":[],"total_bytes":5,"total_ms":20000.0,"downtime_ms":null,
            "verify_ms":0.0,"converged":false,"guest_progress":0.9,
            "guest_writes_per_s_before":1000.0}]}]}"#;
        let doc: BenchResults = serde_json::from_str(old).unwrap();
        assert_eq!(doc.schema, 0);
        let s = doc.cells[0].setting;
        assert_eq!(s.workload, Workload::Dense);
        // Written before guests were filled: their memory was empty.
        assert_eq!(s.contents, Contents::Empty);
        assert_eq!(doc.cells[0].runs[0].shadow_bytes, 0);
        assert_eq!(s.link.bytes_per_s(), Some(125_000_000));
        assert_eq!((s.variant, s.load()), (Variant::Qemu, "dense@max".into()));

        let dir = std::env::temp_dir().join(format!("hpmig-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let newer = dir.join("bench.json");
        std::fs::write(&newer, old.replacen('{', "{\"schema\":3,", 1)).unwrap();
        let e = BenchResults::read(&newer).unwrap_err();
        assert!(format!("{e:#}").contains("schema 3"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn links_and_variants_read_back_what_they_write() {
        for link in [Link::gbit(1), Link::gbit(25), Link::UNCAPPED] {
            assert_eq!(Link::parse(&link.to_string()), Some(link));
        }
        assert_eq!(Link::parse("2.5Gbit"), Some(Link(Some(312_500_000))));
        assert_eq!(Link(Some(312_500_000)).to_string(), "2.5Gbit");
        assert_eq!(Link::parse("fast"), None);
        for v in Variant::ALL {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{}\"", v.name()));
            assert_eq!(serde_json::from_str::<Variant>(&json).unwrap(), v);
        }
    }

    #[test]
    fn csv_has_one_row_per_cell_with_the_medians() {
        let doc = BenchResults::new(vec![
            cell(
                Variant::Page,
                Link::gbit(1),
                vec![run(300, 1.0), run(100, 2.0), run(200, 3.0)],
            ),
            cell(Variant::Segment, Link::UNCAPPED, vec![run(50, 1.0)]),
        ]);
        let csv = doc.csv();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[1],
            "67108864,sparse,mixed,100000,1Gbit,page,3,2,200,100,300,12.5,12.5,12.5,2.0,1.0,3.0,0.0,0.0,0.0,3,0.500,0.000,0,veth-tbf"
        );
        assert!(rows[2].starts_with("67108864,sparse,mixed,100000,uncapped,segment,1,"));
        assert_eq!(doc.cells[0].summary().bytes_per_round, vec![190, 10]);
    }
}
