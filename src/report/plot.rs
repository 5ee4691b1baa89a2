//! Line charts and histograms rendered to PNG with a built-in bitmap font: enough for
//! experiment reports, no plotting library or font files needed.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::font;

const WIDTH: usize = 900;
const HEIGHT: usize = 520;
const LEFT: usize = 96;
const RIGHT: usize = 24;
const TOP: usize = 76;
const BOTTOM: usize = 64;
const PALETTE: [[u8; 3]; 5] = [[31, 119, 180], [230, 110, 10], [44, 160, 44], [214, 39, 40], [148, 103, 189]];
const BLACK: [u8; 3] = [20, 20, 20];
const GRID: [u8; 3] = [225, 225, 225];

/// One named line of (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw y = 0 (and keep it in range): the reference level for "change vs reference".
    pub zero_line: bool,
}

/// Writes `chart` as a PNG (atomically: temp file, then rename).
pub fn line_chart_png(chart: &Chart, path: &Path) -> Result<()> {
    let points: Vec<(f64, f64)> = chart.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if points.is_empty() {
        bail!("{}: nothing to plot", path.display());
    }
    let (mut y_min, mut y_max) = min_max(points.iter().map(|p| p.1));
    if chart.zero_line {
        y_min = y_min.min(0.0);
        y_max = y_max.max(0.0);
    }
    let frame = Frame::new(min_max(points.iter().map(|p| p.0)), (y_min, y_max));
    let mut canvas = Canvas::new();
    frame.draw_axes(&mut canvas, &chart.title, &chart.x_label, &chart.y_label);
    if chart.zero_line {
        let y = frame.py(0.0);
        canvas.line(frame.left as f64, y, frame.right as f64, y, [120, 120, 120], 0);
    }
    for (i, series) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mapped: Vec<(f64, f64)> = series.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| (frame.px(x), frame.py(y))).collect();
        for w in mapped.windows(2) {
            canvas.line(w[0].0, w[0].1, w[1].0, w[1].1, color, 1);
        }
        if mapped.len() == 1 {
            canvas.rect(mapped[0].0 as usize - 2, mapped[0].1 as usize - 2, 5, 5, color);
        }
        // Legend: one row between the title and the plot, so it never hides a line.
        let offset: usize = chart.series[..i].iter().map(|s| 48 + s.label.chars().count() * (font::WIDTH + 1) * 2 + 24).sum();
        let (lx, ly) = (frame.left + offset, 40);
        canvas.line(lx as f64, ly as f64 + 6.0, lx as f64 + 36.0, ly as f64 + 6.0, color, 1);
        canvas.text(lx + 48, ly, &series.label, 2, BLACK);
    }
    canvas.save(path)
}

/// Writes a histogram of `values` over `bins` equal bins spanning their range.
pub fn histogram_png(title: &str, x_label: &str, values: &[f64], bins: usize, path: &Path) -> Result<()> {
    let counts = histogram(values, bins);
    if counts.is_empty() {
        bail!("{}: nothing to plot", path.display());
    }
    let (lo, hi) = (counts[0].0, counts[counts.len() - 1].1);
    let top = counts.iter().map(|c| c.2 as f64).fold(0.0, f64::max);
    let frame = Frame::new((lo, hi), (0.0, top.max(1.0)));
    let mut canvas = Canvas::new();
    frame.draw_axes(&mut canvas, title, x_label, "pairs");
    for &(a, b, n) in &counts {
        let (x0, x1) = (frame.px(a).round() as usize, frame.px(b).round() as usize);
        let (y, base) = (frame.py(n as f64).round() as usize, frame.py(0.0).round() as usize);
        let width = x1.saturating_sub(x0).max(2) - 1;
        canvas.rect(x0 + 1, y, width, base.saturating_sub(y), PALETTE[0]);
    }
    canvas.save(path)
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

/// A tick spacing of 1, 2 or 5 × 10^k giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 { 1.0 } else if fraction <= 2.0 { 2.0 } else if fraction <= 5.0 { 5.0 } else { 10.0 };
    nice * magnitude
}

fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10()).ceil() as usize };
    let text = format!("{value:.decimals$}");
    if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') { "0".into() } else { text }
}

/// The data-to-pixel mapping of the plot area.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
}

impl Frame {
    fn new(x: (f64, f64), y: (f64, f64)) -> Self {
        let widen = |(lo, hi): (f64, f64), pad: f64| {
            if hi > lo { (lo - (hi - lo) * pad, hi + (hi - lo) * pad) } else { (lo - 1.0, hi + 1.0) }
        };
        Frame { x: widen(x, 0.0), y: widen(y, 0.06), left: LEFT, right: WIDTH - RIGHT, top: TOP, bottom: HEIGHT - BOTTOM }
    }

    fn px(&self, x: f64) -> f64 {
        self.left as f64 + (x - self.x.0) / (self.x.1 - self.x.0) * (self.right - self.left) as f64
    }

    fn py(&self, y: f64) -> f64 {
        self.bottom as f64 - (y - self.y.0) / (self.y.1 - self.y.0) * (self.bottom - self.top) as f64
    }

    fn draw_axes(&self, canvas: &mut Canvas, title: &str, x_label: &str, y_label: &str) {
        canvas.text(self.left, 12, title, 2, BLACK);
        canvas.text(self.left, self.top - 14, y_label, 1, BLACK);
        let label_width = x_label.chars().count() * (font::WIDTH + 1) * 2;
        canvas.text((self.left + self.right).saturating_sub(label_width) / 2, HEIGHT - 24, x_label, 2, BLACK);
        for (axis, (lo, hi)) in [(0, self.x), (1, self.y)] {
            let step = nice_step(hi - lo, if axis == 0 { 8.0 } else { 6.0 });
            let mut tick = (lo / step).ceil() * step;
            while tick <= hi + step * 1e-9 {
                let label = tick_label(tick, step);
                let width = label.chars().count() * (font::WIDTH + 1) * 2;
                if axis == 0 {
                    let x = self.px(tick);
                    canvas.line(x, self.top as f64, x, self.bottom as f64, GRID, 0);
                    canvas.text((x as usize).saturating_sub(width / 2), self.bottom + 8, &label, 2, BLACK);
                } else {
                    let y = self.py(tick);
                    canvas.line(self.left as f64, y, self.right as f64, y, GRID, 0);
                    canvas.text(self.left.saturating_sub(width + 8), (y as usize).saturating_sub(7), &label, 2, BLACK);
                }
                tick += step;
            }
        }
        let (l, r, t, b) = (self.left as f64, self.right as f64, self.top as f64, self.bottom as f64);
        for (x0, y0, x1, y1) in [(l, b, r, b), (l, t, l, b), (l, t, r, t), (r, t, r, b)] {
            canvas.line(x0, y0, x1, y1, BLACK, 0);
        }
    }
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas { pixels: vec![255; WIDTH * HEIGHT * 3] }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, color: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx as i64, yy as i64, color);
            }
        }
    }

    /// A straight line; `radius` > 0 draws it thicker (a square brush).
    fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, color: [u8; 3], radius: i64) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in -radius..=radius {
                for dy in -radius..=radius {
                    self.set(x + dx, y + dy, color);
                }
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let glyph = font::glyph(c);
            let left = x + i * (font::WIDTH + 1) * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..font::WIDTH {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(left + col * scale, y + row * scale, scale, scale, color);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("png.tmp");
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().with_context(|| format!("writing {}", path.display()))?;
        writer.write_image_data(&self.pixels).with_context(|| format!("writing {}", path.display()))?;
        writer.finish().with_context(|| format!("writing {}", path.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::{histogram, nice_step, tick_label};

    #[test]
    fn ticks_and_bins() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(0.7, 6.0), 0.2);
        assert_eq!(tick_label(-0.0000001, 0.5), "0");
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        let h = histogram(&[0.0, 0.1, 0.1, 0.9, 1.0, f64::NAN], 2);
        assert_eq!(h.iter().map(|b| b.2).collect::<Vec<_>>(), vec![3, 2]);
        assert!(histogram(&[], 4).is_empty());
    }
}
