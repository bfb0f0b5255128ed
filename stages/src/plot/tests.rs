//! Every figure drawn from a synthetic table of paper-like size and shape, in both formats: the
//! PNG decodes at the figure's size with the palette's colours in it, the SVG parses with its
//! title and marks in it. `PIPE_PLOT_DIR=/some/folder` keeps the figures there to look at.

use std::path::{Path, PathBuf};

use plotters::style::RGBColor;

use super::canvas::{Figure, Format, palette, render};
use super::data::{Latents, TrainLog};
use super::figures::{
    BelowThreshold, DecoderCosine, DeltaNorm, DeltaNormOverlay, FrequencyVsNu, NuHistograms, NuScatter,
    Training, below_threshold,
};
use super::synthetic::{synthetic_metrics, synthetic_table};
use crate::latents::{Class, ClassThresholds};

fn synthetic(n: usize, seed: u64, label: &str) -> Latents {
    Latents::from_table(&synthetic_table(n, seed), label, &ClassThresholds::default()).unwrap()
}

fn training_log(label: &str, scale: f64) -> TrainLog {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, synthetic_metrics(2000, 20, 500, scale)).unwrap();
    TrainLog::read(&path, label).unwrap()
}

fn out_dir() -> (Option<tempfile::TempDir>, PathBuf) {
    match std::env::var_os("PIPE_PLOT_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            (None, PathBuf::from(d))
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    }
}

struct Decoded {
    width: u32,
    height: u32,
    rgb: Vec<[u8; 3]>,
}

fn decode_png(path: &Path) -> Decoded {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{}: {:?}", path.display(), info.color_type);
    let rgb = buf[..info.buffer_size()].chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    Decoded { width: info.width, height: info.height, rgb }
}

/// Renders `fig` in both formats and checks what any figure must be: the right size, mostly
/// white but far from blank, with text and the `colors` given, and a well-formed SVG with its
/// `title` in it. Returns the decoded PNG for figure-specific checks.
fn check(fig: &impl Figure, dir: &Path, stem: &str, title: &str, colors: &[RGBColor]) -> Decoded {
    let files = render(fig, dir, stem, &[Format::Png, Format::Svg]).unwrap();
    assert_eq!(files.len(), 2);
    let png = decode_png(&files[0]);
    assert_eq!((png.width, png.height), fig.size(), "{stem}");
    let n = png.rgb.len() as f64;
    let white = png.rgb.iter().filter(|p| **p == [255, 255, 255]).count() as f64;
    let ink = 1.0 - white / n;
    assert!((0.01..0.6).contains(&ink), "{stem}: {ink:.3} of the pixels are not white");
    let dark = png.rgb.iter().filter(|p| p.iter().all(|c| *c < 80)).count();
    assert!(dark > 500, "{stem}: no text ({dark} dark pixels)");
    for c in colors {
        let hits = png.rgb.iter().filter(|p| **p == [c.0, c.1, c.2]).count();
        assert!(hits > 50, "{stem}: colour {c:?} drawn on {hits} pixels");
    }
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{stem}.svg: {e}"));
    let texts: String =
        doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).collect();
    assert!(texts.contains(title), "{stem}.svg has no title {title:?}");
    let marks = doc
        .descendants()
        .filter(|n| ["rect", "circle", "polyline", "line", "path"].iter().any(|t| n.has_tag_name(*t)))
        .count();
    assert!(marks > 20, "{stem}.svg: {marks} marks");
    png
}

#[test]
fn every_figure_renders_in_both_formats_and_is_not_blank() {
    let (_keep, dir) = out_dir();
    let t = ClassThresholds::default();
    let a = synthetic(20_000, 1, "BatchTopK");
    let b = synthetic(20_000, 2, "L1");
    let one = (1600, 1000);
    let two = (3200, 1000);
    let nu = a.nu.as_ref().unwrap();

    check(
        &DeltaNorm { latents: &a, thresholds: &t, size: one },
        &dir,
        "delta_norm",
        "Relative decoder norm difference",
        &[palette::SHARED, palette::CHAT_SPECIFIC, palette::BASE_ONLY, palette::OTHER],
    );
    check(
        &DeltaNormOverlay { runs: &[a.clone(), b.clone()], thresholds: &t, size: one },
        &dir,
        "delta_norm_overlay",
        "L1",
        &[palette::series(0), palette::series(1)],
    );
    check(&NuScatter { latents: &a, max: 1.1, size: one }, &dir, "nu_scatter", "Latent Scaling", &[]);
    check(
        &NuHistograms {
            title: "ν ratios".into(),
            latents: &a,
            sets: vec![
                ("Chat only".into(), nu.chat_only.clone(), palette::CHAT_ONLY),
                ("Shared".into(), nu.shared.clone(), palette::SHARED),
            ],
            range: (-0.1, 1.1),
            bins: 100,
            size: two,
        },
        &dir,
        "nu_histograms",
        "ν ratios",
        &[],
    );
    check(
        &BelowThreshold { runs: vec![&a, &b], size: one },
        &dir,
        "latents_below_threshold",
        "BatchTopK",
        &[palette::series(0), palette::series(1)],
    );
    check(
        &DecoderCosine { latents: &a, size: one },
        &dir,
        "decoder_cosine",
        "Decoder cosine similarity",
        &[palette::SHARED, palette::CHAT_ONLY, palette::OTHER],
    );
    check(&FrequencyVsNu { latents: &a, size: two }, &dir, "frequency_vs_nu", "Pearson r", &[]);
    let logs = [training_log("BatchTopK", 1.0), training_log("L1", 1.3)];
    check(
        &Training { runs: &logs[..1], size: (3200, 1400) },
        &dir,
        "training",
        "Training",
        &[palette::series(0), palette::series(1)],
    );
    check(
        &Training { runs: &logs, size: (3200, 1400) },
        &dir,
        "training_overlay",
        "L1 validation",
        &[palette::series(0), palette::series(1)],
    );
}

#[test]
fn below_threshold_counts_latents_under_both_ratios() {
    let l = synthetic(5000, 3, "x");
    let nu = l.nu.as_ref().unwrap();
    let curve = below_threshold(&l, 101);
    assert_eq!(curve.len(), 101);
    assert_eq!(curve[0], (0.0, 0.0));
    let at = |i: usize| curve[i].1 as usize;
    let brute = |pi: f64| {
        (0..l.len())
            .filter(|j| nu.chat_only[*j] && nu.error[*j].abs() < pi && nu.reconstruction[*j].abs() < pi)
            .count()
    };
    assert_eq!(at(20), brute(0.2));
    assert_eq!(at(50), brute(0.5));
    assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1), "not monotone");
    assert!(at(100) > at(20) && at(20) > 0);
}

#[test]
fn figures_of_empty_or_degenerate_tables_still_render() {
    let (_keep, dir) = out_dir();
    let t = ClassThresholds::default();
    // No chat-only latents, no ν, everything dead but one: each figure says so instead of failing.
    let mut l = synthetic(50, 4, "degenerate");
    l.delta_norm.iter_mut().for_each(|d| *d = 0.5);
    l.classes.iter_mut().for_each(|c| *c = Class::Shared);
    l.dead.iter_mut().skip(1).for_each(|d| *d = true);
    l.nu = None;
    let files = render(
        &DeltaNorm { latents: &l, thresholds: &t, size: (800, 500) },
        &dir,
        "degenerate_delta_norm",
        &[Format::Png],
    )
    .unwrap();
    assert!(decode_png(&files[0]).rgb.contains(&[palette::SHARED.0, palette::SHARED.1, palette::SHARED.2]));
    render(&DecoderCosine { latents: &l, size: (800, 500) }, &dir, "degenerate_cosine", &[Format::Svg])
        .unwrap();
    assert!(
        render(
            &NuScatter { latents: &l, max: 1.1, size: (800, 500) },
            &dir,
            "degenerate_scatter",
            &[Format::Png]
        )
        .is_err()
    );
    render(
        &BelowThreshold { runs: vec![&l], size: (800, 500) },
        &dir,
        "degenerate_threshold",
        &[Format::Png],
    )
    .unwrap();
}
