//! What every figure shares: the embedded font, the palette, text sizes, rendering one figure to
//! PNG and SVG, and histogram binning.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// DejaVu Sans (Bitstream Vera licence, `stages/assets/fonts/LICENSE-DejaVu.txt`): Latin, Greek
/// and the symbols our labels use (ν, ε, Δ, π, superscripts), so no system font is needed.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font under `sans-serif` once per process.
pub fn ensure_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// The paper's colours (matplotlib's defaults and the art.py bands).
pub mod palette {
    use plotters::style::RGBColor;
    pub const BASE_ONLY: RGBColor = RGBColor(44, 160, 44); // green (C2)
    pub const SHARED: RGBColor = RGBColor(255, 127, 14); // C1
    pub const CHAT_ONLY: RGBColor = RGBColor(0, 153, 255); // (0, 0.6, 1)
    pub const CHAT_SPECIFIC: RGBColor = RGBColor(0, 0, 139); // dark blue
    pub const OTHER: RGBColor = RGBColor(176, 176, 176);
    pub const GRID: RGBColor = RGBColor(225, 225, 225);
    pub const TEXT: RGBColor = RGBColor(30, 30, 30);
    /// matplotlib's tab10, for one line per run.
    pub const SERIES: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    pub fn series(i: usize) -> RGBColor {
        SERIES[i % SERIES.len()]
    }
}

/// Text sizes in pixels of a figure `height` pixels high (1000 px: 40 / 32 / 26 / 26).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub title: f64,
    pub label: f64,
    pub tick: f64,
    pub legend: f64,
    pub line: u32,
}

impl Sizes {
    pub fn for_height(height: u32) -> Sizes {
        let s = height as f64 / 1000.0;
        Sizes {
            title: 40.0 * s,
            label: 32.0 * s,
            tick: 26.0 * s,
            legend: 26.0 * s,
            line: (3.0 * s).round().max(1.0) as u32,
        }
    }
    pub fn px(&self, base: f64) -> u32 {
        (base * self.title / 40.0).round() as u32
    }
    pub fn title_font(&self) -> TextStyle<'static> {
        (FAMILY, self.title).into_font().color(&palette::TEXT)
    }
    pub fn label_font(&self) -> TextStyle<'static> {
        (FAMILY, self.label).into_font().color(&palette::TEXT)
    }
    pub fn tick_font(&self) -> TextStyle<'static> {
        (FAMILY, self.tick).into_font().color(&palette::TEXT)
    }
    pub fn legend_font(&self) -> TextStyle<'static> {
        (FAMILY, self.legend).into_font().color(&palette::TEXT)
    }
}

/// Output formats of the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }
}

/// Why a figure could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("figure {}: {message}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub message: String,
}

/// A figure that draws itself on any plotters backend.
pub trait Figure {
    /// Width and height in pixels (the SVG uses the same coordinates).
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Turns any plotters error into the message a [`Figure`] returns.
pub fn e<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Renders `fig` as `<dir>/<stem>.<ext>` for each format; returns the files written.
pub fn render(
    fig: &impl Figure,
    dir: &Path,
    stem: &str,
    formats: &[Format],
) -> Result<Vec<PathBuf>, PlotError> {
    ensure_font();
    let mut written = Vec::new();
    for f in formats {
        let path = dir.join(format!("{stem}.{}", f.ext()));
        let err = |message: String| PlotError { path: path.clone(), message };
        match f {
            Format::Png => {
                let root = BitMapBackend::new(&path, fig.size()).into_drawing_area();
                root.fill(&WHITE).map_err(|x| err(e(x)))?;
                fig.draw(&root).map_err(err)?;
                root.present().map_err(|x| err(e(x)))?;
            }
            Format::Svg => {
                let root = SVGBackend::new(&path, fig.size()).into_drawing_area();
                root.fill(&WHITE).map_err(|x| err(e(x)))?;
                fig.draw(&root).map_err(err)?;
                root.present().map_err(|x| err(e(x)))?;
            }
        }
        if !path.is_file() {
            return Err(err("the backend wrote no file".into()));
        }
        written.push(path);
    }
    Ok(written)
}

/// Counts of the finite `values` in `bins` equal bins on [lo, hi] (hi falls in the last bin;
/// values outside are not counted).
pub fn histogram(values: impl IntoIterator<Item = f64>, lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    let mut counts = vec![0.0; bins];
    let width = (hi - lo) / bins as f64;
    for v in values {
        if !v.is_finite() || v < lo || v > hi {
            continue;
        }
        let i = (((v - lo) / width) as usize).min(bins - 1);
        counts[i] += 1.0;
    }
    counts
}

/// The left edge of bin `i`.
pub fn edge(lo: f64, hi: f64, bins: usize, i: usize) -> f64 {
    lo + (hi - lo) * i as f64 / bins as f64
}

/// Pearson's correlation of the pairs where both are finite; `None` under 3 pairs or no spread.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let pairs: Vec<(f64, f64)> =
        x.iter().zip(y).filter(|(a, b)| a.is_finite() && b.is_finite()).map(|(a, b)| (*a, *b)).collect();
    if pairs.len() < 3 {
        return None;
    }
    let n = pairs.len() as f64;
    let (mx, my) = (pairs.iter().map(|p| p.0).sum::<f64>() / n, pairs.iter().map(|p| p.1).sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in &pairs {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// A round upper bound for an axis whose data reaches `max` (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8
/// × 10^k), with headroom.
pub fn nice_max(max: f64, headroom: f64) -> f64 {
    let target = (max * headroom).max(1e-12);
    let exp = target.log10().floor() as i32;
    // m / 10^k rather than m · 10^-k: 3 / 10 is the double nearest 0.3, 3 · 0.1 is not.
    let scaled = |m: f64| if exp >= 0 { m * 10f64.powi(exp) } else { m / 10f64.powi(-exp) };
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if scaled(m) >= target {
            return scaled(m);
        }
    }
    scaled(10.0)
}

/// A tick label: the shortest decimal that the tick rounds to at 6 significant digits ("0.1",
/// "2.5", "1000"), scientific outside [1e-3, 1e6) ("1e-5", "2.5e6").
pub fn fmt_tick(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if (1e-3..1e6).contains(&a) {
        let digits = (5 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
        return s.to_string();
    }
    let s = format!("{v:.2e}");
    let (mantissa, exp) = s.split_once('e').expect("scientific");
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exp}")
}

/// A title above everything in `area`, with room above it (plotters' own `titled` puts the
/// glyphs' tops at the very edge).
pub fn titled<'a, DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    font: TextStyle<'a>,
) -> Result<DrawingArea<DB, Shift>, DrawingAreaErrorKind<DB::ErrorType>> {
    let pad = (font.font.get_size() * 0.4).round() as u32;
    area.margin(pad, 0, 0, 0).titled(title, font)
}

/// `title (label)`, or the title alone when the label is empty.
pub fn title_of(title: &str, label: &str) -> String {
    if label.is_empty() { title.to_string() } else { format!("{title} ({label})") }
}

/// A number for a legend or caption: integers plainly, others to 3 significant digits.
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 0.01 && v.abs() < 1e4 {
        let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_puts_the_upper_edge_in_the_last_bin_and_drops_the_rest() {
        let h = histogram([0.0, 0.05, 0.1, 0.99, 1.0, 1.01, -0.1, f64::NAN], 0.0, 1.0, 10);
        assert_eq!(h[0], 2.0);
        assert_eq!(h[1], 1.0);
        assert_eq!(h[9], 2.0);
        assert_eq!(h.iter().sum::<f64>(), 5.0);
    }

    #[test]
    fn pearson_of_a_line_is_one_and_needs_spread() {
        let x = [1.0, 2.0, 3.0, f64::NAN];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 1.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &[3.0, 2.0, 1.0, 0.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&x, &[1.0, 1.0, 1.0, 1.0]), None);
        assert_eq!(pearson(&[1.0, 2.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn nice_max_and_numbers() {
        assert_eq!(nice_max(87.0, 1.1), 100.0);
        assert_eq!(nice_max(0.3, 1.0), 0.3);
        assert_eq!(nice_max(0.98, 1.15), 1.2);
        assert_eq!(nice_max(62.0, 1.75), 120.0);
        assert_eq!(nice_max(1.8, 1.1), 2.0);
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(fmt_num(0.12345), "0.123");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(0.000123), "1.23e-4");
        for (v, s) in [
            (0.1, "0.1"),
            (0.30000000000000004, "0.3"),
            (1.0, "1"),
            (-0.8, "-0.8"),
            (4.5, "4.5"),
            (1000.0, "1000"),
            (0.001, "0.001"),
            (1e-5, "1e-5"),
            (2.5e6, "2.5e6"),
            (-1e-15, "0"),
            (123456.0, "123456"),
        ] {
            assert_eq!(fmt_tick(v), s, "{v}");
        }
    }
}
