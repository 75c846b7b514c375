//! The benchmark's figures, drawn as SVG with plotters:
//! - `bytes_per_round.svg`: bytes each round sent, page vs segment;
//! - `time_vs_link.svg`: total time and downtime against the link cap;
//! - `paper.svg`: the paper's comparison (iterations, total time, data
//!   volume) per migration method, one group per link, QEMU included.
//!
//! Every figure draws the reference load: the sparse workload at the
//! smallest measured guest size (100k stores/s when measured). The figures
//! draw cells' [`Summary`]s, the medians bench.csv holds.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use hpmig_microvm::Workload;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordu32;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::results::{Link, Summary, Variant};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn color(variant: Variant) -> RGBColor {
    COLORS[Variant::ALL.iter().position(|v| *v == variant).unwrap_or(5)]
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// The cells of the reference load.
fn reference(points: &[Summary]) -> Vec<&Summary> {
    let sparse: Vec<&Summary> = points
        .iter()
        .filter(|p| p.setting.workload == Workload::Sparse)
        .collect();
    let pool: Vec<&Summary> = if sparse.is_empty() {
        points.iter().collect()
    } else {
        sparse
    };
    // One guest contents per figure: full where measured.
    let contents = if pool
        .iter()
        .any(|p| p.setting.contents == hpmig_core::memory::Contents::Full)
    {
        hpmig_core::memory::Contents::Full
    } else {
        match pool.first() {
            Some(p) => p.setting.contents,
            None => return Vec::new(),
        }
    };
    let pool: Vec<&Summary> = pool
        .into_iter()
        .filter(|p| p.setting.contents == contents)
        .collect();
    let Some(memory) = pool.iter().map(|p| p.setting.memory_bytes).min() else {
        return Vec::new();
    };
    let at_memory = || pool.iter().filter(|p| p.setting.memory_bytes == memory);
    let Some(load) = at_memory()
        .find(|p| p.setting.dirty_rate == Some(100_000))
        .or_else(|| at_memory().next())
        .map(|p| (p.setting.workload, p.setting.dirty_rate))
    else {
        return Vec::new();
    };
    pool.iter()
        .copied()
        .filter(|p| {
            p.setting.memory_bytes == memory && (p.setting.workload, p.setting.dirty_rate) == load
        })
        .collect()
}

fn variants(points: &[&Summary]) -> Vec<Variant> {
    let mut v: Vec<Variant> = Vec::new();
    for p in points {
        if !v.contains(&p.setting.variant) {
            v.push(p.setting.variant);
        }
    }
    v
}

/// The links measured, slowest first, uncapped last.
fn links(points: &[&Summary]) -> Vec<Link> {
    let mut l: Vec<Link> = Vec::new();
    for p in points {
        if !l.contains(&p.setting.link) {
            l.push(p.setting.link);
        }
    }
    l.sort_by_key(|l| l.bytes_per_s().unwrap_or(u64::MAX));
    l
}

/// Draws every figure of `points` (one per cell) into `dir`; returns the
/// files written.
pub fn write(dir: &Path, points: &[Summary]) -> Result<Vec<PathBuf>> {
    let refs = reference(points);
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let s = &refs[0].setting;
    let title = format!(
        "{}, {} MiB guest, {} memory",
        s.load(),
        s.memory_bytes >> 20,
        s.contents
    );
    Ok(vec![
        bytes_per_round(dir, &refs, &title)?,
        time_vs_link(dir, &refs, &title)?,
        paper(dir, &refs, &title)?,
    ])
}

fn bytes_per_round(dir: &Path, refs: &[&Summary], title: &str) -> Result<PathBuf> {
    const NAME: &str = "bytes_per_round.svg";
    let path = dir.join(NAME);
    let root =
        SVGBackend::new(&path, (900, 420 * links(refs).len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ls = links(refs);
    let areas = root.split_evenly((ls.len().max(1), 1));
    for (link, area) in ls.iter().zip(areas) {
        let series: Vec<&&Summary> = refs
            .iter()
            .filter(|p| p.setting.link == *link && !p.bytes_per_round.is_empty())
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
            line(&mut chart, pts, p.setting.variant, 3)?;
        }
        legend(&mut chart)?;
    }
    root.present().map_err(err)?;
    Ok(dir.join(NAME))
}

fn time_vs_link(dir: &Path, refs: &[&Summary], title: &str) -> Result<PathBuf> {
    const NAME: &str = "time_vs_link.svg";
    let path = dir.join(NAME);
    let root = SVGBackend::new(&path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ls = links(refs);
    let vs = variants(refs);
    let (left, right) = root.split_horizontally(600);
    for (area, what) in [(left, "total time"), (right, "downtime")] {
        let value = |p: &Summary| {
            if what == "total time" {
                p.total_ms.median
            } else {
                p.downtime_ms.median
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
        let names: Vec<String> = ls.iter().map(Link::to_string).collect();
        chart
            .configure_mesh()
            .x_labels(ls.len() + 1)
            .x_label_formatter(&|i| names.get(*i as usize).cloned().unwrap_or_default())
            .x_desc("link cap")
            .y_desc(format!("{what}, ms"))
            .draw()
            .map_err(err)?;
        for &v in &vs {
            let pts = ls
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    refs.iter()
                        .find(|p| p.setting.link == *l && p.setting.variant == v)
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

fn paper(dir: &Path, refs: &[&Summary], title: &str) -> Result<PathBuf> {
    const NAME: &str = "paper.svg";
    let path = dir.join(NAME);
    let ls = links(refs);
    let vs = variants(refs);
    let root = SVGBackend::new(&path, (1350, 380 * ls.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let rows = root.split_evenly((ls.len().max(1), 3));
    type Metric = fn(&Summary) -> f64;
    let metrics: [(&str, Metric); 3] = [
        ("iterations (rounds)", |p| p.rounds),
        ("total time, ms", |p| p.total_ms.median),
        ("data volume, MiB", |p| {
            p.total_bytes.median / (1u64 << 20) as f64
        }),
    ];
    for (i, area) in rows.iter().enumerate() {
        let link = ls[i / 3];
        let (name, f) = metrics[i % 3];
        let pts: Vec<(usize, f64, Variant)> = vs
            .iter()
            .enumerate()
            .filter_map(|(k, &v)| {
                refs.iter()
                    .find(|p| p.setting.link == link && p.setting.variant == v)
                    .map(|p| (k, f(p), v))
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
    variant: Variant,
    dot: u32,
) -> Result<()> {
    let c = color(variant);
    chart
        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
        .map_err(err)?
        .label(variant.name())
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
    pts: &[(usize, f64, Variant)],
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
    use crate::results::Setting;
    use crate::stats::Spread;

    fn point(link: Link, variant: Variant, scale: f64) -> Summary {
        let same = |median: f64| Spread {
            median,
            min: median,
            max: median,
        };
        Summary {
            setting: Setting {
                memory_bytes: 256 << 20,
                workload: Workload::Sparse,
                contents: hpmig_core::memory::Contents::Full,
                dirty_rate: Some(100_000),
                link,
                variant,
            },
            runs: 1,
            rounds: 2.0 * scale,
            total_bytes: same(1e6 * scale),
            total_ms: same(200.0 * scale),
            downtime_ms: same(90.0 * scale),
            blackout_ms: same(95.0 * scale),
            converged_runs: 1,
            progress: 1.0,
            bytes_per_round: if variant.is_qemu() {
                Vec::new()
            } else {
                vec![(1e6 * scale) as u64, (1e4 * scale) as u64]
            },
            brownout: 1.0,
            cpu_bound_runs: 0,
        }
    }

    #[test]
    fn every_figure_names_every_link_and_method() {
        let mut points = Vec::new();
        for link in [Link::gbit(1), Link::gbit(10)] {
            for (variant, scale) in [
                (Variant::Page, 100.0),
                (Variant::Segment, 1.0),
                (Variant::QemuXbzrle, 30.0),
            ] {
                points.push(point(link, variant, scale));
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
