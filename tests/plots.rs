//! Report plots (src/report/plot.rs): the PNGs decode to the expected size with lines, bars and
//! text on them; input with nothing to plot is refused, naming the file.

use std::path::Path;

use prefhost::report::plot::histogram;
use prefhost::report::{Chart, Series, histogram_png, line_chart_png};

/// Width, height and RGB pixels of a PNG, checked to be 8-bit RGB.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buffer).unwrap();
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight), "{}", path.display());
    let pixels = buffer[..info.buffer_size()].chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
    (info.width, info.height, pixels)
}

fn count(pixels: &[[u8; 3]], keep: impl Fn(i32, i32, i32) -> bool) -> usize {
    pixels.iter().filter(|p| keep(p[0] as i32, p[1] as i32, p[2] as i32)).count()
}

fn blue(r: i32, _g: i32, b: i32) -> bool {
    b > r + 80
}

fn orange(r: i32, _g: i32, b: i32) -> bool {
    r > b + 120
}

fn dark(r: i32, g: i32, b: i32) -> bool {
    r.max(g).max(b) < 90
}

fn chart(series: Vec<Series>) -> Chart {
    Chart {
        title: "log p(chosen) - log p_ref(chosen)".into(),
        x_label: "step".into(),
        y_label: "nats per completion".into(),
        series,
        zero_line: true,
    }
}

#[test]
fn line_chart_has_both_lines_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chart.png");
    let falling = Series { label: "dpo".into(), points: (0..=50).map(|s| (s as f64, -0.1 * s as f64)).collect() };
    let rising = Series {
        label: "ipo".into(),
        points: (0..=50).map(|s| (s as f64, if s == 20 { f64::NAN } else { 0.02 * s as f64 })).collect(),
    };
    line_chart_png(&chart(vec![falling, rising]), &path).unwrap();
    let (width, height, pixels) = decode(&path);
    assert_eq!((width, height), (900, 520));
    let drawn = count(&pixels, |r, g, b| r.min(g).min(b) < 250);
    assert!(drawn > pixels.len() / 100 && drawn < pixels.len() / 2, "{drawn} of {} pixels drawn", pixels.len());
    assert!(count(&pixels, blue) > 200, "first series' line");
    assert!(count(&pixels, orange) > 200, "second series' line");
    // The title is text near the top: dark pixels in the first 50 rows.
    assert!(count(&pixels[..50 * width as usize], dark) > 100, "title drawn");
    assert!(!dir.path().join("chart.png.tmp").exists(), "temp file renamed");
}

#[test]
fn histogram_has_bars() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hist.png");
    let values: Vec<f64> = (0..400).map(|i| ((i * 37) % 100) as f64 / 100.0).collect();
    histogram_png("normalised edit distance (tokens), 400 pairs", "chosen vs rejected", &values, 20, &path).unwrap();
    let (width, height, pixels) = decode(&path);
    assert_eq!((width, height), (900, 520));
    // Even bars over most of the plot: a large share of the image is bar colour.
    assert!(count(&pixels, blue) > pixels.len() / 5, "bars drawn");
    assert!(count(&pixels, dark) > 500, "labels drawn");
}

#[test]
fn nothing_to_plot_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    let not_finite = Series { label: "nan".into(), points: vec![(0.0, f64::NAN), (f64::INFINITY, 1.0)] };
    let empty = Series { label: "empty".into(), points: Vec::new() };
    let e = line_chart_png(&chart(vec![not_finite, empty]), &path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("nothing to plot"), "{e}");
    let e = histogram_png("t", "x", &[f64::NAN, f64::NEG_INFINITY], 10, &path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("nothing to plot"), "{e}");
    let e = histogram_png("t", "x", &[0.5], 0, &path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(!path.exists() && !dir.path().join("empty.png.tmp").exists());
    // An unwritable place is named too.
    let missing = dir.path().join("no_such_folder").join("chart.png");
    let e = histogram_png("t", "x", &[0.5], 4, &missing).unwrap_err();
    assert!(format!("{e:#}").contains(&dir.path().join("no_such_folder").display().to_string()), "{e:#}");
}

#[test]
fn histogram_bins_count_finite_values() {
    let bins = histogram(&[0.0, 0.1, 0.1, 0.9, 1.0, f64::NAN], 2);
    assert_eq!(bins.iter().map(|b| b.2).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!((bins[0].0, bins[1].1), (0.0, 1.0));
    assert!(histogram(&[], 4).is_empty());
    assert_eq!(histogram(&[2.0, 2.0], 3).iter().map(|b| b.2).sum::<usize>(), 2, "a single value gets a range of 1");
}
