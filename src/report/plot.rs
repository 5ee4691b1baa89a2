//! Line charts and histograms rendered to PNG with plotters. Text is set in DejaVu Sans,
//! embedded in the binary, so a machine without system fonts or fontconfig draws the same plots.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const WIDTH: u32 = 900;
const HEIGHT: u32 = 520;
/// The family plotters' own defaults ask for, so every piece of text gets the embedded font.
const FONT: &str = "sans-serif";
const FONT_DATA: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 110, 10),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];
const ZERO_LINE: RGBColor = RGBColor(110, 110, 110);

/// One named line of (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: one line per series, a legend naming them, titled axes.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw y = 0 (and keep it in range): the reference level for "change vs reference".
    pub zero_line: bool,
}

/// Any drawing failure of plotters, whose error types differ by backend and element.
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Writes `chart` as a PNG (atomically: temp file, then rename). Points that are not finite are
/// skipped; a chart with none left is refused.
pub fn line_chart_png(chart: &Chart, path: &Path) -> Result<()> {
    let finite =
        |s: &Series| s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect::<Vec<_>>();
    let series: Vec<(&str, Vec<(f64, f64)>)> = chart.series.iter().map(|s| (s.label.as_str(), finite(s))).collect();
    let points: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if points.is_empty() {
        bail!("{}: nothing to plot (no finite points)", path.display());
    }
    let (mut y_min, mut y_max) = min_max(points.iter().map(|p| p.1));
    if chart.zero_line {
        y_min = y_min.min(0.0);
        y_max = y_max.max(0.0);
    }
    let x = padded(min_max(points.iter().map(|p| p.0)), 0.0);
    let y = padded((y_min, y_max), 0.06);
    let legend_at = emptiest_corner(&points, &x, &y);
    render(path, |area| {
        let mut plot = axes(area, &chart.title, &chart.x_label, &chart.y_label, x.clone(), y.clone())?;
        if chart.zero_line {
            plot.draw_series(LineSeries::new([(x.start, 0.0), (x.end, 0.0)], ZERO_LINE.stroke_width(1)))?;
        }
        for (i, (label, points)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // A lone point has no segment to draw: mark it.
            let marker = if points.len() == 1 { 3 } else { 0 };
            plot.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(marker))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        }
        plot.configure_series_labels()
            .position(legend_at)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        Ok(())
    })
}

/// Writes a histogram of `values` over `bins` equal bins spanning their range (atomically).
/// Values that are not finite are skipped; none left (or no bins) is refused.
pub fn histogram_png(title: &str, x_label: &str, values: &[f64], bins: usize, path: &Path) -> Result<()> {
    let counts = histogram(values, bins);
    if counts.is_empty() {
        bail!("{}: nothing to plot (no finite values)", path.display());
    }
    let (lo, hi) = (counts[0].0, counts[counts.len() - 1].1);
    let top = counts.iter().map(|c| c.2 as f64).fold(1.0, f64::max);
    render(path, |area| {
        let mut plot = axes(area, title, x_label, "pairs", lo..hi, 0.0..top * 1.06)?;
        let fill = PALETTE[0].filled();
        plot.draw_series(counts.iter().map(|&(a, b, n)| Rectangle::new([(a, 0.0), (b, n as f64)], fill)))?;
        // A thin white edge keeps neighbouring bars apart.
        plot.draw_series(
            counts.iter().map(|&(a, b, n)| Rectangle::new([(a, 0.0), (b, n as f64)], WHITE.stroke_width(1))),
        )?;
        Ok(())
    })
}

/// `bins` equal bins over the values' range: (low, high, count).
pub fn histogram(values: &[f64], bins: usize) -> Vec<(f64, f64, usize)> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() || bins == 0 {
        return Vec::new();
    }
    let (lo, mut hi) = min_max(finite.iter().copied());
    if hi <= lo {
        hi = lo + 1.0;
    }
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in finite {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    counts.into_iter().enumerate().map(|(i, n)| (lo + i as f64 * width, lo + (i + 1) as f64 * width, n)).collect()
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// The range widened by `pad` of its span on each side; a single value gets ±1.
fn padded((lo, hi): (f64, f64), pad: f64) -> Range<f64> {
    if hi > lo { lo - (hi - lo) * pad..hi + (hi - lo) * pad } else { lo - 1.0..hi + 1.0 }
}

/// The corner of the plot with the fewest points near it, where the legend hides least.
fn emptiest_corner(points: &[(f64, f64)], x: &Range<f64>, y: &Range<f64>) -> SeriesLabelPosition {
    // The legend covers about the outer third of the width and quarter of the height.
    let near = |value: f64, range: &Range<f64>, low_end: bool, share: f64| {
        let t = (value - range.start) / (range.end - range.start);
        if low_end { t <= share } else { t >= 1.0 - share }
    };
    let crowding = |left: bool, bottom: bool| {
        points.iter().filter(|p| near(p.0, x, left, 0.35) && near(p.1, y, bottom, 0.3)).count()
    };
    let corners = [
        (crowding(true, false), SeriesLabelPosition::UpperLeft),
        (crowding(false, false), SeriesLabelPosition::UpperRight),
        (crowding(true, true), SeriesLabelPosition::LowerLeft),
        (crowding(false, true), SeriesLabelPosition::LowerRight),
    ];
    // min_by_key keeps the first of equals: upper left when nothing tells the corners apart.
    corners.into_iter().min_by_key(|c| c.0).map(|c| c.1).unwrap_or(SeriesLabelPosition::UpperLeft)
}

type Plot<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The title, the frame with its grid, tick labels and axis titles.
fn axes<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    x: Range<f64>,
    y: Range<f64>,
) -> std::result::Result<Plot<'a, 'b>, Box<dyn std::error::Error>> {
    let (x_ticks, y_ticks) = (tick_format(&x), tick_format(&y));
    let mut plot = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(18)
        .x_label_area_size(52)
        .y_label_area_size(80)
        .build_cartesian_2d(x.clone(), y.clone())?;
    plot.configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&x_ticks)
        .y_label_formatter(&y_ticks)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .x_labels(9)
        .y_labels(7)
        .draw()?;
    Ok(plot)
}

/// Tick labels with the decimals the axis' span needs: "250" and "0.05", not "250.0" and "0.05000".
fn tick_format(range: &Range<f64>) -> impl Fn(&f64) -> String {
    // plotters puts at most about ten ticks on an axis, 1, 2 or 5 × 10^k apart; a hundredth
    // of the span leaves a decimal to spare.
    let decimals = (-((range.end - range.start) / 100.0).log10()).ceil().max(0.0) as usize;
    move |value| {
        let text = format!("{value:.decimals$}");
        let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
        if text == "-0" { "0".to_string() } else { text.to_string() }
    }
}

/// Draws on a white canvas with `draw`, then writes it as a PNG at `path` (temp file, then rename).
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> DrawResult,
) -> Result<()> {
    embedded_font()?;
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&area)
            .and_then(|()| Ok(area.present()?))
            .map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    }
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().with_context(|| format!("writing {}", path.display()))?;
    writer.write_image_data(&pixels).with_context(|| format!("writing {}", path.display()))?;
    writer.finish().with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Registers the embedded font with plotters, once per process.
fn embedded_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, FONT_DATA).is_ok()) {
        Ok(())
    } else {
        bail!("the embedded plot font (assets/fonts/DejaVuSans.ttf) is not a valid TrueType font")
    }
}
