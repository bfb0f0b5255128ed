//! `kl.png` / `kl.svg`: the mean KL(p_chat ‖ p_patched) of each intervention, one horizontal bar
//! per token subset (all assistant tokens, the first k of each turn, the rest), with ± one
//! standard error, the value written at the end of each bar and the token counts in the legend.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Subset;
use super::kl::Summary;
use crate::plot::canvas::{Figure, Sizes, e, fmt_num, fmt_tick, nice_max, palette};

/// The figure: one row per intervention, in the order given.
pub struct KlBars<'a> {
    /// (intervention name, summaries in [`Subset::ALL`] order).
    pub rows: &'a [(String, [Summary; 3])],
    pub k_first: usize,
    pub title: String,
    pub size: (u32, u32),
}

impl KlBars<'_> {
    /// The subset's legend entry, with its token count (the same for every intervention).
    fn subset_label(&self, j: usize, s: Subset) -> String {
        let tokens = self.rows.first().map_or(0, |(_, sums)| sums[j].tokens);
        match s {
            Subset::All => format!("all assistant tokens ({tokens})"),
            Subset::KFirst => format!("first {} of each turn ({tokens})", self.k_first),
            Subset::PostKFirst => format!("after the first {} ({tokens})", self.k_first),
        }
    }
}

impl Figure for KlBars<'_> {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let s = Sizes::for_height(self.size.1);
        let n = self.rows.len().max(1) as f64;
        let top = self
            .rows
            .iter()
            .flat_map(|(_, sums)| sums.iter().map(|m| m.kl_mean + m.kl_stderr))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let xmax = if top > 0.0 { nice_max(top, 1.25) } else { 1.0 };
        let label_w = self
            .rows
            .iter()
            .map(|(name, _)| root.estimate_text_size(name, &s.tick_font()).map_or(0, |(w, _)| w))
            .max()
            .unwrap_or(0);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, s.title_font())
            .margin(s.px(24.0))
            .margin_right(s.px(70.0))
            .x_label_area_size(s.px(90.0))
            .y_label_area_size(label_w + s.px(30.0))
            .build_cartesian_2d(0f64..xmax, 0f64..n)
            .map_err(e)?;
        chart
            .configure_mesh()
            .bold_line_style(palette::GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(BLACK.mix(0.8))
            .label_style(s.tick_font())
            .axis_desc_style(s.label_font())
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("mean KL(p_chat ‖ p_patched) per predicted token (nats)")
            .x_label_formatter(&|v| fmt_tick(*v))
            .draw()
            .map_err(e)?;
        let h = 0.8 / Subset::ALL.len() as f64;
        let cap = h * 0.3;
        let whisker = BLACK.mix(0.8).stroke_width(s.line.max(2) - 1);
        for (j, subset) in Subset::ALL.iter().enumerate() {
            let color = palette::series(j);
            let mut bars = Vec::new();
            for (i, (_, sums)) in self.rows.iter().enumerate() {
                let m = sums[j];
                let y1 = n - i as f64 - 0.1 - j as f64 * h;
                let y0 = y1 - h;
                if m.kl_mean.is_finite() {
                    bars.push(Rectangle::new(
                        [(0.0, y0 + 0.1 * h), (m.kl_mean.min(xmax), y1 - 0.1 * h)],
                        color.filled(),
                    ));
                }
            }
            chart
                .draw_series(bars)
                .map_err(e)?
                .label(self.subset_label(j, *subset))
                .legend(move |(x, y)| Rectangle::new([(x, y - 8), (x + 24, y + 8)], color.filled()));
        }
        for (i, (_, sums)) in self.rows.iter().enumerate() {
            for (j, m) in sums.iter().enumerate() {
                let yc = n - i as f64 - 0.1 - (j as f64 + 0.5) * h;
                if !m.kl_mean.is_finite() {
                    chart
                        .draw_series(std::iter::once(
                            EmptyElement::at((0.0, yc))
                                + Text::new(
                                    "no tokens",
                                    (s.px(8.0) as i32, 0),
                                    s.tick_font().pos(Pos::new(HPos::Left, VPos::Center)),
                                ),
                        ))
                        .map_err(e)?;
                    continue;
                }
                let (lo, hi) = ((m.kl_mean - m.kl_stderr).max(0.0), (m.kl_mean + m.kl_stderr).min(xmax));
                if m.kl_stderr > 0.0 {
                    let lines = [
                        vec![(lo, yc), (hi, yc)],
                        vec![(lo, yc - cap), (lo, yc + cap)],
                        vec![(hi, yc - cap), (hi, yc + cap)],
                    ];
                    chart.draw_series(lines.into_iter().map(|l| PathElement::new(l, whisker))).map_err(e)?;
                }
                let text = fmt_num(m.kl_mean);
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((hi, yc))
                            + Text::new(
                                text,
                                (s.px(8.0) as i32, 0),
                                s.legend_font().pos(Pos::new(HPos::Left, VPos::Center)),
                            ),
                    ))
                    .map_err(e)?;
            }
        }
        // Row names, right-aligned left of the axis (the axis itself has no ticks to label).
        let font = s.tick_font().pos(Pos::new(HPos::Right, VPos::Center));
        for (i, (name, _)) in self.rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, n - i as f64 - 0.5));
            root.draw(&Text::new(name.as_str(), (x - s.px(12.0) as i32, y), font.clone())).map_err(e)?;
        }
        chart
            .configure_series_labels()
            .label_font(s.legend_font())
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .margin(s.px(12.0))
            .legend_area_size(s.px(30.0))
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::canvas::{Format, render};

    #[test]
    fn renders_png_and_svg_with_every_row_named() {
        let m = |kl: f64, se: f64, tokens: u64| Summary {
            tokens,
            kl_mean: kl,
            kl_stderr: se,
            nll_mean: 1.0,
            kl_base_mean: 0.5,
        };
        let rows = vec![
            ("vanilla_chat".to_string(), [m(0.0, 0.0, 40), m(0.0, 0.0, 10), m(0.0, 0.0, 30)]),
            ("vanilla_base2chat".to_string(), [m(0.8, 0.1, 40), m(1.5, 0.3, 10), m(0.5, 0.05, 30)]),
            (
                "patch_rank_sum-best_cchat".to_string(),
                [m(0.3, 0.02, 40), m(0.6, 0.1, 10), m(f64::NAN, 0.0, 0)],
            ),
        ];
        let fig = KlBars { rows: &rows, k_first: 10, title: "KL".into(), size: (1600, 1000) };
        let dir = tempfile::tempdir().unwrap();
        let files = render(&fig, dir.path(), "kl", &[Format::Png, Format::Svg]).unwrap();
        assert_eq!(files.len(), 2);
        let svg = std::fs::read_to_string(dir.path().join("kl.svg")).unwrap();
        for (name, _) in &rows {
            assert!(svg.contains(name.as_str()), "{name} is not in the SVG");
        }
        assert!(svg.contains("first 10 of each turn (10)") && svg.contains("no tokens"));
        assert!(std::fs::metadata(dir.path().join("kl.png")).unwrap().len() > 10_000);
    }
}
