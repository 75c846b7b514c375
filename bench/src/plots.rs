//! The benchmark's figures, drawn as SVG with plotters:
//! - `bytes_per_round.svg`: bytes each round sent, page vs segment;
//! - `time_vs_link.svg`: total time and downtime against the link cap;
//! - `paper.svg`: the paper's comparison (iterations, total time, data
//!   volume) per migration method, one group per link, QEMU included.
//!
//! Every figure draws the reference load: the sparse workload at the
//! smallest measured guest size (100k stores/s when measured).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordu32;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One cell's medians, as the figures need them.
#[derive(Clone, Debug)]
pub struct Point {
    pub workload: String,
    pub memory: u64,
    pub link: String,
    /// Link cap in Gbit/s; `None` uncapped.
    pub link_gbit: Option<f64>,
    pub variant: String,
    pub rounds: f64,
    pub total_bytes: f64,
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Bytes per round of the run with the median total bytes (hpmig only).
    pub bytes_per_round: Vec<u64>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn color(variant: &str) -> RGBColor {
    let order = [
        "page",
        "segment",
        "segment+zstd",
        "qemu",
        "qemu-xbzrle",
        "qemu-multifd",
    ];
    COLORS[order.iter().position(|v| *v == variant).unwrap_or(5)]
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// The points of the reference load.
fn reference(points: &[Point]) -> Vec<&Point> {
    let sparse: Vec<&Point> = points
        .iter()
        .filter(|p| p.workload.starts_with("sparse"))
        .collect();
    let pool = if sparse.is_empty() {
        points.iter().collect()
    } else {
        sparse
    };
    let Some(memory) = pool.iter().map(|p| p.memory).min() else {
        return Vec::new();
    };
    let load = pool
        .iter()
        .filter(|p| p.memory == memory)
        .map(|p| p.workload.as_str())
        .find(|w| w.contains("100k"))
        .or_else(|| pool.first().map(|p| p.workload.as_str()))
        .unwrap_or_default()
        .to_string();
    pool.into_iter()
        .filter(|p| p.memory == memory && p.workload == load)
        .collect()
}

fn variants(points: &[&Point]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in points {
        if !v.contains(&p.variant) {
            v.push(p.variant.clone());
        }
    }
    v
}

fn links(points: &[&Point]) -> Vec<(String, Option<f64>)> {
    let mut l: Vec<(String, Option<f64>)> = Vec::new();
    for p in points {
        if !l.iter().any(|(n, _)| *n == p.link) {
            l.push((p.link.clone(), p.link_gbit));
        }
    }
    l.sort_by(|a, b| a.1.unwrap_or(f64::MAX).total_cmp(&b.1.unwrap_or(f64::MAX)));
    l
}

/// Draws every figure into `dir`; returns the files written.
pub fn write(dir: &Path, points: &[Point]) -> Result<Vec<PathBuf>> {
    let refs = reference(points);
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let title = format!("{}, {} MiB guest", refs[0].workload, refs[0].memory >> 20);
    Ok(vec![
        bytes_per_round(dir, &refs, &title)?,
        time_vs_link(dir, &refs, &title)?,
        paper(dir, &refs, &title)?,
    ])
}

fn bytes_per_round(dir: &Path, refs: &[&Point], title: &str) -> Result<PathBuf> {
    const NAME: &str = "bytes_per_round.svg";
    let path = dir.join(NAME);
    let root =
        SVGBackend::new(&path, (900, 420 * links(refs).len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ls = links(refs);
    let areas = root.split_evenly((ls.len().max(1), 1));
    for ((link, _), area) in ls.iter().zip(areas) {
        let series: Vec<&&Point> = refs
            .iter()
            .filter(|p| p.link == *link && !p.bytes_per_round.is_empty())
            .collect();
        let max_rounds = series
            .iter()
            .map(|p| p.bytes_per_round.len())
            .max()
            .unwrap_or(1);
        let max_bytes = series
            .iter()
            .flat_map(|p| p.bytes_per_round.iter().copied())
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("bytes per round, {title}, {link}"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0u32..max_rounds as u32, (1f64..max_bytes * 2.0).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("bytes on the wire")
            .draw()
            .map_err(err)?;
        for p in series {
            let pts = p
                .bytes_per_round
                .iter()
                .enumerate()
                .map(|(i, &b)| (i as u32, (b as f64).max(1.0)))
                .collect();
            line(&mut chart, pts, &p.variant, 3)?;
        }
        legend(&mut chart)?;
    }
    root.present().map_err(err)?;
    Ok(dir.join(NAME))
}

fn time_vs_link(dir: &Path, refs: &[&Point], title: &str) -> Result<PathBuf> {
    const NAME: &str = "time_vs_link.svg";
    let path = dir.join(NAME);
    let root = SVGBackend::new(&path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ls = links(refs);
    let vs = variants(refs);
    let (left, right) = root.split_horizontally(600);
    for (area, what) in [(left, "total time"), (right, "downtime")] {
        let value = |p: &Point| {
            if what == "total time" {
                p.total_ms
            } else {
                p.downtime_ms
            }
        };
        let max = refs
            .iter()
            .map(|p| value(p))
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{what} vs link, {title}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0..ls.len() as u32, (1f64..max * 2.0).log_scale())
            .map_err(err)?;
        let names: Vec<String> = ls.iter().map(|(n, _)| n.clone()).collect();
        chart
            .configure_mesh()
            .x_labels(ls.len() + 1)
            .x_label_formatter(&|i| names.get(*i as usize).cloned().unwrap_or_default())
            .x_desc("link cap")
            .y_desc(format!("{what}, ms"))
            .draw()
            .map_err(err)?;
        for v in &vs {
            let pts = ls
                .iter()
                .enumerate()
                .filter_map(|(i, (l, _))| {
                    refs.iter()
                        .find(|p| p.link == *l && p.variant == *v)
                        .map(|p| (i as u32, value(p)))
                        .filter(|(_, y)| y.is_finite() && *y > 0.0)
                })
                .collect();
            line(&mut chart, pts, v, 4)?;
        }
        legend(&mut chart)?;
    }
    root.present().map_err(err)?;
    Ok(dir.join(NAME))
}

fn paper(dir: &Path, refs: &[&Point], title: &str) -> Result<PathBuf> {
    const NAME: &str = "paper.svg";
    let path = dir.join(NAME);
    let ls = links(refs);
    let vs = variants(refs);
    let root = SVGBackend::new(&path, (1350, 380 * ls.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let rows = root.split_evenly((ls.len().max(1), 3));
    type Metric = fn(&Point) -> f64;
    let metrics: [(&str, Metric); 3] = [
        ("iterations (rounds)", |p| p.rounds),
        ("total time, ms", |p| p.total_ms),
        ("data volume, MiB", |p| p.total_bytes / (1u64 << 20) as f64),
    ];
    for (i, area) in rows.iter().enumerate() {
        let (link, _) = &ls[i / 3];
        let (name, f) = metrics[i % 3];
        let pts: Vec<(usize, f64, &str)> = vs
            .iter()
            .enumerate()
            .filter_map(|(k, v)| {
                refs.iter()
                    .find(|p| p.link == *link && p.variant == *v)
                    .map(|p| (k, f(p), v.as_str()))
            })
            .collect();
        let max = pts.iter().map(|p| p.1).fold(1e-3, f64::max);
        let caption = format!("{name}, {title}, {link}");
        if name == "iterations (rounds)" {
            bar_panel(area, caption, name, vs.len(), 0f64..max * 1.3, 0.0, &pts)?;
        } else {
            let y = (0.01f64..max * 30.0).log_scale();
            bar_panel(area, caption, name, vs.len(), y, 0.01, &pts)?;
        }
    }
    root.present().map_err(err)?;
    Ok(dir.join(NAME))
}

/// The line charts' coordinates: round or link index, log-scaled value.
type LineChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordu32, LogCoord<f64>>>;

/// One method's line with a dot at each point, named in the legend.
fn line(
    chart: &mut LineChart<'_, '_>,
    pts: Vec<(u32, f64)>,
    variant: &str,
    dot: u32,
) -> Result<()> {
    let c = color(variant);
    chart
        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
        .map_err(err)?
        .label(variant)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
    chart
        .draw_series(pts.into_iter().map(|p| Circle::new(p, dot, c.filled())))
        .map_err(err)?;
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut LineChart<'a, 'b>) -> Result<()> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)
}

/// One panel of bars, `(slot, value, method)` each, on the value axis `y`
/// (bars start at `floor`), each bar named above itself.
fn bar_panel<Y>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: String,
    name: &str,
    slots: usize,
    y: Y,
    floor: f64,
    pts: &[(usize, f64, &str)],
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(10)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..slots as f64, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(name)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&(k, y, v)| {
            Rectangle::new(
                [(k as f64 + 0.15, floor), (k as f64 + 0.85, y.max(floor))],
                color(v).filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&(k, y, v)| {
            Text::new(
                format!("{v}: {}", short(y)),
                (k as f64 + 0.15, y.max(floor)),
                ("sans-serif", 12).into_font(),
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// A value with three significant digits.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(link: &str, gbit: Option<f64>, variant: &str, scale: f64) -> Point {
        Point {
            workload: "sparse@100k/s".into(),
            memory: 256 << 20,
            link: link.into(),
            link_gbit: gbit,
            variant: variant.into(),
            rounds: 2.0 * scale,
            total_bytes: 1e6 * scale,
            total_ms: 200.0 * scale,
            downtime_ms: 90.0 * scale,
            bytes_per_round: if variant.starts_with("qemu") {
                Vec::new()
            } else {
                vec![(1e6 * scale) as u64, (1e4 * scale) as u64]
            },
        }
    }

    #[test]
    fn every_figure_names_every_link_and_method() {
        let mut points = Vec::new();
        for (link, gbit) in [("1Gbit", Some(1.0)), ("10Gbit", Some(10.0))] {
            for (variant, scale) in [("page", 100.0), ("segment", 1.0), ("qemu-xbzrle", 30.0)] {
                points.push(point(link, gbit, variant, scale));
            }
        }
        let dir = std::env::temp_dir().join(format!("hpmig-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = write(&dir, &points).unwrap();
        assert_eq!(files.len(), 3);
        for f in &files {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(svg.contains("<svg"), "{}", f.display());
            for link in ["1Gbit", "10Gbit"] {
                if !f.ends_with("time_vs_link.svg") {
                    assert!(svg.contains(link), "{} lacks {link}", f.display());
                }
            }
            assert!(svg.contains("segment"), "{} lacks segment", f.display());
        }
        let paper = std::fs::read_to_string(dir.join("paper.svg")).unwrap();
        assert!(
            paper.contains("qemu-xbzrle: 60.0"),
            "bars are named with their values"
        );
        if std::env::var_os("HPMIG_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
