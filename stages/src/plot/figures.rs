//! The paper's figures (DOMAIN.md §7), each a [`Figure`] drawn with plotters on any backend.

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::canvas::{
    Figure, Sizes, e, edge, fmt_num, fmt_tick, histogram, nice_max, palette, pearson, title_of, titled,
};
use super::data::{Latents, TrainLog};
use crate::latents::{Class, ClassThresholds};

const ALPHA_FILL: f64 = 0.5;

/// Grid, axes, tick labels and axis descriptions as every figure draws them.
macro_rules! mesh {
    ($chart:expr, $s:expr, $x:expr, $y:expr) => {
        $chart
            .configure_mesh()
            .bold_line_style(palette::GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(BLACK.mix(0.8))
            .label_style($s.tick_font())
            .axis_desc_style($s.label_font())
            .x_desc($x)
            .y_desc($y)
    };
}

/// The legend box as every figure draws it.
macro_rules! legend {
    ($chart:expr, $s:expr, $pos:expr) => {
        $chart
            .configure_series_labels()
            .label_font($s.legend_font())
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .position($pos)
            .margin($s.px(12.0))
            .legend_area_size($s.px(30.0))
            .draw()
            .map_err(e)?
    };
}

fn legend_box(color: RGBColor, alpha: f64, s: Sizes) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    let h = s.px(10.0) as i32;
    move |(x, y)| Rectangle::new([(x, y - h), (x + 2 * h, y + h)], color.mix(alpha).filled())
}

fn legend_line(color: RGBColor, s: Sizes) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    let w = s.px(24.0) as i32;
    move |(x, y)| PathElement::new(vec![(x, y), (x + w, y)], color.stroke_width(s.line))
}

/// Bars of one histogram: `counts` over [lo, hi], drawn only where non-zero.
fn bars(counts: &[f64], lo: f64, hi: f64, style: ShapeStyle) -> Vec<Rectangle<(f64, f64)>> {
    let n = counts.len();
    (0..n)
        .filter(|i| counts[*i] > 0.0)
        .map(|i| Rectangle::new([(edge(lo, hi, n, i), 0.0), (edge(lo, hi, n, i + 1), counts[i])], style))
        .collect()
}

/// A step outline of a histogram (for overlays).
fn steps(counts: &[f64], lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let n = counts.len();
    let mut pts = vec![(lo, 0.0)];
    for (i, c) in counts.iter().enumerate() {
        pts.push((edge(lo, hi, n, i), *c));
        pts.push((edge(lo, hi, n, i + 1), *c));
    }
    pts.push((hi, 0.0));
    pts
}

fn class_color(c: Class) -> RGBColor {
    match c {
        Class::BaseOnly => palette::BASE_ONLY,
        Class::Shared => palette::SHARED,
        Class::ChatOnly => palette::CHAT_ONLY,
        Class::Other => palette::OTHER,
    }
}

/// The frame of a one-panel figure: its title, margin and the room for tick labels and axis
/// descriptions, before the axes' ranges are given.
fn one_panel<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
    s: Sizes,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, s.title_font())
        .margin(s.px(24.0))
        .x_label_area_size(s.px(90.0))
        .y_label_area_size(s.px(110.0));
    b
}

/// Dashed vertical lines at the class boundaries on Δ_norm, from 0 to `ymax`.
fn class_boundaries<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    t: &ClassThresholds,
    ymax: f64,
    s: Sizes,
    style: ShapeStyle,
) -> Result<(), String> {
    for x in [t.base_only, t.shared_low, t.shared_high, t.chat_only] {
        chart
            .draw_series(DashedLineSeries::new(vec![(x, 0.0), (x, ymax)], s.px(10.0), s.px(8.0), style))
            .map_err(e)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Fig. "Δ_norm": histogram of the relative decoder norm over non-dead latents, 100 bins on [0, 1],
/// coloured by class band, the chat-specific subset on top, dashed class boundaries, and an inset
/// zoomed on the chat-only band (20 bins).
pub struct DeltaNorm<'a> {
    pub latents: &'a Latents,
    pub thresholds: &'a ClassThresholds,
    pub size: (u32, u32),
}

impl Figure for DeltaNorm<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let t = self.thresholds;
        let l = self.latents;
        let alive: Vec<usize> = (0..l.len()).filter(|j| !l.dead[*j]).collect();
        let specific: Vec<f64> = match &l.nu {
            Some(nu) => alive.iter().filter(|j| nu.chat_specific[**j]).map(|j| l.delta_norm[*j]).collect(),
            None => Vec::new(),
        };
        let bins = 100;
        let band = |class: Class| -> Vec<f64> {
            let values = alive.iter().map(|j| l.delta_norm[*j]).filter(|d| Class::of(*d, t) == class);
            histogram(values, 0.0, 1.0, bins)
        };
        let all = histogram(alive.iter().map(|j| l.delta_norm[*j]), 0.0, 1.0, bins);
        // Headroom above the tallest bar for the legend and the inset.
        let ymax = nice_max(all.iter().cloned().fold(1.0, f64::max), 1.75);
        let mut chart = one_panel(root, &title_of("Relative decoder norm difference", &l.label), s)
            .build_cartesian_2d(0f64..1f64, 0f64..ymax)
            .map_err(e)?;
        // The paper's ticks: the class boundaries and the middle.
        let ticks = [0.0, t.base_only, t.shared_low, 0.5, t.shared_high, t.chat_only, 1.0];
        mesh!(chart, s, "Δₙₒᵣₘ (relative norm of the chat decoder)", "Latents")
            .x_labels(21)
            .x_label_formatter(&|v| {
                if ticks.iter().any(|x| (x - v).abs() < 1e-9) { fmt_tick(*v) } else { String::new() }
            })
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        for class in [Class::BaseOnly, Class::Shared, Class::ChatOnly, Class::Other] {
            let counts = band(class);
            let color = class_color(class);
            let total = counts.iter().sum::<f64>();
            chart
                .draw_series(bars(&counts, 0.0, 1.0, color.filled()))
                .map_err(e)?
                .label(format!("{} ({})", class.name(), fmt_num(total)))
                .legend(legend_box(color, 1.0, s));
        }
        if !specific.is_empty() {
            let counts = histogram(specific.iter().copied(), 0.0, 1.0, bins);
            chart
                .draw_series(bars(&counts, 0.0, 1.0, palette::CHAT_SPECIFIC.filled()))
                .map_err(e)?
                .label(format!("Chat specific ({})", specific.len()))
                .legend(legend_box(palette::CHAT_SPECIFIC, 1.0, s));
        }
        class_boundaries(&mut chart, t, ymax, s, BLACK.mix(0.6).stroke_width(s.line.max(2) - 1))?;
        legend!(chart, s, SeriesLabelPosition::UpperLeft);

        // The inset: the chat-only band, 20 bins, over the upper right of the plotting area.
        let (xr, yr) = chart.plotting_area().get_pixel_range();
        let (pw, ph) = (xr.end - xr.start, yr.end - yr.start);
        let inset = root.clone().shrink(
            (xr.start + (pw as f64 * 0.54) as i32, yr.start + (ph as f64 * 0.04) as i32),
            ((pw as f64 * 0.44) as u32, (ph as f64 * 0.46) as u32),
        );
        inset.fill(&WHITE).map_err(e)?;
        let zoom_bins = 20;
        let lo = t.chat_only;
        let zoom = histogram(alive.iter().map(|j| l.delta_norm[*j]).filter(|d| *d >= lo), lo, 1.0, zoom_bins);
        let zoom_specific = histogram(specific.iter().copied(), lo, 1.0, zoom_bins);
        let zmax = nice_max(zoom.iter().cloned().fold(1.0, f64::max), 1.1);
        let small = Sizes { title: s.tick, label: s.tick, tick: s.tick * 0.85, legend: s.tick, line: s.line };
        let mut z = ChartBuilder::on(&inset)
            .caption(format!("Chat-only band, Δₙₒᵣₘ ≥ {}", fmt_tick(lo)), small.title_font())
            .margin(s.px(8.0))
            .x_label_area_size(s.px(44.0))
            .y_label_area_size(s.px(64.0))
            .build_cartesian_2d(lo..1f64, 0f64..zmax)
            .map_err(e)?;
        z.configure_mesh()
            .bold_line_style(palette::GRID)
            .light_line_style(TRANSPARENT)
            .label_style(small.tick_font())
            .x_labels(3)
            .y_labels(4)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        z.draw_series(bars(&zoom, lo, 1.0, palette::CHAT_ONLY.filled())).map_err(e)?;
        z.draw_series(bars(&zoom_specific, lo, 1.0, palette::CHAT_SPECIFIC.filled())).map_err(e)?;
        inset
            .draw(&Rectangle::new(
                [(0, 0), (inset.dim_in_pixel().0 as i32 - 1, inset.dim_in_pixel().1 as i32 - 1)],
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(e)?;
        Ok(())
    }
}

/// Δ_norm histograms of several crosscoders as step outlines (for `pipe diff`).
pub struct DeltaNormOverlay<'a> {
    pub runs: &'a [Latents],
    pub thresholds: &'a ClassThresholds,
    pub size: (u32, u32),
}

impl Figure for DeltaNormOverlay<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let t = self.thresholds;
        let hists: Vec<Vec<f64>> =
            self.runs.iter().map(|l| histogram(l.alive_delta_norm(), 0.0, 1.0, 100)).collect();
        let top = hists.iter().flatten().cloned().fold(1.0, f64::max);
        let ymax = nice_max(top, 1.35);
        let mut chart = one_panel(root, "Relative decoder norm difference", s)
            .build_cartesian_2d(0f64..1f64, 0f64..ymax)
            .map_err(e)?;
        mesh!(chart, s, "Δₙₒᵣₘ (relative norm of the chat decoder)", "Latents")
            .x_labels(11)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        class_boundaries(&mut chart, t, ymax, s, BLACK.mix(0.5).stroke_width(1))?;
        for (i, (l, h)) in self.runs.iter().zip(&hists).enumerate() {
            let color = palette::series(i);
            chart
                .draw_series(LineSeries::new(steps(h, 0.0, 1.0), color.stroke_width(s.line)))
                .map_err(e)?
                .label(format!(
                    "{} (chat-only {}, shared {})",
                    l.label,
                    l.count(Class::ChatOnly),
                    l.count(Class::Shared)
                ))
                .legend(legend_line(color, s));
        }
        legend!(chart, s, SeriesLabelPosition::UpperLeft);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// νᵋ against νʳ for the effective chat-only set and the shared baseline, both on (0, max),
/// with marginal histograms of each axis.
pub struct NuScatter<'a> {
    pub latents: &'a Latents,
    pub max: f64,
    pub size: (u32, u32),
}

impl Figure for NuScatter<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let Some(nu) = &self.latents.nu else { return Err("the table has no ν columns".into()) };
        let max = self.max;
        let inside = |v: f64| v > 0.0 && v < max;
        let pick = |set: &[bool]| -> Vec<(f64, f64)> {
            (0..set.len())
                .filter(|j| set[*j] && inside(nu.error[*j]) && inside(nu.reconstruction[*j]))
                .map(|j| (nu.error[j], nu.reconstruction[j]))
                .collect()
        };
        let groups = [
            ("Chat-only latents", pick(&nu.chat_only), palette::CHAT_ONLY),
            ("Shared latents", pick(&nu.shared), palette::SHARED),
        ];
        let (w, h) = root.dim_in_pixel();
        let area =
            titled(root, &title_of("Latent Scaling: νᵋ against νʳ", &self.latents.label), s.title_font())
                .map_err(e)?;
        let (top, bottom) = area.split_vertically((h as f64 * 0.22) as u32);
        let main_w = (w as f64 * 0.78) as u32;
        let (top_left, top_right) = top.split_horizontally(main_w);
        let (main, right) = bottom.split_horizontally(main_w);
        let (margin, left, below) = (s.px(16.0), s.px(110.0), s.px(90.0));
        let bins = 50;
        let hx: Vec<Vec<f64>> =
            groups.iter().map(|g| histogram(g.1.iter().map(|p| p.0), 0.0, max, bins)).collect();
        let hy: Vec<Vec<f64>> =
            groups.iter().map(|g| histogram(g.1.iter().map(|p| p.1), 0.0, max, bins)).collect();
        let cmax = nice_max(hx.iter().chain(&hy).flatten().cloned().fold(1.0, f64::max), 1.05);

        let mut chart = ChartBuilder::on(&main)
            .margin(margin)
            .x_label_area_size(below)
            .y_label_area_size(left)
            .build_cartesian_2d(0f64..max, 0f64..max)
            .map_err(e)?;
        mesh!(chart, s, "νᵋ (error)", "νʳ (reconstruction)")
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        let radius = s.px(6.0) as i32;
        for (name, pts, color) in &groups {
            let alpha = if pts.len() > 500 { 0.25 } else { 0.7 };
            let style = color.mix(alpha).filled();
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, radius, style)))
                .map_err(e)?
                .label(format!("{name} ({})", pts.len()))
                .legend(legend_box(*color, 0.8, s));
        }
        legend!(chart, s, SeriesLabelPosition::UpperLeft);

        let mut tx = ChartBuilder::on(&top_left)
            .margin(margin)
            .margin_bottom(0)
            .x_label_area_size(0)
            .y_label_area_size(left)
            .build_cartesian_2d(0f64..max, 0f64..cmax)
            .map_err(e)?;
        tx.configure_mesh()
            .bold_line_style(palette::GRID)
            .light_line_style(TRANSPARENT)
            .label_style(s.tick_font())
            .y_labels(3)
            .y_label_formatter(&|v| fmt_tick(*v))
            .disable_x_mesh()
            .draw()
            .map_err(e)?;
        let mut ty = ChartBuilder::on(&right)
            .margin(margin)
            .margin_left(0)
            // Room for the half of the last tick label that lies beyond the axis.
            .margin_right(s.px(44.0))
            .x_label_area_size(below)
            .y_label_area_size(0)
            .build_cartesian_2d(0f64..cmax, 0f64..max)
            .map_err(e)?;
        ty.configure_mesh()
            .bold_line_style(palette::GRID)
            .light_line_style(TRANSPARENT)
            .label_style(s.tick_font())
            .x_labels(3)
            .x_label_formatter(&|v| fmt_tick(*v))
            .disable_y_mesh()
            .draw()
            .map_err(e)?;
        for (i, (_, _, color)) in groups.iter().enumerate() {
            let style = color.mix(ALPHA_FILL).filled();
            tx.draw_series(bars(&hx[i], 0.0, max, style)).map_err(e)?;
            let n = hy[i].len();
            ty.draw_series((0..n).filter(|b| hy[i][*b] > 0.0).map(|b| {
                Rectangle::new([(0.0, edge(0.0, max, n, b)), (hy[i][b], edge(0.0, max, n, b + 1))], style)
            }))
            .map_err(e)?;
        }
        let _ = top_right;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Two side-by-side panels of νᵋ and νʳ histograms for two latent sets (chat-only against
/// shared, or all chat-only against those mostly active on template tokens).
pub struct NuHistograms<'a> {
    pub title: String,
    pub latents: &'a Latents,
    /// (name, member, colour) of each set.
    pub sets: Vec<(String, Vec<bool>, RGBColor)>,
    pub range: (f64, f64),
    pub bins: usize,
    pub size: (u32, u32),
}

impl Figure for NuHistograms<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let Some(nu) = &self.latents.nu else { return Err("the table has no ν columns".into()) };
        let area = titled(root, &self.title, s.title_font()).map_err(e)?;
        let panels = area.split_evenly((1, 2));
        let (lo, hi) = self.range;
        for (panel, (values, name)) in
            panels.iter().zip([(&nu.error, "νᵋ (error)"), (&nu.reconstruction, "νʳ (reconstruction)")])
        {
            let hists: Vec<Vec<f64>> = self
                .sets
                .iter()
                .map(|(_, member, _)| {
                    histogram((0..member.len()).filter(|j| member[*j]).map(|j| values[j]), lo, hi, self.bins)
                })
                .collect();
            let ymax = nice_max(hists.iter().flatten().cloned().fold(1.0, f64::max), 1.3);
            let mut chart = ChartBuilder::on(panel)
                .margin(s.px(20.0))
                .x_label_area_size(s.px(90.0))
                .y_label_area_size(s.px(100.0))
                .build_cartesian_2d(lo..hi, 0f64..ymax)
                .map_err(e)?;
            mesh!(chart, s, name, "Latents")
                .x_labels(7)
                .x_label_formatter(&|v| fmt_tick(*v))
                .y_label_formatter(&|v| fmt_tick(*v))
                .draw()
                .map_err(e)?;
            for (i, (set, member, color)) in self.sets.iter().enumerate() {
                let outside = (0..member.len())
                    .filter(|j| member[*j] && values[*j].is_finite() && (values[*j] < lo || values[*j] > hi))
                    .count();
                let shown = hists[i].iter().sum::<f64>();
                let extra = if outside > 0 { format!(", {outside} outside") } else { String::new() };
                chart
                    .draw_series(bars(&hists[i], lo, hi, color.mix(ALPHA_FILL).filled()))
                    .map_err(e)?
                    .label(format!("{set} ({}{extra})", fmt_num(shown)))
                    .legend(legend_box(*color, ALPHA_FILL, s));
            }
            legend!(chart, s, SeriesLabelPosition::UpperRight);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Latents of the effective chat-only set with |νᵋ| < π and |νʳ| < π, against π; one line per
/// crosscoder; log y.
pub struct BelowThreshold<'a> {
    pub runs: Vec<&'a Latents>,
    pub size: (u32, u32),
}

/// (π, count) over `points` values of π in [0, 1].
pub fn below_threshold(l: &Latents, points: usize) -> Vec<(f64, f64)> {
    let Some(nu) = &l.nu else { return Vec::new() };
    (0..points)
        .map(|i| {
            let pi = i as f64 / (points - 1) as f64;
            let n = (0..nu.chat_only.len())
                .filter(|j| nu.chat_only[*j] && nu.error[*j].abs() < pi && nu.reconstruction[*j].abs() < pi)
                .count();
            (pi, n as f64)
        })
        .collect()
}

impl Figure for BelowThreshold<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let curves: Vec<Vec<(f64, f64)>> = self.runs.iter().map(|l| below_threshold(l, 100)).collect();
        let top = curves.iter().flatten().map(|p| p.1).fold(1.0, f64::max);
        let ymax = 10f64.powf((top * 1.5).log10().ceil());
        let mut chart = one_panel(root, "Chat-only latents below a ν threshold", s)
            .build_cartesian_2d(0f64..1f64, (0.8f64..ymax).log_scale())
            .map_err(e)?;
        mesh!(chart, s, "π", "Latents with |νᵋ| < π and |νʳ| < π")
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        for (i, (l, c)) in self.runs.iter().zip(&curves).enumerate() {
            let color = palette::series(i);
            let size = l.nu.as_ref().map_or(0, |nu| nu.chat_only.iter().filter(|x| **x).count());
            let at = |pi: f64| c.iter().rev().find(|p| p.0 <= pi).map_or(0.0, |p| p.1);
            // Zero counts have no place on a log axis: draw each run of positive counts.
            let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for p in c {
                if p.1 >= 1.0 {
                    segments.last_mut().expect("one").push(*p);
                } else if !segments.last().expect("one").is_empty() {
                    segments.push(Vec::new());
                }
            }
            let label = format!(
                "{} ({} at π = 0.2, {} at 0.5, of {size})",
                l.label,
                fmt_num(at(0.2)),
                fmt_num(at(0.5))
            );
            let mut first = true;
            for seg in segments.into_iter().filter(|s| !s.is_empty()) {
                let drawn = chart.draw_series(LineSeries::new(seg, color.stroke_width(s.line))).map_err(e)?;
                if std::mem::take(&mut first) {
                    drawn.label(label.clone()).legend(legend_line(color, s));
                }
            }
            if first {
                // Nothing positive to draw: still name the run in the legend.
                chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(e)?
                    .label(label)
                    .legend(legend_line(color, s));
            }
        }
        legend!(chart, s, SeriesLabelPosition::UpperLeft);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Cosine similarity of each latent's base and chat decoders, 20 bins on [-1, 1], one bar group
/// per class, each class normalised to sum 1.
pub struct DecoderCosine<'a> {
    pub latents: &'a Latents,
    pub size: (u32, u32),
}

impl Figure for DecoderCosine<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let l = self.latents;
        let bins = 20;
        let order = [Class::ChatOnly, Class::BaseOnly, Class::Other, Class::Shared];
        let groups: Vec<(Class, Vec<f64>, usize)> = order
            .iter()
            .map(|c| {
                let values: Vec<f64> = (0..l.len())
                    .filter(|j| !l.dead[*j] && l.classes[*j] == *c)
                    .map(|j| l.cos_sim[j])
                    .collect();
                let mut h = histogram(values.iter().copied(), -1.0, 1.0, bins);
                let total: f64 = h.iter().sum();
                if total > 0.0 {
                    h.iter_mut().for_each(|x| *x /= total);
                }
                (*c, h, values.len())
            })
            .collect();
        let ymax = nice_max(groups.iter().flat_map(|g| g.1.iter()).cloned().fold(0.05, f64::max), 1.15);
        let mut chart = one_panel(root, &title_of("Decoder cosine similarity by class", &l.label), s)
            .build_cartesian_2d(-1f64..1f64, 0f64..ymax)
            .map_err(e)?;
        mesh!(chart, s, "cos(d_base, d_chat)", "Share of the class's latents")
            .x_labels(11)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        let width = 2.0 / bins as f64;
        let present: Vec<&(Class, Vec<f64>, usize)> = groups.iter().filter(|g| g.2 > 0).collect();
        let k = present.len().max(1) as f64;
        for (g, (class, h, n)) in present.iter().map(|g| (g.0, &g.1, g.2)).enumerate() {
            let color = class_color(class);
            let style = color.filled();
            let rects: Vec<_> = (0..bins)
                .filter(|i| h[*i] > 0.0)
                .map(|i| {
                    let x0 = edge(-1.0, 1.0, bins, i) + width * (0.05 + 0.9 * g as f64 / k);
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9 / k, h[i])], style)
                })
                .collect();
            chart
                .draw_series(rects)
                .map_err(e)?
                .label(format!("{} ({n})", class.name()))
                .legend(legend_box(color, 1.0, s));
        }
        legend!(chart, s, SeriesLabelPosition::UpperLeft);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Activation frequency (log x) against νᵋ and νʳ over the effective chat-only set, with
/// Pearson's r (on the frequency itself, as the original prints it).
pub struct FrequencyVsNu<'a> {
    pub latents: &'a Latents,
    pub size: (u32, u32),
}

impl Figure for FrequencyVsNu<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let l = self.latents;
        let (Some(nu), Some(freq)) = (&l.nu, &l.frequency) else {
            return Err("the table has no ν or frequency columns".into());
        };
        let set: Vec<usize> = (0..l.len()).filter(|j| nu.chat_only[*j] && freq[*j] > 0.0).collect();
        let f: Vec<f64> = set.iter().map(|j| freq[*j]).collect();
        let (fmin, fmax) = f.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        // Whole decades, at least two (one decade would carry a single labelled tick), with the
        // bounds nudged outwards so that plotters labels both.
        let (lo_dec, hi_dec) = if f.is_empty() {
            (-4, 0)
        } else {
            let (lo, hi) = (fmin.log10().floor() as i32, (fmax.log10() - 1e-9).ceil() as i32);
            if hi - lo < 2 { (hi - 2, hi) } else { (lo, hi) }
        };
        let (flo, fhi) = (10f64.powi(lo_dec) * 0.999, 10f64.powi(hi_dec) * 1.001);
        let area = titled(
            root,
            &title_of("Activation frequency against ν, chat-only latents", &l.label),
            s.title_font(),
        )
        .map_err(e)?;
        let panels = area.split_evenly((1, 2));
        for (panel, (values, name, sym)) in panels
            .iter()
            .zip([(&nu.error, "νᵋ (error)", "νᵋ"), (&nu.reconstruction, "νʳ (reconstruction)", "νʳ")])
        {
            let ys: Vec<f64> = set.iter().map(|j| values[*j]).collect();
            let finite: Vec<f64> = ys.iter().copied().filter(|y| y.is_finite()).collect();
            let ylo = finite.iter().cloned().fold(0.0, f64::min).max(-1.0);
            let yhi = finite.iter().cloned().fold(1.1, f64::max).min(2.0);
            let r = pearson(&f, &ys)
                .map_or("n/a".to_string(), |r| format!("{:.2}", if r.abs() < 0.005 { 0.0 } else { r }));
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{sym}: Pearson r = {r} (n = {})", finite.len()), s.label_font())
                .margin(s.px(20.0))
                .x_label_area_size(s.px(90.0))
                .y_label_area_size(s.px(100.0))
                .build_cartesian_2d((flo..fhi).log_scale(), ylo..yhi)
                .map_err(e)?;
            mesh!(chart, s, "Activation frequency", name)
                .x_label_formatter(&|v| fmt_tick(*v))
                .y_label_formatter(&|v| fmt_tick(*v))
                .draw()
                .map_err(e)?;
            let style = palette::CHAT_ONLY.mix(if set.len() > 500 { 0.3 } else { 0.7 }).filled();
            chart
                .draw_series(
                    f.iter()
                        .zip(&ys)
                        .filter(|(_, y)| y.is_finite() && **y >= ylo && **y <= yhi)
                        .map(|(x, y)| Circle::new((*x, *y), s.px(6.0) as i32, style)),
                )
                .map_err(e)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Training curves from `metrics.jsonl`: up to four panels (loss, FVE, L0, dead fraction), the
/// training series as lines and validation as lines with markers; one colour per run.
pub struct Training<'a> {
    pub runs: &'a [TrainLog],
    pub size: (u32, u32),
}

/// The panels: (metric, title), the preferred four that any run has.
pub fn training_panels(runs: &[TrainLog]) -> Vec<(&'static str, &'static str)> {
    const PREFERRED: [(&str, &str); 6] = [
        ("loss", "Loss"),
        ("frac_variance_explained", "Fraction of variance explained"),
        ("l0", "L0 (active latents per token)"),
        ("frac_dead", "Dead latents (fraction)"),
        ("l2", "Reconstruction loss (L2)"),
        ("auxk", "Auxiliary loss"),
    ];
    PREFERRED
        .into_iter()
        .filter(|(m, _)| runs.iter().any(|r| !r.get(false, m).is_empty() || !r.get(true, m).is_empty()))
        .take(4)
        .collect()
}

impl Figure for Training<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1 / 2 + 250);
        let panels = training_panels(self.runs);
        if panels.is_empty() {
            return Err("no known metric in metrics.jsonl".into());
        }
        let title = match self.runs {
            [one] => title_of("Training", &one.label),
            _ => "Training".to_string(),
        };
        let area = titled(root, &title, s.title_font()).map_err(e)?;
        let cells = area.split_evenly((2, 2));
        let single = self.runs.len() == 1;
        for (idx, (cell, (metric, name))) in cells.iter().zip(&panels).enumerate() {
            let pts: Vec<&(f64, f64)> = self
                .runs
                .iter()
                .flat_map(|r| r.get(false, metric).iter().chain(r.get(true, metric)))
                .collect();
            let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
            let (ylo, yhi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let (ylo, yhi) =
                if ylo > yhi { (0.0, 1.0) } else { (ylo.min(0.0), nice_max(yhi.max(1e-9), 1.08)) };
            let mut chart = ChartBuilder::on(cell)
                .caption(*name, s.label_font())
                .margin(s.px(18.0))
                .x_label_area_size(s.px(80.0))
                .y_label_area_size(s.px(110.0))
                .build_cartesian_2d(0f64..xmax, ylo..yhi)
                .map_err(e)?;
            mesh!(chart, s, "Step", "")
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|v| fmt_tick(*v))
                .y_label_formatter(&|v| fmt_tick(*v))
                .draw()
                .map_err(e)?;
            for (i, run) in self.runs.iter().enumerate() {
                let (tc, vc) = if single {
                    (palette::series(0), palette::series(1))
                } else {
                    (palette::series(i), palette::series(i))
                };
                let train = run.get(false, metric);
                let val = run.get(true, metric);
                let (tl, vl) = if single {
                    ("train".to_string(), "validation".to_string())
                } else {
                    (format!("{} train", run.label), format!("{} validation", run.label))
                };
                if !train.is_empty() {
                    chart
                        .draw_series(LineSeries::new(
                            train.iter().copied(),
                            tc.mix(0.85).stroke_width(s.line.max(2) - 1),
                        ))
                        .map_err(e)?
                        .label(tl)
                        .legend(legend_line(tc, s));
                }
                if !val.is_empty() {
                    let style = vc.filled();
                    chart
                        .draw_series(LineSeries::new(val.iter().copied(), vc.stroke_width(s.line)))
                        .map_err(e)?;
                    chart
                        .draw_series(val.iter().map(|p| Circle::new(*p, s.px(6.0) as i32, style)))
                        .map_err(e)?;
                    let dot = s.px(7.0) as i32;
                    let w = s.px(24.0) as i32;
                    chart
                        .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                        .map_err(e)?
                        .label(vl)
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (w, 0)], vc.stroke_width(2))
                                + Circle::new((w / 2, 0), dot, style)
                        });
                }
            }
            if idx == 0 {
                legend!(chart, s, SeriesLabelPosition::UpperRight);
            }
        }
        Ok(())
    }
}
