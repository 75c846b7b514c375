//! The benchmark's figures, drawn as SVG with plotters: one set per guest
//! size measured, the size in the file name as `--memory` writes it
//! (`256M`, `1G`):
//! - `paper-<size>.svg`: the paper's comparison: rounds, total time and
//!   data volume per method, grouped by link cap, QEMU included;
//! - `time_vs_link-<size>.svg`: total time, downtime and (where measured)
//!   the guest's blackout per method, grouped by link cap;
//! - `bytes_per_round-<size>.svg`: the bytes each round sent, per hpmig
//!   method, one panel per link cap;
//! - `downtime_vs_size.svg`, when more than one size was measured with the
//!   same load: downtime and blackout per method, grouped by guest size.
//!
//! A set draws its size's reference load: the sparse workload where
//! measured, then full guest memory, then 100k stores/s (the first load
//! measured where one of them is not). A setting measured twice (the full
//! matrix and its QEMU comparison) is drawn from its first cell.
//!
//! How the figures read:
//! - link caps and guest sizes are categories: methods side by side in
//!   each group, never a line across them;
//! - a median is a bar from zero on a linear axis; where the values span
//!   more than [`LOG_SPAN`]×, the axis is logarithmic, from the 1-2-5 step
//!   below the smallest value, and the median is a point (a bar on a log
//!   axis would start at an arbitrary value);
//! - whiskers span min..max over the cell's runs ([`crate::stats`]);
//! - a cell where some run did not converge (hpmig force-stopped at its
//!   round cap, QEMU stopped at the cap) is drawn hollow — a hatched bar, an open
//!   point, a dashed line — and the legend says so ([`HOLLOW`]);
//! - one Okabe–Ito colour per method, the same in every figure (safe for
//!   colour-blind readers);
//! - bytes in decimal units (kB, MB, GB: the axis steps are powers of
//!   ten), times in ms and s, rounds as whole numbers.
//!
//! [`replot`] redraws a directory's figures from its bench.json.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use hpmig_core::memory::Contents;
use hpmig_microvm::Workload;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::results::{BenchResults, Cell, Link, Summary, Variant};
use crate::stats::Spread;

/// The legend entry of a cell drawn hollow.
pub const HOLLOW: &str = "hollow: did not converge in every run";

/// Values spanning more than this factor get a logarithmic axis.
pub const LOG_SPAN: f64 = 30.0;

/// Okabe & Ito's colour-blind-safe palette, one colour per method in
/// [`Variant::ALL`]'s order: page vermillion, segment blue, segment+zstd
/// sky blue, qemu orange, qemu-xbzrle bluish green, qemu-multifd reddish
/// purple, segment-fp black, qemu-xbzrle-1/8 grey (its yellow is too faint
/// on white).
const PALETTE: [RGBColor; 8] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(0, 0, 0),
    RGBColor(150, 150, 150),
];

/// Text and the legend's neutral marks.
const GREY: RGBColor = RGBColor(80, 80, 80);

const FONT: &str = "sans-serif";

fn color(variant: Variant) -> RGBColor {
    PALETTE[Variant::ALL.iter().position(|v| *v == variant).unwrap_or(0)]
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// What the guest did and held: everything of a cell's setting but its
/// size, link and method.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Load {
    workload: Workload,
    dirty_rate: Option<u64>,
    contents: Contents,
}

impl Load {
    fn of(p: &Summary) -> Load {
        Load {
            workload: p.setting.workload,
            dirty_rate: p.setting.dirty_rate,
            contents: p.setting.contents,
        }
    }

    /// The reference load first: sparse, then full memory, then 100k/s.
    fn rank(&self) -> (bool, bool, bool) {
        (
            self.workload == Workload::Sparse,
            self.contents == Contents::Full,
            self.dirty_rate == Some(100_000),
        )
    }

    /// The reference load among `loads`: the best ranked, the first of
    /// equals.
    fn reference(loads: impl IntoIterator<Item = Load>) -> Option<Load> {
        loads.into_iter().fold(None, |best, l| match best {
            Some(b) if b.rank() >= l.rank() => Some(b),
            _ => Some(l),
        })
    }

    /// `sparse workload at 100k stores/s, memory full of random data`.
    fn words(&self) -> String {
        let work = match (self.workload, self.dirty_rate) {
            (Workload::Idle, _) => "idle guest".to_string(),
            (w, Some(r)) => format!("{} workload at {}k stores/s", w.as_str(), r / 1000),
            (w, None) => format!("{} workload flat out", w.as_str()),
        };
        let memory = match self.contents {
            Contents::Empty => "empty memory (zero pages)",
            Contents::Full => "memory full of random data",
            Contents::Mixed => "mixed memory (zero, text and random pages)",
        };
        format!("{work}, {memory}")
    }
}

/// A guest size as `--memory` writes it, for file names: `256M`, `1G`.
fn size_tag(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{bytes}B")
    }
}

/// A guest size for people: `256 MiB`, `1 GiB`.
fn size_words(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", num(bytes as f64 / f64::from(1u32 << 20)))
    }
}

/// A link cap for people: `10 Gbit/s`, `uncapped`.
fn link_words(link: Link) -> String {
    match link.gbit_per_s() {
        Some(g) => format!("{} Gbit/s", num(g)),
        None => "uncapped".into(),
    }
}

/// A number with up to three significant digits and no trailing zeros.
fn num(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The cells one set of figures draws: one guest size, one load.
struct Set<'a> {
    memory: u64,
    load: Load,
    cells: Vec<&'a Summary>,
}

impl<'a> Set<'a> {
    /// One set per guest size, smallest first, each of its reference load.
    fn per_size(points: &'a [Summary]) -> Vec<Set<'a>> {
        let mut sizes: Vec<u64> = points.iter().map(|p| p.setting.memory_bytes).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
            .into_iter()
            .filter_map(|memory| {
                let at = points.iter().filter(|p| p.setting.memory_bytes == memory);
                let load = Load::reference(at.clone().map(Load::of))?;
                Some(Set::new(memory, load, at.filter(|p| Load::of(p) == load)))
            })
            .collect()
    }

    /// The cells of `load` at `memory`, the first of each link and method.
    fn new(memory: u64, load: Load, cells: impl IntoIterator<Item = &'a Summary>) -> Set<'a> {
        let mut set = Set {
            memory,
            load,
            cells: Vec::new(),
        };
        for p in cells {
            if set.get(p.setting.link, p.setting.variant).is_none() {
                set.cells.push(p);
            }
        }
        set
    }

    fn get(&self, link: Link, variant: Variant) -> Option<&'a Summary> {
        self.cells
            .iter()
            .copied()
            .find(|p| p.setting.link == link && p.setting.variant == variant)
    }

    /// The links measured, slowest first, uncapped last.
    fn links(&self) -> Vec<Link> {
        links(self.cells.iter().copied())
    }

    fn variants(&self) -> Vec<Variant> {
        variants(self.cells.iter().copied())
    }

    /// `256 MiB guest`.
    fn guest(&self) -> String {
        format!("{} guest", size_words(self.memory))
    }
}

/// The links of `points`, slowest first, uncapped last.
fn links<'a>(points: impl IntoIterator<Item = &'a Summary>) -> Vec<Link> {
    let mut l: Vec<Link> = points.into_iter().map(|p| p.setting.link).collect();
    l.sort_by_key(|l| l.bytes_per_s().unwrap_or(u64::MAX));
    l.dedup();
    l
}

/// The methods of `points`, in [`Variant::ALL`]'s order.
fn variants<'a>(points: impl IntoIterator<Item = &'a Summary> + Clone) -> Vec<Variant> {
    Variant::ALL
        .into_iter()
        .filter(|v| points.clone().into_iter().any(|p| p.setting.variant == *v))
        .collect()
}

/// What the legend says the marks are: `median of 3 runs, whiskers min to
/// max`.
fn runs_note<'a>(points: impl IntoIterator<Item = &'a Summary>) -> String {
    let mut runs: Vec<usize> = points.into_iter().map(|p| p.runs).collect();
    runs.sort_unstable();
    runs.dedup();
    match runs.as_slice() {
        [1] => "bar or point: the one run".into(),
        [n] => format!("bar or point: median of {n} runs; whiskers: min to max"),
        _ => "bar or point: median of the cell's runs; whiskers: min to max".into(),
    }
}

/// Draws every figure of `points` (one per cell) into `dir`; returns the
/// files written.
pub fn write(dir: &Path, points: &[Summary], schema: u32) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for set in Set::per_size(points) {
        files.push(paper(dir, &set)?);
        files.push(time_vs_link(dir, &set, schema)?);
        if let Some(f) = bytes_per_round(dir, &set)? {
            files.push(f);
        }
    }
    if let Some(f) = downtime_vs_size(dir, points)? {
        files.push(f);
    }
    Ok(files)
}

/// Redraws the figures of a directory `hpmig bench` wrote, from its
/// bench.json (of any schema [`BenchResults::read`] reads), without running
/// anything; returns the files written.
pub fn replot(dir: &Path) -> Result<Vec<PathBuf>> {
    let doc = BenchResults::read(&dir.join("bench.json"))?;
    let points: Vec<Summary> = doc.cells.iter().map(Cell::summary).collect();
    write(dir, &points, doc.schema)
}

/// What an axis counts, and how its ticks are written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    /// Bytes, in decimal units: `100 MB`.
    Bytes,
    /// Milliseconds: `250 ms`, `1.5 s`.
    Millis,
    /// Whole numbers (rounds).
    Count,
}

impl Unit {
    fn format(self, v: f64) -> String {
        if v == 0.0 {
            return "0".into();
        }
        match self {
            Unit::Bytes => {
                let (scale, unit) = [(1e9, "GB"), (1e6, "MB"), (1e3, "kB")]
                    .into_iter()
                    .find(|(s, _)| v >= s * 0.9999)
                    .unwrap_or((1.0, "B"));
                format!("{} {unit}", num(v / scale))
            }
            Unit::Millis if v >= 999.9 => format!("{} s", num(v / 1000.0)),
            Unit::Millis => format!("{} ms", num(v)),
            Unit::Count => format!("{v:.0}"),
        }
    }
}

/// The smallest of 1, 2, 5 × 10^k at or above `x` (> 0) ...
fn step_up(x: f64) -> f64 {
    let decade = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|s| *s >= x * 0.9999)
        .unwrap_or(10.0 * decade)
}

/// ... and the largest at or below it.
fn step_down(x: f64) -> f64 {
    let decade = 10f64.powf(x.log10().floor());
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|s| *s <= x * 1.0001)
        .unwrap_or(decade)
}

/// A value axis: linear from zero, or logarithmic (its coordinates are
/// then log10 of the values) where the values span more than [`LOG_SPAN`]×.
#[derive(Clone, Debug, PartialEq)]
struct Axis {
    unit: Unit,
    log: bool,
    /// The range and ticks, in the chart's coordinates.
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// An axis holding every finite, positive value of `values`.
    fn new(unit: Unit, values: impl IntoIterator<Item = f64>) -> Axis {
        let v: Vec<f64> = values
            .into_iter()
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        if v.is_empty() {
            return Axis::linear(unit, 1.0);
        }
        if unit == Unit::Count || max <= min * LOG_SPAN {
            return Axis::linear(unit, max);
        }
        let (lo, hi) = (step_down(min / 1.1), step_up(max * 1.1));
        let decades =
            || (lo.log10().floor() as i32..=hi.log10().ceil() as i32).map(|e| 10f64.powi(e));
        let mut ticks: Vec<f64> = decades().collect();
        if (hi / lo) < 1000.0 {
            // Fewer than three decades: 2 and 5 times each as well.
            ticks = decades().flat_map(|d| [d, 2.0 * d, 5.0 * d]).collect();
        } else {
            // The ends labelled too, so that the axis says where it stops.
            ticks.extend([lo, hi]);
            ticks.sort_by(f64::total_cmp);
            ticks.dedup_by(|a, b| (*a / *b - 1.0).abs() < 1e-9);
        }
        ticks.retain(|t| *t >= lo * 0.9999 && *t <= hi * 1.0001);
        Axis {
            unit,
            log: true,
            lo: lo.log10(),
            hi: hi.log10(),
            ticks: ticks.into_iter().map(f64::log10).collect(),
        }
    }

    /// From zero to above `max`, about five ticks (whole ones for counts).
    fn linear(unit: Unit, max: f64) -> Axis {
        let (hi, step) = if unit == Unit::Count {
            let hi = (max * 1.1).ceil().max(max + 1.0).max(1.0);
            (hi, (hi / 8.0).ceil().max(1.0))
        } else {
            let step = step_up(max * 1.1 / 5.0);
            ((max * 1.1 / step).ceil() * step, step)
        };
        let ticks = (0..)
            .map(|i| f64::from(i) * step)
            .take_while(|t| *t <= hi * 1.0001);
        Axis {
            unit,
            log: false,
            lo: 0.0,
            hi,
            ticks: ticks.collect(),
        }
    }

    /// A value in the chart's coordinates (NaN where the axis has none).
    fn pos(&self, v: f64) -> f64 {
        match (self.log, v > 0.0) {
            (false, _) => v,
            (true, true) => v.log10(),
            (true, false) => f64::NAN,
        }
    }

    fn label(&self, t: f64) -> String {
        self.unit.format(if self.log { 10f64.powf(t) } else { t })
    }

    fn desc(&self, what: &str) -> String {
        if self.log {
            format!("{what} (log scale)")
        } else {
            what.into()
        }
    }
}

/// A linear coordinate whose ticks are given: the groups' centres, the
/// rounds, an [`Axis`]'s ticks.
#[derive(Clone)]
struct Ticked {
    range: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(range: std::ops::Range<f64>, ticks: Vec<f64>) -> Ticked {
        Ticked {
            range: range.into(),
            ticks,
        }
    }
}

impl Ranged for Ticked {
    type ValueType = f64;
    // Every label is written by the chart's formatter.
    type FormatOption = DefaultFormatting;

    fn range(&self) -> std::ops::Range<f64> {
        self.range.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.range.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }
}

/// A chart of category groups or rounds across, values up.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Ticked, Ticked>>;

type Area<'b> = DrawingArea<SVGBackend<'b>, Shift>;

/// A chart on `area` with `x` across (ticks at `x_ticks`, written by
/// `x_label`) and `y` up.
#[allow(clippy::too_many_arguments)]
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    x: std::ops::Range<f64>,
    x_ticks: Vec<f64>,
    x_label: &dyn Fn(&f64) -> String,
    x_desc: &str,
    y: &Axis,
    y_desc: &str,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin_top(6)
        .margin_left(10)
        .margin_right(24)
        .margin_bottom(6)
        .x_label_area_size(52)
        .y_label_area_size(86)
        .build_cartesian_2d(
            Ticked::new(x, x_ticks),
            Ticked::new(y.lo..y.hi, y.ticks.clone()),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_label_formatter(x_label)
        .y_label_formatter(&|t| y.label(*t))
        .x_desc(x_desc)
        .y_desc(y.desc(y_desc))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// Diagonal hatching of the pixel rectangle `(x0, y0)..(x1, y1)` of `area`.
fn hatch(area: &Area<'_>, (x0, y0): (i32, i32), (x1, y1): (i32, i32), c: RGBColor) -> Result<()> {
    const STEP: i32 = 6;
    // Lines x + y = k, clipped to the rectangle.
    let mut k = x0 + y0 + STEP / 2;
    while k < x1 + y1 {
        let (xa, xb) = (x0.max(k - y1), x1.min(k - y0));
        if xa < xb {
            area.draw(&PathElement::new(vec![(xa, k - xa), (xb, k - xb)], c))
                .map_err(err)?;
        }
        k += STEP;
    }
    Ok(())
}

/// A bar from `(x0, y0)` to `(x1, y1)` in chart coordinates: filled, or
/// hollow (white, hatched, outlined) for a cell that did not converge.
fn bar(
    chart: &mut Chart<'_, '_>,
    (x0, y0): (f64, f64),
    (x1, y1): (f64, f64),
    c: RGBColor,
    hollow: bool,
) -> Result<()> {
    if !hollow {
        chart
            .draw_series([Rectangle::new([(x0, y0), (x1, y1)], c.filled())])
            .map_err(err)?;
        return Ok(());
    }
    chart
        .draw_series([Rectangle::new([(x0, y0), (x1, y1)], WHITE.filled())])
        .map_err(err)?;
    let area = chart.plotting_area();
    let base = area.get_base_pixel();
    let rel = |p: (i32, i32)| (p.0 - base.0, p.1 - base.1);
    let top_left = rel(chart.backend_coord(&(x0, y1)));
    let bottom_right = rel(chart.backend_coord(&(x1, y0)));
    hatch(&area.strip_coord_spec(), top_left, bottom_right, c)?;
    chart
        .draw_series([Rectangle::new([(x0, y0), (x1, y1)], c.stroke_width(2))])
        .map_err(err)?;
    Ok(())
}

/// A point: filled, or open for a cell that did not converge.
fn point(chart: &mut Chart<'_, '_>, at: (f64, f64), c: RGBColor, hollow: bool) -> Result<()> {
    let marks = if hollow {
        [
            Circle::new(at, 5, WHITE.filled()),
            Circle::new(at, 5, c.stroke_width(2)),
        ]
    } else {
        [
            Circle::new(at, 5, c.filled()),
            Circle::new(at, 5, c.filled()),
        ]
    };
    chart.draw_series(marks).map_err(err)?;
    Ok(())
}

/// A whisker from `lo` to `hi` at `x`, capped `half` either side.
fn whisker(chart: &mut Chart<'_, '_>, x: f64, half: f64, lo: f64, hi: f64) -> Result<()> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return Ok(());
    }
    let style = BLACK.stroke_width(1);
    chart
        .draw_series([
            PathElement::new(vec![(x, lo), (x, hi)], style),
            PathElement::new(vec![(x - half, lo), (x + half, lo)], style),
            PathElement::new(vec![(x - half, hi), (x + half, hi)], style),
        ])
        .map_err(err)?;
    Ok(())
}

/// One method's value in one group of a [`Grouped`] panel.
struct Mark {
    group: usize,
    variant: Variant,
    value: Spread,
    hollow: bool,
}

impl Mark {
    fn of(group: usize, p: &Summary, value: Spread) -> Mark {
        Mark {
            group,
            variant: p.setting.variant,
            value,
            hollow: !p.all_converged(),
        }
    }
}

/// A panel of categories (links, guest sizes) across, each a group with
/// one slot per method.
struct Grouped<'a> {
    caption: String,
    x_desc: &'a str,
    groups: Vec<String>,
    y_desc: &'a str,
    unit: Unit,
    variants: &'a [Variant],
    marks: Vec<Mark>,
}

impl Grouped<'_> {
    fn draw(&self, area: &Area<'_>) -> Result<()> {
        let axis = Axis::new(
            self.unit,
            self.marks
                .iter()
                .flat_map(|m| [m.value.min, m.value.median, m.value.max]),
        );
        let n = self.groups.len().max(1);
        let centers = (0..n).map(|i| i as f64 + 0.5).collect();
        let label = |x: &f64| {
            self.groups
                .get(x.floor() as usize)
                .cloned()
                .unwrap_or_default()
        };
        let mut chart = chart(
            area,
            &self.caption,
            0.0..n as f64,
            centers,
            &label,
            self.x_desc,
            &axis,
            self.y_desc,
        )?;
        let w = 0.84 / self.variants.len().max(1) as f64;
        for m in &self.marks {
            let k = self
                .variants
                .iter()
                .position(|v| *v == m.variant)
                .unwrap_or(0);
            let x0 = m.group as f64 + 0.08 + k as f64 * w + w * 0.08;
            let (x1, xc) = (x0 + w * 0.84, x0 + w * 0.42);
            let c = color(m.variant);
            let y = axis.pos(m.value.median);
            if !y.is_finite() {
                // No figure (QEMU's downtime of a migration it did not
                // finish, a blackout not measured): said, in the method's
                // colour, not drawn as zero.
                let style = TextStyle::from((FONT, 14).into_font())
                    .color(&c)
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                chart
                    .draw_series([Text::new("n/a", (xc, axis.lo), style)])
                    .map_err(err)?;
                continue;
            }
            if axis.log {
                whisker(
                    &mut chart,
                    xc,
                    w * 0.2,
                    axis.pos(m.value.min),
                    axis.pos(m.value.max),
                )?;
                point(&mut chart, (xc, y), c, m.hollow)?;
            } else {
                bar(&mut chart, (x0, 0.0), (x1, y), c, m.hollow)?;
                whisker(&mut chart, xc, w * 0.2, m.value.min, m.value.max)?;
            }
        }
        Ok(())
    }
}

/// A legend item: a method's colour or the hollow mark, and its words.
enum Key {
    Method(Variant),
    Hollow,
    Note(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Method(v) => v.name().into(),
            Key::Hollow => HOLLOW.into(),
            Key::Note(s) => s.clone(),
        }
    }

    /// Width in pixels, swatch included (a generous estimate: SVG fonts
    /// are the viewer's).
    fn width(&self) -> i32 {
        let text = (self.text().chars().count() as f64 * 17.0 * 0.5).ceil() as i32;
        match self {
            Key::Note(_) => text,
            _ => 24 + text,
        }
    }
}

/// The legend's keys for methods `vs`, the hollow key when some cell of
/// `points` did not converge, and `note`.
fn keys<'a>(
    vs: &[Variant],
    points: impl IntoIterator<Item = &'a Summary>,
    note: String,
) -> Vec<Key> {
    let mut keys: Vec<Key> = vs.iter().map(|v| Key::Method(*v)).collect();
    if points.into_iter().any(|p| !p.all_converged()) {
        keys.push(Key::Hollow);
    }
    keys.push(Key::Note(note));
    keys
}

/// Where each key goes in a strip `width` wide, wrapping; and the
/// strip's height.
fn layout(keys: &[Key], width: i32) -> (Vec<(i32, i32)>, i32) {
    const ROW: i32 = 24;
    let (mut x, mut y) = (16, 6);
    let mut at = Vec::new();
    for k in keys {
        if x > 16 && x + k.width() > width - 16 {
            (x, y) = (16, y + ROW);
        }
        at.push((x, y));
        x += k.width() + 22;
    }
    (at, y + ROW + 4)
}

/// Draws the legend strip.
fn legend(area: &Area<'_>, keys: &[Key]) -> Result<()> {
    let (at, _) = layout(keys, area.dim_in_pixel().0 as i32);
    let font = TextStyle::from((FONT, 17).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (k, &(x, y)) in keys.iter().zip(&at) {
        let (swatch, text_x) = ((x, y + 3), x + 24);
        match k {
            Key::Method(v) => {
                area.draw(&Rectangle::new(
                    [swatch, (x + 16, y + 17)],
                    color(*v).filled(),
                ))
                .map_err(err)?;
            }
            Key::Hollow => {
                hatch(area, swatch, (x + 16, y + 17), GREY)?;
                area.draw(&Rectangle::new(
                    [swatch, (x + 16, y + 17)],
                    GREY.stroke_width(2),
                ))
                .map_err(err)?;
            }
            Key::Note(_) => {}
        }
        let (tx, colour) = match k {
            Key::Note(_) => (x, GREY),
            _ => (text_x, BLACK),
        };
        area.draw(&Text::new(k.text(), (tx, y + 10), font.color(&colour)))
            .map_err(err)?;
    }
    Ok(())
}

/// A figure `width` wide with its title, subtitle and legend; returns the
/// root and the area below them for the panels, `body` high.
fn figure<'b>(
    path: &'b Path,
    width: u32,
    body: u32,
    title: &str,
    subtitle: &str,
    keys: &[Key],
) -> Result<(Area<'b>, Area<'b>)> {
    let (_, legend_h) = layout(keys, width as i32);
    let head = 66 + legend_h as u32;
    let root = SVGBackend::new(path, (width, head + body)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let center =
        |size| TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let mid = width as i32 / 2;
    root.draw(&Text::new(title.to_string(), (mid, 10), center(25)))
        .map_err(err)?;
    root.draw(&Text::new(
        subtitle.to_string(),
        (mid, 40),
        center(19).color(&GREY),
    ))
    .map_err(err)?;
    let (top, panels) = root.split_vertically(head);
    let (_, strip) = top.split_vertically(66);
    legend(&strip, keys)?;
    Ok((root, panels))
}

/// The panels' width: at least `each` per panel.
fn width_for(panels: usize, each: u32) -> u32 {
    (panels.max(1) as u32 * each).max(1000)
}

/// A metric a panel draws: its caption, its axis's name and unit, and the
/// figure of a cell.
type Metric = (&'static str, &'static str, Unit, fn(&Summary) -> Spread);

/// `paper-<size>.svg`: rounds, total time and data volume per method,
/// grouped by link cap.
fn paper(dir: &Path, set: &Set<'_>) -> Result<PathBuf> {
    let panels: Vec<Metric> = vec![
        (
            "rounds (stop-and-copy included)",
            "rounds",
            Unit::Count,
            |p| Spread {
                median: p.rounds,
                min: p.rounds,
                max: p.rounds,
            },
        ),
        ("total migration time", "total time", Unit::Millis, |p| {
            p.total_ms
        }),
        // Only runs on the shaped link counted the link's bytes; the others
        // (`--link-emulation cap`, bench.json before schema 2) hold each
        // tool's own count.
        if set.cells.iter().all(|p| p.link_counted_runs == p.runs) {
            ("bytes on the link", "bytes, both ways", Unit::Bytes, |p| {
                p.total_bytes
            })
        } else {
            (
                "bytes sent (each tool's own count)",
                "bytes",
                Unit::Bytes,
                |p| p.total_bytes,
            )
        },
    ];
    let title = "rounds, total time and data volume per method and link cap";
    by_link(dir, "paper", set, title, panels, String::new())
}

/// `time_vs_link-<size>.svg`: total time, downtime and the blackout (where
/// measured) per method, grouped by link cap.
fn time_vs_link(dir: &Path, set: &Set<'_>, schema: u32) -> Result<PathBuf> {
    // Schema 2 measures both tools' downtime on one clock; older files hold
    // each tool's own figure.
    let downtime = if schema >= 2 {
        "downtime (pause to run, one clock)"
    } else {
        "downtime (each tool's own figure)"
    };
    let mut panels: Vec<Metric> = vec![
        ("total migration time", "total time", Unit::Millis, |p| {
            p.total_ms
        }),
        (downtime, "downtime", Unit::Millis, |p| p.downtime_ms),
    ];
    let blackout = set.cells.iter().any(|p| p.blackout_ms.median.is_finite());
    let mut unmeasured = String::new();
    if blackout {
        panels.push((
            "blackout (as the guest saw it)",
            "blackout",
            Unit::Millis,
            |p| p.blackout_ms,
        ));
    } else {
        unmeasured.push_str("; guest blackout not measured in these runs");
    }
    let title = "migration time and downtime per method and link cap";
    by_link(dir, "time_vs_link", set, title, panels, unmeasured)
}

/// `<name>-<size>.svg`: one panel per metric, side by side, each with the
/// set's methods grouped by link cap; `title` follows the guest size and
/// `note` the legend's note on the runs.
fn by_link(
    dir: &Path,
    name: &str,
    set: &Set<'_>,
    title: &str,
    panels: Vec<Metric>,
    note: String,
) -> Result<PathBuf> {
    let path = dir.join(format!("{name}-{}.svg", size_tag(set.memory)));
    let (ls, vs) = (set.links(), set.variants());
    let note = runs_note(set.cells.iter().copied()) + &note;
    let keys = keys(&vs, set.cells.iter().copied(), note);
    let (root, body) = figure(
        &path,
        width_for(panels.len(), 520),
        470,
        &format!("{}: {title}", set.guest()),
        &set.load.words(),
        &keys,
    )?;
    let n = panels.len();
    for ((caption, y_desc, unit, f), area) in panels.into_iter().zip(body.split_evenly((1, n))) {
        let marks = ls
            .iter()
            .enumerate()
            .flat_map(|(g, &l)| {
                vs.iter()
                    .filter_map(move |&v| set.get(l, v).map(|p| Mark::of(g, p, f(p))))
            })
            .collect();
        Grouped {
            caption: caption.into(),
            x_desc: "link cap",
            // A link cap no run reached is not that link's result: say so.
            groups: ls
                .iter()
                .map(|&l| {
                    let cpu = set
                        .cells
                        .iter()
                        .any(|p| p.setting.link == l && p.cpu_bound_runs > 0);
                    link_words(l) + if cpu { " (CPU-bound)" } else { "" }
                })
                .collect(),
            y_desc,
            unit,
            variants: &vs,
            marks,
        }
        .draw(&area)?;
    }
    root.present().map_err(err)?;
    Ok(path.clone())
}

/// `bytes_per_round-<size>.svg`: each round's bytes per hpmig method, one
/// panel per link cap (none when only QEMU, which reports no rounds, ran).
fn bytes_per_round(dir: &Path, set: &Set<'_>) -> Result<Option<PathBuf>> {
    let series: Vec<&Summary> = set
        .cells
        .iter()
        .copied()
        .filter(|p| !p.bytes_per_round.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(None);
    }
    let path = dir.join(format!("bytes_per_round-{}.svg", size_tag(set.memory)));
    let ls = links(series.iter().copied());
    let vs = variants(series.iter().copied());
    let axis = Axis::new(
        Unit::Bytes,
        series
            .iter()
            .flat_map(|p| p.bytes_per_round.iter().map(|&b| b as f64)),
    );
    let rounds = series
        .iter()
        .map(|p| p.bytes_per_round.len())
        .max()
        .unwrap_or(1);
    let cols = ls.len().min(2);
    let rows = ls.len().div_ceil(2);
    let note =
        "each line: the run with the median total bytes; the last round is the stop-and-copy";
    let keys = keys(&vs, series.iter().copied(), note.into());
    let (root, body) = figure(
        &path,
        width_for(cols, 640),
        380 * rows as u32,
        &format!("{}: bytes sent in each round, per link cap", set.guest()),
        &set.load.words(),
        &keys,
    )?;
    let ticks = (1..=rounds).map(|r| r as f64).collect::<Vec<_>>();
    let label = |x: &f64| format!("{x:.0}");
    for (link, area) in ls.iter().zip(body.split_evenly((rows, cols))) {
        let mut chart = chart(
            &area,
            &format!("link: {}", link_words(*link)),
            0.5..rounds as f64 + 0.5,
            ticks.clone(),
            &label,
            "round",
            &axis,
            "bytes sent",
        )?;
        for p in series.iter().filter(|p| p.setting.link == *link) {
            let c = color(p.setting.variant);
            let pts: Vec<(f64, f64)> = p
                .bytes_per_round
                .iter()
                .enumerate()
                .map(|(i, &b)| ((i + 1) as f64, axis.pos(b as f64)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            let hollow = !p.all_converged();
            if hollow {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 8, 5, c.stroke_width(2)))
                    .map_err(err)?;
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(err)?;
            }
            for at in pts {
                point(&mut chart, at, c, hollow)?;
            }
        }
    }
    root.present().map_err(err)?;
    Ok(Some(path.clone()))
}

/// `downtime_vs_size.svg`: downtime and blackout (where measured) per
/// method, grouped by guest size, one column per link cap; drawn for the
/// reference load among those measured at more than one size, at the links
/// measured at more than one size.
fn downtime_vs_size(dir: &Path, points: &[Summary]) -> Result<Option<PathBuf>> {
    let sizes_of = |load: Load| {
        let mut s: Vec<u64> = points
            .iter()
            .filter(|p| Load::of(p) == load)
            .map(|p| p.setting.memory_bytes)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let Some(load) = Load::reference(
        points
            .iter()
            .map(Load::of)
            .filter(|l| sizes_of(*l).len() > 1),
    ) else {
        return Ok(None);
    };
    let sizes = sizes_of(load);
    let sets: Vec<Set<'_>> = sizes
        .iter()
        .map(|&m| {
            Set::new(
                m,
                load,
                points
                    .iter()
                    .filter(|p| p.setting.memory_bytes == m && Load::of(p) == load),
            )
        })
        .collect();
    let all: Vec<&Summary> = sets.iter().flat_map(|s| s.cells.iter().copied()).collect();
    let ls: Vec<Link> = links(all.iter().copied())
        .into_iter()
        .filter(|l| sets.iter().filter(|s| s.links().contains(l)).count() > 1)
        .collect();
    if ls.is_empty() {
        return Ok(None);
    }
    let at_links: Vec<&Summary> = all
        .iter()
        .copied()
        .filter(|p| ls.contains(&p.setting.link))
        .collect();
    let vs = variants(at_links.iter().copied());
    let mut metrics: Vec<Metric> = vec![("downtime", "downtime", Unit::Millis, |p| p.downtime_ms)];
    let blackout = at_links.iter().any(|p| p.blackout_ms.median.is_finite());
    let mut note = runs_note(at_links.iter().copied());
    if blackout {
        metrics.push(("blackout", "blackout", Unit::Millis, |p| p.blackout_ms));
    } else {
        note.push_str("; guest blackout not measured in these runs");
    }
    let path = dir.join("downtime_vs_size.svg");
    let keys = keys(&vs, at_links.iter().copied(), note);
    let title = if blackout {
        "Downtime and blackout against guest size"
    } else {
        "Downtime against guest size"
    };
    let (root, body) = figure(
        &path,
        width_for(ls.len(), 480),
        400 * metrics.len() as u32,
        &format!("{title}, per method and link cap"),
        &load.words(),
        &keys,
    )?;
    let areas = body.split_evenly((metrics.len(), ls.len()));
    for (i, area) in areas.iter().enumerate() {
        let ((what, y_desc, unit, f), link) = (metrics[i / ls.len()], ls[i % ls.len()]);
        let marks = sets
            .iter()
            .enumerate()
            .flat_map(|(g, s)| {
                vs.iter()
                    .filter_map(move |&v| s.get(link, v).map(|p| Mark::of(g, p, f(p))))
            })
            .collect();
        Grouped {
            caption: format!("{what}, link: {}", link_words(link)),
            x_desc: "guest size",
            groups: sizes.iter().map(|m| size_words(*m)).collect(),
            y_desc,
            unit,
            variants: &vs,
            marks,
        }
        .draw(area)?;
    }
    root.present().map_err(err)?;
    Ok(Some(path.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Setting;

    fn point(memory: u64, link: Link, variant: Variant, scale: f64) -> Summary {
        let around = |median: f64| Spread {
            median,
            min: median * 0.9,
            max: median * 1.2,
        };
        Summary {
            setting: Setting {
                memory_bytes: memory,
                workload: Workload::Sparse,
                contents: Contents::Full,
                dirty_rate: Some(100_000),
                link,
                variant,
            },
            runs: 3,
            rounds: 2.0 * scale.sqrt().round(),
            total_bytes: around(1e6 * scale),
            total_ms: around(200.0 * scale),
            downtime_ms: around(90.0 * scale),
            blackout_ms: around(95.0 * scale),
            converged_runs: 3,
            progress: 1.0,
            bytes_per_round: if variant.is_qemu() {
                Vec::new()
            } else {
                vec![(1e6 * scale) as u64, (1e4 * scale) as u64]
            },
            brownout: 1.0,
            cpu_bound_runs: 0,
            link_counted_runs: 3,
        }
    }

    /// A matrix at `sizes`: page, segment and QEMU xbzrle at 1 and 10
    /// Gbit/s.
    fn matrix(sizes: &[u64]) -> Vec<Summary> {
        let mut points = Vec::new();
        for &m in sizes {
            for link in [Link::gbit(1), Link::gbit(10)] {
                for (variant, scale) in [
                    (Variant::Page, 100.0),
                    (Variant::Segment, 1.0),
                    (Variant::QemuXbzrle, 30.0),
                ] {
                    points.push(point(m, link, variant, scale * (m >> 28) as f64));
                }
            }
        }
        points
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hpmig-plots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn done(dir: &Path) {
        if std::env::var_os("HPMIG_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// `svg` has a text element saying exactly `text`.
    fn says(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{text}\n</text>"))
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// A shape of `variant`'s colour that is outlined but not filled with it.
    fn hollow_mark(svg: &str, variant: Variant) -> bool {
        let RGBColor(r, g, b) = color(variant);
        let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
        svg.lines().any(|l| {
            (l.starts_with("<rect") || l.starts_with("<circle"))
                && l.contains("fill=\"none\"")
                && l.contains(&stroke)
        })
    }

    #[test]
    fn every_figure_names_every_link_and_method() {
        let dir = scratch("links");
        let files = write(&dir, &matrix(&[256 << 20]), crate::results::SCHEMA).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "paper-256M.svg",
                "time_vs_link-256M.svg",
                "bytes_per_round-256M.svg"
            ],
            "one size: no figure against size"
        );
        for f in &files {
            let svg = std::fs::read_to_string(f).unwrap();
            for link in ["1 Gbit/s", "10 Gbit/s"] {
                assert!(svg.contains(link), "{} lacks {link}", f.display());
            }
            for v in ["page", "segment"] {
                assert!(says(&svg, v), "{} lacks {v}", f.display());
            }
            assert!(
                svg.contains("memory full of random data"),
                "{}",
                f.display()
            );
            assert!(
                !svg.contains(HOLLOW),
                "{}: everything converged",
                f.display()
            );
        }
        let paper = read(&dir, "paper-256M.svg");
        assert!(says(&paper, "qemu-xbzrle"), "QEMU is in the legend");
        assert!(paper.contains("median of 3 runs; whiskers: min to max"));
        // Human units on the value axes; no raw byte counts or fractional rounds.
        for tick in ["1 MB", "1 s", "100 ms"] {
            assert!(says(&paper, tick), "paper lacks the tick {tick}");
        }
        assert!(
            !paper.contains("100000000") && !paper.contains(".00\n"),
            "{paper}"
        );
        done(&dir);
    }

    #[test]
    fn a_cell_that_did_not_converge_is_hollow_and_the_legend_says_so() {
        let dir = scratch("hollow");
        let mut points = matrix(&[256 << 20]);
        // Page at 1 Gbit/s force-stopped in two runs of three.
        points[0].converged_runs = 1;
        write(&dir, &points, crate::results::SCHEMA).unwrap();
        for name in [
            "paper-256M.svg",
            "time_vs_link-256M.svg",
            "bytes_per_round-256M.svg",
        ] {
            let svg = read(&dir, name);
            assert!(svg.contains(HOLLOW), "{name} lacks the legend entry");
            assert!(
                hollow_mark(&svg, Variant::Page),
                "{name}: page is not hollow"
            );
            assert!(
                !hollow_mark(&svg, Variant::Segment),
                "{name}: segment converged"
            );
        }

        // Everything converged: nothing hollow.
        points[0].converged_runs = 3;
        write(&dir, &points, crate::results::SCHEMA).unwrap();
        for name in ["paper-256M.svg", "time_vs_link-256M.svg"] {
            let svg = read(&dir, name);
            assert!(
                !svg.contains(HOLLOW) && !hollow_mark(&svg, Variant::Page),
                "{name}"
            );
        }
        done(&dir);
    }

    #[test]
    fn two_sizes_draw_two_sets_with_their_size_and_one_against_size() {
        let dir = scratch("sizes");
        let files = write(&dir, &matrix(&[256 << 20, 1 << 30]), crate::results::SCHEMA).unwrap();
        assert_eq!(files.len(), 7, "{files:?}");
        for (tag, size, other) in [
            ("256M", "256 MiB guest", "1 GiB"),
            ("1G", "1 GiB guest", "256 MiB"),
        ] {
            for figure in ["paper", "time_vs_link", "bytes_per_round"] {
                let svg = read(&dir, &format!("{figure}-{tag}.svg"));
                assert!(svg.contains(size), "{figure}-{tag} lacks {size}");
                assert!(!svg.contains(other), "{figure}-{tag} names {other}");
            }
        }
        let sizes = read(&dir, "downtime_vs_size.svg");
        for text in [
            "256 MiB",
            "1 GiB",
            "blackout, link: 10 Gbit/s",
            "guest size",
        ] {
            assert!(says(&sizes, text), "downtime_vs_size lacks {text}");
        }
        done(&dir);
    }

    #[test]
    fn log_axes_only_where_the_range_needs_them_and_from_the_data() {
        let narrow = Axis::new(Unit::Millis, [200.0, 900.0]);
        assert!(!narrow.log);
        assert_eq!((narrow.lo, narrow.ticks[1]), (0.0, 200.0));
        let wide = Axis::new(Unit::Bytes, [1496.0, 2.5e9]);
        assert!(wide.log);
        assert_eq!(
            wide.label(wide.lo),
            "1 kB",
            "starts below the data, not at 1 B"
        );
        let labels: Vec<String> = wide.ticks.iter().map(|t| wide.label(*t)).collect();
        assert_eq!(
            labels,
            ["1 kB", "10 kB", "100 kB", "1 MB", "10 MB", "100 MB", "1 GB", "5 GB"]
        );
        let rounds = Axis::new(Unit::Count, [2.0, 12.0]);
        assert!(!rounds.log && rounds.ticks.iter().all(|t| t.fract() == 0.0));
        assert_eq!(Unit::Bytes.format(1e8), "100 MB");
        assert_eq!(Unit::Millis.format(16_100.0), "16.1 s");
        assert_eq!(size_tag(256 << 20), "256M");
        assert_eq!(size_words(1 << 30), "1 GiB");
    }

    #[test]
    fn replot_draws_an_old_bench_json_as_empty_memory() {
        let dir = scratch("replot");
        let old = r#"{"cells":[{"memory_bytes":268435456,"workload":"sparse","dirty_rate":100000,
            "link":"1Gbit","variant":"page","runs":[{"rounds":8,"bytes_per_round":[100,10],
            "ms_per_round":[],"total_bytes":110,"total_ms":20000.0,"downtime_ms":null,
            "verify_ms":0.0,"converged":false,"guest_progress":0.9,
            "guest_writes_per_s_before":1000.0}]}]}"#;
        std::fs::write(dir.join("bench.json"), old).unwrap();
        let files = replot(&dir).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        let paper = read(&dir, "paper-256M.svg");
        assert!(paper.contains("empty memory"), "{paper}");
        assert!(says(&paper, HOLLOW), "{paper}");
        let times = read(&dir, "time_vs_link-256M.svg");
        assert!(says(&times, "n/a"), "no downtime: said, not drawn as 0");
        done(&dir);
    }
}
